//! Node configuration: defaults, then a commented TOML file, then `CUSTOS_*` environment
//! variables (nested keys joined with `__`), then command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The default configuration file, with every key explained. `custos config` prints it.
pub const DEFAULT_TOML: &str = r#"# Custos node configuration.
#
# Every key can also be set with an environment variable CUSTOS_<KEY> (nested keys joined
# with a double underscore, e.g. CUSTOS_DELIVERY__TIMEOUT_SECS=5) and most with a flag of
# `custos serve` (see `custos serve --help`). Flags win over variables, variables over this file.

# This node's id in the cluster. 0: the first node of a cluster takes 1, a joining node is
# given the next free id when it joins; either way it is kept in <data_dir>/node-id. Set it
# only to pin an id; never reuse the id of a removed node.
node_id = 0

# Where the node keeps its RocksDB, admin token and snapshots.
data_dir = "./custos-data"

# Client API (entities, customers, operators): HTTP, or HTTPS when [tls] is set.
listen = "127.0.0.1:7700"

# Peer port for Raft traffic between nodes. Keep it on a private network.
peer_listen = "127.0.0.1:7701"

# The peer address other nodes use to reach this one (default: peer_listen; set it when
# peer_listen is a wildcard address such as 0.0.0.0:7701).
# peer_advertise = "10.0.0.5:7701"

# Peer addresses of members of an existing cluster to join (any one member will do). Empty:
# start (or restart) a cluster of its own. Restarting a member with the same list rejoins.
join = []

# The secret every node of a cluster shares; peers prove it on every request (a token derived
# from it), and it seals the cluster's token keys in the meta group. When unset, the first
# node generates one and keeps it in <data_dir>/cluster-secret; give joining nodes the same
# one. Prefer the CUSTOS_CLUSTER_SECRET variable to writing it here.
# cluster_secret = "..."

# The client API's public base URL, as customers' browsers reach it (used in the OAuth
# redirect URI entities send customers back to). Default: http(s)://<listen address>.
# public_url = "https://vault.example.com"

# Bearer token for operator calls (at most 256 bytes). When unset, one is generated at first
# start and kept in <data_dir>/admin-token. Prefer the CUSTOS_ADMIN_TOKEN variable to writing it here.
# admin_token = "..."

# Allow command delivery to loopback and private addresses (tests, single-host setups).
# Off by default, so a registered endpoint cannot reach into the operator's own network.
allow_private_targets = false

# Reverse proxies in front of the client API, as addresses or CIDR blocks. Only when a call
# comes from one of them is the client address taken from X-Forwarded-For (the right-most
# address that is not itself a trusted proxy): the portal's sign-in and sign-up limits count per
# client address, and behind a proxy every client would otherwise share the proxy's.
trusted_proxies = []

# Log format: "human" or "json". Log level filter, as in RUST_LOG (a RUST_LOG variable, when
# set, replaces it; the node logs a warning saying so at start).
log_format = "human"
log_level = "info,openraft=warn"

# How long activity, delivered commands and event dedup keys are kept.
retention_days = 30

# How often expired records are pruned.
prune_interval_secs = 3600

# A customer's profile actor is stopped after this long without messages; its state stays
# in RocksDB and is loaded again on the next message.
profile_idle_secs = 120

# Arbiters (event-loop threads) hosting profile actors; 0 = one per CPU.
profile_arbiters = 0

# After a secret rotation, the previous secret keeps verifying events for this long.
secret_grace_hours = 24

# Recommendations: shown at or above this calibrated confidence (0.5, more likely kept than
# not: measured through the API on the IFTTT split, about two thirds of the customers with 10+
# rules are shown one, and about three quarters of what is shown is kept; see the README);
# patterns kept by fewer than recommend_min_customers customers are never used (k-anonymity;
# at least 5);
# retrained this often (and on demand with POST /v1/recommendations/train).
recommend_threshold = 0.5
recommend_min_customers = 10
recommend_interval_secs = 3600
# Until a model covers recommend_min_customers customers (a young vault), training is retried
# this often, so the first customers get recommendations within minutes, not an hour.
recommend_warmup_secs = 60
# Retrained sooner when this many rules were saved or deleted since the last training (counted
# on the meta group's leader, in the groups it replicates), checked every recommend_warmup_secs.
recommend_retrain_changes = 1000
# Training reads at most about this many customers: beyond it, each data group keeps a
# deterministic sample (by customer id) of its share, so training time and memory stay bounded
# (about 1.1 GiB and 15 s on 2 cores at the default) however many customers there are.
recommend_max_customers = 200000
# RP3beta's popularity damping: 0.6 was best on validation customers through the shipped path
# (0.2 to 1.0 tried; see the README).
recommend_beta = 0.6

[portal]
# Portal sessions last this long, unless signed out (or "sign out everywhere").
session_hours = 168
# Sign-in and sign-up attempts allowed per minute for one email address (ten times as many
# for one client address, which many people may share).
sign_in_per_minute = 10
# AES-256-GCM keys (base64 of 32 bytes) sealing secrets at rest (customers' access and refresh
# tokens, entities' signing and OAuth client secrets), newest first: the first seals, every one
# opens, and so does the key the cluster generated when it was created (kept sealed under the
# cluster secret in the meta group), which is never dropped. To rotate, put a new key first and
# keep the old one until everything sealed under it was sealed again: links made again or
# unlinked, entities' secrets rotated or sent again. A node that starts without a key some
# entity's secret needs names those entities in its log; their events are answered 503 and
# their commands wait. Every node must list the same keys (prefer CUSTOS_PORTAL__TOKEN_KEYS).
# token_keys = ["base64..."]

[cluster]
# Data groups (Raft groups holding customers), fixed when the cluster is created. Each has
# min(3, nodes) voters; customers hash to 1024 slots, dealt over the groups. A group batches
# only its own writes and every entry has a fixed cost (an openraft round, a log append, a
# WAL sync request, an apply), so each group a node leads costs throughput: one group gave
# 0.77-0.94x etcd's puts/s on one node where 16 gave 0.46-0.56 (docs/benchmark-log.md). More
# groups spread the leaders, and with them the work, over the nodes: choose about one per node
# you will run when the cluster must use more than one node's CPU for writes.
data_groups = 1

[delivery]
# One entry per attempt: the first is the initial delivery, sent as soon as the event is
# accepted (its value is not waited for); each later one is the seconds to wait before that
# retry (at most 7 days each), the last the final retry. A 429 or 503 with Retry-After waits
# at least as long as the target asked.
retry_schedule_secs = [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
# Random spread added to each wait, as a fraction of it (0.1 = up to +10%).
jitter = 0.1
# Per-attempt timeout, in seconds (connect, send and read the answer).
timeout_secs = 15
# Delivery attempts sending at once, per data group (an attempt frees its slot when the
# target answers; the client keeps as many connections per target open between attempts).
concurrency = 256
# The share of those one target entity may hold (at least one slot): a target that answers
# slowly or not at all (each attempt waits up to timeout_secs) holds at most this share, and
# the other targets' deliveries keep going; its own wait, looked at again every half second.
per_target_share = 0.5

[raft]
# Heartbeat interval and election timeout range, in milliseconds. A leader's followers start
# an election after the timeout (and after its lease, the timeout's upper end, runs out): a
# failed leader is replaced in about one to one and a half seconds with these.
heartbeat_ms = 100
election_timeout_min_ms = 400
election_timeout_max_ms = 800
# Build a snapshot of a group (and compact its log) once at least this many entries, and at
# least snapshot_log_to_state bytes of log per byte of its last snapshot, were added since that
# one. A snapshot copies the group's whole state: with 1.0 the copying stays in proportion to
# the log (about a byte per byte of log) however large the group grows, and the log stays about
# as large as the state.
# The log keeps keep_logs_after_snapshot entries before the snapshot (a follower that lags less
# than that catches up from the log, not from a snapshot).
snapshot_every = 20000
snapshot_log_to_state = 1.0
keep_logs_after_snapshot = 1000
# How long a leader waits for a follower to take a snapshot's last chunk and install it (the
# install loads the whole group: openraft's 200 ms would cut a large group's install short,
# and send it again, for ever), in milliseconds; also each chunk's send timeout.
install_snapshot_timeout_ms = 120000
# How long a write waits to be committed (no quorum: 503 with Retry-After after this).
propose_timeout_ms = 5000
# Changes queued per group, waiting to be batched into an entry (more: 429 Retry-After).
proposal_queue = 8192

[storage]
# RocksDB's block cache, in MiB: table blocks kept uncompressed in memory, shared by every group
# of the node. It fills as blocks are read (a small vault never uses all of it) and is the
# node's largest memory use once the data outgrows it. Events for customers whose profiles are
# not loaded read their rules, links and routes from RocksDB: with the data set larger than
# this, those reads go to table files (a read, a decompression and a checksum per block).
# Give it about a quarter of the machine's memory on a dedicated node.
block_cache_mib = 1024

[peer_tls]
# PEM files for TLS on the peer port: this node's certificate and key, and the CA that signed
# every node's certificate (peers are verified against it). All three or none.
# cert = "/etc/custos/peer-cert.pem"
# key = "/etc/custos/peer-key.pem"
# ca = "/etc/custos/peer-ca.pem"

[tls]
# PEM files for HTTPS on the client API. Both or neither.
# cert = "/etc/custos/cert.pem"
# key = "/etc/custos/key.pem"
"#;

/// Portal settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortalConfig {
    /// Session lifetime.
    pub session_hours: f64,
    /// Sign-in rate limit per email and per client address.
    pub sign_in_per_minute: u32,
    /// Token sealing keys, newest first.
    pub token_keys: Vec<String>,
}

impl Default for PortalConfig {
    fn default() -> Self {
        PortalConfig {
            session_hours: 168.0,
            sign_in_per_minute: 10,
            token_keys: Vec::new(),
        }
    }
}

/// The longest wait before one retry: a schedule is bounded, and a wait this long (or any)
/// fits a `Duration` and a due time in milliseconds.
const MAX_RETRY_WAIT_SECS: f64 = 7.0 * 86_400.0;

/// Delivery settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// One entry per attempt: the first is sent at once, each later one waits this many
    /// seconds before its retry.
    pub retry_schedule_secs: Vec<f64>,
    /// Jitter fraction.
    pub jitter: f64,
    /// Per-attempt timeout.
    pub timeout_secs: f64,
    /// Attempts in flight.
    pub concurrency: usize,
    /// The share of `concurrency` one target entity may hold.
    pub per_target_share: f64,
}

/// The least `recommend_min_customers` accepted.
pub const MIN_K: u32 = 5;

impl DeliveryConfig {
    /// The sending slots one target may hold.
    pub fn per_target(&self) -> usize {
        ((self.concurrency as f64 * self.per_target_share) as usize).max(1)
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_schedule_secs: vec![0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
            jitter: 0.1,
            timeout_secs: 15.0,
            concurrency: 256,
            per_target_share: 0.5,
        }
    }
}

/// Cluster shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Data groups, fixed at creation.
    pub data_groups: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { data_groups: 1 }
    }
}

/// Peer TLS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// This node's certificate chain.
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
    /// The CA every peer certificate is signed by.
    pub ca: Option<PathBuf>,
}

/// Raft timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// Heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout, low end.
    pub election_timeout_min_ms: u64,
    /// Election timeout, high end.
    pub election_timeout_max_ms: u64,
    /// Entries between snapshots, at least.
    pub snapshot_every: u64,
    /// Bytes of log between snapshots per byte of the last snapshot, at least.
    pub snapshot_log_to_state: f64,
    /// Entries kept before the last snapshot.
    pub keep_logs_after_snapshot: u64,
    /// Longest wait for a snapshot's last chunk to be taken and installed (and for each
    /// chunk's send).
    pub install_snapshot_timeout_ms: u64,
    /// Commit deadline of a write.
    pub propose_timeout_ms: u64,
    /// Changes queued per group.
    pub proposal_queue: usize,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_every: 20000,
            snapshot_log_to_state: 1.0,
            keep_logs_after_snapshot: 1000,
            install_snapshot_timeout_ms: 120_000,
            propose_timeout_ms: 5000,
            proposal_queue: 8192,
        }
    }
}

/// Storage tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// RocksDB's block cache, MiB.
    pub block_cache_mib: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            block_cache_mib: (custos_raft::DbOptions::default().block_cache_bytes >> 20) as u64,
        }
    }
}

impl StorageConfig {
    /// The RocksDB options these settings stand for (after [`Config::check`]).
    pub fn db_options(&self) -> custos_raft::DbOptions {
        custos_raft::DbOptions {
            block_cache_bytes: usize::try_from(self.block_cache_mib << 20).unwrap_or(usize::MAX),
        }
    }
}

/// HTTPS settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain PEM.
    pub cert: Option<PathBuf>,
    /// Private key PEM.
    pub key: Option<PathBuf>,
}

/// The node's configuration (see [`DEFAULT_TOML`] for what each key means).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Node id.
    pub node_id: u64,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Client API address.
    pub listen: SocketAddr,
    /// Peer address.
    pub peer_listen: SocketAddr,
    /// Advertised peer address.
    pub peer_advertise: Option<String>,
    /// Public base URL of the client API.
    pub public_url: Option<String>,
    /// Admin token.
    pub admin_token: Option<String>,
    /// Members to join.
    pub join: Vec<String>,
    /// The cluster secret.
    pub cluster_secret: Option<String>,
    /// Deliver to private addresses.
    pub allow_private_targets: bool,
    /// Reverse proxies whose X-Forwarded-For is believed (addresses or CIDR blocks).
    pub trusted_proxies: Vec<String>,
    /// `human` or `json`.
    pub log_format: String,
    /// Log filter.
    pub log_level: String,
    /// Retention in days.
    pub retention_days: f64,
    /// Prune interval.
    pub prune_interval_secs: f64,
    /// Actor idle time.
    pub profile_idle_secs: f64,
    /// Actor arbiters.
    pub profile_arbiters: usize,
    /// Rotation grace.
    pub secret_grace_hours: f64,
    /// Recommendation display threshold.
    pub recommend_threshold: f64,
    /// k-anonymity for recommendations.
    pub recommend_min_customers: u32,
    /// Training interval.
    pub recommend_interval_secs: f64,
    /// Training retry interval while the model is young.
    pub recommend_warmup_secs: f64,
    /// Rule changes that trigger a retraining before the interval.
    pub recommend_retrain_changes: u64,
    /// Customers training reads at most (a deterministic sample beyond).
    pub recommend_max_customers: u32,
    /// RP3beta damping.
    pub recommend_beta: f64,
    /// Portal.
    pub portal: PortalConfig,
    /// Cluster shape.
    pub cluster: ClusterConfig,
    /// Delivery.
    pub delivery: DeliveryConfig,
    /// Raft.
    pub raft: RaftConfig,
    /// Storage.
    pub storage: StorageConfig,
    /// TLS.
    pub tls: TlsConfig,
    /// Peer TLS.
    pub peer_tls: PeerTlsConfig,
    /// Where `custos serve` reads this from (not a config key itself).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 0,
            data_dir: PathBuf::from("./custos-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 7701)),
            peer_advertise: None,
            public_url: None,
            admin_token: None,
            join: Vec::new(),
            cluster_secret: None,
            allow_private_targets: false,
            trusted_proxies: Vec::new(),
            log_format: "human".into(),
            log_level: "info,openraft=warn".into(),
            retention_days: 30.0,
            prune_interval_secs: 3600.0,
            profile_idle_secs: 120.0,
            profile_arbiters: 0,
            secret_grace_hours: 24.0,
            recommend_threshold: 0.5,
            recommend_min_customers: 10,
            recommend_interval_secs: 3600.0,
            recommend_warmup_secs: 60.0,
            recommend_retrain_changes: 1000,
            recommend_max_customers: 200_000,
            recommend_beta: 0.6,
            portal: PortalConfig::default(),
            cluster: ClusterConfig::default(),
            delivery: DeliveryConfig::default(),
            raft: RaftConfig::default(),
            storage: StorageConfig::default(),
            tls: TlsConfig::default(),
            peer_tls: PeerTlsConfig::default(),
            source: None,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, a variable or a flag has a bad value.
    #[error("configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    /// The values do not make sense together.
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Flag values that override the file and environment (only the ones given).
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    /// `--node-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--peer-listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<SocketAddr>,
    /// `--allow-private-targets`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_private_targets: Option<bool>,
    /// `--log-format`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// `--join` (repeatable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<Vec<String>>,
    /// `--peer-advertise`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_advertise: Option<String>,
}

impl Config {
    /// Loads defaults < `file` < `CUSTOS_*` variables < `flags`, then checks the result.
    pub fn load(file: Option<PathBuf>, flags: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        let fig = fig
            .merge(
                Env::prefixed("CUSTOS_")
                    // The CLI's, entity-sim's and the scripts' own variables: set in the same
                    // shell, they are not configuration (unknown keys are refused).
                    .ignore(&[
                        "config",
                        "url",
                        "token",
                        "entity_secret",
                        "sim_client_secret",
                        "bin",
                        "image",
                        "base_image",
                        "oidc_venv",
                        "contract_venv",
                        "ifttt_data",
                    ])
                    .split("__"),
            )
            .merge(Serialized::defaults(flags));
        let mut config: Config = fig.extract().map_err(Box::new)?;
        config.source = file;
        config.check()?;
        Ok(config)
    }

    /// The trusted proxies, parsed (an address is a block of one); unparsable ones left out.
    pub fn trusted_proxy_nets(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| {
                let p = p.trim();
                p.parse::<ipnet::IpNet>()
                    .ok()
                    .or_else(|| p.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
            })
            .collect()
    }

    /// When a group builds a snapshot.
    pub fn snapshot_policy(&self) -> custos_raft::SnapshotPolicy {
        custos_raft::SnapshotPolicy {
            min_entries: self.raft.snapshot_every,
            log_per_state_byte: self.raft.snapshot_log_to_state,
        }
    }

    /// Rejects values that cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.join.len() > 16 || self.join.iter().any(|j| j.is_empty() || j.len() > 256) {
            return bad("join: at most 16 peer addresses of 1..=256 bytes");
        }
        let c = self.cluster.data_groups;
        if !(1..=custos_raft::shard::MAX_DATA_GROUPS).contains(&c) {
            return bad("cluster.data_groups must be in 1..=256");
        }
        let t = &self.peer_tls;
        if !((t.cert.is_some() == t.key.is_some()) && (t.key.is_some() == t.ca.is_some())) {
            return bad("peer_tls: set cert, key and ca, or none of them");
        }
        if !(100..=600_000).contains(&self.raft.propose_timeout_ms) {
            return bad("raft.propose_timeout_ms must be in 100..=600000");
        }
        if !(1..=1_000_000).contains(&self.raft.proposal_queue) {
            return bad("raft.proposal_queue must be in 1..=1000000");
        }
        if self.raft.snapshot_every == 0 {
            return bad("raft.snapshot_every must be at least 1");
        }
        if !(0.0..=100.0).contains(&self.raft.snapshot_log_to_state) {
            return bad("raft.snapshot_log_to_state must be between 0 and 100");
        }
        if !(8..=1 << 20).contains(&self.storage.block_cache_mib) {
            return bad("storage.block_cache_mib must be in 8..=1048576");
        }
        if self.trusted_proxies.len() > 64
            || self.trusted_proxy_nets().len() != self.trusted_proxies.len()
        {
            return bad(
                "trusted_proxies: at most 64 addresses or CIDR blocks (e.g. \"10.0.0.0/8\")",
            );
        }
        // A longer one would be refused on every call (bearer tokens are read up to 256 bytes).
        if self.admin_token.as_ref().is_some_and(|t| t.len() > 256) {
            return bad("admin_token: at most 256 bytes");
        }
        if !matches!(self.log_format.as_str(), "human" | "json") {
            return bad("log_format must be \"human\" or \"json\"");
        }
        let d = &self.delivery;
        if d.retry_schedule_secs.is_empty()
            || d.retry_schedule_secs
                .iter()
                .any(|s| !(0.0..=MAX_RETRY_WAIT_SECS).contains(s))
        {
            return bad(
                "delivery.retry_schedule_secs must be a non-empty list of seconds in 0..=604800 \
                 (7 days)",
            );
        }
        if !(0.0..=1.0).contains(&d.jitter) {
            return bad("delivery.jitter must be between 0 and 1");
        }
        if !(d.timeout_secs > 0.0 && d.timeout_secs <= 300.0) {
            return bad("delivery.timeout_secs must be in (0, 300]");
        }
        if d.concurrency == 0 || d.concurrency > 10_000 {
            return bad("delivery.concurrency must be in 1..=10000");
        }
        if !(d.per_target_share > 0.0 && d.per_target_share <= 1.0) {
            return bad("delivery.per_target_share must be in (0, 1]");
        }
        // Each made into a Duration, which panics past its range (1e20 s passed a "> 0" check
        // and stopped the node after its ports were open): at most ten years each.
        const TEN_YEARS_SECS: f64 = 10.0 * 365.0 * 86_400.0;
        for (name, v, unit_secs) in [
            ("retention_days", self.retention_days, 86_400.0),
            ("prune_interval_secs", self.prune_interval_secs, 1.0),
            ("profile_idle_secs", self.profile_idle_secs, 1.0),
            ("secret_grace_hours", self.secret_grace_hours, 3_600.0),
            ("recommend_interval_secs", self.recommend_interval_secs, 1.0),
            ("recommend_warmup_secs", self.recommend_warmup_secs, 1.0),
            ("portal.session_hours", self.portal.session_hours, 3_600.0),
        ] {
            if !(v.is_finite() && v > 0.0 && v * unit_secs <= TEN_YEARS_SECS) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be > 0 and at most ten years"
                )));
            }
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0
            || r.election_timeout_min_ms <= r.heartbeat_ms
            || r.election_timeout_max_ms <= r.election_timeout_min_ms
        {
            return bad(
                "raft: need 0 < heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms",
            );
        }
        if !(0.0..=1.0).contains(&self.recommend_threshold)
            || !(0.0..=2.0).contains(&self.recommend_beta)
        {
            return bad("recommend_threshold must be in [0, 1] and recommend_beta in [0, 2]");
        }
        // The model stores a template's condition and data when that many customers agree on
        // them, and serves them to others: with one (or a few), that is a customer's own rule.
        if self.recommend_min_customers < MIN_K {
            return bad(&format!(
                "recommend_min_customers must be at least {MIN_K} (k-anonymity: the model \
                 stores and serves what that many customers share)"
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls: set both cert and key, or neither");
        }
        Ok(())
    }

    /// The peer address other nodes dial.
    pub fn peer_address(&self) -> String {
        self.peer_advertise
            .clone()
            .unwrap_or_else(|| self.peer_listen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commented_default_file_is_the_default() {
        let from_file: Config = Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("default TOML parses");
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = Config::default();
        c.delivery.retry_schedule_secs = vec![];
        assert!(c.check().is_err());
        for wait in [-1.0, f64::INFINITY, 1e20, 604_801.0] {
            let mut c = Config::default();
            c.delivery.retry_schedule_secs = vec![0.0, wait];
            assert!(c.check().is_err(), "retry wait {wait}");
        }
        let mut c = Config::default();
        c.tls.cert = Some("x".into());
        assert!(c.check().is_err());
        let c = Config {
            admin_token: Some("a".repeat(257)),
            ..Config::default()
        };
        assert!(c.check().is_err());
        let mut c = Config::default();
        c.storage.block_cache_mib = 0;
        assert!(c.check().is_err());
        for ratio in [-1.0, f64::NAN, 101.0] {
            let mut c = Config::default();
            c.raft.snapshot_log_to_state = ratio;
            assert!(c.check().is_err(), "snapshot_log_to_state = {ratio}");
        }
        let mut c = Config::default();
        c.raft.snapshot_every = 0;
        assert!(c.check().is_err());
        for hours in [0.0, -1.0, f64::NAN, 1e20] {
            let mut c = Config::default();
            c.portal.session_hours = hours;
            assert!(c.check().is_err(), "session_hours = {hours}");
        }
        let c = Config {
            prune_interval_secs: 1e20,
            ..Config::default()
        };
        assert!(c.check().is_err());
        for k in [0, 1, MIN_K - 1] {
            let c = Config {
                recommend_min_customers: k,
                ..Config::default()
            };
            assert!(c.check().is_err(), "recommend_min_customers = {k}");
        }
        for share in [0.0, -0.5, 1.5, f64::NAN] {
            let mut c = Config::default();
            c.delivery.per_target_share = share;
            assert!(c.check().is_err(), "per_target_share = {share}");
        }
        assert_eq!(Config::default().delivery.per_target(), 128);
        assert!(Config::default().check().is_ok());
    }
}
