//! The thin async shell over quinn / tokio: TLS and QUIC configuration, frame I/O on streams, and
//! the authentication handshake of [`crate::auth`] run over a real connection.
//!
//! DESIGN.md, "Protocol": one QUIC connection per worker, ALPN [`ALPN`], TLS 1.3 only, a
//! self-signed certificate per node. The client accepts any server certificate (there is no CA
//! for a home LAN) but still checks the TLS 1.3 handshake signature, so the server holds the
//! private key of the certificate it shows. Authenticity of the peer comes from the cluster-key
//! HMAC over the TLS exporter ([`authenticate_client`] / [`authenticate_server`]), which binds the
//! proof to this very TLS session: nothing but those proofs may move before both succeeded.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, ReadExactError, RecvStream, SendStream, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;

use crate::auth::{
    AuthError, ClusterKey, EXPORTER_LABEL, EXPORTER_LEN, PROOF_LEN, client_proof, server_proof, verify_client,
    verify_server,
};
use crate::control::{Control, ControlError};
use crate::frame::{FrameError, FrameHeader, FrameKind, HEADER_LEN, MAX_FRAME_PAYLOAD};

/// The QUIC ALPN protocol id.
pub const ALPN: &[u8] = b"moeshard/1";

/// The TLS server name clients use (and servers' certificates carry). Certificates are not
/// checked against it; it only has to be a valid DNS name.
pub const SERVER_NAME: &str = "moeshard";

/// Deadline for the whole authentication handshake, and for [`connect`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const IDLE_TIMEOUT_MS: u32 = 10_000;

/// A connection with no packets for this long is dead (the QUIC idle timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(IDLE_TIMEOUT_MS as u64);

/// Interval of QUIC keep-alive pings, well inside [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Application close code: the peer failed authentication (or it timed out).
pub const AUTH_FAILED: VarInt = VarInt::from_u32(1);

/// Application close code: the peer speaks another protocol version; the reason names both.
pub const VERSION_MISMATCH: VarInt = VarInt::from_u32(2);

/// Application close code: the peer sent a malformed or oversized frame or message.
pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(3);

/// Errors of the transport shell.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A frame header or payload was rejected.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A control message could not be encoded or decoded.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A frame of another kind arrived.
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind {
        /// The kind the caller wanted.
        expected: FrameKind,
        /// The kind that arrived.
        got: FrameKind,
    },
    /// The peer finished the stream cleanly at a frame boundary.
    #[error("the peer finished the stream")]
    Finished,
    /// More bytes followed the frame of a stream that carries exactly one.
    #[error("data after the stream's only frame")]
    TrailingData,
    /// Reading a stream failed (connection lost, stream reset, ...).
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing a stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The connection failed or was closed.
    #[error("connection failed: {0}")]
    Connection(#[from] ConnectionError),
    /// A connection attempt could not start.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Connecting did not finish within [`HANDSHAKE_TIMEOUT`].
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    /// Binding a UDP socket failed.
    #[error("cannot bind UDP socket: {0}")]
    Io(#[from] std::io::Error),
    /// TLS configuration failed.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS configuration lacks the cipher suite QUIC's initial packets need.
    #[error("QUIC TLS configuration failed: {0}")]
    QuicCrypto(#[from] NoInitialCipherSuite),
    /// Generating the node certificate failed.
    #[error("cannot generate node certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// A node's TLS identity: a fresh self-signed certificate (ECDSA P-256, subject alt name
/// [`SERVER_NAME`], common name = the node name) and its private key. `Debug` omits the key.
pub struct NodeIdentity {
    name: String,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl NodeIdentity {
    /// Generates a new identity for the node called `name`.
    pub fn generate(name: &str) -> Result<Self, TransportError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(NodeIdentity {
            name: name.to_owned(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// The node name given to [`NodeIdentity::generate`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The DER-encoded certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity").field("name", &self.name).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Packets a peer may receive before it must acknowledge (the QUIC ACK frequency extension,
/// draft-ietf-quic-ack-frequency, as quinn implements it): a reply's ten or so packets are
/// acknowledged by the next batch or answer going the other way, not by ACK-only packets that
/// wake the sender for nothing.
const ACK_ELICITING_THRESHOLD: u32 = 32;
/// The longest a peer may hold back an acknowledgement, when nothing else goes its way.
const MAX_ACK_DELAY: Duration = Duration::from_millis(5);
/// Initial congestion window in bytes (quinn's default: 12,000). Expert traffic is bursts of one
/// batch per layer and the window does not grow while the sender is application-limited, so a
/// prefill batch of a few hundred KB would otherwise spend several round trips in slow start on
/// every layer.
const INITIAL_WINDOW: u64 = 1 << 20;

/// Streams a peer may open at once. A coordinator has one batch stream per worker in flight;
/// the limit matters for when credit comes back: quinn announces freed streams (MAX_STREAMS,
/// in a packet of its own that wakes the peer) once an eighth of the limit is free. With its
/// default of 100 that was every 13th batch, while the worker computed it; here every 128th.
const MAX_CONCURRENT_BIDI_STREAMS: u32 = 1024;
/// Bytes a peer may have unread across all streams of a connection (quinn's default is
/// unbounded): with [`MAX_CONCURRENT_BIDI_STREAMS`] streams open, memory stays bounded by this.
const CONNECTION_RECEIVE_WINDOW: u32 = 128 << 20;

/// The largest UDP payload, in bytes, that MTU discovery searches up to and that a peer is told
/// it may send (RFC 9000's `max_udp_payload_size`; quinn's defaults are 1452 and 1472, Ethernet's
/// MTU). Discovery (DPLPMTUD, RFC 9000 section 14.3) probes upwards from 1200 and keeps the
/// largest size that gets through, so each path ends at its own MTU: about 65,500 on loopback
/// (a worker beside the coordinator), 8,972 with jumbo frames, 1,472 on plain Ethernet. quinn-udp
/// sends with the don't-fragment bit (`IP_PMTUDISC_PROBE`), so a probe larger than the path is
/// dropped, never fragmented. On loopback a decode step's 9 KB answer then travels as one
/// packet instead of seven: a round trip of 2.8 KB out and 9.3 KB back, each on a fresh stream
/// as expert batches go, took 84 µs instead of 95-98 µs (median of 5,000, two vCPUs).
/// quinn sizes each endpoint's receive buffer by it (x 64 GRO segments x 32 datagrams: 128 MiB of
/// address space instead of 3 MiB), but only what bursts fill becomes resident: a worker's
/// anonymous memory after a pp512 run over loopback was 48 MB, against 47 MB before.
pub const MAX_UDP_PAYLOAD: u16 = 65527;

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    t.max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD)).max_ack_delay(Some(MAX_ACK_DELAY));
    t.ack_frequency_config(Some(acks));
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(INITIAL_WINDOW);
    t.congestion_controller_factory(Arc::new(cubic));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// QUIC server configuration: TLS 1.3 only (ring), ALPN [`ALPN`], the node's certificate, no
/// client certificates (clients prove themselves with the cluster key), [`IDLE_TIMEOUT`] and
/// [`KEEP_ALIVE`].
pub fn server_config(identity: &NodeIdentity) -> Result<quinn::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], PrivateKeyDer::Pkcs8(identity.key.clone_key()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// QUIC client configuration: TLS 1.3 only (ring), ALPN [`ALPN`], [`IDLE_TIMEOUT`] and
/// [`KEEP_ALIVE`].
///
/// Any server certificate is accepted: nodes use self-signed per-node certificates and no CA
/// exists. The handshake signature is still verified (the server holds that certificate's key),
/// and the server is authenticated afterwards by its HMAC proof over this session's TLS exporter
/// ([`authenticate_client`]), which a server without the cluster key cannot produce.
pub fn client_config() -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let verifier = AnyServerCertificate { algorithms: provider.signature_verification_algorithms };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// Accepts any certificate, verifies handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct AnyServerCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Endpoint settings shared by both sides: datagrams of up to [`MAX_UDP_PAYLOAD`] accepted.
fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("MAX_UDP_PAYLOAD is within QUIC's limits");
    config
}

/// An endpoint on a UDP socket bound to `addr` (dual-stack when it is an IPv6 address, as
/// `quinn::Endpoint::client` makes it), under the tokio runtime, with [`endpoint_config`].
fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<Endpoint, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6()
        && let Err(e) = socket.set_only_v6(false)
    {
        tracing::debug!(%e, "unable to make the socket dual-stack");
    }
    socket.bind(&addr.into())?;
    Ok(Endpoint::new(endpoint_config(), server, socket.into(), Arc::new(quinn::TokioRuntime))?)
}

/// A server endpoint bound to `addr` with [`server_config`]. Needs a tokio runtime.
pub fn server_endpoint(addr: SocketAddr, identity: &NodeIdentity) -> Result<Endpoint, TransportError> {
    endpoint(addr, Some(server_config(identity)?))
}

/// A client endpoint bound to `bind` (e.g. `0.0.0.0:0`) with [`client_config`] as its default.
/// Needs a tokio runtime.
pub fn client_endpoint(bind: SocketAddr) -> Result<Endpoint, TransportError> {
    let mut endpoint = endpoint(bind, None)?;
    endpoint.set_default_client_config(client_config()?);
    Ok(endpoint)
}

/// Connects to a node (QUIC + TLS handshake only; run [`authenticate_client`] next), within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn connect(endpoint: &Endpoint, addr: SocketAddr) -> Result<Connection, TransportError> {
    let connecting = endpoint.connect(addr, SERVER_NAME)?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(TransportError::ConnectTimeout(addr)),
    }
}

/// Writes one frame: the 12-byte header, then `payload` (at most [`MAX_FRAME_PAYLOAD`] bytes).
pub async fn write_frame(send: &mut SendStream, kind: FrameKind, payload: &[u8]) -> Result<(), TransportError> {
    let header = FrameHeader::new(kind, payload.len())?;
    // One write for both, so that the header never travels in a packet of its own.
    let mut chunks = [Bytes::copy_from_slice(&header.to_bytes()), Bytes::copy_from_slice(payload)];
    send.write_all_chunks(&mut chunks).await?;
    Ok(())
}

/// Reads one frame: the header, validated (magic, version, kind, flags), a payload length of at
/// most `max_payload` bytes checked before allocating, then exactly that many bytes.
///
/// [`TransportError::Finished`] when the stream ends cleanly before a header;
/// [`FrameError::Truncated`] when it ends inside a frame. No deadline of its own: wrap it in
/// `tokio::time::timeout` where the caller expects an answer.
pub async fn read_frame(recv: &mut RecvStream, max_payload: usize) -> Result<(FrameKind, Vec<u8>), TransportError> {
    let mut head = [0u8; HEADER_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(TransportError::Finished),
        Err(ReadExactError::FinishedEarly(got)) => {
            return Err(FrameError::Truncated { needed: HEADER_LEN as u64, got: got as u64 }.into());
        }
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let header = FrameHeader::parse(&head)?;
    let len = header.len as usize;
    if len > max_payload {
        return Err(FrameError::Oversized { len: len as u64, max: max_payload as u64 }.into());
    }
    let mut payload = vec![0u8; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => Ok((header.kind, payload)),
        Err(ReadExactError::FinishedEarly(got)) => {
            Err(FrameError::Truncated { needed: (HEADER_LEN + len) as u64, got: (HEADER_LEN + got) as u64 }.into())
        }
        Err(ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads the only frame of a stream (an expert batch, its partial sums): [`read_frame`], then
/// the stream's end, which the sender's FIN marks in the frame's last packet. Read to its end,
/// the stream is freed quietly; dropped before it, it costs a STOP_SENDING frame that wakes the
/// peer for nothing. Errors: [`read_frame`]'s, and [`TransportError::TrailingData`] when bytes
/// follow the frame.
pub async fn read_only_frame(
    recv: &mut RecvStream,
    max_payload: usize,
) -> Result<(FrameKind, Vec<u8>), TransportError> {
    let frame = read_frame(recv, max_payload).await?;
    match recv.read(&mut [0u8; 1]).await? {
        None => Ok(frame),
        Some(_) => Err(TransportError::TrailingData),
    }
}

/// Encodes `msg` and writes it as a [`FrameKind::Control`] frame.
pub async fn write_control(send: &mut SendStream, msg: &Control) -> Result<(), TransportError> {
    write_frame(send, FrameKind::Control, &msg.encode()?).await
}

/// Reads one frame that must be a [`FrameKind::Control`] frame and decodes it.
pub async fn read_control(recv: &mut RecvStream) -> Result<Control, TransportError> {
    let (kind, payload) = read_frame(recv, MAX_FRAME_PAYLOAD).await?;
    if kind != FrameKind::Control {
        return Err(TransportError::UnexpectedKind { expected: FrameKind::Control, got: kind });
    }
    Ok(Control::decode(&payload)?)
}

/// This connection's channel binding: [`EXPORTER_LEN`] bytes of TLS exporter output with label
/// [`EXPORTER_LABEL`] and an empty context (RFC 8446 section 7.5, RFC 5705).
pub fn channel_binding(conn: &Connection) -> Result<[u8; EXPORTER_LEN], AuthError> {
    let mut out = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"").map_err(|_| AuthError::Exporter)?;
    Ok(out)
}

/// Client side of the handshake: opens the connection's first bidirectional stream, sends the
/// client proof, verifies the server's. On success returns that stream, to be used as the control
/// channel. On failure the connection is closed (code [`AUTH_FAILED`] or [`VERSION_MISMATCH`],
/// with a reason) and the error says what failed; if the server closed it first,
/// [`AuthError::ClosedByPeer`] carries the server's reason. Deadline: [`HANDSHAKE_TIMEOUT`].
pub async fn authenticate_client(conn: &Connection, key: &ClusterKey) -> Result<(SendStream, RecvStream), AuthError> {
    let handshake = async {
        let exporter = channel_binding(conn)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(TransportError::from)?;
        write_frame(&mut send, FrameKind::Auth, &client_proof(key, &exporter)).await?;
        verify_server(key, &exporter, &read_proof(&mut recv).await?)?;
        Ok((send, recv))
    };
    finish_handshake(conn, tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await, "server")
}

/// Server side of the handshake: accepts the connection's first bidirectional stream, verifies
/// the client proof, replies with the server proof. On success returns that stream, to be used
/// as the control channel. On failure closes the connection with [`AUTH_FAILED`] and reason
/// `"authentication failed"` (or `"authentication timed out"`; [`VERSION_MISMATCH`] and the
/// version message for another protocol version), logs a warning, and returns the error.
/// Deadline: [`HANDSHAKE_TIMEOUT`].
pub async fn authenticate_server(conn: &Connection, key: &ClusterKey) -> Result<(SendStream, RecvStream), AuthError> {
    let handshake = async {
        let exporter = channel_binding(conn)?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(TransportError::from)?;
        verify_client(key, &exporter, &read_proof(&mut recv).await?)?;
        write_frame(&mut send, FrameKind::Auth, &server_proof(key, &exporter)).await?;
        Ok((send, recv))
    };
    finish_handshake(conn, tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await, "client")
}

async fn read_proof(recv: &mut RecvStream) -> Result<Vec<u8>, AuthError> {
    match read_frame(recv, PROOF_LEN).await? {
        (FrameKind::Auth, proof) => Ok(proof),
        (kind, _) => Err(AuthError::UnexpectedFrame(kind)),
    }
}

/// Maps a timeout, prefers the peer's close reason, closes the connection on our own failures,
/// and logs every failure (never the key: no error carries it).
fn finish_handshake<T>(
    conn: &Connection,
    outcome: Result<Result<T, AuthError>, tokio::time::error::Elapsed>,
    peer_role: &str,
) -> Result<T, AuthError> {
    let err = match outcome {
        Ok(Ok(value)) => {
            tracing::debug!(peer = %conn.remote_address(), "{peer_role} authenticated");
            return Ok(value);
        }
        Ok(Err(err)) => err,
        Err(_) => AuthError::Timeout(HANDSHAKE_TIMEOUT),
    };
    let err = match conn.close_reason() {
        Some(ConnectionError::ApplicationClosed(close)) => AuthError::ClosedByPeer {
            code: close.error_code.into_inner(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        _ => {
            match &err {
                AuthError::Transport(TransportError::Frame(e @ FrameError::UnsupportedVersion(_))) => {
                    conn.close(VERSION_MISMATCH, e.to_string().as_bytes())
                }
                AuthError::Timeout(_) => conn.close(AUTH_FAILED, b"authentication timed out"),
                _ => conn.close(AUTH_FAILED, b"authentication failed"),
            }
            err
        }
    };
    tracing::warn!(peer = %conn.remote_address(), "{peer_role} authentication failed: {err}");
    Err(err)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::frame::{PROTOCOL_VERSION, encode_frame};

    const TEST_DEADLINE: Duration = Duration::from_secs(20);

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    fn key(s: &str) -> ClusterKey {
        ClusterKey::parse(s).expect("valid key")
    }

    /// A server endpoint on loopback and a connected (not yet authenticated) client/server pair.
    async fn connected_pair() -> (Endpoint, Endpoint, Connection, Connection) {
        let identity = NodeIdentity::generate("test worker").expect("identity");
        let server = server_endpoint(loopback(), &identity).expect("server endpoint");
        let addr = server.local_addr().expect("addr");
        let client = client_endpoint(loopback()).expect("client endpoint");
        let accept = async { server.accept().await.expect("incoming").await.expect("server side") };
        let (client_conn, server_conn) = tokio::join!(connect(&client, addr), accept);
        (server, client, client_conn.expect("client side"), server_conn)
    }

    #[tokio::test]
    async fn same_key_authenticates_and_exchanges_control() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            assert_eq!(
                channel_binding(&client_conn).expect("binding"),
                channel_binding(&server_conn).expect("binding")
            );
            let k = key("the same cluster key");
            let server_task = async {
                let (mut send, mut recv) = authenticate_server(&server_conn, &k).await.expect("server auth");
                let Control::Ping(token) = read_control(&mut recv).await.expect("read ping") else {
                    panic!("expected Ping")
                };
                write_control(&mut send, &Control::Pong(token)).await.expect("write pong");
                send.finish().expect("finish");
                assert!(matches!(read_frame(&mut recv, 16).await, Err(TransportError::Finished)));
            };
            let client_task = async {
                let (mut send, mut recv) = authenticate_client(&client_conn, &k).await.expect("client auth");
                write_control(&mut send, &Control::Ping(0xfeed)).await.expect("write ping");
                assert_eq!(read_control(&mut recv).await.expect("read pong"), Control::Pong(0xfeed));
                send.finish().expect("finish");
                assert!(matches!(read_frame(&mut recv, 16).await, Err(TransportError::Finished)));
            };
            tokio::join!(server_task, client_task);
        })
        .await
        .expect("test deadline");
    }

    #[tokio::test]
    async fn different_keys_close_with_reason() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            let (worker_key, intruder_key) = (key("the worker's cluster key"), key("an intruder's cluster key"));
            let (server_result, client_result) = tokio::join!(
                authenticate_server(&server_conn, &worker_key),
                authenticate_client(&client_conn, &intruder_key),
            );
            let server_err = server_result.expect_err("server must reject");
            assert!(matches!(server_err, AuthError::BadProof(crate::auth::Role::Client)), "{server_err}");
            match client_result.expect_err("client must fail") {
                AuthError::ClosedByPeer { code, reason } => {
                    assert_eq!((code, reason.as_str()), (AUTH_FAILED.into_inner(), "authentication failed"));
                }
                other => panic!("client error without the server's reason: {other}"),
            }
            assert!(matches!(server_conn.close_reason(), Some(ConnectionError::LocallyClosed)));
        })
        .await
        .expect("test deadline");
    }

    #[tokio::test]
    async fn other_protocol_version_is_closed_with_both_versions() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            let future_peer = async {
                let (mut send, _recv) = client_conn.open_bi().await.expect("open");
                let mut header = FrameHeader::new(FrameKind::Auth, PROOF_LEN).expect("header").to_bytes();
                header[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
                send.write_all(&header).await.expect("write");
                send.write_all(&[0; PROOF_LEN]).await.expect("write");
                client_conn.closed().await
            };
            let k = key("a valid cluster key");
            let (server_result, closed) = tokio::join!(authenticate_server(&server_conn, &k), future_peer);
            let err = server_result.expect_err("server must reject");
            assert!(err.to_string().contains("version 2, this build speaks 1"), "{err}");
            let ConnectionError::ApplicationClosed(close) = closed else { panic!("unexpected close: {closed}") };
            assert_eq!(close.error_code, VERSION_MISMATCH);
            assert_eq!(&close.reason[..], b"peer speaks moeshard protocol version 2, this build speaks 1");
        })
        .await
        .expect("test deadline");
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            let started = tokio::time::Instant::now();
            let k = key("a valid cluster key");
            let (server_result, closed) = tokio::join!(authenticate_server(&server_conn, &k), client_conn.closed());
            assert!(matches!(server_result, Err(AuthError::Timeout(_))));
            assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
            let ConnectionError::ApplicationClosed(close) = closed else { panic!("unexpected close: {closed}") };
            assert_eq!((close.error_code, &close.reason[..]), (AUTH_FAILED, &b"authentication timed out"[..]));
        })
        .await
        .expect("test deadline");
    }

    /// Sends `bytes` on a new client stream and finishes it; returns the server's end.
    async fn stream_with(client_conn: &Connection, server_conn: &Connection, bytes: &[u8]) -> RecvStream {
        let (mut send, _recv) = client_conn.open_bi().await.expect("open");
        send.write_all(bytes).await.expect("write");
        send.finish().expect("finish");
        server_conn.accept_bi().await.expect("accept").1
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_on_a_stream() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            let mut bytes = encode_frame(FrameKind::Control, &[1; 100]).expect("frame");
            bytes.extend_from_slice(&FrameHeader::new(FrameKind::Control, 50).expect("header").to_bytes());
            bytes.extend_from_slice(&[2; 10]);

            let mut recv = stream_with(&client_conn, &server_conn, &bytes).await;
            let err = read_frame(&mut recv, 99).await.expect_err("over the caller's maximum");
            assert!(matches!(err, TransportError::Frame(FrameError::Oversized { len: 100, max: 99 })), "{err}");

            let mut recv = stream_with(&client_conn, &server_conn, &bytes).await;
            assert_eq!(read_frame(&mut recv, 100).await.expect("first frame"), (FrameKind::Control, vec![1; 100]));
            let err = read_frame(&mut recv, 100).await.expect_err("truncated");
            assert!(matches!(err, TransportError::Frame(FrameError::Truncated { needed: 62, got: 22 })), "{err}");

            let mut recv = stream_with(&client_conn, &server_conn, &bytes[..5]).await;
            let err = read_frame(&mut recv, 100).await.expect_err("truncated header");
            assert!(matches!(err, TransportError::Frame(FrameError::Truncated { needed: 12, got: 5 })), "{err}");
        })
        .await
        .expect("test deadline");
    }

    #[tokio::test]
    async fn only_frame_reads_the_end_so_no_stop_sending_goes_back() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            let frame = encode_frame(FrameKind::PartialSums, &[3; 40]).expect("frame");
            let stop_sending_sent = || server_conn.stats().frame_tx.stop_sending;

            let mut recv = stream_with(&client_conn, &server_conn, &frame).await;
            assert_eq!(
                read_only_frame(&mut recv, 100).await.expect("the frame"),
                (FrameKind::PartialSums, vec![3; 40])
            );
            drop(recv);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(stop_sending_sent(), 0, "a stream read to its end is freed quietly");

            let mut recv = stream_with(&client_conn, &server_conn, &frame).await;
            read_frame(&mut recv, 100).await.expect("the frame");
            drop(recv);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(stop_sending_sent() >= 1, "a stream dropped before its end costs a STOP_SENDING");

            let mut trailing = frame.clone();
            trailing.push(0);
            let mut recv = stream_with(&client_conn, &server_conn, &trailing).await;
            let err = read_only_frame(&mut recv, 100).await.expect_err("a byte after the frame");
            assert!(matches!(err, TransportError::TrailingData), "{err}");
        })
        .await
        .expect("test deadline");
    }

    #[tokio::test]
    async fn a_hundred_round_trips_need_no_stream_credit_announcement() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            for i in 0..100u8 {
                let (mut send, mut recv) = client_conn.open_bi().await.expect("open");
                write_frame(&mut send, FrameKind::ExpertBatch, &[i; 64]).await.expect("batch");
                send.finish().expect("finish");
                let (mut answer, mut request) = server_conn.accept_bi().await.expect("accept");
                assert_eq!(read_only_frame(&mut request, 100).await.expect("batch").1, vec![i; 64]);
                write_frame(&mut answer, FrameKind::PartialSums, &[i; 32]).await.expect("answer");
                answer.finish().expect("finish");
                assert_eq!(read_only_frame(&mut recv, 100).await.expect("answer").1, vec![i; 32]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // quinn's default limit (100 streams) announces credit every 13 freed streams.
            assert_eq!(server_conn.stats().frame_tx.max_streams_bidi, 0);
        })
        .await
        .expect("test deadline");
    }

    #[tokio::test]
    async fn loopback_paths_discover_an_mtu_above_ethernet() {
        tokio::time::timeout(TEST_DEADLINE, async {
            let (_server, _client, client_conn, server_conn) = connected_pair().await;
            // Probes are acknowledged like any packet: keep both directions busy meanwhile.
            // The size of a decode answer's partial sums (2,304 f32), which must fit in one packet.
            const ANSWER: u16 = 9216;
            let mut mtus = (0, 0);
            while mtus.0 <= ANSWER || mtus.1 <= ANSWER {
                let (mut send, mut recv) = client_conn.open_bi().await.expect("open");
                write_frame(&mut send, FrameKind::ExpertBatch, &[1; 3000]).await.expect("batch");
                send.finish().expect("finish");
                let (mut answer, mut request) = server_conn.accept_bi().await.expect("accept");
                read_only_frame(&mut request, 1 << 20).await.expect("batch");
                write_frame(&mut answer, FrameKind::PartialSums, &[2; ANSWER as usize]).await.expect("answer");
                answer.finish().expect("finish");
                read_only_frame(&mut recv, 1 << 20).await.expect("answer");
                mtus = (client_conn.stats().path.current_mtu, server_conn.stats().path.current_mtu);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the MTU never grew past a decode answer's 9,216 bytes on loopback (MTU 65,536)");
    }
}
