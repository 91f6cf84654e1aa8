//! Where the guest's frames go: one [`NetBackend`] trait, three backends.
//!
//! - [`StreamBackend`]: a Unix stream socket, each frame preceded by its length as a 4-byte
//!   big-endian number (passt `--fd`/`-s`, gvproxy `-listen-qemu`, QEMU `-netdev stream`).
//!   Partial reads and writes on the non-blocking socket are resumed; what is buffered is at
//!   most one frame each way.
//! - [`DgramBackend`]: a connected Unix datagram socket, one frame per datagram (gvproxy
//!   `-listen-vfkit`, vmnet-helper).
//! - [`TapBackend`] (Linux): a tap device with `IFF_VNET_HDR`, so frames carry the 12-byte
//!   virtio-net header and offloads can be negotiated with the guest.
//! - [`NullBackend`]: no network: nothing arrives, every frame sent is dropped. The card of a
//!   VM template (the run plugs its own backend into the restored card); it offers the same
//!   features as the backend it stands for.
//!
//! Every backend is built from an already-open descriptor where that makes sense, so the VMM
//! can hand over one end of a socketpair it shares with passt. Backends never block: they
//! report "would block" and the device waits for readiness on [`NetBackend::fd`].

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use rustix::net::{RecvAncillaryBuffer, RecvFlags, SendAncillaryBuffer};

use super::sys;
use super::MAX_FRAME_LEN;

/// Outcome of [`NetBackend::recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// A whole frame of this many bytes is at the start of the buffer.
    Frame(usize),
    /// Nothing (more) to read now; wait for readability.
    WouldBlock,
    /// A frame was read and discarded (longer than the buffer, or empty); read again.
    Dropped,
}

/// Outcome of [`NetBackend::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The frame was taken (written, or its unwritten tail kept by the backend).
    Done,
    /// Nothing was taken; offer the same frame again once the descriptor is writable.
    WouldBlock,
    /// The frame was discarded (the peer refused it, e.g. no receiver yet).
    Dropped,
}

/// A host-side network backend. All methods are called on the device's event-loop thread and
/// never block.
pub trait NetBackend: Send + std::fmt::Debug {
    /// Whether frames in both directions start with the 12-byte virtio-net header (tap with
    /// `IFF_VNET_HDR`). Only then are checksum and segmentation offloads offered to the guest.
    fn vnet_hdr(&self) -> bool {
        false
    }
    /// The descriptor to watch for readability and writability.
    fn fd(&self) -> RawFd;
    /// Reads one frame into `buf` (frames longer than `buf` are dropped). A backend may keep a
    /// partly received frame in `buf` between calls: the caller passes the same buffer, and
    /// leaves it alone, until a frame is returned. `Err` means the backend is unusable.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Recv>;
    /// Sends one frame (at most [`MAX_FRAME_LEN`] bytes, plus the header with
    /// [`NetBackend::vnet_hdr`]). `Err` means the backend is unusable.
    fn send(&mut self, frame: &[u8]) -> io::Result<Sent>;
    /// Writes out what a previous [`NetBackend::send`] kept; `Ok(true)` when nothing is left.
    fn flush(&mut self) -> io::Result<bool> {
        Ok(true)
    }
    /// Sets the receive offloads the guest accepted (`TUN_F_*` flags), for backends with the
    /// virtio-net header.
    fn set_offloads(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Unix stream with a 4-byte big-endian length before each frame.
#[derive(Debug)]
pub struct StreamBackend {
    fd: OwnedFd,
    /// Length prefix being read, and how many of its bytes arrived.
    hdr: [u8; 4],
    hdr_got: usize,
    /// Length of the frame being read (valid once `hdr_got == 4`) and bytes of it read.
    frame_len: usize,
    frame_got: usize,
    /// Bytes of an oversized frame still to be read and discarded.
    skip: usize,
    /// Unwritten tail of the last frame sent (prefix included), capacity 4 + MAX_FRAME_LEN.
    out: Vec<u8>,
    out_pos: usize,
}

impl StreamBackend {
    /// A backend over a connected Unix stream socket (made non-blocking here).
    pub fn new(fd: OwnedFd) -> io::Result<StreamBackend> {
        sys::prepare_socket(&fd)?;
        Ok(StreamBackend {
            fd,
            hdr: [0; 4],
            hdr_got: 0,
            frame_len: 0,
            frame_got: 0,
            skip: 0,
            out: Vec::with_capacity(4 + MAX_FRAME_LEN + super::VNET_HDR_LEN),
            out_pos: 0,
        })
    }

    /// Connects to a listening Unix stream socket (passt `-s PATH`, gvproxy `-listen-qemu`).
    pub fn connect(path: &Path) -> io::Result<StreamBackend> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        StreamBackend::new(OwnedFd::from(s))
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::io::read(&self.fd, &mut *buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl NetBackend for StreamBackend {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Recv> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len()).max(1);
                let mut one = [0u8; 1];
                let scratch = if buf.is_empty() {
                    &mut one[..]
                } else {
                    &mut buf[..n]
                };
                match self.read(scratch) {
                    Ok(k) => {
                        self.skip -= k;
                        if self.skip == 0 {
                            return Ok(Recv::Dropped);
                        }
                    }
                    Err(e) if would_block(&e) => return Ok(Recv::WouldBlock),
                    Err(e) => return Err(e),
                }
                continue;
            }
            if self.hdr_got < 4 {
                let mut hdr = self.hdr;
                let r = self.read(&mut hdr[self.hdr_got..]);
                self.hdr = hdr;
                match r {
                    Ok(k) => self.hdr_got += k,
                    Err(e) if would_block(&e) => return Ok(Recv::WouldBlock),
                    Err(e) => return Err(e),
                }
                if self.hdr_got < 4 {
                    continue;
                }
                self.frame_len = u32::from_be_bytes(self.hdr) as usize;
                self.frame_got = 0;
                if self.frame_len == 0 || self.frame_len > buf.len() {
                    self.skip = self.frame_len;
                    self.hdr_got = 0;
                    if self.skip == 0 {
                        return Ok(Recv::Dropped);
                    }
                    continue;
                }
            }
            let Some(dst) = buf.get_mut(self.frame_got..self.frame_len) else {
                // The caller changed buffers mid-frame: drop the rest of the frame.
                self.skip = self.frame_len.saturating_sub(self.frame_got);
                self.hdr_got = 0;
                if self.skip == 0 {
                    return Ok(Recv::Dropped);
                }
                continue;
            };
            match self.read(dst) {
                Ok(k) => self.frame_got += k,
                Err(e) if would_block(&e) => return Ok(Recv::WouldBlock),
                Err(e) => return Err(e),
            }
            if self.frame_got == self.frame_len {
                self.hdr_got = 0;
                return Ok(Recv::Frame(self.frame_len));
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<Sent> {
        if !self.flush()? {
            return Ok(Sent::WouldBlock);
        }
        let Ok(len) = u32::try_from(frame.len()) else {
            return Ok(Sent::Dropped);
        };
        if frame.is_empty() || frame.len() > self.out.capacity() - 4 {
            return Ok(Sent::Dropped);
        }
        let prefix = len.to_be_bytes();
        let iov = [IoSlice::new(&prefix), IoSlice::new(frame)];
        let n = loop {
            match rustix::net::sendmsg(
                &self.fd,
                &iov,
                &mut SendAncillaryBuffer::default(),
                sys::SEND_FLAGS,
            ) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(Sent::WouldBlock),
                Err(e) => return Err(e.into()),
            }
        };
        let total = 4 + frame.len();
        if n < total {
            // Keep the tail (no allocation: `out` has room for a whole frame).
            self.out.clear();
            if n < 4 {
                self.out.extend_from_slice(&prefix[n..]);
                self.out.extend_from_slice(frame);
            } else {
                self.out.extend_from_slice(&frame[n - 4..]);
            }
            self.out_pos = 0;
        }
        Ok(Sent::Done)
    }

    fn flush(&mut self) -> io::Result<bool> {
        while self.out_pos < self.out.len() {
            match rustix::net::send(&self.fd, &self.out[self.out_pos..], sys::SEND_FLAGS) {
                Ok(n) => self.out_pos += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }
}

/// A connected Unix datagram socket, one frame per datagram.
#[derive(Debug)]
pub struct DgramBackend {
    fd: OwnedFd,
}

/// The datagram vfkit-style clients send first so gvproxy learns their address.
pub const VFKIT_MAGIC: &[u8; 4] = b"VFKT";

impl DgramBackend {
    /// A backend over a connected Unix datagram socket (made non-blocking here).
    pub fn new(fd: OwnedFd) -> io::Result<DgramBackend> {
        sys::prepare_socket(&fd)?;
        Ok(DgramBackend { fd })
    }

    /// Binds a datagram socket at `local` (the peer sends to that address) and connects it to
    /// `remote` (gvproxy `-listen-vfkit unixgram://…`, vmnet-helper). A stale socket file at
    /// `local` is replaced.
    pub fn connect(local: &Path, remote: &Path) -> io::Result<DgramBackend> {
        let _ = std::fs::remove_file(local);
        let s = std::os::unix::net::UnixDatagram::bind(local)?;
        s.connect(remote)?;
        DgramBackend::new(OwnedFd::from(s))
    }

    /// Sends gvproxy's `VFKT` greeting (gvproxy learns the peer from it and drops it).
    pub fn send_vfkit_magic(&self) -> io::Result<()> {
        rustix::net::send(&self.fd, VFKIT_MAGIC, sys::SEND_FLAGS)?;
        Ok(())
    }
}

impl NetBackend for DgramBackend {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Recv> {
        let mut spare = [0u8; 1];
        loop {
            let want = buf.len();
            let mut iov = [IoSliceMut::new(&mut *buf), IoSliceMut::new(&mut spare)];
            match rustix::net::recvmsg(
                &self.fd,
                &mut iov,
                &mut RecvAncillaryBuffer::default(),
                RecvFlags::empty(),
            ) {
                // A longer datagram filled the spare byte: it was truncated.
                Ok(m) if m.bytes == 0 || m.bytes > want => return Ok(Recv::Dropped),
                Ok(m) => return Ok(Recv::Frame(m.bytes)),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(Recv::WouldBlock),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<Sent> {
        loop {
            match rustix::net::send(&self.fd, frame, sys::SEND_FLAGS) {
                Ok(_) => return Ok(Sent::Done),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(Sent::WouldBlock),
                // No receiver yet / gone for now / too big for the peer: drop the frame.
                Err(
                    rustix::io::Errno::CONNREFUSED
                    | rustix::io::Errno::NOBUFS
                    | rustix::io::Errno::MSGSIZE
                    | rustix::io::Errno::NOENT,
                ) => return Ok(Sent::Dropped),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A tap device with `IFF_VNET_HDR` (Linux): frames carry the 12-byte virtio-net header.
#[derive(Debug)]
pub struct TapBackend {
    fd: OwnedFd,
}

impl TapBackend {
    /// Opens (or creates) tap interface `name` in the calling thread's network namespace.
    pub fn open(name: &str) -> io::Result<TapBackend> {
        Ok(TapBackend {
            fd: sys::open_tap(name)?,
        })
    }

    /// A backend over an already configured, non-blocking tap descriptor (`IFF_TAP |
    /// IFF_NO_PI | IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12).
    pub fn from_fd(fd: OwnedFd) -> TapBackend {
        TapBackend { fd }
    }

    fn borrowed(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetBackend for TapBackend {
    fn vnet_hdr(&self) -> bool {
        true
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Recv> {
        loop {
            match rustix::io::read(&self.fd, &mut *buf) {
                Ok(n) if n <= super::VNET_HDR_LEN => return Ok(Recv::Dropped),
                Ok(n) => return Ok(Recv::Frame(n)),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(Recv::WouldBlock),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<Sent> {
        loop {
            match rustix::io::write(&self.fd, frame) {
                Ok(_) => return Ok(Sent::Done),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(Sent::WouldBlock),
                // The kernel refused this frame (bad GSO header, interface down): drop it.
                Err(
                    rustix::io::Errno::INVAL | rustix::io::Errno::IO | rustix::io::Errno::NOBUFS,
                ) => return Ok(Sent::Dropped),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()> {
        match sys::set_tap_offload(self.borrowed(), tun_flags) {
            // Kernels without UFO on tap refuse the flag: the guest then never gets UFO frames.
            Err(_) if tun_flags & sys::tun_f::UFO != 0 => {
                sys::set_tap_offload(self.borrowed(), tun_flags & !sys::tun_f::UFO)
            }
            r => r,
        }
    }
}

/// No network: nothing is ever received and every frame sent is dropped. It stands for a
/// backend with (or without) the virtio-net header, so a card made with it offers the same
/// features as one over that backend.
#[derive(Debug)]
pub struct NullBackend {
    vnet_hdr: bool,
    fd: std::os::unix::net::UnixDatagram,
    _peer: std::os::unix::net::UnixDatagram,
}

impl NullBackend {
    /// A null backend standing for one with (`vnet_hdr`) or without the virtio-net header.
    pub fn new(vnet_hdr: bool) -> io::Result<NullBackend> {
        let (fd, peer) = std::os::unix::net::UnixDatagram::pair()?;
        fd.set_nonblocking(true)?;
        Ok(NullBackend {
            vnet_hdr,
            fd,
            _peer: peer,
        })
    }
}

impl NetBackend for NullBackend {
    fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<Recv> {
        Ok(Recv::WouldBlock)
    }

    fn send(&mut self, _frame: &[u8]) -> io::Result<Sent> {
        Ok(Sent::Dropped)
    }
}
