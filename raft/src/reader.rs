//! Read-only queries on a group's applied state, for the node's services.
//!
//! Reads see what has been applied on this node. On the leader, everything it acknowledged
//! has been applied before the acknowledgement, so a client reads its own writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rocksdb::DB;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::records::*;
use crate::types::{GroupId, LogId};

/// A page of activity: `(at_ms, record)` newest first, and the cursor of the next page.
pub type ActivitySlice = (Vec<(i64, ActivityRecord)>, Option<String>);

/// Queries on one group's state.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
    group: GroupId,
    /// Which key space holds the state; shared with the group's state machine.
    generation: Arc<AtomicBool>,
}

impl std::fmt::Debug for StateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader")
            .field("group", &self.group)
            .finish()
    }
}

impl StateReader {
    /// A reader of `group` in `db`, whose state is in the key space `generation` names.
    pub fn new(db: Arc<DB>, group: GroupId, generation: Arc<AtomicBool>) -> Self {
        StateReader {
            db,
            group,
            generation,
        }
    }

    /// The group read.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The key space holding the state now.
    fn space(&self) -> u32 {
        keys::space(self.group, self.generation.load(Ordering::SeqCst))
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get_pinned(key)? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Values of the keys in `[from, end)`, in key order (or reverse), at most `limit`;
    /// returns them with their keys.
    fn scan<T: DeserializeOwned>(
        &self,
        from: &[u8],
        end: &[u8],
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        let mut it = keys::range_iter(&self.db, from, end);
        if reverse {
            it.seek_for_prev(end);
            // `end` is exclusive.
            if it.key() == Some(end) {
                it.prev();
            }
        } else {
            it.seek(from);
        }
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if out.len() >= limit || k < from || k >= end {
                break;
            }
            out.push((k.to_vec(), codec::decode(v)?));
            if reverse {
                it.prev();
            } else {
                it.next();
            }
        }
        it.status()?;
        Ok(out)
    }

    /// The last applied log id.
    pub fn applied(&self) -> Result<Option<LogId>, StoreError> {
        Ok(self
            .get::<Option<LogId>>(&keys::key(self.space(), keys::SM_META, b"applied"))?
            .flatten())
    }

    /// The last committed log index, as the log store last saved it.
    pub fn committed(&self) -> Result<Option<u64>, StoreError> {
        let v: Option<Option<LogId>> =
            self.get(&keys::key(self.group, keys::RAFT_META, b"committed"))?;
        Ok(v.flatten().map(|l| l.index))
    }

    /// One entity.
    pub fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        self.get(&keys::key(self.space(), keys::ENTITY, id.as_bytes()))
    }

    /// Every entity, by id.
    pub fn entities(&self) -> Result<Vec<EntityRecord>, StoreError> {
        let p = keys::prefix(self.space(), keys::ENTITY);
        Ok(self
            .scan(&p, &keys::prefix_end(&p), false, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// One customer.
    pub fn customer(&self, id: &str) -> Result<Option<CustomerRecord>, StoreError> {
        self.get(&keys::customer(self.space(), id))
    }

    /// A customer's profile as stored, read with one seek: its links and rules (by entity
    /// and rule id), or None if there is no such customer.
    pub fn profile(&self, id: &str) -> Result<Option<StoredProfile>, StoreError> {
        let p = keys::profile(self.space(), id);
        let mut it = keys::profile_iter(&self.db, &p);
        it.seek(&p);
        let mut found: Option<StoredProfile> = None;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((_, part, _)) = keys::split_profile(k) else {
                it.next();
                continue;
            };
            match (part, found.as_mut()) {
                (keys::ProfilePart::Customer, None) => {
                    found = Some(StoredProfile {
                        customer: codec::decode(v)?,
                        links: Vec::new(),
                        rules: Vec::new(),
                    });
                }
                (keys::ProfilePart::Link, Some(p)) => p.links.push(codec::decode(v)?),
                (keys::ProfilePart::Rule, Some(p)) => p.rules.push(codec::decode(v)?),
                // The record is the range's first key: without it there is no customer, and
                // what lies under its prefix is not read.
                _ => break,
            }
            it.next();
        }
        it.status()?;
        Ok(found)
    }

    /// A portal account by (normalised) email.
    pub fn account(&self, email: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.get(&keys::key(self.space(), keys::ACCOUNT, email.as_bytes()))
    }

    /// A portal session by the hash of its cookie value.
    pub fn session(&self, hash: &[u8]) -> Result<Option<SessionRecord>, StoreError> {
        self.get(&keys::key(self.space(), keys::SESSION, hash))
    }

    /// An OAuth linking waiting for its callback, by its state's SHA-256.
    pub fn pending_link(&self, state_hash: &[u8]) -> Result<Option<PendingLink>, StoreError> {
        self.get(&keys::key(self.space(), keys::PENDING_LINK, state_hash))
    }

    /// The customer claiming `subject` at `entity` (meta group: a routing hint).
    pub fn customer_for_subject(
        &self,
        entity: &str,
        subject: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .get::<SubjectClaim>(&keys::key2(self.space(), keys::SUBJECT, entity, subject))?
            .map(|h| h.customer_id))
    }

    /// A customer's links, by entity id.
    pub fn links(&self, customer: &str) -> Result<Vec<LinkRecord>, StoreError> {
        let p = keys::profile_part(self.space(), customer, keys::ProfilePart::Link);
        Ok(self
            .scan(&p, &keys::prefix_end(&p), false, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// One link.
    pub fn link(&self, customer: &str, entity: &str) -> Result<Option<LinkRecord>, StoreError> {
        self.get(&keys::link(self.space(), customer, entity))
    }

    /// How the event (`source`, `id`) was recorded, if it was.
    pub fn dedup(&self, source: &str, id: &str) -> Result<Option<DedupRecord>, StoreError> {
        self.get(&keys::key2(self.space(), keys::DEDUP, source, id))
    }

    /// A customer's rules, by id.
    pub fn rules(&self, customer: &str) -> Result<Vec<RuleRecord>, StoreError> {
        let p = keys::profile_part(self.space(), customer, keys::ProfilePart::Rule);
        Ok(self
            .scan(&p, &keys::prefix_end(&p), false, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// One part of every profile, as (customer id, value), by customer: every key of the
    /// group's profiles is stepped over, and only `part`'s values decoded.
    fn every_profile<T: DeserializeOwned>(
        &self,
        part: keys::ProfilePart,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let p = keys::prefix(self.space(), keys::PROFILE);
        let mut opts = keys::bulk_scan();
        opts.set_iterate_upper_bound(keys::prefix_end(&p));
        let mut it = self.db.raw_iterator_opt(opts);
        it.seek(&p);
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if let Some((customer, found, _)) = keys::split_profile(k) {
                if found == part {
                    let customer = String::from_utf8_lossy(customer).into_owned();
                    out.push((customer, codec::decode(v)?));
                }
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Every customer's rules, grouped by customer id (for training the recommender).
    pub fn all_rules(&self) -> Result<Vec<(String, RuleRecord)>, StoreError> {
        self.every_profile(keys::ProfilePart::Rule)
    }

    /// Every link, as (customer id, entity id) (for training the recommender).
    pub fn all_links(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .every_profile::<LinkRecord>(keys::ProfilePart::Link)?
            .into_iter()
            .map(|(customer, link)| (customer, link.entity_id))
            .collect())
    }

    /// Event types received, as (customer id, `source/type`, count, last received ms), in
    /// key order: the whole group's when `customer` is `None` (for training), else one
    /// customer's. A count an earlier build stored under `source.type` is read under its
    /// current name and added to the count stored since ([`keys::upgrade_engagement_name`]),
    /// so each type is one engagement.
    pub fn engagements(
        &self,
        customer: Option<&str>,
    ) -> Result<Vec<(String, String, u64, i64)>, StoreError> {
        let p = match customer {
            Some(c) => keys::prefix2(self.space(), keys::ENGAGEMENT, c),
            None => keys::prefix(self.space(), keys::ENGAGEMENT),
        };
        let mut merged: std::collections::BTreeMap<(String, String), (u64, i64)> =
            std::collections::BTreeMap::new();
        for (k, (count, last)) in
            self.scan::<(u64, i64)>(&p, &keys::prefix_end(&p), false, usize::MAX)?
        {
            let Some((customer, name)) = split_key2(&k, keys::HEADER) else {
                continue;
            };
            let name = keys::upgrade_engagement_name(&name).into_owned();
            let seen = merged.entry((customer, name)).or_insert((0, i64::MIN));
            seen.0 = seen.0.saturating_add(count);
            seen.1 = seen.1.max(last);
        }
        Ok(merged
            .into_iter()
            .map(|((customer, name), (count, last))| (customer, name, count, last))
            .collect())
    }

    /// The stored recommendation model.
    pub fn model(&self) -> Result<Option<ModelRecord>, StoreError> {
        self.get(&keys::prefix(self.space(), keys::MODEL))
    }

    /// How many customers dismissed each template (for training).
    pub fn dismissal_counts(&self) -> Result<std::collections::HashMap<String, u32>, StoreError> {
        let p = keys::prefix(self.space(), keys::DISMISSED);
        let rows: Vec<(Vec<u8>, ())> = self.scan(&p, &keys::prefix_end(&p), false, usize::MAX)?;
        let mut counts = std::collections::HashMap::new();
        for (k, ()) in rows {
            if let Some((_, template)) = split_key2(&k, p.len()) {
                *counts.entry(template).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// The templates a customer dismissed.
    pub fn dismissed(&self, customer: &str) -> Result<Vec<String>, StoreError> {
        let p = keys::prefix2(self.space(), keys::DISMISSED, customer);
        let rows: Vec<(Vec<u8>, ())> = self.scan(&p, &keys::prefix_end(&p), false, usize::MAX)?;
        Ok(rows
            .into_iter()
            .map(|(k, ())| String::from_utf8_lossy(&k[p.len()..]).into_owned())
            .collect())
    }

    /// A customer's activity, newest first, older than the cursor `before` (an opaque
    /// hex cursor returned as `next`).
    pub fn activity(
        &self,
        customer: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<ActivitySlice, StoreError> {
        let p = keys::prefix2(self.space(), keys::ACTIVITY, customer);
        // A cursor is the suffix of the key to read before, and, when a page ended inside a
        // stored record of several lines, how many of its lines (newest first) were read.
        let cursor = before.and_then(decode_cursor);
        let (end, read_at) = match &cursor {
            Some(c) if c.len() == ACTIVITY_SUFFIX + 2 => {
                let (suffix, read) = c.split_at(ACTIVITY_SUFFIX);
                let mut end = [p.as_slice(), suffix].concat();
                end.push(0);
                let read = usize::from(u16::from_be_bytes([read[0], read[1]]));
                (end, Some((suffix, read)))
            }
            Some(suffix) => ([p.as_slice(), suffix].concat(), None),
            None => (keys::prefix_end(&p), None),
        };
        // Every stored record is at least one line, so limit + 1 records are enough.
        let rows: Vec<(Vec<u8>, ActivityRecord)> = self.scan(&p, &end, true, limit + 1)?;
        let mut items = Vec::with_capacity(limit);
        let mut next = None;
        let mut last_read: Option<Vec<u8>> = None;
        for (k, v) in rows {
            let at = keys::read_u64(&k, p.len()).unwrap_or(0) as i64;
            let suffix = &k[p.len()..];
            if items.len() == limit {
                next = last_read.map(|s| encode_cursor(&activity_cursor(&s, 0)));
                break;
            }
            let mut lines = v.lines();
            // Lines the previous page read of this record (unless it went meanwhile), fewer
            // than all of them: a cursor is only issued inside a record.
            let read_before = match read_at {
                Some((s, read)) if s == suffix && last_read.is_none() => {
                    read.min(lines.len().saturating_sub(1))
                }
                _ => 0,
            };
            lines.reverse();
            let lines: Vec<ActivityRecord> = lines.into_iter().skip(read_before).collect();
            let room = limit - items.len();
            let whole = lines.len() <= room;
            for line in lines.into_iter().take(room) {
                items.push((at, line));
            }
            if !whole {
                let read = u16::try_from(read_before + room).unwrap_or(u16::MAX);
                next = Some(encode_cursor(&activity_cursor(suffix, read)));
                break;
            }
            last_read = Some(suffix.to_vec());
        }
        Ok((items, next))
    }

    /// Every node of the cluster (meta group).
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let p = keys::prefix(self.space(), keys::NODE);
        Ok(self
            .scan(&p, &keys::prefix_end(&p), false, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// The cluster's settings, once initialised (meta group).
    pub fn settings(&self) -> Result<Option<ClusterSettings>, StoreError> {
        self.get(&keys::prefix(self.space(), keys::SETTINGS))
    }

    /// The target placement (meta group).
    pub fn assignment(&self) -> Result<Option<Assignment>, StoreError> {
        self.get(&keys::prefix(self.space(), keys::ASSIGNMENT))
    }

    /// Every group's last report (meta group).
    pub fn group_reports(&self) -> Result<Vec<GroupReport>, StoreError> {
        let p = keys::prefix(self.space(), keys::GROUP_REPORT);
        Ok(self
            .scan(&p, &keys::prefix_end(&p), false, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Intents under way, oldest id first (data groups).
    pub fn intents(&self, limit: usize) -> Result<Vec<IntentRecord>, StoreError> {
        let p = keys::prefix(self.space(), keys::INTENT);
        Ok(self
            .scan(&p, &keys::prefix_end(&p), false, limit)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// A digest of the whole applied state with the index it is at, from one RocksDB
    /// snapshot: replicas at the same index must have the same digest.
    pub fn digest(&self) -> Result<(Option<LogId>, String), StoreError> {
        use sha2::{Digest as _, Sha256};
        let space = self.space();
        let snap = self.db.snapshot();
        let applied: Option<LogId> = match snap.get(keys::key(space, keys::SM_META, b"applied"))? {
            Some(v) => codec::decode(&v)?,
            None => None,
        };
        let mut h = Sha256::new();
        crate::state_machine::snapshot::each_pair(&snap, space, |k, v| {
            h.update((k.len() as u32).to_be_bytes());
            h.update(k);
            // Retention entries hold full keys, whose space a snapshot install may change.
            if k.first() == Some(&keys::EXPIRY) {
                for target in crate::codec::decode_keys(v)? {
                    let t = target.get(4..).unwrap_or_default();
                    h.update((t.len() as u32).to_be_bytes());
                    h.update(t);
                }
                return Ok(());
            }
            h.update((v.len() as u32).to_be_bytes());
            h.update(v);
            Ok(())
        })?;
        Ok((applied, hex::encode(&h.finalize()[..16])))
    }

    /// One delivery.
    pub fn outbox(&self, command_id: &str) -> Result<Option<OutboxRecord>, StoreError> {
        self.get(&keys::key(
            self.space(),
            keys::OUTBOX,
            command_id.as_bytes(),
        ))
    }

    /// The command ids of a customer's pending deliveries, at most `limit`. Reads the whole
    /// due index one entry at a time (one outbox read each), holding only the customer's.
    pub fn pending_of(&self, customer: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let p = keys::prefix(self.space(), keys::DUE);
        let mut it = keys::range_iter(&self.db, &p, &keys::prefix_end(&p));
        it.seek(&p);
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            if out.len() >= limit {
                break;
            }
            if let Some(id) = keys::due_command(k) {
                if self
                    .outbox(id)?
                    .is_some_and(|d| d.command.customer_id == customer)
                {
                    out.push(id.to_owned());
                }
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Pending deliveries due at or before `now_ms`, earliest first: `(due_ms, command id)`.
    pub fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        let p = keys::prefix(self.space(), keys::DUE);
        let end = keys::due(self.space(), now_ms.saturating_add(1), "");
        let rows: Vec<(Vec<u8>, ())> = self.scan(&p, &end, false, limit)?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, ())| {
                let due = keys::read_u64(&k, keys::HEADER)? as i64;
                Some((due, keys::due_command(&k)?.to_owned()))
            })
            .collect())
    }

    /// Deliveries in a state, by command id, after the cursor `after`.
    pub fn deliveries(
        &self,
        state: DeliveryState,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<OutboxRecord>, Option<String>), StoreError> {
        let (tag, keyed_by_due) = match state {
            DeliveryState::Failed => (keys::FAILED, false),
            DeliveryState::Pending => (keys::DUE, true),
            DeliveryState::Delivered | DeliveryState::Cancelled => (keys::OUTBOX, false),
        };
        let p = keys::prefix(self.space(), tag);
        let from = match after.and_then(decode_cursor) {
            Some(suffix) => {
                let mut k = [p.as_slice(), &suffix].concat();
                k.push(0);
                k
            }
            None => p.clone(),
        };
        let end = keys::prefix_end(&p);
        let mut it = keys::range_iter(&self.db, &from, &end);
        it.seek(&from);
        let id_at = if keyed_by_due { p.len() + 8 } else { p.len() };
        let mut out = Vec::new();
        let mut last_suffix = None;
        let mut more = false;
        while let Some(k) = it.key() {
            if k >= end.as_slice() {
                break;
            }
            if out.len() >= limit {
                more = true;
                break;
            }
            let id = String::from_utf8_lossy(k.get(id_at..).unwrap_or_default()).into_owned();
            if let Some(rec) = self.outbox(&id)? {
                if rec.state == state {
                    out.push(rec);
                    last_suffix = Some(k[p.len()..].to_vec());
                }
            }
            it.next();
        }
        it.status()?;
        let next = if more {
            last_suffix.as_deref().map(encode_cursor)
        } else {
            None
        };
        Ok((out, next))
    }
}

/// A customer's record, links and rules as stored (see [`StateReader::profile`]).
#[derive(Debug, Clone)]
pub struct StoredProfile {
    /// The customer's record.
    pub customer: CustomerRecord,
    /// Its links, by entity id.
    pub links: Vec<LinkRecord>,
    /// Its rules, by rule id.
    pub rules: Vec<RuleRecord>,
}

/// The two parts of a `key2` key (`a \0 b`), read from `at` (the prefix length).
fn split_key2(key: &[u8], at: usize) -> Option<(String, String)> {
    let rest = key.get(at..)?;
    let sep = rest.iter().position(|b| *b == 0)?;
    Some((
        String::from_utf8_lossy(&rest[..sep]).into_owned(),
        String::from_utf8_lossy(&rest[sep + 1..]).into_owned(),
    ))
}

/// An activity key's suffix after the customer's prefix: `at_ms u64 | seq u64`.
const ACTIVITY_SUFFIX: usize = 16;

/// The activity cursor before `suffix`'s record, or, with `read` > 0, at that record with
/// its first `read` lines (newest first) read.
fn activity_cursor(suffix: &[u8], read: u16) -> Vec<u8> {
    let mut c = suffix.to_vec();
    if read > 0 {
        c.extend_from_slice(&read.to_be_bytes());
    }
    c
}

fn encode_cursor(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// True when `s` has the shape of a cursor this store hands out (`next`), so a garbage
/// cursor is refused instead of silently starting from the first page.
pub fn is_cursor(s: &str) -> bool {
    !s.is_empty() && decode_cursor(s).is_some()
}

fn decode_cursor(s: &str) -> Option<Vec<u8>> {
    if s.len() > 1024 {
        return None;
    }
    hex::decode(s).ok()
}
