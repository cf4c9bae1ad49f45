//! The command line of `moeshard-worker` and the [`Settings`] resolved from it (key, memory
//! budget, cache directory, name and thread count defaults).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Parser;
use moeshard_kernels::affinity::CpuList;
use moeshard_protocol::auth::ClusterKey;

use crate::sched::SchedPolicy;

/// The environment variable that may hold the cluster key.
pub const KEY_ENV: &str = "MOESHARD_CLUSTER_KEY";

/// The one-line error printed when no key is given.
pub const NO_KEY_MESSAGE: &str = "no cluster key given: pass --cluster-key KEY, --cluster-key-file FILE, \
                                  or set MOESHARD_CLUSTER_KEY (a coordinator started without a key prints one)";

/// Share of physical memory (MemTotal) used as the default memory budget, in percent.
const DEFAULT_BUDGET_PERCENT: u64 = 75;

/// `moeshard-worker`: holds expert shards for moeshard coordinators on this machine.
///
/// No `Debug`: it may carry the cluster key.
#[derive(Parser)]
#[command(name = "moeshard-worker", version, about)]
pub struct Args {
    /// UDP address the QUIC endpoint binds (port 0 picks a free one).
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:7737")]
    pub listen: SocketAddr,
    /// The cluster key (at least 16 characters). Alternatives: --cluster-key-file, or the
    /// MOESHARD_CLUSTER_KEY environment variable.
    #[arg(long, value_name = "KEY", conflicts_with = "cluster_key_file")]
    pub cluster_key: Option<String>,
    /// A file whose content (surrounding whitespace trimmed) is the cluster key.
    #[arg(long, value_name = "FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Memory the worker may use for expert weights: bytes, or with a binary suffix K, M, G, T
    /// (e.g. 8G, 512M). Default: 75% of MemTotal.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem_budget: Option<u64>,
    /// Directory of the expert cache (one file per weight blob, named by its BLAKE3 hash).
    /// Default: $XDG_CACHE_HOME/moeshard/experts, else ~/.cache/moeshard/experts.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compute threads. Default: all available cores (with --cpus, one per CPU listed).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,
    /// Name shown to coordinators. Default: the host name.
    #[arg(long)]
    pub name: Option<String>,
    /// Do not announce the worker over mDNS (coordinators then need --worker HOST:PORT).
    #[arg(long)]
    pub no_mdns: bool,
    /// A local copy of the model file (GGUF): assigned experts found in it at the announced
    /// offsets with the announced hashes are not shipped.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Linux scheduling policy of the worker's threads: `batch` (SCHED_BATCH: a batch that
    /// arrives never preempts the running task, such as a coordinator on this machine still
    /// sending the layer to other workers, or your programs) or `normal` (SCHED_OTHER: it
    /// preempts them).
    #[arg(long, value_enum, default_value = "batch")]
    pub sched: SchedPolicy,
    /// Keep every worker thread on these CPUs, in taskset's list form (e.g. `0-3` or `1,3`).
    /// Give each of several workers on one machine its own CPUs: unpinned, Linux may queue two
    /// of them on one core while the other idles. Default: wherever Linux places them.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,
}

/// Everything the daemon needs, defaults applied. No `Debug`: it holds the key.
pub struct Settings {
    /// UDP address to bind.
    pub listen: SocketAddr,
    /// The cluster key.
    pub key: ClusterKey,
    /// Memory budget for expert weights, in bytes.
    pub mem_budget: u64,
    /// Directory of the expert cache.
    pub cache_dir: PathBuf,
    /// Compute threads.
    pub threads: usize,
    /// Node name shown to coordinators.
    pub name: String,
    /// Whether to announce over mDNS.
    pub mdns: bool,
    /// A local copy of the model file.
    pub model: Option<PathBuf>,
    /// Scheduling policy of every worker thread.
    pub sched: SchedPolicy,
    /// The CPUs every worker thread is kept on (`None`: no pinning).
    pub cpus: Option<CpuList>,
}

impl Args {
    /// Applies the defaults and reads the key from the flag, the key file or [`KEY_ENV`] (in that
    /// order). Errors name what is missing or wrong; they never contain the key.
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let key = resolve_key(self.cluster_key, self.cluster_key_file.as_deref(), std::env::var_os(KEY_ENV))?;
        let mem_budget = match self.mem_budget {
            Some(bytes) => bytes,
            None => default_mem_budget()?,
        };
        let cache_dir = match self.cache_dir {
            Some(dir) => dir,
            None => default_cache_dir(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))?,
        };
        let threads = match (self.threads, &self.cpus) {
            (Some(n), _) => n as usize,
            (None, Some(cpus)) => cpus.cpus().len(),
            (None, None) => std::thread::available_parallelism().map_or(1, usize::from),
        };
        let name = self.name.unwrap_or_else(host_name);
        Ok(Settings {
            listen: self.listen,
            key,
            mem_budget,
            cache_dir,
            threads,
            name,
            mdns: !self.no_mdns,
            model: self.model,
            sched: self.sched,
            cpus: self.cpus,
        })
    }
}

/// The key from `flag`, else the file at `file`, else the environment value `env`.
pub fn resolve_key(flag: Option<String>, file: Option<&Path>, env: Option<OsString>) -> anyhow::Result<ClusterKey> {
    let (text, source) = if let Some(text) = flag {
        (text, "--cluster-key".to_owned())
    } else if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the cluster key file {}", path.display()))?;
        (text, format!("the cluster key file {}", path.display()))
    } else if let Some(value) = env {
        let text = value.into_string().map_err(|_| anyhow::anyhow!("{KEY_ENV} is not valid UTF-8"))?;
        (text, KEY_ENV.to_owned())
    } else {
        bail!(NO_KEY_MESSAGE);
    };
    ClusterKey::parse(&text).with_context(|| format!("invalid cluster key from {source}"))
}

/// Parses a size in bytes: digits with an optional binary suffix `K`, `M`, `G` or `T` (powers of
/// 1024), optionally followed by `B` or `iB`, case-insensitive (`8G`, `512MiB`, `1048576`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let upper = s.trim().to_ascii_uppercase();
    let split = upper.find(|c: char| !c.is_ascii_digit()).unwrap_or(upper.len());
    let (digits, suffix) = upper.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size (e.g. 8G, 512M, 1048576)"))?;
    let unit = suffix.strip_suffix("IB").or_else(|| suffix.strip_suffix('B')).unwrap_or(suffix);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{s}`: unknown size suffix `{suffix}` (use K, M, G or T)")),
    };
    match value.checked_mul(1 << shift) {
        Some(0) => Err("the memory budget must be positive".to_owned()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("`{s}` is too large")),
    }
}

/// 75% of MemTotal from `/proc/meminfo`, in bytes.
fn default_mem_budget() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .context("cannot read /proc/meminfo for the default memory budget; pass --mem-budget")?;
    let total = mem_total_bytes(&meminfo).context("no MemTotal in /proc/meminfo; pass --mem-budget")?;
    Ok(total / 100 * DEFAULT_BUDGET_PERCENT)
}

/// MemTotal in bytes from the text of `/proc/meminfo` (which states it in KiB).
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// `$XDG_CACHE_HOME/moeshard/experts`, else `$HOME/.cache/moeshard/experts`.
fn default_cache_dir(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> anyhow::Result<PathBuf> {
    let base = match (xdg_cache_home.filter(|v| !v.is_empty()), home.filter(|v| !v.is_empty())) {
        (Some(xdg), _) => PathBuf::from(xdg),
        (None, Some(home)) => PathBuf::from(home).join(".cache"),
        (None, None) => bail!("neither XDG_CACHE_HOME nor HOME is set; pass --cache-dir"),
    };
    Ok(base.join("moeshard").join("experts"))
}

/// The kernel's host name, or `"moeshard-worker"` where it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "moeshard-worker".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "a cluster key for tests";

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "G", "1.5G", "8X", "-1", "0", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_sources_in_order() {
        let dir = std::env::temp_dir().join(format!("moeshard-worker-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("key");
        std::fs::write(&file, "a key from a file, long enough\n").expect("key file");
        let env = Some(OsString::from("a key from the environment"));

        let from_flag = resolve_key(Some(KEY.into()), Some(&file), env.clone()).expect("flag");
        assert_eq!(from_flag.reveal(), KEY);
        let from_file = resolve_key(None, Some(&file), env.clone()).expect("file");
        assert_eq!(from_file.reveal(), "a key from a file, long enough");
        assert_eq!(resolve_key(None, None, env).expect("env").reveal(), "a key from the environment");

        let none = resolve_key(None, None, None).expect_err("no key");
        assert_eq!(none.to_string(), NO_KEY_MESSAGE);
        let short = resolve_key(Some("short".into()), None, None).expect_err("short key");
        assert!(format!("{short:#}").contains("at least 16"), "{short:#}");
        let missing = resolve_key(None, Some(&dir.join("absent")), None).expect_err("missing file");
        assert!(missing.to_string().contains("cannot read the cluster key file"), "{missing}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn meminfo_and_cache_dir() {
        let meminfo = "MemTotal:       24684092 kB\nMemFree:        19597104 kB\n";
        assert_eq!(mem_total_bytes(meminfo), Some(24_684_092 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);

        let dir = default_cache_dir(Some("/x/cache".into()), Some("/home/u".into())).expect("xdg");
        assert_eq!(dir, Path::new("/x/cache/moeshard/experts"));
        let dir = default_cache_dir(Some("".into()), Some("/home/u".into())).expect("home");
        assert_eq!(dir, Path::new("/home/u/.cache/moeshard/experts"));
        assert!(default_cache_dir(None, None).is_err());
    }
}
