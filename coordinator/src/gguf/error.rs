//! Errors from opening and querying GGUF files.

use std::path::PathBuf;

use moeshard_kernels::quant::GgmlType;

/// An error from reading a GGUF file. Every message starts with the file's path.
///
/// Byte positions (`start`, `end`, `offset`) are absolute offsets in the file; lengths are bytes
/// unless the message says otherwise.
#[derive(thiserror::Error, Debug)]
pub enum GgufError {
    /// The file could not be opened or memory-mapped. The operating system's error is part of
    /// the message and is not repeated as the error's `source()`, so that a printed chain names
    /// it once.
    #[error("{}: cannot open: {os_error}", .file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The operating system's error.
        os_error: std::io::Error,
    },
    /// The file does not start with the magic `GGUF`.
    #[error("{}: not a GGUF file: bad magic \"{found}\", expected \"GGUF\"", .file.display())]
    BadMagic {
        /// The file.
        file: PathBuf,
        /// The first four bytes, ASCII-escaped.
        found: String,
    },
    /// The header's version is not 2 or 3.
    #[error("{}: unsupported GGUF version {version} (supported: 2, 3){}", .file.display(), endian_hint(*.version))]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// The version number read.
        version: u32,
    },
    /// A field extends past the end of the file.
    #[error("{}: truncated: {what} needs bytes {start}..{end} but the file has {len} bytes", .file.display())]
    Truncated {
        /// The file.
        file: PathBuf,
        /// The field being read.
        what: String,
        /// First byte of the field.
        start: u64,
        /// One past its last byte (saturated at `u64::MAX`).
        end: u64,
        /// The file's size in bytes.
        len: u64,
    },
    /// A string length or element count claims more bytes than the whole file has (checked
    /// before anything is allocated). Claims that would fit a longer file are
    /// [`GgufError::Truncated`].
    #[error("{}: {what} at byte {offset} claims {count} {unit}, more than the file's {len} bytes can hold", .file.display())]
    Oversized {
        /// The file.
        file: PathBuf,
        /// The string, array or table being read.
        what: String,
        /// The length or count read.
        count: u64,
        /// What is counted: `"bytes"`, `"elements"`, ...
        unit: &'static str,
        /// Position of the length field.
        offset: u64,
        /// The file's size in bytes.
        len: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{}: {what} is not valid UTF-8", .file.display())]
    InvalidUtf8 {
        /// The file.
        file: PathBuf,
        /// The string (metadata key name, value, tensor name).
        what: String,
    },
    /// A metadata key is the empty string.
    #[error("{}: metadata key #{index} is empty", .file.display())]
    EmptyKey {
        /// The file.
        file: PathBuf,
        /// Index of the key-value pair in the file.
        index: u64,
    },
    /// A metadata key occurs twice.
    #[error("{}: duplicate metadata key {key}", .file.display())]
    DuplicateKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value has an unknown type id.
    #[error("{}: metadata key {key}: unknown value type {id}", .file.display())]
    InvalidValueType {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The type id read.
        id: u32,
    },
    /// A metadata array's elements are arrays.
    #[error("{}: metadata key {key}: arrays of arrays are not supported", .file.display())]
    NestedArray {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("{}: general.alignment {alignment} is not a power of two", .file.display())]
    BadAlignment {
        /// The file.
        file: PathBuf,
        /// The alignment read, in bytes.
        alignment: u32,
    },
    /// Two tensors have the same name.
    #[error("{}: duplicate tensor name {name}", .file.display())]
    DuplicateTensor {
        /// The file.
        file: PathBuf,
        /// The name.
        name: String,
    },
    /// A tensor has more than 4 dimensions.
    #[error("{}: tensor {name}: {n_dims} dimensions, at most 4 are supported", .file.display())]
    TooManyDims {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        /// The dimension count read.
        n_dims: u32,
    },
    /// A tensor's element count exceeds `i64::MAX` or its size in bytes `u64::MAX`.
    #[error("{}: tensor {name}: shape {dims:?} overflows (more than i64::MAX elements or u64::MAX bytes)", .file.display())]
    ShapeOverflow {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        /// Its dimensions, GGUF order.
        dims: Vec<u64>,
    },
    /// A tensor's element type is not one `moeshard_kernels` supports.
    #[error("{}: tensor {name}: unsupported tensor type {id} ({}); supported: {}", .file.display(), ggml_type_name(*.id), supported_types())]
    UnsupportedType {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        /// ggml's type id read.
        id: u32,
    },
    /// A tensor's row length (`dims[0]`, in elements) is not a whole number of blocks.
    #[error("{}: tensor {name}: {n} elements per row is not a multiple of the {ty} block size {bs}", .file.display())]
    RowNotMultiple {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        /// Elements per row.
        n: u64,
        /// The element type.
        ty: GgmlType,
        /// Elements per block of `ty`.
        bs: usize,
    },
    /// A tensor's data offset (relative to the data section) is not a multiple of the alignment.
    #[error("{}: tensor {name}: data offset {offset} is not aligned to {alignment}", .file.display())]
    Misaligned {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        /// The offset as stored, relative to the start of the data section.
        offset: u64,
        /// The alignment in bytes.
        alignment: u32,
    },
    /// Two tensors' data ranges overlap.
    #[error("{}: tensors {first} and {second} have overlapping data", .file.display())]
    TensorOverlap {
        /// The file.
        file: PathBuf,
        /// The tensor whose data starts first.
        first: String,
        /// The tensor whose data starts inside `first`'s.
        second: String,
    },
    /// A metadata key is absent.
    #[error("{}: missing metadata key {key}", .file.display())]
    MissingKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value has another type than the one asked for.
    #[error("{}: metadata key {key}: expected {expected}, found {found}", .file.display())]
    TypeMismatch {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The type found (`"array of string"` style for arrays).
        found: String,
    },
    /// A metadata integer or float does not fit the type asked for.
    #[error("{}: metadata key {key}: {value} does not fit in {expected}", .file.display())]
    OutOfRange {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The value and its type (and its index, for array elements).
        value: String,
    },
    /// No tensor has this name.
    #[error("{}: tensor {name} not found", .file.display())]
    TensorNotFound {
        /// The file.
        file: PathBuf,
        /// The name asked for.
        name: String,
    },
}

/// A hint for versions that look byte-swapped (a big-endian file read on a little-endian host).
fn endian_hint(version: u32) -> &'static str {
    if version != 0 && version & 0xFFFF == 0 {
        " (a big-endian file? only little-endian GGUF is supported)"
    } else {
        ""
    }
}

/// ggml's name for a type id (`enum ggml_type` in `ggml/include/ggml.h`), supported or not.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        42 => "Q2_0",
        _ => "unknown",
    }
}

/// The supported element types, comma-separated.
fn supported_types() -> String {
    GgmlType::ALL.map(GgmlType::name).join(", ")
}
