//! `vmm run`: runs one command as a container in a fresh VM, with the user's stdio, signals and
//! exit status, as `runc run` would.
//!
//! A thin front end over [`Sandbox`] (the same boot the containerd shim uses): boot the VM with
//! its shares and wait for the agent → CreateContainer (rootfs `/rootfs` from the initramfs, or
//! the `--rootfs` share) → stdio copies → Start → forward signals → Wait (answered only after
//! the output streams are drained) → Shutdown → exit with the container's status.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::{BoxBuilder, Spec, User};
use skiff_protocol::{Client, StreamKind};

use crate::fs_device::{self, Share};
use crate::sandbox::{self, Sandbox, SandboxConfig, SandboxNet, SandboxShare};
use crate::sys;
use crate::timings::{Phase, Timings};
use crate::{net_device, passt};

/// Container id used inside the VM (one container per VM).
const CONTAINER: &str = "skiff";
/// The container root filesystem inside the guest (a busybox tree in the initramfs).
const GUEST_ROOTFS: &str = "/rootfs";
/// virtio-mmio slots left for shares (one goes to vsock).
pub const MAX_SHARES: usize = 9;

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
    /// `--net`: passt (default when installed), none, tap:NAME, stream:PATH, dgram:PATH.
    pub net: Option<String>,
    /// `-p` values.
    pub publish: Vec<String>,
    /// `--hostname`.
    pub hostname: Option<String>,
    /// `--dns` values.
    pub dns: Vec<String>,
    /// `--ip ADDR/PREFIX` for tap/stream/dgram.
    pub ip: Option<String>,
    /// `--gateway IP` for tap/stream/dgram.
    pub gateway: Option<String>,
    /// How long the agent may take to dial in.
    /// How many VMs may boot at once (see [`crate::boot_slots`]; `None`: the default).
    pub boot_slots: Option<usize>,
    /// Boot the kernel even when a template could be restored (see `crate::template`).
    pub cold: bool,
    pub agent_timeout: Duration,
    /// The command and its arguments.
    pub args: Vec<String>,
}

/// The network `vmm run` asked for, checked before boot (one clear line for bad input).
pub fn plan_network(opts: &RunOptions) -> Result<SandboxNet, Error> {
    let bad = |m: String| Error::Input(m);
    let dns = opts
        .dns
        .iter()
        .map(|d| {
            d.parse::<std::net::IpAddr>()
                .map_err(|_| bad(format!("--dns {d:?}: not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = opts
        .publish
        .iter()
        .map(|p| passt::parse_port(p).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(h) = &opts.hostname {
        let ok = !h.is_empty()
            && h.len() <= 63
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !h.starts_with('-');
        if !ok {
            return Err(bad(format!(
                "--hostname {h:?}: expected 1-63 letters, digits, '-' or '.'"
            )));
        }
    }
    let mode = match opts.net.as_deref() {
        Some(m) => m.to_string(),
        None if passt::find().is_some() && passt::host_has_default_route() => "passt".into(),
        None => {
            tracing::info!(
                "no network for the container: {} (--net none)",
                if passt::find().is_none() {
                    "passt is not installed"
                } else {
                    "the host has no default route"
                }
            );
            "none".into()
        }
    };
    let net = match mode.as_str() {
        "passt" => {
            if passt::find().is_none() {
                return Err(bad(passt::Error::Missing.to_string()));
            }
            if !passt::host_has_default_route() {
                return Err(bad(passt::Error::NoRoute.to_string()));
            }
            SandboxNet::Passt { ports, dns }
        }
        m => {
            if !ports.is_empty() {
                return Err(bad(format!(
                    "-p needs --net passt (with --net {m}, publish ports on your own network)"
                )));
            }
            let spec = net_device::parse_net(m).map_err(|e| bad(e.to_string()))?;
            if spec == net_device::NetSpec::None {
                SandboxNet::None
            } else {
                let mut guest = passt::GuestNet::passt(&dns);
                if let Some(ip) = &opts.ip {
                    let (a, p) = ip
                        .split_once('/')
                        .and_then(|(a, p)| Some((a.parse().ok()?, p.parse::<u8>().ok()?)))
                        .filter(|(_, p)| *p <= 32)
                        .ok_or_else(|| bad(format!("--ip {ip:?}: expected ADDR/PREFIX (IPv4)")))?;
                    guest.address = a;
                    guest.prefix = p;
                }
                if let Some(g) = &opts.gateway {
                    guest.gateway = g
                        .parse()
                        .map_err(|_| bad(format!("--gateway {g:?}: not an IPv4 address")))?;
                }
                guest.mtu = 1500;
                SandboxNet::Backend { spec, guest }
            }
        }
    };
    Ok(net)
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

/// The agent's report of where container creation went, as one line (its names are the
/// guest's: shown escaped, shortened, at most 24 of them).
pub fn agent_steps_line(steps: &[(String, u64)]) -> String {
    let parts: Vec<String> = steps
        .iter()
        .take(24)
        .map(|(name, us)| {
            let name: String = name.chars().take(32).collect();
            format!("{} {:.1}", name.escape_debug(), *us as f64 / 1e3)
        })
        .collect();
    format!("  agent, creating the container (ms): {}", parts.join(", "))
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
    // Volumes were checked by parse_volume; the rootfs before the (maybe slow) kernel lookup.
    // Sandbox::boot checks every share again, before it boots.
    if let Some(r) = &opts.rootfs {
        if !r.is_dir() {
            return Err(Error::Input(format!(
                "--rootfs {}: not a directory",
                r.display()
            )));
        }
    }
    let net = plan_network(opts)?;
    // The container's host name: --hostname, else "skiff" (oci-spec's default is "youki").
    spec.set_hostname(Some(
        opts.hostname.clone().unwrap_or_else(|| "skiff".into()),
    ));
    if net != SandboxNet::None {
        // The container uses the VM's network (its eth0), as `docker run` gives a container
        // its network: the VM is the isolation boundary.
        if let Some(linux) = spec.linux_mut() {
            if let Some(ns) = linux.namespaces_mut() {
                ns.retain(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network);
            }
        }
    }
    let (kernel, initrd) = crate::artifacts::find(opts.kernel.as_deref(), opts.initrd.as_deref())
        .map_err(|e| Error::Input(e.to_string()))?;
    // Signals go to a forwarding thread, not to this process's default actions.
    sys::block_signals(&sys::FORWARDED).map_err(failed("blocking signals"))?;

    // The sandbox creates it (exclusively, mode 0700) and removes it when dropped.
    let dir = crate::run_dir::base()
        .map_err(|e| Error::Failed(format!("creating the run directory: {e}")))?
        .join(format!(
            "run-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
    // Signals: before the container starts, a terminating one ends `vmm run` (the VM is
    // abandoned with the process); after, every signal is forwarded to the container, and a
    // third terminating signal forces the exit if the guest does not answer.
    let started: Arc<Mutex<Option<Arc<Client<UnixStream>>>>> = Arc::new(Mutex::new(None));
    spawn_signal_thread(started.clone(), dir.clone());

    timings.mark(Phase::RunPrepared);
    let sandbox = Sandbox::boot(SandboxConfig {
        kernel,
        initrd,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        shares: shares
            .iter()
            .map(|(share, target)| SandboxShare {
                share: share.clone(),
                guest_path: target.clone(),
            })
            .collect(),
        console: opts.console.clone(),
        kernel_args: opts.kernel_args.clone(),
        run_dir: dir,
        agent_timeout: opts.agent_timeout,
        timings: Some(timings.clone()),
        net,
        hostname: opts.hostname.clone(),
        boot_slots: opts.boot_slots,
        warm_start: !opts.cold,
    })
    .map_err(|e| match e {
        sandbox::Error::Input(m) => Error::Input(m),
        e => Error::Failed(e.to_string()),
    })?;
    timings.mark_at(Phase::AgentReady, sandbox.agent_ready_at());
    timings.mark_at(Phase::GuestPrepared, sandbox.guest_prepared_at());
    // An agent call that fails because the VM itself ended (a guest crash) says so.
    let agent_failed = |what: &str, e: &dyn std::fmt::Display| {
        Error::Failed(format!(
            "{what}: {e}{}",
            sandbox.vm_ended(Duration::from_secs(1))
        ))
    };
    let client = sandbox.client().clone();
    let hub = sandbox.streams();
    let rootfs = if opts.rootfs.is_some() {
        GUEST_SHARED_ROOTFS
    } else {
        GUEST_ROOTFS
    };

    let stdio = skiff_protocol::Stdio {
        stdin: opts.interactive,
    };
    let (_, create_steps) = client
        .create_container_steps(CONTAINER, spec, rootfs, opts.tty, stdio)
        .map_err(|e| agent_failed("creating the container", &e))?;
    timings.mark(Phase::ContainerCreated);
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
    timings.mark(Phase::StreamsAttached);
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
    match sandbox.shutdown(Duration::from_secs(30)) {
        Some(Ok(res)) => {
            for p in res.timings.phases() {
                timings.mark_at(p.0, p.1);
            }
        }
        Some(Err(e)) => tracing::warn!("VM error after the container exited: {e}"),
        None => tracing::warn!("the VM did not power off within 30 s after the container exited"),
    }
    if opts.timings {
        eprint!("{}", timings.report());
        if !create_steps.is_empty() {
            eprintln!("{}", agent_steps_line(&create_steps));
        }
        eprintln!("  container exit status: {status}");
    }
    drop(sandbox);
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

#[cfg(test)]
mod tests {
    use super::agent_steps_line;

    #[test]
    fn agent_steps_line_shows_milliseconds_in_order() {
        let steps = vec![("streams".to_string(), 1500), ("fork".to_string(), 250)];
        assert_eq!(
            agent_steps_line(&steps),
            "  agent, creating the container (ms): streams 1.5, fork 0.2"
        );
    }

    #[test]
    fn agent_steps_line_bounds_and_escapes_guest_names() {
        let long = "x".repeat(100);
        let mut steps = vec![("a\nb\u{1b}[2J".to_string(), 1000), (long, 2000)];
        steps.extend((0..100).map(|i| (format!("s{i}"), i)));
        let line = agent_steps_line(&steps);
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert!(line.contains("a\\nb\\u{1b}[2J 1.0"), "{line}");
        assert!(line.contains(&format!("{} 2.0", "x".repeat(32))), "{line}");
        assert!(!line.contains(&"x".repeat(33)), "{line}");
        // "agent, creating" plus 23 separators: 24 steps shown.
        assert_eq!(line.matches(", ").count(), 24, "{line}");
        assert!(line.ends_with("s21 0.0"), "{line}");
    }
}
