//! Customers: profiles and their API tokens, links (by an operator, or through the entity's
//! OAuth server), unlinking with token revocation, and the activity timeline.

use custos_api::types::*;
use custos_api::webhook::Secret;
use custos_api::ErrorCode;
use custos_raft::records::{CustomerRecord, PendingLink};
use custos_raft::shard::{slot_of, slot_tag};
use custos_raft::{ChangeOutcome, StateChange};

use super::{
    check_cursor, check_id, check_page_limit, sha256, unexpected, Vault, CUSTOMER_TOKEN_PREFIX,
};
use crate::error::ServiceError;
use crate::forward::slot_of_token;
use crate::outbound::{error_chain, read_capped};

/// The largest token endpoint answer read (a token answer is a few KiB at most).
const MAX_TOKEN_ANSWER: usize = 64 * 1024;
use crate::profile::{ProfileReply, ProfileRequest};

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

/// A new customer id.
pub fn new_customer_id() -> String {
    format!("cus_{}", uuid::Uuid::now_v7().simple())
}

/// A random token carrying `customer`'s slot in front (`<3 hex>.<random>`), so any node
/// routes it to the customer's group without a lookup.
pub fn slotted_token(customer: &str) -> String {
    format!(
        "{}.{}",
        slot_tag(slot_of(customer)),
        custos_api::oauth::random_token(32)
    )
}

impl Vault {
    /// Creates a customer profile with a fresh bearer token.
    pub async fn create_customer(&self) -> Result<CustomerCreated, ServiceError> {
        let id = new_customer_id();
        let token = format!(
            "{CUSTOMER_TOKEN_PREFIX}{}",
            Secret::generate().encode().trim_start_matches("whsec_")
        )
        .replace(['+', '/', '='], "");
        self.core
            .propose(
                self.group_of(&id)?,
                StateChange::CreateCustomer {
                    customer: CustomerRecord {
                        id: id.clone(),
                        created_ms: unix_now_ms(),
                        token_hash: sha256(token.as_bytes()).to_vec(),
                        email: None,
                        session_epoch: 0,
                    },
                    intent: None,
                },
            )
            .await?;
        Ok(CustomerCreated { id, token })
    }

    /// A customer's summary.
    pub async fn customer(&self, id: &str) -> Result<Customer, ServiceError> {
        check_id("customer id", id)?;
        let owned = id.to_owned();
        let (rec, links) = self
            .read_customer(id, move |r| Ok((r.customer(&owned)?, r.links(&owned)?)))
            .await?;
        let rec = rec.ok_or_else(|| ServiceError::not_found("customer", id))?;
        Ok(Customer {
            group: self.group_of(&rec.id)?,
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
        let link = self
            .read_customer(customer, move |r| r.link(&c, &e))
            .await?;
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
    pub(crate) async fn revoke_token(&self, customer: &str, entity_id: &str, sealed: &[u8]) {
        let ring = match self.key_ring().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "no token keys to revoke with");
                return;
            }
        };
        let token = match ring.open(customer, entity_id, sealed) {
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
        let request = match self.core.outbound.post(url) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(entity = %entity_id, error = %e, "revocation not sent");
                return;
            }
        };
        let sent = request
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
            Err(e) => {
                tracing::warn!(entity = %entity_id, error = %error_chain(&e), "revocation failed")
            }
        }
    }

    /// Starts linking through the entity's OAuth 2.0 server (authorization code with PKCE):
    /// remembers the verifier under the state, and answers where to send the customer. The
    /// state carries the customer's slot, so the callback reaches the customer's group.
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
            return Err(ServiceError::refused(
                ErrorCode::Conflict,
                format!("{entity_id} does not link through OAuth: link it with a subject"),
            ));
        };
        self.customer_record(customer).await?;
        let state = slotted_token(customer);
        let verifier = custos_api::oauth::random_token(48);
        let challenge = custos_api::oauth::pkce_challenge(&verifier);
        self.core
            .propose(
                self.group_of(customer)?,
                StateChange::BeginLink {
                    state_hash: sha256(state.as_bytes()).to_vec(),
                    pending: PendingLink {
                        customer_id: customer.to_owned(),
                        entity_id: entity_id.to_owned(),
                        verifier,
                        at_ms: unix_now_ms(),
                        via_portal,
                    },
                },
            )
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
        if state.is_empty() || state.len() > 256 || code.len() > 1024 {
            return Err(ServiceError::invalid("code/state", "missing or too long"));
        }
        // Not a malformed request but one this vault will not honour: 403, as for a state
        // that belongs to another customer's browser.
        let unknown = || {
            ServiceError::refused(
                ErrorCode::Forbidden,
                "state: unknown, already used or expired; start the linking again",
            )
        };
        let slot = slot_of_token(state).ok_or_else(unknown)?;
        let taken = self
            .core
            .propose(
                self.core.group_of_slot(slot)?,
                StateChange::TakeLink {
                    state_hash: sha256(state.as_bytes()).to_vec(),
                },
            )
            .await
            .map_err(|e| match e {
                ServiceError::Refused {
                    code: ErrorCode::NotFound,
                    ..
                } => unknown(),
                other => other,
            })?;
        let ChangeOutcome::LinkTaken(pending) = taken else {
            return Err(ServiceError::Internal("unexpected outcome".into()));
        };
        if unix_now_ms() - pending.at_ms > custos_api::oauth::LINK_TTL_MS {
            return Err(unknown());
        }
        if code.is_empty() {
            return Err(ServiceError::invalid(
                "code",
                "missing: the entity sent the customer back without a code or an error",
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
            return Err(ServiceError::refused(
                ErrorCode::Conflict,
                "the entity no longer links through OAuth",
            ));
        };
        // What went wrong on the way is logged, not told: the customer learns only that the
        // entity could not be reached (no oracle for probing the operator's network).
        let unreachable = |e: &dyn std::fmt::Display| {
            tracing::warn!(entity = %pending.entity_id, error = %e, "token endpoint unreachable");
            ServiceError::refused(
                ErrorCode::Unavailable,
                "the entity's token endpoint could not be reached; try again later",
            )
        };
        let request = self
            .core
            .outbound
            .post(&oauth.token_url)
            .map_err(|e| unreachable(&e))?;
        let resp = request
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.callback_url),
                ("client_id", &oauth.client_id),
                ("code_verifier", &pending.verifier),
            ])
            .send()
            .await
            .map_err(|e| unreachable(&error_chain(&e)))?;
        let status = resp.status();
        let body: serde_json::Value = read_capped(resp, MAX_TOKEN_ANSWER)
            .await
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
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
                self.key_ring()
                    .await?
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

    /// A page of a customer's activity, newest first.
    pub async fn activity(
        &self,
        customer: &str,
        before: Option<String>,
        limit: usize,
    ) -> Result<ActivityPage, ServiceError> {
        check_id("customer id", customer)?;
        let limit = check_page_limit(limit)?;
        check_cursor("before", before.as_deref())?;
        let owned = customer.to_owned();
        let (exists, (items, next)) = self
            .read_customer(customer, move |r| {
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
}
