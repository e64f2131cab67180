//! What the state machine stores, and the changes proposed to it through Raft.
//!
//! These types are encoded with bincode (see [`crate::codec`]), which is not self-describing:
//! no `skip_serializing_if`, no internally tagged enums, and JSON payloads kept as text.

use custos_api::types as wire;
use custos_api::ErrorCode;
use serde::{Deserialize, Serialize};

/// An event or command type with its optional JSON Schema (as JSON text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeRecord {
    /// Type name.
    pub name: String,
    /// JSON Schema, as JSON text.
    pub schema_json: Option<String>,
}

/// A registered entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityRecord {
    /// Entity id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Command endpoint.
    pub command_url: String,
    /// False after a 410 or an admin's disable.
    pub endpoint_enabled: bool,
    /// Event types it sends.
    pub event_types: Vec<TypeRecord>,
    /// Command types it accepts.
    pub command_types: Vec<TypeRecord>,
    /// Current signing secret (`whsec_...`), sealed by the node's token key ring: the log,
    /// the state and snapshots never hold it in clear.
    pub sealed_secret: Vec<u8>,
    /// The secret before the last rotation (sealed), still accepted until
    /// `previous_valid_until_ms`.
    pub sealed_previous_secret: Option<Vec<u8>>,
    /// End of the rotation grace period.
    pub previous_valid_until_ms: i64,
    /// Registration time.
    pub created_ms: i64,
    /// Its OAuth 2.0 authorization server, when customers link through it.
    pub oauth: Option<OAuthRecord>,
}

/// An entity's OAuth 2.0 / OpenID Connect provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthRecord {
    /// The issuer the endpoints were discovered from (also what an ID token's `iss` and the
    /// callback's RFC 9207 `iss` must say); none for explicitly given endpoints.
    pub issuer: Option<String>,
    /// Where the customer signs in.
    pub authorize_url: String,
    /// Where codes are exchanged.
    pub token_url: String,
    /// The vault's client id there.
    pub client_id: String,
    /// The vault's client secret there, sealed by the node's token key ring.
    pub sealed_client_secret: Option<Vec<u8>>,
    /// How the vault authenticates at the token endpoint.
    pub client_auth: ClientAuth,
    /// RFC 7009 revocation endpoint, when the entity has one.
    pub revoke_url: Option<String>,
    /// OpenID Connect userinfo endpoint.
    pub userinfo_url: Option<String>,
    /// Where the provider publishes its ID token signing keys.
    pub jwks_uri: Option<String>,
    /// Scopes asked for.
    pub scopes: Vec<String>,
    /// The provider says it sends `iss` on every authorization response (RFC 9207), so a
    /// callback without it is refused.
    pub iss_required: bool,
}

/// How the vault authenticates at an entity's token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientAuth {
    /// A public client: PKCE only.
    None,
    /// HTTP Basic with the client id and secret.
    Basic,
    /// The client id and secret in the form body.
    Post,
}

impl ClientAuth {
    /// The RFC 8414 name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::Basic => "client_secret_basic",
            ClientAuth::Post => "client_secret_post",
        }
    }
}

impl OAuthRecord {
    /// The wire view (never the client secret).
    pub fn to_wire(&self) -> wire::OAuthEndpoints {
        wire::OAuthEndpoints {
            issuer: self.issuer.clone(),
            authorize_url: Some(self.authorize_url.clone()),
            token_url: Some(self.token_url.clone()),
            client_id: self.client_id.clone(),
            client_secret: None,
            revoke_url: self.revoke_url.clone(),
            userinfo_url: self.userinfo_url.clone(),
            scopes: Some(self.scopes.clone()),
            client_auth: Some(self.client_auth.as_str().to_owned()),
            redirect_uri: None,
        }
    }
}

impl EntityRecord {
    /// The admin's view (never the secret: only the call that issues one answers it).
    pub fn to_wire(&self) -> wire::Entity {
        let types = |ts: &[TypeRecord]| {
            ts.iter()
                .map(|t| wire::TypeSpec {
                    type_name: t.name.clone(),
                    schema: t
                        .schema_json
                        .as_deref()
                        .and_then(|s| serde_json::from_str(s).ok()),
                })
                .collect()
        };
        wire::Entity {
            id: self.id.clone(),
            name: self.name.clone(),
            command_url: self.command_url.clone(),
            endpoint_enabled: self.endpoint_enabled,
            event_types: types(&self.event_types),
            command_types: types(&self.command_types),
            created_at: wire::rfc3339_ms(self.created_ms),
            secret: None,
            previous_secret_valid_until: self
                .sealed_previous_secret
                .as_ref()
                .map(|_| wire::rfc3339_ms(self.previous_valid_until_ms)),
            oauth: self.oauth.as_ref().map(OAuthRecord::to_wire),
        }
    }

    /// The declared event type `name`, if any.
    pub fn event_type(&self, name: &str) -> Option<&TypeRecord> {
        self.event_types.iter().find(|t| t.name == name)
    }

    /// The declared command type `name`, if any.
    pub fn command_type(&self, name: &str) -> Option<&TypeRecord> {
        self.command_types.iter().find(|t| t.name == name)
    }
}

/// A customer profile (in the customer's data group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerRecord {
    /// Customer id.
    pub id: String,
    /// Creation time.
    pub created_ms: i64,
    /// SHA-256 of its API token: a customer's calls name it, so the token is checked here.
    pub token_hash: Vec<u8>,
    /// The portal account's email, when it signed up there.
    pub email: Option<String>,
    /// Sessions from an older epoch are invalid ("sign out everywhere" increments it).
    pub session_epoch: u64,
}

/// A portal account (in the meta group, so any node finds it by email at sign-in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// Normalised (lower-case) email.
    pub email: String,
    /// The customer profile it owns.
    pub customer_id: String,
    /// argon2id hash in PHC string form.
    pub password_hash: String,
    /// When created.
    pub created_ms: i64,
}

/// A portal session, stored under the hash of its cookie value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The account's email.
    pub email: String,
    /// The customer profile.
    pub customer_id: String,
    /// The account epoch at sign-in.
    pub epoch: u64,
    /// The CSRF token every form of this session must carry.
    pub csrf: String,
    /// When signed in.
    pub created_ms: i64,
    /// When it stops being valid.
    pub expires_ms: i64,
}

/// A customer's link to an entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// The entity.
    pub entity_id: String,
    /// The customer's subject id there.
    pub subject: String,
    /// When linked.
    pub linked_ms: i64,
    /// The entity's access token from OAuth linking, sealed (AES-256-GCM) by the node.
    pub sealed_token: Option<Vec<u8>>,
    /// The refresh token issued with it, sealed the same way (bound to the link as a refresh
    /// token, so the two cannot be swapped).
    pub sealed_refresh_token: Option<Vec<u8>>,
    /// The claim its subject holds in the meta group's routing index (the id of the intent
    /// that made the link): the unlink releases exactly this claim, never a newer one.
    pub claim: String,
}

/// Who holds (entity, subject) in the meta group's routing index, and under which claims.
/// Each linking adds its own claim and each unlink (or abandoned linking) removes its own, so
/// a release that arrives late never takes the subject from a newer linking.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubjectClaim {
    /// The customer.
    pub customer_id: String,
    /// The live claims (intent ids); the entry goes when the last one is released.
    pub claims: Vec<String>,
}

impl LinkRecord {
    /// The wire view.
    pub fn to_wire(&self) -> wire::Link {
        wire::Link {
            entity_id: self.entity_id.clone(),
            subject: self.subject.clone(),
            linked_at: wire::rfc3339_ms(self.linked_ms),
        }
    }
}

/// A rule as stored: the source text; the node compiles it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleRecord {
    /// Rule id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Trigger entity.
    pub when_entity: String,
    /// Trigger event type.
    pub when_event_type: String,
    /// CEL condition.
    pub condition: Option<String>,
    /// Target entity.
    pub then_entity: String,
    /// Command type.
    pub then_command_type: String,
    /// The mapping object, as JSON text.
    pub data_json: String,
    /// When saved.
    pub created_ms: i64,
}

impl RuleRecord {
    /// The wire view.
    pub fn to_wire(&self) -> wire::Rule {
        wire::Rule {
            id: self.id.clone(),
            name: self.name.clone(),
            when: wire::Trigger {
                entity: self.when_entity.clone(),
                event_type: self.when_event_type.clone(),
                condition: self.condition.clone(),
            },
            then: wire::Action {
                entity: self.then_entity.clone(),
                command_type: self.then_command_type.clone(),
                data: serde_json::from_str(&self.data_json).unwrap_or_default(),
            },
            created_at: wire::rfc3339_ms(self.created_ms),
        }
    }
}

/// An event as received, kept in the customer's activity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Event id.
    pub id: String,
    /// Sending entity.
    pub source: String,
    /// Event type.
    pub event_type: String,
    /// Subject at the source.
    pub subject: String,
    /// The whole CloudEvent as JSON text.
    pub cloudevent_json: String,
}

/// A command the vault will deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Stable id: the CloudEvent id and the `webhook-id` on every attempt.
    pub id: String,
    /// The customer it is about.
    pub customer_id: String,
    /// Target entity.
    pub target: String,
    /// Command type.
    pub command_type: String,
    /// The customer's subject at the target.
    pub subject: String,
    /// The mapped data, as JSON text.
    pub data_json: String,
    /// The triggering event.
    pub event_id: String,
    /// The triggering event's source.
    pub event_source: String,
    /// The rule that produced it.
    pub rule_id: String,
    /// Creation time.
    pub created_ms: i64,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// Delivered (2xx).
    Delivered,
    /// Retries exhausted or endpoint gone.
    Failed,
    /// Target unlinked.
    Cancelled,
}

impl DeliveryState {
    /// The wire status.
    pub fn to_wire(self) -> wire::DeliveryStatus {
        match self {
            DeliveryState::Pending => wire::DeliveryStatus::Pending,
            DeliveryState::Delivered => wire::DeliveryStatus::Delivered,
            DeliveryState::Failed => wire::DeliveryStatus::Failed,
            DeliveryState::Cancelled => wire::DeliveryStatus::Cancelled,
        }
    }
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Start time.
    pub at_ms: i64,
    /// HTTP status, if the target answered.
    pub status_code: Option<u16>,
    /// Transport or policy error.
    pub error: Option<String>,
    /// Round-trip time.
    pub duration_ms: u64,
}

/// A command and its delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// The command.
    pub command: CommandRecord,
    /// Where it stands.
    pub state: DeliveryState,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
    /// When the next attempt is due (pending only).
    pub next_due_ms: Option<i64>,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
}

impl OutboxRecord {
    /// The wire view.
    pub fn to_wire(&self) -> wire::Delivery {
        let c = &self.command;
        wire::Delivery {
            command_id: c.id.clone(),
            customer_id: c.customer_id.clone(),
            target: c.target.clone(),
            command_type: c.command_type.clone(),
            event_id: c.event_id.clone(),
            rule_id: c.rule_id.clone(),
            status: self.state.to_wire(),
            reason: self.reason.clone(),
            created_at: wire::rfc3339_ms(c.created_ms),
            next_attempt_at: self.next_due_ms.map(wire::rfc3339_ms),
            attempts: self
                .attempts
                .iter()
                .map(|a| wire::Attempt {
                    at: wire::rfc3339_ms(a.at_ms),
                    status_code: a.status_code,
                    error: a.error.clone(),
                    duration_ms: a.duration_ms,
                })
                .collect(),
            data: serde_json::from_str(&c.data_json).unwrap_or_default(),
        }
    }
}

/// An event's fate, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventFate {
    /// Commands produced.
    Accepted,
    /// Nothing triggered.
    Ignored,
}

/// The dedup record of (source, event id): enough to answer a duplicate like the first time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// The customer the event was about, if found.
    pub customer_id: Option<String>,
    /// Accepted or ignored.
    pub fate: EventFate,
    /// Commands produced.
    pub commands: Vec<String>,
    /// Why ignored.
    pub reason: Option<String>,
    /// When first received.
    pub at_ms: i64,
}

/// One line of a customer's activity, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ActivityRecord {
    /// An event arrived.
    EventReceived {
        /// The event.
        event: EventRecord,
        /// Accepted or ignored.
        fate: EventFate,
        /// Why ignored.
        reason: Option<String>,
    },
    /// A rule matched and produced a command.
    RuleMatched {
        /// Rule id.
        rule_id: String,
        /// Event id.
        event_id: String,
        /// Command id.
        command_id: String,
        /// Target.
        target: String,
        /// Command type.
        command_type: String,
    },
    /// A rule triggered by an event could not be evaluated.
    RuleFailed(RuleFailure),
    /// A delivery attempt.
    DeliveryAttempt {
        /// Command id.
        command_id: String,
        /// 1-based attempt number.
        attempt: u32,
        /// HTTP status.
        status_code: Option<u16>,
        /// Error.
        error: Option<String>,
        /// State after the attempt.
        state: DeliveryState,
    },
    /// A delivery changed state without an attempt (cancelled, replayed).
    DeliveryChanged {
        /// Command id.
        command_id: String,
        /// New state.
        state: DeliveryState,
        /// Why.
        reason: String,
    },
    /// Linked an entity.
    Linked {
        /// Entity.
        entity_id: String,
    },
    /// Unlinked an entity.
    Unlinked {
        /// Entity.
        entity_id: String,
    },
    /// Saved a rule.
    RuleSaved {
        /// Rule.
        rule_id: String,
    },
    /// Deleted a rule.
    RuleDeleted {
        /// Rule.
        rule_id: String,
    },
    /// An event arrived and its rules made commands: stored as one line (one key fewer per
    /// event), read as the event's line and one [`ActivityRecord::RuleMatched`] per command
    /// ([`ActivityRecord::lines`]). Last, so the variants before keep their encoding.
    EventMatched {
        /// The event.
        event: EventRecord,
        /// Accepted or ignored.
        fate: EventFate,
        /// Why ignored.
        reason: Option<String>,
        /// What each matched rule made, in the order the commands were made.
        matched: Vec<RuleMatch>,
    },
}

/// One rule an event matched and the command it made (see [`ActivityRecord::EventMatched`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleMatch {
    /// Rule id.
    pub rule_id: String,
    /// Command id.
    pub command_id: String,
    /// Target.
    pub target: String,
    /// Command type.
    pub command_type: String,
}

impl ActivityRecord {
    /// The lines this stored record reads as, oldest first: an
    /// [`ActivityRecord::EventMatched`] is the event's line, then one line per command; any
    /// other record is one line.
    pub fn lines(self) -> Vec<ActivityRecord> {
        match self {
            ActivityRecord::EventMatched {
                event,
                fate,
                reason,
                matched,
            } => {
                let mut out = Vec::with_capacity(1 + matched.len());
                let event_id = event.id.clone();
                out.push(ActivityRecord::EventReceived {
                    event,
                    fate,
                    reason,
                });
                out.extend(matched.into_iter().map(|m| ActivityRecord::RuleMatched {
                    rule_id: m.rule_id,
                    event_id: event_id.clone(),
                    command_id: m.command_id,
                    target: m.target,
                    command_type: m.command_type,
                }));
                out
            }
            line => vec![line],
        }
    }

    /// The command whose delivery this line records an attempt on or a change of.
    pub fn command_settled(&self) -> Option<&str> {
        match self {
            ActivityRecord::DeliveryAttempt { command_id, .. }
            | ActivityRecord::DeliveryChanged { command_id, .. } => Some(command_id),
            _ => None,
        }
    }

    /// The event this line records, if it records one.
    pub fn event(&self) -> Option<&EventRecord> {
        match self {
            ActivityRecord::EventReceived { event, .. }
            | ActivityRecord::EventMatched { event, .. } => Some(event),
            _ => None,
        }
    }

    /// The commands this record names as made by a rule (erasure forgets them).
    pub fn commands_made(&self) -> Vec<&str> {
        match self {
            ActivityRecord::RuleMatched { command_id, .. } => vec![command_id.as_str()],
            ActivityRecord::EventMatched { matched, .. } => {
                matched.iter().map(|m| m.command_id.as_str()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The wire view.
    pub fn to_wire(&self) -> wire::ActivityKind {
        use wire::ActivityKind as K;
        match self.clone() {
            // Read as its lines (`lines`); alone, it is its event's line.
            ActivityRecord::EventReceived {
                event,
                fate,
                reason,
            }
            | ActivityRecord::EventMatched {
                event,
                fate,
                reason,
                ..
            } => K::EventReceived {
                event_id: event.id,
                source: event.source,
                event_type: event.event_type,
                status: fate_to_wire(fate),
                reason,
            },
            ActivityRecord::RuleMatched {
                rule_id,
                event_id,
                command_id,
                target,
                command_type,
            } => K::RuleMatched {
                rule_id,
                event_id,
                command_id,
                target,
                command_type,
            },
            ActivityRecord::RuleFailed(f) => K::RuleFailed {
                rule_id: f.rule_id,
                event_id: f.event_id,
                reason: f.reason,
            },
            ActivityRecord::DeliveryAttempt {
                command_id,
                attempt,
                status_code,
                error,
                state,
            } => K::DeliveryAttempt {
                command_id,
                attempt,
                status_code,
                error,
                status: state.to_wire(),
            },
            ActivityRecord::DeliveryChanged {
                command_id,
                state,
                reason,
            } => K::DeliveryChanged {
                command_id,
                status: state.to_wire(),
                reason,
            },
            ActivityRecord::Linked { entity_id } => K::Linked { entity_id },
            ActivityRecord::Unlinked { entity_id } => K::Unlinked { entity_id },
            ActivityRecord::RuleSaved { rule_id } => K::RuleSaved { rule_id },
            ActivityRecord::RuleDeleted { rule_id } => K::RuleDeleted { rule_id },
        }
    }
}

/// Why a pending delivery was cancelled when its customer unlinked its target (the apply's
/// cancellation and the delivery worker's say it alike).
pub fn cancelled_by_unlink(entity: &str) -> String {
    format!("the customer unlinked {entity}")
}

/// Why a pending delivery was cancelled when its customer linked its target again as another
/// account.
pub fn cancelled_by_relink(entity: &str) -> String {
    format!("the customer linked another account at {entity}")
}

/// The wire status of a stored fate.
pub fn fate_to_wire(fate: EventFate) -> wire::EventStatus {
    match fate {
        EventFate::Accepted => wire::EventStatus::Accepted,
        EventFate::Ignored => wire::EventStatus::Ignored,
    }
}

/// An event and everything it produced, proposed as one log entry so they commit together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingest {
    /// The event.
    pub event: EventRecord,
    /// The customer it is about, when the (source, subject) link was found.
    pub customer_id: Option<String>,
    /// Commands produced (empty when ignored).
    pub commands: Vec<CommandRecord>,
    /// Why nothing was triggered.
    pub ignored_reason: Option<String>,
    /// The rules the event triggered that could not be evaluated, each with why.
    pub rule_failures: Vec<RuleFailure>,
    /// Receive time.
    pub at_ms: i64,
}

/// A rule an event triggered that could not be evaluated, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleFailure {
    /// The rule.
    pub rule_id: String,
    /// The event.
    pub event_id: String,
    /// Why, values shown as JSON.
    pub reason: String,
}

/// What an attempt leads to; decided by the delivery worker, applied by the state machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AttemptNext {
    /// 2xx: done.
    Delivered,
    /// Try again at this time.
    RetryAt(i64),
    /// Retries exhausted.
    Exhausted,
    /// 410 Gone: disable the endpoint, fail the delivery.
    Gone,
}

/// The result of one attempt (or of a decision not to attempt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeliveryUpdate {
    /// An attempt was made.
    Attempted {
        /// Command id.
        command_id: String,
        /// The attempt.
        attempt: AttemptRecord,
        /// What follows.
        next: AttemptNext,
    },
    /// Not attempted: the target was unlinked or its endpoint disabled.
    Cancelled {
        /// Command id.
        command_id: String,
        /// Why.
        reason: String,
        /// When decided.
        at_ms: i64,
        /// Failed (replayable) rather than cancelled.
        as_failed: bool,
    },
}

/// One rule template in the recommendation model, with what the population agrees on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateStat {
    /// The model item: a template (`source/event_type>target/command_type`; builds before
    /// 2026-12-06 joined entity and type with a dot), a rule part (`when:`/`then:`), a link
    /// (`link:`) or an event type received (`event:`).
    pub key: String,
    /// Customers keeping it.
    pub customers: u32,
    /// Customers who dismissed it when it was recommended (a negative signal).
    pub dismissed: u32,
    /// The condition most customers keeping it use, when at least k of them agree.
    pub condition: Option<String>,
    /// The mapping (JSON text) most of them use, when at least k agree.
    pub data_json: Option<String>,
}

/// The trained recommendation model: aggregate counts only (no customer's own rules), so
/// every node serves the same model and no recommendation rests on fewer than k customers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Increases with every training.
    pub version: u64,
    /// When trained.
    pub trained_ms: i64,
    /// Customers in the population.
    pub customers: u32,
    /// Popularity damping.
    pub beta: f64,
    /// k: co-occurrences kept by fewer customers are not in the model.
    pub min_support: u32,
    /// Templates by dense id.
    pub templates: Vec<TemplateStat>,
    /// (from, to, customers keeping both, sum over them of 1 / their template count).
    pub pairs: Vec<(u32, u32, u32, f64)>,
    /// The ranker (a logistic regression from a candidate's features to the probability it is
    /// kept); None when there was too little data to fit it.
    pub ranker: Option<RankerRecord>,
}

/// A fitted ranker: features are standardised by `means` and `scales`, expanded with their
/// pairwise products, and weighted (`weights[0]` the intercept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankerRecord {
    /// Mean of each feature in the samples it was fitted on.
    pub means: Vec<f64>,
    /// Standard deviation of each feature.
    pub scales: Vec<f64>,
    /// Intercept, then one weight per expanded feature.
    pub weights: Vec<f64>,
}

/// A linking started through the entity's OAuth server, waiting for its callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingLink {
    /// Customer id.
    pub customer_id: String,
    /// Entity id.
    pub entity_id: String,
    /// The PKCE code verifier.
    pub verifier: String,
    /// The OpenID Connect nonce the ID token must carry.
    pub nonce: String,
    /// When started.
    pub at_ms: i64,
    /// Started from the portal (the callback then returns the customer there).
    pub via_portal: bool,
    /// A recommended rule (JSON) to create once the link is made.
    pub then_rule_json: Option<String>,
}

/// A node's standing in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Holds replicas and serves clients.
    Active,
    /// Being emptied: its replicas and leaderships move away, then it is removed.
    Leaving,
    /// Out of the cluster; its id is never reused.
    Removed,
}

/// A node of the cluster (meta group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id (0 in a join request: assign one).
    pub id: u64,
    /// Where peers reach it.
    pub peer_addr: String,
    /// Its client API, as it reported it.
    pub api_addr: String,
    /// Active, leaving or removed.
    pub state: NodeState,
    /// When it first joined.
    pub joined_ms: i64,
}

/// Settings fixed when the cluster is created (meta group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// A random id, so nodes of two clusters never mix.
    pub cluster_id: String,
    /// When created.
    pub created_ms: i64,
    /// slot -> data group.
    pub shard_map: crate::shard::ShardMap,
    /// The token-sealing key ring, sealed with a key derived from the cluster secret, so
    /// every node opens every sealed access token and no replica holds the keys in clear.
    pub sealed_token_keys: Vec<u8>,
}

/// The target voters of every group, the preferred leader first (meta group).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Grows with every change.
    pub epoch: u64,
    /// Target voters per group (the meta group's learners are every other active node).
    pub groups: std::collections::BTreeMap<u32, Vec<u64>>,
}

/// What a group's leader last reported about its group (meta group): the membership every
/// node needs to find the leader and to know whether it still holds a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    /// The group.
    pub group: u32,
    /// Its leader when reported.
    pub leader: u64,
    /// The leader's term.
    pub term: u64,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// When reported.
    pub at_ms: i64,
}

/// One step of an operation spanning the meta group and a data group, recorded in the data
/// group before it is taken, so a crash between the steps is repaired, never left half done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum IntentStep {
    /// Claim (entity, subject) for the customer in the meta group, then make the link.
    ClaimSubject {
        /// Customer id.
        customer_id: String,
        /// The link to make once claimed.
        link: LinkRecord,
    },
    /// Release one claim on (entity, subject) in the meta group.
    ReleaseSubject {
        /// Customer id.
        customer_id: String,
        /// Entity id.
        entity_id: String,
        /// Subject.
        subject: String,
        /// The claim released.
        claim: String,
    },
    /// Claim the email for the account in the meta group, then create its customer.
    ClaimEmail {
        /// The account.
        account: AccountRecord,
        /// Its customer.
        customer: CustomerRecord,
    },
    /// Release the email in the meta group if the customer still holds it; an erasure's last
    /// step there, also for a customer without an email, so the meta group is scrubbed.
    ReleaseEmail {
        /// Customer id.
        customer_id: String,
        /// Email (empty: the customer had none).
        email: String,
    },
}

/// A recorded intent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// Unique in its group.
    pub id: String,
    /// When recorded.
    pub at_ms: i64,
    /// What is to be done.
    pub step: IntentStep,
}

/// Which groups a change may be applied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The meta group only.
    Meta,
    /// Data groups only.
    Data,
    /// Either.
    Any,
}

/// A change to the vault's state; every write goes through Raft as one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StateChange {
    /// Several changes in one log entry (a group's proposer drains its queue into one), each
    /// with its own outcome.
    Batch(Vec<StateChange>),
    /// Create the cluster: settings, the first node, the first assignment (meta, once).
    InitCluster {
        /// Settings.
        settings: ClusterSettings,
        /// The first node.
        node: NodeRecord,
        /// Where every group starts.
        assignment: Assignment,
    },
    /// Add a node, or update the addresses of a known one (joining is idempotent): answers
    /// its id, assigned when the record's is 0.
    RegisterNode(NodeRecord),
    /// Change a node's standing.
    SetNodeState {
        /// Node id.
        id: u64,
        /// New state.
        state: NodeState,
    },
    /// Replace the target placement (ignored unless its epoch is newer).
    SetAssignment(Assignment),
    /// A group leader's report of its group.
    ReportGroup(GroupReport),
    /// Claim (entity, subject) for a customer in the routing index (refused if another
    /// customer holds it).
    ClaimSubject {
        /// Entity id.
        entity_id: String,
        /// Subject.
        subject: String,
        /// Customer id.
        customer_id: String,
        /// The claim (the linking intent's id).
        claim: String,
    },
    /// Release one claim on (entity, subject); the subject is free once none is left.
    ReleaseSubject {
        /// Entity id.
        entity_id: String,
        /// Subject.
        subject: String,
        /// Customer id.
        customer_id: String,
        /// The claim released.
        claim: String,
    },
    /// Claim an email for a portal account (refused if another customer holds it).
    ClaimEmail(AccountRecord),
    /// Release an email if the customer holds it.
    ReleaseEmail {
        /// Email.
        email: String,
        /// Customer id.
        customer_id: String,
    },
    /// Record an intent before taking its first step.
    BeginIntent(IntentRecord),
    /// Forget an intent (done, or abandoned).
    EndIntent {
        /// Intent id.
        id: String,
    },
    /// Register an entity (refused if the id exists).
    RegisterEntity(EntityRecord),
    /// Change an entity's name, endpoint or enabled flag.
    UpdateEntity {
        /// Entity id.
        id: String,
        /// New name.
        name: Option<String>,
        /// New endpoint.
        command_url: Option<String>,
        /// New enabled flag.
        endpoint_enabled: Option<bool>,
        /// A new OAuth client secret, sealed (rotation).
        sealed_client_secret: Option<Vec<u8>>,
    },
    /// Replace an entity's secret, keeping the old one valid until a time.
    RotateSecret {
        /// Entity id.
        id: String,
        /// The new `whsec_` secret, sealed.
        sealed_secret: Vec<u8>,
        /// End of the grace period for the old one.
        previous_valid_until_ms: i64,
    },
    /// Create a customer; with `intent`, only while that intent is recorded (and ending it).
    CreateCustomer {
        /// The customer.
        customer: CustomerRecord,
        /// The sign-up intent this completes.
        intent: Option<String>,
    },
    /// Link an entity to a customer; with `intent`, only while that intent is recorded (and
    /// ending it), so an abandoned claim never links.
    Link {
        /// Customer id.
        customer_id: String,
        /// The link.
        link: LinkRecord,
        /// The claim intent this completes.
        intent: Option<String>,
    },
    /// Remove a link.
    Unlink {
        /// Customer id.
        customer_id: String,
        /// Entity id.
        entity_id: String,
        /// When.
        at_ms: i64,
    },
    /// Save a rule.
    PutRule {
        /// Customer id.
        customer_id: String,
        /// The rule.
        rule: RuleRecord,
    },
    /// Delete a rule.
    DeleteRule {
        /// Customer id.
        customer_id: String,
        /// Rule id.
        rule_id: String,
        /// When.
        at_ms: i64,
    },
    /// An event and what it produced.
    Ingest(Ingest),
    /// Delivery results, batched.
    RecordDeliveries(Vec<DeliveryUpdate>),
    /// Make a failed delivery pending again.
    Replay {
        /// Command id.
        command_id: String,
        /// When.
        at_ms: i64,
    },
    /// Replace the recommendation model (ignored unless its version is newer).
    PutModel(Box<ModelRecord>),
    /// Remember that a customer dismissed a recommended template.
    Dismiss {
        /// Customer id.
        customer_id: String,
        /// Template key.
        template: String,
    },
    /// Start linking through OAuth: remember the verifier under the hash of `state`.
    BeginLink {
        /// SHA-256 of the OAuth `state`.
        state_hash: Vec<u8>,
        /// What to finish on callback.
        pending: PendingLink,
    },
    /// Consume a pending linking (single use); answers it, or not found.
    TakeLink {
        /// SHA-256 of the OAuth `state`.
        state_hash: Vec<u8>,
    },
    /// Remember a portal session.
    PutSession {
        /// SHA-256 of the session cookie value.
        token_hash: Vec<u8>,
        /// The session.
        session: SessionRecord,
    },
    /// Forget a portal session (sign out).
    DeleteSession {
        /// SHA-256 of the session cookie value.
        token_hash: Vec<u8>,
    },
    /// End every session of a customer's account (sign out everywhere).
    EndSessions {
        /// Customer id.
        customer_id: String,
    },
    /// Erase a customer and everything held about it: links, rules, activity, commands and
    /// their deliveries, engagement, dismissals, its token and its portal account.
    EraseCustomer {
        /// Customer id.
        customer_id: String,
    },
    /// Delete what expired before a time (bounded per entry; repeated until done).
    Prune {
        /// Expiry cut-off.
        before_ms: i64,
        /// The proposer's clock: OAuth linkings older than their TTL go too.
        now_ms: i64,
        /// Most keys to delete in this entry.
        limit: u32,
    },
    /// Disable an entity's endpoint after it answered 410 Gone, if it is still the endpoint
    /// that answered: a 410 from an old URL (an attempt under way when the operator moved
    /// the endpoint, or sent by a leader whose copy of the entity was behind) must not
    /// disable the new one. (Appended last: the variants before it keep their encoding.)
    DisableGoneEndpoint {
        /// Entity id.
        id: String,
        /// The URL that answered 410.
        command_url: String,
    },
}

impl StateChange {
    /// Roughly how many bytes the change takes in a log entry (for bounding batches).
    pub fn approx_size(&self) -> usize {
        match self {
            StateChange::Batch(cs) => cs.iter().map(StateChange::approx_size).sum(),
            StateChange::Ingest(i) => {
                256 + i.event.cloudevent_json.len()
                    + i.commands
                        .iter()
                        .map(|c| 256 + c.data_json.len())
                        .sum::<usize>()
                    + i.rule_failures
                        .iter()
                        .map(|f| 64 + f.reason.len())
                        .sum::<usize>()
            }
            StateChange::PutRule { rule, .. } => 256 + rule.data_json.len(),
            StateChange::RegisterEntity(e) => {
                1024 + e
                    .event_types
                    .iter()
                    .chain(&e.command_types)
                    .map(|t| 64 + t.schema_json.as_ref().map_or(0, String::len))
                    .sum::<usize>()
            }
            StateChange::PutModel(m) => 1024 + 64 * (m.templates.len() + m.pairs.len()),
            _ => 256,
        }
    }

    /// The groups this change belongs to.
    pub fn scope(&self) -> Scope {
        use StateChange::*;
        match self {
            Batch(_) | Prune { .. } => Scope::Any,
            InitCluster { .. }
            | RegisterNode(_)
            | SetNodeState { .. }
            | SetAssignment(_)
            | ReportGroup(_)
            | ClaimSubject { .. }
            | ReleaseSubject { .. }
            | ClaimEmail(_)
            | ReleaseEmail { .. }
            | RegisterEntity(_)
            | UpdateEntity { .. }
            | DisableGoneEndpoint { .. }
            | RotateSecret { .. }
            | PutModel(_) => Scope::Meta,
            _ => Scope::Data,
        }
    }
}

/// What applying a change answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChangeOutcome {
    /// Applied.
    Done,
    /// The outcomes of a batch, in order.
    Batch(Vec<ChangeOutcome>),
    /// A node registered (or found registered): its id.
    NodeRegistered(u64),
    /// An event was ingested (or found to be a duplicate).
    Ingested {
        /// True when (source, id) was seen before.
        duplicate: bool,
        /// Accepted or ignored (of the first time, for a duplicate).
        fate: EventFate,
        /// Commands (of the first time, for a duplicate).
        commands: Vec<String>,
        /// Why ignored.
        reason: Option<String>,
    },
    /// A pending linking, taken.
    LinkTaken(PendingLink),
    /// A prune deleted this many keys (fewer than the limit: done).
    Pruned(u32),
    /// The change was refused by the state machine's own checks.
    Rejected {
        /// Stable code.
        code: ErrorCode,
        /// Human detail.
        detail: String,
    },
}

impl ChangeOutcome {
    /// A refusal.
    pub fn rejected(code: ErrorCode, detail: impl Into<String>) -> Self {
        ChangeOutcome::Rejected {
            code,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn changes_round_trip_through_the_codec() {
        let change = StateChange::Ingest(Ingest {
            event: EventRecord {
                id: "e".into(),
                source: "s".into(),
                event_type: "t".into(),
                subject: "x".into(),
                cloudevent_json: r#"{"a":1}"#.into(),
            },
            customer_id: Some("c".into()),
            commands: vec![],
            ignored_reason: Some("no rule".into()),
            rule_failures: vec![RuleFailure {
                rule_id: "r".into(),
                event_id: "e".into(),
                reason: "condition yielded 31 (an int), not true or false".into(),
            }],
            at_ms: 5,
        });
        let bytes = codec::encode(&change).expect("encode");
        let back: StateChange = codec::decode(&bytes).expect("decode");
        assert_eq!(back, change);
        let outcome = ChangeOutcome::rejected(ErrorCode::Conflict, "x");
        let back: ChangeOutcome = codec::decode(&codec::encode(&outcome).expect("e")).expect("d");
        assert_eq!(back, outcome);
    }
}
