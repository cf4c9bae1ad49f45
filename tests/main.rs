//! moeshard's integration tests: one binary, shared helpers in `util`.
//!
//! - `conformance`: every fixture model against the llama.cpp / transformers references, under
//!   the rules of `tests/fixtures/README.md`.
//! - `reference`: the optimized forward pass against a plain f64 reference implementation.
//! - `cli`: the `moeshard` binary as a user runs it, malformed files included.
//! - `serve`: `moeshard serve` driven over HTTP (OpenAI and Ollama APIs).

mod cli;
mod cluster;
mod conformance;
mod reference;
mod serve;
mod util;
