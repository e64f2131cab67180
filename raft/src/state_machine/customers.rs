//! Customers (data groups): profiles, links, rules, dismissals, intents and erasure.

use custos_api::limits::{MAX_DISMISSALS_PER_CUSTOMER, MAX_RULES_PER_CUSTOMER};
use custos_api::ErrorCode;

use super::{not_found, Tx};
use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    pub(crate) fn customer_exists(&self, id: &str) -> Result<bool, StoreError> {
        self.exists(&keys::customer(self.space, id))
    }

    fn linked(&self, customer: &str, entity: &str) -> Result<bool, StoreError> {
        self.exists(&keys::link(self.space, customer, entity))
    }

    /// Ends `intent` if given: `Ok(false)` when it is no longer recorded (done or abandoned),
    /// so the change completing it must not happen.
    fn take_intent(&mut self, intent: Option<&str>) -> Result<bool, StoreError> {
        let Some(id) = intent else {
            return Ok(true);
        };
        Ok(self.remove_intent(id)?.is_some())
    }

    /// The index key of a linking's claim: `customer \0 entity \0 intent id`.
    fn claim_key(&self, customer_id: &str, entity_id: &str, intent_id: &str) -> Vec<u8> {
        let mut k = self.k2(keys::CLAIM_OF, customer_id, entity_id);
        k.push(0);
        k.extend_from_slice(intent_id.as_bytes());
        k
    }

    /// Deletes an intent (and its claim index entry); answers it if it was recorded.
    fn remove_intent(&mut self, id: &str) -> Result<Option<IntentRecord>, StoreError> {
        let key = self.k(keys::INTENT, id.as_bytes());
        let Some(intent) = self.get::<IntentRecord>(&key)? else {
            return Ok(None);
        };
        if let IntentStep::ClaimSubject { customer_id, link } = &intent.step {
            self.delete(self.claim_key(customer_id, &link.entity_id, id));
        }
        self.delete(key);
        Ok(Some(intent))
    }

    pub(crate) fn begin_intent(
        &mut self,
        intent: IntentRecord,
    ) -> Result<ChangeOutcome, StoreError> {
        if let IntentStep::ClaimSubject { customer_id, link } = &intent.step {
            // A linking of a customer erased meanwhile (its actor planned it before the
            // erasure's apply) would claim the subject for nobody and keep its id here.
            if !self.exists(&keys::customer(self.space, customer_id))? {
                return Ok(not_found("customer", customer_id));
            }
            let claim = self.claim_key(customer_id, &link.entity_id, &intent.id);
            self.put(claim, &())?;
        }
        let key = self.k(keys::INTENT, intent.id.as_bytes());
        self.put(key, &intent)?;
        self.effects.push(super::Effect::IntentAdded);
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn end_intent(&mut self, id: &str) -> Result<ChangeOutcome, StoreError> {
        let Some(intent) = self.remove_intent(id)? else {
            return Ok(ChangeOutcome::Done);
        };
        // An erased customer's last steps (the releases of its subjects and email) held them in
        // clear in this group: once one ends, the group is scrubbed again, so its snapshot
        // files stop holding them (the erasure's own scrub may have run before it ended).
        // (A sign-up that found its email taken ends a claim for a customer that never existed:
        // no erasure, and anyone could have every replica scrubbed with it.)
        let released = match &intent.step {
            IntentStep::ReleaseSubject { customer_id, .. }
            | IntentStep::ReleaseEmail { customer_id, .. } => Some(customer_id),
            IntentStep::ClaimSubject { .. } | IntentStep::ClaimEmail { .. } => None,
        };
        if let Some(customer_id) = released {
            if !self.exists(&keys::customer(self.space, customer_id))? {
                self.effects.push(super::Effect::Erased);
            }
        }
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn create_customer(
        &mut self,
        customer: CustomerRecord,
        intent: Option<String>,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = keys::customer(self.space, &customer.id);
        let existing = self.get::<CustomerRecord>(&key)?;
        // The same creation applied again (its answer was lost and the node proposed it
        // again, or the intent worker finished the sign-up first): done, so the caller gets
        // the customer and its token. A token is random per creation, so its hash tells.
        let same = existing
            .as_ref()
            .is_some_and(|c| c.token_hash == customer.token_hash);
        if !self.take_intent(intent.as_deref())? {
            return Ok(if same {
                ChangeOutcome::Done
            } else {
                not_found("sign-up", "in progress")
            });
        }
        if existing.is_some() {
            // Completing an intent twice is done; creating an id twice otherwise conflicts.
            return Ok(match intent {
                Some(_) => ChangeOutcome::Done,
                None if same => ChangeOutcome::Done,
                None => ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    format!("customer {} already exists", customer.id),
                ),
            });
        }
        self.put(key, &customer)?;
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn link(
        &mut self,
        customer_id: String,
        link: LinkRecord,
        intent: Option<String>,
    ) -> Result<ChangeOutcome, StoreError> {
        if !self.customer_exists(&customer_id)? {
            return Ok(not_found("customer", &customer_id));
        }
        let link_key = keys::link(self.space, &customer_id, &link.entity_id);
        if !self.take_intent(intent.as_deref())? {
            // The same linking applied again (its first proposal committed but the answer was
            // lost, or the intent worker finished it first) is done: "not found" would make the
            // caller release the claim the link now holds, and the customer's events would no
            // longer reach them.
            if self
                .get::<LinkRecord>(&link_key)?
                .is_some_and(|l| l.claim == link.claim && l.subject == link.subject)
            {
                return Ok(ChangeOutcome::Done);
            }
            return Ok(not_found("linking", "in progress"));
        }
        let at = link.linked_ms;
        if let Some(old) = self.get::<LinkRecord>(&link_key)? {
            if old.subject != link.subject {
                // Commands for the account linked before must not reach the one linked now.
                let reason = cancelled_by_relink(&link.entity_id);
                let entity = link.entity_id.as_str();
                self.cancel_pending(&customer_id, at, &reason, |c| {
                    c.target == entity && c.subject != link.subject
                })?;
            }
            // Linked again: the old link's claim goes (the new one holds its own).
            self.new_intent(
                at,
                IntentStep::ReleaseSubject {
                    customer_id: customer_id.clone(),
                    entity_id: old.entity_id,
                    subject: old.subject,
                    claim: old.claim,
                },
            )?;
        }
        // The latest linking wins: one begun earlier and still unfinished is abandoned, so
        // the intent worker cannot finish it over this one later.
        self.abandon_claims(&customer_id, Some(&link.entity_id), at)?;
        let entity_id = link.entity_id.clone();
        self.put(link_key, &link)?;
        self.effects.push(super::Effect::LinkChanged {
            customer_id: customer_id.clone(),
            entity_id: entity_id.clone(),
        });
        self.activity(&customer_id, at, &ActivityRecord::Linked { entity_id })?;
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn unlink(
        &mut self,
        customer_id: &str,
        entity_id: &str,
        at_ms: i64,
    ) -> Result<ChangeOutcome, StoreError> {
        // An unlink also cancels linkings of this entity still under way (a call that timed
        // out): what the customer asked last wins, and the intent worker must not link later.
        let abandoned = self.abandon_claims(customer_id, Some(entity_id), at_ms)?;
        let key = keys::link(self.space, customer_id, entity_id);
        let Some(link) = self.get::<LinkRecord>(&key)? else {
            return Ok(if abandoned > 0 {
                ChangeOutcome::Done
            } else {
                not_found("link", entity_id)
            });
        };
        self.delete(key);
        // Its commands waiting for a retry are cancelled now, not when their next attempt
        // finds no link: the customer may link the entity again before then. So are those made
        // from its events: the customer stopped the vault acting on what it sends, and what a
        // pending command carries came from it.
        let reason = cancelled_by_unlink(entity_id);
        self.cancel_pending(customer_id, at_ms, &reason, |c| {
            c.target == entity_id || c.event_source == entity_id
        })?;
        self.effects.push(super::Effect::LinkChanged {
            customer_id: customer_id.to_owned(),
            entity_id: entity_id.to_owned(),
        });
        self.new_intent(
            at_ms,
            IntentStep::ReleaseSubject {
                customer_id: customer_id.to_owned(),
                entity_id: entity_id.to_owned(),
                subject: link.subject,
                claim: link.claim,
            },
        )?;
        self.activity(
            customer_id,
            at_ms,
            &ActivityRecord::Unlinked {
                entity_id: entity_id.to_owned(),
            },
        )?;
        Ok(ChangeOutcome::Done)
    }

    /// Turns the customer's unfinished linkings (of `entity`, or of any entity) into releases
    /// of whatever they claimed; answers how many.
    fn abandon_claims(
        &mut self,
        customer_id: &str,
        entity: Option<&str>,
        at_ms: i64,
    ) -> Result<usize, StoreError> {
        // `claim_key` with an empty intent id is the prefix of that entity's entries.
        let prefix = match entity {
            Some(e) => self.claim_key(customer_id, e, ""),
            None => self.p2(keys::CLAIM_OF, customer_id),
        };
        let mut abandoned = 0;
        for (k, _) in self.scan(&prefix)? {
            // Every entry under the prefix goes: its linking is abandoned here, or already
            // gone. The intent id follows the entry's last NUL.
            let id = k
                .iter()
                .rposition(|b| *b == 0)
                .map(|at| String::from_utf8_lossy(&k[at + 1..]).into_owned());
            self.delete(k);
            let Some(intent_key) = id.map(|id| self.k(keys::INTENT, id.as_bytes())) else {
                continue;
            };
            // Only the linking the entry names, and only if it is this customer's of that entity.
            let Some(IntentRecord {
                id,
                step:
                    IntentStep::ClaimSubject {
                        customer_id: c,
                        link,
                    },
                ..
            }) = self.get::<IntentRecord>(&intent_key)?
            else {
                continue;
            };
            if c != customer_id || entity.is_some_and(|e| e != link.entity_id) {
                continue;
            }
            self.delete(intent_key);
            self.new_intent(
                at_ms,
                IntentStep::ReleaseSubject {
                    customer_id: c,
                    entity_id: link.entity_id,
                    subject: link.subject,
                    claim: id,
                },
            )?;
            abandoned += 1;
        }
        Ok(abandoned)
    }

    pub(crate) fn put_rule(
        &mut self,
        customer_id: &str,
        rule: RuleRecord,
    ) -> Result<ChangeOutcome, StoreError> {
        if !self.customer_exists(customer_id)? {
            return Ok(not_found("customer", customer_id));
        }
        for entity in [&rule.when_entity, &rule.then_entity] {
            if !self.linked(customer_id, entity)? {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::EntityNotLinked,
                    format!("entity {entity} is not linked"),
                ));
            }
        }
        let key = keys::rule(self.space, customer_id, &rule.id);
        if !self.exists(&key)?
            && self.count_prefix(&keys::profile_part(
                self.space,
                customer_id,
                keys::ProfilePart::Rule,
            ))? >= MAX_RULES_PER_CUSTOMER
        {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::LimitReached,
                format!("at most {MAX_RULES_PER_CUSTOMER} rules per customer"),
            ));
        }
        let at = rule.created_ms;
        let rule_id = rule.id.clone();
        self.put(key, &rule)?;
        self.activity(customer_id, at, &ActivityRecord::RuleSaved { rule_id })?;
        self.effects.push(super::Effect::RuleChanged {
            customer_id: customer_id.to_owned(),
        });
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn delete_rule(
        &mut self,
        customer_id: &str,
        rule_id: String,
        at_ms: i64,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = keys::rule(self.space, customer_id, &rule_id);
        if !self.exists(&key)? {
            return Ok(not_found("rule", &rule_id));
        }
        self.delete(key);
        // Its commands waiting for a retry are not sent: the customer withdrew the rule.
        let reason = format!("the customer deleted rule {rule_id}");
        self.cancel_pending(customer_id, at_ms, &reason, |c| c.rule_id == rule_id)?;
        self.activity(customer_id, at_ms, &ActivityRecord::RuleDeleted { rule_id })?;
        self.effects.push(super::Effect::RuleChanged {
            customer_id: customer_id.to_owned(),
        });
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn dismiss(
        &mut self,
        customer_id: &str,
        template: &str,
    ) -> Result<ChangeOutcome, StoreError> {
        if !self.customer_exists(customer_id)? {
            return Ok(not_found("customer", customer_id));
        }
        let key = self.k2(keys::DISMISSED, customer_id, template);
        if !self.exists(&key)?
            && self.count_prefix(&self.p2(keys::DISMISSED, customer_id))?
                >= MAX_DISMISSALS_PER_CUSTOMER
        {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::LimitReached,
                format!(
                    "at most {MAX_DISMISSALS_PER_CUSTOMER} dismissed recommendations per customer"
                ),
            ));
        }
        self.put(key, &())?;
        Ok(ChangeOutcome::Done)
    }

    /// Deletes every key of the customer, and records the intents that release its subjects
    /// and email in the meta group.
    pub(crate) fn erase_customer(
        &mut self,
        customer_id: &str,
    ) -> Result<ChangeOutcome, StoreError> {
        let customer_key = keys::customer(self.space, customer_id);
        let Some(customer) = self.get::<CustomerRecord>(&customer_key)? else {
            return Ok(not_found("customer", customer_id));
        };
        // The releases need no grace period: the intent worker takes them at once.
        let now = 0;
        for (k, v) in self.scan(&keys::profile_part(
            self.space,
            customer_id,
            keys::ProfilePart::Link,
        ))? {
            let link: LinkRecord = codec::decode(&v)?;
            self.delete(k);
            self.new_intent(
                now,
                IntentStep::ReleaseSubject {
                    customer_id: customer_id.to_owned(),
                    entity_id: link.entity_id,
                    subject: link.subject,
                    claim: link.claim,
                },
            )?;
        }
        // The customer's events and commands are found from its own activity, not by reading
        // every event and command the group holds: an event's dedup record and a settled
        // delivery age with the activity line written with them; only pending deliveries can
        // outlive their lines (found below, in the due index).
        // Read one line at a time, keeping only what each names (its key, its commands, its
        // event's source and id), not the lines: a customer's activity can hold gigabytes of
        // event bodies, and every replica applies this in one batch.
        let (mut lines, mut commands, mut events) = (Vec::new(), Vec::new(), Vec::new());
        self.scan_picked(&self.p2(keys::ACTIVITY, customer_id), |k, v| {
            let line: ActivityRecord = codec::decode(v)?;
            lines.push(k.to_vec());
            commands.extend(
                line.commands_made()
                    .into_iter()
                    .chain(line.command_settled())
                    .map(str::to_owned),
            );
            if let Some(event) = line.event() {
                events.push((event.source.clone(), event.id.clone()));
            }
            Ok(false)
        })?;
        let mut forgotten = std::collections::HashSet::new();
        for command_id in commands {
            if forgotten.insert(command_id.clone()) {
                self.forget_command(&command_id)?;
            }
        }
        for (source, id) in events {
            // Deduplication goes on without saying whose event it was.
            let dedup = self.k2(keys::DEDUP, &source, &id);
            if let Some(mut rec) = self.get::<DedupRecord>(&dedup)? {
                if rec.customer_id.as_deref() == Some(customer_id) {
                    rec.customer_id = None;
                    self.put(dedup, &rec)?;
                }
            }
        }
        for k in lines {
            self.delete(k);
        }
        let rules = keys::profile_part(self.space, customer_id, keys::ProfilePart::Rule);
        for prefix in [
            rules,
            self.p2(keys::ENGAGEMENT, customer_id),
            self.p2(keys::DISMISSED, customer_id),
        ] {
            for (k, _) in self.scan(&prefix)? {
                self.delete(k);
            }
        }
        // Sessions, pending linkings and pending deliveries are not under the customer's
        // prefixes: their ranges are bounded (by their TTLs, and by what is undelivered), and
        // read one record at a time, keeping only the customer's.
        for (k, _) in self.scan_picked(&self.p(keys::SESSION), |_, v| {
            Ok(codec::decode::<SessionRecord>(v)?.customer_id == customer_id)
        })? {
            self.delete(k);
        }
        for (k, _) in self.scan_picked(&self.p(keys::PENDING_LINK), |_, v| {
            Ok(codec::decode::<PendingLink>(v)?.customer_id == customer_id)
        })? {
            self.delete(k);
        }
        for (k, _) in self.scan(&self.pending_of_key(customer_id, &[]))? {
            self.delete(k);
        }
        for (k, _) in self.scan_picked(&self.p(keys::DUE), |_, _| Ok(true))? {
            let Some(id) = keys::due_command(&k) else {
                continue;
            };
            let outbox = self.k(keys::OUTBOX, id.as_bytes());
            if self
                .get::<OutboxRecord>(&outbox)?
                .is_some_and(|r| r.command.customer_id == customer_id)
            {
                self.forget_command(id)?;
            }
        }
        // Claims under way become releases: the claim may already have been made.
        self.abandon_claims(customer_id, None, now)?;
        // Retention entries of deleted records go. What this log entry aged so far is written
        // first, so it is cleaned with the rest.
        self.flush_aging();
        let id = customer_id.as_bytes();
        let names = |t: &[u8]| keys::names_customer(t, id);
        let listing = self.scan_picked(&self.p(keys::EXPIRY), |_, v| {
            Ok(codec::decode_keys(v)?.into_iter().any(names))
        })?;
        for (k, targets) in listing {
            let listed = codec::decode_keys(&targets)?;
            let kept: Vec<&[u8]> = listed.iter().copied().filter(|t| !names(t)).collect();
            if kept.is_empty() {
                self.delete(k);
            } else if kept.len() < listed.len() {
                // An event's entry also lists its dedup key, which outlives the customer.
                self.put_raw(k, codec::encode_keys(kept));
            }
        }
        // Last, and also without an email (then empty): it tells the meta group an erasure
        // released what it held there, which has it scrubbed.
        self.new_intent(
            now,
            IntentStep::ReleaseEmail {
                customer_id: customer_id.to_owned(),
                email: customer.email.unwrap_or_default(),
            },
        )?;
        self.delete(customer_key);
        self.effects.push(super::Effect::Erased);
        Ok(ChangeOutcome::Done)
    }

    /// Deletes a command's outbox record and its index entries.
    fn forget_command(&mut self, command_id: &str) -> Result<(), StoreError> {
        let outbox = self.k(keys::OUTBOX, command_id.as_bytes());
        if let Some(rec) = self.get::<OutboxRecord>(&outbox)? {
            if let Some(due) = rec.next_due_ms {
                self.delete(keys::due(self.space, due, command_id));
            }
        }
        self.delete(self.k(keys::FAILED, command_id.as_bytes()));
        self.delete(outbox);
        Ok(())
    }
}
