//! The mDNS announcement coordinators discover workers by: service type [`SERVICE_TYPE`],
//! instance name = the node id, the QUIC port, and TXT properties `cluster` (the cluster id, never
//! the key), `node`, `name`, `version`, `port`, `cores`, `mem` (memory budget in bytes) and
//! `gemv` (GB/s, two decimals).
//!
//! Addresses: listening on a specific address announces that address, on that address's
//! interface only; listening on `0.0.0.0` announces the host's IPv4 addresses (loopback
//! included, so discovery works on a host or network namespace with nothing but `lo`); on `[::]`
//! all its addresses.

use std::net::SocketAddr;
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

use crate::node::{Node, VERSION};

/// The DNS-SD service type of moeshard workers.
pub const SERVICE_TYPE: &str = "_moeshard._udp.local.";

/// How long withdrawing the announcement may take at shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A running announcement; [`Announcement::stop`] withdraws it.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Announcement {
    /// Announces `node`, reachable at `listen` (the bound address), in cluster `cluster_id`.
    pub fn start(node: &Node, cluster_id: &str, listen: SocketAddr) -> Result<Self, mdns_sd::Error> {
        let daemon = ServiceDaemon::new()?;
        let properties = [
            ("cluster", cluster_id.to_owned()),
            ("node", node.node_id.clone()),
            ("name", node.name.clone()),
            ("version", VERSION.to_owned()),
            ("port", listen.port().to_string()),
            ("cores", node.cores.to_string()),
            ("mem", node.mem_budget.to_string()),
            ("gemv", format!("{:.2}", node.gemv_gbps)),
        ];
        let host = format!("{}.local.", node.node_id);
        let ip = listen.ip();
        let mut info = if ip.is_unspecified() {
            ServiceInfo::new(SERVICE_TYPE, &node.node_id, &host, (), listen.port(), &properties[..])?.enable_addr_auto()
        } else {
            ServiceInfo::new(SERVICE_TYPE, &node.node_id, &host, ip, listen.port(), &properties[..])?
        };
        info.set_interfaces(vec![match listen {
            SocketAddr::V4(a) if a.ip().is_unspecified() => IfKind::IPv4,
            SocketAddr::V6(a) if a.ip().is_unspecified() => IfKind::All,
            _ => IfKind::Addr(ip),
        }]);
        let fullname = info.get_fullname().to_owned();
        daemon.register(info)?;
        Ok(Announcement { daemon, fullname })
    }

    /// Withdraws the announcement (a goodbye packet) and stops the mDNS daemon. Blocks for at
    /// most a few seconds.
    pub fn stop(self) {
        match self.daemon.unregister(&self.fullname) {
            Ok(status) => {
                let _ = status.recv_timeout(STOP_TIMEOUT);
            }
            Err(err) => tracing::warn!("cannot withdraw the mDNS announcement: {err}"),
        }
        if let Ok(status) = self.daemon.shutdown() {
            let _ = status.recv_timeout(STOP_TIMEOUT);
        }
    }
}
