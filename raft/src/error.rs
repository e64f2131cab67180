//! Errors of the replication layer.

use crate::codec::CodecError;

/// What the stores and readers can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// Stored bytes could not be decoded (or a value encoded).
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// A file (snapshots) could not be read or written.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A blocking task was cancelled, or a snapshot file is damaged.
    #[error("background task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// A file error.
    pub fn io(e: std::io::Error) -> Self {
        StoreError::Io(e)
    }

    /// Whether a file was not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }

    /// As openraft's storage error, for the read path.
    pub fn into_raft_read(self) -> openraft::StorageError<u64> {
        openraft::StorageIOError::read(&self).into()
    }

    /// As openraft's storage error, for the write path.
    pub fn into_raft_write(self) -> openraft::StorageError<u64> {
        openraft::StorageIOError::write(&self).into()
    }
}
