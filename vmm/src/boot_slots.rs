//! Boot slots: at most N of this user's VMs boot at once on a host; the rest wait their turn.
//!
//! Booting a kernel is CPU-bound. Twenty containers started at once on a 2-core host gain
//! nothing from twenty kernels booting side by side: each takes twenty times longer, all of
//! them hold their memory the whole time, and their agent deadlines run out together. A
//! [`BootSlot`] is held from just before the VM starts until its agent is ready (shares
//! mounted, network configured); a VM that is up holds none, so a host still runs any number
//! of containers, only their boots are queued.
//!
//! A slot is an exclusive `flock(2)` on one of the files `0..N` in `<run base>/boot-slots`
//! (see [`crate::run_dir::base`]: private to the user). Locks are shared by every process of
//! the user on the host (`vmm run`, each containerd shim) and vanish with their process, so a
//! crashed VMM never keeps a slot. A waiter tries every slot, then sleeps 5–25 ms; after
//! `max_wait` it boots anyway with a warning (throttling never fails a container).
//!
//! N: `SandboxConfig::boot_slots`, else `$SKIFF_BOOT_SLOTS`, else the number of CPUs this
//! process may run on; 0 turns the limit off.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

/// How long a VM waits for a slot before booting without one.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// The environment variable that sets the number of slots (0 = no limit).
pub const ENV: &str = "SKIFF_BOOT_SLOTS";

/// A held slot (released when dropped), or none (no limit, timed out, or slots unusable).
#[derive(Debug)]
pub struct BootSlot {
    held: Option<(usize, File)>,
    waited: Duration,
}

impl BootSlot {
    /// The slot's number, if one is held.
    pub fn index(&self) -> Option<usize> {
        self.held.as_ref().map(|(i, _)| *i)
    }

    /// How long the caller waited for it.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    fn none(waited: Duration) -> Self {
        BootSlot { held: None, waited }
    }
}

/// The default number of slots: `$SKIFF_BOOT_SLOTS` (a bad value is warned about and
/// ignored), else the CPUs this process may run on.
pub fn default_slots() -> usize {
    if let Some(v) = std::env::var_os(ENV) {
        match v.to_str().and_then(|s| s.trim().parse::<usize>().ok()) {
            Some(n) => return n,
            None => tracing::warn!("{ENV}={v:?} is not a whole number; ignored"),
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The slot directory under the user's run base.
pub fn dir() -> Option<PathBuf> {
    match crate::run_dir::base() {
        Ok(b) => Some(b.join("boot-slots")),
        Err(e) => {
            tracing::warn!("boot slots unusable ({e}); booting without a limit");
            None
        }
    }
}

fn open_slot(dir: &Path, i: usize) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(dir.join(i.to_string()))
}

/// Waits for one of `slots` slots in `dir` (created 0700 if missing), at most `max_wait`.
/// Never fails: when the slots cannot be used it says why and returns no slot.
pub fn acquire(dir: &Path, slots: usize, max_wait: Duration) -> BootSlot {
    let start = Instant::now();
    if slots == 0 {
        return BootSlot::none(Duration::ZERO);
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            tracing::warn!(
                "boot slots unusable ({}: {e}); booting without a limit",
                dir.display()
            );
            return BootSlot::none(Duration::ZERO);
        }
    }
    let first = std::process::id() as usize % slots;
    let mut files: Vec<Option<File>> = (0..slots).map(|_| None).collect();
    let mut round: u64 = 0;
    let mut next_note = Duration::from_secs(10);
    loop {
        for k in 0..slots {
            let i = (first + k) % slots;
            if files[i].is_none() {
                match open_slot(dir, i) {
                    Ok(f) => files[i] = Some(f),
                    Err(e) => {
                        tracing::warn!(
                            "boot slot {}/{i} unusable ({e}); booting without a limit",
                            dir.display()
                        );
                        return BootSlot::none(start.elapsed());
                    }
                }
            }
            let Some(f) = files[i].take() else { continue };
            match flock(&f, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    let waited = start.elapsed();
                    if waited > Duration::from_millis(100) {
                        tracing::info!(
                            slot = i,
                            waited_ms = waited.as_millis() as u64,
                            "boot slot acquired"
                        );
                    }
                    return BootSlot {
                        held: Some((i, f)),
                        waited,
                    };
                }
                Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR) => {
                    files[i] = Some(f);
                }
                Err(e) => {
                    tracing::warn!("boot slot lock failed ({e}); booting without a limit");
                    return BootSlot::none(start.elapsed());
                }
            }
        }
        let waited = start.elapsed();
        if waited >= max_wait {
            tracing::warn!(
                "all {slots} boot slots stayed busy for {}s; booting without one",
                waited.as_secs()
            );
            return BootSlot::none(waited);
        }
        if waited >= next_note {
            tracing::info!(
                "waiting for a boot slot: {slots} VMs are booting ({}s so far)",
                waited.as_secs()
            );
            next_note += Duration::from_secs(10);
        }
        round += 1;
        // 5..25 ms, different per process and round, so waiters do not move in lockstep.
        let jitter = (u64::from(std::process::id()).wrapping_mul(2654435761)
            ^ round.wrapping_mul(40503))
            % 21;
        std::thread::sleep(Duration::from_millis(5 + jitter));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "skiff-slots-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn at_most_n_held_and_a_drop_frees_one() {
        let d = tmp("n");
        let a = acquire(&d, 2, Duration::from_secs(5));
        let b = acquire(&d, 2, Duration::from_secs(5));
        let mut held = [a.index().unwrap(), b.index().unwrap()];
        held.sort();
        assert_eq!(held, [0, 1]);
        // A third waits out its (short) bound and gets none.
        let c = acquire(&d, 2, Duration::from_millis(200));
        assert_eq!(c.index(), None);
        assert!(c.waited() >= Duration::from_millis(200));
        // A waiter gets the slot another one drops.
        let freed = a.index().unwrap();
        let t = std::thread::spawn({
            let d = d.clone();
            move || acquire(&d, 2, Duration::from_secs(10))
        });
        std::thread::sleep(Duration::from_millis(150));
        drop(a);
        let got = t.join().unwrap();
        assert_eq!(got.index(), Some(freed));
        assert!(got.waited() >= Duration::from_millis(100));
        drop((b, got));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn zero_slots_means_no_limit() {
        let d = tmp("zero");
        let s = acquire(&d, 0, Duration::from_secs(1));
        assert_eq!(s.index(), None);
        assert!(!d.exists());
    }

    #[test]
    fn a_symlinked_slot_is_not_followed() {
        let d = tmp("link");
        std::fs::create_dir_all(&d).unwrap();
        let target = d.with_extension("target");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, d.join("0")).unwrap();
        let s = acquire(&d, 1, Duration::from_secs(1));
        assert_eq!(
            s.index(),
            None,
            "a planted symlink must not be used as a slot"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_file(&target);
    }
}
