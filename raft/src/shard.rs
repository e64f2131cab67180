//! Which group holds what: the meta group, customer slots, and the shard map.
//!
//! A customer's id hashes to one of [`SLOTS`] slots; the shard map (kept in the meta group,
//! with an epoch) names the data group of each slot. Ids handed out by the vault (session
//! cookies, OAuth states, command ids) carry their slot, so any node routes them without a
//! lookup.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::GroupId;

/// The meta group: nodes, entities, the shard map, settings and the routing index.
pub const META_GROUP: GroupId = 0;

/// Slots customers hash to; groups own slots through the shard map.
pub const SLOTS: u16 = 1024;

/// Most data groups a cluster can be created with.
pub const MAX_DATA_GROUPS: u32 = 256;

/// The slot of a key (a customer id, or `source \0 subject` for an event no one linked).
pub fn slot_of(key: &str) -> u16 {
    let d = Sha256::digest(key.as_bytes());
    u16::from_be_bytes([d[0], d[1]]) % SLOTS
}

/// Three hex digits naming a slot, put in front of routable ids.
pub fn slot_tag(slot: u16) -> String {
    format!("{:03x}", slot % SLOTS)
}

/// The slot named by the first three hex digits of `s`, if they are one.
pub fn parse_slot_tag(s: &str) -> Option<u16> {
    let tag = s.get(..3)?;
    let v = u16::from_str_radix(tag, 16).ok()?;
    (v < SLOTS).then_some(v)
}

/// slot -> data group, with an epoch that grows with every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Grows with every change of the map.
    pub epoch: u64,
    /// The group of each slot (`SLOTS` entries).
    pub groups: Vec<GroupId>,
}

impl ShardMap {
    /// The initial map: slots dealt round-robin over groups `1..=data_groups`.
    pub fn initial(data_groups: u32) -> Self {
        let n = data_groups.clamp(1, MAX_DATA_GROUPS);
        ShardMap {
            epoch: 1,
            groups: (0..u32::from(SLOTS)).map(|s| 1 + s % n).collect(),
        }
    }

    /// The data group owning `slot`.
    pub fn group_of_slot(&self, slot: u16) -> GroupId {
        self.groups
            .get(usize::from(slot))
            .copied()
            .unwrap_or(1 + u32::from(slot) % self.data_groups().max(1))
    }

    /// The data group owning `key`.
    pub fn group_of(&self, key: &str) -> GroupId {
        self.group_of_slot(slot_of(key))
    }

    /// The one data group every slot maps to, when there is only one.
    pub fn sole_group(&self) -> Option<GroupId> {
        let first = *self.groups.first()?;
        (self.groups.len() == usize::from(SLOTS) && self.groups.iter().all(|g| *g == first))
            .then_some(first)
    }

    /// How many data groups the map uses (the highest group id).
    pub fn data_groups(&self) -> u32 {
        self.groups.iter().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_spread_and_tags_round_trip() {
        let map = ShardMap::initial(16);
        let mut per_group = [0u32; 17];
        for i in 0..16_000 {
            let g = map.group_of(&format!("cus_{i}"));
            assert!((1..=16).contains(&g));
            per_group[g as usize] += 1;
        }
        for (g, n) in per_group.iter().enumerate().skip(1) {
            assert!((800..1200).contains(n), "group {g} got {n} of 16000");
        }
        for s in [0, 1, 511, 1023] {
            assert_eq!(parse_slot_tag(&slot_tag(s)), Some(s));
        }
        assert_eq!(parse_slot_tag("fff"), None, "beyond the slot count");
        assert_eq!(parse_slot_tag("zz1"), None);
        assert_eq!(map.data_groups(), 16);
        assert_eq!(ShardMap::initial(1).group_of("x"), 1);
        assert_eq!(map.sole_group(), None);
        assert_eq!(ShardMap::initial(1).sole_group(), Some(1));
        let mut moved = ShardMap::initial(2);
        moved.groups.iter_mut().for_each(|g| *g = 2);
        assert_eq!(moved.sole_group(), Some(2), "every slot moved to group 2");
    }
}
