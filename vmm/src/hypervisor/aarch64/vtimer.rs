//! The EL1 virtual timer, for backends that deliver its interrupt themselves
//! (Hypervisor.framework reports `VTIMER_ACTIVATED` and masks the timer until the VMM unmasks
//! it; KVM does all of this in the host kernel). Plain arithmetic over `CNTV_CTL_EL0`,
//! `CNTV_CVAL_EL0` and the virtual count.

use std::time::Duration;

/// `CNTV_CTL_EL0.ENABLE`.
pub const CNTV_ENABLE: u64 = 1;
/// `CNTV_CTL_EL0.IMASK`.
pub const CNTV_IMASK: u64 = 1 << 1;
/// `CNTV_CTL_EL0.ISTATUS`.
pub const CNTV_ISTATUS: u64 = 1 << 2;

/// Host counter ticks to a duration, with the host's timebase (numerator, denominator in ns
/// per tick; Apple silicon: 125/3). A zero denominator counts as 1; saturates.
pub fn ticks_to_duration(ticks: u64, timebase: (u32, u32)) -> Duration {
    let (n, d) = timebase;
    let ns = u128::from(ticks) * u128::from(n) / u128::from(d.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// Whether the timer's interrupt is asserted: enabled, condition met, not masked by the guest.
pub fn asserted(ctl: u64) -> bool {
    ctl & CNTV_ENABLE != 0 && ctl & CNTV_ISTATUS != 0 && ctl & CNTV_IMASK == 0
}

/// How long until the timer fires, seen from a parked vCPU: `None` when it is off or masked
/// by the guest (nothing to wait for), zero when it is due. `now` is the virtual count (the
/// host counter minus the vCPU's offset). Every value is the guest's: nothing here overflows.
pub fn remaining(ctl: u64, cval: u64, now: u64, timebase: (u32, u32)) -> Option<Duration> {
    if ctl & CNTV_ENABLE == 0 || ctl & CNTV_IMASK != 0 {
        return None;
    }
    if ctl & CNTV_ISTATUS != 0 {
        return Some(Duration::ZERO);
    }
    Some(ticks_to_duration(cval.saturating_sub(now), timebase))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPLE: (u32, u32) = (125, 3);

    #[test]
    fn ticks() {
        // 24 MHz: 24 000 000 ticks are one second.
        assert_eq!(ticks_to_duration(24_000_000, APPLE), Duration::from_secs(1));
        assert_eq!(ticks_to_duration(3, APPLE), Duration::from_nanos(125));
        assert_eq!(ticks_to_duration(7, (1, 1)), Duration::from_nanos(7));
        assert_eq!(ticks_to_duration(7, (1, 0)), Duration::from_nanos(7));
        assert_eq!(
            ticks_to_duration(u64::MAX, (u32::MAX, 1)),
            Duration::from_nanos(u64::MAX)
        );
    }

    #[test]
    fn deadlines() {
        let on = CNTV_ENABLE;
        assert_eq!(remaining(0, 100, 0, APPLE), None, "off");
        assert_eq!(remaining(on | CNTV_IMASK, 100, 0, APPLE), None, "masked");
        assert_eq!(
            remaining(on | CNTV_ISTATUS, 100, 0, APPLE),
            Some(Duration::ZERO),
            "due"
        );
        assert_eq!(
            remaining(on, 24_000 + 5, 5, APPLE),
            Some(Duration::from_millis(1))
        );
        // A compare value in the past (the guest's choice) is due now.
        assert_eq!(remaining(on, 5, 24_000, APPLE), Some(Duration::ZERO));
        assert_eq!(remaining(u64::MAX, u64::MAX, 0, APPLE), None);
    }

    #[test]
    fn assertion() {
        assert!(asserted(CNTV_ENABLE | CNTV_ISTATUS));
        assert!(!asserted(CNTV_ENABLE | CNTV_ISTATUS | CNTV_IMASK));
        assert!(!asserted(CNTV_ISTATUS));
        assert!(!asserted(CNTV_ENABLE));
    }
}
