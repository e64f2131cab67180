//! Snapshot files: a group's state machine keys as of one RocksDB snapshot, streamed to a
//! file as length-prefixed pairs (keys without their space prefix), never held in memory.
//! openraft sends the file to followers in chunks; a follower streams it back into RocksDB
//! in bounded write batches. A file ends with a trailer (an end mark, the number of pairs and
//! a SHA-256 of everything before it), checked before the installed state is switched to.

use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{APPLIED, MEMBERSHIP};
use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::types::{GroupId, LogId, SnapshotMeta, StoredMembership};

/// A file of an earlier build: pairs until the end of the file, nothing to check them by.
const MAGIC_UNSEALED: &[u8; 4] = b"CSNP";
/// A file with a trailer.
const MAGIC: &[u8; 4] = b"CSN2";
/// Where a length prefix would be, the trailer's start (above [`MAX_FRAME`]: no frame's).
const END: u32 = u32::MAX;
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

/// Serialises [`record`]: a build and an install of one group can finish at once.
static RECORDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Records a built `file` as the group's current snapshot and removes the group's other
/// snapshot files, unless the recorded one is newer: a build that started before an install
/// finished after it must not replace the installed snapshot (the log before it is purged), so
/// its file goes instead and the recorded one is returned. The record is synced before any
/// file is removed. (Builds record through [`record_built`].)
#[cfg(test)]
fn record(
    db: &DB,
    group: GroupId,
    dir: &Path,
    meta: &SnapshotMeta,
    file: &str,
) -> Result<Option<StoredSnapshot>, StoreError> {
    let _one = RECORDING.lock().unwrap_or_else(|p| p.into_inner());
    record_locked(db, group, dir, meta, file)
}

/// [`record`] for a file built from `space`, unless the group was removed from this node while
/// it was built (openraft runs a build on its own, and does not wait for it when the group's
/// Raft shuts down): its file then goes, and no record names it again.
fn record_built(
    db: &DB,
    group: GroupId,
    space: u32,
    dir: &Path,
    meta: &SnapshotMeta,
    file: &str,
) -> Result<Option<StoredSnapshot>, StoreError> {
    let _one = RECORDING.lock().unwrap_or_else(|p| p.into_inner());
    if meta.last_log_id.is_some() && db.get(keys::key(space, keys::SM_META, APPLIED))?.is_none() {
        let _ = std::fs::remove_file(dir.join(file));
        return Err(StoreError::Task(format!(
            "group {group} was removed while its snapshot was built"
        )));
    }
    record_locked(db, group, dir, meta, file)
}

/// Runs `f` while no snapshot is recorded (a group's removal: its record and files go at once).
pub(crate) fn while_not_recording<R>(f: impl FnOnce() -> R) -> R {
    let _one = RECORDING.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

fn record_locked(
    db: &DB,
    group: GroupId,
    dir: &Path,
    meta: &SnapshotMeta,
    file: &str,
) -> Result<Option<StoredSnapshot>, StoreError> {
    if let Some(newer) = current(db, group)?.filter(|c| c.meta.last_log_id > meta.last_log_id) {
        let _ = std::fs::remove_file(dir.join(file));
        return Ok(Some(newer));
    }
    let mut batch = WriteBatch::default();
    record_into(&mut batch, group, meta, file)?;
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)?;
    remove_files(dir, group, |n| n.ends_with(".snap") && n != file);
    Ok(None)
}

/// Adds the record naming `file` as the group's current snapshot to `batch`.
pub(crate) fn record_into(
    batch: &mut WriteBatch,
    group: GroupId,
    meta: &SnapshotMeta,
    file: &str,
) -> Result<(), StoreError> {
    let stored = StoredSnapshot {
        meta: meta.clone(),
        file: file.to_owned(),
    };
    batch.put(keys::prefix(group, keys::SNAPSHOT), codec::encode(&stored)?);
    Ok(())
}

/// Removes the group's snapshot files other than `keep` (once a record names `keep`).
pub(crate) fn remove_others(dir: &Path, group: GroupId, keep: &str) {
    let _one = RECORDING.lock().unwrap_or_else(|p| p.into_inner());
    remove_files(dir, group, |n| n.ends_with(".snap") && n != keep);
}

/// Removes the group's files in `dir` whose names `pick` picks.
fn remove_files(dir: &Path, group: GroupId, pick: impl Fn(&str) -> bool) {
    let prefix = format!("g{group}-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) && pick(&n) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes every snapshot file of `group` in `dir`, finished or not: the node no longer
/// holds the group (its files hold every customer's data), or it is starting and nothing is
/// being written.
pub(crate) fn remove_all(dir: &Path, group: GroupId) {
    remove_files(dir, group, |_| true);
}

/// Removes the group's unfinished files (a transfer or build cut short) and snapshot files no
/// record names (an install cut short after its file was put in place).
pub(crate) fn remove_unfinished(dir: &Path, group: GroupId, db: &DB) -> Result<(), StoreError> {
    let recorded = current(db, group)?.map(|c| c.file);
    remove_files(dir, group, |n| {
        n.ends_with(".part") || (n.ends_with(".snap") && recorded.as_deref() != Some(n))
    });
    Ok(())
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
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
    let written = (|| -> Result<u64, StoreError> {
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = Hashing::new(BufWriter::with_capacity(1 << 20, f));
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&[codec::FORMAT_VERSION]).map_err(io)?;
        let mut pairs = 0u64;
        each_pair(&snap, space, |k, v| {
            pairs += 1;
            write_frame(&mut w, k)?;
            write_frame(&mut w, v)
        })?;
        w.write_all(&END.to_be_bytes()).map_err(io)?;
        let digest = w.hash.clone().finalize();
        let mut w = w.inner;
        w.write_all(&pairs.to_be_bytes()).map_err(io)?;
        w.write_all(&digest).map_err(io)?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        f.metadata().map_err(io).map(|m| m.len())
    })();
    let size = match written {
        Ok(size) => size,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(dir)?;
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id,
    };
    match record_built(db, group, space, dir, &meta, &name)? {
        None => Ok((meta, path, size)),
        // Superseded by an installed snapshot: that one is the group's snapshot now.
        Some(newer) => {
            let path = dir.join(&newer.file);
            let size = std::fs::metadata(&path).map_err(io)?.len();
            Ok((newer.meta, path, size))
        }
    }
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

/// A reader or writer that hashes the bytes passing through it.
struct Hashing<T> {
    inner: T,
    hash: Sha256,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// What comes next in a snapshot file.
enum Frame {
    /// A key or a value.
    Bytes(Vec<u8>),
    /// The trailer's end mark.
    End,
    /// The end of the file, between frames.
    Eof,
}

/// Reads one frame. A file that ends inside a length prefix is damaged, not at its end.
fn read_frame(r: &mut impl Read) -> Result<Frame, StoreError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(Frame::Eof),
            Ok(0) => return Err(StoreError::Task("snapshot file ends inside a frame".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    let len = u32::from_be_bytes(len);
    if len == END {
        return Ok(Frame::End);
    }
    if len > MAX_FRAME {
        return Err(StoreError::Task(format!("snapshot frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(io)?;
    Ok(Frame::Bytes(buf))
}

/// Streams a snapshot file's pairs into `space`, in bounded write batches, and checks the
/// file's trailer: a file cut short or damaged (on disk, or in transfer) is refused before the
/// installed state is switched to, not installed with pairs missing or changed.
pub(crate) fn load_into(db: &DB, space: u32, mut file: std::fs::File) -> Result<(), StoreError> {
    file.rewind().map_err(io)?;
    let mut r = Hashing::new(BufReader::with_capacity(1 << 20, file));
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(io)?;
    let sealed = match &head[..4] {
        m if m == MAGIC => true,
        m if m == MAGIC_UNSEALED => false,
        _ => return Err(StoreError::Task("not a snapshot file".into())),
    };
    if head[4] != codec::FORMAT_VERSION {
        return Err(codec::CodecError::UnknownVersion(head[4]).into());
    }
    let damaged = |why: &str| StoreError::Task(format!("damaged snapshot file: {why}"));
    let prefix = space.to_be_bytes();
    let mut batch = WriteBatch::default();
    let mut pairs = 0u64;
    loop {
        let k = match read_frame(&mut r)? {
            Frame::Bytes(k) => k,
            Frame::Eof if sealed => return Err(damaged("it ends before its trailer")),
            Frame::Eof => break,
            Frame::End if sealed => {
                let digest = r.hash.clone().finalize();
                let mut trailer = [0u8; 40];
                r.inner
                    .read_exact(&mut trailer)
                    .map_err(|_| damaged("its trailer is cut short"))?;
                let (count, stored) = trailer.split_at(8);
                if u64::from_be_bytes(count.try_into().unwrap_or_default()) != pairs {
                    return Err(damaged("it holds another number of pairs than written"));
                }
                if stored != digest.as_slice() {
                    return Err(damaged("its SHA-256 is not the one written"));
                }
                break;
            }
            Frame::End => return Err(damaged("a trailer in a file of the earlier format")),
        };
        let Frame::Bytes(v) = read_frame(&mut r)? else {
            return Err(damaged("it ends inside a pair"));
        };
        if k.first()
            .is_none_or(|t| *t < keys::SM_FIRST || *t >= keys::SM_END)
        {
            return Err(StoreError::Task(
                "snapshot key outside the state range".into(),
            ));
        }
        pairs += 1;
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

/// Puts a received snapshot file in place under a snapshot file name, synced, and returns
/// that name: the received file is renamed (or, when its path is unknown, copied). It becomes
/// the group's current snapshot when the install's switch records it ([`record_into`]); until
/// then it is a file no record names, removed with the others at the next record.
pub(crate) fn place_received(
    group: GroupId,
    dir: &Path,
    received: Option<PathBuf>,
    file: &mut std::fs::File,
) -> Result<String, StoreError> {
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = format!("g{group}-{}.snap", nanos());
    let path = dir.join(&name);
    // openraft only flushed what it wrote: synced here, before a record names it.
    file.sync_all().map_err(io)?;
    match received {
        Some(from) if std::fs::rename(&from, &path).is_ok() => sync_dir(dir)?,
        _ => {
            file.rewind().map_err(io)?;
            let mut out = std::fs::File::create(&path).map_err(io)?;
            std::io::copy(file, &mut out).map_err(io)?;
            out.sync_all().map_err(io)?;
            sync_dir(dir)?;
        }
    }
    Ok(name)
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

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId};

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("1-1-{index}"),
        }
    }

    #[test]
    fn an_older_snapshot_finished_later_never_replaces_the_recorded_one() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let db = crate::open_db(&tmp.path().join("db"), crate::DbOptions::default())?;
        let dir = tmp.path().join("snapshots");
        std::fs::create_dir_all(&dir)?;
        for name in [
            "g1-installed.snap",
            "g1-built.snap",
            "g1-recv-1.part",
            "g2-other.snap",
        ] {
            std::fs::write(dir.join(name), b"x")?;
        }
        // Installed at 20; a build begun at 10 finishes after it.
        assert!(record(&db, 1, &dir, &meta(20), "g1-installed.snap")?.is_none());
        let newer = record(&db, 1, &dir, &meta(10), "g1-built.snap")?;
        assert_eq!(newer.map(|n| n.file).as_deref(), Some("g1-installed.snap"));
        let now = current(&db, 1)?.expect("recorded");
        assert_eq!(now.file, "g1-installed.snap");
        assert!(!dir.join("g1-built.snap").exists(), "the older file goes");
        // A newer one replaces it and its file.
        std::fs::write(dir.join("g1-newer.snap"), b"x")?;
        record(&db, 1, &dir, &meta(30), "g1-newer.snap")?;
        assert_eq!(current(&db, 1)?.expect("recorded").file, "g1-newer.snap");
        assert!(!dir.join("g1-installed.snap").exists());
        // Unfinished files go at start; a group's files go with it; other groups' stay.
        std::fs::write(dir.join("g1-placed.snap"), b"x")?;
        remove_unfinished(&dir, 1, &db)?;
        assert!(!dir.join("g1-recv-1.part").exists());
        assert!(
            !dir.join("g1-placed.snap").exists(),
            "a file no record names goes"
        );
        assert!(dir.join("g1-newer.snap").exists());
        remove_all(&dir, 1);
        let left: Vec<String> = std::fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        assert_eq!(left, ["g2-other.snap"]);
        Ok(())
    }

    /// The pairs of `space`, as a snapshot holds them.
    fn pairs_of(db: &DB, space: u32) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        each_pair(&db.snapshot(), space, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn a_snapshot_file_cut_short_or_changed_is_refused_whole() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let db = crate::open_db(&tmp.path().join("db"), crate::DbOptions::default())?;
        let dir = tmp.path().join("snapshots");
        for i in 0..50u32 {
            db.put(
                keys::key(3, keys::SM_FIRST, &i.to_be_bytes()),
                format!("value {i}").repeat(10),
            )?;
        }
        let (_, path, _) = build(&db, 1, 3, &dir)?;
        let bytes = std::fs::read(&path)?;
        let load = |bytes: &[u8], space: u32| -> Result<(), StoreError> {
            let file = tmp.path().join(format!("copy-{space}"));
            std::fs::write(&file, bytes).map_err(io)?;
            load_into(&db, space, std::fs::File::open(&file).map_err(io)?)
        };
        // Whole, it loads every pair.
        load(&bytes, 10)?;
        assert_eq!(pairs_of(&db, 10)?, pairs_of(&db, 3)?);
        assert_eq!(pairs_of(&db, 10)?.len(), 50);
        // Cut between two pairs (a reader of the earlier format took that for the end), inside
        // a length prefix, inside a value, inside the trailer: refused.
        // The header, then the first key (its tag and four bytes) and value, each framed.
        let first_pair = 5 + (4 + 5) + (4 + "value 0".len() * 10);
        for cut in [
            first_pair,
            first_pair + 2,
            first_pair + 10,
            bytes.len() - 20,
        ] {
            assert!(
                load(&bytes[..cut], 11).is_err(),
                "cut at {cut} of {}",
                bytes.len()
            );
        }
        // A byte of a value changed: refused.
        let mut flipped = bytes.clone();
        flipped[first_pair - 3] ^= 0x20;
        let why = load(&flipped, 12)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(why.contains("SHA-256"), "{why}");
        // A file of the earlier format (no trailer) still loads.
        let mut earlier = MAGIC_UNSEALED.to_vec();
        earlier.extend_from_slice(&bytes[4..bytes.len() - 44]);
        load(&earlier, 13)?;
        assert_eq!(pairs_of(&db, 13)?, pairs_of(&db, 3)?);
        Ok(())
    }
}
