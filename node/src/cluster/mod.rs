//! Forming and keeping the cluster: the cluster secret and what is derived from it, a node's
//! id, starting a first node or joining one, and (in [`manager`]) the background work that
//! moves every group's replicas and leaders to where the placement wants them.
//!
//! A first node creates the meta group and every data group with itself as the only voter.
//! A joining node asks any member (over the peer port, proving the cluster secret) to register
//! it in the meta group; the meta group's leader then adds it as a learner of the meta group
//! and recomputes the placement, and each data group's leader moves its replicas accordingly.

pub mod manager;
pub mod status;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use custos_api::types::unix_now_ms;
use custos_api::ErrorCode;
use custos_raft::codec;
use custos_raft::network::Peers;
use custos_raft::records::{Assignment, ClusterSettings, NodeRecord, NodeState};
use custos_raft::types::{GroupId, NodeId};
use custos_raft::{ShardMap, StateChange, META_GROUP};
use hmac::{Hmac, Mac};
use openraft::BasicNode;
use sha2::Sha256;

use crate::config::Config;
use crate::core::Core;
use crate::error::ServiceError;
use crate::seal::KeyRing;
use crate::server::{write_private, NodeError};
use wire::{JoinReply, JoinRequest};

/// The cluster secret: from config (`CUSTOS_CLUSTER_SECRET`), else `<data_dir>/cluster-secret`,
/// else a new one kept there, but only for a node starting a cluster of its own: a node told
/// to join must be given the cluster's secret.
pub fn cluster_secret(config: &Config) -> Result<String, NodeError> {
    if let Some(s) = config.cluster_secret.as_ref().filter(|s| !s.is_empty()) {
        if s.len() < 16 {
            return Err(NodeError::Cluster(
                "the cluster secret must be at least 16 characters".into(),
            ));
        }
        return Ok(s.clone());
    }
    let path = config.data_dir.join("cluster-secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_owned();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    if !config.join.is_empty() {
        return Err(NodeError::Cluster(
            "to join a cluster, set CUSTOS_CLUSTER_SECRET to the cluster's secret (its first \
             node keeps it in <data-dir>/cluster-secret)"
                .into(),
        ));
    }
    let secret = crate::seal::generate_key();
    write_private(&path, secret.as_bytes())?;
    Ok(secret)
}

fn derive(secret: &str, purpose: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| {
        <Hmac<Sha256> as Mac>::new_from_slice(&[0u8; 32]).expect("32-byte key")
    });
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The token every peer request carries: derived from the cluster secret, so a node without
/// the secret (or with another one) is refused, and the secret itself never travels.
pub fn peer_token(secret: &str) -> String {
    hex::encode(derive(secret, "custos peer auth v1"))
}

/// The key that seals the cluster's token keys in the meta group.
fn settings_ring(secret: &str) -> Result<KeyRing, NodeError> {
    let key =
        base64::engine::general_purpose::STANDARD.encode(derive(secret, "custos settings v1"));
    Ok(KeyRing::new(&[key])?)
}

/// Seals the token key ring (base64 keys) for the meta group.
pub fn seal_token_keys(secret: &str, keys: &[String]) -> Result<Vec<u8>, NodeError> {
    let json = serde_json::to_string(keys).map_err(|e| NodeError::Cluster(e.to_string()))?;
    Ok(settings_ring(secret)?.seal("custos", "token-keys", &json)?)
}

/// Opens the token key ring stored in the meta group.
pub fn open_token_keys(secret: &str, sealed: &[u8]) -> Result<Vec<String>, NodeError> {
    let json = settings_ring(secret)?
        .open("custos", "token-keys", sealed)
        .map_err(|_| {
            NodeError::Cluster(
                "the cluster's token keys cannot be opened: this node's cluster secret differs"
                    .into(),
            )
        })?;
    serde_json::from_str(&json).map_err(|e| NodeError::Cluster(e.to_string()))
}

/// The node id kept in `<data_dir>/node-id`.
pub fn stored_node_id(data_dir: &Path) -> Option<NodeId> {
    std::fs::read_to_string(data_dir.join("node-id"))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|id| *id > 0)
}

/// Keeps the node id for restarts.
pub fn store_node_id(data_dir: &Path, id: NodeId) -> Result<(), NodeError> {
    write_private(&data_dir.join("node-id"), id.to_string().as_bytes())?;
    Ok(())
}

/// Asks the members in `join`, in turn, to register this node; answers its id. A member
/// answering 401 means the cluster secret differs: that is final, and said so.
pub async fn request_join(
    peers: &Peers,
    join: &[String],
    req: &JoinRequest,
    fresh: bool,
) -> Result<JoinReply, NodeError> {
    let body = codec::encode(req).map_err(|e| NodeError::Cluster(e.to_string()))?;
    // Said in the query, not the body: a member of an earlier build ignores it, and reads the
    // body as before.
    let path = if fresh {
        "/peer/join?fresh=true"
    } else {
        "/peer/join"
    };
    let mut last = String::from("no member answered");
    for round in 0..30u64 {
        for member in join {
            let sent = peers
                .post(member, path)
                .timeout(Duration::from_secs(10))
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => {
                    return Err(NodeError::Cluster(format!(
                        "{member} refused this node: its cluster secret is not the cluster's \
                         (set CUSTOS_CLUSTER_SECRET to the secret every member has)"
                    )))
                }
                Ok(r) if r.status().is_success() => {
                    let bytes = r
                        .bytes()
                        .await
                        .map_err(|e| NodeError::Cluster(e.to_string()))?;
                    let reply: Result<JoinReply, String> =
                        codec::decode(&bytes).map_err(|e| NodeError::Cluster(e.to_string()))?;
                    match reply {
                        Ok(reply) => return Ok(reply),
                        Err(e) if e.contains("was removed") || e.contains(LOST_STATE) => {
                            return Err(NodeError::Cluster(e))
                        }
                        Err(e) => last = format!("{member}: {e}"),
                    }
                }
                Ok(r) => last = format!("{member} answered {}", r.status()),
                Err(e) => last = format!("{member}: {e}"),
            }
        }
        tracing::info!(attempt = round + 1, error = %last, "joining: no member accepted yet");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(NodeError::Cluster(format!(
        "could not join the cluster: {last}"
    )))
}

/// What a refusal to take back a node that lost its state says (the joining node stops at it).
const LOST_STATE: &str = "holds no Raft state";

/// Registers a joining node (any member serves this; the change goes to the meta leader).
/// `fresh`: the node holds no Raft state. Under an id the cluster knows (pinned in its
/// configuration, or its `node-id` file kept while its database was lost), it must not come
/// back as a replica it no longer has: it would vote without the entries it acknowledged, and
/// a committed change could be lost. (A node without an id is checked the same way by
/// `register_node`, at its address.)
pub async fn accept_join(
    core: &Core,
    req: JoinRequest,
    fresh: bool,
) -> Result<JoinReply, ServiceError> {
    if req.peer_addr.is_empty() || req.peer_addr.len() > 256 || req.api_addr.len() > 256 {
        return Err(ServiceError::invalid("peer_addr", "1..=256 bytes"));
    }
    if let (true, Some(id)) = (fresh, req.node_id.filter(|id| *id != 0)) {
        // This member's replica of the meta group: the group reports are how every node learns
        // where replicas are (a guard against an operator's mistake, not a consensus).
        let holds = core
            .read(META_GROUP, move |r| {
                Ok(r.group_reports()?
                    .iter()
                    .any(|g| g.voters.contains(&id) || g.learners.contains(&id)))
            })
            .await?;
        if holds {
            return Err(ServiceError::refused(
                ErrorCode::Conflict,
                format!(
                    "node {id} holds replicas, and this node {LOST_STATE} (was its database \
                     lost?): it cannot rejoin as node {id}; remove node {id} (`custos cluster \
                     remove {id}`) and start this one with an empty data directory and no \
                     node_id once it is removed"
                ),
            ));
        }
    }
    let outcome = core
        .propose(
            META_GROUP,
            StateChange::RegisterNode(NodeRecord {
                id: req.node_id.unwrap_or(0),
                peer_addr: req.peer_addr,
                api_addr: req.api_addr,
                state: NodeState::Active,
                joined_ms: unix_now_ms(),
            }),
        )
        .await?;
    let custos_raft::ChangeOutcome::NodeRegistered(node_id) = outcome else {
        return Err(ServiceError::Internal(format!(
            "unexpected outcome {outcome:?}"
        )));
    };
    let settings = core.settings().await?;
    Ok(JoinReply {
        node_id,
        cluster_id: settings.cluster_id,
    })
}

/// Creates the cluster on its first node: the meta group and every data group with this
/// node as the only voter, then the settings, the node's record and the first placement.
pub async fn bootstrap(
    core: &Arc<Core>,
    config: &Config,
    secret: &str,
    api_addr: &str,
) -> Result<(), NodeError> {
    let meta = core.open_group(META_GROUP).await?;
    initialize(&meta.raft, sole_member(core, config)).await?;
    wait_leader(core, META_GROUP).await?;
    create_cluster(core, config, secret, api_addr).await
}

/// This node as the only member of a group.
fn sole_member(core: &Core, config: &Config) -> BTreeMap<NodeId, BasicNode> {
    BTreeMap::from([(
        core.node_id,
        BasicNode {
            addr: config.peer_address(),
        },
    )])
}

/// The rest of [`bootstrap`] once the meta group leads itself: the settings, this node's
/// record and the first placement, then every data group.
async fn create_cluster(
    core: &Arc<Core>,
    config: &Config,
    secret: &str,
    api_addr: &str,
) -> Result<(), NodeError> {
    let me = core.node_id;
    let addr = config.peer_address();
    let data_groups = config.cluster.data_groups;
    // A key of the cluster's own, whatever is configured: configured keys are the operator's
    // to retire, and a stored key always opens (see `ring_keys`).
    let token_keys = vec![crate::seal::generate_key()];
    let groups: BTreeMap<GroupId, Vec<NodeId>> = (1..=data_groups).map(|g| (g, vec![me])).collect();
    let settings = ClusterSettings {
        cluster_id: uuid::Uuid::now_v7().simple().to_string(),
        created_ms: unix_now_ms(),
        shard_map: ShardMap::initial(data_groups),
        sealed_token_keys: seal_token_keys(secret, &token_keys)?,
    };
    core.propose(
        META_GROUP,
        StateChange::InitCluster {
            settings,
            node: NodeRecord {
                id: me,
                peer_addr: addr,
                api_addr: api_addr.to_owned(),
                state: NodeState::Active,
                joined_ms: unix_now_ms(),
            },
            assignment: Assignment { epoch: 1, groups },
        },
    )
    .await?;
    initialize_data_groups(core, config, 1..=data_groups).await
}

/// Opens and initialises `groups` with this node as their only voter (each a no-op where done).
async fn initialize_data_groups(
    core: &Arc<Core>,
    config: &Config,
    groups: impl Iterator<Item = GroupId> + Clone,
) -> Result<(), NodeError> {
    for g in groups.clone() {
        let group = core.open_group(g).await?;
        initialize(&group.raft, sole_member(core, config)).await?;
    }
    for g in groups {
        wait_leader(core, g).await?;
    }
    Ok(())
}

/// Finishes a first start cut short (stopped, killed or crashed during [`bootstrap`]): the data
/// directory then held a meta group of one voter without the cluster's settings, or settings
/// with data groups never initialised, and every later start waited for settings that never
/// came or served groups without a leader. Only on a node that created its cluster alone and
/// was never joined: the meta group's only voter is this node, and once the settings exist the
/// cluster's only node is this one under the first placement (epoch 1), so no replica of any
/// group can exist anywhere else.
pub async fn resume_bootstrap(
    core: &Arc<Core>,
    config: &Config,
    secret: &str,
    api_addr: &str,
) -> Result<(), NodeError> {
    let me = core.node_id;
    let Some(meta) = core.group(META_GROUP) else {
        return Ok(());
    };
    // From the Raft state itself: the metrics may not have been reported yet.
    let alone = meta
        .raft
        .with_raft_state(move |st| {
            st.membership_state
                .effective()
                .membership()
                .voter_ids()
                .eq([me])
        })
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if !alone {
        return Ok(());
    }
    wait_leader(core, META_GROUP).await?;
    // Everything the log holds is applied before the state is read.
    meta.raft
        .ensure_linearizable()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if meta.reader.settings()?.is_none() {
        tracing::warn!("the first start stopped before the cluster was created; creating it now");
        return create_cluster(core, config, secret, api_addr).await;
    }
    let Some(assignment) = meta.reader.assignment()? else {
        return Ok(());
    };
    if assignment.epoch != 1 || meta.reader.nodes()?.iter().any(|n| n.id != me) {
        return Ok(());
    }
    let groups: Vec<GroupId> = assignment
        .groups
        .iter()
        .filter(|(_, voters)| voters.as_slice() == [me])
        .map(|(g, _)| *g)
        .collect();
    initialize_data_groups(core, config, groups.into_iter()).await
}

async fn initialize(
    raft: &custos_raft::Raft,
    members: BTreeMap<NodeId, BasicNode>,
) -> Result<(), NodeError> {
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if !initialized {
        raft.initialize(members)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
    }
    Ok(())
}

/// Waits until `group` has a leader (any node).
pub async fn wait_leader(core: &Core, group: GroupId) -> Result<(), NodeError> {
    let g = core
        .group(group)
        .ok_or_else(|| NodeError::Raft(format!("group {group} is not open")))?;
    g.raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await
        .map_err(|e| NodeError::Raft(format!("group {group} elected no leader: {e}")))?;
    Ok(())
}

/// Opens every group this node's storage holds (a restart).
pub async fn reopen(core: &Arc<Core>) -> Result<Vec<GroupId>, NodeError> {
    let stored = core.stored_groups()?;
    for g in &stored {
        core.open_group(*g).await?;
    }
    Ok(stored)
}

/// Checks the secret against the cluster's sealed settings and answers the token key ring
/// ([`ring_keys`]).
pub async fn token_keys(core: &Core, config: &Config, secret: &str) -> Result<KeyRing, NodeError> {
    let settings = core.settings().await?;
    let stored = open_token_keys(secret, &settings.sealed_token_keys)?;
    Ok(KeyRing::new(&ring_keys(
        &config.portal.token_keys,
        &stored,
    ))?)
}

/// The token keys a node seals and opens with: the configured ones (the first seals), then
/// the cluster's own, stored sealed in the meta group when it was created, which always open
/// (a key the cluster generated; a cluster created before 2026-12-07 with keys configured
/// stored those, and keeps opening with them).
/// Configuring keys on a cluster that generated its own (or listing a new one first) must not
/// make what was sealed before unreadable: every entity's signing and client secrets are
/// sealed too, and nothing seals them again until they are rotated.
pub fn ring_keys(configured: &[String], stored: &[String]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::with_capacity(configured.len() + stored.len());
    for k in configured.iter().chain(stored) {
        let k = k.trim();
        if !keys.iter().any(|held| held == k) {
            keys.push(k.to_owned());
        }
    }
    keys
}

/// The entities whose signing secret (or OAuth client secret) `ring` cannot open: sealed under
/// a token key since dropped from the configuration. Their events are answered 503 and their
/// commands are not sent until that key is configured again or the secrets are rotated.
pub fn unopenable_entities(
    ring: &KeyRing,
    entities: &[custos_raft::records::EntityRecord],
) -> Vec<String> {
    entities
        .iter()
        .filter(|e| {
            ring.open_signing_secret(&e.id, &e.sealed_secret).is_err()
                || e.oauth
                    .as_ref()
                    .and_then(|o| o.sealed_client_secret.as_deref())
                    .is_some_and(|s| ring.open_client_secret(&e.id, s).is_err())
        })
        .map(|e| e.id.clone())
        .collect()
}

/// Waits until the local meta replica holds the cluster's settings (a joining node, until
/// the meta leader has added it as a learner and caught it up).
pub async fn wait_settings(core: &Core, within: Duration) -> Result<(), NodeError> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(m) = core.meta() {
            if m.reader.settings()?.is_some() {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(NodeError::Cluster(
                "joined, but the meta group did not reach this node in time".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ids of `nodes` in a state.
pub fn ids_in(nodes: &[NodeRecord], states: &[NodeState]) -> BTreeSet<NodeId> {
    nodes
        .iter()
        .filter(|n| states.contains(&n.state))
        .map(|n| n.id)
        .collect()
}

/// Waits until this node's replica of the meta group has applied everything the meta leader
/// had applied when asked, then marks it caught up (`Core::meta_caught_up`). A customer is
/// told a subject is linked once the meta leader applied the claim; a node that started
/// behind would otherwise record that subject's events as nobody's. Asks until the leader
/// answers; the meta leader itself is caught up once a read index round passes.
pub async fn catch_up_meta(core: Arc<Core>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    const POLL: Duration = Duration::from_millis(100);
    let mut target = None;
    loop {
        if let Some(meta) = core.group(META_GROUP) {
            if target.is_none() {
                target = if meta.leads(core.node_id) {
                    core.ensure_leader(META_GROUP).await.ok().map(|()| 0)
                } else {
                    match core.leader_of(META_GROUP) {
                        Some((_, addr)) => status::ask(&core, &addr, false).await.and_then(|s| {
                            s.groups
                                .iter()
                                .find(|g| g.group == META_GROUP)
                                .map(|g| g.applied)
                        }),
                        None => None,
                    }
                };
            }
            let applied = meta.metrics().last_applied.map(|l| l.index).unwrap_or(0);
            if target.is_some_and(|t| applied >= t) {
                tracing::info!(
                    applied,
                    "meta group caught up: events of unlinked subjects are recorded"
                );
                core.set_meta_caught_up();
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_token_keys_seal_and_the_clusters_own_still_open() {
        let own = crate::seal::generate_key();
        let new = crate::seal::generate_key();
        let before = KeyRing::new(std::slice::from_ref(&own)).expect("ring");
        let sealed = before
            .seal_signing_secret("hotel", "whsec_x")
            .expect("seal");
        // An operator starts managing keys: the new one first, the cluster's own kept.
        let keys = ring_keys(&[format!(" {new}\n")], std::slice::from_ref(&own));
        assert_eq!(keys, [new.clone(), own.clone()]);
        let after = KeyRing::new(&keys).expect("ring");
        assert_eq!(
            after.open_signing_secret("hotel", &sealed).expect("open"),
            "whsec_x"
        );
        let resealed = after.seal_signing_secret("hotel", "whsec_y").expect("seal");
        let only_new = KeyRing::new(std::slice::from_ref(&new)).expect("ring");
        assert!(only_new.open_signing_secret("hotel", &resealed).is_ok());
        // Unconfigured, or configured with the cluster's own key: that key alone.
        let alone = std::slice::from_ref(&own);
        assert_eq!(ring_keys(&[], alone), alone);
        assert_eq!(ring_keys(alone, alone), alone);
    }
}
