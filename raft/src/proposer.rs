//! One proposer per Raft group: callers hand it a change and await their own outcome; it
//! drains everything queued meanwhile into one log entry ([`StateChange::Batch`]), so one
//! append, one WAL sync and one apply write batch serve many changes.
//!
//! openraft 0.9 appends and flushes one client write at a time, so without this every change
//! waits behind the previous one's fsync. With it, the batch grows with the load: while one
//! entry is being committed, the next one fills up.

use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};

use crate::records::{ChangeOutcome, StateChange};
use crate::types::{NodeId, Raft};

/// Why a proposal has no outcome (also sent back to a peer that forwarded the proposal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ProposeError {
    /// Another node leads the group (or none is known yet).
    #[error("this node does not lead the group")]
    NotLeader {
        /// The leader, when known.
        leader: Option<NodeId>,
        /// Its peer address, when known.
        addr: Option<String>,
    },
    /// The queue is full: the group is overloaded.
    #[error("the group's proposal queue is full")]
    Overloaded,
    /// No outcome within the deadline: the change may or may not be applied.
    #[error("no outcome within {0:?}; the change may still be applied")]
    Timeout(Duration),
    /// Raft stopped before the change was handed to it, or a forwarded proposal did not reach
    /// the leader: nothing was applied.
    #[error("raft stopped: {0}")]
    Stopped(String),
    /// The change was handed to Raft (here or at the leader it was forwarded to), but its
    /// outcome did not come back: it may or may not be applied (a new leader may commit an
    /// entry its old leader appended), and proposing it again could apply it twice.
    #[error("the leader's answer was lost: {0}; the change may still be applied")]
    AnswerLost(String),
}

struct Pending {
    change: StateChange,
    size: usize,
    reply: oneshot::Sender<Result<ChangeOutcome, ProposeError>>,
}

/// Limits of a proposer.
#[derive(Debug, Clone, Copy)]
pub struct ProposerLimits {
    /// Changes waiting at most (then [`ProposeError::Overloaded`]).
    pub queue: usize,
    /// Changes per entry at most.
    pub max_changes: usize,
    /// Approximate bytes per entry at most (peer messages and replication stay bounded).
    pub max_bytes: usize,
}

impl Default for ProposerLimits {
    fn default() -> Self {
        ProposerLimits {
            queue: 8192,
            max_changes: 1024,
            max_bytes: 4 << 20,
        }
    }
}

/// Counts of what a proposer did, for measuring batching.
#[derive(Debug, Default)]
pub struct ProposerStats {
    /// Log entries proposed.
    pub entries: std::sync::atomic::AtomicU64,
    /// Changes carried by them.
    pub changes: std::sync::atomic::AtomicU64,
}

/// A group's proposer. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    stats: std::sync::Arc<ProposerStats>,
    /// While set, no entry is proposed before this instant (a leadership hand-over).
    hold: std::sync::Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer").finish_non_exhaustive()
    }
}

impl Proposer {
    /// Starts the proposer task of `raft` on the current tokio runtime (the Raft runtime).
    pub fn spawn(raft: Raft, limits: ProposerLimits) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let stats = std::sync::Arc::new(ProposerStats::default());
        let hold = std::sync::Arc::new(std::sync::Mutex::new(None));
        tokio::spawn(run(raft, rx, limits, stats.clone(), hold.clone()));
        Proposer { tx, stats, hold }
    }

    /// Proposes nothing new for `d` (queued changes wait): lets followers' leader lease run
    /// out so another voter can be elected.
    pub fn hold(&self, d: Duration) {
        *self.hold.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now() + d);
    }

    /// Ends a hold.
    pub fn release(&self) {
        *self.hold.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// What this proposer did so far.
    pub fn stats(&self) -> &ProposerStats {
        &self.stats
    }

    /// Proposes `change` and waits for its outcome, at most `deadline`.
    pub async fn propose(
        &self,
        change: StateChange,
        deadline: Duration,
    ) -> Result<ChangeOutcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let size = change.approx_size();
        self.tx
            .try_send(Pending {
                change,
                size,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ProposeError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    ProposeError::Stopped("the proposer stopped".into())
                }
            })?;
        match tokio::time::timeout(deadline, rx).await {
            Err(_) => Err(ProposeError::Timeout(deadline)),
            // Dropped unanswered: the proposer stopped, perhaps after proposing it.
            Ok(Err(_)) => Err(ProposeError::AnswerLost("the proposer stopped".into())),
            Ok(Ok(r)) => r,
        }
    }
}

async fn run(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    limits: ProposerLimits,
    stats: std::sync::Arc<ProposerStats>,
    hold: std::sync::Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Some(first) = rx.recv().await {
        loop {
            let until = *hold.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > tokio::time::Instant::now() => {
                    tokio::time::sleep_until(
                        t.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                    )
                    .await
                }
                _ => break,
            }
        }
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < limits.max_changes && bytes < limits.max_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up (its deadline passed while the group could not commit) was
        // told the change may still be applied; not proposing it keeps a retry of theirs from
        // applying it twice.
        let (changes, replies): (Vec<StateChange>, Vec<_>) = batch
            .into_iter()
            .filter(|p| !p.reply.is_closed())
            .map(|p| (p.change, p.reply))
            .unzip();
        let n = changes.len();
        if n == 0 {
            continue;
        }
        stats.entries.fetch_add(1, Relaxed);
        stats.changes.fetch_add(n as u64, Relaxed);
        let change = if n == 1 {
            changes
                .into_iter()
                .next()
                .unwrap_or(StateChange::Batch(Vec::new()))
        } else {
            StateChange::Batch(changes)
        };
        let outcomes: Vec<Result<ChangeOutcome, ProposeError>> =
            match raft.client_write(change).await {
                Ok(resp) => match resp.data {
                    ChangeOutcome::Batch(outs) if n > 1 && outs.len() == n => {
                        outs.into_iter().map(Ok).collect()
                    }
                    single if n == 1 => vec![Ok(single)],
                    other => {
                        let e = ProposeError::AnswerLost(format!("unexpected outcome {other:?}"));
                        vec![Err(e); n]
                    }
                },
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    let e = ProposeError::NotLeader {
                        leader: f.leader_id,
                        addr: f.leader_node.map(|n| n.addr),
                    };
                    vec![Err(e); n]
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    vec![Err(ProposeError::Stopped(e.to_string())); n]
                }
                // Raft stopped with the entry perhaps appended, and perhaps replicated.
                Err(RaftError::Fatal(e)) => vec![Err(ProposeError::AnswerLost(e.to_string())); n],
            };
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // The caller may have given up (deadline); its outcome is simply dropped.
            let _ = reply.send(outcome);
        }
    }
}
