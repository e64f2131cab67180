//! What every part of a node shares: the Raft handle, the state reader, the entity cache
//! and the delivery wake-up; and the two primitives on them, `propose` and `read`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

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

/// Hears about applies: drops changed entities from the cache, wakes the delivery worker.
pub struct Observer {
    entities: Arc<EntityCache>,
    deliveries: Arc<Notify>,
}

impl ApplyObserver for Observer {
    fn applied(&self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::EntityChanged(id) => self.entities.invalidate(Some(id)),
                Effect::DeliveriesDue => self.deliveries.notify_one(),
                Effect::SnapshotInstalled => {
                    self.entities.invalidate(None);
                    self.deliveries.notify_one();
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
    /// Wakes the delivery worker when deliveries become due.
    pub deliveries_due: Arc<Notify>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

impl Core {
    /// The observer to give the state machine, sharing this node's cache and wake-up.
    pub fn observer(entities: &Arc<EntityCache>, deliveries: &Arc<Notify>) -> Arc<Observer> {
        Arc::new(Observer {
            entities: entities.clone(),
            deliveries: deliveries.clone(),
        })
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
