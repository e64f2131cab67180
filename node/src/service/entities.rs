//! Entities (operators): registration with a signing secret, changes, secret rotation. They
//! live in the meta group, so every node verifies any entity's events from its own replica.

use custos_api::limits::{is_valid_id, MAX_SCHEMA_BYTES, MAX_TYPES_PER_ENTITY};
use custos_api::types::*;
use custos_api::webhook::Secret;
use custos_api::ErrorCode;
use custos_raft::records::{ClientAuth, EntityRecord, OAuthRecord, TypeRecord};
use custos_raft::{StateChange, META_GROUP};

use super::{check_id, check_name, check_outbound_url, check_url, Vault};
use crate::core::compile_schema;
use crate::error::ServiceError;
use crate::oidc;
use crate::outbound::Outbound;

impl Vault {
    /// Registers an entity and issues its signing secret.
    pub async fn register_entity(&self, req: RegisterEntity) -> Result<Entity, ServiceError> {
        validate_entity(&req, &self.core.outbound)?;
        let oauth = match req.oauth.clone() {
            Some(o) => Some(self.oauth_record(&req.id, o).await?),
            None => None,
        };
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
            oauth,
        };
        self.core
            .propose(META_GROUP, StateChange::RegisterEntity(record.clone()))
            .await?;
        let mut wire = self.entity_view(&record);
        wire.secret = Some(secret);
        Ok(wire)
    }

    /// What the vault keeps of an entity's OAuth provider: the endpoints discovered from its
    /// issuer (checked to name that issuer) or given explicitly, the client secret sealed, and
    /// the client authentication the provider offers.
    async fn oauth_record(
        &self,
        entity_id: &str,
        o: OAuthEndpoints,
    ) -> Result<OAuthRecord, ServiceError> {
        let outbound = &self.core.outbound;
        let sealed_client_secret = match &o.client_secret {
            Some(secret) => Some(
                self.key_ring()
                    .await?
                    .seal_client_secret(entity_id, secret)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
            ),
            None => None,
        };
        let unusable = |why: String| ServiceError::refused(ErrorCode::ProviderUnusable, why);
        let Some(issuer) = o.issuer else {
            let (Some(authorize_url), Some(token_url)) = (o.authorize_url, o.token_url) else {
                return Err(ServiceError::invalid(
                    "oauth",
                    "give an issuer, or both authorize_url and token_url",
                ));
            };
            return Ok(OAuthRecord {
                issuer: None,
                authorize_url,
                token_url,
                client_id: o.client_id,
                client_auth: if sealed_client_secret.is_some() {
                    ClientAuth::Basic
                } else {
                    ClientAuth::None
                },
                sealed_client_secret,
                revoke_url: o.revoke_url,
                userinfo_url: o.userinfo_url,
                jwks_uri: None,
                scopes: o.scopes.unwrap_or_default(),
                iss_required: false,
            });
        };
        let metadata = self
            .providers
            .read_metadata(outbound, &issuer)
            .await
            .map_err(|e| unusable(format!("oauth.issuer: {e}")))?;
        let client_auth = oidc::choose_client_auth(
            sealed_client_secret.is_some(),
            metadata.token_endpoint_auth_methods_supported.as_deref(),
        )
        .map_err(|why| unusable(format!("oauth: {why}")))?;
        let openid = metadata.openid && metadata.jwks_uri.is_some();
        let scopes = o.scopes.unwrap_or_else(|| {
            if openid {
                vec!["openid".to_owned()]
            } else {
                Vec::new()
            }
        });
        if scopes.iter().any(|s| s == "openid") && metadata.jwks_uri.is_none() {
            return Err(unusable(
                "oauth: the openid scope needs ID tokens, and the provider publishes no jwks_uri"
                    .into(),
            ));
        }
        Ok(OAuthRecord {
            issuer: Some(issuer),
            authorize_url: o
                .authorize_url
                .unwrap_or_else(|| metadata.authorization_endpoint.clone()),
            token_url: o
                .token_url
                .unwrap_or_else(|| metadata.token_endpoint.clone()),
            client_id: o.client_id,
            sealed_client_secret,
            client_auth,
            revoke_url: o
                .revoke_url
                .or_else(|| metadata.revocation_endpoint.clone()),
            userinfo_url: o
                .userinfo_url
                .or_else(|| metadata.userinfo_endpoint.clone()),
            jwks_uri: metadata.jwks_uri.clone(),
            scopes,
            iss_required: metadata.authorization_response_iss_parameter_supported,
        })
    }

    /// The admin's view of an entity, with the redirect URI to register at its provider.
    pub(crate) fn entity_view(&self, record: &EntityRecord) -> Entity {
        let mut wire = record.to_wire();
        if let Some(o) = wire.oauth.as_mut() {
            o.redirect_uri = Some(self.redirect_uri(&record.id));
        }
        wire
    }

    /// Changes an entity's name or endpoint.
    pub async fn update_entity(&self, id: &str, req: UpdateEntity) -> Result<Entity, ServiceError> {
        if let Some(n) = &req.name {
            check_name("name", n)?;
        }
        if let Some(u) = &req.command_url {
            check_outbound_url(&self.core.outbound, "command_url", u)?;
        }
        let sealed_client_secret = match &req.oauth_client_secret {
            Some(secret) => {
                check_client_secret("oauth_client_secret", secret)?;
                Some(
                    self.key_ring()
                        .await?
                        .seal_client_secret(id, secret)
                        .map_err(|e| ServiceError::Internal(e.to_string()))?,
                )
            }
            None => None,
        };
        self.core
            .propose(
                META_GROUP,
                StateChange::UpdateEntity {
                    id: id.to_owned(),
                    name: req.name,
                    command_url: req.command_url,
                    endpoint_enabled: req.endpoint_enabled,
                    sealed_client_secret,
                },
            )
            .await?;
        self.entity(id).await
    }

    /// Issues a new secret; the old one verifies events for the grace period, or (`revoke`,
    /// a secret that leaked) no longer at all.
    pub async fn rotate_secret(&self, id: &str, revoke: bool) -> Result<Entity, ServiceError> {
        // Revoked: valid until a moment ago.
        let grace_ms = if revoke {
            -1
        } else {
            (self.core.config.secret_grace_hours * 3_600_000.0) as i64
        };
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
        Ok(list.iter().map(|e| self.entity_view(e)).collect())
    }

    /// One entity.
    pub async fn entity(&self, id: &str) -> Result<Entity, ServiceError> {
        let owned = id.to_owned();
        self.core
            .read_meta(move |r| r.entity(&owned))
            .await?
            .map(|e| self.entity_view(&e))
            .ok_or_else(|| ServiceError::not_found("entity", id))
    }
}

fn check_client_secret(field: &str, secret: &str) -> Result<(), ServiceError> {
    if secret.is_empty()
        || secret.len() > 512
        || !secret.bytes().all(|b| (0x20..=0x7e).contains(&b))
    {
        return Err(ServiceError::invalid(
            field,
            "must be 1..=512 printable ASCII characters",
        ));
    }
    Ok(())
}

fn validate_entity(req: &RegisterEntity, outbound: &Outbound) -> Result<(), ServiceError> {
    // Not `.` nor `..` (`is_valid_id`): an entity's id is a URL path segment (its API, its
    // OAuth callback), which clients and browsers resolve away.
    check_id("id", &req.id)?;
    check_name("name", &req.name)?;
    check_outbound_url(outbound, "command_url", &req.command_url)?;
    if let Some(o) = &req.oauth {
        // The customer's browser opens the authorize URL; the vault requests the others.
        if let Some(u) = &o.authorize_url {
            check_url("oauth.authorize_url", u)?;
        }
        if let Some(i) = &o.issuer {
            check_outbound_url(outbound, "oauth.issuer", i)?;
        }
        for (field, url) in [
            ("oauth.token_url", &o.token_url),
            ("oauth.revoke_url", &o.revoke_url),
            ("oauth.userinfo_url", &o.userinfo_url),
        ] {
            if let Some(u) = url {
                check_outbound_url(outbound, field, u)?;
            }
        }
        if let Some(secret) = &o.client_secret {
            check_client_secret("oauth.client_secret", secret)?;
        }
        if let Some(scopes) = &o.scopes {
            // RFC 6749 §3.3: scope tokens are printable ASCII without space, quote or backslash.
            let token_ok = |s: &String| {
                (1..=128).contains(&s.len())
                    && s.bytes().all(|b| {
                        b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b)
                    })
            };
            if scopes.len() > 16 || !scopes.iter().all(token_ok) {
                return Err(ServiceError::invalid(
                    "oauth.scopes",
                    "at most 16 scope tokens of 1..=128 printable ASCII characters without spaces, quotes or backslashes",
                ));
            }
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
        let guarded = Outbound::new(std::time::Duration::from_secs(1), false, 1)?;
        let check = |e: &RegisterEntity| validate_entity(e, &guarded);
        assert!(check(&entity()).is_ok());
        for id in [".", ".."] {
            let mut e = entity();
            e.id = id.into();
            assert!(check(&e).is_err(), "{id}");
        }
        let mut e = entity();
        e.id = "...".into();
        assert!(check(&e).is_ok());
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
            authorize_url: Some("https://bank.example/authorize".into()),
            token_url: Some("http://127.0.0.1:8080/token".into()),
            client_id: "custos".into(),
            ..Default::default()
        });
        let refused = check(&e).expect_err("loopback");
        assert!(refused.to_string().contains("token_url"), "{refused}");
        // IPv6 literals are outside the documented URL pattern (host name or IPv4).
        let mut v6 = entity();
        v6.command_url = "http://[::ffff:127.0.0.1]:8080/c".into();
        assert!(check(&v6).is_err());
        // ...unless the operator allows private targets.
        let open = Outbound::new(std::time::Duration::from_secs(1), true, 1)?;
        assert!(validate_entity(&e, &open).is_ok());
        Ok(())
    }
}
