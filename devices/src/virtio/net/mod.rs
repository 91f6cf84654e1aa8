//! virtio-net (device type 1): one rx and one tx queue, served on an [`EventLoop`] thread,
//! frames exchanged with a host [`NetBackend`] (Unix stream or datagram socket, or a Linux
//! tap device).
//!
//! Features: `VERSION_1`, `MAC`, `STATUS` (link always up), `MTU`, `MRG_RXBUF`. Checksum and
//! segmentation offloads (`CSUM`, `GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_UFO`, `HOST_TSO4/6`,
//! `HOST_UFO`) are offered only when the backend carries the virtio-net header itself (tap with
//! `IFF_VNET_HDR`): the header then goes to and comes from the backend as is, and the guest's
//! receive offloads are passed to the tap (`TUNSETOFFLOAD`). Other backends get bare Ethernet
//! frames; the device strips the 12-byte header on tx and writes a zeroed one on rx.
//!
//! Guest input is hostile. Descriptor chains are walked descriptor by descriptor (no `Reader`
//! or `Writer`, which allocate) into two frame buffers allocated once, so nothing is allocated
//! per packet. A tx chain that is shorter than a header plus an Ethernet header, longer than
//! [`MAX_TX_CHAIN`] bytes, holds a device-writable descriptor, loops or leaves guest memory is
//! dropped and counted; an rx chain shorter than the header, holding a device-readable
//! descriptor, looping or leaving guest memory is returned empty and counted; a frame that does
//! not fit in the guest's buffers is dropped and counted. `virtio-queue` bounds every chain walk
//! to the queue size (or indirect table size) and a chain to 4 GiB in total; the device marks a
//! chain that was cut short (its last descriptor still says "next") as malformed. Each wakeup
//! handles at most [`TX_BUDGET`] tx chains and [`RX_BUDGET`] rx frames before yielding.
//!
//! Backpressure: at most one received frame waits in the device. While the guest has no rx
//! buffers for it the backend is not read (its socket buffer fills and the peer waits); while
//! the backend cannot take a frame the tx queue is not read.
//!
//! Threads: [`Net`] lives in the transport and is called on vCPU threads; it only hands the
//! queues over at activation and wakes the worker. The worker does all queue and backend work
//! on the event-loop thread.

pub mod backend;
mod sys;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mio::unix::SourceFd;
use mio::Interest;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use self::backend::{NetBackend, Recv, Sent};
use super::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::event_loop::{EventCtl, EventHandler, EventLoop, Readiness, WakeHandle};

pub use self::backend::{DgramBackend, NullBackend, StreamBackend, TapBackend};

/// Virtio device type of a network card.
pub const NET_DEVICE_TYPE: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `virtio_net_hdr_v1` (with `VERSION_1` the header always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame passed either way (a 64 KiB GSO frame plus its link header).
pub const MAX_FRAME_LEN: usize = 65_550;
/// Largest tx chain: the virtio-net header plus [`MAX_FRAME_LEN`].
pub const MAX_TX_CHAIN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Smallest frame accepted from the guest (an Ethernet header).
pub const MIN_FRAME_LEN: usize = 14;
/// Default MTU reported in config space.
pub const DEFAULT_MTU: u16 = 1500;
/// Tx chains handled per wakeup before other events get a turn.
pub const TX_BUDGET: usize = 256;
/// Rx frames handled per wakeup before other events get a turn.
pub const RX_BUDGET: usize = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const BACKEND_TOKEN: usize = 0;

/// virtio-net feature bits (virtio 1.2 §5.1.3).
pub mod features {
    /// The device handles packets with partial checksum (guest → host).
    pub const CSUM: u32 = 0;
    /// The driver handles packets with partial checksum (host → guest).
    pub const GUEST_CSUM: u32 = 1;
    /// The device reports its maximum MTU.
    pub const MTU: u32 = 3;
    /// The device has a MAC address in config space.
    pub const MAC: u32 = 5;
    /// The driver can receive TSOv4.
    pub const GUEST_TSO4: u32 = 7;
    /// The driver can receive TSOv6.
    pub const GUEST_TSO6: u32 = 8;
    /// The driver can receive UFO.
    pub const GUEST_UFO: u32 = 10;
    /// The device can receive TSOv4.
    pub const HOST_TSO4: u32 = 11;
    /// The device can receive TSOv6.
    pub const HOST_TSO6: u32 = 12;
    /// The device can receive UFO.
    pub const HOST_UFO: u32 = 14;
    /// The driver can merge receive buffers.
    pub const MRG_RXBUF: u32 = 15;
    /// Config space has a status field.
    pub const STATUS: u32 = 16;
}

/// Config-space status bit: the link is up.
pub const STATUS_LINK_UP: u16 = 1;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features offered with every backend.
pub const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(features::MAC)
    | bit(features::STATUS)
    | bit(features::MTU)
    | bit(features::MRG_RXBUF);

/// Offload features, offered only with a backend that carries the virtio-net header.
pub const OFFLOAD_FEATURES: u64 = bit(features::CSUM)
    | bit(features::GUEST_CSUM)
    | bit(features::GUEST_TSO4)
    | bit(features::GUEST_TSO6)
    | bit(features::GUEST_UFO)
    | bit(features::HOST_TSO4)
    | bit(features::HOST_TSO6)
    | bit(features::HOST_UFO);

/// Errors of the net device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MTU is outside 68..=65 535 - 14 or larger than the frame limit allows.
    #[error("invalid MTU {0} (68..={max})", max = MAX_FRAME_LEN - MIN_FRAME_LEN)]
    InvalidMtu(u16),
    /// The MAC address is multicast or all zeros.
    #[error("invalid MAC address {0}")]
    InvalidMac(String),
    /// A backend could not be opened or set up.
    #[error("network backend: {0}")]
    Backend(#[source] io::Error),
    /// Adding the worker to the event loop failed.
    #[error(transparent)]
    EventLoop(#[from] crate::event_loop::Error),
}

/// Formats a MAC address as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let p: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    p.join(":")
}

/// What the guest is told about the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
}

impl NetConfig {
    /// A config with `mac` and [`DEFAULT_MTU`].
    pub fn new(mac: [u8; 6]) -> Self {
        NetConfig {
            mac,
            mtu: DEFAULT_MTU,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.mtu < 68 || usize::from(self.mtu) > MAX_FRAME_LEN - MIN_FRAME_LEN {
            return Err(Error::InvalidMtu(self.mtu));
        }
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(Error::InvalidMac(format_mac(&self.mac)));
        }
        Ok(())
    }

    fn bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }
}

/// Counters of the device (monotonic; readable from any thread).
#[derive(Debug, Default)]
pub struct NetStats {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_empty: AtomicU64,
    tx_too_big: AtomicU64,
    tx_write_only: AtomicU64,
    tx_bad_chain: AtomicU64,
    tx_dropped: AtomicU64,
    rx_bad_buffers: AtomicU64,
    rx_dropped: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames handed to the backend.
    pub tx_frames: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames put in the guest's rx buffers.
    pub rx_frames: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: u64,
    /// Tx chains dropped: empty, or shorter than a header plus an Ethernet header.
    pub tx_empty: u64,
    /// Tx chains dropped: longer than [`MAX_TX_CHAIN`].
    pub tx_too_big: u64,
    /// Tx chains dropped: a device-writable descriptor.
    pub tx_write_only: u64,
    /// Tx chains dropped: a descriptor loop, a chain cut short, or memory outside the guest.
    pub tx_bad_chain: u64,
    /// Well-formed tx frames the backend refused or could not take (backend gone).
    pub tx_dropped: u64,
    /// Rx chains returned empty: too short for the header, device-readable, looping, or
    /// outside guest memory.
    pub rx_bad_buffers: u64,
    /// Received frames dropped: too big for the guest's buffers or for the device, or empty.
    pub rx_dropped: u64,
}

impl NetCounters {
    /// All malformed tx chains.
    pub fn tx_malformed(&self) -> u64 {
        self.tx_empty + self.tx_too_big + self.tx_write_only + self.tx_bad_chain
    }
}

fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

impl NetStats {
    /// The current values.
    pub fn snapshot(&self) -> NetCounters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCounters {
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            tx_empty: l(&self.tx_empty),
            tx_too_big: l(&self.tx_too_big),
            tx_write_only: l(&self.tx_write_only),
            tx_bad_chain: l(&self.tx_bad_chain),
            tx_dropped: l(&self.tx_dropped),
            rx_bad_buffers: l(&self.rx_bad_buffers),
            rx_dropped: l(&self.rx_dropped),
        }
    }
}

/// The net device's front end (the part the transport talks to). Create it with
/// [`Net::new`], which also puts its worker on an [`EventLoop`].
pub struct Net {
    config: NetConfig,
    avail_features: u64,
    acked_features: u64,
    shared: Arc<Mutex<Worker>>,
    wake: WakeHandle,
    stats: Arc<NetStats>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &format_mac(&self.config.mac))
            .field("mtu", &self.config.mtu)
            .finish()
    }
}

fn lock(m: &Mutex<Worker>) -> MutexGuard<'_, Worker> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Net {
    /// A network card described by `config`, exchanging frames with `backend`. The worker is
    /// added to `event_loop`, which must then run ([`EventLoop::spawn`]).
    pub fn new(
        config: NetConfig,
        backend: Box<dyn NetBackend>,
        event_loop: &mut EventLoop,
    ) -> Result<Net, Error> {
        config.validate()?;
        let avail_features = if backend.vnet_hdr() {
            BASE_FEATURES | OFFLOAD_FEATURES
        } else {
            BASE_FEATURES
        };
        let stats = Arc::new(NetStats::default());
        let shared = Arc::new(Mutex::new(Worker::new(backend, stats.clone())));
        let wake = event_loop.add(Box::new(NetHandler {
            shared: shared.clone(),
        }))?;
        lock(&shared).self_wake = Some(wake.clone());
        Ok(Net {
            config,
            avail_features,
            acked_features: 0,
            shared,
            wake,
            stats,
        })
    }

    /// The device's counters (shared; stays valid after the device moves into a transport).
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    /// A handle that describes the worker's state (for diagnostics).
    pub fn probe(&self) -> NetProbe {
        NetProbe {
            shared: self.shared.clone(),
        }
    }
}

/// Reads the worker's state for diagnostics: queue indices, pending frames, readiness.
pub struct NetProbe {
    shared: Arc<Mutex<Worker>>,
}

impl std::fmt::Debug for NetProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetProbe")
    }
}

impl NetProbe {
    /// One line: counters, pending frames, readiness and each queue's indices.
    pub fn describe(&self) -> String {
        let w = lock(&self.shared);
        let c = w.stats.snapshot();
        let mut s = format!(
            "tx {} frames {} B, rx {} frames {} B, tx_dropped {} rx_dropped {} malformed {} rx_bad {}; tx_pending {:?} rx_pending {:?} readable {} writable {} dead {}",
            c.tx_frames, c.tx_bytes, c.rx_frames, c.rx_bytes, c.tx_dropped, c.rx_dropped,
            c.tx_malformed(), c.rx_bad_buffers, w.tx_pending, w.rx_pending, w.readable, w.writable, w.dead
        );
        if let Some(a) = &w.active {
            for (i, q) in a.queues.iter().enumerate() {
                let avail = q
                    .avail_idx(&a.mem, Ordering::Acquire)
                    .map(|x| x.0.to_string())
                    .unwrap_or_default();
                s.push_str(&format!(
                    "; q{i} avail {avail} next_avail {} next_used {}",
                    q.next_avail(),
                    q.next_used()
                ));
            }
        }
        s
    }
}

/// `TUN_F_*` flags for the receive offloads in `acked`.
fn tun_offloads(acked: u64) -> u32 {
    let has = |b: u32| acked & bit(b) != 0;
    if !has(features::GUEST_CSUM) {
        return 0;
    }
    let mut f = sys::tun_f::CSUM;
    if has(features::GUEST_TSO4) {
        f |= sys::tun_f::TSO4;
    }
    if has(features::GUEST_TSO6) {
        f |= sys::tun_f::TSO6;
    }
    if has(features::GUEST_UFO) {
        f |= sys::tun_f::UFO;
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_TYPE
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config.bytes();
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
        &[QUEUE_SIZE; 2]
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), super::Error> {
        if queues.len() != 2 {
            return Err(super::Error::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        let mut w = lock(&self.shared);
        w.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        w.mrg_rxbuf = self.acked_features & bit(features::MRG_RXBUF) != 0;
        w.offloads_pending = w.vnet_hdr.then(|| tun_offloads(self.acked_features));
        drop(w);
        self.wake.wake();
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        self.wake.wake();
    }

    fn reset(&mut self) {
        let mut w = lock(&self.shared);
        w.active = None;
        w.reset_pending = true;
        drop(w);
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

/// Why a tx chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxError {
    Empty,
    TooBig,
    WriteOnly,
    BadChain,
}

/// Copies a tx chain into `buf`; returns the bytes copied (header included).
fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, TxError> {
    let mut total = 0usize;
    let mut cut_short = false;
    for desc in chain {
        cut_short = desc.has_next();
        if desc.is_write_only() {
            return Err(TxError::WriteOnly);
        }
        let len = desc.len() as usize;
        let end = total.checked_add(len).ok_or(TxError::TooBig)?;
        let dst = buf.get_mut(total..end).ok_or(TxError::TooBig)?;
        mem.read_slice(dst, desc.addr())
            .map_err(|_| TxError::BadChain)?;
        total = end;
    }
    if cut_short {
        // The walk stopped on a descriptor that still points on: a loop, or an index out of
        // the table.
        return Err(TxError::BadChain);
    }
    if total < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(TxError::Empty);
    }
    Ok(total)
}

/// Writes `data` into an rx chain's device-writable buffers after skipping `skip` bytes;
/// returns the bytes of `data` written, or `None` for a malformed chain (a device-readable
/// descriptor, a loop, memory outside the guest, less room than a header).
fn write_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    skip: usize,
    data: &[u8],
) -> Option<usize> {
    let mut capacity = 0usize;
    let mut written = 0usize;
    let mut skip = skip;
    let mut cut_short = false;
    for desc in chain {
        cut_short = desc.has_next();
        if !desc.is_write_only() {
            return None;
        }
        let len = desc.len() as usize;
        capacity = capacity.saturating_add(len);
        let s = skip.min(len);
        skip -= s;
        let n = (len - s).min(data.len() - written);
        if n > 0 {
            let addr = desc.addr().checked_add(s as u64)?;
            mem.write_slice(&data[written..written + n], addr).ok()?;
            written += n;
        }
    }
    if cut_short || capacity < VNET_HDR_LEN {
        return None;
    }
    Some(written)
}

/// Outcome of offering one frame to the rx queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deliver {
    /// The frame is in the guest's buffers.
    Done,
    /// Not enough rx buffers yet (none consumed): try again after the guest adds some.
    NoBuffers,
    /// The frame can never fit the guest's buffers: drop it (none consumed).
    TooBig,
}

/// The backend side, run on the event-loop thread.
struct Worker {
    backend: Box<dyn NetBackend>,
    vnet_hdr: bool,
    stats: Arc<NetStats>,
    active: Option<Active>,
    reset_pending: bool,
    mrg_rxbuf: bool,
    offloads_pending: Option<u32>,
    self_wake: Option<WakeHandle>,
    readable: bool,
    writable: bool,
    /// The backend failed (peer closed, I/O error): tx frames are dropped, nothing is read.
    dead: bool,
    /// Tx frame buffer: header + frame as the guest wrote them.
    tx_buf: Vec<u8>,
    /// Length in `tx_buf` of a frame the backend could not take yet.
    tx_pending: Option<usize>,
    /// Rx frame buffer: header + frame.
    rx_buf: Vec<u8>,
    /// Length in `rx_buf` of a received frame waiting for guest buffers.
    rx_pending: Option<usize>,
    /// (head, used length) of the chains filled for one frame.
    rx_chains: Vec<(u16, u32)>,
}

impl Worker {
    fn new(backend: Box<dyn NetBackend>, stats: Arc<NetStats>) -> Worker {
        Worker {
            vnet_hdr: backend.vnet_hdr(),
            backend,
            stats,
            active: None,
            reset_pending: false,
            mrg_rxbuf: false,
            offloads_pending: None,
            self_wake: None,
            readable: true,
            writable: true,
            dead: false,
            tx_buf: vec![0; MAX_TX_CHAIN],
            tx_pending: None,
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            rx_chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        }
    }

    fn backend_failed(&mut self, what: &str, e: &io::Error) {
        if !self.dead {
            tracing::warn!("virtio-net: backend {what} failed, link unusable: {e}");
        }
        self.dead = true;
    }

    /// Offers the frame in `tx_buf[..len]` to the backend.
    fn send_frame(&mut self, len: usize) -> Sent {
        let frame = if self.vnet_hdr {
            &self.tx_buf[..len]
        } else {
            &self.tx_buf[VNET_HDR_LEN..len]
        };
        let r = if self.dead {
            Ok(Sent::Dropped)
        } else {
            self.backend.send(frame)
        };
        match r {
            Ok(Sent::Done) => {
                inc(&self.stats.tx_frames, 1);
                inc(&self.stats.tx_bytes, (len - VNET_HDR_LEN) as u64);
                Sent::Done
            }
            Ok(Sent::WouldBlock) => {
                self.writable = false;
                Sent::WouldBlock
            }
            Ok(Sent::Dropped) => {
                inc(&self.stats.tx_dropped, 1);
                Sent::Dropped
            }
            Err(e) => {
                self.backend_failed("send", &e);
                inc(&self.stats.tx_dropped, 1);
                Sent::Dropped
            }
        }
    }

    /// Takes frames from the tx queue. Returns (chains used, more left).
    fn process_tx(&mut self, act: &mut Active) -> (bool, bool) {
        if !self.dead {
            match self.backend.flush() {
                Ok(true) => {}
                Ok(false) => {
                    self.writable = false;
                    return (false, false);
                }
                Err(e) => self.backend_failed("send", &e),
            }
        }
        if let Some(len) = self.tx_pending {
            if !self.writable && !self.dead {
                return (false, false);
            }
            if self.send_frame(len) == Sent::WouldBlock {
                return (false, false);
            }
            self.tx_pending = None;
        }
        let Active { mem, queues, .. } = act;
        let Some(txq) = queues.get_mut(TXQ) else {
            return (false, false);
        };
        let mut used = false;
        // No kicks while the queue is being drained (each kick is a VM exit); re-enabled when
        // it is empty. A write the guest's memory refuses only costs extra kicks.
        let _ = txq.disable_notification(&*mem);
        for _ in 0..TX_BUDGET {
            let Some(chain) = txq.pop_descriptor_chain(&*mem) else {
                // Drained: let the guest kick again, then look once more, since it may have
                // added chains between the last look and the re-enable.
                if txq.enable_notification(&*mem).unwrap_or(false) {
                    let _ = txq.disable_notification(&*mem);
                    continue;
                }
                return (used, false);
            };
            let head = chain.head_index();
            let r = read_tx_chain(mem, chain, &mut self.tx_buf);
            if txq.add_used(&*mem, head, 0).is_err() {
                return (used, false);
            }
            used = true;
            match r {
                Ok(len) => {
                    if self.send_frame(len) == Sent::WouldBlock {
                        self.tx_pending = Some(len);
                        return (used, false);
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-net: malformed tx chain ({e:?}), dropped");
                    let c = match e {
                        TxError::Empty => &self.stats.tx_empty,
                        TxError::TooBig => &self.stats.tx_too_big,
                        TxError::WriteOnly => &self.stats.tx_write_only,
                        TxError::BadChain => &self.stats.tx_bad_chain,
                    };
                    inc(c, 1);
                }
            }
        }
        (used, true)
    }

    /// Puts `rx_buf[..len]` (header + frame) in the guest's rx buffers. Returns the outcome and
    /// whether used entries were added.
    fn deliver(&mut self, mem: &GuestMemoryMmap, rxq: &mut Queue, len: usize) -> (Deliver, bool) {
        let mut any_used = false;
        let mut saved = rxq.next_avail();
        let max_chains = if self.mrg_rxbuf {
            usize::from(rxq.size()).min(self.rx_chains.capacity())
        } else {
            1
        };
        self.rx_chains.clear();
        let mut first = None;
        let mut off = VNET_HDR_LEN;
        while off < len || self.rx_chains.is_empty() {
            if self.rx_chains.len() >= max_chains {
                rxq.set_next_avail(saved);
                return (Deliver::TooBig, any_used);
            }
            let Some(chain) = rxq.pop_descriptor_chain(mem) else {
                rxq.set_next_avail(saved);
                return (Deliver::NoBuffers, any_used);
            };
            let head = chain.head_index();
            let is_first = self.rx_chains.is_empty();
            let keep = is_first.then(|| chain.clone());
            let skip = if is_first { VNET_HDR_LEN } else { 0 };
            match write_rx_chain(mem, chain, skip, &self.rx_buf[off..len]) {
                Some(n) => {
                    if is_first {
                        first = keep;
                    }
                    self.rx_chains.push((head, (skip + n) as u32));
                    off += n;
                }
                None => {
                    // Give this chain, and any taken for this frame, back empty.
                    tracing::debug!("virtio-net: malformed rx chain, returned empty");
                    inc(&self.stats.rx_bad_buffers, 1);
                    for &(h, _) in &self.rx_chains {
                        let _ = rxq.add_used(mem, h, 0);
                    }
                    let _ = rxq.add_used(mem, head, 0);
                    any_used = true;
                    self.rx_chains.clear();
                    first = None;
                    off = VNET_HDR_LEN;
                    saved = rxq.next_avail();
                }
            }
        }
        let nbufs = self.rx_chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&nbufs.to_le_bytes());
        if let Some(f) = first {
            // Validated above: the first chain holds at least the header.
            let _ = write_rx_chain(mem, f, 0, &self.rx_buf[..VNET_HDR_LEN]);
        }
        for &(h, l) in &self.rx_chains {
            if rxq.add_used(mem, h, l).is_err() {
                break;
            }
        }
        (Deliver::Done, true)
    }

    /// Moves frames from the backend to the rx queue. Returns (chains used, more left).
    fn process_rx(&mut self, act: &mut Active) -> (bool, bool) {
        let Active { mem, queues, .. } = act;
        let Some(rxq) = queues.get_mut(RXQ) else {
            return (false, false);
        };
        let mut used = false;
        for _ in 0..RX_BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    if self.dead || !self.readable {
                        return (used, false);
                    }
                    let off = if self.vnet_hdr { 0 } else { VNET_HDR_LEN };
                    match self.backend.recv(&mut self.rx_buf[off..]) {
                        Ok(Recv::Frame(n)) => {
                            if !self.vnet_hdr {
                                self.rx_buf[..VNET_HDR_LEN].fill(0);
                            }
                            self.rx_pending = Some(off + n);
                            off + n
                        }
                        Ok(Recv::WouldBlock) => {
                            self.readable = false;
                            return (used, false);
                        }
                        Ok(Recv::Dropped) => {
                            inc(&self.stats.rx_dropped, 1);
                            continue;
                        }
                        Err(e) => {
                            self.backend_failed("receive", &e);
                            return (used, false);
                        }
                    }
                }
            };
            let (outcome, u) = self.deliver(mem, rxq, len);
            used |= u;
            match outcome {
                Deliver::Done => {
                    self.rx_pending = None;
                    inc(&self.stats.rx_frames, 1);
                    inc(&self.stats.rx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Deliver::NoBuffers => return (used, false),
                Deliver::TooBig => {
                    tracing::debug!("virtio-net: {len}-byte frame does not fit rx buffers");
                    self.rx_pending = None;
                    inc(&self.stats.rx_dropped, 1);
                }
            }
        }
        (used, true)
    }

    fn process(&mut self) {
        if std::mem::take(&mut self.reset_pending) {
            self.tx_pending = None;
            self.rx_pending = None;
        }
        let Some(mut act) = self.active.take() else {
            return;
        };
        if let Some(flags) = self.offloads_pending.take() {
            if let Err(e) = self.backend.set_offloads(flags) {
                tracing::warn!("virtio-net: cannot set tap offloads {flags:#x}: {e}");
            }
        }
        let (tx_used, tx_more) = self.process_tx(&mut act);
        let (rx_used, rx_more) = self.process_rx(&mut act);
        let mut notify = false;
        for (q, used) in [(TXQ, tx_used), (RXQ, rx_used)] {
            if used {
                if let Some(queue) = act.queues.get_mut(q) {
                    notify |= queue.needs_notification(&act.mem).unwrap_or(true)
                        && !interrupt_suppressed(queue, &act.mem);
                }
            }
        }
        if notify {
            act.interrupt.signal_used_queue();
        }
        self.active = Some(act);
        if tx_more || rx_more {
            if let Some(w) = &self.self_wake {
                w.wake();
            }
        }
    }
}

/// Whether the driver set VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags (the device
/// then should not interrupt; Linux sets it while NAPI polls a queue). `virtio-queue` honours
/// only EVENT_IDX, which this device does not offer. An unreadable ring means no.
fn interrupt_suppressed(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map(|f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT != 0)
        .unwrap_or(false)
}

/// The worker's face on the event loop.
struct NetHandler {
    shared: Arc<Mutex<Worker>>,
}

impl EventHandler for NetHandler {
    fn register(&mut self, ctl: &EventCtl<'_>) -> io::Result<()> {
        let fd: RawFd = lock(&self.shared).backend.fd();
        ctl.register(
            &mut SourceFd(&fd),
            BACKEND_TOKEN,
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    fn ready(&mut self, _ctl: &EventCtl<'_>, token: usize, r: Readiness) {
        if token != BACKEND_TOKEN {
            return;
        }
        let mut w = lock(&self.shared);
        if r.readable || r.read_closed || r.error {
            w.readable = true;
        }
        if r.writable || r.write_closed || r.error {
            w.writable = true;
        }
    }

    fn woken(&mut self, _ctl: &EventCtl<'_>) {}

    fn after_events(&mut self, _ctl: &EventCtl<'_>) {
        lock(&self.shared).process();
    }
}

#[cfg(test)]
mod tests;
