//! Failover with real processes. A `moeshard serve` with two workers holding every expert
//! (`* * w1,w2`) streams a greedy completion; when its first token arrives, worker w1 is killed
//! (SIGKILL), stalled (SIGSTOP) or cut off (its veth link set down, in network namespaces). The
//! stream must carry the same tokens and logprobs as an undisturbed run, with no error and at most
//! [`ADDED_LATENCY_BOUND`] more wall time; w1's round trip must fail once and never be retried.
//! Once w1 is back (restarted on its port, SIGCONT, link up) the coordinator reconnects on its own
//! and the next request is computed by w1 again, with no weight shipped. Last, a coordinator
//! killed and started again serves with the workers' cached experts within [`RESTART_BOUND`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::util::{
    Server, TempDir, Worker, metric, reference, run_with_timeout, send_signal, sibling_binary, temp_path, u32s,
    worker_args,
};

const KEY: &str = "failover-test-cluster-key-0123456789";
const MODEL: &str = "tiny-mellum-q8_0";
/// Tokens per request: enough that a fault injected at the first one lands mid-request.
const TOKENS: usize = 400;
/// The most a fault may add to a request's wall time (issue #6).
const ADDED_LATENCY_BOUND: Duration = Duration::from_secs(2);
/// The most a restarted coordinator may take from its start to a request served by the workers.
const RESTART_BOUND: Duration = Duration::from_secs(5);
/// How long a worker that is back may take to be connected again (reconnect backoff is at most
/// 2 s, a handshake attempt at most 5 s).
const REJOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Set in the environment of this test binary when it re-runs itself inside `unshare -rn`.
const NETNS_ENV: &str = "MOESHARD_TEST_IN_NETNS";

/// One streamed greedy completion.
struct Streamed {
    tokens: Vec<String>,
    logprobs: Vec<f64>,
    wall: Duration,
    /// The longest wait between two streamed tokens.
    max_gap: Duration,
}

/// A fixture prompt whose greedy completion runs past [`TOKENS`] without an end-of-generation token.
fn prompt() -> Vec<u32> {
    u32s(&reference(MODEL)["greedy"][0]["prompt_tokens"])
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

/// Streams a greedy completion of [`TOKENS`] tokens (with logprobs) from `server`, running
/// `at_first_token` once, as soon as the first token arrives. Panics on any error event.
async fn stream_greedy(server: &Server, at_first_token: impl FnOnce()) -> Streamed {
    let body = json!({ "prompt": prompt(), "max_tokens": TOKENS, "temperature": 0, "stream": true, "logprobs": 1 });
    let started = Instant::now();
    let resp = client().post(format!("{}/v1/completions", server.url)).json(&body).send().await.expect("request");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let mut out = Streamed { tokens: Vec::new(), logprobs: Vec::new(), wall: Duration::ZERO, max_gap: Duration::ZERO };
    let (mut hook, mut last_token, mut finish, mut done) = (Some(at_first_token), None::<Instant>, None, false);
    let (mut stream, mut buf) = (resp.bytes_stream(), String::new());
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.next()).await.expect("stream stalled")
    {
        buf.push_str(std::str::from_utf8(&chunk.expect("the stream breaks off")).expect("UTF-8"));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {event:?}"));
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("JSON event");
            assert!(v.get("error").is_none(), "error event: {v}");
            let choice = &v["choices"][0];
            finish = choice["finish_reason"].as_str().map(str::to_owned).or(finish);
            let lp = &choice["logprobs"];
            let pairs = lp["tokens"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(lp["token_logprobs"].as_array().into_iter().flatten());
            for (token, logprob) in pairs {
                out.tokens.push(token.as_str().expect("token").to_owned());
                out.logprobs.push(logprob.as_f64().expect("logprob"));
                if let Some(last) = last_token.replace(Instant::now()) {
                    out.max_gap = out.max_gap.max(last.elapsed());
                }
            }
            if !out.tokens.is_empty()
                && let Some(hook) = hook.take()
            {
                hook();
            }
        }
    }
    out.wall = started.elapsed();
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(finish.as_deref(), Some("length"), "the completion runs to max_tokens");
    assert_eq!(out.tokens.len(), TOKENS);
    out
}

/// A worker's figures on the server's `/metrics` page.
#[derive(Debug, PartialEq)]
struct Figures {
    round_trips: f64,
    failures: f64,
    reconnects: f64,
    shipped: f64,
    up: f64,
}

async fn figures(server: &Server, worker: &str) -> Figures {
    let page =
        client().get(format!("{}/metrics", server.url)).send().await.expect("metrics").text().await.expect("page");
    let get = |name: &str| {
        metric(&page, &format!("moeshard_worker_{name}{{worker=\"{worker}\"}}"))
            .unwrap_or_else(|| panic!("no {name} for {worker} in\n{page}"))
    };
    Figures {
        round_trips: get("round_trips_total"),
        failures: get("failures_total"),
        reconnects: get("reconnects_total"),
        shipped: get("shipped_bytes_total"),
        up: get("up"),
    }
}

/// Waits until `worker` is connected again; returns how long that took.
async fn wait_until_back(server: &Server, worker: &str) -> Duration {
    let start = Instant::now();
    while figures(server, worker).await.up != 1.0 {
        assert!(start.elapsed() < REJOIN_TIMEOUT, "{worker} not reconnected within {REJOIN_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// A server using `workers` with every expert on them, half each.
fn serve_with(workers: &[SocketAddr], placement: &Path) -> Server {
    std::fs::write(placement, "* * w1,w2\n").expect("placement file");
    let mut args = vec!["--cluster-key", KEY, "--no-discovery", "--placement", placement.to_str().expect("path")];
    let addrs: Vec<String> = workers.iter().map(SocketAddr::to_string).collect();
    for a in &addrs {
        args.extend(["--worker", a.as_str()]);
    }
    Server::start(MODEL, &args)
}

/// What the undisturbed and the faulted run showed.
struct Faulted {
    calm: Streamed,
    before: Figures,
    after: Figures,
}

/// An undisturbed run, then the same request with `inject` run at its first token: same tokens
/// and logprobs, no error, at most [`ADDED_LATENCY_BOUND`] added, one failed round trip to w1.
async fn run_with_fault(server: &Server, what: &str, inject: impl FnOnce()) -> Faulted {
    stream_greedy(server, || {}).await;
    let calm = stream_greedy(server, || {}).await;
    let before = figures(server, "w1").await;
    assert_eq!((before.failures, before.up), (0.0, 1.0), "an undisturbed run loses no worker");
    let faulted = stream_greedy(server, inject).await;
    let added = faulted.wall.saturating_sub(calm.wall);
    eprintln!(
        "{what}: undisturbed {:?} (longest gap {:?}), faulted {:?} (longest gap {:?}): {added:?} added",
        calm.wall, calm.max_gap, faulted.wall, faulted.max_gap
    );
    assert_eq!(faulted.tokens, calm.tokens, "{what}: the tokens differ from the undisturbed run");
    assert_eq!(faulted.logprobs, calm.logprobs, "{what}: the logprobs differ from the undisturbed run");
    assert!(added <= ADDED_LATENCY_BOUND, "{what} added {added:?} to the request");
    let after = figures(server, "w1").await;
    assert_eq!(after.up, 0.0, "{what}: w1 counts as lost");
    assert_eq!(after.failures, 1.0, "{what}: one round trip failed, the lost worker was not retried per layer");
    assert!(after.round_trips > before.round_trips, "{what}: w1 computed the start of the faulted request");
    Faulted { calm, before, after }
}

/// After w1 is back: it is reconnected without shipping weights, and the next request is
/// computed by it again with the same output.
async fn recovers(server: &Server, what: &str, f: Faulted) {
    let took = wait_until_back(server, "w1").await;
    let again = stream_greedy(server, || {}).await;
    let now = figures(server, "w1").await;
    eprintln!("{what}: w1 reconnected {took:?} after it was back; {now:?}");
    assert_eq!(again.tokens, f.calm.tokens);
    assert_eq!(again.logprobs, f.calm.logprobs);
    assert!(now.round_trips > f.after.round_trips, "{what}: w1 is used again");
    assert_eq!(now.failures, f.after.failures, "{what}: nothing failed after the reconnection");
    assert_eq!(now.reconnects, 1.0);
    assert_eq!(now.shipped, f.before.shipped, "{what}: the returning worker had its experts, nothing shipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_mid_stream_then_restarted_on_its_port() {
    let dirs = [TempDir::new("kill-w1"), TempDir::new("kill-w2")];
    let w1 = Worker::start("w1", KEY, &dirs[0].0, &[]);
    let w2 = Worker::start("w2", KEY, &dirs[1].0, &[]);
    let (w1_addr, pid) = (w1.addr, w1.pid());
    let placement = temp_path("placement.txt");
    let server = serve_with(&[w1.addr, w2.addr], &placement);
    let f = run_with_fault(&server, "SIGKILL", || send_signal(pid, libc::SIGKILL)).await;
    drop(w1);
    let _w1 = Worker::start_on(&w1_addr.to_string(), "w1", KEY, &dirs[0].0, &[]);
    recovers(&server, "SIGKILL", f).await;
    std::fs::remove_file(&placement).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_worker_mid_stream_then_continued() {
    let dirs = [TempDir::new("stop-w1"), TempDir::new("stop-w2")];
    let w1 = Worker::start("w1", KEY, &dirs[0].0, &[]);
    let w2 = Worker::start("w2", KEY, &dirs[1].0, &[]);
    let placement = temp_path("placement.txt");
    let server = serve_with(&[w1.addr, w2.addr], &placement);
    let pid = w1.pid();
    let f = run_with_fault(&server, "SIGSTOP", || send_signal(pid, libc::SIGSTOP)).await;
    // Awake, w1 may finish the batch it held: that answer is stale and must not be used.
    send_signal(pid, libc::SIGCONT);
    recovers(&server, "SIGSTOP", f).await;
    std::fs::remove_file(&placement).ok();
}

/// Runs `ip ARGS` in this process's network namespace.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip(8)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A process holding a network namespace of its own, killed on drop.
struct Netns(Child);

impl Netns {
    fn new() -> Netns {
        Netns(Command::new("unshare").args(["-n", "sleep", "600"]).spawn().expect("unshare -n"))
    }

    /// `args` run inside the namespace.
    fn command(&self, args: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.0.id().to_string(), "-n", "--"]).args(args);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// w1 lives in a network namespace of its own, reached over a veth pair (10.77.0.1 here,
/// 10.77.0.2 there); its link goes down at the first token and up again later. The whole test
/// runs inside `unshare -rn` (this binary re-runs itself there), so it needs no privileges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cut_off_mid_stream_then_link_up() {
    let name = "cluster::failover::worker_cut_off_mid_stream_then_link_up";
    if std::env::var_os(NETNS_ENV).is_none() {
        if Command::new("unshare").arg("--version").output().is_err() {
            eprintln!("skipping {name}: unshare (util-linux) is not installed");
            return;
        }
        let mut cmd = Command::new("unshare");
        cmd.arg("-rn").arg(std::env::current_exe().expect("test binary"));
        cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]).env(NETNS_ENV, "1");
        let out = run_with_timeout(cmd, Duration::from_secs(120));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{stderr}");
        assert!(out.status.success() && stdout.contains("1 passed"), "in unshare -rn:\n{stdout}\n{stderr}");
        return;
    }
    ip(&["link", "set", "lo", "up"]);
    let netns = Netns::new();
    ip(&["link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]);
    ip(&["link", "set", "veth1", "netns", &netns.0.id().to_string()]);
    ip(&["addr", "add", "10.77.0.1/24", "dev", "veth0"]);
    ip(&["link", "set", "veth0", "up"]);
    let inside = |args: &[&str]| {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let out = netns.command(&args).output().expect("nsenter");
        assert!(out.status.success(), "{args:?} in the namespace: {}", String::from_utf8_lossy(&out.stderr));
    };
    inside(&["ip", "link", "set", "lo", "up"]);
    inside(&["ip", "addr", "add", "10.77.0.2/24", "dev", "veth1"]);
    inside(&["ip", "link", "set", "veth1", "up"]);

    let dirs = [TempDir::new("link-w1"), TempDir::new("link-w2")];
    let worker = sibling_binary("moeshard-worker");
    let mut args: Vec<std::ffi::OsString> = vec![worker.into()];
    args.extend(worker_args("10.77.0.2:0", "w1", &dirs[0].0, &[]));
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut cmd = netns.command(&args);
    cmd.env("MOESHARD_CLUSTER_KEY", KEY);
    let w1 = Worker::launch(cmd, "w1");
    let w2 = Worker::start("w2", KEY, &dirs[1].0, &[]);
    let placement = temp_path("placement.txt");
    let server = serve_with(&[w1.addr, w2.addr], &placement);
    let f = run_with_fault(&server, "link down", || ip(&["link", "set", "veth0", "down"])).await;
    ip(&["link", "set", "veth0", "up"]);
    recovers(&server, "link down", f).await;
    std::fs::remove_file(&placement).ok();
}

/// A coordinator killed and started again: its workers still hold their experts, so it serves
/// with them within [`RESTART_BOUND`] of its start and ships no weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_serves_with_cached_experts() {
    let dirs = [TempDir::new("restart-w1"), TempDir::new("restart-w2")];
    let w1 = Worker::start("w1", KEY, &dirs[0].0, &[]);
    let w2 = Worker::start("w2", KEY, &dirs[1].0, &[]);
    let placement = temp_path("placement.txt");
    let mut first = serve_with(&[w1.addr, w2.addr], &placement);
    let body = json!({ "prompt": prompt(), "max_tokens": 8, "temperature": 0 });
    let complete = |server: &Server| client().post(format!("{}/v1/completions", server.url)).json(&body).send();
    let before: Value = complete(&first).await.expect("request").json().await.expect("JSON");
    for w in ["w1", "w2"] {
        assert!(figures(&first, w).await.shipped > 0.0, "the first coordinator ships the experts");
    }
    first.kill();

    let start = Instant::now();
    let second = serve_with(&[w1.addr, w2.addr], &placement);
    let after: Value = complete(&second).await.expect("request").json().await.expect("JSON");
    let took = start.elapsed();
    let (f1, f2) = (figures(&second, "w1").await, figures(&second, "w2").await);
    eprintln!("restarted coordinator: served by its workers {took:?} after its start; w1 {f1:?}, w2 {f2:?}");
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
    for f in [f1, f2] {
        assert!(f.round_trips > 0.0, "the request was routed to the workers");
        assert_eq!(f.shipped, 0.0, "the workers kept their experts");
    }
    assert!(took <= RESTART_BOUND, "{took:?} from coordinator start to a request served by the workers");
    std::fs::remove_file(&placement).ok();
}
