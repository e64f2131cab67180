//! Retention (data groups): deleting what aged past the retention period, in bounded steps.

use super::Tx;
use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    pub(crate) fn prune(
        &mut self,
        before_ms: i64,
        now_ms: i64,
        limit: u32,
    ) -> Result<ChangeOutcome, StoreError> {
        // OAuth linkings past their TTL can never complete: they go now, not at retention.
        let mut n = 0u32;
        for (k, v) in self.scan(&self.p(keys::PENDING_LINK))? {
            if n >= limit {
                return Ok(ChangeOutcome::Pruned(n));
            }
            let pending: PendingLink = codec::decode(&v)?;
            if pending.at_ms < now_ms - custos_api::oauth::LINK_TTL_MS {
                let hash = k[keys::HEADER..].to_vec();
                self.delete(k);
                self.delete(self.pending_of_key(&pending.customer_id, &hash));
                n += 1;
            }
        }
        let lo = self.p(keys::EXPIRY);
        let hi = keys::expiry(self.space, before_ms, 0);
        let found = self.range(&lo, &hi, (limit - n) as usize)?;
        n += found.len() as u32;
        for (aging_key, targets) in found {
            self.delete(aging_key);
            for target in codec::decode_keys(&targets)? {
                self.expire(target)?;
            }
        }
        Ok(ChangeOutcome::Pruned(n))
    }

    /// Deletes one aged record, unless it is a delivery that is pending again.
    fn expire(&mut self, target: &[u8]) -> Result<(), StoreError> {
        // Targets were recorded with the space they were written in; re-base them on this
        // one (a snapshot install may have moved the group to its other space).
        let mut target = target.to_vec();
        if target.len() >= 4 {
            target[..4].copy_from_slice(&self.space.to_be_bytes());
        }
        if target.get(4) == Some(&keys::OUTBOX) {
            // A delivery replayed after it aged is pending again: keep it.
            match self.get::<OutboxRecord>(&target)? {
                Some(rec) if rec.state == DeliveryState::Pending => return Ok(()),
                Some(rec) => {
                    self.delete(self.k(keys::FAILED, rec.command.id.as_bytes()));
                }
                None => return Ok(()),
            }
        }
        self.delete(target);
        Ok(())
    }
}
