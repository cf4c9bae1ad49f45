//! Data-plane messages (DESIGN.md, "The hot path"): per (layer, involved worker) per step the
//! coordinator sends ONE [`ExpertBatch`] carrying each routed token's hidden state once plus its
//! (expert, weight) routes; the worker answers ONE [`PartialSums`] with the gate-weighted sum of its
//! experts' outputs per token.
//!
//! Both are rkyv 0.8 archives (little-endian, 32-bit relative pointers, rkyv's defaults), the
//! payloads of [`FrameKind::ExpertBatch`] / [`FrameKind::PartialSums`] frames. Network bytes are
//! only ever read through rkyv's validating [`rkyv::access`] (bounds, alignment and layout checks;
//! never `access_unchecked`), then through the semantic checks of [`ExpertBatch::validate`] /
//! [`PartialSums::validate`]. rkyv needs the archive aligned: copy a received payload into an
//! [`AlignedVec`] with [`aligned`] first (the `decode_*` functions do it for you).
//!
//! [`FrameKind::ExpertBatch`]: crate::frame::FrameKind::ExpertBatch
//! [`FrameKind::PartialSums`]: crate::frame::FrameKind::PartialSums

use moeshard_kernels::quant::VecDotType;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;

use crate::frame::MAX_FRAME_PAYLOAD;

/// The wire id of an activation layout: 0 F32, 1 F16, 2 BF16, 3 Q8_0, 4 Q8_1, 5 Q8_K.
pub fn vec_dot_type_id(ty: VecDotType) -> u8 {
    match ty {
        VecDotType::F32 => 0,
        VecDotType::F16 => 1,
        VecDotType::BF16 => 2,
        VecDotType::Q8_0 => 3,
        VecDotType::Q8_1 => 4,
        VecDotType::Q8_K => 5,
    }
}

/// The activation layout with wire id `id` (see [`vec_dot_type_id`]), if there is one.
pub fn vec_dot_type_from_id(id: u8) -> Option<VecDotType> {
    match id {
        0 => Some(VecDotType::F32),
        1 => Some(VecDotType::F16),
        2 => Some(VecDotType::BF16),
        3 => Some(VecDotType::Q8_0),
        4 => Some(VecDotType::Q8_1),
        5 => Some(VecDotType::Q8_K),
        _ => None,
    }
}

/// Coordinator -> worker: the routed tokens of one MoE layer of one step.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ExpertBatch {
    /// Decode / prefill step counter, echoed in the reply.
    pub step: u64,
    /// Layer index, echoed in the reply.
    pub layer: u32,
    /// Token rows in this batch (only the tokens routed to this worker).
    pub n_tokens: u32,
    /// Hidden size in elements.
    pub n_embd: u32,
    /// The same `n_tokens` hidden states in each layout the worker's experts need (one entry per
    /// distinct `vec_dot_type` of their gate/up weights), already quantized as the kernel would.
    pub activations: Vec<ActivationRows>,
    /// (token row, expert, gate weight) triples.
    pub routes: Vec<WireRoute>,
}

/// `n_tokens` activation rows in one vec-dot layout.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ActivationRows {
    /// Layout id ([`vec_dot_type_id`]).
    pub vec_dot_type: u8,
    /// `n_tokens` rows of `VecDotType::row_bytes(n_embd)` bytes each, in that type's block layout.
    pub data: Vec<u8>,
}

/// One routing decision: token row `token` goes through `expert`, its output scaled by `weight`.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[rkyv(derive(Debug))]
pub struct WireRoute {
    /// Row index in this batch (< `n_tokens`).
    pub token: u32,
    /// Expert index within the layer.
    pub expert: u32,
    /// Gate weight after the router's normalisation (finite).
    pub weight: f32,
}

/// Worker -> coordinator: per token, the weighted sum of this worker's routed experts' outputs.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[rkyv(derive(Debug))]
pub struct PartialSums {
    /// The batch's step.
    pub step: u64,
    /// The batch's layer.
    pub layer: u32,
    /// Token rows, as in the batch.
    pub n_tokens: u32,
    /// Hidden size in elements.
    pub n_embd: u32,
    /// Row-major `[n_tokens, n_embd]` f32 values (`n_tokens * n_embd` elements, all finite).
    pub sums: Vec<f32>,
}

/// Why a data message was refused.
#[derive(Debug, Error)]
pub enum DataError {
    /// rkyv serialization, or validation of the archive's layout, failed.
    #[error("malformed data message: {0}")]
    Archive(#[from] rancor::Error),
    /// The encoded message does not fit in one frame.
    #[error("data message of {0} bytes exceeds the frame maximum of {MAX_FRAME_PAYLOAD} bytes")]
    TooLarge(usize),
    /// An activation layout id is not one of [`vec_dot_type_id`]'s.
    #[error("unknown activation layout id {0}")]
    UnknownVecDotType(u8),
    /// Two activation entries share a layout.
    #[error("activation layout {0:?} appears twice")]
    DuplicateVecDotType(VecDotType),
    /// `n_embd` is not a whole number of blocks of an activation layout.
    #[error("hidden size {n_embd} is not a multiple of {ty:?}'s block of {block} elements")]
    PartialBlock {
        /// The layout.
        ty: VecDotType,
        /// Hidden size in elements.
        n_embd: u32,
        /// Elements per block of `ty`.
        block: usize,
    },
    /// The sizes announced in the header overflow.
    #[error("{n_tokens} tokens x {n_embd} elements overflows")]
    ShapeOverflow {
        /// Token rows.
        n_tokens: u32,
        /// Hidden size in elements.
        n_embd: u32,
    },
    /// Activation rows of the wrong total length.
    #[error("{ty:?} activations hold {len} bytes, {n_tokens} rows need {expected} bytes")]
    ActivationLength {
        /// The layout.
        ty: VecDotType,
        /// Bytes present.
        len: usize,
        /// Token rows.
        n_tokens: u32,
        /// Bytes required.
        expected: usize,
    },
    /// Routes are present but no activations.
    #[error("{0} routes but no activation rows")]
    NoActivations(usize),
    /// A route names a token row outside the batch.
    #[error("route {index} names token row {token}, the batch has {n_tokens}")]
    RouteOutOfRange {
        /// Position in `routes`.
        index: usize,
        /// The token row it names.
        token: u32,
        /// Token rows in the batch.
        n_tokens: u32,
    },
    /// The same (token, expert) pair is routed twice.
    #[error("token row {token} is routed to expert {expert} twice")]
    DuplicateRoute {
        /// Token row.
        token: u32,
        /// Expert.
        expert: u32,
    },
    /// A float is NaN or infinite.
    #[error("{what} {index} is not finite")]
    NonFinite {
        /// Which field (`"route weight"`, `"partial sum"`).
        what: &'static str,
        /// Its index.
        index: usize,
    },
    /// `sums` has the wrong number of elements.
    #[error("{len} partial sums, {n_tokens} x {n_embd} expected")]
    SumsLength {
        /// Elements present.
        len: usize,
        /// Token rows.
        n_tokens: u32,
        /// Hidden size in elements.
        n_embd: u32,
    },
}

/// A copy of `payload` in an [`AlignedVec`], as [`access_expert_batch`] / [`access_partial_sums`]
/// need.
pub fn aligned(payload: &[u8]) -> AlignedVec {
    let mut buf = AlignedVec::with_capacity(payload.len());
    buf.extend_from_slice(payload);
    buf
}

/// Refuses archives larger than one frame.
fn fit_frame(bytes: AlignedVec) -> Result<AlignedVec, DataError> {
    if bytes.len() > MAX_FRAME_PAYLOAD {
        return Err(DataError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Checks an expert batch's shape from its parts (shared by the owned and archived forms).
fn check_batch(
    n_tokens: u32,
    n_embd: u32,
    activations: impl ExactSizeIterator<Item = (u8, usize)>,
    routes: impl ExactSizeIterator<Item = (u32, u32, f32)>,
) -> Result<(), DataError> {
    let n_routes = routes.len();
    if n_routes > 0 && activations.len() == 0 {
        return Err(DataError::NoActivations(n_routes));
    }
    let mut seen_types = Vec::with_capacity(activations.len());
    for (id, len) in activations {
        let ty = vec_dot_type_from_id(id).ok_or(DataError::UnknownVecDotType(id))?;
        if seen_types.contains(&ty) {
            return Err(DataError::DuplicateVecDotType(ty));
        }
        seen_types.push(ty);
        let block = ty.block_size();
        if !(n_embd as usize).is_multiple_of(block) {
            return Err(DataError::PartialBlock { ty, n_embd, block });
        }
        let expected = (n_tokens as usize)
            .checked_mul(n_embd as usize / block * ty.type_size())
            .ok_or(DataError::ShapeOverflow { n_tokens, n_embd })?;
        if len != expected {
            return Err(DataError::ActivationLength { ty, len, n_tokens, expected });
        }
    }
    let mut pairs = Vec::with_capacity(n_routes);
    for (index, (token, expert, weight)) in routes.enumerate() {
        if token >= n_tokens {
            return Err(DataError::RouteOutOfRange { index, token, n_tokens });
        }
        if !weight.is_finite() {
            return Err(DataError::NonFinite { what: "route weight", index });
        }
        pairs.push((token, expert));
    }
    pairs.sort_unstable();
    match pairs.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(DataError::DuplicateRoute { token: w[0].0, expert: w[0].1 }),
        None => Ok(()),
    }
}

/// Checks a partial-sum message's shape and values from its parts.
fn check_sums(n_tokens: u32, n_embd: u32, sums: impl ExactSizeIterator<Item = f32>) -> Result<(), DataError> {
    let len = sums.len();
    if (n_tokens as usize).checked_mul(n_embd as usize) != Some(len) {
        return Err(DataError::SumsLength { len, n_tokens, n_embd });
    }
    match sums.enumerate().find(|(_, v)| !v.is_finite()) {
        Some((index, _)) => Err(DataError::NonFinite { what: "partial sum", index }),
        None => Ok(()),
    }
}

impl ActivationRows {
    /// Rows in layout `ty`.
    pub fn new(ty: VecDotType, data: Vec<u8>) -> Self {
        ActivationRows { vec_dot_type: vec_dot_type_id(ty), data }
    }

    /// The layout, if the id is known.
    pub fn vec_dot_type(&self) -> Option<VecDotType> {
        vec_dot_type_from_id(self.vec_dot_type)
    }
}

impl ArchivedActivationRows {
    /// The layout, if the id is known (always, once the batch passed [`access_expert_batch`]).
    pub fn vec_dot_type(&self) -> Option<VecDotType> {
        vec_dot_type_from_id(self.vec_dot_type)
    }
}

impl ExpertBatch {
    /// Semantic checks: known, distinct activation layouts whose blocks divide `n_embd`; each
    /// holding exactly `n_tokens * row_bytes(n_embd)` bytes; route tokens `< n_tokens`; finite
    /// weights; no (token, expert) pair twice; activations present when there are routes.
    pub fn validate(&self) -> Result<(), DataError> {
        check_batch(
            self.n_tokens,
            self.n_embd,
            self.activations.iter().map(|a| (a.vec_dot_type, a.data.len())),
            self.routes.iter().map(|r| (r.token, r.expert, r.weight)),
        )
    }

    /// Validates, then serializes to an rkyv archive (a frame payload of at most
    /// [`MAX_FRAME_PAYLOAD`] bytes).
    pub fn encode(&self) -> Result<AlignedVec, DataError> {
        self.validate()?;
        fit_frame(rkyv::to_bytes::<rancor::Error>(self)?)
    }
}

impl ArchivedExpertBatch {
    /// [`ExpertBatch::validate`] on the archived form.
    pub fn validate(&self) -> Result<(), DataError> {
        check_batch(
            self.n_tokens.to_native(),
            self.n_embd.to_native(),
            self.activations.iter().map(|a| (a.vec_dot_type, a.data.len())),
            self.routes.iter().map(|r| (r.token.to_native(), r.expert.to_native(), r.weight.to_native())),
        )
    }
}

impl PartialSums {
    /// Semantic checks: `sums.len() == n_tokens * n_embd`, all finite.
    pub fn validate(&self) -> Result<(), DataError> {
        check_sums(self.n_tokens, self.n_embd, self.sums.iter().copied())
    }

    /// Validates, then serializes to an rkyv archive (a frame payload of at most
    /// [`MAX_FRAME_PAYLOAD`] bytes).
    pub fn encode(&self) -> Result<AlignedVec, DataError> {
        self.validate()?;
        fit_frame(rkyv::to_bytes::<rancor::Error>(self)?)
    }
}

impl ArchivedPartialSums {
    /// [`PartialSums::validate`] on the archived form.
    pub fn validate(&self) -> Result<(), DataError> {
        check_sums(self.n_tokens.to_native(), self.n_embd.to_native(), self.sums.iter().map(|v| v.to_native()))
    }
}

/// A zero-copy view of an expert batch: rkyv-validated access, then [`ArchivedExpertBatch::validate`].
pub fn access_expert_batch(buf: &AlignedVec) -> Result<&ArchivedExpertBatch, DataError> {
    let archived = rkyv::access::<ArchivedExpertBatch, rancor::Error>(buf)?;
    archived.validate()?;
    Ok(archived)
}

/// An owned expert batch from a received payload (copied into an aligned buffer, then as
/// [`access_expert_batch`]).
pub fn decode_expert_batch(payload: &[u8]) -> Result<ExpertBatch, DataError> {
    let buf = aligned(payload);
    Ok(rkyv::deserialize::<ExpertBatch, rancor::Error>(access_expert_batch(&buf)?)?)
}

/// A zero-copy view of partial sums: rkyv-validated access, then [`ArchivedPartialSums::validate`].
pub fn access_partial_sums(buf: &AlignedVec) -> Result<&ArchivedPartialSums, DataError> {
    let archived = rkyv::access::<ArchivedPartialSums, rancor::Error>(buf)?;
    archived.validate()?;
    Ok(archived)
}

/// Owned partial sums from a received payload (copied into an aligned buffer, then as
/// [`access_partial_sums`]).
pub fn decode_partial_sums(payload: &[u8]) -> Result<PartialSums, DataError> {
    let buf = aligned(payload);
    Ok(rkyv::deserialize::<PartialSums, rancor::Error>(access_partial_sums(&buf)?)?)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const TYPES: [VecDotType; 6] =
        [VecDotType::F32, VecDotType::F16, VecDotType::BF16, VecDotType::Q8_0, VecDotType::Q8_1, VecDotType::Q8_K];

    fn batch(rng: &mut ChaCha8Rng) -> ExpertBatch {
        let (n_tokens, n_embd) = (3u32, 512u32);
        let activations = [VecDotType::Q8_K, VecDotType::Q8_0]
            .into_iter()
            .map(|ty| {
                let len = n_tokens as usize * ty.row_bytes(n_embd as usize);
                ActivationRows::new(ty, (0..len).map(|_| rng.random()).collect())
            })
            .collect();
        let routes = vec![
            WireRoute { token: 0, expert: 5, weight: 0.625 },
            WireRoute { token: 0, expert: 63, weight: 0.375 },
            WireRoute { token: 2, expert: 5, weight: 1.0 },
        ];
        ExpertBatch { step: 41, layer: 27, n_tokens, n_embd, activations, routes }
    }

    fn sums() -> PartialSums {
        PartialSums {
            step: 41,
            layer: 27,
            n_tokens: 2,
            n_embd: 4,
            sums: vec![1.0, -2.5, 0.0, 3.25, 1e-30, -0.0, 7.0, 8.0],
        }
    }

    #[test]
    fn wire_ids_round_trip_and_match_kernel_sizes() {
        let want = [(1, 4), (1, 2), (1, 2), (32, 34), (32, 36), (256, 292)];
        for (id, (ty, (block, size))) in TYPES.into_iter().zip(want).enumerate() {
            assert_eq!(vec_dot_type_id(ty), id as u8);
            assert_eq!(vec_dot_type_from_id(id as u8), Some(ty));
            assert_eq!((ty.block_size(), ty.type_size()), (block, size));
        }
        assert_eq!(vec_dot_type_from_id(6), None);
    }

    #[test]
    fn expert_batch_round_trip() {
        let b = batch(&mut ChaCha8Rng::seed_from_u64(1));
        let bytes = b.encode().expect("encode");
        assert_eq!(decode_expert_batch(&bytes).expect("decode"), b);
        let view = access_expert_batch(&bytes).expect("access");
        assert_eq!((view.step.to_native(), view.layer.to_native()), (41, 27));
        assert_eq!(view.activations[0].vec_dot_type(), Some(VecDotType::Q8_K));
        assert_eq!(view.activations[1].data.as_slice(), b.activations[1].data.as_slice());
        assert_eq!(view.routes[1].weight.to_native(), 0.375);
        // A payload at an odd address still decodes: decode_* copies into an aligned buffer.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode_expert_batch(&shifted[1..]).expect("decode shifted"), b);
    }

    #[test]
    fn partial_sums_round_trip() {
        let s = sums();
        let bytes = s.encode().expect("encode");
        assert_eq!(decode_partial_sums(&bytes).expect("decode"), s);
        let view = access_partial_sums(&bytes).expect("access");
        assert_eq!(view.sums.iter().map(|v| v.to_native()).collect::<Vec<_>>(), s.sums);
        let empty = PartialSums { step: 0, layer: 0, n_tokens: 0, n_embd: 2304, sums: vec![] };
        assert_eq!(decode_partial_sums(&empty.encode().expect("encode")).expect("decode"), empty);
    }

    /// Archives `b` without the semantic checks, as a misbehaving peer would.
    fn raw(b: &ExpertBatch) -> AlignedVec {
        rkyv::to_bytes::<rancor::Error>(b).expect("raw encode")
    }

    /// The mutated batch is refused by `encode` and, archived anyway, by `decode_expert_batch`.
    fn assert_batch_rejected(mutate: impl FnOnce(&mut ExpertBatch), is_expected: impl Fn(&DataError) -> bool) {
        let mut b = batch(&mut ChaCha8Rng::seed_from_u64(2));
        mutate(&mut b);
        let e = b.encode().expect_err("encode must refuse");
        assert!(is_expected(&e), "encode: {e}");
        let e = decode_expert_batch(&raw(&b)).expect_err("decode must refuse");
        assert!(is_expected(&e), "decode: {e}");
    }

    /// As [`assert_batch_rejected`] for partial sums.
    fn assert_sums_rejected(mutate: impl FnOnce(&mut PartialSums), is_expected: impl Fn(&DataError) -> bool) {
        let mut s = sums();
        mutate(&mut s);
        let e = s.encode().expect_err("encode must refuse");
        assert!(is_expected(&e), "encode: {e}");
        let e = decode_partial_sums(&rkyv::to_bytes::<rancor::Error>(&s).expect("raw encode"))
            .expect_err("decode must refuse");
        assert!(is_expected(&e), "decode: {e}");
    }

    #[test]
    fn route_token_out_of_range() {
        assert_batch_rejected(
            |b| b.routes[2].token = 3,
            |e| matches!(e, DataError::RouteOutOfRange { index: 2, token: 3, n_tokens: 3 }),
        );
    }

    #[test]
    fn wrong_activation_length() {
        assert_batch_rejected(
            |b| {
                b.activations[1].data.pop();
            },
            |e| {
                matches!(
                    e,
                    DataError::ActivationLength { ty: VecDotType::Q8_0, len: 1631, n_tokens: 3, expected: 1632 }
                )
            },
        );
        assert_batch_rejected(
            |b| b.activations[0].data.push(0),
            |e| matches!(e, DataError::ActivationLength { ty: VecDotType::Q8_K, .. }),
        );
        assert_batch_rejected(
            |b| b.n_embd = 480,
            |e| matches!(e, DataError::PartialBlock { ty: VecDotType::Q8_K, .. }),
        );
        assert_batch_rejected(|b| b.activations.clear(), |e| matches!(e, DataError::NoActivations(3)));
    }

    #[test]
    fn bad_activation_layouts() {
        assert_batch_rejected(|b| b.activations[0].vec_dot_type = 9, |e| matches!(e, DataError::UnknownVecDotType(9)));
        assert_batch_rejected(
            |b| b.activations[1].vec_dot_type = 5,
            |e| matches!(e, DataError::DuplicateVecDotType(VecDotType::Q8_K)),
        );
    }

    #[test]
    fn bad_routes() {
        assert_batch_rejected(
            |b| b.routes[1].weight = f32::NAN,
            |e| matches!(e, DataError::NonFinite { what: "route weight", index: 1 }),
        );
        assert_batch_rejected(
            |b| b.routes[1] = WireRoute { token: 2, expert: 5, weight: 0.5 },
            |e| matches!(e, DataError::DuplicateRoute { token: 2, expert: 5 }),
        );
    }

    #[test]
    fn bad_partial_sums() {
        assert_sums_rejected(
            |s| s.sums[5] = f32::NAN,
            |e| matches!(e, DataError::NonFinite { what: "partial sum", index: 5 }),
        );
        assert_sums_rejected(|s| s.sums[0] = f32::NEG_INFINITY, |e| matches!(e, DataError::NonFinite { index: 0, .. }));
        assert_sums_rejected(
            |s| s.n_tokens = 3,
            |e| matches!(e, DataError::SumsLength { len: 8, n_tokens: 3, n_embd: 4 }),
        );
        assert_sums_rejected(
            |s| {
                s.sums.pop();
            },
            |e| matches!(e, DataError::SumsLength { len: 7, .. }),
        );
    }

    #[test]
    fn shape_overflow_is_an_error() {
        let b = ExpertBatch {
            step: 0,
            layer: 0,
            n_tokens: u32::MAX,
            n_embd: u32::MAX - 255,
            activations: vec![ActivationRows::new(VecDotType::F32, vec![])],
            routes: vec![],
        };
        let e = decode_expert_batch(&raw(&b)).unwrap_err();
        assert!(matches!(e, DataError::ActivationLength { .. } | DataError::ShapeOverflow { .. }), "{e}");
        let s = PartialSums { step: 0, layer: 0, n_tokens: u32::MAX, n_embd: u32::MAX, sums: vec![] };
        assert!(matches!(s.validate(), Err(DataError::SumsLength { .. })));
    }

    #[test]
    fn garbage_and_bit_flips_never_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..3000 {
            let len = rng.random_range(0..300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = decode_expert_batch(&bytes);
            let _ = decode_partial_sums(&bytes);
        }
        let mut small = batch(&mut rng);
        small.n_embd = 32;
        small.activations = vec![ActivationRows::new(VecDotType::Q8_0, vec![7; 3 * 34])];
        let valid = [small.encode().expect("encode"), sums().encode().expect("encode")];
        let mut accepted = 0;
        for i in 0..6000 {
            let mut bytes = valid[i % 2].to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] ^= 1 << rng.random_range(0..8);
            }
            // Any result is fine as long as it is a Result; what decodes must re-validate.
            if let Ok(b) = decode_expert_batch(&bytes) {
                b.validate().expect("decoded batch is valid");
                accepted += 1;
            }
            if let Ok(s) = decode_partial_sums(&bytes) {
                s.validate().expect("decoded sums are valid");
                accepted += 1;
            }
        }
        // Flips inside activation bytes or float payloads keep a message valid: the loop must have
        // exercised both outcomes.
        assert!(accepted > 0 && accepted < 6000, "{accepted}");
    }
}
