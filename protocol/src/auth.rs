//! Cluster-key authentication, the sans-I/O part: the key, the public cluster id and the proofs.
//!
//! DESIGN.md, "Protocol": each side proves it knows the cluster key with an HMAC over the TLS
//! keying-material exporter before any command, weight or activation moves. Both ends export
//! [`EXPORTER_LEN`] bytes with label [`EXPORTER_LABEL`] and an empty context (TLS 1.3 exporter,
//! RFC 8446 section 7.5; the interface of RFC 5705). The exporter is unique to one TLS session, so
//! a proof cannot be replayed on another connection, and a machine in the middle (which terminates
//! two TLS sessions with two different exporters) cannot forward one. The handshake:
//!
//! 1. client -> server: Auth frame, [`client_proof`] = HMAC-SHA256(key, `"moeshard/1 client"` || exporter)
//! 2. server verifies it ([`verify_client`], constant time) or closes the connection;
//! 3. server -> client: Auth frame, [`server_proof`] = HMAC-SHA256(key, `"moeshard/1 server"` || exporter)
//! 4. client verifies it ([`verify_server`]) or closes the connection.
//!
//! The two role labels differ, so a proof cannot be reflected back to its sender. The async shell
//! that runs this over QUIC is [`crate::transport::authenticate_client`] /
//! [`crate::transport::authenticate_server`]. Nothing here ever formats the key.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::frame::FrameKind;
use crate::transport::TransportError;

/// The TLS exporter label both sides use (RFC 5705 / RFC 8446 section 7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-moeshard-auth-v1";

/// Length in bytes of the exported keying material.
pub const EXPORTER_LEN: usize = 32;

/// Length in bytes of a proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;

const CLIENT_LABEL: &[u8] = b"moeshard/1 client";
const SERVER_LABEL: &[u8] = b"moeshard/1 server";
const CLUSTER_ID_DOMAIN: &[u8] = b"moeshard cluster id v1\0";

/// The shared secret of a cluster. `Debug` and `Display` print `ClusterKey(<redacted>)`.
///
/// The secret is the key string's UTF-8 bytes, so the same string typed on two machines (or read
/// from a key file) gives the same key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(String);

/// Why a cluster key string was refused. Never contains the key.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The key is empty or only whitespace.
    #[error("the cluster key is empty")]
    Empty,
    /// The key is shorter than [`ClusterKey::MIN_LEN`] characters.
    #[error(
        "the cluster key has {chars} characters, at least {min} are required \
         (run without a key to have one generated)"
    )]
    TooShort {
        /// Characters in the given key (after trimming).
        chars: usize,
        /// The minimum.
        min: usize,
    },
}

impl ClusterKey {
    /// The fewest characters a key may have.
    pub const MIN_LEN: usize = 16;

    /// A key from user input. Leading and trailing whitespace is removed (a key file's final
    /// newline is not part of the key); empty keys and keys under [`Self::MIN_LEN`] characters
    /// are refused.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        let chars = s.chars().count();
        if chars == 0 {
            Err(KeyError::Empty)
        } else if chars < Self::MIN_LEN {
            Err(KeyError::TooShort { chars, min: Self::MIN_LEN })
        } else {
            Ok(ClusterKey(s.to_owned()))
        }
    }

    /// A fresh key: 32 bytes from the thread-local CSPRNG (`rand::rng()`, ChaCha seeded from the
    /// OS) rendered as 64 lowercase hex characters.
    pub fn generate() -> Self {
        ClusterKey(hex(&rand::random::<[u8; 32]>()))
    }

    /// The secret itself, for the one place that must show it: printing the worker command line
    /// after [`Self::generate`]. Never log it.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    fn mac(&self, label: &[u8], exporter: &[u8; EXPORTER_LEN]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(exporter);
        mac
    }
}

impl FromStr for ClusterKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        ClusterKey::parse(s)
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// The public id of the cluster a key defines: the first 16 hex characters (8 bytes) of
/// SHA-256(`"moeshard cluster id v1\0"` || key bytes). Safe to publish (mDNS TXT records) so that
/// coordinators skip workers of other clusters; it does not let anyone compute proofs.
pub fn cluster_id(key: &ClusterKey) -> String {
    let digest = Sha256::new().chain_update(CLUSTER_ID_DOMAIN).chain_update(key.0.as_bytes()).finalize();
    hex(&digest[..8])
}

/// Which side of the handshake a proof belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that opened the connection (the coordinator).
    Client,
    /// The side that accepted it (a worker).
    Server,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Server => "server",
        })
    }
}

/// Why authentication failed. Messages say what failed, never the key.
#[derive(Debug, Error)]
pub enum AuthError {
    /// The peer's proof is wrong: it does not hold this cluster key, or the TLS session is not the
    /// one the peer sees (interception).
    #[error("the {0}'s authentication proof is wrong: the peer does not hold this cluster key")]
    BadProof(Role),
    /// The peer's proof has the wrong length.
    #[error("the {role}'s authentication proof has {len} bytes, expected {PROOF_LEN}")]
    BadProofLength {
        /// Whose proof.
        role: Role,
        /// Its length in bytes.
        len: usize,
    },
    /// The TLS session could not export keying material for the channel binding.
    #[error("the TLS session could not export keying material for the channel binding")]
    Exporter,
    /// The handshake did not finish in time.
    #[error("authentication did not finish within {0:?}")]
    Timeout(Duration),
    /// The peer sent a frame other than Auth during the handshake.
    #[error("expected an Auth frame during authentication, got {0:?}")]
    UnexpectedFrame(FrameKind),
    /// The peer closed the connection during the handshake; `reason` is the reason it gave.
    #[error("the peer closed the connection during authentication (code {code}): {reason}")]
    ClosedByPeer {
        /// The QUIC application error code.
        code: u64,
        /// The peer's reason, lossily decoded as UTF-8.
        reason: String,
    },
    /// Reading or writing the handshake frames failed.
    #[error("authentication failed: {0}")]
    Transport(#[from] TransportError),
}

/// The client's proof: HMAC-SHA256(key, `"moeshard/1 client"` || exporter).
pub fn client_proof(key: &ClusterKey, exporter: &[u8; EXPORTER_LEN]) -> [u8; PROOF_LEN] {
    key.mac(CLIENT_LABEL, exporter).finalize().into_bytes().into()
}

/// The server's proof: HMAC-SHA256(key, `"moeshard/1 server"` || exporter).
pub fn server_proof(key: &ClusterKey, exporter: &[u8; EXPORTER_LEN]) -> [u8; PROOF_LEN] {
    key.mac(SERVER_LABEL, exporter).finalize().into_bytes().into()
}

/// Checks a client's proof in constant time; [`AuthError::BadProof`] or
/// [`AuthError::BadProofLength`] on failure.
pub fn verify_client(key: &ClusterKey, exporter: &[u8; EXPORTER_LEN], proof: &[u8]) -> Result<(), AuthError> {
    verify(key, CLIENT_LABEL, Role::Client, exporter, proof)
}

/// Checks a server's proof in constant time; [`AuthError::BadProof`] or
/// [`AuthError::BadProofLength`] on failure.
pub fn verify_server(key: &ClusterKey, exporter: &[u8; EXPORTER_LEN], proof: &[u8]) -> Result<(), AuthError> {
    verify(key, SERVER_LABEL, Role::Server, exporter, proof)
}

fn verify(
    key: &ClusterKey,
    label: &[u8],
    role: Role,
    exporter: &[u8; EXPORTER_LEN],
    proof: &[u8],
) -> Result<(), AuthError> {
    if proof.len() != PROOF_LEN {
        return Err(AuthError::BadProofLength { role, len: proof.len() });
    }
    key.mac(label, exporter).verify_slice(proof).map_err(|_| AuthError::BadProof(role))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClusterKey {
        ClusterKey::parse(s).expect("valid key")
    }

    #[test]
    fn parse_rejects_empty_and_short() {
        assert_eq!(ClusterKey::parse(""), Err(KeyError::Empty));
        assert_eq!(ClusterKey::parse(" \t\n"), Err(KeyError::Empty));
        assert_eq!(ClusterKey::parse("short-key"), Err(KeyError::TooShort { chars: 9, min: 16 }));
        assert_eq!(ClusterKey::parse("exactly-16-chars").map(|k| k.reveal().len()), Ok(16));
        assert_eq!(key("  exactly-16-chars\n").reveal(), "exactly-16-chars");
        let msg = ClusterKey::parse("hunter2").unwrap_err().to_string();
        assert!(!msg.contains("hunter2") && msg.contains("16"), "{msg}");
    }

    #[test]
    fn generated_keys_are_64_hex_and_distinct() {
        let (a, b) = (ClusterKey::generate(), ClusterKey::generate());
        assert_eq!(a.reveal().len(), 64);
        assert!(a.reveal().bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        assert_eq!(ClusterKey::parse(a.reveal()), Ok(a));
    }

    #[test]
    fn debug_and_display_redact() {
        let k = key("correct horse battery staple");
        for shown in [format!("{k:?}"), format!("{k}"), format!("{:?}", Some(&k))] {
            assert!(shown.contains("ClusterKey(<redacted>)"), "{shown}");
            assert!(!shown.contains("horse"), "{shown}");
        }
    }

    #[test]
    fn cluster_id_is_stable_and_hides_the_key() {
        let k = key("0123456789abcdef0123");
        let id = cluster_id(&k);
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, cluster_id(&key("0123456789abcdef0123")));
        assert_ne!(id, cluster_id(&key("0123456789abcdef0124")));
        assert!(!id.contains(k.reveal()) && !k.reveal().contains(&id));
        let want = Sha256::digest([CLUSTER_ID_DOMAIN, k.reveal().as_bytes()].concat());
        assert_eq!(id, hex(&want[..8]));
    }

    #[test]
    fn proofs_match_hmac_definition() {
        let k = key("a cluster key for tests");
        let exporter = [9u8; EXPORTER_LEN];
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"a cluster key for tests").expect("key");
        mac.update(b"moeshard/1 client");
        mac.update(&exporter);
        assert_eq!(client_proof(&k, &exporter), <[u8; 32]>::from(mac.finalize().into_bytes()));
    }

    #[test]
    fn proofs_differ_between_roles_keys_and_exporters() {
        let (k1, k2) = (key("first cluster key!!"), key("second cluster key!"));
        let (e1, e2) = ([1u8; EXPORTER_LEN], [2u8; EXPORTER_LEN]);
        let c = client_proof(&k1, &e1);
        assert_ne!(c, server_proof(&k1, &e1));
        assert_ne!(c, client_proof(&k2, &e1));
        assert_ne!(c, client_proof(&k1, &e2));
    }

    #[test]
    fn verify_accepts_right_and_rejects_wrong() {
        let (k1, k2) = (key("first cluster key!!"), key("second cluster key!"));
        let (e1, e2) = ([1u8; EXPORTER_LEN], [2u8; EXPORTER_LEN]);
        verify_client(&k1, &e1, &client_proof(&k1, &e1)).expect("client proof");
        verify_server(&k1, &e1, &server_proof(&k1, &e1)).expect("server proof");

        assert!(matches!(verify_client(&k2, &e1, &client_proof(&k1, &e1)), Err(AuthError::BadProof(Role::Client))));
        assert!(matches!(verify_client(&k1, &e2, &client_proof(&k1, &e1)), Err(AuthError::BadProof(Role::Client))));
        assert!(matches!(verify_server(&k1, &e2, &server_proof(&k1, &e1)), Err(AuthError::BadProof(Role::Server))));
        // Reflection: the client's own proof is not a valid server proof.
        assert!(matches!(verify_server(&k1, &e1, &client_proof(&k1, &e1)), Err(AuthError::BadProof(Role::Server))));

        let proof = client_proof(&k1, &e1);
        assert!(matches!(
            verify_client(&k1, &e1, &proof[..31]),
            Err(AuthError::BadProofLength { role: Role::Client, len: 31 })
        ));
        let mut flipped = proof;
        flipped[31] ^= 1;
        let err = verify_client(&k1, &e1, &flipped).unwrap_err().to_string();
        assert!(err.contains("client") && !err.contains("first cluster key"), "{err}");
    }
}
