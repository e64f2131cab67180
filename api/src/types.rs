//! Request and response bodies of the public HTTP API.
//!
//! Times are RFC 3339 strings in UTC. Ids are opaque strings.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// One event or command type an entity declares, with an optional JSON Schema for its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TypeSpec {
    /// The type name, e.g. `flight.delayed`.
    #[serde(rename = "type")]
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub type_name: String,
    /// JSON Schema (draft 2020-12 or earlier, as an object) the type's data must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
}

/// `POST /v1/entities`: register a company's system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterEntity {
    /// Stable id, `[A-Za-z0-9._:-]{1,128}`; events carry it as `source`.
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub id: String,
    /// Display name.
    #[schema(
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^ \x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$",
        min_length = 1,
        max_length = 200
    )]
    pub name: String,
    /// Where commands for this entity are POSTed.
    pub command_url: String,
    /// Event types the entity sends.
    #[serde(default)]
    #[schema(max_items = 256)]
    pub event_types: Vec<TypeSpec>,
    /// Command types the entity accepts.
    #[serde(default)]
    #[schema(max_items = 256)]
    pub command_types: Vec<TypeSpec>,
    /// The entity's OAuth 2.0 authorization server, for customers to link their account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthEndpoints>,
}

/// An entity's OAuth 2.0 / OpenID Connect provider (authorization code with PKCE S256).
///
/// Either an `issuer`, whose metadata the vault discovers (OpenID Connect discovery, or
/// RFC 8414), or the explicit `authorize_url` and `token_url`. In answers the endpoints are
/// the discovered ones, and `client_secret` is never shown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuthEndpoints {
    /// The provider's issuer identifier; the vault reads its metadata from
    /// `/.well-known/openid-configuration` (or `/.well-known/oauth-authorization-server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Where the customer signs in and consents (discovered when an issuer is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorize_url: Option<String>,
    /// Where the vault exchanges the code (discovered when an issuer is given). The customer's
    /// id there comes from a validated ID token, else the userinfo endpoint, else a `subject`
    /// (or `sub`) field of the token answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// The vault's client id at the entity.
    #[schema(pattern = r"^[\x20-\x7E]{1,256}$", min_length = 1, max_length = 256)]
    pub client_id: String,
    /// The vault's client secret there, when the provider wants the client to authenticate.
    /// Sealed at rest; never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        write_only,
        pattern = r"^[\x20-\x7E]{1,512}$",
        min_length = 1,
        max_length = 512
    )]
    pub client_secret: Option<String>,
    /// RFC 7009 token revocation endpoint; the vault calls it when the customer unlinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_url: Option<String>,
    /// OpenID Connect userinfo endpoint (discovered when an issuer is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userinfo_url: Option<String>,
    /// Scopes asked for; `["openid"]` when the provider speaks OpenID Connect and none are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 16)]
    pub scopes: Option<Vec<String>>,
    /// How the vault authenticates at the token endpoint: `client_secret_basic`,
    /// `client_secret_post` or `none` (chosen from the provider's metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub client_auth: Option<String>,
    /// The redirect URI to register at the provider for this entity (one per entity, so a
    /// code from one provider can never be redeemed at another's token endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub redirect_uri: Option<String>,
}

/// `POST /v1/customers/{id}/links/{entity_id}/authorize` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuthorizeLink {
    /// Send the customer here; the entity redirects back to the vault's callback.
    pub authorize_url: String,
}

/// `PATCH /v1/entities/{id}`: change an entity's name or endpoint, or re-enable it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEntity {
    /// New display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^ \x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$",
        min_length = 1,
        max_length = 200
    )]
    pub name: Option<String>,
    /// New command endpoint (re-enables delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_url: Option<String>,
    /// Enable or disable delivery to the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_enabled: Option<bool>,
    /// A new client secret for the entity's OAuth provider (rotation); sealed, never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        write_only,
        pattern = r"^[\x20-\x7E]{1,512}$",
        min_length = 1,
        max_length = 512
    )]
    pub oauth_client_secret: Option<String>,
}

/// An entity as the admin sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Entity {
    /// Entity id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Command endpoint.
    pub command_url: String,
    /// False once the endpoint answered 410 Gone or an admin disabled it.
    pub endpoint_enabled: bool,
    /// Declared event types.
    pub event_types: Vec<TypeSpec>,
    /// Declared command types.
    pub command_types: Vec<TypeSpec>,
    /// When it was registered.
    pub created_at: String,
    /// The signing secret: only in the answer to registration or rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Until when the previous secret is still accepted, after a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_valid_until: Option<String>,
    /// Its OAuth 2.0 authorization server, if customers link through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthEndpoints>,
}

/// `POST /v1/customers` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CustomerCreated {
    /// The customer's id in the vault.
    pub id: String,
    /// Bearer token for the customer's own calls; shown once.
    pub token: String,
}

/// `POST /v1/customers/{id}/links`: the customer's consent to an entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    /// The entity to link.
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub entity_id: String,
    /// The customer's subject id at that entity.
    #[schema(
        pattern = r"^[^\x00-\x1F\x7F-\x9F]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub subject: String,
}

/// A link as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Link {
    /// The linked entity.
    pub entity_id: String,
    /// The customer's subject id there.
    pub subject: String,
    /// When it was linked.
    pub linked_at: String,
}

/// A customer profile summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Customer {
    /// Customer id.
    pub id: String,
    /// When the profile was created.
    pub created_at: String,
    /// Linked entities.
    pub links: Vec<Link>,
    /// The data group holding the profile (see `GET /v1/cluster`).
    #[serde(default)]
    pub group: u32,
}

/// A rule's trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// The entity whose event triggers the rule.
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub entity: String,
    /// The event type.
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub event_type: String,
    /// Optional CEL condition over `id`, `source`, `type`, `subject`, `time`, `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096)]
    pub condition: Option<String>,
}

/// A rule's action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// The entity that receives the command.
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub entity: String,
    /// The command type.
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub command_type: String,
    /// The command's data: a JSON object whose string leaves are CEL expressions; numbers,
    /// booleans and null are constants (write a string constant as a CEL literal: `"'text'"`).
    #[schema(value_type = Object)]
    pub data: Value,
}

/// `POST /v1/customers/{id}/rules` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Display name.
    #[schema(
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^ \x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$",
        min_length = 1,
        max_length = 200
    )]
    pub name: String,
    /// The trigger.
    pub when: Trigger,
    /// The action.
    pub then: Action,
}

/// A saved rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rule {
    /// Rule id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The trigger.
    pub when: Trigger,
    /// The action.
    pub then: Action,
    /// When it was saved.
    pub created_at: String,
}

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// At least one rule matched; commands were produced.
    Accepted,
    /// Nothing was triggered (no link, no rule, condition false); recorded.
    Ignored,
    /// The (source, id) was seen before; the first outcome is repeated.
    Duplicate,
}

/// The `reason` an entity is given for its event about a customer that made no command: why
/// the customer's rules did not act (which rule, which condition, which other entity is not
/// linked) is the customer's, in their activity only.
pub const IGNORED_BY_RULES: &str = "none of the customer's rules made a command from it";

/// The `reason` an entity is given for its event about a subject no customer links at it:
/// the same whether nobody ever linked it, the customer unlinked it, or was erased, so the
/// entity learns nothing of a customer's unlinking or erasure from it.
pub fn unclaimed_reason(source: &str) -> String {
    format!("no customer has linked this subject at {source}")
}

/// `POST /v1/events` answer, sent once the event and its commands are durably committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventReceipt {
    /// The event's id.
    pub event_id: String,
    /// Accepted, ignored or duplicate.
    pub status: EventStatus,
    /// Ids of the commands produced (for a duplicate: those of the first time).
    pub commands: Vec<String>,
    /// Why an event was ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt.
    Pending,
    /// The target answered 2xx.
    Delivered,
    /// Retries exhausted, or the endpoint is gone; can be replayed.
    Failed,
    /// The customer unlinked the target; will not be sent.
    Cancelled,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    /// When the attempt started.
    pub at: String,
    /// HTTP status answered, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Transport or policy error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Round-trip time.
    pub duration_ms: u64,
}

/// A command's delivery, with every attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// Command id (also the `webhook-id` and the CloudEvent `id`).
    pub command_id: String,
    /// The customer it is about.
    pub customer_id: String,
    /// The target entity.
    pub target: String,
    /// The command type.
    pub command_type: String,
    /// The triggering event's id.
    pub event_id: String,
    /// The rule that produced it.
    pub rule_id: String,
    /// Pending, delivered, failed or cancelled.
    pub status: DeliveryStatus,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was created.
    pub created_at: String,
    /// When the next attempt is due (pending only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// Every attempt, oldest first.
    pub attempts: Vec<Attempt>,
    /// The command's data as sent.
    pub data: Value,
}

/// A page of deliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryPage {
    /// The deliveries.
    pub items: Vec<Delivery>,
    /// Cursor for the next page, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// What happened, in a customer's activity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActivityKind {
    /// An entity sent an event about the customer.
    EventReceived {
        /// Event id.
        event_id: String,
        /// Sending entity.
        source: String,
        /// Event type.
        event_type: String,
        /// Accepted or ignored.
        status: EventStatus,
        /// Why it was ignored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A rule matched an event and produced a command.
    RuleMatched {
        /// The rule.
        rule_id: String,
        /// The event.
        event_id: String,
        /// The command produced.
        command_id: String,
        /// Target entity.
        target: String,
        /// Command type.
        command_type: String,
    },
    /// A rule triggered by an event could not be evaluated (an error in its condition or
    /// mapping, a condition yielding something other than true or false, mapped data
    /// violating the command schema, over the cost budget): one line per rule, also when
    /// another rule of the same event matched.
    RuleFailed {
        /// The rule.
        rule_id: String,
        /// The event.
        event_id: String,
        /// What went wrong, values shown as JSON.
        reason: String,
    },
    /// An attempt to deliver a command.
    DeliveryAttempt {
        /// The command.
        command_id: String,
        /// 1 for the first attempt.
        attempt: u32,
        /// HTTP status answered, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status_code: Option<u16>,
        /// Transport or policy error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Where the delivery stands after this attempt.
        status: DeliveryStatus,
    },
    /// A delivery was cancelled or replayed without an attempt.
    DeliveryChanged {
        /// The command.
        command_id: String,
        /// The new status.
        status: DeliveryStatus,
        /// Why.
        reason: String,
    },
    /// The customer linked an entity.
    Linked {
        /// The entity.
        entity_id: String,
    },
    /// The customer unlinked an entity.
    Unlinked {
        /// The entity.
        entity_id: String,
    },
    /// A rule was saved.
    RuleSaved {
        /// The rule.
        rule_id: String,
    },
    /// A rule was deleted.
    RuleDeleted {
        /// The rule.
        rule_id: String,
    },
}

/// `POST /v1/customers/{id}/rules/try` body: a rule and the event to run it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TryRule {
    /// The rule, as it would be saved.
    pub rule: RuleSpec,
    /// A past event of the customer's, by id (at the rule's trigger entity)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub event_id: Option<String>,
    /// ...or a sample event's `data` (the other attributes are filled in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_data: Option<serde_json::Value>,
}

/// What a rule would do with an event; nothing is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TryOutcome {
    /// True when the event matches the trigger and the condition holds.
    pub matched: bool,
    /// Why it did not match, or why the mapping failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The event the rule ran on.
    pub event: serde_json::Value,
    /// The command CloudEvent that would be sent (without delivery headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<serde_json::Value>,
}

/// `GET /v1/customers/{id}/export`: everything the vault holds about a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CustomerExport {
    /// When exported.
    pub exported_at: String,
    /// The profile and its links.
    pub customer: Customer,
    /// The portal account's email, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Its rules.
    pub rules: Vec<Rule>,
    /// Its activity, newest first: the whole of it, up to 100,000 lines or about 64 MiB of events.
    pub activity: Vec<ActivityItem>,
    /// Set when the activity holds more lines than the export: the rest, older, is read from
    /// `GET /v1/customers/{id}/activity?before=<this>` (so are their events and deliveries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_next: Option<String>,
    /// Every event received about it, as received.
    pub events: Vec<serde_json::Value>,
    /// Every command made for it and its delivery.
    pub deliveries: Vec<Delivery>,
    /// Engagement counts: `source/type` (the event's source entity and type) -> events received.
    pub engagement: std::collections::BTreeMap<String, u64>,
    /// Recommendation templates it dismissed.
    pub dismissed: Vec<String>,
}

/// One line of a customer's activity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActivityItem {
    /// When it happened.
    pub at: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: ActivityKind,
}

/// A page of activity, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActivityPage {
    /// The items.
    pub items: Vec<ActivityItem>,
    /// Cursor for the next (older) page, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /readyz` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// True when this node can serve clients: every group has a known leader (here, or on
    /// the node requests are forwarded to).
    pub ready: bool,
    /// This node's id.
    pub node_id: u64,
    /// The meta group's leader, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    /// Groups this node leads.
    #[serde(default)]
    pub leading: Vec<u32>,
    /// Last log index applied to this node's meta replica.
    pub applied_index: u64,
    /// Deliveries queued for their next attempt in the groups this node leads, not counting
    /// attempts in flight.
    pub pending_deliveries: u64,
    /// Why the node is not ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// A node of the cluster, as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterNode {
    /// Node id.
    pub id: u64,
    /// Peer address.
    pub peer_addr: String,
    /// Client API address it reported.
    pub api_addr: String,
    /// active, leaving or removed.
    pub state: String,
    /// Whether it answered the status request just now.
    pub up: bool,
}

/// One replica of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterReplica {
    /// The node holding it.
    pub node: u64,
    /// leader, follower, learner or candidate (as the node says); absent when it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Its last applied index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<u64>,
    /// How many entries it trails the leader's last log by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// `<applied index>:<digest of the applied state>`, when asked for (`?digests=true`):
    /// replicas at the same index must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// One Raft group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterGroup {
    /// Group id (0 is the meta group).
    pub id: u32,
    /// Its leader, when one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    /// The leader's term.
    pub term: u64,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// The placement's target voters, preferred leader first.
    pub target: Vec<u64>,
    /// The leader's last log index.
    pub last_log_index: u64,
    /// The leader's commit index.
    pub commit_index: u64,
    /// Every replica.
    pub replicas: Vec<ClusterReplica>,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// The cluster's id.
    pub cluster_id: String,
    /// The node that answered.
    pub answered_by: u64,
    /// Every node ever registered (removed ones included).
    pub nodes: Vec<ClusterNode>,
    /// Every group.
    pub groups: Vec<ClusterGroup>,
}

/// A rule's shape without its condition and mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RuleTemplate {
    /// Trigger entity.
    pub when_entity: String,
    /// Event type.
    pub event_type: String,
    /// Target entity.
    pub then_entity: String,
    /// Command type.
    pub command_type: String,
}

/// A rule the vault recommends to a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Recommendation {
    /// Id to accept or dismiss it with.
    pub id: String,
    /// The recommended template.
    pub template: RuleTemplate,
    /// Calibrated probability that the customer keeps it.
    pub confidence: f64,
    /// Why, in words.
    pub reason: String,
    /// The rule accepting creates: the population's agreed condition and mapping, when at
    /// least k customers agree on one.
    pub rule: RuleSpec,
    /// The entity the customer must link first to use it ("link Z to use it"); absent when
    /// both entities are linked. The portal links it, then creates the rule, in one flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_link: Option<String>,
    /// The model that made it.
    pub model_version: u64,
}

/// A customer's recommendations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecommendationList {
    /// The model in use, if one has been trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<u64>,
    /// Recommendations below this confidence are not shown.
    pub threshold: f64,
    /// Best first.
    pub items: Vec<Recommendation>,
}

/// What a training produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelSummary {
    /// Model version.
    pub version: u64,
    /// When trained.
    pub trained_at: String,
    /// Customers in the population.
    pub customers: u32,
    /// Distinct rule templates.
    pub templates: u32,
    /// Template pairs kept by at least k customers.
    pub pairs: u32,
    /// k.
    pub min_support: u32,
}

/// Formats Unix milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339_ms(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// Current Unix time in milliseconds.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_flat_json_with_a_kind() {
        let item = ActivityItem {
            at: rfc3339_ms(0),
            kind: ActivityKind::Linked {
                entity_id: "hotel".into(),
            },
        };
        let j = serde_json::to_value(&item).expect("ser");
        assert_eq!(j["kind"], "linked");
        assert_eq!(j["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(j["entity_id"], "hotel");
    }
}
