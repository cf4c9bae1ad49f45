//! Helpers shared by the integration tests: fixture paths and references, the built binary.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The folder holding the fixture models (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

/// Path of fixture model `name` (e.g. `tiny-mellum-q8_0`).
pub fn model_path(name: &str) -> PathBuf {
    fixtures().join(format!("{name}.gguf"))
}

/// The parsed `{name}.public.json` reference outputs.
pub fn reference(name: &str) -> Value {
    let path = fixtures().join(format!("{name}.public.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON array of numbers as `u32`s.
pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("integer") as u32).collect()
}

/// A JSON array of numbers as `f64`s.
pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

/// A unique scratch path under the system temp dir (removed by the caller).
pub fn temp_path(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("moeshard-test-{}-{n}-{tag}", std::process::id()))
}

/// Runs the `moeshard` binary with `args`, killing it after `timeout`.
pub fn moeshard(args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moeshard"));
    cmd.args(args);
    run_with_timeout(cmd, timeout)
}

/// Runs `cmd` to its end, killing it (and panicking with its stderr) after `timeout`. Output is
/// drained by reader threads, so a chatty child never blocks on a full pipe.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!("{cmd:?} timed out after {timeout:?}; stderr: {}", String::from_utf8_lossy(&err));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() }
}

/// Sends `signal` (`libc::SIGKILL`, `SIGSTOP`, `SIGCONT`...) to process `pid` with kill(2).
/// A system call, not kill(1): spawning a process can take hundreds of milliseconds on a loaded
/// machine, and a fault meant for the middle of a request must not land after its end.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

/// Path of a binary built next to `moeshard` (e.g. `moeshard-worker`, built by
/// `cargo test --workspace` because the worker package has integration tests).
pub fn sibling_binary(name: &str) -> PathBuf {
    let moeshard = PathBuf::from(env!("CARGO_BIN_EXE_moeshard"));
    let path = moeshard.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} is not built: run the tests with `cargo test --workspace`", path.display());
    path
}

/// A `moeshard-worker` process on loopback, killed on drop.
pub struct Worker {
    child: std::process::Child,
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
}

impl Worker {
    /// Starts `moeshard-worker --listen 127.0.0.1:0 --no-mdns --name NAME --cache-dir DIR` with
    /// `key` and waits (at most 60 s) for its `listening on ADDR` line.
    pub fn start(name: &str, key: &str, cache_dir: &std::path::Path, extra: &[&str]) -> Worker {
        Worker::start_on("127.0.0.1:0", name, key, cache_dir, extra)
    }

    /// [`Worker::start`] listening on `listen` (e.g. the address of a worker that was killed).
    pub fn start_on(listen: &str, name: &str, key: &str, cache_dir: &std::path::Path, extra: &[&str]) -> Worker {
        let mut cmd = Command::new(sibling_binary("moeshard-worker"));
        cmd.args(worker_args(listen, name, cache_dir, extra)).env("MOESHARD_CLUSTER_KEY", key);
        Worker::launch(cmd, name)
    }

    /// Runs `cmd`, which must end up exec-ing a worker (e.g. through `unshare`), and waits (at
    /// most 60 s) for its `listening on ADDR` line.
    pub fn launch(cmd: Command, name: &str) -> Worker {
        let (child, rest) = spawn_listening(cmd, &format!("worker {name}"));
        let addr = rest
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected listening line from worker {name}: {rest:?}"));
        Worker { child, addr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The arguments [`Worker::start_on`] passes to `moeshard-worker` (one compute thread, no mDNS).
pub fn worker_args(listen: &str, name: &str, cache_dir: &std::path::Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        ["--listen", listen, "--no-mdns", "--name", name, "--threads", "1", "--cache-dir"].map(Into::into).into();
    args.push(cache_dir.into());
    args.extend(extra.iter().map(Into::into));
    args
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let path = temp_path(tag);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of the Prometheus sample `name` (with its labels, e.g. `m{worker="w1"}`) on `page`.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A `moeshard serve` process on loopback, killed on drop.
pub struct Server {
    child: std::process::Child,
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Server {
    /// Starts `moeshard serve -m MODEL --port 0 -ctk f32 -ctv f32 EXTRA...` and waits (at most
    /// 60 s) for its `listening on http://ADDR` line.
    pub fn start(model: &str, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moeshard"));
        cmd.arg("serve")
            .arg("-m")
            .arg(model_path(model))
            .args(["--port", "0", "-ctk", "f32", "-ctv", "f32", "-t", "2"])
            .args(extra);
        let (child, url) = spawn_listening(cmd, "moeshard serve");
        Server { child, url: url.trim().to_owned() }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` (stdout piped, stderr inherited) and waits at most 60 s for a stdout line
/// `listening on REST`; returns the child and REST. The child is killed if the line never comes.
fn spawn_listening(mut cmd: Command, what: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("listening on ") {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(rest) => (child, rest),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not report its address within 60 s");
        }
    }
}
