//! The agent's request handler: containers, processes, stdio pumps, reaping, cgroups.

use crate::container::{self, ChildFds, ProcPlan, RootPlan};
use crate::{net, sys};
use skiff_protocol::{
    ErrorReply, Event, Handler, Hello, LinuxResources, NetworkConfig, OciSpec, Outbox, Replier,
    Request, Response, Stats, Stdio, StreamHeader, StreamKind, STREAM_PORT,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How the agent reaches the host: returns a connected stream for a vsock port (AF_VSOCK in
/// the guest, a Unix socket `<path>_<port>` in tests).
pub trait Dialer: Send + Sync {
    fn dial(&self, port: u32) -> io::Result<UnixStream>;
}

impl<F: Fn(u32) -> io::Result<UnixStream> + Send + Sync> Dialer for F {
    fn dial(&self, port: u32) -> io::Result<UnixStream> {
        self(port)
    }
}

/// Agent settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Parent cgroup (v2) for per-container cgroups; None disables cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// Reap every child (`waitpid(-1)`): the agent is PID 1. When false (tests), only the
    /// agent's own processes are waited for.
    pub reap_all: bool,
    /// Where `ConfigureNetwork` writes `resolv.conf`, `hosts` and `hostname`, and each
    /// container's copies (`containers/<id>/`) that are bind-mounted into it.
    pub net_dir: PathBuf,
}

/// The guest directory for the generated network files ([`Config::net_dir`]).
pub const NET_DIR: &str = "/run/skiff/net";

impl Config {
    /// `/sys/fs/cgroup/skiff` when a cgroup v2 hierarchy is mounted at `/sys/fs/cgroup`.
    pub fn detect(reap_all: bool) -> Self {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        Self {
            cgroup_root: v2.then(|| PathBuf::from("/sys/fs/cgroup/skiff")),
            reap_all,
            net_dir: PathBuf::from(NET_DIR),
        }
    }
}

/// Hello for this agent build.
pub fn hello(boot_stamps: Vec<(String, u64)>) -> Hello {
    Hello {
        protocol_version: skiff_protocol::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        boot_stamps,
    }
}

/// Bounds the threads parked in Wait.
const MAX_WAITERS: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Reaping
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ReapState {
    watchers: HashMap<i32, mpsc::Sender<i32>>,
    /// Statuses reaped before their pid was watched (bounded: orphans land here too).
    early: HashMap<i32, i32>,
}

struct Reaper {
    all: bool,
    state: Mutex<ReapState>,
    kick: Condvar,
}

impl Reaper {
    fn new(all: bool) -> Arc<Self> {
        let r = Arc::new(Self {
            all,
            state: Mutex::new(ReapState::default()),
            kick: Condvar::new(),
        });
        if all {
            let r2 = r.clone();
            std::thread::spawn(move || r2.reap_all_loop());
        }
        r
    }

    /// A receiver for `pid`'s raw wait status.
    fn watch(&self, pid: i32) -> mpsc::Receiver<i32> {
        let (tx, rx) = mpsc::channel();
        if self.all {
            let mut st = lock(&self.state);
            if let Some(s) = st.early.remove(&pid) {
                let _ = tx.send(s);
            } else {
                st.watchers.insert(pid, tx);
            }
            self.kick.notify_all();
        } else {
            std::thread::spawn(move || {
                if let Ok((_, s)) = sys::waitpid(pid) {
                    let _ = tx.send(s);
                }
            });
        }
        rx
    }

    fn reap_all_loop(&self) {
        loop {
            match sys::waitpid(-1) {
                Ok((pid, status)) => {
                    let mut st = lock(&self.state);
                    if let Some(tx) = st.watchers.remove(&pid) {
                        let _ = tx.send(status);
                    } else {
                        if st.early.len() >= 4096 {
                            st.early.clear();
                        }
                        st.early.insert(pid, status);
                    }
                }
                Err(_) => {
                    // No children: sleep until one is watched (or a second passes).
                    let st = lock(&self.state);
                    let _ = self
                        .kick
                        .wait_timeout(st, std::time::Duration::from_secs(1));
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

struct StdinSink {
    /// Pipe write end or pty master (dup).
    file: Option<File>,
    /// Our side of the stdin stream connection (to wake the pump on CloseStdin).
    conn: Option<UnixStream>,
    tty: bool,
}

struct Proc {
    pid: i32,
    container: String,
    exec_id: Option<String>,
    start: Mutex<Option<File>>,
    started: AtomicBool,
    exited: AtomicBool,
    stdin: Arc<Mutex<StdinSink>>,
    pty_master: Option<File>,
    /// Final status once exited and drained.
    done: Mutex<Option<i32>>,
    cv: Condvar,
}

impl Proc {
    fn wait_done(&self) -> i32 {
        let mut d = lock(&self.done);
        loop {
            if let Some(s) = *d {
                return s;
            }
            d = self.cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn status(&self) -> Option<i32> {
        *lock(&self.done)
    }

    fn close_stdin(&self) {
        let mut s = lock(&self.stdin);
        if let Some(c) = s.conn.take() {
            let _ = c.shutdown(Shutdown::Read);
        }
        close_sink(&mut s);
    }
}

fn close_sink(s: &mut StdinSink) {
    if let Some(mut f) = s.file.take() {
        if s.tty {
            // A terminal has no half-close: send the EOF character (^D) instead.
            let _ = f.write_all(&[4]);
        }
    }
}

/// Reports OOM kills in a container's cgroup: [`OomWatch::check`] compares the `oom_kill`
/// count of `memory.events` with the last one reported and sends [`Event::Oom`] when it rose.
/// A thread checks whenever the kernel marks the file modified (inotify), and a process's
/// exit path checks once more before its `Exit`, so the OOM event always comes first.
struct OomWatch {
    id: String,
    events: PathBuf,
    seen: Mutex<u64>,
    out: Outbox,
    stop: AtomicBool,
}

/// The `oom_kill` counter of a cgroup v2 `memory.events` file.
fn oom_kills(events: &Path) -> Option<u64> {
    std::fs::read_to_string(events)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

impl OomWatch {
    fn new(id: &str, cgroup: &Path, out: &Outbox) -> Arc<Self> {
        let events = cgroup.join("memory.events");
        Arc::new(Self {
            id: id.to_string(),
            seen: Mutex::new(oom_kills(&events).unwrap_or(0)),
            events,
            out: out.clone(),
            stop: AtomicBool::new(false),
        })
    }

    fn check(&self) {
        let Some(n) = oom_kills(&self.events) else {
            return;
        };
        let mut seen = lock(&self.seen);
        if n > *seen {
            *seen = n;
            self.out.event(Event::Oom {
                id: self.id.clone(),
            });
        }
    }

    /// Watches until the container is deleted (or its cgroup is gone).
    fn start(self: &Arc<Self>) {
        let w = self.clone();
        std::thread::spawn(move || {
            let inotify = sys::FileWatch::new(&w.events).ok();
            while !w.stop.load(Ordering::SeqCst) && w.events.exists() {
                match &inotify {
                    Some(i) => {
                        let _ = i.wait(1000);
                    }
                    None => std::thread::sleep(std::time::Duration::from_secs(1)),
                }
                w.check();
            }
        });
    }
}

/// The cgroup v2 files and values that apply `r` (memory, pids, cpu), as runc writes them.
fn resource_writes(r: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut writes: Vec<(&'static str, String)> = Vec::new();
    if let Some(m) = r.memory().as_ref().and_then(|m| m.limit()) {
        writes.push((
            "memory.max",
            if m < 0 { "max".into() } else { m.to_string() },
        ));
    }
    if let Some(p) = r.pids().as_ref().map(|p| p.limit()) {
        writes.push((
            "pids.max",
            if p <= 0 { "max".into() } else { p.to_string() },
        ));
    }
    if let Some(cpu) = r.cpu() {
        let period = cpu.period().unwrap_or(100_000);
        match cpu.quota() {
            Some(q) if q > 0 => writes.push(("cpu.max", format!("{q} {period}"))),
            Some(_) => writes.push(("cpu.max", format!("max {period}"))),
            None => {}
        }
        if let Some(shares) = cpu.shares().filter(|&s| s >= 2) {
            let weight = 1 + ((shares.min(262_144) - 2) * 9999) / 262_142;
            writes.push(("cpu.weight", weight.to_string()));
        }
    }
    writes
}

struct Container {
    init: Arc<Proc>,
    execs: HashMap<String, Arc<Proc>>,
    cgroup: Option<PathBuf>,
    oom: Option<Arc<OomWatch>>,
    /// `/proc/<init>/ns/pid` link text when the container has its own PID namespace.
    pidns: Option<String>,
}

/// The agent: implements [`Handler`] for [`skiff_protocol::serve`].
pub struct Agent {
    dialer: Box<dyn Dialer>,
    config: Config,
    reaper: Arc<Reaper>,
    containers: Mutex<HashMap<String, Container>>,
    waiters: Arc<AtomicUsize>,
    /// The network the host configured (`ConfigureNetwork`), for containers created later.
    network: Mutex<Option<Arc<net::Plan>>>,
    /// The cgroup root exists and its controllers are enabled.
    cgroup_root_ready: AtomicBool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

/// Where a request's time went: named steps with their durations in microseconds (reported
/// to the host in [`Response::Created`]; a container's child sends its own as
/// [`Steps::words`] after its "OK").
pub(crate) struct Steps {
    last: std::time::Instant,
    list: Vec<(String, u64)>,
}

impl Steps {
    pub(crate) fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
            list: Vec::new(),
        }
    }

    /// Ends the step `name` now.
    pub(crate) fn done(&mut self, name: &str) {
        let now = std::time::Instant::now();
        self.list
            .push((name.to_string(), (now - self.last).as_micros() as u64));
        self.last = now;
    }

    /// The steps as ` name=micros` words (what [`Steps::child`] reads).
    pub(crate) fn words(&self) -> String {
        self.list
            .iter()
            .map(|(n, us)| format!(" {n}={us}"))
            .collect()
    }

    /// Adds the child's own steps (`name=micros` words after its `OK`).
    fn child(&mut self, words: &str) {
        for w in words.split_ascii_whitespace().take(16) {
            if let Some((k, v)) = w.split_once('=').filter(|(k, _)| !k.is_empty()) {
                if let Ok(v) = v.parse() {
                    self.list.push((format!("child {k}"), v));
                }
            }
        }
    }
}

fn err(code: i32, msg: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, msg)
}

type Reply = Result<Response, ErrorReply>;

impl Agent {
    pub fn new(dialer: Box<dyn Dialer>, config: Config) -> Self {
        Self {
            dialer,
            reaper: Reaper::new(config.reap_all),
            config,
            containers: Mutex::new(HashMap::new()),
            waiters: Arc::new(AtomicUsize::new(0)),
            network: Mutex::new(None),
            cgroup_root_ready: AtomicBool::new(false),
        }
    }

    /// `ConfigureNetwork`: checks the whole configuration, applies it over rtnetlink, writes
    /// the files, and remembers it for containers created from now on.
    fn configure_network(&self, cfg: &NetworkConfig) -> Reply {
        let ne = |e: net::Error| err(e.errno(), e.to_string());
        let plan = net::plan(cfg).map_err(ne)?;
        net::apply(&plan).map_err(ne)?;
        net::Files::new(&plan, plan.hostname.as_deref())
            .write(&self.config.net_dir)
            .map_err(ne)?;
        *lock(&self.network) = Some(Arc::new(plan));
        Ok(Response::Ok)
    }

    /// The directory of a container's own network files.
    fn net_files_dir(&self, id: &str) -> PathBuf {
        self.config.net_dir.join("containers").join(id)
    }

    /// With a configured network: the container's `resolv.conf`, `hosts` and `hostname`
    /// (host name from the spec, else from the network configuration) written to its own
    /// directory and added as bind mounts; the spec's host name, when it has none, is the
    /// configuration's.
    fn add_network_files(
        &self,
        id: &str,
        plan: &net::Plan,
        rplan: &mut RootPlan,
    ) -> Result<(), ErrorReply> {
        if rplan.hostname.is_none() {
            rplan.hostname = plan.hostname.clone();
        }
        let hostname = rplan.hostname.as_deref().filter(|h| {
            let ok = net::valid_hostname(h);
            if !ok {
                eprintln!(
                    "SKIFF-AGENT: container {id}: host name {h:?} left out of /etc/hosts and \
                     /etc/hostname (not a valid host name)"
                );
            }
            ok
        });
        let files = net::Files::new(plan, hostname)
            .write(&self.net_files_dir(id))
            .map_err(|e| err(e.errno(), e.to_string()))?;
        container::add_file_binds(rplan, &files);
        Ok(())
    }

    fn find(&self, id: &str, exec_id: Option<&str>) -> Result<Arc<Proc>, ErrorReply> {
        let cs = lock(&self.containers);
        let c = cs
            .get(id)
            .ok_or_else(|| err(libc::ENOENT, format!("container {id} not found")))?;
        match exec_id.filter(|e| !e.is_empty()) {
            None => Ok(c.init.clone()),
            Some(e) => c
                .execs
                .get(e)
                .cloned()
                .ok_or_else(|| err(libc::ENOENT, format!("exec {e} not found in {id}"))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        id: &str,
        spec: &OciSpec,
        rootfs: &str,
        terminal: bool,
        stdio: Stdio,
        check_entrypoint: bool,
        out: &Outbox,
    ) -> Reply {
        if lock(&self.containers).contains_key(id) {
            return Err(err(libc::EEXIST, format!("container {id} already exists")));
        }
        let rootfs = Path::new(rootfs);
        if !rootfs.is_dir() {
            return Err(err(
                libc::ENOENT,
                format!("rootfs {} is not a directory", rootfs.display()),
            ));
        }
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| err(libc::EINVAL, "spec has no process"))?;
        let mut steps = Steps::new();
        let mut pplan = container::proc_plan(process, terminal).map_err(ErrorReply::from)?;
        pplan.check_entrypoint = check_entrypoint;
        let network = lock(&self.network).clone();
        let mut rplan =
            container::root_plan(spec, rootfs, network.is_some()).map_err(ErrorReply::from)?;
        if let Some(plan) = &network {
            if let Err(e) = self.add_network_files(id, plan, &mut rplan) {
                let _ = std::fs::remove_dir_all(self.net_files_dir(id));
                return Err(e);
            }
        }
        steps.done("plan");
        let cgroup = match self.make_cgroup(id, spec) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.net_files_dir(id));
                return Err(e);
            }
        };
        rplan.cgroup = cgroup.clone();
        let pidns = if rplan.new_pid_ns {
            sys::PidNs::New
        } else {
            sys::PidNs::Inherit
        };
        steps.done("cgroup");
        let oom = cgroup.as_ref().map(|cg| OomWatch::new(id, cg, out));
        let spawned = self.spawn(
            id,
            None,
            Some(&rplan),
            &pplan,
            stdio,
            pidns,
            vec![],
            out,
            oom.clone(),
            &mut steps,
        );
        let proc_ = match spawned {
            Ok(p) => p,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = std::fs::remove_dir(cg);
                }
                let _ = std::fs::remove_dir_all(self.net_files_dir(id));
                return Err(e);
            }
        };
        if let Some(cg) = &cgroup {
            if let Err(e) = std::fs::write(cg.join("cgroup.procs"), proc_.pid.to_string()) {
                let _ = sys::kill(proc_.pid, libc::SIGKILL);
                let _ = std::fs::remove_dir(cg);
                let _ = std::fs::remove_dir_all(self.net_files_dir(id));
                return Err(err(libc::EIO, format!("joining cgroup: {e}")));
            }
        }
        let pidns = rplan.new_pid_ns.then(|| {
            std::fs::read_link(format!("/proc/{}/ns/pid", proc_.pid))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let pid = proc_.pid as u32;
        lock(&self.containers).insert(
            id.to_string(),
            Container {
                init: proc_,
                execs: HashMap::new(),
                cgroup,
                oom: oom.clone(),
                pidns,
            },
        );
        if let Some(o) = &oom {
            o.start();
        }
        steps.done("register");
        Ok(Response::Created {
            pid,
            steps: steps.list,
        })
    }

    fn make_cgroup(&self, id: &str, spec: &OciSpec) -> Result<Option<PathBuf>, ErrorReply> {
        let Some(root) = &self.config.cgroup_root else {
            return Ok(None);
        };
        let io_err = |what: &str, e: io::Error| err(libc::EIO, format!("cgroup {what}: {e}"));
        // The controllers are enabled once per agent (each write is a cgroup-wide change).
        if !self.cgroup_root_ready.load(Ordering::SeqCst) {
            if let Some(parent) = root.parent() {
                for c in ["+memory", "+pids", "+cpu"] {
                    let _ = std::fs::write(parent.join("cgroup.subtree_control"), c);
                }
            }
            std::fs::create_dir_all(root).map_err(|e| io_err("root", e))?;
            for c in ["+memory", "+pids", "+cpu"] {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), c);
            }
            self.cgroup_root_ready.store(true, Ordering::SeqCst);
        }
        let cg = root.join(id);
        std::fs::create_dir_all(&cg).map_err(|e| io_err("create", e))?;
        let writes = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .map(resource_writes)
            .unwrap_or_default();
        for (file, value) in writes {
            if let Err(e) = std::fs::write(cg.join(file), &value) {
                let _ = std::fs::remove_dir(&cg);
                return Err(io_err(&format!("{file}={value}"), e));
            }
        }
        Ok(Some(cg))
    }

    /// Dials the streams, forks the process (waiting in the child for Start), starts pumps
    /// and the supervisor.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        id: &str,
        exec_id: Option<&str>,
        root: Option<&RootPlan>,
        pplan: &ProcPlan,
        stdio: Stdio,
        pidns: sys::PidNs,
        join: Vec<(OwnedFd, libc::c_int)>,
        out: &Outbox,
        oom: Option<Arc<OomWatch>>,
        steps: &mut Steps,
    ) -> Result<Arc<Proc>, ErrorReply> {
        let eid = exec_id.unwrap_or("");
        let dial = |kind| -> Result<UnixStream, ErrorReply> {
            let mut c = self.dialer.dial(STREAM_PORT).map_err(|e| {
                err(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("dialing the host for {}: {e}", kind_name(kind)),
                )
            })?;
            StreamHeader::new(id, eid, kind)
                .write_to(&mut c)
                .map_err(ErrorReply::from)?;
            Ok(c)
        };
        let ioe = ErrorReply::from;
        // stdin
        let (stdin_child, stdin_conn, stdin_file): (OwnedFd, Option<UnixStream>, Option<File>);
        let mut outputs: Vec<(File, UnixStream, bool)> = Vec::new();
        let (stdout_child, stderr_child, pty_master);
        if pplan.terminal {
            let (master, slave) = sys::open_pty().map_err(ioe)?;
            if let Some((rows, cols)) = pplan.console_size {
                sys::set_winsize(master.as_raw_fd(), rows, cols).map_err(ioe)?;
            }
            let conn = dial(StreamKind::Pty)?;
            let master_read = master.try_clone().map_err(ioe)?;
            outputs.push((master_read, conn, true));
            let slave: OwnedFd = slave.into();
            stdout_child = slave.try_clone().map_err(ioe)?;
            stderr_child = slave.try_clone().map_err(ioe)?;
            if stdio.stdin {
                stdin_conn = Some(dial(StreamKind::Stdin)?);
                stdin_file = Some(master.try_clone().map_err(ioe)?);
            } else {
                stdin_conn = None;
                stdin_file = None;
            }
            stdin_child = slave;
            pty_master = Some(master);
        } else {
            if stdio.stdin {
                let (r, w) = sys::pipe().map_err(ioe)?;
                stdin_conn = Some(dial(StreamKind::Stdin)?);
                stdin_file = Some(w);
                stdin_child = r.into();
            } else {
                stdin_conn = None;
                stdin_file = None;
                stdin_child = File::open("/dev/null").map_err(ioe)?.into();
            }
            let (r1, w1) = sys::pipe().map_err(ioe)?;
            let (r2, w2) = sys::pipe().map_err(ioe)?;
            // Both streams dialed at once: each dial is a round trip to the host.
            let (out_conn, err_conn) = std::thread::scope(|sc| {
                let e = sc.spawn(|| dial(StreamKind::Stderr));
                let o = dial(StreamKind::Stdout);
                let e = e.join().unwrap_or_else(|_| {
                    Err(err(
                        libc::EIO,
                        "dialing the host for stderr: thread panicked",
                    ))
                });
                (o, e)
            });
            outputs.push((r1, out_conn?, false));
            outputs.push((r2, err_conn?, false));
            stdout_child = w1.into();
            stderr_child = w2.into();
            pty_master = None;
        }
        steps.done("streams");
        let (mut ready_r, ready_w) = sys::pipe().map_err(ioe)?;
        let (start_r, start_w) = sys::pipe().map_err(ioe)?;
        let fds = ChildFds {
            stdin: stdin_child,
            stdout: stdout_child,
            stderr: stderr_child,
            ready: ready_w,
            start: start_r,
            join,
        };
        let root_c = root.cloned();
        let pplan_c = pplan.clone();
        let pid = sys::fork_child(pidns, move || {
            container::child_main(root_c.as_ref(), &pplan_c, fds)
        })
        .map_err(ioe)?;
        // Our copies of the child's ends were moved into the closure and dropped with it.
        steps.done("fork");
        let status_rx = self.reaper.watch(pid);
        let mut msg = Vec::new();
        let _ = (&mut ready_r).take(4096).read_to_end(&mut msg);
        steps.done("child setup");
        if let Some(words) = msg.strip_prefix(b"OK") {
            steps.child(&String::from_utf8_lossy(words));
        } else {
            drop(start_w);
            let _ = status_rx.recv();
            let text = String::from_utf8_lossy(&msg).into_owned();
            let (code, text) = match text.strip_prefix('E').and_then(|t| t.split_once(' ')) {
                Some((c, t)) => (c.parse().unwrap_or(libc::EIO), t.to_string()),
                None => (libc::EIO, "container setup failed".to_string()),
            };
            return Err(err(code, format!("container setup: {text}")));
        }
        let stdin = Arc::new(Mutex::new(StdinSink {
            file: stdin_file,
            conn: stdin_conn.as_ref().and_then(|c| c.try_clone().ok()),
            tty: pplan.terminal,
        }));
        if let Some(conn) = stdin_conn {
            let sink = stdin.clone();
            std::thread::spawn(move || stdin_pump(conn, sink));
        }
        let pumps: Vec<JoinHandle<()>> = outputs
            .into_iter()
            .map(|(src, conn, tty)| std::thread::spawn(move || output_pump(src, conn, tty)))
            .collect();
        let proc_ = Arc::new(Proc {
            pid,
            container: id.to_string(),
            exec_id: exec_id.map(str::to_string),
            start: Mutex::new(Some(start_w)),
            started: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            stdin,
            pty_master,
            done: Mutex::new(None),
            cv: Condvar::new(),
        });
        let p2 = proc_.clone();
        let out = out.clone();
        std::thread::spawn(move || {
            let raw = status_rx.recv().unwrap_or(libc::SIGKILL);
            p2.exited.store(true, Ordering::SeqCst);
            // The exit status goes out only after every output stream is drained and shut.
            for h in pumps {
                let _ = h.join();
            }
            lock(&p2.stdin).file.take();
            if let Some(o) = &oom {
                o.check();
            }
            let status = skiff_protocol::exit_status_from_wait(raw);
            *lock(&p2.done) = Some(status);
            p2.cv.notify_all();
            out.event(Event::Exit {
                id: p2.container.clone(),
                exec_id: p2.exec_id.clone(),
                pid: p2.pid as u32,
                status,
            });
        });
        Ok(proc_)
    }

    fn start(&self, id: &str, exec_id: Option<&str>) -> Reply {
        let p = self.find(id, exec_id)?;
        let w = lock(&p.start).take();
        match w {
            Some(mut w) => {
                w.write_all(b"S")
                    .map_err(|e| err(libc::ESRCH, format!("process {} is gone: {e}", p.pid)))?;
                p.started.store(true, Ordering::SeqCst);
                Ok(Response::Started { pid: p.pid as u32 })
            }
            None => Err(err(libc::EALREADY, "already started")),
        }
    }

    fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &skiff_protocol::OciProcess,
        stdio: Stdio,
        out: &Outbox,
    ) -> Reply {
        let (init, oom) = {
            let cs = lock(&self.containers);
            let c = cs
                .get(id)
                .ok_or_else(|| err(libc::ENOENT, format!("container {id} not found")))?;
            if c.execs.contains_key(exec_id) {
                return Err(err(libc::EEXIST, format!("exec {exec_id} already exists")));
            }
            (c.init.clone(), c.oom.clone())
        };
        if init.exited.load(Ordering::SeqCst) || !init.started.load(Ordering::SeqCst) {
            return Err(err(libc::ESRCH, format!("container {id} is not running")));
        }
        let pplan = container::proc_plan(process, false).map_err(ErrorReply::from)?;
        let ns = |name: &str| -> io::Result<OwnedFd> {
            Ok(File::open(format!("/proc/{}/ns/{name}", init.pid))?.into())
        };
        let mut join = Vec::new();
        for (name, ty) in [
            ("ipc", libc::CLONE_NEWIPC),
            ("uts", libc::CLONE_NEWUTS),
            ("net", libc::CLONE_NEWNET),
            ("cgroup", libc::CLONE_NEWCGROUP),
            ("mnt", libc::CLONE_NEWNS),
        ] {
            let same = std::fs::read_link(format!("/proc/self/ns/{name}")).ok()
                == std::fs::read_link(format!("/proc/{}/ns/{name}", init.pid)).ok();
            if !same {
                join.push((ns(name).map_err(ErrorReply::from)?, ty));
            }
        }
        let pidns = sys::PidNs::Join(ns("pid").map_err(ErrorReply::from)?);
        let proc_ = self.spawn(
            id,
            Some(exec_id),
            None,
            &pplan,
            stdio,
            pidns,
            join,
            out,
            oom,
            &mut Steps::new(),
        )?;
        let cg = lock(&self.containers)
            .get(id)
            .and_then(|c| c.cgroup.clone());
        if let Some(cg) = cg {
            let _ = std::fs::write(cg.join("cgroup.procs"), proc_.pid.to_string());
        }
        let pid = proc_.pid as u32;
        match lock(&self.containers).get_mut(id) {
            Some(c) => {
                c.execs.insert(exec_id.to_string(), proc_);
            }
            None => {
                let _ = sys::kill(proc_.pid, libc::SIGKILL);
                return Err(err(libc::ENOENT, "container deleted meanwhile"));
            }
        }
        Ok(Response::Created { pid, steps: vec![] })
    }

    fn pids_of(&self, id: &str) -> Result<Vec<u32>, ErrorReply> {
        let cs = lock(&self.containers);
        let c = cs
            .get(id)
            .ok_or_else(|| err(libc::ENOENT, format!("container {id} not found")))?;
        if let Some(cg) = &c.cgroup {
            if let Ok(s) = std::fs::read_to_string(cg.join("cgroup.procs")) {
                return Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect());
            }
        }
        let mut own: Vec<u32> = std::iter::once(&c.init)
            .chain(c.execs.values())
            .filter(|p| !p.exited.load(Ordering::SeqCst))
            .map(|p| p.pid as u32)
            .collect();
        if let Some(ns) = c.pidns.as_ref().filter(|n| !n.is_empty()) {
            if !c.init.exited.load(Ordering::SeqCst) {
                for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let link = std::fs::read_link(e.path().join("ns/pid")).ok();
                    if link.is_some_and(|l| l.to_string_lossy() == ns.as_str())
                        && !own.contains(&pid)
                    {
                        own.push(pid);
                    }
                }
            }
        }
        own.sort_unstable();
        Ok(own)
    }

    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Reply {
        if !(1..=64).contains(&signal) {
            return Err(err(libc::EINVAL, format!("bad signal {signal}")));
        }
        if all {
            for pid in self.pids_of(id)? {
                let _ = sys::kill(pid as i32, signal);
            }
            return Ok(Response::Ok);
        }
        let p = self.find(id, exec_id)?;
        if p.exited.load(Ordering::SeqCst) {
            return Err(err(libc::ESRCH, "process already exited"));
        }
        sys::kill(p.pid, signal).map_err(ErrorReply::from)?;
        Ok(Response::Ok)
    }

    fn delete(&self, id: &str, exec_id: Option<&str>) -> Reply {
        let p = self.find(id, exec_id)?;
        if p.status().is_none() {
            if p.started.load(Ordering::SeqCst) {
                return Err(err(libc::EBUSY, "process is still running"));
            }
            // Created but never started: kill it and let it drain.
            let _ = sys::kill(p.pid, libc::SIGKILL);
            lock(&p.start).take();
            p.wait_done();
        }
        let mut cs = lock(&self.containers);
        match exec_id.filter(|e| !e.is_empty()) {
            Some(e) => {
                if let Some(c) = cs.get_mut(id) {
                    c.execs.remove(e);
                }
            }
            None => {
                if let Some(c) = cs.remove(id) {
                    let _ = std::fs::remove_dir_all(self.net_files_dir(id));
                    if let Some(o) = &c.oom {
                        o.stop.store(true, Ordering::SeqCst);
                    }
                    if let Some(cg) = c.cgroup {
                        for _ in 0..50 {
                            if std::fs::remove_dir(&cg).is_ok() {
                                break;
                            }
                            if let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
                                for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                                    let _ = sys::kill(pid, libc::SIGKILL);
                                }
                            }
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                    }
                }
            }
        }
        Ok(Response::Ok)
    }

    /// New cgroup limits for a running container (`runc update`).
    fn update(&self, id: &str, resources: &LinuxResources) -> Reply {
        let cg = {
            let cs = lock(&self.containers);
            let c = cs
                .get(id)
                .ok_or_else(|| err(libc::ENOENT, format!("container {id} not found")))?;
            if c.init.status().is_some() {
                return Err(err(libc::ESRCH, format!("container {id} is not running")));
            }
            c.cgroup.clone()
        };
        let Some(cg) = cg else {
            return Err(err(
                libc::EOPNOTSUPP,
                "resource update needs cgroup v2 in the guest, which this guest lacks",
            ));
        };
        for (file, value) in resource_writes(resources) {
            std::fs::write(cg.join(file), &value).map_err(|e| {
                err(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cgroup {file}={value}: {e}"),
                )
            })?;
        }
        Ok(Response::Ok)
    }

    fn stats(&self, id: &str) -> Reply {
        let cg = {
            let cs = lock(&self.containers);
            let c = cs
                .get(id)
                .ok_or_else(|| err(libc::ENOENT, format!("container {id} not found")))?;
            c.cgroup.clone()
        };
        let Some(cg) = cg else {
            return Ok(Response::Stats(Stats::default()));
        };
        let num = |f: &str| -> Option<u64> {
            std::fs::read_to_string(cg.join(f))
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        let cpu = std::fs::read_to_string(cg.join("cpu.stat")).unwrap_or_default();
        let key = |k: &str| -> Option<u64> {
            cpu.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
        };
        Ok(Response::Stats(Stats {
            memory_current: num("memory.current"),
            memory_max: num("memory.max"),
            pids_current: num("pids.current"),
            pids_max: num("pids.max"),
            cpu_usage_usec: key("usage_usec"),
            cpu_user_usec: key("user_usec"),
            cpu_system_usec: key("system_usec"),
        }))
    }
}

fn kind_name(k: StreamKind) -> &'static str {
    k.as_str()
}

/// Copies process output to its stream until EOF (pipe: all writers closed; pty: EIO once
/// the slave side is gone), then half-closes the stream.
fn output_pump(mut src: File, mut conn: UnixStream, tty: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    // The host stopped reading: keep draining so the process never blocks.
                    while matches!(src.read(&mut buf), Ok(n) if n > 0) {}
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if tty && e.raw_os_error() == Some(libc::EIO) => break,
            Err(_) => break,
        }
    }
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Write);
}

/// Copies the stdin stream into the process until the host half-closes it.
fn stdin_pump(mut conn: UnixStream, sink: Arc<Mutex<StdinSink>>) {
    let mut buf = vec![0u8; 64 * 1024];
    // The file is cloned out so a blocked write never holds the lock CloseStdin needs.
    let file = lock(&sink).file.as_ref().and_then(|f| f.try_clone().ok());
    let Some(mut file) = file else { return };
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if lock(&sink).file.is_none() || file.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    drop(file);
    close_sink(&mut lock(&sink));
}

impl Handler for Agent {
    /// Flushes every file system before `Shutdown` is answered: the host may then stop the VM
    /// at once instead of waiting for the guest to reboot.
    fn before_shutdown(&self) {
        crate::sys::sync();
    }

    fn handle(&self, request: Request, reply: Replier) {
        let out = reply.outbox().clone();
        let r = match request {
            Request::CreateContainer {
                id,
                spec,
                rootfs,
                terminal,
                stdio,
                check_entrypoint,
            } => self.create(&id, &spec, &rootfs, terminal, stdio, check_entrypoint, &out),
            Request::Start { id, exec_id } => self.start(&id, exec_id.as_deref()),
            Request::Exec {
                container,
                exec_id,
                process,
                stdio,
            } => self.exec(&container, &exec_id, &process, stdio, &out),
            Request::Signal {
                id,
                exec_id,
                signal,
                all,
            } => self.signal(&id, exec_id.as_deref(), signal, all),
            Request::ResizePty {
                id,
                exec_id,
                rows,
                cols,
            } => self.find(&id, exec_id.as_deref()).and_then(|p| {
                let m = p
                    .pty_master
                    .as_ref()
                    .ok_or_else(|| err(libc::ENOTTY, "process has no terminal"))?;
                sys::set_winsize(m.as_raw_fd(), rows, cols).map_err(ErrorReply::from)?;
                Ok(Response::Ok)
            }),
            Request::CloseStdin { id, exec_id } => self.find(&id, exec_id.as_deref()).map(|p| {
                p.close_stdin();
                Response::Ok
            }),
            Request::Wait { id, exec_id } => match self.find(&id, exec_id.as_deref()) {
                Ok(p) => {
                    if let Some(s) = p.status() {
                        Ok(Response::Exited { status: s })
                    } else if self.waiters.fetch_add(1, Ordering::SeqCst) >= MAX_WAITERS {
                        self.waiters.fetch_sub(1, Ordering::SeqCst);
                        Err(err(libc::EAGAIN, "too many pending waits"))
                    } else {
                        let waiters = self.waiters.clone();
                        std::thread::spawn(move || {
                            let s = p.wait_done();
                            waiters.fetch_sub(1, Ordering::SeqCst);
                            reply.send(Ok(Response::Exited { status: s }));
                        });
                        return;
                    }
                }
                Err(e) => Err(e),
            },
            Request::Delete { id, exec_id } => self.delete(&id, exec_id.as_deref()),
            Request::Pids { id } => self.pids_of(&id).map(|pids| Response::Pids { pids }),
            Request::Stats { id } => self.stats(&id),
            Request::Update { id, resources } => self.update(&id, &resources),
            Request::MountShare {
                tag,
                target,
                read_only,
            } => mount_share(&tag, &target, read_only),
            Request::ConfigureNetwork(cfg) => self.configure_network(&cfg),
            Request::Reseed {
                entropy,
                unix_time_ns,
            } => reseed(&entropy, unix_time_ns),
            Request::Shutdown => Ok(Response::Ok),
        };
        reply.send(r);
    }
}

/// `Reseed`: fresh entropy into the CRNG, the wall clock set to the host's.
fn reseed(entropy: &[u8], unix_time_ns: u64) -> Result<Response, ErrorReply> {
    let code = |e: &std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    crate::sys::add_entropy_and_reseed(entropy)
        .map_err(|e| err(code(&e), format!("reseeding the random generator: {e}")))?;
    crate::sys::set_realtime(unix_time_ns)
        .map_err(|e| err(code(&e), format!("setting the clock: {e}")))?;
    Ok(Response::Ok)
}

/// Mounts virtio-fs share `tag` at `target` (created if missing).
fn mount_share(tag: &str, target: &str, read_only: bool) -> Result<Response, ErrorReply> {
    let t = std::path::Path::new(target);
    if !t.is_absolute() {
        return Err(err(
            libc::EINVAL,
            format!("share target {target:?} is not absolute"),
        ));
    }
    std::fs::create_dir_all(t).map_err(|e| {
        err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{target}: {e}"),
        )
    })?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    sys::mount_full(Some(tag), t, Some("virtiofs"), flags, None).map_err(|e| {
        err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("virtio-fs share {tag:?}: {e}"),
        )
    })?;
    raise_readahead(t);
    Ok(Response::Ok)
}

/// Read-ahead window for virtio-fs mounts, in KiB. The kernel starts a FUSE mount at 128 KiB
/// (INIT cannot raise it); 1 MiB lets sequential reads go out as 1 MiB requests (the
/// `max_pages` Skiff's server grants), an eighth of the round trips.
const VIRTIOFS_READAHEAD_KB: u32 = 1024;

/// Sets the read-ahead of the filesystem mounted at `target` (its backing device info, named
/// by the mount's anonymous device number) to [`VIRTIOFS_READAHEAD_KB`]. Best effort: a guest
/// without sysfs keeps the default.
fn raise_readahead(target: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(target) else {
        return;
    };
    let dev = md.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, VIRTIOFS_READAHEAD_KB.to_string()) {
        eprintln!("SKIFF-AGENT: {knob}: {e} (keeping the default read-ahead)");
    }
}

/// How a control connection ended, and whether the host sent any request on it.
#[derive(Debug)]
pub struct Served {
    /// What [`skiff_protocol::serve`] returned.
    pub end: Result<skiff_protocol::ServeEnd, skiff_protocol::FrameError>,
    /// Whether at least one request arrived.
    pub any_request: bool,
}

/// Like [`serve_connection`], also telling whether the host sent any request: a VM restored
/// from a template re-dials when its first connection dies before the host used it.
pub fn serve_connection_tracked(
    conn: UnixStream,
    dialer: Box<dyn Dialer>,
    config: Config,
    boot_stamps: Vec<(String, u64)>,
) -> Served {
    struct Tracking<'a> {
        inner: &'a Agent,
        seen: std::sync::atomic::AtomicBool,
    }
    impl Handler for Tracking<'_> {
        fn handle(&self, request: Request, reply: skiff_protocol::Replier) {
            self.seen.store(true, std::sync::atomic::Ordering::SeqCst);
            self.inner.handle(request, reply);
        }
    }
    let agent = Agent::new(dialer, config);
    let t = Tracking {
        inner: &agent,
        seen: false.into(),
    };
    let end = match conn.try_clone() {
        Ok(w) => skiff_protocol::serve(conn, w, hello(boot_stamps), &t),
        Err(e) => Err(e.into()),
    };
    Served {
        end,
        any_request: t.seen.load(std::sync::atomic::Ordering::SeqCst),
    }
}

/// Serves one control connection (already dialed) until the host sends Shutdown or closes it.
pub fn serve_connection(
    conn: UnixStream,
    dialer: Box<dyn Dialer>,
    config: Config,
    boot_stamps: Vec<(String, u64)>,
) -> Result<skiff_protocol::ServeEnd, skiff_protocol::FrameError> {
    let agent = Agent::new(dialer, config);
    let w = conn.try_clone()?;
    skiff_protocol::serve(conn, w, hello(boot_stamps), &agent)
}

#[cfg(test)]
mod tests {
    use super::Steps;

    #[test]
    fn child_steps_are_parsed_and_bounded() {
        let mut s = Steps::new();
        s.done("fork");
        s.child(" fds=12 unshare=300 junk =5 mounts=x pivot=7");
        let names: Vec<&str> = s.list.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["fork", "child fds", "child unshare", "child pivot"]);
        assert_eq!(s.list[2].1, 300);
        let mut s = Steps::new();
        s.child(&"a=1 ".repeat(1000));
        assert_eq!(s.list.len(), 16);
        // What a child writes is what the agent reads.
        let mut c = Steps::new();
        c.done("unshare");
        c.done("mounts");
        let mut s = Steps::new();
        s.child(&c.words());
        let names: Vec<&str> = s.list.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["child unshare", "child mounts"]);
    }
}
