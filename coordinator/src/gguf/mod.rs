//! GGUF model files: a validating, memory-mapped reader ([`GgufFile`]) and a streaming writer
//! ([`GgufWriter`]).
//!
//! Layout of a GGUF v2/v3 file (little-endian; source: llama.cpp `ggml/src/gguf.cpp` and
//! `ggml/include/gguf.h`; v2 and v3 differ only in v3 allowing big-endian files, which are not
//! supported here):
//!
//! 1. magic `GGUF`, version (u32), tensor count (u64), metadata key-value count (u64);
//! 2. the key-value pairs: key (u64 byte length + UTF-8 bytes), value type (u32), value (see
//!    [`GgufValue`]);
//! 3. the tensor infos: name (u64 length + UTF-8 bytes), number of dimensions (u32, at most 4),
//!    dimensions (u64 each, `dims[0]` = elements per row, the fastest-varying), ggml type id
//!    (u32), data offset (u64, relative to the data section, a multiple of the alignment);
//! 4. zero padding up to a multiple of `general.alignment` (u32 metadata key, default 32 bytes);
//! 5. the data section: each tensor's data, padded to the alignment.
//!
//! [`GgufFile::open`] validates all of it with checked arithmetic: lengths and counts are bounded
//! by the file's size before anything is allocated, so a hostile file cannot make the
//! reader allocate more than a small multiple of the file's size.

mod error;
mod reader;
#[cfg(test)]
mod tests;
mod value;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use moeshard_kernels::quant::GgmlType;

pub use error::GgufError;
pub use value::GgufValue;
pub use writer::{GgufWriteError, GgufWriter};

/// The key of the data alignment, in bytes (`GGUF_KEY_GENERAL_ALIGNMENT`).
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// The data alignment in bytes when the file has no `general.alignment` (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u32 = 32;

/// One tensor of a GGUF file, as described by its tensor info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.ffn_gate_exps.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the number of elements per row (fastest-varying).
    /// Empty for a scalar.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor's data in the file (the data section's start plus the
    /// relative offset stored in the tensor info).
    pub offset: u64,
    /// Size of the tensor's data in bytes: `row bytes x rows`.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements, the product of the dimensions (checked not to overflow at open).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Number of rows, the product of the dimensions after the first.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// The bytes of a GGUF file: a read-only mapping of the file, or a buffer in memory.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A GGUF file, memory-mapped read-only (or held in memory), with its metadata and tensor infos
/// parsed and validated.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_offset: u64,
    alignment: u32,
}

impl GgufFile {
    /// Opens and memory-maps `path` read-only, parses the header, metadata and tensor infos, and
    /// validates them: magic, version (2 or 3), every length against the file's size, UTF-8
    /// strings, no empty or duplicate keys, no duplicate tensor names, at most 4 dimensions,
    /// supported element types, rows a whole number of blocks, no size overflow, the alignment a
    /// power of two, every tensor's data aligned, inside the file, and not overlapping another's.
    ///
    /// The file must not be modified while it is open (it is mapped, not copied).
    ///
    /// # Errors
    /// [`GgufError::Io`] when the file cannot be opened or mapped, else the first problem found.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |os_error| GgufError::Io { file: path.clone(), os_error };
        let file = File::open(&path).map_err(io_err)?;
        // SAFETY: the map is read-only and private to this process; as documented above, the
        // file must not be truncated or rewritten while it is open, as for every mmap-based
        // model loader (llama.cpp included).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        GgufFile::parse(path, Bytes::Mapped(mmap))
    }

    /// Reads `path` whole into memory (no mapping; llama.cpp's `--no-mmap`), then parses and
    /// validates it as [`GgufFile::open`] does. Costs the file's size in anonymous memory, which
    /// the kernel cannot drop and re-read the way it can a mapping's page cache.
    ///
    /// # Errors
    /// [`GgufError::Io`] when the file cannot be read, else the first problem found.
    pub fn read(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let bytes = read_with_huge_pages(&path).map_err(|os_error| GgufError::Io { file: path.clone(), os_error })?;
        GgufFile::parse(path, Bytes::Owned(bytes))
    }

    /// Parses and validates a GGUF file held in memory, exactly as [`GgufFile::open`] does a file
    /// on disk (same reader, same checks). `name` stands for the file in errors and in
    /// [`GgufFile::path`]; nothing is read from it.
    ///
    /// # Errors
    /// The first problem found, as for [`GgufFile::open`] (never [`GgufError::Io`]).
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<GgufFile, GgufError> {
        let parsed = reader::parse(&path, &bytes)?;
        let index = parsed.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path,
            bytes,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            index,
            data_offset: parsed.data_offset,
            alignment: parsed.alignment,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version from the header (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata key-value pairs, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The string value of `key`.
    ///
    /// # Errors
    /// [`GgufError::MissingKey`], or [`GgufError::TypeMismatch`] when the value is not a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let value = self.require(key)?;
        value.as_str().ok_or_else(|| self.mismatch(key, "string", value.describe_type()))
    }

    /// The value of `key` as a u32; any integer type whose value fits is accepted (llama.cpp
    /// writes u32 mostly, sometimes i32 or u64).
    ///
    /// # Errors
    /// [`GgufError::MissingKey`], [`GgufError::TypeMismatch`] for non-integers,
    /// [`GgufError::OutOfRange`] when the value does not fit.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.get_int(key, "u32")
    }

    /// The value of `key` as a u64; any integer type whose value fits is accepted.
    ///
    /// # Errors
    /// As [`GgufFile::get_u32`].
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_int(key, "u64")
    }

    /// The value of `key` as an f32; f32 and f64 values are accepted (an f64 is rounded to the
    /// nearest f32).
    ///
    /// # Errors
    /// [`GgufError::MissingKey`], [`GgufError::TypeMismatch`] for non-floats,
    /// [`GgufError::OutOfRange`] for a finite f64 beyond the f32 range.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let value = self.require(key)?;
        let v = value.as_float().ok_or_else(|| self.mismatch(key, "f32", value.describe_type()))?;
        let narrowed = v as f32;
        if v.is_finite() && !narrowed.is_finite() {
            return Err(GgufError::OutOfRange {
                file: self.path.clone(),
                key: key.to_owned(),
                expected: "f32",
                value: format!("{v} ({})", value.type_name()),
            });
        }
        Ok(narrowed)
    }

    /// The boolean value of `key`.
    ///
    /// # Errors
    /// [`GgufError::MissingKey`], or [`GgufError::TypeMismatch`] when the value is not a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let value = self.require(key)?;
        value.as_bool().ok_or_else(|| self.mismatch(key, "bool", value.describe_type()))
    }

    /// The elements of the string array `key` (e.g. `tokenizer.ggml.tokens`), borrowed.
    ///
    /// # Errors
    /// [`GgufError::MissingKey`], or [`GgufError::TypeMismatch`] when the value is not an array
    /// of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get_array(key, "array of string", |v| v.as_str().ok_or(ElementError::WrongType))
    }

    /// The elements of the integer array `key` as i32 (e.g. `tokenizer.ggml.token_type`); any
    /// integer element type is accepted when every element fits.
    ///
    /// # Errors
    /// [`GgufError::MissingKey`], [`GgufError::TypeMismatch`] when the value is not an array of
    /// integers, [`GgufError::OutOfRange`] naming the first element that does not fit.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.get_array(key, "array of integers", |v| {
            let n = v.as_integer().ok_or(ElementError::WrongType)?;
            i32::try_from(n).map_err(|_| ElementError::OutOfRange("i32", n))
        })
    }

    /// The elements of the boolean array `key` (e.g. `<arch>.swa_layers` style per-layer flags).
    ///
    /// # Errors
    /// [`GgufError::MissingKey`], or [`GgufError::TypeMismatch`] when the value is not an array
    /// of bools.
    pub fn get_bool_array(&self, key: &str) -> Result<Vec<bool>, GgufError> {
        self.get_array(key, "array of bool", |v| v.as_bool().ok_or(ElementError::WrongType))
    }

    /// The architecture name, `general.architecture` (e.g. `mellum`, `qwen3moe`).
    ///
    /// # Errors
    /// As [`GgufFile::get_str`].
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    ///
    /// # Errors
    /// [`GgufError::TensorNotFound`].
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::TensorNotFound { file: self.path.clone(), name: name.to_owned() })
    }

    /// The `info.n_bytes` bytes of a tensor's data in the mapped file (range validated at open).
    ///
    /// # Panics
    /// When `info` describes a range outside this file (an info from another file).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = info.offset as usize;
        &self.bytes[start..start + info.n_bytes as usize]
    }

    /// The whole mapped file (for prefetching and progress reporting).
    pub fn data(&self) -> &[u8] {
        &self.bytes
    }

    /// Absolute byte offset of the data section (where tensor offsets count from).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The data alignment in bytes (`general.alignment`, default [`DEFAULT_ALIGNMENT`]).
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { file: self.path.clone(), key: key.to_owned() })
    }

    fn mismatch(&self, key: &str, expected: &'static str, found: String) -> GgufError {
        GgufError::TypeMismatch { file: self.path.clone(), key: key.to_owned(), expected, found }
    }

    /// An integer value converted to `T`, naming `expected` in errors.
    fn get_int<T: TryFrom<i128>>(&self, key: &str, expected: &'static str) -> Result<T, GgufError> {
        let value = self.require(key)?;
        let n = value.as_integer().ok_or_else(|| self.mismatch(key, expected, value.describe_type()))?;
        T::try_from(n).map_err(|_| GgufError::OutOfRange {
            file: self.path.clone(),
            key: key.to_owned(),
            expected,
            value: format!("{n} ({})", value.type_name()),
        })
    }

    /// The elements of array `key` converted by `convert`.
    fn get_array<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl Fn(&'a GgufValue) -> Result<T, ElementError>,
    ) -> Result<Vec<T>, GgufError> {
        let value = self.require(key)?;
        let items = value.as_array().ok_or_else(|| self.mismatch(key, expected, value.describe_type()))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                convert(item).map_err(|e| match e {
                    ElementError::WrongType => self.mismatch(key, expected, format!("array of {}", item.type_name())),
                    ElementError::OutOfRange(target, n) => GgufError::OutOfRange {
                        file: self.path.clone(),
                        key: key.to_owned(),
                        expected: target,
                        value: format!("element #{i} = {n} ({})", item.type_name()),
                    },
                })
            })
            .collect()
    }
}

/// Why an array element could not be converted.
enum ElementError {
    /// The element has another type than asked for.
    WrongType,
    /// The integer (second field) does not fit the type named by the first.
    OutOfRange(&'static str, i128),
}

/// Why a shape cannot be stored.
pub(crate) enum ShapeError {
    /// More than 4 dimensions.
    TooManyDims,
    /// `dims[0]` is not a multiple of the block size.
    RowNotMultiple,
    /// More than `i64::MAX` elements or `u64::MAX` bytes.
    Overflow,
}

/// Size in bytes of a tensor of `ty` with `dims` (GGUF order), with the checks ggml applies
/// (`gguf_init_from_reader`): at most 4 dimensions, every dimension and the element count at
/// most `i64::MAX` (dimensions of 0 count as 1 for that bound), whole blocks per row.
pub(crate) fn tensor_n_bytes(dims: &[u64], ty: GgmlType) -> Result<u64, ShapeError> {
    if dims.len() > 4 {
        return Err(ShapeError::TooManyDims);
    }
    let limit = i64::MAX as u64;
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)).filter(|&p| p <= limit))
        .ok_or(ShapeError::Overflow)?;
    let row = dims.first().copied().unwrap_or(1);
    let bs = ty.block_size() as u64;
    if !row.is_multiple_of(bs) {
        return Err(ShapeError::RowNotMultiple);
    }
    let rows: u64 = dims.iter().skip(1).product();
    (row / bs)
        .checked_mul(ty.type_size() as u64)
        .and_then(|row_bytes| row_bytes.checked_mul(rows))
        .ok_or(ShapeError::Overflow)
}

/// The whole file at `path`, read into a buffer for which the kernel is asked for transparent
/// huge pages (`madvise(MADV_HUGEPAGE)`, on Linux): where THP is in its `madvise` mode, the
/// default of most distributions, the buffer would otherwise sit on 4 KiB pages, and streaming
/// the weights through them costs a TLB miss every 4 KiB. The advice is only a hint: a kernel
/// without THP, or without free huge pages, leaves the pages small. A file larger than the
/// memory that can be reserved for it is an `OutOfMemory` error, as with `std::fs::read`.
fn read_with_huge_pages(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let mut file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| Error::new(ErrorKind::OutOfMemory, "the file is larger than this platform's address space"))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|e| Error::new(ErrorKind::OutOfMemory, e))?;
    #[cfg(target_os = "linux")]
    advise_huge_pages(bytes.spare_capacity_mut());
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// `madvise(MADV_HUGEPAGE)` over the whole 2 MiB pages inside `buf`; errors are ignored (the
/// advice only changes page sizes).
#[cfg(target_os = "linux")]
fn advise_huge_pages(buf: &mut [std::mem::MaybeUninit<u8>]) {
    const HUGE_PAGE: usize = 2 << 20;
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + buf.len()) / HUGE_PAGE * HUGE_PAGE;
    if end > first {
        // SAFETY: the range lies inside `buf`, which this process owns; MADV_HUGEPAGE changes
        // no contents.
        unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    }
}
