//! The portal's services: accounts and sessions, data export and erasure, trying a rule
//! without sending, and retrying a customer's own failed delivery.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use custos_api::types::*;
use custos_api::{CloudEvent, ErrorCode};
use custos_raft::reader::ActivitySlice;
use custos_raft::records::{
    AccountRecord, ActivityRecord, CustomerRecord, IntentRecord, IntentStep, SessionRecord,
};
use custos_raft::{StateChange, StateReader, StoreError, META_GROUP};

use super::{check_id, sha256, unexpected, Vault};
use crate::core::check_schema;
use crate::error::ServiceError;
use crate::profile::{ProfileReply, ProfileRequest};
use crate::rules::EventScope;

/// Shortest and longest password accepted (length is what makes a password strong).
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 10..=128;
/// Longest email address (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Rules tried at once on one node ("Try it" runs customer-written CEL on the blocking pool).
static TRY_RULES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
/// Most activity lines searched for a past event to try a rule on.
const TRY_SEARCH: usize = 1000;
/// Most activity lines exported.
const MAX_EXPORT: usize = 100_000;
/// The most bytes of received events one export holds (each up to 256 KiB): past it, the
/// export ends its activity early and says where the rest is read from.
const MAX_EXPORT_EVENT_BYTES: usize = 64 << 20;

/// The newest of a customer's activity an export holds, at most [`MAX_EXPORT`] lines and
/// [`MAX_EXPORT_EVENT_BYTES`] of events, read a page at a time; with the cursor of the rest.
fn export_activity(r: &StateReader, customer: &str) -> Result<ActivitySlice, StoreError> {
    const PAGE: usize = 100;
    let (mut lines, mut bytes) = (Vec::new(), 0usize);
    let mut cursor: Option<String> = None;
    loop {
        let page = PAGE.min(MAX_EXPORT - lines.len());
        let (read, next) = r.activity(customer, cursor.as_deref(), page)?;
        for (at, line) in read {
            if let ActivityRecord::EventReceived { event, .. } = &line {
                bytes += event.cloudevent_json.len();
            }
            lines.push((at, line));
        }
        cursor = next;
        if cursor.is_none() || lines.len() >= MAX_EXPORT || bytes >= MAX_EXPORT_EVENT_BYTES {
            return Ok((lines, cursor));
        }
    }
}

/// A signed-in browser: the cookie value to set and its session.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The session cookie's value (only its hash is stored).
    pub token: String,
    /// The session.
    pub session: SessionRecord,
}

/// Lower-cases and checks an email address.
pub fn normalise_email(email: &str) -> Result<String, ServiceError> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= MAX_EMAIL_LEN
        && e.split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(e)
    } else {
        Err(ServiceError::invalid("email", "is not an email address"))
    }
}

fn check_password(password: &str) -> Result<(), ServiceError> {
    let n = password.chars().count();
    if PASSWORD_LEN.contains(&n) {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "password",
            format!(
                "must be {} to {} characters",
                PASSWORD_LEN.start(),
                PASSWORD_LEN.end()
            ),
        ))
    }
}

fn hash_password(password: &str) -> Result<String, ServiceError> {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    let salt =
        SaltString::encode_b64(&bytes).map_err(|e| ServiceError::Internal(format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ServiceError::Internal(format!("argon2: {e}")))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the account does not exist, so a sign-in takes as long
/// whether or not the email is known.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy password, never matches").unwrap_or_default())
}

fn bad_credentials() -> ServiceError {
    ServiceError::refused(ErrorCode::Unauthorized, "wrong email or password")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))
}

impl Vault {
    /// Creates a customer with a portal account, and signs it in. The account (found by
    /// email at sign-in) is in the meta group, the customer in its data group: an intent
    /// recorded first in the data group makes the two steps one (repaired after a crash).
    pub async fn sign_up(
        &self,
        email: &str,
        password: &str,
        ttl_ms: i64,
    ) -> Result<SignedIn, ServiceError> {
        let email = normalise_email(email)?;
        check_password(password)?;
        let pw = password.to_owned();
        let password_hash = blocking(move || hash_password(&pw)).await??;
        let id = super::customers::new_customer_id();
        // The API token is never shown: the portal's customers act through their session.
        let token = format!(
            "{}{}",
            super::CUSTOMER_TOKEN_PREFIX,
            custos_api::oauth::random_token(32)
        );
        let now = unix_now_ms();
        let account = AccountRecord {
            email: email.clone(),
            customer_id: id.clone(),
            password_hash,
            created_ms: now,
        };
        let customer = CustomerRecord {
            id: id.clone(),
            created_ms: now,
            token_hash: sha256(token.as_bytes()).to_vec(),
            email: Some(email.clone()),
            session_epoch: 0,
        };
        let group = self.group_of(&id)?;
        let intent = IntentRecord {
            id: format!("int_{}", uuid::Uuid::now_v7().simple()),
            at_ms: now,
            step: IntentStep::ClaimEmail {
                account: account.clone(),
                customer: customer.clone(),
            },
        };
        let intent_id = intent.id.clone();
        self.core
            .propose(group, StateChange::BeginIntent(intent))
            .await?;
        if let Err(e) = self
            .core
            .propose(META_GROUP, StateChange::ClaimEmail(account.clone()))
            .await
        {
            if matches!(
                &e,
                ServiceError::Refused {
                    code: ErrorCode::Conflict,
                    ..
                }
            ) {
                self.core
                    .propose(group, StateChange::EndIntent { id: intent_id })
                    .await?;
            }
            return Err(e);
        }
        self.core
            .propose(
                group,
                StateChange::CreateCustomer {
                    customer,
                    intent: Some(intent_id),
                },
            )
            .await?;
        self.new_session(&account, ttl_ms).await
    }

    /// Checks a password and opens a session.
    pub async fn sign_in(
        &self,
        email: &str,
        password: &str,
        ttl_ms: i64,
    ) -> Result<SignedIn, ServiceError> {
        let email = normalise_email(email).map_err(|_| bad_credentials())?;
        if password.len() > 4 * PASSWORD_LEN.end() {
            return Err(bad_credentials());
        }
        let key = email.clone();
        let account = self.core.read_meta(move |r| r.account(&key)).await?;
        let hash = account
            .as_ref()
            .map(|a| a.password_hash.clone())
            .unwrap_or_else(|| decoy_hash().to_owned());
        let pw = password.to_owned();
        let ok = blocking(move || verify_password(&pw, &hash)).await?;
        match account {
            Some(a) if ok => self.new_session(&a, ttl_ms).await,
            _ => Err(bad_credentials()),
        }
    }

    /// Opens a session in the customer's group; its cookie value carries the customer's slot.
    async fn new_session(
        &self,
        account: &AccountRecord,
        ttl_ms: i64,
    ) -> Result<SignedIn, ServiceError> {
        let group = self.group_of(&account.customer_id)?;
        let token = super::customers::slotted_token(&account.customer_id);
        let now = unix_now_ms();
        let session = SessionRecord {
            email: account.email.clone(),
            customer_id: account.customer_id.clone(),
            // Set by the apply to the customer's current epoch.
            epoch: 0,
            csrf: custos_api::oauth::random_token(24),
            created_ms: now,
            expires_ms: now + ttl_ms,
        };
        self.core
            .propose(
                group,
                StateChange::PutSession {
                    token_hash: sha256(token.as_bytes()).to_vec(),
                    session: session.clone(),
                },
            )
            .await
            .map_err(|e| match e {
                ServiceError::Refused {
                    code: ErrorCode::NotFound,
                    ..
                } => bad_credentials(),
                other => other,
            })?;
        Ok(SignedIn { token, session })
    }

    /// The live session behind a cookie value: unexpired, its customer still there and not
    /// signed out everywhere since. Read where the request was routed: the customer's group.
    pub async fn session(&self, token: &str) -> Result<Option<SessionRecord>, ServiceError> {
        if token.is_empty() || token.len() > 128 {
            return Ok(None);
        }
        let Some(slot) = crate::forward::slot_of_token(token) else {
            return Ok(None);
        };
        let group = self.core.group_of_slot(slot)?;
        let hash = sha256(token.as_bytes());
        let found = self
            .core
            .read(group, move |r| {
                let Some(s) = r.session(&hash)? else {
                    return Ok(None);
                };
                let customer = r.customer(&s.customer_id)?;
                Ok(Some((s, customer)))
            })
            .await?;
        Ok(match found {
            Some((s, Some(c))) if s.expires_ms > unix_now_ms() && s.epoch == c.session_epoch => {
                Some(s)
            }
            _ => None,
        })
    }

    /// Ends one session.
    pub async fn sign_out(&self, token: &str) -> Result<(), ServiceError> {
        let Some(slot) = crate::forward::slot_of_token(token) else {
            return Ok(());
        };
        self.core
            .propose(
                self.core.group_of_slot(slot)?,
                StateChange::DeleteSession {
                    token_hash: sha256(token.as_bytes()).to_vec(),
                },
            )
            .await?;
        Ok(())
    }

    /// Ends every session of a customer's account, on every device.
    pub async fn sign_out_everywhere(&self, customer: &str) -> Result<(), ServiceError> {
        self.core
            .propose(
                self.group_of(customer)?,
                StateChange::EndSessions {
                    customer_id: customer.to_owned(),
                },
            )
            .await?;
        Ok(())
    }

    /// Everything the vault holds about a customer.
    pub async fn export(&self, customer: &str) -> Result<CustomerExport, ServiceError> {
        check_id("customer id", customer)?;
        let summary = self.customer(customer).await?;
        let rules = self.rules(customer).await?;
        let owned = customer.to_owned();
        let (record, activity, engagement, dismissed) = self
            .read_customer(customer, move |r| {
                Ok((
                    r.customer(&owned)?,
                    export_activity(r, &owned)?,
                    r.engagements(Some(&owned))?,
                    r.dismissed(&owned)?,
                ))
            })
            .await?;
        let (activity, activity_next) = activity;
        let mut events = Vec::new();
        let mut command_ids = Vec::new();
        for (_, rec) in &activity {
            match rec {
                ActivityRecord::EventReceived { event, .. } => events.push(
                    serde_json::from_str(&event.cloudevent_json)
                        .unwrap_or(serde_json::Value::String(event.cloudevent_json.clone())),
                ),
                ActivityRecord::RuleMatched { command_id, .. } => {
                    command_ids.push(command_id.clone())
                }
                // A delivery settled or retried later than its command's line: the line may
                // be past the export's window, or aged out, while the delivery is not.
                other => command_ids.extend(other.command_settled().map(str::to_owned)),
            }
        }
        let owned = customer.to_owned();
        let deliveries = self
            .read_customer(customer, move |r| {
                // Deliveries still pending are kept whatever their lines' age.
                command_ids.extend(r.pending_of(&owned, MAX_EXPORT)?);
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::with_capacity(command_ids.len());
                for id in command_ids {
                    if !seen.insert(id.clone()) {
                        continue;
                    }
                    if let Some(d) = r.outbox(&id)? {
                        out.push(d.to_wire());
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(CustomerExport {
            exported_at: rfc3339_ms(unix_now_ms()),
            customer: summary,
            email: record.and_then(|c| c.email),
            rules,
            activity: activity
                .into_iter()
                .map(|(at, rec)| ActivityItem {
                    at: rfc3339_ms(at),
                    kind: rec.to_wire(),
                })
                .collect(),
            activity_next,
            events,
            deliveries,
            engagement: engagement
                .into_iter()
                .map(|(_, source_type, count, _)| (source_type, count))
                .collect::<BTreeMap<_, _>>(),
            dismissed,
        })
    }

    /// Erases a customer from the vault: every replica applies the erasure, and snapshots
    /// taken after it do not hold the customer. Tokens at linked entities are revoked.
    pub async fn erase_customer(&self, customer: &str) -> Result<(), ServiceError> {
        check_id("customer id", customer)?;
        let owned = customer.to_owned();
        let (exists, links) = self
            .read_customer(customer, move |r| {
                Ok((r.customer(&owned)?.is_some(), r.links(&owned)?))
            })
            .await?;
        if !exists {
            return Err(ServiceError::not_found("customer", customer));
        }
        match self.profiles.send(customer, ProfileRequest::Erase).await? {
            ProfileReply::Done => {}
            other => return Err(unexpected(other)),
        }
        for link in links {
            self.revoke_tokens(customer, &link).await;
        }
        Ok(())
    }

    /// Runs a rule on a past event of the customer's or on sample data, and answers the
    /// command it would send. Nothing is saved or sent.
    pub async fn try_rule(&self, customer: &str, req: TryRule) -> Result<TryOutcome, ServiceError> {
        check_id("customer id", customer)?;
        let spec = req.rule;
        for (field, id) in [
            ("rule.when.entity", &spec.when.entity),
            ("rule.then.entity", &spec.then.entity),
        ] {
            check_id(field, id)?;
        }
        let source = self.core.entity_named(&spec.when.entity).await?;
        let target = self.core.entity_named(&spec.then.entity).await?;
        let owned = customer.to_owned();
        let links = self
            .read_customer(customer, move |r| r.links(&owned))
            .await?;
        let compiled = crate::profile::validate_rule(
            &spec,
            "rul_try".into(),
            |e| links.iter().any(|l| l.entity_id == e),
            &source,
            &target,
            unix_now_ms(),
        )?;
        let subject_at = |entity: &str| {
            links
                .iter()
                .find(|l| l.entity_id == entity)
                .map(|l| l.subject.clone())
                .unwrap_or_default()
        };
        let event = match (&req.event_id, req.sample_data) {
            (Some(event_id), _) => {
                check_id("event_id", event_id)?;
                let (owned, wanted) = (customer.to_owned(), event_id.clone());
                let found = self
                    .read_customer(customer, move |r| {
                        let (items, _) = r.activity(&owned, None, TRY_SEARCH)?;
                        Ok(items.into_iter().find_map(|(_, rec)| match rec {
                            ActivityRecord::EventReceived { event, .. } if event.id == wanted => {
                                Some(event.cloudevent_json)
                            }
                            _ => None,
                        }))
                    })
                    .await?
                    .ok_or_else(|| ServiceError::not_found("event", event_id))?;
                serde_json::from_str::<CloudEvent>(&found)
                    .map_err(|e| ServiceError::Internal(format!("stored event: {e}")))?
            }
            (None, data) => {
                if data
                    .as_ref()
                    .is_some_and(|d| d.to_string().len() > custos_api::limits::MAX_BODY_BYTES)
                {
                    return Err(ServiceError::invalid("sample_data", "too large"));
                }
                let mut ev = CloudEvent::new(
                    "evt_sample",
                    spec.when.entity.clone(),
                    spec.when.event_type.clone(),
                );
                ev.subject = Some(subject_at(&spec.when.entity));
                ev.time = Some(rfc3339_ms(unix_now_ms()));
                ev.data = Some(data.unwrap_or_else(|| serde_json::json!({})));
                ev
            }
        };
        let event_json = serde_json::to_value(&event).unwrap_or_default();
        let miss = |reason: String| TryOutcome {
            matched: false,
            reason: Some(reason),
            event: event_json.clone(),
            command: None,
        };
        if event.source != spec.when.entity || event.event_type != spec.when.event_type {
            return Ok(miss(format!(
                "the rule listens for {} from {}, this event is {} from {}",
                spec.when.event_type, spec.when.entity, event.event_type, event.source
            )));
        }
        // Customer-written CEL runs off the event loop (its cost is bounded: see rules.rs),
        // a few at a time: each may spend the whole budget, and the blocking pool is shared
        // with storage reads.
        let Ok(_running) = TRY_RULES.try_acquire() else {
            return Err(ServiceError::refused(
                ErrorCode::Overloaded,
                "rules are being tried at capacity on this node; retry",
            ));
        };
        let scope = EventScope::new(&event);
        let evaluated = tokio::task::spawn_blocking(move || compiled.evaluate(&scope))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let data = match evaluated {
            Ok(Some(data)) => data,
            Ok(None) => return Ok(miss("the condition is false for this event".into())),
            Err(e) => return Ok(miss(e.to_string())),
        };
        if let Some(v) = target.command_schema(&spec.then.command_type) {
            if let Err(e) = check_schema(v, &data) {
                return Ok(miss(format!(
                    "the mapped data does not fit the command: {e}"
                )));
            }
        }
        let mut command = CloudEvent::new("cmd_preview", "custos", spec.then.command_type.clone());
        command.subject = Some(subject_at(&spec.then.entity));
        command.time = Some(rfc3339_ms(unix_now_ms()));
        command.datacontenttype = Some("application/json".into());
        command.data = Some(data);
        command.extensions.insert(
            custos_api::cloudevent::EXT_CAUSING_EVENT.into(),
            event.id.clone().into(),
        );
        command.extensions.insert(
            custos_api::cloudevent::EXT_CAUSING_SOURCE.into(),
            event.source.clone().into(),
        );
        Ok(TryOutcome {
            matched: true,
            reason: None,
            event: event_json,
            command: serde_json::to_value(&command).ok(),
        })
    }

    /// Retries a failed delivery of the customer's own commands.
    pub async fn retry_own_delivery(
        &self,
        customer: &str,
        command_id: &str,
    ) -> Result<Delivery, ServiceError> {
        let d = self.delivery(command_id).await?;
        if d.customer_id != customer {
            // Same answer as a missing one: ids of other customers' commands are not revealed.
            return Err(ServiceError::not_found("delivery", command_id));
        }
        self.replay(command_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalise_email(" Ada@Example.COM ").expect("valid"),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@localhost",
            "a da@example.com",
        ] {
            assert!(normalise_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(check_password("short").is_err());
        assert!(check_password("long enough pass").is_ok());
    }
}
