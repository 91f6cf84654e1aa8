//! `vmm run`: runs one command as a container in a fresh VM, with the user's stdio, signals and
//! exit status, as `runc run` would.
//!
//! Flow: listen on the hybrid-vsock Unix sockets (`<dir>/vsock.sock_1024` for the agent's control
//! connection, `_1025` for its stdio streams) → boot the VM with a virtio-vsock device and
//! `skiff.agent=serve` → the agent dials in (= ready) → CreateContainer (rootfs `/rootfs` from the
//! initramfs) → stdio copies → Start → forward signals → Wait (answered only after the output
//! streams are drained) → Shutdown → exit with the container's status.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use oci_spec::runtime::{BoxBuilder, Spec, User};
use skiff_protocol::stream::StreamHub;
use skiff_protocol::{Client, StreamKind, CONTROL_PORT, STREAM_PORT};

use crate::fs_device::{self, Share};
use crate::sys;
use crate::timings::{Phase, Timings};
use crate::vm::{self, SerialOut, VmConfig, DEFAULT_CMDLINE};

/// Container id used inside the VM (one container per VM).
const CONTAINER: &str = "skiff";
/// The container root filesystem inside the guest (a busybox tree in the initramfs).
const GUEST_ROOTFS: &str = "/rootfs";
/// virtio-mmio slots left for shares (one goes to vsock).
const MAX_SHARES: usize = 9;
/// How long the agent may take to dial in (nested, emulated boots are slow).
const AGENT_TIMEOUT: Duration = Duration::from_secs(180);

/// What `vmm run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Guest kernel (default: the one Skiff built).
    pub kernel: Option<PathBuf>,
    /// Initramfs with the agent (default: the one Skiff built).
    pub initrd: Option<PathBuf>,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// `KEY=VALUE` environment entries.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub workdir: Option<String>,
    /// `UID[:GID]`.
    pub user: Option<String>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Keep stdin open and forward it.
    pub interactive: bool,
    /// Print the phase timings when done.
    pub timings: bool,
    /// Where the guest console goes (default: a log file in the run directory).
    pub console: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// Host directory to use as the container's root filesystem (over virtio-fs); default:
    /// the busybox root in Skiff's initramfs.
    pub rootfs: Option<PathBuf>,
    /// Volumes, `HOST:GUEST[:ro|:rw]`.
    pub volumes: Vec<String>,
    /// Keep guest ownership (uid, gid, mode, device numbers) in the xattr
    /// `user.containers.override_stat` instead of chown on the host (rootless sharing).
    pub xattr_ownership: bool,
    /// The command and its arguments.
    pub args: Vec<String>,
}

/// Where the agent mounts the rootfs share in the guest.
const GUEST_SHARED_ROOTFS: &str = "/run/skiff/rootfs";

/// A parsed `-v HOST:GUEST[:ro|:rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Host directory (absolute).
    pub host: PathBuf,
    /// Mount point in the container (absolute).
    pub guest: String,
    /// Read-only.
    pub read_only: bool,
}

/// Parses `HOST:GUEST[:ro|:rw]`; the host directory must exist.
pub fn parse_volume(s: &str) -> Result<Volume, Error> {
    let bad = |why: &str| Error::Input(format!("-v {s:?}: {why}"));
    let mut parts: Vec<&str> = s.split(':').collect();
    let read_only = match parts.last() {
        Some(&"ro") if parts.len() == 3 => true,
        Some(&"rw") if parts.len() == 3 => false,
        _ if parts.len() == 2 => false,
        _ => return Err(bad("expected HOST:GUEST[:ro|:rw]")),
    };
    parts.truncate(2);
    let (host, guest) = (parts[0], parts[1]);
    if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") || guest == "/" {
        return Err(bad(
            "the container path must be absolute, not / and without ..",
        ));
    }
    let host =
        std::fs::canonicalize(host).map_err(|e| bad(&format!("host directory {host}: {e}")))?;
    if !host.is_dir() {
        return Err(bad(&format!("{} is not a directory", host.display())));
    }
    Ok(Volume {
        host,
        guest: guest.into(),
        read_only,
    })
}

/// Errors of `vmm run`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad user input (exit status 125, as `docker run` uses for its own errors).
    #[error("{0}")]
    Input(String),
    /// The VM or the agent failed (exit status 125).
    #[error("{0}")]
    Failed(String),
}

fn failed(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Failed(format!("{what}: {e}"))
}

/// The kernel and initramfs Skiff built: `$SKIFF_KERNEL`/`$SKIFF_INITRD`, else built (or found
/// in the cache) by the checkout's scripts next to this binary, with progress on stderr.
pub fn default_artifacts() -> Result<(PathBuf, PathBuf), Error> {
    if let (Some(k), Some(i)) = (
        std::env::var_os("SKIFF_KERNEL"),
        std::env::var_os("SKIFF_INITRD"),
    ) {
        return Ok((k.into(), i.into()));
    }
    let exe = std::env::current_exe().map_err(failed("locating the vmm binary"))?;
    let root = exe
        .ancestors()
        .find(|d| d.join("kernel/build.sh").exists())
        .ok_or_else(|| {
            Error::Input(
                "no --kernel given and this vmm is not in a Skiff checkout that can build one; \
                 pass --kernel and --initrd (or set SKIFF_KERNEL and SKIFF_INITRD)"
                    .into(),
            )
        })?
        .to_path_buf();
    let script = |name: &str| -> Result<PathBuf, Error> {
        let path = root.join(name);
        // First without --print-path: builds on first use, with progress messages.
        let st = std::process::Command::new(&path)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| Error::Failed(format!("running {}: {e}", path.display())))?;
        if !st.success() {
            return Err(Error::Failed(format!("{} failed ({st})", path.display())));
        }
        let out = std::process::Command::new(&path)
            .arg("--print-path")
            .output()
            .map_err(|e| Error::Failed(format!("running {}: {e}", path.display())))?;
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let kernel = std::env::var_os("SKIFF_KERNEL")
        .map(PathBuf::from)
        .map_or_else(|| script("kernel/build.sh").map(|d| d.join("vmlinux")), Ok)?;
    let initrd = std::env::var_os("SKIFF_INITRD")
        .map(PathBuf::from)
        .map_or_else(|| script("kernel/build-initramfs.sh"), Ok)?;
    Ok((kernel, initrd))
}

/// Parses `UID[:GID]` (numbers only: the rootfs's /etc/passwd is not consulted yet).
pub fn parse_user(s: &str) -> Result<(u32, u32), Error> {
    let bad = || Error::Input(format!("-u {s:?}: expected UID[:GID] with numeric ids"));
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok((uid, gid))
}

/// The OCI spec for the command: the default spec (runc's namespaces and mounts) with the
/// user's args, env, cwd, user and terminal.
pub fn build_spec(opts: &RunOptions) -> Result<Spec, Error> {
    if opts.args.is_empty() {
        return Err(Error::Input(
            "no command given: vmm run [OPTIONS] -- CMD [ARGS...]".into(),
        ));
    }
    for e in &opts.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(Error::Input(format!("-e {e:?}: expected KEY=VALUE")));
        }
    }
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(opts.args.clone()));
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    if opts.tty {
        env.push("TERM=xterm".into());
    }
    env.extend(opts.env.iter().cloned());
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(
        opts.workdir.clone().unwrap_or_else(|| "/".into()),
    ));
    if let Some(u) = &opts.user {
        let (uid, gid) = parse_user(u)?;
        let mut user = User::default();
        user.set_uid(uid);
        user.set_gid(gid);
        process.set_user(user);
    }
    // Docker's default capability set (runc's `runc spec` default is narrower: no CHOWN,
    // MKNOD, DAC_OVERRIDE..., which package managers need).
    {
        use oci_spec::runtime::{Capability as C, LinuxCapabilities};
        let set: oci_spec::runtime::Capabilities = [
            C::Chown,
            C::DacOverride,
            C::Fsetid,
            C::Fowner,
            C::Mknod,
            C::NetRaw,
            C::Setgid,
            C::Setuid,
            C::Setfcap,
            C::Setpcap,
            C::NetBindService,
            C::SysChroot,
            C::Kill,
            C::AuditWrite,
        ]
        .into_iter()
        .collect();
        let mut caps = LinuxCapabilities::default();
        caps.set_bounding(Some(set.clone()));
        caps.set_effective(Some(set.clone()));
        caps.set_permitted(Some(set));
        caps.set_inheritable(None);
        caps.set_ambient(None);
        process.set_capabilities(Some(caps));
    }
    process.set_terminal(Some(opts.tty));
    if opts.tty {
        if let Some((rows, cols)) = sys::window_size(0) {
            if let Ok(b) = BoxBuilder::default()
                .height(u64::from(rows))
                .width(u64::from(cols))
                .build()
            {
                process.set_console_size(Some(b));
            }
        }
    }
    spec.set_process(Some(process));
    // A writable root, as `docker run` gives (oci-spec's default root is read-only).
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    Ok(spec)
}

fn copy_out(
    mut from: UnixStream,
    to: impl Fn(&[u8]) -> std::io::Result<()> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Runs the container; returns its exit status (code, or 128 + signal).
pub fn run(opts: &RunOptions, mut timings: Timings) -> Result<i32, Error> {
    let mut spec = build_spec(opts)?;
    // Shares: the rootfs (tag "rootfs") and one per volume ("vol0", ...), checked before boot.
    let mut shares = Vec::new();
    if let Some(r) = &opts.rootfs {
        shares.push((
            Share {
                tag: "rootfs".into(),
                host: r.clone(),
                read_only: false,
                xattr_ownership: opts.xattr_ownership,
                policy: fs_device::SharePolicy::Rootfs,
            },
            GUEST_SHARED_ROOTFS.to_string(),
        ));
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (n, v) in opts.volumes.iter().enumerate() {
        let v = parse_volume(v)?;
        let target = format!("/run/skiff/volumes/{n}");
        let mut m = oci_spec::runtime::Mount::default();
        m.set_destination(PathBuf::from(&v.guest));
        m.set_typ(Some("bind".into()));
        m.set_source(Some(PathBuf::from(&target)));
        m.set_options(Some(vec![
            "rbind".into(),
            if v.read_only { "ro" } else { "rw" }.into(),
        ]));
        mounts.push(m);
        shares.push((
            Share {
                tag: format!("vol{n}"),
                host: v.host,
                read_only: v.read_only,
                xattr_ownership: opts.xattr_ownership,
                policy: fs_device::SharePolicy::Volume,
            },
            target,
        ));
    }
    spec.set_mounts(Some(mounts));
    if shares.len() > MAX_SHARES {
        return Err(Error::Input(format!(
            "too many volumes: at most {MAX_SHARES} shares (rootfs and volumes) fit one VM"
        )));
    }
    let mut share_devices = Vec::new();
    let budget = fs_device::FdBudget::default();
    for (share, _) in &shares {
        share_devices
            .push(fs_device::create(share, &budget).map_err(|e| Error::Input(e.to_string()))?);
    }
    let (kernel, initrd) = match (&opts.kernel, &opts.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        (k, i) => {
            let (dk, di) = default_artifacts()?;
            (k.clone().unwrap_or(dk), i.clone().unwrap_or(di))
        }
    };
    // Signals go to a forwarding thread, not to this process's default actions.
    sys::block_signals(&sys::FORWARDED).map_err(failed("blocking signals"))?;

    let dir = crate::run_dir::create("run")
        .map_err(|e| Error::Failed(format!("creating the run directory: {e}")))?;
    let cleanup = RunDir(dir.clone());
    // Signals: before the container starts, a terminating one ends `vmm run` (the VM is
    // abandoned with the process); after, every signal is forwarded to the container, and a
    // third terminating signal forces the exit if the guest does not answer.
    let started: Arc<Mutex<Option<Arc<Client<UnixStream>>>>> = Arc::new(Mutex::new(None));
    spawn_signal_thread(started.clone(), dir.clone());
    let uds = dir.join("vsock.sock");
    let control = UnixListener::bind(format!("{}_{CONTROL_PORT}", uds.display()))
        .map_err(failed("listening for the agent"))?;
    let streams_listener = UnixListener::bind(format!("{}_{STREAM_PORT}", uds.display()))
        .map_err(failed("listening for stdio streams"))?;
    let hub: StreamHub<UnixStream> = StreamHub::new();
    hub.accept_loop(move || streams_listener.accept().map(|(s, _)| s));

    let console = opts
        .console
        .clone()
        .unwrap_or_else(|| dir.join("console.log"));
    let cfg = VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: std::iter::once(format!("{DEFAULT_CMDLINE} skiff.agent=serve"))
            .chain(opts.kernel_args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        serial: SerialOut::File(console.clone()),
        pit: vm::PitMode::Auto,
    };
    let (vm_tx, vm_rx) = mpsc::channel();
    let vm_timings = timings.clone();
    let (factory, events) = crate::vsock_device::create(&uds).map_err(Error::Failed)?;
    let mut devices = vec![factory];
    devices.extend(share_devices);
    // When the VM ends, the vsock event loop stops and closes every guest connection, so a
    // host call waiting on the agent (Wait, stdio copies) ends instead of hanging.
    let events = std::sync::Arc::new(std::sync::Mutex::new(Some(events)));
    let vm_events = events.clone();
    std::thread::Builder::new()
        .name("vm".into())
        .spawn(move || {
            let r = vm::run_with_devices(&cfg, vm_timings, devices);
            if let Some(l) = vm_events.lock().ok().and_then(|mut g| g.take()) {
                let _ = l.stop();
            }
            let _ = vm_tx.send(r);
        })
        .map_err(failed("starting the VM thread"))?;

    // The agent's control connection is the readiness signal.
    control.set_nonblocking(true).map_err(failed("listener"))?;
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let stream = loop {
        match control.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::Failed(format!("accepting the agent: {e}"))),
        }
        if let Ok(r) = vm_rx.try_recv() {
            let tail = console_tail(&console);
            return Err(Error::Failed(match r {
                Ok(res) => format!(
                    "the VM ended ({:?}) before the agent connected; console:\n{tail}",
                    res.exit
                ),
                Err(e) => format!("the VM failed: {e}"),
            }));
        }
        if Instant::now() > deadline {
            return Err(Error::Failed(format!(
                "the agent did not connect within {AGENT_TIMEOUT:?}; console:\n{}",
                console_tail(&console)
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    stream
        .set_nonblocking(false)
        .map_err(failed("agent connection"))?;
    timings.mark(Phase::AgentReady);
    // An agent call that fails because the VM itself ended (a guest crash) says so.
    let agent_failed = |what: &str, e: &dyn std::fmt::Display| {
        let ended = match vm_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(res)) => format!(
                " (the VM ended: {:?}; console:\n{})",
                res.exit,
                console_tail(&console)
            ),
            Ok(Err(ve)) => format!(" (the VM failed: {ve})"),
            Err(_) => String::new(),
        };
        Error::Failed(format!("{what}: {e}{ended}"))
    };
    let (client, _hello) =
        Client::from_stream(stream).map_err(|e| agent_failed("agent handshake", &e))?;

    for (share, target) in &shares {
        client
            .mount_share(&share.tag, target, share.read_only)
            .map_err(|e| {
                agent_failed(
                    &format!("mounting {} in the guest", share.host.display()),
                    &e,
                )
            })?;
    }
    let rootfs = if opts.rootfs.is_some() {
        GUEST_SHARED_ROOTFS
    } else {
        GUEST_ROOTFS
    };

    let stdio = skiff_protocol::Stdio {
        stdin: opts.interactive,
    };
    client
        .create_container(CONTAINER, spec, rootfs, opts.tty, stdio)
        .map_err(|e| agent_failed("creating the container", &e))?;
    let take = |kind| {
        hub.take(CONTAINER, "", kind, Duration::from_secs(30))
            .map_err(failed("stdio stream"))
    };
    let mut outs = Vec::new();
    if opts.tty {
        outs.push(copy_out(take(StreamKind::Pty)?, |b| {
            let mut o = std::io::stdout().lock();
            o.write_all(b)?;
            o.flush()
        }));
    } else {
        outs.push(copy_out(take(StreamKind::Stdout)?, |b| {
            let mut o = std::io::stdout().lock();
            o.write_all(b)?;
            o.flush()
        }));
        outs.push(copy_out(take(StreamKind::Stderr)?, |b| {
            let mut o = std::io::stderr().lock();
            o.write_all(b)?;
            o.flush()
        }));
    }
    let _raw = if opts.tty && sys::is_tty(0) {
        sys::raw_mode(0).ok()
    } else {
        None
    };
    if opts.interactive {
        let mut stdin_stream = take(StreamKind::Stdin)?;
        std::thread::spawn(move || {
            let mut input = std::io::stdin().lock();
            let _ = std::io::copy(&mut input, &mut stdin_stream);
            let _ = stdin_stream.shutdown(std::net::Shutdown::Write);
        });
    }
    client
        .start(CONTAINER, None)
        .map_err(|e| agent_failed("starting the container", &e))?;
    timings.mark(Phase::ContainerStarted);

    let client = Arc::new(client);
    if let Ok(mut g) = started.lock() {
        *g = Some(client.clone());
    }

    let status = client
        .wait(CONTAINER, None)
        .map_err(|e| agent_failed("waiting for the container", &e))?;
    timings.mark(Phase::ContainerExited);
    for t in outs {
        let _ = t.join();
    }
    let _ = client.shutdown();
    match vm_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(res)) => {
            for p in res.timings.phases() {
                timings.mark_at(p.0, p.1);
            }
        }
        Ok(Err(e)) => tracing::warn!("VM error after the container exited: {e}"),
        Err(_) => tracing::warn!("the VM did not power off within 30 s after the container exited"),
    }
    if let Some(l) = events.lock().ok().and_then(|mut g| g.take()) {
        let _ = l.stop();
    }
    if opts.timings {
        eprint!("{}", timings.report());
        eprintln!("  container exit status: {status}");
    }
    drop(cleanup);
    Ok(status)
}

/// The signal thread of [`run`] (see there).
fn spawn_signal_thread(started: Arc<Mutex<Option<Arc<Client<UnixStream>>>>>, dir: PathBuf) {
    let terminating = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut unanswered = 0;
            while let Ok(sig) = sys::wait_signal(&sys::FORWARDED) {
                let client = started.lock().ok().and_then(|g| g.clone());
                let fatal = terminating.contains(&sig);
                match client {
                    Some(c) => {
                        // On its own thread: a hung guest must not stop the counting.
                        std::thread::spawn(move || c.signal(CONTAINER, None, sig, false));
                        if fatal {
                            unanswered += 1;
                        }
                        if unanswered < 3 {
                            continue;
                        }
                        eprintln!(
                            "vmm run: the container did not exit after 3 signals; stopping the VM"
                        );
                    }
                    None if fatal => {
                        eprintln!(
                            "vmm run: signal {sig} before the container started; stopping the VM"
                        );
                    }
                    None => continue,
                }
                sys::restore_terminal();
                let _ = std::fs::remove_dir_all(&dir);
                std::process::exit(128 + sig);
            }
        });
}

fn console_tail(path: &Path) -> String {
    crate::console_log::tail(path, 20)
}

/// Removes the run directory (sockets, console log) when dropped.
struct RunDir(PathBuf);
impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> RunOptions {
        RunOptions {
            kernel: None,
            initrd: None,
            cpus: 1,
            memory_mib: 128,
            env: vec!["A=b".into()],
            workdir: Some("/tmp".into()),
            user: Some("1000:100".into()),
            tty: false,
            interactive: false,
            timings: false,
            console: None,
            kernel_args: Vec::new(),
            rootfs: None,
            volumes: Vec::new(),
            xattr_ownership: false,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn spec_carries_the_command() {
        let spec = build_spec(&opts(&["echo", "hi"])).unwrap_or_default();
        let p = spec.process().clone().unwrap_or_default();
        assert_eq!(p.args().clone().unwrap_or_default(), vec!["echo", "hi"]);
        assert!(p
            .env()
            .clone()
            .unwrap_or_default()
            .contains(&"A=b".to_string()));
        assert_eq!(p.cwd(), &PathBuf::from("/tmp"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 100));
    }

    #[test]
    fn bad_input_is_named() {
        assert!(matches!(build_spec(&opts(&[])), Err(Error::Input(_))));
        let mut o = opts(&["true"]);
        o.env = vec!["NOEQUALS".into()];
        assert!(matches!(build_spec(&o), Err(Error::Input(_))));
        assert!(parse_user("root").is_err());
        assert_eq!(parse_user("7").ok(), Some((7, 7)));
    }
}
