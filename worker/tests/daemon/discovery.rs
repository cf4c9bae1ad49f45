//! mDNS discovery inside a fresh network namespace whose only interface is loopback: the test
//! re-runs itself under `unshare -rn`, starts workers there and browses for them with mdns-sd.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent};
use moeshard_protocol::auth::cluster_id;
use moeshard_worker::announce::SERVICE_TYPE;

use crate::util::{KEY, TempDir, Worker, key, wait_with_deadline};

/// Set in the re-run inside the namespace.
const INSIDE_NAMESPACE: &str = "MOESHARD_WORKER_TEST_IN_NETNS";

/// The name of this test, as the test harness filters it.
const TEST_NAME: &str = "discovery::announces_over_mdns_on_a_loopback_only_host";

/// How long a browse may take to resolve a worker or see it leave.
const BROWSE_DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn announces_over_mdns_on_a_loopback_only_host() {
    if std::env::var_os(INSIDE_NAMESPACE).is_some() {
        browse_inside_namespace();
        return;
    }
    let probe = Command::new("unshare").args(["-rn", "true"]).stderr(Stdio::piped()).output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "this test needs unprivileged user and network namespaces (`unshare -rn`), which this machine \
             refuses: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => panic!("this test needs the `unshare` command (util-linux): {err}"),
    }
    let exe = std::env::current_exe().expect("test executable");
    let script = "ip link set lo up && ip link set lo multicast on && exec \"$@\"";
    let mut child = Command::new("unshare")
        .args(["-rn", "sh", "-c", script, "sh"])
        .arg(exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(INSIDE_NAMESPACE, "1")
        .stdin(Stdio::null())
        .spawn()
        .expect("run the test inside `unshare -rn`");
    let status = wait_with_deadline(&mut child, Duration::from_secs(120));
    assert!(status.success(), "the discovery test inside the network namespace failed: {status}");
}

/// Inside the namespace: one worker on 127.0.0.1, one on 0.0.0.0; both are found with the right
/// TXT record, and a worker stopped with SIGTERM withdraws its announcement.
fn browse_inside_namespace() {
    let links = Command::new("ip").args(["-o", "link", "show"]).output().expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert_eq!(links.lines().count(), 1, "the namespace should hold nothing but lo: {links}");

    let browser = ServiceDaemon::new().expect("mDNS daemon");
    let events = browser.browse(SERVICE_TYPE).expect("browse");
    let cache = TempDir::new("mdns");
    let mut on_loopback =
        Worker::spawn(cache.path(), &["--listen", "127.0.0.1:0", "--mem-budget", "1G", "--name", "lo-worker"]);
    let on_any = Worker::spawn(cache.path(), &["--listen", "0.0.0.0:0", "--mem-budget", "1G"]);

    let mut pending = vec![&on_loopback, &on_any];
    let started = Instant::now();
    while !pending.is_empty() {
        let left = BROWSE_DEADLINE.checked_sub(started.elapsed()).unwrap_or_default();
        let event =
            events.recv_timeout(left).unwrap_or_else(|_| panic!("workers not resolved within {BROWSE_DEADLINE:?}"));
        let ServiceEvent::ServiceResolved(service) = event else { continue };
        let Some(at) = pending.iter().position(|w| service.fullname == format!("{}.{SERVICE_TYPE}", w.node_id)) else {
            continue;
        };
        let worker = pending.remove(at);
        let txt = |k: &str| service.get_property_val_str(k).unwrap_or_else(|| panic!("TXT {k} missing")).to_owned();
        assert_eq!(txt("cluster"), cluster_id(&key()));
        assert_eq!(txt("cluster"), worker.cluster);
        assert_eq!(txt("node"), worker.node_id);
        assert_eq!(txt("port"), worker.addr.port().to_string());
        assert_eq!(txt("mem"), (1u64 << 30).to_string());
        assert_eq!(txt("cores"), "2");
        assert_eq!(txt("version"), env!("CARGO_PKG_VERSION"));
        let gemv: f64 = txt("gemv").parse().expect("gemv is a number");
        assert!(gemv > 0.0 && txt("gemv").split('.').nth(1).map(str::len) == Some(2), "gemv {}", txt("gemv"));
        assert_eq!(service.port, worker.addr.port());
        assert!(service.get_addresses_v4().iter().any(|a| a.is_loopback()), "{:?}", service.addresses);
        for p in service.get_properties().iter() {
            assert!(!p.val_str().contains(KEY) && !p.key().contains(KEY), "the key leaks in TXT {}", p.key());
        }
        if worker.node_id == on_loopback.node_id {
            assert_eq!(txt("name"), "lo-worker");
        }
    }

    let gone = format!("{}.{SERVICE_TYPE}", on_loopback.node_id);
    assert!(on_loopback.terminate().success(), "SIGTERM exits cleanly");
    let started = Instant::now();
    loop {
        let left = BROWSE_DEADLINE.checked_sub(started.elapsed()).unwrap_or_default();
        match events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceRemoved(_, fullname)) if fullname == gone => break,
            Ok(_) => {}
            Err(_) => panic!("the stopped worker's announcement was not withdrawn within {BROWSE_DEADLINE:?}"),
        }
    }
    let _ = browser.shutdown();
}
