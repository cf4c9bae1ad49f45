//! Shared helpers: a spawned worker process, a protocol-level test client, temporary
//! directories and a small synthetic MoE layer.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use moeshard_kernels::matmul::QMatrix;
use moeshard_kernels::moe::{ExpertFfn, QuantizedInputs, Route, grouped_expert_ffn};
use moeshard_kernels::quant::{GgmlType, VecDotType};
use moeshard_protocol::auth::{AuthError, ClusterKey};
use moeshard_protocol::control::{
    Assignment, BlobHash, Capabilities, Control, ExpertShard, Hello, TensorBlob, WeightChunk,
};
use moeshard_protocol::data::{ActivationRows, ExpertBatch, PartialSums, WireRoute, decode_partial_sums};
use moeshard_protocol::frame::{FrameKind, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION};
use moeshard_protocol::transport::{
    authenticate_client, client_endpoint, connect, read_control, read_frame, write_control, write_frame,
};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The cluster key the test workers use.
pub const KEY: &str = "the moeshard worker test cluster key";

/// Deadline of one test's whole async part.
pub const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// Deadline of one answer from the worker.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(30);

/// Deadline for a spawned worker to print its listening line.
const START_DEADLINE: Duration = Duration::from_secs(60);

pub fn key() -> ClusterKey {
    ClusterKey::parse(KEY).expect("test key")
}

/// The Hello of the test coordinator.
pub fn coordinator_hello() -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        node_id: "test-coordinator".into(),
        name: "test".into(),
        version: "0.0.0".into(),
        capabilities: Capabilities { cores: 1, mem_budget: 0, backends: vec!["cpu".into()], gemv_gbps: 0.0 },
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("moeshard-worker-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `moeshard-worker` process, killed on drop.
pub struct Worker {
    child: Child,
    pub addr: SocketAddr,
    pub node_id: String,
    pub cluster: String,
}

impl Worker {
    /// Starts the worker binary with the test key, `--cache-dir cache` and `extra` arguments, and
    /// waits for its listening line.
    pub fn spawn(cache: &Path, extra: &[&str]) -> Worker {
        let mut command = Command::new(env!("CARGO_BIN_EXE_moeshard-worker"));
        command.args(["--cluster-key", KEY, "--threads", "2", "--cache-dir"]).arg(cache).args(extra);
        Worker::start(command)
    }

    /// Starts `command` (the worker binary with its arguments) and waits for its listening line.
    pub fn start(mut command: Command) -> Worker {
        command.env("MOESHARD_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = command.spawn().expect("spawn moeshard-worker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(START_DEADLINE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("the worker printed no listening line within {START_DEADLINE:?}");
            }
        };
        let mut worker = Worker {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            node_id: String::new(),
            cluster: String::new(),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["listening", "on", addr, "node", node, "cluster", cluster] => {
                worker.addr = addr.parse().expect("bound address");
                worker.node_id = node.to_owned();
                worker.cluster = cluster.to_owned();
            }
            _ => panic!("unexpected first line from the worker: {line:?}"),
        }
        worker
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The worker's address as a client on loopback reaches it.
    pub fn connect_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.addr.port()))
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -TERM failed");
        wait_with_deadline(&mut self.child, Duration::from_secs(20))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit, killing it and failing the test after `deadline`.
pub fn wait_with_deadline(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child process did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A protocol-level coordinator stand-in, authenticated, with its control stream.
pub struct Client {
    _endpoint: Endpoint,
    pub conn: Connection,
    pub send: SendStream,
    pub recv: RecvStream,
}

impl Client {
    /// Connects and authenticates with `key`.
    pub async fn connect_with(addr: SocketAddr, key: &ClusterKey) -> Result<Client, AuthError> {
        let endpoint = client_endpoint(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("client endpoint");
        let conn = connect(&endpoint, addr).await.expect("QUIC connect");
        let (send, recv) = authenticate_client(&conn, key).await?;
        Ok(Client { _endpoint: endpoint, conn, send, recv })
    }

    /// Connects with the test key and exchanges Hellos; returns the worker's.
    pub async fn start(addr: SocketAddr) -> (Client, Hello) {
        let mut client = Client::connect_with(addr, &key()).await.expect("authenticate");
        let hello = Control::Hello(coordinator_hello());
        let Control::Hello(worker_hello) = client.call(&hello).await else { panic!("expected the worker's Hello") };
        (client, worker_hello)
    }

    pub async fn send(&mut self, msg: &Control) {
        write_control(&mut self.send, msg).await.expect("write control");
    }

    pub async fn receive(&mut self) -> Control {
        tokio::time::timeout(REPLY_DEADLINE, read_control(&mut self.recv))
            .await
            .expect("worker reply deadline")
            .expect("read control")
    }

    /// Sends `msg` and returns the next control message.
    pub async fn call(&mut self, msg: &Control) -> Control {
        self.send(msg).await;
        self.receive().await
    }

    /// Ping round trip: the session is alive.
    pub async fn assert_alive(&mut self) {
        assert_eq!(self.call(&Control::Ping(77)).await, Control::Pong(77));
    }

    /// Assigns `shards` and ships every blob the worker says it needs; returns (needed hashes,
    /// Ready's experts and bytes).
    pub async fn assign(&mut self, layer: &Layer, shards: Vec<ExpertShard>) -> (Vec<BlobHash>, u32, u64) {
        let Control::Need(need) = self.call(&Control::Assign(Assignment { model_id: [9; 32], shards })).await else {
            panic!("expected Need")
        };
        for hash in &need {
            let bytes = layer.blob_bytes(hash).expect("the worker needs a blob of the assignment");
            for (i, piece) in bytes.chunks(1000).enumerate() {
                let chunk = WeightChunk {
                    hash: *hash,
                    offset: (i * 1000) as u64,
                    total: bytes.len() as u64,
                    data: piece.to_vec(),
                };
                self.send(&Control::Chunk(chunk)).await;
            }
        }
        match self.receive().await {
            Control::Ready { experts, bytes } => (need, experts, bytes),
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    /// Sends one expert batch on a new stream and reads the partial sums.
    pub async fn batch(&self, batch: &ExpertBatch) -> PartialSums {
        let (mut send, mut recv) = self.conn.open_bi().await.expect("open batch stream");
        write_frame(&mut send, FrameKind::ExpertBatch, &batch.encode().expect("encode batch")).await.expect("write");
        send.finish().expect("finish");
        let (kind, payload) = tokio::time::timeout(REPLY_DEADLINE, read_frame(&mut recv, MAX_FRAME_PAYLOAD))
            .await
            .expect("partial sums deadline")
            .expect("read partial sums");
        assert_eq!(kind, FrameKind::PartialSums);
        decode_partial_sums(&payload).expect("valid partial sums")
    }

    /// Waits (bounded) for the connection to close and returns why.
    pub async fn closed(&self) -> ConnectionError {
        tokio::time::timeout(REPLY_DEADLINE, self.conn.closed()).await.expect("the worker did not close the connection")
    }
}

/// One synthetic expert: gate and up `[N_FF, N_EMBD]` Q8_0, down `[N_EMBD, N_FF]` F32.
pub struct Expert {
    pub gate: Vec<u8>,
    pub up: Vec<u8>,
    pub down: Vec<u8>,
}

pub const N_EMBD: usize = 64;
pub const N_FF: usize = 32;
pub const LAYER: u32 = 5;

/// A synthetic MoE layer, and the "model file" holding its blobs at known offsets.
pub struct Layer {
    pub experts: Vec<Expert>,
    /// `[junk header][expert 0 gate][up][down][expert 1 gate]...`
    pub file: Vec<u8>,
    offsets: Vec<[u64; 3]>,
}

const FILE_HEADER: usize = 4096;

fn q8_0_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<u8> {
    let row_bytes = VecDotType::Q8_0.row_bytes(cols);
    let mut out = vec![0u8; rows * row_bytes];
    for row in out.chunks_exact_mut(row_bytes) {
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-0.5..0.5)).collect();
        VecDotType::Q8_0.quantize_row(&x, row);
    }
    out
}

fn f32_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<u8> {
    (0..rows * cols).flat_map(|_| rng.random_range(-0.5f32..0.5).to_le_bytes()).collect()
}

impl Layer {
    pub fn new(n_experts: usize, seed: u64) -> Layer {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let experts: Vec<Expert> = (0..n_experts)
            .map(|_| Expert {
                gate: q8_0_matrix(&mut rng, N_FF, N_EMBD),
                up: q8_0_matrix(&mut rng, N_FF, N_EMBD),
                down: f32_matrix(&mut rng, N_EMBD, N_FF),
            })
            .collect();
        let mut file: Vec<u8> = (0..FILE_HEADER).map(|i| (i * 31) as u8).collect();
        let mut offsets = Vec::new();
        for e in &experts {
            let mut at = [0u64; 3];
            for (slot, bytes) in at.iter_mut().zip([&e.gate, &e.up, &e.down]) {
                *slot = file.len() as u64;
                file.extend_from_slice(bytes);
            }
            offsets.push(at);
        }
        Layer { experts, file, offsets }
    }

    fn matrices(e: &Expert) -> [(GgmlType, usize, usize, &[u8]); 3] {
        [
            (GgmlType::Q8_0, N_FF, N_EMBD, &e.gate),
            (GgmlType::Q8_0, N_FF, N_EMBD, &e.up),
            (GgmlType::F32, N_EMBD, N_FF, &e.down),
        ]
    }

    /// The shard message of expert `e`.
    pub fn shard(&self, e: u32) -> ExpertShard {
        let expert = &self.experts[e as usize];
        let [gate, up, down] = Layer::matrices(expert).map(|(ty, rows, cols, bytes)| TensorBlob {
            ggml_type: ty.ggml_id(),
            rows: rows as u32,
            cols: cols as u32,
            hash: *blake3::hash(bytes).as_bytes(),
            len: bytes.len() as u64,
            file_offset: 0,
        });
        let [g, u, d] = self.offsets[e as usize];
        ExpertShard {
            layer: LAYER,
            expert: e,
            gate: TensorBlob { file_offset: g, ..gate },
            up: TensorBlob { file_offset: u, ..up },
            down: TensorBlob { file_offset: d, ..down },
        }
    }

    /// The bytes of the blob with hash `hash`.
    pub fn blob_bytes(&self, hash: &BlobHash) -> Option<&[u8]> {
        self.experts
            .iter()
            .flat_map(|e| [&e.gate, &e.up, &e.down])
            .find(|b| blake3::hash(b).as_bytes() == hash)
            .map(Vec::as_slice)
    }

    fn ffn(&self, e: u32) -> ExpertFfn<'_> {
        let [gate, up, down] = Layer::matrices(&self.experts[e as usize])
            .map(|(ty, rows, cols, bytes)| QMatrix::new(ty, rows, cols, bytes));
        ExpertFfn { gate, up, down }
    }

    /// A batch of `x` (`[n_tokens, N_EMBD]`) with `routes`, activations quantized as the kernel
    /// would, and the single-node result of the same computation.
    pub fn batch(&self, x: &[f32], routes: &[Route]) -> (ExpertBatch, Vec<f32>) {
        let n_tokens = x.len() / N_EMBD;
        let inputs = QuantizedInputs::quantize(x, N_EMBD, [VecDotType::Q8_0]);
        let activations = inputs.parts().iter().map(|q| ActivationRows::new(q.ty, q.data.clone())).collect();
        let wire = routes.iter().map(|r| WireRoute { token: r.token, expert: r.expert, weight: r.weight }).collect();
        let batch = ExpertBatch {
            step: 17,
            layer: LAYER,
            n_tokens: n_tokens as u32,
            n_embd: N_EMBD as u32,
            activations,
            routes: wire,
        };
        let mut expected = vec![0.0f32; x.len()];
        grouped_expert_ffn(|e| self.ffn(e), x, N_EMBD, routes, &mut expected);
        (batch, expected)
    }
}

/// `n_tokens` rows of random hidden states.
pub fn hidden_states(n_tokens: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n_tokens * N_EMBD).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Bit patterns, for exact comparisons.
pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}
