//! Start-up: refusals, and the scheduling policy and CPUs of the daemon's threads.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::util::{TempDir, Worker, wait_with_deadline};

/// Starts the worker with `MOESHARD_CLUSTER_KEY` set to `key` (removed for `None`), expects it to
/// exit with code 1 within 30 s, and returns its output.
fn refused(key: Option<&str>) -> Output {
    refused_with(key, &[])
}

/// [`refused`] with `extra` arguments.
fn refused_with(key: Option<&str>, extra: &[&str]) -> Output {
    let dir = crate::util::TempDir::new("refused");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moeshard-worker"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-mdns", "--cache-dir"]).arg(dir.path()).args(extra);
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

/// The `Cpus_allowed_list` line of a `/proc/.../status` file.
fn allowed_cpus(status_file: &std::path::Path) -> String {
    let status = std::fs::read_to_string(status_file).expect("status");
    let line = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list");
    line.trim().to_owned()
}

#[test]
fn every_thread_stays_on_the_given_cpus() {
    // The last CPU this test may run on (the list's last item, the end of a range).
    let ours = allowed_cpus("/proc/self/status".as_ref());
    let cpu = ours.rsplit([',', '-']).next().expect("an allowed CPU").to_owned();
    let cache = TempDir::new("cpus");
    let worker = Worker::spawn(cache.path(), &["--listen", "127.0.0.1:0", "--no-mdns", "--cpus", &cpu]);
    let tasks: Vec<_> =
        std::fs::read_dir(format!("/proc/{}/task", worker.pid())).expect("the worker's threads").collect();
    assert!(tasks.len() >= 2, "the runtime thread and the compute threads");
    for task in tasks {
        let path = task.expect("a thread").path().join("status");
        assert_eq!(allowed_cpus(&path), cpu, "{}", path.display());
    }
}

#[test]
fn refuses_cpus_it_cannot_run_on() {
    let output = refused_with(Some("a-key-of-sixteen-chars"), &["--cpus", "1000-1001"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let ours = allowed_cpus("/proc/self/status".as_ref());
    let says = format!(
        "cannot keep the worker on CPUs 1000-1001 (--cpus): this process may not run on CPU 1000-1001 (it may use {ours})"
    );
    assert!(stderr.contains(&says), "{stderr}");
}
