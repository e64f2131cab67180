//! Customer profile actors: one actix actor per active customer, owning its links and
//! compiled rules, activated on its first message and passivated when idle.
//!
//! A [`ProfileHost`] per arbiter keeps the actors of the customers that hash to it. A profile
//! handles one message at a time (its Raft proposal included), so its cached links and rules
//! always equal what it last committed, and it reads them again once an apply changed them
//! otherwise ([`ProfileChanges`]); different customers run in parallel and their proposals
//! share Raft batches and WAL syncs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use custos_api::limits::{is_valid_id, is_valid_subject, MAX_NAME_LEN};
use custos_api::types::{EventReceipt, EventStatus, Link, LinkRequest, Rule, RuleSpec};
use custos_api::{CloudEvent, ErrorCode};
use custos_raft::records::{
    CommandRecord, EventRecord, Ingest, IntentRecord, IntentStep, LinkRecord, RuleFailure,
    RuleRecord,
};
use custos_raft::shard::{slot_of, slot_tag};
use custos_raft::types::GroupId;
use custos_raft::{ChangeOutcome, StateChange, META_GROUP};
use sha2::{Digest, Sha256};

use crate::core::{check_schema, not_leader, CachedEntity, Core};
use crate::error::ServiceError;
use crate::rules::{self, CompiledRule, EventScope, RuleSet, EVENT_EVAL_BUDGET};

/// Longest `reason` kept for an ignored event.
const MAX_REASON: usize = 1000;

/// The tokens an OAuth linking leaves, sealed by the node's key ring.
#[derive(Debug, Clone, Default)]
pub struct LinkTokens {
    /// The access token.
    pub access: Option<Vec<u8>>,
    /// The refresh token, when the provider issued one.
    pub refresh: Option<Vec<u8>>,
}

/// What a profile is asked to do.
#[derive(Debug)]
pub enum ProfileRequest {
    /// Match an event against the rules and commit it with its commands.
    Ingest {
        /// The decoded event.
        event: Box<CloudEvent>,
        /// Its JSON text as received, kept in the activity.
        raw: String,
        /// When the gateway received it.
        received_ms: i64,
    },
    /// Link an entity, with its sealed tokens when linked through OAuth.
    Link(LinkRequest, LinkTokens),
    /// Erase the customer and everything held about it.
    Erase,
    /// Unlink an entity.
    Unlink(String),
    /// Validate, compile and save a rule.
    SaveRule(RuleSpec),
    /// Delete a rule.
    DeleteRule(String),
    /// Finish a linking whose claim an earlier call left half done (the intent worker).
    FinishClaim(IntentRecord),
}

/// A profile's answer.
#[derive(Debug)]
pub enum ProfileReply {
    /// The event's receipt.
    Receipt(EventReceipt),
    /// The link made.
    Linked(Link),
    /// The rule saved.
    Saved(Rule),
    /// Done.
    Done,
}

impl Message for ProfileRequest {
    type Result = Result<ProfileReply, ServiceError>;
}

/// What a profile keeps in memory.
struct Profile {
    links: HashMap<String, LinkRecord>,
    rules: RuleSet,
    rule_count: usize,
    /// The group's term when loaded: a profile is only as current as its leader's term.
    term: u64,
    /// [`ProfileChanges::stamp`] when loaded.
    stamp: u64,
}

/// Slots of [`ProfileChanges`]: customers share a slot, so a change to one reloads the
/// others' cached profiles too (a harmless extra read), in bounded memory.
const CHANGE_SLOTS: usize = 4096;

/// Counts, per slot of customers, the applies on this node that changed a profile (links,
/// rules, erasure). A profile actor keeps its copy while the count it was loaded at holds: a
/// change this node's actor did not make itself (a change forwarded here by a node that had
/// just lost the lead, or made before this node led) leaves it nothing else to notice.
pub struct ProfileChanges {
    slots: Box<[std::sync::atomic::AtomicU64]>,
    /// Changes to every profile at once (a snapshot installed, a customer erased).
    all: std::sync::atomic::AtomicU64,
}

impl Default for ProfileChanges {
    fn default() -> Self {
        ProfileChanges {
            slots: (0..CHANGE_SLOTS).map(|_| Default::default()).collect(),
            all: Default::default(),
        }
    }
}

impl ProfileChanges {
    fn slot(&self, customer: &str) -> &std::sync::atomic::AtomicU64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        customer.hash(&mut h);
        &self.slots[(h.finish() as usize) % CHANGE_SLOTS]
    }

    /// An apply changed `customer`'s profile (called after its batch is written).
    pub fn changed(&self, customer: &str) {
        self.slot(customer)
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// An apply may have changed any profile.
    pub fn all_changed(&self) {
        self.all.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Differs from an earlier stamp once a change to `customer`'s profile was applied since
    /// (both counts only grow). Taken before a profile is read, so a change written after the
    /// read is noticed at the next request.
    pub fn stamp(&self, customer: &str) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        self.slot(customer)
            .load(SeqCst)
            .wrapping_add(self.all.load(SeqCst))
    }
}

/// One customer's actor.
pub struct ProfileActor {
    customer: Rc<str>,
    core: Arc<Core>,
    state: Rc<RefCell<Option<Profile>>>,
}

impl Actor for ProfileActor {
    type Context = Context<Self>;
}

impl Handler<ProfileRequest> for ProfileActor {
    type Result = AtomicResponse<Self, Result<ProfileReply, ServiceError>>;

    fn handle(&mut self, req: ProfileRequest, _ctx: &mut Context<Self>) -> Self::Result {
        let core = self.core.clone();
        let customer = self.customer.clone();
        let state = self.state.clone();
        AtomicResponse::new(Box::pin(
            async move { handle(&core, &customer, &state, req).await }.into_actor(self),
        ))
    }
}

async fn handle(
    core: &Core,
    customer: &str,
    state: &RefCell<Option<Profile>>,
    req: ProfileRequest,
) -> Result<ProfileReply, ServiceError> {
    let group = core.group_of(customer)?;
    let g = core
        .group(group)
        .filter(|g| g.leads(core.node_id))
        .ok_or_else(|| not_leader(group))?;
    // Another leader may have changed the customer since this copy was loaded, or another
    // node's proposal may have changed it here.
    let term = g.term();
    let stamp = core.wake.profile_changes.stamp(customer);
    if state
        .borrow()
        .as_ref()
        .is_some_and(|p| p.term != term || p.stamp != stamp)
    {
        *state.borrow_mut() = None;
    }
    if state.borrow().is_none() {
        let loaded = load(core, group, customer, term, stamp).await?;
        *state.borrow_mut() = Some(loaded);
    }
    let changes = !matches!(req, ProfileRequest::Ingest { .. });
    let reply = match req {
        ProfileRequest::Ingest {
            event,
            raw,
            received_ms,
        } => ingest(core, group, customer, state, *event, raw, received_ms)
            .await
            .map(ProfileReply::Receipt),
        ProfileRequest::Link(req, tokens) => link(core, group, customer, state, req, tokens)
            .await
            .map(ProfileReply::Linked),
        ProfileRequest::FinishClaim(intent) => {
            finish_claim(core, group, customer, state, intent).await?;
            Ok(ProfileReply::Done)
        }
        ProfileRequest::Erase => {
            core.propose(
                group,
                StateChange::EraseCustomer {
                    customer_id: customer.to_owned(),
                },
            )
            .await?;
            // Nothing of it stays in memory either; a later message finds no customer.
            *state.borrow_mut() = None;
            Ok(ProfileReply::Done)
        }
        ProfileRequest::Unlink(entity_id) => {
            // The routing index entry is released by the intent this records.
            core.propose(
                group,
                StateChange::Unlink {
                    customer_id: customer.to_owned(),
                    entity_id: entity_id.clone(),
                    at_ms: custos_api::types::unix_now_ms(),
                },
            )
            .await?;
            // The proposal returned once no attempt to the entity for this customer was still
            // sending on the leader that committed it, nor on this node if it forwarded the
            // unlink there, nor on a leader the committing one took over from (Core::settle).
            with_profile(state, |p| {
                p.links.remove(&entity_id);
            });
            Ok(ProfileReply::Done)
        }
        ProfileRequest::SaveRule(spec) => save_rule(core, group, customer, state, spec)
            .await
            .map(ProfileReply::Saved),
        ProfileRequest::DeleteRule(rule_id) => {
            core.propose(
                group,
                StateChange::DeleteRule {
                    customer_id: customer.to_owned(),
                    rule_id: rule_id.clone(),
                    at_ms: custos_api::types::unix_now_ms(),
                },
            )
            .await?;
            with_profile(state, |p| {
                p.rules.remove(&rule_id);
                p.rule_count = p.rule_count.saturating_sub(1);
            });
            Ok(ProfileReply::Done)
        }
    };
    if changes && reply.is_err() {
        // A change that failed may commit all the same (a proposal that timed out), or may
        // find the store already changed (a rule deleted by such a proposal answers 404): this
        // copy may differ from what is stored, so the next request rebuilds it. Else a rule
        // deleted that way would go on firing from this copy.
        *state.borrow_mut() = None;
    }
    reply
}

fn with_profile<T>(
    state: &RefCell<Option<Profile>>,
    f: impl FnOnce(&mut Profile) -> T,
) -> Option<T> {
    state.borrow_mut().as_mut().map(f)
}

/// Rebuilds a profile from the state machine, once this leader has applied everything
/// committed before (so no earlier leader's change is missing). After the leader has applied
/// an entry of its own term that holds without asking the group; a read-index round per
/// rebuild was a core round trip, and in a cluster a heartbeat round, on every cold event. A
/// leader deposed meanwhile cannot commit what it plans from this copy.
async fn load(
    core: &Core,
    group: GroupId,
    customer: &str,
    term: u64,
    stamp: u64,
) -> Result<Profile, ServiceError> {
    if !core.group(group).is_some_and(|g| g.applied_own_term()) {
        core.ensure_leader(group).await?;
    }
    // Read here, not on the blocking pool: a profile is one key range, usually one data
    // block, and its size is bounded (rules and links per customer). Handing it to the pool
    // and back (waking a thread, parking it, waking this one) cost more than the read: 8% of
    // the node's CPU when events find their profiles cold.
    let Some(custos_raft::reader::StoredProfile { links, rules, .. }) =
        core.read_here(group, |r| r.profile(customer))?
    else {
        return Err(ServiceError::not_found("customer", customer));
    };
    let rule_count = rules.len();
    Ok(Profile {
        links: links
            .into_iter()
            .map(|l| (l.entity_id.clone(), l))
            .collect(),
        rules: RuleSet::new(rules),
        rule_count,
        term,
        stamp,
    })
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The stable id of the command `rule` makes from event (source, id) for `customer`: the
/// same on every retry or duplicate of the event, so targets can deduplicate on it. It starts
/// with the customer's slot, so any node routes a delivery call to the customer's group.
pub fn command_id(customer: &str, source: &str, event_id: &str, rule_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [source, event_id, rule_id] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("cmd_{}{}", slot_tag(slot_of(customer)), &hex[..29])
}

/// What one event produces for a profile: commands, or why none.
struct Plan {
    commands: Vec<CommandRecord>,
    reasons: Vec<String>,
    /// Rules that could not be evaluated: each gets its own activity line.
    failures: Vec<RuleFailure>,
}

impl Plan {
    /// Records why `rule` failed, cut to [`MAX_REASON`]: a schema or CEL error can quote the
    /// mapped value, which a mapping can make megabytes long, and every failure travels in
    /// the event's Raft entry and stays in the customer's activity.
    fn fail(&mut self, rule_id: &str, event_id: &str, reason: String) {
        let reason = cut_to(reason, MAX_REASON);
        self.reasons.push(format!("rule {rule_id}: {reason}"));
        self.failures.push(RuleFailure {
            rule_id: rule_id.to_owned(),
            event_id: event_id.to_owned(),
            reason,
        });
    }
}

/// Most bytes of one command's data: no more than an event's body may hold.
const MAX_COMMAND_DATA_BYTES: usize = custos_api::limits::MAX_BODY_BYTES;
/// Most bytes of data all the commands of one event hold together: they travel in one Raft
/// entry with the event (entries are bounded), and a mapping can copy the event's data many
/// times over, in each of many rules.
const MAX_EVENT_COMMANDS_BYTES: usize = 4 * MAX_COMMAND_DATA_BYTES;

/// A command's data as stored and sent, when it fits its bound and, with the `so_far` bytes of
/// the event's commands before it, the event's; else why not (the rule's failure).
fn command_data(data: &serde_json::Value, so_far: usize) -> Result<String, String> {
    let json = data.to_string();
    if json.len() > MAX_COMMAND_DATA_BYTES {
        return Err(format!(
            "the mapped data is {} bytes, more than a command may hold ({MAX_COMMAND_DATA_BYTES})",
            json.len()
        ));
    }
    if so_far + json.len() > MAX_EVENT_COMMANDS_BYTES {
        return Err(format!(
            "the event's commands would hold more than {MAX_EVENT_COMMANDS_BYTES} bytes of data"
        ));
    }
    Ok(json)
}

fn plan(
    profile: &Profile,
    customer: &str,
    event: &CloudEvent,
    targets: &HashMap<String, Arc<CachedEntity>>,
    now_ms: i64,
) -> Plan {
    let mut out = Plan {
        commands: Vec::new(),
        reasons: Vec::new(),
        failures: Vec::new(),
    };
    let subject = event.subject.as_deref().unwrap_or_default();
    if profile
        .links
        .get(&event.source)
        .is_none_or(|l| l.subject != subject)
    {
        out.reasons.push(format!(
            "the customer has not linked this subject at {}",
            event.source
        ));
        return out;
    }
    let matching = profile.rules.matching(&event.source, &event.event_type);
    if matching.is_empty() {
        out.reasons.push(format!(
            "no rule is triggered by {} {}",
            event.source, event.event_type
        ));
        return out;
    }
    let scope = EventScope::new(event);
    // The data bytes of the commands planned so far (bounded per event).
    let mut data_bytes = 0;
    // What the rules run so far could have cost (bounded per event; one rule alone is
    // bounded by its own budget, so a single rule is not priced twice).
    let several = matching.len() > 1;
    let mut spent = 0u64;
    for rule in matching {
        let r = &rule.record;
        let Some(target_link) = profile.links.get(&r.then_entity) else {
            out.reasons.push(format!(
                "rule {}: target {} is not linked",
                r.id, r.then_entity
            ));
            continue;
        };
        // A rule over its own budget is not run (its evaluation says so): it spends nothing.
        let cost = if several { rule.cost_on(&scope) } else { 0 };
        if several && cost <= rules::EVAL_BUDGET {
            if spent.saturating_add(cost) > EVENT_EVAL_BUDGET {
                let why = format!(
                    "not evaluated: the rules this event triggers could cost more than \
                     {EVENT_EVAL_BUDGET} steps together"
                );
                out.fail(&r.id, &event.id, why);
                continue;
            }
            spent += cost;
        }
        let data = match rule.evaluate(&scope) {
            Ok(Some(d)) => d,
            Ok(None) => {
                out.reasons
                    .push(format!("rule {}: condition is false", r.id));
                continue;
            }
            Err(e) => {
                out.fail(&r.id, &event.id, e.to_string());
                continue;
            }
        };
        if let Some(target) = targets.get(&r.then_entity) {
            if let Some(v) = target.command_schema(&r.then_command_type) {
                if let Err(e) = check_schema(v, &data) {
                    let why = format!(
                        "mapped data violates the {} schema: {e}",
                        r.then_command_type
                    );
                    out.fail(&r.id, &event.id, why);
                    continue;
                }
            }
        }
        let data_json = match command_data(&data, data_bytes) {
            Ok(json) => {
                data_bytes += json.len();
                json
            }
            Err(why) => {
                out.fail(&r.id, &event.id, why);
                continue;
            }
        };
        out.commands.push(CommandRecord {
            id: command_id(customer, &event.source, &event.id, &r.id),
            customer_id: customer.to_owned(),
            target: r.then_entity.clone(),
            command_type: r.then_command_type.clone(),
            subject: target_link.subject.clone(),
            data_json,
            event_id: event.id.clone(),
            event_source: event.source.clone(),
            rule_id: r.id.clone(),
            created_ms: now_ms,
        });
    }
    out
}

async fn ingest(
    core: &Core,
    group: GroupId,
    customer: &str,
    state: &RefCell<Option<Profile>>,
    event: CloudEvent,
    raw: String,
    received_ms: i64,
) -> Result<EventReceipt, ServiceError> {
    // Target entities (for command schemas) come from the cache; gather them before planning
    // so no RefCell borrow is held across an await.
    let target_ids: Vec<String> = with_profile(state, |p| {
        p.rules.prepare(&event.source, &event.event_type);
        p.rules
            .matching(&event.source, &event.event_type)
            .iter()
            .map(|r| r.record.then_entity.clone())
            .collect()
    })
    .unwrap_or_default();
    let mut targets = HashMap::new();
    for id in target_ids {
        if let Some(e) = core.entity(&id).await? {
            targets.insert(id, e);
        }
    }
    let plan = {
        let guard = state.borrow();
        let Some(profile) = guard.as_ref() else {
            return Err(ServiceError::Internal("profile not loaded".into()));
        };
        plan(profile, customer, &event, &targets, received_ms)
    };
    let mut reason = None;
    if plan.commands.is_empty() {
        reason = Some(cut_to(plan.reasons.join("; "), MAX_REASON));
    }
    let ingest = Ingest {
        event: EventRecord {
            id: event.id.clone(),
            source: event.source.clone(),
            event_type: event.event_type.clone(),
            subject: event.subject.clone().unwrap_or_default(),
            cloudevent_json: raw,
        },
        customer_id: Some(customer.to_owned()),
        commands: plan.commands,
        ignored_reason: reason,
        rule_failures: plan.failures,
        at_ms: received_ms,
    };
    let outcome = core
        .propose_planned(group, StateChange::Ingest(ingest))
        .await?;
    receipt(event.id, outcome)
}

/// The receipt for an ingest outcome.
pub fn receipt(event_id: String, outcome: ChangeOutcome) -> Result<EventReceipt, ServiceError> {
    match outcome {
        ChangeOutcome::Ingested {
            duplicate,
            fate,
            commands,
            reason,
        } => Ok(EventReceipt {
            event_id,
            status: if duplicate {
                EventStatus::Duplicate
            } else {
                custos_raft::records::fate_to_wire(fate)
            },
            commands,
            reason,
        }),
        other => Err(ServiceError::Internal(format!(
            "unexpected ingest outcome {other:?}"
        ))),
    }
}

async fn link(
    core: &Core,
    group: GroupId,
    customer: &str,
    state: &RefCell<Option<Profile>>,
    req: LinkRequest,
    tokens: LinkTokens,
) -> Result<Link, ServiceError> {
    if !is_valid_id(&req.entity_id) {
        return Err(ServiceError::invalid(
            "entity_id",
            "must be 1..=128 of [A-Za-z0-9._:-], not . or ..",
        ));
    }
    if !is_valid_subject(&req.subject) {
        return Err(ServiceError::invalid(
            "subject",
            "must be 1..=128 printable bytes",
        ));
    }
    core.entity_named(&req.entity_id).await?;
    let now = custos_api::types::unix_now_ms();
    // The subject is claimed in the meta group's routing index first, then linked here; the
    // intent recorded before either step lets the intent worker finish (or undo) a linking
    // this call leaves half done. Its id names the claim.
    let intent_id = format!("int_{}", uuid::Uuid::now_v7().simple());
    let record = LinkRecord {
        entity_id: req.entity_id,
        subject: req.subject,
        linked_ms: now,
        sealed_token: tokens.access,
        sealed_refresh_token: tokens.refresh,
        claim: intent_id.clone(),
    };
    let intent = IntentRecord {
        id: intent_id,
        at_ms: now,
        step: IntentStep::ClaimSubject {
            customer_id: customer.to_owned(),
            link: record.clone(),
        },
    };
    core.propose(group, StateChange::BeginIntent(intent.clone()))
        .await?;
    finish_claim(core, group, customer, state, intent).await?;
    Ok(record.to_wire())
}

/// The steps after an intent to link was recorded: claim the subject, then link (or, when
/// another customer holds it, abandon the intent and answer 409).
async fn finish_claim(
    core: &Core,
    group: GroupId,
    customer: &str,
    state: &RefCell<Option<Profile>>,
    intent: IntentRecord,
) -> Result<(), ServiceError> {
    let IntentStep::ClaimSubject { link, .. } = intent.step else {
        return Err(ServiceError::Internal("not a claim".into()));
    };
    let claimed = core
        .propose(
            META_GROUP,
            StateChange::ClaimSubject {
                entity_id: link.entity_id.clone(),
                subject: link.subject.clone(),
                customer_id: customer.to_owned(),
                claim: intent.id.clone(),
            },
        )
        .await;
    if let Err(e) = claimed {
        if let ServiceError::Refused {
            code: ErrorCode::Conflict | ErrorCode::NotFound,
            ..
        } = &e
        {
            core.propose(group, StateChange::EndIntent { id: intent.id })
                .await?;
        }
        return Err(e);
    }
    let linked = core
        .propose(
            group,
            StateChange::Link {
                customer_id: customer.to_owned(),
                link: link.clone(),
                intent: Some(intent.id),
            },
        )
        .await;
    match linked {
        Ok(_) => {
            with_profile(state, |p| {
                p.links.insert(link.entity_id.clone(), link);
            });
            Ok(())
        }
        Err(e) => {
            // Not linked (the customer was erased, or the intent already ended): the claim
            // made above must not stay behind.
            if let ServiceError::Refused {
                code: ErrorCode::NotFound,
                ..
            } = &e
            {
                let _ = core
                    .propose(
                        META_GROUP,
                        StateChange::ReleaseSubject {
                            entity_id: link.entity_id,
                            subject: link.subject,
                            customer_id: customer.to_owned(),
                            claim: link.claim,
                        },
                    )
                    .await;
            }
            Err(e)
        }
    }
}

/// Validates a rule against the customer's links and the entities' declared types and
/// schemas, and compiles it. Pure, apart from the entities passed in.
pub fn validate_rule(
    spec: &RuleSpec,
    id: String,
    linked: impl Fn(&str) -> bool,
    source: &CachedEntity,
    target: &CachedEntity,
    now_ms: i64,
) -> Result<CompiledRule, ServiceError> {
    if !custos_api::limits::is_valid_name(&spec.name) {
        return Err(ServiceError::invalid(
            "name",
            format!("must be 1..={MAX_NAME_LEN} printable characters, not only spaces"),
        ));
    }
    for (field, entity) in [
        ("when.entity", &spec.when.entity),
        ("then.entity", &spec.then.entity),
    ] {
        if !linked(entity) {
            return Err(ServiceError::refused(
                ErrorCode::EntityNotLinked,
                format!("{field}: the customer has not linked {entity}"),
            ));
        }
    }
    if source.record.event_type(&spec.when.event_type).is_none() {
        return Err(ServiceError::refused(
            ErrorCode::UnknownType,
            format!(
                "when.event_type: {} does not send {}",
                spec.when.entity, spec.when.event_type
            ),
        ));
    }
    if target
        .record
        .command_type(&spec.then.command_type)
        .is_none()
    {
        return Err(ServiceError::refused(
            ErrorCode::UnknownType,
            format!(
                "then.command_type: {} does not accept {}",
                spec.then.entity, spec.then.command_type
            ),
        ));
    }
    let data_json = spec.then.data.to_string();
    if data_json.len() > custos_api::limits::MAX_BODY_BYTES / 4 {
        return Err(ServiceError::invalid("then.data", "too large"));
    }
    let record = RuleRecord {
        id,
        name: spec.name.clone(),
        when_entity: spec.when.entity.clone(),
        when_event_type: spec.when.event_type.clone(),
        condition: spec.when.condition.clone().filter(|c| !c.trim().is_empty()),
        then_entity: spec.then.entity.clone(),
        then_command_type: spec.then.command_type.clone(),
        data_json,
        created_ms: now_ms,
    };
    let compiled = rules::compile(record).map_err(|e| {
        ServiceError::refused(
            ErrorCode::InvalidRule,
            format!("{}: {}", e.field, e.message),
        )
    })?;
    if let Some(schema) = source
        .record
        .event_type(&spec.when.event_type)
        .and_then(|t| t.schema_json.as_deref())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
    {
        if let Some(yielded) = compiled.condition_type_error(&spec.when.event_type, &schema) {
            return Err(ServiceError::refused(
                ErrorCode::InvalidRule,
                format!(
                    "when.condition: yields {yielded} on {} data as its schema describes, not \
                     true or false",
                    spec.when.event_type
                ),
            ));
        }
    }
    if let Some(schema) = target
        .record
        .command_type(&spec.then.command_type)
        .and_then(|t| t.schema_json.as_deref())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
    {
        check_mapping_against_schema(&spec.then.data, &schema)?;
    }
    Ok(compiled)
}

/// A static check of a mapping against the command schema's top-level object shape: every
/// required property mapped, and no unknown property when the schema forbids extras. Values
/// are checked against the full schema when each command is produced.
fn check_mapping_against_schema(
    data: &serde_json::Value,
    schema: &serde_json::Value,
) -> Result<(), ServiceError> {
    let Some(mapped) = data.as_object() else {
        return Ok(());
    };
    if let Some(required) = schema.get("required").and_then(|r| r.as_array()) {
        for name in required.iter().filter_map(|n| n.as_str()) {
            if !mapped.contains_key(name) {
                return Err(ServiceError::refused(
                    ErrorCode::SchemaViolation,
                    format!("then.data: the command schema requires '{name}'"),
                ));
            }
        }
    }
    let closed = schema.get("additionalProperties") == Some(&serde_json::Value::Bool(false));
    if let (true, Some(props)) = (closed, schema.get("properties").and_then(|p| p.as_object())) {
        if let Some(extra) = mapped.keys().find(|k| !props.contains_key(*k)) {
            return Err(ServiceError::refused(
                ErrorCode::SchemaViolation,
                format!("then.data.{extra}: the command schema has no such property"),
            ));
        }
    }
    Ok(())
}

async fn save_rule(
    core: &Core,
    group: GroupId,
    customer: &str,
    state: &RefCell<Option<Profile>>,
    spec: RuleSpec,
) -> Result<Rule, ServiceError> {
    let count = with_profile(state, |p| p.rule_count).unwrap_or(0);
    if count >= custos_api::limits::MAX_RULES_PER_CUSTOMER {
        return Err(ServiceError::refused(
            ErrorCode::LimitReached,
            format!(
                "at most {} rules per customer",
                custos_api::limits::MAX_RULES_PER_CUSTOMER
            ),
        ));
    }
    for (field, id) in [
        ("when.entity", &spec.when.entity),
        ("then.entity", &spec.then.entity),
    ] {
        if !is_valid_id(id) {
            return Err(ServiceError::invalid(field, "must be an entity id"));
        }
    }
    let source = core.entity_named(&spec.when.entity).await?;
    let target = core.entity_named(&spec.then.entity).await?;
    let now = custos_api::types::unix_now_ms();
    let id = format!("rul_{}", uuid::Uuid::now_v7().simple());
    let compiled = {
        let guard = state.borrow();
        let links = guard.as_ref().map(|p| &p.links);
        validate_rule(
            &spec,
            id,
            |e| links.is_some_and(|l| l.contains_key(e)),
            &source,
            &target,
            now,
        )?
    };
    core.propose(
        group,
        StateChange::PutRule {
            customer_id: customer.to_owned(),
            rule: compiled.record.clone(),
        },
    )
    .await?;
    let wire = compiled.record.to_wire();
    // Kept as stored: compiled again when an event first triggers it, so a profile that
    // only had rules saved holds records, not programs.
    with_profile(state, |p| {
        p.rules.insert_stored(compiled.record);
        p.rule_count += 1;
    });
    Ok(wire)
}

/// A message for the host: which customer, and what.
struct Envelope {
    customer: String,
    request: ProfileRequest,
}

impl Message for Envelope {
    type Result = Result<ProfileReply, ServiceError>;
}

struct Slot {
    addr: Addr<ProfileActor>,
    in_flight: usize,
    last_used: Instant,
    /// The customer's slot, hashed once: the sweep below maps it to its group every second.
    slot: u16,
}

/// Hosts the profile actors of the customers that hash to its arbiter.
pub struct ProfileHost {
    core: Arc<Core>,
    idle: Duration,
    profiles: HashMap<String, Slot>,
}

impl Actor for ProfileHost {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = (self.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        ctx.run_interval(every, |host, _| host.passivate_idle());
    }
}

impl ProfileHost {
    fn passivate_idle(&mut self) {
        let (idle, now) = (self.idle, Instant::now());
        let before = self.profiles.len();
        let core = &self.core;
        let map = core.shard_map().ok();
        // Profiles live only on their group's leader. The sweep visits every loaded profile
        // each second, so leadership is asked once per group, not once per profile (which
        // hashed the customer and read the group's Raft metrics: 2% of a node's CPU with
        // 80,000 profiles loaded).
        let mut led: HashMap<GroupId, bool> = HashMap::new();
        // Only a profile with nothing in flight is stopped, so no message is ever lost;
        // dropping its only address stops it.
        self.profiles.retain(|_, s| {
            s.in_flight > 0
                || (now.saturating_duration_since(s.last_used) < idle
                    && map.as_ref().is_some_and(|map| {
                        *led.entry(map.group_of_slot(s.slot))
                            .or_insert_with_key(|g| core.is_leader(*g))
                    }))
        });
        let stopped = before - self.profiles.len();
        if stopped > 0 {
            metrics::gauge!("custos_active_profiles").decrement(stopped as f64);
        }
    }
}

/// Requests one profile may have waiting (it serves one at a time); more are refused (429).
const MAX_QUEUED_PER_PROFILE: usize = 256;

impl Handler<Envelope> for ProfileHost {
    type Result = ResponseActFuture<Self, Result<ProfileReply, ServiceError>>;

    fn handle(&mut self, env: Envelope, _ctx: &mut Context<Self>) -> Self::Result {
        let core = self.core.clone();
        let slot = self
            .profiles
            .entry(env.customer.clone())
            .or_insert_with(|| {
                metrics::gauge!("custos_active_profiles").increment(1.0);
                let customer: Rc<str> = Rc::from(env.customer.as_str());
                Slot {
                    addr: ProfileActor {
                        customer,
                        core,
                        state: Rc::new(RefCell::new(None)),
                    }
                    .start(),
                    in_flight: 0,
                    last_used: Instant::now(),
                    slot: slot_of(&env.customer),
                }
            });
        if slot.in_flight >= MAX_QUEUED_PER_PROFILE {
            // One request at a time per profile: a stalled one (an unlink waiting for an
            // attempt to finish, a group without quorum) must not let retries pile up behind
            // it without bound, each holding its event.
            return Box::pin(actix::fut::ready(Err(ServiceError::refused(
                ErrorCode::Overloaded,
                format!(
                    "{MAX_QUEUED_PER_PROFILE} requests for this customer are waiting already; retry"
                ),
            ))));
        }
        slot.in_flight += 1;
        slot.last_used = Instant::now();
        let customer = env.customer;
        let send = slot.addr.send(env.request);
        Box::pin(send.into_actor(self).map(move |res, host, _| {
            if let Some(slot) = host.profiles.get_mut(&customer) {
                slot.in_flight -= 1;
                slot.last_used = Instant::now();
            }
            let reply = res.map_err(|e| ServiceError::Internal(format!("profile actor: {e}")))?;
            if let Err(ServiceError::Refused {
                code: ErrorCode::NotFound,
                ..
            }) = &reply
            {
                // Do not keep an actor for a customer that does not exist.
                if host
                    .profiles
                    .get(&customer)
                    .is_some_and(|s| s.in_flight == 0)
                {
                    host.profiles.remove(&customer);
                    metrics::gauge!("custos_active_profiles").decrement(1.0);
                }
            }
            reply
        }))
    }
}

/// Routes requests to the host of each customer's arbiter.
#[derive(Clone)]
pub struct ProfileRouter {
    hosts: Arc<Vec<Addr<ProfileHost>>>,
}

impl std::fmt::Debug for ProfileRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileRouter")
            .field("hosts", &self.hosts.len())
            .finish()
    }
}

impl ProfileRouter {
    /// Starts `arbiters` arbiters with a host each. Must run inside an actix system.
    pub fn start(core: Arc<Core>, arbiters: usize, idle: Duration) -> (Self, Vec<Arbiter>) {
        let n = arbiters.max(1);
        let mut hosts = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for _ in 0..n {
            let arbiter = Arbiter::new();
            let c = core.clone();
            let host = ProfileHost::start_in_arbiter(&arbiter.handle(), move |_| ProfileHost {
                core: c,
                idle,
                profiles: HashMap::new(),
            });
            hosts.push(host);
            threads.push(arbiter);
        }
        (
            ProfileRouter {
                hosts: Arc::new(hosts),
            },
            threads,
        )
    }

    /// Sends a request to a customer's profile and waits for its answer.
    pub async fn send(
        &self,
        customer: &str,
        request: ProfileRequest,
    ) -> Result<ProfileReply, ServiceError> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        customer.hash(&mut h);
        let idx = (h.finish() % self.hosts.len() as u64) as usize;
        self.hosts[idx]
            .send(Envelope {
                customer: customer.to_owned(),
                request,
            })
            .await
            .map_err(|e| {
                ServiceError::refused(ErrorCode::Unavailable, format!("profile host: {e}"))
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_change_applied_here_is_seen_by_its_stamp() {
        let changes = ProfileChanges::default();
        let before = changes.stamp("cus_a");
        assert_eq!(changes.stamp("cus_a"), before, "nothing changed");
        changes.changed("cus_a");
        let after_own = changes.stamp("cus_a");
        assert_ne!(after_own, before);
        // A customer in another slot is not reloaded for it.
        let other = (0..100)
            .map(|i| format!("cus_{i}"))
            .find(|c| !std::ptr::eq(changes.slot(c), changes.slot("cus_a")))
            .expect("100 customers do not all share one of 4096 slots");
        let other_before = changes.stamp(&other);
        changes.changed("cus_a");
        assert_eq!(changes.stamp(&other), other_before);
        // A change to every profile (an erasure, a snapshot) reaches each.
        changes.all_changed();
        assert_ne!(changes.stamp(&other), other_before);
        assert_ne!(changes.stamp("cus_a"), after_own);
    }

    #[test]
    fn a_commands_data_is_bounded_alone_and_with_the_events_other_commands() {
        // A mapping copying a large event's data several times over.
        let big = serde_json::json!({ "copy": "x".repeat(100_000) });
        let thrice = serde_json::json!([big, big, big]);
        assert!(command_data(&big, 0).is_ok());
        let too_big = command_data(&thrice, 0).err().unwrap_or_default();
        assert!(
            too_big.contains("more than a command may hold"),
            "{too_big}"
        );
        // Many rules, each within the bound: the event's commands together are bounded too.
        let mut so_far = 0;
        let mut made = 0;
        while let Ok(json) = command_data(&big, so_far) {
            so_far += json.len();
            made += 1;
        }
        assert_eq!(made, MAX_EVENT_COMMANDS_BYTES / big.to_string().len());
        assert!(so_far <= MAX_EVENT_COMMANDS_BYTES);
    }

    #[test]
    fn a_rule_failure_quoting_a_huge_value_is_cut() {
        // jsonschema quotes the failing value: a mapping can make it megabytes long, and the
        // failure travels in the event's Raft entry.
        let schema = serde_json::json!({"type": "object",
            "properties": {"note": {"type": "string", "maxLength": 5}}});
        let validator = crate::core::compile_schema(&schema).unwrap_or_else(|e| panic!("{e}"));
        let data = serde_json::json!({"note": "\u{e9}".repeat(300_000)});
        let why = check_schema(&validator, &data).err().unwrap_or_default();
        // The violation and where, not the value.
        assert!(
            why.contains("longer than 5") && why.ends_with("at '/note'"),
            "{why}"
        );
        assert!(why.len() < 200, "{why}");
        // A short value is quoted.
        let short = check_schema(&validator, &serde_json::json!({"note": "abcdefg"}));
        assert!(short.err().unwrap_or_default().contains("abcdefg"));
        // Whatever a rule's failure says (a CEL error can quote values too) is cut.
        let mut plan = Plan {
            commands: Vec::new(),
            reasons: Vec::new(),
            failures: Vec::new(),
        };
        plan.fail("r1", "e1", "\u{e9}".repeat(300_000));
        assert!(plan.failures[0].reason.len() <= MAX_REASON);
        assert!(plan.reasons[0].len() <= MAX_REASON + "rule r1: ".len());
    }

    #[test]
    fn the_rules_one_event_triggers_are_bounded_together() {
        // Each rule alone is within its budget; many of them on one trigger would run one
        // after another on the profile's thread.
        let link = |entity: &str| LinkRecord {
            entity_id: entity.into(),
            subject: "alice".into(),
            linked_ms: 0,
            sealed_token: None,
            sealed_refresh_token: None,
            claim: "i".into(),
        };
        let mut event = CloudEvent::new("e1", "airline", "flight.delayed");
        event.subject = Some("alice".into());
        let costly = "data.a.all(x, data.a.all(y, x + y >= 0))";
        let record = |id: usize| custos_raft::records::RuleRecord {
            id: format!("r{id}"),
            name: "n".into(),
            when_entity: "airline".into(),
            when_event_type: "flight.delayed".into(),
            condition: Some(costly.into()),
            then_entity: "hotel".into(),
            then_command_type: "room.hold".into(),
            data_json: "{}".into(),
            created_ms: 0,
        };
        // A list long enough that one rule costs a fair share of the event's budget.
        let one = rules::compile(record(0)).expect("within the budget on small events");
        let n = (10..2000)
            .find(|n| {
                event.data = Some(serde_json::json!({ "a": vec![1; *n] }));
                one.cost_on(&EventScope::new(&event)) > EVENT_EVAL_BUDGET / 8
            })
            .expect("some length costs an eighth of the event's budget");
        let cost = one.cost_on(&EventScope::new(&event));
        assert!(cost <= rules::EVAL_BUDGET, "one rule runs: {cost} at {n}");
        let mut set = RuleSet::default();
        for id in 0..20 {
            set.insert(rules::compile(record(id)).expect("compiles"));
        }
        let profile = Profile {
            links: [("airline", link("airline")), ("hotel", link("hotel"))]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            rules: set,
            rule_count: 20,
            term: 0,
            stamp: 0,
        };
        let plan = plan(&profile, "cus_1", &event, &HashMap::new(), 0);
        let run = (EVENT_EVAL_BUDGET / cost) as usize;
        assert_eq!(plan.commands.len(), run, "the rules that fit ran");
        assert_eq!(plan.failures.len(), 20 - run);
        assert!(
            plan.failures[0].reason.contains("together"),
            "{}",
            plan.failures[0].reason
        );
    }

    #[test]
    fn command_ids_are_stable_and_distinct() {
        let a = command_id("cus_1", "airline", "e1", "r1");
        assert_eq!(a, command_id("cus_1", "airline", "e1", "r1"));
        assert_ne!(a, command_id("cus_1", "airline", "e1", "r2"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(
            command_id("cus_1", "ab", "c", "r"),
            command_id("cus_1", "a", "bc", "r")
        );
        assert!(a.starts_with("cmd_") && a.len() == 36);
        // It names the customer's slot.
        assert_eq!(
            crate::forward::slot_of_token(&a),
            Some(slot_of("cus_1")),
            "{a}"
        );
    }

    #[test]
    fn mapping_is_checked_against_required_and_closed_schemas() {
        let schema = serde_json::json!({"type": "object", "required": ["arrival"],
            "properties": {"arrival": {"type": "string"}, "flight": {"type": "string"}},
            "additionalProperties": false});
        assert!(
            check_mapping_against_schema(&serde_json::json!({"arrival": "x"}), &schema).is_ok()
        );
        assert!(
            check_mapping_against_schema(&serde_json::json!({"flight": "x"}), &schema).is_err()
        );
        assert!(check_mapping_against_schema(
            &serde_json::json!({"arrival": "x", "other": "y"}),
            &schema
        )
        .is_err());
    }
}
