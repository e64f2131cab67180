//! What nodes send each other besides Raft RPCs (encoded by `custos_raft::codec`, like every
//! peer message): joining, forwarded proposals' answers, status, and per-group queries.

use custos_raft::records::{DeliveryState, OutboxRecord};
use custos_raft::types::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

/// A node asking to join (or rejoin) the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Its id, when it has one (a restart, or pinned in its config).
    pub node_id: Option<NodeId>,
    /// Where peers reach it.
    pub peer_addr: String,
    /// Its client API.
    pub api_addr: String,
}

/// The answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    /// The node's id in the cluster.
    pub node_id: NodeId,
    /// The cluster's id.
    pub cluster_id: String,
}

/// One group as one node sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalGroup {
    /// The group.
    pub group: GroupId,
    /// Leader, follower, learner or candidate.
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log: u64,
    /// Last applied index.
    pub applied: u64,
    /// Last committed index (as stored).
    pub committed: u64,
    /// Voters of the membership this node knows.
    pub voters: Vec<NodeId>,
    /// Learners of it.
    pub learners: Vec<NodeId>,
    /// Pending deliveries queued here (leaders only).
    pub pending_deliveries: u64,
    /// A digest of the applied state and the index it was taken at (when asked for).
    pub digest: Option<(u64, String)>,
}

/// What one node reports of itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalStatus {
    /// The node.
    pub node_id: NodeId,
    /// Every group it holds a replica of.
    pub groups: Vec<LocalGroup>,
}

/// A question for a group's leader, asked by a node serving a request that spans groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupQuery {
    /// A page of deliveries in a state.
    Deliveries {
        /// The state.
        state: DeliveryState,
        /// Cursor within the group.
        after: Option<String>,
        /// Page size.
        limit: usize,
    },
    /// The rows the recommender trains on, for at most `max_customers` of the group's
    /// customers (a deterministic sample beyond).
    TrainingInput {
        /// The group's share of the training cap.
        max_customers: u32,
    },
    /// Meta group: the customer claiming `subject` at `entity`, as the leader has it after a
    /// read index round (a follower's replica may not have a claim acknowledged yet).
    SubjectClaim {
        /// The entity.
        entity_id: String,
        /// The customer's id there.
        subject: String,
    },
}

/// The answer to a [`GroupQuery`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupAnswer {
    /// Deliveries and the group's next cursor.
    Deliveries(Vec<OutboxRecord>, Option<String>),
    /// Training rows.
    TrainingInput(Box<TrainingInput>),
    /// The claiming customer, if any.
    SubjectClaim(Option<String>),
    /// The question could not be answered here (e.g. not the leader).
    Refused(String),
}

/// One group's share of the recommender's population.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainingInput {
    /// (customer, rule).
    pub rules: Vec<(String, custos_raft::records::RuleRecord)>,
    /// (customer, entity).
    pub links: Vec<(String, String)>,
    /// (customer, `source/type`, count, last received ms).
    pub engagements: Vec<(String, String, u64, i64)>,
    /// Dismissals per template.
    pub dismissals: std::collections::HashMap<String, u32>,
}

/// An event POSTed to a node that does not lead its group, relayed to the leader with what
/// serving it needs (see [`crate::relay`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayedEvent {
    /// Its `content-type` header.
    pub content_type: Option<String>,
    /// Its `webhook-id` header.
    pub webhook_id: Option<String>,
    /// Its `webhook-timestamp` header.
    pub webhook_timestamp: Option<String>,
    /// Its `webhook-signature` header.
    pub webhook_signature: Option<String>,
    /// The body, as received.
    pub body: Vec<u8>,
}

/// The leader's answer to a relayed event: the HTTP response it would have given.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayedAnswer {
    /// Status code.
    pub status: u16,
    /// Headers (none hop-by-hop).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}
