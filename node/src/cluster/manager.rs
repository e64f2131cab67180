//! The cluster manager: one loop per node, woken by meta-group changes and every half second.
//!
//! - On the meta group's leader: every registered node becomes a meta learner, the first three
//!   (or five) active nodes its voters; the placement of data groups is recomputed when nodes
//!   join or leave; a leaving node holding no replica any more is marked removed and dropped.
//! - On each group's leader: the group's replicas move toward the placement (new nodes added
//!   as learners, one membership change once they caught up), leadership is handed to the
//!   preferred voter, and the group's membership is reported to the meta group.
//! - On every node: replicas the placement gives it are opened; a replica its group's leader
//!   removed is closed and its data deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custos_api::types::unix_now_ms;
use custos_raft::placement::{self, DATA_REPLICAS};
use custos_raft::records::{Assignment, GroupReport, NodeRecord, NodeState};
use custos_raft::types::{GroupId, NodeId};
use custos_raft::{StateChange, META_GROUP};
use openraft::{BasicNode, ChangeMembers};
use tokio::sync::watch;

use super::ids_in;
use crate::core::{Core, Group};

/// Entries a replica may trail its leader by and still count as caught up.
const CAUGHT_UP_SLACK: u64 = 64;
/// Least time between two leadership hand-overs of one group.
const TRANSFER_EVERY: Duration = Duration::from_secs(10);
/// Longest the manager waits for one membership change to commit: a leader without a quorum
/// does not step down, and one such group must not stop the loop for every other group.
const CHANGE_WAIT: Duration = Duration::from_secs(10);

/// Waits for a membership change at most [`CHANGE_WAIT`] (one that runs longer goes on inside
/// openraft; the next round sees where it got).
async fn bounded<T, E: std::fmt::Display>(
    change: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CHANGE_WAIT, change).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("not committed within {CHANGE_WAIT:?}")),
    }
}

/// Finishes a membership change its leader left joint: openraft 0.9 commits one in two steps
/// and a leader elected in between does not take the second, so without this the group would
/// stay joint (both configurations' majorities needed) and never move again. Answers whether
/// the membership was joint.
async fn finish_joint(
    g: &Group,
    membership: &openraft::Membership<NodeId, BasicNode>,
    retain: bool,
) -> bool {
    let configs = membership.get_joint_config();
    let Some(last) = configs.last().filter(|_| configs.len() > 1) else {
        return false;
    };
    // Called on the group's leader only (another node's call would be refused anyway).
    tracing::info!(group = g.id, to = ?last, "finishing a membership change left joint");
    if let Err(e) = bounded(g.raft.change_membership(last.clone(), retain)).await {
        tracing::debug!(group = g.id, error = %e, "finish joint membership");
    }
    true
}

/// Runs the manager until shutdown.
pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    let state = Arc::new(ManagerState::default());
    loop {
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = once(&core, &state).await {
            tracing::debug!(error = %e, "cluster manager round");
        }
        tokio::select! {
            _ = core.wake.cluster.notified() => {
                // Several changes often come together: let them settle.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[derive(Default)]
struct ManagerState {
    /// When each group last handed its leadership over (or tried to).
    transfers: Mutex<HashMap<GroupId, Instant>>,
}

async fn once(core: &Arc<Core>, state: &Arc<ManagerState>) -> Result<(), String> {
    let meta = core.meta().map_err(|e| e.to_string())?;
    let nodes = meta.reader.nodes().map_err(|e| e.to_string())?;
    let assignment = meta.reader.assignment().map_err(|e| e.to_string())?;
    let reports = meta.reader.group_reports().map_err(|e| e.to_string())?;
    let Some(assignment) = assignment else {
        return Ok(());
    };
    // This node restarted at another address (without --join to say so): register it.
    if let Some(me) = nodes.iter().find(|n| n.id == core.node_id) {
        if me.state != NodeState::Removed && me.peer_addr != core.config.peer_address() {
            let mut moved = me.clone();
            moved.peer_addr = core.config.peer_address();
            let _ = core
                .propose(META_GROUP, StateChange::RegisterNode(moved))
                .await;
        }
    }
    if core.is_leader(META_GROUP) {
        meta_duties(core, state, &meta, &nodes, &assignment, &reports).await?;
    }
    for g in core.groups() {
        if g.leads(core.node_id) {
            group_duties(core, state, &g, &nodes, &assignment, &reports).await;
        }
    }
    replicas(core, &nodes, &assignment, &reports).await;
    Ok(())
}

fn caught_up(m: &openraft::RaftMetrics<NodeId, BasicNode>, node: NodeId) -> bool {
    if Some(node) == m.current_leader {
        return true;
    }
    let last = m.last_log_index.unwrap_or(0);
    m.replication
        .as_ref()
        .and_then(|r| r.get(&node))
        .and_then(|matched| matched.as_ref())
        .is_some_and(|l| l.index + CAUGHT_UP_SLACK >= last)
}

/// Whether a majority of `voters` answers now (this node, if one of them, answers itself; the
/// others a peer status call, 2 s each, at once). openraft 0.9 tells how far each follower's
/// log matched, not when it last answered: a node killed a moment ago still looks caught up.
/// A change of voters commits in the new configuration's majority too, and openraft takes no
/// other change until it does, so one whose new voters cannot make a majority would leave the
/// group without a quorum for good (before this check, removing a live node while another was
/// down did so).
async fn majority_answers(
    core: &Core,
    voters: &BTreeSet<NodeId>,
    nodes: &[NodeRecord],
    group: GroupId,
) -> bool {
    let asks = voters.iter().filter(|n| **n != core.node_id).map(|n| {
        let addr = nodes
            .iter()
            .find(|r| r.id == *n)
            .map(|r| r.peer_addr.clone());
        async move {
            match addr {
                Some(addr) => super::status::ask(core, &addr, false).await.is_some(),
                None => false,
            }
        }
    });
    let answered = futures::future::join_all(asks)
        .await
        .into_iter()
        .filter(|a| *a)
        .count()
        + usize::from(voters.contains(&core.node_id));
    let enough = answered > voters.len() / 2;
    if !enough {
        tracing::info!(
            group,
            voters = ?voters,
            answered,
            "voters change waits: too few of the new voters answer"
        );
    }
    enough
}

/// Adds (or re-addresses) learners so every wanted node is in the membership with its
/// registered peer address.
async fn ensure_learners(g: &Group, wanted: &BTreeSet<NodeId>, nodes: &[NodeRecord]) {
    let m = g.metrics();
    let membership = m.membership_config.membership().clone();
    for id in wanted {
        let Some(rec) = nodes.iter().find(|n| n.id == *id) else {
            continue;
        };
        let node = BasicNode {
            addr: rec.peer_addr.clone(),
        };
        match membership.get_node(id).map(|n| n.addr.clone()) {
            None => match bounded(g.raft.add_learner(*id, node, false)).await {
                Ok(_) => {
                    tracing::info!(group = g.id, node = id, addr = %rec.peer_addr, "replica added as learner")
                }
                Err(e) => tracing::debug!(group = g.id, node = id, error = %e, "add learner"),
            },
            // The node moved (registered again at another address): every member must dial
            // the new one. Addresses are unique per node in the registry, so no two ids share one.
            Some(addr) if addr != rec.peer_addr => {
                let change = ChangeMembers::SetNodes(BTreeMap::from([(*id, node)]));
                match bounded(g.raft.change_membership(change, true)).await {
                    Ok(_) => {
                        tracing::info!(group = g.id, node = id, addr = %rec.peer_addr, "replica address updated")
                    }
                    Err(e) => {
                        tracing::debug!(group = g.id, node = id, error = %e, "set node address")
                    }
                }
            }
            Some(_) => {}
        }
    }
}

async fn meta_duties(
    core: &Arc<Core>,
    state: &Arc<ManagerState>,
    meta: &Arc<Group>,
    nodes: &[NodeRecord],
    assignment: &Assignment,
    reports: &[GroupReport],
) -> Result<(), String> {
    let active = ids_in(nodes, &[NodeState::Active]);
    let present = ids_in(nodes, &[NodeState::Active, NodeState::Leaving]);
    ensure_learners(meta, &present, nodes).await;
    let m = meta.metrics();
    let membership = m.membership_config.membership().clone();
    let joint = finish_joint(meta, &membership, true).await;
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let desired = placement::meta_voters(&active);
    if !desired.is_empty() && !desired.contains(&core.node_id) {
        // Leaving the meta group's voters: hand over first; the successor changes them.
        if !joint {
            let desired: Vec<NodeId> = desired.iter().copied().collect();
            make_way(core, state, meta, &m, &desired, nodes, true).await;
        }
        return Ok(());
    }
    if !joint
        && !desired.is_empty()
        && voters != desired
        && desired.iter().all(|n| caught_up(&m, *n))
    {
        if !majority_answers(core, &desired, nodes, META_GROUP).await {
            return Ok(());
        }
        tracing::info!(from = ?voters, to = ?desired, "meta group voters change");
        if let Err(e) = bounded(meta.raft.change_membership(desired.clone(), true)).await {
            tracing::warn!(error = %e, "meta membership change");
        }
        return Ok(());
    }
    // Members that are neither active nor leaving (removed) leave the meta group's learners.
    let all: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    let gone: BTreeSet<NodeId> = all
        .iter()
        .filter(|id| !present.contains(id) && !voters.contains(id))
        .copied()
        .collect();
    if !joint && !gone.is_empty() {
        if let Err(e) = bounded(
            meta.raft
                .change_membership(ChangeMembers::RemoveNodes(gone.clone()), false),
        )
        .await
        {
            tracing::debug!(error = %e, "meta: remove learners");
        }
    }
    // Placement of the data groups over the active nodes.
    let groups: Vec<GroupId> = assignment
        .groups
        .keys()
        .copied()
        .filter(|g| *g != META_GROUP)
        .collect();
    let target = placement::place(&assignment.groups, &groups, &active, DATA_REPLICAS);
    if target != assignment.groups && !active.is_empty() {
        tracing::info!(epoch = assignment.epoch + 1, "placement changed");
        core.propose(
            META_GROUP,
            StateChange::SetAssignment(Assignment {
                epoch: assignment.epoch + 1,
                groups: target,
            }),
        )
        .await
        .map_err(|e| e.to_string())?;
        return Ok(());
    }
    // A leaving node is removed once no group holds a replica on it.
    for n in nodes.iter().filter(|n| n.state == NodeState::Leaving) {
        let holds = reports
            .iter()
            .filter(|r| r.group != META_GROUP)
            .any(|r| r.voters.contains(&n.id) || r.learners.contains(&n.id))
            || assignment.groups.values().any(|v| v.contains(&n.id))
            || voters.contains(&n.id);
        if !holds {
            tracing::info!(node = n.id, "node emptied; removing it");
            core.propose(
                META_GROUP,
                StateChange::SetNodeState {
                    id: n.id,
                    state: NodeState::Removed,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

async fn group_duties(
    core: &Arc<Core>,
    state: &Arc<ManagerState>,
    g: &Arc<Group>,
    nodes: &[NodeRecord],
    assignment: &Assignment,
    reports: &[GroupReport],
) {
    let me = core.node_id;
    if g.id != META_GROUP {
        if let Some(desired) = assignment.groups.get(&g.id).filter(|d| !d.is_empty()) {
            move_replicas(core, state, g, desired, nodes).await;
        }
    }
    // Report the membership when it changed (the meta group's view of who holds what).
    let m = g.metrics();
    if m.current_leader != Some(me) {
        return;
    }
    // Only a committed membership is reported: nodes delete their replica on its word.
    let committed = g.reader.committed().ok().flatten().unwrap_or(0);
    if m.membership_config
        .log_id()
        .is_some_and(|l| l.index > committed)
    {
        return;
    }
    let membership = m.membership_config.membership();
    let report = GroupReport {
        group: g.id,
        leader: me,
        term: m.current_term,
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        at_ms: unix_now_ms(),
    };
    let same = reports.iter().any(|r| {
        r.group == report.group
            && r.leader == report.leader
            && r.term == report.term
            && r.voters == report.voters
            && r.learners == report.learners
    });
    if !same {
        if let Err(e) = core
            .propose(META_GROUP, StateChange::ReportGroup(report))
            .await
        {
            tracing::debug!(group = g.id, error = %e, "report");
        }
    }
}

async fn move_replicas(
    core: &Arc<Core>,
    state: &Arc<ManagerState>,
    g: &Arc<Group>,
    desired: &[NodeId],
    nodes: &[NodeRecord],
) {
    let wanted: BTreeSet<NodeId> = desired.iter().copied().collect();
    ensure_learners(g, &wanted, nodes).await;
    let m = g.metrics();
    let membership = m.membership_config.membership().clone();
    if finish_joint(g, &membership, false).await {
        return;
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if !wanted.contains(&core.node_id) {
        // A leader never removes itself (openraft 0.9 would let it go on leading a group it
        // left): it hands leadership to a wanted voter, which then makes the change.
        make_way(core, state, g, &m, desired, nodes, false).await;
        return;
    }
    if voters != wanted {
        if wanted.iter().all(|n| caught_up(&m, *n))
            && majority_answers(core, &wanted, nodes, g.id).await
        {
            tracing::info!(group = g.id, from = ?voters, to = ?wanted, "replicas move");
            if let Err(e) = bounded(g.raft.change_membership(wanted.clone(), false)).await {
                tracing::debug!(group = g.id, error = %e, "membership change");
            }
        }
        return;
    }
    let extra: BTreeSet<NodeId> = membership
        .learner_ids()
        .filter(|l| !wanted.contains(l))
        .collect();
    if !extra.is_empty() {
        if let Err(e) = bounded(
            g.raft
                .change_membership(ChangeMembers::RemoveNodes(extra), false),
        )
        .await
        {
            tracing::debug!(group = g.id, error = %e, "remove learners");
        }
        return;
    }
    // Hand leadership to the preferred voter when it is up to date.
    let preferred = desired[0];
    if preferred == core.node_id || !caught_up(&m, preferred) {
        return;
    }
    hand_over(core, state, g, preferred, nodes);
}

/// A leader the placement no longer wants (`desired` leaves it out) hands leadership to a
/// wanted voter that caught up. When no wanted node is a voter yet (every voter was removed
/// before the move finished, e.g. a one-node cluster's node removed right after a second
/// joined), it first makes the caught-up wanted nodes voters beside the current ones, else
/// the group would wait for a hand-over that can never happen.
async fn make_way(
    core: &Arc<Core>,
    state: &Arc<ManagerState>,
    g: &Arc<Group>,
    m: &openraft::RaftMetrics<NodeId, BasicNode>,
    desired: &[NodeId],
    nodes: &[NodeRecord],
    retain: bool,
) {
    let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
    match way_out(&voters, desired, |n| caught_up(m, n)) {
        WayOut::HandOver(to) => hand_over(core, state, g, to, nodes),
        WayOut::Wait => {}
        WayOut::AddVoters(ready) => {
            let after: BTreeSet<NodeId> = voters.union(&ready).copied().collect();
            if !majority_answers(core, &after, nodes, g.id).await {
                return;
            }
            tracing::info!(group = g.id, add = ?ready, "wanted replicas become voters before the hand-over");
            if let Err(e) = bounded(
                g.raft
                    .change_membership(ChangeMembers::AddVoterIds(ready), retain),
            )
            .await
            {
                tracing::debug!(group = g.id, error = %e, "add voters");
            }
        }
    }
}

/// What a leader the placement no longer wants does next.
#[derive(Debug, PartialEq, Eq)]
enum WayOut {
    /// Hand leadership to this wanted voter.
    HandOver(NodeId),
    /// Wait (a wanted voter is catching up, or no wanted node has).
    Wait,
    /// Make these caught-up wanted nodes voters first: none is one yet.
    AddVoters(BTreeSet<NodeId>),
}

fn way_out(
    voters: &BTreeSet<NodeId>,
    desired: &[NodeId],
    caught_up: impl Fn(NodeId) -> bool,
) -> WayOut {
    if let Some(to) = desired
        .iter()
        .copied()
        .find(|n| voters.contains(n) && caught_up(*n))
    {
        return WayOut::HandOver(to);
    }
    if desired.iter().any(|n| voters.contains(n)) {
        return WayOut::Wait;
    }
    let ready: BTreeSet<NodeId> = desired.iter().copied().filter(|n| caught_up(*n)).collect();
    if ready.is_empty() {
        WayOut::Wait
    } else {
        WayOut::AddVoters(ready)
    }
}

/// Starts a hand-over of `g`'s leadership to `to` (at most one per group per 10 s).
fn hand_over(
    core: &Arc<Core>,
    state: &Arc<ManagerState>,
    g: &Arc<Group>,
    to: NodeId,
    nodes: &[NodeRecord],
) {
    let Some(addr) = nodes
        .iter()
        .find(|n| n.id == to && n.state != NodeState::Removed)
        .map(|n| n.peer_addr.clone())
    else {
        return;
    };
    {
        let mut t = state.transfers.lock().unwrap_or_else(|p| p.into_inner());
        if t.get(&g.id).is_some_and(|at| at.elapsed() < TRANSFER_EVERY) {
            return;
        }
        t.insert(g.id, Instant::now());
    }
    let (core, g) = (core.clone(), g.clone());
    tokio::spawn(async move { transfer(&core, &g, to, &addr).await });
}

/// Hands `g`'s leadership to `to`: this leader stops heartbeats and holds new entries until
/// the followers' leader lease runs out (openraft 0.9 has no transfer call and followers
/// refuse votes while the lease holds), then asks `to` to campaign. Writes to the group wait
/// for about one election timeout meanwhile.
async fn transfer(core: &Core, g: &Group, to: NodeId, addr: &str) {
    let lease = Duration::from_millis(core.config.raft.election_timeout_max_ms);
    tracing::info!(group = g.id, to, "handing leadership over");
    g.raft.runtime_config().heartbeat(false);
    g.proposer.hold(lease + Duration::from_millis(300));
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let asked = core
        .peers
        .post(addr, &format!("/peer/elect/{}", g.id))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    if let Err(e) = asked {
        tracing::debug!(group = g.id, to, error = %e, "elect request");
    }
    let _ = g
        .raft
        .wait(Some(Duration::from_secs(2)))
        .metrics(
            |m| m.current_leader != Some(core.node_id),
            "leadership handed over",
        )
        .await;
    g.raft.runtime_config().heartbeat(true);
    g.proposer.release();
}

/// Whether the group's leader, asked now, leads it with this node out of its membership.
/// Reports trail the membership (a node promoted a moment ago may be in no report yet), and
/// deleting the replica of a voter would let it come back empty; so the leader is asked first,
/// and an unanswered question keeps the replica until a later round.
async fn leader_left_me_out(
    core: &Arc<Core>,
    nodes: &[NodeRecord],
    group: GroupId,
    leader: NodeId,
) -> bool {
    let Some(addr) = nodes.iter().find(|n| n.id == leader).map(|n| &n.peer_addr) else {
        return false;
    };
    super::status::ask(core, addr, false)
        .await
        .is_some_and(|s| leads_without(&s, group, core.node_id))
}

/// Whether `status` is of a node that leads `group` with `node` neither voter nor learner.
fn leads_without(status: &super::wire::LocalStatus, group: GroupId, node: NodeId) -> bool {
    status.groups.iter().any(|g| {
        g.group == group
            && g.role == "leader"
            && !g.voters.contains(&node)
            && !g.learners.contains(&node)
    })
}

/// Opens replicas the placement gives this node; closes (and deletes) the ones its group's
/// leader removed it from.
async fn replicas(
    core: &Arc<Core>,
    nodes: &[NodeRecord],
    assignment: &Assignment,
    reports: &[GroupReport],
) {
    let me = core.node_id;
    for group in assignment.groups.keys() {
        if crate::core::placed_on(nodes, assignment, me, *group) && core.group(*group).is_none() {
            if let Err(e) = core.open_group(*group).await {
                tracing::warn!(group, error = %e, "cannot open replica");
            }
        }
    }
    let by_group: BTreeMap<GroupId, &GroupReport> = reports.iter().map(|r| (r.group, r)).collect();
    for g in core.groups() {
        if g.id == META_GROUP {
            continue;
        }
        let assigned = assignment
            .groups
            .get(&g.id)
            .is_some_and(|v| v.contains(&me));
        if assigned {
            continue;
        }
        let Some(report) = by_group.get(&g.id) else {
            continue;
        };
        let reported_member = report.voters.contains(&me) || report.learners.contains(&me);
        // Reports carry committed memberships only, written by the group's leader; once the
        // latest one leaves this node out and the placement does not want it back, the
        // leader has removed it: its log no longer counts toward any quorum.
        if !reported_member
            && !g.leads(me)
            && report.leader != me
            && leader_left_me_out(core, nodes, g.id, report.leader).await
        {
            tracing::info!(
                group = g.id,
                "this node no longer holds the group; deleting its replica"
            );
            if let Err(e) = core.close_group(g.id, true).await {
                tracing::warn!(group = g.id, error = %e, "closing replica");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_deleted_only_once_its_groups_leader_has_the_node_out() {
        use super::super::wire::{LocalGroup, LocalStatus};
        let status = |role: &str, voters: Vec<NodeId>, learners: Vec<NodeId>| LocalStatus {
            node_id: 1,
            groups: vec![LocalGroup {
                group: 3,
                role: role.into(),
                leader: Some(1),
                term: 2,
                last_log: 10,
                applied: 10,
                committed: 10,
                voters,
                learners,
                pending_deliveries: 0,
                digest: None,
            }],
        };
        assert!(leads_without(
            &status("leader", vec![1, 2, 3], vec![]),
            3,
            4
        ));
        // Node 4 promoted a moment ago (no report says so yet): kept.
        assert!(!leads_without(
            &status("leader", vec![1, 2, 4], vec![]),
            3,
            4
        ));
        assert!(!leads_without(
            &status("leader", vec![1, 2, 3], vec![4]),
            3,
            4
        ));
        // No longer the leader, or asked about another group: nothing is known.
        assert!(!leads_without(
            &status("follower", vec![1, 2, 3], vec![]),
            3,
            4
        ));
        assert!(!leads_without(
            &status("leader", vec![1, 2, 3], vec![]),
            5,
            4
        ));
    }

    #[test]
    fn a_leader_with_no_wanted_voter_makes_the_caught_up_ones_voters_first() {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<_>>();
        let all_caught_up = |_| true;
        // {1} leads, the placement wants {2}: 2 is only a learner, so it becomes a voter first
        // (before, the leader waited for a voter to hand over to that could never appear).
        assert_eq!(
            way_out(&set(&[1]), &[2], all_caught_up),
            WayOut::AddVoters(set(&[2]))
        );
        // {1, 2, 3} to {4, 5, 6}, removed back to back: the caught-up ones join first.
        assert_eq!(
            way_out(&set(&[1, 2, 3]), &[4, 5, 6], |n| n != 6),
            WayOut::AddVoters(set(&[4, 5]))
        );
        // Then a wanted voter that caught up takes over.
        assert_eq!(
            way_out(&set(&[1, 2]), &[2], all_caught_up),
            WayOut::HandOver(2)
        );
        // A wanted voter still catching up is waited for; so is a learner.
        assert_eq!(way_out(&set(&[1, 2]), &[2], |n| n != 2), WayOut::Wait);
        assert_eq!(way_out(&set(&[1]), &[2], |n| n != 2), WayOut::Wait);
    }
}
