//! The client API: actix-web handlers that decode, call one [`Vault`] method, and encode.
//! Every error leaves as problem+json; the OpenAPI document is generated from these routes.

use actix_web::http::header;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use custos_api::cloudevent::CLOUDEVENTS_CONTENT_TYPE;
use custos_api::limits::MAX_BODY_BYTES;
use custos_api::types::*;
use custos_api::webhook::{SignedHeaders, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use custos_api::{CloudEvent, ErrorCode, Problem};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::error::{json_error, payload_error, ServiceError};
use crate::service::{CallbackParams, Vault};
use crate::telemetry::Telemetry;

type Result<T> = std::result::Result<T, ServiceError>;

/// The token of `Authorization: Bearer <token>` (the scheme's name in any case, RFC 9110).
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Reads a body up to `limit` bytes, refusing more with 413 problem+json (at once when its
/// `Content-Length` says so), within [`crate::error::BODY_READ_TIMEOUT`].
async fn read_body(req: &HttpRequest, payload: web::Payload, limit: usize) -> Result<web::Bytes> {
    if let Some(len) = header_str(req, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        if len > limit {
            return Err(payload_error(actix_web::error::PayloadError::Overflow));
        }
    }
    crate::forward::read_bounded(payload.into_inner(), limit).await
}

/// A JSON request body that must be an object. serde also builds a struct from an array (its
/// fields by position), which no client means: `["Renamed"]` is refused, not a rename.
#[derive(Debug)]
pub struct JsonObject<T>(T);

impl<T> JsonObject<T> {
    /// The decoded body.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T: serde::de::DeserializeOwned + 'static> actix_web::FromRequest for JsonObject<T> {
    type Error = actix_web::Error;
    type Future = futures::future::LocalBoxFuture<'static, std::result::Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        // Through `web::Json`, so its size limit, media type check and problems still apply.
        let value = web::Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let web::Json(v) = value.await?;
            if !v.is_object() {
                return Err(ServiceError::refused(
                    ErrorCode::MalformedBody,
                    "the body must be a JSON object",
                )
                .into());
            }
            serde_json::from_value(v)
                .map(JsonObject)
                .map_err(|e| ServiceError::refused(ErrorCode::MalformedBody, e.to_string()).into())
        })
    }
}

/// Paging of activity.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ActivityQuery {
    /// Items per page (1..=500, default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    #[param(pattern = r"^([0-9a-fA-F]{2}){1,512}$", max_length = 1024)]
    pub before: Option<String>,
}

/// Filter and paging of deliveries.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    /// pending, delivered, failed or cancelled (default failed).
    pub status: Option<DeliveryStatus>,
    /// Items per page (1..=500, default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    #[param(
        pattern = r"^[1-9][0-9]{0,3}\.([0-9a-fA-F]{2}){0,512}$",
        max_length = 1029
    )]
    pub after: Option<String>,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive")))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Readiness: a leader exists here and storage answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
async fn readyz(vault: web::Data<Vault>) -> HttpResponse {
    let r = vault.readiness().await;
    if r.ready {
        HttpResponse::Ok().json(r)
    } else {
        HttpResponse::ServiceUnavailable().json(r)
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
async fn metrics(vault: web::Data<Vault>, telemetry: web::Data<Telemetry>) -> HttpResponse {
    let text = telemetry.render(vault.core()).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 description of every route")))]
async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(document())
}

/// Whether an event came with binary mode's headers.
pub(crate) fn binary_mode(req: &HttpRequest) -> bool {
    req.headers().contains_key("ce-specversion")
}

/// Refuses (415) an event whose `content-type` is not a structured CloudEvent, or that comes
/// in binary mode (`ce-specversion` among its headers: its body is only the data, which would
/// otherwise be refused as a body missing `specversion`, telling the sender nothing useful).
pub(crate) fn check_event_media(content_type: &str, binary_mode: bool) -> Result<()> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    // The content type decides the mode (CloudEvents HTTP binding): a structured event with a
    // stray `ce-*` header some gateway added is still structured.
    if binary_mode && !media.eq_ignore_ascii_case(CLOUDEVENTS_CONTENT_TYPE) {
        return Err(ServiceError::refused(
            ErrorCode::UnsupportedMediaType,
            format!(
                "binary mode (ce-* headers) is not accepted: send the event in structured mode, \
                 its attributes in the body, as {CLOUDEVENTS_CONTENT_TYPE}"
            ),
        ));
    }
    if !media.eq_ignore_ascii_case(CLOUDEVENTS_CONTENT_TYPE)
        && !media.eq_ignore_ascii_case("application/json")
    {
        return Err(ServiceError::refused(
            ErrorCode::UnsupportedMediaType,
            format!("send {CLOUDEVENTS_CONTENT_TYPE} (structured mode)"),
        ));
    }
    Ok(())
}

/// An entity sends an event about a customer (signed per Standard Webhooks).
#[utoipa::path(post, path = "/v1/events", tag = "events",
    request_body(content = CloudEvent, content_type = "application/cloudevents+json"),
    params(
        ("webhook-id" = String, Header, description = "message id"),
        ("webhook-timestamp" = i64, Header, description = "Unix seconds"),
        ("webhook-signature" = String, Header, description = "v1,<base64 HMAC-SHA256>"),
    ),
    responses(
        (status = 202, body = EventReceipt, description = "committed: accepted, ignored or duplicate"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 413, body = Problem),
        (status = 415, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
async fn post_event(
    vault: web::Data<Vault>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse> {
    // The forwarder already checked the media type, read the body and found its route;
    // without it (no forwarder in front) the handler does all three.
    let read = req.extensions().get::<crate::forward::ReadEvent>().cloned();
    if read.is_none() {
        check_event_media(
            header_str(&req, "content-type").unwrap_or(""),
            binary_mode(&req),
        )?;
    }
    let (body, route) = match read {
        Some(r) => (r.body, r.route),
        None => (read_body(&req, payload, MAX_BODY_BYTES).await?, None),
    };
    let headers = SignedHeaders {
        id: header_str(&req, HEADER_ID),
        timestamp: header_str(&req, HEADER_TIMESTAMP),
        signature: header_str(&req, HEADER_SIGNATURE),
    };
    let receipt = vault.ingest_event(headers, &body, route).await?;
    Ok(HttpResponse::Accepted().json(receipt))
}

/// Registers an entity; the answer carries its signing secret (shown once).
#[utoipa::path(post, path = "/v1/entities", tag = "entities", request_body = RegisterEntity,
    security(("bearer" = [])),
    responses((status = 201, body = Entity), (status = 400, body = Problem), (status = 409, body = Problem)))]
async fn register_entity(
    vault: web::Data<Vault>,
    req: HttpRequest,
    body: JsonObject<RegisterEntity>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    let e = vault.register_entity(body.into_inner()).await?;
    Ok(HttpResponse::Created().json(e))
}

/// Lists entities.
#[utoipa::path(get, path = "/v1/entities", tag = "entities", security(("bearer" = [])),
    responses((status = 200, body = Vec<Entity>)))]
async fn list_entities(vault: web::Data<Vault>, req: HttpRequest) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.entities().await?))
}

/// One entity.
#[utoipa::path(get, path = "/v1/entities/{id}", tag = "entities", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = Entity), (status = 404, body = Problem)))]
async fn get_entity(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.entity(&id).await?))
}

/// Changes an entity's name or endpoint, or re-enables its endpoint.
#[utoipa::path(patch, path = "/v1/entities/{id}", tag = "entities", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = UpdateEntity,
    responses((status = 200, body = Entity), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "a client secret for an entity without OAuth")))]
async fn update_entity(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
    body: JsonObject<UpdateEntity>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.update_entity(&id, body.into_inner()).await?))
}

/// How a secret is rotated.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RotateQuery {
    /// `true`: the previous secret stops verifying events (and signing commands) at once,
    /// for a secret that leaked; by default it stays valid for the grace period.
    #[serde(default)]
    pub revoke_previous: bool,
}

/// Rotates an entity's secret; the previous one stays valid for the grace period, or not at
/// all with `revoke_previous=true`.
#[utoipa::path(post, path = "/v1/entities/{id}/secret", tag = "entities", security(("bearer" = [])),
    params(("id" = String, Path), RotateQuery), responses((status = 200, body = Entity), (status = 404, body = Problem)))]
async fn rotate_secret(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
    q: web::Query<RotateQuery>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.rotate_secret(&id, q.revoke_previous).await?))
}

/// Creates a customer profile and its bearer token.
#[utoipa::path(post, path = "/v1/customers", tag = "customers", security(("bearer" = [])),
    responses((status = 201, body = CustomerCreated)))]
async fn create_customer(vault: web::Data<Vault>, req: HttpRequest) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Created().json(vault.create_customer().await?))
}

/// A customer's profile summary (the customer or an operator).
#[utoipa::path(get, path = "/v1/customers/{id}", tag = "customers", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = Customer), (status = 404, body = Problem)))]
async fn get_customer(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Ok().json(vault.customer(&id).await?))
}

/// Links an entity to a customer (operators only; customers link through the portal).
#[utoipa::path(post, path = "/v1/customers/{id}/links", tag = "customers", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = LinkRequest,
    responses((status = 201, body = Link), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn link(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
    body: JsonObject<LinkRequest>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Created().json(vault.link(&id, body.into_inner()).await?))
}

/// Unlinks an entity at once.
#[utoipa::path(delete, path = "/v1/customers/{id}/links/{entity_id}", tag = "customers",
    security(("bearer" = [])), params(("id" = String, Path), ("entity_id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)))]
async fn unlink(
    vault: web::Data<Vault>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (id, entity) = path.into_inner();
    vault.require_customer(bearer(&req), &id).await?;
    vault.unlink(&id, &entity).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Starts linking an entity through its OAuth 2.0 server for a customer the operator assists;
/// answers where to send the customer. Customers link through the portal.
#[utoipa::path(post, path = "/v1/customers/{id}/links/{entity_id}/authorize", tag = "customers",
    security(("bearer" = [])), params(("id" = String, Path), ("entity_id" = String, Path)),
    responses((status = 200, body = AuthorizeLink), (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "the entity does not link through OAuth")))]
async fn authorize_link(
    vault: web::Data<Vault>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (id, entity) = path.into_inner();
    // Operators only: a linking started outside the portal is bound to no browser session,
    // so a customer could hand its URL to someone else and link their account (login CSRF).
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.authorize_link(&id, &entity, false).await?))
}

/// The OAuth callback query (RFC 6749 §4.1.2, RFC 9207).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    /// The authorization code (absent when the entity reports an `error`).
    #[param(min_length = 1, max_length = 1024)]
    pub code: Option<String>,
    /// The state the vault sent.
    #[param(required = true, min_length = 1, max_length = 256)]
    pub state: Option<String>,
    /// The issuer of the authorization response (RFC 9207): must be the entity's.
    #[param(max_length = 2048)]
    pub iss: Option<String>,
    /// An error the entity reported instead.
    #[param(max_length = 256)]
    pub error: Option<String>,
    /// The entity's explanation of its error.
    #[param(max_length = 1024)]
    pub error_description: Option<String>,
}

/// Where the entity's provider sends the customer back (each entity has its own redirect
/// URI): exchanges the code and links the subject.
#[utoipa::path(get, path = "/v1/oauth/callback/{entity_id}", tag = "customers",
    params(("entity_id" = String, Path), CallbackQuery),
    responses((status = 201, body = Link), (status = 400, body = Problem), (status = 403, body = Problem)))]
async fn oauth_callback(
    vault: web::Data<Vault>,
    req: HttpRequest,
    entity: web::Path<String>,
    q: web::Query<CallbackQuery>,
) -> Result<HttpResponse> {
    let q = q.into_inner();
    let session = crate::portal::session_of(&vault, &req).await;
    let finished = match q.error {
        // Anyone can send a customer here with an `error`: no state is checked on this path, so
        // what is shown (the portal shows it in an alert) must not be text of their choosing.
        // An RFC 6749 error code and a well-formed entity id are shown; the description only
        // goes to the log.
        Some(e) => {
            tracing::info!(entity = %entity.chars().take(128).collect::<String>(), error = %e, description = ?q.error_description, "the entity reported an error at the OAuth callback");
            // Only the codes RFC 6749 (4.1.2.1) defines, and only a registered entity's id:
            // any other well-formed text would still be words of the sender's choosing.
            const CODES: [&str; 7] = [
                "access_denied",
                "invalid_request",
                "unauthorized_client",
                "unsupported_response_type",
                "invalid_scope",
                "server_error",
                "temporarily_unavailable",
            ];
            let code = CODES
                .iter()
                .find(|c| **c == e.as_str())
                .copied()
                .unwrap_or("an error");
            let registered = custos_api::limits::is_valid_id(&entity)
                && matches!(vault.core().entity(&entity).await, Ok(Some(_)));
            let who = if registered {
                entity.as_str()
            } else {
                "the entity"
            };
            Err(ServiceError::refused(
                ErrorCode::Forbidden,
                format!("{who} answered {code}"),
            ))
        }
        None => {
            vault
                .finish_link(CallbackParams {
                    entity: &entity,
                    code: q.code.as_deref().unwrap_or_default(),
                    state: q.state.as_deref().unwrap_or_default(),
                    iss: q.iss.as_deref(),
                    session: session.as_ref().map(|s| s.customer_id.as_str()),
                })
                .await
        }
    };
    match (finished, session.is_some()) {
        (Ok(done), _) if done.via_portal => Ok(crate::portal::see_other_flash(
            "/portal/catalog",
            Ok(format!(
                "Linked {} as {}.{}",
                done.link.entity_id,
                done.link.subject,
                match &done.kept_rule {
                    None => String::new(),
                    Some(Ok(name)) => format!(" Added rule “{name}”."),
                    Some(Err(e)) => format!(
                        " The recommended rule was not added: {}",
                        crate::portal::problem_text(e)
                    ),
                }
            )),
        )),
        (Ok(done), _) => Ok(HttpResponse::Created().json(done.link)),
        // A signed-in browser comes back to the portal, which explains what went wrong.
        (Err(e), true) => Ok(crate::portal::see_other_flash(
            "/portal/catalog",
            Err(crate::portal::problem_text(&e)),
        )),
        (Err(e), false) => Err(e),
    }
}

/// Everything the vault holds about the customer, as JSON.
#[utoipa::path(get, path = "/v1/customers/{id}/export", tag = "customers",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = CustomerExport), (status = 404, body = Problem)))]
async fn export_customer(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Ok().json(vault.export(&id).await?))
}

/// Erases the customer and everything held about it, on every replica.
#[utoipa::path(delete, path = "/v1/customers/{id}", tag = "customers",
    security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)))]
async fn erase_customer(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    vault.erase_customer(&id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Runs a rule on a past event or sample data and answers the command it would send.
#[utoipa::path(post, path = "/v1/customers/{id}/rules/try", tag = "rules",
    security(("bearer" = [])), params(("id" = String, Path)), request_body = TryRule,
    responses((status = 200, body = TryOutcome), (status = 400, body = Problem)))]
async fn try_rule(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
    body: JsonObject<TryRule>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Ok().json(vault.try_rule(&id, body.into_inner()).await?))
}

/// Saves a rule (validated: entities linked, types known, CEL compiles, schema fits).
#[utoipa::path(post, path = "/v1/customers/{id}/rules", tag = "rules", security(("bearer" = [])),
    params(("id" = String, Path)), request_body = RuleSpec,
    responses((status = 201, body = Rule), (status = 400, body = Problem), (status = 422, body = Problem)))]
async fn create_rule(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
    body: JsonObject<RuleSpec>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Created().json(vault.create_rule(&id, body.into_inner()).await?))
}

/// A customer's rules.
#[utoipa::path(get, path = "/v1/customers/{id}/rules", tag = "rules", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = Vec<Rule>)))]
async fn list_rules(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Ok().json(vault.rules(&id).await?))
}

/// One rule.
#[utoipa::path(get, path = "/v1/customers/{id}/rules/{rule_id}", tag = "rules", security(("bearer" = [])),
    params(("id" = String, Path), ("rule_id" = String, Path)),
    responses((status = 200, body = Rule), (status = 404, body = Problem)))]
async fn get_rule(
    vault: web::Data<Vault>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (id, rule) = path.into_inner();
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Ok().json(vault.rule(&id, &rule).await?))
}

/// Deletes a rule.
#[utoipa::path(delete, path = "/v1/customers/{id}/rules/{rule_id}", tag = "rules", security(("bearer" = [])),
    params(("id" = String, Path), ("rule_id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)))]
async fn delete_rule(
    vault: web::Data<Vault>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (id, rule) = path.into_inner();
    vault.require_customer(bearer(&req), &id).await?;
    vault.delete_rule(&id, &rule).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A customer's activity, newest first: events, matches, commands, delivery attempts.
#[utoipa::path(get, path = "/v1/customers/{id}/activity", tag = "customers", security(("bearer" = [])),
    params(("id" = String, Path), ActivityQuery), responses((status = 200, body = ActivityPage)))]
async fn activity(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
    q: web::Query<ActivityQuery>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    let q = q.into_inner();
    Ok(HttpResponse::Ok().json(vault.activity(&id, q.before, q.limit.unwrap_or(50)).await?))
}

/// Deliveries by status (operators).
#[utoipa::path(get, path = "/v1/deliveries", tag = "deliveries", security(("bearer" = [])),
    params(DeliveryQuery), responses((status = 200, body = DeliveryPage)))]
async fn list_deliveries(
    vault: web::Data<Vault>,
    req: HttpRequest,
    q: web::Query<DeliveryQuery>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    let q = q.into_inner();
    let page = vault
        .deliveries(
            q.status.unwrap_or(DeliveryStatus::Failed),
            q.after,
            q.limit.unwrap_or(50),
        )
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

/// One delivery with every attempt (operators).
#[utoipa::path(get, path = "/v1/deliveries/{command_id}", tag = "deliveries", security(("bearer" = [])),
    params(("command_id" = String, Path)), responses((status = 200, body = Delivery), (status = 404, body = Problem)))]
async fn get_delivery(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.delivery(&id).await?))
}

/// Replays a failed delivery, or tries a pending one waiting for its next retry now (operators).
#[utoipa::path(post, path = "/v1/deliveries/{command_id}/replay", tag = "deliveries", security(("bearer" = [])),
    params(("command_id" = String, Path)),
    responses((status = 200, body = Delivery), (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn replay(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.replay(&id).await?))
}

/// A customer's recommended rules, with confidence and reason.
#[utoipa::path(get, path = "/v1/customers/{id}/recommendations", tag = "recommendations", security(("bearer" = [])),
    params(("id" = String, Path)), responses((status = 200, body = RecommendationList)))]
async fn recommendations(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Ok().json(vault.recommendations(&id).await?))
}

/// Accepts a recommendation: creates its rule (validated like any rule).
#[utoipa::path(post, path = "/v1/customers/{id}/recommendations/{rec_id}/accept", tag = "recommendations",
    security(("bearer" = [])), params(("id" = String, Path), ("rec_id" = String, Path)),
    responses((status = 201, body = Rule), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn accept_recommendation(
    vault: web::Data<Vault>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (id, rec) = path.into_inner();
    vault.require_customer(bearer(&req), &id).await?;
    Ok(HttpResponse::Created().json(vault.accept_recommendation(&id, &rec).await?))
}

/// Dismisses a recommendation (remembered; not shown again).
#[utoipa::path(post, path = "/v1/customers/{id}/recommendations/{rec_id}/dismiss", tag = "recommendations",
    security(("bearer" = [])), params(("id" = String, Path), ("rec_id" = String, Path)),
    responses((status = 204), (status = 400, body = Problem)))]
async fn dismiss_recommendation(
    vault: web::Data<Vault>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (id, rec) = path.into_inner();
    vault.require_customer(bearer(&req), &id).await?;
    vault.dismiss_recommendation(&id, &rec).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Trains the recommender now (it also trains on a schedule).
#[utoipa::path(post, path = "/v1/recommendations/train", tag = "recommendations", security(("bearer" = [])),
    responses((status = 200, body = ModelSummary)))]
async fn train(vault: web::Data<Vault>, req: HttpRequest) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.train_recommender().await?))
}

/// The cluster: nodes (up or down), groups with voters, leader, term, indexes and lag.
#[utoipa::path(get, path = "/v1/cluster", tag = "operations", security(("bearer" = [])),
    params(("digests" = Option<bool>, Query, description = "add each replica's state digest (scans every group)")),
    responses((status = 200, body = ClusterStatus), (status = 401, body = Problem)))]
async fn cluster_status(
    vault: web::Data<Vault>,
    req: HttpRequest,
    q: web::Query<crate::peer::StatusQuery>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Ok().json(vault.cluster_status(q.digests).await?))
}

/// Removes a node: its replicas and leaderships move to other nodes, then it is removed.
/// Answers at once (202); `GET /v1/cluster` shows the node `leaving`, then `removed`.
#[utoipa::path(post, path = "/v1/cluster/nodes/{id}/remove", tag = "operations",
    security(("bearer" = [])), params(("id" = u64, Path)),
    responses((status = 202, body = ClusterStatus), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
async fn remove_node(
    vault: web::Data<Vault>,
    req: HttpRequest,
    id: web::Path<u64>,
) -> Result<HttpResponse> {
    vault.require_admin(bearer(&req)).await?;
    Ok(HttpResponse::Accepted().json(vault.remove_node(*id).await?))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    let allowed = allowed_methods(req.path());
    if allowed.is_empty() {
        return Err(ServiceError::refused(
            ErrorCode::NotFound,
            format!("no route {} {}", req.method(), req.path()),
        ));
    }
    Ok(method_not_allowed(&req, &allowed))
}

/// 405 method_not_allowed, with the methods the path does serve in `Allow`.
fn method_not_allowed(req: &HttpRequest, allowed: &[&str]) -> HttpResponse {
    let allow = allowed.join(", ");
    let err = ServiceError::refused(
        ErrorCode::MethodNotAllowed,
        format!(
            "{} {} is not served; allowed: {allow}",
            req.method(),
            req.path()
        ),
    );
    let mut resp = actix_web::ResponseError::error_response(&err);
    if let Ok(v) = header::HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

/// One operation of the OpenAPI document: its path template's segments, method and the
/// query parameters it declares.
struct RouteEntry {
    segments: Vec<String>,
    method: &'static str,
    query: Vec<String>,
}

/// Every operation of the document (one source of truth for routes, methods and parameters).
fn routes() -> &'static [RouteEntry] {
    static TABLE: std::sync::OnceLock<Vec<RouteEntry>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let methods = [
            ("get", "GET"),
            ("put", "PUT"),
            ("post", "POST"),
            ("delete", "DELETE"),
            ("patch", "PATCH"),
        ];
        let mut out = Vec::new();
        for (template, item) in document()["paths"].as_object().into_iter().flatten() {
            for (key, method) in methods {
                let Some(op) = item.get(key) else { continue };
                out.push(RouteEntry {
                    segments: template.split('/').map(str::to_owned).collect(),
                    method,
                    query: op["parameters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| p["in"] == "query")
                        .filter_map(|p| p["name"].as_str().map(str::to_owned))
                        .collect(),
                });
            }
        }
        out
    })
}

/// The operations of the path template that matches `path` most closely (`{param}` matches
/// one segment; as in OpenAPI, a literal segment wins over a parameter: `/rules/try` is not
/// `/rules/{rule_id}`).
fn routes_at(path: &str) -> Vec<&'static RouteEntry> {
    let segs: Vec<&str> = path.split('/').collect();
    let literals = |r: &RouteEntry| -> Option<usize> {
        if r.segments.len() != segs.len() {
            return None;
        }
        let mut n = 0;
        for (a, b) in r.segments.iter().zip(&segs) {
            if a == b {
                n += 1;
            } else if !(a.starts_with('{') && a.ends_with('}') && !b.is_empty()) {
                return None;
            }
        }
        Some(n)
    };
    let best = routes().iter().filter_map(literals).max();
    routes()
        .iter()
        .filter(|r| best.is_some() && literals(r) == best)
        .collect()
}

/// The methods the operations `here` serve.
fn methods_of(here: &[&'static RouteEntry]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = here.iter().map(|r| r.method).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The methods the API serves on `path`.
fn allowed_methods(path: &str) -> Vec<&'static str> {
    methods_of(&routes_at(path))
}

/// Where a provider sends the customer back: it may add parameters of its own (`iss`,
/// `scope`, `session_state`...), so only this route takes query parameters it does not name.
const OAUTH_CALLBACK_PREFIX: &str = "/v1/oauth/callback/";

/// Refuses a query parameter the operation does not declare (400), the same on every route,
/// rather than ignoring it on some and refusing it on others. `here` are the operations at
/// the request's path ([`routes_at`]).
fn check_query(
    here: &[&'static RouteEntry],
    method: &str,
    path: &str,
    query: &str,
) -> std::result::Result<(), ServiceError> {
    if query.is_empty() || path.starts_with(OAUTH_CALLBACK_PREFIX) {
        return Ok(());
    }
    let Some(route) = here.iter().find(|r| r.method == method) else {
        // Not an API operation: the 404/405 answer, or the portal's own pages.
        return Ok(());
    };
    for (name, _) in url::form_urlencoded::parse(query.as_bytes()) {
        if !route.query.iter().any(|q| *q == name) {
            let takes = if route.query.is_empty() {
                "none".to_owned()
            } else {
                route.query.join(", ")
            };
            return Err(ServiceError::invalid(
                "query",
                format_args!("unknown parameter '{name:.64}' (this operation takes: {takes})"),
            ));
        }
    }
    Ok(())
}

/// The middleware around the client API that holds every request to the OpenAPI document:
/// a method the path does not serve is a 405 with `Allow`, an undeclared query parameter a 400.
pub async fn hold_to_document(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> std::result::Result<
    actix_web::dev::ServiceResponse<
        actix_web::body::EitherBody<impl actix_web::body::MessageBody, actix_web::body::BoxBody>,
    >,
    actix_web::Error,
> {
    // One lookup of the path's operations serves both checks.
    let here = routes_at(req.path());
    let method = req.method().as_str();
    if !here.is_empty() && !here.iter().any(|r| r.method == method) {
        let resp = method_not_allowed(req.request(), &methods_of(&here));
        return Ok(req.into_response(resp).map_into_right_body());
    }
    if let Err(e) = check_query(&here, method, req.path(), req.query_string()) {
        return Ok(req.error_response(e).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// The OpenAPI document as served: [`ApiDoc`] plus what every operation shares, added in one
/// place so no route can forget it: problems as `application/problem+json`, the statuses the
/// gateway answers for any route of its kind (401/403 with a bearer token, 400/413/415 with a
/// JSON body, 400/404 with a path id, 400 with query parameters, 429/500/503 anywhere under
/// `/v1`), and the id pattern on path ids.
pub fn document() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        complete_document(&mut doc);
        doc
    })
}

const PROBLEM_JSON: &str = "application/problem+json";

/// OpenAPI links: where an answer's ids lead (generated clients and stateful testers follow
/// them from a created resource to the operations on it).
/// (path, method, status, [(operation id, `name=expression&...`)]).
type LinkTable = &'static [(
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
)];

const LINKS: LinkTable = &[
    (
        "/v1/entities",
        "post",
        "201",
        &[
            ("get_entity", "id=$response.body#/id"),
            ("update_entity", "id=$response.body#/id"),
            ("rotate_secret", "id=$response.body#/id"),
        ],
    ),
    (
        "/v1/customers",
        "post",
        "201",
        &[
            ("get_customer", "id=$response.body#/id"),
            ("link", "id=$response.body#/id"),
            ("create_rule", "id=$response.body#/id"),
            ("list_rules", "id=$response.body#/id"),
            ("try_rule", "id=$response.body#/id"),
            ("activity", "id=$response.body#/id"),
            ("export_customer", "id=$response.body#/id"),
            ("recommendations", "id=$response.body#/id"),
            ("erase_customer", "id=$response.body#/id"),
        ],
    ),
    (
        "/v1/customers/{id}/links",
        "post",
        "201",
        &[
            (
                "unlink",
                "id=$request.path.id&entity_id=$response.body#/entity_id",
            ),
            (
                "authorize_link",
                "id=$request.path.id&entity_id=$response.body#/entity_id",
            ),
        ],
    ),
    (
        "/v1/customers/{id}/rules",
        "post",
        "201",
        &[
            ("get_rule", "id=$request.path.id&rule_id=$response.body#/id"),
            (
                "delete_rule",
                "id=$request.path.id&rule_id=$response.body#/id",
            ),
        ],
    ),
];

fn add_links(doc: &mut serde_json::Value) {
    for (path, method, status, links) in LINKS {
        let response = &mut doc["paths"][*path][*method]["responses"][*status];
        if response.is_null() {
            continue;
        }
        for (operation, params) in *links {
            let parameters: serde_json::Map<String, serde_json::Value> = params
                .split('&')
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
                .collect();
            response["links"][*operation] = serde_json::json!({
                "operationId": operation,
                "parameters": parameters,
            });
        }
    }
}

fn complete_document(doc: &mut serde_json::Value) {
    use serde_json::{json, Value};
    add_links(doc);
    // URL fields carry the pattern the server checks (one constant for both).
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for (schema_name, schema) in schemas.iter_mut() {
            // The URLs given to the vault (and echoed back), not the ones it makes up.
            if !matches!(
                schema_name.as_str(),
                "RegisterEntity" | "UpdateEntity" | "OAuthEndpoints" | "Entity"
            ) {
                continue;
            }
            if schema_name == "OAuthEndpoints" {
                // A provider is named by its issuer, or by both explicit endpoints.
                let string = json!({"type": "string"});
                schema["anyOf"] = json!([
                    {"required": ["issuer"], "properties": {"issuer": string}},
                    {"required": ["authorize_url", "token_url"],
                     "properties": {"authorize_url": string, "token_url": string}},
                ]);
            }
            let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
                continue;
            };
            if let Some(scopes) = props.get_mut("scopes") {
                // RFC 6749 §3.3 scope tokens, as the server checks them (Option<Vec>: the
                // array branch).
                let array = if scopes.get("oneOf").is_some() {
                    scopes["oneOf"]
                        .as_array_mut()
                        .and_then(|b| b.iter_mut().find(|b| b["type"] == "array"))
                } else {
                    Some(scopes)
                };
                if let Some(items) = array.and_then(|a| a.get_mut("items")) {
                    items["pattern"] = json!(r"^[\x21\x23-\x5B\x5D-\x7E]{1,128}$");
                }
            }
            for (name, prop) in props.iter_mut() {
                if name.ends_with("_url") || name == "issuer" || name == "redirect_uri" {
                    let target = match prop.get_mut("oneOf").and_then(Value::as_array_mut) {
                        // Option<String>: the string branch.
                        Some(branches) => branches.iter_mut().find(|b| b["type"] == "string"),
                        None => Some(prop),
                    };
                    let is_string = |t: &&mut Value| {
                        t["type"] == "string"
                            || t["type"]
                                .as_array()
                                .is_some_and(|a| a.contains(&json!("string")))
                    };
                    if let Some(t) = target.filter(is_string) {
                        t["pattern"] = json!(custos_api::limits::URL_PATTERN);
                        t["maxLength"] = json!(custos_api::limits::MAX_URL_LEN);
                    }
                }
            }
        }
    }
    let problem = |description: &str| {
        json!({"description": description,
               "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}})
    };
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            if !matches!(method.as_str(), "get" | "put" | "post" | "delete" | "patch") {
                continue;
            }
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let in_ = |place: &str| params.iter().any(|p| p["in"] == place);
            let bearer = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            let json_body = op["requestBody"]["content"]
                .as_object()
                .is_some_and(|c| c.keys().any(|k| k.ends_with("json")));
            if let Some(list) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                for p in list.iter_mut() {
                    // The Standard Webhooks headers: all three required, bounded as checked.
                    if p["in"] == "header" {
                        p["required"] = json!(true);
                        match p["name"].as_str() {
                            Some(HEADER_ID) => {
                                p["schema"]["minLength"] = json!(1);
                                p["schema"]["maxLength"] =
                                    json!(custos_api::webhook::MAX_WEBHOOK_ID);
                            }
                            Some(HEADER_SIGNATURE) => {
                                p["schema"]["maxLength"] =
                                    json!(custos_api::webhook::MAX_SIGNATURE_HEADER);
                            }
                            _ => {}
                        }
                    }
                    if p["in"] == "path" && p["schema"]["type"] == "string" {
                        // Recommendation ids are hex (then a digest of what was shown);
                        // every other id is an id.
                        let (pattern, max) = if p["name"] == "rec_id" {
                            use crate::recommend::vault::{MAX_REC_ID_LEN, MAX_TEMPLATE_KEY_LEN};
                            (
                                format!(
                                    "^([0-9a-fA-F]{{2}}){{1,{MAX_TEMPLATE_KEY_LEN}}}(-[0-9a-f]{{12}})?$"
                                ),
                                MAX_REC_ID_LEN,
                            )
                        } else {
                            (
                                custos_api::limits::ID_PATTERN.to_owned(),
                                custos_api::limits::MAX_ID_LEN,
                            )
                        };
                        p["schema"]["pattern"] = json!(pattern);
                        p["schema"]["maxLength"] = json!(max);
                    }
                }
            }
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            for r in responses.values_mut() {
                let Some(content) = r.get_mut("content").and_then(Value::as_object_mut) else {
                    continue;
                };
                let is_problem = content
                    .get("application/json")
                    .is_some_and(|c| c["schema"]["$ref"] == "#/components/schemas/Problem");
                if is_problem {
                    if let Some(c) = content.remove("application/json") {
                        content.insert(PROBLEM_JSON.to_owned(), c);
                    }
                }
            }
            let mut add = |status: &str, description: &str| {
                let entry = responses.entry(status.to_owned()).or_insert(Value::Null);
                if entry.is_null() {
                    *entry = problem(description);
                }
            };
            if bearer {
                add(
                    "401",
                    "missing, malformed or unknown bearer token (unauthorized)",
                );
                add("403", "the token may not do this (forbidden)");
            }
            if json_body {
                add(
                    "400",
                    "malformed body or an invalid field (malformed_body, invalid_field)",
                );
                add("413", "body larger than 256 KiB (body_too_large)");
                add("415", "not a JSON body (unsupported_media_type)");
            }
            if in_("path") {
                add(
                    "400",
                    "an id in the path is not [A-Za-z0-9._:-]{1,128} (invalid_field)",
                );
                add("404", "no such resource (not_found)");
            }
            if in_("query") {
                add(
                    "400",
                    "an unknown or invalid query parameter (invalid_field)",
                );
            }
            if path.starts_with("/v1/") && matches!(method.as_str(), "post" | "patch" | "delete") {
                add(
                    "422",
                    "well-formed, but it cannot be done: see `code` and `detail`",
                );
            }
            if path.starts_with("/v1/") {
                add(
                    "429",
                    "too many requests in flight; retry later (overloaded)",
                );
                add(
                    "500",
                    "an internal error; the request may be retried (internal)",
                );
                add(
                    "503",
                    "no leader or storage unavailable; retry later (unavailable)",
                );
            }
        }
    }
}

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI 3.1 description of the client API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Custos", description = "The customer's data vault: events in, signed commands out."),
    paths(healthz, readyz, metrics, openapi, post_event, register_entity, list_entities, get_entity,
          update_entity, rotate_secret, create_customer, get_customer, link, unlink, authorize_link,
          oauth_callback, export_customer, erase_customer, try_rule, create_rule,
          list_rules, get_rule, delete_rule, activity, list_deliveries, get_delivery, replay,
          recommendations, accept_recommendation, dismiss_recommendation, train,
          cluster_status, remove_node),
    components(schemas(Problem, ErrorCode, CloudEvent, EventReceipt, EventStatus, RegisterEntity,
        UpdateEntity, Entity, TypeSpec, CustomerCreated, Customer, Link, LinkRequest, RuleSpec,
        Rule, Trigger, Action, ActivityPage, ActivityItem, ActivityKind, DeliveryPage, Delivery,
        DeliveryStatus, Attempt, Readiness, RuleTemplate, Recommendation, RecommendationList,
        ModelSummary, OAuthEndpoints, AuthorizeLink, TryRule, TryOutcome, CustomerExport,
        ClusterStatus, ClusterNode, ClusterGroup, ClusterReplica)),
    modifiers(&BearerScheme)
)]
pub struct ApiDoc;

/// Registers every route and the extractors' error mapping.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(MAX_BODY_BYTES)
            .error_handler(|e, _| json_error(e).into()),
    )
    .app_data(web::QueryConfig::default().error_handler(|e, _| {
        ServiceError::refused(ErrorCode::InvalidField, format!("query: {e}")).into()
    }))
    .app_data(web::PathConfig::default().error_handler(|e, _| {
        ServiceError::refused(ErrorCode::InvalidField, format!("path: {e}")).into()
    }))
    .route("/healthz", web::get().to(healthz))
    .route("/readyz", web::get().to(readyz))
    .route("/metrics", web::get().to(metrics))
    .route("/openapi.json", web::get().to(openapi))
    .route("/v1/events", web::post().to(post_event))
    .route("/v1/entities", web::post().to(register_entity))
    .route("/v1/entities", web::get().to(list_entities))
    .route("/v1/entities/{id}", web::get().to(get_entity))
    .route("/v1/entities/{id}", web::patch().to(update_entity))
    .route("/v1/entities/{id}/secret", web::post().to(rotate_secret))
    .route("/v1/customers", web::post().to(create_customer))
    .route("/v1/customers/{id}", web::get().to(get_customer))
    .route("/v1/customers/{id}/links", web::post().to(link))
    .route(
        "/v1/customers/{id}/links/{entity_id}",
        web::delete().to(unlink),
    )
    .route(
        "/v1/customers/{id}/links/{entity_id}/authorize",
        web::post().to(authorize_link),
    )
    .route(
        "/v1/oauth/callback/{entity_id}",
        web::get().to(oauth_callback),
    )
    .route("/v1/customers/{id}/export", web::get().to(export_customer))
    .route("/v1/customers/{id}", web::delete().to(erase_customer))
    .route("/v1/customers/{id}/rules/try", web::post().to(try_rule))
    .route("/v1/customers/{id}/rules", web::post().to(create_rule))
    .route("/v1/customers/{id}/rules", web::get().to(list_rules))
    .route(
        "/v1/customers/{id}/rules/{rule_id}",
        web::get().to(get_rule),
    )
    .route(
        "/v1/customers/{id}/rules/{rule_id}",
        web::delete().to(delete_rule),
    )
    .route("/v1/customers/{id}/activity", web::get().to(activity))
    .route(
        "/v1/customers/{id}/recommendations",
        web::get().to(recommendations),
    )
    .route(
        "/v1/customers/{id}/recommendations/{rec_id}/accept",
        web::post().to(accept_recommendation),
    )
    .route(
        "/v1/customers/{id}/recommendations/{rec_id}/dismiss",
        web::post().to(dismiss_recommendation),
    )
    .route("/v1/recommendations/train", web::post().to(train))
    .route("/v1/cluster", web::get().to(cluster_status))
    .route("/v1/cluster/nodes/{id}/remove", web::post().to(remove_node))
    .route("/v1/deliveries", web::get().to(list_deliveries))
    .route("/v1/deliveries/{command_id}", web::get().to(get_delivery))
    .route("/v1/deliveries/{command_id}/replay", web::post().to(replay))
    .default_service(web::to(not_found));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_in_structured_mode_and_binary_mode_is_told_so() {
        let code =
            |ct: &str, binary: bool| check_event_media(ct, binary).err().map(|e| e.problem());
        assert!(code("application/cloudevents+json; charset=utf-8", false).is_none());
        assert!(code("application/json", false).is_none());
        assert!(code("text/plain", false).is_some());
        assert!(
            code("application/cloudevents+json", true).is_none(),
            "structured"
        );
        let p = code("application/json", true).expect("refused");
        assert_eq!(p.code, ErrorCode::UnsupportedMediaType);
        assert!(
            p.detail.unwrap_or_default().contains("binary mode"),
            "says what to change"
        );
    }

    #[test]
    fn the_bearer_schemes_name_is_read_in_any_case() {
        let token = |value: &str| {
            let req = actix_web::test::TestRequest::default()
                .insert_header((header::AUTHORIZATION, value))
                .to_http_request();
            bearer(&req).map(str::to_owned)
        };
        assert_eq!(token("Bearer adm_1").as_deref(), Some("adm_1"));
        assert_eq!(token("bearer adm_1").as_deref(), Some("adm_1"));
        assert_eq!(token("BEARER  adm_1 ").as_deref(), Some("adm_1"));
        assert_eq!(token("Basic adm_1"), None);
        assert_eq!(token("Beareradm_1"), None);
    }

    #[test]
    fn every_problem_is_documented_as_problem_json_with_the_shared_statuses() {
        let doc = document();
        let mut checked = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                let responses = op["responses"].as_object().expect("responses");
                for (status, r) in responses {
                    if let Some(content) = r["content"].as_object() {
                        let problem = content
                            .values()
                            .any(|c| c["schema"]["$ref"] == "#/components/schemas/Problem");
                        assert!(
                            !problem || content.contains_key(PROBLEM_JSON),
                            "{method} {path} {status}: {content:?}"
                        );
                    }
                }
                if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                    assert!(responses.contains_key("401") && responses.contains_key("403"));
                }
                if path.starts_with("/v1/") {
                    for s in ["429", "500", "503"] {
                        assert!(responses.contains_key(s), "{method} {path} {s}");
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 25, "{checked}");
    }

    #[test]
    fn id_patterns_in_the_document_are_the_one_the_server_checks() {
        fn patterns<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(p) = m.get("pattern").and_then(|p| p.as_str()) {
                        out.push(p);
                    }
                    m.values().for_each(|v| patterns(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| patterns(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        patterns(document(), &mut found);
        let ids: Vec<&str> = found
            .into_iter()
            .filter(|p| p.starts_with("^(?:[A-Za-z0-9_:-]"))
            .collect();
        assert!(ids.len() > 10, "{ids:?}");
        assert!(
            ids.iter().all(|p| *p == custos_api::limits::ID_PATTERN),
            "{ids:?}"
        );
        let re = regex::Regex::new(custos_api::limits::ID_PATTERN).expect("pattern");
        for s in [
            "airline",
            "a.b_c:d-e",
            "",
            "a b",
            "a/b",
            &"x".repeat(128),
            &"x".repeat(129),
            ".",
            "..",
            "...",
            ".a",
            "..a",
            &format!(".{}", "x".repeat(127)),
            &format!("..{}", "x".repeat(127)),
        ] {
            assert_eq!(re.is_match(s), custos_api::limits::is_valid_id(s), "{s:?}");
        }
    }

    #[test]
    fn unknown_query_parameters_are_refused_on_every_operation_but_the_callback() {
        let check_query = |method: &str, path: &str, q: &str| {
            super::check_query(&routes_at(path), method, path, q)
        };
        assert!(check_query("GET", "/v1/customers/c1/activity", "limit=5&before=00").is_ok());
        let e = check_query("GET", "/v1/customers/c1/activity", "limit=5&color=red")
            .expect_err("unknown");
        assert!(e.to_string().contains("color"), "{e}");
        assert!(check_query("GET", "/v1/entities", "x=1").is_err());
        assert!(check_query("GET", "/v1/deliveries", "status=failed&after=1.").is_ok());
        assert!(check_query(
            "GET",
            "/v1/oauth/callback/bank",
            "code=a&state=b&iss=x&session_state=y"
        )
        .is_ok());
        // Not an operation: left to the 404/405 answer and the portal.
        assert!(check_query("GET", "/portal/activity", "kind=events").is_ok());
        assert_eq!(
            allowed_methods("/v1/entities/airline"),
            vec!["GET", "PATCH"]
        );
    }
}
