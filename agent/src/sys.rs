//! The agent's only `unsafe` code: thin wrappers over the system calls it needs.

use std::ffi::CString;
use std::io;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is NULL.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(()); // already mounted
        }
        Err(io::Error::new(
            e.kind(),
            format!("mount {fstype} on {target}: {e}"),
        ))
    }
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /sys/fs/cgroup (v2), /tmp and /run.
pub fn mount_pseudo_filesystems() -> io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid)?;
    mount("sysfs", "/sys", "sysfs", nosuid)?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID)?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
    )?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid)?;
    mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV)?;
    mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV)?;
    Ok(())
}

/// Writes `value` to the VMM's boot-timer port (x86: 0x3f0).
#[cfg(target_arch = "x86_64")]
pub fn boot_timer_stamp(value: u8) -> io::Result<()> {
    const PORT: u16 = 0x3f0;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(PORT), 1, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: port 0x3f0 is the VMM's boot-timer device; writing it has no effect on memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") PORT, in("al") value, options(nomem, nostack));
    }
    Ok(())
}

/// Writes `value` to the VMM's boot-timer register (aarch64: MMIO, not wired yet).
#[cfg(not(target_arch = "x86_64"))]
pub fn boot_timer_stamp(_value: u8) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "boot timer not wired on this arch yet",
    ))
}

/// Flushes filesystem buffers.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Reboots the VM (the VMM treats a reboot as the end of the VM).
pub fn reboot() -> io::Result<()> {
    // SAFETY: reboot with RB_AUTOBOOT has no memory preconditions; it only returns on error.
    if unsafe { libc::reboot(libc::RB_AUTOBOOT) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
