//! Linux tap devices: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
//! virtio-net header (`TUNSETVNETHDRSZ`), offloads set with `TUNSETOFFLOAD`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

use super::super::VNET_HDR_LEN;

/// `TUN_F_*` offload flags (Linux `if_tun.h`).
pub mod tun_f {
    /// Checksum offload.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP segmentation offload, IPv4.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP segmentation offload, IPv6.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// UDP fragmentation offload.
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// Opens (creating it if the caller may) the tap interface `name` in the calling thread's
/// network namespace, non-blocking, with a 12-byte virtio-net header on every frame.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let mut req = libc::ifreq {
        ifr_name: [0; libc::IFNAMSIZ],
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "tap name must be 1 to 15 bytes without NUL or '/'",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    let fd = rustix::fs::open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one, initialised, and lives
    // across the call; `fd` is an open /dev/net/tun descriptor.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points at `size`.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    set_tap_offload(rustix::fd::AsFd::as_fd(&fd), 0)?;
    Ok(fd)
}

/// `TUNSETOFFLOAD`: which offloads (`tun_f::*`) the tap may use in frames it gives us (the
/// guest's receive offloads).
pub fn set_tap_offload(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); no memory is passed.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into a new, empty network namespace (tests create their tap
/// devices there, never in the machine's own namespace). Needs CAP_SYS_ADMIN.
#[cfg(test)]
pub(crate) fn unshare_thread_netns() -> io::Result<()> {
    // SAFETY: unshare(CLONE_NEWNET) only changes the calling thread's network namespace; it
    // touches no memory of this process.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
