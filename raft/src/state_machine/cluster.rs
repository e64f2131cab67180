//! The meta group's records: nodes, settings, placement, group reports, the routing index
//! (entity, subject) -> customer, portal accounts by email, and the recommendation model.

use custos_api::ErrorCode;

use super::{not_found, Effect, Tx};
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    pub(crate) fn init_cluster(
        &mut self,
        settings: ClusterSettings,
        node: NodeRecord,
        assignment: Assignment,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = self.p(keys::SETTINGS);
        if self.exists(&key)? {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                "the cluster is already initialised",
            ));
        }
        self.put(key, &settings)?;
        self.put(self.k(keys::NODE, &node.id.to_be_bytes()), &node)?;
        self.put(self.p(keys::ASSIGNMENT), &assignment)?;
        self.effects.push(Effect::ClusterChanged);
        Ok(ChangeOutcome::NodeRegistered(node.id))
    }

    pub(crate) fn register_node(
        &mut self,
        mut node: NodeRecord,
    ) -> Result<ChangeOutcome, StoreError> {
        let nodes: Vec<NodeRecord> = self
            .scan(&self.p(keys::NODE))?
            .into_iter()
            .map(|(_, v)| crate::codec::decode(&v))
            .collect::<Result<_, _>>()?;
        let known = if node.id != 0 {
            nodes.iter().find(|n| n.id == node.id)
        } else {
            // A node without its id file at a registered address: one that crashed before it
            // kept the id it was given is that node; one whose data directory was lost must
            // not come back under the id of a replica it no longer has, since it would vote
            // without the entries it acknowledged (a committed change could be lost).
            let same = nodes
                .iter()
                .find(|n| n.peer_addr == node.peer_addr && n.state != NodeState::Removed);
            if let Some(n) = same {
                if self.holds_replicas(n.id)? {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::Conflict,
                        format!(
                            "node {} at {} holds replicas, and this node has no node id in its \
                             data directory (was it lost?): it cannot rejoin as node {}; \
                             remove node {} (`custos cluster remove {}`) and start this one \
                             once it is removed, or start it at another peer address",
                            n.id, n.peer_addr, n.id, n.id, n.id
                        ),
                    ));
                }
            }
            same
        };
        match known {
            Some(n) if n.state == NodeState::Removed => {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    format!(
                        "node {} was removed from the cluster; start it with a new data directory",
                        n.id
                    ),
                ))
            }
            Some(n) => {
                node.id = n.id;
                node.joined_ms = n.joined_ms;
                node.state = n.state;
            }
            None => {
                if node.id == 0 {
                    node.id = nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
                }
                node.state = NodeState::Active;
            }
        }
        if let Some(other) = nodes.iter().find(|n| {
            n.id != node.id && n.peer_addr == node.peer_addr && n.state != NodeState::Removed
        }) {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                format!(
                    "node {} already serves peer address {}",
                    other.id, node.peer_addr
                ),
            ));
        }
        let id = node.id;
        self.put(self.k(keys::NODE, &id.to_be_bytes()), &node)?;
        self.effects.push(Effect::ClusterChanged);
        Ok(ChangeOutcome::NodeRegistered(id))
    }

    /// Whether the latest reports of the groups (the meta group's included) name `node` as a
    /// voter or learner.
    fn holds_replicas(&self, node: u64) -> Result<bool, StoreError> {
        for (_, v) in self.scan(&self.p(keys::GROUP_REPORT))? {
            let r: GroupReport = crate::codec::decode(&v)?;
            if r.voters.contains(&node) || r.learners.contains(&node) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub(crate) fn set_node_state(
        &mut self,
        id: u64,
        state: NodeState,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::NODE, &id.to_be_bytes());
        let Some(mut node) = self.get::<NodeRecord>(&key)? else {
            return Ok(not_found("node", &id.to_string()));
        };
        if node.state == NodeState::Removed && state != NodeState::Removed {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                format!("node {id} was removed"),
            ));
        }
        if node.state == NodeState::Active && state != NodeState::Active {
            // Checked here, in the log's order: two removals sent through two nodes at once
            // each pass a check made on a replica before the other is applied.
            let mut others_active = 0;
            for (_, v) in self.scan(&self.p(keys::NODE))? {
                let other: NodeRecord = crate::codec::decode(&v)?;
                if other.id != id && other.state == NodeState::Active {
                    others_active += 1;
                }
            }
            if others_active == 0 {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    "the last active node cannot be removed",
                ));
            }
        }
        node.state = state;
        self.put(key, &node)?;
        self.effects.push(Effect::ClusterChanged);
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn set_assignment(&mut self, a: Assignment) -> Result<ChangeOutcome, StoreError> {
        let key = self.p(keys::ASSIGNMENT);
        if let Some(current) = self.get::<Assignment>(&key)? {
            if current.epoch >= a.epoch {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    "a newer assignment is stored",
                ));
            }
        }
        self.put(key, &a)?;
        self.effects.push(Effect::ClusterChanged);
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn report_group(&mut self, r: GroupReport) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::GROUP_REPORT, &r.group.to_be_bytes());
        if let Some(current) = self.get::<GroupReport>(&key)? {
            // A deposed leader's late report never overwrites its successor's.
            if current.term > r.term {
                return Ok(ChangeOutcome::Done);
            }
        }
        self.put(key, &r)?;
        self.effects.push(Effect::ClusterChanged);
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn claim_subject(
        &mut self,
        entity_id: &str,
        subject: &str,
        customer_id: &str,
        claim: &str,
    ) -> Result<ChangeOutcome, StoreError> {
        if !self.exists(&self.k(keys::ENTITY, entity_id.as_bytes()))? {
            return Ok(not_found("entity", entity_id));
        }
        let key = self.k2(keys::SUBJECT, entity_id, subject);
        let mut held = self.get::<SubjectClaim>(&key)?.unwrap_or_default();
        if !held.claims.is_empty() && held.customer_id != customer_id {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                "that subject is linked to another customer at this entity",
            ));
        }
        if !held.claims.iter().any(|c| c == claim) {
            held.customer_id = customer_id.to_owned();
            held.claims.push(claim.to_owned());
            self.put(key, &held)?;
            self.subject_changed(entity_id, subject);
        }
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn release_subject(
        &mut self,
        entity_id: &str,
        subject: &str,
        customer_id: &str,
        claim: &str,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = self.k2(keys::SUBJECT, entity_id, subject);
        let Some(mut held) = self.get::<SubjectClaim>(&key)? else {
            return Ok(ChangeOutcome::Done);
        };
        if held.customer_id == customer_id {
            held.claims.retain(|c| c != claim);
            if held.claims.is_empty() {
                self.delete(key);
                self.subject_changed(entity_id, subject);
            } else {
                self.put(key, &held)?;
            }
        }
        Ok(ChangeOutcome::Done)
    }

    /// Tells the node's route cache that this subject's claim changed.
    fn subject_changed(&mut self, entity_id: &str, subject: &str) {
        self.effects.push(Effect::SubjectChanged {
            entity_id: entity_id.to_owned(),
            subject: subject.to_owned(),
        });
    }

    pub(crate) fn claim_email(
        &mut self,
        account: AccountRecord,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::ACCOUNT, account.email.as_bytes());
        match self.get::<AccountRecord>(&key)? {
            Some(a) if a.customer_id != account.customer_id => Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                "an account with this email exists",
            )),
            _ => {
                self.put(key, &account)?;
                Ok(ChangeOutcome::Done)
            }
        }
    }

    pub(crate) fn release_email(
        &mut self,
        email: &str,
        customer_id: &str,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::ACCOUNT, email.as_bytes());
        if self
            .get::<AccountRecord>(&key)?
            .is_some_and(|a| a.customer_id == customer_id)
        {
            self.delete(key);
        }
        // An erasure's last step in the meta group, with or without an email (a customer
        // created through the API has none): the log still holds what it released, the email
        // and the subject claims, until the scrubber rewrites it.
        self.effects.push(Effect::Erased);
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn put_model(&mut self, model: ModelRecord) -> Result<ChangeOutcome, StoreError> {
        let key = self.p(keys::MODEL);
        if let Some(current) = self.get::<ModelRecord>(&key)? {
            if current.version >= model.version {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    "a newer model is already stored",
                ));
            }
        }
        self.put(key, &model)?;
        self.effects.push(Effect::ModelChanged);
        Ok(ChangeOutcome::Done)
    }
}
