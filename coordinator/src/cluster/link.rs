//! One authenticated QUIC connection to a worker: hello, expert assignment with weight
//! shipping, and data-plane round trips. Every wait has a deadline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use moeshard_protocol::auth::ClusterKey;
use moeshard_protocol::control::{Assignment, Capabilities, Control, Hello, MAX_CHUNK, WeightChunk};
use moeshard_protocol::data::{PartialSums, decode_partial_sums};
use moeshard_protocol::frame::{FrameKind, HEADER_LEN, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION};
use moeshard_protocol::transport::{
    authenticate_client, connect, read_control, read_only_frame, write_control, write_frame,
};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::Mutex;
use tokio::time::timeout;

/// Deadline of a control-plane answer (hello, ping, need, stats).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The slowest rate, in bytes per second, at which a worker is expected to read and hash weight
/// blobs (its disk cache, a `--model` copy, or blobs just received): an assignment's deadlines
/// grow by one second per this many bytes.
const VERIFY_BYTES_PER_SEC: u64 = 20 << 20;

/// Where shipped weights come from: the bytes of a blob, by its offset and length in the model
/// file the coordinator has mapped.
pub trait BlobSource: Sync {
    /// `len` bytes at `offset` of the model file.
    fn bytes(&self, offset: u64, len: u64) -> &[u8];
}

/// An expert batch sent to a worker, its answer not yet read.
pub struct SentBatch {
    recv: RecvStream,
    addr: SocketAddr,
    bytes_out: u64,
}

impl SentBatch {
    /// The second half of a round trip: reads the worker's `PartialSums` (decoded and validated)
    /// from the batch's stream. Returns them with the bytes sent and received (frame headers
    /// included). Fails when they have not arrived by `deadline`.
    pub async fn reply(mut self, deadline: Instant) -> anyhow::Result<(PartialSums, u64, u64)> {
        let exchange = async {
            let (kind, payload) = read_only_frame(&mut self.recv, MAX_FRAME_PAYLOAD).await?;
            if kind != FrameKind::PartialSums {
                bail!("expected partial sums, got a {kind:?} frame");
            }
            let sums = decode_partial_sums(&payload)?;
            Ok((sums, self.bytes_out, (HEADER_LEN + payload.len()) as u64))
        };
        match tokio::time::timeout_at(deadline.into(), exchange).await {
            Ok(r) => r.with_context(|| format!("worker {}", self.addr)),
            Err(_) => bail!("worker {}: no partial sums by the batch's deadline", self.addr),
        }
    }
}

/// A connected, authenticated worker.
pub struct WorkerLink {
    /// The worker's address.
    pub addr: SocketAddr,
    /// The worker's hello (node id, name, capabilities).
    pub hello: Hello,
    /// Smallest of three control-stream ping round trips measured at connection.
    pub rtt: Duration,
    conn: Connection,
    control: Mutex<(SendStream, RecvStream)>,
}

impl WorkerLink {
    /// Connects, authenticates with `key` and exchanges hellos. Fails (and the worker is not
    /// used) when the worker does not prove it holds the same key.
    pub async fn connect(endpoint: &Endpoint, addr: SocketAddr, key: &ClusterKey, ours: Hello) -> anyhow::Result<Self> {
        let conn = connect(endpoint, addr).await.with_context(|| format!("worker {addr}: connecting"))?;
        let (mut send, mut recv) =
            authenticate_client(&conn, key).await.with_context(|| format!("worker {addr}: authentication"))?;
        write_control(&mut send, &Control::Hello(ours)).await?;
        let hello = match timeout(CONTROL_TIMEOUT, read_control(&mut recv)).await {
            Ok(Ok(Control::Hello(h))) => h,
            Ok(Ok(other)) => bail!("worker {addr}: expected a hello, got {other:?}"),
            Ok(Err(e)) => bail!("worker {addr}: reading its hello: {e}"),
            Err(_) => bail!("worker {addr}: no hello within {CONTROL_TIMEOUT:?}"),
        };
        if hello.protocol != PROTOCOL_VERSION {
            bail!("worker {addr} speaks protocol {} and this coordinator {PROTOCOL_VERSION}", hello.protocol);
        }
        let mut link = WorkerLink { addr, hello, rtt: Duration::MAX, conn, control: Mutex::new((send, recv)) };
        for _ in 0..3 {
            link.rtt = link.rtt.min(link.ping().await?);
        }
        Ok(link)
    }

    /// The name to show and to use in placement files: the worker's `--name`.
    pub fn name(&self) -> &str {
        &self.hello.name
    }

    /// The worker's capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.hello.capabilities
    }

    /// Sends a control request and waits for its answer.
    async fn request(&self, msg: &Control, deadline: Duration) -> anyhow::Result<Control> {
        let mut guard = self.control.lock().await;
        let (send, recv) = &mut *guard;
        write_control(send, msg).await?;
        match timeout(deadline, read_control(recv)).await {
            Ok(Ok(Control::Error(e))) => bail!("worker {}: {e}", self.addr),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => bail!("worker {}: {e}", self.addr),
            Err(_) => bail!("worker {}: no answer within {deadline:?}", self.addr),
        }
    }

    /// Round-trip time of a ping on the control stream.
    pub async fn ping(&self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let token = rand::random::<u64>();
        match self.request(&Control::Ping(token), CONTROL_TIMEOUT).await? {
            Control::Pong(t) if t == token => Ok(start.elapsed()),
            other => bail!("worker {}: expected pong {token}, got {other:?}", self.addr),
        }
    }

    /// Assigns experts and ships the blobs the worker lacks. Returns the bytes shipped.
    pub async fn assign(&self, assignment: Assignment, source: &dyn BlobSource) -> anyhow::Result<u64> {
        let blobs: Vec<_> =
            assignment.shards.iter().flat_map(|s| [s.gate.clone(), s.up.clone(), s.down.clone()]).collect();
        // The worker reads and hashes whatever its cache or `--model` copy holds before it
        // answers: time proportional to the bytes assigned.
        let assigned: u64 = blobs.iter().map(|b| b.len).sum();
        let deadline = CONTROL_TIMEOUT + Duration::from_secs(assigned / VERIFY_BYTES_PER_SEC);
        let need = match self.request(&Control::Assign(assignment), deadline).await? {
            Control::Need(hashes) => hashes,
            other => bail!("worker {}: expected the blobs it needs, got {other:?}", self.addr),
        };
        let mut shipped = 0u64;
        let mut guard = self.control.lock().await;
        let (send, recv) = &mut *guard;
        for hash in &need {
            let blob = blobs
                .iter()
                .find(|b| &b.hash == hash)
                .with_context(|| format!("worker {} asked for a blob that is not in its assignment", self.addr))?;
            let bytes = source.bytes(blob.file_offset, blob.len);
            for (i, chunk) in bytes.chunks(MAX_CHUNK).enumerate() {
                let msg = Control::Chunk(WeightChunk {
                    hash: *hash,
                    offset: (i * MAX_CHUNK) as u64,
                    total: blob.len,
                    data: chunk.to_vec(),
                });
                write_control(send, &msg).await?;
                shipped += chunk.len() as u64;
            }
        }
        // Verifying and writing the cache takes time proportional to the bytes shipped.
        let deadline = CONTROL_TIMEOUT + Duration::from_secs(shipped / VERIFY_BYTES_PER_SEC);
        match timeout(deadline, read_control(recv)).await {
            Ok(Ok(Control::Ready { .. })) => Ok(shipped),
            Ok(Ok(Control::Error(e))) => bail!("worker {}: {e}", self.addr),
            Ok(Ok(other)) => bail!("worker {}: expected ready, got {other:?}", self.addr),
            Ok(Err(e)) => bail!("worker {}: {e}", self.addr),
            Err(_) => bail!("worker {}: not ready within {deadline:?}", self.addr),
        }
    }

    /// The worker's own counters.
    pub async fn remote_stats(&self) -> anyhow::Result<moeshard_protocol::control::WorkerStats> {
        match self.request(&Control::GetStats, CONTROL_TIMEOUT).await? {
            Control::Stats(s) => Ok(s),
            other => bail!("worker {}: expected stats, got {other:?}", self.addr),
        }
    }

    /// The first half of a data-plane round trip: opens a fresh stream and sends the encoded
    /// `ExpertBatch` in one frame, the stream finished after it; [`SentBatch::reply`] is the
    /// second half. Fails when that has not happened by `deadline` (the stream limit reached, or
    /// flow control blocked).
    pub async fn send_batch(&self, batch: &[u8], deadline: Instant) -> anyhow::Result<SentBatch> {
        let send = async {
            let (mut send, recv) = self.conn.open_bi().await?;
            write_frame(&mut send, FrameKind::ExpertBatch, batch).await?;
            send.finish()?;
            anyhow::Ok(recv)
        };
        match tokio::time::timeout_at(deadline.into(), send).await {
            Ok(recv) => {
                let recv = recv.with_context(|| format!("worker {}", self.addr))?;
                Ok(SentBatch { recv, addr: self.addr, bytes_out: (HEADER_LEN + batch.len()) as u64 })
            }
            Err(_) => bail!("worker {}: could not send an expert batch by its deadline", self.addr),
        }
    }

    /// Closes the connection, telling the worker `why` (it keeps its cached experts). Streams
    /// still open are reset: nothing more is read from this connection.
    pub fn close(&self, why: &str) {
        self.conn.close(0u32.into(), why.as_bytes());
    }

    /// Resolves when the connection is closed, by either side or by the QUIC idle timeout, with
    /// the reason.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }
}
