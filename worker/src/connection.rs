//! One coordinator session on one QUIC connection.
//!
//! Order of events (the coordinator is the QUIC client):
//! 1. [`authenticate_server`] on the connection's first bidirectional stream, which then carries
//!    the control messages;
//! 2. coordinator -> `Hello`, worker -> `Hello` (within [`HELLO_TIMEOUT`]);
//! 3. the control loop: `Assign` is answered with `Error` (refused: bad shapes or types, over the
//!    memory budget; the session stays open) or `Need(hashes)`; the coordinator then sends the
//!    needed blobs as `Chunk`s in order (each within [`CHUNK_TIMEOUT`] of the previous); once
//!    none is outstanding (at once after an empty `Need`) the worker sends `Ready`. The previous
//!    assignment serves batches until then. `Ping` -> `Pong`, `GetStats` -> `Stats` (counters of
//!    this session), `Drain` -> in-flight batches finish, then the connection closes with code 0;
//! 4. concurrently, every further bidirectional stream the coordinator opens carries one
//!    `ExpertBatch` frame, answered on the same stream with one `PartialSums` frame.
//!
//! Anything malformed from the peer (frame, message, unexpected message kind, a route to an expert
//! not held, a chunk nobody asked for) closes this connection with [`PROTOCOL_ERROR`] and a
//! reason; a received blob that does not match its hash is answered with `Control::Error` first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moeshard_protocol::control::{Assignment, BlobHash, Control, WeightChunk, WorkerStats};
use moeshard_protocol::frame::{FrameError, FrameKind, HEADER_LEN, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION};
use moeshard_protocol::transport::{
    HANDSHAKE_TIMEOUT, PROTOCOL_ERROR, TransportError, VERSION_MISMATCH, authenticate_server, read_control,
    read_only_frame, write_control, write_frame,
};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::assignment::{HeldExperts, Plan};
use crate::compute::run_batch;
use crate::hex;
use crate::node::Node;
use crate::store::Blob;

/// Deadline for the coordinator's `Hello` after authentication.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline for each weight chunk while blobs are outstanding.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for the expert-batch frame on a newly opened batch stream.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the end of a session waits for in-flight batches.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Application close code of a session that ended normally.
pub const CLOSED: VarInt = VarInt::from_u32(0);

/// How long a final `Control::Error` gets to reach the coordinator before the connection closes.
const ERROR_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one incoming connection until it ends. Failures are logged, never returned: the
/// worker keeps serving other connections whatever this one does.
pub async fn serve(incoming: quinn::Incoming, node: Arc<Node>) {
    let peer = incoming.remote_address();
    let conn = match timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => {
            tracing::debug!(%peer, "QUIC handshake failed: {err}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "QUIC handshake timed out");
            return;
        }
    };
    // On failure this closes the connection with AUTH_FAILED and a reason, and logs a warning
    // naming the peer.
    let Ok((send, recv)) = authenticate_server(&conn, &node.key).await else { return };
    let (held, _) = watch::channel(None);
    let session = Session { conn, peer, node, held, counters: Arc::new(Counters::default()) };
    session.run(send, recv).await;
}

/// How a session ends.
enum End {
    /// The coordinator drained, finished the control stream, or the stream or connection failed
    /// under it: in-flight batches finish, then the connection closes with [`CLOSED`] (a no-op
    /// when it is already gone).
    Graceful(String),
    /// The coordinator broke the protocol: the connection closes at once with [`PROTOCOL_ERROR`].
    Protocol(String),
    /// The coordinator speaks another protocol version: closes with [`VERSION_MISMATCH`].
    Version(String),
}

impl End {
    /// The end a failed read or write of the peer's stream means.
    fn from_transport(err: TransportError) -> Self {
        match err {
            TransportError::Frame(FrameError::UnsupportedVersion(_)) => End::Version(err.to_string()),
            TransportError::Frame(_)
            | TransportError::Control(_)
            | TransportError::UnexpectedKind { .. }
            | TransportError::TrailingData => End::Protocol(err.to_string()),
            TransportError::Finished => End::Graceful("the coordinator finished the stream".to_owned()),
            other => End::Graceful(other.to_string()),
        }
    }
}

/// Data-plane counters of one session (see `WorkerStats`).
#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    tokens: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    compute_us: AtomicU64,
}

/// The state of one authenticated session.
struct Session {
    conn: Connection,
    peer: SocketAddr,
    node: Arc<Node>,
    /// The experts of the last assignment that became ready; batches use it.
    held: watch::Sender<Option<Arc<HeldExperts>>>,
    counters: Arc<Counters>,
}

/// An assignment whose blobs are being received.
struct Loading {
    model_id: [u8; 32],
    plan: Plan,
    present: HashMap<BlobHash, Arc<Blob>>,
    pending: HashMap<BlobHash, PendingBlob>,
}

/// A needed blob: its announced length in bytes and the bytes received so far.
struct PendingBlob {
    len: u64,
    bytes: Vec<u8>,
}

impl Session {
    async fn run(self, send: SendStream, recv: RecvStream) {
        let (drain_tx, drain_rx) = watch::channel(false);
        let batches = self.batch_streams(drain_rx);
        let control = async {
            let end = self.control(send, recv).await;
            match &end {
                End::Protocol(reason) => self.close(PROTOCOL_ERROR, reason),
                End::Version(reason) => self.close(VERSION_MISMATCH, reason),
                End::Graceful(reason) => tracing::info!(peer = %self.peer, "session ending: {reason}"),
            }
            let _ = drain_tx.send(true);
            end
        };
        let ((), end) = tokio::join!(batches, control);
        if let End::Graceful(reason) = end {
            self.conn.close(CLOSED, reason.as_bytes());
        }
    }

    fn close(&self, code: VarInt, reason: &str) {
        tracing::warn!(peer = %self.peer, "closing the session: {reason}");
        self.conn.close(code, reason.as_bytes());
    }

    /// The Hello exchange, then control messages until the session ends.
    async fn control(&self, mut send: SendStream, mut recv: RecvStream) -> End {
        let hello = match timeout(HELLO_TIMEOUT, read_control(&mut recv)).await {
            Err(_) => return End::Protocol(format!("no Hello within {HELLO_TIMEOUT:?}")),
            Ok(Err(err)) => return End::from_transport(err),
            Ok(Ok(Control::Hello(hello))) => hello,
            Ok(Ok(other)) => return End::Protocol(format!("expected Hello, got {}", name(&other))),
        };
        if hello.protocol != PROTOCOL_VERSION {
            return End::Version(format!(
                "the coordinator speaks moeshard protocol version {}, this worker speaks {PROTOCOL_VERSION}",
                hello.protocol
            ));
        }
        tracing::info!(
            peer = %self.peer, coordinator = %hello.name, node = %hello.node_id, version = %hello.version,
            "coordinator connected"
        );
        if let Err(err) = write_control(&mut send, &Control::Hello(self.node.hello())).await {
            return End::from_transport(err);
        }
        let mut loading = None;
        loop {
            let outstanding = loading.as_ref().is_some_and(|l: &Loading| !l.pending.is_empty());
            let read = if outstanding {
                match timeout(CHUNK_TIMEOUT, read_control(&mut recv)).await {
                    Ok(read) => read,
                    Err(_) => return End::Protocol(format!("no weight chunk within {CHUNK_TIMEOUT:?}")),
                }
            } else {
                read_control(&mut recv).await
            };
            let msg = match read {
                Ok(msg) => msg,
                Err(err) => return End::from_transport(err),
            };
            let handled = match msg {
                Control::Assign(assignment) => self.assign(&mut send, assignment, &mut loading).await,
                Control::Chunk(chunk) => self.chunk(&mut send, chunk, &mut loading).await,
                Control::Ping(token) => reply(&mut send, Control::Pong(token)).await,
                Control::GetStats => reply(&mut send, Control::Stats(self.stats())).await,
                Control::Drain => return End::Graceful("drained".to_owned()),
                Control::Error(text) => {
                    tracing::warn!(peer = %self.peer, "the coordinator reports: {text}");
                    Ok(())
                }
                other => Err(End::Protocol(format!("unexpected {} message from the coordinator", name(&other)))),
            };
            if let Err(end) = handled {
                return end;
            }
        }
    }

    /// Checks an assignment, looks up its blobs, answers `Need` (and `Ready` if nothing is
    /// missing), or `Error` when it is refused.
    async fn assign(
        &self,
        send: &mut SendStream,
        assignment: Assignment,
        loading: &mut Option<Loading>,
    ) -> Result<(), End> {
        *loading = None;
        let plan = match Plan::new(&assignment) {
            Ok(plan) => plan,
            Err(err) => return self.refuse_assignment(send, format!("assignment refused: {err}")).await,
        };
        if plan.bytes() > self.node.mem_budget {
            let text =
                format!("assignment needs {} bytes, the memory budget is {}", plan.bytes(), self.node.mem_budget);
            return self.refuse_assignment(send, text).await;
        }
        let node = Arc::clone(&self.node);
        let blobs = plan.blobs().to_vec();
        let found = tokio::task::spawn_blocking(move || node.store.find_all(&blobs, node.cores as usize))
            .await
            .map_err(|err| End::Protocol(format!("worker error looking up blobs: {err}")))?;

        let (mut present, mut pending, mut need) = (HashMap::new(), HashMap::new(), Vec::new());
        for (blob, found) in plan.blobs().iter().zip(found) {
            match found {
                Some(held) => {
                    present.insert(blob.hash, held);
                }
                None => {
                    need.push(blob.hash);
                    pending.insert(blob.hash, PendingBlob { len: blob.len, bytes: Vec::new() });
                }
            }
        }
        let need_bytes: u64 = pending.values().map(|p| p.len).sum();
        tracing::info!(
            peer = %self.peer, model = %hex(&assignment.model_id[..8]),
            "assignment of {} experts, {} bytes: {} blobs ({need_bytes} bytes) to receive",
            assignment.shards.len(), plan.bytes(), need.len()
        );
        reply(send, Control::Need(need)).await?;
        *loading = Some(Loading { model_id: assignment.model_id, plan, present, pending });
        self.ready_if_complete(send, loading).await
    }

    async fn refuse_assignment(&self, send: &mut SendStream, text: String) -> Result<(), End> {
        tracing::warn!(peer = %self.peer, "{text}");
        reply(send, Control::Error(text)).await
    }

    /// Appends a chunk to its blob; a complete blob is verified, cached and kept.
    async fn chunk(&self, send: &mut SendStream, chunk: WeightChunk, loading: &mut Option<Loading>) -> Result<(), End> {
        let hash = chunk.hash;
        let Some(current) = loading.as_mut() else {
            return Err(End::Protocol("weight chunk without an assignment".to_owned()));
        };
        let Some(blob) = current.pending.get_mut(&hash) else {
            return Err(End::Protocol(format!("weight chunk for blob {} that was not requested", hex(&hash))));
        };
        let received = blob.bytes.len() as u64;
        if chunk.total != blob.len || chunk.offset != received {
            return Err(End::Protocol(format!(
                "weight chunk at offset {} of a {}-byte blob {}, expected offset {received} of {} bytes",
                chunk.offset,
                chunk.total,
                hex(&hash),
                blob.len
            )));
        }
        if blob.bytes.is_empty() {
            blob.bytes.reserve_exact(usize::try_from(blob.len).unwrap_or(0));
        }
        blob.bytes.extend_from_slice(&chunk.data);
        if (blob.bytes.len() as u64) < blob.len {
            return Ok(());
        }
        let Some(PendingBlob { bytes, .. }) = current.pending.remove(&hash) else { return Ok(()) };
        let node = Arc::clone(&self.node);
        let stored = tokio::task::spawn_blocking(move || {
            (blake3::hash(&bytes).as_bytes() == &hash).then(|| node.store.insert(hash, bytes))
        })
        .await
        .map_err(|err| End::Protocol(format!("worker error storing a blob: {err}")))?;
        match stored {
            Some(blob) => current.present.insert(hash, blob),
            None => return Err(refuse(send, format!("received blob {} does not match its hash", hex(&hash))).await),
        };
        self.ready_if_complete(send, loading).await
    }

    /// When no blob is outstanding: makes the loaded experts the session's and sends `Ready`.
    async fn ready_if_complete(&self, send: &mut SendStream, loading: &mut Option<Loading>) -> Result<(), End> {
        if loading.as_ref().is_none_or(|l| !l.pending.is_empty()) {
            return Ok(());
        }
        let Some(done) = loading.take() else { return Ok(()) };
        let Some(held) = done.plan.hold(&done.present) else {
            return Err(refuse(send, "worker error: the received blobs do not fit the assignment".to_owned()).await);
        };
        let (experts, bytes) = (held.count() as u32, held.bytes());
        self.held.send_replace(Some(Arc::new(held)));
        tracing::info!(peer = %self.peer, model = %hex(&done.model_id[..8]), "ready: {experts} experts, {bytes} bytes");
        reply(send, Control::Ready { experts, bytes }).await
    }

    fn stats(&self) -> WorkerStats {
        let c = &self.counters;
        WorkerStats {
            batches: c.batches.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            compute_us: c.compute_us.load(Ordering::Relaxed),
            experts: self.held.borrow().as_ref().map_or(0, |h| h.count() as u32),
        }
    }

    /// Accepts batch streams until the connection closes or `drain` turns true, then waits (at
    /// most [`DRAIN_TIMEOUT`]) for the batches in flight.
    async fn batch_streams(&self, mut drain: watch::Receiver<bool>) {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let stream = BatchStream {
                            conn: self.conn.clone(),
                            peer: self.peer,
                            node: Arc::clone(&self.node),
                            held: self.held.subscribe(),
                            counters: Arc::clone(&self.counters),
                        };
                        tasks.spawn(stream.serve(send, recv));
                    }
                    Err(_) => break,
                },
                _ = drain.wait_for(|drained| *drained) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        let in_flight = async { while tasks.join_next().await.is_some() {} };
        if timeout(DRAIN_TIMEOUT, in_flight).await.is_err() {
            tracing::warn!(peer = %self.peer, "expert batches still running after {DRAIN_TIMEOUT:?} are abandoned");
        }
    }
}

/// One batch stream and what answering it needs.
struct BatchStream {
    conn: Connection,
    peer: SocketAddr,
    node: Arc<Node>,
    held: watch::Receiver<Option<Arc<HeldExperts>>>,
    counters: Arc<Counters>,
}

impl BatchStream {
    async fn serve(self, send: SendStream, recv: RecvStream) {
        match self.answer(send, recv).await {
            Ok(()) => {}
            Err(End::Protocol(reason)) => {
                tracing::warn!(peer = %self.peer, "closing the session: {reason}");
                self.conn.close(PROTOCOL_ERROR, reason.as_bytes());
            }
            Err(End::Version(reason)) => {
                tracing::warn!(peer = %self.peer, "closing the session: {reason}");
                self.conn.close(VERSION_MISMATCH, reason.as_bytes());
            }
            Err(End::Graceful(reason)) => tracing::debug!(peer = %self.peer, "expert batch stream ended: {reason}"),
        }
    }

    /// Reads one expert batch, computes it on the node's pool, writes the partial sums.
    async fn answer(&self, mut send: SendStream, mut recv: RecvStream) -> Result<(), End> {
        let (kind, payload) = match timeout(BATCH_TIMEOUT, read_only_frame(&mut recv, MAX_FRAME_PAYLOAD)).await {
            Err(_) => return Err(End::Protocol(format!("no expert batch within {BATCH_TIMEOUT:?} on an open stream"))),
            Ok(Err(TransportError::Finished)) => {
                return Err(End::Protocol("a batch stream ended without an expert batch".to_owned()));
            }
            Ok(read) => read.map_err(End::from_transport)?,
        };
        if kind != FrameKind::ExpertBatch {
            return Err(End::Protocol(format!("expected an ExpertBatch frame on a batch stream, got {kind:?}")));
        }
        let Some(held) = self.held.borrow().clone() else {
            return Err(End::Protocol("an expert batch arrived before any assignment was ready".to_owned()));
        };
        let bytes_in = HEADER_LEN + payload.len();
        let started = Instant::now();
        // On this thread, which is the pool's thread 0 and the runtime's only one: the batch starts
        // as soon as its frame is read, with no hand-off to another thread and none back.
        let answer = catch_unwind(AssertUnwindSafe(|| self.node.pool.install(|| run_batch(&held, &payload))))
            .map_err(|_| End::Protocol("worker error computing a batch: the kernel panicked".to_owned()))?
            .map_err(|err| End::Protocol(err.to_string()))?;
        let compute_us = started.elapsed().as_micros() as u64;
        write_frame(&mut send, FrameKind::PartialSums, &answer.payload).await.map_err(End::from_transport)?;
        send.finish().map_err(|err| End::Graceful(err.to_string()))?;

        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.tokens.fetch_add(u64::from(answer.tokens), Ordering::Relaxed);
        c.bytes_in.fetch_add(bytes_in as u64, Ordering::Relaxed);
        c.bytes_out.fetch_add((HEADER_LEN + answer.payload.len()) as u64, Ordering::Relaxed);
        c.compute_us.fetch_add(compute_us, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes one control message.
async fn reply(send: &mut SendStream, msg: Control) -> Result<(), End> {
    write_control(send, &msg).await.map_err(End::from_transport)
}

/// Sends `Control::Error(text)`, gives it [`ERROR_FLUSH_TIMEOUT`] to arrive, and ends the session
/// with a protocol error carrying the same text.
async fn refuse(send: &mut SendStream, text: String) -> End {
    if write_control(send, &Control::Error(text.clone())).await.is_ok() && send.finish().is_ok() {
        let _ = timeout(ERROR_FLUSH_TIMEOUT, send.stopped()).await;
    }
    End::Protocol(text)
}

/// The message's variant name, for log lines and close reasons.
fn name(msg: &Control) -> &'static str {
    match msg {
        Control::Hello(_) => "Hello",
        Control::Assign(_) => "Assign",
        Control::Need(_) => "Need",
        Control::Chunk(_) => "Chunk",
        Control::Ready { .. } => "Ready",
        Control::Ping(_) => "Ping",
        Control::Pong(_) => "Pong",
        Control::GetStats => "GetStats",
        Control::Stats(_) => "Stats",
        Control::Drain => "Drain",
        Control::Error(_) => "Error",
    }
}
