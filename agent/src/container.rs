//! Turning an OCI runtime spec into a running process: the plan (computed in the agent before
//! fork) and the child side (namespaces, mounts, pivot_root, credentials, exec).

use crate::sys;
use oci_spec::runtime::{Capability, LinuxNamespaceType, Mount, Process, Spec};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

/// Default PATH when the spec's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process part: credentials, limits, environment, program.
#[derive(Debug, Clone)]
pub struct ProcPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub rlimits: Vec<(u32, u64, u64)>,
    pub no_new_privs: bool,
    pub caps: Option<Caps>,
    pub terminal: bool,
    /// Initial terminal size (rows, cols) from `process.consoleSize`.
    pub console_size: Option<(u16, u16)>,
    /// Check at create that the program exists (runc's create does; see
    /// `Request::CreateContainer`).
    pub check_entrypoint: bool,
}

/// Capability sets as bit masks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// The container part (init process only).
#[derive(Debug, Clone)]
pub struct RootPlan {
    pub rootfs: PathBuf,
    /// CLONE_NEW* flags to unshare (PID excluded: handled at fork).
    pub unshare: libc::c_int,
    pub new_pid_ns: bool,
    pub mounts: Vec<Mount>,
    pub hostname: Option<String>,
    pub readonly_root: bool,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    /// The container's cgroup (v2 directory), joined by the child itself before it unshares
    /// its namespaces: a new cgroup namespace is then rooted at the container's own cgroup
    /// (its `/sys/fs/cgroup` shows its own `memory.max`), as under runc.
    pub cgroup: Option<PathBuf>,
}

fn einval(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Computes the process plan from an OCI `Process`.
pub fn proc_plan(p: &Process, terminal: bool) -> io::Result<ProcPlan> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(einval("process.args is empty"));
    }
    let mut rlimits = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let res = rlimit_number(&format!("{:?}", r.typ()))
            .ok_or_else(|| einval(format!("unknown rlimit {:?}", r.typ())))?;
        rlimits.push((res, r.soft(), r.hard()));
    }
    let caps = p.capabilities().as_ref().map(|c| {
        let mask = |s: &Option<oci_spec::runtime::Capabilities>| {
            s.iter()
                .flatten()
                .map(|c| 1u64 << cap_number(c))
                .fold(0, |a, b| a | b)
        };
        Caps {
            bounding: mask(c.bounding()),
            effective: mask(c.effective()),
            permitted: mask(c.permitted()),
            inheritable: mask(c.inheritable()),
            ambient: mask(c.ambient()),
        }
    });
    let user = p.user();
    Ok(ProcPlan {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().to_string_lossy().into_owned(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        rlimits,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        caps,
        terminal: terminal || p.terminal().unwrap_or(false),
        console_size: p.console_size().as_ref().map(|b| {
            (
                u16::try_from(b.height()).unwrap_or(u16::MAX),
                u16::try_from(b.width()).unwrap_or(u16::MAX),
            )
        }),
        check_entrypoint: false,
    })
}

/// Computes the container plan from a spec. With `vm_network` (the host configured the
/// guest's network), a `network` namespace entry is ignored, with or without a path: the
/// container shares the VM's network namespace, where the configured interfaces are (a path
/// names a host namespace, meaningless in the guest; a new namespace would hold only `lo`).
pub fn root_plan(spec: &Spec, rootfs: &Path, vm_network: bool) -> io::Result<RootPlan> {
    let mut unshare = 0;
    let mut new_pid_ns = false;
    let mut masked = Vec::new();
    let mut ro = Vec::new();
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().iter().flatten() {
            if vm_network && ns.typ() == LinuxNamespaceType::Network {
                continue;
            }
            if ns.path().is_some() {
                return Err(einval("joining namespaces by path is not supported"));
            }
            match ns.typ() {
                LinuxNamespaceType::Pid => new_pid_ns = true,
                LinuxNamespaceType::Mount => unshare |= libc::CLONE_NEWNS,
                LinuxNamespaceType::Uts => unshare |= libc::CLONE_NEWUTS,
                LinuxNamespaceType::Ipc => unshare |= libc::CLONE_NEWIPC,
                LinuxNamespaceType::Network => unshare |= libc::CLONE_NEWNET,
                LinuxNamespaceType::Cgroup => unshare |= libc::CLONE_NEWCGROUP,
                LinuxNamespaceType::User => {
                    return Err(einval("user namespaces are not supported"))
                }
                LinuxNamespaceType::Time => unshare |= libc::CLONE_NEWTIME,
            }
        }
        masked = linux.masked_paths().clone().unwrap_or_default();
        ro = linux.readonly_paths().clone().unwrap_or_default();
    }
    if unshare & libc::CLONE_NEWNS == 0 {
        return Err(einval("a mount namespace is required"));
    }
    let root = spec.root().as_ref();
    Ok(RootPlan {
        rootfs: rootfs.to_path_buf(),
        unshare,
        new_pid_ns,
        mounts: spec.mounts().clone().unwrap_or_default(),
        hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
        readonly_root: root.and_then(|r| r.readonly()).unwrap_or(false),
        masked_paths: masked,
        readonly_paths: ro,
        cgroup: None,
    })
}

/// Adds read-write (read-only with a read-only root) bind mounts of `files` — (source in the
/// agent's filesystem, destination in the container) — after the spec's mounts, except where
/// the spec already mounts something at that destination (containerd's CRI brings its own
/// `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`). A missing destination file is created
/// when the mount is made (as for any bind mount of a file). Returns the destinations added.
pub fn add_file_binds(plan: &mut RootPlan, files: &[(PathBuf, &str)]) -> Vec<String> {
    let mut added = Vec::new();
    for (src, dest) in files {
        if plan
            .mounts
            .iter()
            .any(|m| m.destination() == Path::new(dest))
        {
            continue;
        }
        let mut m = Mount::default();
        m.set_destination(PathBuf::from(dest));
        m.set_typ(Some("bind".into()));
        m.set_source(Some(src.clone()));
        let rw = if plan.readonly_root { "ro" } else { "rw" };
        m.set_options(Some(vec!["rbind".into(), "rprivate".into(), rw.into()]));
        plan.mounts.push(m);
        added.push(dest.to_string());
    }
    added
}

fn rlimit_number(name: &str) -> Option<u32> {
    // oci-spec's Debug names: RlimitCpu, RlimitNofile, ...
    let n = name.to_ascii_uppercase();
    let n = n
        .strip_prefix("RLIMIT")
        .unwrap_or(&n)
        .trim_start_matches('_');
    Some(match n {
        "CPU" => 0,
        "FSIZE" => 1,
        "DATA" => 2,
        "STACK" => 3,
        "CORE" => 4,
        "RSS" => 5,
        "NPROC" => 6,
        "NOFILE" => 7,
        "MEMLOCK" => 8,
        "AS" => 9,
        "LOCKS" => 10,
        "SIGPENDING" => 11,
        "MSGQUEUE" => 12,
        "NICE" => 13,
        "RTPRIO" => 14,
        "RTTIME" => 15,
        _ => return None,
    })
}

fn cap_number(c: &Capability) -> u32 {
    use Capability::*;
    match c {
        Chown => 0,
        DacOverride => 1,
        DacReadSearch => 2,
        Fowner => 3,
        Fsetid => 4,
        Kill => 5,
        Setgid => 6,
        Setuid => 7,
        Setpcap => 8,
        LinuxImmutable => 9,
        NetBindService => 10,
        NetBroadcast => 11,
        NetAdmin => 12,
        NetRaw => 13,
        IpcLock => 14,
        IpcOwner => 15,
        SysModule => 16,
        SysRawio => 17,
        SysChroot => 18,
        SysPtrace => 19,
        SysPacct => 20,
        SysAdmin => 21,
        SysBoot => 22,
        SysNice => 23,
        SysResource => 24,
        SysTime => 25,
        SysTtyConfig => 26,
        Mknod => 27,
        Lease => 28,
        AuditWrite => 29,
        AuditControl => 30,
        Setfcap => 31,
        MacOverride => 32,
        MacAdmin => 33,
        Syslog => 34,
        WakeAlarm => 35,
        BlockSuspend => 36,
        AuditRead => 37,
        Perfmon => 38,
        Bpf => 39,
        CheckpointRestore => 40,
    }
}

/// Resolves `path` (absolute, container view) under `root` without letting `..` or symlinks
/// escape `root` (symlinks are resolved as if `root` were `/`; at most 40 of them).
pub fn secure_join(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut todo: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            parts.pop();
            continue;
        }
        let mut cur = root.to_path_buf();
        cur.extend(&parts);
        cur.push(&c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&cur)?;
                if target.is_absolute() {
                    parts.clear();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(s) => todo.push(s.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => parts.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&parts);
    Ok(out)
}

/// File descriptors the child needs.
#[derive(Debug)]
pub struct ChildFds {
    /// Becomes fds 0, 1, 2.
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Child → agent: `OK` after setup, or `E<errno> <message>`.
    pub ready: File,
    /// Agent → child: one byte = start; EOF = abort.
    pub start: File,
    /// Namespaces to join (exec): (fd, CLONE_NEW* type).
    pub join: Vec<(OwnedFd, libc::c_int)>,
}

/// What the forked child does. Never returns.
pub fn child_main(root: Option<&RootPlan>, proc_: &ProcPlan, fds: ChildFds) -> ! {
    let ChildFds {
        stdin,
        stdout,
        stderr,
        mut ready,
        mut start,
        join,
    } = fds;
    sys::reset_signals();
    let mut t = crate::runtime::Steps::new();
    let setup = (|| -> io::Result<()> {
        sys::setsid()?;
        sys::dup2(stdin.as_raw_fd(), 0)?;
        sys::dup2(stdout.as_raw_fd(), 1)?;
        sys::dup2(stderr.as_raw_fd(), 2)?;
        if proc_.terminal {
            sys::set_controlling_tty(0)?;
        }
        let mut keep: Vec<RawFd> = vec![ready.as_raw_fd(), start.as_raw_fd()];
        keep.extend(join.iter().map(|(f, _)| f.as_raw_fd()));
        let raw = [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()];
        std::mem::forget(stdin);
        std::mem::forget(stdout);
        std::mem::forget(stderr);
        // Close every other inherited fd: other processes' pipe ends must not linger here.
        sys::close_fds_except(&keep);
        let _ = raw;
        t.done("fds");
        for (fd, ty) in &join {
            sys::setns(fd.as_raw_fd(), *ty)
                .map_err(|e| io::Error::new(e.kind(), format!("setns: {e}")))?;
        }
        if let Some(r) = root {
            setup_root(r, &mut t)?;
        }
        Ok(())
    })();
    if let Err(e) = setup {
        let _ = write!(ready, "E{} {e}", e.raw_os_error().unwrap_or(libc::EIO));
        sys::exit_now(1);
    }
    if proc_.check_entrypoint {
        if let Some(msg) = missing_program(proc_) {
            let _ = write!(ready, "E{} {msg}", libc::ENOENT);
            sys::exit_now(1);
        }
    }
    // "OK" and where the time went (the agent reports it to the host).
    if write!(ready, "OK{}", t.words()).is_err() {
        sys::exit_now(1);
    }
    drop(ready);
    let mut b = [0u8; 1];
    if !matches!(start.read(&mut b), Ok(1)) {
        sys::exit_now(1);
    }
    drop(start);
    if let Err(e) = setup_process(proc_) {
        fail(1, &format!("skiff-agent: container process setup: {e}\n"));
    }
    exec_program(proc_)
}

fn fail(code: i32, msg: &str) -> ! {
    sys::write_raw(2, msg.as_bytes());
    sys::exit_now(code)
}

fn ctx(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn setup_root(r: &RootPlan, t: &mut crate::runtime::Steps) -> io::Result<()> {
    if let Some(cg) = &r.cgroup {
        // "0": the writing process itself.
        std::fs::write(cg.join("cgroup.procs"), "0").map_err(|e| ctx(e, "joining the cgroup"))?;
    }
    sys::unshare(r.unshare).map_err(|e| ctx(e, "unshare"))?;
    t.done("unshare");
    let root = &r.rootfs;
    // No mount event leaks back to the agent's namespace.
    sys::mount_full(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    sys::mount_full(
        Some(&root.to_string_lossy()),
        root,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    let mut dev_tmpfs = false;
    for m in &r.mounts {
        if mount_one(root, m)? && m.destination() == Path::new("/dev") {
            dev_tmpfs = true;
        }
    }
    t.done("mounts");
    if dev_tmpfs {
        populate_dev(&root.join("dev"))?;
    }
    t.done("dev");
    if let Some(h) = &r.hostname {
        if r.unshare & libc::CLONE_NEWUTS != 0 {
            sys::sethostname(h).map_err(|e| ctx(e, "sethostname"))?;
        }
    }
    enter_root(root)?;
    t.done("pivot");
    for p in &r.masked_paths {
        mask_path(p)?;
    }
    for p in &r.readonly_paths {
        let pb = Path::new(p);
        if pb.exists() {
            sys::mount_full(Some(p), pb, None, libc::MS_BIND | libc::MS_REC, None)?;
            sys::mount_full(
                None,
                pb,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                None,
            )?;
        }
    }
    if r.readonly_root {
        sys::mount_full(
            None,
            Path::new("/"),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )?;
    }
    t.done("paths");
    Ok(())
}

/// pivot_root into `root`; from an initramfs (where pivot_root fails with EINVAL) fall back to
/// MS_MOVE + chroot like runc's no-pivot mode.
fn enter_root(root: &Path) -> io::Result<()> {
    std::env::set_current_dir(root)?;
    match sys::pivot_root(Path::new("."), Path::new(".")) {
        Ok(()) => {
            sys::umount_detach(Path::new("."))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            sys::mount_full(Some("."), Path::new("/"), None, libc::MS_MOVE, None)?;
            sys::chroot(Path::new("."))?;
        }
        Err(e) => return Err(ctx(e, "pivot_root")),
    }
    std::env::set_current_dir("/")
}

fn mask_path(p: &str) -> io::Result<()> {
    let pb = Path::new(p);
    match std::fs::metadata(pb) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => {
            sys::mount_full(Some("tmpfs"), pb, Some("tmpfs"), libc::MS_RDONLY, None)
        }
        Ok(_) => sys::mount_full(Some("/dev/null"), pb, None, libc::MS_BIND, None),
    }
}

/// Mount flag words: (flag, clear?) ; everything else goes to the data string.
fn parse_options(opts: &[String]) -> (libc::c_ulong, libc::c_ulong, bool, bool, String) {
    let mut set = 0;
    let mut propagation = 0;
    let mut bind = false;
    let mut rec = false;
    let mut data = Vec::new();
    for o in opts {
        match o.as_str() {
            "ro" => set |= libc::MS_RDONLY,
            "rw" => set &= !libc::MS_RDONLY,
            "nosuid" => set |= libc::MS_NOSUID,
            "suid" => set &= !libc::MS_NOSUID,
            "nodev" => set |= libc::MS_NODEV,
            "dev" => set &= !libc::MS_NODEV,
            "noexec" => set |= libc::MS_NOEXEC,
            "exec" => set &= !libc::MS_NOEXEC,
            "sync" => set |= libc::MS_SYNCHRONOUS,
            "noatime" => set |= libc::MS_NOATIME,
            "nodiratime" => set |= libc::MS_NODIRATIME,
            "relatime" => set |= libc::MS_RELATIME,
            "strictatime" => set |= libc::MS_STRICTATIME,
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                rec = true
            }
            "private" => propagation |= libc::MS_PRIVATE,
            "rprivate" => propagation |= libc::MS_PRIVATE | libc::MS_REC,
            "slave" => propagation |= libc::MS_SLAVE,
            "rslave" => propagation |= libc::MS_SLAVE | libc::MS_REC,
            "shared" => propagation |= libc::MS_SHARED,
            "rshared" => propagation |= libc::MS_SHARED | libc::MS_REC,
            "unbindable" => propagation |= libc::MS_UNBINDABLE,
            "runbindable" => propagation |= libc::MS_UNBINDABLE | libc::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    (set, propagation, bind, rec, data.join(","))
}

/// Performs one spec mount under `root`. Returns true when it mounted a tmpfs.
fn mount_one(root: &Path, m: &Mount) -> io::Result<bool> {
    let dest_s = m.destination().to_string_lossy();
    let dest = secure_join(root, &dest_s)?;
    let opts = m.options().clone().unwrap_or_default();
    let (flags, propagation, bind_opt, rec, data) = parse_options(&opts);
    let typ = m.typ().clone().unwrap_or_default();
    let source = m
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| typ.clone());
    if bind_opt || typ == "bind" {
        let src_meta =
            std::fs::metadata(&source).map_err(|e| ctx(e, &format!("bind source {source}")))?;
        if src_meta.is_dir() {
            std::fs::create_dir_all(&dest)?;
        } else {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if !dest.exists() {
                File::create(&dest)?;
            }
        }
        let rec = if rec { libc::MS_REC } else { 0 };
        sys::mount_full(Some(&source), &dest, None, libc::MS_BIND | rec, None)?;
        if flags != 0 {
            sys::mount_full(
                None,
                &dest,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | rec | flags,
                None,
            )?;
        }
    } else {
        std::fs::create_dir_all(&dest)?;
        let fstype = if typ == "cgroup" {
            "cgroup2"
        } else {
            typ.as_str()
        };
        let data = if typ == "cgroup" { String::new() } else { data };
        match sys::mount_full(Some(&source), &dest, Some(fstype), flags, Some(&data)) {
            Ok(()) => {}
            // Inside a VM without the cgroup v2 hierarchy (or on a v1 host), a cgroup mount
            // is not worth failing the container for.
            Err(_) if typ == "cgroup" || typ == "cgroup2" => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    if propagation != 0 {
        sys::mount_full(None, &dest, None, propagation, None)?;
    }
    Ok(typ == "tmpfs")
}

/// Standard device nodes in a tmpfs /dev (mknod; bind mount from the agent's /dev if mknod is
/// not allowed), and the usual symlinks.
fn populate_dev(dev: &Path) -> io::Result<()> {
    const NODES: &[(&str, u32, u32)] = &[
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, major, minor) in NODES {
        let p = dev.join(name);
        if p.exists() {
            continue;
        }
        if sys::mknod(&p, libc::S_IFCHR | 0o666, *major, *minor).is_err() {
            File::create(&p)?;
            sys::mount_full(Some(&format!("/dev/{name}")), &p, None, libc::MS_BIND, None)?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666))?;
        }
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ];
    for (name, target) in links {
        let _ = std::os::unix::fs::symlink(target, dev.join(name));
    }
    if dev.join("pts/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
    }
    Ok(())
}

/// rlimits, groups/ids, capabilities, no_new_privs, cwd.
fn setup_process(p: &ProcPlan) -> io::Result<()> {
    for (res, soft, hard) in &p.rlimits {
        sys::setrlimit(*res, *soft, *hard).map_err(|e| ctx(e, "setrlimit"))?;
    }
    if let Some(c) = &p.caps {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(63);
        for cap in 0..=last {
            if c.bounding & (1 << cap) == 0 {
                sys::capbset_drop(cap).map_err(|e| ctx(e, "drop bounding capability"))?;
            }
        }
        sys::set_keepcaps(true)?;
    }
    sys::setgroups(&p.additional_gids).map_err(|e| ctx(e, "setgroups"))?;
    sys::setresgid(p.gid).map_err(|e| ctx(e, "setgid"))?;
    sys::setresuid(p.uid).map_err(|e| ctx(e, "setuid"))?;
    if let Some(c) = &p.caps {
        sys::set_keepcaps(false)?;
        sys::capset(c.effective, c.permitted, c.inheritable).map_err(|e| ctx(e, "capset"))?;
        for cap in 0..64 {
            if c.ambient & (1 << cap) != 0 {
                sys::ambient_raise(cap).map_err(|e| ctx(e, "ambient capability"))?;
            }
        }
    }
    if p.no_new_privs {
        sys::set_no_new_privs()?;
    }
    let cwd = if p.cwd.is_empty() { "/" } else { &p.cwd };
    std::env::set_current_dir(cwd).map_err(|e| ctx(e, &format!("chdir to cwd {cwd:?}")))?;
    Ok(())
}

fn to_c(v: &[String]) -> Option<Vec<CString>> {
    v.iter().map(|s| CString::new(s.as_bytes()).ok()).collect()
}

/// runc's create-time check: the message when the program (absolute, or found on the
/// process's PATH) does not exist in the container's root (already entered). A relative path
/// or a relative PATH entry depends on the cwd, set at Start: not checked here.
fn missing_program(p: &ProcPlan) -> Option<String> {
    let prog = p.args.first()?;
    if prog.starts_with('/') {
        return match std::fs::metadata(prog) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(format!(
                "exec: {prog:?}: stat {prog}: no such file or directory"
            )),
            _ => None,
        };
    }
    if prog.contains('/') {
        return None;
    }
    let path = p
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let dirs: Vec<&str> = path.split(':').collect();
    if dirs.iter().any(|d| !d.starts_with('/')) {
        return None;
    }
    let found = dirs
        .iter()
        .any(|d| std::fs::metadata(format!("{}/{prog}", d.trim_end_matches('/'))).is_ok());
    (!found).then(|| format!("exec: {prog:?}: executable file not found in $PATH"))
}

/// Execs the program with PATH lookup. runc conventions: not found → 127, found but not
/// executable → 126, each with a message on stderr.
fn exec_program(p: &ProcPlan) -> ! {
    let (Some(argv), Some(envp)) = (to_c(&p.args), to_c(&p.env)) else {
        fail(1, "skiff-agent: NUL byte in args or env\n");
    };
    let prog = &p.args[0];
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.clone()]
    } else {
        let path = p
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| format!("{}/{prog}", d.trim_end_matches('/')))
            .collect()
    };
    let mut denied: Option<io::Error> = None;
    for c in &candidates {
        let Ok(cpath) = CString::new(c.as_bytes()) else {
            continue;
        };
        let e = sys::execve(&cpath, &argv, &envp);
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => {}
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EISDIR) | Some(libc::ENOEXEC)
                if !prog.contains('/') =>
            {
                denied.get_or_insert(e);
            }
            _ => {
                let code = match e.raw_os_error() {
                    Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EISDIR)
                    | Some(libc::ENOEXEC) => 126,
                    _ => 127,
                };
                fail(code, &format!("skiff-agent: exec {prog:?}: {e}\n"));
            }
        }
    }
    match denied {
        Some(e) => fail(126, &format!("skiff-agent: exec {prog:?}: {e}\n")),
        None if prog.contains('/') => fail(
            127,
            &format!("skiff-agent: exec {prog:?}: no such file or directory\n"),
        ),
        None => fail(
            127,
            &format!("skiff-agent: exec {prog:?}: executable file not found in $PATH\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan(args: &[&str], path: Option<&str>) -> ProcPlan {
        let mut p = oci_spec::runtime::Process::default();
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        p.set_env(path.map(|v| vec![format!("PATH={v}")]));
        proc_plan(&p, false).unwrap()
    }

    #[test]
    fn a_missing_program_is_named_as_runc_names_it() {
        assert_eq!(
            missing_program(&plan(&["/no/such/entrypoint"], None)).as_deref(),
            Some("exec: \"/no/such/entrypoint\": stat /no/such/entrypoint: no such file or directory")
        );
        assert_eq!(missing_program(&plan(&["/bin/sh"], None)), None);
        assert_eq!(missing_program(&plan(&["sh"], Some("/nowhere:/bin"))), None);
        assert_eq!(
            missing_program(&plan(&["no-such-program-x"], Some("/bin:/usr/bin"))).as_deref(),
            Some("exec: \"no-such-program-x\": executable file not found in $PATH")
        );
        // Depends on the cwd (set at Start): left to exec time.
        assert_eq!(missing_program(&plan(&["./x"], None)), None);
        assert_eq!(missing_program(&plan(&["x"], Some("bin:/bin"))), None);
    }
}
