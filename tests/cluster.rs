//! Distributed experts with real `moeshard-worker` processes on loopback: output equal to one
//! machine, one round trip per (layer, involved worker) per step, bounded bytes per token,
//! weight caching, authentication, and mDNS discovery inside a network namespace; failover and
//! restarts in `failover`.

mod failover;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moeshard::cluster::{Cluster, ClusterExperts, ClusterOptions, DeadlineBounds, Placement};
use moeshard::experts::{ExpertBackend, LocalExperts};
use moeshard::kv_cache::KvType;
use moeshard::model::{Logits, Model};
use moeshard::session::Session;
use moeshard_kernels::moe::Route;
use moeshard_kernels::sampling::{argmax, log_softmax};
use moeshard_protocol::auth::ClusterKey;

use crate::conformance;
use crate::util::{TempDir, Worker, model_path, reference, u32s};

const KEY: &str = "test-cluster-key-0123456789abcdef";

/// Wraps a backend and records, per call, the layer and the experts routed.
struct Recording {
    inner: Arc<ClusterExperts>,
    calls: Mutex<Vec<(usize, Vec<u32>)>>,
}

impl ExpertBackend for Recording {
    fn moe_forward(&self, layer: usize, hidden: &[f32], routes: &[Route], out: &mut [f32]) -> anyhow::Result<()> {
        self.calls.lock().unwrap().push((layer, routes.iter().map(|r| r.expert).collect()));
        self.inner.moe_forward(layer, hidden, routes, out)
    }
}

fn options(workers: &[&Worker], placement: Option<std::path::PathBuf>) -> ClusterOptions {
    ClusterOptions {
        key: ClusterKey::parse(KEY).unwrap(),
        workers: workers.iter().map(|w| w.addr.to_string()).collect(),
        discovery: false,
        discovery_timeout: Duration::ZERO,
        placement,
        deadline: DeadlineBounds { min: Duration::from_secs(20), max: Duration::from_secs(20) },
    }
}

/// Greedy decode of `n` tokens after `prompt`; returns the tokens and each step's log-softmax.
fn greedy_run(s: &mut Session, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    s.clear();
    let mut logits = s.eval(prompt, Logits::Last).unwrap();
    let (mut tokens, mut lps) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let id = argmax(&logits);
        tokens.push(id);
        lps.push(log_softmax(&logits));
        logits = s.eval(&[id], Logits::Last).unwrap();
    }
    (tokens, lps)
}

/// Greedy decoding and teacher-forced scores through two workers under `placement` (a placement
/// file naming `w1` and `w2` that leaves nothing on the coordinator) equal one machine's.
fn distributed_equals_single_node(name: &str, placement: &str) {
    let model = Arc::new(Model::load(model_path(name)).unwrap());
    let n_embd = model.config.n_embd;
    let dirs = [TempDir::new("w1-cache"), TempDir::new("w2-cache")];
    let w1 = Worker::start("w1", KEY, &dirs[0].0, &[]);
    let w2 = Worker::start("w2", KEY, &dirs[1].0, &[]);
    let placement_file = crate::util::temp_path("placement.txt");
    std::fs::write(&placement_file, placement).unwrap();
    let cluster = Cluster::start(model.clone(), &options(&[&w1, &w2], Some(placement_file.clone()))).unwrap();
    std::fs::remove_file(&placement_file).ok();
    assert!(cluster.placement.experts_of(0).is_empty(), "the coordinator keeps no experts");
    assert_eq!(cluster.experts.members().len(), 2);
    let recording = Arc::new(Recording { inner: cluster.experts.clone(), calls: Mutex::new(Vec::new()) });

    let mut single =
        Session::new(model.clone(), Arc::new(LocalExperts::new(model.clone())), 2048, KvType::F32, KvType::F32)
            .unwrap();
    let mut distributed = Session::new(model.clone(), recording.clone(), 2048, KvType::F32, KvType::F32).unwrap();

    let r = reference(name);
    for g in r["greedy"].as_array().unwrap() {
        let prompt = u32s(&g["prompt_tokens"]);
        let (t1, lp1) = greedy_run(&mut single, &prompt, 16);
        let (t2, lp2) = greedy_run(&mut distributed, &prompt, 16);
        assert_eq!(t1, t2, "{name} {}: greedy tokens differ between one machine and the cluster", g["name"]);
        let max_diff =
            lp1.iter().flatten().zip(lp2.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!("{name} {}: max |logprob difference| single vs cluster {max_diff:e}", g["name"]);
        assert!(max_diff <= 1e-5, "{name}: logprobs differ by {max_diff}");
    }

    let bounds = conformance::bounds(name);
    conformance::teacher_forced(name, &r, bounds, &mut distributed, "2 workers");
    conformance::greedy(name, &r, bounds, &mut distributed);

    // One round trip per (layer, involved worker) per forward call, counted by the workers.
    let placement: &Placement = &cluster.placement;
    let mut expected = [0u64; 2];
    for (layer, experts) in recording.calls.lock().unwrap().iter() {
        for (w, count) in expected.iter_mut().enumerate() {
            if placement.dispatch(*layer, experts).contains(&(w + 1)) {
                *count += 1;
            }
        }
    }
    let runtime = cluster.experts.runtime().clone();
    for (i, member) in cluster.experts.members().iter().enumerate() {
        let link = member.link().expect("no worker was lost");
        let remote = runtime.block_on(link.remote_stats()).unwrap();
        let local = member.stats().snapshot();
        assert_eq!(remote.experts as usize, placement.experts_of(i + 1).len(), "experts held by {}", link.name());
        assert!(expected[i] > 0, "worker {} computed nothing", link.name());
        assert_eq!(remote.batches, expected[i], "worker {} round trips", link.name());
        assert_eq!(local.round_trips, expected[i]);
        assert_eq!(local.failures, 0);
        let per_token = (local.bytes_out + local.bytes_in) as f64 / local.tokens as f64;
        eprintln!(
            "{name}: worker {}: {} round trips, {per_token:.0} bytes per token per layer",
            link.name(),
            local.round_trips
        );
        assert!(per_token <= (n_embd * 6 + 512) as f64, "{per_token} bytes per token per layer");
    }
}

#[test]
fn two_workers_equal_one_machine_tiny_mellum_q8_0() {
    distributed_equals_single_node("tiny-mellum-q8_0", "* * w1,w2\n");
}

#[test]
fn two_workers_equal_one_machine_kq_mellum_q4_k_m() {
    distributed_equals_single_node("kq-mellum-q4_k_m", "* * w1,w2\n");
}

#[test]
fn two_workers_holding_every_expert_equal_one_machine() {
    distributed_equals_single_node("kq-mellum-q4_k_m", "* * w1+w2\n");
}

#[test]
fn second_run_ships_no_weights() {
    let model = Arc::new(Model::load(model_path("kq-mellum-q4_k_m")).unwrap());
    let dir = TempDir::new("cache");
    let placement = crate::util::temp_path("placement.txt");
    std::fs::write(&placement, "* 0-5 w\n").unwrap();
    let shipped = |w: &Worker| {
        let cluster = Cluster::start(model.clone(), &options(&[w], Some(placement.clone()))).unwrap();
        let s = cluster.experts.members()[0].stats().snapshot();
        assert!(s.experts > 0, "the worker got experts");
        s.shipped_bytes
    };
    let first = shipped(&Worker::start("w", KEY, &dir.0, &[]));
    assert!(first > 0, "the first run ships weights");
    // A restarted worker with the same cache directory has them all.
    assert_eq!(shipped(&Worker::start("w", KEY, &dir.0, &[])), 0);
    // So does a worker with its own copy of the model and an empty cache.
    let empty = TempDir::new("empty-cache");
    let path = model_path("kq-mellum-q4_k_m");
    assert_eq!(shipped(&Worker::start("w", KEY, &empty.0, &["--model", path.to_str().unwrap()])), 0);
    std::fs::remove_file(&placement).ok();
}

#[test]
fn worker_with_another_key_is_never_used() {
    let model = Arc::new(Model::load(model_path("tiny-mellum-q8_0")).unwrap());
    let (d1, d2) = (TempDir::new("good"), TempDir::new("bad"));
    let good = Worker::start("good", KEY, &d1.0, &[]);
    let mut bad = Worker::start("bad", "another-cluster-key-fedcba9876543210", &d2.0, &[]);
    let cluster = Cluster::start(model, &options(&[&good, &bad], None)).unwrap();
    let names: Vec<&str> = cluster.experts.members().iter().map(|m| m.name()).collect();
    assert_eq!(names, ["good"]);
    assert!(cluster.placement.experts_of(2).is_empty());
    assert!(bad.is_running(), "a failed handshake does not stop the worker");
}

#[test]
fn client_without_the_key_gets_nothing_and_worker_keeps_serving() {
    use moeshard_protocol::auth::AuthError;
    use moeshard_protocol::transport::{authenticate_client, client_endpoint, connect};
    let dir = TempDir::new("w");
    let mut worker = Worker::start("w", KEY, &dir.0, &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let err = runtime.block_on(async {
        let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = connect(&endpoint, worker.addr).await.unwrap();
        let wrong = ClusterKey::parse("not-the-cluster-key-at-all-000").unwrap();
        let err = authenticate_client(&conn, &wrong).await.expect_err("a wrong key must fail");
        // Nothing else gets through: a control request on a new stream is refused too.
        let extra = conn.open_bi().await;
        (err, extra.is_err())
    });
    assert!(matches!(err.0, AuthError::ClosedByPeer { .. } | AuthError::BadProof(_)), "{:?}", err.0);
    assert!(err.1, "the connection is closed after the failed handshake");
    assert!(worker.is_running());
    let model = Arc::new(Model::load(model_path("tiny-mellum-q8_0")).unwrap());
    let cluster = Cluster::start(model.clone(), &options(&[&worker], None)).unwrap();
    assert_eq!(cluster.experts.members().len(), 1);
    let mut s = Session::new(model, cluster.experts.clone(), 64, KvType::F32, KvType::F32).unwrap();
    s.eval(&[1, 2, 3], Logits::Last).unwrap();
    assert!(cluster.experts.members()[0].stats().snapshot().round_trips > 0, "the worker served the coordinator");
}

/// Inside a fresh network namespace with only loopback (multicast on), a worker announcing over
/// mDNS is found by `moeshard run` with no `--worker` flag.
#[test]
fn worker_is_discovered_by_mdns_in_a_network_namespace() {
    let worker = crate::util::sibling_binary("moeshard-worker");
    let moeshard = env!("CARGO_BIN_EXE_moeshard");
    let model = model_path("tiny-mellum-q8_0");
    let cache = TempDir::new("ns-cache");
    let script = format!(
        "set -e; ip link set lo up; ip link set lo multicast on; \
         MOESHARD_CLUSTER_KEY={KEY} timeout 120 {worker} --listen 127.0.0.1:0 --name nsworker --cache-dir {cache} > /dev/null & \
         sleep 1; \
         timeout 120 {moeshard} run -m {model} --cluster-key {KEY} --prompt-tokens 1,2,3 -n 2 --temp 0 --stats --discovery-ms 3000; \
         kill %1",
        worker = worker.display(),
        cache = cache.0.display(),
        model = model.display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["-rn", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare (util-linux) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "namespace run failed (is `unshare -rn` permitted here?): {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("worker nsworker "))
        .unwrap_or_else(|| panic!("no worker in stats: {stderr}"));
    assert!(!line.contains(" 0 experts") && !line.contains(" 0 round trips"), "{line}");
}

/// `bench --compare-local` interleaves the cluster with this machine alone in one run: a local
/// row and a ratio line beside the cluster's, the workers' traffic counted over the cluster's
/// tokens only, and a clear error without workers.
#[test]
fn bench_compare_local_interleaves_cluster_and_local_tokens() {
    let path = model_path("tiny-mellum-q8_0");
    let file = path.to_str().unwrap();
    let n_layer = Model::load(&path).unwrap().config.n_layer as f64;
    let dirs = [TempDir::new("cmp-w1"), TempDir::new("cmp-w2")];
    let (w1, w2) = (Worker::start("w1", KEY, &dirs[0].0, &[]), Worker::start("w2", KEY, &dirs[1].0, &[]));
    // Every expert on both workers: each decoded token takes exactly one round trip per layer to
    // each of them (its routes split between the two), and none when it runs locally.
    let placement = crate::util::temp_path("cmp-placement.txt");
    std::fs::write(&placement, "* * w1+w2\n").unwrap();
    let (a1, a2) = (w1.addr.to_string(), w2.addr.to_string());
    let cluster_args = ["--cluster-key", KEY, "--no-discovery", "--worker", &a1, "--worker", &a2];
    let mut args = vec!["bench", "-m", file, "-p", "8", "-n", "6", "-r", "2", "-t", "1", "--compare-local"];
    args.extend(cluster_args);
    args.extend(["--placement", placement.to_str().unwrap()]);

    let out = crate::util::moeshard(&[args.as_slice(), &["-o", "json"]].concat(), Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let tests = report["tests"].as_array().unwrap();
    let (pp, tg) = (&tests[0], &tests[1]);
    assert_eq!((pp["test"].as_str(), tg["test"].as_str()), (Some("pp8"), Some("tg6")));
    for (t, pairs) in [(pp, 2), (tg, 6)] {
        let local = &t["local"];
        assert_eq!(local["samples_ts"].as_array().unwrap().len(), 2, "{t}");
        assert_eq!(local["pairs"], pairs, "{t}");
        for key in ["speed_ratio", "median_pair_ratio"] {
            let r = local[key].as_f64().unwrap();
            assert!(r.is_finite() && r > 0.0, "{key} {r}");
        }
    }
    for w in tg["workers"].as_array().unwrap() {
        assert_eq!(w["round_trips"].as_u64(), Some(2 * 3 * n_layer as u64), "3 cluster tokens per repetition: {w}");
        assert_eq!(w["round_trips_per_token"].as_f64(), Some(n_layer), "{w}");
    }

    let out = crate::util::moeshard(&args, Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    for line in
        ["| CPU + 2 workers | 1 | tg6 |", "| CPU (local experts, interleaved) | 1 | tg6 |", "tg6: the cluster at "]
    {
        assert!(table.contains(line), "{line} missing from:\n{table}");
    }
    std::fs::remove_file(&placement).ok();

    let out =
        crate::util::moeshard(&["bench", "-m", file, "-p", "0", "-n", "2", "--compare-local"], Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--compare-local") && err.contains("needs workers"), "{err}");
}
