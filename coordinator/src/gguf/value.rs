//! Metadata values and their on-disk type ids (`enum gguf_type` in llama.cpp's `ggml/include/gguf.h`).

/// A GGUF metadata value.
///
/// On disk a value is its type id (u32, the number on each variant) followed by its
/// little-endian payload; a string is a u64 byte length and that many UTF-8 bytes (no
/// terminator); an array is the element type id (u32), the element count (u64) and the elements
/// without per-element type ids.
/// Arrays of arrays are not supported (llama.cpp rejects them too).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// Unsigned 8-bit integer (type id 0).
    U8(u8),
    /// Signed 8-bit integer (type id 1).
    I8(i8),
    /// Unsigned 16-bit integer (type id 2).
    U16(u16),
    /// Signed 16-bit integer (type id 3).
    I16(i16),
    /// Unsigned 32-bit integer (type id 4).
    U32(u32),
    /// Signed 32-bit integer (type id 5).
    I32(i32),
    /// Unsigned 64-bit integer (type id 10).
    U64(u64),
    /// Signed 64-bit integer (type id 11).
    I64(i64),
    /// 32-bit IEEE float (type id 6).
    F32(f32),
    /// 64-bit IEEE float (type id 12).
    F64(f64),
    /// Boolean, one byte on disk (type id 7); any non-zero byte reads as `true`, as in llama.cpp.
    Bool(bool),
    /// UTF-8 string (type id 8).
    String(String),
    /// Array of values of one scalar or string type (type id 9).
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The name of the value's type as used in error messages: `"u8"`, `"i32"`, `"f32"`,
    /// `"bool"`, `"string"`, `"array"`, ...
    pub fn type_name(&self) -> &'static str {
        self.value_type().name()
    }

    /// The string, if this is a [`GgufValue::String`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value of any integer variant, widened to `i128` (which holds every GGUF integer);
    /// `None` for floats, booleans, strings and arrays.
    pub fn as_integer(&self) -> Option<i128> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v.into()),
            _ => None,
        }
    }

    /// The value of a [`GgufValue::F32`] or [`GgufValue::F64`], as `f64`.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The boolean, if this is a [`GgufValue::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The elements, if this is a [`GgufValue::Array`].
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The on-disk type of this value.
    pub(super) fn value_type(&self) -> ValueType {
        match self {
            GgufValue::U8(_) => ValueType::U8,
            GgufValue::I8(_) => ValueType::I8,
            GgufValue::U16(_) => ValueType::U16,
            GgufValue::I16(_) => ValueType::I16,
            GgufValue::U32(_) => ValueType::U32,
            GgufValue::I32(_) => ValueType::I32,
            GgufValue::U64(_) => ValueType::U64,
            GgufValue::I64(_) => ValueType::I64,
            GgufValue::F32(_) => ValueType::F32,
            GgufValue::F64(_) => ValueType::F64,
            GgufValue::Bool(_) => ValueType::Bool,
            GgufValue::String(_) => ValueType::String,
            GgufValue::Array(_) => ValueType::Array,
        }
    }

    /// A description of the value's type for error messages: the type name, or for arrays
    /// `"array of <element type>"` (`"empty array"` when there are no elements).
    pub(super) fn describe_type(&self) -> String {
        match self {
            GgufValue::Array(items) => match items.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "empty array".to_owned(),
            },
            other => other.type_name().to_owned(),
        }
    }
}

/// GGUF value type ids (`enum gguf_type` in `ggml/include/gguf.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    /// The type with this on-disk id, if it is one.
    pub(super) fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The on-disk id.
    pub(super) fn id(self) -> u32 {
        self as u32
    }

    /// The fewest bytes one value of this type occupies on disk (a string's u64 length; an
    /// array's element type and count), used to bound counts before allocating.
    pub(super) fn min_size(self) -> usize {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }

    /// The type name used in error messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F32 => "f32",
            ValueType::F64 => "f64",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
        }
    }
}
