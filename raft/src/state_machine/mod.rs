//! The state machine: applies committed [`StateChange`]s to RocksDB, and builds, sends and
//! installs snapshots of one group as a stream of its keys.
//!
//! Each `apply` call writes everything it changes, plus the last applied log id, in one
//! RocksDB write batch, so a crash never leaves an entry half-applied. Its checks (exists,
//! linked, not a duplicate) are authoritative: the node checks first for good errors, but two
//! racing proposals are settled here, identically on every replica.
//!
//! The domain logic is split by concern: [`cluster`] (nodes, placement, the routing index,
//! emails), [`entities`], [`customers`] (profiles, links, rules, intents, erasure),
//! [`ingest`], [`delivery`], [`accounts`] (sessions, OAuth linkings), [`retention`];
//! [`tx`] is the write batch they share and [`snapshot`] the snapshot files.

mod accounts;
mod cluster;
mod customers;
mod delivery;
mod entities;
mod ingest;
mod retention;
pub(crate) mod snapshot;
mod tx;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use custos_api::ErrorCode;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot};
use rocksdb::{WriteBatch, DB};

use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::pacing::SnapshotPacer;
use crate::reader::StateReader;
use crate::records::*;
use crate::shard::META_GROUP;
use crate::types::{GroupId, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

pub use tx::Tx;

type Entry = openraft::Entry<TypeConfig>;

/// `SM_META` key of the last applied log id.
pub(crate) const APPLIED: &[u8] = b"applied";
/// `SM_META` key of the last applied membership.
pub(crate) const MEMBERSHIP: &[u8] = b"membership";

/// Keys written (puts, deletes and merge operands) by every apply in this process: `/metrics`
/// reports it, and the benchmark divides it by the events to show what one event costs in
/// writes.
static KEYS_WRITTEN: AtomicU64 = AtomicU64::new(0);

/// Keys written by the state machines of this process so far.
pub fn keys_written() -> u64 {
    KEYS_WRITTEN.load(Ordering::Relaxed)
}

/// What an apply changed that the node's caches and workers must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// An entity was registered or changed.
    EntityChanged(String),
    /// Meta group: who claims this subject at this entity changed (claimed or released).
    SubjectChanged {
        /// The entity.
        entity_id: String,
        /// The subject at that entity.
        subject: String,
    },
    /// Data group: a customer linked an entity, linked it again or unlinked it.
    LinkChanged {
        /// The customer.
        customer_id: String,
        /// The entity.
        entity_id: String,
    },
    /// A delivery is pending and due at this time (new, retried or replayed).
    DeliveryDue {
        /// Command id.
        command_id: String,
        /// When its next attempt is due.
        due_ms: i64,
        /// The command, when this apply created it: its first attempt needs no read of the
        /// outbox record (pending, no attempts yet).
        created: Option<Arc<CommandRecord>>,
    },
    /// A delivery left pending (delivered, failed or cancelled): a command handed over for
    /// its first attempt is not sent as it was handed over (the attempt reads its state).
    DeliverySettled(String),
    /// An intent was recorded: the group's intent worker has a step to take.
    IntentAdded,
    /// Nodes, settings, the assignment or a group report changed (meta group).
    ClusterChanged,
    /// Meta group: a newer recommendation model was stored.
    ModelChanged,
    /// The whole state was replaced by a snapshot: drop every cache.
    SnapshotInstalled {
        /// The replica held a state before (not a new replica's first install): what it
        /// replaced may include what an erasure it never applied deleted.
        replaced_state: bool,
    },
    /// A customer's data was erased (or released from the meta group): the group's log and
    /// snapshot, and the store's files, still hold it until they are rewritten.
    Erased,
    /// A rule of this customer was saved or deleted (the recommender retrains after enough
    /// of them; the leader's cached profile is read again).
    RuleChanged {
        /// The customer.
        customer_id: String,
    },
}

/// Told about every apply, after its batch is written.
pub trait ApplyObserver: Send + Sync + 'static {
    /// Called with the group and the effects of one apply call (possibly empty).
    fn applied(&self, group: GroupId, effects: &[Effect]);
}

/// An observer that ignores everything (tests, tools).
#[derive(Debug, Default)]
pub struct NoObserver;

impl ApplyObserver for NoObserver {
    fn applied(&self, _group: GroupId, _effects: &[Effect]) {}
}

/// One group's state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    group: GroupId,
    /// Which of the group's two key spaces holds its state (see [`keys::space`]).
    generation: Arc<AtomicBool>,
    observer: Arc<dyn ApplyObserver>,
    snapshots: Arc<PathBuf>,
    /// The file a snapshot is being received into.
    receiving: Arc<Mutex<Option<PathBuf>>>,
    /// Told each snapshot's size; shared with the group's log (see [`Self::pacer`]).
    pacer: Arc<SnapshotPacer>,
    /// Held by a snapshot build and by an install, which openraft runs at once: a build reads
    /// the key space and its snapshot of it on one side of an install's switch, never across.
    switching: Arc<Mutex<()>>,
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
    /// snapshot files under `snapshots`. Removes what a crash mid-install left behind.
    pub fn new(
        db: Arc<DB>,
        group: GroupId,
        observer: Arc<dyn ApplyObserver>,
        snapshots: PathBuf,
    ) -> Result<Self, StoreError> {
        let generation = match db.get(keys::prefix(group, keys::SPACE))? {
            Some(v) => codec::decode::<bool>(&v)?,
            None => false,
        };
        let (lo, hi) = keys::sm_range(keys::space(group, !generation));
        delete_range(&db, &lo, &hi)?;
        snapshot::remove_unfinished(&snapshots, group, &db)?;
        let pacer = Arc::new(SnapshotPacer::new(snapshot::current_size(
            &db, group, &snapshots,
        )?));
        Ok(StateMachineStore {
            db,
            group,
            generation: Arc::new(AtomicBool::new(generation)),
            observer,
            snapshots: Arc::new(snapshots),
            receiving: Arc::new(Mutex::new(None)),
            switching: Arc::new(Mutex::new(())),
            pacer,
        })
    }

    /// What decides when this group builds a snapshot: give it to the group's log
    /// ([`crate::LogStore::paced_by`]) so that it counts the log's bytes too.
    pub fn pacer(&self) -> Arc<SnapshotPacer> {
        self.pacer.clone()
    }

    /// A reader of this group's applied state (it follows snapshot installs).
    pub fn reader(&self) -> StateReader {
        StateReader::new(self.db.clone(), self.group, self.generation.clone())
    }

    fn space(&self) -> u32 {
        keys::space(self.group, self.generation.load(Ordering::SeqCst))
    }

    fn read_applied(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        read_sm_meta(&self.db, self.space())
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<ChangeOutcome>, StoreError> {
        let mut tx = Tx::new(&self.db, self.group, self.space());
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut last = None;
        let mut membership = None;
        for entry in entries {
            tx.begin_entry(entry.log_id.index);
            last = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => ChangeOutcome::Done,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    ChangeOutcome::Done
                }
                EntryPayload::Normal(change) => tx.apply_top(change)?,
            };
            outcomes.push(outcome);
        }
        if let Some(last) = last {
            tx.put(tx.meta_key(APPLIED), &Some(last))?;
        }
        if let Some(m) = membership {
            tx.put(tx.meta_key(MEMBERSHIP), &m)?;
        }
        let (batch, effects) = tx.finish()?;
        KEYS_WRITTEN.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.db.write(batch)?;
        self.observer.applied(self.group, &effects);
        Ok(outcomes)
    }

    /// Installs a received snapshot file into the idle key space, then switches to it with
    /// one synced write that also records `name` (the file, already in place) as the group's
    /// current snapshot: a crash at any point leaves either the old state and snapshot or the
    /// new ones, never a state newer than the snapshot a leader would send from it.
    fn install(
        &self,
        meta: &SnapshotMeta,
        file: std::fs::File,
        name: &str,
    ) -> Result<(), StoreError> {
        let current = self.generation.load(Ordering::SeqCst);
        let replaced_state = read_sm_meta(&self.db, keys::space(self.group, current))?
            .0
            .is_some();
        let next_space = keys::space(self.group, !current);
        let (lo, hi) = keys::sm_range(next_space);
        delete_range(&self.db, &lo, &hi)?;
        snapshot::load_into(&self.db, next_space, file)?;
        let mut last = WriteBatch::default();
        last.put(
            keys::key(next_space, keys::SM_META, APPLIED),
            codec::encode(&meta.last_log_id)?,
        );
        last.put(
            keys::key(next_space, keys::SM_META, MEMBERSHIP),
            codec::encode(&meta.last_membership)?,
        );
        last.put(
            keys::prefix(self.group, keys::SPACE),
            codec::encode(&!current)?,
        );
        snapshot::record_into(&mut last, self.group, meta, name)?;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(last, &opts)?;
        self.generation.store(!current, Ordering::SeqCst);
        // Caches of the old state go as soon as readers see the new one (not after the old
        // space is cleared, which may fail and leaves nothing any reader uses).
        self.observer
            .applied(self.group, &[Effect::SnapshotInstalled { replaced_state }]);
        snapshot::remove_others(&self.snapshots, self.group, name);
        let (old, old_end) = keys::sm_range(keys::space(self.group, current));
        delete_range(&self.db, &old, &old_end)?;
        Ok(())
    }
}

fn delete_range(db: &DB, lo: &[u8], hi: &[u8]) -> Result<(), StoreError> {
    let mut batch = WriteBatch::default();
    batch.delete_range(lo, hi);
    db.write(batch)?;
    Ok(())
}

fn read_sm_meta(db: &DB, space: u32) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    let last_log_id: Option<LogId> =
        match db.get_pinned(keys::key(space, keys::SM_META, APPLIED))? {
            Some(v) => codec::decode(&v)?,
            None => None,
        };
    let last_membership: StoredMembership =
        match db.get_pinned(keys::key(space, keys::SM_META, MEMBERSHIP))? {
            Some(v) => codec::decode(&v)?,
            None => StoredMembership::default(),
        };
    Ok((last_log_id, last_membership))
}

/// Removes everything a node holds of `group`: its log, vote, snapshot records, both state
/// spaces and its snapshot files in `snapshots` (the node no longer holds a replica of it).
pub fn destroy_group(db: &DB, group: GroupId, snapshots: &Path) -> Result<(), StoreError> {
    let mut batch = WriteBatch::default();
    for space in [keys::space(group, false), keys::space(group, true)] {
        let lo = space.to_be_bytes().to_vec();
        let hi = keys::prefix_end(&lo);
        batch.delete_range(lo, hi);
    }
    // The keys first, synced, then the files: a crash in between leaves files no record names
    // (removed when the group is opened or destroyed again), never a record naming a file
    // that is gone (the replica, opened again, would fail to read its snapshot).
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    // No build records a snapshot meanwhile (a build still running finds the group gone).
    snapshot::while_not_recording(|| {
        db.write_opt(batch, &opts)?;
        snapshot::remove_all(snapshots, group);
        Ok(())
    })
}

/// Builds snapshots of one group.
#[derive(Clone)]
pub struct SnapshotBuilder {
    store: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Streams the group's keys, as of one RocksDB snapshot, into a file (never the whole
    /// group in memory); the file is what followers are sent, in chunks.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let store = self.store.clone();
        let log_bytes_at_start = self.store.pacer.log_bytes();
        let (meta, file, size) = tokio::task::spawn_blocking(move || {
            let _one = store.switching.lock().unwrap_or_else(|p| p.into_inner());
            let (meta, path, size) =
                snapshot::build(&store.db, store.group, store.space(), &store.snapshots)?;
            // Opened before the lock goes: an install waiting for it removes other files.
            let file = std::fs::File::open(&path).map_err(StoreError::io)?;
            Ok::<_, StoreError>((meta, file, size))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()).into_raft_write())?
        .map_err(StoreError::into_raft_write)?;
        self.store.pacer.built(log_bytes_at_start, size);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
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
            store: self.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = snapshot::receiving_path(&self.snapshots, self.group);
        let file = snapshot::create(&path)
            .await
            .map_err(StoreError::into_raft_write)?;
        // A transfer begun before and never finished (the leader started over with a newer
        // snapshot, or another leader) leaves its file: it goes now.
        let unfinished = self
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(path);
        if let Some(old) = unfinished {
            let _ = tokio::fs::remove_file(old).await;
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let received = self
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut file = snapshot.into_std().await;
        let (store, meta) = (self.clone(), meta.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _one = store.switching.lock().unwrap_or_else(|p| p.into_inner());
            // The installed state becomes this node's current snapshot, as received: the file
            // is put in place first and recorded by the switch.
            let name =
                snapshot::place_received(store.group, &store.snapshots, received, &mut file)?;
            let installed = file
                .try_clone()
                .map_err(StoreError::io)
                .and_then(|f| store.install(&meta, f, &name));
            if let Err(e) = installed {
                // Not recorded: the old state and snapshot stand; the file goes.
                if snapshot::current(&store.db, store.group)?.is_none_or(|c| c.file != name) {
                    let _ = std::fs::remove_file(store.snapshots.join(&name));
                }
                return Err(e);
            }
            store
                .pacer
                .installed(file.metadata().map_err(StoreError::io)?.len());
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()).into_raft_write())?
        .map_err(StoreError::into_raft_write)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // A build finishing between the read of the record and the open records its file and
        // removes this one (not under `switching`, which a build holds for its whole length,
        // while the state machine waits here): the record then names the newer file, so it is
        // read again. An error here ends openraft's state machine worker, the group with it.
        let mut tries = 0;
        loop {
            let Some(stored) =
                snapshot::current(&self.db, self.group).map_err(StoreError::into_raft_read)?
            else {
                return Ok(None);
            };
            match snapshot::open(&self.snapshots.join(&stored.file)).await {
                Ok(file) => {
                    return Ok(Some(Snapshot {
                        meta: stored.meta,
                        snapshot: Box::new(file),
                    }))
                }
                Err(e) if tries < 3 && e.is_not_found() => tries += 1,
                Err(e) => return Err(e.into_raft_read()),
            }
        }
    }
}

/// A refusal naming what was not found.
pub(crate) fn not_found(what: &str, id: &str) -> ChangeOutcome {
    ChangeOutcome::rejected(ErrorCode::NotFound, format!("{what} {id} not found"))
}

/// Whether `change` may be applied in `group`.
pub(crate) fn in_scope(group: GroupId, change: &StateChange) -> bool {
    match change.scope() {
        Scope::Any => true,
        Scope::Meta => group == META_GROUP,
        Scope::Data => group != META_GROUP,
    }
}
