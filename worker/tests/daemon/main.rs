//! Cross-process tests of the `moeshard-worker` binary: real worker processes on loopback, a
//! protocol-level client standing in for the coordinator, every wait under a deadline, every
//! child killed on drop.

mod discovery;
mod refusals;
mod session;
mod startup;
mod util;
