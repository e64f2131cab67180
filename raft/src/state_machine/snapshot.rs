//! Snapshot files: a group's state machine keys as of one RocksDB snapshot, streamed to a
//! file as length-prefixed pairs (keys without their space prefix), never held in memory.
//! openraft sends the file to followers in chunks; a follower streams it back into RocksDB
//! in bounded write batches.

use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};

use super::{APPLIED, MEMBERSHIP};
use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::types::{GroupId, LogId, SnapshotMeta, StoredMembership};

const MAGIC: &[u8; 4] = b"CSNP";
/// Flush the install's write batch at about this size.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Largest key or value a snapshot frame may carry (anything bigger is corruption).
const MAX_FRAME: u32 = 64 << 20;

/// The current snapshot of a group, as recorded: its metadata and its file's name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub meta: SnapshotMeta,
    pub file: String,
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::io(e)
}

/// The recorded current snapshot of `group`.
pub(crate) fn current(db: &DB, group: GroupId) -> Result<Option<StoredSnapshot>, StoreError> {
    match db.get(keys::prefix(group, keys::SNAPSHOT))? {
        Some(v) => Ok(Some(codec::decode(&v)?)),
        None => Ok(None),
    }
}

/// Size of the group's current snapshot file in `dir`, bytes (0 when it has none).
pub(crate) fn current_size(db: &DB, group: GroupId, dir: &Path) -> Result<u64, StoreError> {
    Ok(match current(db, group)? {
        Some(stored) => std::fs::metadata(dir.join(stored.file)).map_or(0, |m| m.len()),
        None => 0,
    })
}

/// Records `file` as the group's current snapshot and removes the group's older files.
fn record(
    db: &DB,
    group: GroupId,
    dir: &Path,
    meta: &SnapshotMeta,
    file: &str,
) -> Result<(), StoreError> {
    let stored = StoredSnapshot {
        meta: meta.clone(),
        file: file.to_owned(),
    };
    db.put(keys::prefix(group, keys::SNAPSHOT), codec::encode(&stored)?)?;
    let prefix = format!("g{group}-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) && n.ends_with(".snap") && n != file {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Writes the snapshot of `space` (the group's current key space) to a new file in `dir` and
/// records it as the group's current snapshot. Returns its metadata, path and size.
pub(crate) fn build(
    db: &DB,
    group: GroupId,
    space: u32,
    dir: &Path,
) -> Result<(SnapshotMeta, PathBuf, u64), StoreError> {
    std::fs::create_dir_all(dir).map_err(io)?;
    let snap = db.snapshot();
    let last_log_id: Option<LogId> = match snap.get(keys::key(space, keys::SM_META, APPLIED))? {
        Some(v) => codec::decode(&v)?,
        None => None,
    };
    let last_membership: StoredMembership =
        match snap.get(keys::key(space, keys::SM_META, MEMBERSHIP))? {
            Some(v) => codec::decode(&v)?,
            None => StoredMembership::default(),
        };
    let now = nanos();
    let snapshot_id = match &last_log_id {
        Some(l) => format!("{group}-{}-{}-{now}", l.leader_id.term, l.index),
        None => format!("{group}-0-0-{now}"),
    };
    let name = format!("g{group}-{now}.snap");
    let path = dir.join(&name);
    let tmp = path.with_extension("part");
    let size = {
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&[codec::FORMAT_VERSION]).map_err(io)?;
        each_pair(&snap, space, |k, v| {
            write_frame(&mut w, k)?;
            write_frame(&mut w, v)
        })?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        f.metadata().map_err(io)?.len()
    };
    std::fs::rename(&tmp, &path).map_err(io)?;
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id,
    };
    record(db, group, dir, &meta, &name)?;
    Ok((meta, path, size))
}

/// Calls `f` with every state machine data pair of `space` in `snap`, in key order, keys
/// without their space prefix (what a snapshot holds, and what a state digest covers).
pub(crate) fn each_pair(
    snap: &rocksdb::SnapshotWithThreadMode<'_, DB>,
    space: u32,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let lo = keys::prefix(space, keys::SM_FIRST);
    let hi = keys::prefix(space, keys::SM_END);
    let mut it = snap.raw_iterator_opt(keys::bulk_scan());
    it.seek(&lo);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k >= hi.as_slice() {
            break;
        }
        f(&k[4..], v)?;
        it.next();
    }
    it.status()?;
    Ok(())
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(bytes.len()).map_err(|_| StoreError::Task("frame too large".into()))?;
    w.write_all(&len.to_be_bytes()).map_err(io)?;
    w.write_all(bytes).map_err(io)
}

/// Reads one frame; `None` at a clean end of file.
fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, StoreError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io(e)),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(StoreError::Task(format!("snapshot frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(io)?;
    Ok(Some(buf))
}

/// Streams a snapshot file's pairs into `space`, in bounded write batches.
pub(crate) fn load_into(db: &DB, space: u32, mut file: std::fs::File) -> Result<(), StoreError> {
    file.rewind().map_err(io)?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(io)?;
    if &head[..4] != MAGIC {
        return Err(StoreError::Task("not a snapshot file".into()));
    }
    if head[4] != codec::FORMAT_VERSION {
        return Err(codec::CodecError::UnknownVersion(head[4]).into());
    }
    let prefix = space.to_be_bytes();
    let mut batch = WriteBatch::default();
    while let Some(k) = read_frame(&mut r)? {
        let v = read_frame(&mut r)?
            .ok_or_else(|| StoreError::Task("snapshot file ends inside a pair".into()))?;
        if k.first()
            .is_none_or(|t| *t < keys::SM_FIRST || *t >= keys::SM_END)
        {
            return Err(StoreError::Task(
                "snapshot key outside the state range".into(),
            ));
        }
        let mut full = Vec::with_capacity(4 + k.len());
        full.extend_from_slice(&prefix);
        full.extend_from_slice(&k);
        batch.put(full, v);
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
            db.write(std::mem::take(&mut batch))?;
        }
    }
    db.write(batch)?;
    Ok(())
}

/// Keeps an installed snapshot as the group's current one: the received file is renamed (or,
/// when its path is unknown, copied) into place.
pub(crate) fn keep_received(
    db: &DB,
    group: GroupId,
    dir: &Path,
    meta: &SnapshotMeta,
    received: Option<PathBuf>,
    mut file: std::fs::File,
) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = format!("g{group}-{}.snap", nanos());
    let path = dir.join(&name);
    match received {
        Some(from) if std::fs::rename(&from, &path).is_ok() => {}
        _ => {
            file.rewind().map_err(io)?;
            let mut out = std::fs::File::create(&path).map_err(io)?;
            std::io::copy(&mut file, &mut out).map_err(io)?;
            out.sync_all().map_err(io)?;
        }
    }
    record(db, group, dir, meta, &name)
}

/// Where a snapshot being received is written.
pub(crate) fn receiving_path(dir: &Path, group: GroupId) -> PathBuf {
    dir.join(format!("g{group}-recv-{}.part", nanos()))
}

/// Opens a snapshot file for reading (openraft reads it in chunks).
pub(crate) async fn open(path: &Path) -> Result<tokio::fs::File, StoreError> {
    tokio::fs::File::open(path).await.map_err(io)
}

/// Creates an empty file to receive a snapshot into.
pub(crate) async fn create(path: &Path) -> Result<tokio::fs::File, StoreError> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
    }
    tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .await
        .map_err(io)
}
