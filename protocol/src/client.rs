//! Blocking host-side client: request/response with ids over the control connection.
//!
//! One reader thread demultiplexes responses (by id) and events, so several threads may call
//! the client at once (e.g. one blocked in [`Client::wait`] while another sends a signal).

use crate::{
    read_message, write_message, Event, FrameError, Hello, LinuxResources, Message, NetworkConfig,
    OciProcess, OciSpec, Request, Response, Stats, Stdio, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Client-side errors.
#[derive(Debug)]
pub enum ClientError {
    /// The agent answered with an error.
    Agent(crate::ErrorReply),
    /// Framing or I/O failure on the control connection.
    Frame(FrameError),
    /// The control connection is gone (agent exited, VM ended).
    Disconnected,
    /// No answer within the given time.
    TimedOut,
    /// The agent sent something this client does not understand (e.g. wrong version).
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(e) => write!(f, "agent: {e}"),
            Self::Frame(e) => write!(f, "control connection: {e}"),
            Self::Disconnected => write!(f, "control connection closed"),
            Self::TimedOut => write!(f, "agent did not answer in time"),
            Self::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

/// A stream that can be split into a reader and a writer half (sockets), with timeouts.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn try_clone_duplex(&self) -> io::Result<Self>;
    /// Bounds each blocking read (`None`: no bound). Applies to every clone of the stream.
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds each blocking write (`None`: no bound). Applies to every clone of the stream.
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()>;
}

#[cfg(unix)]
impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone_duplex(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
}

impl Duplex for std::net::TcpStream {
    fn try_clone_duplex(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
}

/// How long the agent may take to send its [`Hello`] once connected.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request frame may take to be written: a guest that stops reading its control
/// connection cannot hold the writer (and every other caller) longer than this. A write that
/// times out leaves the frame cut, so the connection is then treated as closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline of every request but [`Client::wait`] (see [`Client::set_call_timeout`]).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Events buffered for [`Client::take_events`] before newer ones are dropped.
pub const MAX_QUEUED_EVENTS: usize = 4096;

type Pending = HashMap<u64, mpsc::Sender<Result<Response, crate::ErrorReply>>>;

struct Shared {
    pending: Mutex<Option<Pending>>,
}

/// The host's handle on one agent.
pub struct Client<W: Write + Send> {
    writer: Mutex<W>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: Mutex<Option<Receiver<Event>>>,
    call_timeout: Mutex<Duration>,
}

impl<W: Write + Send> fmt::Debug for Client<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl<S: Duplex> Client<S> {
    /// Wraps an accepted control connection: reads the agent's [`Hello`] first, waiting at
    /// most [`HELLO_TIMEOUT`] for it; writes are bounded by [`WRITE_TIMEOUT`].
    pub fn from_stream(stream: S) -> Result<(Self, Hello), ClientError> {
        Self::from_stream_timeout(stream, HELLO_TIMEOUT)
    }

    /// [`Client::from_stream`] with another bound on the wait for [`Hello`].
    pub fn from_stream_timeout(stream: S, hello: Duration) -> Result<(Self, Hello), ClientError> {
        let io = |e| ClientError::Frame(FrameError::Io(e));
        let mut reader = stream.try_clone_duplex().map_err(io)?;
        stream.set_write_deadline(Some(WRITE_TIMEOUT)).map_err(io)?;
        // The read bound applies to the Hello only: the reader thread then waits as long as
        // the agent has nothing to say.
        stream.set_read_deadline(Some(hello)).map_err(io)?;
        let first = read_message(&mut reader);
        stream.set_read_deadline(None).map_err(io)?;
        let first = first.map_err(|e| match e {
            FrameError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::TimedOut
            }
            e => ClientError::Frame(e),
        })?;
        Self::with_hello(first, reader, stream)
    }
}

impl<W: Write + Send> Client<W> {
    /// Builds a client over the two halves of the control connection. Reads the agent's
    /// [`Hello`] (blocking) and checks its protocol version, then starts the reader thread.
    pub fn new<R: Read + Send + 'static>(
        mut reader: R,
        writer: W,
    ) -> Result<(Self, Hello), ClientError> {
        let first = read_message(&mut reader)?;
        Self::with_hello(first, reader, writer)
    }

    fn with_hello<R: Read + Send + 'static>(
        first: Message,
        reader: R,
        writer: W,
    ) -> Result<(Self, Hello), ClientError> {
        let hello = match first {
            Message::Hello(h) => h,
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected Hello, got {other:?}"
                )))
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "agent speaks protocol {}, this host {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
        });
        let (etx, erx) = mpsc::sync_channel(MAX_QUEUED_EVENTS);
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("skiff-agent-client".into())
            .spawn(move || reader_loop(reader, sh, etx))
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
        Ok((
            Self {
                writer: Mutex::new(writer),
                shared,
                next_id: AtomicU64::new(1),
                events: Mutex::new(Some(erx)),
                call_timeout: Mutex::new(CALL_TIMEOUT),
            },
            hello,
        ))
    }

    /// The agent's events (e.g. [`Event::Exit`]). Can be taken once; events arriving while
    /// nobody holds the receiver are buffered.
    pub fn take_events(&self) -> Option<Receiver<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Sends a request and waits for its response, at most the client's call timeout
    /// ([`CALL_TIMEOUT`] unless [`Client::set_call_timeout`] changed it).
    pub fn call(&self, request: Request) -> Result<Response, ClientError> {
        let t = *self.call_timeout.lock().unwrap_or_else(|p| p.into_inner());
        self.call_inner(request, Some(t))
    }

    /// Sends a request and blocks for its response however long it takes (it still ends
    /// when the connection does). Only for requests whose answer legitimately takes as long
    /// as the guest's workload ([`Client::wait`]).
    pub fn call_unbounded(&self, request: Request) -> Result<Response, ClientError> {
        self.call_inner(request, None)
    }

    /// Changes the deadline [`Client::call`] and the request helpers use.
    pub fn set_call_timeout(&self, timeout: Duration) {
        *self.call_timeout.lock().unwrap_or_else(|p| p.into_inner()) = timeout;
    }

    /// Sends a request and waits at most `timeout` for its response.
    pub fn call_timeout(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.call_inner(request, Some(timeout))
    }

    fn call_inner(
        &self,
        request: Request,
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut p = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            p.as_mut().ok_or(ClientError::Disconnected)?.insert(id, tx);
        }
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            write_message(&mut *w, &Message::Request { id, request })
        };
        if let Err(e) = sent {
            // A failed or timed-out write may have cut a frame: nothing more can be sent on
            // this connection, so it counts as closed (every waiting caller is woken).
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            return Err(e.into());
        }
        let got = match timeout {
            None => rx.recv().map_err(|_| ClientError::Disconnected),
            Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => ClientError::TimedOut,
                mpsc::RecvTimeoutError::Disconnected => ClientError::Disconnected,
            }),
        };
        if got.is_err() {
            self.forget(id);
        }
        got?.map_err(ClientError::Agent)
    }

    fn forget(&self, id: u64) {
        if let Some(p) = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            p.remove(&id);
        }
    }

    /// Creates a container; returns its init pid (in the guest). The agent has connected the
    /// process's stdio streams (port 1025) before this returns.
    pub fn create_container(
        &self,
        id: &str,
        spec: OciSpec,
        rootfs: &str,
        terminal: bool,
        stdio: Stdio,
    ) -> Result<u32, ClientError> {
        self.create_container_steps(id, spec, rootfs, terminal, stdio)
            .map(|(pid, _)| pid)
    }

    /// [`Client::create_container`], also returning where the agent's time went (its
    /// `(step, microseconds)` list; empty from an agent that does not report it).
    pub fn create_container_steps(
        &self,
        id: &str,
        spec: OciSpec,
        rootfs: &str,
        terminal: bool,
        stdio: Stdio,
    ) -> Result<(u32, Vec<(String, u64)>), ClientError> {
        self.create_container_opts(id, spec, rootfs, terminal, stdio, false)
    }

    /// [`Client::create_container_steps`]; with `check_entrypoint` a missing program fails
    /// the create, as under runc (see [`Request::CreateContainer`]).
    pub fn create_container_opts(
        &self,
        id: &str,
        spec: OciSpec,
        rootfs: &str,
        terminal: bool,
        stdio: Stdio,
        check_entrypoint: bool,
    ) -> Result<(u32, Vec<(String, u64)>), ClientError> {
        match self.call(Request::CreateContainer {
            id: id.into(),
            spec: Box::new(spec),
            rootfs: rootfs.into(),
            terminal,
            stdio,
            check_entrypoint,
        })? {
            Response::Created { pid, steps } => Ok((pid, steps)),
            other => Err(unexpected(other)),
        }
    }

    /// Starts the init process (`exec_id` None) or an exec; returns its pid.
    pub fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32, ClientError> {
        expect_pid(self.call(Request::Start {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
        })?)
    }

    /// Creates an extra process in a running container; start it with [`Client::start`].
    pub fn exec(
        &self,
        container: &str,
        exec_id: &str,
        process: OciProcess,
        stdio: Stdio,
    ) -> Result<u32, ClientError> {
        expect_pid(self.call(Request::Exec {
            container: container.into(),
            exec_id: exec_id.into(),
            process: Box::new(process),
            stdio,
        })?)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        expect_ok(self.call(Request::Signal {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
            signal,
            all,
        })?)
    }

    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), ClientError> {
        expect_ok(self.call(Request::ResizePty {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
            rows,
            cols,
        })?)
    }

    pub fn close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<(), ClientError> {
        expect_ok(self.call(Request::CloseStdin {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
        })?)
    }

    /// Blocks until the process has exited and its output streams are drained; returns the
    /// exit status (code, or 128 + signal).
    /// Not bounded in time (a process may run for ever); it ends when the VM does.
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<i32, ClientError> {
        match self.call_unbounded(Request::Wait {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
        })? {
            Response::Exited { status } => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    pub fn delete(&self, id: &str, exec_id: Option<&str>) -> Result<(), ClientError> {
        expect_ok(self.call(Request::Delete {
            id: id.into(),
            exec_id: exec_id.map(Into::into),
        })?)
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>, ClientError> {
        match self.call(Request::Pids { id: id.into() })? {
            Response::Pids { pids } => Ok(pids),
            other => Err(unexpected(other)),
        }
    }

    pub fn stats(&self, id: &str) -> Result<Stats, ClientError> {
        match self.call(Request::Stats { id: id.into() })? {
            Response::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// New cgroup limits for a running container (`Request::Update`).
    pub fn update(&self, id: &str, resources: LinuxResources) -> Result<(), ClientError> {
        expect_ok(self.call(Request::Update {
            id: id.into(),
            resources: Box::new(resources),
        })?)
    }

    /// Mounts the virtio-fs share `tag` at `target` in the guest.
    pub fn mount_share(&self, tag: &str, target: &str, read_only: bool) -> Result<(), ClientError> {
        expect_ok(self.call(Request::MountShare {
            tag: tag.into(),
            target: target.into(),
            read_only,
        })?)
    }

    /// Configures the guest's network (interfaces, routes, and the `resolv.conf`, `hosts`
    /// and `hostname` files of containers created afterwards).
    pub fn configure_network(&self, config: &NetworkConfig) -> Result<(), ClientError> {
        expect_ok(self.call(Request::ConfigureNetwork(config.clone()))?)
    }

    /// Reseeds the guest's random generator with `entropy` and sets its clock
    /// ([`Request::Reseed`]): the first call to a VM restored from a snapshot.
    pub fn reseed(&self, entropy: &[u8], unix_time_ns: u64) -> Result<(), ClientError> {
        expect_ok(self.call(Request::Reseed {
            entropy: entropy.to_vec(),
            unix_time_ns,
        })?)
    }

    /// Asks the agent to power the VM off (it answers first).
    pub fn shutdown(&self) -> Result<(), ClientError> {
        expect_ok(self.call(Request::Shutdown)?)
    }

    /// [`Client::shutdown`] waiting at most `timeout` for the answer.
    pub fn shutdown_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        expect_ok(self.call_timeout(Request::Shutdown, timeout)?)
    }
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

fn expect_pid(r: Response) -> Result<u32, ClientError> {
    match r {
        Response::Created { pid, .. } | Response::Started { pid } => Ok(pid),
        other => Err(unexpected(other)),
    }
}

fn expect_ok(r: Response) -> Result<(), ClientError> {
    match r {
        Response::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn reader_loop<R: Read>(mut reader: R, shared: Arc<Shared>, events: SyncSender<Event>) {
    loop {
        match read_message(&mut reader) {
            Ok(Message::Response { id, result }) => {
                let tx = shared
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .and_then(|p| p.remove(&id));
                if let Some(tx) = tx {
                    let _ = tx.send(result);
                }
            }
            Ok(Message::Event(e)) => {
                // Bounded: events nobody reads are dropped (Wait is the reliable path).
                let _ = events.try_send(e);
            }
            // A second Hello or a request from the agent: ignore.
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Dropping every pending sender wakes its caller with Disconnected.
    shared
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
}
