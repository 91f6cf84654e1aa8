//! The OS seam of the virtio-net backends: socket options that differ between hosts, and the
//! Linux tap device (`/dev/net/tun` ioctls, the only `unsafe` of the net device). Other hosts
//! get a tap stub that fails with `Unsupported`.

use std::io;
use std::os::fd::AsFd;

use rustix::net::SendFlags;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
pub use other::*;

/// Socket buffer size asked for in each direction (macOS defaults to 8 KiB for a socketpair's
/// send buffer, and caps a datagram at SO_SNDBUF).
const SOCKET_BUFFER: usize = 1 << 20;

/// Flags for every `send`/`sendmsg` to a peer socket: never raise SIGPIPE (Linux; macOS uses
/// `SO_NOSIGPIPE`, set by [`prepare_socket`]).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub const SEND_FLAGS: SendFlags = SendFlags::NOSIGNAL;
/// Flags for every `send`/`sendmsg` to a peer socket (SIGPIPE is off through `SO_NOSIGPIPE`).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub const SEND_FLAGS: SendFlags = SendFlags::empty();

/// Makes a peer socket fit for the backends: non-blocking, large buffers (best effort), no
/// SIGPIPE.
pub fn prepare_socket(fd: impl AsFd) -> io::Result<()> {
    let fd = fd.as_fd();
    rustix::io::ioctl_fionbio(fd, true)?;
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(fd, SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(fd, SOCKET_BUFFER);
    #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
    rustix::net::sockopt::set_socket_nosigpipe(fd, true)?;
    Ok(())
}
