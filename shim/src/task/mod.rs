//! The Task API (v2) the shim server serves to containerd ([`TaskService`]), in parts:
//! [`lifecycle`] (Create, Start, Wait, State, Kill, Delete), [`exec`] (execs and stdio),
//! [`network`] (the host network namespace wired to the VM, OCI hooks) and [`events`]
//! (publishing, exit watchers).
//!
//! One VM per shim: one container, or the containers of one Kubernetes pod ([`pod`]). The host-visible pid of a task (Create, Start, State,
//! events) is its network namespace holder's when the spec asks for a network namespace, new
//! or a path (CNI plugins, hooks and CRI find the container's namespace through
//! `/proc/<pid>/ns/net`, see [`netns`]), else the
//! shim's own, which is the VMM's (as Kata reports its hypervisor's pid); guest pids are only
//! in `Pids`. Agent calls are made outside the state lock, so `State` stays cheap
//! while `Start`, `Wait` or `Create` are in flight.

mod events;
mod exec;
mod lifecycle;
mod network;
mod pod;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
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
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use oci_spec::runtime::{Process, Spec};
use skiff_protocol::StreamKind;
use skiff_vmm::sandbox::{Sandbox, SandboxConfig};

use crate::config::VmSettings;
use crate::io;
use crate::netns;
use crate::shim::unmount_rootfs;
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

pub(crate) use pod::{remove_dir as remove_pod_dir, sandbox_of as pod_sandbox_of, POD_DIR_FILE};

/// Bundle file naming the sandbox's run directory (for cleanup after a crash).
pub(crate) const RUN_DIR_FILE: &str = "skiff-run-dir";
/// Bundle file naming the network namespace path and the interface joined to the tap (for
/// cleanup after a crash).
pub(crate) const NET_FILE: &str = "skiff-net";

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

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService").finish_non_exhaustive()
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
    /// The task's pid on the host: a holder in the namespace (one made for this task ends
    /// with it).
    holder: Option<netns::Holder>,
    /// The namespace was made for this task (else it is the spec's path and outlives it).
    owned: bool,
    /// `/proc/<holder>/ns/net`, or the spec's path.
    path: PathBuf,
    /// The interface joined to the tap at Start.
    wired: Option<String>,
}

#[derive(Debug)]
struct Container {
    /// Its id inside the VM: [`CONTAINER`] for a shim's first container, `c<N>` for the
    /// other containers of a pod.
    guest: String,
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
    /// Its rootfs and volumes bound into the pod's directory (a pod's later container).
    pod_binds: Vec<PathBuf>,
}

/// A Kubernetes pod: its sandbox container booted the VM; the pod's other containers (sent
/// to this shim by containerd's grouping on `io.kubernetes.cri.sandbox-id`) run in it. Their
/// rootfs and volumes reach the guest through two shares made at boot (see [`pod`]).
#[derive(Debug)]
struct Pod {
    /// The sandbox container's id.
    id: String,
    sandbox: Arc<Sandbox>,
    /// The pod's private tmpfs on the host (shares `pod` and `podvol` are in it).
    dir: PathBuf,
    /// The sandbox's task pid (its network namespace holder): the pid of every container of
    /// the pod, whose network namespace is the pod's.
    pid: u32,
    /// The sandbox's host name (the pod's containers share its UTS namespace under runc).
    hostname: Option<String>,
    next: u64,
}

#[derive(Debug, Default)]
struct State {
    containers: HashMap<String, Container>,
    /// Creates in flight (a second Create of one id is refused).
    creating: std::collections::HashSet<String>,
    pod: Option<Pod>,
    /// Network namespaces of deleted containers that the VM still uses (a pod's sandbox
    /// deleted before its other containers): released with the VM.
    lingering: Vec<Net>,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    events: Mutex<mpsc::Sender<(String, Box<dyn MessageDyn + Send>)>>,
    exit: Arc<ExitSignal>,
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
}

/// A process found by [`TaskService::lookup`].
struct Target {
    sandbox: Arc<Sandbox>,
    /// The container's id in the guest.
    guest: String,
    /// The process's guest exec id (None: the container's init).
    exec: Option<String>,
    status: Status,
}

impl State {
    fn container(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }

    fn container_mut(&mut self, id: &str) -> TtrpcResult<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }
}

impl TaskService {
    /// The task's pid (see [`Container::pid`]); the shim's when there is no such container.
    fn task_pid(&self, id: &str) -> u32 {
        self.inner
            .lock()
            .containers
            .get(id)
            .map_or(std::process::id(), |c| c.pid)
    }

    /// The sandbox and the process's guest ids, without holding the lock afterwards.
    fn lookup(&self, id: &str, exec_id: &str) -> TtrpcResult<Target> {
        let st = self.inner.lock();
        let c = st.container(id)?;
        let p = c
            .procs
            .get(exec_id)
            .ok_or_else(|| not_found(&format!("process {exec_id:?}")))?;
        Ok(Target {
            sandbox: c.sandbox.clone(),
            guest: c.guest.clone(),
            exec: p.guest_exec.clone(),
            status: p.status,
        })
    }
}

impl containerd_shim::Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(rpc_err(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not implemented",
            ));
        }
        {
            let mut st = self.inner.lock();
            if st.containers.contains_key(&req.id) || st.creating.contains(&req.id) {
                return Err(rpc_err(
                    Code::ALREADY_EXISTS,
                    format!("task {} exists", req.id),
                ));
            }
            st.creating.insert(req.id.clone());
        }
        let r = self.create_inner(&req);
        let mut st = self.inner.lock();
        st.creating.remove(&req.id);
        let (c, first) = r?;
        let sandbox = c.sandbox.clone();
        let pid = c.pid;
        st.containers.insert(req.id.clone(), c);
        drop(st);
        // Written by the server (not the `start` process): `shim delete` checks it.
        if let Err(e) = std::fs::write(
            PathBuf::from(&req.bundle).join(crate::shim::PID_FILE),
            std::process::id().to_string(),
        ) {
            tracing::warn!("writing {}: {e}", crate::shim::PID_FILE);
        }
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
        if first {
            self.inner.watch_events(&sandbox);
        }
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
        let Target {
            sandbox,
            guest,
            exec: guest_exec,
            status,
        } = self.lookup(&req.id, &req.exec_id)?;
        if status == Status::STOPPED {
            return Ok(api::Empty::new());
        }
        awake(&sandbox, "resize the terminal")?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        sandbox
            .client()
            .resize_pty(&guest, guest_exec.as_deref(), rows, cols)
            .map_err(agent_err("resizing the terminal"))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let stream = {
            let mut st = self.inner.lock();
            st.container_mut(&req.id)?
                .procs
                .get_mut(&req.exec_id)
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
        let Target { sandbox, guest, .. } = self.lookup(&req.id, "")?;
        awake(&sandbox, "list processes")?;
        let pids = sandbox
            .client()
            .pids(&guest)
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
        let Target {
            sandbox, status, ..
        } = self.lookup(&req.id, "")?;
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
        let sandbox = self.lookup(&req.id, "")?.sandbox;
        if !sandbox.is_paused() {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                "cannot resume: the container is not paused",
            ));
        }
        self.resume_vm(&req.id, &sandbox)?;
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
        let Target { sandbox, guest, .. } = self.lookup(&req.id, "")?;
        awake(&sandbox, "update resources")?;
        sandbox
            .client()
            .update(&guest, resources)
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
        let Target { sandbox, guest, .. } = self.lookup(&req.id, "")?;
        awake(&sandbox, "read statistics")?;
        let s = sandbox
            .client()
            .stats(&guest)
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
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = self.task_pid(&req.id);
        resp.version = format!("skiff {}", env!("CARGO_PKG_VERSION"));
        Ok(resp)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // One Shutdown per container of a pod: the server (and the VM) ends with the last.
        let busy = {
            let st = self.inner.lock();
            !st.containers.is_empty() || !st.creating.is_empty()
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
mod tests;
