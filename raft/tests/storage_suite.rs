//! openraft's storage test suite, run against the RocksDB log store and state machine.

use std::sync::Arc;

use custos_raft::state_machine::NoObserver;
use custos_raft::{LogStore, StateMachineStore, TypeConfig, WalSyncer};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let db = custos_raft::open_db(dir.path(), custos_raft::DbOptions::default())
            .map_err(|e| e.into_raft_write())?;
        // Group 7, not 0, so a key built without the group prefix would be caught.
        let log = LogStore::new(db.clone(), 7, WalSyncer::start(&db));
        let sm = StateMachineStore::new(db, 7, Arc::new(NoObserver), dir.path().join("snapshots"))
            .map_err(|e| e.into_raft_write())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> anyhow::Result<()> {
    Suite::test_all(RocksBuilder)?;
    Ok(())
}
