//! A loaded model: hyperparameters plus views of its tensors in the memory-mapped GGUF file.
//!
//! Tensor names and shapes are llama.cpp's (`src/models/mellum.cpp`, `qwen3moe.cpp`): dims are
//! GGUF order (`dims[0]` = elements per row), so `blk.N.attn_q.weight` with dims
//! `[n_embd, n_head * head_dim]` is a matrix of `n_head * head_dim` rows of `n_embd` elements,
//! and the stacked experts `blk.N.ffn_gate_exps.weight` `[n_embd, n_ff_exp, n_expert]` hold
//! `n_expert` consecutive `[n_ff_exp, n_embd]` matrices.

mod config;
mod forward;

use std::path::Path;
use std::sync::Arc;

use moeshard_kernels::matmul::QMatrix;
use moeshard_kernels::moe::ExpertFfn;
use moeshard_kernels::quant::GgmlType;

use crate::gguf::{GgufError, GgufFile, TensorInfo};

pub use config::{Arch, ConfigError, ModelConfig};
pub use forward::{ForwardError, Logits, SeqBatch};

/// Errors from loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not a readable GGUF file.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The hyperparameters are missing or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tensor has the wrong shape.
    #[error("{file}: tensor {name}: expected dims {expected:?}, found {found:?}")]
    Shape {
        /// The model file.
        file: String,
        /// The tensor.
        name: String,
        /// Dims the architecture requires (GGUF order).
        expected: Vec<u64>,
        /// Dims in the file.
        found: Vec<u64>,
    },
}

/// A 2-D weight matrix in the mapped file: `rows` rows of `cols` elements of type `ty` starting
/// at byte `offset` of the file.
#[derive(Clone, Copy, Debug)]
pub struct MatrixRef {
    /// Element type.
    pub ty: GgmlType,
    /// Rows (output features).
    pub rows: usize,
    /// Elements per row (input features).
    pub cols: usize,
    /// Absolute byte offset of row 0 in the file.
    pub offset: usize,
}

impl MatrixRef {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols).expect("validated at load")
    }

    /// Bytes of the whole matrix.
    pub fn n_bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }
}

/// A stacked expert tensor (`ffn_{gate,up,down}_exps`): `n_expert` matrices of `rows x cols`.
#[derive(Clone, Copy, Debug)]
pub struct ExpertsRef {
    /// Expert 0's matrix; expert `e` starts `e * matrix.n_bytes()` bytes later.
    pub matrix: MatrixRef,
    /// Number of experts stacked.
    pub n_expert: usize,
}

impl ExpertsRef {
    /// Expert `e`'s matrix.
    pub fn expert(&self, e: usize) -> MatrixRef {
        assert!(e < self.n_expert, "expert {e} of {}", self.n_expert);
        MatrixRef { offset: self.matrix.offset + e * self.matrix.n_bytes(), ..self.matrix }
    }
}

/// The tensors of one transformer block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `attn_norm` (`[n_embd]`).
    pub attn_norm: Vec<f32>,
    /// `attn_q` (`n_head * head_dim` rows of `n_embd`).
    pub attn_q: MatrixRef,
    /// `attn_k` (`n_head_kv * head_dim` rows of `n_embd`).
    pub attn_k: MatrixRef,
    /// `attn_v` (`n_head_kv * head_dim` rows of `n_embd`).
    pub attn_v: MatrixRef,
    /// `attn_output` (`n_embd` rows of `n_head * head_dim`).
    pub attn_output: MatrixRef,
    /// Per-head RMSNorm weight of queries (`[head_dim]`).
    pub attn_q_norm: Vec<f32>,
    /// Per-head RMSNorm weight of keys (`[head_dim]`).
    pub attn_k_norm: Vec<f32>,
    /// `ffn_norm` (`[n_embd]`).
    pub ffn_norm: Vec<f32>,
    /// Router `ffn_gate_inp` (`n_expert` rows of `n_embd`).
    pub ffn_gate_inp: MatrixRef,
    /// Experts' gate projections (`n_ff_exp` rows of `n_embd` each).
    pub ffn_gate_exps: ExpertsRef,
    /// Experts' up projections (`n_ff_exp` rows of `n_embd` each).
    pub ffn_up_exps: ExpertsRef,
    /// Experts' down projections (`n_embd` rows of `n_ff_exp` each).
    pub ffn_down_exps: ExpertsRef,
}

/// A model ready to run: its file stays mapped for the model's lifetime.
pub struct Model {
    /// Hyperparameters.
    pub config: ModelConfig,
    gguf: Arc<GgufFile>,
    /// `token_embd` (`n_vocab` rows of `n_embd`).
    pub tok_embd: MatrixRef,
    /// `output_norm` (`[n_embd]`).
    pub output_norm: Vec<f32>,
    /// LM head `output` (`n_vocab` rows of `n_embd`).
    pub output: MatrixRef,
    /// Per-layer tensors.
    pub layers: Vec<LayerWeights>,
}

impl Model {
    /// Opens and validates a GGUF model: architecture, hyperparameters, and every tensor's
    /// presence, type and shape. Errors name the file and the tensor or key.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, LoadError> {
        Self::from_gguf(Arc::new(GgufFile::open(path)?))
    }

    /// Builds the model over an already opened file.
    pub fn from_gguf(gguf: Arc<GgufFile>) -> Result<Model, LoadError> {
        let config = ModelConfig::from_gguf(&gguf)?;
        let c = &config;
        let (e, kv, q) = (c.n_embd as u64, c.n_embd_kv() as u64, (c.n_head * c.head_dim) as u64);
        let (ff, nx, hd) = (c.n_ff_exp as u64, c.n_expert as u64, c.head_dim as u64);
        let tok_embd = matrix(&gguf, "token_embd.weight", [e, c.n_vocab as u64])?;
        let output_norm = vector(&gguf, "output_norm.weight", e)?;
        let output = matrix(&gguf, "output.weight", [e, c.n_vocab as u64])?;
        let layers = (0..c.n_layer)
            .map(|il| {
                let n = |t: &str| format!("blk.{il}.{t}.weight");
                Ok(LayerWeights {
                    attn_norm: vector(&gguf, &n("attn_norm"), e)?,
                    attn_q: matrix(&gguf, &n("attn_q"), [e, q])?,
                    attn_k: matrix(&gguf, &n("attn_k"), [e, kv])?,
                    attn_v: matrix(&gguf, &n("attn_v"), [e, kv])?,
                    attn_output: matrix(&gguf, &n("attn_output"), [q, e])?,
                    attn_q_norm: vector(&gguf, &n("attn_q_norm"), hd)?,
                    attn_k_norm: vector(&gguf, &n("attn_k_norm"), hd)?,
                    ffn_norm: vector(&gguf, &n("ffn_norm"), e)?,
                    ffn_gate_inp: matrix(&gguf, &n("ffn_gate_inp"), [e, nx])?,
                    ffn_gate_exps: experts(&gguf, &n("ffn_gate_exps"), [e, ff, nx])?,
                    ffn_up_exps: experts(&gguf, &n("ffn_up_exps"), [e, ff, nx])?,
                    ffn_down_exps: experts(&gguf, &n("ffn_down_exps"), [ff, e, nx])?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(Model { config, gguf, tok_embd, output_norm, output, layers })
    }

    /// The mapped model file.
    pub fn gguf(&self) -> &Arc<GgufFile> {
        &self.gguf
    }

    /// A matrix view over the mapped bytes.
    pub fn matrix(&self, m: &MatrixRef) -> QMatrix<'_> {
        QMatrix::new(m.ty, m.rows, m.cols, &self.gguf.data()[m.offset..m.offset + m.n_bytes()])
    }

    /// Expert `e` of layer `il` as the three matrices of its SwiGLU FFN.
    pub fn expert_ffn(&self, il: usize, e: usize) -> ExpertFfn<'_> {
        let l = &self.layers[il];
        ExpertFfn {
            gate: self.matrix(&l.ffn_gate_exps.expert(e)),
            up: self.matrix(&l.ffn_up_exps.expert(e)),
            down: self.matrix(&l.ffn_down_exps.expert(e)),
        }
    }
}

fn shape_error(gguf: &GgufFile, t: &TensorInfo, expected: &[u64]) -> LoadError {
    LoadError::Shape {
        file: gguf.path().display().to_string(),
        name: t.name.clone(),
        expected: expected.to_vec(),
        found: t.dims.clone(),
    }
}

fn matrix(gguf: &GgufFile, name: &str, dims: [u64; 2]) -> Result<MatrixRef, LoadError> {
    let t = gguf.tensor(name)?;
    if t.dims != dims {
        return Err(shape_error(gguf, t, &dims));
    }
    Ok(MatrixRef { ty: t.ty, rows: dims[1] as usize, cols: dims[0] as usize, offset: t.offset as usize })
}

fn experts(gguf: &GgufFile, name: &str, dims: [u64; 3]) -> Result<ExpertsRef, LoadError> {
    let t = gguf.tensor(name)?;
    if t.dims != dims {
        return Err(shape_error(gguf, t, &dims));
    }
    Ok(ExpertsRef {
        matrix: MatrixRef { ty: t.ty, rows: dims[1] as usize, cols: dims[0] as usize, offset: t.offset as usize },
        n_expert: dims[2] as usize,
    })
}

/// A 1-D tensor (norm weights), converted to f32.
fn vector(gguf: &GgufFile, name: &str, n: u64) -> Result<Vec<f32>, LoadError> {
    let t = gguf.tensor(name)?;
    if t.dims != [n] {
        return Err(shape_error(gguf, t, &[n]));
    }
    let mut out = vec![0.0; n as usize];
    t.ty.dequantize_row(gguf.tensor_data(t), &mut out);
    Ok(out)
}
