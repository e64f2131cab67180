//! The intent worker: finishes operations spanning the meta group and a data group that a
//! call (or a crash) left half done.
//!
//! Every such operation records an intent in the customer's data group before its first
//! step (linking, sign-up) or as part of its one authoritative step (unlinking, erasure,
//! linking again as another subject). On each data group's leader this worker takes the
//! remaining steps, which are idempotent, and then ends the intent. Claims are left alone for
//! [`CLAIM_GRACE_MS`], the time the call that recorded them has to take them itself.

use std::sync::Arc;
use std::time::Duration;

use custos_api::types::unix_now_ms;
use custos_api::ErrorCode;
use custos_raft::records::{IntentRecord, IntentStep};
use custos_raft::{StateChange, META_GROUP};
use tokio::sync::watch;

use crate::core::{Core, Group};
use crate::error::ServiceError;
use crate::profile::{ProfileRequest, ProfileRouter};

/// How old a claim intent must be before the worker takes it over.
pub const CLAIM_GRACE_MS: i64 = 30_000;

/// Runs until shutdown.
pub async fn run(core: Arc<Core>, profiles: ProfileRouter, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        for g in core.groups() {
            if g.id == META_GROUP || !g.leads(core.node_id) {
                continue;
            }
            if let Err(e) = group_round(&core, &profiles, &g).await {
                tracing::debug!(group = g.id, error = %e, "intent round");
            }
        }
        tokio::select! {
            _ = core.wake.intents.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn group_round(core: &Core, profiles: &ProfileRouter, g: &Group) -> Result<(), ServiceError> {
    // Read as the leader, after a read index round: a leader elected a moment ago may not
    // have applied what its predecessor committed, and would take up again an intent an
    // unlink or an erasure there abandoned (a claim made again, for a customer who no longer
    // links the subject, kept for good).
    let intents = core.read_leader(g.id, |r| r.intents(256)).await?;
    // An erasure's last step, the release of the email, is what has the meta group scrubbed:
    // it waits for every release of that customer's subjects, or a subject released after
    // it (a meta election outlasting one step) would stay in the scrubbed group's files.
    let mut unreleased = std::collections::HashSet::new();
    let mut last_steps = Vec::new();
    for intent in intents {
        if let IntentStep::ReleaseEmail { customer_id, .. } = &intent.step {
            last_steps.push((customer_id.clone(), intent));
            continue;
        }
        let releasing = match &intent.step {
            IntentStep::ReleaseSubject { customer_id, .. } => Some(customer_id.clone()),
            _ => None,
        };
        if let Err(e) = take(core, profiles, g, intent).await {
            tracing::debug!(group = g.id, error = %e, "intent step failed; retried later");
            unreleased.extend(releasing);
        }
    }
    for (customer_id, intent) in last_steps {
        if unreleased.contains(&customer_id) {
            continue;
        }
        if let Err(e) = take(core, profiles, g, intent).await {
            tracing::debug!(group = g.id, error = %e, "intent step failed; retried later");
        }
    }
    Ok(())
}

fn refused(e: &ServiceError, codes: &[ErrorCode]) -> bool {
    matches!(e, ServiceError::Refused { code, .. } if codes.contains(code))
}

async fn take(
    core: &Core,
    profiles: &ProfileRouter,
    g: &Group,
    intent: IntentRecord,
) -> Result<(), ServiceError> {
    let age = unix_now_ms() - intent.at_ms;
    let end = StateChange::EndIntent {
        id: intent.id.clone(),
    };
    match intent.step.clone() {
        IntentStep::ReleaseSubject {
            customer_id,
            entity_id,
            subject,
            claim,
        } => {
            core.propose(
                META_GROUP,
                StateChange::ReleaseSubject {
                    entity_id,
                    subject,
                    customer_id,
                    claim,
                },
            )
            .await?;
            core.propose(g.id, end).await?;
        }
        IntentStep::ReleaseEmail { customer_id, email } => {
            core.propose(META_GROUP, StateChange::ReleaseEmail { email, customer_id })
                .await?;
            core.propose(g.id, end).await?;
        }
        IntentStep::ClaimSubject { customer_id, .. } if age > CLAIM_GRACE_MS => {
            // Through the customer's profile, so its cached links stay what is committed.
            match profiles
                .send(&customer_id, ProfileRequest::FinishClaim(intent))
                .await
            {
                Ok(_) => {
                    tracing::info!(customer = %customer_id, "a half-done linking was finished")
                }
                Err(e) if refused(&e, &[ErrorCode::Conflict]) => {
                    tracing::info!(customer = %customer_id, "a half-done linking was undone (subject taken)")
                }
                Err(e) if refused(&e, &[ErrorCode::NotFound]) => {
                    // The customer is gone: nothing to link, and the claim was released.
                    core.propose(g.id, end).await?;
                }
                Err(e) => return Err(e),
            }
        }
        IntentStep::ClaimEmail { account, customer } if age > CLAIM_GRACE_MS => {
            match core
                .propose(META_GROUP, StateChange::ClaimEmail(account))
                .await
            {
                Ok(_) => {
                    core.propose(
                        g.id,
                        StateChange::CreateCustomer {
                            customer,
                            intent: Some(intent.id),
                        },
                    )
                    .await?;
                    tracing::info!("a half-done sign-up was finished");
                }
                Err(e) if refused(&e, &[ErrorCode::Conflict]) => {
                    core.propose(g.id, end).await?;
                }
                Err(e) => return Err(e),
            }
        }
        IntentStep::ClaimSubject { .. } | IntentStep::ClaimEmail { .. } => {}
    }
    Ok(())
}
