//! Deliveries (data groups): attempt results, retries, failures and replays.

use custos_api::limits::{MAX_ATTEMPTS_PER_COMMAND, MAX_ATTEMPT_ERROR_LEN};
use custos_api::ErrorCode;

use super::ingest::Withdrawn;
use super::{not_found, Tx};
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    fn fail(&mut self, command_id: &str) -> Result<(), StoreError> {
        self.put(self.k(keys::FAILED, command_id.as_bytes()), &())
    }

    /// Applies one attempt's result. A 410 fails the delivery here; disabling the entity's
    /// endpoint is the delivery worker's own step in the meta group.
    pub(crate) fn record_delivery(&mut self, update: DeliveryUpdate) -> Result<(), StoreError> {
        let command_id = match &update {
            DeliveryUpdate::Attempted { command_id, .. }
            | DeliveryUpdate::Cancelled { command_id, .. } => command_id.clone(),
        };
        let key = self.k(keys::OUTBOX, command_id.as_bytes());
        let Some(mut rec) = self.get::<OutboxRecord>(&key)? else {
            return Ok(());
        };
        // A late success on a delivery cancelled meanwhile (by an unlink, while the attempt was
        // sending) is recorded as any success: the entity did get the command. Any other late
        // result for a settled delivery is dropped.
        let late_success = rec.state == DeliveryState::Cancelled
            && matches!(
                update,
                DeliveryUpdate::Attempted {
                    next: AttemptNext::Delivered,
                    ..
                }
            );
        if rec.state != DeliveryState::Pending && !late_success {
            return Ok(());
        }
        if late_success {
            rec.reason = None;
        }
        if let DeliveryUpdate::Attempted { attempt, .. } = &update {
            // The same result again: the delivery worker proposes a batch again when its
            // proposal failed, and one that timed out may have been committed after all.
            if rec.attempts.last().is_some_and(|last| {
                (last.at_ms, last.duration_ms, last.status_code)
                    == (attempt.at_ms, attempt.duration_ms, attempt.status_code)
            }) {
                return Ok(());
            }
        }
        if let Some(due) = rec.next_due_ms.take() {
            self.delete(keys::due(self.space, due, &command_id));
        }
        let customer = rec.command.customer_id.clone();
        match update {
            DeliveryUpdate::Attempted {
                mut attempt, next, ..
            } => {
                if let Some(e) = attempt.error.as_mut() {
                    truncate_at_char(e, MAX_ATTEMPT_ERROR_LEN);
                }
                let at = attempt.at_ms;
                let status_code = attempt.status_code;
                let error = attempt.error.clone();
                rec.attempts.push(attempt);
                match next {
                    AttemptNext::Delivered => {
                        rec.state = DeliveryState::Delivered;
                        self.age(at, &key);
                    }
                    AttemptNext::RetryAt(due) => {
                        rec.next_due_ms = Some(due);
                        self.schedule(due, &command_id)?;
                    }
                    AttemptNext::Exhausted => {
                        rec.state = DeliveryState::Failed;
                        rec.reason = Some("retries exhausted".into());
                        self.fail(&command_id)?;
                        self.age(at, &key);
                    }
                    AttemptNext::Gone => {
                        rec.state = DeliveryState::Failed;
                        rec.reason = Some("endpoint answered 410 Gone; endpoint disabled".into());
                        self.fail(&command_id)?;
                        self.age(at, &key);
                    }
                }
                let attempt_no = rec.attempts.len() as u32;
                let state = rec.state;
                self.activity(
                    &customer,
                    at,
                    &ActivityRecord::DeliveryAttempt {
                        command_id,
                        attempt: attempt_no,
                        status_code,
                        error,
                        state,
                    },
                )?;
            }
            DeliveryUpdate::Cancelled {
                reason,
                at_ms,
                as_failed,
                ..
            } => {
                rec.state = if as_failed {
                    self.fail(&command_id)?;
                    DeliveryState::Failed
                } else {
                    DeliveryState::Cancelled
                };
                rec.reason = Some(reason.clone());
                self.age(at_ms, &key);
                let state = rec.state;
                self.activity(
                    &customer,
                    at_ms,
                    &ActivityRecord::DeliveryChanged {
                        command_id,
                        state,
                        reason,
                    },
                )?;
            }
        }
        if rec.state != DeliveryState::Pending {
            self.effects
                .push(super::Effect::DeliverySettled(rec.command.id.clone()));
        }
        self.put(key, &rec)
    }

    /// Cancels the customer's pending deliveries that `withdrawn` picks: what the customer
    /// withdrew (an unlinked entity, a deleted rule) must not go out on a later retry. Reads
    /// the group's due index (pending deliveries only), on a change customers make rarely.
    pub(crate) fn cancel_pending(
        &mut self,
        customer: &str,
        at_ms: i64,
        reason: &str,
        withdrawn: impl Fn(&CommandRecord) -> bool,
    ) -> Result<(), StoreError> {
        for (k, _) in self.scan(&self.p(keys::DUE))? {
            let Some(id) = keys::due_command(&k) else {
                continue;
            };
            let Some(rec) = self.get::<OutboxRecord>(&self.k(keys::OUTBOX, id.as_bytes()))? else {
                continue;
            };
            if rec.state == DeliveryState::Pending
                && rec.command.customer_id == customer
                && withdrawn(&rec.command)
            {
                self.record_delivery(DeliveryUpdate::Cancelled {
                    command_id: id.to_owned(),
                    reason: reason.to_owned(),
                    at_ms,
                    as_failed: false,
                })?;
            }
        }
        Ok(())
    }

    pub(crate) fn replay(
        &mut self,
        command_id: String,
        at_ms: i64,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::OUTBOX, command_id.as_bytes());
        let Some(mut rec) = self.get::<OutboxRecord>(&key)? else {
            return Ok(not_found("delivery", &command_id));
        };
        // A failed delivery is tried again; a pending one waiting for its next retry is tried
        // now instead (its retry schedule continues from there if this attempt fails too).
        let waiting_until = match rec.state {
            DeliveryState::Failed => None,
            DeliveryState::Pending => match rec.next_due_ms {
                Some(due) if due > at_ms => Some(due),
                _ => {
                    return Ok(ChangeOutcome::rejected(
                        ErrorCode::Conflict,
                        "already due: an attempt is under way",
                    ))
                }
            },
            DeliveryState::Delivered | DeliveryState::Cancelled => {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    "only failed or pending deliveries can be replayed",
                ))
            }
        };
        // Consent is checked again: a command is sent only while the customer keeps its rule
        // and links its target as the account it is addressed to (the relink and the rule's
        // deletion cancel pending ones; a failed one would otherwise go out on replay).
        let c = &rec.command;
        // Nor once it unlinked the entity the command's event came from.
        if !self.exists(&keys::link(self.space, &c.customer_id, &c.event_source))? {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                format!(
                    "the customer no longer links {}, whose event made it: its commands are \
                     not sent again",
                    c.event_source
                ),
            ));
        }
        if let Some(withdrawn) = self.withdrawn(c)? {
            let why = match withdrawn {
                Withdrawn::Unlinked => format!("the customer no longer links {}", c.target),
                Withdrawn::Relinked => cancelled_by_relink(&c.target),
                Withdrawn::RuleDeleted => format!("rule {} was deleted", c.rule_id),
            };
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                format!("{why}: its commands are not sent again"),
            ));
        }
        if rec.attempts.len() >= MAX_ATTEMPTS_PER_COMMAND {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                format!(
                    "attempted {} times, the most one command may be; fix the endpoint, and let \
                     the next event make a new command",
                    rec.attempts.len()
                ),
            ));
        }
        let reason = match waiting_until {
            Some(due) => {
                self.delete(keys::due(self.space, due, &command_id));
                "retried now by an operator"
            }
            None => {
                self.delete(self.k(keys::FAILED, command_id.as_bytes()));
                "replayed by an operator"
            }
        };
        rec.state = DeliveryState::Pending;
        rec.reason = None;
        rec.next_due_ms = Some(at_ms);
        self.schedule(at_ms, &command_id)?;
        let customer = rec.command.customer_id.clone();
        self.put(key, &rec)?;
        self.activity(
            &customer,
            at_ms,
            &ActivityRecord::DeliveryChanged {
                command_id,
                state: DeliveryState::Pending,
                reason: reason.into(),
            },
        )?;
        Ok(ChangeOutcome::Done)
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
