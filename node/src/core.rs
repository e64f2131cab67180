//! What every part of a node shares: the groups it holds a replica of, the entity cache, the
//! peer client; and the primitives on them: `propose` to any group (forwarded to its leader
//! when that is another node), `read` from a local replica, and where a customer lives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use custos_api::webhook::Secret;
use custos_api::ErrorCode;
use custos_raft::network::{PeerNetwork, Peers};
use custos_raft::records::{ClusterSettings, CommandRecord, EntityRecord, GroupReport, NodeRecord};
use custos_raft::types::{GroupId, NodeId};
use custos_raft::{
    codec, ApplyObserver, ChangeOutcome, Effect, LogStore, ProposeError, Proposer, ProposerLimits,
    Raft, ShardMap, SnapshotPacer, SnapshotPolicy, StateChange, StateMachineStore, StateReader,
    StoreError, WalSyncer, DB, META_GROUP,
};
use serde_json::Value;
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::error::ServiceError;
use crate::read_cache::ReadCache;
use crate::seal::KeyRing;

/// An entity with what the hot path needs precomputed: parsed secrets and compiled schemas.
pub struct CachedEntity {
    /// The stored record.
    pub record: EntityRecord,
    /// Current secret, then the previous one with the end of its grace period.
    pub secrets: Vec<(Secret, Option<i64>)>,
    /// Until when a sealed signing secret of its that could not be opened (its token key is
    /// gone from the configuration) is valid: meanwhile, what fails to verify may be the
    /// vault's fault, not the sender's.
    unopened_valid_until_ms: Option<i64>,
    event_schemas: HashMap<String, jsonschema::Validator>,
    command_schemas: HashMap<String, jsonschema::Validator>,
}

impl std::fmt::Debug for CachedEntity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedEntity")
            .field("id", &self.record.id)
            .finish()
    }
}

/// Compiles a JSON Schema (the registration path checks it compiles).
pub fn compile_schema(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::validator_for(schema).map_err(|e| e.to_string())
}

/// Longest violation message that quotes the offending value; a longer one says "value".
const MAX_QUOTED_VIOLATION: usize = 300;

/// Checks `data` against a validator; the error names the first violation and its path. The
/// offending value is quoted only when short: it can be as large as the data (an event's, or
/// a mapping's that repeats it), and the message goes into answers, activity and Raft entries.
pub fn check_schema(v: &jsonschema::Validator, data: &Value) -> Result<(), String> {
    match v.iter_errors(data).next() {
        None => Ok(()),
        Some(e) => {
            let quoted = e.to_string();
            let what = if quoted.len() <= MAX_QUOTED_VIOLATION {
                quoted
            } else {
                e.masked().to_string()
            };
            Err(format!("{what} at '{}'", e.instance_path))
        }
    }
}

impl CachedEntity {
    fn new(record: EntityRecord, ring: &KeyRing) -> Self {
        let open = |sealed: &[u8]| {
            let opened = ring
                .open_signing_secret(&record.id, sealed)
                .map_err(|e| e.to_string())
                .and_then(|s| Secret::parse(&s).map_err(|e| e.to_string()));
            if let Err(e) = &opened {
                // Nothing it signs verifies until the secret is rotated: say so.
                tracing::error!(entity = %record.id, error = %e, "signing secret cannot be opened");
            }
            opened.ok()
        };
        let mut secrets = Vec::with_capacity(2);
        let mut unopened_valid_until_ms = None;
        match open(&record.sealed_secret) {
            Some(s) => secrets.push((s, None)),
            None => unopened_valid_until_ms = Some(i64::MAX),
        }
        if let Some(sealed) = record.sealed_previous_secret.as_deref() {
            let until = record.previous_valid_until_ms;
            match open(sealed) {
                Some(s) => secrets.push((s, Some(until))),
                None => unopened_valid_until_ms = unopened_valid_until_ms.or(Some(until)),
            }
        }
        let compile = |types: &[custos_raft::records::TypeRecord]| {
            types
                .iter()
                .filter_map(|t| {
                    let schema: Value = serde_json::from_str(t.schema_json.as_deref()?).ok()?;
                    Some((t.name.clone(), compile_schema(&schema).ok()?))
                })
                .collect()
        };
        CachedEntity {
            event_schemas: compile(&record.event_types),
            command_schemas: compile(&record.command_types),
            secrets,
            unopened_valid_until_ms,
            record,
        }
    }

    /// Whether a secret valid at `now_ms` could not be opened (see `unopened_valid_until_ms`).
    pub fn has_unopened_secret(&self, now_ms: i64) -> bool {
        self.unopened_valid_until_ms.is_some_and(|t| now_ms <= t)
    }

    /// The secrets valid at `now_ms` (the previous one only within its grace period).
    pub fn valid_secrets(&self, now_ms: i64) -> Vec<&Secret> {
        self.secrets
            .iter()
            .filter(|(_, until)| until.is_none_or(|u| now_ms <= u))
            .map(|(s, _)| s)
            .collect()
    }

    /// The event type's schema validator, if it has a schema.
    pub fn event_schema(&self, ty: &str) -> Option<&jsonschema::Validator> {
        self.event_schemas.get(ty)
    }

    /// The command type's schema validator, if it has a schema.
    pub fn command_schema(&self, ty: &str) -> Option<&jsonschema::Validator> {
        self.command_schemas.get(ty)
    }
}

/// Entities by id, loaded on first use and dropped when an apply changes them.
#[derive(Default)]
pub struct EntityCache {
    map: RwLock<(u64, HashMap<String, Arc<CachedEntity>>)>,
}

impl EntityCache {
    fn get_cached(&self, id: &str) -> (u64, Option<Arc<CachedEntity>>) {
        let g = self.map.read().unwrap_or_else(|p| p.into_inner());
        (g.0, g.1.get(id).cloned())
    }

    fn insert_if_current(&self, generation: u64, entity: Arc<CachedEntity>) {
        let mut g = self.map.write().unwrap_or_else(|p| p.into_inner());
        // An apply invalidated the cache while we loaded: our copy may be stale, skip it.
        if g.0 == generation {
            g.1.insert(entity.record.id.clone(), entity);
        }
    }

    fn invalidate(&self, id: Option<&str>) {
        let mut g = self.map.write().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        match id {
            Some(id) => {
                g.1.remove(id);
            }
            None => g.1.clear(),
        }
    }
}

/// Pending deliveries by due time, kept in memory so the worker never scans the due index
/// (a queue in an LSM tree leaves a tombstone per settled entry for every scan to skip).
/// Fed by the state machine's apply effects while this node leads the group (a follower
/// keeps nothing: its worker reloads from storage when it becomes the leader); reloaded from
/// storage when this node becomes the group's leader or installs a snapshot.
#[derive(Default)]
pub struct DueQueue {
    queue: Mutex<Queue>,
    /// True while this node's worker leads the group.
    leading: AtomicBool,
    /// Set when the queue must be reloaded from storage.
    stale: AtomicBool,
    wake: Notify,
    /// When the delivery worker last went round its loop (Unix ms), for readiness.
    heartbeat_ms: AtomicI64,
}

#[derive(Default)]
struct Queue {
    by_time: BTreeSet<(i64, String)>,
    /// Commands handed over by the applies that created them, until their first attempt.
    created: HashMap<String, Arc<CommandRecord>>,
}

/// At most this many created commands are held for their first attempt (about 1 KiB each);
/// beyond it the attempt reads the command from storage, as a retry does.
const MAX_CREATED_HELD: usize = 16_384;

impl DueQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (true) or stops (false) keeping the queue: only the leader's worker sends. On
    /// stopping, the queue is emptied; on starting, the worker reloads it from storage (an
    /// apply seen before this call has written its batch already, so the reload finds it).
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
        if !leading {
            self.clear();
        }
    }

    /// Adds a due delivery (with its command when its apply created it) and wakes the worker.
    pub fn push(&self, due_ms: i64, command_id: String, created: Option<Arc<CommandRecord>>) {
        if !self.leading.load(Ordering::SeqCst) {
            return;
        }
        let mut q = self.lock();
        if let Some(command) = created.filter(|_| q.created.len() < MAX_CREATED_HELD) {
            q.created.insert(command_id.clone(), command);
        }
        q.by_time.insert((due_ms, command_id));
        drop(q);
        self.wake.notify_one();
    }

    /// A delivery settled (cancelled by the customer's unlink, relink or rule deletion, or
    /// settled by another leader's attempt): its handed-over command is dropped, so its queue
    /// entry reads the outbox and finds it no longer pending.
    pub fn settled(&self, command_id: &str) {
        // Every replica applies every result: only the leader's queue holds hand-overs.
        if !self.leading.load(Ordering::SeqCst) {
            return;
        }
        let mut q = self.lock();
        if !q.created.is_empty() {
            q.created.remove(command_id);
        }
    }

    /// Adds many (a reload from storage).
    pub fn extend(&self, items: impl IntoIterator<Item = (i64, String)>) {
        self.lock().by_time.extend(items);
        self.wake.notify_one();
    }

    /// Removes and returns up to `max` deliveries due at `now_ms`, each with its command when
    /// its apply handed it over.
    pub fn pop_due(&self, now_ms: i64, max: usize) -> Vec<(String, Option<Arc<CommandRecord>>)> {
        let mut q = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            match q.by_time.first() {
                Some((due, _)) if *due <= now_ms => {
                    if let Some((_, id)) = q.by_time.pop_first() {
                        let created = q.created.remove(&id);
                        out.push((id, created));
                    }
                }
                _ => break,
            }
        }
        out
    }

    /// The earliest due time queued.
    pub fn next_due(&self) -> Option<i64> {
        self.lock().by_time.first().map(|(d, _)| *d)
    }

    /// Queued deliveries.
    pub fn len(&self) -> usize {
        self.lock().by_time.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().by_time.is_empty()
    }

    /// Empties the queue and marks it for a reload (snapshot installed).
    pub fn invalidate(&self) {
        self.clear();
        self.stale.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Empties the queue without waking the worker (it stops leading); the next leadership
    /// reloads it from storage.
    fn clear(&self) {
        let mut q = self.lock();
        q.by_time.clear();
        q.created.clear();
    }

    /// True (once) when the queue must be reloaded from storage.
    pub fn take_stale(&self) -> bool {
        self.stale.swap(false, Ordering::SeqCst)
    }

    /// Records that the worker is alive.
    pub fn beat(&self, now_ms: i64) {
        self.heartbeat_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the worker last went round its loop (0: never).
    pub fn last_beat(&self) -> i64 {
        self.heartbeat_ms.load(Ordering::Relaxed)
    }

    /// Wakes the worker (e.g. attempt slots became free).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until something is pushed or the queue is invalidated.
    pub async fn notified(&self) {
        self.wake.notified().await
    }
}

/// Delivery attempts under way in a group, from dispatch until their result is recorded,
/// with the (customer, target) of each once known, so an unlink is acknowledged only after no
/// attempt to the unlinked target is still sending.
#[derive(Default)]
pub struct InFlight {
    map: Mutex<Attempts>,
}

#[derive(Default)]
struct Attempts {
    by_id: HashMap<String, Attempt>,
    /// How many are still sending (not yet waiting for their result to be recorded).
    sending: usize,
}

struct Attempt {
    /// The (customer, target), once read.
    about: Option<(String, String)>,
    sending: bool,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Attempts> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking an attempt (its target not read yet); false when already in flight.
    pub fn insert(&self, command_id: &str) -> bool {
        let mut m = self.lock();
        if m.by_id.contains_key(command_id) {
            return false;
        }
        let attempt = Attempt {
            about: None,
            sending: true,
        };
        m.by_id.insert(command_id.to_owned(), attempt);
        m.sending += 1;
        true
    }

    /// Names the attempt's customer and target, before its link is checked.
    pub fn describe(&self, command_id: &str, customer: &str, target: &str) {
        if let Some(a) = self.lock().by_id.get_mut(command_id) {
            a.about = Some((customer.to_owned(), target.to_owned()));
        }
    }

    /// The attempt has sent (or given up): only its result is left to record. It no longer
    /// holds a sending slot, nor an unlink of its target.
    pub fn sent(&self, command_id: &str) {
        let mut m = self.lock();
        if let Some(a) = m.by_id.get_mut(command_id).filter(|a| a.sending) {
            a.sending = false;
            m.sending -= 1;
        }
    }

    /// The attempt is over (its result recorded, or dropped).
    pub fn remove(&self, command_id: &str) {
        let mut m = self.lock();
        if m.by_id.remove(command_id).is_some_and(|a| a.sending) {
            m.sending -= 1;
        }
    }

    /// Attempts under way, recording included.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Attempts still sending.
    pub fn sending(&self) -> usize {
        self.lock().sending
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.lock().by_id.is_empty()
    }

    fn busy_for(&self, customer: &str, target: Option<&str>) -> bool {
        self.lock().by_id.values().any(|a| {
            a.sending
                && match &a.about {
                    None => true,
                    Some((c, t)) => c == customer && target.is_none_or(|target| t == target),
                }
        })
    }

    /// Waits (at most `within`) until no attempt to `target` (any target: `None`) for
    /// `customer` is sending, nor one whose target is not known yet. False when the wait ran
    /// out.
    pub async fn wait_none(&self, customer: &str, target: Option<&str>, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while self.busy_for(customer, target) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// The routing index (entity, subject) -> customer for the subjects events arrive for, so an
/// event's route costs no RocksDB read once its subject has been seen.
pub type RouteCache = ReadCache<Option<String>>;
/// Most subjects a [`RouteCache`] holds.
const MAX_ROUTES: usize = 65_536;

/// The account a customer links at an entity (customer, entity) -> its subject, if linked,
/// for one data group: every delivery attempt asks, after it is registered in flight (so an
/// unlink whose apply this cache has not yet seen waits for it, as it would for a read of the
/// replica), and sends only a command addressed to that account.
pub type LinkCache = ReadCache<Option<String>>;
/// Most links a group's [`LinkCache`] holds.
const MAX_LINKS: usize = 65_536;

/// Hears about one group's applies: drops changed entities, routes and links from the
/// caches, feeds the group's due queue, wakes the intent worker and the cluster manager.
struct Observer {
    entities: Arc<EntityCache>,
    routes: Arc<RouteCache>,
    links: Arc<LinkCache>,
    due: Arc<DueQueue>,
    wake: Arc<Wakers>,
}

impl ApplyObserver for Observer {
    fn applied(&self, group: GroupId, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::EntityChanged(id) => self.entities.invalidate(Some(id)),
                Effect::SubjectChanged { entity_id, subject } => {
                    self.routes.invalidate(Some((entity_id, subject)))
                }
                Effect::LinkChanged {
                    customer_id,
                    entity_id,
                } => {
                    self.links.invalidate(Some((customer_id, entity_id)));
                    self.wake.profile_changes.changed(customer_id);
                }
                Effect::DeliveryDue {
                    command_id,
                    due_ms,
                    created,
                } => self.due.push(*due_ms, command_id.clone(), created.clone()),
                Effect::DeliverySettled(command_id) => self.due.settled(command_id),
                Effect::IntentAdded => self.wake.intents.notify_one(),
                Effect::ClusterChanged => {
                    self.wake.cluster_changed();
                }
                Effect::ModelChanged => {
                    self.wake.model_epoch.fetch_add(1, Ordering::SeqCst);
                }
                Effect::Erased => {
                    // A customer's links went with its data (rare: drop them all).
                    self.links.invalidate(None);
                    self.wake.profile_changes.all_changed();
                    self.wake.erased(group);
                }
                Effect::RuleChanged { customer_id } => {
                    self.wake.rule_changes.fetch_add(1, Ordering::Relaxed);
                    self.wake.profile_changes.changed(customer_id);
                }
                Effect::SnapshotInstalled { replaced_state } => {
                    self.wake.model_epoch.fetch_add(1, Ordering::SeqCst);
                    self.entities.invalidate(None);
                    self.routes.invalidate(None);
                    self.links.invalidate(None);
                    self.wake.profile_changes.all_changed();
                    self.due.invalidate();
                    self.wake.cluster_changed();
                    self.wake.intents.notify_one();
                    // The snapshot may stand for an erasure this replica never applied (it
                    // was down, and the log holding the erasure was purged): the state it
                    // replaced is deleted, but still in RocksDB's files until compacted. A
                    // new replica's first install replaced nothing.
                    if *replaced_state {
                        self.wake.erased(group);
                    }
                }
            }
        }
    }
}

/// Whether the placement gives `node` a replica of data group `group`: it names the node among
/// the group's voters, and the node is not removed (what the manager opens, and the only
/// replicas a peer's first message may open).
pub fn placed_on(
    nodes: &[custos_raft::records::NodeRecord],
    assignment: &custos_raft::records::Assignment,
    node: NodeId,
    group: GroupId,
) -> bool {
    let removed = nodes
        .iter()
        .any(|n| n.id == node && n.state == custos_raft::records::NodeState::Removed);
    !removed
        && assignment
            .groups
            .get(&group)
            .is_some_and(|voters| voters.contains(&node))
}

/// Wake-ups shared by every group's observer.
#[derive(Default)]
pub struct Wakers {
    /// The intent worker has steps to take.
    pub intents: Notify,
    /// The cluster manager should look again (nodes, placement, reports changed).
    pub cluster: Notify,
    /// Bumped on every cluster change (caches of meta records compare it).
    pub cluster_epoch: std::sync::atomic::AtomicU64,
    /// Bumped whenever this node's replica of the meta group may hold another recommendation
    /// model (one stored, a snapshot installed): the model served from memory is read again
    /// only then, not on every request (it is megabytes at scale).
    pub model_epoch: std::sync::atomic::AtomicU64,
    /// Groups where something was erased since the scrubber last ran, and its wake-up.
    pub erased_in: Mutex<BTreeSet<GroupId>>,
    /// The scrubber has groups to rewrite.
    pub scrub: Notify,
    /// Rules saved or deleted in the groups this node replicates, since it started.
    pub rule_changes: std::sync::atomic::AtomicU64,
    /// `rule_changes` when this node last started a training of the recommender.
    pub rule_changes_at_training: std::sync::atomic::AtomicU64,
    /// Which profiles applies changed (the profile actors' cached copies compare it).
    pub profile_changes: crate::profile::ProfileChanges,
}

impl Wakers {
    fn erased(&self, group: GroupId) {
        self.erased_in
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group);
        self.scrub.notify_one();
    }

    fn cluster_changed(&self) {
        self.cluster_epoch.fetch_add(1, Ordering::SeqCst);
        self.cluster.notify_waiters();
        self.cluster.notify_one();
    }
}

/// One Raft group this node holds a replica of.
pub struct Group {
    /// Its id.
    pub id: GroupId,
    /// The Raft handle.
    pub raft: Raft,
    /// Its proposer (batches changes into entries).
    pub proposer: Proposer,
    /// Reads of the local replica.
    pub reader: StateReader,
    /// What decides when the replica builds a snapshot.
    pub pacer: Arc<SnapshotPacer>,
    /// Pending deliveries (data groups, while this node leads).
    pub due: Arc<DueQueue>,
    /// Delivery attempts under way.
    pub in_flight: InFlight,
    /// The term this node leads the group in and when it first saw itself leading it.
    took_over: Mutex<Option<(u64, std::time::Instant)>>,
    /// Which customers link which entities, as the replica says.
    pub links: Arc<LinkCache>,
    /// Turns true when the group is closed on this node.
    pub stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("id", &self.id).finish()
    }
}

impl Group {
    /// The group's current Raft metrics.
    pub fn metrics(&self) -> openraft::RaftMetrics<NodeId, openraft::BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// True when node `me` leads the group: it is the leader this replica knows of and a
    /// voter of its membership (openraft 0.9 lets a leader that removed itself go on
    /// believing it leads; such a replica serves nothing).
    pub fn leads(&self, me: NodeId) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(me)
            && m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == me)
    }

    /// When node `me` took the group over, if it leads it now: a leader before it (another
    /// node, or this one before a restart) may still be sending a delivery attempt it
    /// started then. The time is when this node first saw itself leading in the current
    /// term, so it is never earlier than the election; the delivery worker asks as soon as it
    /// sees it.
    pub fn took_over_at(&self, me: NodeId) -> Option<std::time::Instant> {
        if !self.leads(me) {
            return None;
        }
        let term = self.raft.metrics().borrow().current_term;
        let mut took = self.took_over.lock().unwrap_or_else(|p| p.into_inner());
        match *took {
            Some((t, at)) if t == term => Some(at),
            _ => {
                let now = std::time::Instant::now();
                *took = Some((term, now));
                Some(now)
            }
        }
    }

    /// Whether this replica should build a snapshot now under `policy`.
    pub fn snapshot_due(&self, policy: &SnapshotPolicy) -> bool {
        let m = self.raft.metrics();
        let (applied, snapshot) = {
            let m = m.borrow();
            (m.last_applied.map(|l| l.index), m.snapshot.map(|l| l.index))
        };
        let entries = match (applied, snapshot) {
            (None, _) => 0,
            (Some(a), None) => a + 1,
            (Some(a), Some(s)) => a.saturating_sub(s),
        };
        self.pacer.due(policy, entries)
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Whether this replica has applied an entry of its current term. A leader's first entry
    /// of its term follows everything earlier leaders committed, and it applies its own
    /// entries before acknowledging them, so from then on its state machine holds every
    /// change acknowledged to anyone: what a profile needs when it is rebuilt, without a
    /// read-index round per rebuild.
    pub fn applied_own_term(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.last_applied
            .is_some_and(|l| l.leader_id.term == m.current_term)
    }
}

/// The shared parts of a node.
pub struct Core {
    /// The configuration it runs with.
    pub config: Arc<Config>,
    /// This node's id.
    pub node_id: NodeId,
    /// The node's RocksDB.
    pub db: Arc<DB>,
    /// The node's WAL syncer.
    pub wal: WalSyncer,
    /// The node's client for peers.
    pub peers: Peers,
    /// The guarded client for every request to an entity.
    pub outbound: crate::outbound::Outbound,
    /// Relays events to the leaders of groups this node does not lead, in batches.
    pub relay: crate::relay::EventRelay,
    /// Reverse proxies whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Opens the cluster's sealed token keys.
    cluster_secret: Arc<str>,
    /// The token key ring (loaded from the meta group on first use).
    seal: std::sync::OnceLock<Arc<KeyRing>>,
    /// The runtime Raft and the workers run on.
    pub rt: tokio::runtime::Handle,
    raft_config: Arc<openraft::Config>,
    groups: RwLock<BTreeMap<GroupId, Arc<Group>>>,
    /// Entities by id.
    pub entities: Arc<EntityCache>,
    /// The routing index's answers for the subjects events arrived for.
    pub routes: Arc<RouteCache>,
    /// Wake-ups from applies.
    pub wake: Arc<Wakers>,
    /// The shard map as last read from the meta group, with the cluster epoch it was read at.
    shard_map: RwLock<Option<(u64, Arc<ShardMap>)>>,
    /// Held while a replica is opened: two callers opening one group at once (the cluster
    /// manager and a peer's first message, at a restart) each replayed the log past what was
    /// applied into the same key space, engagement counts (merge operands) twice, and cleared
    /// files the other had made.
    opening: Arc<tokio::sync::Mutex<()>>,
    /// Told about every group opened (its workers are started).
    opened: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Arc<Group>>>>,
    /// Set when the node is stopping: no group is opened any more.
    closing: AtomicBool,
    /// Groups whose replica is being deleted: not opened again until their keys are gone, or
    /// a peer's request in between would open a Raft on a log the delete then wipes.
    deleting: Arc<Mutex<BTreeSet<GroupId>>>,
    /// Set once this node's replica of the meta group has applied what the meta leader had
    /// applied when the node started (`cluster::catch_up_meta`): until then an event the
    /// routing index names no customer for may be one a customer was already told is linked.
    meta_caught_up: AtomicBool,
}

/// Marks a group as being deleted for as long as it lives (see `Core::deleting`).
#[derive(Debug)]
struct DeletingMark {
    group: GroupId,
    set: Arc<Mutex<BTreeSet<GroupId>>>,
}

impl Drop for DeletingMark {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.group);
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// The answer to opening a group whose replica is being deleted (a peer retries).
fn deleting_refusal() -> ServiceError {
    ServiceError::refused(
        ErrorCode::Unavailable,
        "this node is deleting its replica of the group",
    )
}

/// How long a proposal waits for its outcome before the caller is told to retry.
fn propose_deadline(config: &Config) -> Duration {
    Duration::from_millis(config.raft.propose_timeout_ms)
}

/// The longest an unlink waits for delivery attempts already sending to the entity: one
/// attempt's timeout and a second to record it.
pub(crate) fn unlink_drain(config: &Config) -> Duration {
    Duration::from_secs_f64(config.delivery.timeout_secs + 1.0)
}

/// The longest an unlink's answer may take beyond its commit on the node that serves it:
/// `Core::settle` there (a takeover's drain, then its own attempts'), again on a node that
/// forwarded the proposal there, and the token revocations after it (two requests of at most
/// one delivery timeout each).
pub(crate) fn unlink_answer_bound(config: &Config) -> Duration {
    4 * unlink_drain(config) + 2 * Duration::from_secs_f64(config.delivery.timeout_secs)
}

/// The longest a linking's answer may take on the leader that makes it (an OAuth callback, or
/// a link through the API): its requests to the entity's provider (metadata, the code
/// exchange, keys or userinfo, and revoking a grant it replaces: at most six, of one outbound
/// timeout each) and its proposals (the state taken, the claim's three steps, a recommended
/// rule: five commit deadlines). A node forwarding one waits that long before it answers 503,
/// which would send the customer to retry a linking whose state is already spent.
pub(crate) fn link_answer_bound(config: &Config) -> Duration {
    6 * Duration::from_secs_f64(config.delivery.timeout_secs) + 5 * propose_deadline(config)
}

impl Core {
    /// The shared parts, holding no group yet.
    // Each argument is a separate thing the server opened or read; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        node_id: NodeId,
        db: Arc<DB>,
        peers: Peers,
        outbound: crate::outbound::Outbound,
        cluster_secret: &str,
        rt: tokio::runtime::Handle,
        raft_config: openraft::Config,
    ) -> Self {
        Core {
            trusted_proxies: config.trusted_proxy_nets(),
            outbound,
            cluster_secret: cluster_secret.into(),
            seal: std::sync::OnceLock::new(),
            node_id,
            wal: WalSyncer::start(&db),
            db,
            relay: crate::relay::EventRelay::new(
                peers.clone(),
                rt.clone(),
                crate::forward::forward_deadline(&config),
            ),
            peers,
            rt,
            raft_config: Arc::new(raft_config),
            groups: RwLock::new(BTreeMap::new()),
            entities: Arc::new(EntityCache::default()),
            routes: Arc::new(RouteCache::new(MAX_ROUTES)),
            wake: Arc::new(Wakers::default()),
            shard_map: RwLock::new(None),
            opened: Mutex::new(None),
            opening: Arc::new(tokio::sync::Mutex::new(())),
            closing: AtomicBool::new(false),
            deleting: Arc::default(),
            meta_caught_up: AtomicBool::new(false),
            config,
        }
    }

    /// Whether this node's replica of the meta group has caught up since it started.
    pub fn meta_caught_up(&self) -> bool {
        self.meta_caught_up.load(Ordering::Acquire)
    }

    /// Marks this node's replica of the meta group as caught up.
    pub fn set_meta_caught_up(&self) {
        self.meta_caught_up.store(true, Ordering::Release);
    }

    /// Sends every group opened from now on to `tx` (to start its workers).
    pub fn on_open(&self, tx: tokio::sync::mpsc::UnboundedSender<Arc<Group>>) {
        *self.opened.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Marks the node as stopping.
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// True once the node is stopping.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    // ---- groups ---------------------------------------------------------------------------

    /// The local replica of `group`, if this node holds one.
    pub fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// Every local replica.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The local meta group replica (every node holds one).
    pub fn meta(&self) -> Result<Arc<Group>, ServiceError> {
        self.group(META_GROUP).ok_or_else(|| {
            ServiceError::refused(
                ErrorCode::Unavailable,
                "this node has not joined a cluster yet",
            )
        })
    }

    /// Whether this node may hold a replica of `group`, by its meta replica: the meta group
    /// always; a data group when the placement names this node among its voters and the node
    /// is not removed (or before the cluster has a placement).
    pub async fn placed_here(&self, group: GroupId) -> bool {
        if group == META_GROUP {
            return true;
        }
        let me = self.node_id;
        let read = self
            .read_meta(move |r| {
                Ok(match r.assignment()? {
                    Some(a) => placed_on(&r.nodes()?, &a, me, group),
                    None => true,
                })
            })
            .await;
        read.unwrap_or(false)
    }

    /// Opens this node's replica of `group` (existing state or empty), or answers the open
    /// one. Runs Raft on the node's Raft runtime.
    pub async fn open_group(&self, group: GroupId) -> Result<Arc<Group>, ServiceError> {
        if let Some(g) = self.group(group) {
            return Ok(g);
        }
        let one = self.opening.clone().lock_owned().await;
        if let Some(g) = self.group(group) {
            return Ok(g);
        }
        if self.is_closing() {
            return Err(ServiceError::refused(
                ErrorCode::Unavailable,
                "the node is stopping",
            ));
        }
        if self.is_deleting(group) {
            return Err(deleting_refusal());
        }
        let due = Arc::new(DueQueue::default());
        let links = Arc::new(LinkCache::new(MAX_LINKS));
        let observer = Arc::new(Observer {
            entities: self.entities.clone(),
            routes: self.routes.clone(),
            links: links.clone(),
            due: due.clone(),
            wake: self.wake.clone(),
        });
        let sm = StateMachineStore::new(
            self.db.clone(),
            group,
            observer,
            self.config.data_dir.join("snapshots"),
        )?;
        let pacer = sm.pacer();
        let log = LogStore::new(self.db.clone(), group, self.wal.clone()).paced_by(pacer.clone());
        let reader = sm.reader();
        let network = PeerNetwork::new(group, self.peers.clone());
        let (node_id, rc) = (self.node_id, self.raft_config.clone());
        let limits = ProposerLimits {
            queue: self.config.raft.proposal_queue,
            ..ProposerLimits::default()
        };
        // The lock travels with the new Raft and comes back with it: a caller that gave up
        // meanwhile (a peer's request dropped) leaves a Raft nobody would keep, which is shut
        // down before the next open may begin.
        let (made, made_rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(async move {
            let built = match Raft::new(node_id, rc, network, log, sm).await {
                Ok(raft) => {
                    let proposer = Proposer::spawn(raft.clone(), limits);
                    Ok((raft, proposer))
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err((Ok((raft, _)), one)) = made.send((built, one)) {
                let _ = raft.shutdown().await;
                drop(one);
            }
        });
        let (built, _one) = made_rx
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let (raft, proposer) = built.map_err(ServiceError::Raft)?;
        let (stop, _) = watch::channel(false);
        let g = Arc::new(Group {
            id: group,
            raft,
            proposer,
            reader,
            pacer,
            due,
            in_flight: InFlight::default(),
            took_over: Mutex::new(None),
            links,
            stop,
        });
        // Opens are one at a time, so nobody else opened it meanwhile; a delete that began
        // while ours was being built wins (checked under the lock it marks under).
        let refused = {
            let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
            match groups.get(&group) {
                Some(existing) => Some(Ok(existing.clone())),
                None if self.is_deleting(group) => Some(Err(deleting_refusal())),
                None => {
                    groups.insert(group, g.clone());
                    None
                }
            }
        };
        if let Some(answer) = refused {
            let extra = g.raft.clone();
            let _ = self.rt.spawn(async move { extra.shutdown().await }).await;
            return answer;
        }
        if let Some(tx) = &*self.opened.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(g.clone());
        }
        self.wake.cluster_changed();
        Ok(g)
    }

    /// Stops this node's replica of `group`; with `destroy`, deletes its data too (the group's
    /// leader removed this node from it). The group is not opened again until the delete is
    /// done.
    pub async fn close_group(&self, group: GroupId, destroy: bool) -> Result<(), ServiceError> {
        let (removed, mark) = self.detach_group(group, destroy);
        self.finish_close(group, removed, mark).await
    }

    /// Takes `group` out of the node's map; with `destroy`, marks it as being deleted under
    /// the same lock `open_group` inserts under, so no open slips in between. No mark when a
    /// delete of it is already under way: that one deletes it, and ends the mark when done.
    fn detach_group(
        &self,
        group: GroupId,
        destroy: bool,
    ) -> (Option<Arc<Group>>, Option<DeletingMark>) {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        let first = destroy
            && self
                .deleting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(group);
        let mark = first.then(|| DeletingMark {
            group,
            set: self.deleting.clone(),
        });
        (groups.remove(&group), mark)
    }

    /// Stops a detached replica's Raft, then deletes its keys if marked; the mark goes with
    /// the delete (which runs to its end even if this future is dropped).
    async fn finish_close(
        &self,
        group: GroupId,
        removed: Option<Arc<Group>>,
        mark: Option<DeletingMark>,
    ) -> Result<(), ServiceError> {
        if let Some(g) = removed {
            let _ = g.stop.send(true);
            let raft = g.raft.clone();
            let _ = self.rt.spawn(async move { raft.shutdown().await }).await;
        }
        if let Some(mark) = mark {
            let db = self.db.clone();
            let snapshots = self.config.data_dir.join("snapshots");
            tokio::task::spawn_blocking(move || {
                let deleted = custos_raft::destroy_group(&db, group, &snapshots);
                drop(mark);
                deleted
            })
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
        }
        Ok(())
    }

    fn is_deleting(&self, group: GroupId) -> bool {
        self.deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&group)
    }

    /// Stops every group (node shutdown).
    pub async fn close_all(&self) {
        let all: Vec<Arc<Group>> =
            std::mem::take(&mut *self.groups.write().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        for g in all {
            let _ = g.stop.send(true);
            let raft = g.raft.clone();
            let _ = self.rt.spawn(async move { raft.shutdown().await }).await;
        }
    }

    /// The groups whose state this node's RocksDB holds (to reopen at start).
    pub fn stored_groups(&self) -> Result<Vec<GroupId>, StoreError> {
        let mut found = Vec::new();
        let mut it = self.db.raw_iterator_opt(custos_raft::keys::total_order());
        let mut next: u64 = 0;
        while next <= u64::from(custos_raft::keys::SPACE_BIT - 1) {
            it.seek((next as u32).to_be_bytes());
            let Some(k) = it.key() else { break };
            let Some(prefix) = k.get(..4) else { break };
            let g = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
            let group = g & !custos_raft::keys::SPACE_BIT;
            if g & custos_raft::keys::SPACE_BIT != 0 {
                break;
            }
            // A group exists where Raft kept a vote or log.
            let vote = custos_raft::keys::key(group, custos_raft::keys::RAFT_META, b"vote");
            let has_log = {
                let p = custos_raft::keys::prefix(group, custos_raft::keys::LOG);
                let mut li = self.db.raw_iterator_opt(custos_raft::keys::total_order());
                li.seek(&p);
                li.key().is_some_and(|lk| lk.starts_with(&p))
            };
            if self.db.get_pinned(vote)?.is_some() || has_log {
                found.push(group);
            }
            next = u64::from(g) + 1;
        }
        it.status()?;
        Ok(found)
    }

    /// True while this node leads `group`.
    pub fn is_leader(&self, group: GroupId) -> bool {
        self.group(group).is_some_and(|g| g.leads(self.node_id))
    }

    // ---- the meta group's view --------------------------------------------------------------

    /// Reads the local meta replica (every node holds one) on a blocking thread.
    pub async fn read_meta<T, F>(&self, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&StateReader) -> Result<T, StoreError> + Send + 'static,
    {
        self.read(META_GROUP, f).await
    }

    /// The cluster's settings, once it is initialised.
    pub async fn settings(&self) -> Result<ClusterSettings, ServiceError> {
        self.read_meta(|r| r.settings()).await?.ok_or_else(|| {
            ServiceError::refused(ErrorCode::Unavailable, "the cluster is not initialised yet")
        })
    }

    /// The shard map (cached until the meta group changes).
    pub fn shard_map(&self) -> Result<Arc<ShardMap>, ServiceError> {
        let epoch = self.wake.cluster_epoch.load(Ordering::SeqCst);
        if let Some((e, m)) = &*self.shard_map.read().unwrap_or_else(|p| p.into_inner()) {
            if *e == epoch {
                return Ok(m.clone());
            }
        }
        let settings = self.meta()?.reader.settings()?.ok_or_else(|| {
            ServiceError::refused(ErrorCode::Unavailable, "the cluster is not initialised yet")
        })?;
        let map = Arc::new(settings.shard_map);
        *self.shard_map.write().unwrap_or_else(|p| p.into_inner()) = Some((epoch, map.clone()));
        Ok(map)
    }

    /// The data group holding `customer`.
    pub fn group_of(&self, customer: &str) -> Result<GroupId, ServiceError> {
        Ok(self.shard_map()?.group_of(customer))
    }

    /// The data group owning `slot`.
    pub fn group_of_slot(&self, slot: u16) -> Result<GroupId, ServiceError> {
        Ok(self.shard_map()?.group_of_slot(slot))
    }

    /// Every data group.
    pub fn data_groups(&self) -> Result<Vec<GroupId>, ServiceError> {
        Ok((1..=self.shard_map()?.data_groups()).collect())
    }

    /// Where an event from `source` about `subject` goes: its customer (by the routing index,
    /// a hint its data group re-checks) and that customer's group; without a customer, the
    /// group of (source, subject), where it is recorded as ignored.
    pub fn route_event(
        &self,
        source: &str,
        subject: &str,
    ) -> Result<(Option<String>, GroupId), ServiceError> {
        let meta = self.meta()?;
        // Only routes to a customer are kept: this runs before the event's signature is
        // checked, and subjects nobody claims, which anyone can send, would otherwise fill the
        // cache and empty it of the routes events use (claims bound what is kept).
        let customer = self.routes.get_or_read_keeping(
            source,
            subject,
            || meta.reader.customer_for_subject(source, subject),
            Option::is_some,
        )?;
        if customer.is_none() && !self.meta_caught_up() {
            // Recorded as ignored, the event would be lost for good (a retry is a duplicate):
            // the entity retries once this replica has caught up.
            return Err(ServiceError::refused(
                ErrorCode::Unavailable,
                "this node is catching up on the routing index after starting; retry",
            ));
        }
        let group = match &customer {
            Some(c) => self.group_of(c)?,
            None => self.shard_map()?.group_of(&format!("{source}\0{subject}")),
        };
        Ok((customer, group))
    }

    /// The customer claiming `subject` at `source` as the meta group's leader has it, after a
    /// read index round there: what this node's replica may not show yet (a claim the leader
    /// applied, and so acknowledged, that has not reached this replica). An event is recorded
    /// as ignored only on this answer: recorded, it is ignored for good (a retry is a
    /// duplicate), though its customer may have linked the subject a moment before.
    pub async fn confirmed_claim(
        &self,
        source: &str,
        subject: &str,
    ) -> Result<Option<String>, ServiceError> {
        let query = crate::cluster::wire::GroupQuery::SubjectClaim {
            entity_id: source.to_owned(),
            subject: subject.to_owned(),
        };
        let unconfirmed = |why: String| {
            ServiceError::refused(
                ErrorCode::Unavailable,
                format!("the routing index could not be confirmed with the cluster ({why}); retry"),
            )
        };
        // Bounded like a proposal: a leader this node cannot reach would hold the event's
        // answer for the peer call's whole timeout.
        let asked = tokio::time::timeout(
            propose_deadline(&self.config),
            crate::peer::ask_group(self, META_GROUP, query),
        )
        .await;
        match asked {
            Ok(Ok(crate::cluster::wire::GroupAnswer::SubjectClaim(claim))) => Ok(claim),
            Ok(Ok(crate::cluster::wire::GroupAnswer::Refused(why))) => Err(unconfirmed(why)),
            Ok(Ok(_)) => Err(unconfirmed("an unexpected answer".into())),
            Ok(Err(why)) => Err(unconfirmed(why)),
            Err(_) => Err(unconfirmed(
                "the meta group's leader did not answer in time".into(),
            )),
        }
    }

    /// The leader of `group` and its peer address, as this node knows them: from its own
    /// replica when it holds one, else from the leader's last report in the meta group.
    pub fn leader_of(&self, group: GroupId) -> Option<(NodeId, String)> {
        if let Some(g) = self.group(group) {
            let m = g.metrics();
            if let Some(l) = m.current_leader {
                if let Some(n) = m.membership_config.membership().get_node(&l) {
                    return Some((l, n.addr.clone()));
                }
                if let Some(addr) = self.node_addr(l) {
                    return Some((l, addr));
                }
            }
            if group == META_GROUP {
                return None;
            }
        }
        let meta = self.group(META_GROUP)?;
        let report: GroupReport = meta
            .reader
            .group_reports()
            .ok()?
            .into_iter()
            .find(|r| r.group == group)?;
        // A report naming this node, which does not lead the group here, is stale (the
        // group moved, or leadership did): better unknown, and asked again shortly.
        if report.leader == self.node_id {
            return None;
        }
        Some((report.leader, self.node_addr(report.leader)?))
    }

    /// A node's peer address, from the meta group.
    pub fn node_addr(&self, node: NodeId) -> Option<String> {
        self.node_record(node).map(|n| n.peer_addr)
    }

    /// A node's record, from the meta group.
    pub fn node_record(&self, node: NodeId) -> Option<NodeRecord> {
        let meta = self.group(META_GROUP)?;
        meta.reader.nodes().ok()?.into_iter().find(|n| n.id == node)
    }

    // ---- proposals and reads -----------------------------------------------------------------

    /// Proposes a change to `group` and waits until it is committed and applied on the
    /// group's leader: here when this node leads, else forwarded to the leader over the peer
    /// port. Bounded: a few leader changes, then 503 with Retry-After.
    pub async fn propose(
        &self,
        group: GroupId,
        change: StateChange,
    ) -> Result<ChangeOutcome, ServiceError> {
        self.propose_via(group, change, true).await
    }

    /// Proposes an event's plan, made here from this node's copy of the customer's profile:
    /// only to this node's replica, never forwarded. A node that lost the lead while it
    /// planned may not hold what the new leader acknowledged meanwhile (a rule saved, a target
    /// linked there), and the apply can only drop commands a plan names, not add those it
    /// misses: forwarded, such a plan recorded the event as ignored for good (its retries were
    /// duplicates). Answered 503 instead: the entity sends it again, to be planned afresh.
    pub async fn propose_planned(
        &self,
        group: GroupId,
        change: StateChange,
    ) -> Result<ChangeOutcome, ServiceError> {
        self.propose_via(group, change, false).await
    }

    async fn propose_via(
        &self,
        group: GroupId,
        change: StateChange,
        forward: bool,
    ) -> Result<ChangeOutcome, ServiceError> {
        let moved = || {
            ServiceError::refused(
                ErrorCode::Unavailable,
                format!(
                    "group {group}'s leadership moved while the event was planned; send it again"
                ),
            )
        };
        let deadline = propose_deadline(&self.config);
        let started = std::time::Instant::now();
        let mut hint: Option<(NodeId, Option<String>)> = None;
        for attempt in 0..6u32 {
            if attempt > 0 {
                if started.elapsed() > deadline {
                    break;
                }
                // A leader is being elected: give it a moment.
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            let local = self.group(group);
            let leader = hint
                .take()
                .or_else(|| self.leader_of(group).map(|(id, a)| (id, Some(a))));
            let result = match (local, leader) {
                (Some(g), None) => self.propose_here(&g, &change, deadline).await,
                (Some(g), Some((id, _))) if id == self.node_id => {
                    self.propose_here(&g, &change, deadline).await
                }
                (_, Some(_)) if !forward => return Err(moved()),
                (local, Some((id, addr))) => match addr.or_else(|| self.node_addr(id)) {
                    Some(addr) => {
                        // The leader that committed it waited for its own attempts; this
                        // node may have led the group until moments ago, and attempts its
                        // worker started then may still be sending.
                        let result = self.propose_remote(&addr, group, &change, deadline).await;
                        if let (Ok(_), Some(g)) = (&result, &local) {
                            self.settle(g, &change).await;
                        }
                        result
                    }
                    None => Err(ProposeError::NotLeader {
                        leader: None,
                        addr: None,
                    }),
                },
                (None, None) => Err(ProposeError::NotLeader {
                    leader: None,
                    addr: None,
                }),
            };
            match result {
                Ok(outcome) => return outcome_result(outcome),
                Err(ProposeError::NotLeader { .. }) if !forward => return Err(moved()),
                Err(ProposeError::NotLeader { leader, addr }) => {
                    if leader.is_some_and(|l| l != self.node_id) {
                        hint = leader.map(|l| (l, addr));
                    }
                }
                Err(ProposeError::Overloaded) => {
                    return Err(ServiceError::refused(
                        ErrorCode::Overloaded,
                        format!("group {group} has too many changes queued; retry shortly"),
                    ))
                }
                Err(ProposeError::Timeout(d)) => {
                    return Err(ServiceError::refused(
                        ErrorCode::Unavailable,
                        format!("group {group} did not commit within {d:?} (no quorum?); the change may still be applied, retry"),
                    ))
                }
                Err(ProposeError::AnswerLost(e)) => {
                    return Err(ServiceError::refused(
                        ErrorCode::Unavailable,
                        format!("group {group}'s leader did not answer ({e}); the change may still be applied, retry"),
                    ))
                }
                Err(ProposeError::Stopped(e)) => {
                    tracing::debug!(group, error = %e, "proposal failed; retrying");
                }
            }
        }
        Err(ServiceError::refused(
            ErrorCode::Unavailable,
            format!("group {group} has no reachable leader right now; retry shortly"),
        ))
    }

    /// Proposes `change` to this node's replica of a group (its proposer answers
    /// `NotLeader` unless this node leads it), then waits for what the change settles here
    /// ([`Core::settle`]).
    pub async fn propose_here(
        &self,
        g: &Group,
        change: &StateChange,
        deadline: Duration,
    ) -> Result<ChangeOutcome, ProposeError> {
        let outcome = g.proposer.propose(change.clone(), deadline).await?;
        self.settle(g, change).await;
        Ok(outcome)
    }

    /// What a proposed change waits for on this node before it is answered: an unlink (an
    /// erasure: for every target of the customer), until
    /// one drain has passed since this node took the group over (if it leads it: the
    /// attempts of the leader before it are not in its books) and then until no delivery
    /// attempt this node's worker started to the entity for the customer is still sending
    /// (at most one attempt's timeout each). It runs on the leader that committed the unlink
    /// and, when another node forwarded it there, on that node too: leadership moved between
    /// the two, and either worker may have an attempt under way. No attempt started after
    /// the apply sends (each checks the link first).
    async fn settle(&self, g: &Group, change: &StateChange) {
        // Whatever the outcome: an unlink refused as not linked may be a retry of one that
        // was committed while its answer was lost, with attempts still sending. An erasure
        // ends every link of the customer at once.
        let (customer_id, entity_id) = match change {
            StateChange::Unlink {
                customer_id,
                entity_id,
                ..
            } => (customer_id, Some(entity_id.as_str())),
            StateChange::EraseCustomer { customer_id } => (customer_id, None),
            _ => return,
        };
        let drain = unlink_drain(&self.config);
        // A leader this node took over from confirmed its leadership before each batch of
        // attempts it started, and started none more than a second after (delivery's
        // CONFIRMED_FOR), so nothing it started is still sending one drain after the
        // election; its attempts are not in this node's `in_flight`.
        if let Some(took_over) = g.took_over_at(self.node_id) {
            tokio::time::sleep_until((took_over + drain).into()).await;
        }
        if !g.in_flight.wait_none(customer_id, entity_id, drain).await {
            tracing::warn!(customer = %customer_id, entity = ?entity_id, "a delivery attempt outlived the wait");
        }
    }

    async fn propose_remote(
        &self,
        addr: &str,
        group: GroupId,
        change: &StateChange,
        deadline: Duration,
    ) -> Result<ChangeOutcome, ProposeError> {
        let body = codec::encode(change).map_err(|e| ProposeError::Stopped(e.to_string()))?;
        // The leader answers an unlink only after its own in-flight attempts drained, and
        // those of a leader it took over from (`Core::settle`).
        let settle = match change {
            StateChange::Unlink { .. } | StateChange::EraseCustomer { .. } => {
                2 * unlink_drain(&self.config)
            }
            _ => Duration::ZERO,
        };
        let resp = self
            .peers
            .post(addr, &format!("/peer/propose/{group}"))
            .timeout(deadline + settle + Duration::from_secs(1))
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // Only a connection never made is safe to propose again elsewhere: once the
                // request was sent, the leader may have committed it (a change such as an
                // unlink or a replay applied twice answers "not found" or "conflict").
                if e.is_connect() {
                    ProposeError::Stopped(format!("peer {addr}: {e}"))
                } else {
                    ProposeError::AnswerLost(format!("peer {addr}: {e}"))
                }
            })?;
        if resp.status().is_server_error() {
            // Perhaps after proposing it (an answer that could not be encoded, a proxy).
            return Err(ProposeError::AnswerLost(format!(
                "peer {addr} answered {}",
                resp.status()
            )));
        }
        if !resp.status().is_success() {
            // The peer refused the request before proposing it (authentication, decoding, no
            // replica of the group).
            return Err(ProposeError::Stopped(format!(
                "peer {addr} answered {}",
                resp.status()
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ProposeError::AnswerLost(format!("peer {addr}: {e}")))?;
        codec::decode::<Result<ChangeOutcome, ProposeError>>(&bytes)
            .map_err(|e| ProposeError::AnswerLost(format!("peer {addr}: {e}")))?
    }

    /// Runs a read of the local replica of `group` on a blocking thread (RocksDB calls block).
    pub async fn read<T, F>(&self, group: GroupId, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&StateReader) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = self.replica(group)?.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
            .map_err(ServiceError::from)
    }

    /// Reads the local replica of `group` on the calling thread, for bounded reads of a few
    /// adjacent keys on the event path (as the route lookup before it): there a trip to the
    /// blocking pool costs more than the read.
    pub fn read_here<T>(
        &self,
        group: GroupId,
        f: impl FnOnce(&StateReader) -> Result<T, StoreError>,
    ) -> Result<T, ServiceError> {
        f(&self.replica(group)?.reader).map_err(ServiceError::from)
    }

    /// This node's replica of `group`, or a retryable refusal.
    fn replica(&self, group: GroupId) -> Result<Arc<Group>, ServiceError> {
        self.group(group).ok_or_else(|| {
            ServiceError::refused(
                ErrorCode::Unavailable,
                format!("this node holds no replica of group {group}; retry"),
            )
        })
    }

    /// Like [`Core::read`], after making sure this node leads `group` and has applied
    /// everything committed before the read (a read index round), so the read is linearizable.
    pub async fn read_leader<T, F>(&self, group: GroupId, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&StateReader) -> Result<T, StoreError> + Send + 'static,
    {
        self.ensure_leader(group).await?;
        self.read(group, f).await
    }

    /// Waits until this node, as `group`'s leader, has applied everything committed.
    pub async fn ensure_leader(&self, group: GroupId) -> Result<(), ServiceError> {
        let g = self.group(group).ok_or_else(|| not_leader(group))?;
        let raft = g.raft.clone();
        let deadline = propose_deadline(&self.config);
        match tokio::time::timeout(deadline, raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(not_leader(group)),
            Err(_) => Err(ServiceError::refused(
                ErrorCode::Unavailable,
                format!("group {group} has no quorum right now; retry"),
            )),
        }
    }

    /// The cluster's token key ring: it seals access tokens and signing secrets.
    pub async fn key_ring(&self) -> Result<Arc<KeyRing>, ServiceError> {
        if let Some(k) = self.seal.get() {
            return Ok(k.clone());
        }
        let ring = crate::cluster::token_keys(self, &self.config, &self.cluster_secret)
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(self.seal.get_or_init(|| Arc::new(ring)).clone())
    }

    /// An entity, from the cache or the meta group.
    pub async fn entity(&self, id: &str) -> Result<Option<Arc<CachedEntity>>, ServiceError> {
        let (generation, cached) = self.entities.get_cached(id);
        if cached.is_some() {
            return Ok(cached);
        }
        let owned = id.to_owned();
        let record = self.read_meta(move |r| r.entity(&owned)).await?;
        let ring = self.key_ring().await?;
        Ok(record.map(|rec| {
            let e = Arc::new(CachedEntity::new(rec, &ring));
            self.entities.insert_if_current(generation, e.clone());
            e
        }))
    }

    /// An entity a request body names: 422 unknown_entity when there is none (the resource
    /// the request addresses exists; what it refers to does not).
    pub async fn entity_named(&self, id: &str) -> Result<Arc<CachedEntity>, ServiceError> {
        self.entity(id).await?.ok_or_else(|| {
            ServiceError::refused(
                ErrorCode::UnknownEntity,
                format!("no entity {id} is registered"),
            )
        })
    }

    /// An entity that must exist.
    pub async fn entity_required(&self, id: &str) -> Result<Arc<CachedEntity>, ServiceError> {
        self.entity(id)
            .await?
            .ok_or_else(|| ServiceError::not_found("entity", id))
    }

    /// The active and leaving nodes, and the meta group's current membership (voters,
    /// learners), as this node's meta replica knows them.
    pub fn meta_membership(&self) -> Option<(BTreeSet<NodeId>, BTreeSet<NodeId>)> {
        let m = self.group(META_GROUP)?.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        Some((voters, learners))
    }
}

/// The error for a request that reached a node not leading the group it needs.
pub fn not_leader(group: GroupId) -> ServiceError {
    ServiceError::refused(
        ErrorCode::Unavailable,
        format!("this node does not lead group {group} (leadership is moving); retry"),
    )
}

fn outcome_result(outcome: ChangeOutcome) -> Result<ChangeOutcome, ServiceError> {
    match outcome {
        ChangeOutcome::Rejected { code, detail } => Err(ServiceError::refused(code, detail)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(id: &str) -> Arc<CommandRecord> {
        Arc::new(CommandRecord {
            id: id.into(),
            customer_id: "c".into(),
            target: "hotel".into(),
            command_type: "room.hold".into(),
            subject: "guest".into(),
            data_json: "{}".into(),
            event_id: "e".into(),
            event_source: "airline".into(),
            rule_id: "r".into(),
            created_ms: 1,
        })
    }

    #[test]
    fn a_follower_keeps_no_queue_and_a_leader_gets_created_commands_once() {
        let due = DueQueue::default();
        due.push(1, "cmd_a".into(), Some(command("cmd_a")));
        assert!(due.is_empty(), "not leading: nothing kept");
        due.set_leading(true);
        due.push(1, "cmd_a".into(), Some(command("cmd_a")));
        due.push(2, "cmd_b".into(), None);
        // A reload from storage queues the same delivery again: still one entry.
        due.extend([(1, "cmd_a".to_owned())]);
        assert_eq!(due.len(), 2);
        let popped = due.pop_due(5, 10);
        assert_eq!(popped.len(), 2);
        let (id, created) = &popped[0];
        assert_eq!(id, "cmd_a");
        let created = created.as_ref().map(|c| c.id.as_str());
        assert_eq!(created, Some("cmd_a"));
        assert!(popped[1].1.is_none(), "a retry or reload reads the store");
        // Queued again (e.g. requeued): the command is not handed over twice.
        due.push(3, "cmd_a".into(), None);
        assert!(due.pop_due(5, 10)[0].1.is_none());
        // Settled before its first attempt (the customer deleted its rule, say): the attempt
        // is not given the command, so it reads the outbox and finds it settled.
        due.push(1, "cmd_d".into(), Some(command("cmd_d")));
        due.settled("cmd_d");
        assert!(due.pop_due(5, 10)[0].1.is_none());
        due.push(1, "cmd_c".into(), Some(command("cmd_c")));
        due.set_leading(false);
        assert!(due.is_empty() && due.pop_due(5, 10).is_empty());
    }

    #[tokio::test]
    async fn an_attempt_that_has_sent_holds_neither_a_slot_nor_an_unlink() {
        let f = InFlight::default();
        assert!(f.insert("cmd_a") && f.insert("cmd_b"));
        assert!(!f.insert("cmd_a"), "one attempt per command at a time");
        assert_eq!(f.sending(), 2);
        // cmd_b's target is not known yet: it could be the hotel.
        let short = Duration::from_millis(30);
        assert!(!f.wait_none("c", Some("hotel"), short).await);
        f.describe("cmd_a", "c", "hotel");
        f.describe("cmd_b", "c", "bank");
        assert!(!f.wait_none("c", Some("hotel"), short).await);
        assert!(f.wait_none("c", Some("spa"), short).await);
        f.sent("cmd_a");
        f.sent("cmd_a");
        assert_eq!((f.sending(), f.len()), (1, 2), "recording still");
        assert!(f.wait_none("c", Some("hotel"), short).await);
        // An erasure waits for every target of the customer, and for no other customer's.
        assert!(!f.wait_none("c", None, short).await, "bank still sending");
        assert!(f.wait_none("d", None, short).await);
        assert!(
            !f.insert("cmd_a"),
            "not attempted again before its result is recorded"
        );
        f.remove("cmd_a");
        f.remove("cmd_b");
        assert_eq!((f.sending(), f.len()), (0, 0));
    }

    /// A node on an empty store in `dir`, in no cluster, with no peer reachable.
    fn lone_core(dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> Core {
        let config = Arc::new(Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        });
        let db =
            custos_raft::open_db(&dir.join("db"), custos_raft::DbOptions::default()).expect("db");
        let peers = Peers::new("token".into(), None).expect("peers");
        let outbound =
            crate::outbound::Outbound::new(Duration::from_secs(1), false, 1).expect("client");
        let raft_config = crate::server::raft_config(&config).expect("raft config");
        Core::new(
            config,
            1,
            db,
            peers,
            outbound,
            "secret",
            rt.handle().clone(),
            raft_config,
        )
    }

    #[test]
    fn a_replica_being_deleted_is_not_reopened_before_its_keys_are_gone() {
        let dir = tempfile::tempdir().expect("dir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let core = lone_core(dir.path(), &rt);
        rt.block_on(async {
            let g = core.open_group(7).await.expect("open");
            let me = openraft::BasicNode {
                addr: "127.0.0.1:9".into(),
            };
            g.raft
                .initialize(BTreeMap::from([(1, me)]))
                .await
                .expect("initialize");
            g.raft
                .wait(Some(Duration::from_secs(10)))
                .metrics(|m| m.current_leader == Some(1), "leads")
                .await
                .expect("leads");
            assert_eq!(core.stored_groups().expect("stored"), vec![7]);

            let (removed, mark) = core.detach_group(7, true);
            assert!(removed.is_some() && core.group(7).is_none());
            let (again, second) = core.detach_group(7, true);
            assert!(again.is_none() && second.is_none(), "one delete at a time");
            // A peer's request in this window must not open a Raft on the log about to go.
            match core.open_group(7).await {
                Err(ServiceError::Refused { code, .. }) => {
                    assert_eq!(code, ErrorCode::Unavailable);
                }
                other => panic!("opened while deleting: {other:?}"),
            }
            assert!(core.group(7).is_none());
            core.finish_close(7, removed, mark).await.expect("deleted");
            assert!(core.stored_groups().expect("stored").is_empty());
            // Deleted: it opens again, empty, as for a node the group takes back.
            let g = core.open_group(7).await.expect("reopened");
            assert!(!g.raft.is_initialized().await.expect("asked"));
            core.close_all().await;
        });
    }

    #[test]
    fn created_commands_held_are_bounded() {
        let due = DueQueue::default();
        due.set_leading(true);
        for i in 0..MAX_CREATED_HELD + 10 {
            let id = format!("cmd_{i}");
            due.push(1, id.clone(), Some(command(&id)));
        }
        let popped = due.pop_due(5, usize::MAX);
        assert_eq!(popped.len(), MAX_CREATED_HELD + 10, "every delivery queued");
        let held = popped.iter().filter(|(_, c)| c.is_some()).count();
        assert_eq!(held, MAX_CREATED_HELD);
    }
}
