//! Forwarding: any node takes any client call. A call for a group this node does not lead
//! (a customer's group, the meta group for entities) is sent to that group's leader over the
//! peer port (events in batches, by [`crate::relay`]), and the leader's answer comes back as if
//! this node had served it.
//!
//! Where a call goes is decided from what it names, without a lookup elsewhere: the customer
//! id in the path, the slot carried by a session cookie, an OAuth state or a command id, and
//! for an event the routing index (entity, subject) -> customer in the local meta replica
//! (with one data group, only that group's leader looks it up: the group is known anyway).
//! Hops are counted and bounded, so a call never loops while leadership moves.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use custos_api::limits::MAX_BODY_BYTES;
use custos_api::webhook::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use custos_api::ErrorCode;
use custos_raft::network::PEER_AUTH_HEADER;
use custos_raft::shard::parse_slot_tag;
use custos_raft::types::GroupId;
use custos_raft::META_GROUP;
use futures::StreamExt;

use crate::core::Core;
use crate::error::ServiceError;

/// How many times a call has been forwarded.
pub const HOPS_HEADER: &str = "x-custos-hops";
/// The client's address, as the first node saw it (trusted only on the peer port).
pub const CLIENT_IP_HEADER: &str = "x-custos-client-ip";
/// Most forwards of one call.
const MAX_HOPS: u32 = 3;
/// How long a call waits for a group to elect a leader before 503.
const LEADER_WAIT: Duration = Duration::from_secs(3);

/// Marks the peer port's app: there, forwarded calls (and their client address) are trusted.
#[derive(Debug, Clone, Copy)]
pub struct OnPeerPort;

/// The client's address: the forwarding node's word for it on the peer port; else, from a
/// trusted proxy, what its X-Forwarded-For says; else the socket's.
pub fn client_ip(req: &HttpRequest) -> Option<IpAddr> {
    if req.app_data::<web::Data<OnPeerPort>>().is_some() {
        if let Some(ip) = req
            .headers()
            .get(CLIENT_IP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            return Some(ip);
        }
    }
    let peer = req.peer_addr()?.ip();
    let Some(core) = req.app_data::<web::Data<Arc<Core>>>() else {
        return Some(peer);
    };
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    Some(forwarded_client(peer, forwarded, &core.trusted_proxies))
}

/// The client behind `peer`: `peer` itself unless it is a trusted proxy; then, walking
/// X-Forwarded-For from the right, the first address that is not a trusted proxy (a client can
/// write anything on the left, so only the proxies' own appends are believed).
pub fn forwarded_client(
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded_for.into_iter().flat_map(|h| h.rsplit(',')) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// An event's body as the forwarder read it, and the route it found: the events handler
/// uses both instead of reading and looking up again.
#[derive(Debug, Clone)]
pub struct ReadEvent {
    /// The body.
    pub body: web::Bytes,
    /// The customer (by the routing index) and the group, when the body named a source and
    /// this node looked it up; `None` also when it did not (an event it relays), so the
    /// handler looks it up itself: `None` never means "no customer".
    pub route: Option<(Option<String>, GroupId)>,
}

/// Where a call must be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Here (health, metrics, cluster calls, signed-out portal pages).
    Local,
    /// On this group's leader.
    Group(GroupId),
}

/// The slot named by a vault-issued id: `<3 hex>.<random>` (sessions, OAuth states) or
/// `cmd_<3 hex>...` (command ids).
pub fn slot_of_token(token: &str) -> Option<u16> {
    let t = token.strip_prefix("cmd_").unwrap_or(token);
    parse_slot_tag(t)
}

/// An event body's `source` and `subject` (empty when absent), if it names a source and both
/// are well-formed. This runs before the signature is checked, and the route it yields is
/// looked up and cached: an id or subject outside their bounds (128 characters) gets no route,
/// so nobody can fill the route cache with large keys; the event is then refused where it
/// landed.
fn event_head(body: &[u8]) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Head {
        source: Option<String>,
        subject: Option<String>,
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    let source = head.source.filter(|s| custos_api::limits::is_valid_id(s))?;
    let subject = head.subject.unwrap_or_default();
    (subject.is_empty() || custos_api::limits::is_valid_subject(&subject))
        .then_some((source, subject))
}

/// An event body's route: the customer (by the routing index) and the group, when the body
/// names a source.
pub(crate) fn event_route(
    core: &Core,
    body: &[u8],
) -> Result<Option<(Option<String>, GroupId)>, ServiceError> {
    event_head(body)
        .map(|(source, subject)| core.route_event(&source, &subject))
        .transpose()
}

/// The group of an event this node will relay, found without the routing index: with one
/// data group every event goes to it, whoever its customer is, so a node that does not lead
/// that group leaves the lookup (a read on a cold route cache) to the leader, which makes it
/// anyway. `None`: look the route up here (several groups, this node leads, no source, or
/// no cluster yet).
fn relay_route(core: &Core, body: &[u8]) -> Option<GroupId> {
    // A cluster not initialised yet is answered by the lookup's path, as before.
    match core.shard_map().ok().and_then(|m| m.sole_group()) {
        Some(group) if !core.is_leader(group) && event_head(body).is_some() => Some(group),
        _ => None,
    }
}

/// Decides where a call goes, from its path, query and cookies (events are routed by their
/// body, in [`forward`]).
pub fn route(core: &Core, req: &HttpRequest) -> Result<Route, ServiceError> {
    let session = crate::portal::request_cookie(req, crate::portal::SESSION_COOKIE);
    // The path as the router reads it (percent-decoded but for `%`, `/` and `+`): a customer
    // id sent as `cus%5F...` is routed to the group of the id the handler will see.
    match routed_by(
        req.match_info().as_str(),
        req.query_string(),
        session.as_ref().map(|c| c.value()),
    ) {
        RoutedBy::Customer(id) => Ok(Route::Group(core.group_of(id)?)),
        RoutedBy::Meta => Ok(Route::Group(META_GROUP)),
        RoutedBy::Slot(slot) => core.group_of_slot(slot).map(Route::Group),
        RoutedBy::Local => Ok(Route::Local),
    }
}

/// What in a call names the group that serves it.
#[derive(Debug, PartialEq)]
enum RoutedBy<'a> {
    /// A customer id in the path.
    Customer(&'a str),
    /// The meta group's calls.
    Meta,
    /// The slot in a token the vault issued (a command id, an OAuth state, a session).
    Slot(u16),
    /// Nothing: served here.
    Local,
}

/// The part of [`route`] that reads the call: its path, query and session cookie.
fn routed_by<'a>(path: &'a str, query: &str, session: Option<&str>) -> RoutedBy<'a> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let by_token = |token: Option<&str>| {
        token
            .and_then(slot_of_token)
            .map_or(RoutedBy::Local, RoutedBy::Slot)
    };
    match segs.as_slice() {
        ["v1", "customers", id, ..] if !id.is_empty() => RoutedBy::Customer(id),
        ["v1", "entities", ..] | ["v1", "recommendations", "train"] => RoutedBy::Meta,
        ["v1", "deliveries", id, ..] => by_token(Some(id)),
        // `/v1/oauth/callback/{entity}`: the state names the group of the customer linking,
        // where the linking and the portal session are.
        ["v1", "oauth", "callback", ..] => {
            let state = web::Query::<Vec<(String, String)>>::from_query(query)
                .ok()
                .and_then(|q| q.0.into_iter().find(|(k, _)| k == "state").map(|(_, v)| v));
            by_token(state.as_deref())
        }
        ["portal", ..] => by_token(session),
        _ => RoutedBy::Local,
    }
}

/// The middleware: serve here, or forward to the leader of the call's group.
pub async fn forward(
    mut req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody, BoxBody>>, actix_web::Error> {
    let Some(core) = req
        .app_data::<web::Data<Arc<Core>>>()
        .map(|c| c.get_ref().clone())
    else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    // A call may be forwarded to a leader's peer port, where the peer routes are too; the
    // forwarded URL is parsed again there (reqwest's `url`), which resolves `..`, `%2e%2e` and
    // backslashes: `/v1/entities/x/../../peer/propose/0` would reach a peer route with this
    // node's peer token. Only paths that parse back to themselves go on.
    if !in_normal_form(req.uri().path()) {
        let e = ServiceError::invalid("path", "must not hold `.` or `..` segments or backslashes");
        return Ok(req.error_response(e).map_into_right_body());
    }
    let on_peer_port = req.app_data::<web::Data<OnPeerPort>>().is_some();
    let hops: u32 = if on_peer_port {
        req.headers()
            .get(HOPS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    // Only an event's body decides its route; read it (bounded), put it back, and keep it
    // with its route for the handler.
    let mut body: Option<web::Bytes> = None;
    let route = if req.match_info().as_str() == "/v1/events"
        && req.method() == actix_web::http::Method::POST
    {
        // Checked here, before the body is read: an event relayed to its leader travels
        // without its headers, and the handler takes the `ReadEvent` as checked.
        let content_type = req
            .headers()
            .get(actix_web::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Err(e) = crate::gateway::check_event_media(
            content_type,
            crate::gateway::binary_mode(req.request()),
        ) {
            return Ok(req.error_response(e).map_into_right_body());
        }
        let b = match read_bounded(req.take_payload(), MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(e) => return Ok(req.error_response(e).map_into_right_body()),
        };
        req.set_payload(Payload::from(b.clone()));
        let (route, found) = match relay_route(&core, &b) {
            Some(group) => (Route::Group(group), None),
            None => match event_route(&core, &b) {
                Ok(found) => (
                    found
                        .as_ref()
                        .map_or(Route::Local, |(_, g)| Route::Group(*g)),
                    found,
                ),
                Err(e) => return Ok(req.error_response(e).map_into_right_body()),
            },
        };
        req.extensions_mut().insert(ReadEvent {
            body: b.clone(),
            route: found,
        });
        body = Some(b);
        route
    } else {
        match route(&core, req.request()) {
            Ok(r) => r,
            Err(e) => return Ok(req.error_response(e).map_into_right_body()),
        }
    };
    // A client's call has its body read now, bounded and within the read deadline, whether it
    // is served here or forwarded: the handler's extractors read it without a deadline, and
    // before the handler checks the token, so anyone could hold a connection and its buffer by
    // trickling a body (an event's is read above; a peer's Raft messages are larger, and peers
    // are authenticated first).
    if body.is_none() && !on_peer_port {
        if let Err(e) = buffer_body(&mut req).await {
            return Ok(req.error_response(e).map_into_right_body());
        }
    }
    let Route::Group(group) = route else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let leader = match wait_leader(&core, group).await {
        Some(l) => l,
        None => {
            let e = ServiceError::refused(
                ErrorCode::Unavailable,
                format!("group {group} has no leader right now; retry shortly"),
            );
            return Ok(req.error_response(e).map_into_right_body());
        }
    };
    if leader.0 == core.node_id {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    if hops >= MAX_HOPS {
        let e = ServiceError::refused(
            ErrorCode::Unavailable,
            format!("group {group}'s leadership is moving; retry shortly"),
        );
        return Ok(req.error_response(e).map_into_right_body());
    }
    if let Some(body) = body {
        // Events go in batches: one peer request carries every event queued for the leader.
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let event = crate::cluster::wire::RelayedEvent {
            content_type: header("content-type"),
            webhook_id: header(HEADER_ID),
            webhook_timestamp: header(HEADER_TIMESTAMP),
            webhook_signature: header(HEADER_SIGNATURE),
            body: body.to_vec(),
        };
        if let Some(answer) = core.relay.relay(&leader.1, event).await {
            return Ok(req
                .into_response(answer.into_response())
                .map_into_right_body());
        }
        // That leader does not serve relayed events (an older version): proxied.
        let resp = proxy(&core, req.request(), &leader.1, hops + 1, body).await;
        return Ok(req.into_response(resp).map_into_right_body());
    }
    let body = match read_bounded(req.take_payload(), MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => return Ok(req.error_response(e).map_into_right_body()),
    };
    let resp = proxy(&core, req.request(), &leader.1, hops + 1, body).await;
    Ok(req.into_response(resp).map_into_right_body())
}

/// Reads the request's body (bounded, within the read deadline) and puts it back for the
/// handler. Whatever its headers say: an HTTP/2 request streams a body without
/// `Content-Length` or `Transfer-Encoding`, and a request without one ends at once.
async fn buffer_body(req: &mut ServiceRequest) -> Result<(), ServiceError> {
    let body = read_bounded(req.take_payload(), MAX_BODY_BYTES).await?;
    if !body.is_empty() {
        req.set_payload(Payload::from(body));
    }
    Ok(())
}

/// The group's leader, waiting a little while one is being elected.
async fn wait_leader(core: &Core, group: GroupId) -> Option<(u64, String)> {
    let started = std::time::Instant::now();
    loop {
        if core.is_leader(group) {
            return Some((core.node_id, String::new()));
        }
        if let Some(l) = core.leader_of(group) {
            return Some(l);
        }
        if started.elapsed() > LEADER_WAIT {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a body of at most `limit` bytes (413 beyond), which must arrive within
/// [`crate::error::BODY_READ_TIMEOUT`] of its headers.
pub(crate) async fn read_bounded(
    mut payload: Payload,
    limit: usize,
) -> Result<web::Bytes, ServiceError> {
    let read = async {
        let mut buf = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(crate::error::payload_error)?;
            if buf.len() + chunk.len() > limit {
                return Err(crate::error::payload_error(
                    actix_web::error::PayloadError::Overflow,
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(crate::error::BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| crate::error::body_too_slow())?
}

/// Headers that describe one connection, not the message: never passed on.
pub(crate) fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// How long a call forwarded to a group's leader may take: a leader that stopped answering
/// (paused, cut off) is given the commit deadline and a little more; then the caller is told
/// to retry, and finds the new leader.
pub fn forward_deadline(config: &crate::config::Config) -> Duration {
    Duration::from_millis(config.raft.propose_timeout_ms + 2000)
}

/// True for the calls that unlink an entity or erase a customer (the API's and the
/// portal's). The leader answers one only after the attempts still sending to the entity
/// (to any, for an erasure) have finished and the tokens are revoked
/// (`core::unlink_answer_bound`), so a node forwarding it waits that much longer: given only
/// the commit deadline it would answer 503 for a change that was committed.
fn unlinks(method: &actix_web::http::Method, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "v1", "customers", _, "links", _] | ["", "v1", "customers", _] => {
            method == actix_web::http::Method::DELETE
        }
        ["", "portal", "unlink", _] | ["", "portal", "delete"] => {
            method == actix_web::http::Method::POST
        }
        _ => false,
    }
}

/// True for the calls that finish a linking: the OAuth callback, and a link made through the
/// API. The leader answers one after the provider's answers and several proposals
/// (`core::link_answer_bound`); given only the commit deadline, a node forwarding it would
/// answer 503 for a linking that goes through, and the customer's retry would find its state
/// spent.
fn links(method: &actix_web::http::Method, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "v1", "oauth", "callback", _] => method == actix_web::http::Method::GET,
        ["", "v1", "customers", _, "links"] => method == actix_web::http::Method::POST,
        _ => false,
    }
}

/// The answer when the leader a call was forwarded to did not answer in time.
pub(crate) fn leader_silent() -> ServiceError {
    ServiceError::refused(
        ErrorCode::Unavailable,
        "the node leading this call's group did not answer; retry shortly",
    )
}

/// Whether a request path is what an URL parser makes of it: no dot segments (also
/// percent-encoded), no backslashes, nothing it would encode.
fn in_normal_form(path: &str) -> bool {
    // Most paths (every event's, every Raft message's) hold only bytes a parser keeps as they
    // are and no `.`, `%` or `\`: nothing to resolve, so no parse (and no allocation).
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"/-_~:@!$&'()*+,;=".contains(&b);
    path.starts_with('/') && path.bytes().all(plain)
        || reqwest::Url::parse(&format!("http://vault{path}")).is_ok_and(|u| u.path() == path)
}

/// Sends the call to `addr` (a peer port) and turns its answer into this node's answer.
async fn proxy(
    core: &Core,
    req: &HttpRequest,
    addr: &str,
    hops: u32,
    body: web::Bytes,
) -> HttpResponse {
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut deadline = forward_deadline(&core.config);
    if unlinks(req.method(), req.match_info().as_str()) {
        deadline += crate::core::unlink_answer_bound(&core.config);
    } else if links(req.method(), req.match_info().as_str()) {
        deadline += crate::core::link_answer_bound(&core.config);
    }
    let mut rb = core.peers.request(method, addr, path).timeout(deadline);
    for (name, value) in req.headers() {
        let n = name.as_str();
        if hop_by_hop(n) || n == HOPS_HEADER || n == CLIENT_IP_HEADER || n == PEER_AUTH_HEADER {
            continue;
        }
        rb = rb.header(n, value.as_bytes());
    }
    rb = rb.header(HOPS_HEADER, hops.to_string());
    if let Some(ip) = client_ip(req) {
        rb = rb.header(CLIENT_IP_HEADER, ip.to_string());
    }
    let resp = match rb.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(addr, error = %e, "forwarding failed");
            return actix_web::ResponseError::error_response(&leader_silent());
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = HttpResponse::build(status);
    for (name, value) in resp.headers() {
        if hop_by_hop(name.as_str()) {
            continue;
        }
        out.append_header((name.as_str(), value.as_bytes()));
    }
    out.streaming(resp.bytes_stream())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_in_normal_form_are_taken() {
        for path in [
            "/v1/customers/c1/rules",
            "/v1/entities/a.b",
            "/v1/entities/...",
            "/",
        ] {
            assert!(in_normal_form(path), "{path}");
        }
        for path in [
            "/v1/entities/x/../../peer/status",
            "/v1/entities/x/%2e%2e/peer/status",
            "/v1/entities/x/%2E./peer",
            "/v1/entities/./x",
            "/v1/entities/x\\..\\peer",
            "/v1/entities/{x}",
        ] {
            assert!(!in_normal_form(path), "{path}");
        }
    }

    #[test]
    fn a_percent_encoded_id_is_routed_as_the_handler_reads_it() {
        let req = actix_web::test::TestRequest::default()
            .uri("/v1/customers/cus%5Fabc/rules")
            .to_http_request();
        assert_eq!(
            routed_by(req.match_info().as_str(), "", None),
            RoutedBy::Customer("cus_abc")
        );
    }

    #[test]
    fn only_well_formed_event_heads_are_routed() {
        assert_eq!(
            event_head(br#"{"source":"airline","subject":"FF-1"}"#),
            Some(("airline".into(), "FF-1".into()))
        );
        assert_eq!(
            event_head(br#"{"source":"airline"}"#),
            Some(("airline".into(), String::new()))
        );
        let long = "x".repeat(100_000);
        for body in [
            format!(r#"{{"source":"{long}","subject":"FF-1"}}"#),
            format!(r#"{{"source":"airline","subject":"{long}"}}"#),
            r#"{"source":"air line","subject":"FF-1"}"#.to_owned(),
            r#"{"subject":"FF-1"}"#.to_owned(),
        ] {
            assert_eq!(event_head(body.as_bytes()), None);
        }
    }

    #[test]
    fn calls_are_routed_by_what_names_their_group() {
        let token = crate::service::customers::slotted_token("cus_1");
        let slot = slot_of_token(&token).unwrap_or_else(|| panic!("{token} has no slot"));
        assert_eq!(
            routed_by("/v1/customers/cus_1/rules", "", None),
            RoutedBy::Customer("cus_1")
        );
        assert_eq!(routed_by("/v1/entities/hotel", "", None), RoutedBy::Meta);
        // The entity's provider sends the customer back to `/v1/oauth/callback/{entity}`: the
        // state routes it (it was served wherever it landed before, where the customer's
        // group may have no replica).
        assert_eq!(
            routed_by(
                "/v1/oauth/callback/bank",
                &format!("code=c&state={token}"),
                None
            ),
            RoutedBy::Slot(slot)
        );
        assert_eq!(
            routed_by("/v1/oauth/callback/bank", "error=access_denied", None),
            RoutedBy::Local
        );
        assert_eq!(
            routed_by("/portal/catalog", "", Some(&token)),
            RoutedBy::Slot(slot)
        );
        assert_eq!(routed_by("/portal/catalog", "", None), RoutedBy::Local);
        assert_eq!(routed_by("/v1/events", "", None), RoutedBy::Local);
    }

    #[test]
    fn unlinks_are_told_from_other_calls() {
        use actix_web::http::Method;
        assert!(unlinks(&Method::DELETE, "/v1/customers/cus_1/links/hotel"));
        assert!(unlinks(&Method::POST, "/portal/unlink/hotel"));
        assert!(!unlinks(&Method::GET, "/v1/customers/cus_1/links/hotel"));
        assert!(!unlinks(
            &Method::POST,
            "/v1/customers/cus_1/links/hotel/authorize"
        ));
        assert!(
            unlinks(&Method::DELETE, "/v1/customers/cus_1"),
            "an erasure"
        );
        assert!(unlinks(&Method::POST, "/portal/delete"));
        assert!(!unlinks(&Method::GET, "/v1/customers/cus_1"));
        assert!(!unlinks(&Method::POST, "/v1/events"));
    }

    #[test]
    fn linkings_are_told_from_other_calls() {
        use actix_web::http::Method;
        assert!(links(&Method::GET, "/v1/oauth/callback/hotel"));
        assert!(links(&Method::POST, "/v1/customers/cus_1/links"));
        assert!(!links(&Method::GET, "/v1/customers/cus_1/links"));
        assert!(!links(
            &Method::POST,
            "/v1/customers/cus_1/links/hotel/authorize"
        ));
        assert!(!links(&Method::DELETE, "/v1/customers/cus_1/links/hotel"));
        assert!(!links(&Method::POST, "/v1/events"));
    }

    #[test]
    fn the_client_behind_trusted_proxies_only() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        // Not from a proxy: the header is the client's own word, ignored.
        assert_eq!(
            forwarded_client(ip("203.0.113.9"), Some("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
        // From a proxy: the right-most address the proxies did not add themselves.
        assert_eq!(
            forwarded_client(
                ip("10.0.0.2"),
                Some("6.6.6.6, 198.51.100.7, 10.0.0.1"),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // A proxy with nothing to say, or garbage: the last believable address.
        assert_eq!(
            forwarded_client(ip("10.0.0.2"), None, &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.2"), Some("nonsense, 10.0.0.5"), &trusted),
            ip("10.0.0.5")
        );
        // No trusted proxies configured: always the socket.
        assert_eq!(
            forwarded_client(ip("10.0.0.2"), Some("1.2.3.4"), &[]),
            ip("10.0.0.2")
        );
    }
}
