//! Where each group's replicas and leader should be: pure functions of the current placement
//! and the nodes that may hold replicas, so they are tested without a cluster.
//!
//! The meta group's leader computes the target with [`place`] whenever nodes join or leave
//! and stores it in the meta group; each data group's leader then moves its group toward it
//! (learners first, then one membership change), and hands leadership to the preferred voter.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{GroupId, NodeId};

/// Replicas per data group when enough nodes exist.
pub const DATA_REPLICAS: usize = 3;

/// The meta group's voters among `nodes` (sorted by id, which is join order): the first five
/// when there are five or more, else the first three; every other node follows as a learner.
pub fn meta_voters(nodes: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    let n = if nodes.len() >= 5 { 5 } else { 3 };
    nodes.iter().copied().take(n).collect()
}

/// The target voters of each group: `min(replicas, nodes)` distinct nodes of `nodes`, the
/// preferred leader first. Moves as little as possible from `current`: voters still eligible
/// stay, gaps are filled by the least loaded nodes, then replicas move one at a time from the
/// most to the least loaded node until no two nodes differ by more than one replica; leaders
/// are spread the same way (at most `ceil(groups / nodes)` each), keeping current ones.
pub fn place(
    current: &BTreeMap<GroupId, Vec<NodeId>>,
    groups: &[GroupId],
    nodes: &BTreeSet<NodeId>,
    replicas: usize,
) -> BTreeMap<GroupId, Vec<NodeId>> {
    let mut out: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::new();
    if nodes.is_empty() {
        return groups.iter().map(|g| (*g, Vec::new())).collect();
    }
    let r = replicas.clamp(1, nodes.len());
    let mut load: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    // 1. Keep eligible current voters.
    for g in groups {
        let mut kept: Vec<NodeId> = Vec::new();
        for n in current.get(g).into_iter().flatten() {
            if nodes.contains(n) && !kept.contains(n) && kept.len() < r {
                kept.push(*n);
            }
        }
        for n in &kept {
            *load.entry(*n).or_default() += 1;
        }
        out.insert(*g, kept);
    }
    // 2. Fill gaps with the least loaded nodes.
    for g in groups {
        let voters = out.entry(*g).or_default();
        while voters.len() < r {
            let Some(pick) = least_loaded(&load, |n| !voters.contains(&n)) else {
                break;
            };
            voters.push(pick);
            *load.entry(pick).or_default() += 1;
        }
    }
    // 3. Even out: one replica at a time from the most to the least loaded node.
    for _ in 0..groups.len() * r {
        let (Some((&max_n, &max_l)), Some((&min_n, &min_l))) = (
            load.iter()
                .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n))),
            load.iter().min_by_key(|(n, l)| (**l, **n)),
        ) else {
            break;
        };
        if max_l <= min_l + 1 {
            break;
        }
        let Some(voters) = out
            .values_mut()
            .find(|v| v.contains(&max_n) && !v.contains(&min_n))
        else {
            break;
        };
        if let Some(slot) = voters.iter_mut().find(|n| **n == max_n) {
            *slot = min_n;
        }
        *load.entry(max_n).or_default() -= 1;
        *load.entry(min_n).or_default() += 1;
    }
    spread_leaders(&mut out, current, nodes.len());
    out
}

/// Puts each group's preferred leader first, at most `ceil(groups / nodes)` per node, keeping
/// a group's current preferred leader where that fits.
fn spread_leaders(
    out: &mut BTreeMap<GroupId, Vec<NodeId>>,
    current: &BTreeMap<GroupId, Vec<NodeId>>,
    node_count: usize,
) {
    let cap = out.len().div_ceil(node_count.max(1));
    let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut chosen: BTreeMap<GroupId, NodeId> = BTreeMap::new();
    for (g, voters) in out.iter() {
        let Some(first) = current.get(g).and_then(|v| v.first()) else {
            continue;
        };
        if voters.contains(first) && leads.get(first).copied().unwrap_or(0) < cap {
            *leads.entry(*first).or_default() += 1;
            chosen.insert(*g, *first);
        }
    }
    for (g, voters) in out.iter() {
        if chosen.contains_key(g) || voters.is_empty() {
            continue;
        }
        let pick = voters
            .iter()
            .copied()
            .min_by_key(|n| (leads.get(n).copied().unwrap_or(0), *n))
            .unwrap_or(voters[0]);
        *leads.entry(pick).or_default() += 1;
        chosen.insert(*g, pick);
    }
    for (g, leader) in chosen {
        if let Some(voters) = out.get_mut(&g) {
            if let Some(pos) = voters.iter().position(|n| *n == leader) {
                let l = voters.remove(pos);
                voters.insert(0, l);
            }
        }
    }
}

fn least_loaded(load: &BTreeMap<NodeId, usize>, ok: impl Fn(NodeId) -> bool) -> Option<NodeId> {
    load.iter()
        .filter(|(n, _)| ok(**n))
        .min_by_key(|(n, l)| (**l, **n))
        .map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn groups(n: u32) -> Vec<GroupId> {
        (1..=n).collect()
    }

    fn check_invariants(p: &BTreeMap<GroupId, Vec<NodeId>>, ns: &BTreeSet<NodeId>, r: usize) {
        let want = r.min(ns.len());
        let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
        for voters in p.values() {
            assert_eq!(voters.len(), want, "{p:?}");
            let distinct: BTreeSet<_> = voters.iter().collect();
            assert_eq!(
                distinct.len(),
                voters.len(),
                "duplicate voter in {voters:?}"
            );
            for v in voters {
                assert!(ns.contains(v));
                *load.entry(*v).or_default() += 1;
            }
            *leads.entry(voters[0]).or_default() += 1;
        }
        let (lo, hi) = (
            ns.iter().map(|n| load.get(n).copied().unwrap_or(0)).min(),
            ns.iter().map(|n| load.get(n).copied().unwrap_or(0)).max(),
        );
        assert!(hi.unwrap_or(0) <= lo.unwrap_or(0) + 1, "replicas {load:?}");
        let cap = p.len().div_ceil(ns.len());
        assert!(leads.values().all(|l| *l <= cap), "leaders {leads:?}");
    }

    #[test]
    fn one_node_holds_every_group() {
        let p = place(&BTreeMap::new(), &groups(16), &nodes(&[1]), 3);
        assert!(p.values().all(|v| v == &vec![1]));
    }

    #[test]
    fn three_nodes_hold_every_group_and_share_leadership() {
        let ns = nodes(&[1, 2, 3]);
        let p = place(&BTreeMap::new(), &groups(16), &ns, 3);
        check_invariants(&p, &ns, 3);
    }

    #[test]
    fn a_joining_node_only_takes_replicas_it_needs() {
        let three = nodes(&[1, 2, 3]);
        let before = place(&BTreeMap::new(), &groups(16), &three, 3);
        let grown = place(&before, &groups(16), &three, 3);
        assert_eq!(grown, before, "placement is stable");
        let four = nodes(&[1, 2, 3, 4]);
        let after = place(&before, &groups(16), &four, 3);
        check_invariants(&after, &four, 3);
        // Every change hands a replica to the new node; none shuffles between old ones.
        let mut moved = 0;
        for (g, voters) in &after {
            let old: BTreeSet<_> = before[g].iter().collect();
            let new: BTreeSet<_> = voters.iter().collect();
            for n in new.difference(&old) {
                assert_eq!(**n, 4, "group {g}: {:?} -> {:?}", before[g], voters);
                moved += 1;
            }
        }
        assert_eq!(moved, 12, "48 replicas over 4 nodes: the new one takes 12");
    }

    #[test]
    fn a_leaving_node_is_replaced_only_where_it_was() {
        let four = nodes(&[1, 2, 3, 4]);
        let before = place(&BTreeMap::new(), &groups(16), &four, 3);
        let three = nodes(&[1, 2, 3]);
        let after = place(&before, &groups(16), &three, 3);
        check_invariants(&after, &three, 3);
        for (g, voters) in &before {
            if !voters.contains(&4) {
                let a: BTreeSet<_> = after[g].iter().collect();
                let b: BTreeSet<_> = voters.iter().collect();
                assert_eq!(a, b, "group {g} did not hold node 4 and must not move");
            }
        }
    }

    #[test]
    fn seven_nodes_and_two_nodes() {
        for ids in [&[1, 2][..], &[1, 2, 3, 4, 5, 6, 7][..]] {
            let ns = nodes(ids);
            check_invariants(&place(&BTreeMap::new(), &groups(16), &ns, 3), &ns, 3);
        }
    }

    #[test]
    fn meta_voters_are_the_first_three_or_five() {
        assert_eq!(meta_voters(&nodes(&[1])), nodes(&[1]));
        assert_eq!(meta_voters(&nodes(&[1, 2, 3, 4])), nodes(&[1, 2, 3]));
        assert_eq!(
            meta_voters(&nodes(&[2, 3, 5, 7, 9, 11])),
            nodes(&[2, 3, 5, 7, 9])
        );
    }
}
