//! Hyperparameters of a supported architecture, read from GGUF metadata.
//!
//! Key names are llama.cpp's (`src/llama-arch.cpp`, `LLM_KV_*`), prefixed with the architecture
//! name, e.g. `mellum.embedding_length`. Semantics follow `src/models/mellum.cpp` and
//! `src/models/qwen3moe.cpp`.

use moeshard_kernels::rope::{Rope, Yarn};

use crate::gguf::{GgufError, GgufFile};

/// A model architecture moeshard can run (GGUF `general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// JetBrains Mellum2 (`mellum`): Qwen3-MoE's graph plus sliding-window layers and YaRN on the
    /// full-attention layers.
    Mellum,
    /// Qwen3-MoE (`qwen3moe`).
    Qwen3Moe,
}

impl Arch {
    /// The GGUF `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Mellum => "mellum",
            Arch::Qwen3Moe => "qwen3moe",
        }
    }

    /// Whether the selected experts' weights are renormalised to sum to 1
    /// (`norm_topk_prob` in HF configs; `norm_w = true` in llama.cpp's graph for both).
    pub fn renormalizes_top_k(self) -> bool {
        true
    }
}

/// Errors found while reading a model's hyperparameters.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or a key is missing / mistyped.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `general.architecture` names an architecture moeshard does not implement.
    #[error("{file}: unknown architecture {arch:?} (supported: mellum, qwen3moe)")]
    UnknownArchitecture {
        /// The model file.
        file: String,
        /// The architecture string found.
        arch: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{file}: {message}")]
    Invalid {
        /// The model file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

/// Hyperparameters of a Mellum / Qwen3-MoE model (names as in llama.cpp's `llama_hparams`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Hidden size (`embedding_length`; HF `hidden_size`).
    pub n_embd: usize,
    /// Transformer blocks (`block_count`).
    pub n_layer: usize,
    /// Query heads (`attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`attention.head_count_kv`).
    pub n_head_kv: usize,
    /// Elements per attention head (`attention.key_length`; equal to `value_length`).
    pub head_dim: usize,
    /// Experts per MoE layer (`expert_count`).
    pub n_expert: usize,
    /// Experts used per token (`expert_used_count`).
    pub n_expert_used: usize,
    /// Hidden size of one expert FFN (`expert_feed_forward_length`).
    pub n_ff_exp: usize,
    /// Vocabulary size (rows of `token_embd.weight`).
    pub n_vocab: usize,
    /// Training context length in tokens (`context_length`).
    pub n_ctx_train: usize,
    /// RMSNorm epsilon (`attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// RoPE of full-attention layers.
    pub rope_full: Rope,
    /// RoPE of sliding-window layers (plain RoPE, no YaRN, `rope.freq_base_swa`).
    pub rope_swa: Rope,
    /// Sliding window in tokens (`attention.sliding_window`), if the model has sliding layers.
    pub sliding_window: Option<usize>,
    /// Per layer: true when the layer uses the sliding window.
    pub swa_layers: Vec<bool>,
}

impl ModelConfig {
    /// Reads the hyperparameters from `gguf`'s metadata; `n_vocab` comes from the
    /// `token_embd.weight` tensor.
    ///
    /// Errors name the file and the key: unknown architecture, missing keys, zero or inconsistent
    /// sizes (e.g. `head_count` not a multiple of `head_count_kv`).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ConfigError> {
        let file = gguf.path().display().to_string();
        let arch_name = gguf.architecture()?;
        let arch = match arch_name {
            "mellum" => Arch::Mellum,
            "qwen3moe" => Arch::Qwen3Moe,
            other => return Err(ConfigError::UnknownArchitecture { file, arch: other.to_string() }),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| -> Result<usize, GgufError> { Ok(gguf.get_u32(&key(k))? as usize) };
        let f_or = |k: &str, default: f32| -> Result<f32, GgufError> {
            match gguf.get(&key(k)) {
                Some(_) => gguf.get_f32(&key(k)),
                None => Ok(default),
            }
        };
        let invalid = |message: String| ConfigError::Invalid { file: file.clone(), message };

        let n_embd = u("embedding_length")?;
        let n_layer = u("block_count")?;
        let n_head = u("attention.head_count")?;
        let n_head_kv = u("attention.head_count_kv")?;
        let head_dim = match gguf.get(&key("attention.key_length")) {
            Some(_) => u("attention.key_length")?,
            None if n_head > 0 => n_embd / n_head,
            None => 0,
        };
        if gguf.get(&key("attention.value_length")).is_some() && u("attention.value_length")? != head_dim {
            return Err(invalid("attention.value_length differs from attention.key_length".into()));
        }
        let n_expert = u("expert_count")?;
        let n_expert_used = u("expert_used_count")?;
        let n_ff_exp = u("expert_feed_forward_length")?;
        let n_ctx_train = u("context_length")?;
        let rms_eps = gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        for (name, v) in [
            ("embedding_length", n_embd),
            ("block_count", n_layer),
            ("attention.head_count", n_head),
            ("attention.head_count_kv", n_head_kv),
            ("attention.key_length", head_dim),
            ("expert_count", n_expert),
            ("expert_used_count", n_expert_used),
            ("expert_feed_forward_length", n_ff_exp),
        ] {
            if v == 0 {
                return Err(invalid(format!("{arch_name}.{name} is 0")));
            }
        }
        if n_head % n_head_kv != 0 {
            return Err(invalid(format!("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")));
        }
        if n_expert_used > n_expert {
            return Err(invalid(format!("expert_used_count {n_expert_used} exceeds expert_count {n_expert}")));
        }
        if head_dim % 2 != 0 {
            return Err(invalid(format!("head size {head_dim} is odd; RoPE needs pairs")));
        }
        let n_vocab = match gguf.tensor("token_embd.weight")?.dims.get(1) {
            Some(&v) if v > 0 => v as usize,
            _ => return Err(invalid("token_embd.weight is not a 2-D [n_embd, n_vocab] tensor".into())),
        };

        let freq_base = f_or("rope.freq_base", 10000.0)?;
        let freq_base_swa = f_or("rope.freq_base_swa", freq_base)?;
        let yarn = match gguf.get(&key("rope.scaling.type")) {
            Some(_) => match gguf.get_str(&key("rope.scaling.type"))? {
                "yarn" => {
                    let factor = gguf.get_f32(&key("rope.scaling.factor"))?;
                    if factor <= 0.0 {
                        return Err(invalid(format!("rope.scaling.factor {factor} must be positive")));
                    }
                    Some(Yarn {
                        factor,
                        original_context: match gguf.get(&key("rope.scaling.original_context_length")) {
                            Some(_) => gguf.get_u32(&key("rope.scaling.original_context_length"))?,
                            None => n_ctx_train as u32,
                        },
                        beta_fast: f_or("rope.scaling.yarn_beta_fast", 32.0)?,
                        beta_slow: f_or("rope.scaling.yarn_beta_slow", 1.0)?,
                        attn_factor: f_or("rope.scaling.yarn_attn_factor", Yarn::default_attn_factor(factor))?,
                    })
                }
                "none" => None,
                other => {
                    return Err(invalid(format!("unsupported rope.scaling.type {other:?} (supported: yarn, none)")));
                }
            },
            None => None,
        };

        let sliding_window = match gguf.get(&key("attention.sliding_window")) {
            Some(_) => Some(u("attention.sliding_window")?).filter(|&w| w > 0),
            None => None,
        };
        let swa_layers = match (arch, sliding_window) {
            (Arch::Mellum, Some(_)) => {
                let pattern = match gguf.get(&key("attention.sliding_window_pattern")) {
                    Some(_) => gguf.get_bool_array(&key("attention.sliding_window_pattern"))?,
                    // llama.cpp's default for mellum: every 4th layer is full attention.
                    None => vec![true, true, true, false],
                };
                if pattern.is_empty() {
                    return Err(invalid("attention.sliding_window_pattern is empty".into()));
                }
                (0..n_layer).map(|il| pattern[il % pattern.len()]).collect()
            }
            _ => vec![false; n_layer],
        };

        Ok(ModelConfig {
            arch,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_expert,
            n_expert_used,
            n_ff_exp,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope_full: Rope { n_dims: head_dim, freq_base, yarn },
            rope_swa: Rope { n_dims: head_dim, freq_base: freq_base_swa, yarn: None },
            sliding_window: if arch == Arch::Mellum { sliding_window } else { None },
            swa_layers,
        })
    }

    /// Whether layer `il` attends over a sliding window.
    pub fn is_swa(&self, il: usize) -> bool {
        self.swa_layers[il]
    }

    /// The RoPE settings of layer `il`.
    pub fn rope(&self, il: usize) -> &Rope {
        if self.is_swa(il) { &self.rope_swa } else { &self.rope_full }
    }

    /// Elements of a K or V row of one token in one layer (`n_head_kv * head_dim`).
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
