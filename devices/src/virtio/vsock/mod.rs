//! virtio-vsock (device type 19) served in userspace with Firecracker's "hybrid vsock" host
//! convention.
//!
//! - **Host → guest:** the device listens on the Unix socket `uds_path`. A host client connects
//!   and writes `CONNECT <port>\n`; the device asks the guest for a stream to `<port>`
//!   (OP_REQUEST) and, when the guest accepts (OP_RESPONSE), writes `OK <local_port>\n` to the
//!   client, then relays bytes both ways. A refusal (OP_RST) or no answer within 2 s closes the
//!   client.
//! - **Guest → host:** a guest connect to CID 2, port `P` is forwarded to the Unix socket
//!   `<uds_path>_P`; if nobody listens there the guest gets OP_RST.
//!
//! Flow control is the virtio credit scheme in both directions and every buffer is bounded:
//! at most [`CONN_BUF_SIZE`] bytes per connection wait for a slow host reader (that is the
//! credit advertised to the guest; a guest exceeding it is reset), at most [`CONN_BUF_SIZE`]
//! bytes per connection wait for the guest (the Unix socket is not read while that buffer is
//! full), the guest is never sent more than its advertised credit, and at most
//! [`MAX_CONNECTIONS`] connections exist. Short writes to a Unix socket keep their tail and wait
//! for writability; any socket error resets the connection.
//!
//! Threads: [`Vsock`] (the [`VirtioDevice`]) lives in the transport and is called on vCPU
//! threads; it never does socket I/O, it only hands the queues over at activation and wakes the
//! backend. The backend runs on the [`EventLoop`] thread and does all queue and socket work.
//!
//! Wiring (see also [`crate::event_loop`] and [`crate::virtio::mmio`]):
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use skiff_devices::event_loop::EventLoop;
//! use skiff_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
//! use skiff_devices::virtio::vsock::{Vsock, DEFAULT_GUEST_CID};
//! use skiff_devices::{Bus, IrqTrigger};
//! # fn wire(mem: vm_memory::GuestMemoryMmap, mmio_bus: &mut Bus, base: u64, irq: IrqTrigger)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! let mut el = EventLoop::new()?;
//! let vsock = Vsock::new(DEFAULT_GUEST_CID, "/run/skiff/vm1/v.sock", &mut el)?;
//! let transport = MmioTransport::new(Box::new(vsock), mem, irq)?;
//! mmio_bus.insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
//! let events = el.spawn()?; // before the vCPUs start; `events.stop()` at VM teardown
//! # Ok(()) }
//! ```

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::Interest;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use self::packet::{op, Header, HDR_SIZE, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::event_loop::{EventCtl, EventHandler, EventLoop, Readiness, WakeHandle};

/// Virtio device type of vsock.
pub const VSOCK_DEVICE_TYPE: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Default guest CID.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
/// Per-connection buffer in each direction (also the credit advertised to the guest).
pub const CONN_BUF_SIZE: usize = 64 * 1024;
/// Most connections (including host clients still sending their `CONNECT` line).
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a host client may take to send `CONNECT`, the guest to answer a request, or a
/// closing connection to flush its data to the host.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First local port handed to host-initiated connections (Firecracker uses [2^30, 2^31)).
const LOCAL_PORT_FIRST: u32 = 1 << 30;
const LOCAL_PORT_END: u32 = 1 << 31;
const MAX_CONNECT_LINE: usize = 32;
const MAX_ORPHAN_RST: usize = 2 * MAX_CONNECTIONS;
/// Chains taken from the tx queue per wakeup before yielding to other events.
const TX_BUDGET: usize = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const LISTENER_TOKEN: usize = 0;

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest CID is reserved (0, 1, 2 or ≥ 2^32 − 1).
    #[error("invalid guest CID {0}")]
    InvalidCid(u64),
    /// The Unix socket path cannot be used (too long once `_<port>` is appended).
    #[error("vsock socket path too long: {0}")]
    PathTooLong(PathBuf),
    /// Binding the host-side listener failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Adding the backend to the event loop failed.
    #[error(transparent)]
    EventLoop(#[from] crate::event_loop::Error),
}

/// The vsock device's front end (the part the transport talks to). Create it with
/// [`Vsock::new`], which also puts its backend on an [`EventLoop`].
pub struct Vsock {
    cid: u64,
    shared: Arc<Mutex<Backend>>,
    wake: WakeHandle,
    acked_features: u64,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock").field("cid", &self.cid).finish()
    }
}

fn lock(m: &Mutex<Backend>) -> MutexGuard<'_, Backend> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Vsock {
    /// A vsock device for guest CID `cid` listening on `uds_path` (host → guest) and
    /// forwarding guest connects to `<uds_path>_<port>`. The backend is added to `event_loop`,
    /// which must then run ([`EventLoop::spawn`]) for the device to work. The path must not
    /// exist (remove a stale socket first); it is removed when the backend is dropped.
    pub fn new(
        cid: u64,
        uds_path: impl Into<PathBuf>,
        event_loop: &mut EventLoop,
    ) -> Result<Vsock, Error> {
        if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
            return Err(Error::InvalidCid(cid));
        }
        let uds_path = uds_path.into();
        // macOS sun_path holds 104 bytes (Linux 108); "_<port>" adds up to 11.
        if uds_path.as_os_str().len() + 11 >= 104 {
            return Err(Error::PathTooLong(uds_path));
        }
        let listener = UnixListener::bind(&uds_path).map_err(|source| Error::Bind {
            path: uds_path.clone(),
            source,
        })?;
        let shared = Arc::new(Mutex::new(Backend::new(cid, uds_path, listener)));
        let wake = event_loop.add(Box::new(VsockHandler {
            shared: shared.clone(),
        }))?;
        lock(&shared).self_wake = Some(wake.clone());
        Ok(Vsock {
            cid,
            shared,
            wake,
            acked_features: 0,
        })
    }

    /// The guest CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Tells the guest that every connection it had is gone
    /// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue; virtio 1.2 §5.10.6.6): what a
    /// VM restored from a snapshot gets, since the host side of its connections did not
    /// survive. Sent once the device is active and the guest has an event buffer posted.
    ///
    /// Packets the guest had queued for the device before the reset (a connection request its
    /// snapshot caught in flight) are answered with RST and never acted on.
    pub fn send_transport_reset(&self) -> ResetSent {
        let mut b = lock(&self.shared);
        b.transport_reset_pending = true;
        b.stale_tx = true;
        drop(b);
        self.wake.wake();
        ResetSent(self.shared.clone())
    }

    /// Number of open connections (host clients in handshake included).
    pub fn connection_count(&self) -> usize {
        let b = lock(&self.shared);
        b.conns.len() + b.handshakes.len()
    }

    /// Bytes buffered in the VMM for all connections (both directions); for tests and metrics.
    pub fn buffered_bytes(&self) -> usize {
        lock(&self.shared)
            .conns
            .values()
            .map(|c| c.tx_buf.len() + c.rx_buf.len())
            .sum()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_TYPE
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), super::Error> {
        if queues.len() != 3 {
            return Err(super::Error::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        lock(&self.shared).active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        self.wake.wake();
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        self.wake.wake();
    }

    fn reset(&mut self) {
        let mut b = lock(&self.shared);
        b.active = None;
        b.reset_pending = true;
        drop(b);
        self.acked_features = 0;
        self.wake.wake();
    }
}

/// What the device got at activation.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: VirtioInterrupt,
}

/// (local/host port, peer/guest port).
type ConnKey = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST (pending or sent), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
    /// The guest shut down both directions: flush what is left to the host, then RST.
    Closing,
}

/// A host client that has not sent its `CONNECT` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

struct Conn {
    token: usize,
    stream: UnixStream,
    state: State,
    local_port: u32,
    peer_port: u32,
    deadline: Option<Instant>,
    // Guest → host.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are not guest data (the `OK <port>\n` line).
    tx_extra: usize,
    recv_cnt: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    peer_shutdown: u32,
    write_shut: bool,
    writable: bool,
    // Host → guest.
    rx_buf: Vec<u8>,
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    readable: bool,
    host_eof: bool,
    shutdown_sent: bool,
    credit_requested: bool,
    // Pending control packets.
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    in_rxq: bool,
}

impl Conn {
    fn new(token: usize, stream: UnixStream, state: State, local: u32, peer: u32) -> Self {
        Conn {
            token,
            stream,
            state,
            local_port: local,
            peer_port: peer,
            deadline: None,
            tx_buf: VecDeque::new(),
            tx_extra: 0,
            recv_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            peer_shutdown: 0,
            write_shut: false,
            writable: true,
            rx_buf: Vec::new(),
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: true,
            host_eof: false,
            shutdown_sent: false,
            credit_requested: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            in_rxq: false,
        }
    }

    /// Bytes the guest can still take (its credit towards us).
    fn peer_credit(&self) -> usize {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    fn has_rx_work(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_credit_update
            || (self.can_send_data() && !self.rx_buf.is_empty() && self.peer_credit() > 0)
            || self.owes_shutdown()
            || self.owes_credit_request()
    }

    fn owes_shutdown(&self) -> bool {
        self.state == State::Established
            && self.host_eof
            && self.rx_buf.is_empty()
            && !self.shutdown_sent
    }

    fn owes_credit_request(&self) -> bool {
        self.can_send_data()
            && !self.rx_buf.is_empty()
            && self.peer_credit() == 0
            && !self.credit_requested
    }

    fn header(&self, cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: packet::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE as u32,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, with at most `max_payload` bytes of data (taken from the
    /// front of `rx_buf` by the caller).
    fn next_packet(&mut self, cid: u64, max_payload: usize) -> Option<Header> {
        let mut h = if std::mem::take(&mut self.send_request) {
            self.header(cid, op::REQUEST)
        } else if std::mem::take(&mut self.send_response) {
            self.header(cid, op::RESPONSE)
        } else if self.can_send_data() && !self.rx_buf.is_empty() && self.peer_credit() > 0 {
            let n = self.rx_buf.len().min(self.peer_credit()).min(max_payload);
            if n == 0 {
                return None;
            }
            let mut h = self.header(cid, op::RW);
            h.len = n as u32;
            self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
            h
        } else if self.owes_shutdown() {
            self.shutdown_sent = true;
            let mut h = self.header(cid, op::SHUTDOWN);
            h.flags = SHUTDOWN_SEND;
            h
        } else if self.send_credit_update {
            self.header(cid, op::CREDIT_UPDATE)
        } else if self.owes_credit_request() {
            self.credit_requested = true;
            self.header(cid, op::CREDIT_REQUEST)
        } else {
            return None;
        };
        // Every packet carries fwd_cnt: the credit update is delivered.
        self.send_credit_update = false;
        self.last_fwd_sent = self.fwd_cnt;
        h.fwd_cnt = self.fwd_cnt;
        Some(h)
    }

    /// Writes buffered guest data to the Unix socket. Err = reset the connection.
    fn flush_tx(&mut self) -> io::Result<()> {
        while self.writable && !self.tx_buf.is_empty() {
            let front = self.tx_buf.as_slices().0;
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let extra = n.min(self.tx_extra);
                    self.tx_extra -= extra;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - extra) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            self.write_shut = true;
            // The peer may already be gone; the read side reports that.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        // Tell the guest about freed space once its view of it falls below half the buffer.
        let unacked = self.recv_cnt.wrapping_sub(self.last_fwd_sent) as usize;
        if self.fwd_cnt != self.last_fwd_sent && unacked > CONN_BUF_SIZE / 2 {
            self.send_credit_update = true;
        }
        Ok(())
    }

    /// Reads from the Unix socket into the (bounded) buffer towards the guest.
    fn fill_rx(&mut self) -> io::Result<()> {
        while self.readable
            && !self.host_eof
            && self.can_send_data()
            && self.rx_buf.len() < CONN_BUF_SIZE
        {
            let old = self.rx_buf.len();
            self.rx_buf.resize(CONN_BUF_SIZE, 0);
            let r = self.stream.read(&mut self.rx_buf[old..]);
            self.rx_buf.truncate(old + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => self.host_eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.rx_buf.is_empty() && self.rx_buf.capacity() > 0 {
            self.rx_buf = Vec::new();
        }
        Ok(())
    }
}

/// Tells when a [`Vsock::send_transport_reset`] reached the guest's event queue.
pub struct ResetSent(Arc<Mutex<Backend>>);

impl std::fmt::Debug for ResetSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetSent")
    }
}

impl ResetSent {
    /// Waits up to `timeout` for the event to be in the guest's event queue; returns whether
    /// it is.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !lock(&self.0).transport_reset_pending {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The part of the device that runs on the event loop thread.
struct Backend {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    active: Option<Active>,
    reset_pending: bool,
    /// A VIRTIO_VSOCK_EVENT_TRANSPORT_RESET waits for an event-queue buffer.
    transport_reset_pending: bool,
    /// The tx queue holds packets the guest queued before its snapshot: answer each with RST
    /// (never act on them) before anything else.
    stale_tx: bool,
    self_wake: Option<WakeHandle>,
    conns: HashMap<ConnKey, Conn>,
    by_token: HashMap<usize, ConnKey>,
    handshakes: HashMap<usize, Handshake>,
    next_token: usize,
    next_local_port: u32,
    rxq: VecDeque<ConnKey>,
    orphan_rst: VecDeque<Header>,
    scratch: Vec<u8>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Backend {
    fn new(cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Backend {
            cid,
            uds_path,
            listener,
            active: None,
            reset_pending: false,
            transport_reset_pending: false,
            stale_tx: false,
            self_wake: None,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: LOCAL_PORT_FIRST,
            rxq: VecDeque::new(),
            orphan_rst: VecDeque::new(),
            scratch: Vec::new(),
        }
    }

    fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    fn alloc_token(&mut self) -> usize {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn push_rst(&mut self, h: Header) {
        if self.orphan_rst.len() < MAX_ORPHAN_RST {
            self.orphan_rst.push_back(h);
        } else {
            tracing::debug!("vsock: RST queue full, dropping one");
        }
    }

    /// RST answering the guest packet `h`.
    fn rst_reply(&mut self, h: &Header) {
        if h.op == op::RST {
            return;
        }
        self.push_rst(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: packet::TYPE_STREAM,
            op: op::RST,
            buf_alloc: CONN_BUF_SIZE as u32,
            ..Header::default()
        });
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rxq && c.has_rx_work() {
                c.in_rxq = true;
                self.rxq.push_back(key);
            }
        }
    }

    /// Removes a connection, closing its Unix socket; `rst` tells the guest.
    fn kill(&mut self, ctl: &EventCtl<'_>, key: ConnKey, rst: bool) {
        let Some(mut c) = self.conns.remove(&key) else {
            return;
        };
        let _ = ctl.deregister(&mut c.stream);
        self.by_token.remove(&c.token);
        if c.in_rxq {
            self.rxq.retain(|k| *k != key);
        }
        if rst {
            let h = c.header(self.cid, op::RST);
            self.push_rst(h);
        }
    }

    fn teardown(&mut self, ctl: &EventCtl<'_>) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.kill(ctl, k, false);
        }
        for (_, mut h) in self.handshakes.drain() {
            let _ = ctl.deregister(&mut h.stream);
        }
        self.rxq.clear();
        self.orphan_rst.clear();
    }

    fn accept(&mut self, ctl: &EventCtl<'_>) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.connection_count() >= MAX_CONNECTIONS {
                        crate::warn_limited!(
                            "vsock: connection limit reached, refusing a host client"
                        );
                        continue;
                    }
                    let token = self.alloc_token();
                    if ctl
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.handshakes.insert(
                        token,
                        Handshake {
                            stream,
                            line: Vec::new(),
                            deadline: Instant::now() + CONNECT_TIMEOUT,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        crate::warn_limited!("vsock: accept failed: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` (possibly split over several reads).
    fn handshake_ready(&mut self, ctl: &EventCtl<'_>, token: usize) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let (port, rest) = loop {
            let room = MAX_CONNECT_LINE - hs.line.len();
            match hs.stream.read(&mut buf[..room]) {
                Ok(0) => break (None, Vec::new()),
                Ok(n) => {
                    hs.line.extend_from_slice(&buf[..n]);
                    if let Some(nl) = hs.line.iter().position(|&b| b == b'\n') {
                        let rest = hs.line.split_off(nl + 1);
                        break (parse_connect(&hs.line[..nl]), rest);
                    }
                    if hs.line.len() >= MAX_CONNECT_LINE {
                        break (None, Vec::new());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break (None, Vec::new()),
            }
        };
        let Some(mut hs) = self.handshakes.remove(&token) else {
            return;
        };
        let Some(peer_port) = port else {
            let _ = ctl.deregister(&mut hs.stream);
            return;
        };
        let Some(local) = self.alloc_local_port(peer_port) else {
            let _ = ctl.deregister(&mut hs.stream);
            return;
        };
        let mut c = Conn::new(token, hs.stream, State::LocalInit, local, peer_port);
        c.rx_buf = rest;
        c.send_request = true;
        c.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        self.by_token.insert(token, (local, peer_port));
        self.conns.insert((local, peer_port), c);
        self.schedule((local, peer_port));
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = if p + 1 >= LOCAL_PORT_END {
                LOCAL_PORT_FIRST
            } else {
                p + 1
            };
            if !self.conns.contains_key(&(p, peer_port)) {
                return Some(p);
            }
        }
        None
    }

    fn conn_ready(&mut self, ctl: &EventCtl<'_>, key: ConnKey, r: Readiness) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if r.readable || r.read_closed || r.error {
            c.readable = true;
        }
        if r.writable || r.write_closed || r.error {
            c.writable = true;
        }
        let res = c.flush_tx().and_then(|()| c.fill_rx());
        let done = c.state == State::Closing && c.tx_buf.is_empty();
        match res {
            Err(e) => {
                tracing::debug!("vsock: connection {key:?} reset: {e}");
                self.kill(ctl, key, true);
            }
            Ok(()) if done => self.kill(ctl, key, true),
            Ok(()) => self.schedule(key),
        }
    }

    /// Handles one guest packet from the tx queue.
    fn handle_tx(&mut self, ctl: &EventCtl<'_>, reader: &mut Reader<'_>) {
        let mut hb = [0u8; HDR_SIZE];
        if reader.available_bytes() < HDR_SIZE || reader.read_exact(&mut hb).is_err() {
            tracing::debug!("vsock: tx packet shorter than a header, dropped");
            return;
        }
        let h = Header::decode(&hb);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: tx packet with bad CIDs {}→{}, dropped",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        let bad_len = h.len > MAX_PKT_PAYLOAD || h.len as usize > reader.available_bytes();
        if h.type_ != packet::TYPE_STREAM || bad_len {
            if self.conns.contains_key(&key) {
                self.kill(ctl, key, true);
            } else {
                self.rst_reply(&h);
            }
            return;
        }
        if h.op == op::REQUEST {
            self.guest_connect(ctl, &h);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_reply(&h);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.credit_requested = false;
        let mut kill = false;
        match h.op {
            op::RESPONSE if c.state == State::LocalInit => {
                c.state = State::Established;
                c.deadline = None;
                let ok = format!("OK {}\n", c.local_port);
                c.tx_extra = ok.len();
                c.tx_buf.extend(ok.as_bytes());
                kill = c.flush_tx().and_then(|()| c.fill_rx()).is_err();
            }
            op::RST => {
                self.kill(ctl, key, false);
                return;
            }
            op::SHUTDOWN if c.state != State::LocalInit => {
                c.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_shutdown & SHUTDOWN_RCV != 0 {
                    c.rx_buf = Vec::new();
                }
                if c.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && c.state != State::Closing {
                    c.state = State::Closing;
                    c.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
                }
                kill = c.flush_tx().is_err() || (c.state == State::Closing && c.tx_buf.is_empty());
            }
            op::RW if c.state == State::Established && c.peer_shutdown & SHUTDOWN_SEND == 0 => {
                let n = h.len as usize;
                let buffered = c.tx_buf.len() - c.tx_extra;
                if buffered + n > CONN_BUF_SIZE {
                    tracing::debug!("vsock: guest exceeded its credit on {key:?}");
                    kill = true;
                } else {
                    self.scratch.resize(n, 0);
                    if reader.read_exact(&mut self.scratch[..n]).is_err() {
                        kill = true;
                    } else {
                        c.tx_buf.extend(&self.scratch[..n]);
                        c.recv_cnt = c.recv_cnt.wrapping_add(n as u32);
                        kill = c.flush_tx().is_err();
                    }
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => c.send_credit_update = true,
            _ => {
                tracing::debug!(op = h.op, "vsock: unexpected op, resetting {key:?}");
                kill = true;
            }
        }
        if kill {
            self.kill(ctl, key, true);
        } else {
            self.schedule(key);
        }
    }

    /// Guest OP_REQUEST to host port `h.dst_port`: connect to `<uds>_<port>`.
    fn guest_connect(&mut self, ctl: &EventCtl<'_>, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) {
            // A second request on a live connection: reset it.
            self.kill(ctl, key, true);
            return;
        }
        if self.connection_count() >= MAX_CONNECTIONS {
            self.rst_reply(h);
            return;
        }
        let path = port_path(&self.uds_path, h.dst_port);
        let mut stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connect to {} failed: {e}", path.display());
                self.rst_reply(h);
                return;
            }
        };
        let token = self.alloc_token();
        if ctl
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.rst_reply(h);
            return;
        }
        let mut c = Conn::new(token, stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.send_response = true;
        self.by_token.insert(token, key);
        self.conns.insert(key, c);
        self.schedule(key);
    }

    /// Returns every chain in the tx queue unprocessed, answering each packet with RST (see
    /// [`Vsock::send_transport_reset`]). Bounded by the queue size. Returns whether to
    /// interrupt the guest.
    fn drop_stale_tx(&mut self, act: &mut Active) -> bool {
        let Active { mem, queues, .. } = act;
        let Some(txq) = queues.get_mut(TXQ) else {
            return false;
        };
        let mut used = false;
        for _ in 0..QUEUE_SIZE {
            let Some(chain) = txq.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut hb = [0u8; HDR_SIZE];
            if let Ok(mut r) = Reader::new(&*mem, chain) {
                if r.available_bytes() >= HDR_SIZE && r.read_exact(&mut hb).is_ok() {
                    let h = Header::decode(&hb);
                    if h.src_cid == self.cid && h.dst_cid == HOST_CID {
                        self.rst_reply(&h);
                    }
                }
            }
            if txq.add_used(&*mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used && txq.needs_notification(&*mem).unwrap_or(true)
    }

    /// Takes packets from the tx queue. Returns (chains used, more left).
    fn process_tx(&mut self, ctl: &EventCtl<'_>, act: &mut Active) -> (bool, bool) {
        let Active { mem, queues, .. } = act;
        let Some(txq) = queues.get_mut(TXQ) else {
            return (false, false);
        };
        let mut used = false;
        for _ in 0..TX_BUDGET {
            let Some(chain) = txq.pop_descriptor_chain(&*mem) else {
                return (used, false);
            };
            let head = chain.head_index();
            match Reader::new(&*mem, chain) {
                Ok(mut r) => self.handle_tx(ctl, &mut r),
                Err(e) => tracing::debug!("vsock: bad tx chain: {e}"),
            }
            if txq.add_used(&*mem, head, 0).is_err() {
                return (used, false);
            }
            used = true;
        }
        (used, true)
    }

    /// Fills rx chains with pending packets. Returns whether chains were used.
    fn process_rx(&mut self, ctl: &EventCtl<'_>, act: &mut Active) -> bool {
        let Active { mem, queues, .. } = act;
        let Some(rxq) = queues.get_mut(RXQ) else {
            return false;
        };
        let mut used = false;
        let mut refill = Vec::new();
        loop {
            // Pick what to send before taking a chain.
            let key = if self.orphan_rst.is_empty() {
                let mut found = None;
                while let Some(k) = self.rxq.pop_front() {
                    match self.conns.get_mut(&k) {
                        Some(c) if c.has_rx_work() => {
                            found = Some(k);
                            break;
                        }
                        Some(c) => c.in_rxq = false,
                        None => {}
                    }
                }
                match found {
                    Some(k) => Some(k),
                    None => break,
                }
            } else {
                None
            };
            let Some(chain) = rxq.pop_descriptor_chain(&*mem) else {
                if let Some(k) = key {
                    self.rxq.push_front(k);
                }
                break;
            };
            let head = chain.head_index();
            let mut w = match Writer::new(&*mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_SIZE => w,
                _ => {
                    // Unusable buffer: give it back empty, keep the packet.
                    if let Some(k) = key {
                        self.rxq.push_front(k);
                    }
                    if rxq.add_used(&*mem, head, 0).is_err() {
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let max_payload = (w.available_bytes() - HDR_SIZE).min(MAX_PKT_PAYLOAD as usize);
            let mut written = 0u32;
            let mut failed = false;
            match key {
                None => {
                    if let Some(h) = self.orphan_rst.pop_front() {
                        failed = w.write_all(&h.encode()).is_err();
                        written = HDR_SIZE as u32;
                    }
                }
                Some(k) => {
                    let cid = self.cid;
                    if let Some(c) = self.conns.get_mut(&k) {
                        if let Some(h) = c.next_packet(cid, max_payload) {
                            let n = h.len as usize;
                            failed = w.write_all(&h.encode()).is_err()
                                || w.write_all(&c.rx_buf[..n]).is_err();
                            c.rx_buf.drain(..n);
                            written = (HDR_SIZE + n) as u32;
                            if n > 0 && c.readable {
                                refill.push(k);
                            }
                        }
                        if c.has_rx_work() {
                            self.rxq.push_back(k);
                        } else {
                            c.in_rxq = false;
                        }
                    }
                    if failed {
                        self.kill(ctl, k, true);
                    }
                }
            }
            if rxq
                .add_used(&*mem, head, if failed { 0 } else { written })
                .is_err()
            {
                break;
            }
            used = true;
            // Space freed towards the guest: read more from those sockets.
            for k in refill.drain(..) {
                if let Some(c) = self.conns.get_mut(&k) {
                    if c.fill_rx().is_err() {
                        self.kill(ctl, k, true);
                    } else {
                        self.schedule(k);
                    }
                }
            }
        }
        used
    }

    fn process(&mut self, ctl: &EventCtl<'_>) {
        if std::mem::take(&mut self.reset_pending) {
            self.teardown(ctl);
        }
        let Some(mut act) = self.active.take() else {
            return;
        };
        let mut notify = false;
        if std::mem::take(&mut self.stale_tx) {
            notify |= self.drop_stale_tx(&mut act);
        }
        if self.transport_reset_pending {
            let (sent, n) = send_transport_reset(&mut act);
            self.transport_reset_pending = !sent;
            notify |= n;
        }
        let (tx_used, more) = self.process_tx(ctl, &mut act);
        let rx_used = self.process_rx(ctl, &mut act);
        for (q, used) in [(TXQ, tx_used), (RXQ, rx_used)] {
            if used {
                if let Some(queue) = act.queues.get_mut(q) {
                    notify |= queue.needs_notification(&act.mem).unwrap_or(true);
                }
            }
        }
        if notify {
            act.interrupt.signal_used_queue();
        }
        self.active = Some(act);
        if more {
            if let Some(w) = &self.self_wake {
                w.wake();
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let a = self.conns.values().filter_map(|c| c.deadline).min();
        let b = self.handshakes.values().map(|h| h.deadline).min();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn timer(&mut self, ctl: &EventCtl<'_>, now: Instant) {
        let expired: Vec<usize> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            if let Some(mut h) = self.handshakes.remove(&t) {
                let _ = ctl.deregister(&mut h.stream);
            }
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            self.kill(ctl, k, true);
        }
    }
}

/// Writes one TRANSPORT_RESET event (`le32 id = 0`) into the next usable event-queue buffer
/// (unusable ones are returned empty). Returns whether it was sent and whether to interrupt.
fn send_transport_reset(act: &mut Active) -> (bool, bool) {
    const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
    let Active { mem, queues, .. } = act;
    let Some(evq) = queues.get_mut(EVQ) else {
        return (false, false);
    };
    let mut used = false;
    let mut sent = false;
    // Bounded by the queue size: each round consumes one chain.
    for _ in 0..QUEUE_SIZE {
        let Some(chain) = evq.pop_descriptor_chain(&*mem) else {
            break;
        };
        let head = chain.head_index();
        let len = match Writer::new(&*mem, chain) {
            Ok(mut w) if w.available_bytes() >= 4 => w
                .write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes())
                .map_or(0, |_| 4),
            _ => 0,
        };
        if evq.add_used(&*mem, head, len).is_err() {
            break;
        }
        used = true;
        if len == 4 {
            sent = true;
            break;
        }
    }
    let notify = used && evq.needs_notification(&*mem).unwrap_or(true);
    (sent, notify)
}

/// The backend's face on the event loop.
struct VsockHandler {
    shared: Arc<Mutex<Backend>>,
}

impl EventHandler for VsockHandler {
    fn register(&mut self, ctl: &EventCtl<'_>) -> io::Result<()> {
        let mut b = lock(&self.shared);
        ctl.register(&mut b.listener, LISTENER_TOKEN, Interest::READABLE)
    }

    fn ready(&mut self, ctl: &EventCtl<'_>, token: usize, r: Readiness) {
        let mut b = lock(&self.shared);
        if token == LISTENER_TOKEN {
            b.accept(ctl);
        } else if b.handshakes.contains_key(&token) {
            b.handshake_ready(ctl, token);
        } else if let Some(&key) = b.by_token.get(&token) {
            b.conn_ready(ctl, key, r);
        }
    }

    fn woken(&mut self, _ctl: &EventCtl<'_>) {}

    fn after_events(&mut self, ctl: &EventCtl<'_>) {
        lock(&self.shared).process(ctl);
    }

    fn deadline(&self) -> Option<Instant> {
        lock(&self.shared).deadline()
    }

    fn timer(&mut self, ctl: &EventCtl<'_>, now: Instant) {
        lock(&self.shared).timer(ctl, now);
    }
}

#[cfg(test)]
mod tests;
