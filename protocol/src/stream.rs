//! Stdio stream connections: the `STREAM <container>/<exec_id> <kind>\n` header, and a host-side
//! hub that accepts stream connections and hands them out by (container, exec id, kind).

use crate::{valid_exec_id, valid_id};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest accepted header line, newline included.
pub const MAX_HEADER: usize = 256;

/// Which stdio channel a stream connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Host → process. Host half-close = EOF on the process's stdin.
    Stdin,
    /// Process → host.
    Stdout,
    /// Process → host.
    Stderr,
    /// Process's terminal output → host (terminal processes; input goes on `Stdin`).
    Pty,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Pty => "pty",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "stdin" => Self::Stdin,
            "stdout" => Self::Stdout,
            "stderr" => Self::Stderr,
            "pty" => Self::Pty,
            _ => return None,
        })
    }
}

/// The first line of a stream connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    pub container: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub kind: StreamKind,
}

impl fmt::Display for StreamHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "STREAM {}/{} {}",
            self.container,
            self.exec_id,
            self.kind.as_str()
        )
    }
}

impl StreamHeader {
    pub fn new(container: &str, exec_id: &str, kind: StreamKind) -> Self {
        Self {
            container: container.into(),
            exec_id: exec_id.into(),
            kind,
        }
    }

    /// Parses a header line (without its trailing newline).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("STREAM ")?;
        let (ids, kind) = rest.split_once(' ')?;
        let (container, exec_id) = ids.split_once('/')?;
        if !valid_id(container) || !valid_exec_id(exec_id) {
            return None;
        }
        Some(Self {
            container: container.into(),
            exec_id: exec_id.into(),
            kind: StreamKind::parse(kind)?,
        })
    }

    /// Writes the header line.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(format!("{self}\n").as_bytes())
    }

    /// Reads a header line byte by byte (so no stream data is consumed), at most
    /// [`MAX_HEADER`] bytes.
    pub fn read_from<R: Read + ?Sized>(r: &mut R) -> io::Result<Self> {
        let mut line = Vec::with_capacity(64);
        let mut b = [0u8; 1];
        loop {
            match r.read(&mut b) {
                Ok(0) => return Err(bad("stream closed inside its header")),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => {
                    line.push(b[0]);
                    if line.len() >= MAX_HEADER {
                        return Err(bad("stream header too long"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let line = std::str::from_utf8(&line).map_err(|_| bad("stream header not UTF-8"))?;
        Self::parse(line).ok_or_else(|| bad("malformed stream header"))
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

type Key = (String, String, StreamKind);

/// Host side: collects stream connections (after their header) until someone takes them.
///
/// Feed it accepted connections with [`StreamHub::accept_loop`] (a thread over a listener) or
/// [`StreamHub::add`]. Connections with a bad header are dropped. At most `MAX_PENDING`
/// untaken streams are kept; further ones are dropped.
#[derive(Debug)]
pub struct StreamHub<S> {
    inner: Arc<(Mutex<HashMap<Key, S>>, Condvar)>,
}

impl<S> Clone for StreamHub<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Bound on streams accepted but not yet taken.
pub const MAX_PENDING: usize = 1024;
/// Bound on connections whose header is being read at once (one thread each).
pub const MAX_HEADER_READERS: usize = 16;
/// How long a connection may take to send its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Accept errors after which the listener still works.
fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
            | Some(libc::ECONNABORTED)
            | Some(libc::EPROTO)
            | Some(libc::EINTR)
    ) || matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::WouldBlock
    )
}

impl<S: Read + Send + 'static> Default for StreamHub<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Read + Send + 'static> StreamHub<S> {
    pub fn new() -> Self {
        Self {
            inner: Arc::new((Mutex::new(HashMap::new()), Condvar::new())),
        }
    }

    /// Reads the header of a freshly accepted connection and files it.
    pub fn add(&self, conn: S) -> io::Result<StreamHeader> {
        self.add_with(conn, |_| Ok(()))
    }

    /// [`StreamHub::add`], running `ready` on the connection after its header (to undo a
    /// read bound set for the header).
    fn add_with(
        &self,
        mut conn: S,
        ready: impl FnOnce(&S) -> io::Result<()>,
    ) -> io::Result<StreamHeader> {
        let h = StreamHeader::read_from(&mut conn)?;
        ready(&conn)?;
        let (m, cv) = &*self.inner;
        let mut map = m.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_PENDING {
            return Err(bad("too many pending streams"));
        }
        map.insert((h.container.clone(), h.exec_id.clone(), h.kind), conn);
        cv.notify_all();
        Ok(h)
    }

    /// Spawns a thread that accepts connections with `accept`, filing each. A header is read
    /// on its own short-lived thread with a [`HEADER_TIMEOUT`] bound, at most
    /// [`MAX_HEADER_READERS`] at once (further connections are closed), so a guest that opens
    /// connections and stays silent ties up neither threads nor the loop. Running out of
    /// descriptors (`EMFILE`/`ENFILE`) or an aborted connection only pauses the loop briefly;
    /// it ends on any other accept error (the listener is gone).
    pub fn accept_loop<F>(&self, mut accept: F) -> std::thread::JoinHandle<()>
    where
        F: FnMut() -> io::Result<S> + Send + 'static,
        S: crate::client::Duplex,
    {
        let hub = self.clone();
        let readers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::spawn(move || loop {
            let conn = match accept() {
                Ok(c) => c,
                Err(e) if transient_accept_error(&e) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(_) => break,
            };
            use std::sync::atomic::Ordering;
            if readers.fetch_add(1, Ordering::AcqRel) >= MAX_HEADER_READERS {
                readers.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: closes the connection
            }
            let hub = hub.clone();
            let readers = readers.clone();
            let spawned = std::thread::Builder::new()
                .name("skiff-stream-header".into())
                .spawn(move || {
                    let ok = conn.set_read_deadline(Some(HEADER_TIMEOUT)).is_ok();
                    let _ = ok && hub.add_with(conn, |c| c.set_read_deadline(None)).is_ok();
                    readers.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                // Out of threads: the connection was dropped with the closure.
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    /// Takes the stream for (container, exec id, kind), waiting up to `timeout` for it.
    pub fn take(
        &self,
        container: &str,
        exec_id: &str,
        kind: StreamKind,
        timeout: Duration,
    ) -> io::Result<S> {
        let key = (container.to_string(), exec_id.to_string(), kind);
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut map = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = map.remove(&key) {
                return Ok(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no {} stream for {container}/{exec_id} within {timeout:?}",
                        kind.as_str()
                    ),
                ));
            }
            map = cv
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
