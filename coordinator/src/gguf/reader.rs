//! Parsing and validation of a GGUF file's bytes (after llama.cpp's `gguf_init_from_reader` in
//! `ggml/src/gguf.cpp`).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use moeshard_kernels::quant::GgmlType;

use super::value::{GgufValue, ValueType};
use super::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgufError, ShapeError, TensorInfo, tensor_n_bytes};

/// Fewest bytes one key-value pair occupies: key length (u64), value type (u32), one byte.
const MIN_KV_BYTES: usize = 8 + 4 + 1;
/// Fewest bytes one tensor info occupies: name length (u64), n_dims (u32), type (u32), offset (u64).
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

/// The validated contents of a GGUF file, tensor offsets made absolute.
pub(super) struct Parsed {
    pub(super) version: u32,
    pub(super) metadata: BTreeMap<String, GgufValue>,
    pub(super) tensors: Vec<TensorInfo>,
    pub(super) data_offset: u64,
    pub(super) alignment: u32,
}

/// Parses and validates the whole of `buf`, the contents of `file` (named in errors).
pub(super) fn parse(file: &Path, buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut cur = Cursor { file, buf, pos: 0 };

    let magic: [u8; 4] = cur.array(|| "the magic".to_owned())?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { file: file.to_path_buf(), found: magic.escape_ascii().to_string() });
    }
    let version = cur.u32(|| "the version".to_owned())?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { file: file.to_path_buf(), version });
    }
    let tensors_what = || "the tensor count".to_owned();
    let kv_what = || "the metadata key-value count".to_owned();
    let n_tensors = cur.u64(tensors_what)?;
    let n_kv = cur.u64(kv_what)?;
    let n_tensors = cur.bounded(n_tensors, 8, MIN_TENSOR_INFO_BYTES, "tensor infos", tensors_what)?;
    let n_kv = cur.bounded(n_kv, 16, MIN_KV_BYTES, "key-value pairs", kv_what)?;

    let mut metadata = BTreeMap::new();
    for index in 0..n_kv {
        let key = cur.string(|| format!("metadata key #{index}"))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { file: file.to_path_buf(), index: index as u64 });
        }
        if metadata.contains_key(key) {
            return Err(GgufError::DuplicateKey { file: file.to_path_buf(), key: key.to_owned() });
        }
        let value = cur.value(key)?;
        metadata.insert(key.to_owned(), value);
    }
    let alignment = alignment(file, &metadata)?;

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut relative_offsets = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for index in 0..n_tensors {
        let name = cur.string(|| format!("name of tensor #{index}"))?;
        if !names.insert(name) {
            return Err(GgufError::DuplicateTensor { file: file.to_path_buf(), name: name.to_owned() });
        }
        let (info, offset) = cur.tensor_info(name, alignment)?;
        tensors.push(info);
        relative_offsets.push(offset);
    }

    let len = buf.len() as u64;
    let header_end = cur.pos as u64;
    let data_offset = header_end.checked_next_multiple_of(u64::from(alignment)).unwrap_or(u64::MAX);
    if !tensors.is_empty() && data_offset > len {
        return Err(GgufError::Truncated {
            file: file.to_path_buf(),
            what: "the padding before the tensor data".to_owned(),
            start: header_end,
            end: data_offset,
            len,
        });
    }
    for (info, relative) in tensors.iter_mut().zip(relative_offsets) {
        let start = data_offset.saturating_add(relative);
        let end = start.saturating_add(info.n_bytes);
        if end > len {
            return Err(GgufError::Truncated {
                file: file.to_path_buf(),
                what: format!("the data of tensor {}", info.name),
                start,
                end,
                len,
            });
        }
        info.offset = start;
    }
    check_overlaps(file, &tensors)?;

    Ok(Parsed { version, metadata, tensors, data_offset, alignment })
}

/// `general.alignment` (any integer type that fits a u32), or the default; a power of two.
fn alignment(file: &Path, metadata: &BTreeMap<String, GgufValue>) -> Result<u32, GgufError> {
    let Some(value) = metadata.get(ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let n = value.as_integer().ok_or_else(|| GgufError::TypeMismatch {
        file: file.to_path_buf(),
        key: ALIGNMENT_KEY.to_owned(),
        expected: "u32",
        found: value.describe_type(),
    })?;
    let alignment = u32::try_from(n).map_err(|_| GgufError::OutOfRange {
        file: file.to_path_buf(),
        key: ALIGNMENT_KEY.to_owned(),
        expected: "u32",
        value: format!("{n} ({})", value.type_name()),
    })?;
    if !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment { file: file.to_path_buf(), alignment });
    }
    Ok(alignment)
}

/// Fails when two tensors' data ranges overlap (empty tensors overlap nothing).
fn check_overlaps(file: &Path, tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_unstable_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if pair[0].offset + pair[0].n_bytes > pair[1].offset {
            return Err(GgufError::TensorOverlap {
                file: file.to_path_buf(),
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}

/// A read position in the file's bytes. `what` closures describe the field being read for
/// error messages; they run only on error.
struct Cursor<'a> {
    file: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The next `n` bytes.
    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        match self.pos.checked_add(n).filter(|&end| end <= self.buf.len()) {
            Some(end) => {
                let bytes = &self.buf[self.pos..end];
                self.pos = end;
                Ok(bytes)
            }
            None => Err(GgufError::Truncated {
                file: self.file.to_path_buf(),
                what: what(),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(n as u64),
                len: self.buf.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 count of items that occupy at least `min_size` bytes each; see [`Cursor::bounded`].
    fn count(&mut self, min_size: usize, unit: &'static str, what: impl Fn() -> String) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(&what)?;
        self.bounded(count, offset, min_size, unit, what)
    }

    /// `count` (read at `offset`) items of at least `min_size` bytes each, checked against the
    /// file's size, so that allocating `count` items costs at most a small multiple of it.
    /// A count that fits the file but not the bytes left is left for the reads of the items to
    /// report as truncation, naming the item.
    fn bounded(
        &self,
        count: u64,
        offset: u64,
        min_size: usize,
        unit: &'static str,
        what: impl Fn() -> String,
    ) -> Result<usize, GgufError> {
        usize::try_from(count)
            .ok()
            .filter(|&n| n.checked_mul(min_size).is_some_and(|bytes| bytes <= self.buf.len()))
            .ok_or_else(|| GgufError::Oversized {
                file: self.file.to_path_buf(),
                what: what(),
                count,
                unit,
                offset,
                len: self.buf.len() as u64,
            })
    }

    /// A string: u64 byte length, then UTF-8 bytes.
    fn string(&mut self, what: impl Fn() -> String) -> Result<&'a str, GgufError> {
        let len = self.count(1, "bytes", &what)?;
        let bytes = self.take(len, &what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { file: self.file.to_path_buf(), what: what() })
    }

    /// A value type id, as a known type.
    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufError> {
        let id = self.u32(|| format!("the value type of metadata key {key}"))?;
        ValueType::from_id(id).ok_or_else(|| GgufError::InvalidValueType {
            file: self.file.to_path_buf(),
            key: key.to_owned(),
            id,
        })
    }

    /// The value type and value of metadata key `key`.
    fn value(&mut self, key: &str) -> Result<GgufValue, GgufError> {
        let ty = self.value_type(key)?;
        self.typed_value(ty, key, &|| format!("the value of metadata key {key}"))
    }

    /// One value of type `ty` of metadata key `key`; `what` names it in errors (a trait object:
    /// arrays recurse into this function).
    fn typed_value(&mut self, ty: ValueType, key: &str, what: &dyn Fn() -> String) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            ValueType::String => GgufValue::String(self.string(what)?.to_owned()),
            ValueType::Array => {
                let elem = self.value_type(key)?;
                if elem == ValueType::Array {
                    return Err(GgufError::NestedArray { file: self.file.to_path_buf(), key: key.to_owned() });
                }
                let n = self.count(elem.min_size(), "elements", || format!("the array of metadata key {key}"))?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    let what = || format!("element #{i} of metadata key {key}");
                    items.push(self.typed_value(elem, key, &what)?);
                }
                GgufValue::Array(items)
            }
        })
    }

    /// The rest of tensor `name`'s info after its name: dimensions, type, relative offset.
    /// Returns the info (offset still 0) and the relative offset.
    fn tensor_info(&mut self, name: &str, alignment: u32) -> Result<(TensorInfo, u64), GgufError> {
        let n_dims = self.u32(|| format!("the dimension count of tensor {name}"))?;
        if n_dims > 4 {
            return Err(GgufError::TooManyDims { file: self.file.to_path_buf(), name: name.to_owned(), n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(|| format!("dimension {d} of tensor {name}"))?);
        }
        let id = self.u32(|| format!("the type of tensor {name}"))?;
        let offset = self.u64(|| format!("the data offset of tensor {name}"))?;
        let file = self.file.to_path_buf();
        let Some(ty) = GgmlType::from_ggml_id(id) else {
            return Err(GgufError::UnsupportedType { file, name: name.to_owned(), id });
        };
        let n_bytes = tensor_n_bytes(&dims, ty).map_err(|e| match e {
            ShapeError::RowNotMultiple => GgufError::RowNotMultiple {
                file: file.clone(),
                name: name.to_owned(),
                n: dims.first().copied().unwrap_or(1),
                ty,
                bs: ty.block_size(),
            },
            ShapeError::TooManyDims => GgufError::TooManyDims { file: file.clone(), name: name.to_owned(), n_dims },
            ShapeError::Overflow => {
                GgufError::ShapeOverflow { file: file.clone(), name: name.to_owned(), dims: dims.clone() }
            }
        })?;
        if !offset.is_multiple_of(u64::from(alignment)) {
            return Err(GgufError::Misaligned { file, name: name.to_owned(), offset, alignment });
        }
        let info = TensorInfo { name: name.to_owned(), dims, ty, offset: 0, n_bytes };
        Ok((info, offset))
    }
}
