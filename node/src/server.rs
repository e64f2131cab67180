//! Starting and stopping a node: `run(config, listeners, shutdown)`.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use custos_api::types::unix_now_ms;
use custos_raft::network::PeerNetwork;
use custos_raft::{ChangeOutcome, LogStore, Raft, StateChange, StateMachineStore};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::sync::watch;

use crate::config::Config;
use crate::core::{Core, DueQueue, EntityCache};
use crate::profile::ProfileRouter;
use crate::service::Vault;
use crate::telemetry::Telemetry;
use crate::DATA_GROUP;

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

/// Reads the admin token from config, then `<data_dir>/admin-token`, else generates one.
pub fn admin_token(config: &Config) -> Result<String, NodeError> {
    if let Some(t) = config.admin_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(t.clone());
    }
    let path = config.data_dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok(t);
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
    Ok(token)
}

/// The token sealing keys: from config, else `<data_dir>/token-key`, else a new one kept there.
pub fn token_keys(config: &Config) -> Result<crate::seal::KeyRing, NodeError> {
    if !config.portal.token_keys.is_empty() {
        return Ok(crate::seal::KeyRing::new(&config.portal.token_keys)?);
    }
    let path = config.data_dir.join("token-key");
    let key = match std::fs::read_to_string(&path) {
        Ok(k) if !k.trim().is_empty() => k.trim().to_owned(),
        _ => {
            let k = crate::seal::generate_key();
            write_private(&path, k.as_bytes())?;
            k
        }
    };
    Ok(crate::seal::KeyRing::new(&[key])?)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

fn raft_config(config: &Config) -> Result<openraft::Config, NodeError> {
    let r = &config.raft;
    openraft::Config {
        cluster_name: "custos".into(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_every),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| NodeError::Raft(e.to_string()))
}

async fn start_raft(
    config: Arc<Config>,
    db: Arc<custos_raft::DB>,
    observer: Arc<crate::core::Observer>,
) -> Result<Raft, NodeError> {
    let snapshots = config.data_dir.join("snapshots");
    let rc = Arc::new(raft_config(&config)?);
    let log = LogStore::new(db.clone(), DATA_GROUP);
    let sm = StateMachineStore::new(db, DATA_GROUP, observer, snapshots);
    let raft = Raft::new(config.node_id, rc, PeerNetwork::new(DATA_GROUP), log, sm)
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if !initialized {
        // The embedded default: a group with this node as its one voter.
        let members = BTreeMap::from([(
            config.node_id,
            BasicNode {
                addr: config.peer_address(),
            },
        )]);
        raft.initialize(members)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
    }
    raft.wait(Some(Duration::from_secs(30)))
        .current_leader(config.node_id, "this node leads its group")
        .await
        .map_err(|e| NodeError::Raft(format!("no leadership: {e}")))?;
    Ok(raft)
}

fn tls_config(config: &Config) -> Result<Option<rustls::ServerConfig>, NodeError> {
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        return Ok(None);
    };
    let tls = |e: &dyn std::fmt::Display| NodeError::Tls(e.to_string());
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| NodeError::Tls("no private key in the key file".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls(&e))?;
    Ok(Some(cfg))
}

/// Runs `task` every `every` while this node leads, until shutdown.
async fn every_while_leader<F, Fut>(
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
        if core.is_leader() {
            task(core.clone()).await;
        }
    }
}

/// Deletes what aged past the retention, in bounded entries, until nothing is left.
async fn prune(core: Arc<Core>) {
    const LIMIT: u32 = 2000;
    let retention_ms = (core.config.retention_days * 86_400_000.0) as i64;
    let before_ms = unix_now_ms() - retention_ms;
    loop {
        match core
            .propose(StateChange::Prune {
                before_ms,
                limit: LIMIT,
            })
            .await
        {
            Ok(ChangeOutcome::Pruned(n)) if n == LIMIT => continue,
            Ok(ChangeOutcome::Pruned(n)) => {
                if n > 0 {
                    tracing::info!(deleted = n, "pruned expired records");
                }
                return;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "prune failed");
                return;
            }
        }
    }
}

/// Retrains the recommender.
async fn train(core: Arc<Core>) {
    match crate::service::train_recommender(&core).await {
        Ok(m) => tracing::info!(
            version = m.version,
            customers = m.customers,
            "recommender trained"
        ),
        Err(e) => tracing::warn!(error = %e, "recommender training failed"),
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

/// Runs a node until `shutdown` completes, then stops it gracefully. Must be called inside an
/// actix system (`actix_rt::System`).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)?;
    let admin = admin_token(&config)?;
    let token_ring = token_keys(&config)?;
    let db = custos_raft::open_db(&config.data_dir.join("db"))?;
    let telemetry = Telemetry::install();

    // openraft spawns its tasks on the runtime it is created in: give it its own.
    let raft_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("custos-raft")
        .enable_all()
        .build()?;
    let entities = Arc::new(EntityCache::default());
    let due = Arc::new(DueQueue::default());
    let observer = Core::observer(&entities, &due);
    let raft = raft_rt
        .spawn(start_raft(config.clone(), db.clone(), observer))
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))??;
    let core = Arc::new(Core {
        config: config.clone(),
        raft: raft.clone(),
        reader: custos_raft::StateReader::new(db.clone(), DATA_GROUP),
        entities,
        due,
    });

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
    let api_addr = listeners.api.local_addr()?;
    let tls = tls_config(&config)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{api_addr}"));
    let vault = Vault::new(core.clone(), profiles, &admin, &public_url, token_ring);

    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = raft_rt.spawn(crate::delivery::run(core.clone(), stop_rx.clone()));
    let prune_every = Duration::from_secs_f64(config.prune_interval_secs);
    let pruner = raft_rt.spawn(every_while_leader(
        core.clone(),
        prune_every,
        stop_rx.clone(),
        prune,
    ));
    let train_every = Duration::from_secs_f64(config.recommend_interval_secs);
    let trainer = raft_rt.spawn(every_while_leader(
        core.clone(),
        train_every,
        stop_rx,
        train,
    ));

    let peer_addr = listeners.peer.local_addr()?;
    let vault_data = web::Data::new(vault);
    let telemetry_data = web::Data::new(telemetry);
    let portal_data = web::Data::from(crate::portal::Portal::new(
        &config.portal,
        public_url.starts_with("https://"),
    ));
    let api_server = HttpServer::new(move || {
        App::new()
            .app_data(vault_data.clone())
            .app_data(telemetry_data.clone())
            .app_data(portal_data.clone())
            .configure(crate::portal::configure)
            // Path without the query: OAuth codes and states are not written to logs.
            .wrap(actix_web::middleware::Logger::new("%m %U %s %Dms").log_target("custos::http"))
            .configure(crate::gateway::configure)
    })
    .disable_signals()
    .shutdown_timeout(10);
    let api_server = match tls.clone() {
        Some(t) => api_server.listen_rustls_0_23(listeners.api, t)?,
        None => api_server.listen(listeners.api)?,
    }
    .run();
    let raft_data = web::Data::new(raft.clone());
    let peer_server = HttpServer::new(move || {
        App::new()
            .app_data(raft_data.clone())
            .configure(crate::peer::configure)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listeners.peer)?
    .run();
    let api_handle = api_server.handle();
    let peer_handle = peer_server.handle();
    let api_task = actix_rt::spawn(api_server);
    let peer_task = actix_rt::spawn(peer_server);

    let ready = Ready {
        node_id: config.node_id,
        api: api_addr,
        peer: peer_addr,
        tls: tls.is_some(),
        pid: std::process::id(),
    };
    let ready_json = serde_json::to_vec_pretty(&ready).unwrap_or_default();
    write_private(&config.data_dir.join("node.json"), &ready_json)?;
    println!("custos node {} ready", config.node_id);
    println!("  client API   {scheme}://{api_addr}");
    println!("  portal       {public_url}/portal");
    println!("  peer port    {peer_addr}");
    println!("  data dir     {}", config.data_dir.display());
    println!("  admin token  {admin}");
    let _ = std::io::stdout().flush();
    tracing::info!(api = %api_addr, peer = %peer_addr, "node ready");

    shutdown.await;
    tracing::info!("stopping");
    api_handle.stop(true).await;
    peer_handle.stop(true).await;
    let _ = api_task.await;
    let _ = peer_task.await;
    let _ = stop_tx.send(true);
    let _ = worker.await;
    let _ = pruner.await;
    let _ = trainer.await;
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    for a in arbiter_threads {
        a.stop();
    }
    let _ = std::fs::remove_file(config.data_dir.join("node.json"));
    // Everything on it has been awaited; this only releases its threads.
    raft_rt.shutdown_background();
    drop(db);
    tracing::info!("stopped");
    Ok(())
}
