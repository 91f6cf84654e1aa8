//! Rate-limited logging for what a guest (or a host client) can make happen over and over: a
//! bad queue setup, a refused connection, an unknown vCPU exit. Each call site logs its first
//! [`LOG_FIRST`] occurrences, then only the 2^k-th ones (64, 128, 256, ...), every line carrying
//! the running count as `occurrences`; the cost is one counter per call site. The counter is
//! per process (a `static` at the call site), which is per VM for the shim and `vmm run`.
//!
//! ```
//! skiff_devices::warn_limited!("virtio-mmio: DRIVER_OK with a queue not ready or invalid");
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

#[doc(hidden)]
pub use tracing as __tracing;

/// Occurrences logged before the limiter thins them out to powers of two.
pub const LOG_FIRST: u64 = 5;

/// One call site's occurrence counter.
#[derive(Debug, Default)]
pub struct LogLimit {
    count: AtomicU64,
}

impl LogLimit {
    /// A counter at zero (usable in a `static`).
    pub const fn new() -> Self {
        LogLimit {
            count: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; returns the count so far when this occurrence should be logged
    /// (one of the first [`LOG_FIRST`], or a power of two after them).
    pub fn hit(&self) -> Option<u64> {
        let n = self.count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        (n <= LOG_FIRST || n.is_power_of_two()).then_some(n)
    }

    /// Occurrences counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// `tracing::warn!` for something that can repeat without bound: the first few occurrences
/// at this call site are logged, then one per power of two, each with an `occurrences` field.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        if let Some(n) = LIMIT.hit() {
            $crate::ratelimit::__tracing::warn!(occurrences = n, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_few_then_powers_of_two() {
        let l = LogLimit::new();
        let logged: Vec<u64> = (0..10_000).filter_map(|_| l.hit()).collect();
        assert_eq!(
            logged,
            [1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
        );
        assert_eq!(l.count(), 10_000);
    }

    #[test]
    fn the_macro_counts_per_call_site() {
        for i in 0..1000 {
            crate::warn_limited!("test warning {i}");
        }
    }
}
