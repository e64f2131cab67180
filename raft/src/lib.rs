//! Custos replication: openraft types, the RocksDB log and state machine, and the peer network.
//!
//! # Layout
//!
//! - [`types`]: the openraft type configuration and group ids.
//! - [`shard`]: the meta group, customer slots and the shard map (slot -> data group).
//! - [`placement`]: where each group's replicas and leader should be (pure functions).
//! - [`codec`]: every encode and decode of stored or peer-sent bytes, behind a format byte.
//! - [`keys`]: the RocksDB key layout; every key starts with the group id.
//! - [`records`]: what the state machine stores, and the [`StateChange`]s proposed to it.
//! - [`log_store`]: the Raft log on RocksDB; one WAL sync serves every append queued meanwhile,
//!   from every group of the node (with one group that is one append: the proposer batches).
//! - [`proposer`]: one per group; drains queued changes into one log entry.
//! - [`pacing`]: when a group builds a snapshot (log since the last one against state size).
//! - [`state_machine`]: applies committed changes to RocksDB in one write batch per apply call,
//!   builds and installs snapshots as streams of a group's keys.
//! - [`reader`]: read-only queries on the applied state, for the node's services.
//! - [`network`]: the peer RPC client (HTTP, bincode bodies) that openraft drives.
//! - [`error`]: this layer's error enum.
//!
//! Many groups share one RocksDB: a group's state is one key range, so a snapshot is a range
//! scan and dropping a group is a `delete_range`.

pub mod codec;
pub mod error;
pub mod keys;
pub mod log_store;
pub mod network;
pub mod pacing;
pub mod placement;
pub mod proposer;
pub mod reader;
pub mod records;
pub mod shard;
pub mod state_machine;
pub mod types;

use std::path::Path;
use std::sync::Arc;

pub use error::StoreError;
pub use log_store::{LogStore, WalSyncer};
pub use pacing::{SnapshotPacer, SnapshotPolicy};
pub use proposer::{ProposeError, Proposer, ProposerLimits};
pub use reader::StateReader;
pub use records::{ChangeOutcome, StateChange};
pub use rocksdb::DB;
pub use shard::{ShardMap, META_GROUP};
pub use state_machine::{destroy_group, ApplyObserver, Effect, StateMachineStore};
pub use types::{GroupId, NodeId, Raft, TypeConfig};

/// Rewrites the store's files so that deleted values are gone from disk, not only hidden:
/// flushes the memtables (the WAL files holding them are then deleted) and compacts every
/// level, dropping deleted values and their tombstones. Blocking; seconds on a large store.
pub fn compact_all(db: &rocksdb::DB) -> Result<(), StoreError> {
    db.flush().map_err(StoreError::Db)?;
    let mut opts = rocksdb::CompactOptions::default();
    opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
    opts.set_exclusive_manual_compaction(false);
    db.compact_range_opt(None::<&[u8]>, None::<&[u8]>, &opts);
    db.flush_wal(true).map_err(StoreError::Db)?;
    Ok(())
}

/// How the node's RocksDB is tuned where the right value depends on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbOptions {
    /// RocksDB's block cache: data, index and filter blocks read back from table files,
    /// uncompressed. Filled as blocks are read, so a small data set never uses all of it.
    pub block_cache_bytes: usize,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            block_cache_bytes: 1 << 30,
        }
    }
}

/// What the node's RocksDB holds in memory, bytes (RocksDB's own estimates).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbMemory {
    /// Blocks in the block cache (data, index and filter).
    pub block_cache: u64,
    /// Memtables, active, immutable and those pinned by iterators.
    pub memtables: u64,
    /// Table readers' own memory (index and filter blocks not in the block cache).
    pub table_readers: u64,
}

/// RocksDB's estimates of its memory use (zero where it gives none).
pub fn db_memory(db: &rocksdb::DB) -> DbMemory {
    let read = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0);
    DbMemory {
        block_cache: read("rocksdb.block-cache-usage"),
        memtables: read("rocksdb.size-all-mem-tables"),
        table_readers: read("rocksdb.estimate-table-readers-mem"),
    }
}

/// RocksDB asks for a key's prefix only when [`in_filter_domain`] said it has one.
fn filter_prefix_or_key(key: &[u8]) -> &[u8] {
    keys::filter_prefix(key).unwrap_or(key)
}

fn in_filter_domain(key: &[u8]) -> bool {
    keys::filter_prefix(key).is_some()
}

/// Opens (or creates) the node's one RocksDB.
pub fn open_db(path: &Path, options: DbOptions) -> Result<Arc<rocksdb::DB>, StoreError> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Log entries and state share one WAL; the log store syncs it once per batch of appends.
    opts.set_max_total_wal_size(256 << 20);
    opts.increase_parallelism(2);
    // Most point reads miss: a new event's dedup key, a rule's or link's first write.
    // Bloom filters answer those from memory instead of searching every level's index and
    // data blocks (a tenth of the node's CPU under load without them).
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    // Index and filter blocks are cached (and those of the newest files pinned): faster under
    // load than keeping them with the table readers. They are partitioned, so a lookup whose
    // partition was evicted reads back a few KiB, not a table's whole index block (pread,
    // LZ4, checksum), which took most of a cold profile rebuild's time unpartitioned.
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(options.block_cache_bytes));
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_pin_top_level_index_and_filter(true);
    opts.set_block_based_table_factory(&table);
    // A profile's rebuild is a seek over its prefix: prefix filters let it skip the table
    // files (one or more per level) that hold none of that profile's keys. Every other scan
    // reads in total order (`keys::total_order`).
    opts.set_prefix_extractor(rocksdb::SliceTransform::create(
        keys::FILTER_PREFIX_NAME,
        filter_prefix_or_key,
        Some(in_filter_domain),
    ));
    // The same for the memtable, which the newest keys (and most misses) go through first.
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.02);
    // Engagement counts are added to without a read (`Tx::add_count`).
    opts.set_merge_operator_associative("custos-counts", codec::merge_counts);
    let db = rocksdb::DB::open(&opts, path).map_err(StoreError::Db)?;
    Ok(Arc::new(db))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rocksdb_reports_what_it_holds_in_memory() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(StoreError::io)?;
        let db = open_db(dir.path(), DbOptions::default())?;
        let empty = db_memory(&db);
        db.put(b"k", vec![7u8; 100_000])?;
        assert!(db_memory(&db).memtables > empty.memtables);
        db.flush()?;
        let _ = db.get(b"k")?;
        assert!(
            db_memory(&db).block_cache > 0,
            "the value's block was read through the cache"
        );
        Ok(())
    }
}
