//! Events (data groups): dedup, the authoritative link re-check, activity and the outbox.

use super::Tx;
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    /// Why an event routed to `customer` must not act for it, if it must not: the routing
    /// index is a hint, and this group decides whether the customer links that subject.
    /// The link is read first: a customer's links go when it is erased, so a link to the
    /// subject is enough (one read on the hot path, not two).
    fn stale_route(
        &self,
        customer: &str,
        event: &EventRecord,
    ) -> Result<Option<String>, StoreError> {
        match self.get::<LinkRecord>(&keys::link(self.space, customer, &event.source))? {
            Some(l) if l.subject == event.subject => Ok(None),
            _ if !self.exists(&keys::customer(self.space, customer))? => {
                Ok(Some("the customer no longer exists".into()))
            }
            _ => Ok(Some(format!(
                "routed by a stale index entry: the customer does not link this subject at {}",
                event.source
            ))),
        }
    }

    /// Leaves out the commands of rules deleted before this entry. The node that planned them
    /// read the rules from its cached profile, which may predate a deletion that the log put
    /// first (a deletion answered while the event waited in the proposer, or a deposed
    /// leader's plan forwarded to the new one); the customer was told the rule is gone, so it
    /// must not act. Rule ids are never reused and a rule is never edited in place, so
    /// "exists" is enough.
    fn drop_deleted_rules(&self, customer: &str, ingest: &mut Ingest) -> Result<(), StoreError> {
        let mut deleted = Vec::new();
        let mut i = 0;
        while i < ingest.commands.len() {
            let rule_id = &ingest.commands[i].rule_id;
            if self.exists(&keys::rule(self.space, customer, rule_id))? {
                i += 1;
            } else {
                deleted.push(ingest.commands.remove(i).rule_id);
            }
        }
        if let (Some(first), true) = (deleted.first(), ingest.commands.is_empty()) {
            // Bounded whatever the number of rules.
            let more = match deleted.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            ingest.ignored_reason.get_or_insert_with(|| {
                format!("rule {first}{more}: deleted before the event was recorded")
            });
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
                self.drop_deleted_rules(&customer, &mut ingest)?;
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
