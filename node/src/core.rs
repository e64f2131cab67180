//! What every part of a node shares: the Raft handle, the state reader, the entity cache
//! and the delivery wake-up; and the two primitives on them, `propose` and `read`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use custos_api::webhook::Secret;
use custos_api::ErrorCode;
use custos_raft::records::EntityRecord;
use custos_raft::{
    ApplyObserver, ChangeOutcome, Effect, Raft, StateChange, StateReader, StoreError,
};
use openraft::error::{ClientWriteError, RaftError};
use serde_json::Value;
use tokio::sync::Notify;

use crate::config::Config;
use crate::error::ServiceError;

/// An entity with what the hot path needs precomputed: parsed secrets and compiled schemas.
pub struct CachedEntity {
    /// The stored record.
    pub record: EntityRecord,
    /// Current secret, then the previous one with the end of its grace period.
    pub secrets: Vec<(Secret, Option<i64>)>,
    event_schemas: HashMap<String, jsonschema::Validator>,
    command_schemas: HashMap<String, jsonschema::Validator>,
}

impl std::fmt::Debug for CachedEntity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedEntity")
            .field("id", &self.record.id)
            .finish()
    }
}

/// Compiles a JSON Schema (the registration path checks it compiles).
pub fn compile_schema(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::validator_for(schema).map_err(|e| e.to_string())
}

/// Checks `data` against a validator; the error names the first violation and its path.
pub fn check_schema(v: &jsonschema::Validator, data: &Value) -> Result<(), String> {
    match v.iter_errors(data).next() {
        None => Ok(()),
        Some(e) => Err(format!("{} at '{}'", e, e.instance_path)),
    }
}

impl CachedEntity {
    fn new(record: EntityRecord) -> Self {
        let mut secrets = Vec::with_capacity(2);
        if let Ok(s) = Secret::parse(&record.secret) {
            secrets.push((s, None));
        }
        if let Some(prev) = &record.previous_secret {
            if let Ok(s) = Secret::parse(prev) {
                secrets.push((s, Some(record.previous_valid_until_ms)));
            }
        }
        let compile = |types: &[custos_raft::records::TypeRecord]| {
            types
                .iter()
                .filter_map(|t| {
                    let schema: Value = serde_json::from_str(t.schema_json.as_deref()?).ok()?;
                    Some((t.name.clone(), compile_schema(&schema).ok()?))
                })
                .collect()
        };
        CachedEntity {
            event_schemas: compile(&record.event_types),
            command_schemas: compile(&record.command_types),
            secrets,
            record,
        }
    }

    /// The secrets valid at `now_ms` (the previous one only within its grace period).
    pub fn valid_secrets(&self, now_ms: i64) -> Vec<&Secret> {
        self.secrets
            .iter()
            .filter(|(_, until)| until.is_none_or(|u| now_ms <= u))
            .map(|(s, _)| s)
            .collect()
    }

    /// The event type's schema validator, if it has a schema.
    pub fn event_schema(&self, ty: &str) -> Option<&jsonschema::Validator> {
        self.event_schemas.get(ty)
    }

    /// The command type's schema validator, if it has a schema.
    pub fn command_schema(&self, ty: &str) -> Option<&jsonschema::Validator> {
        self.command_schemas.get(ty)
    }
}

/// Entities by id, loaded on first use and dropped when an apply changes them.
#[derive(Default)]
pub struct EntityCache {
    map: RwLock<(u64, HashMap<String, Arc<CachedEntity>>)>,
}

impl EntityCache {
    fn get_cached(&self, id: &str) -> (u64, Option<Arc<CachedEntity>>) {
        match self.map.read() {
            Ok(g) => (g.0, g.1.get(id).cloned()),
            Err(p) => {
                let g = p.into_inner();
                (g.0, g.1.get(id).cloned())
            }
        }
    }

    fn insert_if_current(&self, generation: u64, entity: Arc<CachedEntity>) {
        let mut g = self.map.write().unwrap_or_else(|p| p.into_inner());
        // An apply invalidated the cache while we loaded: our copy may be stale, skip it.
        if g.0 == generation {
            g.1.insert(entity.record.id.clone(), entity);
        }
    }

    fn invalidate(&self, id: Option<&str>) {
        let mut g = self.map.write().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        match id {
            Some(id) => {
                g.1.remove(id);
            }
            None => g.1.clear(),
        }
    }
}

/// Pending deliveries by due time, kept in memory so the worker never scans the due index
/// (a queue in an LSM tree leaves a tombstone per settled entry for every scan to skip).
/// Fed by the state machine's apply effects; reloaded from storage when this node becomes
/// leader or installs a snapshot.
#[derive(Default)]
pub struct DueQueue {
    queue: Mutex<BTreeSet<(i64, String)>>,
    /// Set when the queue must be reloaded from storage.
    stale: AtomicBool,
    wake: Notify,
    /// When the delivery worker last went round its loop (Unix ms), for readiness.
    heartbeat_ms: AtomicI64,
}

impl DueQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(i64, String)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a due delivery and wakes the worker.
    pub fn push(&self, due_ms: i64, command_id: String) {
        self.lock().insert((due_ms, command_id));
        self.wake.notify_one();
    }

    /// Adds many (a reload from storage).
    pub fn extend(&self, items: impl IntoIterator<Item = (i64, String)>) {
        self.lock().extend(items);
        self.wake.notify_one();
    }

    /// Removes and returns up to `max` deliveries due at `now_ms`.
    pub fn pop_due(&self, now_ms: i64, max: usize) -> Vec<String> {
        let mut q = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            match q.first() {
                Some((due, _)) if *due <= now_ms => {
                    if let Some((_, id)) = q.pop_first() {
                        out.push(id);
                    }
                }
                _ => break,
            }
        }
        out
    }

    /// The earliest due time queued.
    pub fn next_due(&self) -> Option<i64> {
        self.lock().first().map(|(d, _)| *d)
    }

    /// Queued deliveries.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Empties the queue and marks it for a reload (lost leadership, snapshot installed).
    pub fn invalidate(&self) {
        self.lock().clear();
        self.stale.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// True (once) when the queue must be reloaded from storage.
    pub fn take_stale(&self) -> bool {
        self.stale.swap(false, Ordering::SeqCst)
    }

    /// Records that the worker is alive.
    pub fn beat(&self, now_ms: i64) {
        self.heartbeat_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the worker last went round its loop (0: never).
    pub fn last_beat(&self) -> i64 {
        self.heartbeat_ms.load(Ordering::Relaxed)
    }

    /// Wakes the worker (e.g. attempt slots became free).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until something is pushed or the queue is invalidated.
    pub async fn notified(&self) {
        self.wake.notified().await
    }
}

/// Hears about applies: drops changed entities from the cache, feeds the due queue.
pub struct Observer {
    entities: Arc<EntityCache>,
    due: Arc<DueQueue>,
}

impl ApplyObserver for Observer {
    fn applied(&self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::EntityChanged(id) => self.entities.invalidate(Some(id)),
                Effect::DeliveryDue { command_id, due_ms } => {
                    self.due.push(*due_ms, command_id.clone())
                }
                Effect::SnapshotInstalled => {
                    self.entities.invalidate(None);
                    self.due.invalidate();
                }
            }
        }
    }
}

/// The shared parts of a node.
pub struct Core {
    /// The configuration it runs with.
    pub config: Arc<Config>,
    /// The data group's Raft handle.
    pub raft: Raft,
    /// Reads of the applied state.
    pub reader: StateReader,
    /// Entities by id.
    pub entities: Arc<EntityCache>,
    /// Pending deliveries by due time.
    pub due: Arc<DueQueue>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

impl Core {
    /// The observer to give the state machine, sharing this node's cache and wake-up.
    pub fn observer(entities: &Arc<EntityCache>, due: &Arc<DueQueue>) -> Arc<Observer> {
        Arc::new(Observer {
            entities: entities.clone(),
            due: due.clone(),
        })
    }

    /// True while this node leads the data group.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.config.node_id)
    }

    /// Proposes a change and waits until it is committed and applied here.
    pub async fn propose(&self, change: StateChange) -> Result<ChangeOutcome, ServiceError> {
        match self.raft.client_write(change).await {
            Ok(resp) => match resp.data {
                ChangeOutcome::Rejected { code, detail } => {
                    Err(ServiceError::refused(code, detail))
                }
                outcome => Ok(outcome),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ServiceError::refused(
                    ErrorCode::Unavailable,
                    match f.leader_id {
                        Some(l) => format!("this node is not the leader; node {l} is"),
                        None => "no leader is elected yet; retry shortly".to_owned(),
                    },
                ))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(ServiceError::Raft(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(ServiceError::refused(
                ErrorCode::Unavailable,
                format!("raft stopped: {e}"),
            )),
        }
    }

    /// Runs a read on a blocking thread (RocksDB calls block).
    pub async fn read<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&StateReader) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
            .map_err(ServiceError::from)
    }

    /// An entity, from the cache or storage.
    pub async fn entity(&self, id: &str) -> Result<Option<Arc<CachedEntity>>, ServiceError> {
        let (generation, cached) = self.entities.get_cached(id);
        if cached.is_some() {
            return Ok(cached);
        }
        let owned = id.to_owned();
        let record = self.read(move |r| r.entity(&owned)).await?;
        Ok(record.map(|rec| {
            let e = Arc::new(CachedEntity::new(rec));
            self.entities.insert_if_current(generation, e.clone());
            e
        }))
    }

    /// An entity that must exist.
    pub async fn entity_required(&self, id: &str) -> Result<Arc<CachedEntity>, ServiceError> {
        self.entity(id)
            .await?
            .ok_or_else(|| ServiceError::not_found("entity", id))
    }
}
