//! The container format of the backends' opaque state blobs ([`super::Vm::save_state`],
//! [`super::Vcpu::save_state`]): tagged, length-prefixed parts. No hypervisor types here; the
//! backend decides what each tag holds. Decoding never trusts a length: a short or malformed
//! blob is an error, never a panic.

use super::{Error, Result};

/// A blob being written: `tag u32 LE, len u32 LE, bytes` per part.
#[derive(Debug, Default)]
pub struct StateWriter {
    out: Vec<u8>,
}

impl StateWriter {
    /// An empty blob.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one part.
    pub fn put(&mut self, tag: u32, bytes: &[u8]) -> Result<()> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| Error::BadState(format!("state part {tag} is larger than 4 GiB")))?;
        self.out.extend_from_slice(&tag.to_le_bytes());
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    /// The encoded blob.
    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

/// A decoded blob: its parts by tag (a tag seen twice keeps the first).
#[derive(Debug)]
pub struct StateReader<'a> {
    parts: Vec<(u32, &'a [u8])>,
}

impl<'a> StateReader<'a> {
    /// Splits `blob` into its parts.
    pub fn parse(mut blob: &'a [u8]) -> Result<Self> {
        let mut parts = Vec::new();
        while !blob.is_empty() {
            if blob.len() < 8 {
                return Err(Error::BadState(
                    "state blob ends inside a part header".into(),
                ));
            }
            let tag = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]);
            let len = u32::from_le_bytes([blob[4], blob[5], blob[6], blob[7]]) as usize;
            let rest = &blob[8..];
            if rest.len() < len {
                return Err(Error::BadState(format!(
                    "state part {tag} claims {len} bytes, {} left",
                    rest.len()
                )));
            }
            parts.push((tag, &rest[..len]));
            blob = &rest[len..];
        }
        Ok(StateReader { parts })
    }

    /// The part with `tag`, if any.
    pub fn get(&self, tag: u32) -> Option<&'a [u8]> {
        self.parts.iter().find(|(t, _)| *t == tag).map(|(_, b)| *b)
    }

    /// The part with `tag`, or an error naming `what` is missing.
    pub fn need(&self, tag: u32, what: &str) -> Result<&'a [u8]> {
        self.get(tag)
            .ok_or_else(|| Error::BadState(format!("the saved state has no {what}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_every_truncation_is_an_error() {
        let mut w = StateWriter::new();
        w.put(1, b"abc").unwrap();
        w.put(7, b"").unwrap();
        w.put(9, &[0xff; 300]).unwrap();
        let blob = w.finish();
        let r = StateReader::parse(&blob).unwrap();
        assert_eq!(r.get(1), Some(&b"abc"[..]));
        assert_eq!(r.get(7), Some(&b""[..]));
        assert_eq!(r.need(9, "x").unwrap().len(), 300);
        assert!(r
            .need(2, "the thing")
            .unwrap_err()
            .to_string()
            .contains("the thing"));
        // Cutting at any point inside a part fails cleanly; at a part boundary it parses.
        for cut in 0..blob.len() {
            let boundary = [0, 11, 19].contains(&cut);
            assert_eq!(
                StateReader::parse(&blob[..cut]).is_ok(),
                boundary,
                "cut {cut}"
            );
        }
    }
}
