//! Start-up: refusals, and the scheduling policy of the daemon's threads.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::util::{TempDir, Worker, wait_with_deadline};

/// Starts the worker with `MOESHARD_CLUSTER_KEY` set to `key` (removed for `None`), expects it to
/// exit with code 1 within 30 s, and returns its output.
fn refused(key: Option<&str>) -> Output {
    let dir = crate::util::TempDir::new("refused");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moeshard-worker"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-mdns", "--cache-dir"]).arg(dir.path());
    match key {
        Some(k) => cmd.env("MOESHARD_CLUSTER_KEY", k),
        None => cmd.env_remove("MOESHARD_CLUSTER_KEY"),
    };
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn moeshard-worker");
    let status = wait_with_deadline(&mut child, Duration::from_secs(30));
    let output = child.wait_with_output().expect("output");
    assert_eq!(status.code(), Some(1));
    output
}

#[test]
fn refuses_to_start_without_a_key() {
    let output = refused(None);
    assert!(output.stdout.is_empty(), "nothing on stdout without a key");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    for way in ["--cluster-key KEY", "--cluster-key-file", "MOESHARD_CLUSTER_KEY"] {
        assert!(stderr.contains(way), "the error names {way}: {stderr}");
    }
}

#[test]
fn refuses_a_short_key_without_echoing_it() {
    let output = refused(Some("tooshortkey"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MOESHARD_CLUSTER_KEY") && !stderr.contains("tooshortkey"), "{stderr}");
}

/// The scheduling policy (`/proc/PID/task/TID/stat` field 41) of every thread of `pid`.
fn thread_policies(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the worker's threads");
    tasks
        .map(|task| {
            let stat = std::fs::read_to_string(task.expect("a thread").path().join("stat")).expect("stat");
            // The fields after the command name (which may hold spaces) start with field 3.
            let after_name = &stat[stat.rfind(')').expect("stat has the name in parentheses") + 2..];
            after_name.split(' ').nth(41 - 3).expect("field 41").parse().expect("a policy number")
        })
        .collect()
}

#[test]
fn every_thread_runs_under_the_chosen_policy() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    for (extra, expected) in [(&[][..], SCHED_BATCH), (&["--sched", "normal"][..], SCHED_OTHER)] {
        let cache = TempDir::new("sched");
        let args: Vec<&str> =
            ["--listen", "127.0.0.1:0", "--no-mdns"].into_iter().chain(extra.iter().copied()).collect();
        let worker = Worker::spawn(cache.path(), &args);
        let policies = thread_policies(worker.pid());
        assert!(policies.len() >= 2, "the runtime thread and the compute threads: {policies:?}");
        assert!(policies.iter().all(|&p| p == expected), "{extra:?}: policies {policies:?}, expected {expected}");
    }
}
