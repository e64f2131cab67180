//! Operating the cluster: its status, removing a node, and this node's readiness.

use custos_api::types::*;
use custos_raft::records::NodeState;
use custos_raft::{StateChange, META_GROUP};

use super::Vault;
use crate::error::ServiceError;

/// A delivery worker silent this long makes its leader not ready (Svix #1844).
const WORKER_SILENCE_MS: i64 = 10_000;

impl Vault {
    /// Nodes (up or down), groups, voters, leaders, terms, indexes and lag.
    pub async fn cluster_status(&self, digests: bool) -> Result<ClusterStatus, ServiceError> {
        crate::cluster::status::gather(&self.core, digests).await
    }

    /// Starts removing a node: the placement leaves it out, its groups' leaders move its
    /// replicas (and leaderships) to other nodes, then the meta group's leader removes it.
    pub async fn remove_node(&self, id: u64) -> Result<ClusterStatus, ServiceError> {
        let nodes = self.core.read_meta(|r| r.nodes()).await?;
        let node = nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ServiceError::not_found("node", &id.to_string()))?;
        let active = nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .count();
        if node.state == NodeState::Active && active <= 1 {
            return Err(ServiceError::refused(
                custos_api::ErrorCode::Conflict,
                "the last active node cannot be removed",
            ));
        }
        if node.state == NodeState::Active {
            self.core
                .propose(
                    META_GROUP,
                    StateChange::SetNodeState {
                        id,
                        state: NodeState::Leaving,
                    },
                )
                .await?;
        }
        self.cluster_status(false).await
    }

    /// Whether this node can serve clients now (here or by forwarding), and why not.
    pub async fn readiness(&self) -> Readiness {
        let me = self.core.node_id;
        let mut problems = Vec::new();
        let mut leading = Vec::new();
        let mut pending = 0u64;
        let (mut leader, mut applied) = (None, 0);
        match self.core.group(META_GROUP) {
            None => problems.push("this node has not joined a cluster yet".to_owned()),
            Some(meta) => {
                let m = meta.metrics();
                leader = m.current_leader;
                applied = m.last_applied.map(|l| l.index).unwrap_or(0);
                if m.current_leader.is_none() {
                    problems.push("the meta group has no leader".to_owned());
                }
                if let Err(e) = &m.running_state {
                    problems.push(format!("raft stopped: {e}"));
                }
                // A node being removed (or removed) is not one to send clients to: its view of
                // the cluster stops following the meta group once it is out.
                match self.core.node_record(me).map(|n| n.state) {
                    Some(NodeState::Leaving) => {
                        problems.push("this node is being removed from the cluster".to_owned())
                    }
                    Some(NodeState::Removed) => {
                        problems.push("this node was removed from the cluster; stop it".to_owned())
                    }
                    _ => {}
                }
                if !self.core.meta_caught_up() {
                    problems.push(
                        "catching up on the meta group since starting (events of unlinked \
                         subjects are answered 503 until then)"
                            .to_owned(),
                    );
                }
            }
        }
        match self.core.data_groups() {
            Err(e) => problems.push(e.to_string()),
            Ok(groups) => {
                for g in groups {
                    if self.core.leader_of(g).is_none() && !self.core.is_leader(g) {
                        problems.push(format!("group {g} has no known leader"));
                    }
                }
            }
        }
        let now = unix_now_ms();
        for g in self.core.groups() {
            if !g.leads(me) {
                continue;
            }
            leading.push(g.id);
            if g.id == META_GROUP {
                continue;
            }
            pending += g.due.len() as u64;
            let beat = g.due.last_beat();
            // A new leader's worker gets a few seconds to start.
            if beat > 0 && now - beat > WORKER_SILENCE_MS {
                problems.push(format!(
                    "group {}: delivery worker silent for {} s",
                    g.id,
                    (now - beat) / 1000
                ));
            }
        }
        Readiness {
            ready: problems.is_empty(),
            node_id: me,
            leader,
            leading,
            applied_index: applied,
            pending_deliveries: pending,
            problems,
        }
    }
}
