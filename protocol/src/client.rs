//! Blocking host-side client: request/response with ids over the control connection.
//!
//! One reader thread demultiplexes responses (by id) and events, so several threads may call
//! the client at once (e.g. one blocked in [`Client::wait`] while another sends a signal).

use crate::{
    read_message, write_message, Event, FrameError, Hello, LinuxResources, Message, OciProcess,
    OciSpec, Request, Response, Stats, Stdio, PROTOCOL_VERSION,
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

/// A stream that can be split into a reader and a writer half (sockets).
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn try_clone_duplex(&self) -> io::Result<Self>;
}

#[cfg(unix)]
impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone_duplex(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Duplex for std::net::TcpStream {
    fn try_clone_duplex(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

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
}

impl<W: Write + Send> fmt::Debug for Client<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl<S: Duplex> Client<S> {
    /// Wraps an accepted control connection: reads the agent's [`Hello`] first.
    pub fn from_stream(stream: S) -> Result<(Self, Hello), ClientError> {
        let reader = stream
            .try_clone_duplex()
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
        Self::new(reader, stream)
    }
}

impl<W: Write + Send> Client<W> {
    /// Builds a client over the two halves of the control connection. Reads the agent's
    /// [`Hello`] (blocking) and checks its protocol version, then starts the reader thread.
    pub fn new<R: Read + Send + 'static>(
        mut reader: R,
        writer: W,
    ) -> Result<(Self, Hello), ClientError> {
        let hello = match read_message(&mut reader)? {
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
            },
            hello,
        ))
    }

    /// The agent's events (e.g. [`Event::Exit`]). Can be taken once; events arriving while
    /// nobody holds the receiver are buffered.
    pub fn take_events(&self) -> Option<Receiver<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Sends a request and blocks for its response.
    pub fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.call_inner(request, None)
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
            self.forget(id);
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
        expect_pid(self.call(Request::CreateContainer {
            id: id.into(),
            spec: Box::new(spec),
            rootfs: rootfs.into(),
            terminal,
            stdio,
        })?)
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
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<i32, ClientError> {
        match self.call(Request::Wait {
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

    /// Asks the agent to power the VM off (it answers first).
    /// Mounts the virtio-fs share `tag` at `target` in the guest.
    /// New cgroup limits for a running container (`Request::Update`).
    pub fn update(&self, id: &str, resources: LinuxResources) -> Result<(), ClientError> {
        expect_ok(self.call(Request::Update {
            id: id.into(),
            resources: Box::new(resources),
        })?)
    }

    pub fn mount_share(&self, tag: &str, target: &str, read_only: bool) -> Result<(), ClientError> {
        expect_ok(self.call(Request::MountShare {
            tag: tag.into(),
            target: target.into(),
            read_only,
        })?)
    }

    pub fn shutdown(&self) -> Result<(), ClientError> {
        expect_ok(self.call(Request::Shutdown)?)
    }
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

fn expect_pid(r: Response) -> Result<u32, ClientError> {
    match r {
        Response::Created { pid } | Response::Started { pid } => Ok(pid),
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
