//! Control-plane messages (DESIGN.md, "Protocol"): hello, expert assignment, weight transfer,
//! ready, ping/pong, stats, drain. Each travels as the payload of one [`FrameKind::Control`]
//! frame, encoded with bincode 2's standard configuration (little-endian, variable-length
//! integers) and a decode limit of [`MAX_FRAME_PAYLOAD`] bytes, so a length prefix can never make
//! the decoder allocate more than a frame could carry.
//!
//! [`Control::decode`] rejects malformed input, trailing bytes and semantically impossible
//! messages with an error; it never panics.
//!
//! [`FrameKind::Control`]: crate::frame::FrameKind::Control

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bincode::{Decode, Encode};
use thiserror::Error;

use crate::frame::MAX_FRAME_PAYLOAD;

/// The most weight bytes one [`WeightChunk`] may carry (4 MiB).
pub const MAX_CHUNK: usize = 4 << 20;

/// A content hash: BLAKE3 of a tensor's bytes (32 bytes).
pub type BlobHash = [u8; 32];

/// A message on the control stream.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum Control {
    /// Both sides, first message after authentication: who they are and what they can do.
    Hello(Hello),
    /// Coordinator -> worker: the experts this worker must hold for a model.
    Assign(Assignment),
    /// Worker -> coordinator: the blob hashes of the assignment it has neither cached nor found in
    /// its local model file; the coordinator ships exactly these as [`Control::Chunk`]s.
    Need(Vec<BlobHash>),
    /// Coordinator -> worker: a piece of one weight blob.
    Chunk(WeightChunk),
    /// Worker -> coordinator: all assigned experts are loaded and verified.
    Ready {
        /// Experts held (one per (layer, expert) shard).
        experts: u32,
        /// Weight bytes held for them.
        bytes: u64,
    },
    /// Liveness / RTT probe carrying an opaque token the peer echoes in [`Control::Pong`].
    Ping(u64),
    /// Answer to [`Control::Ping`] with the same token.
    Pong(u64),
    /// Coordinator -> worker: request a [`Control::Stats`].
    GetStats,
    /// Worker -> coordinator: counters since the session started.
    Stats(WorkerStats),
    /// Coordinator -> worker: finish in-flight batches, then close the session.
    Drain,
    /// Either side: a human-readable error (the peer logs it; no key material ever).
    Error(String),
}

/// Identity, version and capabilities of a node.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Hello {
    /// The protocol version the sender speaks ([`crate::frame::PROTOCOL_VERSION`]).
    pub protocol: u16,
    /// A stable identifier of the node.
    pub node_id: String,
    /// A human-readable node name (host name or `--name`).
    pub name: String,
    /// The sender's crate version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// What the node can do.
    pub capabilities: Capabilities,
}

/// What a node offers for placement.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Capabilities {
    /// CPU threads available for expert compute.
    pub cores: u32,
    /// Memory the node may use for expert weights, in bytes.
    pub mem_budget: u64,
    /// Compute backends, e.g. `"cpu"`.
    pub backends: Vec<String>,
    /// Measured quantized GEMV throughput in GB/s of weight bytes read (finite, >= 0).
    pub gemv_gbps: f32,
}

/// The experts a worker must hold for one model.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Assignment {
    /// Identifies the model (e.g. a hash of its file or tensor table); the worker's cache is keyed
    /// by blob hash, this only names the model in logs and stats.
    pub model_id: [u8; 32],
    /// The (layer, expert) shards, each with its three weight matrices.
    pub shards: Vec<ExpertShard>,
}

/// One expert of one layer: its gate, up and down projections.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct ExpertShard {
    /// Layer index.
    pub layer: u32,
    /// Expert index within the layer.
    pub expert: u32,
    /// Gate projection, `[n_ff, n_embd]`.
    pub gate: TensorBlob,
    /// Up projection, `[n_ff, n_embd]`.
    pub up: TensorBlob,
    /// Down projection, `[n_embd, n_ff]`.
    pub down: TensorBlob,
}

/// One expert matrix exactly as the GGUF file stores it (no requantization).
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct TensorBlob {
    /// ggml type id (`enum ggml_type`, see `moeshard_kernels::quant::GgmlType::ggml_id`).
    pub ggml_type: u32,
    /// Rows (output features).
    pub rows: u32,
    /// Columns (input features, elements per row).
    pub cols: u32,
    /// BLAKE3 of the blob's bytes.
    pub hash: BlobHash,
    /// Blob size in bytes.
    pub len: u64,
    /// Byte offset of the blob in the model file, so a worker started with `--model FILE` can
    /// hash its own copy instead of receiving it.
    pub file_offset: u64,
}

/// A piece of a weight blob. Invariants checked on encode and decode: `data.len() <= MAX_CHUNK`
/// and `offset + data.len() <= total`.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct WeightChunk {
    /// The blob this piece belongs to.
    pub hash: BlobHash,
    /// Byte offset of `data` within the blob.
    pub offset: u64,
    /// The blob's total size in bytes.
    pub total: u64,
    /// The bytes, at most [`MAX_CHUNK`].
    pub data: Vec<u8>,
}

/// A worker's counters since its session started.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WorkerStats {
    /// Expert batches computed.
    pub batches: u64,
    /// Token rows computed (summed over batches).
    pub tokens: u64,
    /// Data-plane bytes received (frame headers included).
    pub bytes_in: u64,
    /// Data-plane bytes sent (frame headers included).
    pub bytes_out: u64,
    /// Time spent computing, in microseconds.
    pub compute_us: u64,
    /// Experts held.
    pub experts: u32,
}

/// Why a control message could not be encoded or decoded. Never panics on peer input.
#[derive(Debug, Error)]
pub enum ControlError {
    /// bincode could not decode the bytes (malformed, truncated, or a length over the limit).
    #[error("malformed control message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// bincode could not encode the message.
    #[error("could not encode control message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// A complete message was followed by extra bytes.
    #[error("control message followed by {0} unexpected bytes")]
    TrailingBytes(usize),
    /// The encoded message does not fit in one frame.
    #[error("control message of {0} bytes exceeds the frame maximum of {MAX_FRAME_PAYLOAD} bytes")]
    TooLarge(usize),
    /// The message decoded but breaks an invariant.
    #[error("invalid control message: {0}")]
    Invalid(String),
}

type Config = Configuration<LittleEndian, Varint, Limit<MAX_FRAME_PAYLOAD>>;

const CONFIG: Config = bincode::config::standard().with_limit::<MAX_FRAME_PAYLOAD>();

impl Control {
    /// Encodes the message as a frame payload. Fails on invariant violations (see
    /// [`Control::validate`]) and when the result exceeds [`MAX_FRAME_PAYLOAD`].
    pub fn encode(&self) -> Result<Vec<u8>, ControlError> {
        self.validate()?;
        let bytes = bincode::encode_to_vec(self, CONFIG)?;
        if bytes.len() > MAX_FRAME_PAYLOAD {
            return Err(ControlError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes one message that must fill `bytes` exactly, then validates it.
    pub fn decode(bytes: &[u8]) -> Result<Control, ControlError> {
        let (msg, used): (Control, usize) = bincode::decode_from_slice(bytes, CONFIG)?;
        if used != bytes.len() {
            return Err(ControlError::TrailingBytes(bytes.len() - used));
        }
        msg.validate()?;
        Ok(msg)
    }

    /// Checks invariants bincode cannot express: chunk size and bounds, a finite non-negative
    /// GEMV throughput.
    pub fn validate(&self) -> Result<(), ControlError> {
        match self {
            Control::Chunk(c) => {
                if c.data.len() > MAX_CHUNK {
                    return Err(ControlError::Invalid(format!(
                        "weight chunk of {} bytes exceeds the maximum of {MAX_CHUNK} bytes",
                        c.data.len()
                    )));
                }
                match c.offset.checked_add(c.data.len() as u64) {
                    Some(end) if end <= c.total => Ok(()),
                    _ => Err(ControlError::Invalid(format!(
                        "weight chunk [{}, +{}) lies outside its blob of {} bytes",
                        c.offset,
                        c.data.len(),
                        c.total
                    ))),
                }
            }
            Control::Hello(h) if !(h.capabilities.gemv_gbps.is_finite() && h.capabilities.gemv_gbps >= 0.0) => {
                Err(ControlError::Invalid(format!(
                    "GEMV throughput {} GB/s is not a finite, non-negative number",
                    h.capabilities.gemv_gbps
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn blob(seed: u8) -> TensorBlob {
        TensorBlob {
            ggml_type: 12,
            rows: 896,
            cols: 2304,
            hash: [seed; 32],
            len: 896 * 2304 / 256 * 144,
            file_offset: 1 << 33,
        }
    }

    pub(crate) fn every_variant() -> Vec<Control> {
        vec![
            Control::Hello(Hello {
                protocol: 1,
                node_id: "node-7f3a".into(),
                name: "büro-pc".into(),
                version: "0.1.0".into(),
                capabilities: Capabilities {
                    cores: 16,
                    mem_budget: 24 << 30,
                    backends: vec!["cpu".into(), "vulkan".into()],
                    gemv_gbps: 41.5,
                },
            }),
            Control::Assign(Assignment {
                model_id: [0xab; 32],
                shards: (0..3)
                    .map(|i| ExpertShard { layer: i, expert: 63 - i, gate: blob(1), up: blob(2), down: blob(3) })
                    .collect(),
            }),
            Control::Assign(Assignment { model_id: [0; 32], shards: vec![] }),
            Control::Need(vec![[1; 32], [2; 32]]),
            Control::Need(vec![]),
            Control::Chunk(WeightChunk { hash: [5; 32], offset: 8, total: 1000, data: (0..=255).collect() }),
            Control::Chunk(WeightChunk { hash: [5; 32], offset: 0, total: MAX_CHUNK as u64, data: vec![1; MAX_CHUNK] }),
            Control::Ready { experts: 1792, bytes: 7 << 30 },
            Control::Ping(u64::MAX),
            Control::Pong(0),
            Control::GetStats,
            Control::Stats(WorkerStats { batches: 1, tokens: 2, bytes_in: 3, bytes_out: 4, compute_us: 5, experts: 6 }),
            Control::Drain,
            Control::Error("expert 3.17 missing".into()),
        ]
    }

    #[test]
    fn every_variant_round_trips() {
        for msg in every_variant() {
            let bytes = msg.encode().expect("encode");
            assert_eq!(Control::decode(&bytes).expect("decode"), msg);
        }
    }

    #[test]
    fn trailing_and_truncated_bytes_fail() {
        for msg in every_variant() {
            let mut bytes = msg.encode().expect("encode");
            for cut in 0..bytes.len().min(300) {
                assert!(Control::decode(&bytes[..cut]).is_err(), "{msg:?} cut at {cut}");
            }
            bytes.push(0);
            assert!(matches!(Control::decode(&bytes), Err(ControlError::TrailingBytes(1))));
        }
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // Variant index of Need, then a u64 varint (marker 253) claiming 2^60 hashes.
        let need = Control::Need(vec![]).encode().expect("encode")[0];
        let mut bytes = vec![need, 253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(Control::decode(&bytes), Err(ControlError::Decode(_))));

        // Same for a byte vector (Chunk data) and a string (Error), both just over the limit.
        let chunk = Control::Chunk(WeightChunk { hash: [0; 32], offset: 0, total: 0, data: vec![] });
        let mut bytes = chunk.encode().expect("encode");
        bytes.truncate(bytes.len() - 1);
        bytes.push(253);
        bytes.extend_from_slice(&(MAX_FRAME_PAYLOAD as u64 + 1).to_le_bytes());
        assert!(matches!(Control::decode(&bytes), Err(ControlError::Decode(_))));
        let mut bytes = vec![Control::Error(String::new()).encode().expect("encode")[0], 253];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Control::decode(&bytes), Err(ControlError::Decode(_))));
    }

    #[test]
    fn invariants_checked_both_ways() {
        let oversized =
            Control::Chunk(WeightChunk { hash: [0; 32], offset: 0, total: u64::MAX, data: vec![0; MAX_CHUNK + 1] });
        assert!(matches!(oversized.encode(), Err(ControlError::Invalid(_))));
        let outside =
            Control::Chunk(WeightChunk { hash: [0; 32], offset: u64::MAX, total: u64::MAX, data: vec![0; 2] });
        assert!(matches!(outside.encode(), Err(ControlError::Invalid(_))));
        // Bypass encode's check to show decode refuses it too.
        let raw = bincode::encode_to_vec(&outside, CONFIG).expect("raw encode");
        assert!(matches!(Control::decode(&raw), Err(ControlError::Invalid(_))));

        let Control::Hello(mut hello) = every_variant().remove(0) else { panic!("first variant is Hello") };
        hello.capabilities.gemv_gbps = f32::NAN;
        let raw = bincode::encode_to_vec(Control::Hello(hello), CONFIG).expect("raw encode");
        assert!(matches!(Control::decode(&raw), Err(ControlError::Invalid(_))));
    }

    #[test]
    fn garbage_and_mutations_never_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..3000 {
            let len = rng.random_range(0..200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = Control::decode(&bytes);
        }
        let valid: Vec<Vec<u8>> = every_variant()
            .iter()
            .filter(|m| !matches!(m, Control::Chunk(c) if c.data.len() > 1000))
            .map(|m| m.encode().expect("encode"))
            .collect();
        for i in 0..5000 {
            let mut bytes = valid[i % valid.len()].clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            if let Ok(msg) = Control::decode(&bytes) {
                assert_eq!(Control::decode(&msg.encode().expect("re-encode")).expect("re-decode"), msg);
            }
        }
    }
}
