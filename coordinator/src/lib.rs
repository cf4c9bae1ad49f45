//! The moeshard coordinator library: model files, architectures, the forward pass, tokenization,
//! chat templates and sampling, used by the `moeshard` binary.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod cluster;
pub mod engine;
pub mod experts;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod serve;
pub mod session;
pub mod synth;
pub mod tokenizer;
