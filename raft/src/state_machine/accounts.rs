//! Portal state in data groups: sessions and OAuth linkings waiting for their callback.
//! (Accounts themselves are in the meta group, found by email: see `cluster`.)

use super::{not_found, Tx};
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    pub(crate) fn begin_link(
        &mut self,
        state_hash: Vec<u8>,
        pending: PendingLink,
    ) -> Result<ChangeOutcome, StoreError> {
        // Unused ones are removed with the other records past retention.
        let at = pending.at_ms;
        self.put_aged(self.k(keys::PENDING_LINK, &state_hash), &pending, at)?;
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn take_link(&mut self, state_hash: &[u8]) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::PENDING_LINK, state_hash);
        match self.get::<PendingLink>(&key)? {
            Some(p) => {
                self.delete(key);
                Ok(ChangeOutcome::LinkTaken(p))
            }
            None => Ok(not_found("linking", "for this state")),
        }
    }

    pub(crate) fn put_session(
        &mut self,
        token_hash: Vec<u8>,
        session: SessionRecord,
    ) -> Result<ChangeOutcome, StoreError> {
        if !self.exists(&self.k(keys::CUSTOMER, session.customer_id.as_bytes()))? {
            return Ok(not_found("customer", &session.customer_id));
        }
        // Sessions expire long before retention; this removes the record itself.
        let at = session.created_ms;
        self.put_aged(self.k(keys::SESSION, &token_hash), &session, at)?;
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn end_sessions(&mut self, customer_id: &str) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::CUSTOMER, customer_id.as_bytes());
        let Some(mut customer) = self.get::<CustomerRecord>(&key)? else {
            return Ok(not_found("customer", customer_id));
        };
        customer.session_epoch += 1;
        self.put(key, &customer)?;
        Ok(ChangeOutcome::Done)
    }
}
