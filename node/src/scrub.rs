//! After an erasure, rewrites what on disk may still hold the erased data: each group
//! concerned takes a snapshot and purges its log up to it (the erasure's own entries
//! included), then the store is flushed and compacted so deleted values leave its files.
//!
//! Runs on every node for the groups it holds a replica of, so every replica forgets, not only
//! the leader. Bounded: a scrub starts [`SETTLE`] after the last erasure seen and takes a few
//! seconds (README, "The portal", the row "your data").

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custos_raft::types::GroupId;
use tokio::sync::watch;

use crate::core::{Core, Group};

/// Waits this long after an erasure before scrubbing, so a burst of erasures (and the intent
/// steps releasing their emails and subjects) is scrubbed once.
pub const SETTLE: Duration = Duration::from_secs(2);
/// How long one group's snapshot or purge may take before the group is retried later.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until shutdown.
pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = core.wake.scrub.notified() => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(SETTLE) => {}
            _ = shutdown.changed() => return,
        }
        let groups: BTreeSet<GroupId> = std::mem::take(
            &mut *core
                .wake
                .erased_in
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let started = Instant::now();
        let mut retry = Vec::new();
        for id in &groups {
            let Some(group) = core.group(*id) else {
                continue;
            };
            if let Err(e) = scrub_group(&group).await {
                tracing::warn!(group = id, error = %e, "scrub after an erasure: retried later");
                retry.push(*id);
            }
        }
        let db = core.db.clone();
        match tokio::task::spawn_blocking(move || custos_raft::compact_all(&db)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "compaction after an erasure"),
            Err(e) => tracing::warn!(error = %e, "compaction after an erasure"),
        }
        metrics::counter!("custos_erasure_scrubs_total").increment(1);
        metrics::histogram!("custos_erasure_scrub_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(groups = ?groups, took_ms = started.elapsed().as_millis() as u64, "erased data scrubbed from disk");
        for id in retry {
            core.wake
                .erased_in
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
            core.wake.scrub.notify_one();
        }
    }
}

/// Snapshots `group` past everything applied now, then purges its log up to that snapshot.
async fn scrub_group(group: &Group) -> Result<(), String> {
    let raft = &group.raft;
    let applied = raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
    if applied == 0 {
        return Ok(());
    }
    raft.trigger().snapshot().await.map_err(|e| e.to_string())?;
    let snapshot = wait_for(raft, |m| {
        m.snapshot.map(|s| s.index).filter(|i| *i >= applied)
    })
    .await
    .ok_or("the snapshot did not finish in time")?;
    raft.trigger()
        .purge_log(snapshot)
        .await
        .map_err(|e| e.to_string())?;
    wait_for(raft, |m| {
        m.purged.map(|p| p.index).filter(|i| *i >= snapshot)
    })
    .await
    .ok_or("the log purge did not finish in time")?;
    Ok(())
}

/// Polls the group's metrics until `f` answers (at most [`STEP_TIMEOUT`]).
async fn wait_for(
    raft: &custos_raft::Raft,
    f: impl Fn(&openraft::RaftMetrics<custos_raft::NodeId, openraft::BasicNode>) -> Option<u64>,
) -> Option<u64> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut rx = raft.metrics();
    loop {
        if let Some(v) = f(&rx.borrow()) {
            return Some(v);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        // Timed out, or the group shut down.
        if !matches!(tokio::time::timeout(left, rx.changed()).await, Ok(Ok(()))) {
            return None;
        }
    }
}
