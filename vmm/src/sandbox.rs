//! A booted VM with its guest agent connected, as a library: what the containerd shim (and,
//! later, `vmm run`) builds containers on.
//!
//! [`Sandbox::boot`] listens on the hybrid-vsock Unix sockets in a fresh run directory
//! (`<dir>/vsock.sock_1024` for the agent's control connection, `_1025` for its stdio streams),
//! boots the VM on its own thread with a virtio-vsock device, one virtio-fs device per share and
//! `skiff.agent=serve`, waits for the agent to dial in, mounts the shares in the guest, and
//! returns the agent [`Client`] and the [`StreamHub`] that files the stdio streams.
//! [`Sandbox::shutdown`] asks the agent to power off and waits for the VM thread.
//! [`Sandbox::pause`] / [`Sandbox::resume`] stop and restart guest execution (every vCPU
//! parked outside the guest; devices keep running), for `ctr task pause`/`resume`.
//!
//! The VM runs inside the calling process: when the process dies, so does the VM.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_devices::event_loop::RunningLoop;
use skiff_protocol::stream::StreamHub;
use skiff_protocol::{Client, ClientError, Hello, CONTROL_PORT, STREAM_PORT};

use crate::fs_device::{self, Share};
use crate::net_device::{self, NetSpec};
use crate::passt::{self, GuestNet, Passt, PortMap};
use crate::timings::Timings;
use crate::vm::{self, RunResult, SerialOut, VmConfig, VmControl, DEFAULT_CMDLINE};
use std::net::IpAddr;

/// virtio-mmio slots left for shares (one goes to vsock).
pub const MAX_SHARES: usize = 9;

/// A host directory shared into the guest and where the agent mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxShare {
    /// The share (tag, host directory, read-only, ownership mode).
    pub share: Share,
    /// Mount point in the guest, outside any container (e.g. `/run/skiff/rootfs`).
    pub guest_path: String,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs with the agent.
    pub initrd: PathBuf,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Shares, mounted by the agent in this order before [`Sandbox::boot`] returns.
    pub shares: Vec<SandboxShare>,
    /// Where the guest console goes (default: `console.log` in the run directory).
    pub console: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// The run directory (vsock sockets, console log): must not exist yet; created with mode
    /// 0700, and removed when the sandbox is dropped. [`crate::run_dir::base`] gives a
    /// private parent for it.
    pub run_dir: PathBuf,
    /// How long the agent may take to dial in.
    pub agent_timeout: Duration,
    /// The clock and phases so far (`vmm run` starts it at the top of `main`); default: a
    /// clock started by [`Sandbox::boot`].
    pub timings: Option<Timings>,
    /// The VM's network card, if any.
    pub net: SandboxNet,
    /// The guest's host name (`/etc/hostname`, `/etc/hosts`; default: the agent's choice).
    pub hostname: Option<String>,
    /// How many of this user's VMs may boot at once on the host (see [`crate::boot_slots`];
    /// 0 = no limit; default: `$SKIFF_BOOT_SLOTS`, else the number of CPUs).
    pub boot_slots: Option<usize>,
    /// Warm start: restore the VM from a template ([`crate::template`]) instead of booting the
    /// kernel, making the template first when there is none (a VM with a network card
    /// restores one made with a card of the same kind; its card gets the run's MAC address);
    /// a damaged template gives one warning line and a cold boot.
    pub warm_start: bool,
}

/// How the VM is networked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SandboxNet {
    /// No network card (the container has loopback only).
    #[default]
    None,
    /// passt, started by the sandbox on a socketpair and ended with it (see [`crate::passt`]):
    /// outbound TCP/UDP and DNS without root, `ports` published on the host.
    Passt {
        /// Published ports.
        ports: Vec<PortMap>,
        /// DNS servers for the container (default: passt's forwarder).
        dns: Vec<IpAddr>,
    },
    /// A backend the caller names (stream or datagram socket, tap), with the guest addressing
    /// the caller decides.
    Backend {
        /// The backend.
        spec: NetSpec,
        /// The guest's addressing.
        guest: GuestNet,
    },
    /// A tap named `tap`, created inside the network namespace at `netns` (the shim's CNI
    /// path: the namespace's own interface is joined to the tap by the caller). The guest's
    /// card stays down and unaddressed until the caller sends the addressing it found
    /// ([`Sandbox::net_card_mac`] says which card to configure).
    Netns {
        /// `/proc/PID/ns/net` or a bind mount of a network namespace.
        netns: PathBuf,
        /// The tap's name inside that namespace.
        tap: String,
        /// The MTU the card offers.
        mtu: u16,
    },
}

/// Errors of [`Sandbox::boot`], [`Sandbox::pause`] and [`Sandbox::resume`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input (too many shares, a share that cannot be exported).
    #[error("{0}")]
    Input(String),
    /// A host-side operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The VM failed or ended before the agent connected.
    #[error("{0}")]
    Vm(String),
    /// The agent failed a request (handshake, share mount, shutdown).
    #[error("{what}: {source}")]
    Agent {
        /// What was being done.
        what: String,
        /// The client error.
        source: ClientError,
    },
    /// Pause or resume failed: the sandbox has no VM of its own ([`Sandbox::attach`]), the VM
    /// has ended, or its vCPUs did not leave the guest in time.
    #[error("cannot {op} the sandbox: {reason}")]
    VmControl {
        /// `pause` or `resume`.
        op: &'static str,
        /// Why.
        reason: String,
    },
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.into(),
        source,
    }
}

/// A running VM whose agent is connected.
pub struct Sandbox {
    client: Arc<Client<UnixStream>>,
    hello: Hello,
    hub: StreamHub<UnixStream>,
    run_dir: PathBuf,
    console: PathBuf,
    vm_result: Mutex<Option<mpsc::Receiver<Result<RunResult, vm::Error>>>>,
    /// The VM's result once seen by [`Sandbox::vm_ended`] (handed out by `shutdown`).
    ended: Mutex<Option<Result<RunResult, vm::Error>>>,
    events: Arc<Mutex<Option<RunningLoop>>>,
    /// Pause/resume of the VM; `None` for an attached sandbox (no VM of its own).
    control: Option<VmControl>,
    started: Instant,
    agent_ready: Instant,
    /// When the handshake, a restored guest's reseed, the share mounts and the network
    /// configuration were done.
    guest_prepared: Instant,
    /// The network card's event loop (stopped with the VM).
    net_loop: Mutex<Option<RunningLoop>>,
    /// passt, when the sandbox started it (killed with the sandbox).
    passt: Mutex<Option<Passt>>,
    guest_net: Option<GuestNet>,
    /// The MAC address the guest's network card has now (a restored guest: the template's).
    card_mac: Option<[u8; 6]>,
    /// The run's MAC address for the card.
    mac: [u8; 6],
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("run_dir", &self.run_dir)
            .field("console", &self.console)
            .finish_non_exhaustive()
    }
}

/// The kernel command line of a sandbox VM with `kernel_args` appended.
pub fn guest_cmdline(kernel_args: &[String]) -> String {
    std::iter::once(format!("{DEFAULT_CMDLINE} skiff.agent=serve"))
        .chain(kernel_args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The template a sandbox VM of this shape restores (`tags`: its virtio-fs tags in slot
/// order: `rootfs`, `vol0`, `vol1`, ...).
pub fn template_spec(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cpus: u32,
    memory_mib: u64,
    kernel_args: &[String],
    tags: Vec<String>,
    net: Option<crate::template::NetShape>,
) -> crate::template::TemplateSpec {
    crate::template::TemplateSpec {
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        cpus,
        memory_mib,
        cmdline: guest_cmdline(kernel_args),
        tags,
        net,
    }
}

impl Sandbox {
    /// Boots the VM and waits for its agent (see the module docs).
    pub fn boot(cfg: SandboxConfig) -> Result<Self, Error> {
        let mut timings = cfg
            .timings
            .clone()
            .unwrap_or_else(|| Timings::new(Instant::now()));
        let started = timings.start();
        if cfg.shares.len() > MAX_SHARES {
            return Err(Error::Input(format!(
                "too many shares ({}): at most {MAX_SHARES} fit one VM",
                cfg.shares.len()
            )));
        }
        let mut share_devices = Vec::new();
        let budget = fs_device::FdBudget::default();
        for s in &cfg.shares {
            share_devices.push(
                fs_device::create(&s.share, &budget).map_err(|e| Error::Input(e.to_string()))?,
            );
        }
        let dir = cfg.run_dir.clone();
        // Exclusive and private: a path that already exists (a planted symlink included) is
        // an error, never reused or removed.
        crate::run_dir::create_exclusive(&dir).map_err(|e| Error::Input(e.to_string()))?;
        // Removes the directory if boot fails; defused on success (the Sandbox removes it).
        let mut guard = DirGuard(Some(dir.clone()));
        let uds = dir.join("vsock.sock");
        let control = UnixListener::bind(format!("{}_{CONTROL_PORT}", uds.display()))
            .map_err(io_err("listening for the agent"))?;
        let streams = UnixListener::bind(format!("{}_{STREAM_PORT}", uds.display()))
            .map_err(io_err("listening for stdio streams"))?;
        let hub: StreamHub<UnixStream> = StreamHub::new();
        hub.accept_loop(move || streams.accept().map(|(s, _)| s));

        let console = cfg
            .console
            .clone()
            .unwrap_or_else(|| dir.join("console.log"));
        // Held until the agent is ready (the end of this function), so at most N VMs boot
        // at once (making a template is a boot too); the agent's deadline starts once the
        // slot is ours.
        let slots = cfg
            .boot_slots
            .unwrap_or_else(crate::boot_slots::default_slots);
        let _slot = match (slots, crate::boot_slots::dir()) {
            (0, _) | (_, None) => None,
            (n, Some(d)) => {
                let s = crate::boot_slots::acquire(&d, n, crate::boot_slots::MAX_WAIT);
                if s.waited() >= Duration::from_millis(1) {
                    timings.mark(crate::timings::Phase::BootSlot);
                }
                Some(s)
            }
        };
        let cmdline = guest_cmdline(&cfg.kernel_args);
        let net_shape = match &cfg.net {
            SandboxNet::None
            | SandboxNet::Backend {
                spec: NetSpec::None,
                ..
            } => None,
            SandboxNet::Passt { dns, .. } => Some(crate::template::NetShape {
                vnet_hdr: false,
                mtu: GuestNet::passt(dns).mtu,
            }),
            SandboxNet::Backend { spec, guest } => Some(crate::template::NetShape {
                vnet_hdr: matches!(spec, NetSpec::Tap(_)),
                mtu: guest.mtu,
            }),
            SandboxNet::Netns { mtu, .. } => Some(crate::template::NetShape {
                vnet_hdr: true,
                mtu: *mtu,
            }),
        };
        // Warm start needs snapshots, which not every backend has (arm64 KVM and HVF do not
        // yet): there every VM boots cold, as with --cold.
        let restore = if cfg.warm_start && crate::hypervisor::SNAPSHOTS_SUPPORTED {
            let spec = template_spec(
                &cfg.kernel,
                &cfg.initrd,
                cfg.cpus,
                cfg.memory_mib,
                &cfg.kernel_args,
                cfg.shares.iter().map(|s| s.share.tag.clone()).collect(),
                net_shape,
            );
            match crate::template::find_or_make(&spec, cfg.agent_timeout) {
                Ok(crate::template::Found::Ready(l)) => {
                    timings.mark(crate::timings::Phase::TemplateChecked);
                    Some(l)
                }
                Ok(crate::template::Found::Made(l)) => {
                    timings.mark(crate::timings::Phase::TemplateMade);
                    Some(l)
                }
                // The template VM itself did not come up: a cold boot of the same guest
                // would not either (and would wait as long again).
                Err(crate::template::Error::Make(m)) => {
                    return Err(Error::Vm(format!("the VM did not come up: {m}")));
                }
                Err(e) => {
                    eprintln!("skiff: warning: no usable VM template ({e}); booting cold");
                    None
                }
            }
        } else {
            None
        };
        let restored = restore.is_some();
        let vm_cfg = VmConfig {
            kernel: cfg.kernel.clone(),
            initrd: Some(cfg.initrd.clone()),
            cmdline,
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            serial: SerialOut::File(console.clone()),
            pit: vm::PitMode::Auto,
            snapshot: None,
            restore: restore.map(vm::RestoreFrom::Loaded),
            serial_in: None,
            gdb: None,
        };
        let (factory, events) = crate::vsock_device::create(&uds).map_err(Error::Vm)?;
        let mut devices = vec![factory];
        devices.extend(share_devices);
        // The network card last: passt (or the named backend) is up before the VM starts.
        let mac = net_device::default_mac();
        let (net_dev, net_loop, mut passt, guest_net) = match &cfg.net {
            SandboxNet::None => (None, None, None, None),
            SandboxNet::Passt { ports, dns } => {
                let guest = GuestNet::passt(dns);
                let (p, fd) = passt::start(&guest, ports, Some(&dir.join("passt.log"))).map_err(
                    |e| match e {
                        passt::Error::Spawn(m) => Error::Vm(format!("passt: {m}")),
                        e => Error::Input(e.to_string()),
                    },
                )?;
                let backend = skiff_devices::virtio::net::StreamBackend::new(fd)
                    .map_err(io_err("passt socket"))?;
                let mut ncfg = skiff_devices::virtio::net::NetConfig::new(mac);
                ncfg.mtu = guest.mtu;
                let (f, l) = net_device::create_with_backend(Box::new(backend), ncfg)
                    .map_err(|e| Error::Vm(e.to_string()))?;
                (Some(f), Some(l), Some(p), Some(guest))
            }
            SandboxNet::Backend { spec, guest } => {
                match net_device::create(spec, mac, guest.mtu)
                    .map_err(|e| Error::Input(e.to_string()))?
                {
                    Some((f, l)) => (Some(f), Some(l), None, Some(guest.clone())),
                    None => (None, None, None, None),
                }
            }
            SandboxNet::Netns { netns, tap, mtu } => {
                let (f, l) = net_device::create_in_netns(netns, tap, mac, *mtu)
                    .map_err(|e| Error::Input(e.to_string()))?;
                (Some(f), Some(l), None, None)
            }
        };
        let has_card = net_loop.is_some();
        if let Some(f) = net_dev {
            devices.push(f);
        }
        if devices.len() > MAX_SHARES + 1 {
            return Err(Error::Input(format!(
                "too many shares ({}): with a network card at most {} fit one VM",
                cfg.shares.len(),
                MAX_SHARES - 1
            )));
        }
        let net_loop = Mutex::new(net_loop);
        // When the VM ends, the vsock event loop stops and closes every guest connection, so
        // a host call waiting on the agent (Wait, stdio copies) ends instead of hanging.
        let events = Arc::new(Mutex::new(Some(events)));
        let vm_events = events.clone();
        let (vm_tx, vm_rx) = mpsc::channel();
        let vm_ctl = VmControl::new();
        let vm_control = vm_ctl.clone();
        std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || {
                let r = vm::run_controlled(&vm_cfg, timings, devices, &vm_control);
                if let Some(l) = vm_events.lock().ok().and_then(|mut g| g.take()) {
                    let _ = l.stop();
                }
                let _ = vm_tx.send(r);
            })
            .map_err(io_err("starting the VM thread"))?;

        // The agent's control connection is the readiness signal.
        control
            .set_nonblocking(true)
            .map_err(io_err("agent listener"))?;
        let deadline = Instant::now() + cfg.agent_timeout;
        // A restored guest's first connection can die in the vsock transport reset; its agent
        // then dials again (see `crate::template`): accept again until the deadline.
        let mut failed: Option<(&'static str, ClientError)> = None;
        let (handshake, agent_ready) = loop {
            let stream = loop {
                match control.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io_err("accepting the agent")(e)),
                }
                if let Ok(r) = vm_rx.try_recv() {
                    let tail = console_tail(&console);
                    return Err(Error::Vm(match r {
                        Ok(res) => format!(
                            "the VM ended ({:?}) before the agent connected; console:\n{tail}",
                            res.exit
                        ),
                        Err(e) => format!("the VM failed: {e}"),
                    }));
                }
                if Instant::now() > deadline {
                    return Err(Error::Vm(format!(
                        "the agent did not connect within {:?}; console:\n{}",
                        cfg.agent_timeout,
                        console_tail(&console)
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let agent_ready = Instant::now();
            stream
                .set_nonblocking(false)
                .map_err(io_err("agent connection"))?;
            let retry = restored && Instant::now() < deadline;
            match Client::from_stream(stream) {
                Ok((client, hello)) if restored => {
                    // Every clone is its own machine: fresh entropy and the clock before
                    // anything else runs in it.
                    match client.reseed(&crate::template::entropy(), crate::template::now_ns()) {
                        Ok(()) => break (Some((client, hello)), agent_ready),
                        Err(e) if retry => {
                            tracing::debug!("restored agent connection lost ({e}); accepting again")
                        }
                        Err(e) => {
                            failed = Some(("reseeding the restored guest", e));
                            break (None, agent_ready);
                        }
                    }
                }
                Ok(ok) => break (Some(ok), agent_ready),
                Err(e) if retry => {
                    tracing::debug!("restored agent handshake lost ({e}); accepting again")
                }
                Err(e) => {
                    failed = Some(("agent handshake", e));
                    break (None, agent_ready);
                }
            }
        };
        let vm_result = Mutex::new(Some(vm_rx));
        let ended = Mutex::new(None);
        // An agent call that fails because the VM itself ended (a guest crash) says so.
        let agent_err = |what: String, source: ClientError| {
            let why = vm_end_reason(&vm_result, &ended, &console, Duration::from_secs(1));
            Error::Agent {
                what: format!("{what}{why}"),
                source,
            }
        };
        let (client, hello) = match (handshake, failed) {
            (Some(ok), _) => ok,
            (None, Some((what, e))) => return Err(agent_err(what.into(), e)),
            (None, None) => return Err(Error::Vm("the agent handshake failed".into())),
        };
        for s in &cfg.shares {
            client
                .mount_share(&s.share.tag, &s.guest_path, s.share.read_only)
                .map_err(|e| {
                    agent_err(
                        format!(
                            "mounting {} at {} in the guest",
                            s.share.host.display(),
                            s.guest_path
                        ),
                        e,
                    )
                })?;
        }
        if let Some(guest) = &guest_net {
            if let Some(p) = passt.as_mut() {
                p.check_alive().map_err(|e| Error::Vm(e.to_string()))?;
            }
            client
                .configure_network(&guest_network_config(
                    guest,
                    mac,
                    restored,
                    cfg.hostname.as_deref(),
                ))
                .map_err(|e| agent_err("configuring the guest network".into(), e))?;
        }
        let guest_prepared = Instant::now();
        tracing::info!(
            ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            "boot phase (ms since VMM start): agent ready, shares mounted"
        );
        guard.0 = None;
        Ok(Self {
            started,
            client: Arc::new(client),
            hello,
            hub,
            run_dir: dir,
            console,
            vm_result,
            ended,
            events,
            control: Some(vm_ctl),
            agent_ready,
            guest_prepared,
            net_loop,
            passt: Mutex::new(passt),
            guest_net,
            card_mac: has_card.then_some(if restored {
                crate::template::TEMPLATE_MAC
            } else {
                mac
            }),
            mac,
        })
    }

    /// Wraps an already connected agent without a VM of its own (tests with a fake agent, or
    /// a VM managed elsewhere): [`Sandbox::shutdown`] then only asks the agent to power off.
    /// `run_dir` is removed when the sandbox is dropped.
    pub fn attach(
        client: Client<UnixStream>,
        hello: Hello,
        hub: StreamHub<UnixStream>,
        run_dir: PathBuf,
    ) -> Self {
        let console = run_dir.join("console.log");
        Self {
            client: Arc::new(client),
            hello,
            hub,
            run_dir,
            console,
            vm_result: Mutex::new(None),
            ended: Mutex::new(None),
            events: Arc::new(Mutex::new(None)),
            control: None,
            started: Instant::now(),
            agent_ready: Instant::now(),
            guest_prepared: Instant::now(),
            net_loop: Mutex::new(None),
            passt: Mutex::new(None),
            guest_net: None,
            card_mac: None,
            mac: [0; 6],
        }
    }

    /// When the agent dialed in.
    pub fn agent_ready_at(&self) -> Instant {
        self.agent_ready
    }

    /// When the guest was ready for containers (see [`crate::timings::Phase::GuestPrepared`]).
    pub fn guest_prepared_at(&self) -> Instant {
        self.guest_prepared
    }

    /// Why the VM ended, when it ended within `wait` (for error messages after a failed
    /// agent call: " (the VM ended: TripleFault; console: ...)"), else an empty string. The
    /// result stays available to [`Sandbox::shutdown`].
    pub fn vm_ended(&self, wait: Duration) -> String {
        vm_end_reason(&self.vm_result, &self.ended, &self.console, wait)
    }

    /// Milliseconds since the VMM started booting this sandbox (for phase logs).
    pub fn ms_since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    /// The agent client (shareable: several threads may call it at once).
    pub fn client(&self) -> &Arc<Client<UnixStream>> {
        &self.client
    }

    /// The agent's greeting (version, boot stamps).
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The stdio streams the agent dials in (take them by container, exec id and kind).
    pub fn streams(&self) -> &StreamHub<UnixStream> {
        &self.hub
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The guest console log.
    pub fn console(&self) -> &Path {
        &self.console
    }

    /// The last lines of the guest console (for error messages).
    pub fn console_tail(&self) -> String {
        console_tail(&self.console)
    }

    /// Pauses the VM: returns once every vCPU is parked outside the guest. The guest's
    /// processes stop; host-side device threads (vsock, virtio-fs) keep running, so agent
    /// calls made while paused wait until [`Sandbox::resume`]. Idempotent.
    pub fn pause(&self) -> Result<(), Error> {
        self.control("pause")?
            .pause()
            .map_err(|e| Error::VmControl {
                op: "pause",
                reason: e.to_string(),
            })
    }

    /// Lets a paused VM run again. Idempotent (resuming a running VM does nothing).
    pub fn resume(&self) -> Result<(), Error> {
        self.control("resume")?
            .resume()
            .map_err(|e| Error::VmControl {
                op: "resume",
                reason: e.to_string(),
            })
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.as_ref().is_some_and(VmControl::is_paused)
    }

    fn control(&self, op: &'static str) -> Result<&VmControl, Error> {
        self.control.as_ref().ok_or(Error::VmControl {
            op,
            reason: "this sandbox has no VM of its own (attached to an agent)".into(),
        })
    }

    /// Asks the agent to power the VM off and waits up to `timeout` for the VM thread.
    /// Returns the VM's result, or `None` when it was already collected or did not end in
    /// time (the VM then keeps running until the process exits). Safe to call twice. A
    /// paused VM is resumed first (its agent could not answer otherwise).
    pub fn shutdown(&self, timeout: Duration) -> Option<Result<RunResult, vm::Error>> {
        if let Some(c) = &self.control {
            let _ = c.resume();
        }
        let rx = self.vm_result.lock().ok().and_then(|mut g| g.take());
        let seen = self.ended.lock().ok().and_then(|mut g| g.take());
        let acked = match self.client.shutdown_timeout(timeout) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("agent shutdown: {e}");
                false
            }
        };
        if seen.is_some() {
            self.stop_events();
            return seen;
        }
        // The agent answers Shutdown once it has flushed the guest's file systems (writes to
        // shares are write-through anyway): nothing of the guest is left to lose, so the VM is
        // stopped from the host rather than waiting for the guest kernel to reboot.
        if acked {
            if let Some(c) = &self.control {
                c.stop();
            }
        }
        let rx = rx?;
        let r = match rx.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(_) => {
                // A guest that ignores the power-off request is stopped from the host.
                tracing::warn!("the VM did not power off within {timeout:?}; stopping it");
                if let Some(c) = &self.control {
                    c.stop();
                }
                rx.recv_timeout(Duration::from_secs(2)).ok()
            }
        };
        self.stop_events();
        r
    }

    /// The guest's network addressing, when it has a network card.
    pub fn guest_net(&self) -> Option<&GuestNet> {
        self.guest_net.as_ref()
    }

    /// The MAC address by which the agent finds the network card (`NetInterface.mac`), and the
    /// address the card was given for this run, when the VM has a card. A restored guest's
    /// card still has the template's address.
    pub fn net_card_mac(&self) -> Option<(String, String)> {
        let fmt = |m: &[u8; 6]| skiff_devices::virtio::net::format_mac(m);
        self.card_mac.map(|c| (fmt(&c), fmt(&self.mac)))
    }

    /// passt's process id, when the sandbox started one.
    pub fn passt_pid(&self) -> Option<u32> {
        self.passt
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(Passt::pid))
    }

    fn stop_events(&self) {
        if let Some(l) = self.events.lock().ok().and_then(|mut g| g.take()) {
            let _ = l.stop();
        }
        if let Some(l) = self.net_loop.lock().ok().and_then(|mut g| g.take()) {
            let _ = l.stop();
        }
        // Killed and reaped.
        drop(self.passt.lock().ok().and_then(|mut g| g.take()));
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_events();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

type VmResult = Result<RunResult, vm::Error>;

/// What the agent is told about the guest's network: `eth0` (found by `mac`) with the
/// address, MTU and default route, the DNS servers, the host name, and `host.skiff.internal`
/// for the gateway (the host's loopback under passt). A guest `restored` from a template
/// finds its card by the template's MAC and gives it `mac` before it comes up.
fn guest_network_config(
    guest: &GuestNet,
    mac: [u8; 6],
    restored: bool,
    hostname: Option<&str>,
) -> skiff_protocol::NetworkConfig {
    let fmt = |m: &[u8; 6]| skiff_devices::virtio::net::format_mac(m);
    let (find, set_mac) = if restored {
        (fmt(&crate::template::TEMPLATE_MAC), Some(fmt(&mac)))
    } else {
        (fmt(&mac), None)
    };
    skiff_protocol::NetworkConfig {
        interfaces: vec![skiff_protocol::NetInterface {
            mac: Some(find),
            name: Some("eth0".into()),
            addresses: vec![format!("{}/{}", guest.address, guest.prefix)],
            mtu: Some(u32::from(guest.mtu)),
            set_mac,
        }],
        routes: vec![skiff_protocol::NetRoute {
            destination: "0.0.0.0/0".into(),
            gateway: Some(guest.gateway.to_string()),
        }],
        dns: guest.dns.iter().map(ToString::to_string).collect(),
        search: Vec::new(),
        hostname: hostname.map(Into::into),
        hosts: vec![skiff_protocol::HostEntry {
            ip: guest.gateway.to_string(),
            names: vec!["host.skiff.internal".into()],
        }],
    }
}

/// See [`Sandbox::vm_ended`].
fn vm_end_reason(
    rx: &Mutex<Option<mpsc::Receiver<VmResult>>>,
    ended: &Mutex<Option<VmResult>>,
    console: &Path,
    wait: Duration,
) -> String {
    let Ok(mut slot) = ended.lock() else {
        return String::new();
    };
    if slot.is_none() {
        let got = rx
            .lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(|r| r.recv_timeout(wait).ok()));
        *slot = got;
    }
    match &*slot {
        Some(Ok(res)) => format!(
            " (the VM ended: {:?}; console:\n{})",
            res.exit,
            console_tail(console)
        ),
        Some(Err(e)) => format!(" (the VM failed: {e})"),
        None => String::new(),
    }
}

/// Removes a directory when dropped, unless defused (`.0 = None`).
struct DirGuard(Option<PathBuf>);
impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The last 20 lines of a console log, read from its end (at most 64 KiB, see
/// [`crate::console_log::tail`]): the guest decides how big the log is.
pub fn console_tail(path: &Path) -> String {
    crate::console_log::tail(path, 20)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(shares: Vec<SandboxShare>, run_dir: PathBuf) -> SandboxConfig {
        SandboxConfig {
            warm_start: false,
            kernel: PathBuf::from("/no/such/kernel"),
            initrd: PathBuf::from("/no/such/initrd"),
            cpus: 1,
            memory_mib: 64,
            shares,
            console: None,
            kernel_args: Vec::new(),
            run_dir,
            agent_timeout: Duration::from_secs(1),
            timings: None,
            net: SandboxNet::None,
            hostname: None,
            boot_slots: Some(0),
        }
    }

    fn share(n: usize, host: &str) -> SandboxShare {
        SandboxShare {
            share: Share {
                tag: format!("s{n}"),
                host: PathBuf::from(host),
                read_only: false,
                xattr_ownership: false,
                policy: fs_device::SharePolicy::Volume,
            },
            guest_path: format!("/mnt/{n}"),
        }
    }

    #[test]
    fn bad_shares_are_refused_before_boot() {
        let dir = std::env::temp_dir().join(format!("skiff-sandbox-test-{}", std::process::id()));
        let many = (0..=MAX_SHARES).map(|n| share(n, "/")).collect();
        let e = Sandbox::boot(cfg(many, dir.clone())).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e}");
        let e = Sandbox::boot(cfg(vec![share(0, "/no/such/dir")], dir.clone())).unwrap_err();
        assert!(e.to_string().contains("/no/such/dir"), "{e}");
        assert!(!dir.exists(), "no run directory is left behind");
    }

    /// Answers nothing: the attach test never calls the agent.
    struct Mute;
    impl skiff_protocol::server::Handler for Mute {
        fn handle(&self, _: skiff_protocol::Request, _: skiff_protocol::server::Replier) {}
    }

    #[test]
    fn an_attached_sandbox_cannot_be_paused() {
        let (host, agent) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let hello = Hello {
                protocol_version: skiff_protocol::PROTOCOL_VERSION,
                agent_version: "mute".into(),
                boot_stamps: Vec::new(),
            };
            let _ = skiff_protocol::serve(agent.try_clone().unwrap(), agent, hello, &Mute);
        });
        let (client, hello) = Client::from_stream(host).unwrap();
        let dir = std::env::temp_dir().join(format!("skiff-attach-test-{}", std::process::id()));
        let sb = Sandbox::attach(client, hello, StreamHub::new(), dir);
        let e = sb.pause().unwrap_err();
        assert!(matches!(e, Error::VmControl { op: "pause", .. }), "{e}");
        assert!(e.to_string().contains("no VM of its own"), "{e}");
        assert!(sb.resume().is_err());
        assert!(!sb.is_paused());
    }
}
