//! An async client for the Custos HTTP API, used by the `custos` CLI, the tests and the bench.

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cloudevent::{CloudEvent, CLOUDEVENTS_CONTENT_TYPE};
use crate::problem::Problem;
use crate::types::*;
use crate::webhook::{self, Secret};

/// What a call can fail with (more may be added: match with a wildcard).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node answered with a problem document.
    #[error("{0}")]
    Problem(Problem),
    /// The request did not complete.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The node answered with a problem document whose code this client does not know (a
    /// newer node's): what it says is kept, for a program to act on the status.
    #[error("{code} ({status}){}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    UnknownProblem {
        /// HTTP status.
        status: u16,
        /// The problem's `code`, as sent.
        code: String,
        /// The problem's `detail`.
        detail: Option<String>,
    },
    /// The node answered something this client does not understand.
    #[error("unexpected answer {status}: {body}")]
    Unexpected {
        /// HTTP status.
        status: u16,
        /// Body text.
        body: String,
    },
}

impl ClientError {
    /// The stable problem code, when the node sent one.
    pub fn code(&self) -> Option<crate::ErrorCode> {
        match self {
            ClientError::Problem(p) => Some(p.code),
            _ => None,
        }
    }
}

/// A problem document with any `code`: what an answer is read as when its code is not one of
/// this build's [`crate::ErrorCode`]s.
#[derive(serde::Deserialize)]
struct AnyProblem {
    code: String,
    #[serde(default)]
    detail: Option<String>,
}

/// What a refusal (any status but 2xx) is read as: the problem document, one with a code this
/// client does not know, or the body as text.
fn refusal(status: u16, body: &[u8]) -> ClientError {
    if let Ok(p) = serde_json::from_slice::<Problem>(body) {
        return ClientError::Problem(p);
    }
    match serde_json::from_slice::<AnyProblem>(body) {
        Ok(p) => ClientError::UnknownProblem {
            status,
            code: p.code,
            detail: p.detail,
        },
        Err(_) => ClientError::Unexpected {
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

/// A client bound to one node and one bearer token (admin or customer).
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

/// How long an idle pooled connection is reused: under the node's keep-alive (actix-web's 5 s),
/// so the client does not pick a connection the node is closing at that moment (reqwest then
/// fails with "connection closed before message completed", as a 200,000-customer bench setup
/// once did).
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(4);

/// How long [`Client::train_recommender`] waits for the node to train.
pub const TRAINING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Client {
    /// A client for the node at `base` (e.g. `http://127.0.0.1:7700`).
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .pool_idle_timeout(POOL_IDLE)
            .build()
            .unwrap_or_default();
        Client {
            base: base.into().trim_end_matches('/').to_owned(),
            http,
            token,
        }
    }

    /// The same node, giving up on a call after `timeout` (the default is 30 s).
    pub fn with_timeout(&self, timeout: std::time::Duration) -> Self {
        Client {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .pool_idle_timeout(POOL_IDLE)
                .build()
                .unwrap_or_default(),
            ..self.clone()
        }
    }

    /// The same node with another token.
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        Client {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    /// The node's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn call<T: DeserializeOwned>(rb: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = rb.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if status.is_success() {
            let body = if status == StatusCode::NO_CONTENT || bytes.is_empty() {
                &b"null"[..]
            } else {
                &bytes[..]
            };
            return serde_json::from_slice(body).map_err(|_| ClientError::Unexpected {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Err(refusal(status.as_u16(), &bytes))
    }

    async fn json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        Self::call(self.request(method, path).json(body)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::call(self.request(Method::GET, path)).await
    }

    /// The cluster's nodes and groups (operators).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        self.get("/v1/cluster").await
    }

    /// The cluster's status with every replica's state digest (a full scan: for checks).
    pub async fn cluster_digests(&self) -> Result<ClusterStatus, ClientError> {
        self.get("/v1/cluster?digests=true").await
    }

    /// Starts removing a node: its replicas and leaderships move away, then it is removed.
    pub async fn remove_node(&self, id: u64) -> Result<ClusterStatus, ClientError> {
        Self::call(self.request(Method::POST, &format!("/v1/cluster/nodes/{id}/remove"))).await
    }

    /// Registers an entity; the answer carries its signing secret.
    pub async fn register_entity(&self, req: &RegisterEntity) -> Result<Entity, ClientError> {
        self.json(Method::POST, "/v1/entities", req).await
    }

    /// Changes an entity's name or endpoint, or re-enables it.
    pub async fn update_entity(&self, id: &str, req: &UpdateEntity) -> Result<Entity, ClientError> {
        self.json(Method::PATCH, &format!("/v1/entities/{id}"), req)
            .await
    }

    /// Rotates an entity's secret; the old one stays valid for the grace period.
    pub async fn rotate_secret(&self, id: &str) -> Result<Entity, ClientError> {
        self.json(Method::POST, &format!("/v1/entities/{id}/secret"), &())
            .await
    }

    /// Rotates an entity's signing secret and revokes the previous one at once (a secret that
    /// leaked): events signed with it are refused from now on.
    pub async fn rotate_secret_revoking_previous(&self, id: &str) -> Result<Entity, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/entities/{id}/secret?revoke_previous=true"),
            &(),
        )
        .await
    }

    /// Lists entities.
    pub async fn entities(&self) -> Result<Vec<Entity>, ClientError> {
        self.get("/v1/entities").await
    }

    /// One entity.
    pub async fn entity(&self, id: &str) -> Result<Entity, ClientError> {
        self.get(&format!("/v1/entities/{id}")).await
    }

    /// Creates a customer profile.
    pub async fn create_customer(&self) -> Result<CustomerCreated, ClientError> {
        self.json(Method::POST, "/v1/customers", &serde_json::json!({}))
            .await
    }

    /// A customer's profile summary.
    pub async fn customer(&self, id: &str) -> Result<Customer, ClientError> {
        self.get(&format!("/v1/customers/{id}")).await
    }

    /// Links an entity to a customer (operator call).
    pub async fn link(&self, customer: &str, req: &LinkRequest) -> Result<Link, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/customers/{customer}/links"),
            req,
        )
        .await
    }

    /// Starts linking through the entity's OAuth server; answers where to send the customer.
    pub async fn authorize_link(
        &self,
        customer: &str,
        entity: &str,
    ) -> Result<AuthorizeLink, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/customers/{customer}/links/{entity}/authorize"),
            &(),
        )
        .await
    }

    /// Unlinks an entity.
    pub async fn unlink(&self, customer: &str, entity: &str) -> Result<(), ClientError> {
        Self::call(self.request(
            Method::DELETE,
            &format!("/v1/customers/{customer}/links/{entity}"),
        ))
        .await
    }

    /// Saves a rule.
    pub async fn create_rule(&self, customer: &str, rule: &RuleSpec) -> Result<Rule, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/customers/{customer}/rules"),
            rule,
        )
        .await
    }

    /// Lists a customer's rules.
    pub async fn rules(&self, customer: &str) -> Result<Vec<Rule>, ClientError> {
        self.get(&format!("/v1/customers/{customer}/rules")).await
    }

    /// Deletes a rule.
    pub async fn delete_rule(&self, customer: &str, rule: &str) -> Result<(), ClientError> {
        Self::call(self.request(
            Method::DELETE,
            &format!("/v1/customers/{customer}/rules/{rule}"),
        ))
        .await
    }

    /// Everything the vault holds about a customer.
    pub async fn export(&self, customer: &str) -> Result<CustomerExport, ClientError> {
        self.get(&format!("/v1/customers/{customer}/export")).await
    }

    /// Erases a customer and everything held about it.
    pub async fn erase_customer(&self, customer: &str) -> Result<(), ClientError> {
        Self::call(self.request(Method::DELETE, &format!("/v1/customers/{customer}"))).await
    }

    /// Runs a rule on a past event or sample data; nothing is sent.
    pub async fn try_rule(&self, customer: &str, req: &TryRule) -> Result<TryOutcome, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/customers/{customer}/rules/try"),
            req,
        )
        .await
    }

    /// A page of a customer's activity, newest first.
    pub async fn activity(
        &self,
        customer: &str,
        limit: usize,
        before: Option<&str>,
    ) -> Result<ActivityPage, ClientError> {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("limit", &limit.to_string());
        if let Some(b) = before {
            query.append_pair("before", b);
        }
        let path = format!("/v1/customers/{customer}/activity?{}", query.finish());
        self.get(&path).await
    }

    /// A customer's recommendations.
    pub async fn recommendations(&self, customer: &str) -> Result<RecommendationList, ClientError> {
        self.get(&format!("/v1/customers/{customer}/recommendations"))
            .await
    }

    /// Accepts a recommendation.
    pub async fn accept_recommendation(
        &self,
        customer: &str,
        id: &str,
    ) -> Result<Rule, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/customers/{customer}/recommendations/{id}/accept"),
            &(),
        )
        .await
    }

    /// Dismisses a recommendation.
    pub async fn dismiss_recommendation(
        &self,
        customer: &str,
        id: &str,
    ) -> Result<(), ClientError> {
        Self::call(self.request(
            Method::POST,
            &format!("/v1/customers/{customer}/recommendations/{id}/dismiss"),
        ))
        .await
    }

    /// Trains the recommender now (admin). Waits up to [`TRAINING_TIMEOUT`], not the
    /// default 30 s: training takes most of a minute at the default cap of 200,000 customers
    /// on two cores.
    pub async fn train_recommender(&self) -> Result<ModelSummary, ClientError> {
        self.with_timeout(TRAINING_TIMEOUT)
            .json(Method::POST, "/v1/recommendations/train", &())
            .await
    }

    /// Deliveries with a status (admin).
    pub async fn deliveries(&self, status: DeliveryStatus) -> Result<DeliveryPage, ClientError> {
        let s = serde_json::to_value(status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.get(&format!("/v1/deliveries?status={s}")).await
    }

    /// One delivery (admin).
    pub async fn delivery(&self, command_id: &str) -> Result<Delivery, ClientError> {
        self.get(&format!("/v1/deliveries/{command_id}")).await
    }

    /// Replays a failed delivery, or retries a pending one now (admin).
    pub async fn replay(&self, command_id: &str) -> Result<Delivery, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/deliveries/{command_id}/replay"),
            &(),
        )
        .await
    }

    /// Sends an event as its entity would: structured CloudEvent, signed with `secret`.
    pub async fn send_event(
        &self,
        secret: &Secret,
        event: &CloudEvent,
    ) -> Result<EventReceipt, ClientError> {
        let body = serde_json::to_vec(event).map_err(|e| ClientError::Unexpected {
            status: 0,
            body: e.to_string(),
        })?;
        Self::call(signed_event_request(
            &self.http, &self.base, secret, &event.id, body,
        ))
        .await
    }
}

/// Builds a signed `POST /v1/events` request (shared with the bench's load generator).
pub fn signed_event_request(
    http: &reqwest::Client,
    base: &str,
    secret: &Secret,
    msg_id: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let ts = webhook::unix_now();
    let sig = secret.sign(msg_id, ts, &body);
    http.post(format!("{base}/v1/events"))
        .header("content-type", CLOUDEVENTS_CONTENT_TYPE)
        .header(webhook::HEADER_ID, msg_id)
        .header(webhook::HEADER_TIMESTAMP, ts.to_string())
        .header(webhook::HEADER_SIGNATURE, sig)
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_with_a_code_this_build_does_not_know_keeps_what_it_says() {
        let known = br#"{"type":"urn:custos:problem:overloaded","title":"Too many requests","status":429,"detail":"queue full","code":"overloaded"}"#;
        assert_eq!(
            refusal(429, known).code(),
            Some(crate::ErrorCode::Overloaded)
        );
        let newer = br#"{"type":"urn:custos:problem:quota_exceeded","title":"Quota","status":429,"detail":"monthly quota","code":"quota_exceeded"}"#;
        match refusal(429, newer) {
            ClientError::UnknownProblem {
                status,
                code,
                detail,
            } => {
                assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
                assert_eq!(detail.as_deref(), Some("monthly quota"));
            }
            other => panic!("read as {other:?}"),
        }
        let e = refusal(429, newer);
        assert_eq!(e.to_string(), "quota_exceeded (429): monthly quota");
        assert_eq!(e.code(), None);
        assert!(matches!(
            refusal(502, b"<html>bad gateway</html>"),
            ClientError::Unexpected { status: 502, .. }
        ));
    }
}
