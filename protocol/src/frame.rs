//! The frame header that starts every message on a moeshard stream.
//!
//! Layout (12 bytes, all integers little-endian):
//!
//! | offset | size | field                                          |
//! |--------|------|------------------------------------------------|
//! | 0      | 4    | magic `b"MSHD"`                                |
//! | 4      | 2    | protocol version, u16 ([`PROTOCOL_VERSION`])   |
//! | 6      | 1    | kind, u8 ([`FrameKind`])                       |
//! | 7      | 1    | flags, u8 (reserved, must be 0)                |
//! | 8      | 4    | payload length in bytes, u32                   |
//!
//! The payload follows immediately. Its length is checked against [`MAX_FRAME_PAYLOAD`] from the
//! header alone, before any buffer is allocated for it (DESIGN.md, "Protocol": "a frame header
//! with protocol version and message kind; an unknown version gets a clear error").

use thiserror::Error;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"MSHD";

/// The protocol version this build speaks, carried in every frame header.
pub const PROTOCOL_VERSION: u16 = 1;

/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 12;

/// The largest payload a frame may carry, in bytes (64 MiB).
pub const MAX_FRAME_PAYLOAD: usize = 64 << 20;

/// What a frame's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A 32-byte HMAC proof of the authentication handshake (see [`crate::auth`]).
    Auth = 1,
    /// A bincode-encoded [`crate::control::Control`] message.
    Control = 2,
    /// An rkyv-encoded [`crate::data::ExpertBatch`].
    ExpertBatch = 3,
    /// An rkyv-encoded [`crate::data::PartialSums`].
    PartialSums = 4,
}

impl FrameKind {
    /// The kind with wire id `id`, if there is one.
    pub fn from_u8(id: u8) -> Option<Self> {
        match id {
            1 => Some(FrameKind::Auth),
            2 => Some(FrameKind::Control),
            3 => Some(FrameKind::ExpertBatch),
            4 => Some(FrameKind::PartialSums),
            _ => None,
        }
    }
}

/// Why a frame was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`]: the peer is not speaking moeshard.
    #[error("bad frame magic {0:02x?}: the peer does not speak the moeshard protocol")]
    BadMagic([u8; 4]),
    /// The header carries a protocol version other than [`PROTOCOL_VERSION`].
    #[error("peer speaks moeshard protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u16),
    /// The kind byte is not a [`FrameKind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved flag bits are set.
    #[error("reserved frame flags {0:#04x} are set")]
    ReservedFlags(u8),
    /// The payload length exceeds the allowed maximum.
    #[error("frame payload of {len} bytes exceeds the maximum of {max} bytes")]
    Oversized {
        /// Announced (or attempted) payload length in bytes.
        len: u64,
        /// The maximum in bytes.
        max: u64,
    },
    /// Fewer bytes were available than the header or payload needs.
    #[error("truncated frame: {needed} bytes needed, {got} available")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// A complete frame was followed by extra bytes (only from [`decode_frame`]).
    #[error("{0} unexpected bytes after the frame")]
    TrailingBytes(u64),
}

/// A parsed, validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload is.
    pub kind: FrameKind,
    /// Payload length in bytes, at most [`MAX_FRAME_PAYLOAD`].
    pub len: u32,
}

impl FrameHeader {
    /// A header for a payload of `len` bytes; [`FrameError::Oversized`] above [`MAX_FRAME_PAYLOAD`].
    pub fn new(kind: FrameKind, len: usize) -> Result<Self, FrameError> {
        match u32::try_from(len) {
            Ok(len32) if len <= MAX_FRAME_PAYLOAD => Ok(FrameHeader { kind, len: len32 }),
            _ => Err(FrameError::Oversized { len: len as u64, max: MAX_FRAME_PAYLOAD as u64 }),
        }
    }

    /// Parses and validates a header: magic, then version, then kind, flags and length.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = FrameKind::from_u8(bytes[6]).ok_or(FrameError::UnknownKind(bytes[6]))?;
        if bytes[7] != 0 {
            return Err(FrameError::ReservedFlags(bytes[7]));
        }
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        FrameHeader::new(kind, len as usize)
    }

    /// The 12 header bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[6] = self.kind as u8;
        out[8..].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

/// Header plus payload in one buffer; [`FrameError::Oversized`] above [`MAX_FRAME_PAYLOAD`].
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = FrameHeader::new(kind, payload.len())?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Splits one complete frame held in `bytes` into its header and payload.
///
/// Errors: anything [`FrameHeader::parse`] rejects, [`FrameError::Truncated`] when `bytes` is
/// shorter than the header or the announced payload, [`FrameError::TrailingBytes`] when longer.
pub fn decode_frame(bytes: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
    let (head, rest) = bytes
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(FrameError::Truncated { needed: HEADER_LEN as u64, got: bytes.len() as u64 })?;
    let header = FrameHeader::parse(head)?;
    let len = header.len as usize;
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Less => {
            Err(FrameError::Truncated { needed: (HEADER_LEN + len) as u64, got: bytes.len() as u64 })
        }
        std::cmp::Ordering::Greater => Err(FrameError::TrailingBytes((rest.len() - len) as u64)),
        std::cmp::Ordering::Equal => Ok((header, rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(magic: &[u8; 4], version: u16, kind: u8, flags: u8, len: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(magic);
        h[4..6].copy_from_slice(&version.to_le_bytes());
        h[6] = kind;
        h[7] = flags;
        h[8..].copy_from_slice(&len.to_le_bytes());
        h
    }

    #[test]
    fn round_trip_every_kind() {
        for kind in [FrameKind::Auth, FrameKind::Control, FrameKind::ExpertBatch, FrameKind::PartialSums] {
            for payload in [&b""[..], b"x", &[7u8; 1000]] {
                let bytes = encode_frame(kind, payload).expect("encode");
                assert_eq!(bytes.len(), HEADER_LEN + payload.len());
                assert_eq!(&bytes[..4], b"MSHD");
                let (h, p) = decode_frame(&bytes).expect("decode");
                assert_eq!((h.kind, h.len as usize, p), (kind, payload.len(), payload));
            }
        }
    }

    #[test]
    fn header_layout_is_little_endian() {
        let h = FrameHeader { kind: FrameKind::PartialSums, len: 0x0102_0304 };
        assert_eq!(h.to_bytes(), [b'M', b'S', b'H', b'D', 1, 0, 4, 0, 4, 3, 2, 1]);
        assert_eq!(FrameHeader::parse(&h.to_bytes()), Ok(h));
    }

    #[test]
    fn bad_magic() {
        let h = header_bytes(b"HTTP", 1, 2, 0, 0);
        assert_eq!(FrameHeader::parse(&h), Err(FrameError::BadMagic(*b"HTTP")));
    }

    #[test]
    fn unknown_version_names_both_versions() {
        let h = header_bytes(b"MSHD", 7, 2, 0, 0);
        let err = FrameHeader::parse(&h).unwrap_err();
        assert_eq!(err, FrameError::UnsupportedVersion(7));
        let msg = err.to_string();
        assert!(msg.contains("version 7") && msg.contains("speaks 1"), "{msg}");
    }

    #[test]
    fn unknown_kind_and_flags() {
        for kind in [0u8, 5, 255] {
            assert_eq!(FrameHeader::parse(&header_bytes(b"MSHD", 1, kind, 0, 0)), Err(FrameError::UnknownKind(kind)));
        }
        assert_eq!(FrameHeader::parse(&header_bytes(b"MSHD", 1, 1, 0x80, 0)), Err(FrameError::ReservedFlags(0x80)));
    }

    #[test]
    fn oversized_rejected_from_header_alone() {
        let max = MAX_FRAME_PAYLOAD as u32;
        assert!(FrameHeader::parse(&header_bytes(b"MSHD", 1, 3, 0, max)).is_ok());
        for len in [max + 1, u32::MAX] {
            let err = FrameHeader::parse(&header_bytes(b"MSHD", 1, 3, 0, len)).unwrap_err();
            assert_eq!(err, FrameError::Oversized { len: u64::from(len), max: u64::from(max) });
        }
        assert!(matches!(
            FrameHeader::new(FrameKind::Control, MAX_FRAME_PAYLOAD + 1),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn truncated_and_trailing() {
        let bytes = encode_frame(FrameKind::Control, b"hello").expect("encode");
        for cut in 0..bytes.len() {
            assert!(matches!(decode_frame(&bytes[..cut]), Err(FrameError::Truncated { .. })), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode_frame(&long), Err(FrameError::TrailingBytes(1)));
    }
}
