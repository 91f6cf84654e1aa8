//! An address bus (used once for port I/O and once for MMIO): non-overlapping ranges, each
//! served by one device that sees offsets relative to its base.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// The device's state for a snapshot, if it can be saved (virtio-mmio transports).
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// A bus: ranges → devices.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, Shared)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, (l, _))| (b, l)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, dev: Shared) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Shared)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must lie inside the device.
        (off.checked_add(size as u64)? <= *len).then_some((off, dev))
    }

    /// Reads from the device at `addr`. Unclaimed addresses read as all ones (an open bus).
    /// Returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                match dev.lock() {
                    Ok(mut d) => d.read(off, data),
                    Err(p) => p.into_inner().read(off, data),
                }
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`. Unclaimed writes are dropped. Returns whether a device
    /// took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                match dev.lock() {
                    Ok(mut d) => d.write(off, data),
                    Err(p) => p.into_inner().write(off, data),
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Default)]
    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn ranges_offsets_and_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg::default()));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        assert_eq!(
            bus.insert(0x10f, 1, a.clone()),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf8, 0x10, a.clone()),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(0x0, 0, a.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err());
        bus.insert(0x110, 0x10, a.clone()).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d, [5, 5]);
        // Straddling the end of a device is not an access to it.
        assert!(!bus.read(0x10f, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert!(!bus.write(0x5000, &[1]));
        assert!(bus.write(0x101, &[9]));
        assert_eq!(a.lock().unwrap().0, vec![(1, vec![9])]);
        assert!(!bus.read(u64::MAX, &mut d));
    }
}
