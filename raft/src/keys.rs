//! The RocksDB key layout. Every key is `group (u32 BE) | tag (u8) | rest`, so a group is one
//! contiguous range, and its state machine data (tags `SM_FIRST..SM_END`) another.
//!
//! Variable parts are joined with a NUL byte, which ids and subjects cannot contain
//! (see `custos_api::limits`); numbers are big-endian so byte order is numeric order.

use crate::types::GroupId;

/// Which key space holds the state machine data (one key; see [`space`]).
pub const SPACE: u8 = 0x00;
/// Raft log entries: `| index u64`.
pub const LOG: u8 = 0x01;
/// Raft metadata: vote, committed, last purged.
pub const RAFT_META: u8 = 0x02;
/// The latest built or installed snapshot.
pub const SNAPSHOT: u8 = 0x03;
/// State machine metadata: last applied, membership.
pub const SM_META: u8 = 0x04;

/// First state machine data tag (inclusive).
pub const SM_FIRST: u8 = 0x10;
/// Entities: `| entity`.
pub const ENTITY: u8 = 0x10;
// 0x11, 0x14, 0x15: customers, links and rules under tags of their own (format 9 and before).
/// Meta group: the routing index `| entity \0 subject` -> the claiming customer id.
pub const SUBJECT: u8 = 0x13;
/// Event dedup keys: `| source \0 event id`.
pub const DEDUP: u8 = 0x16;
/// Activity: `| customer \0 at_ms u64 \0 seq u64`.
pub const ACTIVITY: u8 = 0x17;
/// Outbox (every command and its delivery): `| command id`.
pub const OUTBOX: u8 = 0x18;
/// Due index of pending deliveries: `| due_ms u64 | command id`.
pub const DUE: u8 = 0x19;
/// Failed deliveries, for listing and replay: `| command id`.
pub const FAILED: u8 = 0x1a;
/// Retention index: `| expires_ms u64 | seq u64` -> the key to delete then.
pub const EXPIRY: u8 = 0x1b;
/// The recommendation model (one key).
pub const MODEL: u8 = 0x1c;
/// Dismissed recommendations: `| customer \0 template`.
pub const DISMISSED: u8 = 0x1d;
/// Engagement: events received per customer and type: `| customer \0 source/type`
/// ([`engagement_name`]; `source.type` before 2026-12-07, [`upgrade_engagement_name`]).
pub const ENGAGEMENT: u8 = 0x1e;
/// Pending OAuth linkings: `| sha256(state)`.
pub const PENDING_LINK: u8 = 0x1f;
/// Meta group: portal accounts: `| email`.
pub const ACCOUNT: u8 = 0x20;
/// Portal sessions: `| sha256(cookie value)`.
pub const SESSION: u8 = 0x21;
/// Meta group: cluster nodes: `| node id u64`.
pub const NODE: u8 = 0x22;
/// Meta group: cluster settings (one key).
pub const SETTINGS: u8 = 0x23;
/// Meta group: the replica assignment of every group (one key).
pub const ASSIGNMENT: u8 = 0x24;
/// Meta group: what each group's leader last reported: `| group u32`.
pub const GROUP_REPORT: u8 = 0x25;
/// Data groups: cross-group operations under way: `| intent id`.
pub const INTENT: u8 = 0x26;
/// Data group: a customer's OAuth linkings waiting for their callback
/// (`customer \0 state hash` -> started at), to cap them per customer.
pub const PENDING_OF: u8 = 0x27;
/// Data group: the customer's unfinished linkings (intents claiming a subject), by entity:
/// `| customer \0 entity \0 intent id` -> (). A link or unlink finds the ones it abandons
/// here instead of reading every intent of the group.
pub const CLAIM_OF: u8 = 0x28;
/// Data groups: profiles, a customer's record, links and rules under one prefix
/// (`| customer \0 part | rest`, see [`profile`]), so a profile is read back with one seek
/// over adjacent keys, not a point read and two scans in three places of the key space.
pub const PROFILE: u8 = 0x29;
/// End of state machine data tags (exclusive).
pub const SM_END: u8 = 0x30;

/// `group | tag`.
pub fn prefix(group: GroupId, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(48);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    k
}

/// `group | tag | part`.
pub fn key(group: GroupId, tag: u8, part: &[u8]) -> Vec<u8> {
    let mut k = prefix(group, tag);
    k.extend_from_slice(part);
    k
}

/// `group | tag | a \0 b`.
pub fn key2(group: GroupId, tag: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = prefix(group, tag);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

/// `group | tag | a \0` : the prefix of every `key2(group, tag, a, _)`.
pub fn prefix2(group: GroupId, tag: u8, a: &str) -> Vec<u8> {
    let mut k = prefix(group, tag);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k
}

/// The part of a profile a key holds: the byte after `PROFILE | customer \0`, ordered so the
/// customer's record comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ProfilePart {
    /// The customer's record: nothing follows.
    Customer = 1,
    /// A link: the entity id follows.
    Link = 2,
    /// A rule: the rule id follows.
    Rule = 3,
}

/// `PROFILE | customer \0`: the prefix of every key of one customer's profile.
pub fn profile(group: GroupId, customer: &str) -> Vec<u8> {
    prefix2(group, PROFILE, customer)
}

/// `PROFILE | customer \0 part`: the prefix of one part of a profile (every link, say).
pub fn profile_part(group: GroupId, customer: &str, part: ProfilePart) -> Vec<u8> {
    let mut k = profile(group, customer);
    k.push(part as u8);
    k
}

/// The key of a customer's record.
pub fn customer(group: GroupId, customer: &str) -> Vec<u8> {
    profile_part(group, customer, ProfilePart::Customer)
}

/// The key of a customer's link to `entity`.
pub fn link(group: GroupId, customer: &str, entity: &str) -> Vec<u8> {
    let mut k = profile_part(group, customer, ProfilePart::Link);
    k.extend_from_slice(entity.as_bytes());
    k
}

/// The key of a customer's rule.
pub fn rule(group: GroupId, customer: &str, rule: &str) -> Vec<u8> {
    let mut k = profile_part(group, customer, ProfilePart::Rule);
    k.extend_from_slice(rule.as_bytes());
    k
}

/// Splits a profile key (after `group | PROFILE`) into its customer, part and the id after it;
/// None for a key of no known part.
pub fn split_profile(key: &[u8]) -> Option<(&[u8], ProfilePart, &[u8])> {
    let rest = key.get(HEADER..)?;
    let end = rest.iter().position(|b| *b == 0)?;
    let part = match rest.get(end + 1)? {
        1 => ProfilePart::Customer,
        2 => ProfilePart::Link,
        3 => ProfilePart::Rule,
        _ => return None,
    };
    Some((&rest[..end], part, rest.get(end + 2..)?))
}

/// The Raft log key of `index`.
pub fn log(group: GroupId, index: u64) -> Vec<u8> {
    key(group, LOG, &index.to_be_bytes())
}

/// An activity key: `customer \0 at_ms \0 seq`.
pub fn activity(group: GroupId, customer: &str, at_ms: i64, seq: u64) -> Vec<u8> {
    let mut k = prefix2(group, ACTIVITY, customer);
    k.extend_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A due-index key: `due_ms | command id`.
pub fn due(group: GroupId, due_ms: i64, command_id: &str) -> Vec<u8> {
    let mut k = prefix(group, DUE);
    k.extend_from_slice(&(due_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(command_id.as_bytes());
    k
}

/// Whether `key` is one of the customer's own keys (`group | tag | customer \0 ...`: its
/// activity, engagement, dismissals, profile, pending linkings), as a retention entry lists
/// it; an exact match, not any key that happens to hold the id's bytes.
pub fn names_customer(key: &[u8], customer: &[u8]) -> bool {
    key.get(HEADER..)
        .and_then(|rest| rest.strip_prefix(customer))
        .is_some_and(|after| after.first() == Some(&0))
}

/// The command id of a due-index key ([`due`]).
pub fn due_command(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.get(HEADER + 8..)?).ok()
}

/// A retention key: `expires_ms | seq`.
pub fn expiry(group: GroupId, expires_ms: i64, seq: u64) -> Vec<u8> {
    let mut k = prefix(group, EXPIRY);
    k.extend_from_slice(&(expires_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The state machine's keys in a space (its metadata and data, not the Raft log's keys):
/// `[lo, hi)`.
pub fn sm_range(space: u32) -> (Vec<u8>, Vec<u8>) {
    (prefix(space, SM_META), prefix(space, SM_END))
}

/// The first key after every key starting with `prefix` (for exclusive range ends).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// The name RocksDB records with the prefix filters [`filter_prefix`] builds; a table file
/// written under another name (or none) is read without them.
pub const FILTER_PREFIX_NAME: &str = "custos.profile-prefix.1";

/// The prefix RocksDB's prefix filters hold for `key`: `group | PROFILE | customer \0` for a
/// key of a profile, so a profile's rebuild (one seek over that prefix) skips every table
/// file holding none of its keys instead of reading a block from each; `None` for every
/// other key, which only the whole-key filters cover.
pub fn filter_prefix(key: &[u8]) -> Option<&[u8]> {
    if key.get(HEADER - 1) != Some(&PROFILE) {
        return None;
    }
    let end = key.get(HEADER..)?.iter().position(|b| *b == 0)?;
    key.get(..HEADER + end + 1)
}

/// Read options for a scan that may cross prefixes: RocksDB's prefix filters are not
/// consulted (with them, a seek to a profile's key could skip a table file holding the keys
/// after that profile).
pub fn total_order() -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_total_order_seek(true);
    opts
}

/// Read options for a scan over a whole group (a snapshot, training): in total order, and
/// not kept in the block cache, which would otherwise trade the blocks events keep reading
/// for blocks read once.
pub fn bulk_scan() -> rocksdb::ReadOptions {
    let mut opts = total_order();
    opts.fill_cache(false);
    opts
}

/// A raw iterator over `[lo, hi)` only: with the bounds in RocksDB's read options it skips
/// files outside the range and stops at `hi` instead of stepping over the deleted keys
/// (pruned activity, settled deliveries) that may lie beyond it.
pub fn range_iter<'a>(db: &'a rocksdb::DB, lo: &[u8], hi: &[u8]) -> rocksdb::DBRawIterator<'a> {
    let mut opts = total_order();
    opts.set_iterate_lower_bound(lo.to_vec());
    opts.set_iterate_upper_bound(hi.to_vec());
    db.raw_iterator_opt(opts)
}

/// A raw iterator over the keys of one profile (`prefix` is [`profile`]'s): table files
/// whose prefix filter says they hold none are skipped.
pub fn profile_iter<'a>(db: &'a rocksdb::DB, prefix: &[u8]) -> rocksdb::DBRawIterator<'a> {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_prefix_same_as_start(true);
    opts.set_iterate_lower_bound(prefix.to_vec());
    opts.set_iterate_upper_bound(prefix_end(prefix));
    db.raw_iterator_opt(opts)
}

/// Reads a big-endian u64 at `at` in `bytes`.
pub fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let slice = bytes.get(at..at + 8)?;
    let arr: [u8; 8] = slice.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

/// The length of `group | tag`.
pub const HEADER: usize = 5;

/// The bit that tells a group's second state machine key space from its first.
pub const SPACE_BIT: u32 = 1 << 31;

/// The key space of a group's state machine data, generation 0 or 1. A snapshot is installed
/// into the space not in use, then one synced write switches to it, so a crash mid-install
/// leaves the old state whole (see `state_machine::install`).
pub fn space(group: GroupId, generation: bool) -> u32 {
    if generation {
        group | SPACE_BIT
    } else {
        group
    }
}

/// What an engagement is stored and named by: the event's source entity and its type joined
/// by `/`, which ids cannot hold, so a source id with a dot (`acme.air` and `flight.delayed`)
/// is not the same name as another source's type (`acme` and `air.flight.delayed`).
pub fn engagement_name(source: &str, event_type: &str) -> String {
    format!("{source}/{event_type}")
}

/// An engagement name as [`engagement_name`] makes it, from one a build before 2026-12-07
/// stored (`source.type`, without a `/`): split at the first dot, as that build's readers
/// read it (so a dotted source id is misread there, as it was then). A current name is
/// returned as it is.
pub fn upgrade_engagement_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains('/') {
        return std::borrow::Cow::Borrowed(name);
    }
    match name.split_once('.') {
        Some((source, event_type)) => engagement_name(source, event_type).into(),
        None => std::borrow::Cow::Borrowed(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_one_range_with_its_record_first() {
        let whole = profile(3, "c");
        let end = prefix_end(&whole);
        let (record, link_a, rule_a) = (customer(3, "c"), link(3, "c", "a"), rule(3, "c", "a"));
        assert!(whole < record && record < link_a && link_a < rule_a && rule_a < end);
        assert!(link(3, "c", "zzz") < prefix_end(&profile_part(3, "c", ProfilePart::Link)));
        // Customer "cd"'s keys are outside customer "c"'s range.
        assert!(customer(3, "cd") > end && customer(3, "b") < whole);
        assert_eq!(
            split_profile(&rule_a),
            Some((&b"c"[..], ProfilePart::Rule, &b"a"[..]))
        );
        assert_eq!(
            split_profile(&record),
            Some((&b"c"[..], ProfilePart::Customer, &b""[..]))
        );
        assert_eq!(split_profile(&whole), None);
    }

    #[test]
    fn every_key_of_a_profile_has_that_profile_as_its_filter_prefix() {
        let whole = profile(3, "c");
        for k in [
            customer(3, "c"),
            link(3, "c", "a"),
            rule(3, "c", "a\0b"),
            whole.clone(),
        ] {
            assert_eq!(filter_prefix(&k), Some(whole.as_slice()));
        }
        assert_eq!(
            filter_prefix(&customer(3, "cd")),
            Some(profile(3, "cd").as_slice())
        );
        // Scans over many profiles seek to keys outside the filters' domain.
        assert_eq!(filter_prefix(&prefix(3, PROFILE)), None);
        assert_eq!(filter_prefix(&prefix2(3, ACTIVITY, "c")), None);
        assert_eq!(filter_prefix(&log(3, 7)), None);
        assert_eq!(filter_prefix(&[]), None);
    }

    #[test]
    fn engagement_names_keep_a_dotted_source_apart_and_read_the_earlier_form() {
        assert_ne!(
            engagement_name("acme.air", "flight.delayed"),
            engagement_name("acme", "air.flight.delayed")
        );
        assert_eq!(
            upgrade_engagement_name("airline.flight.delayed"),
            engagement_name("airline", "flight.delayed")
        );
        let current = engagement_name("acme.air", "flight.delayed");
        assert_eq!(upgrade_engagement_name(&current), current);
    }

    #[test]
    fn order_and_ranges() {
        assert!(log(1, 2) < log(1, 10));
        assert!(log(1, u64::MAX) < log(2, 0));
        assert!(activity(0, "c", 5, 0) < activity(0, "c", 6, 0));
        assert!(activity(0, "c", 6, 0) < prefix_end(&prefix2(0, ACTIVITY, "c")));
        // Customer "c" must not see customer "cd"'s activity.
        assert!(activity(0, "cd", 0, 0) > prefix_end(&prefix2(0, ACTIVITY, "c")));
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
        assert_eq!(read_u64(&due(0, 42, "x"), HEADER), Some(42));
    }
}
