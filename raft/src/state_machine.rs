//! The state machine: applies committed [`StateChange`]s to RocksDB, snapshots a group's key
//! range as RocksDB checkpoints, and installs snapshots received from a leader.
//!
//! Each `apply` call writes everything it changes, plus the last applied log id, in one
//! RocksDB write batch, so a crash never leaves an entry half-applied. Its checks (exists,
//! linked, not a duplicate) are authoritative: the node checks first for good errors, but two
//! racing proposals are settled here, identically on every replica.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use custos_api::limits::MAX_RULES_PER_CUSTOMER;
use custos_api::ErrorCode;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot};
use rocksdb::{WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::records::*;
use crate::types::{GroupId, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";

/// What an apply changed that the node's caches and workers must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// An entity was registered or changed.
    EntityChanged(String),
    /// A delivery is pending and due at this time (new, retried or replayed).
    DeliveryDue {
        /// Command id.
        command_id: String,
        /// When its next attempt is due.
        due_ms: i64,
    },
    /// The whole state was replaced by a snapshot: drop every cache.
    SnapshotInstalled,
}

/// Told about every apply, after its batch is written.
pub trait ApplyObserver: Send + Sync + 'static {
    /// Called with the effects of one apply call (possibly empty).
    fn applied(&self, effects: &[Effect]);
}

/// An observer that ignores everything (tests, tools).
#[derive(Debug, Default)]
pub struct NoObserver;

impl ApplyObserver for NoObserver {
    fn applied(&self, _effects: &[Effect]) {}
}

/// The current snapshot as recorded: its metadata and the RocksDB checkpoint (a hard-linked,
/// point-in-time copy of the database, cheap to take) holding the state it describes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    checkpoint: String,
}

/// The pairs of a snapshot: keys without the group prefix, so it can land in another group.
type SnapshotPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// One group's state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    group: GroupId,
    observer: Arc<dyn ApplyObserver>,
    snapshots: Arc<PathBuf>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("group", &self.group)
            .finish()
    }
}

impl StateMachineStore {
    /// The state machine of `group` in `db`, reporting effects to `observer`, keeping its
    /// snapshot checkpoints under `snapshots` (on the database's filesystem: they are hard links).
    pub fn new(
        db: Arc<DB>,
        group: GroupId,
        observer: Arc<dyn ApplyObserver>,
        snapshots: PathBuf,
    ) -> Self {
        StateMachineStore {
            db,
            group,
            observer,
            snapshots: Arc::new(snapshots),
        }
    }

    fn sm_meta_key(&self, name: &[u8]) -> Vec<u8> {
        keys::key(self.group, keys::SM_META, name)
    }

    fn read_applied(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        let applied = match self.db.get_pinned(self.sm_meta_key(APPLIED))? {
            Some(v) => codec::decode(&v)?,
            None => None,
        };
        let membership = match self.db.get_pinned(self.sm_meta_key(MEMBERSHIP))? {
            Some(v) => codec::decode(&v)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<ChangeOutcome>, StoreError> {
        let mut tx = Tx::new(&self.db, self.group);
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut last = None;
        let mut membership = None;
        for entry in entries {
            tx.seq = entry.log_id.index << 16;
            last = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => ChangeOutcome::Done,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    ChangeOutcome::Done
                }
                EntryPayload::Normal(change) => tx.apply(change)?,
            };
            outcomes.push(outcome);
        }
        if let Some(last) = last {
            tx.put(self.sm_meta_key(APPLIED), &Some(last))?;
        }
        if let Some(m) = membership {
            tx.put(self.sm_meta_key(MEMBERSHIP), &m)?;
        }
        let effects = std::mem::take(&mut tx.effects);
        self.db.write(tx.batch)?;
        self.observer.applied(&effects);
        Ok(outcomes)
    }

    fn current_snapshot(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        match self.db.get(keys::prefix(self.group, keys::SNAPSHOT))? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn install(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StoreError> {
        let pairs: SnapshotPairs = codec::decode(data)?;
        let mut batch = WriteBatch::default();
        batch.delete_range(
            keys::prefix(self.group, keys::SM_FIRST),
            keys::prefix(self.group, keys::SM_END),
        );
        let group = self.group.to_be_bytes();
        for (k, v) in pairs {
            let mut full = Vec::with_capacity(group.len() + k.len());
            full.extend_from_slice(&group);
            full.extend_from_slice(&k);
            batch.put(full, v);
        }
        batch.put(self.sm_meta_key(APPLIED), codec::encode(&meta.last_log_id)?);
        batch.put(
            self.sm_meta_key(MEMBERSHIP),
            codec::encode(&meta.last_membership)?,
        );
        self.db.write(batch)?;
        // The installed state becomes this node's current snapshot, as received.
        checkpoint(&self.db, self.group, &self.snapshots, Some(meta.clone()))?;
        self.observer.applied(&[Effect::SnapshotInstalled]);
        Ok(())
    }
}

fn read_sm_meta(db: &DB, group: GroupId) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    let meta_key = |name: &[u8]| keys::key(group, keys::SM_META, name);
    let last_log_id: Option<LogId> = match db.get(meta_key(APPLIED))? {
        Some(v) => codec::decode(&v)?,
        None => None,
    };
    let last_membership: StoredMembership = match db.get(meta_key(MEMBERSHIP))? {
        Some(v) => codec::decode(&v)?,
        None => StoredMembership::default(),
    };
    Ok((last_log_id, last_membership))
}

/// Takes a checkpoint of the database and records it as the group's current snapshot, with
/// `meta` (after an install) or the metadata read from the checkpoint itself (so data and
/// metadata always agree). Older checkpoints of the group are removed.
fn checkpoint(
    db: &DB,
    group: GroupId,
    dir: &Path,
    meta: Option<SnapshotMeta>,
) -> Result<SnapshotMeta, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Task(e.to_string()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("g{group}-{now}");
    let path = dir.join(&name);
    rocksdb::checkpoint::Checkpoint::new(db)?.create_checkpoint(&path)?;
    let meta = match meta {
        Some(m) => m,
        None => {
            let cp = DB::open_for_read_only(&rocksdb::Options::default(), &path, false)?;
            let (last_log_id, last_membership) = read_sm_meta(&cp, group)?;
            let snapshot_id = match &last_log_id {
                Some(l) => format!("{group}-{}-{}-{now}", l.leader_id.term, l.index),
                None => format!("{group}-0-0-{now}"),
            };
            SnapshotMeta {
                last_log_id,
                last_membership,
                snapshot_id,
            }
        }
    };
    let stored = StoredSnapshot {
        meta: meta.clone(),
        checkpoint: name.clone(),
    };
    db.put(keys::prefix(group, keys::SNAPSHOT), codec::encode(&stored)?)?;
    let prefix = format!("g{group}-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) && n != name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(meta)
}

/// Reads a snapshot's data (the group's state machine range) out of its checkpoint. Only a
/// leader sending a snapshot to a lagging follower needs this.
fn materialize(dir: &Path, group: GroupId, stored: &StoredSnapshot) -> Result<Vec<u8>, StoreError> {
    let cp = DB::open_for_read_only(
        &rocksdb::Options::default(),
        dir.join(&stored.checkpoint),
        false,
    )?;
    let lo = keys::prefix(group, keys::SM_FIRST);
    let hi = keys::prefix(group, keys::SM_END);
    let mut pairs: SnapshotPairs = Vec::new();
    let mut it = cp.raw_iterator();
    it.seek(&lo);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k >= hi.as_slice() {
            break;
        }
        pairs.push((k[4..].to_vec(), v.to_vec()));
        it.next();
    }
    it.status()?;
    Ok(codec::encode(&pairs)?)
}

/// Builds snapshots of one group.
#[derive(Clone)]
pub struct SnapshotBuilder {
    db: Arc<DB>,
    group: GroupId,
    snapshots: Arc<PathBuf>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Takes a checkpoint (hard links and a memtable flush: milliseconds, whatever the state's
    /// size) instead of serializing the state. openraft (0.9) only keeps the metadata of a
    /// built snapshot; the data is read from the checkpoint by `get_current_snapshot` when a
    /// follower needs it, so the returned data is left empty.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (db, group, dir) = (self.db.clone(), self.group, self.snapshots.clone());
        let meta = tokio::task::spawn_blocking(move || checkpoint(&db, group, &dir, None))
            .await
            .map_err(|e| StoreError::Task(e.to_string()).into_raft_write())?
            .map_err(StoreError::into_raft_write)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.read_applied().map_err(StoreError::into_raft_read)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ChangeOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.apply_entries(entries)
            .map_err(StoreError::into_raft_write)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            group: self.group,
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        self.install(meta, snapshot.get_ref())
            .map_err(StoreError::into_raft_write)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(stored) = self
            .current_snapshot()
            .map_err(StoreError::into_raft_read)?
        else {
            return Ok(None);
        };
        let (dir, group, s) = (self.snapshots.clone(), self.group, stored.clone());
        let data = tokio::task::spawn_blocking(move || materialize(&dir, group, &s))
            .await
            .map_err(|e| StoreError::Task(e.to_string()).into_raft_read())?
            .map_err(StoreError::into_raft_read)?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// One apply call's write batch, with an overlay so later entries see earlier ones' writes.
struct Tx<'a> {
    db: &'a DB,
    group: GroupId,
    batch: WriteBatch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    effects: Vec<Effect>,
    /// Unique, increasing per entry (log index << 16, plus one per key written).
    seq: u64,
}

impl<'a> Tx<'a> {
    fn new(db: &'a DB, group: GroupId) -> Self {
        Tx {
            db,
            group,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
            effects: Vec::new(),
            seq: 0,
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        Ok(self.db.get(key)?)
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.get_raw(key)? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn exists(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get_raw(key)?.is_some())
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) -> Result<(), StoreError> {
        let v = codec::encode(value)?;
        self.batch.put(&key, &v);
        self.overlay.insert(key, Some(v));
        Ok(())
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.batch.delete(&key);
        self.overlay.insert(key, None);
    }

    /// Records `key` in the retention index as created at `at_ms`.
    fn age(&mut self, at_ms: i64, key: &[u8]) {
        let seq = self.next_seq();
        let k = keys::expiry(self.group, at_ms, seq);
        self.batch.put(&k, key);
        self.overlay.insert(k, Some(key.to_vec()));
    }

    /// Puts a pending delivery in the due index and tells the delivery worker.
    fn schedule(&mut self, due_ms: i64, command_id: &str) -> Result<(), StoreError> {
        self.put(keys::due(self.group, due_ms, command_id), &())?;
        self.effects.push(Effect::DeliveryDue {
            command_id: command_id.to_owned(),
            due_ms,
        });
        Ok(())
    }

    fn activity(
        &mut self,
        customer: &str,
        at_ms: i64,
        record: &ActivityRecord,
    ) -> Result<(), StoreError> {
        let seq = self.next_seq();
        self.put_aged(
            keys::activity(self.group, customer, at_ms, seq),
            record,
            at_ms,
        )
    }

    /// Puts a record and indexes it for retention as created at `at_ms`.
    fn put_aged<T: Serialize>(
        &mut self,
        key: Vec<u8>,
        value: &T,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.age(at_ms, &key);
        self.put(key, value)
    }

    fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        self.get(&keys::key(self.group, keys::ENTITY, id.as_bytes()))
    }

    fn linked(&self, customer: &str, entity: &str) -> Result<bool, StoreError> {
        self.exists(&keys::key2(self.group, keys::LINK, customer, entity))
    }

    fn apply(&mut self, change: StateChange) -> Result<ChangeOutcome, StoreError> {
        let g = self.group;
        Ok(match change {
            StateChange::RegisterEntity(entity) => {
                let key = keys::key(g, keys::ENTITY, entity.id.as_bytes());
                if self.exists(&key)? {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::Conflict,
                        format!("entity {} already exists", entity.id),
                    ));
                }
                self.effects.push(Effect::EntityChanged(entity.id.clone()));
                self.put(key, &entity)?;
                ChangeOutcome::Done
            }
            StateChange::UpdateEntity {
                id,
                name,
                command_url,
                endpoint_enabled,
            } => {
                let Some(mut entity) = self.entity(&id)? else {
                    return Ok(not_found("entity", &id));
                };
                if let Some(n) = name {
                    entity.name = n;
                }
                if let Some(u) = command_url {
                    entity.command_url = u;
                    entity.endpoint_enabled = true;
                }
                if let Some(e) = endpoint_enabled {
                    entity.endpoint_enabled = e;
                }
                self.put(keys::key(g, keys::ENTITY, id.as_bytes()), &entity)?;
                self.effects.push(Effect::EntityChanged(id));
                ChangeOutcome::Done
            }
            StateChange::RotateSecret {
                id,
                secret,
                previous_valid_until_ms,
            } => {
                let Some(mut entity) = self.entity(&id)? else {
                    return Ok(not_found("entity", &id));
                };
                entity.previous_secret = Some(std::mem::replace(&mut entity.secret, secret));
                entity.previous_valid_until_ms = previous_valid_until_ms;
                self.put(keys::key(g, keys::ENTITY, id.as_bytes()), &entity)?;
                self.effects.push(Effect::EntityChanged(id));
                ChangeOutcome::Done
            }
            StateChange::CreateCustomer { customer } => {
                let key = keys::key(g, keys::CUSTOMER, customer.id.as_bytes());
                if self.exists(&key)? {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::Conflict,
                        format!("customer {} already exists", customer.id),
                    ));
                }
                self.put(
                    keys::key(g, keys::TOKEN, &customer.token_hash),
                    &customer.id,
                )?;
                self.put(key, &customer)?;
                ChangeOutcome::Done
            }
            StateChange::Link { customer_id, link } => self.link(customer_id, link)?,
            StateChange::Unlink {
                customer_id,
                entity_id,
                at_ms,
            } => {
                let key = keys::key2(g, keys::LINK, &customer_id, &entity_id);
                let Some(link) = self.get::<LinkRecord>(&key)? else {
                    return Ok(not_found("link", &entity_id));
                };
                self.delete(key);
                self.delete(keys::key2(g, keys::SUBJECT, &entity_id, &link.subject));
                self.activity(&customer_id, at_ms, &ActivityRecord::Unlinked { entity_id })?;
                ChangeOutcome::Done
            }
            StateChange::PutRule { customer_id, rule } => {
                if !self.exists(&keys::key(g, keys::CUSTOMER, customer_id.as_bytes()))? {
                    return Ok(not_found("customer", &customer_id));
                }
                for entity in [&rule.when_entity, &rule.then_entity] {
                    if !self.linked(&customer_id, entity)? {
                        return Ok(ChangeOutcome::rejected(
                            ErrorCode::EntityNotLinked,
                            format!("entity {entity} is not linked"),
                        ));
                    }
                }
                let key = keys::key2(g, keys::RULE, &customer_id, &rule.id);
                if !self.exists(&key)?
                    && self.count_prefix(&keys::prefix2(g, keys::RULE, &customer_id))?
                        >= MAX_RULES_PER_CUSTOMER
                {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::LimitReached,
                        format!("at most {MAX_RULES_PER_CUSTOMER} rules per customer"),
                    ));
                }
                let at = rule.created_ms;
                let rule_id = rule.id.clone();
                self.put(key, &rule)?;
                self.activity(&customer_id, at, &ActivityRecord::RuleSaved { rule_id })?;
                ChangeOutcome::Done
            }
            StateChange::DeleteRule {
                customer_id,
                rule_id,
                at_ms,
            } => {
                let key = keys::key2(g, keys::RULE, &customer_id, &rule_id);
                if !self.exists(&key)? {
                    return Ok(not_found("rule", &rule_id));
                }
                self.delete(key);
                self.activity(
                    &customer_id,
                    at_ms,
                    &ActivityRecord::RuleDeleted { rule_id },
                )?;
                ChangeOutcome::Done
            }
            StateChange::Ingest(ingest) => self.ingest(ingest)?,
            StateChange::RecordDeliveries(updates) => {
                for update in updates {
                    self.record_delivery(update)?;
                }
                ChangeOutcome::Done
            }
            StateChange::Replay { command_id, at_ms } => {
                let key = keys::key(g, keys::OUTBOX, command_id.as_bytes());
                let Some(mut rec) = self.get::<OutboxRecord>(&key)? else {
                    return Ok(not_found("delivery", &command_id));
                };
                if rec.state != DeliveryState::Failed {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::Conflict,
                        "only failed deliveries can be replayed",
                    ));
                }
                rec.state = DeliveryState::Pending;
                rec.reason = None;
                rec.next_due_ms = Some(at_ms);
                self.delete(keys::key(g, keys::FAILED, command_id.as_bytes()));
                self.schedule(at_ms, &command_id)?;
                let customer = rec.command.customer_id.clone();
                self.put(key, &rec)?;
                self.activity(
                    &customer,
                    at_ms,
                    &ActivityRecord::DeliveryChanged {
                        command_id,
                        state: DeliveryState::Pending,
                        reason: "replayed by an operator".into(),
                    },
                )?;
                ChangeOutcome::Done
            }
            StateChange::PutModel(model) => {
                let key = keys::prefix(g, keys::MODEL);
                if let Some(current) = self.get::<ModelRecord>(&key)? {
                    if current.version >= model.version {
                        return Ok(ChangeOutcome::rejected(
                            ErrorCode::Conflict,
                            "a newer model is already stored",
                        ));
                    }
                }
                self.put(key, &*model)?;
                ChangeOutcome::Done
            }
            StateChange::Dismiss {
                customer_id,
                template,
            } => {
                if !self.exists(&keys::key(g, keys::CUSTOMER, customer_id.as_bytes()))? {
                    return Ok(not_found("customer", &customer_id));
                }
                self.put(keys::key2(g, keys::DISMISSED, &customer_id, &template), &())?;
                ChangeOutcome::Done
            }
            StateChange::BeginLink {
                state_hash,
                pending,
            } => {
                // Unused ones are removed with the other records past retention.
                let at = pending.at_ms;
                self.put_aged(keys::key(g, keys::PENDING_LINK, &state_hash), &pending, at)?;
                ChangeOutcome::Done
            }
            StateChange::TakeLink { state_hash } => {
                let key = keys::key(g, keys::PENDING_LINK, &state_hash);
                match self.get::<PendingLink>(&key)? {
                    Some(p) => {
                        self.delete(key);
                        ChangeOutcome::LinkTaken(p)
                    }
                    None => not_found("linking", "for this state"),
                }
            }
            StateChange::CreateAccount { account, customer } => {
                let account_key = keys::key(g, keys::ACCOUNT, account.email.as_bytes());
                if self.exists(&account_key)? {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::Conflict,
                        "an account with this email exists",
                    ));
                }
                let key = keys::key(g, keys::CUSTOMER, customer.id.as_bytes());
                if self.exists(&key)? {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::Conflict,
                        format!("customer {} already exists", customer.id),
                    ));
                }
                self.put(
                    keys::key(g, keys::TOKEN, &customer.token_hash),
                    &customer.id,
                )?;
                self.put(key, &customer)?;
                self.put(account_key, &account)?;
                ChangeOutcome::Done
            }
            StateChange::PutSession {
                token_hash,
                session,
            } => {
                // Sessions expire long before retention; this removes the record itself.
                let at = session.created_ms;
                self.put_aged(keys::key(g, keys::SESSION, &token_hash), &session, at)?;
                ChangeOutcome::Done
            }
            StateChange::DeleteSession { token_hash } => {
                self.delete(keys::key(g, keys::SESSION, &token_hash));
                ChangeOutcome::Done
            }
            StateChange::EndSessions { email } => {
                let key = keys::key(g, keys::ACCOUNT, email.as_bytes());
                let Some(mut account) = self.get::<AccountRecord>(&key)? else {
                    return Ok(not_found("account", &email));
                };
                account.session_epoch += 1;
                self.put(key, &account)?;
                ChangeOutcome::Done
            }
            StateChange::EraseCustomer { customer_id } => self.erase_customer(&customer_id)?,
            StateChange::Prune { before_ms, limit } => self.prune(before_ms, limit)?,
        })
    }

    /// Every (key, value) starting with `prefix`, the batch's own writes included.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let end = keys::prefix_end(prefix);
        let mut found = std::collections::BTreeMap::new();
        let mut it = self.db.raw_iterator();
        it.seek(prefix);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k >= end.as_slice() {
                break;
            }
            found.insert(k.to_vec(), Some(v.to_vec()));
            it.next();
        }
        it.status()?;
        for (k, v) in &self.overlay {
            if k.as_slice() >= prefix && k.as_slice() < end.as_slice() {
                found.insert(k.clone(), v.clone());
            }
        }
        Ok(found
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    fn erase_customer(&mut self, customer_id: &str) -> Result<ChangeOutcome, StoreError> {
        let g = self.group;
        let customer_key = keys::key(g, keys::CUSTOMER, customer_id.as_bytes());
        let Some(customer) = self.get::<CustomerRecord>(&customer_key)? else {
            return Ok(not_found("customer", customer_id));
        };
        for (k, v) in self.scan(&keys::prefix2(g, keys::LINK, customer_id))? {
            let link: LinkRecord = codec::decode(&v)?;
            self.delete(keys::key2(g, keys::SUBJECT, &link.entity_id, &link.subject));
            self.delete(k);
        }
        for (k, v) in self.scan(&keys::prefix2(g, keys::ACTIVITY, customer_id))? {
            if let ActivityRecord::RuleMatched { command_id, .. } = codec::decode(&v)? {
                let outbox = keys::key(g, keys::OUTBOX, command_id.as_bytes());
                if let Some(rec) = self.get::<OutboxRecord>(&outbox)? {
                    if let Some(due) = rec.next_due_ms {
                        self.delete(keys::due(g, due, &command_id));
                    }
                }
                self.delete(keys::key(g, keys::FAILED, command_id.as_bytes()));
                self.delete(outbox);
            }
            self.delete(k);
        }
        for tag in [keys::RULE, keys::ENGAGEMENT, keys::DISMISSED] {
            for (k, _) in self.scan(&keys::prefix2(g, tag, customer_id))? {
                self.delete(k);
            }
        }
        // Sessions, pending linkings and commands whose activity line already aged out are
        // not under the customer's prefixes: scan their (retention-bounded) ranges.
        for (k, v) in self.scan(&keys::prefix(g, keys::SESSION))? {
            if codec::decode::<SessionRecord>(&v)?.customer_id == customer_id {
                self.delete(k);
            }
        }
        for (k, v) in self.scan(&keys::prefix(g, keys::PENDING_LINK))? {
            if codec::decode::<PendingLink>(&v)?.customer_id == customer_id {
                self.delete(k);
            }
        }
        for (k, v) in self.scan(&keys::prefix(g, keys::OUTBOX))? {
            let rec: OutboxRecord = codec::decode(&v)?;
            if rec.command.customer_id == customer_id {
                if let Some(due) = rec.next_due_ms {
                    self.delete(keys::due(g, due, &rec.command.id));
                }
                self.delete(keys::key(g, keys::FAILED, rec.command.id.as_bytes()));
                self.delete(k);
            }
        }
        self.delete(keys::key(g, keys::TOKEN, &customer.token_hash));
        if let Some(email) = &customer.email {
            // Its sessions die with the account: a session is only valid with its account.
            self.delete(keys::key(g, keys::ACCOUNT, email.as_bytes()));
        }
        self.delete(customer_key);
        Ok(ChangeOutcome::Done)
    }

    fn count_prefix(&self, prefix: &[u8]) -> Result<usize, StoreError> {
        let end = keys::prefix_end(prefix);
        let mut it = self.db.raw_iterator();
        it.seek(prefix);
        let mut n = 0;
        while let Some(k) = it.key() {
            if k >= end.as_slice() {
                break;
            }
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }

    fn link(&mut self, customer_id: String, link: LinkRecord) -> Result<ChangeOutcome, StoreError> {
        let g = self.group;
        if !self.exists(&keys::key(g, keys::CUSTOMER, customer_id.as_bytes()))? {
            return Ok(not_found("customer", &customer_id));
        }
        if self.entity(&link.entity_id)?.is_none() {
            return Ok(not_found("entity", &link.entity_id));
        }
        let subject_key = keys::key2(g, keys::SUBJECT, &link.entity_id, &link.subject);
        if let Some(owner) = self.get::<String>(&subject_key)? {
            if owner != customer_id {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    "that subject is linked to another customer at this entity",
                ));
            }
        }
        let link_key = keys::key2(g, keys::LINK, &customer_id, &link.entity_id);
        if let Some(old) = self.get::<LinkRecord>(&link_key)? {
            if old.subject != link.subject {
                self.delete(keys::key2(g, keys::SUBJECT, &link.entity_id, &old.subject));
            }
        }
        self.put(subject_key, &customer_id)?;
        let at = link.linked_ms;
        let entity_id = link.entity_id.clone();
        self.put(link_key, &link)?;
        self.activity(&customer_id, at, &ActivityRecord::Linked { entity_id })?;
        Ok(ChangeOutcome::Done)
    }

    fn ingest(&mut self, ingest: Ingest) -> Result<ChangeOutcome, StoreError> {
        let g = self.group;
        let dedup_key = keys::key2(g, keys::DEDUP, &ingest.event.source, &ingest.event.id);
        if let Some(first) = self.get::<DedupRecord>(&dedup_key)? {
            return Ok(ChangeOutcome::Ingested {
                duplicate: true,
                fate: first.fate,
                commands: first.commands,
                reason: first.reason,
            });
        }
        let fate = if ingest.commands.is_empty() {
            EventFate::Ignored
        } else {
            EventFate::Accepted
        };
        let command_ids: Vec<String> = ingest.commands.iter().map(|c| c.id.clone()).collect();
        let at = ingest.at_ms;
        self.put_aged(
            dedup_key,
            &DedupRecord {
                customer_id: ingest.customer_id.clone(),
                fate,
                commands: command_ids.clone(),
                reason: ingest.ignored_reason.clone(),
                at_ms: at,
            },
            at,
        )?;
        if let Some(customer) = &ingest.customer_id {
            // Engagement for recommendations: how often, and when last, this type arrived.
            let key = keys::key2(
                g,
                keys::ENGAGEMENT,
                customer,
                &format!("{}.{}", ingest.event.source, ingest.event.event_type),
            );
            let (count, _) = self.get::<(u64, i64)>(&key)?.unwrap_or((0, 0));
            self.put(key, &(count + 1, at))?;
            self.activity(
                customer,
                at,
                &ActivityRecord::EventReceived {
                    event: ingest.event.clone(),
                    fate,
                    reason: ingest.ignored_reason.clone(),
                },
            )?;
        }
        for command in ingest.commands {
            self.activity(
                &command.customer_id,
                at,
                &ActivityRecord::RuleMatched {
                    rule_id: command.rule_id.clone(),
                    event_id: command.event_id.clone(),
                    command_id: command.id.clone(),
                    target: command.target.clone(),
                    command_type: command.command_type.clone(),
                },
            )?;
            self.schedule(at, &command.id)?;
            let key = keys::key(g, keys::OUTBOX, command.id.as_bytes());
            self.put(
                key,
                &OutboxRecord {
                    command,
                    state: DeliveryState::Pending,
                    attempts: Vec::new(),
                    next_due_ms: Some(at),
                    reason: None,
                },
            )?;
        }
        Ok(ChangeOutcome::Ingested {
            duplicate: false,
            fate,
            commands: command_ids,
            reason: ingest.ignored_reason,
        })
    }

    fn record_delivery(&mut self, update: DeliveryUpdate) -> Result<(), StoreError> {
        let g = self.group;
        let command_id = match &update {
            DeliveryUpdate::Attempted { command_id, .. }
            | DeliveryUpdate::Cancelled { command_id, .. } => command_id.clone(),
        };
        let key = keys::key(g, keys::OUTBOX, command_id.as_bytes());
        let Some(mut rec) = self.get::<OutboxRecord>(&key)? else {
            return Ok(());
        };
        if rec.state != DeliveryState::Pending {
            // A late result for a delivery already settled (e.g. cancelled meanwhile).
            return Ok(());
        }
        if let Some(due) = rec.next_due_ms.take() {
            self.delete(keys::due(g, due, &command_id));
        }
        let customer = rec.command.customer_id.clone();
        match update {
            DeliveryUpdate::Attempted { attempt, next, .. } => {
                let at = attempt.at_ms;
                let status_code = attempt.status_code;
                let error = attempt.error.clone();
                rec.attempts.push(attempt);
                match next {
                    AttemptNext::Delivered => {
                        rec.state = DeliveryState::Delivered;
                        self.age(at, &key);
                    }
                    AttemptNext::RetryAt(due) => {
                        rec.next_due_ms = Some(due);
                        self.schedule(due, &command_id)?;
                    }
                    AttemptNext::Exhausted => {
                        rec.state = DeliveryState::Failed;
                        rec.reason = Some("retries exhausted".into());
                        self.put(keys::key(g, keys::FAILED, command_id.as_bytes()), &())?;
                        self.age(at, &key);
                    }
                    AttemptNext::Gone => {
                        rec.state = DeliveryState::Failed;
                        rec.reason = Some("endpoint answered 410 Gone; endpoint disabled".into());
                        self.put(keys::key(g, keys::FAILED, command_id.as_bytes()), &())?;
                        self.age(at, &key);
                        if let Some(mut entity) = self.entity(&rec.command.target)? {
                            entity.endpoint_enabled = false;
                            self.put(keys::key(g, keys::ENTITY, entity.id.as_bytes()), &entity)?;
                            self.effects.push(Effect::EntityChanged(entity.id));
                        }
                    }
                }
                let attempt_no = rec.attempts.len() as u32;
                let state = rec.state;
                self.activity(
                    &customer,
                    at,
                    &ActivityRecord::DeliveryAttempt {
                        command_id,
                        attempt: attempt_no,
                        status_code,
                        error,
                        state,
                    },
                )?;
            }
            DeliveryUpdate::Cancelled {
                reason,
                at_ms,
                as_failed,
                ..
            } => {
                rec.state = if as_failed {
                    self.put(keys::key(g, keys::FAILED, command_id.as_bytes()), &())?;
                    DeliveryState::Failed
                } else {
                    DeliveryState::Cancelled
                };
                rec.reason = Some(reason.clone());
                self.age(at_ms, &key);
                let state = rec.state;
                self.activity(
                    &customer,
                    at_ms,
                    &ActivityRecord::DeliveryChanged {
                        command_id,
                        state,
                        reason,
                    },
                )?;
            }
        }
        self.put(key, &rec)
    }

    fn prune(&mut self, before_ms: i64, limit: u32) -> Result<ChangeOutcome, StoreError> {
        let g = self.group;
        let lo = keys::prefix(g, keys::EXPIRY);
        let hi = keys::expiry(g, before_ms, 0);
        let mut found = Vec::new();
        {
            let mut it = self.db.raw_iterator();
            it.seek(&lo);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if k >= hi.as_slice() || found.len() >= limit as usize {
                    break;
                }
                found.push((k.to_vec(), v.to_vec()));
                it.next();
            }
            it.status()?;
        }
        let n = found.len() as u32;
        for (aging_key, target) in found {
            self.delete(aging_key);
            if target.get(4) == Some(&keys::OUTBOX) {
                // A delivery replayed after it aged is pending again: keep it.
                match self.get::<OutboxRecord>(&target)? {
                    Some(rec) if rec.state == DeliveryState::Pending => continue,
                    Some(rec) => {
                        self.delete(keys::key(g, keys::FAILED, rec.command.id.as_bytes()));
                    }
                    None => continue,
                }
            }
            self.delete(target);
        }
        Ok(ChangeOutcome::Pruned(n))
    }
}

/// A raw key and its encoded value.
type KeyValue = (Vec<u8>, Vec<u8>);

fn not_found(what: &str, id: &str) -> ChangeOutcome {
    ChangeOutcome::rejected(ErrorCode::NotFound, format!("{what} {id} not found"))
}
