//! The cluster's status: each node reports the groups it holds ([`local`]); the node asked
//! gathers every node's report over the peer port and merges them ([`gather`]).

use std::collections::BTreeMap;
use std::time::Duration;

use custos_api::types::{ClusterGroup, ClusterNode, ClusterReplica, ClusterStatus};
use custos_raft::codec;
use custos_raft::records::NodeState;
use custos_raft::types::NodeId;
use openraft::ServerState;

use super::wire::{LocalGroup, LocalStatus};
use crate::core::Core;
use crate::error::ServiceError;

/// What this node holds, group by group (with state digests when `digests`).
pub fn local(core: &Core, digests: bool) -> LocalStatus {
    let groups = core
        .groups()
        .into_iter()
        .map(|g| {
            let m = g.metrics();
            let membership = m.membership_config.membership();
            let role = match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Learner => "learner",
                ServerState::Candidate => "candidate",
                ServerState::Shutdown => "shutdown",
            };
            LocalGroup {
                group: g.id,
                role: role.to_owned(),
                leader: m.current_leader,
                term: m.current_term,
                last_log: m.last_log_index.unwrap_or(0),
                applied: m.last_applied.map(|l| l.index).unwrap_or(0),
                committed: g.reader.committed().ok().flatten().unwrap_or(0),
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                pending_deliveries: g.due.len() as u64,
                digest: digests
                    .then(|| g.reader.digest().ok())
                    .flatten()
                    .map(|(l, d)| (l.map(|l| l.index).unwrap_or(0), d)),
            }
        })
        .collect();
    LocalStatus {
        node_id: core.node_id,
        groups,
    }
}

/// Asks the node at `addr` for its report (`None` if it does not answer within 2 s).
pub async fn ask(core: &Core, addr: &str, digests: bool) -> Option<LocalStatus> {
    let path = if digests {
        "/peer/status?digests=true"
    } else {
        "/peer/status"
    };
    let r = core
        .peers
        .request(reqwest::Method::GET, addr, path)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let bytes = r.bytes().await.ok()?;
    codec::decode::<Result<LocalStatus, ()>>(&bytes).ok()?.ok()
}

/// Asks every registered node for its report (this one answers itself) and merges them;
/// with `digests`, each replica's state digest too (a full scan of every group: for checks).
pub async fn gather(core: &Core, digests: bool) -> Result<ClusterStatus, ServiceError> {
    let settings = core.settings().await?;
    let nodes = core.read_meta(|r| r.nodes()).await?;
    let assignment = core
        .read_meta(|r| r.assignment())
        .await?
        .unwrap_or_default();
    let mut reports: BTreeMap<NodeId, LocalStatus> = BTreeMap::new();
    let asks = nodes
        .iter()
        .filter(|n| n.state != NodeState::Removed && n.id != core.node_id)
        .map(|n| async move { Some((n.id, ask(core, &n.peer_addr, digests).await?)) });
    for (id, s) in futures::future::join_all(asks).await.into_iter().flatten() {
        reports.insert(id, s);
    }
    reports.insert(core.node_id, local(core, digests));
    let out_nodes = nodes
        .iter()
        .map(|n| ClusterNode {
            id: n.id,
            peer_addr: n.peer_addr.clone(),
            api_addr: n.api_addr.clone(),
            state: match n.state {
                NodeState::Active => "active",
                NodeState::Leaving => "leaving",
                NodeState::Removed => "removed",
            }
            .to_owned(),
            up: reports.contains_key(&n.id),
        })
        .collect();
    let mut by_group: BTreeMap<u32, Vec<(NodeId, &LocalGroup)>> = BTreeMap::new();
    for (node, s) in &reports {
        for g in &s.groups {
            by_group.entry(g.group).or_default().push((*node, g));
        }
    }
    let mut groups = Vec::new();
    for (id, replicas) in by_group {
        // The leader's view is the group's; without a reachable leader, the newest term's.
        let leader_view = replicas
            .iter()
            .find(|(n, g)| g.leader == Some(*n))
            .or_else(|| replicas.iter().max_by_key(|(_, g)| g.term))
            .map(|(_, g)| *g);
        let Some(view) = leader_view else { continue };
        let leader_up = view.leader.is_some_and(|l| reports.contains_key(&l));
        let mut members: Vec<NodeId> = view.voters.iter().chain(&view.learners).copied().collect();
        members.sort_unstable();
        members.dedup();
        let replicas_out = members
            .iter()
            .map(|n| {
                let mine = replicas.iter().find(|(rn, _)| rn == n).map(|(_, g)| *g);
                ClusterReplica {
                    node: *n,
                    role: mine.map(|g| g.role.clone()),
                    applied_index: mine.map(|g| g.applied),
                    lag: mine.map(|g| view.last_log.saturating_sub(g.applied)),
                    digest: mine
                        .and_then(|g| g.digest.as_ref())
                        .map(|(at, d)| format!("{at}:{d}")),
                }
            })
            .collect();
        groups.push(ClusterGroup {
            id,
            leader: view.leader.filter(|_| leader_up),
            term: view.term,
            voters: view.voters.clone(),
            learners: view.learners.clone(),
            target: assignment.groups.get(&id).cloned().unwrap_or_default(),
            last_log_index: view.last_log,
            commit_index: view.committed,
            replicas: replicas_out,
        });
    }
    Ok(ClusterStatus {
        cluster_id: settings.cluster_id,
        answered_by: core.node_id,
        nodes: out_nodes,
        groups,
    })
}
