//! Events (data groups): dedup, the authoritative link re-check, activity and the outbox.

use super::Tx;
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

/// How the customer withdrew a command since it was planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Withdrawn {
    /// Its rule was deleted.
    RuleDeleted,
    /// Its target was unlinked.
    Unlinked,
    /// Its target was linked again as another account.
    Relinked,
}

impl Tx<'_> {
    /// Why an event routed to `customer` must not act for it, if it must not: the routing
    /// index is a hint, and this group decides whether the customer links that subject.
    /// A customer's links go when it is erased, so its link to the subject is enough (one
    /// read on the hot path).
    fn stale_route(
        &self,
        customer: &str,
        event: &EventRecord,
    ) -> Result<Option<String>, StoreError> {
        // What the entity is told is what it is told of a subject nobody linked: the
        // customer's unlinking or erasure is not the entity's to learn.
        match self.get::<LinkRecord>(&keys::link(self.space, customer, &event.source))? {
            Some(l) if l.subject == event.subject => Ok(None),
            _ => Ok(Some(custos_api::types::unclaimed_reason(&event.source))),
        }
    }

    /// Whether the customer withdrew a command since it was planned: deleted its rule, or no
    /// longer links its target as the account it is addressed to (unlinked, or linked again
    /// as another account). Rule ids are never reused and a rule is never edited in place, so
    /// "exists" is enough. Two point reads.
    pub(crate) fn withdrawn(&self, c: &CommandRecord) -> Result<Option<Withdrawn>, StoreError> {
        if !self.exists(&keys::rule(self.space, &c.customer_id, &c.rule_id))? {
            return Ok(Some(Withdrawn::RuleDeleted));
        }
        Ok(
            match self.get::<LinkRecord>(&keys::link(self.space, &c.customer_id, &c.target))? {
                Some(l) if l.subject == c.subject => None,
                Some(_) => Some(Withdrawn::Relinked),
                None => Some(Withdrawn::Unlinked),
            },
        )
    }

    /// Leaves out the commands the customer withdrew before this entry ([`Tx::withdrawn`]).
    /// The node that planned them read the rules and links from its cached profile, which may
    /// predate a change the log put first (a change answered while the event waited in the
    /// proposer, or a deposed leader's plan forwarded to the new one); the customer was told,
    /// so it must not act.
    fn drop_withdrawn(&self, ingest: &mut Ingest) -> Result<(), StoreError> {
        let mut withdrawn: Vec<String> = Vec::new();
        let mut i = 0;
        while i < ingest.commands.len() {
            let c = &ingest.commands[i];
            let why = match self.withdrawn(c)? {
                None => {
                    i += 1;
                    continue;
                }
                Some(Withdrawn::RuleDeleted) => "deleted".to_owned(),
                Some(Withdrawn::Relinked) => format!("{} was linked as another account", c.target),
                Some(Withdrawn::Unlinked) => format!("{} was unlinked", c.target),
            };
            let c = ingest.commands.remove(i);
            withdrawn.push(format!(
                "rule {}: {why} before the event was recorded",
                c.rule_id
            ));
        }
        if let (Some(first), true) = (withdrawn.first(), ingest.commands.is_empty()) {
            // Bounded whatever the number of rules.
            let more = match withdrawn.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            ingest
                .ignored_reason
                .get_or_insert_with(|| format!("{first}{more}"));
        }
        Ok(())
    }

    pub(crate) fn ingest(&mut self, mut ingest: Ingest) -> Result<ChangeOutcome, StoreError> {
        let dedup_key = self.k2(keys::DEDUP, &ingest.event.source, &ingest.event.id);
        if let Some(first) = self.get::<DedupRecord>(&dedup_key)? {
            return Ok(ChangeOutcome::Ingested {
                duplicate: true,
                fate: first.fate,
                commands: first.commands,
                reason: first.reason,
            });
        }
        if let Some(customer) = ingest.customer_id.clone() {
            if let Some(why) = self.stale_route(&customer, &ingest.event)? {
                // Not this customer's event (any more, or not yet here): nothing of it goes
                // to its activity or engagement counts.
                ingest.commands.clear();
                ingest.rule_failures.clear();
                ingest.ignored_reason = Some(why);
                ingest.customer_id = None;
            } else {
                self.drop_withdrawn(&mut ingest)?;
            }
        }
        let fate = if ingest.commands.is_empty() {
            EventFate::Ignored
        } else {
            EventFate::Accepted
        };
        let command_ids: Vec<String> = ingest.commands.iter().map(|c| c.id.clone()).collect();
        // The sending entity learns whether its event acted, not why a customer's rules did
        // not: that names their rules, conditions and other entities (the customer's
        // activity has it).
        let told = match (&ingest.customer_id, fate) {
            (Some(_), EventFate::Ignored) => Some(custos_api::types::IGNORED_BY_RULES.to_owned()),
            _ => ingest.ignored_reason.clone(),
        };
        let at = ingest.at_ms;
        self.put_aged(
            dedup_key,
            &DedupRecord {
                customer_id: ingest.customer_id.clone(),
                fate,
                commands: command_ids.clone(),
                reason: told.clone(),
                at_ms: at,
            },
            at,
        )?;
        if let Some(customer) = &ingest.customer_id {
            // Engagement for recommendations: how often, and when last, this type arrived (a
            // merge operand: no read on the event's path).
            let key = self.k2(
                keys::ENGAGEMENT,
                customer,
                &keys::engagement_name(&ingest.event.source, &ingest.event.event_type),
            );
            self.add_count(key, at)?;
            // The event's line names the commands its rules made: one key, not one per line.
            // The event is not needed after it, so it moves into the line (no copy).
            let event = ingest.event;
            let reason = ingest.ignored_reason.clone();
            let line = if ingest.commands.is_empty() {
                ActivityRecord::EventReceived {
                    event,
                    fate,
                    reason,
                }
            } else {
                ActivityRecord::EventMatched {
                    event,
                    fate,
                    reason,
                    matched: ingest
                        .commands
                        .iter()
                        .map(|c| RuleMatch {
                            rule_id: c.rule_id.clone(),
                            command_id: c.id.clone(),
                            target: c.target.clone(),
                            command_type: c.command_type.clone(),
                        })
                        .collect(),
                }
            };
            self.activity(customer, at, &line)?;
            for failure in ingest.rule_failures {
                self.activity(customer, at, &ActivityRecord::RuleFailed(failure))?;
            }
        }
        for command in ingest.commands {
            self.schedule_new(at, command)?;
        }
        Ok(ChangeOutcome::Ingested {
            duplicate: false,
            fate,
            commands: command_ids,
            reason: told,
        })
    }
}
