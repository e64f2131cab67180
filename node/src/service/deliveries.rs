//! Deliveries (operators): listed across every data group (each asked through its leader),
//! read and replayed in the group their command id names.

use custos_api::types::*;
use custos_api::ErrorCode;
use custos_raft::records::DeliveryState;
use custos_raft::StateChange;

use super::{check_id, check_page_limit, Vault};
use crate::cluster::wire::{GroupAnswer, GroupQuery};
use crate::error::ServiceError;
use crate::forward::slot_of_token;

/// A cursor over every group: `<group>.<the group's own cursor>`.
fn split_cursor(after: Option<&str>) -> Result<(u32, Option<String>), ServiceError> {
    let Some(c) = after else {
        return Ok((1, None));
    };
    let bad = || {
        ServiceError::invalid(
            "after",
            "not a cursor this vault issued (pass the previous page's `next`)",
        )
    };
    let (g, inner) = c.split_once('.').ok_or_else(bad)?;
    let g: u32 = g.parse().map_err(|_| bad())?;
    if g == 0 || (!inner.is_empty() && !custos_raft::reader::is_cursor(inner)) {
        return Err(bad());
    }
    Ok((g, (!inner.is_empty()).then(|| inner.to_owned())))
}

impl Vault {
    /// Deliveries in a status, paged by group, then command id.
    pub async fn deliveries(
        &self,
        status: DeliveryStatus,
        after: Option<String>,
        limit: usize,
    ) -> Result<DeliveryPage, ServiceError> {
        let limit = check_page_limit(limit)?;
        let state = match status {
            DeliveryStatus::Pending => DeliveryState::Pending,
            DeliveryStatus::Delivered => DeliveryState::Delivered,
            DeliveryStatus::Failed => DeliveryState::Failed,
            DeliveryStatus::Cancelled => DeliveryState::Cancelled,
        };
        let (mut group, mut cursor) = split_cursor(after.as_deref())?;
        let groups = self.core.data_groups()?;
        let last = groups.last().copied().unwrap_or(0);
        let mut items = Vec::new();
        let mut next = None;
        while group <= last && items.len() < limit {
            let q = GroupQuery::Deliveries {
                state,
                after: cursor.take(),
                limit: limit - items.len(),
            };
            let answer = crate::peer::ask_group(&self.core, group, q)
                .await
                .map_err(|e| {
                    ServiceError::refused(ErrorCode::Unavailable, format!("group {group}: {e}"))
                })?;
            let (found, more) = match answer {
                GroupAnswer::Deliveries(found, more) => (found, more),
                GroupAnswer::Refused(e) => {
                    return Err(ServiceError::refused(
                        ErrorCode::Unavailable,
                        format!("group {group}: {e}"),
                    ))
                }
                GroupAnswer::TrainingInput(_) | GroupAnswer::SubjectClaim(_) => {
                    return Err(ServiceError::Internal("unexpected answer".into()))
                }
            };
            items.extend(found.iter().map(|d| d.to_wire()));
            match more {
                Some(c) => {
                    next = Some(format!("{group}.{c}"));
                    break;
                }
                None => {
                    group += 1;
                    next = (group <= last).then(|| format!("{group}."));
                }
            }
        }
        if items.len() < limit && group > last {
            next = None;
        }
        Ok(DeliveryPage { items, next })
    }

    /// One delivery (served on the leader of the group its command id names).
    pub async fn delivery(&self, command_id: &str) -> Result<Delivery, ServiceError> {
        check_id("command id", command_id)?;
        let group = self.command_group(command_id)?;
        let owned = command_id.to_owned();
        self.core
            .read_leader(group, move |r| r.outbox(&owned))
            .await?
            .map(|d| d.to_wire())
            .ok_or_else(|| ServiceError::not_found("delivery", command_id))
    }

    /// Makes a failed delivery pending again (its attempts are kept).
    pub async fn replay(&self, command_id: &str) -> Result<Delivery, ServiceError> {
        check_id("command id", command_id)?;
        let group = self.command_group(command_id)?;
        self.core
            .propose(
                group,
                StateChange::Replay {
                    command_id: command_id.to_owned(),
                    at_ms: unix_now_ms(),
                },
            )
            .await?;
        self.delivery(command_id).await
    }

    fn command_group(&self, command_id: &str) -> Result<u32, ServiceError> {
        let slot = slot_of_token(command_id)
            .ok_or_else(|| ServiceError::not_found("delivery", command_id))?;
        self.core.group_of_slot(slot)
    }
}
