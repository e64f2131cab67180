//! The delivery worker: one per data group, sending while this node leads the group. It sends
//! due commands (a new one as its apply handed it over, others read from the group's outbox)
//! to their entities as signed CloudEvents, and records every attempt through the group's
//! Raft log in batches.
//!
//! At least once, with a stable `webhook-id`: a command is re-sent only if its attempt was
//! not recorded (the node stopped mid-flight, or leadership moved and the new leader resumed
//! from the outbox), and targets deduplicate on the id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custos_api::cloudevent::{
    CLOUDEVENTS_CONTENT_TYPE, EXT_CAUSING_EVENT, EXT_CAUSING_SOURCE, EXT_RULE,
};
use custos_api::limits::MAX_ATTEMPTS_PER_COMMAND;
use custos_api::types::unix_now_ms;
use custos_api::webhook::{self, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use custos_api::CloudEvent;
use custos_raft::records::{
    AttemptNext, AttemptRecord, CommandRecord, DeliveryState, DeliveryUpdate,
};
use custos_raft::{StateChange, META_GROUP};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::config::DeliveryConfig;
use crate::core::{CachedEntity, Core, Group};
use crate::outbound::{error_chain, OutboundError};

/// Why one attempt did not deliver. Its text is stored with the attempt and shown to the
/// customer (portal, deliveries API), so it names a kind of failure only: never the entity's
/// URL (its query may hold a token) nor how far a connection got (an oracle for probing the
/// operator's network). The detail goes to the node's log.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The endpoint resolves to an address the operator did not allow.
    #[error("the target's address is not allowed (loopback, private or link-local)")]
    ForbiddenAddress,
    /// The endpoint URL cannot be used.
    #[error("the entity's endpoint URL cannot be used")]
    BadUrl,
    /// Connect, TLS, timeout or other transport failure.
    #[error("transport: {0}")]
    Transport(TransportFailure),
    /// The target answered a non-2xx status.
    #[error("target answered {0}")]
    Status(u16),
    /// No signing secret of the entity's could be opened (the token key that sealed it is
    /// gone from the configuration): an unsigned command is never sent.
    #[error("not sent: the entity's signing secret cannot be opened; rotate it")]
    Unsigned,
}

/// The kind of a transport failure, as much of it as a customer is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportFailure {
    /// No answer within the attempt's timeout.
    #[error("timed out")]
    Timeout,
    /// No connection (refused, unreachable, DNS, TLS handshake).
    #[error("could not connect")]
    Connect,
    /// The connection failed during the request or its answer.
    #[error("the request failed")]
    Other,
}

impl TransportFailure {
    /// The kind of `e`.
    pub fn of(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            TransportFailure::Timeout
        } else if e.is_connect() {
            TransportFailure::Connect
        } else {
            TransportFailure::Other
        }
    }
}

/// The wait before the attempt after attempt `attempts_made`, or `None` when exhausted.
pub fn next_delay(
    cfg: &DeliveryConfig,
    attempts_made: usize,
    retry_after: Option<Duration>,
    jitter_unit: f64,
) -> Option<Duration> {
    let base = *cfg.retry_schedule_secs.get(attempts_made)?;
    let jittered = base * (1.0 + cfg.jitter * jitter_unit.clamp(0.0, 1.0));
    let mut d = Duration::from_secs_f64(jittered);
    if let Some(ra) = retry_after {
        // Honour the target's Retry-After, within a day.
        d = d.max(ra.min(Duration::from_secs(86_400)));
    }
    Some(d)
}

/// Parses Retry-After as delay-seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let fmt = time::format_description::well_known::Rfc2822;
    let at = time::OffsetDateTime::parse(v, &fmt).ok()?;
    let now = time::OffsetDateTime::from(now);
    let d = at - now;
    Some(Duration::from_secs(d.whole_seconds().max(0) as u64))
}

/// The CloudEvent body of a command (stable across retries: its time is the creation time).
pub fn command_body(c: &CommandRecord) -> Vec<u8> {
    let mut ev = CloudEvent::new(c.id.clone(), "custos", c.command_type.clone());
    ev.subject = Some(c.subject.clone());
    ev.time = Some(custos_api::types::rfc3339_ms(c.created_ms));
    ev.datacontenttype = Some("application/json".into());
    ev.data = serde_json::from_str(&c.data_json).ok();
    ev.extensions
        .insert(EXT_CAUSING_EVENT.into(), c.event_id.clone().into());
    ev.extensions
        .insert(EXT_CAUSING_SOURCE.into(), c.event_source.clone().into());
    ev.extensions
        .insert(EXT_RULE.into(), c.rule_id.clone().into());
    serde_json::to_vec(&ev).unwrap_or_default()
}

/// The worker's shared parts.
struct Worker {
    core: Arc<Core>,
    group: Arc<Group>,
    results: mpsc::UnboundedSender<DeliveryUpdate>,
    /// Sending slots each target holds.
    targets: TargetSlots,
}

/// The sending slots in use per target entity, bounded by `delivery.per_target_share` of
/// them: a target that answers slowly or not at all (each
/// attempt holding its slot up to the timeout) would otherwise take every slot, and every
/// other target's deliveries would wait behind its own.
#[derive(Default)]
struct TargetSlots {
    used: std::sync::Mutex<HashMap<String, usize>>,
}

/// One target's sending slot, given back when dropped.
struct TargetSlot<'a> {
    slots: &'a TargetSlots,
    target: String,
}

impl TargetSlots {
    /// A slot of `target`'s, unless it holds `cap` already.
    fn take(&self, target: &str, cap: usize) -> Option<TargetSlot<'_>> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let n = used.entry(target.to_owned()).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(TargetSlot {
            slots: self,
            target: target.to_owned(),
        })
    }
}

impl Drop for TargetSlot<'_> {
    fn drop(&mut self) {
        let mut used = self.slots.used.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = used.get_mut(&self.target) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                used.remove(&self.target);
            }
        }
    }
}

/// How long a delivery whose target holds all its slots waits before it is looked at again.
const TARGET_BUSY_MS: i64 = 500;

/// How long a delivery whose attempt could not be prepared or recorded waits to be retried.
const REQUEUE_MS: i64 = 1000;
/// How long a due delivery found still in flight waits before it is looked at again.
const IN_FLIGHT_RECHECK_MS: i64 = 100;
/// How often a leader's worker reloads its queue from the outbox (a safety net).
const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Runs `group`'s worker until `shutdown` turns true or the group is closed here. Spawn it
/// on the Raft runtime.
pub async fn run(core: Arc<Core>, group: Arc<Group>, mut shutdown: watch::Receiver<bool>) {
    let cfg = core.config.delivery.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut closed = group.stop.subscribe();
    let worker = Arc::new(Worker {
        core: core.clone(),
        group: group.clone(),
        results: tx,
        targets: TargetSlots::default(),
    });
    let recorder = tokio::spawn(record_results(worker.clone(), rx));
    let due = &group.due;
    let mut leading = false;
    // The term this worker last saw itself leading in.
    let mut led_term = None;
    let mut last_reload = Instant::now();
    loop {
        if *shutdown.borrow() || *closed.borrow() {
            break;
        }
        let leader_now = group.leads(core.node_id);
        let term = group.term();
        if leading && leader_now && led_term != Some(term) {
            // Leading again in a later term, the step in between unseen (A -> B -> A within
            // one wait): the queue may hold commands another leader has sent and recorded
            // since (handed over by this replica's applies as created), so the group is
            // taken over afresh, from the outbox.
            due.set_leading(false);
            leading = false;
        }
        if !leader_now {
            // Only the leader delivers; a follower keeps no queue. The new leader resumes
            // from the outbox with the same command ids.
            if leading {
                due.set_leading(false);
            }
        } else {
            due.beat(unix_now_ms());
            if !leading {
                due.set_leading(true);
                // Stamped now, not at the first unlink: an unlink waits one drain from it.
                let _ = group.took_over_at(core.node_id);
            }
            if !leading || due.take_stale() {
                match core.read(group.id, |r| r.due(i64::MAX, usize::MAX)).await {
                    Ok(items) => due.extend(items),
                    Err(e) => {
                        tracing::warn!(group = group.id, error = %e, "cannot load pending deliveries");
                        due.invalidate();
                    }
                }
            }
        }
        // A safety net under the in-memory queue: reload it from the outbox now and then,
        // so no pending delivery waits for a leadership change to be found again.
        if leader_now && last_reload.elapsed() > RELOAD_EVERY {
            match core.read(group.id, |r| r.due(i64::MAX, usize::MAX)).await {
                Ok(items) => due.extend(items),
                Err(e) => {
                    tracing::warn!(group = group.id, error = %e, "cannot reload pending deliveries")
                }
            }
            last_reload = Instant::now();
        }
        leading = leader_now;
        led_term = leader_now.then_some(term);
        // A follower looks for leadership often: deliveries resume soon after a failover.
        let mut wait = Duration::from_millis(if leading { 1000 } else { 200 });
        if leading {
            let now = unix_now_ms();
            // A read-index round first: a leader that was paused or cut off learns it was
            // deposed before it sends anything its successor may also send.
            let asked = Instant::now();
            if due.next_due().is_some_and(|d| d <= now) && confirm_leadership(&core, &group).await {
                dispatch_due(&worker, now, cfg.concurrency, asked);
            }
            if let Some(next) = due.next_due().filter(|d| *d > now) {
                wait = wait.min(Duration::from_millis((next - now) as u64));
            }
        }
        tokio::select! {
            _ = due.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
            _ = closed.changed() => {}
        }
    }
    recorder.abort();
}

/// True when a quorum confirms this node still leads `group` (within an election timeout).
async fn confirm_leadership(core: &Core, group: &Group) -> bool {
    let within = Duration::from_millis(core.config.raft.election_timeout_max_ms);
    matches!(
        tokio::time::timeout(within, group.raft.ensure_linearizable()).await,
        Ok(Ok(_))
    )
}

/// How long after its leadership was last confirmed an attempt may still start sending. A
/// successor is elected only after that confirmation, and an unlink it commits waits one
/// attempt timeout and this long from its election (`Core::settle`, `unlink_drain`): an
/// attempt that starts later might outlast that wait, so it is put back instead.
const CONFIRMED_FOR: Duration = Duration::from_secs(1);

/// Starts attempts for due deliveries, up to the concurrency limit; `confirmed` is when the
/// leadership check they rely on began.
fn dispatch_due(worker: &Arc<Worker>, now_ms: i64, concurrency: usize, confirmed: Instant) {
    let in_flight = &worker.group.in_flight;
    // A slot is held while sending, not while the result waits for its Raft entry; those
    // waiting are bounded too (as many again), should recording stall.
    let free = concurrency
        .saturating_sub(in_flight.sending())
        .min((2 * concurrency).saturating_sub(in_flight.len()));
    for (id, created) in worker.group.due.pop_due(now_ms, free) {
        if in_flight.insert(&id) {
            let w = worker.clone();
            tokio::spawn(async move { attempt(w, id, created, confirmed).await });
        } else {
            // Still in flight: a retry due at once is handed over by the apply that records
            // the attempt before that attempt is finished here. Looked at again shortly (read
            // from the outbox then, which skips it if it is not due).
            worker
                .group
                .due
                .push(now_ms + IN_FLIGHT_RECHECK_MS, id, None);
        }
    }
}

fn finish(worker: &Worker, id: &str) {
    worker.group.in_flight.remove(id);
}

fn requeue(worker: &Worker, id: String) {
    worker.group.due.push(unix_now_ms() + REQUEUE_MS, id, None);
}

async fn attempt(
    worker: Arc<Worker>,
    id: String,
    created: Option<Arc<CommandRecord>>,
    confirmed: Instant,
) {
    match prepare_and_send(&worker, &id, created, confirmed).await {
        Ok(Some((mut update, target))) => {
            // Sent: the next due delivery may take the slot while this result is recorded.
            worker.group.in_flight.sent(&id);
            worker.group.due.wake();
            if let DeliveryUpdate::Attempted {
                next: AttemptNext::Gone,
                ..
            } = &update
            {
                // Disabled before the failure is recorded: whoever sees the delivery failed
                // sees the endpoint disabled (a crash in between leaves it pending, and its
                // next attempt finds the endpoint disabled). An endpoint moved meanwhile is
                // tried instead, and a step that failed is tried again: neither fails it.
                let step = disable_gone_endpoint(&worker, &target).await;
                if let DeliveryUpdate::Attempted { next, .. } = &mut update {
                    *next = step.next(unix_now_ms());
                }
            }
            if worker.results.send(update).is_err() {
                finish(&worker, &id);
            }
        }
        Ok(None) => finish(&worker, &id),
        Err(e) => {
            tracing::warn!(command = %id, error = %e, "delivery could not be prepared");
            finish(&worker, &id);
            requeue(&worker, id);
        }
    }
}

/// What an attempt needs of a pending delivery.
struct PendingDelivery {
    command: Arc<CommandRecord>,
    attempts_made: usize,
    next_due_ms: Option<i64>,
    /// The account the customer links at the command's target now, if any (the command is
    /// sent only to that account).
    linked_as: Option<String>,
    /// Whether the customer still links the entity the command's event came from.
    source_linked: bool,
}

/// The pending delivery `id`, with the account its target is linked as (asked here, after the
/// attempt is registered in flight, so an unlink applied later waits for it). A new command
/// is as its creating apply handed it over; any other is read from the outbox. `None` when it
/// is no longer pending.
fn pending_delivery(
    worker: &Worker,
    id: &str,
    created: Option<Arc<CommandRecord>>,
) -> Result<Option<PendingDelivery>, crate::error::ServiceError> {
    // Point reads inline: they are served from RocksDB's memtable or block cache, cheaper
    // than a trip to the blocking pool.
    let reader = &worker.group.reader;
    let (command, attempts_made, next_due_ms) = match created {
        Some(command) => (command, 0, None),
        None => match reader
            .outbox(id)?
            .filter(|r| r.state == DeliveryState::Pending)
        {
            Some(rec) => (Arc::new(rec.command), rec.attempts.len(), rec.next_due_ms),
            None => return Ok(None),
        },
    };
    // From the group's link cache: the same answer as the replica's (an apply drops a link's
    // answer before its outcome is returned), without a RocksDB read per attempt. The
    // account linked, since a customer who linked the entity again as another account
    // withdrew the commands to the first (as the apply's `withdrawn` says).
    let linked_as = |entity: &str| {
        worker
            .group
            .links
            .get_or_read(&command.customer_id, entity, || {
                reader
                    .link(&command.customer_id, entity)
                    .map(|l| l.map(|l| l.subject))
            })
    };
    // And whether the customer still links the entity the command's event came from: an
    // unlink of it cancels the command (what it carries came from there), and an attempt that
    // read it as pending just before sends nothing either.
    let source_linked = linked_as(&command.event_source)?.is_some();
    let linked_as = linked_as(&command.target)?;
    Ok(Some(PendingDelivery {
        command,
        attempts_made,
        next_due_ms,
        linked_as,
        source_linked,
    }))
}

/// Where an attempt went: the entity, and its endpoint then (empty when nothing was sent).
struct Target {
    entity: String,
    command_url: String,
}

/// Sends one due command; answers its result and its target.
async fn prepare_and_send(
    worker: &Worker,
    id: &str,
    created: Option<Arc<CommandRecord>>,
    confirmed: Instant,
) -> Result<Option<(DeliveryUpdate, Target)>, crate::error::ServiceError> {
    let core = &worker.core;
    if !worker.group.leads(core.node_id) {
        // Leadership moved since this was queued: the new leader sends it. Kept queued here
        // too, in case leadership comes back before this worker notices it left.
        requeue(worker, id.to_owned());
        return Ok(None);
    }
    let Some(rec) = pending_delivery(worker, id, created)? else {
        return Ok(None);
    };
    if rec.next_due_ms.is_some_and(|due| due > unix_now_ms()) {
        // A stale queue entry (the delivery was rescheduled, e.g. retried now by an
        // operator): its own entry at the new due time sends it.
        return Ok(None);
    }
    worker
        .group
        .in_flight
        .describe(id, &rec.command.customer_id, &rec.command.target);
    let now = unix_now_ms();
    let mut target = Target {
        entity: rec.command.target.clone(),
        command_url: String::new(),
    };
    if !rec.source_linked {
        return Ok(Some((
            DeliveryUpdate::Cancelled {
                command_id: id.to_owned(),
                reason: custos_raft::records::cancelled_by_unlink(&rec.command.event_source),
                at_ms: now,
                as_failed: false,
            },
            target,
        )));
    }
    if rec.linked_as.as_deref() != Some(rec.command.subject.as_str()) {
        return Ok(Some((
            DeliveryUpdate::Cancelled {
                command_id: id.to_owned(),
                reason: match rec.linked_as {
                    Some(_) => custos_raft::records::cancelled_by_relink(&rec.command.target),
                    None => custos_raft::records::cancelled_by_unlink(&rec.command.target),
                },
                at_ms: now,
                as_failed: false,
            },
            target,
        )));
    }
    let Some(entity) = core.entity(&rec.command.target).await? else {
        // Entities are never deleted, and a rule names a registered one: this replica of the
        // meta group has not caught up yet (a node that just took the lead). Sent later.
        tracing::warn!(command = %id, entity = %target.entity, "entity not known here yet; delivery requeued");
        requeue(worker, id.to_owned());
        return Ok(None);
    };
    if !entity.record.endpoint_enabled {
        return Ok(Some((
            DeliveryUpdate::Cancelled {
                command_id: id.to_owned(),
                reason: "the entity's endpoint is disabled".into(),
                at_ms: now,
                as_failed: true,
            },
            target,
        )));
    }
    if confirmed.elapsed() > CONFIRMED_FOR {
        // Too long since the leadership check (a slow read, a busy machine): checked again
        // before it is sent.
        requeue(worker, id.to_owned());
        return Ok(None);
    }
    let Some(_slot) = worker
        .targets
        .take(&rec.command.target, core.config.delivery.per_target())
    else {
        // The target holds its share of the slots (it answers slowly, or not at all): the
        // other targets' deliveries go first, this one is looked at again shortly.
        metrics::counter!("custos_delivery_deferred_total", "why" => "target_busy").increment(1);
        worker
            .group
            .due
            .push(now + TARGET_BUSY_MS, id.to_owned(), None);
        return Ok(None);
    };
    target.command_url = entity.record.command_url.clone();
    let started = Instant::now();
    let result = send(worker, &entity, &rec.command).await;
    let duration = started.elapsed();
    metrics::histogram!("custos_delivery_attempt_seconds").record(duration.as_secs_f64());
    let attempts_made = rec.attempts_made + 1;
    let cfg = &core.config.delivery;
    let (status_code, error, next) = match result {
        Ok(code) => {
            let latency = (unix_now_ms() - rec.command.created_ms).max(0) as f64 / 1000.0;
            metrics::histogram!("custos_command_delivery_latency_seconds").record(latency);
            (Some(code), None, AttemptNext::Delivered)
        }
        Err((err, retry_after)) => {
            let code = match &err {
                DeliveryError::Status(s) => Some(*s),
                _ => None,
            };
            let unit = rand::thread_rng().gen::<f64>();
            let next = after_failure(cfg, code, attempts_made, retry_after, unit, unix_now_ms());
            (code, Some(err.to_string()), next)
        }
    };
    let outcome = match &next {
        AttemptNext::Delivered => "delivered",
        AttemptNext::RetryAt(_) => "retry",
        AttemptNext::Exhausted => "exhausted",
        AttemptNext::Gone => "gone",
    };
    metrics::counter!("custos_delivery_attempts_total", "outcome" => outcome).increment(1);
    Ok(Some((
        DeliveryUpdate::Attempted {
            command_id: id.to_owned(),
            attempt: AttemptRecord {
                at_ms: now,
                status_code,
                error,
                duration_ms: duration.as_millis() as u64,
            },
            next,
        },
        target,
    )))
}

async fn send(
    worker: &Worker,
    entity: &CachedEntity,
    command: &CommandRecord,
) -> Result<u16, (DeliveryError, Option<Duration>)> {
    let request = worker
        .core
        .outbound
        .post(&entity.record.command_url)
        .map_err(|e| {
            tracing::warn!(entity = %entity.record.id, command = %command.id, error = %e, "delivery not attempted");
            match e {
                OutboundError::Forbidden(_) => (DeliveryError::ForbiddenAddress, None),
                _ => (DeliveryError::BadUrl, None),
            }
        })?;
    let body = command_body(command);
    let ts = webhook::unix_now();
    let now_ms = unix_now_ms();
    let secrets = entity.valid_secrets(now_ms);
    if secrets.is_empty() {
        return Err((DeliveryError::Unsigned, None));
    }
    // Sign with every valid secret, so a target mid-rotation verifies with either.
    let signature = secrets
        .iter()
        .map(|s| s.sign(&command.id, ts, &body))
        .collect::<Vec<_>>()
        .join(" ");
    let resp = request
        .header("content-type", CLOUDEVENTS_CONTENT_TYPE)
        .header(HEADER_ID, &command.id)
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_SIGNATURE, signature)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            // The whole chain for the operator, without the URL (its query may hold a token:
            // the host is enough to find the endpoint); a kind of failure for the customer.
            let failure = TransportFailure::of(&e);
            let host = e
                .url()
                .and_then(|u| u.host_str())
                .unwrap_or_default()
                .to_owned();
            let msg = error_chain(&e.without_url());
            tracing::warn!(entity = %entity.record.id, command = %command.id, host = %host, error = %msg, "delivery attempt failed");
            if msg.contains("is not allowed") {
                (DeliveryError::ForbiddenAddress, None)
            } else {
                (DeliveryError::Transport(failure), None)
            }
        })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(status.as_u16());
    }
    // Only where it asks to come back later (RFC 9110, RFC 6585): a 400 with a day's
    // Retry-After is a mistake, not a schedule.
    let retry_after = matches!(status.as_u16(), 429 | 503)
        .then(|| resp.headers().get("retry-after"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
    Err((DeliveryError::Status(status.as_u16()), retry_after))
}

/// The longest wait between two proposals of results that could not be recorded.
const RECORD_BACKOFF_MAX_MS: u64 = 5_000;

/// The wait before results that could not be recorded `tries` times in a row are proposed
/// again: `REQUEUE_MS`, doubling, at most [`RECORD_BACKOFF_MAX_MS`].
fn record_backoff(tries: u32) -> Duration {
    let ms = (REQUEUE_MS as u64).saturating_mul(1 << tries.saturating_sub(1).min(6));
    Duration::from_millis(ms.min(RECORD_BACKOFF_MAX_MS))
}

/// When a command whose result could not be recorded is sent again: not before the retry the
/// result itself scheduled (a failing target keeps its backoff), and not within `REQUEUE_MS`.
fn resend_at(update: &DeliveryUpdate, now_ms: i64) -> i64 {
    let soonest = now_ms + REQUEUE_MS;
    match update {
        DeliveryUpdate::Attempted {
            next: AttemptNext::RetryAt(due),
            ..
        } => soonest.max(*due),
        _ => soonest,
    }
}

/// Commits attempt results in batches: one Raft entry for everything that finished meanwhile.
/// A batch that could not be recorded (the group overloaded, a proposal timed out) is proposed
/// again with what finished since, its commands still in flight, for as long as this node
/// leads the group ([`record_backoff`] apart): an attempt made is recorded, not made again, and
/// counted (a delivery put back unrecorded would be sent again without its attempt counting
/// towards its limit, and a delivered one sent again, for as long as the group stays
/// overloaded). The commands held in flight meanwhile keep the worker from starting more than
/// its bound. Only when the node no longer leads the group are they put back to be sent again
/// (by this node should it lead again; same webhook-id, targets deduplicate).
async fn record_results(worker: Arc<Worker>, mut rx: mpsc::UnboundedReceiver<DeliveryUpdate>) {
    const MAX_BATCH: usize = 512;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut unrecorded: Vec<DeliveryUpdate> = Vec::new();
    let mut tries = 0;
    loop {
        if unrecorded.is_empty() {
            if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                break;
            }
        } else {
            tokio::time::sleep(record_backoff(tries)).await;
            batch.append(&mut unrecorded);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(u) => batch.push(u),
                    Err(_) => break,
                }
            }
        }
        let ids: Vec<String> = batch
            .iter()
            .map(|u| match u {
                DeliveryUpdate::Attempted { command_id, .. }
                | DeliveryUpdate::Cancelled { command_id, .. } => command_id.clone(),
            })
            .collect();
        let change = StateChange::RecordDeliveries(batch.clone());
        let recorded = worker.core.propose(worker.group.id, change).await;
        match recorded {
            Ok(_) => {
                tries = 0;
                batch.clear();
                for id in &ids {
                    finish(&worker, id);
                }
                // Retries come back through the apply's DeliveryDue effects; wake for free
                // slots.
                worker.group.due.wake();
            }
            Err(e) if worker.group.leads(worker.core.node_id) => {
                tries = tries.saturating_add(1);
                if tries.is_power_of_two() {
                    tracing::warn!(error = %e, n = ids.len(), tries, "could not record delivery attempts; proposing them again");
                }
                unrecorded = std::mem::take(&mut batch);
            }
            Err(e) => {
                tracing::warn!(error = %e, n = ids.len(), "could not record delivery attempts; they will be sent again");
                tries = 0;
                let now = unix_now_ms();
                for (id, update) in ids.into_iter().zip(batch.drain(..)) {
                    finish(&worker, &id);
                    worker.group.due.push(resend_at(&update, now), id, None);
                }
            }
        }
    }
}

/// What follows a failed attempt (`code`: the status the target answered, if it answered):
/// a 410 Gone disables the endpoint, anything else is retried on the schedule; either ends
/// once the command has had its attempts (a 410 too: its disable step may keep failing, or
/// keep finding the endpoint moved).
fn after_failure(
    cfg: &DeliveryConfig,
    code: Option<u16>,
    attempts_made: usize,
    retry_after: Option<Duration>,
    unit: f64,
    now_ms: i64,
) -> AttemptNext {
    if attempts_made >= MAX_ATTEMPTS_PER_COMMAND {
        return AttemptNext::Exhausted;
    }
    if code == Some(410) {
        return AttemptNext::Gone;
    }
    match next_delay(cfg, attempts_made, retry_after, unit) {
        Some(d) => AttemptNext::RetryAt(now_ms + d.as_millis() as i64),
        None => AttemptNext::Exhausted,
    }
}

/// How long a 410 whose endpoint could not be disabled waits before its delivery is tried
/// again (the meta group had no leader, say): the next 410 tries the disable again.
const GONE_UNDECIDED_MS: i64 = 5_000;

/// What became of a 410's disable step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GoneStep {
    /// The endpoint is disabled: the delivery fails, saying so.
    Disabled,
    /// The entity moved its endpoint since: the delivery is tried at the new one.
    Moved,
    /// The step failed: the delivery is tried again later, not failed as if disabled.
    Undecided,
}

impl GoneStep {
    /// The delivery's next step after a 410, given what its disable step did.
    fn next(self, now_ms: i64) -> AttemptNext {
        match self {
            GoneStep::Disabled => AttemptNext::Gone,
            // Not at once: this node's replica of the meta group may not have the new
            // endpoint yet, and would send to the old one again.
            GoneStep::Moved => AttemptNext::RetryAt(now_ms + REQUEUE_MS),
            GoneStep::Undecided => AttemptNext::RetryAt(now_ms + GONE_UNDECIDED_MS),
        }
    }
}

/// A 410 Gone disables the entity's endpoint, if the URL that answered is still its endpoint:
/// a step in the meta group, taken before the failed delivery is recorded in the customer's
/// group (repeated by the next 410 if it fails).
async fn disable_gone_endpoint(worker: &Worker, target: &Target) -> GoneStep {
    let change = StateChange::DisableGoneEndpoint {
        id: target.entity.clone(),
        command_url: target.command_url.clone(),
    };
    match worker.core.propose(META_GROUP, change).await {
        Ok(_) => {
            tracing::warn!(entity = %target.entity, "endpoint answered 410 Gone; disabled");
            GoneStep::Disabled
        }
        Err(crate::error::ServiceError::Refused {
            code: custos_api::ErrorCode::Conflict,
            ..
        }) => {
            tracing::info!(entity = %target.entity, "an endpoint the entity moved away from answered 410 Gone; trying the new one");
            GoneStep::Moved
        }
        Err(e) => {
            tracing::warn!(entity = %target.entity, error = %e, "cannot disable endpoint; the delivery is tried again");
            GoneStep::Undecided
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_holds_at_most_its_share_of_the_sending_slots() {
        let slots = TargetSlots::default();
        let a: Vec<_> = (0..3).filter_map(|_| slots.take("slow", 3)).collect();
        assert_eq!(a.len(), 3);
        assert!(slots.take("slow", 3).is_none(), "its share is taken");
        assert!(
            slots.take("other", 3).is_some(),
            "another target still sends"
        );
        drop(a);
        assert!(
            slots.take("slow", 3).is_some(),
            "slots come back when dropped"
        );
        assert!(
            slots.used.lock().map(|u| u.is_empty()).unwrap_or(false),
            "nothing is kept of a target without attempts"
        );
    }

    #[test]
    fn a_410_disables_unless_the_step_fails_and_never_past_the_attempts() {
        let cfg = DeliveryConfig::default();
        let now = 1_000_000;
        assert_eq!(
            after_failure(&cfg, Some(410), 3, None, 0.5, now),
            AttemptNext::Gone
        );
        assert!(matches!(
            after_failure(&cfg, Some(503), 3, None, 0.5, now),
            AttemptNext::RetryAt(t) if t > now
        ));
        // A command that had its attempts ends, whatever the target answers: a 410 whose
        // endpoint kept moving (or whose disable kept failing) was retried without a bound.
        for code in [Some(410), Some(503), None] {
            assert_eq!(
                after_failure(&cfg, code, MAX_ATTEMPTS_PER_COMMAND, None, 0.5, now),
                AttemptNext::Exhausted,
                "{code:?}"
            );
        }
        // A disable step that failed is no disabled endpoint: tried again later, not failed
        // "disabled"; a moved endpoint is tried again soon, not at once.
        assert_eq!(GoneStep::Disabled.next(now), AttemptNext::Gone);
        assert_eq!(
            GoneStep::Moved.next(now),
            AttemptNext::RetryAt(now + REQUEUE_MS)
        );
        assert_eq!(
            GoneStep::Undecided.next(now),
            AttemptNext::RetryAt(now + GONE_UNDECIDED_MS)
        );
    }

    #[test]
    fn unrecorded_results_are_proposed_again_backing_off_to_a_bound() {
        let waits: Vec<u128> = (1..=12).map(|t| record_backoff(t).as_millis()).collect();
        assert_eq!(waits[0], REQUEUE_MS as u128);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(waits[11], RECORD_BACKOFF_MAX_MS as u128);
    }

    /// What a customer is shown of a transport failure at `url` (a real request).
    async fn shown_for(url: &str, timeout: Duration) -> (TransportFailure, String) {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_else(|e| panic!("client: {e}"));
        let err = match client.post(url).body("{}").send().await {
            Ok(r) => panic!("answered {}", r.status()),
            Err(e) => e,
        };
        assert!(
            error_chain(&err).contains(url),
            "the log's text names the URL"
        );
        let kind = TransportFailure::of(&err);
        (kind, DeliveryError::Transport(kind).to_string())
    }

    #[tokio::test]
    async fn a_customer_is_shown_the_kind_of_a_transport_failure_never_the_url() {
        // Refused: a port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let refused = format!("http://127.0.0.1:{port}/in?token=s3cret");
        let (kind, shown) = shown_for(&refused, Duration::from_secs(5)).await;
        assert_eq!(kind, TransportFailure::Connect);
        assert_eq!(shown, "transport: could not connect");
        // Silent: a listener that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let url = format!(
            "http://{}/in?token=s3cret",
            silent.local_addr().unwrap_or_else(|e| panic!("addr: {e}"))
        );
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                open.push(conn);
            }
        });
        let (kind, shown) = shown_for(&url, Duration::from_millis(300)).await;
        held.abort();
        assert_eq!(kind, TransportFailure::Timeout);
        assert_eq!(shown, "transport: timed out");
        for text in [
            DeliveryError::ForbiddenAddress.to_string(),
            DeliveryError::BadUrl.to_string(),
        ] {
            assert!(
                !text.contains("127.0.0.1") && !text.contains("token"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_command_whose_result_was_not_recorded_keeps_its_backoff() {
        let attempted = |next| DeliveryUpdate::Attempted {
            command_id: "c".into(),
            attempt: AttemptRecord {
                at_ms: 0,
                status_code: Some(503),
                error: None,
                duration_ms: 1,
            },
            next,
        };
        let now = 1_000_000;
        // A failing target is not asked again before its retry...
        assert_eq!(
            resend_at(&attempted(AttemptNext::RetryAt(now + 60_000)), now),
            now + 60_000
        );
        // ...nor anything within a second.
        assert_eq!(
            resend_at(&attempted(AttemptNext::RetryAt(now)), now),
            now + REQUEUE_MS
        );
        assert_eq!(
            resend_at(&attempted(AttemptNext::Delivered), now),
            now + REQUEUE_MS
        );
    }

    #[test]
    fn schedule_with_jitter_and_retry_after() {
        let cfg = DeliveryConfig {
            retry_schedule_secs: vec![0.0, 5.0, 300.0],
            jitter: 0.1,
            ..DeliveryConfig::default()
        };
        assert_eq!(next_delay(&cfg, 1, None, 0.0), Some(Duration::from_secs(5)));
        assert_eq!(
            next_delay(&cfg, 1, None, 1.0),
            Some(Duration::from_secs_f64(5.5))
        );
        assert_eq!(
            next_delay(&cfg, 2, None, 0.0),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            next_delay(&cfg, 3, None, 0.0),
            None,
            "three attempts in all"
        );
        assert_eq!(
            next_delay(&cfg, 1, Some(Duration::from_secs(60)), 0.0),
            Some(Duration::from_secs(60))
        );
    }

    /// Finite doubles spread over every exponent (a fixed sequence, the same every run).
    fn doubles(n: usize) -> Vec<f64> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut out = vec![3e30, 0.1, 1e23, 2.2250738585072014e-308, 123_456.789];
        while out.len() < n {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let f = f64::from_bits(x);
            if f.is_finite() {
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn a_command_carries_every_number_exactly_as_its_rule_computed_it() {
        for f in doubles(20_000) {
            let data = serde_json::json!({ "x": f });
            let command = CommandRecord {
                id: "cmd_1".into(),
                customer_id: "c".into(),
                target: "hotel".into(),
                command_type: "room.hold".into(),
                subject: "guest".into(),
                data_json: data.to_string(),
                event_id: "e".into(),
                event_source: "airline".into(),
                rule_id: "r".into(),
                created_ms: 1,
            };
            let body = command_body(&command);
            let text = String::from_utf8_lossy(&body);
            assert!(
                text.contains(&format!("\"data\":{}", command.data_json)),
                "{f:e}: stored {} but sent {text}",
                command.data_json
            );
            let sent: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
            assert_eq!(
                sent["data"]["x"].as_f64(),
                Some(f),
                "{f:e} arrives as itself"
            );
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
