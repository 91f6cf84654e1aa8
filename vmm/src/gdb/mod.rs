//! The GDB stub: `vmm --kernel vmlinux --gdb 127.0.0.1:PORT` (or a Unix socket path).
//!
//! `vmm` listens before it builds the VM, waits for GDB, and keeps every vCPU parked before
//! its first instruction until GDB continues. GDB sees the VM's vCPUs as threads (thread n is
//! vCPU n-1) in all-stop mode ([`control`]); breakpoints are software (`int3` written into
//! guest memory, trapped by the hypervisor) or hardware (debug registers), and single steps,
//! registers and memory by virtual address go through the guest's page tables ([`x86_64`]).
//! The protocol is the `gdbstub` crate's; the hypervisor half (`KVM_SET_GUEST_DEBUG`, debug
//! exits) is [`crate::hypervisor::Vcpu::set_guest_debug`] and `VcpuExit::Debug`.
//!
//! When GDB detaches or its connection drops, debugging is switched off and the guest runs
//! on. When the guest ends while GDB is attached, GDB is told its exit status.
//!
//! The stub's thread starts before the VMM's seccomp allowlist: it serves one socket that the
//! user opened on the command line, and nothing the guest controls reaches it but memory and
//! register values, which it only copies.

pub mod control;
#[cfg(target_arch = "x86_64")]
mod target;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use control::{DebugControl, Resume, Stop};
#[cfg(target_arch = "x86_64")]
pub use target::serve;

/// Errors of the GDB stub's setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening address cannot be used.
    #[error("cannot listen for GDB on {addr}: {source}")]
    Listen {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// Accepting GDB's connection failed.
    #[error("waiting for GDB on {addr}: {source}")]
    Accept {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// This backend cannot debug guests.
    #[error("--gdb: {0}")]
    Unsupported(&'static str),
}

/// A connection GDB talks over.
#[derive(Debug)]
pub enum Connection {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// A Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl gdbstub::conn::Connection for Connection {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.write_all(&[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => gdbstub::conn::Connection::write_all(s, buf),
            Connection::Unix(s) => gdbstub::conn::Connection::write_all(s, buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => gdbstub::conn::Connection::flush(s),
            Connection::Unix(s) => gdbstub::conn::Connection::flush(s),
        }
    }
}

impl gdbstub::conn::ConnectionExt for Connection {
    fn read(&mut self) -> io::Result<u8> {
        match self {
            Connection::Tcp(s) => gdbstub::conn::ConnectionExt::read(s),
            Connection::Unix(s) => gdbstub::conn::ConnectionExt::read(s),
        }
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        match self {
            Connection::Tcp(s) => gdbstub::conn::ConnectionExt::peek(s),
            Connection::Unix(s) => gdbstub::conn::ConnectionExt::peek(s),
        }
    }
}

/// Where the stub listens.
#[derive(Debug)]
pub enum Listener {
    /// `HOST:PORT`.
    Tcp(TcpListener, String),
    /// A Unix socket path (removed again when the listener goes).
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Opens the GDB listener: a path (containing `/`) is a Unix socket, anything else
/// `HOST:PORT`. A busy port or an existing path fails here, before any VM exists.
pub fn listen(addr: &str) -> Result<Listener, Error> {
    if !crate::hypervisor::GUEST_DEBUG_SUPPORTED {
        return Err(Error::Unsupported(
            crate::hypervisor::GUEST_DEBUG_UNSUPPORTED,
        ));
    }
    let err = |source| Error::Listen {
        addr: addr.to_string(),
        source,
    };
    if addr.contains('/') {
        let l = UnixListener::bind(addr).map_err(err)?;
        Ok(Listener::Unix(l, PathBuf::from(addr)))
    } else {
        if !addr.contains(':') {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "expected HOST:PORT (like 127.0.0.1:1234) or a Unix socket path",
            )));
        }
        let l = TcpListener::bind(addr).map_err(err)?;
        let shown = l
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.to_string());
        Ok(Listener::Tcp(l, shown))
    }
}

impl Listener {
    /// What GDB's `target remote` takes.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(_, a) => a.clone(),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    /// Waits for GDB.
    pub fn accept(&self) -> Result<GdbConnection, Error> {
        let err = |source| Error::Accept {
            addr: self.address(),
            source,
        };
        let conn: Connection = match self {
            Listener::Tcp(l, _) => {
                let (s, _) = l.accept().map_err(err)?;
                // GDB's packets are small and interactive.
                s.set_nodelay(true).map_err(err)?;
                Connection::Tcp(s)
            }
            Listener::Unix(l, p) => {
                let c = l.accept().map_err(err)?.0;
                // One session per VM: the path has served its purpose.
                let _ = std::fs::remove_file(p);
                Connection::Unix(c)
            }
        };
        Ok(GdbConnection {
            conn: Arc::new(Mutex::new(Some(conn))),
        })
    }
}

/// GDB's accepted connection, handed to the VM in its config (taken once).
#[derive(Clone)]
pub struct GdbConnection {
    conn: Arc<Mutex<Option<Connection>>>,
}

impl std::fmt::Debug for GdbConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GdbConnection")
    }
}

impl GdbConnection {
    /// A connection from a test.
    pub fn from_connection(conn: Connection) -> Self {
        GdbConnection {
            conn: Arc::new(Mutex::new(Some(conn))),
        }
    }

    /// The connection, once.
    pub fn take(&self) -> Option<Connection> {
        self.conn.lock().ok().and_then(|mut g| g.take())
    }
}
