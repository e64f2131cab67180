//! Portal state in data groups: sessions and OAuth linkings waiting for their callback.
//! (Accounts themselves are in the meta group, found by email: see `cluster`.)

use custos_api::oauth::{LINK_TTL_MS, MAX_PENDING_LINKS};

use super::{not_found, Tx};
use crate::codec;
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    pub(crate) fn begin_link(
        &mut self,
        state_hash: Vec<u8>,
        pending: PendingLink,
    ) -> Result<ChangeOutcome, StoreError> {
        // A linking ordered after the customer's erasure must not bring its id back.
        if !self.customer_exists(&pending.customer_id)? {
            return Ok(not_found("customer", &pending.customer_id));
        }
        // At most MAX_PENDING_LINKS per customer: the oldest (and any gone or expired) go.
        // Unused ones also go at their TTL (prune) and with retention.
        let at = pending.at_ms;
        let mut waiting: Vec<(i64, Vec<u8>, Vec<u8>)> = Vec::new();
        let prefix = self.pending_of_key(&pending.customer_id, &[]);
        for (k, v) in self.scan(&prefix)? {
            let started: i64 = codec::decode(&v)?;
            let hash = k[prefix.len()..].to_vec();
            let link_key = self.k(keys::PENDING_LINK, &hash);
            if started < at - LINK_TTL_MS || !self.exists(&link_key)? {
                self.delete(k);
                self.delete(link_key);
            } else {
                waiting.push((started, k, link_key));
            }
        }
        waiting.sort();
        let excess = (waiting.len() + 1).saturating_sub(MAX_PENDING_LINKS);
        for (_, k, link_key) in waiting.into_iter().take(excess) {
            self.delete(k);
            self.delete(link_key);
        }
        let of = self.pending_of_key(&pending.customer_id, &state_hash);
        self.put_aged(of, &at, at)?;
        self.put_aged(self.k(keys::PENDING_LINK, &state_hash), &pending, at)?;
        Ok(ChangeOutcome::Done)
    }

    /// The per-customer index entry of a pending linking (the prefix of all of the
    /// customer's, with an empty hash).
    pub(crate) fn pending_of_key(&self, customer: &str, state_hash: &[u8]) -> Vec<u8> {
        let mut k = self.k(keys::PENDING_OF, customer.as_bytes());
        k.push(0);
        k.extend_from_slice(state_hash);
        k
    }

    pub(crate) fn take_link(&mut self, state_hash: &[u8]) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::PENDING_LINK, state_hash);
        match self.get::<PendingLink>(&key)? {
            Some(p) => {
                self.delete(key);
                self.delete(self.pending_of_key(&p.customer_id, state_hash));
                Ok(ChangeOutcome::LinkTaken(p))
            }
            None => Ok(not_found("linking", "for this state")),
        }
    }

    pub(crate) fn put_session(
        &mut self,
        token_hash: Vec<u8>,
        mut session: SessionRecord,
    ) -> Result<ChangeOutcome, StoreError> {
        let Some(customer) =
            self.get::<CustomerRecord>(&keys::customer(self.space, &session.customer_id))?
        else {
            return Ok(not_found("customer", &session.customer_id));
        };
        // The session belongs to the customer's current epoch, whatever the node that signed
        // in read: a node that does not lead the group cannot read it linearizably, and a
        // session of an earlier epoch (after "sign out everywhere") would never work.
        session.epoch = customer.session_epoch;
        // Sessions expire long before retention; this removes the record itself.
        let at = session.created_ms;
        self.put_aged(self.k(keys::SESSION, &token_hash), &session, at)?;
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn end_sessions(&mut self, customer_id: &str) -> Result<ChangeOutcome, StoreError> {
        let key = keys::customer(self.space, customer_id);
        let Some(mut customer) = self.get::<CustomerRecord>(&key)? else {
            return Ok(not_found("customer", customer_id));
        };
        customer.session_epoch += 1;
        self.put(key, &customer)?;
        Ok(ChangeOutcome::Done)
    }
}
