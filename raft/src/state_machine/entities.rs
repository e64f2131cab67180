//! Entities (meta group): registration, changes, secret rotation.

use custos_api::ErrorCode;

use super::{not_found, Effect, Tx};
use crate::error::StoreError;
use crate::keys;
use crate::records::*;

impl Tx<'_> {
    pub(crate) fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        self.get(&self.k(keys::ENTITY, id.as_bytes()))
    }

    pub(crate) fn register_entity(
        &mut self,
        entity: EntityRecord,
    ) -> Result<ChangeOutcome, StoreError> {
        let key = self.k(keys::ENTITY, entity.id.as_bytes());
        if let Some(existing) = self.get::<EntityRecord>(&key)? {
            // The same registration proposed again (its answer was lost and the node retried
            // it): done, so the operator gets the secret sealed in it, not a conflict.
            if existing == entity {
                return Ok(ChangeOutcome::Done);
            }
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                format!("entity {} already exists", entity.id),
            ));
        }
        self.effects.push(Effect::EntityChanged(entity.id.clone()));
        self.put(key, &entity)?;
        Ok(ChangeOutcome::Done)
    }

    /// Disables the entity's endpoint if `command_url` is still its endpoint; else the 410
    /// came from an endpoint the entity has since moved away from: nothing changes, and the
    /// answer (a conflict) tells the delivery worker to try the new one.
    pub(crate) fn disable_gone_endpoint(
        &mut self,
        id: String,
        command_url: &str,
    ) -> Result<ChangeOutcome, StoreError> {
        let Some(mut entity) = self.entity(&id)? else {
            return Ok(not_found("entity", &id));
        };
        if entity.command_url != command_url {
            return Ok(ChangeOutcome::rejected(
                ErrorCode::Conflict,
                "the entity's endpoint moved since",
            ));
        }
        if !entity.endpoint_enabled {
            return Ok(ChangeOutcome::Done);
        }
        entity.endpoint_enabled = false;
        self.put(self.k(keys::ENTITY, id.as_bytes()), &entity)?;
        self.effects.push(Effect::EntityChanged(id));
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn update_entity(
        &mut self,
        id: String,
        name: Option<String>,
        command_url: Option<String>,
        endpoint_enabled: Option<bool>,
        sealed_client_secret: Option<Vec<u8>>,
    ) -> Result<ChangeOutcome, StoreError> {
        let Some(mut entity) = self.entity(&id)? else {
            return Ok(not_found("entity", &id));
        };
        if let Some(secret) = sealed_client_secret {
            let Some(oauth) = entity.oauth.as_mut() else {
                return Ok(ChangeOutcome::rejected(
                    ErrorCode::Conflict,
                    format!("{id} does not link through OAuth: it has no client secret"),
                ));
            };
            oauth.sealed_client_secret = Some(secret);
            // A public client given a secret authenticates from now on; the provider's
            // preference between basic and post was settled at registration.
            if oauth.client_auth == ClientAuth::None {
                oauth.client_auth = ClientAuth::Basic;
            }
        }
        if let Some(n) = name {
            entity.name = n;
        }
        if let Some(u) = command_url {
            entity.command_url = u;
            entity.endpoint_enabled = true;
        }
        if let Some(e) = endpoint_enabled {
            entity.endpoint_enabled = e;
        }
        self.put(self.k(keys::ENTITY, id.as_bytes()), &entity)?;
        self.effects.push(Effect::EntityChanged(id));
        Ok(ChangeOutcome::Done)
    }

    pub(crate) fn rotate_secret(
        &mut self,
        id: String,
        sealed_secret: Vec<u8>,
        previous_valid_until_ms: i64,
    ) -> Result<ChangeOutcome, StoreError> {
        let Some(mut entity) = self.entity(&id)? else {
            return Ok(not_found("entity", &id));
        };
        if entity.sealed_secret == sealed_secret {
            // The same rotation applied again (a proposal retried after its answer was lost):
            // the secret before it must stay valid for its grace period, not be replaced by
            // the new one.
            return Ok(ChangeOutcome::Done);
        }
        entity.sealed_previous_secret =
            Some(std::mem::replace(&mut entity.sealed_secret, sealed_secret));
        entity.previous_valid_until_ms = previous_valid_until_ms;
        self.put(self.k(keys::ENTITY, id.as_bytes()), &entity)?;
        self.effects.push(Effect::EntityChanged(id));
        Ok(ChangeOutcome::Done)
    }
}
