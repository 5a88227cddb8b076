//! The frame format on QUIC streams.
//!
//! Every unidirectional stream carries exactly one frame: a fixed 32-byte header followed by
//! `len` payload bytes, then the stream's end. All integers are little-endian.
//!
//! ```text
//!  0      2     3     4          12         20    21    22    24       28       32
//!  +------+-----+-----+----------+----------+-----+-----+-----+--------+--------+
//!  |magic |ver  |kind |  epoch   |  op id   |phase|codec|step | chunk  |  len   |
//!  +------+-----+-----+----------+----------+-----+-----+-----+--------+--------+
//! ```
//!
//! Decoding is defensive: every field is checked before anything is allocated, and the
//! payload length is bounded by the receiver's limit, so a malformed or hostile frame costs an
//! error and nothing else.

use thiserror::Error;

use crate::schedule::Phase;

/// `"LH"`.
pub const MAGIC: u16 = 0x484c;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A chunk of an all-reduce or broadcast.
    Data,
    /// Rank `chunk` has finished the data phase of the operation (the commit round). Carries
    /// no payload.
    Done,
}

/// The phase of the operation a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WirePhase {
    ReduceScatter,
    AllGather,
    Broadcast,
    /// Frames outside a data phase (the commit round).
    Control,
}

impl From<Phase> for WirePhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::ReduceScatter => WirePhase::ReduceScatter,
            Phase::AllGather => WirePhase::AllGather,
        }
    }
}

/// How the payload's numbers are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Raw bytes (broadcast, control frames).
    Bytes,
    F32,
    Bf16,
    F16,
    /// Blocks of [`crate::codec::INT8_BLOCK`] values: one f32 scale per block, then one i8
    /// per value.
    Int8Block,
}

/// A decoded, validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub epoch: u64,
    pub op: u64,
    pub phase: WirePhase,
    pub codec: Codec,
    pub step: u16,
    pub chunk: u32,
    pub len: u32,
}

/// Why a frame was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame header truncated: {got} of {HEADER_LEN} bytes")]
    Truncated { got: usize },
    #[error("bad magic {0:#06x}: not a longhaul frame")]
    BadMagic(u16),
    #[error("unsupported frame version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("unknown phase {0}")]
    BadPhase(u8),
    #[error("unknown codec {0}")]
    BadCodec(u8),
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    Oversized { len: u32, max: u32 },
    #[error("frame for epoch {got} received in epoch {expected}")]
    WrongEpoch { got: u64, expected: u64 },
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = VERSION;
        b[3] = match self.kind {
            Kind::Data => 1,
            Kind::Done => 2,
        };
        b[4..12].copy_from_slice(&self.epoch.to_le_bytes());
        b[12..20].copy_from_slice(&self.op.to_le_bytes());
        b[20] = match self.phase {
            WirePhase::ReduceScatter => 1,
            WirePhase::AllGather => 2,
            WirePhase::Broadcast => 3,
            WirePhase::Control => 4,
        };
        b[21] = match self.codec {
            Codec::Bytes => 1,
            Codec::F32 => 2,
            Codec::Bf16 => 3,
            Codec::F16 => 4,
            Codec::Int8Block => 5,
        };
        b[22..24].copy_from_slice(&self.step.to_le_bytes());
        b[24..28].copy_from_slice(&self.chunk.to_le_bytes());
        b[28..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and validates a header. `max_payload` bounds `len`; `epoch` must match.
    pub fn decode(bytes: &[u8], max_payload: u32, epoch: u64) -> Result<Self, FrameError> {
        let b: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(FrameError::Truncated { got: bytes.len() })?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let magic = u16_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[2] != VERSION {
            return Err(FrameError::BadVersion(b[2]));
        }
        let kind = match b[3] {
            1 => Kind::Data,
            2 => Kind::Done,
            k => return Err(FrameError::BadKind(k)),
        };
        let phase = match b[20] {
            1 => WirePhase::ReduceScatter,
            2 => WirePhase::AllGather,
            3 => WirePhase::Broadcast,
            4 => WirePhase::Control,
            p => return Err(FrameError::BadPhase(p)),
        };
        let codec = match b[21] {
            1 => Codec::Bytes,
            2 => Codec::F32,
            3 => Codec::Bf16,
            4 => Codec::F16,
            5 => Codec::Int8Block,
            c => return Err(FrameError::BadCodec(c)),
        };
        let len = u32_at(28);
        let max = if kind == Kind::Data { max_payload } else { 0 };
        if len > max {
            return Err(FrameError::Oversized { len, max });
        }
        let frame_epoch = u64_at(4);
        if frame_epoch != epoch {
            return Err(FrameError::WrongEpoch { got: frame_epoch, expected: epoch });
        }
        Ok(Header {
            kind,
            epoch: frame_epoch,
            op: u64_at(12),
            phase,
            codec,
            step: u16_at(22),
            chunk: u32_at(24),
            len,
        })
    }
}

/// Length of the admission message.
pub const ADMISSION_LEN: usize = 16;

/// The admission message: `"longhaul"` and the epoch, sent on the first stream of a connection
/// by the accepting side once it has verified the dialer. In TLS 1.3 the client finishes its
/// handshake before the server has judged the client's certificate, so without it a refused
/// dialer would learn of the refusal only later, from a closed connection.
pub fn admission(epoch: u64) -> [u8; ADMISSION_LEN] {
    let mut m = [0u8; ADMISSION_LEN];
    m[..8].copy_from_slice(b"longhaul");
    m[8..].copy_from_slice(&epoch.to_le_bytes());
    m
}

/// Checks an admission message against this rank's epoch.
pub fn check_admission(m: &[u8; ADMISSION_LEN], epoch: u64) -> Result<(), String> {
    if m[..8] != *b"longhaul" {
        return Err("peer is not a longhaul ring endpoint".into());
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&m[8..]);
    let theirs = u64::from_le_bytes(e);
    if theirs != epoch {
        return Err(format!("peer is in epoch {theirs}, this rank in epoch {epoch}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header() -> Header {
        Header {
            kind: Kind::Data,
            epoch: 7,
            op: 42,
            phase: WirePhase::AllGather,
            codec: Codec::Int8Block,
            step: 3,
            chunk: 9,
            len: 1000,
        }
    }

    #[test]
    fn round_trips() {
        let h = header();
        assert_eq!(Header::decode(&h.encode(), 1 << 20, 7), Ok(h));
    }

    #[test]
    fn rejects_each_malformation() {
        let good = header().encode();
        let with = |i: usize, v: u8| {
            let mut b = good;
            b[i] = v;
            Header::decode(&b, 1 << 20, 7)
        };
        assert_eq!(Header::decode(&good[..31], 1 << 20, 7), Err(FrameError::Truncated { got: 31 }));
        assert_eq!(with(0, 0), Err(FrameError::BadMagic(0x4800)));
        assert_eq!(with(2, 9), Err(FrameError::BadVersion(9)));
        assert_eq!(with(3, 0), Err(FrameError::BadKind(0)));
        assert_eq!(with(20, 77), Err(FrameError::BadPhase(77)));
        assert_eq!(with(21, 0), Err(FrameError::BadCodec(0)));
        assert_eq!(
            Header::decode(&good, 999, 7),
            Err(FrameError::Oversized { len: 1000, max: 999 })
        );
        assert_eq!(
            Header::decode(&good, 1 << 20, 8),
            Err(FrameError::WrongEpoch { got: 7, expected: 8 })
        );
        let done = Header { kind: Kind::Done, len: 1, ..header() };
        assert_eq!(
            Header::decode(&done.encode(), u32::MAX, 7),
            Err(FrameError::Oversized { len: 1, max: 0 })
        );
    }

    #[test]
    fn admission_checks_epoch_and_magic() {
        assert_eq!(check_admission(&admission(3), 3), Ok(()));
        assert!(check_admission(&admission(3), 4).unwrap_err().contains("epoch 3"));
        let mut m = admission(3);
        m[0] = b'x';
        assert!(check_admission(&m, 3).unwrap_err().contains("not a longhaul"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        /// Any bytes at all: an error or a header within limits, never a panic.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                max in any::<u32>(), epoch in 0u64..4) {
            if let Ok(h) = Header::decode(&bytes, max, epoch) {
                prop_assert!(h.len <= max);
                prop_assert_eq!(h.epoch, epoch);
                prop_assert_eq!(&h.encode()[..], &bytes[..HEADER_LEN]);
            }
        }

        /// Valid-looking headers with random fields: decoding accepts exactly the valid ones.
        #[test]
        fn mutated_headers(i in 0usize..HEADER_LEN, v: u8) {
            let mut b = header().encode();
            b[i] = v;
            let _ = Header::decode(&b, 1 << 20, 7);
        }
    }
}
