//! The peer port, apart from the client API: Raft RPCs of every group, proposals forwarded
//! to this node as a group's leader, joins, leadership hand-overs, status, per-group queries,
//! and client requests forwarded here by other nodes (served by the same handlers as the
//! client API). Every request must carry the peer token derived from the cluster secret.

use std::sync::Arc;

use actix_web::body::EitherBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{web, HttpResponse, ResponseError};
use custos_raft::network::{encode_reply, PEER_AUTH_HEADER};
use custos_raft::shard::MAX_DATA_GROUPS;
use custos_raft::{codec, ProposeError, StateChange};

use crate::cluster::wire::{GroupAnswer, GroupQuery, JoinRequest, RelayedEvent, TrainingInput};
use crate::core::{Core, Group};

/// Largest peer message (snapshot chunks are smaller; appends are cut to fit).
pub const MAX_PEER_BODY: usize = custos_raft::network::MAX_PEER_MESSAGE;

/// Why a peer request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The body is not a request of this format version.
    #[error("undecodable peer request: {0}")]
    Decode(#[from] custos_raft::codec::CodecError),
    /// This node has no such group and will not open it.
    #[error("no group {0} here")]
    NoGroup(u32),
    /// A batch of relayed events larger than a node sends.
    #[error("{0} relayed events in one batch (at most {max})", max = crate::relay::MAX_BATCH_EVENTS)]
    TooMany(usize),
}

impl ResponseError for PeerError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        match self {
            PeerError::Decode(_) | PeerError::TooMany(_) => {
                actix_web::http::StatusCode::BAD_REQUEST
            }
            PeerError::NoGroup(_) => actix_web::http::StatusCode::NOT_FOUND,
        }
    }
}

/// The peer token this node expects.
#[derive(Debug, Clone)]
pub struct PeerToken(pub Arc<str>);

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// True when the request proves the cluster secret.
pub fn authenticated(req: &ServiceRequest) -> bool {
    let Some(expected) = req.app_data::<web::Data<PeerToken>>() else {
        return false;
    };
    req.headers()
        .get(PEER_AUTH_HEADER)
        .is_some_and(|v| same(v.as_bytes(), expected.0.as_bytes()))
}

/// Refuses (401, nothing changed) every request without the peer token.
pub async fn require_token<B>(
    req: ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error>
where
    B: actix_web::body::MessageBody + 'static,
{
    if !authenticated(&req) {
        let resp = HttpResponse::Unauthorized()
            .content_type("text/plain")
            .body("peer requests must carry this cluster's peer token");
        return Ok(req.into_response(resp).map_into_right_body());
    }
    if forwarded_to_peer_route(&req) {
        let resp = HttpResponse::Forbidden()
            .content_type("text/plain")
            .body("a forwarded client call reaches the client API only");
        return Ok(req.into_response(resp).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// A client call another node forwarded (it carries the hop count) addressed to a peer route:
/// whatever its path said where it arrived, a client never reaches Raft or the peer RPC.
/// Both the path as sent and as the router reads it (percent-decoded: `/%70eer/...`).
fn forwarded_to_peer_route(req: &ServiceRequest) -> bool {
    let peer_route = |path: &str| {
        let path = path.trim_start_matches('/');
        path.starts_with("raft/") || path.starts_with("peer/")
    };
    req.headers().contains_key(crate::forward::HOPS_HEADER)
        && (peer_route(req.path()) || peer_route(req.match_info().as_str()))
}

fn reply<T: serde::Serialize, E: serde::Serialize>(r: &Result<T, E>) -> HttpResponse {
    match encode_reply(r) {
        Ok(bytes) => HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(bytes),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

/// The local replica of `group`, opened on first contact when the placement gives this node
/// the group: a leader adding this node as a replica reaches it before this node's manager
/// opens it. A group placed elsewhere is not opened: a replica this node deleted, reopened
/// empty by a late message, would vote for any candidate (see [`vote`]).
async fn replica(core: &Core, group: u32) -> Result<Arc<Group>, PeerError> {
    if let Some(g) = core.group(group) {
        return Ok(g);
    }
    if group > MAX_DATA_GROUPS || core.is_closing() || !core.placed_here(group).await {
        return Err(PeerError::NoGroup(group));
    }
    core.open_group(group)
        .await
        .map_err(|_| PeerError::NoGroup(group))
}

async fn append(
    core: web::Data<Arc<Core>>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let g = replica(&core, *group).await?;
    Ok(reply(&g.raft.append_entries(codec::decode(&body)?).await))
}

async fn vote(
    core: web::Data<Arc<Core>>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    // Never opens a replica: an empty one grants its vote to any candidate, and a former
    // voter that missed its group's move (down or cut off) would be elected by the replicas
    // other former voters deleted, and overwrite what the group's real leader committed.
    // Refusing a vote costs at most an election round.
    let g = core.group(*group).ok_or(PeerError::NoGroup(*group))?;
    Ok(reply(&g.raft.vote(codec::decode(&body)?).await))
}

async fn snapshot(
    core: web::Data<Arc<Core>>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let g = replica(&core, *group).await?;
    Ok(reply(&g.raft.install_snapshot(codec::decode(&body)?).await))
}

/// A proposal forwarded by a node that does not lead the group: proposed here, never
/// forwarded again (the sender retries with the leader this node names).
async fn propose(
    core: web::Data<Arc<Core>>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let change: StateChange = codec::decode(&body)?;
    let deadline = std::time::Duration::from_millis(core.config.raft.propose_timeout_ms);
    let result = match core.group(*group) {
        Some(g) => core.propose_here(&g, &change, deadline).await,
        None => Err(ProposeError::NotLeader {
            leader: None,
            addr: None,
        }),
    };
    Ok(reply(&result))
}

/// Events relayed in one batch by a node that does not lead their groups: each served as a
/// direct POST would be, all at once, answered in order.
async fn relayed_events(
    vault: web::Data<crate::service::Vault>,
    core: web::Data<Arc<Core>>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let events: Vec<RelayedEvent> = codec::decode(&body)?;
    if events.len() > crate::relay::MAX_BATCH_EVENTS {
        return Err(PeerError::TooMany(events.len()));
    }
    let answers = futures::future::join_all(
        events
            .into_iter()
            .map(|e| crate::relay::serve(&vault, &core, e)),
    )
    .await;
    Ok(reply(&Ok::<_, ()>(answers)))
}

/// The join's query: `fresh` when the node holds no Raft state.
#[derive(Debug, Default, serde::Deserialize)]
struct JoinQuery {
    #[serde(default)]
    fresh: bool,
}

async fn join(
    core: web::Data<Arc<Core>>,
    query: web::Query<JoinQuery>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let req: JoinRequest = codec::decode(&body)?;
    let result = crate::cluster::accept_join(&core, req, query.fresh)
        .await
        .map_err(|e| e.to_string());
    Ok(reply(&result))
}

/// Asked by a group's leader handing leadership over: campaign now.
async fn elect(core: web::Data<Arc<Core>>, group: web::Path<u32>) -> HttpResponse {
    match core.group(*group) {
        Some(g) => {
            let _ = g.raft.trigger().elect().await;
            HttpResponse::Ok().finish()
        }
        None => HttpResponse::NotFound().finish(),
    }
}

/// The status query: `?digests=true` adds state digests.
#[derive(Debug, serde::Deserialize)]
pub struct StatusQuery {
    /// Compute each group's state digest.
    #[serde(default)]
    pub digests: bool,
}

async fn status(core: web::Data<Arc<Core>>, q: web::Query<StatusQuery>) -> HttpResponse {
    let (core, digests) = (core.get_ref().clone(), q.digests);
    // Digests scan every group: off the event loop.
    let local = tokio::task::spawn_blocking(move || crate::cluster::status::local(&core, digests))
        .await
        .map_err(|e| e.to_string());
    reply(&local.map_err(|_| ()))
}

async fn query(
    core: web::Data<Arc<Core>>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let q: GroupQuery = codec::decode(&body)?;
    let answer = answer_query(&core, *group, q).await;
    Ok(reply(&Ok::<_, ()>(answer)))
}

/// Answers a query about `group` from this node's replica, as its leader.
pub async fn answer_query(core: &Core, group: u32, q: GroupQuery) -> GroupAnswer {
    if let Err(e) = core.ensure_leader(group).await {
        return GroupAnswer::Refused(e.to_string());
    }
    let result = match q {
        GroupQuery::Deliveries {
            state,
            after,
            limit,
        } => core
            .read(group, move |r| r.deliveries(state, after.as_deref(), limit))
            .await
            .map(|(items, next)| GroupAnswer::Deliveries(items, next)),
        GroupQuery::TrainingInput { max_customers } => core
            .read(group, move |r| {
                let mut input = TrainingInput {
                    rules: r.all_rules()?,
                    links: r.all_links()?,
                    engagements: r.engagements(None)?,
                    dismissals: r.dismissal_counts()?,
                };
                crate::recommend::vault::sample_training(&mut input, max_customers);
                Ok(input)
            })
            .await
            .map(|t| GroupAnswer::TrainingInput(Box::new(t))),
        GroupQuery::SubjectClaim { entity_id, subject } => core
            .read(group, move |r| r.customer_for_subject(&entity_id, &subject))
            .await
            .map(GroupAnswer::SubjectClaim),
    };
    result.unwrap_or_else(|e| GroupAnswer::Refused(e.to_string()))
}

/// Asks `group`'s leader (this node or another) a question.
pub async fn ask_group(core: &Core, group: u32, q: GroupQuery) -> Result<GroupAnswer, String> {
    if core.is_leader(group) {
        return Ok(answer_query(core, group, q).await);
    }
    let (_, addr) = core
        .leader_of(group)
        .ok_or_else(|| format!("group {group} has no known leader"))?;
    let path = format!("/peer/query/{group}");
    ask(
        &core.peers,
        &addr,
        &path,
        std::time::Duration::from_secs(30),
        &q,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Why [`ask`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The peer answered with this HTTP status (404: it does not serve the path).
    #[error("peer answered {0}")]
    Status(u16),
    /// No answer, or one that does not decode, or a refusal.
    #[error("{0}")]
    Failed(String),
}

/// POSTs `request` to a peer's `path` and decodes its answer (a reply of [`reply`] that
/// is not an error).
pub async fn ask<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
    peers: &custos_raft::network::Peers,
    addr: &str,
    path: &str,
    within: std::time::Duration,
    request: &Q,
) -> Result<A, AskError> {
    let failed = |e: &dyn std::fmt::Display| AskError::Failed(e.to_string());
    let body = codec::encode(request).map_err(|e| failed(&e))?;
    let r = peers
        .post(addr, path)
        .timeout(within)
        .body(body)
        .send()
        .await
        .map_err(|e| failed(&e))?;
    if !r.status().is_success() {
        return Err(AskError::Status(r.status().as_u16()));
    }
    let bytes = r.bytes().await.map_err(|e| failed(&e))?;
    codec::decode::<Result<A, ()>>(&bytes)
        .map_err(|e| failed(&e))?
        .map_err(|()| AskError::Failed("refused".to_owned()))
}

/// Registers the peer routes (the client API's routes are added next to them, behind the
/// same token check, for forwarded requests).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_PEER_BODY))
        .route("/raft/{group}/append", web::post().to(append))
        .route("/raft/{group}/vote", web::post().to(vote))
        .route("/raft/{group}/snapshot", web::post().to(snapshot))
        .route("/peer/propose/{group}", web::post().to(propose))
        .route("/peer/join", web::post().to(join))
        .route("/peer/elect/{group}", web::post().to(elect))
        .route("/peer/status", web::get().to(status))
        .route("/peer/query/{group}", web::post().to(query))
        .route(crate::relay::PATH, web::post().to(relayed_events));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_client_call_never_reaches_a_peer_route() {
        let req = |path: &str, forwarded: bool| {
            let mut r = actix_web::test::TestRequest::get().uri(path);
            if forwarded {
                r = r.insert_header((crate::forward::HOPS_HEADER, "1"));
            }
            forwarded_to_peer_route(&r.to_srv_request())
        };
        assert!(req("/peer/status", true));
        assert!(req("/raft/1/append", true));
        assert!(req("//peer/propose/0", true));
        assert!(req("/%70eer/status", true));
        assert!(req("/%72aft/1/vote", true));
        assert!(!req("/peer/status", false), "a peer's own call");
        assert!(!req("/v1/customers/c1", true), "a forwarded client call");
    }
}
