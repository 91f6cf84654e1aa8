//! The Skiff host ↔ guest-agent control protocol.
//!
//! # Transport
//! The guest agent dials the host (Firecracker's hybrid vsock: a guest connect to CID 2 port P
//! reaches the VMM's Unix listener `<path>_P`):
//! - port [`CONTROL_PORT`] (1024): the control connection. Its arrival is the readiness signal;
//!   the agent's first message is [`Message::Hello`].
//! - port [`STREAM_PORT`] (1025): one connection per stdio stream of a process, opened by the
//!   agent while it handles `CreateContainer`/`Exec` (before it replies), starting with the
//!   one-line header `STREAM <container>/<exec_id> <stdin|stdout|stderr|pty>\n` (see
//!   [`stream::StreamHeader`]); the init process has the empty exec id. stdin EOF is a
//!   half-close (`shutdown(SHUT_WR)`) by the host; the agent half-closes stdout/stderr/pty once
//!   the process's output is drained, and only then reports the exit status.
//!
//! # Framing
//! Every control message is a frame: a 4-byte big-endian body length, then a JSON body (a
//! [`Message`]) of at most [`MAX_FRAME`] bytes. Decoding never panics on arbitrary bytes and never
//! allocates more than the announced (bounded) length plus what serde_json builds from it.
//!
//! # Versioning
//! [`Hello::protocol_version`] is [`PROTOCOL_VERSION`]; a host refuses an agent whose major
//! version differs. Unknown fields are ignored, so fields can be added within a version.

pub mod client;
pub mod server;
pub mod stream;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, Read, Write};

pub use client::{Client, ClientError};
pub use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec as OciSpec};
pub use server::{serve, Handler, Outbox, Replier, ServeEnd};
pub use stream::{StreamHeader, StreamKind};

/// The protocol version the agent announces in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame body accepted or sent (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;
/// vsock port the agent dials for the control connection.
pub const CONTROL_PORT: u32 = 1024;
/// vsock port the agent dials for each stdio stream.
pub const STREAM_PORT: u32 = 1025;
/// vsock CID of the host.
pub const HOST_CID: u32 = 2;
/// Longest container or exec id.
pub const MAX_ID_LEN: usize = 64;

/// One control-connection message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Agent → host, first message on the control connection.
    Hello(Hello),
    /// Host → agent.
    Request { id: u64, request: Request },
    /// Agent → host: the answer to the request with the same id.
    Response {
        id: u64,
        result: Result<Response, ErrorReply>,
    },
    /// Agent → host, unsolicited.
    Event(Event),
}

/// The agent's greeting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_version: String,
    /// Named boot timestamps in microseconds since guest boot (CLOCK_BOOTTIME), e.g.
    /// `("agent_start", …)`, `("control_connect", …)`.
    #[serde(default)]
    pub boot_stamps: Vec<(String, u64)>,
}

/// Which stdio streams the agent opens for a process. stdout and stderr (or the pty output)
/// are always opened; stdin only when asked (else the process reads `/dev/null`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdio {
    pub stdin: bool,
}

/// Host → agent requests, mirroring containerd's Task API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Sets the container up (namespaces, mounts, cgroup, stdio streams) and leaves its init
    /// process waiting for `Start`. Replies [`Response::Created`].
    CreateContainer {
        id: String,
        spec: Box<OciSpec>,
        /// Root filesystem path inside the guest.
        rootfs: String,
        terminal: bool,
        #[serde(default)]
        stdio: Stdio,
        /// Fail the create (ENOENT, with runc's message) when the process's program does not
        /// exist, as runc's create does; without it the process exits 127 at Start (`vmm run`,
        /// like docker's CLI).
        #[serde(default)]
        check_entrypoint: bool,
    },
    /// Starts the init process (`exec_id` None) or a created exec. Replies [`Response::Started`].
    Start {
        id: String,
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Creates an extra process in a running container (started by `Start` with its exec id).
    /// A terminal is used when `process.terminal` is true. Replies [`Response::Created`].
    Exec {
        container: String,
        exec_id: String,
        process: Box<OciProcess>,
        #[serde(default)]
        stdio: Stdio,
    },
    /// Sends `signal` to the process, or to every process of the container when `all`.
    Signal {
        id: String,
        #[serde(default)]
        exec_id: Option<String>,
        signal: i32,
        #[serde(default)]
        all: bool,
    },
    ResizePty {
        id: String,
        #[serde(default)]
        exec_id: Option<String>,
        rows: u16,
        cols: u16,
    },
    /// Closes the process's stdin (like a half-close of the stdin stream).
    CloseStdin {
        id: String,
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Answered with [`Response::Exited`] once the process has exited **and** its output
    /// streams are drained and shut down.
    Wait {
        id: String,
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Removes a stopped exec, or a container (its init must have exited; the cgroup goes).
    Delete {
        id: String,
        #[serde(default)]
        exec_id: Option<String>,
    },
    Pids {
        id: String,
    },
    Stats {
        id: String,
    },
    /// Applies new cgroup v2 limits (memory, pids, cpu) to a running container, as
    /// `runc update` does. Replies [`Response::Ok`].
    Update {
        id: String,
        resources: Box<LinuxResources>,
    },
    /// Mounts a virtio-fs share (by its device tag) at `target` in the guest (outside any
    /// container; the directory is created), read-only when `read_only`. Used for a
    /// container's rootfs and its volumes. Replies [`Response::Ok`].
    MountShare {
        tag: String,
        target: String,
        #[serde(default)]
        read_only: bool,
    },
    /// Configures the guest's network before a container starts: interfaces (found by MAC),
    /// addresses, MTU, routes over rtnetlink, and the `resolv.conf`, `hosts` and `hostname`
    /// files later containers get bind-mounted over theirs. A later request replaces the
    /// files; addresses and routes are added (replacing equal ones). Replies [`Response::Ok`].
    ConfigureNetwork(NetworkConfig),
    /// Makes a VM restored from a snapshot its own machine: mixes `entropy` (fresh host
    /// random bytes) into the guest's pool and reseeds its CRNG (`RNDADDENTROPY`,
    /// `RNDRESEEDCRNG`), and sets the wall clock to `unix_time_ns`. Replies [`Response::Ok`].
    Reseed {
        entropy: Vec<u8>,
        unix_time_ns: u64,
    },
    /// The agent answers `Ok`, then powers the VM off.
    Shutdown,
}

/// Most bytes of entropy in one [`Request::Reseed`].
pub const MAX_RESEED_BYTES: usize = 512;

/// Most interfaces in one [`NetworkConfig`].
pub const MAX_NET_INTERFACES: usize = 8;
/// Most addresses per interface.
pub const MAX_NET_ADDRESSES: usize = 16;
/// Most routes.
pub const MAX_NET_ROUTES: usize = 32;
/// Most DNS servers.
pub const MAX_NET_DNS: usize = 8;
/// Most search domains.
pub const MAX_NET_SEARCH: usize = 16;
/// Most extra `hosts` entries.
pub const MAX_NET_HOSTS: usize = 64;
/// Most names on one `hosts` entry.
pub const MAX_NET_HOST_NAMES: usize = 8;
/// Longest string anywhere in a [`NetworkConfig`] (a domain name is at most 253 bytes).
pub const MAX_NET_STRING: usize = 253;

/// The guest's network as the host decided it (e.g. passt's `-a/-n/-g/-D/-m`). Every string is
/// parsed and checked by the agent; [`validate`] only bounds counts and lengths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    #[serde(default)]
    pub interfaces: Vec<NetInterface>,
    #[serde(default)]
    pub routes: Vec<NetRoute>,
    /// DNS server addresses (`nameserver` lines of `resolv.conf`).
    #[serde(default)]
    pub dns: Vec<String>,
    /// Search domains (`search` line of `resolv.conf`).
    #[serde(default)]
    pub search: Vec<String>,
    /// The hostname for `/etc/hostname` and `/etc/hosts` when the container spec sets none.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Extra `/etc/hosts` lines.
    #[serde(default)]
    pub hosts: Vec<HostEntry>,
}

/// One guest interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// MAC address (`52:54:00:12:34:56`) of the interface to configure. At least one of `mac`
    /// and `name` is needed; with both, the interface with that MAC is renamed to `name`.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Addresses with their prefix length: `10.0.2.15/24`, `fd00::2/64`.
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The MAC address the interface is given before it comes up (a VM restored from a
    /// template: its card still has the template's address, `mac`, and the run has its own).
    #[serde(default)]
    pub set_mac: Option<String>,
}

/// One route. The interface is the one with an address whose subnet holds the gateway (or
/// the destination, for an on-link route); with a single interface, that one (on-link).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// `0.0.0.0/0` or `::/0` for a default route, else a CIDR.
    pub destination: String,
    #[serde(default)]
    pub gateway: Option<String>,
}

/// One extra `/etc/hosts` line: an address and its names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    pub ip: String,
    pub names: Vec<String>,
}

/// Successful replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok,
    Created {
        pid: u32,
        /// Where the agent's time went, in order: (step, microseconds), e.g. `streams`,
        /// `fork`, `child setup` (see `vmm run --timings`). Informational only.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        steps: Vec<(String, u64)>,
    },
    Started {
        pid: u32,
    },
    /// runc conventions: the exit code, or 128 + signal number when killed by a signal.
    Exited {
        status: i32,
    },
    Pids {
        pids: Vec<u32>,
    },
    Stats(Stats),
}

/// cgroup v2 figures of a container (None when the controller or file is missing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub memory_current: Option<u64>,
    pub memory_max: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpu_usage_usec: Option<u64>,
    pub cpu_user_usec: Option<u64>,
    pub cpu_system_usec: Option<u64>,
}

/// A failed request: a message and an errno-like code (`libc` errno values, e.g. 2 ENOENT for
/// an unknown container, 17 EEXIST, 22 EINVAL, 16 EBUSY for deleting a running process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: i32,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for ErrorReply {}

impl From<io::Error> for ErrorReply {
    fn from(e: io::Error) -> Self {
        Self::new(e.raw_os_error().unwrap_or(5), e.to_string())
    }
}

/// Agent → host notifications.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A process ended and its output streams are drained (same status as `Wait`).
    Exit {
        id: String,
        exec_id: Option<String>,
        pid: u32,
        status: i32,
    },
    /// The kernel's OOM killer killed a process of the container (its cgroup's
    /// `memory.events` `oom_kill` count rose). Sent before that process's `Exit`.
    Oom { id: String },
}

/// Frame and message decoding errors.
#[derive(Debug)]
pub enum FrameError {
    Io(io::Error),
    /// Clean end of stream before a frame started.
    Eof,
    TooLarge(usize),
    Malformed(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o: {e}"),
            Self::Eof => write!(f, "connection closed"),
            Self::TooLarge(n) => write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte limit"),
            Self::Malformed(m) => write!(f, "malformed message: {m}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Malformed("truncated frame".into())
        } else {
            Self::Io(e)
        }
    }
}

/// Encodes a message into one frame (length prefix included).
pub fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Decodes a frame body (without the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let msg: Message =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    validate(&msg)?;
    Ok(msg)
}

/// Decodes one whole frame from a byte slice; returns the message and the bytes consumed.
pub fn decode(buf: &[u8]) -> Result<(Message, usize), FrameError> {
    let Some(hdr) = buf.get(..4) else {
        return Err(FrameError::Malformed("truncated length prefix".into()));
    };
    let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let body = buf
        .get(4..4 + len)
        .ok_or_else(|| FrameError::Malformed("truncated frame".into()))?;
    Ok((decode_body(body)?, 4 + len))
}

/// Writes one message as a frame.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame. `Err(Eof)` on a clean end of stream before the first byte.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message, FrameError> {
    decode_body(&read_frame(r)?)
}

/// Reads one frame's body (length-checked, not decoded).
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(FrameError::Malformed("truncated length prefix".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Read through `take` so a lying peer cannot make us allocate before sending the bytes.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(FrameError::Malformed("truncated frame".into()));
    }
    Ok(body)
}

/// Is `id` a valid container id (`[A-Za-z0-9_.-]`, 1..=64 bytes, not `.`/`..`)?
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Is `id` a valid exec id (as [`valid_id`], or empty for the init process)?
pub fn valid_exec_id(id: &str) -> bool {
    id.is_empty() || valid_id(id)
}

fn check_id(id: &str) -> Result<(), FrameError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(FrameError::Malformed(format!("invalid id {id:?}")))
    }
}

fn check_exec(id: &Option<String>) -> Result<(), FrameError> {
    match id {
        Some(e) if !valid_exec_id(e) => {
            Err(FrameError::Malformed(format!("invalid exec id {e:?}")))
        }
        _ => Ok(()),
    }
}

/// Semantic checks beyond JSON shape: ids are safe to use in paths and stream headers.
pub fn validate(msg: &Message) -> Result<(), FrameError> {
    let Message::Request { request, .. } = msg else {
        return Ok(());
    };
    match request {
        Request::CreateContainer { id, .. }
        | Request::Pids { id }
        | Request::Stats { id }
        | Request::Update { id, .. } => check_id(id),
        Request::Exec {
            container, exec_id, ..
        } => {
            check_id(container)?;
            if exec_id.is_empty() {
                return Err(FrameError::Malformed("empty exec id".into()));
            }
            check_exec(&Some(exec_id.clone()))
        }
        Request::Start { id, exec_id }
        | Request::Signal { id, exec_id, .. }
        | Request::ResizePty { id, exec_id, .. }
        | Request::CloseStdin { id, exec_id }
        | Request::Wait { id, exec_id }
        | Request::Delete { id, exec_id } => {
            check_id(id)?;
            check_exec(exec_id)
        }
        Request::MountShare { tag, target, .. } => {
            if tag.is_empty() || tag.len() > 36 || tag.contains('\0') {
                return Err(FrameError::Malformed(format!("bad share tag {tag:?}")));
            }
            if !target.starts_with('/') || target.split('/').any(|c| c == "..") {
                return Err(FrameError::Malformed(format!(
                    "bad share target {target:?}"
                )));
            }
            Ok(())
        }
        Request::ConfigureNetwork(n) => check_network(n),
        Request::Reseed { entropy, .. } => {
            if entropy.is_empty() || entropy.len() > MAX_RESEED_BYTES {
                return Err(FrameError::Malformed(format!(
                    "reseed with {} bytes of entropy (1..={MAX_RESEED_BYTES})",
                    entropy.len()
                )));
            }
            Ok(())
        }
        Request::Shutdown => Ok(()),
    }
}

/// Bounds on a [`NetworkConfig`]: counts and string lengths (the agent parses the strings).
fn check_network(n: &NetworkConfig) -> Result<(), FrameError> {
    fn count<T>(what: &str, v: &[T], max: usize) -> Result<(), FrameError> {
        if v.len() > max {
            return Err(FrameError::Malformed(format!(
                "network: {} {what}, at most {max}",
                v.len()
            )));
        }
        Ok(())
    }
    fn len(s: &str) -> Result<(), FrameError> {
        if s.len() > MAX_NET_STRING {
            return Err(FrameError::Malformed(format!(
                "network: a string of {} bytes, at most {MAX_NET_STRING}",
                s.len()
            )));
        }
        Ok(())
    }
    count("interfaces", &n.interfaces, MAX_NET_INTERFACES)?;
    count("routes", &n.routes, MAX_NET_ROUTES)?;
    count("DNS servers", &n.dns, MAX_NET_DNS)?;
    count("search domains", &n.search, MAX_NET_SEARCH)?;
    count("hosts entries", &n.hosts, MAX_NET_HOSTS)?;
    for i in &n.interfaces {
        count(
            "addresses on one interface",
            &i.addresses,
            MAX_NET_ADDRESSES,
        )?;
        i.mac
            .iter()
            .chain(&i.set_mac)
            .chain(&i.name)
            .chain(&i.addresses)
            .try_for_each(|s| len(s))?;
    }
    for r in &n.routes {
        std::iter::once(&r.destination)
            .chain(&r.gateway)
            .try_for_each(|s| len(s))?;
    }
    for h in &n.hosts {
        count("names on one hosts entry", &h.names, MAX_NET_HOST_NAMES)?;
        std::iter::once(&h.ip)
            .chain(&h.names)
            .try_for_each(|s| len(s))?;
    }
    n.dns
        .iter()
        .chain(&n.search)
        .chain(&n.hostname)
        .try_for_each(|s| len(s))
}

/// Exit status per runc conventions from a `waitpid` status word.
pub fn exit_status_from_wait(status: i32) -> i32 {
    // Linux encoding: low 7 bits = terminating signal (0 = exited), bits 8..16 = exit code.
    let sig = status & 0x7f;
    if sig == 0 {
        (status >> 8) & 0xff
    } else {
        128 + sig
    }
}

#[cfg(test)]
mod tests;
