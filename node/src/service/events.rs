//! Events from entities: signature, envelope and schema checks, then the customer's profile
//! actor (or, when no customer links the subject, an ignored record in the group the
//! subject hashes to).

use custos_api::limits::is_valid_id;
use custos_api::types::*;
use custos_api::webhook::{self, SignedHeaders, WebhookError};
use custos_api::{CloudEvent, ErrorCode};
use custos_raft::records::{EventRecord, Ingest};
use custos_raft::StateChange;

use super::{unexpected, Vault};
use crate::core::{check_schema, not_leader, CachedEntity};
use crate::error::ServiceError;
use crate::profile::{receipt, ProfileReply, ProfileRequest};

/// Why an event signed by `entity` cannot be taken, if it cannot: its attributes, its type,
/// its data against the type's schema.
fn content_refusal(entity: &CachedEntity, event: &CloudEvent) -> Result<(), ServiceError> {
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
        check_schema(v, &data)
            .map_err(|e| ServiceError::refused(ErrorCode::SchemaViolation, format!("data: {e}")))?;
    }
    Ok(())
}

impl Vault {
    /// How the event was answered when it was recorded, if it was (read on this node's
    /// replica of the group its subject routes to: the leader's, where events are served).
    async fn recorded(
        &self,
        event: &CloudEvent,
        route: Option<&(Option<String>, custos_raft::types::GroupId)>,
    ) -> Option<EventReceipt> {
        let subject = event
            .subject
            .as_deref()
            .filter(|s| custos_api::limits::is_valid_subject(s))?;
        let group = match route {
            Some((_, g)) => *g,
            None => self.core.route_event(&event.source, subject).ok()?.1,
        };
        let (source, id) = (event.source.clone(), event.id.clone());
        let first = self
            .core
            .read(group, move |r| r.dedup(&source, &id))
            .await
            .ok()??;
        receipt(
            event.id.clone(),
            custos_raft::ChangeOutcome::Ingested {
                duplicate: true,
                fate: first.fate,
                commands: first.commands,
                reason: first.reason,
            },
        )
        .ok()
    }

    /// Records an event no customer has linked the subject of: nothing is triggered, but the
    /// event is still deduplicated and recorded as ignored. Only once the meta group's leader
    /// confirms that nobody claims the subject (`erased`, a customer erased since this node's
    /// routing index named it, may still hold its claim until the release is applied): this
    /// node's replica of the routing index may not have a claim the leader acknowledged yet,
    /// and the event, once recorded as ignored, is ignored for good.
    async fn ignore_unclaimed(
        &self,
        group: custos_raft::GroupId,
        event: CloudEvent,
        subject: String,
        received_ms: i64,
        erased: Option<&str>,
    ) -> Result<EventReceipt, ServiceError> {
        match self.core.confirmed_claim(&event.source, &subject).await? {
            Some(claimant) if Some(claimant.as_str()) != erased => {
                return Err(ServiceError::refused(
                    ErrorCode::Unavailable,
                    "this node's routing index is behind the cluster's; retry",
                ));
            }
            _ => {}
        }
        // Its dedup record is all the group keeps of it (by source and id): neither its subject
        // nor its body goes into the Raft log, which no customer's erasure scrubs (the group
        // is the subject's, not a customer's), for someone who may link that subject later.
        let ingest = Ingest {
            event: EventRecord {
                id: event.id.clone(),
                source: event.source.clone(),
                event_type: event.event_type.clone(),
                subject: String::new(),
                cloudevent_json: String::new(),
            },
            customer_id: None,
            commands: Vec::new(),
            ignored_reason: Some(custos_api::types::unclaimed_reason(&event.source)),
            rule_failures: Vec::new(),
            at_ms: received_ms,
        };
        let outcome = self
            .core
            .propose(group, StateChange::Ingest(ingest))
            .await?;
        receipt(event.id, outcome)
    }

    /// Verifies, decodes and ingests an entity's event; answers once it is committed.
    /// `route` is the (customer, group) the forwarder found for this body, if it looked.
    pub async fn ingest_event(
        &self,
        headers: SignedHeaders<'_>,
        body: &[u8],
        route: Option<(Option<String>, custos_raft::types::GroupId)>,
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
        // An unknown source is answered as a bad signature, after the same checks and the same
        // HMAC work (against a secret nobody has): callers cannot learn which entities exist.
        let entity = self.core.entity(&event.source).await?;
        static NOBODYS: std::sync::OnceLock<webhook::Secret> = std::sync::OnceLock::new();
        let secrets = match &entity {
            Some(e) => e.valid_secrets(received_ms),
            None => vec![NOBODYS.get_or_init(webhook::Secret::generate)],
        };
        webhook::verify(&secrets, headers, body, received_ms / 1000).map_err(|e| match e {
            WebhookError::MissingHeader(_) => {
                ServiceError::refused(ErrorCode::MissingSignature, e.to_string())
            }
            WebhookError::StaleTimestamp(_) => {
                ServiceError::refused(ErrorCode::StaleTimestamp, e.to_string())
            }
            // The vault cannot open a secret of the entity's: the signature may be good, and a
            // 401 would have the sender drop the event; a 503 has it retried once the
            // operator has the token key back (the start-up log names such entities).
            WebhookError::BadSignature | WebhookError::BadSecret
                if entity
                    .as_ref()
                    .is_some_and(|e| e.has_unopened_secret(received_ms)) =>
            {
                ServiceError::refused(
                    ErrorCode::Unavailable,
                    "the vault cannot check this entity's signatures now; retry later",
                )
            }
            WebhookError::BadSignature | WebhookError::BadSecret => {
                ServiceError::refused(ErrorCode::BadSignature, e.to_string())
            }
        })?;
        let Some(entity) = entity else {
            return Err(ServiceError::refused(
                ErrorCode::BadSignature,
                WebhookError::BadSignature.to_string(),
            ));
        };
        if let Err(refused) = content_refusal(&entity, &event) {
            // A retry of an event recorded before (its answer lost) is answered as the first
            // time, whatever changed since: its type removed, its schema tightened, a check
            // added by an upgrade. Refused, the entity would take it for never accepted.
            if let Some(first) = self.recorded(&event, route.as_ref()).await {
                return Ok(first);
            }
            return Err(refused);
        }
        let subject = event.subject.clone().unwrap_or_default();
        let (customer, group) = match route {
            Some(r) => r,
            None => self.core.route_event(&event.source, &subject)?,
        };
        // The call was routed here as the group's leader; if leadership moved meanwhile, the
        // entity retries (the event id makes the retry a duplicate, never a second event).
        if !self.core.is_leader(group) {
            return Err(not_leader(group));
        }
        let raw = String::from_utf8_lossy(body).into_owned();
        let result = match customer {
            Some(customer) => {
                let req = ProfileRequest::Ingest {
                    event: Box::new(event),
                    raw,
                    received_ms,
                };
                match self.profiles.send(&customer, req).await {
                    Ok(ProfileReply::Receipt(r)) => Ok(r),
                    Ok(other) => Err(unexpected(other)),
                    // Erased since the routing index named it (its subjects are released
                    // after the erasure): as if nobody had linked the subject, and without
                    // telling the entity the erased customer's id. The event went into the
                    // request; it is read again from the body on this rare path.
                    Err(ServiceError::Refused {
                        code: ErrorCode::NotFound,
                        ..
                    }) => {
                        let event: CloudEvent = serde_json::from_slice(body).map_err(|e| {
                            ServiceError::Internal(format!("event read again: {e}"))
                        })?;
                        self.ignore_unclaimed(group, event, subject, received_ms, Some(&customer))
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            None => {
                self.ignore_unclaimed(group, event, subject, received_ms, None)
                    .await
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
}
