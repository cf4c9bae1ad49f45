//! An expert assignment, checked ([`Plan`]), and the experts it yields once every blob it names
//! is present ([`HeldExperts`]).

use std::collections::HashMap;
use std::sync::Arc;

use moeshard_kernels::matmul::QMatrix;
use moeshard_kernels::moe::ExpertFfn;
use moeshard_kernels::quant::GgmlType;
use moeshard_protocol::control::{Assignment, BlobHash, ExpertShard, TensorBlob};
use thiserror::Error;

use crate::hex;
use crate::store::Blob;

/// Why an assignment was refused (sent back to the coordinator as `Control::Error`).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    /// A matrix has a ggml type this build does not compute with.
    #[error("expert {layer}.{expert} {matrix}: unsupported ggml type id {id}")]
    UnknownType {
        /// Layer index.
        layer: u32,
        /// Expert index.
        expert: u32,
        /// `"gate"`, `"up"` or `"down"`.
        matrix: &'static str,
        /// The ggml type id.
        id: u32,
    },
    /// A matrix's shape does not fit its type or its byte length.
    #[error("expert {layer}.{expert} {matrix}: {reason}")]
    BadMatrix {
        /// Layer index.
        layer: u32,
        /// Expert index.
        expert: u32,
        /// `"gate"`, `"up"` or `"down"`.
        matrix: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Gate, up and down do not form a `[n_ff, n_embd]`, `[n_ff, n_embd]`, `[n_embd, n_ff]` expert.
    #[error(
        "expert {layer}.{expert}: gate [{}, {}], up [{}, {}], down [{}, {}] are not [n_ff, n_embd], [n_ff, n_embd], [n_embd, n_ff]",
        shapes[0].0, shapes[0].1, shapes[1].0, shapes[1].1, shapes[2].0, shapes[2].1
    )]
    Shapes {
        /// Layer index.
        layer: u32,
        /// Expert index.
        expert: u32,
        /// (rows, cols) of gate, up, down.
        shapes: [(u32, u32); 3],
    },
    /// Experts of one assignment disagree on the hidden size.
    #[error("expert {layer}.{expert} has hidden size {got}, earlier experts {expected}")]
    HiddenSize {
        /// Layer index.
        layer: u32,
        /// Expert index.
        expert: u32,
        /// Its hidden size in elements.
        got: u32,
        /// The hidden size of the first expert, in elements.
        expected: u32,
    },
    /// The same (layer, expert) appears twice.
    #[error("expert {layer}.{expert} is assigned twice")]
    Duplicate {
        /// Layer index.
        layer: u32,
        /// Expert index.
        expert: u32,
    },
    /// One hash announced with two lengths.
    #[error("blob {hash} is announced with {a} and {b} bytes")]
    HashLength {
        /// The blob hash, hex.
        hash: String,
        /// One length in bytes.
        a: u64,
        /// The other length in bytes.
        b: u64,
    },
}

/// One matrix of an expert: type, shape (rows x cols elements) and the blob holding it.
#[derive(Debug)]
struct MatrixSpec {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    hash: BlobHash,
}

#[derive(Debug)]
struct ExpertSpec {
    layer: u32,
    expert: u32,
    matrices: [MatrixSpec; 3],
}

/// A checked assignment: every matrix's type and shape are valid and agree with its byte length,
/// every expert is a well-formed SwiGLU FFN of one hidden size.
#[derive(Debug)]
pub struct Plan {
    experts: Vec<ExpertSpec>,
    blobs: Vec<TensorBlob>,
    bytes: u64,
}

impl Plan {
    /// Checks `assignment`.
    pub fn new(assignment: &Assignment) -> Result<Self, PlanError> {
        let mut experts = Vec::with_capacity(assignment.shards.len());
        let mut seen = HashMap::with_capacity(assignment.shards.len());
        let mut blobs: Vec<TensorBlob> = Vec::new();
        let mut blob_at: HashMap<BlobHash, usize> = HashMap::new();
        let mut n_embd = None;
        for shard in &assignment.shards {
            let ExpertShard { layer, expert, .. } = *shard;
            if seen.insert((layer, expert), ()).is_some() {
                return Err(PlanError::Duplicate { layer, expert });
            }
            let spec = check_expert(shard)?;
            let got = shard.gate.cols;
            let expected = *n_embd.get_or_insert(got);
            if expected != got {
                return Err(PlanError::HiddenSize { layer, expert, got, expected });
            }
            for blob in [&shard.gate, &shard.up, &shard.down] {
                match blob_at.get(&blob.hash) {
                    Some(&i) if blobs[i].len != blob.len => {
                        return Err(PlanError::HashLength { hash: hex(&blob.hash), a: blobs[i].len, b: blob.len });
                    }
                    Some(_) => {}
                    None => {
                        blob_at.insert(blob.hash, blobs.len());
                        blobs.push(blob.clone());
                    }
                }
            }
            experts.push(spec);
        }
        let bytes = blobs.iter().map(|b| b.len).sum();
        Ok(Plan { experts, blobs, bytes })
    }

    /// The distinct blobs the assignment names, in order of first appearance.
    pub fn blobs(&self) -> &[TensorBlob] {
        &self.blobs
    }

    /// Total size of the distinct blobs, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The experts, viewing the blobs in `blobs`; `None` if a blob is missing or has the wrong
    /// length.
    pub fn hold(&self, blobs: &HashMap<BlobHash, Arc<Blob>>) -> Option<HeldExperts> {
        let mut experts = HashMap::with_capacity(self.experts.len());
        for spec in &self.experts {
            let mut held = spec.matrices.iter().map(|m| {
                let blob = blobs.get(&m.hash)?;
                let len = m.ty.row_bytes(m.cols)? * m.rows;
                (blob.bytes().len() == len).then(|| HeldMatrix {
                    ty: m.ty,
                    rows: m.rows,
                    cols: m.cols,
                    blob: Arc::clone(blob),
                })
            });
            let (gate, up, down) = (held.next()??, held.next()??, held.next()??);
            experts.insert((spec.layer, spec.expert), HeldExpert { gate, up, down });
        }
        let n_embd = self.experts.first().map_or(0, |e| e.matrices[0].cols);
        Some(HeldExperts { n_embd, experts, bytes: self.bytes })
    }
}

/// Checks one shard's three matrices and their shapes.
fn check_expert(shard: &ExpertShard) -> Result<ExpertSpec, PlanError> {
    let (layer, expert) = (shard.layer, shard.expert);
    let (gate, up, down) = (&shard.gate, &shard.up, &shard.down);
    let (n_ff, n_embd) = (gate.rows, gate.cols);
    if (up.rows, up.cols, down.rows, down.cols) != (n_ff, n_embd, n_embd, n_ff) {
        let shapes = [(gate.rows, gate.cols), (up.rows, up.cols), (down.rows, down.cols)];
        return Err(PlanError::Shapes { layer, expert, shapes });
    }
    let matrices = [
        check_matrix(layer, expert, "gate", gate)?,
        check_matrix(layer, expert, "up", up)?,
        check_matrix(layer, expert, "down", down)?,
    ];
    Ok(ExpertSpec { layer, expert, matrices })
}

/// Checks one matrix: known type, non-empty shape, whole blocks per row, `len == rows * row_bytes`.
fn check_matrix(layer: u32, expert: u32, matrix: &'static str, blob: &TensorBlob) -> Result<MatrixSpec, PlanError> {
    let ty = GgmlType::from_ggml_id(blob.ggml_type).ok_or(PlanError::UnknownType {
        layer,
        expert,
        matrix,
        id: blob.ggml_type,
    })?;
    let bad = |reason: String| PlanError::BadMatrix { layer, expert, matrix, reason };
    let (rows, cols) = (blob.rows as usize, blob.cols as usize);
    if rows == 0 || cols == 0 {
        return Err(bad(format!("empty shape [{rows}, {cols}]")));
    }
    let row_bytes = ty.row_bytes(cols).ok_or_else(|| {
        bad(format!("{cols} columns is not a multiple of the {ty} block of {} elements", ty.block_size()))
    })?;
    let expected = (row_bytes as u64).checked_mul(rows as u64);
    if expected != Some(blob.len) {
        return Err(bad(format!("{ty} [{rows}, {cols}] needs {} bytes, the blob has {}", rows * row_bytes, blob.len)));
    }
    Ok(MatrixSpec { ty, rows, cols, hash: blob.hash })
}

/// One held matrix: its type, shape and the blob it views.
struct HeldMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    blob: Arc<Blob>,
}

impl HeldMatrix {
    fn view(&self) -> QMatrix<'_> {
        QMatrix::new(self.ty, self.rows, self.cols, self.blob.bytes())
    }
}

/// One held expert's gate, up and down matrices.
pub struct HeldExpert {
    gate: HeldMatrix,
    up: HeldMatrix,
    down: HeldMatrix,
}

impl HeldExpert {
    /// Kernel views of the three matrices.
    pub fn ffn(&self) -> ExpertFfn<'_> {
        ExpertFfn { gate: self.gate.view(), up: self.up.view(), down: self.down.view() }
    }
}

/// The experts a session holds, by (layer, expert), all of one hidden size.
pub struct HeldExperts {
    n_embd: usize,
    experts: HashMap<(u32, u32), HeldExpert>,
    bytes: u64,
}

impl HeldExperts {
    /// Hidden size in elements (0 when no expert is held).
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Expert `expert` of layer `layer`, if held.
    pub fn get(&self, layer: u32, expert: u32) -> Option<&HeldExpert> {
        self.experts.get(&(layer, expert))
    }

    /// Number of (layer, expert) pairs held.
    pub fn count(&self) -> usize {
        self.experts.len()
    }

    /// Total size of the distinct blobs held, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q8_0 matrix blob of `rows` x `cols` whose hash is `seed` repeated.
    fn blob(seed: u8, rows: u32, cols: u32) -> TensorBlob {
        let len = u64::from(rows) * u64::from(cols / 32 * 34);
        TensorBlob { ggml_type: 8, rows, cols, hash: [seed; 32], len, file_offset: 0 }
    }

    fn shard(layer: u32, expert: u32, seed: u8) -> ExpertShard {
        ExpertShard {
            layer,
            expert,
            gate: blob(seed, 64, 128),
            up: blob(seed + 1, 64, 128),
            down: blob(seed + 2, 128, 64),
        }
    }

    fn plan(shards: Vec<ExpertShard>) -> Result<Plan, PlanError> {
        Plan::new(&Assignment { model_id: [0; 32], shards })
    }

    #[test]
    fn distinct_blobs_are_counted_once() {
        let mut second = shard(0, 1, 20);
        second.up = shard(0, 0, 10).up;
        let p = plan(vec![shard(0, 0, 10), second]).expect("valid");
        assert_eq!(p.blobs().len(), 5);
        assert_eq!(p.bytes(), 5 * 64 * 4 * 34);
        assert!(p.hold(&HashMap::new()).is_none());
    }

    #[test]
    fn refusals() {
        assert_eq!(
            plan(vec![shard(0, 0, 1), shard(0, 0, 5)]).unwrap_err(),
            PlanError::Duplicate { layer: 0, expert: 0 }
        );

        let mut s = shard(1, 2, 1);
        s.down.ggml_type = 99;
        assert!(matches!(plan(vec![s]), Err(PlanError::UnknownType { id: 99, matrix: "down", .. })));

        let mut s = shard(1, 2, 1);
        s.gate.len -= 1;
        assert!(matches!(plan(vec![s]), Err(PlanError::BadMatrix { matrix: "gate", .. })));

        let mut s = shard(1, 2, 1);
        (s.up.cols, s.gate.cols, s.down.rows) = (100, 100, 100);
        assert!(matches!(plan(vec![s]), Err(PlanError::BadMatrix { matrix: "gate", .. })), "partial Q8_0 block");

        let mut s = shard(1, 2, 1);
        s.down = blob(3, 64, 128);
        let err = plan(vec![s]).unwrap_err();
        assert!(err.to_string().contains("down [64, 128]"), "{err}");

        let mut other = shard(0, 1, 20);
        (other.gate, other.up, other.down) = (blob(20, 64, 256), blob(21, 64, 256), blob(22, 256, 64));
        assert!(matches!(
            plan(vec![shard(0, 0, 1), other]),
            Err(PlanError::HiddenSize { got: 256, expected: 128, .. })
        ));

        let mut twice = shard(0, 1, 20);
        (twice.gate, twice.up, twice.down) = (blob(1, 32, 128), blob(21, 32, 128), blob(22, 128, 32));
        assert!(matches!(plan(vec![shard(0, 0, 1), twice]), Err(PlanError::HashLength { .. })));
    }
}
