//! Hosts without tap devices (macOS): opening a tap fails with `Unsupported`.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

/// Tap devices exist on Linux only.
pub fn open_tap(_name: &str) -> io::Result<OwnedFd> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "tap devices are Linux-only",
    ))
}

/// Tap devices exist on Linux only.
pub fn set_tap_offload(_fd: BorrowedFd<'_>, _flags: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "tap devices are Linux-only",
    ))
}

/// `TUN_F_*` offload flags (values of Linux `if_tun.h`; unused off Linux).
pub mod tun_f {
    /// Checksum offload.
    pub const CSUM: u32 = 0x01;
    /// TCP segmentation offload, IPv4.
    pub const TSO4: u32 = 0x02;
    /// TCP segmentation offload, IPv6.
    pub const TSO6: u32 = 0x04;
    /// UDP fragmentation offload.
    pub const UFO: u32 = 0x10;
}
