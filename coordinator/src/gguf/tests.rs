//! Tests of the GGUF reader and writer: round trips, every validation error on corrupted files,
//! and the conformance fixtures.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A file in the temp directory with a unique name, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, bytes: &[u8]) -> TempFile {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("moeshard-gguf-test-{}-{tag}-{n}.gguf", std::process::id()));
        std::fs::write(&path, bytes).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `bytes` to a temp file and opens it; the file lives as long as the returned guard.
fn open_bytes(tag: &str, bytes: &[u8]) -> (TempFile, Result<GgufFile, GgufError>) {
    let tmp = TempFile::new(tag, bytes);
    let result = GgufFile::open(&tmp.0);
    (tmp, result)
}

/// Opens `bytes` expecting an error; returns it and its message, which must name the file.
fn open_err(tag: &str, bytes: &[u8]) -> (GgufError, String) {
    let (tmp, result) = open_bytes(tag, bytes);
    let err = match result {
        Ok(_) => panic!("{tag}: corrupted file opened without error"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.starts_with(&tmp.0.display().to_string()), "{msg}");
    (err, msg)
}

/// Deterministic tensor bytes.
fn pattern(n: u64, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Writes a whole file: metadata, then tensors with their data (each in chunks of `chunk` bytes).
fn build(metadata: Vec<(&str, GgufValue)>, tensors: &[(&str, Vec<u64>, GgmlType)], chunk: usize) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in metadata {
        w.add_metadata(k, v).expect("add metadata");
    }
    let sizes: Vec<u64> =
        tensors.iter().map(|(name, dims, ty)| w.add_tensor_info(*name, dims, *ty).expect("add tensor info")).collect();
    let mut out = Vec::new();
    let data_offset = w.write_header(&mut out).expect("write header");
    assert_eq!(data_offset, out.len() as u64);
    for (i, &n) in sizes.iter().enumerate() {
        for piece in pattern(n, i as u8).chunks(chunk) {
            w.write_tensor_data(&mut out, piece).expect("write tensor data");
        }
    }
    assert_eq!(w.finish().expect("finish"), out.len() as u64);
    out
}

/// The file most corruption tests start from.
fn sample() -> Vec<u8> {
    build(
        vec![
            ("general.architecture", GgufValue::String("mellum".into())),
            ("test.u32", GgufValue::U32(7)),
            ("test.neg", GgufValue::I32(-1)),
            ("test.name", GgufValue::String("hello world".into())),
            (
                "test.tokens",
                GgufValue::Array(vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("bc".into()),
                    GgufValue::String("def".into()),
                ]),
            ),
        ],
        &[
            ("tensor.alpha", vec![8, 2], GgmlType::F32),
            ("tensor.beta", vec![64, 3], GgmlType::Q8_0),
            ("tensor.gamma", vec![256, 2], GgmlType::Q4_K),
        ],
        usize::MAX,
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Positions of the fields of tensor `name`'s info: (n_dims, first dim, type, offset).
fn tensor_fields(bytes: &[u8], name: &str, n_dims: usize) -> (usize, usize, usize, usize) {
    let n_dims_at = find(bytes, name.as_bytes()) + name.len();
    let dims_at = n_dims_at + 4;
    let type_at = dims_at + 8 * n_dims;
    (n_dims_at, dims_at, type_at, type_at + 4)
}

#[test]
fn round_trip_all_value_types_and_tensor_types() {
    let metadata = vec![
        ("general.architecture", GgufValue::String("qwen3moe".into())),
        ("v.u8", GgufValue::U8(250)),
        ("v.i8", GgufValue::I8(-7)),
        ("v.u16", GgufValue::U16(65000)),
        ("v.i16", GgufValue::I16(-30000)),
        ("v.u32", GgufValue::U32(4_000_000_000)),
        ("v.i32", GgufValue::I32(-2_000_000_000)),
        ("v.u64", GgufValue::U64(u64::MAX)),
        ("v.i64", GgufValue::I64(i64::MIN)),
        ("v.f32", GgufValue::F32(1.5e-6)),
        ("v.f64", GgufValue::F64(-0.1)),
        ("v.bool", GgufValue::Bool(true)),
        ("v.string", GgufValue::String("héllo <|im_end|>".into())),
        ("v.empty_string", GgufValue::String(String::new())),
        ("v.empty_array", GgufValue::Array(vec![])),
        ("v.strings", GgufValue::Array((0..1000).map(|i| GgufValue::String(format!("tok{i}"))).collect())),
        ("v.u8s", GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(255)])),
        ("v.i16s", GgufValue::Array(vec![GgufValue::I16(-3), GgufValue::I16(4)])),
        ("v.i32s", GgufValue::Array(vec![GgufValue::I32(-1), GgufValue::I32(1)])),
        ("v.u64s", GgufValue::Array(vec![GgufValue::U64(5)])),
        ("v.f32s", GgufValue::Array(vec![GgufValue::F32(0.25), GgufValue::F32(-2.0)])),
        ("v.f64s", GgufValue::Array(vec![GgufValue::F64(1e300)])),
        ("v.bools", GgufValue::Array(vec![GgufValue::Bool(false), GgufValue::Bool(true)])),
    ];
    let tensors = [
        ("t.f32", vec![16, 3], GgmlType::F32),
        ("t.f16", vec![5], GgmlType::F16),
        ("t.bf16", vec![4, 2, 2], GgmlType::BF16),
        ("t.empty", vec![32, 0], GgmlType::F32),
        ("t.q4_0", vec![64, 2], GgmlType::Q4_0),
        ("t.q5_1", vec![32, 1, 3], GgmlType::Q5_1),
        ("t.q8_0", vec![96, 2, 2], GgmlType::Q8_0),
        ("t.q2_k", vec![256], GgmlType::Q2_K),
        ("t.q6_k", vec![512, 2, 2, 2], GgmlType::Q6_K),
        ("t.scalar", vec![], GgmlType::F32),
    ];
    let bytes = build(metadata.clone(), &tensors, 7);
    let (_tmp, result) = open_bytes("roundtrip", &bytes);
    let file = result.expect("open round-tripped file");

    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), DEFAULT_ALIGNMENT);
    assert_eq!(file.metadata().len(), metadata.len());
    for (key, value) in &metadata {
        assert_eq!(file.get(key), Some(value), "{key}");
    }
    assert_eq!(file.architecture().expect("arch"), "qwen3moe");
    assert_eq!(file.get_u32("v.u8").expect("u8 as u32"), 250);
    assert_eq!(file.get_u32("v.u16").expect("u16 as u32"), 65000);
    assert_eq!(file.get_u64("v.u64").expect("u64"), u64::MAX);
    assert_eq!(file.get_u64("v.u32").expect("u32 as u64"), 4_000_000_000);
    assert_eq!(file.get_f32("v.f32").expect("f32"), 1.5e-6);
    assert_eq!(file.get_f32("v.f64").expect("f64 as f32"), -0.1f32);
    assert!(file.get_bool("v.bool").expect("bool"));
    assert_eq!(file.get_str("v.string").expect("str"), "héllo <|im_end|>");
    let strings = file.get_str_array("v.strings").expect("strings");
    assert_eq!(strings.len(), 1000);
    assert_eq!(strings[999], "tok999");
    assert_eq!(file.get_str_array("v.empty_array").expect("empty"), Vec::<&str>::new());
    assert_eq!(file.get_i32_array("v.u8s").expect("u8s"), [1, 255]);
    assert_eq!(file.get_i32_array("v.i16s").expect("i16s"), [-3, 4]);
    assert_eq!(file.get_i32_array("v.i32s").expect("i32s"), [-1, 1]);
    assert_eq!(file.get_bool_array("v.bools").expect("bools"), [false, true]);

    assert_eq!(file.tensors().len(), tensors.len());
    for (i, ((name, dims, ty), info)) in tensors.iter().zip(file.tensors()).enumerate() {
        assert_eq!(&info.name, name);
        assert_eq!(&info.dims, dims);
        assert_eq!(info.ty, *ty);
        let row = ty.row_bytes(*dims.first().unwrap_or(&1) as usize).expect("whole blocks") as u64;
        assert_eq!(info.n_bytes, row * info.n_rows(), "{name}");
        assert_eq!(info.n_elements(), dims.iter().product::<u64>());
        assert_eq!(info.offset % u64::from(file.alignment()), 0, "{name}");
        assert!(info.offset >= file.data_offset());
        assert_eq!(file.tensor_data(info), pattern(info.n_bytes, i as u8), "{name}");
        assert_eq!(file.tensor(name).expect("by name"), info);
    }
    assert_eq!(file.data().len(), bytes.len());
    assert_eq!(file.tensor_data(file.tensor("t.scalar").expect("scalar")).len(), 4);
}

#[test]
fn round_trip_custom_alignment() {
    let bytes = build(
        vec![(ALIGNMENT_KEY, GgufValue::U32(256)), ("general.architecture", GgufValue::String("mellum".into()))],
        &[("a", vec![3], GgmlType::F32), ("b", vec![32], GgmlType::Q8_0)],
        1,
    );
    let (_tmp, result) = open_bytes("align", &bytes);
    let file = result.expect("open");
    assert_eq!(file.alignment(), 256);
    assert_eq!(file.data_offset() % 256, 0);
    let b = file.tensor("b").expect("b");
    assert_eq!(b.offset, file.data_offset() + 256);
    assert_eq!(file.tensor_data(b), pattern(34, 1));
    assert_eq!(bytes.len() as u64, file.data_offset() + 512);
}

#[test]
fn version_2_is_accepted() {
    let mut bytes = sample();
    put_u32(&mut bytes, 4, 2);
    let (_tmp, result) = open_bytes("v2", &bytes);
    assert_eq!(result.expect("open v2").version(), 2);
}

#[test]
fn from_bytes_reads_what_open_reads() {
    let bytes = sample();
    let (_tmp, opened) = open_bytes("from-bytes", &bytes);
    let opened = opened.expect("sample opens");
    let held = GgufFile::from_bytes("in-memory.gguf", bytes.clone()).expect("sample parses from memory");
    assert_eq!(held.path(), Path::new("in-memory.gguf"));
    assert_eq!(held.version(), opened.version());
    assert_eq!(held.metadata(), opened.metadata());
    assert_eq!(held.tensors(), opened.tensors());
    assert_eq!(held.data(), &bytes[..]);
    for t in held.tensors() {
        assert_eq!(held.tensor_data(t), opened.tensor_data(t), "{}", t.name);
    }
    let mut bad = bytes;
    bad[..4].copy_from_slice(b"GGML");
    let err = GgufFile::from_bytes("in-memory.gguf", bad).err().expect("bad magic refused");
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    assert!(err.to_string().starts_with("in-memory.gguf"), "{err}");
}

#[test]
fn bad_magic() {
    let mut bytes = sample();
    bytes[..4].copy_from_slice(b"GGML");
    let (err, msg) = open_err("magic", &bytes);
    assert!(matches!(err, GgufError::BadMagic { .. }), "{msg}");
    assert!(msg.contains("not a GGUF file: bad magic \"GGML\", expected \"GGUF\""), "{msg}");
}

#[test]
fn unsupported_version() {
    for version in [0, 1, 4, 0x0300_0000] {
        let mut bytes = sample();
        put_u32(&mut bytes, 4, version);
        let (err, msg) = open_err("version", &bytes);
        assert!(matches!(err, GgufError::UnsupportedVersion { .. }), "{msg}");
        assert!(msg.contains(&format!("unsupported GGUF version {version} (supported: 2, 3)")), "{msg}");
    }
}

#[test]
fn truncated_in_header() {
    let bytes = sample();
    for (cut, what) in [(0, "the magic"), (2, "the magic"), (6, "the version"), (20, "metadata key-value count")] {
        let (err, msg) = open_err("trunc-header", &bytes[..cut]);
        assert!(matches!(err, GgufError::Truncated { .. }), "{msg}");
        assert!(msg.contains(what), "{msg}");
        assert!(msg.contains(&format!("but the file has {cut} bytes")), "{msg}");
    }
}

#[test]
fn truncated_inside_kv_string() {
    let bytes = sample();
    let cut = find(&bytes, b"hello world") + 5;
    let (err, msg) = open_err("trunc-kv", &bytes[..cut]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{msg}");
    assert!(msg.contains("the value of metadata key test.name"), "{msg}");

    let cut = find(&bytes, b"test.name") + 3;
    let (_, msg) = open_err("trunc-key", &bytes[..cut]);
    assert!(msg.contains("truncated: metadata key #3"), "{msg}");

    let cut = find(&bytes, b"bc") + 1;
    let (_, msg) = open_err("trunc-array", &bytes[..cut]);
    assert!(msg.contains("element #1 of metadata key test.tokens"), "{msg}");
}

#[test]
fn truncated_inside_tensor_infos() {
    let bytes = sample();
    let (_, dims_at, type_at, offset_at) = tensor_fields(&bytes, "tensor.beta", 2);
    for (cut, what) in [
        (dims_at + 3, "dimension 0 of tensor tensor.beta"),
        (type_at + 1, "the type of tensor tensor.beta"),
        (offset_at + 7, "the data offset of tensor tensor.beta"),
        (find(&bytes, b"tensor.gamma") + 2, "name of tensor #2"),
    ] {
        let (err, msg) = open_err("trunc-info", &bytes[..cut]);
        assert!(matches!(err, GgufError::Truncated { .. }), "{msg}");
        assert!(msg.contains(what), "{msg}");
    }
}

#[test]
fn truncated_tensor_data() {
    let bytes = sample();
    let cut = bytes.len() - 40;
    let (err, msg) = open_err("trunc-data", &bytes[..cut]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{msg}");
    assert!(msg.contains("the data of tensor tensor.gamma"), "{msg}");
    assert!(msg.contains(&format!("{}..{} but the file has {cut} bytes", bytes.len() - 288, bytes.len())), "{msg}");
}

#[test]
fn truncated_before_data_section() {
    let bytes = sample();
    let (_, _, _, offset_at) = tensor_fields(&bytes, "tensor.gamma", 2);
    let (err, msg) = open_err("trunc-pad", &bytes[..offset_at + 8]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{msg}");
}

#[test]
fn unsupported_tensor_type() {
    let mut bytes = sample();
    let (_, _, type_at, _) = tensor_fields(&bytes, "tensor.alpha", 2);
    put_u32(&mut bytes, type_at, 23);
    let (err, msg) = open_err("type", &bytes);
    assert!(matches!(err, GgufError::UnsupportedType { id: 23, .. }), "{msg}");
    assert!(
        msg.contains("tensor tensor.alpha: unsupported tensor type 23 (IQ4_XS); supported: F32, F16, BF16, Q4_0"),
        "{msg}"
    );
    put_u32(&mut bytes, type_at, 1000);
    let (_, msg) = open_err("type", &bytes);
    assert!(msg.contains("unsupported tensor type 1000 (unknown)"), "{msg}");
}

#[test]
fn row_not_multiple_of_block_size() {
    let mut bytes = sample();
    let (_, dims_at, _, _) = tensor_fields(&bytes, "tensor.beta", 2);
    put_u64(&mut bytes, dims_at, 48);
    let (err, msg) = open_err("row", &bytes);
    assert!(matches!(err, GgufError::RowNotMultiple { n: 48, .. }), "{msg}");
    assert!(
        msg.contains("tensor tensor.beta: 48 elements per row is not a multiple of the Q8_0 block size 32"),
        "{msg}"
    );
}

#[test]
fn misaligned_offset() {
    let mut bytes = sample();
    let (_, _, _, offset_at) = tensor_fields(&bytes, "tensor.beta", 2);
    put_u64(&mut bytes, offset_at, 68);
    let (err, msg) = open_err("misaligned", &bytes);
    assert!(matches!(err, GgufError::Misaligned { offset: 68, .. }), "{msg}");
    assert!(msg.contains("tensor tensor.beta: data offset 68 is not aligned to 32"), "{msg}");
}

#[test]
fn overlapping_tensor_data() {
    let mut bytes = sample();
    let (_, _, _, offset_at) = tensor_fields(&bytes, "tensor.gamma", 2);
    put_u64(&mut bytes, offset_at, 64);
    let (err, msg) = open_err("overlap", &bytes);
    assert!(matches!(err, GgufError::TensorOverlap { .. }), "{msg}");
    assert!(msg.contains("tensors tensor.beta and tensor.gamma have overlapping data"), "{msg}");
}

#[test]
fn tensor_offset_beyond_file() {
    let mut bytes = sample();
    let (_, _, _, offset_at) = tensor_fields(&bytes, "tensor.alpha", 2);
    put_u64(&mut bytes, offset_at, u64::MAX - 31);
    let (err, msg) = open_err("offset-overflow", &bytes);
    assert!(matches!(err, GgufError::Truncated { .. }), "{msg}");
    assert!(msg.contains("the data of tensor tensor.alpha"), "{msg}");
}

#[test]
fn too_many_dims() {
    let mut bytes = sample();
    let (n_dims_at, _, _, _) = tensor_fields(&bytes, "tensor.beta", 2);
    put_u32(&mut bytes, n_dims_at, 5);
    let (err, msg) = open_err("dims", &bytes);
    assert!(matches!(err, GgufError::TooManyDims { n_dims: 5, .. }), "{msg}");
}

#[test]
fn shape_overflow() {
    let mut bytes = sample();
    let (_, dims_at, _, _) = tensor_fields(&bytes, "tensor.alpha", 2);
    put_u64(&mut bytes, dims_at, 1 << 32);
    put_u64(&mut bytes, dims_at + 8, 1 << 32);
    let (err, msg) = open_err("shape", &bytes);
    assert!(matches!(err, GgufError::ShapeOverflow { .. }), "{msg}");
    put_u64(&mut bytes, dims_at, 1 << 62);
    put_u64(&mut bytes, dims_at + 8, 1);
    let (err, msg) = open_err("shape-bytes", &bytes);
    assert!(matches!(err, GgufError::ShapeOverflow { .. }), "{msg}");
}

#[test]
fn oversized_string_length() {
    let bytes = sample();
    for (at, what) in [
        (find(&bytes, b"hello world") - 8, "the value of metadata key test.name"),
        (find(&bytes, b"test.u32") - 8, "metadata key #1"),
        (find(&bytes, b"tensor.beta") - 8, "name of tensor #1"),
    ] {
        for claim in [u64::MAX, 1 << 40, bytes.len() as u64 + 1] {
            let mut bad = bytes.clone();
            put_u64(&mut bad, at, claim);
            let (err, msg) = open_err("strlen", &bad);
            assert!(matches!(err, GgufError::Oversized { count, .. } if count == claim), "{msg}");
            assert!(msg.contains(what) && msg.contains(&format!("claims {claim} bytes")), "{msg}");
        }
        let mut bad = bytes.clone();
        put_u64(&mut bad, at, 64);
        let (err, msg) = open_err("strlen", &bad[..at + 8 + 10]);
        assert!(matches!(err, GgufError::Truncated { .. }), "{msg}");
        assert!(msg.contains(what), "{msg}");
    }
}

#[test]
fn oversized_array_count() {
    let bytes = sample();
    let count_at = find(&bytes, b"test.tokens") + "test.tokens".len() + 4 + 4;
    for claim in [u64::MAX, u64::MAX / 8 + 1, 1 << 40] {
        let mut bad = bytes.clone();
        put_u64(&mut bad, count_at, claim);
        let (err, msg) = open_err("arraylen", &bad);
        assert!(matches!(err, GgufError::Oversized { count, .. } if count == claim), "{msg}");
        assert!(msg.contains("the array of metadata key test.tokens"), "{msg}");
        assert!(msg.contains(&format!("claims {claim} elements")), "{msg}");
    }
}

#[test]
fn oversized_kv_and_tensor_counts() {
    for (at, what) in [(8, "the tensor count"), (16, "the metadata key-value count")] {
        let mut bytes = sample();
        put_u64(&mut bytes, at, u64::MAX);
        let (err, msg) = open_err("counts", &bytes);
        assert!(matches!(err, GgufError::Oversized { .. }), "{msg}");
        assert!(msg.contains(what), "{msg}");
    }
}

#[test]
fn nested_array_rejected() {
    let mut bytes = sample();
    let elem_at = find(&bytes, b"test.tokens") + "test.tokens".len() + 4;
    put_u32(&mut bytes, elem_at, 9);
    let (err, msg) = open_err("nested", &bytes);
    assert!(matches!(err, GgufError::NestedArray { .. }), "{msg}");
    put_u32(&mut bytes, elem_at, 13);
    let (err, msg) = open_err("valuetype", &bytes);
    assert!(matches!(err, GgufError::InvalidValueType { id: 13, .. }), "{msg}");
    assert!(msg.contains("metadata key test.tokens: unknown value type 13"), "{msg}");
}

#[test]
fn invalid_utf8() {
    let mut bytes = sample();
    let at = find(&bytes, b"hello world");
    bytes[at] = 0xFF;
    let (err, msg) = open_err("utf8", &bytes);
    assert!(matches!(err, GgufError::InvalidUtf8 { .. }), "{msg}");
    assert!(msg.contains("the value of metadata key test.name is not valid UTF-8"), "{msg}");
}

#[test]
fn duplicate_key() {
    let mut bytes = sample();
    let at = find(&bytes, b"test.neg");
    bytes[at..at + 8].copy_from_slice(b"test.u32");
    let (err, msg) = open_err("dupkey", &bytes);
    assert!(matches!(err, GgufError::DuplicateKey { .. }), "{msg}");
    assert!(msg.contains("duplicate metadata key test.u32"), "{msg}");
}

#[test]
fn duplicate_tensor() {
    let mut bytes = sample();
    let at = find(&bytes, b"tensor.gamma");
    bytes[at..at + 12].copy_from_slice(b"tensor.alpha");
    let (err, msg) = open_err("duptensor", &bytes);
    assert!(matches!(err, GgufError::DuplicateTensor { .. }), "{msg}");
    assert!(msg.contains("duplicate tensor name tensor.alpha"), "{msg}");
}

#[test]
fn bad_alignment() {
    let bytes = build(vec![(ALIGNMENT_KEY, GgufValue::U32(64))], &[("a", vec![32], GgmlType::F32)], usize::MAX);
    let value_at = find(&bytes, ALIGNMENT_KEY.as_bytes()) + ALIGNMENT_KEY.len() + 4;
    for alignment in [0, 48] {
        let mut bad = bytes.clone();
        put_u32(&mut bad, value_at, alignment);
        let (err, msg) = open_err("alignment", &bad);
        assert!(matches!(err, GgufError::BadAlignment { .. }), "{msg}");
        assert!(msg.contains(&format!("general.alignment {alignment} is not a power of two")), "{msg}");
    }
}

#[test]
fn wrong_metadata_type() {
    let (_tmp, result) = open_bytes("types", &sample());
    let file = result.expect("open");
    let cases = [
        (file.get_u32("test.name").map(drop), "test.name: expected u32, found string"),
        (file.get_u64("test.tokens").map(drop), "test.tokens: expected u64, found array of string"),
        (file.get_str("test.u32").map(drop), "test.u32: expected string, found u32"),
        (file.get_f32("test.u32").map(drop), "test.u32: expected f32, found u32"),
        (file.get_bool("test.neg").map(drop), "test.neg: expected bool, found i32"),
        (file.get_str_array("test.name").map(drop), "test.name: expected array of string, found string"),
        (file.get_i32_array("test.tokens").map(drop), "test.tokens: expected array of integers, found array of string"),
        (file.get_bool_array("test.tokens").map(drop), "expected array of bool, found array of string"),
    ];
    for (result, expected) in cases {
        let err = result.expect_err(expected);
        assert!(matches!(err, GgufError::TypeMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("metadata key {expected}")) || msg.contains(expected), "{msg}");
        assert!(msg.starts_with(&file.path().display().to_string()), "{msg}");
    }
    let err = file.get_u32("test.neg").expect_err("negative as u32");
    assert!(matches!(err, GgufError::OutOfRange { .. }), "{err}");
    assert!(err.to_string().contains("metadata key test.neg: -1 (i32) does not fit in u32"), "{err}");
    assert_eq!(file.get_u64("test.u32").expect("u32 as u64"), 7);
}

#[test]
fn missing_metadata_key() {
    let (_tmp, result) = open_bytes("missingkey", &sample());
    let file = result.expect("open");
    let err = file.get_str("tokenizer.ggml.pre").expect_err("missing");
    assert!(matches!(err, GgufError::MissingKey { .. }), "{err}");
    assert_eq!(err.to_string(), format!("{}: missing metadata key tokenizer.ggml.pre", file.path().display()));
    assert!(file.get("tokenizer.ggml.pre").is_none());
}

#[test]
fn missing_tensor() {
    let (_tmp, result) = open_bytes("missingtensor", &sample());
    let file = result.expect("open");
    let err = file.tensor("output.weight").expect_err("missing");
    assert!(matches!(err, GgufError::TensorNotFound { .. }), "{err}");
    assert_eq!(err.to_string(), format!("{}: tensor output.weight not found", file.path().display()));
}

#[test]
fn missing_file() {
    let path = std::env::temp_dir().join(format!("moeshard-gguf-test-{}-absent.gguf", std::process::id()));
    let err = GgufFile::open(&path).err().expect("absent file");
    assert!(matches!(err, GgufError::Io { .. }), "{err}");
    assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
}

#[test]
fn writer_rejects_invalid_input() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", GgufValue::U8(1)).expect("first");
    assert!(matches!(w.add_metadata("k", GgufValue::U8(2)), Err(GgufWriteError::DuplicateKey { .. })));
    assert!(matches!(w.add_metadata("", GgufValue::U8(2)), Err(GgufWriteError::EmptyKey)));
    let mixed = GgufValue::Array(vec![GgufValue::U8(1), GgufValue::I8(1)]);
    assert!(matches!(w.add_metadata("m", mixed), Err(GgufWriteError::InvalidArray { .. })));
    let nested = GgufValue::Array(vec![GgufValue::Array(vec![])]);
    assert!(matches!(w.add_metadata("n", nested), Err(GgufWriteError::InvalidArray { .. })));
    assert!(matches!(w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(48)), Err(GgufWriteError::BadAlignment { .. })));
    assert!(matches!(w.add_tensor_info("q", &[48], GgmlType::Q8_0), Err(GgufWriteError::InvalidShape { .. })));
    assert!(matches!(
        w.add_tensor_info("q", &[1, 1, 1, 1, 1], GgmlType::F32),
        Err(GgufWriteError::InvalidShape { .. })
    ));
    assert!(matches!(
        w.add_tensor_info("q", &[1 << 40, 1 << 40], GgmlType::F32),
        Err(GgufWriteError::InvalidShape { .. })
    ));
    assert_eq!(w.add_tensor_info("t", &[32, 2], GgmlType::Q8_0).expect("t"), 68);
    assert!(matches!(w.add_tensor_info("t", &[32], GgmlType::F32), Err(GgufWriteError::DuplicateTensor { .. })));
    assert!(matches!(w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(64)), Err(GgufWriteError::BadAlignment { .. })));
    let mut out = Vec::new();
    assert!(matches!(w.write_tensor_data(&mut out, &[0]), Err(GgufWriteError::OutOfOrder(_))));
    assert!(matches!(w.finish(), Err(GgufWriteError::OutOfOrder(_))));
    w.write_header(&mut out).expect("header");
    assert!(matches!(w.add_metadata("late", GgufValue::U8(1)), Err(GgufWriteError::OutOfOrder(_))));
    assert!(matches!(w.write_header(&mut out), Err(GgufWriteError::OutOfOrder(_))));
    w.write_tensor_data(&mut out, &[1; 60]).expect("part");
    assert!(matches!(w.finish(), Err(GgufWriteError::Incomplete { written: 60, n_bytes: 68, .. })));
    assert!(matches!(w.write_tensor_data(&mut out, &[1; 9]), Err(GgufWriteError::TooMuchData { left: 8, .. })));
    w.write_tensor_data(&mut out, &[1; 8]).expect("rest");
    assert!(matches!(w.write_tensor_data(&mut out, &[1]), Err(GgufWriteError::TooMuchData { .. })));
    assert_eq!(w.finish().expect("finish"), out.len() as u64);
    let (_tmp, result) = open_bytes("writer", &out);
    let file = result.expect("open");
    assert_eq!(file.tensor_data(file.tensor("t").expect("t")), [1; 68]);
}

#[test]
fn fixtures_open_and_are_consistent() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    for path in paths {
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let arch = file.architecture().expect("architecture");
        assert!(arch == "mellum" || arch == "qwen3moe", "{}: {arch}", path.display());
        assert_eq!(file.get_str_array("tokenizer.ggml.tokens").expect("tokens").len(), 1030);
        assert!(!file.tensors().is_empty());
        for t in file.tensors() {
            let row = t.ty.row_bytes(t.dims[0] as usize).expect("whole blocks") as u64;
            assert_eq!(t.n_bytes, row * t.n_rows(), "{}: {}", path.display(), t.name);
            assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
        }
        assert!(file.tensor("token_embd.weight").is_ok(), "{}", path.display());
    }
}
