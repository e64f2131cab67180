//! The openraft type configuration shared by every group.

use crate::records::{ChangeOutcome, StateChange};

/// A node's id in the cluster.
pub type NodeId = u64;
/// A Raft group's id; the prefix of every key the group owns.
pub type GroupId = u32;

openraft::declare_raft_types!(
    /// Custos' Raft types: entries carry [`StateChange`]s and answer [`ChangeOutcome`]s.
    pub TypeConfig:
        D = StateChange,
        R = ChangeOutcome,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft instance of this configuration.
pub type Raft = openraft::Raft<TypeConfig>;
/// openraft's storage error for this configuration.
pub type StorageError = openraft::StorageError<NodeId>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// Stored membership.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
