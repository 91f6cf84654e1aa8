//! The shim: `start`/`delete` binary modes ([`Service`]) and the Task service ([`TaskService`]).
//!
//! One container per shim and per VM. The host-visible pid of a task (Create, Start, State,
//! events) is its network namespace holder's when the spec asks for a new network namespace
//! (CNI plugins and hooks find the container's namespace through it, see [`netns`]), else the
//! shim's own, which is the VMM's (as Kata reports its hypervisor's pid); guest pids are only
//! in `Pids`. Agent calls are made outside the state lock, so `State` stays cheap
//! while `Start`, `Wait` or `Create` are in flight.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use containerd_shim::api::{self, Status};
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult};
use oci_spec::runtime::{Process, Spec};
use skiff_protocol::StreamKind;
use skiff_vmm::sandbox::{Sandbox, SandboxConfig};

use crate::config::VmSettings;
use crate::io;
use crate::netns;
use crate::spec::{self, GUEST_ROOTFS};

/// The container's id inside the VM (one container per VM).
const CONTAINER: &str = "skiff";
/// How long a stdio stream may take to arrive after Create/Exec.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on output copies after the agent reported an exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Delete waits for each agent call (kill, delete) before going on without it.
const DELETE_AGENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long Delete waits for the VM to power off.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to stop after Shutdown before the process exits anyway.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// The file in the bundle holding the shim server's pid (for `delete` after a crash).
const PID_FILE: &str = "shim.pid";
/// Bundle file naming the sandbox's run directory (for cleanup after a crash).
const RUN_DIR_FILE: &str = "skiff-run-dir";
/// Bundle file naming the network namespace path and the interface joined to the tap (for
/// cleanup after a crash).
const NET_FILE: &str = "skiff-net";

fn rpc_err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn not_found(what: &str) -> ttrpc::Error {
    rpc_err(Code::NOT_FOUND, format!("{what} not found"))
}

fn agent_err(what: &str) -> impl Fn(skiff_protocol::ClientError) -> ttrpc::Error + '_ {
    move |e| {
        let code = match &e {
            skiff_protocol::ClientError::Agent(r) if r.code == libc::ENOENT => Code::NOT_FOUND,
            skiff_protocol::ClientError::Agent(r) if r.code == libc::EEXIST => Code::ALREADY_EXISTS,
            skiff_protocol::ClientError::Agent(r) if r.code == libc::EINVAL => {
                Code::INVALID_ARGUMENT
            }
            skiff_protocol::ClientError::Agent(r) if r.code == libc::EBUSY => {
                Code::FAILED_PRECONDITION
            }
            _ => Code::UNKNOWN,
        };
        rpc_err(code, format!("{what}: {e}"))
    }
}

/// Calls that need the guest agent cannot run while the vCPUs are paused.
fn awake(sandbox: &Sandbox, what: &str) -> TtrpcResult<()> {
    if sandbox.is_paused() {
        Err(rpc_err(
            Code::FAILED_PRECONDITION,
            format!("cannot {what}: the container is paused (resume it first)"),
        ))
    } else {
        Ok(())
    }
}

/// The `containerd_shim::Shim` implementation (binary modes and server lifetime).
pub struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: PathBuf,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService").finish_non_exhaustive()
    }
}

fn bundle_dir(flags: &Flags) -> PathBuf {
    if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        PathBuf::from(&flags.bundle)
    }
}

impl containerd_shim::Shim for Service {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Self {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: bundle_dir(args),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // `spawn` starts `<this binary> -namespace … -id … -address … -socket …` with stdin and
        // stderr on /dev/null and stdout on a pipe it reads until the server, once listening,
        // points its stdout elsewhere: containerd's pipe is never held by the server.
        let grouping = opts.id.clone();
        let (pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        tracing::info!("shim server started: pid {pid}, {address}");
        // containerd reconnects through `<bundle>/address` after a restart.
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<api::DeleteResponse, containerd_shim::Error> {
        let pid = cleanup_after_crash(&self.bundle, &self.id);
        let mut r = api::DeleteResponse::new();
        r.pid = pid.unwrap_or(0);
        r.exit_status = 137;
        r.exited_at = MessageField::some(Timestamp::now());
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The server's shutdown joins its connections, which could wait on a handler still
        // blocked in Wait (Shutdown{now}); the process, and the VM in it, must end anyway.
        std::thread::spawn(|| {
            std::thread::sleep(EXIT_GRACE);
            tracing::warn!("shim server did not stop within {EXIT_GRACE:?}; exiting");
            std::process::exit(0);
        });
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let pid = std::process::id();
        if let Err(e) = std::fs::write(self.bundle.join(PID_FILE), pid.to_string()) {
            tracing::warn!("writing {PID_FILE}: {e}");
        }
        let (tx, rx) = mpsc::channel::<(String, Box<dyn MessageDyn + Send>)>();
        let namespace = self.namespace.clone();
        // One thread publishes in order (a TaskStart is always sent before its TaskExit).
        std::thread::spawn(move || {
            for (topic, event) in rx {
                let mut ctx = Context::default();
                ctx.add("containerd-namespace-ttrpc".into(), namespace.clone());
                ctx.timeout_nano = 5_000_000_000;
                if let Err(e) = publisher.publish(ctx, &topic, &namespace, event) {
                    tracing::warn!("publishing {topic}: {e}");
                }
            }
        });
        TaskService {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                events: Mutex::new(tx),
                exit: self.exit.clone(),
                id: self.id.clone(),
            }),
        }
    }
}

/// `delete` after the server died: kills a surviving server (its VM goes with it), unmounts
/// the rootfs, removes the socket. Returns the server's pid if known.
fn cleanup_after_crash(bundle: &Path, id: &str) -> Option<u32> {
    let pid: Option<u32> = std::fs::read_to_string(bundle.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    if let Some(p) = pid {
        // Only a shim server for this container (pids are reused).
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let ours = cmdline
            .split(|b| *b == 0)
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
        if ours && p != std::process::id() {
            if let Some(raw) = rustix::process::Pid::from_raw(p as i32) {
                let _ = rustix::process::kill_process(raw, rustix::process::Signal::KILL);
            }
            // Let the kernel tear down its mappings and descriptors before unmounting.
            for _ in 0..50 {
                if !alive(p) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    spec::unbind_files(&bundle.join(spec::FILES_DIR));
    unmount_rootfs(&bundle.join("rootfs"));
    remove_run_dir(bundle);
    remove_tap(bundle);
    if let Ok(addr) = std::fs::read_to_string(bundle.join("address")) {
        let path = addr.trim().trim_start_matches("unix://");
        if std::fs::symlink_metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false)
        {
            let _ = std::fs::remove_file(path);
        }
    }
    pid
}

/// Takes the tap and qdisc out of a network namespace that outlives the task (a spec path:
/// CRI's), after a crash. A holder's namespace went away with the holder.
fn remove_tap(bundle: &Path) {
    let Ok(text) = std::fs::read_to_string(bundle.join("config.json")) else {
        return;
    };
    let Ok(spec) = serde_json::from_str::<Spec>(&text) else {
        return;
    };
    if let netns::Plan::Path(p) = netns::plan(&spec) {
        let recorded = std::fs::read_to_string(bundle.join(NET_FILE)).unwrap_or_default();
        let iface = recorded.lines().nth(1).map(str::to_owned);
        if p.exists() {
            netns::unwire(&p, netns::TAP, iface.as_deref());
        }
    }
    let _ = std::fs::remove_file(bundle.join(NET_FILE));
}

/// Removes the run directory named in the bundle, if it is one of ours (directly under the
/// private base, named `shim-*`).
fn remove_run_dir(bundle: &Path) {
    let Ok(raw) = std::fs::read(bundle.join(RUN_DIR_FILE)) else {
        return;
    };
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
    let ours = skiff_vmm::run_dir::base().is_ok_and(|b| dir.parent() == Some(b.as_path()))
        && dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("shim-"));
    if ours {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_file(bundle.join(RUN_DIR_FILE));
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn unmount_rootfs(target: &Path) {
    if let Some(t) = target.to_str() {
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
            tracing::warn!("unmounting {t}: {e}");
        }
    }
}

/// The host end of a process's stdin: the stream, and a message when the FIFO copy ended.
#[derive(Debug)]
struct Stdin {
    stream: UnixStream,
    done: mpsc::Receiver<()>,
}

/// How long CloseIO lets the stdin copy finish on its own (the client closing its FIFO
/// writer races its CloseIO) before cutting it.
const STDIN_FLUSH: Duration = Duration::from_secs(1);

/// One process: the container's init (exec id "") or an exec.
#[derive(Debug)]
struct Proc {
    /// Its id in the guest: None for init, `e<N>` for execs.
    guest_exec: Option<String>,
    status: Status,
    exit: Option<(u32, Timestamp)>,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// Our handle on the stdin stream (CloseIO shuts it down) and the end of its copy.
    stdin_stream: Option<Stdin>,
    /// Output copies, handed to the exit watcher on Start.
    outputs: Vec<JoinHandle<()>>,
    /// Its exit watcher runs (from Start, or from a Kill before Start).
    watched: bool,
}

/// The container's network namespace on the host (see [`netns`]).
#[derive(Debug)]
struct Net {
    /// The holder of a namespace made for this task (the namespace ends with it).
    holder: Option<netns::Holder>,
    /// `/proc/<holder>/ns/net`, or the spec's path.
    path: PathBuf,
    /// The interface joined to the tap at Start.
    wired: Option<String>,
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// The task's pid as containerd sees it: the network namespace holder's, else the shim's.
    pid: u32,
    /// The spec's hooks and what their state needs.
    spec: Spec,
    net: Option<Net>,
    /// `<bundle>/rootfs` when Create mounted containerd's rootfs mounts there.
    mounted_rootfs: Option<PathBuf>,
    sandbox: Arc<Sandbox>,
    procs: HashMap<String, Proc>,
    next_exec: u64,
}

#[derive(Debug, Default)]
struct State {
    container: Option<Container>,
    /// Create is in flight (a second Create is refused).
    creating: bool,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    events: Mutex<mpsc::Sender<(String, Box<dyn MessageDyn + Send>)>>,
    exit: Arc<ExitSignal>,
    id: String,
}

/// The Task API (v2) served to containerd.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish<E: Event + Send + 'static>(&self, e: E) {
        let topic = e.topic();
        let tx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send((topic, Box::new(e)));
    }

    fn check_id(&self, id: &str) -> TtrpcResult<()> {
        if id == self.id {
            Ok(())
        } else {
            Err(not_found(&format!("task {id}")))
        }
    }

    /// Takes the stdio streams of a just-created process and starts the copies.
    fn connect_stdio(
        &self,
        sandbox: &Sandbox,
        guest_exec: &str,
        terminal: bool,
        stdin: &str,
        stdout: &str,
        stderr: &str,
    ) -> TtrpcResult<(Option<Stdin>, Vec<JoinHandle<()>>)> {
        let take = |kind| {
            sandbox
                .streams()
                .take(CONTAINER, guest_exec, kind, STREAM_TIMEOUT)
                .map_err(|e| rpc_err(Code::INTERNAL, format!("stdio stream: {e}")))
        };
        let mut outputs = Vec::new();
        if terminal {
            outputs.push(io::copy_out(take(StreamKind::Pty)?, stdout.to_string()));
        } else {
            outputs.push(io::copy_out(take(StreamKind::Stdout)?, stdout.to_string()));
            outputs.push(io::copy_out(take(StreamKind::Stderr)?, stderr.to_string()));
        }
        let stdin_stream = if stdin.is_empty() {
            None
        } else {
            let s = take(StreamKind::Stdin)?;
            let (stream, done) = io::copy_in(stdin.to_string(), s)
                .map_err(|e| rpc_err(Code::INTERNAL, format!("stdin stream: {e}")))?;
            Some(Stdin { stream, done })
        };
        Ok((stdin_stream, outputs))
    }

    /// Publishes the agent's unsolicited events that containerd has a topic for: an OOM kill
    /// in the container's cgroup becomes TaskOOM. The thread ends with the control connection.
    fn watch_events(self: &Arc<Self>, sandbox: &Sandbox) {
        let Some(rx) = sandbox.client().take_events() else {
            return;
        };
        let inner = self.clone();
        std::thread::spawn(move || {
            for e in rx {
                if let skiff_protocol::Event::Oom { .. } = e {
                    tracing::warn!(
                        "the guest kernel's OOM killer killed a process of the container"
                    );
                    let mut ev = TaskOOM::new();
                    ev.container_id = inner.id.clone();
                    inner.publish(ev);
                }
            }
        });
    }

    /// Watches a started process: the agent answers Wait once it exited and its output was
    /// drained in the guest; then the host copies are finished, the exit recorded (waking
    /// `Wait`), and TaskExit published.
    fn watch_exit(
        self: &Arc<Self>,
        sandbox: Arc<Sandbox>,
        exec_id: String,
        guest_exec: Option<String>,
        outputs: Vec<JoinHandle<()>>,
    ) {
        let inner = self.clone();
        std::thread::spawn(move || {
            let status = match sandbox.client().wait(CONTAINER, guest_exec.as_deref()) {
                Ok(s) => u32::try_from(s).unwrap_or(255),
                Err(e) => {
                    tracing::warn!("waiting for process {exec_id:?}: {e}");
                    255
                }
            };
            let _ = io::join_all(outputs, DRAIN_TIMEOUT);
            tracing::info!(
                exec = exec_id.as_str(),
                status,
                ms = format!("{:.1}", sandbox.ms_since_start()),
                "boot phase (ms since VMM start): process exited, output drained"
            );
            let at = Timestamp::now();
            {
                let mut st = inner.lock();
                if let Some(p) = st
                    .container
                    .as_mut()
                    .and_then(|c| c.procs.get_mut(&exec_id))
                {
                    p.status = Status::STOPPED;
                    p.exit = Some((status, at.clone()));
                    p.stdin_stream = None;
                }
                inner.changed.notify_all();
            }
            let mut ev = TaskExit::new();
            ev.container_id = inner.id.clone();
            ev.id = if exec_id.is_empty() {
                inner.id.clone()
            } else {
                exec_id
            };
            ev.pid = inner
                .lock()
                .container
                .as_ref()
                .map_or(std::process::id(), |c| c.pid);
            ev.exit_status = status;
            ev.exited_at = MessageField::some(at);
            inner.publish(ev);
        });
    }
}

impl TaskService {
    fn create_inner(&self, req: &api::CreateTaskRequest) -> TtrpcResult<Container> {
        let bundle = PathBuf::from(&req.bundle);
        let config = bundle.join("config.json");
        let text = std::fs::read_to_string(&config)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("{}: {e}", config.display())))?;
        let mut spec: Spec = serde_json::from_str(&text)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("{}: {e}", config.display())))?;
        let vm = VmSettings::resolve(req.options.as_ref(), spec.annotations().as_ref())
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        tracing::info!(
            cpus = vm.cpus,
            memory_mib = vm.memory_mib,
            kernel = %vm.kernel.display(),
            "VM settings"
        );

        // The rootfs: containerd's mounts (overlay, bind) on <bundle>/rootfs, or, without
        // mounts, the spec's root path as it is.
        let (rootfs_host, mounted) = if req.rootfs.is_empty() {
            let root = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| PathBuf::from("rootfs"));
            (bundle.join(root), None)
        } else {
            let target = bundle.join("rootfs");
            std::fs::create_dir_all(&target)
                .map_err(|e| rpc_err(Code::INTERNAL, format!("{}: {e}", target.display())))?;
            for m in &req.rootfs {
                let typ = (!m.type_.is_empty()).then_some(m.type_.as_str());
                let src = (!m.source.is_empty()).then_some(m.source.as_str());
                if let Err(e) = containerd_shim::mount::mount_rootfs(typ, src, &m.options, &target)
                {
                    unmount_rootfs(&target);
                    return Err(rpc_err(
                        Code::INTERNAL,
                        format!("mounting the rootfs ({} {}): {e}", m.type_, m.source),
                    ));
                }
            }
            (target.clone(), Some(target))
        };
        let files_dir = bundle.join(spec::FILES_DIR);
        let fail = |e: ttrpc::Error| {
            spec::unbind_files(&files_dir);
            if let Some(t) = &mounted {
                unmount_rootfs(t);
            }
            e
        };
        let plan = spec::plan_shares(&mut spec, &bundle, rootfs_host, &files_dir)
            .map_err(|e| fail(rpc_err(Code::INVALID_ARGUMENT, e)))?;
        spec::bind_files(&files_dir, &plan.files).map_err(|e| fail(rpc_err(Code::INTERNAL, e)))?;
        let shares = plan.shares;
        // The network namespace on the host (ctr --cni, CRI, nerdctl put CNI networks there).
        let net = match netns::plan(&spec) {
            netns::Plan::Host => None,
            netns::Plan::New => {
                let holder = netns::Holder::spawn().map_err(|e| {
                    fail(rpc_err(Code::INTERNAL, format!("network namespace: {e}")))
                })?;
                Some(Net {
                    path: holder.netns(),
                    holder: Some(holder),
                    wired: None,
                })
            }
            netns::Plan::Path(p) => {
                if !p.exists() {
                    return Err(fail(rpc_err(
                        Code::INVALID_ARGUMENT,
                        format!("network namespace {} does not exist", p.display()),
                    )));
                }
                Some(Net {
                    path: p,
                    holder: None,
                    wired: None,
                })
            }
        };
        let task_pid = net
            .as_ref()
            .and_then(|n| n.holder.as_ref())
            .map_or(std::process::id(), netns::Holder::pid);
        let hook_spec = spec.clone();
        if net.is_some() {
            // The container shares the VM's namespace, where the card is.
            netns::strip_network_namespace(&mut spec);
        }
        let net_path = net.as_ref().map(|n| n.path.clone());
        let created_tap = |net_path: &Option<PathBuf>| {
            // A namespace that outlives the task (a path) must not keep our tap.
            if let (Some(p), Some(n)) = (net_path, net.as_ref()) {
                if n.holder.is_none() {
                    netns::unwire(p, netns::TAP, None);
                }
            }
        };
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_terminal(Some(req.terminal));
        spec.set_process(Some(process));

        // A fresh private directory (mode 0700, created exclusively by the sandbox) under
        // /run/skiff: never a predictable path in a world-writable directory. The bundle
        // itself is too deep for Unix socket paths (108 bytes) with CRI's 64-byte ids.
        let run_dir = skiff_vmm::run_dir::base()
            .map_err(|e| fail(rpc_err(Code::INTERNAL, format!("run directory: {e}"))))?
            .join(format!(
                "shim-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() % 1_000_000_000)
                    .unwrap_or(0)
            ));
        // Recorded so `shim delete` can remove it after a crash.
        let _ = std::fs::write(bundle.join(RUN_DIR_FILE), run_dir.as_os_str().as_bytes());
        let sandbox = Sandbox::boot(SandboxConfig {
            kernel: vm.kernel,
            initrd: vm.initrd,
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            shares,
            console: vm.console,
            kernel_args: Vec::new(),
            run_dir,
            agent_timeout: vm.agent_timeout,
            timings: None,
            net: match &net_path {
                Some(p) => skiff_vmm::sandbox::SandboxNet::Netns {
                    netns: p.clone(),
                    tap: netns::TAP.into(),
                    mtu: netns::CARD_MTU,
                },
                None => skiff_vmm::sandbox::SandboxNet::None,
            },
            hostname: None,
            boot_slots: vm.boot_slots,
            warm_start: vm.warm_start,
        })
        .map_err(|e| {
            created_tap(&net_path);
            fail(rpc_err(Code::INTERNAL, format!("booting the VM: {e}")))
        })?;
        let sandbox = Arc::new(sandbox);
        let client = sandbox.client().clone();
        let stdio = skiff_protocol::Stdio {
            stdin: !req.stdin.is_empty(),
        };
        let boot_fail = |e: ttrpc::Error| {
            let _ = sandbox.shutdown(POWEROFF_TIMEOUT);
            created_tap(&net_path);
            fail(e)
        };
        client
            .create_container(CONTAINER, spec, GUEST_ROOTFS, req.terminal, stdio)
            .map_err(|e| boot_fail(agent_err("creating the container")(e)))?;
        let (stdin_stream, outputs) = self
            .inner
            .connect_stdio(
                &sandbox,
                "",
                req.terminal,
                &req.stdin,
                &req.stdout,
                &req.stderr,
            )
            .map_err(boot_fail)?;
        // The spec's prestart and createRuntime hooks run on the host now, with the task's
        // pid (its network namespace is the container's), as runc runs them.
        if let Some(h) = hook_spec.hooks() {
            let state = netns::hook_state(&hook_spec, &self.inner.id, "created", task_pid, &bundle);
            #[allow(deprecated)]
            let prestart = h.prestart().clone().unwrap_or_default();
            for (kind, hooks) in [
                ("prestart", prestart),
                (
                    "createRuntime",
                    h.create_runtime().clone().unwrap_or_default(),
                ),
            ] {
                netns::run_hooks(kind, &hooks, &state)
                    .map_err(|e| boot_fail(rpc_err(Code::FAILED_PRECONDITION, e)))?;
            }
        }
        let init = Proc {
            guest_exec: None,
            status: Status::CREATED,
            exit: None,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            stdin_stream,
            outputs,
            watched: false,
        };
        Ok(Container {
            bundle,
            pid: task_pid,
            spec: hook_spec,
            net,
            mounted_rootfs: mounted,
            sandbox,
            procs: HashMap::from([(String::new(), init)]),
            next_exec: 1,
        })
    }

    /// The task's pid (see [`Container::pid`]); the shim's when there is no container.
    fn task_pid(&self) -> u32 {
        self.inner
            .lock()
            .container
            .as_ref()
            .map_or(std::process::id(), |c| c.pid)
    }

    /// At Start: joins the network namespace's interface (the CNI one, if any) to the VM's
    /// card and gives the guest its addressing (see [`netns`]). Without a namespace of its
    /// own, nothing to do.
    fn wire_network(&self, sandbox: &Sandbox) -> TtrpcResult<()> {
        let (path, bundle) = {
            let st = self.inner.lock();
            let Some(c) = st.container.as_ref() else {
                return Err(not_found("container"));
            };
            match &c.net {
                Some(n) if n.wired.is_none() => (n.path.clone(), c.bundle.clone()),
                _ => return Ok(()),
            }
        };
        let iface = netns::wire(&path, netns::TAP)
            .map_err(|e| rpc_err(Code::INTERNAL, format!("container network: {e}")))?;
        if let Some(i) = &iface {
            // For `shim delete` after a crash.
            let _ = std::fs::write(
                bundle.join(NET_FILE),
                format!("{}\n{}\n", path.display(), i.name),
            );
            tracing::info!(
                interface = i.name.as_str(),
                addresses = ?i.addresses,
                "container network joined to the VM"
            );
            let mut st = self.inner.lock();
            if let Some(n) = st.container.as_mut().and_then(|c| c.net.as_mut()) {
                n.wired = Some(i.name.clone());
            }
        }
        let find = sandbox
            .net_card_mac()
            .map(|(now, _)| now)
            .unwrap_or_default();
        sandbox
            .client()
            .configure_network(&netns::guest_config(iface.as_ref(), &find))
            .map_err(agent_err("configuring the container network"))
    }

    /// Runs the spec's `kind` hooks with the task in `status`; a failure is logged.
    fn run_hooks_warn(&self, kind: &str, status: &str) {
        let (spec, pid, bundle) = {
            let st = self.inner.lock();
            let Some(c) = st.container.as_ref() else {
                return;
            };
            (c.spec.clone(), c.pid, c.bundle.clone())
        };
        let Some(h) = spec.hooks() else {
            return;
        };
        let hooks = match kind {
            "poststart" => h.poststart().clone().unwrap_or_default(),
            _ => h.poststop().clone().unwrap_or_default(),
        };
        let state = netns::hook_state(&spec, &self.inner.id, status, pid, &bundle);
        if let Err(e) = netns::run_hooks(kind, &hooks, &state) {
            tracing::warn!("{e}");
        }
    }

    /// The sandbox and the process's guest exec id, without holding the lock afterwards.
    fn lookup(&self, exec_id: &str) -> TtrpcResult<(Arc<Sandbox>, Option<String>, Status)> {
        let st = self.inner.lock();
        let c = st
            .container
            .as_ref()
            .ok_or_else(|| not_found("container"))?;
        let p = c
            .procs
            .get(exec_id)
            .ok_or_else(|| not_found(&format!("process {exec_id:?}")))?;
        Ok((c.sandbox.clone(), p.guest_exec.clone(), p.status))
    }
}

/// The Task methods that tests drive without a ttrpc context.
impl TaskService {
    /// Resumes the vCPUs and publishes TaskResumed.
    fn resume_vm(&self, sandbox: &Sandbox) -> TtrpcResult<()> {
        sandbox
            .resume()
            .map_err(|e| rpc_err(Code::INTERNAL, format!("resuming the VM: {e}")))?;
        tracing::info!("VM resumed");
        let mut ev = TaskResumed::new();
        ev.container_id = self.inner.id.clone();
        self.inner.publish(ev);
        Ok(())
    }

    fn handle_exec(&self, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        if req.exec_id.is_empty() {
            return Err(rpc_err(Code::INVALID_ARGUMENT, "empty exec id"));
        }
        awake(&self.lookup("")?.0, "exec a process")?;
        let mut process: Process = serde_json::from_slice(&req.spec.value)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        process.set_terminal(Some(req.terminal));
        let (sandbox, guest_exec) = {
            let mut st = self.inner.lock();
            let c = st
                .container
                .as_mut()
                .ok_or_else(|| not_found("container"))?;
            if c.procs.contains_key(&req.exec_id) {
                return Err(rpc_err(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} exists", req.exec_id),
                ));
            }
            let g = format!("e{}", c.next_exec);
            c.next_exec += 1;
            // Reserve the id while the agent works.
            c.procs.insert(
                req.exec_id.clone(),
                Proc {
                    guest_exec: Some(g.clone()),
                    status: Status::UNKNOWN,
                    exit: None,
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    stdin_stream: None,
                    outputs: Vec::new(),
                    watched: false,
                },
            );
            (c.sandbox.clone(), g)
        };
        let r = sandbox
            .client()
            .exec(
                CONTAINER,
                &guest_exec,
                process,
                skiff_protocol::Stdio {
                    stdin: !req.stdin.is_empty(),
                },
            )
            .map_err(agent_err("creating the exec"))
            .and_then(|_| {
                self.inner.connect_stdio(
                    &sandbox,
                    &guest_exec,
                    req.terminal,
                    &req.stdin,
                    &req.stdout,
                    &req.stderr,
                )
            });
        let mut st = self.inner.lock();
        let Some(c) = st.container.as_mut() else {
            return Err(not_found("container"));
        };
        match r {
            Ok((stdin_stream, outputs)) => {
                if let Some(p) = c.procs.get_mut(&req.exec_id) {
                    p.status = Status::CREATED;
                    p.stdin_stream = stdin_stream;
                    p.outputs = outputs;
                }
                drop(st);
                let mut ev = TaskExecAdded::new();
                ev.container_id = req.id.clone();
                ev.exec_id = req.exec_id.clone();
                self.inner.publish(ev);
                Ok(api::Empty::new())
            }
            Err(e) => {
                c.procs.remove(&req.exec_id);
                self.inner.changed.notify_all();
                Err(e)
            }
        }
    }

    fn handle_start(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        self.inner.check_id(&req.id)?;
        let (sandbox, guest_exec, status) = self.lookup(&req.exec_id)?;
        if status != Status::CREATED {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                format!("process {:?} was already started", req.exec_id),
            ));
        }
        awake(&sandbox, "start a process")?;
        if req.exec_id.is_empty() {
            self.wire_network(&sandbox)?;
        }
        sandbox
            .client()
            .start(CONTAINER, guest_exec.as_deref())
            .map_err(agent_err("starting the process"))?;
        let pid = self.task_pid();
        let (outputs, watched) = {
            let mut st = self.inner.lock();
            let p = st
                .container
                .as_mut()
                .and_then(|c| c.procs.get_mut(&req.exec_id))
                .ok_or_else(|| not_found("process"))?;
            p.status = Status::RUNNING;
            let watched = std::mem::replace(&mut p.watched, true);
            (std::mem::take(&mut p.outputs), watched)
        };
        // Published before the watcher can publish the exit.
        if req.exec_id.is_empty() {
            let mut ev = TaskStart::new();
            ev.container_id = req.id.clone();
            ev.pid = pid;
            self.inner.publish(ev);
        } else {
            let mut ev = TaskExecStarted::new();
            ev.container_id = req.id.clone();
            ev.exec_id = req.exec_id.clone();
            ev.pid = pid;
            self.inner.publish(ev);
        }
        tracing::info!(
            exec = req.exec_id.as_str(),
            ms = format!("{:.1}", sandbox.ms_since_start()),
            "boot phase (ms since VMM start): process started"
        );
        if !watched {
            self.inner
                .watch_exit(sandbox.clone(), req.exec_id.clone(), guest_exec, outputs);
        }
        if req.exec_id.is_empty() {
            // poststart hooks: a failure is a warning (OCI runtime spec).
            self.run_hooks_warn("poststart", "running");
        }
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    fn handle_wait(&self, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        self.inner.check_id(&req.id)?;
        let mut st = self.inner.lock();
        loop {
            let p = st
                .container
                .as_ref()
                .and_then(|c| c.procs.get(&req.exec_id))
                .ok_or_else(|| not_found(&format!("process {:?}", req.exec_id)))?;
            if let Some((status, at)) = &p.exit {
                let mut resp = api::WaitResponse::new();
                resp.exit_status = *status;
                resp.exited_at = MessageField::some(at.clone());
                return Ok(resp);
            }
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn handle_state(&self, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        self.inner.check_id(&req.id)?;
        let st = self.inner.lock();
        let c = st
            .container
            .as_ref()
            .ok_or_else(|| not_found("container"))?;
        let p = c
            .procs
            .get(&req.exec_id)
            .ok_or_else(|| not_found(&format!("process {:?}", req.exec_id)))?;
        let mut resp = api::StateResponse::new();
        resp.id = req.id.clone();
        resp.bundle = c.bundle.display().to_string();
        resp.pid = c.pid;
        resp.status = EnumOrUnknown::new(if p.status == Status::RUNNING && c.sandbox.is_paused() {
            Status::PAUSED
        } else {
            p.status
        });
        resp.stdin = p.stdin.clone();
        resp.stdout = p.stdout.clone();
        resp.stderr = p.stderr.clone();
        resp.terminal = p.terminal;
        if let Some((status, at)) = &p.exit {
            resp.exit_status = *status;
            resp.exited_at = MessageField::some(at.clone());
        }
        resp.exec_id = req.exec_id.clone();
        Ok(resp)
    }

    fn handle_kill(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        let (sandbox, guest_exec, status) = self.lookup(&req.exec_id)?;
        if status == Status::STOPPED && !req.all {
            return Err(rpc_err(Code::NOT_FOUND, "process already finished"));
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| rpc_err(Code::INVALID_ARGUMENT, "bad signal number"))?;
        if sandbox.is_paused() {
            // Like a frozen cgroup: SIGKILL still kills; other signals wait for a resume.
            if signal != libc::SIGKILL {
                awake(&sandbox, "deliver a signal other than SIGKILL")?;
            }
            self.resume_vm(&sandbox)?;
        }
        sandbox
            .client()
            .signal(CONTAINER, guest_exec.as_deref(), signal, req.all)
            .map_err(agent_err("signalling"))?;
        if status == Status::CREATED {
            // As under runc, a signal can end a process that was never started (its exit is
            // reported and it can be deleted): watch for its exit from now on.
            let outputs = {
                let mut st = self.inner.lock();
                match st
                    .container
                    .as_mut()
                    .and_then(|c| c.procs.get_mut(&req.exec_id))
                {
                    Some(p) if !p.watched => {
                        p.watched = true;
                        Some(std::mem::take(&mut p.outputs))
                    }
                    _ => None,
                }
            };
            if let Some(outputs) = outputs {
                self.inner
                    .watch_exit(sandbox, req.exec_id.clone(), guest_exec, outputs);
            }
        }
        Ok(api::Empty::new())
    }

    fn handle_delete(&self, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        self.inner.check_id(&req.id)?;
        let (sandbox, guest_exec, status) = self.lookup(&req.exec_id)?;
        if status == Status::RUNNING || status == Status::UNKNOWN {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                format!("process {:?} is still running", req.exec_id),
            ));
        }
        let client = sandbox.client().clone();
        // Bounded: a VM that crashed or wedged must not keep Delete (and the cleanup after
        // it: power-off, unmount) from finishing.
        if status == Status::CREATED {
            // Never started: kill it so the agent can remove it.
            let _ = client.call_timeout(
                skiff_protocol::Request::Signal {
                    id: CONTAINER.into(),
                    exec_id: guest_exec.clone(),
                    signal: libc::SIGKILL,
                    all: false,
                },
                DELETE_AGENT_TIMEOUT,
            );
        }
        let deleted = client.call_timeout(
            skiff_protocol::Request::Delete {
                id: CONTAINER.into(),
                exec_id: guest_exec.clone(),
            },
            DELETE_AGENT_TIMEOUT,
        );
        if let Err(e) = deleted {
            if !req.exec_id.is_empty() {
                return Err(agent_err("deleting the exec")(e));
            }
            // The VM goes away anyway.
            tracing::warn!("deleting the container in the guest: {e}");
        }
        let mut resp = api::DeleteResponse::new();
        resp.pid = self.task_pid();
        let (exit_status, exited_at) = {
            let mut st = self.inner.lock();
            let c = st
                .container
                .as_mut()
                .ok_or_else(|| not_found("container"))?;
            let p = c.procs.remove(&req.exec_id);
            p.and_then(|p| p.exit).unwrap_or((137, Timestamp::now()))
        };
        resp.exit_status = exit_status;
        resp.exited_at = MessageField::some(exited_at.clone());
        if req.exec_id.is_empty() {
            // The container: power the VM off, unmount the rootfs, forget it.
            if sandbox.shutdown(POWEROFF_TIMEOUT).is_none() {
                tracing::warn!("the VM did not power off; it ends with the shim");
            }
            let c = {
                let mut st = self.inner.lock();
                let c = st.container.take();
                self.inner.changed.notify_all();
                c
            };
            if let Some(c) = c.as_ref() {
                spec::unbind_files(&c.bundle.join(spec::FILES_DIR));
                let _ = std::fs::remove_file(c.bundle.join(RUN_DIR_FILE));
                if let Some(n) = &c.net {
                    if n.holder.is_none() {
                        // A namespace that outlives the task: take our tap and qdisc out.
                        netns::unwire(&n.path, netns::TAP, n.wired.as_deref());
                    }
                    let _ = std::fs::remove_file(c.bundle.join(NET_FILE));
                }
                // poststop hooks run while the holder (the task's pid) still exists: a hook
                // that tears down CNI needs its namespace.
                if let Some(h) = c.spec.hooks() {
                    let state =
                        netns::hook_state(&c.spec, &self.inner.id, "stopped", c.pid, &c.bundle);
                    if let Err(e) = netns::run_hooks(
                        "poststop",
                        &h.poststop().clone().unwrap_or_default(),
                        &state,
                    ) {
                        tracing::warn!("{e}");
                    }
                }
            }
            if let Some(t) = c.as_ref().and_then(|c| c.mounted_rootfs.as_ref()) {
                unmount_rootfs(t);
            }
            let mut ev = TaskDelete::new();
            ev.container_id = req.id.clone();
            ev.id = req.id.clone();
            ev.pid = resp.pid;
            ev.exit_status = exit_status;
            ev.exited_at = MessageField::some(exited_at);
            self.inner.publish(ev);
        }
        Ok(resp)
    }
}

impl containerd_shim::Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        self.inner.check_id(&req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(rpc_err(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not implemented",
            ));
        }
        {
            let mut st = self.inner.lock();
            if st.container.is_some() || st.creating {
                return Err(rpc_err(Code::ALREADY_EXISTS, "the task exists"));
            }
            st.creating = true;
        }
        let r = self.create_inner(&req);
        let mut st = self.inner.lock();
        st.creating = false;
        let c = r?;
        let sandbox = c.sandbox.clone();
        st.container = Some(c);
        drop(st);
        let pid = self.task_pid();
        let mut ev = TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut io = TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        ev.io = MessageField::some(io);
        ev.pid = pid;
        self.inner.publish(ev);
        self.inner.watch_events(&sandbox);
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        self.handle_start(req)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        self.handle_wait(req)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.handle_state(req)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.handle_kill(req)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.handle_exec(req)
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        let (sandbox, guest_exec, status) = self.lookup(&req.exec_id)?;
        if status == Status::STOPPED {
            return Ok(api::Empty::new());
        }
        awake(&sandbox, "resize the terminal")?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        sandbox
            .client()
            .resize_pty(CONTAINER, guest_exec.as_deref(), rows, cols)
            .map_err(agent_err("resizing the terminal"))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let stream = {
            let mut st = self.inner.lock();
            st.container
                .as_mut()
                .and_then(|c| c.procs.get_mut(&req.exec_id))
                .ok_or_else(|| not_found(&format!("process {:?}", req.exec_id)))?
                .stdin_stream
                .take()
        };
        // A half-close is EOF for the process, after every byte already copied. If the
        // client closed its FIFO writer too, the copy ends by itself with all the bytes.
        if let Some(s) = stream {
            if s.done.recv_timeout(STDIN_FLUSH).is_err() {
                let _ = s.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        self.handle_delete(req)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.inner.check_id(&req.id)?;
        let (sandbox, _, _) = self.lookup("")?;
        awake(&sandbox, "list processes")?;
        let pids = sandbox
            .client()
            .pids(CONTAINER)
            .map_err(agent_err("listing processes"))?;
        let mut resp = api::PidsResponse::new();
        resp.processes = pids
            .into_iter()
            .map(|pid| {
                let mut p = containerd_shim::protos::types::task::ProcessInfo::new();
                p.pid = pid;
                p
            })
            .collect();
        Ok(resp)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        let (sandbox, _, status) = self.lookup("")?;
        if status != Status::RUNNING {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                format!("cannot pause: the container is {status:?}, not running"),
            ));
        }
        if sandbox.is_paused() {
            return Ok(api::Empty::new());
        }
        sandbox
            .pause()
            .map_err(|e| rpc_err(Code::INTERNAL, format!("pausing the VM: {e}")))?;
        tracing::info!("VM paused");
        let mut ev = TaskPaused::new();
        ev.container_id = req.id;
        self.inner.publish(ev);
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        let (sandbox, _, _) = self.lookup("")?;
        if !sandbox.is_paused() {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                "cannot resume: the container is not paused",
            ));
        }
        self.resume_vm(&sandbox)?;
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(rpc_err(
            Code::UNIMPLEMENTED,
            "checkpoint is not implemented by Skiff",
        ))
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        // containerd sends the new limits as an Any holding the runtime spec's LinuxResources
        // in JSON (typeurl's encoding of Go types without a protobuf definition).
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| rpc_err(Code::INVALID_ARGUMENT, "update without resources"))?;
        let resources: skiff_protocol::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| {
                rpc_err(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "update: resources ({}) are not LinuxResources JSON: {e}",
                        any.type_url
                    ),
                )
            })?;
        let (sandbox, _, _) = self.lookup("")?;
        awake(&sandbox, "update resources")?;
        sandbox
            .client()
            .update(CONTAINER, resources)
            .map_err(agent_err("updating resources"))?;
        tracing::info!("resources updated");
        Ok(api::Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim::protos::cgroups_v2::metrics::{
            CPUStat, MemoryStat, Metrics, PidsStat,
        };
        self.inner.check_id(&req.id)?;
        let (sandbox, _, _) = self.lookup("")?;
        awake(&sandbox, "read statistics")?;
        let s = sandbox
            .client()
            .stats(CONTAINER)
            .map_err(agent_err("reading statistics"))?;
        let mut m = Metrics::new();
        let mut pids = PidsStat::new();
        pids.current = s.pids_current.unwrap_or(0);
        pids.limit = s.pids_max.unwrap_or(0);
        m.pids = MessageField::some(pids);
        let mut cpu = CPUStat::new();
        cpu.usage_usec = s.cpu_usage_usec.unwrap_or(0);
        cpu.user_usec = s.cpu_user_usec.unwrap_or(0);
        cpu.system_usec = s.cpu_system_usec.unwrap_or(0);
        m.cpu = MessageField::some(cpu);
        let mut mem = MemoryStat::new();
        mem.usage = s.memory_current.unwrap_or(0);
        mem.usage_limit = s.memory_max.unwrap_or(0);
        m.memory = MessageField::some(mem);
        let any = containerd_shim::util::convert_to_any(Box::new(m))
            .map_err(|e| rpc_err(Code::INTERNAL, e))?;
        let mut resp = api::StatsResponse::new();
        resp.stats = MessageField::some(any);
        Ok(resp)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        self.inner.check_id(&req.id)?;
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = self.task_pid();
        resp.version = format!("skiff {}", env!("CARGO_PKG_VERSION"));
        Ok(resp)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        self.inner.check_id(&req.id)?;
        let busy = {
            let st = self.inner.lock();
            st.container.is_some() || st.creating
        };
        if busy && !req.now {
            return Ok(api::Empty::new());
        }
        // The VM (if any) ends with this process.
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use skiff_protocol::stream::{StreamHeader, StreamHub};
    use skiff_protocol::{Client, ErrorReply, Handler, Hello, Replier, Request, Response};
    use std::io::{Read, Write};

    type Flag = Arc<(Mutex<bool>, Condvar)>;

    /// Answers like the agent: Exec files the exec's streams; Start writes "hello <exec>\n"
    /// on the process's stdout, closes it, then the process "exits" (status 3 for init, 4 for
    /// execs); Wait answers after that.
    struct FakeAgent {
        hub: StreamHub<UnixStream>,
        stdout: Mutex<HashMap<String, UnixStream>>,
        exited: Mutex<HashMap<String, Flag>>,
    }

    impl FakeAgent {
        fn flag(&self, exec: &str) -> Flag {
            self.exited
                .lock()
                .unwrap()
                .entry(exec.to_string())
                .or_insert_with(|| Arc::new((Mutex::new(false), Condvar::new())))
                .clone()
        }

        fn add_streams(&self, exec: &str) {
            let out = stream(&self.hub, exec, StreamKind::Stdout);
            drop(stream(&self.hub, exec, StreamKind::Stderr)); // empty stderr
            self.stdout.lock().unwrap().insert(exec.to_string(), out);
        }
    }

    impl Handler for FakeAgent {
        fn handle(&self, request: Request, reply: Replier) {
            match request {
                Request::Exec { exec_id, .. } => {
                    self.add_streams(&exec_id);
                    reply.send(Ok(Response::Created {
                        pid: 9,
                        steps: vec![],
                    }));
                }
                Request::Start { exec_id, .. } => {
                    let key = exec_id.unwrap_or_default();
                    let out = self.stdout.lock().unwrap().remove(&key);
                    let exited = self.flag(&key);
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(50));
                        if let Some(mut o) = out {
                            o.write_all(format!("hello {key}\n").as_bytes()).unwrap();
                        }
                        *exited.0.lock().unwrap() = true;
                        exited.1.notify_all();
                    });
                    reply.send(Ok(Response::Started { pid: 7 }));
                }
                Request::Wait { exec_id, .. } => {
                    let status = if exec_id.is_some() { 4 } else { 3 };
                    let exited = self.flag(&exec_id.unwrap_or_default());
                    std::thread::spawn(move || {
                        let mut g = exited.0.lock().unwrap();
                        while !*g {
                            g = exited.1.wait(g).unwrap();
                        }
                        reply.send(Ok(Response::Exited { status }));
                    });
                }
                Request::Delete { .. } | Request::Signal { .. } => reply.send(Ok(Response::Ok)),
                _ => reply.send(Err(ErrorReply::new(libc::EINVAL, "unexpected"))),
            }
        }
    }

    fn stream(hub: &StreamHub<UnixStream>, exec: &str, kind: StreamKind) -> UnixStream {
        let (mut agent, host) = UnixStream::pair().unwrap();
        StreamHeader::new(CONTAINER, exec, kind)
            .write_to(&mut agent)
            .unwrap();
        hub.add(host).unwrap();
        agent
    }

    /// A FIFO at `path` and a reader thread that sends everything read until EOF.
    fn fifo_reader(path: &Path) -> mpsc::Receiver<String> {
        let st = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
        let (tx, rx) = mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let mut s = String::new();
            std::fs::File::open(path)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            tx.send(s).unwrap();
        });
        rx
    }

    type Events = mpsc::Receiver<(String, Box<dyn MessageDyn + Send>)>;

    /// A task service whose container "c1" (created, init stdout into `<tmp>/stdout`) runs on
    /// a fake agent.
    fn created_task(tmp: &Path) -> (TaskService, Events, mpsc::Receiver<String>) {
        std::fs::create_dir_all(tmp).unwrap();
        let fifo = tmp.join("stdout");
        let got = fifo_reader(&fifo);
        let hub = StreamHub::new();
        let (host_ctl, agent_ctl) = UnixStream::pair().unwrap();
        let fake = FakeAgent {
            hub: hub.clone(),
            stdout: Mutex::new(HashMap::new()),
            exited: Mutex::new(HashMap::new()),
        };
        fake.add_streams("");
        std::thread::spawn(move || {
            let hello = Hello {
                protocol_version: skiff_protocol::PROTOCOL_VERSION,
                agent_version: "fake".into(),
                boot_stamps: Vec::new(),
            };
            let _ = skiff_protocol::serve(agent_ctl.try_clone().unwrap(), agent_ctl, hello, &fake);
        });
        let (client, hello) = Client::from_stream(host_ctl).unwrap();
        let sandbox = Arc::new(Sandbox::attach(client, hello, hub, tmp.join("run")));
        let (ev_tx, ev_rx) = mpsc::channel();
        let task = TaskService {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                events: Mutex::new(ev_tx),
                exit: Arc::new(ExitSignal::default()),
                id: "c1".into(),
            }),
        };
        let (stdin_stream, outputs) = task
            .inner
            .connect_stdio(&sandbox, "", false, "", fifo.to_str().unwrap(), "")
            .unwrap();
        task.inner.lock().container = Some(Container {
            bundle: tmp.to_path_buf(),
            pid: std::process::id(),
            spec: Spec::default(),
            net: None,
            mounted_rootfs: None,
            sandbox,
            procs: HashMap::from([(
                String::new(),
                Proc {
                    guest_exec: None,
                    status: Status::CREATED,
                    exit: None,
                    stdin: String::new(),
                    stdout: fifo.display().to_string(),
                    stderr: String::new(),
                    terminal: false,
                    stdin_stream,
                    outputs,
                    watched: false,
                },
            )]),
            next_exec: 1,
        });
        (task, ev_rx, got)
    }

    fn state(task: &TaskService, exec: &str) -> TtrpcResult<api::StateResponse> {
        let mut r = api::StateRequest::new();
        r.id = "c1".into();
        r.exec_id = exec.into();
        task.handle_state(r)
    }

    /// Sends Wait on its own thread (containerd sends it while or before Start is in flight).
    fn wait_async(task: &TaskService, exec: &str) -> JoinHandle<TtrpcResult<api::WaitResponse>> {
        let task = task.clone();
        let mut r = api::WaitRequest::new();
        r.id = "c1".into();
        r.exec_id = exec.into();
        std::thread::spawn(move || task.handle_wait(r))
    }

    fn start(task: &TaskService, exec: &str) -> TtrpcResult<api::StartResponse> {
        let mut r = api::StartRequest::new();
        r.id = "c1".into();
        r.exec_id = exec.into();
        task.handle_start(r)
    }

    fn delete(task: &TaskService, exec: &str) -> TtrpcResult<api::DeleteResponse> {
        let mut r = api::DeleteRequest::new();
        r.id = "c1".into();
        r.exec_id = exec.into();
        task.handle_delete(r)
    }

    #[test]
    fn wait_before_start_then_exit_after_output_then_delete() {
        let tmp = std::env::temp_dir().join(format!("skiff-shim-task1-{}", std::process::id()));
        let (task, events, got) = created_task(&tmp);
        assert_eq!(
            state(&task, "").unwrap().status.enum_value(),
            Ok(Status::CREATED)
        );
        assert!(state(&task, "nope").is_err());

        let waiter = wait_async(&task, "");
        start(&task, "").unwrap();
        assert!(start(&task, "").is_err(), "started twice");
        let waited = waiter.join().unwrap().unwrap();
        assert_eq!(waited.exit_status, 3);
        // The output was complete (FIFO writer closed) by the time Wait answered.
        assert_eq!(
            got.recv_timeout(Duration::from_secs(2)).unwrap(),
            "hello \n"
        );
        let s = state(&task, "").unwrap();
        assert_eq!(s.status.enum_value(), Ok(Status::STOPPED));
        assert_eq!(s.exit_status, 3);

        let mut kill = api::KillRequest::new();
        kill.id = "c1".into();
        kill.signal = 15;
        assert!(task.handle_kill(kill).is_err(), "killing an exited process");

        assert_eq!(delete(&task, "").unwrap().exit_status, 3);
        assert!(state(&task, "").is_err(), "deleted");

        let topics: Vec<String> = events.try_iter().map(|(t, _)| t).collect();
        assert_eq!(topics, ["/tasks/start", "/tasks/exit", "/tasks/delete"]);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn exec_waited_before_start() {
        let tmp = std::env::temp_dir().join(format!("skiff-shim-task2-{}", std::process::id()));
        // (The fake agent does not need init running; its exit would race the exec's events.)
        let (task, events, _got) = created_task(&tmp);
        let exec_fifo = tmp.join("exec-stdout");
        let exec_got = fifo_reader(&exec_fifo);
        let mut r = api::ExecProcessRequest::new();
        r.id = "c1".into();
        r.exec_id = "x1".into();
        r.stdout = exec_fifo.display().to_string();
        let mut spec = containerd_shim::protos::protobuf::well_known_types::any::Any::new();
        spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
        spec.value = br#"{"user":{"uid":0,"gid":0},"args":["true"],"cwd":"/"}"#.to_vec();
        r.spec = MessageField::some(spec);
        task.handle_exec(r).unwrap();
        assert_eq!(
            state(&task, "x1").unwrap().status.enum_value(),
            Ok(Status::CREATED)
        );
        let waiter = wait_async(&task, "x1");
        std::thread::sleep(Duration::from_millis(20));
        start(&task, "x1").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap().exit_status, 4);
        assert_eq!(
            exec_got.recv_timeout(Duration::from_secs(2)).unwrap(),
            "hello e1\n"
        );
        assert_eq!(delete(&task, "x1").unwrap().exit_status, 4);
        assert!(state(&task, "x1").is_err());
        let topics: Vec<String> = events.try_iter().map(|(t, _)| t).collect();
        assert_eq!(
            topics,
            ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
