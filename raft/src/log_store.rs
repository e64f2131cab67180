//! The Raft log on RocksDB, synced by one thread for every group of the node.
//!
//! `append` writes the entries to RocksDB at once (so they are readable for replication) but
//! without syncing; the node's one [`WalSyncer`] thread then syncs the WAL once for every
//! append that queued up meanwhile, from every group, and only after that reports them flushed
//! to openraft. All groups share one RocksDB and so one WAL: one fsync serves them all. With
//! one data group (the default) a sync serves one append, since openraft appends a group's
//! entries one at a time: there the batching is the proposer's, many changes per entry.
//! The entries last appended are also kept decoded ([`RecentEntries`]): replication and the
//! apply read them just after they are written, and would otherwise read them back from
//! RocksDB and decode them again, on every replica.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, Vote};
use rocksdb::{WriteBatch, WriteOptions, DB};

use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::pacing::SnapshotPacer;
use crate::types::{GroupId, LogId, NodeId, StorageError, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
/// At most this many encoded bytes of recent entries are kept decoded, over all of a node's
/// groups (a group keeps at least its last entry).
const RECENT_BYTES: usize = 32 << 20;

/// The last entries appended to one group's log, in index order with no gap, and their
/// encoded sizes. A read is served from here only when every entry it asks for is here;
/// anything else reads RocksDB. `node_bytes` is shared by the node's groups, for the budget.
#[derive(Debug, Default)]
struct RecentEntries {
    entries: VecDeque<(Arc<Entry>, usize)>,
    bytes: usize,
    node_bytes: Arc<AtomicUsize>,
}

impl RecentEntries {
    fn new(node_bytes: Arc<AtomicUsize>) -> Self {
        RecentEntries {
            entries: VecDeque::new(),
            bytes: 0,
            node_bytes,
        }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry, size: usize) {
        let next = self.first_index().map(|f| f + self.entries.len() as u64);
        if next.is_some_and(|n| n != entry.log_id.index) {
            // Not the next index (a truncated tail rewritten elsewhere): start afresh.
            self.pop_front_while(|_| true);
        }
        self.entries.push_back((Arc::new(entry), size));
        self.bytes += size;
        self.node_bytes.fetch_add(size, Ordering::Relaxed);
        while self.node_bytes.load(Ordering::Relaxed) > RECENT_BYTES && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, n)) = self.entries.pop_front() {
            self.forget(n);
        }
    }

    /// Takes `size` bytes of dropped entries off this group's count and the node's.
    fn forget(&mut self, size: usize) {
        self.bytes -= size;
        self.node_bytes.fetch_sub(size, Ordering::Relaxed);
    }

    /// Forgets entries from the front while `forget` says so of their index.
    fn pop_front_while(&mut self, forget: impl Fn(u64) -> bool) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| forget(e.log_id.index))
        {
            self.pop_front();
        }
    }

    /// The entries `start..end`, if all of them are here (shared: the caller clones them
    /// after letting go of the lock).
    fn get(&self, start: u64, end: u64) -> Option<Vec<Arc<Entry>>> {
        let first = self.first_index()?;
        let stop = first + self.entries.len() as u64;
        if start < first || end > stop || start > end {
            return None;
        }
        let (from, to) = ((start - first) as usize, (end - first) as usize);
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    /// Forgets the entries at `index` and after.
    fn truncate(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            if let Some((_, n)) = self.entries.pop_back() {
                self.forget(n);
            }
        }
    }

    /// Forgets the entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        self.pop_front_while(|i| i <= index);
    }
}

impl Drop for RecentEntries {
    fn drop(&mut self) {
        self.node_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Counts of the WAL syncer's work, so its batching can be measured (appends per sync).
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
    /// Encoded bytes of the entries the node's groups keep decoded ([`RecentEntries`]).
    recent_bytes: Arc<AtomicUsize>,
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
        WalSyncer {
            tx,
            stats,
            recent_bytes: Arc::default(),
        }
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
    recent: Arc<Mutex<RecentEntries>>,
    pacer: Arc<SnapshotPacer>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("group", &self.group)
            .finish()
    }
}

/// The vote stored for `group` (none: its Raft never started, on this node).
pub fn stored_vote(db: &DB, group: GroupId) -> Result<Option<Vote<NodeId>>, StoreError> {
    match db.get_pinned(keys::key(group, keys::RAFT_META, VOTE))? {
        Some(v) => Ok(Some(codec::decode(&v)?)),
        None => Ok(None),
    }
}

/// Whether `group`'s Raft state holds nothing but a vote `me` cast for itself: no log entry,
/// none purged, no snapshot. Only a node forming a cluster votes for itself before its log has
/// an entry (a first start killed while openraft initialised the group), and openraft refuses
/// to initialise a group that has a vote, so such a group can only be started over. A vote
/// for another node (a joining node killed between its leader's vote and its first entries)
/// is not this: that node belongs to the leader's cluster.
pub fn holds_only_own_vote(db: &DB, group: GroupId, me: NodeId) -> Result<bool, StoreError> {
    if stored_vote(db, group)?.is_none_or(|v| v.leader_id().voted_for() != Some(me)) {
        return Ok(false);
    }
    let prefix = keys::prefix(group, keys::LOG);
    let mut it = db.raw_iterator_opt(keys::total_order());
    it.seek(&prefix);
    let has_entry = it.key().is_some_and(|k| k.starts_with(&prefix));
    it.status()?;
    Ok(!has_entry
        && db
            .get_pinned(keys::key(group, keys::RAFT_META, PURGED))?
            .is_none()
        && db
            .get_pinned(keys::prefix(group, keys::SNAPSHOT))?
            .is_none())
}

impl LogStore {
    /// The log of `group` in `db`, synced by `syncer` (the node's one syncer for `db`).
    pub fn new(db: Arc<DB>, group: GroupId, syncer: WalSyncer) -> Self {
        LogStore {
            db,
            group,
            recent: Arc::new(Mutex::new(RecentEntries::new(syncer.recent_bytes.clone()))),
            syncer,
            pacer: Arc::default(),
        }
    }

    /// This log, counting what it appends in `pacer` (the group's state machine's).
    pub fn paced_by(mut self, pacer: Arc<SnapshotPacer>) -> Self {
        self.pacer = pacer;
        self
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
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
        // An open-ended read goes to RocksDB: an append may have written there and not here yet.
        if let Some(found) = end_exclusive.and_then(|end| self.recent().get(start, end)) {
            return Ok(found.iter().map(|e| Entry::clone(e)).collect());
        }
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
        let mut written = Vec::new();
        for entry in entries {
            let v = codec::encode(&entry).map_err(|e| StoreError::from(e).into_raft_write())?;
            batch.put(keys::log(self.group, entry.log_id.index), &v);
            written.push((entry, v.len()));
        }
        self.db
            .write(batch)
            .map_err(|e| StoreError::from(e).into_raft_write())?;
        self.pacer
            .appended(written.iter().map(|(_, size)| *size as u64).sum());
        let mut recent = self.recent();
        for (entry, size) in written {
            recent.push(entry, size);
        }
        drop(recent);
        if let Err(mpsc::SendError(cb)) = self.syncer.tx.send(callback) {
            // The syncer is gone (thread failed to start): sync here instead.
            let r = self.db.flush_wal(true).map_err(std::io::Error::other);
            cb.log_io_completed(r);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent().truncate(log_id.index);
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
        self.recent().purge(log_id.index);
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

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn only_a_vote_cast_for_itself_without_a_log_is_a_forming_cut_short() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let db = crate::open_db(&tmp.path().join("db"), crate::DbOptions::default())?;
        let vote_key = keys::key(0, keys::RAFT_META, VOTE);
        assert!(
            !holds_only_own_vote(&db, 0, 1)?,
            "no vote: nothing was begun"
        );
        // A joining node's vote for its leader: it belongs to that cluster.
        db.put(&vote_key, codec::encode(&Vote::<NodeId>::new(3, 2))?)?;
        assert!(!holds_only_own_vote(&db, 0, 1)?);
        db.put(&vote_key, codec::encode(&Vote::<NodeId>::new(1, 1))?)?;
        assert!(holds_only_own_vote(&db, 0, 1)?);
        // With an entry, the group was initialised: never started over.
        db.put(keys::log(0, 1), b"x")?;
        assert!(!holds_only_own_vote(&db, 0, 1)?);
        Ok(())
    }

    fn indexes(entries: Option<Vec<Arc<Entry>>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn recent_entries_serve_only_ranges_they_hold_whole() {
        let mut recent = RecentEntries::default();
        assert_eq!(indexes(recent.get(1, 2)), None, "empty");
        for i in 5..=9 {
            recent.push(entry(i), 10);
        }
        assert_eq!(indexes(recent.get(5, 10)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(recent.get(7, 7)), Some(vec![]));
        assert_eq!(
            indexes(recent.get(4, 6)),
            None,
            "starts before the first held"
        );
        assert_eq!(indexes(recent.get(8, 11)), None, "ends after the last held");

        // A truncated tail is forgotten, and the new entries at those indexes replace it.
        recent.truncate(8);
        assert_eq!(indexes(recent.get(7, 9)), None);
        recent.push(entry(8), 10);
        assert_eq!(indexes(recent.get(5, 9)), Some(vec![5, 6, 7, 8]));
        assert_eq!(recent.bytes, 40);

        // A gap (an entry that does not follow the last) starts afresh.
        recent.push(entry(20), 10);
        assert_eq!(indexes(recent.get(5, 9)), None);
        assert_eq!(indexes(recent.get(20, 21)), Some(vec![20]));
        assert_eq!(recent.bytes, 10);

        recent.purge(20);
        assert_eq!(recent.first_index(), None);
        assert_eq!(recent.bytes, 0);
    }

    #[test]
    fn recent_entries_keep_a_bounded_number_of_bytes_over_the_node() {
        let node = Arc::new(AtomicUsize::new(0));
        let mut busy = RecentEntries::new(node.clone());
        let size = RECENT_BYTES / 4;
        for i in 1..=10 {
            busy.push(entry(i), size);
        }
        assert_eq!(node.load(Ordering::Relaxed), 4 * size);
        assert_eq!(indexes(busy.get(7, 11)), Some(vec![7, 8, 9, 10]));
        assert_eq!(indexes(busy.get(6, 11)), None, "evicted, read from RocksDB");

        // Another group of the node shares the budget: its entries push the first group's out.
        let mut other = RecentEntries::new(node.clone());
        other.push(entry(1), 2 * size);
        assert_eq!(
            node.load(Ordering::Relaxed),
            6 * size,
            "over the budget: a group keeps at least its last entry"
        );
        busy.push(entry(11), size);
        assert_eq!(indexes(busy.get(10, 12)), Some(vec![10, 11]));
        assert_eq!(indexes(busy.get(9, 12)), None);
        // A group keeps its last entry, however large, until the next arrives.
        busy.push(entry(12), RECENT_BYTES * 2);
        assert_eq!(indexes(busy.get(12, 13)), Some(vec![12]));
        // A closed group's entries leave the budget.
        drop(busy);
        assert_eq!(node.load(Ordering::Relaxed), 2 * size);
    }
}
