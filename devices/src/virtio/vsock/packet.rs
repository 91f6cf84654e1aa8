//! The virtio-vsock packet header (virtio 1.2 §5.10.6): 44 bytes, little endian, packed.
//! Header and payload may be spread over any number of descriptors: the device reads them as
//! a byte stream through `virtio_queue::Reader`/`Writer`.

/// Header size in bytes.
pub const HDR_SIZE: usize = 44;
/// Largest payload accepted in one packet (what Linux sends at most).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;

/// `type`: stream socket (the only type served).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset/refused.
    pub const RST: u16 = 3;
    /// Half or full shutdown (see `flags`).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn u64_at(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u16_at(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decodes the 44 header bytes (any bit pattern decodes; validation is the caller's).
    pub fn decode(b: &[u8; HDR_SIZE]) -> Self {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes a header from the start of `bytes`, if long enough.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; HDR_SIZE] = bytes.get(..HDR_SIZE)?.try_into().ok()?;
        Some(Self::decode(b))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn roundtrip_and_short_input() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 80,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), h);
        assert_eq!(Header::from_slice(&b), Some(h));
        assert_eq!(Header::from_slice(&b[..43]), None);
        assert_eq!(&b[24..28], &[5, 0, 0, 0]);
    }
}
