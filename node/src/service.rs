//! The vault's operations, one method per API call: validation, authorization, then a read
//! or a proposal (directly, or through the customer's profile actor). Handlers call these.

use std::sync::Arc;

use custos_api::limits::{
    is_valid_id, MAX_NAME_LEN, MAX_PAGE, MAX_SCHEMA_BYTES, MAX_TYPES_PER_ENTITY, MAX_URL_LEN,
};
use custos_api::types::*;
use custos_api::webhook::{self, Secret, SignedHeaders, WebhookError};
use custos_api::{CloudEvent, ErrorCode};
use custos_raft::records::{
    CustomerRecord, DeliveryState, EntityRecord, EventRecord, Ingest, OAuthRecord, PendingLink,
    TypeRecord,
};
use custos_raft::{ChangeOutcome, StateChange};
use sha2::{Digest, Sha256};

use crate::core::{check_schema, compile_schema, Core};
use crate::error::ServiceError;
use crate::profile::{receipt, ProfileReply, ProfileRequest, ProfileRouter};
use crate::recommend::vault::Served;

pub mod portal;

/// A linking finished through OAuth.
#[derive(Debug, Clone)]
pub struct FinishedLink {
    /// The link made.
    pub link: Link,
    /// Whose.
    pub customer_id: String,
    /// Started from the portal.
    pub via_portal: bool,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator.
    Admin,
    /// A customer, by id.
    Customer(String),
}

/// The vault's services on one node.
#[derive(Clone)]
pub struct Vault {
    core: Arc<Core>,
    profiles: ProfileRouter,
    admin_token_hash: Arc<[u8; 32]>,
    /// The stored model, rebuilt for serving when its version changes.
    served: Arc<std::sync::Mutex<Option<Arc<Served>>>>,
    /// Where entities send customers back after signing in (`<public url>/v1/oauth/callback`).
    callback_url: Arc<str>,
    /// For OAuth token exchanges: no redirects, and the delivery SSRF guard.
    oauth_http: reqwest::Client,
    /// Seals entities' access tokens at rest.
    seal: Arc<crate::seal::KeyRing>,
}

/// The (customer, `source.type`) pairs received within the engagement window.
fn recent(engagements: Vec<(String, String, u64, i64)>) -> Vec<(String, String)> {
    let since = unix_now_ms() - crate::recommend::vault::ENGAGEMENT_RECENCY_MS;
    engagements
        .into_iter()
        .filter(|(_, _, count, last)| *count > 0 && *last >= since)
        .map(|(c, t, _, _)| (c, t))
        .collect()
}

/// Trains the recommender on every customer's rules and stores the model through Raft.
pub async fn train_recommender(core: &Core) -> Result<ModelSummary, ServiceError> {
    let (rules, links, engagements, dismissals, current) = core
        .read(|r| {
            Ok((
                r.all_rules()?,
                r.all_links()?,
                r.engagements(None)?,
                r.dismissal_counts()?,
                r.model()?,
            ))
        })
        .await?;
    let received = recent(engagements);
    let version = current.map(|m| m.version).unwrap_or(0) + 1;
    let (beta, k) = (
        core.config.recommend_beta,
        core.config.recommend_min_customers,
    );
    let now = unix_now_ms();
    // Training is CPU work on counts: keep it off the event loops.
    let model = tokio::task::spawn_blocking(move || {
        let population = crate::recommend::vault::Population {
            rules,
            links,
            received,
            dismissals,
        };
        crate::recommend::vault::train(population, version, now, beta, k)
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let summary = ModelSummary {
        version: model.version,
        trained_at: rfc3339_ms(model.trained_ms),
        customers: model.customers,
        templates: model.templates.len() as u32,
        pairs: model.pairs.len() as u32,
        min_support: model.min_support,
    };
    core.propose(StateChange::PutModel(Box::new(model))).await?;
    Ok(summary)
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn unexpected(reply: ProfileReply) -> ServiceError {
    ServiceError::Internal(format!("unexpected profile reply {reply:?}"))
}

impl Vault {
    /// The services over `core`, routing customer work through `profiles`.
    pub fn new(
        core: Arc<Core>,
        profiles: ProfileRouter,
        admin_token: &str,
        public_url: &str,
        seal: crate::seal::KeyRing,
    ) -> Self {
        let oauth_http =
            crate::delivery::http_client(&core.config.delivery, core.config.allow_private_targets);
        Vault {
            callback_url: Arc::from(format!(
                "{}/v1/oauth/callback",
                public_url.trim_end_matches('/')
            )),
            oauth_http,
            seal: Arc::new(seal),
            core,
            profiles,
            admin_token_hash: Arc::new(sha256(admin_token.as_bytes())),
            served: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The shared node parts.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Identifies the caller from a bearer token.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, ServiceError> {
        let token = bearer.ok_or_else(|| {
            ServiceError::refused(
                ErrorCode::Unauthorized,
                "send Authorization: Bearer <token>",
            )
        })?;
        if token.is_empty() || token.len() > 256 {
            return Err(ServiceError::refused(
                ErrorCode::Unauthorized,
                "invalid token",
            ));
        }
        let hash = sha256(token.as_bytes());
        // Comparing hashes keeps the comparison's timing independent of the token.
        if hash == *self.admin_token_hash {
            return Ok(Caller::Admin);
        }
        match self.core.read(move |r| r.customer_by_token(&hash)).await? {
            Some(id) => Ok(Caller::Customer(id)),
            None => Err(ServiceError::refused(
                ErrorCode::Unauthorized,
                "invalid token",
            )),
        }
    }

    /// Requires the operator.
    pub async fn require_admin(&self, bearer: Option<&str>) -> Result<(), ServiceError> {
        match self.authenticate(bearer).await? {
            Caller::Admin => Ok(()),
            Caller::Customer(_) => Err(ServiceError::refused(
                ErrorCode::Forbidden,
                "this call is for operators",
            )),
        }
    }

    /// Requires the operator or the customer `id` itself.
    pub async fn require_customer(
        &self,
        bearer: Option<&str>,
        id: &str,
    ) -> Result<(), ServiceError> {
        match self.authenticate(bearer).await? {
            Caller::Admin => Ok(()),
            Caller::Customer(c) if c == id => Ok(()),
            Caller::Customer(_) => Err(ServiceError::refused(
                ErrorCode::Forbidden,
                "a customer can only act on its own profile",
            )),
        }
    }

    // ---- entities -------------------------------------------------------------------------

    /// Registers an entity and issues its signing secret.
    pub async fn register_entity(&self, req: RegisterEntity) -> Result<Entity, ServiceError> {
        validate_entity(&req)?;
        let now = unix_now_ms();
        let types = |ts: &[TypeSpec]| {
            ts.iter()
                .map(|t| TypeRecord {
                    name: t.type_name.clone(),
                    schema_json: t.schema.as_ref().map(|s| s.to_string()),
                })
                .collect()
        };
        let record = EntityRecord {
            id: req.id,
            name: req.name,
            command_url: req.command_url,
            endpoint_enabled: true,
            event_types: types(&req.event_types),
            command_types: types(&req.command_types),
            secret: Secret::generate().encode(),
            previous_secret: None,
            previous_valid_until_ms: 0,
            created_ms: now,
            oauth: req.oauth.map(|o| OAuthRecord {
                authorize_url: o.authorize_url,
                token_url: o.token_url,
                client_id: o.client_id,
                revoke_url: o.revoke_url,
            }),
        };
        self.core
            .propose(StateChange::RegisterEntity(record.clone()))
            .await?;
        Ok(record.to_wire(true))
    }

    /// Changes an entity's name or endpoint.
    pub async fn update_entity(&self, id: &str, req: UpdateEntity) -> Result<Entity, ServiceError> {
        if let Some(n) = &req.name {
            check_name("name", n)?;
        }
        if let Some(u) = &req.command_url {
            check_url("command_url", u)?;
        }
        self.core
            .propose(StateChange::UpdateEntity {
                id: id.to_owned(),
                name: req.name,
                command_url: req.command_url,
                endpoint_enabled: req.endpoint_enabled,
            })
            .await?;
        self.entity(id).await
    }

    /// Issues a new secret; the old one verifies events for the grace period.
    pub async fn rotate_secret(&self, id: &str) -> Result<Entity, ServiceError> {
        let grace_ms = (self.core.config.secret_grace_hours * 3_600_000.0) as i64;
        let secret = Secret::generate().encode();
        self.core
            .propose(StateChange::RotateSecret {
                id: id.to_owned(),
                secret: secret.clone(),
                previous_valid_until_ms: unix_now_ms() + grace_ms,
            })
            .await?;
        let mut e = self.entity(id).await?;
        e.secret = Some(secret);
        Ok(e)
    }

    /// Every entity.
    pub async fn entities(&self) -> Result<Vec<Entity>, ServiceError> {
        let list = self.core.read(|r| r.entities()).await?;
        Ok(list.iter().map(|e| e.to_wire(false)).collect())
    }

    /// One entity.
    pub async fn entity(&self, id: &str) -> Result<Entity, ServiceError> {
        let owned = id.to_owned();
        self.core
            .read(move |r| r.entity(&owned))
            .await?
            .map(|e| e.to_wire(false))
            .ok_or_else(|| ServiceError::not_found("entity", id))
    }

    // ---- customers ------------------------------------------------------------------------

    /// Creates a customer profile with a fresh bearer token.
    pub async fn create_customer(&self) -> Result<CustomerCreated, ServiceError> {
        let id = format!("cus_{}", uuid::Uuid::now_v7().simple());
        let token = format!(
            "ctok_{}",
            Secret::generate().encode().trim_start_matches("whsec_")
        )
        .replace(['+', '/', '='], "");
        self.core
            .propose(StateChange::CreateCustomer {
                customer: CustomerRecord {
                    id: id.clone(),
                    created_ms: unix_now_ms(),
                    token_hash: sha256(token.as_bytes()).to_vec(),
                    email: None,
                },
            })
            .await?;
        Ok(CustomerCreated { id, token })
    }

    /// A customer's summary.
    pub async fn customer(&self, id: &str) -> Result<Customer, ServiceError> {
        let owned = id.to_owned();
        let (rec, links) = self
            .core
            .read(move |r| Ok((r.customer(&owned)?, r.links(&owned)?)))
            .await?;
        let rec = rec.ok_or_else(|| ServiceError::not_found("customer", id))?;
        Ok(Customer {
            id: rec.id,
            created_at: rfc3339_ms(rec.created_ms),
            links: links.iter().map(|l| l.to_wire()).collect(),
        })
    }

    /// Links an entity (operator path; the portal's OAuth flow ends in the same request).
    pub async fn link(&self, customer: &str, req: LinkRequest) -> Result<Link, ServiceError> {
        self.link_with_token(customer, req, None).await
    }

    async fn link_with_token(
        &self,
        customer: &str,
        req: LinkRequest,
        sealed_token: Option<Vec<u8>>,
    ) -> Result<Link, ServiceError> {
        check_id("customer id", customer)?;
        match self
            .profiles
            .send(customer, ProfileRequest::Link(req, sealed_token))
            .await?
        {
            ProfileReply::Linked(l) => Ok(l),
            other => Err(unexpected(other)),
        }
    }

    /// Unlinks an entity at once: its events are ignored and pending commands cancelled;
    /// then the access token is revoked at the entity, where it offers revocation.
    pub async fn unlink(&self, customer: &str, entity: &str) -> Result<(), ServiceError> {
        check_id("customer id", customer)?;
        check_id("entity id", entity)?;
        let (c, e) = (customer.to_owned(), entity.to_owned());
        let link = self.core.read(move |r| r.link(&c, &e)).await?;
        match self
            .profiles
            .send(customer, ProfileRequest::Unlink(entity.to_owned()))
            .await?
        {
            ProfileReply::Done => {}
            other => return Err(unexpected(other)),
        }
        if let Some(sealed) = link.and_then(|l| l.sealed_token) {
            self.revoke_token(customer, entity, &sealed).await;
        }
        Ok(())
    }

    /// Revokes an access token at the entity (RFC 7009). Best effort: the link is already
    /// gone, so the vault no longer acts on it whatever the entity answers.
    async fn revoke_token(&self, customer: &str, entity_id: &str, sealed: &[u8]) {
        let token = match self.seal.open(customer, entity_id, sealed) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(entity = %entity_id, error = %e, "cannot open token to revoke");
                return;
            }
        };
        let Ok(entity) = self.core.entity_required(entity_id).await else {
            return;
        };
        let Some(oauth) = entity.record.oauth.as_ref() else {
            return;
        };
        let Some(url) = oauth.revoke_url.as_deref() else {
            return;
        };
        let sent = self
            .oauth_http
            .post(url)
            .form(&[
                ("token", token.as_str()),
                ("token_type_hint", "access_token"),
                ("client_id", oauth.client_id.as_str()),
            ])
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                tracing::info!(entity = %entity_id, "access token revoked at the entity");
            }
            Ok(r) => {
                tracing::warn!(entity = %entity_id, status = %r.status(), "revocation refused")
            }
            Err(e) => tracing::warn!(entity = %entity_id, error = %e, "revocation failed"),
        }
    }

    /// Starts linking through the entity's OAuth 2.0 server (authorization code with PKCE):
    /// remembers the verifier under the state, and answers where to send the customer.
    pub async fn authorize_link(
        &self,
        customer: &str,
        entity_id: &str,
        via_portal: bool,
    ) -> Result<AuthorizeLink, ServiceError> {
        check_id("customer id", customer)?;
        check_id("entity id", entity_id)?;
        let entity = self.core.entity_required(entity_id).await?;
        let Some(oauth) = entity.record.oauth.clone() else {
            return Err(ServiceError::invalid(
                "entity_id",
                format!("{entity_id} does not link through OAuth"),
            ));
        };
        let owned = customer.to_owned();
        if self.core.read(move |r| r.customer(&owned)).await?.is_none() {
            return Err(ServiceError::not_found("customer", customer));
        }
        let state = custos_api::oauth::random_token(24);
        let verifier = custos_api::oauth::random_token(48);
        let challenge = custos_api::oauth::pkce_challenge(&verifier);
        self.core
            .propose(StateChange::BeginLink {
                state_hash: sha256(state.as_bytes()).to_vec(),
                pending: PendingLink {
                    customer_id: customer.to_owned(),
                    entity_id: entity_id.to_owned(),
                    verifier,
                    at_ms: unix_now_ms(),
                    via_portal,
                },
            })
            .await?;
        let mut url = url::Url::parse(&oauth.authorize_url)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &oauth.client_id)
            .append_pair("redirect_uri", &self.callback_url)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(AuthorizeLink {
            authorize_url: url.to_string(),
        })
    }

    /// Finishes linking when the entity sends the customer back: the state is single-use and
    /// expires; the code is exchanged with the verifier; the subject it yields is linked and
    /// the access token kept sealed. When the linking started in the portal, `session` (the
    /// browser's signed-in customer) must be the customer who started it.
    pub async fn finish_link(
        &self,
        code: &str,
        state: &str,
        session: Option<&str>,
    ) -> Result<FinishedLink, ServiceError> {
        if code.is_empty() || code.len() > 1024 || state.is_empty() || state.len() > 256 {
            return Err(ServiceError::invalid("code/state", "missing or too long"));
        }
        let taken = self
            .core
            .propose(StateChange::TakeLink {
                state_hash: sha256(state.as_bytes()).to_vec(),
            })
            .await
            .map_err(|e| match e {
                ServiceError::Refused {
                    code: ErrorCode::NotFound,
                    ..
                } => ServiceError::invalid("state", "unknown, already used or expired"),
                other => other,
            })?;
        let ChangeOutcome::LinkTaken(pending) = taken else {
            return Err(ServiceError::Internal("unexpected outcome".into()));
        };
        if unix_now_ms() - pending.at_ms > custos_api::oauth::LINK_TTL_MS {
            return Err(ServiceError::invalid(
                "state",
                "unknown, already used or expired",
            ));
        }
        if pending.via_portal && session != Some(pending.customer_id.as_str()) {
            return Err(ServiceError::refused(
                ErrorCode::Forbidden,
                "this linking was started by another signed-in customer",
            ));
        }
        let entity = self.core.entity_required(&pending.entity_id).await?;
        let Some(oauth) = entity.record.oauth.clone() else {
            return Err(ServiceError::invalid(
                "entity_id",
                "the entity no longer links through OAuth",
            ));
        };
        let resp = self
            .oauth_http
            .post(&oauth.token_url)
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.callback_url),
                ("client_id", &oauth.client_id),
                ("code_verifier", &pending.verifier),
            ])
            .send()
            .await
            .map_err(|e| {
                ServiceError::refused(ErrorCode::Unavailable, format!("token endpoint: {e}"))
            })?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            return Err(ServiceError::refused(
                ErrorCode::Forbidden,
                format!(
                    "the entity refused the code: {}",
                    body["error"].as_str().unwrap_or("error")
                ),
            ));
        }
        let subject = body["subject"]
            .as_str()
            .or_else(|| body["sub"].as_str())
            .ok_or_else(|| {
                ServiceError::refused(
                    ErrorCode::Unavailable,
                    "the entity's token answer has no subject",
                )
            })?;
        let sealed = match body["access_token"].as_str() {
            Some(t) if t.len() <= 4096 => Some(
                self.seal
                    .seal(&pending.customer_id, &pending.entity_id, t)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
            ),
            _ => None,
        };
        let link = self
            .link_with_token(
                &pending.customer_id,
                LinkRequest {
                    entity_id: pending.entity_id,
                    subject: subject.to_owned(),
                },
                sealed,
            )
            .await?;
        Ok(FinishedLink {
            link,
            customer_id: pending.customer_id,
            via_portal: pending.via_portal,
        })
    }

    // ---- rules ----------------------------------------------------------------------------

    /// Validates and saves a rule.
    pub async fn create_rule(&self, customer: &str, spec: RuleSpec) -> Result<Rule, ServiceError> {
        check_id("customer id", customer)?;
        match self
            .profiles
            .send(customer, ProfileRequest::SaveRule(spec))
            .await?
        {
            ProfileReply::Saved(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// A customer's rules.
    pub async fn rules(&self, customer: &str) -> Result<Vec<Rule>, ServiceError> {
        let owned = customer.to_owned();
        let (exists, rules) = self
            .core
            .read(move |r| Ok((r.customer(&owned)?.is_some(), r.rules(&owned)?)))
            .await?;
        if !exists {
            return Err(ServiceError::not_found("customer", customer));
        }
        Ok(rules.iter().map(|r| r.to_wire()).collect())
    }

    /// One rule.
    pub async fn rule(&self, customer: &str, rule_id: &str) -> Result<Rule, ServiceError> {
        self.rules(customer)
            .await?
            .into_iter()
            .find(|r| r.id == rule_id)
            .ok_or_else(|| ServiceError::not_found("rule", rule_id))
    }

    /// Deletes a rule.
    pub async fn delete_rule(&self, customer: &str, rule_id: &str) -> Result<(), ServiceError> {
        check_id("customer id", customer)?;
        check_id("rule id", rule_id)?;
        match self
            .profiles
            .send(customer, ProfileRequest::DeleteRule(rule_id.to_owned()))
            .await?
        {
            ProfileReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// A page of a customer's activity, newest first.
    pub async fn activity(
        &self,
        customer: &str,
        before: Option<String>,
        limit: usize,
    ) -> Result<ActivityPage, ServiceError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let owned = customer.to_owned();
        let (exists, (items, next)) = self
            .core
            .read(move |r| {
                Ok((
                    r.customer(&owned)?.is_some(),
                    r.activity(&owned, before.as_deref(), limit)?,
                ))
            })
            .await?;
        if !exists {
            return Err(ServiceError::not_found("customer", customer));
        }
        Ok(ActivityPage {
            items: items
                .into_iter()
                .map(|(at, rec)| ActivityItem {
                    at: rfc3339_ms(at),
                    kind: rec.to_wire(),
                })
                .collect(),
            next,
        })
    }

    // ---- recommendations ------------------------------------------------------------------

    /// Trains the recommender now.
    pub async fn train_recommender(&self) -> Result<ModelSummary, ServiceError> {
        train_recommender(&self.core).await
    }

    /// A customer's recommendations, at or above the configured confidence.
    pub async fn recommendations(
        &self,
        customer: &str,
    ) -> Result<RecommendationList, ServiceError> {
        check_id("customer id", customer)?;
        let owned = customer.to_owned();
        let (exists, rules, links, engagements, dismissed, model) = self
            .core
            .read(move |r| {
                Ok((
                    r.customer(&owned)?.is_some(),
                    r.rules(&owned)?,
                    r.links(&owned)?,
                    r.engagements(Some(&owned))?,
                    r.dismissed(&owned)?,
                    r.model()?,
                ))
            })
            .await?;
        let received: Vec<String> = recent(engagements).into_iter().map(|(_, t)| t).collect();
        let linked: Vec<String> = links.into_iter().map(|l| l.entity_id).collect();
        if !exists {
            return Err(ServiceError::not_found("customer", customer));
        }
        let threshold = self.core.config.recommend_threshold;
        let Some(model) = model else {
            return Ok(RecommendationList {
                model_version: None,
                threshold,
                items: Vec::new(),
            });
        };
        let served = {
            let mut cache = self.served.lock().unwrap_or_else(|p| p.into_inner());
            match cache.as_ref().filter(|s| s.record.version == model.version) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(Served::new(model));
                    *cache = Some(s.clone());
                    s
                }
            }
        };
        let dismissed: std::collections::HashSet<String> = dismissed.into_iter().collect();
        Ok(RecommendationList {
            model_version: Some(served.record.version),
            threshold,
            items: served.recommend(&rules, &linked, &received, &dismissed, threshold),
        })
    }

    /// Accepts a recommendation: its rule is created and validated like any rule.
    pub async fn accept_recommendation(
        &self,
        customer: &str,
        rec_id: &str,
    ) -> Result<Rule, ServiceError> {
        let list = self.recommendations(customer).await?;
        let rec = list
            .items
            .into_iter()
            .find(|r| r.id == rec_id)
            .ok_or_else(|| ServiceError::not_found("recommendation", rec_id))?;
        self.create_rule(customer, rec.rule).await
    }

    /// Dismisses a recommendation; it is not shown again.
    pub async fn dismiss_recommendation(
        &self,
        customer: &str,
        rec_id: &str,
    ) -> Result<(), ServiceError> {
        check_id("customer id", customer)?;
        let template = crate::recommend::vault::decode_id(rec_id)
            .filter(|t| t.len() <= 4 * custos_api::limits::MAX_ID_LEN + 3)
            .ok_or_else(|| ServiceError::invalid("recommendation id", "not a recommendation id"))?;
        self.core
            .propose(StateChange::Dismiss {
                customer_id: customer.to_owned(),
                template,
            })
            .await?;
        Ok(())
    }

    // ---- events ---------------------------------------------------------------------------

    /// Verifies, decodes and ingests an entity's event; answers once it is committed.
    pub async fn ingest_event(
        &self,
        headers: SignedHeaders<'_>,
        body: &[u8],
    ) -> Result<EventReceipt, ServiceError> {
        let received_ms = unix_now_ms();
        let event: CloudEvent = serde_json::from_slice(body).map_err(|e| {
            ServiceError::refused(ErrorCode::MalformedBody, format!("not a CloudEvent: {e}"))
        })?;
        // The source names the key; check it is a plausible id before using it.
        if !is_valid_id(&event.source) {
            return Err(ServiceError::invalid(
                "source",
                "must be a registered entity id",
            ));
        }
        let Some(entity) = self.core.entity(&event.source).await? else {
            return Err(ServiceError::refused(
                ErrorCode::UnknownEntity,
                format!("no entity {} is registered", event.source),
            ));
        };
        webhook::verify(
            &entity.valid_secrets(received_ms),
            headers,
            body,
            received_ms / 1000,
        )
        .map_err(|e| match e {
            WebhookError::MissingHeader(_) => {
                ServiceError::refused(ErrorCode::MissingSignature, e.to_string())
            }
            WebhookError::StaleTimestamp(_) => {
                ServiceError::refused(ErrorCode::StaleTimestamp, e.to_string())
            }
            WebhookError::BadSignature | WebhookError::BadSecret => {
                ServiceError::refused(ErrorCode::BadSignature, e.to_string())
            }
        })?;
        event
            .validate_incoming()
            .map_err(|e| ServiceError::invalid(e.field, e.reason))?;
        if entity.record.event_type(&event.event_type).is_none() {
            return Err(ServiceError::refused(
                ErrorCode::UnknownType,
                format!(
                    "{} does not declare event type {}",
                    event.source, event.event_type
                ),
            ));
        }
        if let Some(v) = entity.event_schema(&event.event_type) {
            let data = event.data.clone().unwrap_or(serde_json::Value::Null);
            check_schema(v, &data).map_err(|e| {
                ServiceError::refused(ErrorCode::SchemaViolation, format!("data: {e}"))
            })?;
        }
        let subject = event.subject.clone().unwrap_or_default();
        let (source, subj) = (event.source.clone(), subject.clone());
        let customer = self
            .core
            .read(move |r| r.customer_for_subject(&source, &subj))
            .await?;
        let raw = String::from_utf8_lossy(body).into_owned();
        let result = match customer {
            Some(customer) => {
                let req = ProfileRequest::Ingest {
                    event: Box::new(event),
                    raw,
                    received_ms,
                };
                match self.profiles.send(&customer, req).await? {
                    ProfileReply::Receipt(r) => Ok(r),
                    other => Err(unexpected(other)),
                }
            }
            None => {
                // No customer has linked this subject: nothing is triggered, but the event is
                // still deduplicated and recorded as ignored.
                let ingest = Ingest {
                    event: EventRecord {
                        id: event.id.clone(),
                        source: event.source.clone(),
                        event_type: event.event_type.clone(),
                        subject,
                        cloudevent_json: raw,
                    },
                    customer_id: None,
                    commands: Vec::new(),
                    ignored_reason: Some(format!(
                        "no customer has linked this subject at {}",
                        event.source
                    )),
                    at_ms: received_ms,
                };
                let outcome = self.core.propose(StateChange::Ingest(ingest)).await?;
                receipt(event.id, outcome)
            }
        };
        if let Ok(r) = &result {
            let status = match r.status {
                EventStatus::Accepted => "accepted",
                EventStatus::Ignored => "ignored",
                EventStatus::Duplicate => "duplicate",
            };
            metrics::counter!("custos_events_total", "status" => status).increment(1);
            metrics::counter!("custos_commands_created_total").increment(
                if r.status == EventStatus::Accepted {
                    r.commands.len() as u64
                } else {
                    0
                },
            );
        }
        result
    }

    // ---- deliveries -----------------------------------------------------------------------

    /// Deliveries in a status, paged by command id.
    pub async fn deliveries(
        &self,
        status: DeliveryStatus,
        after: Option<String>,
        limit: usize,
    ) -> Result<DeliveryPage, ServiceError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let state = match status {
            DeliveryStatus::Pending => DeliveryState::Pending,
            DeliveryStatus::Delivered => DeliveryState::Delivered,
            DeliveryStatus::Failed => DeliveryState::Failed,
            DeliveryStatus::Cancelled => DeliveryState::Cancelled,
        };
        let (items, next) = self
            .core
            .read(move |r| r.deliveries(state, after.as_deref(), limit))
            .await?;
        Ok(DeliveryPage {
            items: items.iter().map(|d| d.to_wire()).collect(),
            next,
        })
    }

    /// One delivery.
    pub async fn delivery(&self, command_id: &str) -> Result<Delivery, ServiceError> {
        check_id("command id", command_id)?;
        let owned = command_id.to_owned();
        self.core
            .read(move |r| r.outbox(&owned))
            .await?
            .map(|d| d.to_wire())
            .ok_or_else(|| ServiceError::not_found("delivery", command_id))
    }

    /// Makes a failed delivery pending again (its attempts are kept).
    pub async fn replay(&self, command_id: &str) -> Result<Delivery, ServiceError> {
        check_id("command id", command_id)?;
        self.core
            .propose(StateChange::Replay {
                command_id: command_id.to_owned(),
                at_ms: unix_now_ms(),
            })
            .await?;
        self.delivery(command_id).await
    }

    // ---- health ---------------------------------------------------------------------------

    /// Whether this node accepts events now, and why not.
    pub async fn readiness(&self) -> Readiness {
        let metrics = self.core.raft.metrics().borrow().clone();
        let node_id = self.core.config.node_id;
        let mut problems = Vec::new();
        if metrics.current_leader.is_none() {
            problems.push("no Raft leader".to_owned());
        } else if metrics.current_leader != Some(node_id) {
            problems.push(format!(
                "not the leader (node {:?} is); forward writes there",
                metrics.current_leader
            ));
        }
        if let Err(e) = &metrics.running_state {
            problems.push(format!("raft stopped: {e}"));
        }
        // The worker goes round at least every second; a leader whose worker has not for
        // 10 s is not draining its outbox and must not look healthy (Svix #1844).
        let silent_ms = unix_now_ms() - self.core.due.last_beat();
        if metrics.current_leader == Some(node_id) && silent_ms > 10_000 {
            problems.push(format!("delivery worker silent for {} s", silent_ms / 1000));
        }
        let pending = self.core.due.len();
        Readiness {
            ready: problems.is_empty(),
            node_id,
            leader: metrics.current_leader,
            applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            pending_deliveries: pending as u64,
            problems,
        }
    }
}

fn check_id(field: &str, id: &str) -> Result<(), ServiceError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            field,
            "must be 1..=128 of [A-Za-z0-9._:-]",
        ))
    }
}

fn check_name(field: &str, name: &str) -> Result<(), ServiceError> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ServiceError::invalid(
            field,
            format!("must be 1..={MAX_NAME_LEN} printable bytes"),
        ));
    }
    Ok(())
}

fn check_url(field: &str, u: &str) -> Result<(), ServiceError> {
    if u.len() > MAX_URL_LEN {
        return Err(ServiceError::invalid(
            field,
            format!("longer than {MAX_URL_LEN}"),
        ));
    }
    let parsed = url::Url::parse(u).map_err(|e| ServiceError::invalid(field, e))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(ServiceError::invalid(
            field,
            "must be an http(s) URL with a host",
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ServiceError::invalid(field, "must not carry credentials"));
    }
    Ok(())
}

fn validate_entity(req: &RegisterEntity) -> Result<(), ServiceError> {
    check_id("id", &req.id)?;
    check_name("name", &req.name)?;
    check_url("command_url", &req.command_url)?;
    if let Some(o) = &req.oauth {
        check_url("oauth.authorize_url", &o.authorize_url)?;
        check_url("oauth.token_url", &o.token_url)?;
        if let Some(r) = &o.revoke_url {
            check_url("oauth.revoke_url", r)?;
        }
        if o.client_id.is_empty() || o.client_id.len() > 256 {
            return Err(ServiceError::invalid(
                "oauth.client_id",
                "must be 1..=256 bytes",
            ));
        }
    }
    for (field, types) in [
        ("event_types", &req.event_types),
        ("command_types", &req.command_types),
    ] {
        if types.len() > MAX_TYPES_PER_ENTITY {
            return Err(ServiceError::invalid(
                field,
                format!("at most {MAX_TYPES_PER_ENTITY}"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for t in types {
            if !is_valid_id(&t.type_name) {
                return Err(ServiceError::invalid(
                    field,
                    format!("bad type name {:?}", t.type_name),
                ));
            }
            if !seen.insert(&t.type_name) {
                return Err(ServiceError::invalid(
                    field,
                    format!("{} declared twice", t.type_name),
                ));
            }
            if let Some(schema) = &t.schema {
                if schema.to_string().len() > MAX_SCHEMA_BYTES {
                    return Err(ServiceError::invalid(
                        field,
                        format!("{}: schema too large", t.type_name),
                    ));
                }
                compile_schema(schema).map_err(|e| {
                    ServiceError::invalid(
                        field,
                        format!("{}: invalid JSON Schema: {e}", t.type_name),
                    )
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity() -> RegisterEntity {
        RegisterEntity {
            id: "hotel".into(),
            name: "Hotel".into(),
            command_url: "https://hotel.example/commands".into(),
            event_types: vec![],
            command_types: vec![TypeSpec {
                type_name: "room.hold".into(),
                schema: Some(serde_json::json!({"type": "object"})),
            }],
            oauth: None,
        }
    }

    #[test]
    fn entity_validation() {
        assert!(validate_entity(&entity()).is_ok());
        let mut e = entity();
        e.command_url = "ftp://x".into();
        assert!(validate_entity(&e).is_err());
        let mut e = entity();
        e.command_url = "https://user:pw@x.example/".into();
        assert!(validate_entity(&e).is_err());
        let mut e = entity();
        e.command_types[0].schema = Some(serde_json::json!({"type": 12}));
        assert!(validate_entity(&e).is_err());
        let mut e = entity();
        e.command_types.push(e.command_types[0].clone());
        assert!(validate_entity(&e).is_err());
        let mut e = entity();
        e.id = "has space".into();
        assert!(validate_entity(&e).is_err());
    }
}
