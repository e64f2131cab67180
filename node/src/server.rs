//! Starting and stopping a node: `run(config, listeners, shutdown)`.
//!
//! Order matters for a joining node: its peer port must answer before the cluster can add it
//! as a replica, so both HTTP servers start before the node waits for its meta replica.

use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{middleware, web, App, HttpServer};
use custos_api::types::unix_now_ms;
use custos_raft::network::Peers;
use custos_raft::{ChangeOutcome, StateChange, META_GROUP};
use openraft::SnapshotPolicy;
use tokio::sync::{mpsc, watch};

use crate::cluster::{self, wire::JoinRequest};
use crate::config::Config;
use crate::core::{Core, Group};
use crate::forward::OnPeerPort;
use crate::peer::PeerToken;
use crate::profile::ProfileRouter;
use crate::service::Vault;
use crate::telemetry::Telemetry;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Files, sockets.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Storage.
    #[error("storage: {0}")]
    Store(#[from] custos_raft::StoreError),
    /// Raft refused its configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
    /// TLS files.
    #[error("tls: {0}")]
    Tls(String),
    /// Token sealing keys.
    #[error("portal: {0}")]
    Seal(#[from] crate::seal::SealError),
    /// The outbound client and its guard.
    #[error("{0}")]
    Outbound(#[from] crate::outbound::OutboundError),
    /// Joining or forming the cluster.
    #[error("cluster: {0}")]
    Cluster(String),
    /// A service call made while starting.
    #[error("{0}")]
    Service(#[from] crate::error::ServiceError),
}

/// The two sockets a node serves, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// Client API.
    pub api: TcpListener,
    /// Peer RPC.
    pub peer: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Listeners {
            api: TcpListener::bind(config.listen)?,
            peer: TcpListener::bind(config.peer_listen)?,
        })
    }
}

/// Where the admin token came from, for the start-up banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTokenSource {
    /// `CUSTOS_ADMIN_TOKEN` or the config file: never printed.
    Configured,
    /// `<data_dir>/admin-token`, written at an earlier start: only its path is printed.
    File(PathBuf),
    /// Generated now and written there: printed this once, so a first run can be used at once.
    Generated(PathBuf),
}

impl AdminTokenSource {
    /// The banner line (without the token unless it was just generated).
    pub fn banner(&self, token: &str) -> String {
        match self {
            Self::Configured => "from CUSTOS_ADMIN_TOKEN (or the config file)".into(),
            Self::File(p) => format!("in {} (cat it; printed only when generated)", p.display()),
            Self::Generated(p) => format!(
                "{token}\n               (generated now, kept in {}; not printed again)",
                p.display()
            ),
        }
    }

    /// The same, on one line for a JSON log event: never the token itself, since log
    /// collectors keep what they are sent (the file holds it).
    pub fn banner_field(&self, token: &str) -> String {
        match self {
            Self::Generated(p) => format!(
                "generated now, kept in {} (cat it; never logged)",
                p.display()
            ),
            _ => self.banner(token),
        }
    }
}

/// Reads the admin token from config, then `<data_dir>/admin-token`, else generates one.
pub fn admin_token(config: &Config) -> Result<(String, AdminTokenSource), NodeError> {
    if let Some(t) = config.admin_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok((t.clone(), AdminTokenSource::Configured));
    }
    let path = config.data_dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok((t, AdminTokenSource::File(path)));
        }
    }
    let token = format!(
        "adm_{}",
        custos_api::webhook::Secret::generate()
            .encode()
            .trim_start_matches("whsec_")
            .replace(['+', '/', '='], "")
    );
    write_private(&path, token.as_bytes())?;
    Ok((token, AdminTokenSource::Generated(path)))
}

/// Creates the data directory (0700), and takes away group and other access from anything
/// already in it (a directory an earlier version left readable).
pub fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir).map_err(at(dir, "creating"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(at(
                &d,
                "making private (chmod 700; the node's user must own it)",
            ))?;
            for entry in std::fs::read_dir(&d).map_err(at(&d, "reading"))? {
                let entry = entry.map_err(at(&d, "reading"))?;
                let meta = entry.metadata().map_err(at(&entry.path(), "reading"))?;
                if meta.is_dir() {
                    stack.push(entry.path());
                } else if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                    let mode = meta.permissions().mode() & 0o700;
                    std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
                        .map_err(at(&entry.path(), "making private"))?;
                }
            }
        }
    }
    Ok(())
}

/// Writes a file only its owner can read, atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(at(&tmp, "creating"))?;
        f.write_all(bytes).map_err(at(&tmp, "writing"))?;
        f.sync_all().map_err(at(&tmp, "writing"))?;
    }
    std::fs::rename(&tmp, path).map_err(at(path, "writing"))
}

/// An I/O error that names what was being done to which path (a start-up error such as
/// "Operation not permitted" alone does not say which file of the data directory).
fn at<'a>(path: &'a Path, doing: &'a str) -> impl FnOnce(std::io::Error) -> std::io::Error + 'a {
    move |e| std::io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

pub(crate) fn raft_config(config: &Config) -> Result<openraft::Config, NodeError> {
    let r = &config.raft;
    openraft::Config {
        cluster_name: "custos".into(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        // The node decides when to snapshot (see `pace_snapshots`): openraft's own policy
        // counts entries only.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: r.keep_logs_after_snapshot,
        install_snapshot_timeout: r.install_snapshot_timeout_ms,
        ..Default::default()
    }
    .validate()
    .map_err(|e| NodeError::Raft(e.to_string()))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|e| NodeError::Tls(format!("{}: {e}", path.display())))
}

fn tls_server(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, NodeError> {
    let tls = |e: &dyn std::fmt::Display| NodeError::Tls(e.to_string());
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| NodeError::Tls("no private key in the key file".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls(&e))
}

fn tls_config(config: &Config) -> Result<Option<rustls::ServerConfig>, NodeError> {
    match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Ok(Some(tls_server(cert, key)?)),
        _ => Ok(None),
    }
}

/// Runs `task` every `every` until shutdown.
async fn every<F, Fut>(
    core: Arc<Core>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    task: F,
) where
    F: Fn(Arc<Core>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        task(core.clone()).await;
    }
}

/// How often each replica is checked for a snapshot to build (cheap: two counters and the
/// group's metrics).
const SNAPSHOT_CHECK: Duration = Duration::from_secs(1);

/// Starts a snapshot of every local replica whose policy says one is due (openraft builds it
/// in the background, then compacts the log).
async fn pace_snapshots(core: Arc<Core>) {
    let policy = core.config.snapshot_policy();
    for g in core.groups() {
        if g.snapshot_due(&policy) {
            if let Err(e) = g.raft.trigger().snapshot().await {
                tracing::warn!(group = g.id, error = %e, "could not start a snapshot");
            }
        }
    }
}

/// Deletes what aged past the retention in every data group this node leads, in bounded
/// entries, until nothing is left.
async fn prune(core: Arc<Core>) {
    // Retention entries list up to 32 keys each: a step deletes at most 6,400 records.
    const LIMIT: u32 = 200;
    let retention_ms = (core.config.retention_days * 86_400_000.0) as i64;
    let before_ms = unix_now_ms() - retention_ms;
    for g in core.groups() {
        if g.id == META_GROUP || !g.leads(core.node_id) {
            continue;
        }
        loop {
            let change = StateChange::Prune {
                before_ms,
                now_ms: unix_now_ms(),
                limit: LIMIT,
            };
            match core.propose(g.id, change).await {
                Ok(ChangeOutcome::Pruned(n)) if n == LIMIT => continue,
                Ok(ChangeOutcome::Pruned(n)) => {
                    if n > 0 {
                        tracing::info!(group = g.id, deleted = n, "pruned expired records");
                    }
                    break;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(group = g.id, error = %e, "prune failed");
                    break;
                }
            }
        }
    }
}

/// Whether the recommender should be trained now: no model yet, a young one (fewer than
/// `recommend_min_customers` customers behind it, so a growing vault's first customers are not
/// left an hour without recommendations), or one older than `recommend_interval_secs`.
/// Also when `recommend_retrain_changes` rules were saved or deleted since the last training.
pub fn training_due(
    model: Option<(u32, i64)>,
    now_ms: i64,
    rule_changes_since: u64,
    config: &Config,
) -> bool {
    match model {
        None => true,
        Some((customers, trained_ms)) => {
            customers < config.recommend_min_customers
                || (now_ms - trained_ms) as f64 >= config.recommend_interval_secs * 1000.0
                || rule_changes_since >= config.recommend_retrain_changes
        }
    }
}

/// What [`training_due`] reads of a stored model: its customers and when it was trained; None
/// (train at once, as if there were none) for a model an earlier build trained in another
/// form (its ranker's features or its keys), or with a k below `min_customers` (raised in
/// the configuration since: what fewer customers share must leave the model now).
pub fn schedule_of(
    model: &custos_raft::records::ModelRecord,
    min_customers: u32,
) -> Option<(u32, i64)> {
    (crate::recommend::vault::model_is_current(model) && model.min_support >= min_customers)
        .then_some((model.customers, model.trained_ms))
}

/// Checked every `recommend_warmup_secs` on the meta group's leader: trains when due.
async fn train_when_due(core: Arc<Core>) {
    if !core.is_leader(META_GROUP) {
        return;
    }
    let model = match core.read_meta(|r| r.model()).await {
        Ok(m) => m
            .as_ref()
            .and_then(|m| schedule_of(m, core.config.recommend_min_customers)),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the recommender model");
            return;
        }
    };
    use std::sync::atomic::Ordering::Relaxed;
    let changes = core.wake.rule_changes.load(Relaxed);
    let since = changes.saturating_sub(core.wake.rule_changes_at_training.load(Relaxed));
    if training_due(model, unix_now_ms(), since, &core.config) {
        core.wake.rule_changes_at_training.store(changes, Relaxed);
        train(core).await;
    }
}

/// Retrains the recommender (on the meta group's leader).
async fn train(core: Arc<Core>) {
    if !core.is_leader(META_GROUP) {
        return;
    }
    match crate::service::train_recommender(&core).await {
        Ok(m) => tracing::info!(
            version = m.version,
            customers = m.customers,
            "recommender trained"
        ),
        Err(e) => tracing::warn!(error = %e, "recommender training failed"),
    }
}

/// Starts each data group's delivery worker when the group opens on this node.
async fn start_workers(
    core: Arc<Core>,
    mut opened: mpsc::UnboundedReceiver<Arc<Group>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut running = Vec::new();
    loop {
        tokio::select! {
            g = opened.recv() => match g {
                Some(g) if g.id != META_GROUP => {
                    running.push(tokio::spawn(crate::delivery::run(core.clone(), g, shutdown.clone())));
                }
                Some(_) => {}
                None => break,
            },
            _ = shutdown.changed() => break,
        }
    }
    for w in running {
        let _ = w.await;
    }
}

/// The Raft runtime, released without blocking when `run` returns (also on an error: `run`
/// is async, where a runtime must not be dropped the blocking way).
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for RuntimeGuard {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("the runtime lives as long as the guard")
    }
}

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The addresses a node serves, written to `<data_dir>/node.json` once it is ready.
#[derive(Debug, serde::Serialize)]
struct Ready {
    node_id: u64,
    api: SocketAddr,
    peer: SocketAddr,
    tls: bool,
    pid: u32,
}

/// This node's id: pinned in config, else kept from before, else given by the cluster it
/// joins, else 1 (a cluster of its own).
async fn node_id(
    config: &Config,
    peers: &Peers,
    api_addr: &str,
    fresh: bool,
    voted: bool,
) -> Result<u64, NodeError> {
    let stored = cluster::stored_node_id(&config.data_dir);
    // An id file beside a database with no Raft state at all: the database was lost (the id
    // of a node creating its cluster is kept only once the cluster is created, and a node
    // that joins asks the cluster). Started on its own it would create a second cluster under
    // the id of a member of the first, at that member's address, with its secret.
    if let (Some(s), true, false, true) = (stored, fresh, voted, config.join.is_empty()) {
        return Err(NodeError::Cluster(format!(
            "this data directory names node {s}, but its database holds no Raft state (was it \
             lost?); started without --join it would create a new cluster as node {s}: to \
             rejoin its cluster, remove node {s} there (`custos cluster remove {s}`) and start \
             this one with an empty data directory and --join; to create a new cluster, \
             remove {}",
            config.data_dir.join("node-id").display()
        )));
    }
    if let (Some(s), true) = (stored, config.node_id > 0) {
        if s != config.node_id {
            return Err(NodeError::Cluster(format!(
                "node_id {} is configured, but this data directory belongs to node {s}",
                config.node_id
            )));
        }
    }
    let id = match (config.node_id, stored) {
        (0, None) if fresh && !config.join.is_empty() => {
            let req = JoinRequest {
                node_id: None,
                peer_addr: config.peer_address(),
                api_addr: api_addr.to_owned(),
            };
            cluster::request_join(peers, &config.join, &req, true)
                .await?
                .node_id
        }
        (0, None) => 1,
        // A new member with a pinned id registers under it (the member it asks keeps the id
        // it is given); before, it waited for a registration nobody made. So does a node whose
        // id file outlived its database: the cluster refuses it an id whose replicas it held
        // (before, it came back under that id without asking, and voted with an empty log).
        (0, Some(known)) | (known, _) if fresh && !config.join.is_empty() => {
            let req = JoinRequest {
                node_id: Some(known),
                peer_addr: config.peer_address(),
                api_addr: api_addr.to_owned(),
            };
            let given = cluster::request_join(peers, &config.join, &req, true)
                .await?
                .node_id;
            if given != known {
                return Err(NodeError::Cluster(format!(
                    "this node is {known}, but the cluster registered it as {given}"
                )));
            }
            known
        }
        (0, Some(s)) => s,
        (pinned, _) => pinned,
    };
    // A node creating its cluster keeps its id once the cluster is created (`start_groups`):
    // an id file without Raft state then always means a lost database.
    if !(fresh && config.join.is_empty()) {
        cluster::store_node_id(&config.data_dir, id)?;
    }
    Ok(id)
}

/// Runs a node until `shutdown` completes, then stops it gracefully. Must be called inside an
/// actix system (`actix_rt::System`).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    make_private_dir(&config.data_dir)?;
    let mut config = config;
    if config.peer_advertise.is_none() {
        // Port 0 (tests): advertise what was actually bound. A wildcard bind has no address
        // another node could reach: a joining node registered as such would never hear from
        // its cluster (and a restart would not register it again), so it is refused; a node
        // on its own (a container) reaches itself at it, but no node can join it.
        let bound = listeners.peer.local_addr()?;
        if bound.ip().is_unspecified() {
            if !config.join.is_empty() {
                return Err(NodeError::Cluster(format!(
                    "the peer port listens on {bound}, which the cluster cannot reach: set \
                     peer_advertise (--peer-advertise) to the address other nodes reach this \
                     node at"
                )));
            }
            tracing::warn!(peer = %bound, "no peer_advertise: other nodes cannot join this one at a wildcard address");
        }
        config.peer_advertise = Some(bound.to_string());
    }
    if config.retention_days * 86_400.0 < 2.0 * custos_api::limits::SIGNATURE_TOLERANCE_SECS as f64
    {
        // An event's dedup record ages with the rest: once pruned, a captured request still
        // inside its signature window would be taken as a new event.
        tracing::warn!(
            retention_days = config.retention_days,
            "retention is shorter than twice the signature window ({} s): a captured event \
             could be replayed once its record is pruned",
            custos_api::limits::SIGNATURE_TOLERANCE_SECS
        );
    }
    let peer_on_loopback = config
        .peer_address()
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if !config.join.is_empty() && config.peer_tls.cert.is_none() && !peer_on_loopback {
        // The peer token is derived from the secret and sent with every peer call: read off
        // the network once, it lets its reader join the cluster (and be sent every replica)
        // or propose any change, for as long as the secret stays.
        tracing::warn!(
            peer = %config.peer_address(),
            "peer traffic is plain HTTP: anyone who can read it takes the peer token; \
             configure [peer_tls] (cert, key, ca) unless the network between nodes is private"
        );
    }
    let config = Arc::new(config);
    let (admin, admin_source) = admin_token(&config)?;
    let secret = cluster::cluster_secret(&config)?;
    let peer_ca = match &config.peer_tls.ca {
        Some(ca) => Some(read_pem(ca)?),
        None => None,
    };
    let peers =
        Peers::new(cluster::peer_token(&secret), peer_ca.as_deref()).map_err(NodeError::Tls)?;
    let db = custos_raft::open_db(&config.data_dir.join("db"), config.storage.db_options())?;
    let telemetry = Telemetry::install();
    let api_addr = listeners.api.local_addr()?;
    let peer_addr = listeners.peer.local_addr()?;

    // openraft spawns its tasks on the runtime it is created in: give it its own.
    let raft_rt = RuntimeGuard(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("custos-raft")
            .enable_all()
            .build()?,
    ));
    let voted = custos_raft::log_store::stored_vote(&db, META_GROUP)?.is_some();
    // A node creating its own cluster that was killed while openraft initialised the meta
    // group holds its own vote and nothing else: it starts over (openraft would refuse to
    // initialise the group, and it would wait for settings for ever).
    let me = cluster::stored_node_id(&config.data_dir).unwrap_or(if config.node_id > 0 {
        config.node_id
    } else {
        1
    });
    let fresh = !voted
        || (config.join.is_empty()
            && custos_raft::log_store::holds_only_own_vote(&db, META_GROUP, me)?);
    if fresh && voted {
        tracing::warn!(
            "the first start stopped while the cluster was being created; starting over"
        );
        custos_raft::state_machine::destroy_group(
            &db,
            META_GROUP,
            &config.data_dir.join("snapshots"),
        )?;
    }
    let id = {
        let (config, peers, api) = (config.clone(), peers.clone(), api_addr.to_string());
        raft_rt
            .spawn(async move { node_id(&config, &peers, &api, fresh, voted).await })
            .await
            .map_err(|e| NodeError::Cluster(e.to_string()))??
    };
    // Every delivery slot of every group may hold a connection to the same target: keep
    // that many open between attempts, or under load most attempts open a new one (a quarter
    // kept, as before, put TCP connects at half the delivery's CPU at 256 in flight).
    let outbound = crate::outbound::Outbound::new(
        Duration::from_secs_f64(config.delivery.timeout_secs),
        config.allow_private_targets,
        config.delivery.concurrency * config.cluster.data_groups as usize,
    )?;
    let core = Arc::new(Core::new(
        config.clone(),
        id,
        db.clone(),
        peers.clone(),
        outbound,
        &secret,
        raft_rt.handle().clone(),
        raft_config(&config)?,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (opened_tx, opened_rx) = mpsc::unbounded_channel();
    core.on_open(opened_tx);
    let workers = raft_rt.spawn(start_workers(core.clone(), opened_rx, stop_rx.clone()));

    let arbiters = match config.profile_arbiters {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let (profiles, arbiter_threads) = ProfileRouter::start(
        core.clone(),
        arbiters,
        Duration::from_secs_f64(config.profile_idle_secs),
    );
    let tls = tls_config(&config)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{api_addr}"));
    let vault = Vault::new(core.clone(), profiles.clone(), &admin, &public_url);

    let vault_data = web::Data::new(vault);
    let telemetry_data = web::Data::new(telemetry);
    let core_data = web::Data::new(core.clone());
    let portal_data = web::Data::from(crate::portal::Portal::new(
        &config.portal,
        public_url.starts_with("https://"),
    ));
    let (v, t, c, p) = (
        vault_data.clone(),
        telemetry_data.clone(),
        core_data.clone(),
        portal_data.clone(),
    );
    let api_server = HttpServer::new(move || {
        App::new()
            .app_data(v.clone())
            .app_data(t.clone())
            .app_data(c.clone())
            .app_data(p.clone())
            .configure(crate::portal::configure)
            .configure(crate::gateway::configure)
            .wrap(middleware::from_fn(crate::forward::forward))
            .wrap(middleware::from_fn(crate::portal::secure_cookies))
            .wrap(middleware::from_fn(crate::gateway::hold_to_document))
            // Outside the document check, so its refusals (a 405 at the callback) carry them.
            .wrap(middleware::from_fn(crate::portal::portal_headers))
            // Path without the query: OAuth codes and states are not written to logs.
            .wrap(
                middleware::Logger::new("%{method}xi %U %s %Dms")
                    .custom_request_replace("method", |req| req.method().to_string())
                    .log_target("custos::http"),
            )
    })
    .disable_signals()
    .shutdown_timeout(10);
    let api_server = match tls.clone() {
        Some(t) => api_server.listen_rustls_0_23(listeners.api, t)?,
        None => api_server.listen(listeners.api)?,
    }
    .run();
    let token = web::Data::new(PeerToken(cluster::peer_token(&secret).into()));
    let on_peer = web::Data::new(OnPeerPort);
    let peer_server = HttpServer::new(move || {
        App::new()
            .app_data(vault_data.clone())
            .app_data(telemetry_data.clone())
            .app_data(core_data.clone())
            .app_data(portal_data.clone())
            .app_data(token.clone())
            .app_data(on_peer.clone())
            .configure(crate::peer::configure)
            .configure(crate::portal::configure)
            .configure(crate::gateway::configure)
            .wrap(middleware::from_fn(crate::forward::forward))
            .wrap(middleware::from_fn(crate::peer::require_token))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5);
    let peer_server = match &config.peer_tls {
        crate::config::PeerTlsConfig {
            cert: Some(cert),
            key: Some(key),
            ..
        } => peer_server.listen_rustls_0_23(listeners.peer, tls_server(cert, key)?)?,
        _ => peer_server.listen(listeners.peer)?,
    }
    .run();
    let api_handle = api_server.handle();
    let peer_handle = peer_server.handle();
    let api_task = actix_rt::spawn(api_server);
    let peer_task = actix_rt::spawn(peer_server);

    // Groups: what storage holds (a restart), a new cluster, or the meta replica a join needs.
    let started = {
        let (core, config, secret) = (core.clone(), config.clone(), secret.clone());
        let api = api_addr.to_string();
        raft_rt
            .spawn(async move { start_groups(&core, &config, &secret, &api, fresh).await })
            .await
            .map_err(|e| NodeError::Cluster(e.to_string()))?
    };
    if let Err(e) = started {
        api_handle.stop(false).await;
        peer_handle.stop(false).await;
        core.close_all().await;
        return Err(e);
    }

    let catch_up = raft_rt.spawn(cluster::catch_up_meta(core.clone(), stop_rx.clone()));
    let manager = raft_rt.spawn(cluster::manager::run(core.clone(), stop_rx.clone()));
    let intents = raft_rt.spawn(crate::intents::run(
        core.clone(),
        profiles.clone(),
        stop_rx.clone(),
    ));
    let scrubber = raft_rt.spawn(crate::scrub::run(core.clone(), stop_rx.clone()));
    let pruner = raft_rt.spawn(every(
        core.clone(),
        Duration::from_secs_f64(config.prune_interval_secs),
        stop_rx.clone(),
        prune,
    ));
    let trainer = raft_rt.spawn(every(
        core.clone(),
        Duration::from_secs_f64(
            config
                .recommend_warmup_secs
                .min(config.recommend_interval_secs),
        ),
        stop_rx.clone(),
        train_when_due,
    ));

    let snapshots = raft_rt.spawn(every(
        core.clone(),
        SNAPSHOT_CHECK,
        stop_rx.clone(),
        pace_snapshots,
    ));

    // Ready once events of unlinked subjects can be recorded (at once on the meta leader;
    // a member that cannot reach the leader now starts anyway and answers those 503 until
    // it has caught up).
    let catching_up = std::time::Instant::now();
    while !core.meta_caught_up() && catching_up.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = Ready {
        node_id: id,
        api: api_addr,
        peer: peer_addr,
        tls: tls.is_some(),
        pid: std::process::id(),
    };
    let ready_json = serde_json::to_vec_pretty(&ready).unwrap_or_default();
    write_private(&config.data_dir.join("node.json"), &ready_json)?;
    let secret_file = config
        .cluster_secret
        .is_none()
        .then(|| config.data_dir.join("cluster-secret"));
    if config.log_format == "json" {
        // Among JSON logs the banner is one JSON event too, so collectors can parse every line.
        tracing::info!(
            node = id,
            client_api = %format!("{scheme}://{api_addr}"),
            portal = %format!("{public_url}/portal"),
            peer = %config.peer_address(),
            data_dir = %config.data_dir.display(),
            admin_token = %admin_source.banner_field(&admin),
            cluster_secret_file = %secret_file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            "node ready"
        );
    } else {
        println!("custos node {id} ready");
        println!("  client API   {scheme}://{api_addr}");
        println!("  portal       {public_url}/portal");
        println!("  peer port    {}", config.peer_address());
        println!("  data dir     {}", config.data_dir.display());
        println!("  admin token  {}", admin_source.banner(&admin));
        if let Some(f) = &secret_file {
            println!(
                "  cluster secret in {} (give it to joining nodes as CUSTOS_CLUSTER_SECRET)",
                f.display()
            );
        }
        let _ = std::io::stdout().flush();
        tracing::info!(node = id, api = %api_addr, peer = %config.peer_address(), "node ready");
    }

    shutdown.await;
    tracing::info!("stopping");
    core.set_closing();
    api_handle.stop(true).await;
    let _ = api_task.await;
    let _ = stop_tx.send(true);
    // The background tasks finish what they are doing (bounded: whatever is left after
    // STOP_TASKS_WITHIN is aborted) while the peer port still serves: until its Raft groups close,
    // this node may lead some, and the other nodes' forwarded calls, relayed events and Raft
    // messages must reach it rather than fail until an election.
    let mut tasks = [
        catch_up, manager, intents, scrubber, pruner, trainer, snapshots, workers,
    ];
    let all = futures::future::join_all(tasks.iter_mut());
    if tokio::time::timeout(STOP_TASKS_WITHIN, all).await.is_err() {
        for task in &tasks {
            task.abort();
        }
    }
    core.close_all().await;
    peer_handle.stop(true).await;
    let _ = peer_task.await;
    for a in arbiter_threads {
        a.stop();
    }
    let _ = std::fs::remove_file(config.data_dir.join("node.json"));
    // Everything on it has been awaited or aborted; dropping the guard releases its threads.
    drop(raft_rt);
    drop(db);
    tracing::info!("stopped");
    Ok(())
}

/// How long a stopping node waits for its background tasks (an intent round, a training)
/// before it closes its Raft groups anyway.
const STOP_TASKS_WITHIN: Duration = Duration::from_secs(10);

/// Opens this node's groups: the stored ones after a restart (rejoining when told to), or a
/// new cluster, or (a new member) the meta replica, then waits for the cluster's settings.
async fn start_groups(
    core: &Arc<Core>,
    config: &Config,
    secret: &str,
    api_addr: &str,
    fresh: bool,
) -> Result<(), NodeError> {
    if !fresh {
        cluster::reopen(core).await?;
        if config.join.is_empty() {
            cluster::resume_bootstrap(core, config, secret, api_addr).await?;
        } else {
            // Joining again is idempotent; it updates this node's addresses. Best effort: the
            // members may be restarting too, and this node already knows the cluster.
            let (peers, join) = (core.peers.clone(), config.join.clone());
            let req = JoinRequest {
                node_id: Some(core.node_id),
                peer_addr: config.peer_address(),
                api_addr: api_addr.to_owned(),
            };
            tokio::spawn(async move {
                if let Err(e) = cluster::request_join(&peers, &join, &req, false).await {
                    tracing::warn!(error = %e, "rejoin");
                }
            });
        }
    } else if config.join.is_empty() {
        cluster::bootstrap(core, config, secret, api_addr).await?;
        cluster::store_node_id(&config.data_dir, core.node_id)?;
    } else {
        core.open_group(META_GROUP).await?;
    }
    cluster::wait_settings(core, Duration::from_secs(120)).await?;
    // Proves the secret opens the cluster's sealed settings (a wrong one is refused above,
    // at the join, by the peer token; this catches a restart with a changed secret).
    let ring = cluster::token_keys(core, config, secret).await?;
    let entities = core.meta()?.reader.entities()?;
    let lost = cluster::unopenable_entities(&ring, &entities);
    if !lost.is_empty() {
        tracing::error!(
            count = lost.len(),
            entities = ?lost.iter().take(10).collect::<Vec<_>>(),
            "entity secrets cannot be opened with these token keys (a key that sealed them was \
             dropped from portal.token_keys): their events are answered 503 and their commands \
             are not sent until that key is configured again or their secrets are rotated"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_admin_token_never_goes_into_a_json_log_event() {
        let source = AdminTokenSource::Generated(PathBuf::from("/data/admin-token"));
        let field = source.banner_field("secret-token-value");
        assert!(!field.contains("secret-token-value"), "{field}");
        assert!(field.contains("/data/admin-token"), "{field}");
        // The human banner on a terminal shows it once.
        assert!(source
            .banner("secret-token-value")
            .contains("secret-token-value"));
    }

    #[test]
    fn a_data_directory_that_cannot_be_made_says_which_path() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"x")?;
        let dir = file.join("data");
        let e = make_private_dir(&dir).expect_err("a file is in the way");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        let e = write_private(&dir.join("node-id"), b"1").expect_err("no directory");
        assert!(e.to_string().contains("node-id"), "{e}");
        Ok(())
    }

    #[test]
    fn training_is_due_without_a_model_while_young_and_when_old() {
        // Defaults: k = 10, every hour, or after 1,000 rule changes.
        let c = Config::default();
        assert!(training_due(None, 0, 0, &c));
        // Young: fewer customers than k behind it, retried at every check.
        assert!(training_due(Some((3, 1_000)), 2_000, 0, &c));
        // Grown and fresh: not before the interval...
        assert!(!training_due(Some((10, 1_000)), 2_000, 999, &c));
        assert!(training_due(Some((10, 1_000)), 1_000 + 3_600_000, 0, &c));
        // ...unless enough rules changed since.
        assert!(training_due(Some((10, 1_000)), 2_000, 1_000, &c));
        // A fresh model whose ranker reads fewer features than this build's: retrained.
        let mut model = custos_raft::records::ModelRecord {
            version: 1,
            trained_ms: 1_000,
            customers: 10,
            beta: 0.6,
            min_support: 10,
            templates: Vec::new(),
            pairs: Vec::new(),
            ranker: Some(custos_raft::records::RankerRecord {
                means: vec![0.0; crate::recommend::vault::FEATURES],
                scales: vec![1.0; crate::recommend::vault::FEATURES],
                weights: Vec::new(),
            }),
        };
        assert!(!training_due(
            schedule_of(&model, c.recommend_min_customers),
            2_000,
            0,
            &c
        ));
        // One whose keys are in the earlier form (entity and type joined by a dot): retrained.
        let stat = |key: &str| custos_raft::records::TemplateStat {
            key: key.to_owned(),
            customers: 10,
            dismissed: 0,
            condition: None,
            data_json: None,
        };
        model.templates = vec![stat("link:airline"), stat("airline/delayed>hotel/hold")];
        assert!(!training_due(
            schedule_of(&model, c.recommend_min_customers),
            2_000,
            0,
            &c
        ));
        model.templates.push(stat("airline.delayed>hotel.hold"));
        assert!(training_due(
            schedule_of(&model, c.recommend_min_customers),
            2_000,
            0,
            &c
        ));
        model.templates.pop();
        if let Some(r) = model.ranker.as_mut() {
            r.means.truncate(16);
        }
        assert!(training_due(
            schedule_of(&model, c.recommend_min_customers),
            2_000,
            0,
            &c
        ));
        if let Some(r) = model.ranker.as_mut() {
            r.means = vec![0.0; crate::recommend::vault::FEATURES];
        }
        assert!(!training_due(schedule_of(&model, 10), 2_000, 0, &c));
        // k raised in the configuration since it was trained: retrained at once.
        assert!(training_due(schedule_of(&model, 20), 2_000, 0, &c));
    }
}
