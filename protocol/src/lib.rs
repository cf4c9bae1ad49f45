//! The moeshard wire protocol (DESIGN.md, "Protocol" and "The hot path").
//!
//! A deterministic, sans-I/O core that tests drive directly:
//! - [`frame`]: the 12-byte frame header (magic, version, kind, length) and its limits;
//! - [`auth`]: the cluster key, the public cluster id, and the HMAC-SHA256 proofs over the TLS
//!   exporter that authenticate both ends;
//! - [`control`]: control-plane messages (bincode 2);
//! - [`data`]: data-plane messages (rkyv 0.8, validated access only);
//!
//! and a thin async shell over quinn / tokio, [`transport`]: TLS / QUIC configuration, frame I/O on
//! streams, and the authentication handshake on a live connection.

pub mod auth;
pub mod control;
pub mod data;
pub mod frame;
pub mod transport;
