//! CPU compute kernels for moeshard.
//!
//! Everything here works on plain slices: quantized weight rows in the exact GGUF block layouts
//! (see [`quant`]), f32 activations laid out row-major as `[n_tokens, n_embd]`. No file formats,
//! no networking. Each kernel has a plain reference implementation in its tests.

pub mod affinity;
pub mod allocator;
pub mod attention;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod probe;
pub mod quant;
pub mod random;
pub mod rope;
pub mod sampling;
