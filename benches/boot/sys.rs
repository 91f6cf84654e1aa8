//! The benchmark's only `unsafe`: reaping a child with its resource usage.

/// Waits for child `pid` and returns its peak RSS in KiB (`wait4`'s `ru_maxrss`: the child's
/// own, unlike `/usr/bin/time` run from a large parent) and its raw wait status.
pub fn wait_rss_kib(pid: libc::pid_t) -> std::io::Result<(i64, i32)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet reaped; both out-pointers are valid for the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        return Err(std::io::Error::last_os_error());
    }
    Ok((ru.ru_maxrss, status))
}

/// Sends SIGKILL to `pid` (the benchmark's own child).
pub fn kill(pid: libc::pid_t) {
    // SAFETY: kill has no memory preconditions; pid is a child we have not reaped yet (the
    // caller stops the watchdog before reaping).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}
