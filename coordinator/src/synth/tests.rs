use std::sync::Arc;

use super::*;
use crate::experts::LocalExperts;
use crate::gguf::GgufFile;
use crate::kv_cache::KvType;
use crate::model::{Logits, Model};
use crate::session::Session;

/// Mellum's graph at a size unit tests can write and run: 2 sliding-window layers, an expert
/// FFN of 384 (not a multiple of 256, like Mellum2's 896, so `ffn_down_exps` takes the fallback
/// types), the vocabulary padded past the tokenizer's 1030 tokens.
fn small_mellum() -> Geometry {
    Geometry {
        n_embd: 256,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 64,
        n_expert: 16,
        n_expert_used: 4,
        n_ff_exp: 384,
        n_ff: 1024,
        n_vocab: 1280,
        n_ctx_train: 4096,
        sliding_window: 32,
        ..Preset::Mellum2_12B.geometry()
    }
}

fn temp_file(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("moeshard-synth-{tag}-{}.gguf", std::process::id()))
}

fn write_to_vec(g: &Geometry, ftype: FileType, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let size = write(g, ftype, seed, &mut out, |_| {}).expect("write");
    assert_eq!(size, out.len() as u64);
    out
}

#[test]
fn written_file_reads_back_with_the_planned_tensors_and_loads_as_a_model() {
    let g = small_mellum();
    for ftype in [FileType::Q4_K_M, FileType::Q3_K_S, FileType::Q8_0] {
        let path = temp_file(&format!("{ftype:?}"));
        std::fs::write(&path, write_to_vec(&g, ftype, 1)).expect("write file");
        let gguf = Arc::new(GgufFile::open(&path).expect("reads back"));
        let plan = tensors(&g, ftype);
        assert_eq!(gguf.tensors().len(), 3 + 12 * g.n_layer);
        for (t, p) in gguf.tensors().iter().zip(&plan) {
            assert_eq!((&t.name, &t.dims, t.ty), (&p.name, &p.dims, p.ty));
        }
        assert_eq!(gguf.get_u32("general.file_type").unwrap(), ftype.llama_ftype());
        assert_eq!(gguf.get_str_array("tokenizer.ggml.tokens").unwrap().len(), g.n_vocab);
        assert_eq!(gguf.get_bool_array("mellum.attention.sliding_window_pattern").unwrap(), [true, true]);

        let model = Arc::new(Model::from_gguf(gguf.clone()).expect("loads as a model"));
        let c = &model.config;
        assert_eq!((c.n_embd, c.n_layer, c.n_expert, c.n_expert_used, c.n_ff_exp), (256, 2, 16, 4, 384));
        assert_eq!((c.n_vocab, c.sliding_window), (1280, Some(32)));
        crate::tokenizer::Tokenizer::from_gguf(&gguf).expect("tokenizer loads");

        // Activations stay finite and the logits spread out: the weights are usable for speed work.
        let experts = Arc::new(LocalExperts::new(model.clone()));
        let mut session = Session::new(model, experts, 64, KvType::F16, KvType::F16).expect("session");
        let logits = session.eval(&[1, 20, 300, 1000, 7], Logits::All).expect("forward");
        assert!(logits.iter().all(|v| v.is_finite()), "{ftype:?}: non-finite logits");
        let last = &logits[logits.len() - g.n_vocab..];
        let mean = last.iter().sum::<f32>() / last.len() as f32;
        let std = (last.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / last.len() as f32).sqrt();
        assert!(std > 0.1 && std < 100.0, "{ftype:?}: logit spread {std}");
        drop(session);
        drop(gguf);
        std::fs::remove_file(&path).expect("remove");
    }
}

#[test]
fn output_depends_only_on_the_seed() {
    let g = Geometry { n_layer: 1, ..small_mellum() };
    let a = write_to_vec(&g, FileType::Q4_K_M, 5);
    let b = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| write_to_vec(&g, FileType::Q4_K_M, 5));
    assert!(a == b, "same seed, different thread count: different bytes");
    assert!(a != write_to_vec(&g, FileType::Q4_K_M, 6), "another seed gives other weights");
}

/// The 4-layer reference file `make-mellum2-geometry.sh 4 Q4_K_M` wrote with llama-quantize:
/// same types for every tensor, and the same size to the byte (so the same metadata and
/// tensor infos, in the same order).
#[test]
fn mellum2_q4_k_m_matches_the_llama_quantize_reference() {
    let g = Geometry { n_layer: 4, ..Preset::Mellum2_12B.geometry() };
    let plan = tensors(&g, FileType::Q4_K_M);
    let ty = |name: &str| plan.iter().find(|t| t.name == name).map(|t| t.ty).expect(name);
    assert_eq!(ty("output.weight"), GgmlType::Q6_K);
    assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
    for il in 0..4 {
        let more = il >= 2;
        let n = |t: &str| format!("blk.{il}.{t}.weight");
        assert_eq!(ty(&n("attn_v")), if more { GgmlType::Q6_K } else { GgmlType::Q4_K });
        assert_eq!(ty(&n("ffn_down_exps")), if more { GgmlType::Q8_0 } else { GgmlType::Q5_0 });
        for t in ["attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps"] {
            assert_eq!(ty(&n(t)), GgmlType::Q4_K, "{t}");
        }
        for t in ["attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm", "ffn_gate_inp"] {
            assert_eq!(ty(&n(t)), GgmlType::F32, "{t}");
        }
    }
    assert_eq!(file_size(&g, FileType::Q4_K_M), 1_423_931_648);
}

/// The 28-layer Q4_K_M file is the size of the published one (8.07 GB).
#[test]
fn full_mellum2_q4_k_m_has_the_published_size() {
    let size = file_size(&Preset::Mellum2_12B.geometry(), FileType::Q4_K_M);
    assert!((8.05e9..8.10e9).contains(&(size as f64)), "{size}");
}

#[test]
fn presets_type_mixes() {
    let g = Preset::Mellum2_12B.geometry();
    let count = |ftype, ty| tensors(&g, ftype).iter().filter(|t| t.ty == ty).count();
    // Q3_K_S: Q3_K everywhere but the LM head (Q6_K) and ffn_down_exps (896 columns: Q4_0).
    assert_eq!(count(FileType::Q3_K_S, GgmlType::Q4_0), 28);
    assert_eq!(count(FileType::Q3_K_S, GgmlType::Q6_K), 1);
    assert_eq!(count(FileType::Q3_K_S, GgmlType::Q3_K), 1 + 28 * 6);
    // Q4_K_M / Q5_K_M: 14 of 28 layers get more bits in attn_v and ffn_down_exps.
    assert_eq!(count(FileType::Q4_K_M, GgmlType::Q8_0), 14);
    assert_eq!(count(FileType::Q4_K_M, GgmlType::Q5_0), 14);
    assert_eq!(count(FileType::Q4_K_M, GgmlType::Q6_K), 1 + 14);
    assert_eq!(count(FileType::Q5_K_M, GgmlType::Q5_1), 14);
    assert_eq!(count(FileType::Q5_K_M, GgmlType::Q6_K), 1 + 14);
    // Q6_K / Q8_0: one type, ffn_down_exps as Q8_0.
    assert_eq!(count(FileType::Q6_K, GgmlType::Q8_0), 28);
    assert_eq!(count(FileType::Q8_0, GgmlType::Q8_0), 2 + 28 * 7);
    // Qwen3-30B-A3B: 768 columns fit the k-quants, no fallback.
    let q = tensors(&Preset::Qwen3_30B_A3B.geometry(), FileType::Q4_K_M);
    assert_eq!(
        q.iter().filter(|t| t.name.contains("ffn_down_exps") && t.ty == GgmlType::Q6_K).count(),
        48 / 8 * 2 + 12
    );
    assert!(q.iter().all(|t| !matches!(t.ty, GgmlType::Q5_0 | GgmlType::Q8_0)));
}

#[test]
fn qwen3_metadata_loads_with_the_fixture_tokenizer_padded() {
    let g = Geometry { n_layer: 1, ..Preset::Qwen3_30B_A3B.geometry() };
    let m = metadata(&g, FileType::Q4_K_M).expect("metadata");
    let get = |k: &str| m.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).expect(k);
    assert_eq!(get("qwen3moe.context_length"), GgufValue::U32(40960));
    assert_eq!(get("qwen3moe.expert_count"), GgufValue::U32(128));
    assert_eq!(get("tokenizer.ggml.pre"), GgufValue::String("qwen2".into()));
    match get("tokenizer.ggml.tokens") {
        GgufValue::Array(t) => assert_eq!(t.len(), 151936),
        other => panic!("{other:?}"),
    }
    assert!(m.iter().all(|(k, _)| !k.contains("sliding_window") && !k.contains("rope.scaling")));
    assert!(metadata(&Geometry { n_vocab: 100, ..g }, FileType::Q8_0).is_err());
}

/// The size [`write`] would produce, without generating the data.
fn file_size(g: &Geometry, ftype: FileType) -> u64 {
    let mut writer = GgufWriter::new();
    for (k, v) in metadata(g, ftype).unwrap() {
        writer.add_metadata(k, v).unwrap();
    }
    let data: u64 = tensors(g, ftype)
        .iter()
        .map(|t| writer.add_tensor_info(&t.name, &t.dims, t.ty).unwrap().next_multiple_of(32))
        .sum();
    writer.write_header(&mut std::io::sink()).unwrap() + data
}
