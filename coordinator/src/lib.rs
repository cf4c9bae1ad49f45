//! The moeshard coordinator library: model files, architectures, the forward pass, tokenization,
//! chat templates and sampling, used by the `moeshard` binary.

pub mod gguf;
