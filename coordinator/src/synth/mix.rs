//! The per-tensor type mix of llama-quantize's presets (`src/llama-quant.cpp` of llama.cpp).
//!
//! [`TypeMix::next`] replays, for the five presets moeshard synthesizes, the rules of
//! `llama_tensor_get_type_impl` (by tensor category, file type, layer and expert count) and then
//! `tensor_type_fallback` (a type whose block does not divide the row length is demoted:
//! Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 if even that does not fit).
//! Tensors llama-quantize never quantizes (`tensor_allows_quantization`: 1-D tensors, `_norm`
//! weights, the router `ffn_gate_inp`) stay F32, the type the converter writes them in.

use moeshard_kernels::quant::GgmlType;

/// A llama-quantize preset (`enum llama_ftype` in `include/llama.h`).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileType {
    /// `LLAMA_FTYPE_MOSTLY_Q8_0`: everything Q8_0.
    #[value(name = "q8_0")]
    Q8_0,
    /// `LLAMA_FTYPE_MOSTLY_Q6_K`: Q6_K.
    #[value(name = "q6_k")]
    Q6_K,
    /// `LLAMA_FTYPE_MOSTLY_Q5_K_M`: Q5_K, with Q6_K for some `attn_v` and `ffn_down`.
    #[value(name = "q5_k_m")]
    Q5_K_M,
    /// `LLAMA_FTYPE_MOSTLY_Q4_K_M`: Q4_K, with Q6_K for some `attn_v` and `ffn_down`.
    #[value(name = "q4_k_m")]
    Q4_K_M,
    /// `LLAMA_FTYPE_MOSTLY_Q3_K_S`: Q3_K.
    #[value(name = "q3_k_s")]
    Q3_K_S,
}

impl FileType {
    /// The value of `general.file_type` (`enum llama_ftype`).
    pub fn llama_ftype(self) -> u32 {
        match self {
            FileType::Q8_0 => 7,
            FileType::Q3_K_S => 11,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
        }
    }

    /// The preset's base type (`llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q6_K => GgmlType::Q6_K,
            FileType::Q5_K_M => GgmlType::Q5_K,
            FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q3_K_S => GgmlType::Q3_K,
        }
    }
}

/// `tensor_category` of `llama-quant.cpp` (`tensor_get_category`), for the tensors of the MoE
/// architectures moeshard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    match name {
        "output.weight" => Category::Output,
        "token_embd.weight" => Category::TokenEmbd,
        _ if name.contains("attn_v.weight") => Category::AttnV,
        _ if name.contains("attn_k.weight") => Category::AttnK,
        _ if name.contains("attn_q.weight") => Category::AttnQ,
        _ if name.contains("attn_output.weight") => Category::AttnOutput,
        // ffn_up / ffn_gate have rules only for the IQ presets.
        _ if name.contains("ffn_down") => Category::FfnDown,
        _ => Category::Other,
    }
}

/// llama-quant.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer in between.
pub fn use_more_bits(i_layer: usize, n_layer: usize) -> bool {
    i_layer < n_layer / 8 || i_layer >= 7 * n_layer / 8 || (i_layer as isize - (n_layer / 8) as isize) % 3 == 2
}

/// The type chooser of one llama-quantize run (its `quantize_state_impl` counters): call
/// [`TypeMix::next`] once per tensor, in the order the tensors are stored.
#[derive(Clone, Debug)]
pub struct TypeMix {
    ftype: FileType,
    n_layer: usize,
    n_expert: usize,
    n_attention_wv: usize,
    i_attention_wv: usize,
}

impl TypeMix {
    /// A chooser for a model of `n_layer` blocks and `n_expert` experts per layer whose tensors
    /// are `names` (counted to number the `attn_v` tensors, as `init_quantize_state_counters`).
    pub fn new<'a>(ftype: FileType, n_layer: usize, n_expert: usize, names: impl IntoIterator<Item = &'a str>) -> Self {
        let n_attention_wv = names.into_iter().filter(|n| category(n) == Category::AttnV).count();
        TypeMix { ftype, n_layer, n_expert, n_attention_wv, i_attention_wv: 0 }
    }

    /// The type of the next tensor, `name` with dims `dims` (GGUF order, `dims[0]` = elements
    /// per row).
    ///
    /// # Panics
    /// A block tensor whose name does not start with `blk.N.` (`N < n_layer`), as llama-quantize.
    pub fn next(&mut self, name: &str, dims: &[u64]) -> GgmlType {
        if dims.len() < 2 || name.contains("_norm.weight") || name.contains("ffn_gate_inp.weight") {
            return GgmlType::F32;
        }
        let ty = self.preset_type(name, dims[0]);
        fallback(ty, dims[0])
    }

    /// `llama_tensor_get_type_impl` for this chooser's preset.
    fn preset_type(&mut self, name: &str, n_cols: u64) -> GgmlType {
        let ftype = self.ftype;
        let default = ftype.default_type();
        let k_m = matches!(ftype, FileType::Q4_K_M | FileType::Q5_K_M);
        match category(name) {
            Category::Output if !n_cols.is_multiple_of(default.block_size() as u64) => GgmlType::Q8_0,
            Category::Output if default != GgmlType::Q8_0 => GgmlType::Q6_K,
            Category::AttnV => {
                let mut ty = default;
                if k_m && use_more_bits(self.i_attention_wv, self.n_attention_wv) {
                    ty = GgmlType::Q6_K;
                }
                if self.n_expert == 8 {
                    ty = GgmlType::Q8_0;
                }
                self.i_attention_wv += 1;
                ty
            }
            Category::AttnK if self.n_expert == 8 => GgmlType::Q8_0,
            Category::FfnDown if k_m && use_more_bits(self.layer_of(name), self.n_layer) => GgmlType::Q6_K,
            Category::AttnOutput if self.n_expert == 8 && matches!(ftype, FileType::Q3_K_S | FileType::Q4_K_M) => {
                GgmlType::Q5_K
            }
            _ => default,
        }
    }

    fn layer_of(&self, name: &str) -> usize {
        name.strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse().ok())
            .filter(|&il| il < self.n_layer)
            .unwrap_or_else(|| panic!("tensor {name}: no layer number below {}", self.n_layer))
    }
}

/// `tensor_type_fallback`: the type to use when `ty`'s block does not divide `n_cols`.
fn fallback(ty: GgmlType, n_cols: u64) -> GgmlType {
    let fits = |t: GgmlType| n_cols.is_multiple_of(t.block_size() as u64);
    if fits(ty) {
        return ty;
    }
    let demoted = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if fits(demoted) { demoted } else { GgmlType::F16 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn use_more_bits_matches_llama_quant() {
        let picked: Vec<usize> = (0..28).filter(|&i| use_more_bits(i, 28)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
        assert_eq!((0..4).filter(|&i| use_more_bits(i, 4)).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn fallback_demotes_to_32_element_blocks() {
        assert_eq!(fallback(GgmlType::Q4_K, 896), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6_K, 896), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q3_K, 896), GgmlType::Q4_0);
        assert_eq!(fallback(GgmlType::Q5_K, 896), GgmlType::Q5_1);
        assert_eq!(fallback(GgmlType::Q4_K, 768), GgmlType::Q4_K);
        assert_eq!(fallback(GgmlType::Q6_K, 48), GgmlType::F16);
    }

    /// Every fixture llama-quantize made (8 and 64 experts; expert FFN 32, 256 and 384, the
    /// latter needing the fallback; all five presets) gets exactly its stored type for every
    /// tensor.
    #[test]
    fn replays_llama_quantize_on_every_fixture() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let mut checked = 0;
        for (stem, ftype) in [
            ("q8_0", FileType::Q8_0),
            ("q6_k", FileType::Q6_K),
            ("q5_k_m", FileType::Q5_K_M),
            ("q4_k_m", FileType::Q4_K_M),
            ("q3_k_s", FileType::Q3_K_S),
        ] {
            for family in ["kq-mellum", "odd-mellum", "tiny-mellum", "tiny-qwen3moe"] {
                let path = dir.join(format!("{family}-{stem}.gguf"));
                if !path.exists() {
                    continue;
                }
                let gguf = GgufFile::open(&path).expect("fixture");
                let arch = gguf.architecture().expect("arch").to_owned();
                let n_layer = gguf.get_u32(&format!("{arch}.block_count")).expect("layers") as usize;
                let n_expert = gguf.get_u32(&format!("{arch}.expert_count")).expect("experts") as usize;
                assert_eq!(gguf.get_u32("general.file_type").expect("file type"), ftype.llama_ftype());
                let mut mix = TypeMix::new(ftype, n_layer, n_expert, gguf.tensors().iter().map(|t| t.name.as_str()));
                for t in gguf.tensors() {
                    assert_eq!(mix.next(&t.name, &t.dims), t.ty, "{}: {}", path.display(), t.name);
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 10, "fixtures checked");
    }
}
