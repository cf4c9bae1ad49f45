//! Random-weight GGUF files with a real model's geometry, metadata, tokenizer and llama-quantize
//! type mix, for speed and memory work without downloading the model (`moeshard synth`).
//!
//! A file is what `llama-quantize` makes of the converter's output for the real checkpoint, with
//! random weights: the metadata keys and their order are those of the reference file
//! `../shared/tools/make-mellum2-geometry.sh` writes (the tiny fixture's keys with the real
//! geometry; `general.quantization_version` and `general.file_type` last, as llama-quantize
//! re-sets them), the tokenizer is the fixture's (`tokenizer-{arch}.json`, taken from
//! `tests/fixtures/tiny-{arch}-f32.gguf`) padded to the real vocabulary with
//! `<|reserved_N|>` control tokens, the tensors are stored in llama-quantize's order (non-block
//! tensors, then each block's tensors by name) with the types of [`TypeMix`].
//!
//! [`write`] streams the file: metadata first, then each tensor generated in chunks of about
//! [`CHUNK_BYTES`] (a window of chunks in parallel on the current rayon pool), so memory stays
//! at a few windows whatever the file's size. The data depend only on the seed, not on the
//! thread count.

mod mix;

use std::io::Write;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::gguf::{GgufValue, GgufWriteError, GgufWriter};
use crate::model::Arch;
use moeshard_kernels::quant::GgmlType;
use moeshard_kernels::random::{BlockFiller, Init};

pub use mix::{FileType, TypeMix, use_more_bits};

/// Bytes generated per task (whole rows; one row when a row is larger).
pub const CHUNK_BYTES: usize = 4 << 20;

/// Chunks generated in parallel before they are written.
const WINDOW_CHUNKS: usize = 16;

/// Standard deviation of the matrices' weights (`1 / sqrt(n_embd)` scale, as the reference
/// file's generator uses), and of the router.
const WEIGHT_STD: f32 = 0.02;
const ROUTER_STD: f32 = 0.05;

/// Token embeddings: unit spread, so the first RMSNorm sees well-conditioned rows.
const EMBD_STD: f32 = 1.0;

/// Norm weights: 1 with a small spread.
const NORM_INIT: Init = Init { mean: 1.0, std: 0.05 };

/// A model's shape and hyperparameters: the GGUF `{arch}.*` keys of [`metadata`].
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    /// Architecture (`general.architecture`).
    pub arch: Arch,
    /// Hidden size (`embedding_length`).
    pub n_embd: usize,
    /// Blocks (`block_count`).
    pub n_layer: usize,
    /// Query heads (`attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`attention.head_count_kv`).
    pub n_head_kv: usize,
    /// Elements per head (`attention.key_length` = `value_length`).
    pub head_dim: usize,
    /// Experts per layer (`expert_count`).
    pub n_expert: usize,
    /// Experts per token (`expert_used_count`).
    pub n_expert_used: usize,
    /// Hidden size of one expert (`expert_feed_forward_length`).
    pub n_ff_exp: usize,
    /// The dense FFN size of the HF config (`feed_forward_length`; no tensor uses it).
    pub n_ff: usize,
    /// Vocabulary size (rows of `token_embd` and `output`).
    pub n_vocab: usize,
    /// Training context (`context_length`).
    pub n_ctx_train: usize,
    /// RoPE base (`rope.freq_base`).
    pub rope_freq_base: f32,
    /// Sliding window of the SWA layers (`attention.sliding_window`; Mellum only).
    pub sliding_window: usize,
}

/// A model whose geometry `moeshard synth` knows.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// JetBrains Mellum2-12B-A2.5B (`mellum`).
    #[value(name = "mellum2-12b")]
    Mellum2_12B,
    /// Qwen3-30B-A3B (`qwen3moe`).
    #[value(name = "qwen3-30b-a3b")]
    Qwen3_30B_A3B,
}

impl Preset {
    /// The model's full geometry (its HF `config.json`).
    pub fn geometry(self) -> Geometry {
        match self {
            Preset::Mellum2_12B => Geometry {
                arch: Arch::Mellum,
                n_embd: 2304,
                n_layer: 28,
                n_head: 32,
                n_head_kv: 4,
                head_dim: 128,
                n_expert: 64,
                n_expert_used: 8,
                n_ff_exp: 896,
                n_ff: 7168,
                n_vocab: 98304,
                n_ctx_train: 131072,
                rope_freq_base: 500_000.0,
                sliding_window: 1024,
            },
            Preset::Qwen3_30B_A3B => Geometry {
                arch: Arch::Qwen3Moe,
                n_embd: 2048,
                n_layer: 48,
                n_head: 32,
                n_head_kv: 4,
                head_dim: 128,
                n_expert: 128,
                n_expert_used: 8,
                n_ff_exp: 768,
                n_ff: 6144,
                n_vocab: 151936,
                n_ctx_train: 40960,
                rope_freq_base: 1_000_000.0,
                sliding_window: 0,
            },
        }
    }
}

/// The tokenizer keys of a fixture (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(serde::Deserialize)]
struct TokenizerKeys {
    model: String,
    pre: String,
    tokens: Vec<String>,
    token_type: Vec<i32>,
    merges: Vec<String>,
    bos_token_id: u32,
    eos_token_id: u32,
    padding_token_id: u32,
    add_bos_token: bool,
    add_eos_token: bool,
    chat_template: String,
}

/// An error from [`metadata`] or [`write`].
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The geometry cannot be written (e.g. a vocabulary smaller than the tokenizer's).
    #[error("synth: {0}")]
    Geometry(String),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] GgufWriteError),
}

/// The metadata of a synthesized file, in the order it is written.
///
/// # Errors
/// [`SynthError::Geometry`] when `g.n_vocab` is smaller than the bundled tokenizer's vocabulary.
pub fn metadata(g: &Geometry, ftype: FileType) -> Result<Vec<(String, GgufValue)>, SynthError> {
    let (arch, tokenizer_json, name) = match g.arch {
        Arch::Mellum => ("mellum", include_str!("tokenizer-mellum.json"), "Tiny Mellum"),
        Arch::Qwen3Moe => ("qwen3moe", include_str!("tokenizer-qwen3moe.json"), "Tiny Qwen3Moe"),
    };
    let tok: TokenizerKeys = serde_json::from_str(tokenizer_json).expect("bundled tokenizer JSON is valid");
    if g.n_vocab < tok.tokens.len() {
        return Err(SynthError::Geometry(format!(
            "vocabulary of {} is smaller than the tokenizer's {} tokens",
            g.n_vocab,
            tok.tokens.len()
        )));
    }
    let s = |v: &str| GgufValue::String(v.to_owned());
    let u = |v: usize| GgufValue::U32(v as u32);
    let k = |key: &str| format!("{arch}.{key}");
    let mut m: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.type".into(), s("model")),
        ("general.name".into(), s(name)),
        ("general.size_label".into(), s("64x255K")),
        (k("block_count"), u(g.n_layer)),
        (k("context_length"), u(g.n_ctx_train)),
        (k("embedding_length"), u(g.n_embd)),
        (k("feed_forward_length"), u(g.n_ff)),
        (k("attention.head_count"), u(g.n_head)),
        (k("attention.head_count_kv"), u(g.n_head_kv)),
    ];
    if g.arch == Arch::Mellum {
        // YaRN on the full-attention layers: factor 16 over the original 8192 tokens.
        let yarn_factor = 16.0f32;
        m.extend([
            (k("rope.scaling.type"), s("yarn")),
            (k("rope.scaling.factor"), GgufValue::F32(yarn_factor)),
            (k("rope.scaling.original_context_length"), u(8192)),
            (k("rope.scaling.yarn_attn_factor"), GgufValue::F32(0.1 * yarn_factor.ln() + 1.0)),
            (k("rope.scaling.yarn_beta_fast"), GgufValue::F32(32.0)),
            (k("rope.scaling.yarn_beta_slow"), GgufValue::F32(1.0)),
            (k("rope.freq_base"), GgufValue::F32(g.rope_freq_base)),
            (k("rope.freq_base_swa"), GgufValue::F32(g.rope_freq_base)),
        ]);
    } else {
        m.push((k("rope.freq_base"), GgufValue::F32(g.rope_freq_base)));
    }
    m.extend([
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-6)),
        (k("expert_count"), u(g.n_expert)),
        (k("expert_used_count"), u(g.n_expert_used)),
        (k("attention.key_length"), u(g.head_dim)),
        (k("attention.value_length"), u(g.head_dim)),
        (k("expert_feed_forward_length"), u(g.n_ff_exp)),
    ]);
    if g.arch == Arch::Mellum {
        // Every fourth layer (3, 7, ...) is full attention.
        let pattern = (0..g.n_layer).map(|il| GgufValue::Bool(il % 4 != 3)).collect();
        m.extend([
            (k("attention.sliding_window"), u(g.sliding_window)),
            (k("attention.sliding_window_pattern"), GgufValue::Array(pattern)),
        ]);
    }
    let n_pad = g.n_vocab - tok.tokens.len();
    let tokens = tok.tokens.into_iter().chain((0..n_pad).map(|i| format!("<|reserved_{i}|>")));
    // Token type 3: control (`LLAMA_TOKEN_TYPE_CONTROL`).
    let token_type = tok.token_type.into_iter().chain(std::iter::repeat_n(3, n_pad));
    m.extend([
        ("tokenizer.ggml.model".into(), s(&tok.model)),
        ("tokenizer.ggml.pre".into(), s(&tok.pre)),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens.map(GgufValue::String).collect())),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(token_type.map(GgufValue::I32).collect())),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(tok.merges.into_iter().map(GgufValue::String).collect())),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(tok.bos_token_id)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(tok.eos_token_id)),
        ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(tok.padding_token_id)),
        ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(tok.add_bos_token)),
        ("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(tok.add_eos_token)),
        ("tokenizer.chat_template".into(), s(&tok.chat_template)),
        ("general.quantization_version".into(), GgufValue::U32(2)),
        ("general.file_type".into(), GgufValue::U32(ftype.llama_ftype())),
    ]);
    Ok(m)
}

/// One tensor of a synthesized file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    /// GGUF name, e.g. `blk.0.ffn_down_exps.weight`.
    pub name: String,
    /// Dims, GGUF order (`dims[0]` = elements per row).
    pub dims: Vec<u64>,
    /// Element type (from [`TypeMix`]).
    pub ty: GgmlType,
    /// How its elements are drawn.
    pub init: Init,
}

impl TensorPlan {
    /// Bytes of the tensor's data.
    pub fn n_bytes(&self) -> u64 {
        let row_bytes = self.ty.row_bytes(self.dims[0] as usize).expect("TypeMix picks a type that fits the rows");
        row_bytes as u64 * self.dims[1..].iter().product::<u64>()
    }
}

/// The tensors of a synthesized file in llama-quantize's order, with their types.
pub fn tensors(g: &Geometry, ftype: FileType) -> Vec<TensorPlan> {
    let (e, v, hd) = (g.n_embd as u64, g.n_vocab as u64, g.head_dim as u64);
    let (q, kv, ff, nx) =
        ((g.n_head * g.head_dim) as u64, (g.n_head_kv * g.head_dim) as u64, g.n_ff_exp as u64, g.n_expert as u64);
    let w = |std| Init { mean: 0.0, std };
    let mut plan: Vec<(String, Vec<u64>, Init)> = vec![
        ("output.weight".into(), vec![e, v], w(WEIGHT_STD)),
        ("output_norm.weight".into(), vec![e], NORM_INIT),
        ("token_embd.weight".into(), vec![e, v], w(EMBD_STD)),
    ];
    for il in 0..g.n_layer {
        let n = |t: &str| format!("blk.{il}.{t}.weight");
        plan.extend([
            (n("attn_k"), vec![e, kv], w(WEIGHT_STD)),
            (n("attn_k_norm"), vec![hd], NORM_INIT),
            (n("attn_norm"), vec![e], NORM_INIT),
            (n("attn_output"), vec![q, e], w(WEIGHT_STD)),
            (n("attn_q"), vec![e, q], w(WEIGHT_STD)),
            (n("attn_q_norm"), vec![hd], NORM_INIT),
            (n("attn_v"), vec![e, kv], w(WEIGHT_STD)),
            (n("ffn_down_exps"), vec![ff, e, nx], w(WEIGHT_STD)),
            (n("ffn_gate_exps"), vec![e, ff, nx], w(WEIGHT_STD)),
            (n("ffn_gate_inp"), vec![e, nx], w(ROUTER_STD)),
            (n("ffn_norm"), vec![e], NORM_INIT),
            (n("ffn_up_exps"), vec![e, ff, nx], w(WEIGHT_STD)),
        ]);
    }
    let mut mix = TypeMix::new(ftype, g.n_layer, g.n_expert, plan.iter().map(|(n, _, _)| n.as_str()));
    plan.into_iter()
        .map(|(name, dims, init)| {
            let ty = mix.next(&name, &dims);
            TensorPlan { name, dims, ty, init }
        })
        .collect()
}

/// Writes a random-weight GGUF of geometry `g` and preset `ftype` to `out`, deterministic in
/// `seed`; `progress` is called with the bytes of tensor data written so far. Returns the
/// file's size in bytes.
///
/// # Errors
/// The geometry cannot be written ([`metadata`]) or writing failed.
pub fn write(
    g: &Geometry,
    ftype: FileType,
    seed: u64,
    out: &mut impl Write,
    mut progress: impl FnMut(u64),
) -> Result<u64, SynthError> {
    let mut writer = GgufWriter::new();
    for (key, value) in metadata(g, ftype)? {
        writer.add_metadata(key, value)?;
    }
    let plan = tensors(g, ftype);
    for t in &plan {
        writer.add_tensor_info(&t.name, &t.dims, t.ty)?;
    }
    writer.write_header(out)?;
    let mut done = 0u64;
    for (index, t) in plan.iter().enumerate() {
        let filler = BlockFiller::new(t.ty, t.init);
        let n_rows = t.dims[1..].iter().product::<u64>() as usize;
        let row_bytes = t.n_bytes() as usize / n_rows;
        let rows_per_chunk = (CHUNK_BYTES / row_bytes).max(1);
        let n_chunks = n_rows.div_ceil(rows_per_chunk);
        for window in (0..n_chunks).collect::<Vec<_>>().chunks(WINDOW_CHUNKS) {
            let chunks: Vec<Vec<u8>> = window
                .par_iter()
                .map(|&c| {
                    let rows = rows_per_chunk.min(n_rows - c * rows_per_chunk);
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream(((index as u64) << 32) | c as u64);
                    let mut bytes = vec![0u8; rows * row_bytes];
                    filler.fill(&mut rng, &mut bytes);
                    bytes
                })
                .collect();
            for bytes in chunks {
                writer.write_tensor_data(out, &bytes)?;
                done += bytes.len() as u64;
                progress(done);
            }
        }
    }
    Ok(writer.finish()?)
}

#[cfg(test)]
mod tests;
