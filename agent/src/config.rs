//! The agent's TOML configuration: every key has a default, unknown keys are refused.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default cap on one reassembled container log line: 1 MiB (the config is a leaf of the
/// module graph, so the Docker source takes its default from here).
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// Default database location.
pub const DEFAULT_DB_PATH: &str = "/var/lib/nattrail/nattrail.duckdb";

// Upper bounds of the values that size what the agent allocates or spawns at start: a typo
// of a few digits must be refused, not end in an abort or a panic inside a channel.

/// Largest `conntrack.channel_capacity`: the channel allocates every slot at start.
pub const MAX_CONNTRACK_CHANNEL: usize = 1 << 22;
/// Largest `docker.channel_capacity`: every scan worker's channel allocates its slots at start.
pub const MAX_SCAN_CHANNEL: usize = 1 << 16;
/// Most scan worker threads (`docker.scan_workers`).
pub const MAX_SCAN_WORKERS: usize = 256;
/// Largest `docker.max_line_bytes`: what one container stream can make the agent buffer.
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// Largest `webhooks.queue_capacity` (tokio's channel panics above `usize::MAX >> 3`).
pub const MAX_WEBHOOK_QUEUE: usize = 1 << 20;
/// Most webhook delivery tasks (`webhooks.workers`), all spawned at start.
pub const MAX_WEBHOOK_WORKERS: usize = 1024;

/// Errors of loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is invalid, has an unknown key or a bad value (the message names it).
    #[error("config file {path}: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// toml's message, which names the key and the line.
        message: String,
    },
    /// A value is out of range.
    #[error("config key {key}: {message}")]
    Invalid {
        /// Dotted key name.
        key: &'static str,
        /// Why it is refused.
        message: String,
    },
}

/// Which flows the conntrack reader keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum CaptureFilter {
    /// Only flows with IPS_SRC_NAT (the gateway's translations).
    #[default]
    Snat,
    /// Every flow.
    All,
}

/// Top-level configuration.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// DuckDB file.
    pub db_path: PathBuf,
    /// The conntrack source.
    pub conntrack: ConntrackConfig,
    /// The event writer.
    pub store: StoreConfig,
    /// Backlogs between stages.
    pub pipeline: PipelineConfig,
    /// The admin HTTP API.
    pub api: ApiConfig,
    /// Container log scanning.
    pub docker: DockerConfig,
    /// Webhook delivery of triggers.
    pub webhooks: WebhooksConfig,
    /// eBPF host attribution.
    pub ebpf: EbpfConfig,
}

/// `[ebpf]`: host attribution with eBPF programs (CAP_BPF and CAP_PERFMON needed; without
/// them the agent runs on and `status` says why eBPF is off).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    /// Load the eBPF programs at all.
    pub enabled: bool,
    /// Record process executions (`process_events`).
    pub exec: bool,
    /// Record process forks and exits (`process_events`).
    pub fork_exit: bool,
    /// Record which process and container owned each socket (`socket_events`): programs on
    /// socket(), connect(), sendmsg() and egress, attached at the cgroup-v2 root.
    pub sockets: bool,
    /// The exec program's name in the eBPF object (for tests of a refused load).
    pub exec_program: String,
    /// Capacity of the channel from the eBPF reader to the writer, in records (it waits
    /// when full; records then queue in the ring buffer, and a full ring is counted as lost).
    pub channel_capacity: usize,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig {
            enabled: true,
            exec: true,
            fork_exit: true,
            sockets: true,
            exec_program: "nattrail_exec".into(),
            channel_capacity: 8192,
        }
    }
}

/// `[webhooks]`: trigger delivery.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Dispatch triggers at all.
    pub enabled: bool,
    /// Networks the SSRF guard lets through despite its rules (e.g. "127.0.0.1/32" for a
    /// local receiver).
    #[schemars(with = "Vec<String>")]
    pub allow: Vec<ipnet::IpNet>,
    /// Deliveries waiting before new ones are dropped (and counted).
    pub queue_capacity: usize,
    /// Deliveries in flight at once.
    pub workers: usize,
    /// Time limit of one attempt, in ms.
    pub timeout_ms: u64,
    /// Attempts per delivery.
    pub max_attempts: u32,
    /// How long a stop waits for queued and in-flight deliveries, in ms.
    pub shutdown_grace_ms: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            enabled: true,
            allow: Vec::new(),
            queue_capacity: 1024,
            workers: 4,
            timeout_ms: 5_000,
            max_attempts: 5,
            shutdown_grace_ms: 5_000,
        }
    }
}

/// `[docker]`: container discovery, log tails and the scan workers.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Scan container logs at all.
    pub enabled: bool,
    /// dockerd's API socket.
    pub socket: PathBuf,
    /// Labels whose values name a container's workload, besides its name and compose
    /// service.
    pub workload_labels: Vec<String>,
    /// Hits per second one container may produce (its token bucket's rate).
    pub hits_per_sec: u32,
    /// Burst of that bucket.
    pub hits_burst: u32,
    /// Scan worker threads (each owns a share of the containers).
    pub scan_workers: usize,
    /// Line batches waiting for each worker before tails are slowed down.
    pub channel_capacity: usize,
    /// Cap on one reassembled line, in bytes (the rest is skipped to the newline).
    pub max_line_bytes: usize,
    /// How often a container's read position is saved when it produces no hit, in ms.
    pub cursor_interval_ms: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: true,
            socket: PathBuf::from("/var/run/docker.sock"),
            workload_labels: vec!["nattrail.workload".into()],
            hits_per_sec: 10,
            hits_burst: 50,
            scan_workers: 2,
            channel_capacity: 128,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            cursor_interval_ms: 1_000,
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the API at all.
    pub enabled: bool,
    /// TCP address; empty for none.
    pub listen: String,
    /// Unix socket path; empty for none.
    pub socket: String,
    /// Bearer token file; empty means `api.token` in the database's private directory.
    pub token_file: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most rows `/sql` returns; more is an error.
    pub sql_row_limit: usize,
    /// `/sql` queries are interrupted after this long (preparation included).
    pub sql_timeout_ms: u64,
    /// Largest `/sql` answer, in bytes of JSON; larger is an error, not a silent cut.
    pub sql_max_result_bytes: usize,
    /// `/sql` queries running at once; more are answered 429.
    pub sql_max_concurrent: usize,
    /// A connection must send its request headers within this long.
    pub header_timeout_ms: u64,
    /// Any request is answered 408 after this long.
    pub request_timeout_ms: u64,
    /// Open connections per listener; a full house evicts the oldest one that sent nothing.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: "127.0.0.1:7466".into(),
            socket: String::new(),
            token_file: String::new(),
            max_body_bytes: 64 * 1024,
            sql_row_limit: 10_000,
            sql_timeout_ms: 10_000,
            sql_max_result_bytes: 16 << 20,
            sql_max_concurrent: 4,
            header_timeout_ms: 5_000,
            request_timeout_ms: 60_000,
            max_connections: 64,
        }
    }
}

/// `[pipeline]`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// At most one backlog warning per stage per this many seconds.
    pub warn_interval_secs: u64,
    /// How long a producer that may drop waits above the high-water mark before dropping.
    pub max_wait_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            warn_interval_secs: 60,
            max_wait_ms: 20,
        }
    }
}

/// `[conntrack]`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Whether to read conntrack at all.
    pub enabled: bool,
    /// Receive buffer requested with SO_RCVBUFFORCE.
    pub rcvbuf_bytes: usize,
    /// "snat" (default) or "all".
    pub filter: CaptureFilter,
    /// Set `net.netfilter.nf_conntrack_events=1` at start.
    pub set_events: bool,
    /// Set `net.netfilter.nf_conntrack_acct=1` at start.
    pub set_acct: bool,
    /// Set `net.netfilter.nf_conntrack_timestamp=1` at start.
    pub set_timestamp: bool,
    /// Put the sysctls back as found when the agent stops.
    pub restore_sysctls: bool,
    /// Dump the conntrack table at start so open flows enter the trail.
    pub dump_at_start: bool,
    /// Capacity of the channel from the reader to the writer, in events.
    pub channel_capacity: usize,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Commit after this many rows.
    pub batch_rows: usize,
    /// Commit at least this often, in milliseconds.
    pub commit_interval_ms: u64,
    /// DuckDB's memory limit in MiB (buffer pool, appender buffers, queries).
    pub memory_limit_mb: u64,
    /// DuckDB's worker threads in the agent (hourly seals, checkpoints, API queries).
    pub threads: u32,
    /// Keep at least this many days of flows; older UTC days are removed whole. 0 keeps
    /// everything.
    pub retain_days: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            db_path: PathBuf::from(DEFAULT_DB_PATH),
            conntrack: ConntrackConfig::default(),
            store: StoreConfig::default(),
            pipeline: PipelineConfig::default(),
            api: ApiConfig::default(),
            docker: DockerConfig::default(),
            webhooks: WebhooksConfig::default(),
            ebpf: EbpfConfig::default(),
        }
    }
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            enabled: true,
            rcvbuf_bytes: 64 << 20,
            filter: CaptureFilter::Snat,
            set_events: true,
            set_acct: true,
            set_timestamp: true,
            restore_sysctls: false,
            dump_at_start: true,
            channel_capacity: 65_536,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            // Four DuckDB row groups, two for each of the tables a flow writes (journal and
            // slices): each appender moves every row group's worth into its transaction
            // (`ChunkAppender`), and DuckDB writes whole row groups compressed, once, rather
            // than through its WAL and a checkpoint. 1.6-1.9 times the events a second of
            // 122,880 (`cargo xtask bench ingest`, docs/DESIGN-trail.md); the commit interval
            // still bounds what a crash loses.
            batch_rows: 491_520,
            commit_interval_ms: 1_000,
            // With one thread and the seal in chunks, 64 MiB (DuckDB's floor here) seals
            // hours of 10 M slices and holds 2 M open flows in 240 MiB of agent; at 256 MiB
            // the same agent peaked at 430.
            memory_limit_mb: 64,
            // One: each DuckDB thread brings buffers of its own (a seal of 2 M slices ran out
            // of memory at 64 MiB on two threads); the seal is a background job, and the
            // capture keeps the other core.
            threads: 1,
            retain_days: 0,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.conntrack.rcvbuf_bytes < 4096 {
            return Err(ConfigError::Invalid {
                key: "conntrack.rcvbuf_bytes",
                message: format!(
                    "{} is below the 4096-byte minimum",
                    self.conntrack.rcvbuf_bytes
                ),
            });
        }
        let d = &self.docker;
        for (key, zero) in [
            ("docker.hits_per_sec", d.hits_per_sec == 0),
            ("docker.hits_burst", d.hits_burst == 0),
            ("docker.scan_workers", d.scan_workers == 0),
            ("docker.channel_capacity", d.channel_capacity == 0),
            ("docker.max_line_bytes", d.max_line_bytes < 64),
        ] {
            if zero {
                return Err(ConfigError::Invalid {
                    key,
                    message: "is too small (must be at least 1; max_line_bytes at least 64)".into(),
                });
            }
        }
        let w = &self.webhooks;
        for (key, value, max) in [
            (
                "conntrack.channel_capacity",
                self.conntrack.channel_capacity,
                MAX_CONNTRACK_CHANNEL,
            ),
            (
                "docker.channel_capacity",
                d.channel_capacity,
                MAX_SCAN_CHANNEL,
            ),
            ("docker.scan_workers", d.scan_workers, MAX_SCAN_WORKERS),
            ("docker.max_line_bytes", d.max_line_bytes, MAX_LINE_BYTES),
            (
                "webhooks.queue_capacity",
                w.queue_capacity,
                MAX_WEBHOOK_QUEUE,
            ),
            ("webhooks.workers", w.workers, MAX_WEBHOOK_WORKERS),
            (
                "ebpf.channel_capacity",
                self.ebpf.channel_capacity,
                MAX_CONNTRACK_CHANNEL,
            ),
        ] {
            if value > max {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{value} is above the maximum {max}"),
                });
            }
        }
        if self.conntrack.channel_capacity == 0 {
            return Err(ConfigError::Invalid {
                key: "conntrack.channel_capacity",
                message: "must be at least 1".into(),
            });
        }
        if self.store.batch_rows == 0 {
            return Err(ConfigError::Invalid {
                key: "store.batch_rows",
                message: "must be at least 1".into(),
            });
        }
        if !self.api.listen.is_empty() && self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                key: "api.listen",
                message: format!("{:?} is not an IP:PORT address", self.api.listen),
            });
        }
        if self.pipeline.warn_interval_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "pipeline.warn_interval_secs",
                message: "must be at least 1".into(),
            });
        }
        if self.store.threads == 0 {
            return Err(ConfigError::Invalid {
                key: "store.threads",
                message: "must be at least 1".into(),
            });
        }
        if self.store.commit_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "store.commit_interval_ms",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "test").unwrap();
        assert_eq!(c.db_path, PathBuf::from(DEFAULT_DB_PATH));
        assert_eq!(c.conntrack.rcvbuf_bytes, 64 << 20);
        assert_eq!(c.conntrack.filter, CaptureFilter::Snat);
    }

    #[test]
    fn contract_keys_parse() {
        let c = Config::parse(
            "db_path = \"/tmp/x.duckdb\"\n[conntrack]\nrcvbuf_bytes = 8192\nfilter = \"all\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.db_path, PathBuf::from("/tmp/x.duckdb"));
        assert_eq!(c.conntrack.rcvbuf_bytes, 8192);
        assert_eq!(c.conntrack.filter, CaptureFilter::All);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[conntrack]\nrcvbuf = 1\n", "test").unwrap_err();
        assert!(e.to_string().contains("rcvbuf"), "{e}");
        let e = Config::parse("colour = \"blue\"\n", "test").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn sizes_allocated_at_start_are_bounded() {
        // Found by tests/hostile_bytes.rs: these were accepted, and the agent then panicked
        // at start (crossbeam: "bounded channel capacity is too large"; tokio: "a semaphore
        // may not have more than MAX_PERMITS permits") or tried to allocate every slot.
        for (text, key) in [
            (
                "[conntrack]\nchannel_capacity = 9223372036854775807\n",
                "conntrack.channel_capacity",
            ),
            (
                "[webhooks]\nqueue_capacity = 9223372036854775807\n",
                "webhooks.queue_capacity",
            ),
            (
                "[docker]\nchannel_capacity = 4000000000\n",
                "docker.channel_capacity",
            ),
            ("[docker]\nscan_workers = 1000000\n", "docker.scan_workers"),
            (
                "[docker]\nmax_line_bytes = 1099511627776\n",
                "docker.max_line_bytes",
            ),
            ("[webhooks]\nworkers = 4294967296\n", "webhooks.workers"),
        ] {
            let e = Config::parse(text, "test").unwrap_err();
            assert!(
                matches!(e, ConfigError::Invalid { key: k, .. } if k == key),
                "{text}: {e}"
            );
        }
        let at_max = format!("[conntrack]\nchannel_capacity = {MAX_CONNTRACK_CHANNEL}\n");
        assert_eq!(
            Config::parse(&at_max, "test")
                .unwrap()
                .conntrack
                .channel_capacity,
            MAX_CONNTRACK_CHANNEL
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let e = Config::parse("[conntrack]\nfilter = \"dnat\"\n", "test").unwrap_err();
        assert!(e.to_string().contains("dnat"), "{e}");
        let e = Config::parse("[conntrack]\nrcvbuf_bytes = 10\n", "test").unwrap_err();
        assert!(e.to_string().contains("conntrack.rcvbuf_bytes"), "{e}");
    }
}
