//! Events relayed to a group's leader in batches: one peer request carries every event
//! queued for that leader, and brings back every answer.
//!
//! An event POSTed to a node that does not lead its group used to cost one HTTP request to
//! the leader each (client side here, server side there). Under load a follower has many in
//! flight at once, so each leader gets a queue: the first event queued is sent at once, and
//! while [`BATCHES_IN_FLIGHT`] requests are out, the events arriving meanwhile wait and leave
//! together. The leader serves each with the same service call as a direct POST, so an
//! answer is the one the entity would have had from the leader (status, headers, body).
//! Every event is answered within the forwarding deadline, whatever its batch does: 503 when
//! the leader did not answer in time or leadership moved (the entity's retry is deduplicated
//! by event id). A leader that does not serve relayed events (an older version, during a
//! rolling upgrade) gets the event proxied as before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::{HttpResponse, ResponseError};
use custos_api::limits::MAX_BODY_BYTES;
use custos_api::webhook::SignedHeaders;
use custos_raft::network::Peers;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::cluster::wire::{RelayedAnswer, RelayedEvent};
use crate::core::Core;
use crate::error::ServiceError;
use crate::service::Vault;

/// Peer requests of events one node has out to one leader at a time. More events queue
/// and leave together when one comes back.
pub const BATCHES_IN_FLIGHT: usize = 4;
/// Most events in one peer request.
pub const MAX_BATCH_EVENTS: usize = 256;
/// Most body bytes in one peer request (a batch holds at least one event of any size).
const MAX_BATCH_BYTES: usize = 4 * MAX_BODY_BYTES;
/// The peer path that serves a batch.
pub const PATH: &str = "/peer/events";
/// Most body bytes a node holds queued for its leaders. Events are queued before the leader
/// checks their signatures, so without a bound anyone could make a follower of a slow or
/// unreachable leader hold whatever they send until each event's deadline; past it, an event
/// is answered 503 at once (the entity retries it).
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// One event waiting to leave, and where its answer goes (`None`: the leader does not serve
/// relayed events).
struct Queued {
    event: RelayedEvent,
    answer: oneshot::Sender<Option<RelayedAnswer>>,
    /// Its share of the queued bytes, given back when it leaves the queue (sent, skipped, or
    /// dropped with its queue).
    _held: Held,
}

/// Body bytes counted against [`MAX_QUEUED_BYTES`] until dropped.
struct Held {
    bytes: usize,
    queued: Arc<AtomicUsize>,
}

impl Held {
    /// Counts `bytes` against `budget`, or None when they would exceed it.
    fn take(queued: &Arc<AtomicUsize>, bytes: usize, budget: usize) -> Option<Held> {
        // Added only if it fits, so the count itself never passes the budget (adding first
        // and taking back would let others see it over, and refuse what fits).
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                q.checked_add(bytes).filter(|after| *after <= budget)
            })
            .ok()?;
        Some(Held {
            bytes,
            queued: queued.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// How many batches and events this node relayed (for `/metrics`).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Peer requests sent.
    pub batches: AtomicU64,
    /// Events in them.
    pub events: AtomicU64,
    /// Events answered 503 at once because the queued bytes were at their bound.
    pub refused: AtomicU64,
}

/// The queues to each leader this node relays events to.
pub struct EventRelay {
    peers: Peers,
    rt: tokio::runtime::Handle,
    /// How long a batch may take before its events are answered 503.
    within: Duration,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>,
    stats: Arc<RelayStats>,
    /// Body bytes queued for every leader, and their bound.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl std::fmt::Debug for EventRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRelay").finish_non_exhaustive()
    }
}

/// The answer when the leader could not be asked or did not answer in time.
fn unavailable() -> RelayedAnswer {
    RelayedAnswer::of_error(&crate::forward::leader_silent())
}

/// The answer when this node already holds its bound of events for its leaders.
fn queue_full() -> RelayedAnswer {
    RelayedAnswer::of_error(&ServiceError::refused(
        custos_api::ErrorCode::Unavailable,
        "this node holds as many events for its group's leader as it may; retry shortly",
    ))
}

impl EventRelay {
    /// Relays over `peers`; batches are sent from tasks on `rt`.
    pub fn new(peers: Peers, rt: tokio::runtime::Handle, within: Duration) -> Self {
        Self::with_bound(peers, rt, within, MAX_QUEUED_BYTES)
    }

    fn with_bound(
        peers: Peers,
        rt: tokio::runtime::Handle,
        within: Duration,
        max_queued: usize,
    ) -> Self {
        EventRelay {
            peers,
            rt,
            within,
            queues: Mutex::new(HashMap::new()),
            stats: Arc::new(RelayStats::default()),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued,
        }
    }

    /// Batches and events relayed so far.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Relays `event` to the leader at peer address `addr` and answers what the leader
    /// answered (503 if it could not be reached in time), or `None` if that leader does not
    /// serve relayed events.
    pub async fn relay(&self, addr: &str, event: RelayedEvent) -> Option<RelayedAnswer> {
        let Some(held) = Held::take(&self.queued, event.body.len(), self.max_queued) else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Some(queue_full());
        };
        let (answer, rx) = oneshot::channel();
        let mut item = Queued {
            event,
            answer,
            _held: held,
        };
        // A queue whose sender task ended (its runtime is stopping) is replaced once.
        for _ in 0..2 {
            let tx = self.queue(addr);
            match tx.send(item) {
                // Waiting for a slot counts against the deadline too.
                Ok(()) => {
                    return match tokio::time::timeout(self.within, rx).await {
                        Ok(Ok(answer)) => answer,
                        Ok(Err(_)) | Err(_) => Some(unavailable()),
                    }
                }
                Err(mpsc::error::SendError(back)) => {
                    item = back;
                    self.queues
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(addr);
                }
            }
        }
        Some(unavailable())
    }

    fn queue(&self, addr: &str) -> mpsc::UnboundedSender<Queued> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = queues.get(addr) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.rt.spawn(send_batches(
            self.peers.clone(),
            addr.to_owned(),
            self.within,
            rx,
            self.stats.clone(),
        ));
        queues.insert(addr.to_owned(), tx.clone());
        tx
    }
}

/// Takes what is queued, up to one batch's bounds, once a request slot is free.
fn take_batch(first: Queued, rx: &mut mpsc::UnboundedReceiver<Queued>) -> Vec<Queued> {
    let mut bytes = first.event.body.len();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_EVENTS && bytes < MAX_BATCH_BYTES {
        match rx.try_recv() {
            // Its caller stopped waiting (deadline passed): not sent.
            Ok(q) if q.answer.is_closed() => {}
            Ok(q) => {
                bytes += q.event.body.len();
                batch.push(q);
            }
            Err(_) => break,
        }
    }
    batch
}

/// One leader's queue: sends batches, at most [`BATCHES_IN_FLIGHT`] at a time.
async fn send_batches(
    peers: Peers,
    addr: String,
    within: Duration,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    stats: Arc<RelayStats>,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // The first event waited for the slot too: once its caller stopped waiting (answered
        // 503), it is not sent either (the leader would commit what the entity was told to
        // send again).
        if first.answer.is_closed() {
            continue;
        }
        let batch = take_batch(first, &mut rx);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .events
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (peers, addr) = (peers.clone(), addr.clone());
        tokio::spawn(async move {
            send_batch(&peers, &addr, within, batch).await;
            drop(slot);
        });
    }
}

async fn send_batch(peers: &Peers, addr: &str, within: Duration, batch: Vec<Queued>) {
    let (events, answers): (Vec<RelayedEvent>, Vec<_>) =
        batch.into_iter().map(|q| (q.event, q.answer)).unzip();
    let replies: Vec<Option<RelayedAnswer>> =
        match crate::peer::ask::<_, Vec<RelayedAnswer>>(peers, addr, PATH, within, &events).await {
            Ok(r) if r.len() == answers.len() => r.into_iter().map(Some).collect(),
            Ok(r) => {
                tracing::warn!(
                    addr,
                    sent = answers.len(),
                    answered = r.len(),
                    "relay answers"
                );
                Vec::new()
            }
            Err(crate::peer::AskError::Status(404)) => vec![None; answers.len()],
            Err(e) => {
                tracing::debug!(addr, error = %e, "relaying events failed");
                Vec::new()
            }
        };
    let mut replies = replies.into_iter();
    for tx in answers {
        let _ = tx.send(replies.next().unwrap_or_else(|| Some(unavailable())));
    }
}

/// Serves one relayed event on this node, which the sender took for its group's leader;
/// answered a second before the sender's deadline, so the answer is back in time. If
/// leadership moved, the entity is told to retry (503); its retry finds the new leader.
pub async fn serve(vault: &Vault, core: &Core, event: RelayedEvent) -> RelayedAnswer {
    let within =
        crate::forward::forward_deadline(&core.config).saturating_sub(Duration::from_secs(1));
    match tokio::time::timeout(within, serve_here(vault, core, &event)).await {
        Ok(Ok(receipt)) => RelayedAnswer::of(HttpResponse::Accepted().json(receipt)),
        Ok(Err(e)) => RelayedAnswer::of_error(&e),
        Err(_) => unavailable(),
    }
}

async fn serve_here(
    vault: &Vault,
    core: &Core,
    event: &RelayedEvent,
) -> Result<custos_api::types::EventReceipt, ServiceError> {
    // Binary mode was refused where it arrived (`forward`); only its content type travels.
    crate::gateway::check_event_media(event.content_type.as_deref().unwrap_or(""), false)?;
    let route = crate::forward::event_route(core, &event.body)?;
    if let Some((_, group)) = route {
        if !core.is_leader(group) {
            return Err(crate::core::not_leader(group));
        }
    }
    let headers = SignedHeaders {
        id: event.webhook_id.as_deref(),
        timestamp: event.webhook_timestamp.as_deref(),
        signature: event.webhook_signature.as_deref(),
    };
    vault.ingest_event(headers, &event.body, route).await
}

impl RelayedAnswer {
    /// The answer a response carries (hop-by-hop headers left out). Answers to events have
    /// whole bodies (a receipt or a problem), never streams.
    pub fn of(resp: HttpResponse) -> RelayedAnswer {
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter(|(n, _)| !crate::forward::hop_by_hop(n.as_str()))
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let body = resp
            .into_body()
            .try_into_bytes()
            .map(|b| b.to_vec())
            .unwrap_or_default();
        RelayedAnswer {
            status,
            headers,
            body,
        }
    }

    /// The answer for an error: its problem+json response.
    pub fn of_error(e: &ServiceError) -> RelayedAnswer {
        RelayedAnswer::of(e.error_response())
    }

    /// This answer as this node's response.
    pub fn into_response(self) -> HttpResponse {
        let status = actix_web::http::StatusCode::from_u16(self.status)
            .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
        let mut out = HttpResponse::build(status);
        for (name, value) in &self.headers {
            out.append_header((name.as_str(), value.as_slice()));
        }
        out.body(self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(bytes: usize) -> RelayedEvent {
        RelayedEvent {
            content_type: None,
            webhook_id: None,
            webhook_timestamp: None,
            webhook_signature: None,
            body: vec![b'x'; bytes],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_holds_at_most_its_bound_of_events_for_a_silent_leader() {
        // A leader that takes connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = silent
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"))
            .to_string();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                open.push(conn);
            }
        });
        let peers = Peers::new("token".into(), None).unwrap_or_else(|e| panic!("peers: {e}"));
        let bound = 10_000;
        let relay = Arc::new(EventRelay::with_bound(
            peers,
            tokio::runtime::Handle::current(),
            Duration::from_secs(2),
            bound,
        ));
        let calls: Vec<_> = (0..200)
            .map(|_| {
                let (relay, addr) = (relay.clone(), addr.clone());
                tokio::spawn(async move {
                    let answer = relay.relay(&addr, event(1_000)).await;
                    assert!(relay.queued.load(Ordering::Acquire) <= bound);
                    answer
                })
            })
            .collect();
        let mut told_full = 0;
        for call in calls {
            let answer = call
                .await
                .unwrap_or_else(|e| panic!("relay call: {e}"))
                .unwrap_or_else(|| panic!("no answer"));
            assert_eq!(answer.status, 503);
            if String::from_utf8_lossy(&answer.body).contains("as many events") {
                told_full += 1;
            }
        }
        // Each of the four batches out takes at most what the bound lets queue (10 events),
        // and 10 more may wait: the other 150 or more are refused at once, and told why.
        let refused = relay.stats().refused.load(Ordering::Relaxed);
        assert!((150..=200).contains(&refused), "{refused}");
        assert_eq!(told_full, refused);
        // What is still queued goes once the batches out time out and free their slots.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while relay.queued.load(Ordering::Acquire) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "queued bytes given back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        held.abort();
    }
}
