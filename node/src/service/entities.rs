//! Entities (operators): registration with a signing secret, changes, secret rotation. They
//! live in the meta group, so every node verifies any entity's events from its own replica.

use custos_api::limits::{is_valid_id, MAX_SCHEMA_BYTES, MAX_TYPES_PER_ENTITY};
use custos_api::types::*;
use custos_api::webhook::Secret;
use custos_api::ErrorCode;
use custos_raft::records::{EntityRecord, OAuthRecord, TypeRecord};
use custos_raft::{StateChange, META_GROUP};

use super::{check_id, check_name, check_outbound_url, check_url, Vault};
use crate::core::compile_schema;
use crate::error::ServiceError;
use crate::outbound::Outbound;

impl Vault {
    /// Registers an entity and issues its signing secret.
    pub async fn register_entity(&self, req: RegisterEntity) -> Result<Entity, ServiceError> {
        validate_entity(&req, &self.core.outbound)?;
        let now = unix_now_ms();
        let types = |ts: &[TypeSpec]| {
            ts.iter()
                .map(|t| TypeRecord {
                    name: t.type_name.clone(),
                    schema_json: t.schema.as_ref().map(|s| s.to_string()),
                })
                .collect()
        };
        let secret = Secret::generate().encode();
        let sealed_secret = self
            .key_ring()
            .await?
            .seal_signing_secret(&req.id, &secret)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let record = EntityRecord {
            id: req.id,
            name: req.name,
            command_url: req.command_url,
            endpoint_enabled: true,
            event_types: types(&req.event_types),
            command_types: types(&req.command_types),
            sealed_secret,
            sealed_previous_secret: None,
            previous_valid_until_ms: 0,
            created_ms: now,
            oauth: req.oauth.map(|o| OAuthRecord {
                authorize_url: o.authorize_url,
                token_url: o.token_url,
                client_id: o.client_id,
                revoke_url: o.revoke_url,
            }),
        };
        self.core
            .propose(META_GROUP, StateChange::RegisterEntity(record.clone()))
            .await?;
        let mut wire = record.to_wire();
        wire.secret = Some(secret);
        Ok(wire)
    }

    /// Changes an entity's name or endpoint.
    pub async fn update_entity(&self, id: &str, req: UpdateEntity) -> Result<Entity, ServiceError> {
        if let Some(n) = &req.name {
            check_name("name", n)?;
        }
        if let Some(u) = &req.command_url {
            check_outbound_url(&self.core.outbound, "command_url", u)?;
        }
        self.core
            .propose(
                META_GROUP,
                StateChange::UpdateEntity {
                    id: id.to_owned(),
                    name: req.name,
                    command_url: req.command_url,
                    endpoint_enabled: req.endpoint_enabled,
                },
            )
            .await?;
        self.entity(id).await
    }

    /// Issues a new secret; the old one verifies events for the grace period.
    pub async fn rotate_secret(&self, id: &str) -> Result<Entity, ServiceError> {
        let grace_ms = (self.core.config.secret_grace_hours * 3_600_000.0) as i64;
        check_id("entity id", id)?;
        let secret = Secret::generate().encode();
        let sealed_secret = self
            .key_ring()
            .await?
            .seal_signing_secret(id, &secret)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.core
            .propose(
                META_GROUP,
                StateChange::RotateSecret {
                    id: id.to_owned(),
                    sealed_secret,
                    previous_valid_until_ms: unix_now_ms() + grace_ms,
                },
            )
            .await?;
        let mut e = self.entity(id).await?;
        e.secret = Some(secret);
        Ok(e)
    }

    /// Every entity.
    pub async fn entities(&self) -> Result<Vec<Entity>, ServiceError> {
        let list = self.core.read_meta(|r| r.entities()).await?;
        Ok(list.iter().map(|e| e.to_wire()).collect())
    }

    /// One entity.
    pub async fn entity(&self, id: &str) -> Result<Entity, ServiceError> {
        let owned = id.to_owned();
        self.core
            .read_meta(move |r| r.entity(&owned))
            .await?
            .map(|e| e.to_wire())
            .ok_or_else(|| ServiceError::not_found("entity", id))
    }
}

fn validate_entity(req: &RegisterEntity, outbound: &Outbound) -> Result<(), ServiceError> {
    check_id("id", &req.id)?;
    check_name("name", &req.name)?;
    check_outbound_url(outbound, "command_url", &req.command_url)?;
    if let Some(o) = &req.oauth {
        // The customer's browser opens the authorize URL; the vault requests the other two.
        check_url("oauth.authorize_url", &o.authorize_url)?;
        check_outbound_url(outbound, "oauth.token_url", &o.token_url)?;
        if let Some(r) = &o.revoke_url {
            check_outbound_url(outbound, "oauth.revoke_url", r)?;
        }
        if o.client_id.is_empty()
            || o.client_id.len() > 256
            || !o.client_id.bytes().all(|b| (0x20..=0x7e).contains(&b))
        {
            return Err(ServiceError::invalid(
                "oauth.client_id",
                "must be 1..=256 printable ASCII characters",
            ));
        }
    }
    for (field, types) in [
        ("event_types", &req.event_types),
        ("command_types", &req.command_types),
    ] {
        if types.len() > MAX_TYPES_PER_ENTITY {
            return Err(ServiceError::invalid(
                field,
                format!("at most {MAX_TYPES_PER_ENTITY}"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for t in types {
            if !is_valid_id(&t.type_name) {
                return Err(ServiceError::invalid(
                    field,
                    format!("bad type name {:?}", t.type_name),
                ));
            }
            if !seen.insert(&t.type_name) {
                return Err(ServiceError::refused(
                    ErrorCode::Conflict,
                    format!("{field}: {} declared twice", t.type_name),
                ));
            }
            if let Some(schema) = &t.schema {
                if !schema.is_object() {
                    return Err(ServiceError::invalid(
                        field,
                        format!("{}: schema must be a JSON Schema object", t.type_name),
                    ));
                }
                if schema.to_string().len() > MAX_SCHEMA_BYTES {
                    return Err(ServiceError::refused(
                        ErrorCode::LimitReached,
                        format!(
                            "{field}: {}: schema over {MAX_SCHEMA_BYTES} bytes",
                            t.type_name
                        ),
                    ));
                }
                // An object that is not a JSON Schema: well-formed, but it cannot be used.
                compile_schema(schema).map_err(|e| {
                    ServiceError::refused(
                        ErrorCode::SchemaViolation,
                        format!("{field}: {}: not a valid JSON Schema: {e}", t.type_name),
                    )
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity() -> RegisterEntity {
        RegisterEntity {
            id: "hotel".into(),
            name: "Hotel".into(),
            command_url: "https://hotel.example/commands".into(),
            event_types: vec![],
            command_types: vec![TypeSpec {
                type_name: "room.hold".into(),
                schema: Some(serde_json::json!({"type": "object"})),
            }],
            oauth: None,
        }
    }

    #[test]
    fn entity_validation() -> Result<(), crate::outbound::OutboundError> {
        let guarded = Outbound::new(std::time::Duration::from_secs(1), false)?;
        let check = |e: &RegisterEntity| validate_entity(e, &guarded);
        assert!(check(&entity()).is_ok());
        let mut e = entity();
        e.command_url = "ftp://x".into();
        assert!(check(&e).is_err());
        let mut e = entity();
        e.command_url = "https://user:pw@x.example/".into();
        assert!(check(&e).is_err());
        let mut e = entity();
        e.command_types[0].schema = Some(serde_json::json!({"type": 12}));
        assert!(check(&e).is_err());
        let mut e = entity();
        e.command_types.push(e.command_types[0].clone());
        assert!(check(&e).is_err());
        let mut e = entity();
        e.id = "has space".into();
        assert!(check(&e).is_err());
        // Addresses the vault must not request are refused when registered...
        let mut e = entity();
        e.command_url = "http://169.254.169.254/latest/meta-data".into();
        assert!(check(&e).is_err());
        let mut e = entity();
        e.oauth = Some(OAuthEndpoints {
            authorize_url: "https://bank.example/authorize".into(),
            token_url: "http://127.0.0.1:8080/token".into(),
            revoke_url: None,
            client_id: "custos".into(),
        });
        let refused = check(&e).expect_err("loopback");
        assert!(refused.to_string().contains("token_url"), "{refused}");
        // IPv6 literals are outside the documented URL pattern (host name or IPv4).
        let mut v6 = entity();
        v6.command_url = "http://[::ffff:127.0.0.1]:8080/c".into();
        assert!(check(&v6).is_err());
        // ...unless the operator allows private targets.
        let open = Outbound::new(std::time::Duration::from_secs(1), true)?;
        assert!(validate_entity(&e, &open).is_ok());
        Ok(())
    }
}
