//! A streaming GGUF v3 writer (the layout of llama.cpp's `gguf_write_to_buf` in
//! `ggml/src/gguf.cpp` and gguf-py's `GGUFWriter`).

use std::collections::HashSet;
use std::io::Write;

use moeshard_kernels::quant::GgmlType;

use super::value::{GgufValue, ValueType};
use super::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, ShapeError, tensor_n_bytes};

/// An error from [`GgufWriter`]: invalid metadata or tensor infos, calls out of order, tensor
/// data of the wrong size, or a failed write.
#[derive(thiserror::Error, Debug)]
pub enum GgufWriteError {
    /// Writing to the output failed.
    #[error("writing GGUF: {0}")]
    Io(#[from] std::io::Error),
    /// A metadata key is empty.
    #[error("GGUF writer: empty metadata key")]
    EmptyKey,
    /// A metadata key was added twice.
    #[error("GGUF writer: duplicate metadata key {key}")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// An array value cannot be stored: nested arrays, or elements of different types.
    #[error("GGUF writer: metadata key {key}: {reason}")]
    InvalidArray {
        /// The key.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `general.alignment` is not a u32 power of two, or was set after tensor infos were added.
    #[error("GGUF writer: general.alignment must be a u32 power of two set before any tensor info, got {value:?}")]
    BadAlignment {
        /// The value given.
        value: GgufValue,
    },
    /// A tensor name was added twice.
    #[error("GGUF writer: duplicate tensor name {name}")]
    DuplicateTensor {
        /// The name.
        name: String,
    },
    /// A tensor shape cannot be stored: more than 4 dimensions, rows not a whole number of
    /// blocks, or more than `i64::MAX` elements.
    #[error("GGUF writer: tensor {name}: shape {dims:?} is invalid for {ty}: {reason}")]
    InvalidShape {
        /// The tensor.
        name: String,
        /// Its dimensions, GGUF order.
        dims: Vec<u64>,
        /// Its element type.
        ty: GgmlType,
        /// What is wrong.
        reason: &'static str,
    },
    /// A method was called in the wrong phase (e.g. metadata added after the header was written).
    #[error("GGUF writer: {0}")]
    OutOfOrder(&'static str),
    /// More tensor data was given than the current tensor holds.
    #[error("GGUF writer: tensor {name}: {given} more bytes given, only {left} of its {n_bytes} bytes left")]
    TooMuchData {
        /// The tensor being written (`"<none>"` when all are complete).
        name: String,
        /// Bytes given in the call.
        given: usize,
        /// Bytes the tensor still expected.
        left: u64,
        /// The tensor's size in bytes.
        n_bytes: u64,
    },
    /// [`GgufWriter::finish`] was called before every tensor's data was written.
    #[error("GGUF writer: tensor {name}: {written} of its {n_bytes} bytes written")]
    Incomplete {
        /// The first incomplete tensor.
        name: String,
        /// Bytes written.
        written: u64,
        /// The tensor's size in bytes.
        n_bytes: u64,
    },
}

/// A tensor to be written.
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    /// Offset relative to the data section.
    offset: u64,
    n_bytes: u64,
}

/// Writes a GGUF v3 file in one forward pass, holding only the metadata and tensor infos in
/// memory, so that multi-gigabyte files can be produced one tensor (or chunk) at a time.
///
/// Use: [`GgufWriter::add_metadata`] and [`GgufWriter::add_tensor_info`] (which lays the data
/// out: each tensor at a multiple of the alignment, zero-padded after), then
/// [`GgufWriter::write_header`], then each tensor's bytes in the order the infos were added with
/// [`GgufWriter::write_tensor_data`] (any number of calls per tensor; the padding after a tensor
/// is written when its last byte is), then [`GgufWriter::finish`].
///
/// Setting `general.alignment` (a [`GgufValue::U32`] power of two) changes the alignment; it must
/// come before the first tensor info. Empty arrays are written with element type u8.
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
    alignment: u64,
    /// Size of the data section so far, in bytes (padded).
    data_size: u64,
    /// Set once the header is written.
    progress: Option<Progress>,
}

/// Where the data writing stands.
#[derive(Clone, Copy)]
struct Progress {
    /// Absolute offset of the data section (the header's length).
    data_offset: u64,
    /// Index of the tensor being written (`tensors.len()` when all are done).
    index: usize,
    /// Bytes of that tensor written so far.
    written: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty writer: no metadata, no tensors, alignment 32 bytes.
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            alignment: DEFAULT_ALIGNMENT.into(),
            data_size: 0,
            progress: None,
        }
    }

    /// Adds a metadata key-value pair (written in the order added).
    ///
    /// # Errors
    /// Empty or duplicate key, arrays of arrays or of mixed element types, an invalid
    /// `general.alignment`, or the header already written.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) -> Result<(), GgufWriteError> {
        let key = key.into();
        self.check_not_started()?;
        if key.is_empty() {
            return Err(GgufWriteError::EmptyKey);
        }
        if self.keys.contains(&key) {
            return Err(GgufWriteError::DuplicateKey { key });
        }
        if let GgufValue::Array(items) = &value {
            let invalid = |reason| GgufWriteError::InvalidArray { key: key.clone(), reason };
            if let Some(first) = items.first() {
                if first.value_type() == ValueType::Array {
                    return Err(invalid("arrays of arrays are not supported"));
                }
                if items.iter().any(|v| v.value_type() != first.value_type()) {
                    return Err(invalid("array elements must all have the same type"));
                }
            }
        }
        if key == ALIGNMENT_KEY {
            match value {
                GgufValue::U32(a) if a.is_power_of_two() && self.tensors.is_empty() => {
                    self.alignment = a.into();
                }
                _ => return Err(GgufWriteError::BadAlignment { value }),
            }
        }
        self.keys.insert(key.clone());
        self.metadata.push((key, value));
        Ok(())
    }

    /// Adds a tensor info: `dims` in GGUF order (`dims[0]` = elements per row), element type
    /// `ty`. Its data goes after the previous tensor's, at the next multiple of the alignment.
    /// Returns the tensor's size in bytes, which is what [`GgufWriter::write_tensor_data`]
    /// expects for it.
    ///
    /// # Errors
    /// Duplicate name, more than 4 dimensions, `dims[0]` not a multiple of `ty`'s block size,
    /// size overflow, or the header already written.
    pub fn add_tensor_info(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
    ) -> Result<u64, GgufWriteError> {
        let name = name.into();
        self.check_not_started()?;
        if self.names.contains(&name) {
            return Err(GgufWriteError::DuplicateTensor { name });
        }
        let invalid = |reason| GgufWriteError::InvalidShape { name: name.clone(), dims: dims.to_vec(), ty, reason };
        let n_bytes = tensor_n_bytes(dims, ty).map_err(|e| {
            invalid(match e {
                ShapeError::TooManyDims => "more than 4 dimensions",
                ShapeError::RowNotMultiple => "elements per row not a multiple of the block size",
                ShapeError::Overflow => "size overflows",
            })
        })?;
        let offset = self.data_size;
        self.data_size = n_bytes
            .checked_next_multiple_of(self.alignment)
            .and_then(|padded| offset.checked_add(padded))
            .ok_or_else(|| invalid("data section size overflows"))?;
        self.names.insert(name.clone());
        self.tensors.push(PendingTensor { name, dims: dims.to_vec(), ty, offset, n_bytes });
        Ok(n_bytes)
    }

    /// Writes the header, metadata, tensor infos and the padding up to the data section.
    /// Returns the number of bytes written: the data section's absolute offset.
    ///
    /// # Errors
    /// A failed write, or the header already written.
    pub fn write_header(&mut self, w: &mut impl Write) -> Result<u64, GgufWriteError> {
        self.check_not_started()?;
        let mut buf = Vec::new();
        buf.extend_from_slice(b"GGUF");
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut buf, key);
            put_u32(&mut buf, value.value_type().id());
            put_value(&mut buf, value);
        }
        for t in &self.tensors {
            put_str(&mut buf, &t.name);
            put_u32(&mut buf, t.dims.len() as u32);
            for &d in &t.dims {
                buf.extend_from_slice(&d.to_le_bytes());
            }
            put_u32(&mut buf, t.ty.ggml_id());
            buf.extend_from_slice(&t.offset.to_le_bytes());
        }
        let padded = (buf.len() as u64).next_multiple_of(self.alignment);
        buf.resize(padded as usize, 0);
        w.write_all(&buf)?;
        self.progress = Some(Progress { data_offset: padded, index: 0, written: 0 });
        self.skip_empty();
        Ok(padded)
    }

    /// Writes the next `bytes` of the current tensor's data (tensors in the order their infos
    /// were added; a tensor may be given in any number of chunks, each within that tensor).
    /// When the tensor's last byte is written, so is the zero padding after it.
    ///
    /// # Errors
    /// A failed write, the header not written yet, or more bytes than the tensor has left.
    pub fn write_tensor_data(&mut self, w: &mut impl Write, bytes: &[u8]) -> Result<(), GgufWriteError> {
        let progress = self.progress.ok_or(GgufWriteError::OutOfOrder("tensor data written before the header"))?;
        let Some(t) = self.tensors.get(progress.index) else {
            return Err(GgufWriteError::TooMuchData {
                name: "<none>".to_owned(),
                given: bytes.len(),
                left: 0,
                n_bytes: 0,
            });
        };
        let left = t.n_bytes - progress.written;
        if bytes.len() as u64 > left {
            return Err(GgufWriteError::TooMuchData {
                name: t.name.clone(),
                given: bytes.len(),
                left,
                n_bytes: t.n_bytes,
            });
        }
        w.write_all(bytes)?;
        let written = progress.written + bytes.len() as u64;
        if written == t.n_bytes {
            write_zeros(w, t.n_bytes.next_multiple_of(self.alignment) - t.n_bytes)?;
            self.progress = Some(Progress { index: progress.index + 1, written: 0, ..progress });
            self.skip_empty();
        } else {
            self.progress = Some(Progress { written, ..progress });
        }
        Ok(())
    }

    /// Checks that every tensor's data has been written. Returns the file's total size in bytes.
    ///
    /// # Errors
    /// [`GgufWriteError::OutOfOrder`] before the header, [`GgufWriteError::Incomplete`] naming
    /// the first tensor not completely written.
    pub fn finish(&self) -> Result<u64, GgufWriteError> {
        let progress =
            self.progress.ok_or(GgufWriteError::OutOfOrder("finish called before the header was written"))?;
        if let Some(t) = self.tensors.get(progress.index) {
            return Err(GgufWriteError::Incomplete {
                name: t.name.clone(),
                written: progress.written,
                n_bytes: t.n_bytes,
            });
        }
        Ok(progress.data_offset + self.data_size)
    }

    fn check_not_started(&self) -> Result<(), GgufWriteError> {
        match self.progress {
            None => Ok(()),
            Some(_) => Err(GgufWriteError::OutOfOrder("the header has already been written")),
        }
    }

    /// Moves past tensors of 0 bytes, which have no data to wait for.
    fn skip_empty(&mut self) {
        while let Some(p) = &mut self.progress {
            match self.tensors.get(p.index) {
                Some(t) if p.written == 0 && t.n_bytes == 0 => p.index += 1,
                _ => break,
            }
        }
    }
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (everything after its type id).
fn put_value(buf: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => buf.push(*v),
        GgufValue::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => buf.push(u8::from(*v)),
        GgufValue::String(s) => put_str(buf, s),
        GgufValue::Array(items) => {
            let elem = items.first().map_or(ValueType::U8, GgufValue::value_type);
            put_u32(buf, elem.id());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item);
            }
        }
    }
}

fn write_zeros(w: &mut impl Write, n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 64] = [0; 64];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(ZEROS.len() as u64);
        w.write_all(&ZEROS[..chunk as usize])?;
        left -= chunk;
    }
    Ok(())
}
