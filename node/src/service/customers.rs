//! Customers: profiles and their API tokens, links (by an operator, or through the entity's
//! OAuth server), unlinking with token revocation, and the activity timeline.

use custos_api::types::*;
use custos_api::webhook::Secret;
use custos_api::ErrorCode;
use custos_raft::records::{CustomerRecord, LinkRecord, OAuthRecord, PendingLink};
use custos_raft::shard::{slot_of, slot_tag};
use custos_raft::{ChangeOutcome, StateChange};

use super::{
    check_cursor, check_id, check_page_limit, sha256, unexpected, Vault, CUSTOMER_TOKEN_PREFIX,
};
use crate::error::ServiceError;
use crate::forward::slot_of_token;
use crate::oidc::{self, ClientCredentials, IdTokenExpectations, ProviderError};
use crate::profile::{LinkTokens, ProfileReply, ProfileRequest};

/// What the entity's provider sent the customer back with.
#[derive(Debug, Clone, Copy)]
pub struct CallbackParams<'a> {
    /// The entity whose redirect URI was called.
    pub entity: &'a str,
    /// The authorization code.
    pub code: &'a str,
    /// The state the vault sent.
    pub state: &'a str,
    /// The RFC 9207 issuer, when the provider sends one.
    pub iss: Option<&'a str>,
    /// The browser's signed-in customer, if any.
    pub session: Option<&'a str>,
}

/// A linking finished through OAuth.
#[derive(Debug)]
pub struct FinishedLink {
    /// The link made.
    pub link: Link,
    /// Whose.
    pub customer_id: String,
    /// Started from the portal.
    pub via_portal: bool,
    /// The rule of a recommendation that needed this link: its name once created, or why not.
    pub kept_rule: Option<Result<String, ServiceError>>,
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
        self.link_with_tokens(customer, req, LinkTokens::default())
            .await
    }

    async fn link_with_tokens(
        &self,
        customer: &str,
        req: LinkRequest,
        tokens: LinkTokens,
    ) -> Result<Link, ServiceError> {
        check_id("customer id", customer)?;
        let (c, e) = (customer.to_owned(), req.entity_id.clone());
        // Only for the revocation below, best effort: a failed read must not fail a linking
        // whose code was already redeemed.
        let replaced = self
            .read_customer(customer, move |r| r.link(&c, &e))
            .await
            .ok()
            .flatten();
        let linked = match self
            .profiles
            .send(customer, ProfileRequest::Link(req, tokens))
            .await?
        {
            ProfileReply::Linked(l) => l,
            other => return Err(unexpected(other)),
        };
        // Linked again as another account: the first account's grant is no longer the
        // vault's to hold. The same account's is left alone, since a provider may end every
        // grant of a user and client at once, the new one included.
        if let Some(old) = replaced.filter(|old| old.subject != linked.subject) {
            self.revoke_tokens(customer, &old).await;
        }
        Ok(linked)
    }

    /// Unlinks an entity at once: its events are ignored and pending commands cancelled;
    /// then the tokens are revoked at the entity, where it offers revocation.
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
        if let Some(link) = link {
            self.revoke_tokens(customer, &link).await;
        }
        Ok(())
    }

    /// Revokes a link's refresh and access tokens at the entity (RFC 7009). Best effort: the
    /// link is already gone, so the vault no longer acts on it whatever the entity answers.
    pub(crate) async fn revoke_tokens(&self, customer: &str, link: &LinkRecord) {
        if link.sealed_token.is_none() && link.sealed_refresh_token.is_none() {
            return;
        }
        let entity_id = link.entity_id.as_str();
        let ring = match self.key_ring().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "no token keys to revoke with");
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
        let secret = match self.client_secret(entity_id, oauth).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(entity = %entity_id, error = %e, "revocation not sent");
                return;
            }
        };
        let client = ClientCredentials {
            id: &oauth.client_id,
            secret: secret.as_deref(),
            auth: oauth.client_auth,
        };
        // The refresh token first: revoking it ends the grant, access tokens included.
        let tokens = [
            (
                "refresh_token",
                link.sealed_refresh_token
                    .as_deref()
                    .map(|s| ring.open_refresh_token(customer, entity_id, s)),
            ),
            (
                "access_token",
                link.sealed_token
                    .as_deref()
                    .map(|s| ring.open(customer, entity_id, s)),
            ),
        ];
        for (hint, token) in tokens {
            match token {
                None => {}
                Some(Err(e)) => {
                    tracing::warn!(entity = %entity_id, error = %e, "cannot open token to revoke")
                }
                Some(Ok(token)) => {
                    match oidc::revoke(&self.core.outbound, url, client, &token, hint).await {
                        Ok(()) => {
                            tracing::info!(entity = %entity_id, hint, "token revoked at the entity")
                        }
                        Err(e) => {
                            tracing::warn!(entity = %entity_id, hint, error = %e, "revocation failed")
                        }
                    }
                }
            }
        }
    }

    /// The vault's client secret at `entity`'s provider, opened.
    async fn client_secret(
        &self,
        entity: &str,
        oauth: &OAuthRecord,
    ) -> Result<Option<String>, ServiceError> {
        match &oauth.sealed_client_secret {
            None => Ok(None),
            Some(sealed) => self
                .key_ring()
                .await?
                .open_client_secret(entity, sealed)
                .map(Some)
                .map_err(|e| ServiceError::Internal(e.to_string())),
        }
    }

    /// An entity's provider with its endpoints as its metadata says now (read again hourly,
    /// so moved endpoints and rotated keys are followed); the registered ones if the metadata
    /// cannot be read at the moment.
    async fn current_provider(&self, entity: &str, mut oauth: OAuthRecord) -> OAuthRecord {
        let Some(issuer) = oauth.issuer.clone() else {
            return oauth;
        };
        match self.providers.metadata(&self.core.outbound, &issuer).await {
            Ok(m) => {
                oauth.authorize_url = m.authorization_endpoint.clone();
                oauth.token_url = m.token_endpoint.clone();
                if m.jwks_uri.is_some() {
                    oauth.jwks_uri = m.jwks_uri.clone();
                }
                oauth.iss_required |= m.authorization_response_iss_parameter_supported;
            }
            Err(e) => {
                tracing::warn!(entity, error = %e, "provider metadata not refreshed; using the registered endpoints")
            }
        }
        oauth
    }

    /// Starts linking through the entity's OAuth 2.0 / OpenID Connect provider (authorization
    /// code with PKCE S256, a nonce for the ID token): remembers the verifier and nonce under
    /// the state, and answers where to send the customer. The state carries the customer's
    /// slot, so the callback reaches the customer's group.
    pub async fn authorize_link(
        &self,
        customer: &str,
        entity_id: &str,
        via_portal: bool,
    ) -> Result<AuthorizeLink, ServiceError> {
        self.begin_oauth_link(customer, entity_id, via_portal, None)
            .await
    }

    /// [`Vault::authorize_link`], with a rule (JSON) to create once the link is made.
    pub(crate) async fn begin_oauth_link(
        &self,
        customer: &str,
        entity_id: &str,
        via_portal: bool,
        then_rule_json: Option<String>,
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
        let oauth = self.current_provider(entity_id, oauth).await;
        self.customer_record(customer).await?;
        let state = slotted_token(customer);
        let verifier = custos_api::oauth::random_token(48);
        let nonce = custos_api::oauth::random_token(24);
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
                        nonce: nonce.clone(),
                        at_ms: unix_now_ms(),
                        via_portal,
                        then_rule_json,
                    },
                },
            )
            .await?;
        let mut url = url::Url::parse(&oauth.authorize_url)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &oauth.client_id)
                .append_pair("redirect_uri", &self.redirect_uri(entity_id))
                .append_pair("state", &state)
                .append_pair("code_challenge", &challenge)
                .append_pair("code_challenge_method", "S256");
            if !oauth.scopes.is_empty() {
                q.append_pair("scope", &oauth.scopes.join(" "));
            }
            // Always: any ID token the answer carries is checked against it, also from a
            // provider that sends one without being asked for `openid` (a plain OAuth server
            // ignores a parameter it does not know, RFC 6749 section 3.1).
            q.append_pair("nonce", &nonce);
        }
        Ok(AuthorizeLink {
            authorize_url: url.to_string(),
        })
    }

    /// Finishes linking when the entity sends the customer back to its redirect URI: the
    /// state is single-use, expires, and must have been started for this very entity; an
    /// `iss` must name the entity's issuer (RFC 9207; required when the provider says it sends
    /// one); the code is exchanged with the verifier and the client's credentials; the
    /// customer's subject comes from the validated ID token, else userinfo, else the token
    /// answer; the tokens are kept sealed. When the linking started in the portal, `session`
    /// (the browser's signed-in customer) must be the customer who started it.
    pub async fn finish_link(
        &self,
        back: CallbackParams<'_>,
    ) -> Result<FinishedLink, ServiceError> {
        let CallbackParams {
            entity: entity_in_path,
            code,
            state,
            iss,
            session,
        } = back;
        if state.is_empty() || state.len() > 256 || code.len() > 1024 {
            return Err(ServiceError::invalid("code/state", "missing or too long"));
        }
        let refused = |why: String| ServiceError::refused(ErrorCode::Forbidden, why);
        // Not a malformed request but one this vault will not honour: 403, as for a state
        // that belongs to another customer's browser.
        let unknown =
            || refused("state: unknown, already used or expired; start the linking again".into());
        let slot = slot_of_token(state).ok_or_else(unknown)?;
        let group = self.core.group_of_slot(slot)?;
        let state_hash = sha256(state.as_bytes()).to_vec();
        // Everything is checked on a read first: the callback needs no sign-in, so a request
        // that cannot finish a linking must not cost a Raft entry (nor spend the state).
        let hash = state_hash.clone();
        let pending = self
            .core
            .read_leader(group, move |r| r.pending_link(&hash))
            .await?
            .ok_or_else(unknown)?;
        if unix_now_ms() - pending.at_ms > custos_api::oauth::LINK_TTL_MS {
            return Err(unknown());
        }
        if pending.entity_id != entity_in_path {
            // A code from one provider routed into a linking with another (mix-up): it is
            // sent nowhere.
            tracing::warn!(started = %pending.entity_id, came_back = ?entity_in_path, "authorization came back for another entity");
            // The path is the requester's to write: only an entity id is shown back (a link
            // sent to a signed-in customer could otherwise put any text in the portal).
            let came_back = if custos_api::limits::is_valid_id(entity_in_path) {
                entity_in_path
            } else {
                "another entity"
            };
            return Err(refused(format!(
                "this linking was started with {} but came back on {came_back}'s redirect URI; \
                 nothing was sent to either, start the linking again",
                pending.entity_id
            )));
        }
        if code.is_empty() {
            return Err(ServiceError::invalid(
                "code",
                "missing: the entity sent the customer back without a code or an error",
            ));
        }
        if pending.via_portal && session != Some(pending.customer_id.as_str()) {
            return Err(refused(
                "this linking was started by another signed-in customer".into(),
            ));
        }
        // Then taken: the apply is what makes a state single-use.
        let taken = self
            .core
            .propose(group, StateChange::TakeLink { state_hash })
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
        let entity = self.core.entity_required(&pending.entity_id).await?;
        let Some(oauth) = entity.record.oauth.clone() else {
            return Err(ServiceError::refused(
                ErrorCode::Conflict,
                "the entity no longer links through OAuth",
            ));
        };
        let oauth = self.current_provider(&pending.entity_id, oauth).await;
        match (iss, oauth.issuer.as_deref()) {
            (Some(got), Some(expected)) if got != expected => {
                return Err(refused(format!(
                    "the authorization response comes from issuer {:?}, not {}'s ({expected}); \
                     the code was sent nowhere",
                    got.chars().take(200).collect::<String>(),
                    pending.entity_id
                )))
            }
            (None, Some(_)) if oauth.iss_required => {
                return Err(refused(
                    "the authorization response lacks the iss its provider promises (RFC 9207)"
                        .into(),
                ))
            }
            _ => {}
        }
        let secret = self.client_secret(&pending.entity_id, &oauth).await?;
        let client = ClientCredentials {
            id: &oauth.client_id,
            secret: secret.as_deref(),
            auth: oauth.client_auth,
        };
        let provider_failed = |e: ProviderError| match e {
            ProviderError::Unreachable { .. } => ServiceError::refused(
                ErrorCode::Unavailable,
                format!(
                    "{} could not be reached; try again later",
                    pending.entity_id
                ),
            ),
            ProviderError::Refused { error, description } => refused(format!(
                "{} refused the sign-in: {error}{}",
                pending.entity_id,
                description.map(|d| format!(" ({d})")).unwrap_or_default()
            )),
            other => refused(format!(
                "{} answered something the vault cannot accept: {other}; nothing was linked",
                pending.entity_id
            )),
        };
        let answer = oidc::exchange_code(
            &self.core.outbound,
            &oauth.token_url,
            client,
            code,
            &self.redirect_uri(&pending.entity_id),
            &pending.verifier,
        )
        .await
        .map_err(provider_failed)?;
        let subject = self
            .subject_from(&oauth, &answer, &pending.nonce)
            .await
            .map_err(provider_failed)?;
        if !custos_api::limits::is_valid_subject(&subject) {
            return Err(refused(format!(
                "{}'s customer id is not 1..=128 printable characters",
                pending.entity_id
            )));
        }
        let ring = self.key_ring().await?;
        let seal = |sealed: Result<Vec<u8>, crate::seal::SealError>| {
            sealed.map_err(|e| ServiceError::Internal(e.to_string()))
        };
        let bounded = |t: &Option<String>| t.clone().filter(|t| !t.is_empty() && t.len() <= 4096);
        let tokens = LinkTokens {
            access: bounded(&answer.access_token)
                .map(|t| seal(ring.seal(&pending.customer_id, &pending.entity_id, &t)))
                .transpose()?,
            refresh: bounded(&answer.refresh_token)
                .map(|t| {
                    seal(ring.seal_refresh_token(&pending.customer_id, &pending.entity_id, &t))
                })
                .transpose()?,
        };
        let link = self
            .link_with_tokens(
                &pending.customer_id,
                LinkRequest {
                    entity_id: pending.entity_id,
                    subject,
                },
                tokens,
            )
            .await?;
        // A recommendation that needed this link: its rule now (validated like any rule).
        let kept_rule = match pending.then_rule_json.as_deref() {
            None => None,
            Some(json) => Some(match serde_json::from_str::<RuleSpec>(json) {
                Ok(spec) => self
                    .create_rule(&pending.customer_id, spec)
                    .await
                    .map(|r| r.name),
                Err(e) => Err(ServiceError::Internal(format!("a stored rule: {e}"))),
            }),
        };
        Ok(FinishedLink {
            link,
            customer_id: pending.customer_id,
            via_portal: pending.via_portal,
            kept_rule,
        })
    }

    /// The customer's id at the entity: from the ID token when there is one (validated; it is
    /// required when `openid` was asked for), else the userinfo endpoint, else the token
    /// answer's `subject` or `sub`.
    async fn subject_from(
        &self,
        oauth: &OAuthRecord,
        answer: &oidc::TokenAnswer,
        nonce: &str,
    ) -> Result<String, ProviderError> {
        let openid = oauth.scopes.iter().any(|s| s == "openid");
        if let Some(id_token) = &answer.id_token {
            let (Some(issuer), Some(jwks_uri)) = (&oauth.issuer, &oauth.jwks_uri) else {
                return Err(ProviderError::IdToken(
                    "the entity was registered without an issuer, so its ID tokens cannot be checked"
                        .into(),
                ));
            };
            return self
                .providers
                .id_token_subject(
                    &self.core.outbound,
                    jwks_uri,
                    id_token,
                    IdTokenExpectations {
                        issuer,
                        client_id: &oauth.client_id,
                        nonce,
                        now_secs: unix_now_ms() / 1000,
                    },
                )
                .await;
        }
        if openid {
            return Err(ProviderError::IdToken(
                "the token answer has none, though openid was asked for".into(),
            ));
        }
        if let (Some(url), Some(token)) = (&oauth.userinfo_url, &answer.access_token) {
            return oidc::userinfo_subject(&self.core.outbound, url, token).await;
        }
        answer
            .subject
            .clone()
            .or_else(|| answer.sub.clone())
            .ok_or_else(|| ProviderError::BadAnswer {
                what: "token endpoint",
                why: "no ID token, no userinfo endpoint, and no subject".into(),
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
