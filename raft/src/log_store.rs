//! The Raft log on RocksDB with group commit.
//!
//! `append` writes the entries to RocksDB at once (so they are readable for replication) but
//! without syncing; the node's one [`WalSyncer`] thread then syncs the WAL once for every
//! append that queued up meanwhile, from every group, and only after that reports them flushed
//! to openraft. All groups share one RocksDB and so one WAL: one fsync serves them all.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, Vote};
use rocksdb::{WriteBatch, WriteOptions, DB};

use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::types::{GroupId, LogId, NodeId, StorageError, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// Counts of the WAL syncer's work, so group commit can be measured (appends per sync).
#[derive(Debug, Default)]
pub struct WalStats {
    /// `flush_wal(sync)` calls.
    pub syncs: AtomicU64,
    /// Appends reported flushed.
    pub appends: AtomicU64,
}

/// The node's one WAL syncer: a thread that syncs the WAL once for every append queued since
/// the last sync, whatever its group, then reports them flushed. Cheap to clone.
#[derive(Clone)]
pub struct WalSyncer {
    tx: mpsc::Sender<LogFlushed<TypeConfig>>,
    stats: Arc<WalStats>,
}

impl std::fmt::Debug for WalSyncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalSyncer").finish_non_exhaustive()
    }
}

impl WalSyncer {
    /// Starts the syncer thread of `db`.
    pub fn start(db: &Arc<DB>) -> Self {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let stats = Arc::new(WalStats::default());
        // A weak handle: the detached syncer must never be the one to close the database
        // (a close racing the process's exit aborts inside RocksDB).
        let sync_db = Arc::downgrade(db);
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("custos-wal-sync".into())
            .spawn(move || sync_loop(&sync_db, &rx, &thread_stats))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start WAL syncer: {e}"));
        WalSyncer { tx, stats }
    }

    /// What the syncer has done so far.
    pub fn stats(&self) -> &WalStats {
        &self.stats
    }
}

/// One group's Raft log. Cheap to clone: clones share the database and the syncer.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    group: GroupId,
    syncer: WalSyncer,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("group", &self.group)
            .finish()
    }
}

impl LogStore {
    /// The log of `group` in `db`, synced by `syncer` (the node's one syncer for `db`).
    pub fn new(db: Arc<DB>, group: GroupId, syncer: WalSyncer) -> Self {
        LogStore { db, group, syncer }
    }

    /// Removes every log entry and the vote of this group (the node no longer holds it).
    pub fn destroy(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for tag in [keys::LOG, keys::RAFT_META] {
            let p = keys::prefix(self.group, tag);
            batch.delete_range(p.clone(), keys::prefix_end(&p));
        }
        self.db.write(batch)?;
        Ok(())
    }

    fn meta_key(&self, name: &[u8]) -> Vec<u8> {
        keys::key(self.group, keys::RAFT_META, name)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        name: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.db.get_pinned(self.meta_key(name))? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn put_meta_synced<T: serde::Serialize>(
        &self,
        name: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .put_opt(self.meta_key(name), codec::encode(value)?, &opts)?;
        Ok(())
    }

    fn last_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let start = keys::prefix(self.group, keys::LOG);
        let end = keys::prefix_end(&start);
        let mut it = keys::range_iter(&self.db, &start, &end);
        it.seek_for_prev(&end);
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.starts_with(&start) {
                let entry: Entry = codec::decode(v)?;
                return Ok(Some(entry.log_id));
            }
        }
        it.status()?;
        Ok(None)
    }

    fn read_range(&self, start: u64, end_exclusive: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let lo = keys::log(self.group, start);
        let hi = match end_exclusive {
            Some(e) => keys::log(self.group, e),
            None => keys::prefix_end(&keys::prefix(self.group, keys::LOG)),
        };
        let mut out = Vec::new();
        let mut it = keys::range_iter(&self.db, &lo, &hi);
        it.seek(&lo);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k >= hi.as_slice() {
                break;
            }
            out.push(codec::decode(v)?);
            it.next();
        }
        it.status()?;
        Ok(out)
    }
}

/// Syncs the WAL once for every append queued since the last sync, then reports them.
fn sync_loop(
    db: &std::sync::Weak<DB>,
    rx: &mpsc::Receiver<LogFlushed<TypeConfig>>,
    stats: &WalStats,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats
            .appends
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        // Appends are only queued by a live store, which holds the database open.
        let result = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(std::io::Error::other),
            None => Err(std::io::Error::other("the database is closed")),
        };
        for cb in batch {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            cb.log_io_completed(r);
        }
    }
}

fn range_to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, Option<u64>) {
    use std::ops::Bound::*;
    let start = match range.start_bound() {
        Included(&s) => s,
        Excluded(&s) => s.saturating_add(1),
        Unbounded => 0,
    };
    let end = match range.end_bound() {
        Included(&e) => Some(e.saturating_add(1)),
        Excluded(&e) => Some(e),
        Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = range_to_bounds(&range);
        self.read_range(start, end)
            .map_err(StoreError::into_raft_read)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.get_meta(PURGED).map_err(StoreError::into_raft_read)?;
        let last = self.last_log_id().map_err(StoreError::into_raft_read)?;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta_synced(VOTE, vote)
            .map_err(StoreError::into_raft_write)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE).map_err(StoreError::into_raft_read)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only means re-applying from the last applied index.
        let v = codec::encode(&committed).map_err(|e| StoreError::from(e).into_raft_write())?;
        self.db
            .put(self.meta_key(COMMITTED), v)
            .map_err(|e| StoreError::from(e).into_raft_write())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId>>(COMMITTED)
            .map_err(StoreError::into_raft_read)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            let v = codec::encode(&entry).map_err(|e| StoreError::from(e).into_raft_write())?;
            batch.put(keys::log(self.group, entry.log_id.index), v);
        }
        self.db
            .write(batch)
            .map_err(|e| StoreError::from(e).into_raft_write())?;
        if let Err(mpsc::SendError(cb)) = self.syncer.tx.send(callback) {
            // The syncer is gone (thread failed to start): sync here instead.
            let r = self.db.flush_wal(true).map_err(std::io::Error::other);
            cb.log_io_completed(r);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = keys::log(self.group, log_id.index);
        let to = keys::prefix_end(&keys::prefix(self.group, keys::LOG));
        let mut batch = WriteBatch::default();
        batch.delete_range(from, to);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| StoreError::from(e).into_raft_write())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let marker = codec::encode(&log_id).map_err(|e| StoreError::from(e).into_raft_write())?;
        batch.put(self.meta_key(PURGED), marker);
        batch.delete_range(
            keys::log(self.group, 0),
            keys::log(self.group, log_id.index.saturating_add(1)),
        );
        self.db
            .write(batch)
            .map_err(|e| StoreError::from(e).into_raft_write())
    }
}
