//! Finding workers: mDNS browse for `_moeshard._udp.local.` (DNS-SD, RFC 6763), keeping only the
//! announcements whose TXT `cluster` id matches ours (the id is derived from the cluster key; the
//! key itself is never announced).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent};

/// The DNS-SD service type workers announce.
pub const SERVICE_TYPE: &str = "_moeshard._udp.local.";

/// A worker seen on the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredWorker {
    /// Node id from the TXT record.
    pub node_id: String,
    /// Address to connect to (IPv4 preferred).
    pub addr: SocketAddr,
}

/// Browses for `timeout` and returns the workers announcing `cluster_id`, one per node id.
///
/// Errors when the mDNS daemon cannot start (no usable interface, sockets refused).
pub fn browse(cluster_id: &str, timeout: Duration) -> Result<Vec<DiscoveredWorker>, mdns_sd::Error> {
    let daemon = ServiceDaemon::new()?;
    let events = daemon.browse(SERVICE_TYPE)?;
    let deadline = Instant::now() + timeout;
    let mut found: BTreeMap<String, DiscoveredWorker> = BTreeMap::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(event) = events.recv_timeout(left) else { break };
        let ServiceEvent::ServiceResolved(info) = event else { continue };
        if info.get_property_val_str("cluster") != Some(cluster_id) {
            tracing::debug!(service = info.get_fullname(), "ignoring a worker of another cluster");
            continue;
        }
        let Some(node_id) = info.get_property_val_str("node").map(str::to_string) else { continue };
        let mut addrs: Vec<IpAddr> = info.get_addresses_v4().into_iter().map(IpAddr::V4).collect();
        addrs.sort();
        if let Some(ip) = addrs.first() {
            found.insert(node_id.clone(), DiscoveredWorker { node_id, addr: SocketAddr::new(*ip, info.get_port()) });
        }
    }
    let _ = daemon.shutdown();
    Ok(found.into_values().collect())
}
