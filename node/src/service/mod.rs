//! The vault's operations, one method per API call: validation, authorization, then a read
//! or a proposal (directly, or through the customer's profile actor). Handlers call these.
//!
//! One file per resource: [`entities`], [`customers`] (profiles, links, OAuth linking,
//! activity), [`rules`], [`events`], [`deliveries`], [`recommendations`], [`cluster`] (status,
//! node removal, readiness) and [`portal`] (accounts, sessions, export, erasure, trying a
//! rule). A customer's calls reach this node only when it leads the customer's data group
//! (see `forward`); entity calls only on the meta group's leader.

use std::sync::Arc;

use custos_api::limits::{is_valid_id, MAX_NAME_LEN, MAX_URL_LEN};
use custos_api::ErrorCode;
use custos_raft::records::CustomerRecord;
use custos_raft::types::GroupId;
use custos_raft::{StateReader, StoreError};
use sha2::{Digest, Sha256};

use crate::core::Core;
use crate::error::ServiceError;
use crate::profile::{ProfileReply, ProfileRouter};
use crate::recommend::vault::Served;

pub mod cluster;
pub mod customers;
pub mod deliveries;
pub mod entities;
pub mod events;
pub mod portal;
pub mod recommendations;
pub mod rules;

pub use customers::{CallbackParams, FinishedLink};
pub use recommendations::train_recommender;

/// Customer API tokens start with this (so an operator call made with one is told why it
/// is refused); the rest is random, and only its hash is kept, in the customer's record.
pub const CUSTOMER_TOKEN_PREFIX: &str = "ctok_";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator.
    Admin,
    /// A customer, by id.
    Customer(String),
}

/// The vault's services on one node.
/// The model as served (none, or not servable), and the `model_epoch` it was read at.
type ServedAt = (u64, Option<Arc<Served>>);

#[derive(Clone)]
pub struct Vault {
    core: Arc<Core>,
    profiles: ProfileRouter,
    admin_token_hash: Arc<[u8; 32]>,
    /// The stored model as served, with the `model_epoch` it was read at (read again when
    /// the epoch moves, rebuilt when its version changed).
    served: Arc<std::sync::Mutex<Option<ServedAt>>>,
    /// Where entities send customers back after signing in (`<public url>/v1/oauth/callback`,
    /// followed by the entity's id: one redirect URI per entity).
    callback_url: Arc<str>,
    /// Providers' metadata and ID token keys.
    providers: Arc<crate::oidc::ProviderCache>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn unexpected(reply: ProfileReply) -> ServiceError {
    ServiceError::Internal(format!("unexpected profile reply {reply:?}"))
}

/// Compares two digests without an early exit.
fn same_digest(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Vault {
    /// The services over `core`, routing customer work through `profiles`.
    pub fn new(
        core: Arc<Core>,
        profiles: ProfileRouter,
        admin_token: &str,
        public_url: &str,
    ) -> Self {
        Vault {
            callback_url: Arc::from(format!(
                "{}/v1/oauth/callback",
                public_url.trim_end_matches('/')
            )),
            core,
            profiles,
            admin_token_hash: Arc::new(sha256(admin_token.as_bytes())),
            served: Arc::new(std::sync::Mutex::new(None)),
            providers: Arc::new(crate::oidc::ProviderCache::default()),
        }
    }

    /// The redirect URI of `entity`'s OAuth linkings: each entity has its own, so a code its
    /// provider issues can only come back to a linking with that entity (mix-up defence).
    pub fn redirect_uri(&self, entity: &str) -> String {
        format!("{}/{entity}", self.callback_url)
    }

    /// The shared node parts.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The token-sealing key ring: configured keys, else the cluster's own from the meta group.
    async fn key_ring(&self) -> Result<Arc<crate::seal::KeyRing>, ServiceError> {
        self.core.key_ring().await
    }

    /// The data group of a customer.
    fn group_of(&self, customer: &str) -> Result<GroupId, ServiceError> {
        self.core.group_of(customer)
    }

    /// Reads a customer's group as its leader (linearizable: everything acknowledged before
    /// is seen).
    async fn read_customer<T, F>(&self, customer: &str, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&StateReader) -> Result<T, StoreError> + Send + 'static,
    {
        self.core.read_leader(self.group_of(customer)?, f).await
    }

    /// A customer's record, which must exist.
    async fn customer_record(&self, customer: &str) -> Result<CustomerRecord, ServiceError> {
        check_id("customer id", customer)?;
        let owned = customer.to_owned();
        self.read_customer(customer, move |r| r.customer(&owned))
            .await?
            .ok_or_else(|| ServiceError::not_found("customer", customer))
    }

    fn is_admin(&self, bearer: Option<&str>) -> Result<bool, ServiceError> {
        let token = bearer.ok_or_else(|| {
            ServiceError::refused(
                ErrorCode::Unauthorized,
                "send Authorization: Bearer <token>",
            )
        })?;
        if token.is_empty() || token.len() > 256 {
            return Err(ServiceError::refused(
                ErrorCode::Unauthorized,
                "invalid token",
            ));
        }
        // Comparing hashes keeps the comparison's timing independent of the token.
        Ok(same_digest(
            &sha256(token.as_bytes()),
            &*self.admin_token_hash,
        ))
    }

    /// Requires the operator.
    pub async fn require_admin(&self, bearer: Option<&str>) -> Result<(), ServiceError> {
        if self.is_admin(bearer)? {
            return Ok(());
        }
        if bearer.is_some_and(|t| t.starts_with(CUSTOMER_TOKEN_PREFIX)) {
            return Err(ServiceError::refused(
                ErrorCode::Forbidden,
                "this call is for operators",
            ));
        }
        Err(ServiceError::refused(
            ErrorCode::Unauthorized,
            "invalid token",
        ))
    }

    /// Requires the operator or the customer `id` itself (its token is checked against the
    /// hash its record keeps, in its own group).
    pub async fn require_customer(
        &self,
        bearer: Option<&str>,
        id: &str,
    ) -> Result<Caller, ServiceError> {
        if self.is_admin(bearer)? {
            return Ok(Caller::Admin);
        }
        let token = bearer.unwrap_or_default();
        if !token.starts_with(CUSTOMER_TOKEN_PREFIX) {
            return Err(ServiceError::refused(
                ErrorCode::Unauthorized,
                "invalid token",
            ));
        }
        let record = match self.customer_record(id).await {
            Ok(r) => Some(r),
            Err(ServiceError::Refused {
                code: ErrorCode::NotFound | ErrorCode::InvalidField,
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        match record {
            Some(c) if same_digest(&c.token_hash, &sha256(token.as_bytes())) => {
                Ok(Caller::Customer(id.to_owned()))
            }
            // The same answer whether the customer exists or the token is another's.
            _ => Err(ServiceError::refused(
                ErrorCode::Forbidden,
                "this token cannot act on that customer",
            )),
        }
    }
}

/// A page size asked for: 1..=MAX_PAGE, else 400 (not silently clamped).
fn check_page_limit(limit: usize) -> Result<usize, ServiceError> {
    if (1..=custos_api::limits::MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ServiceError::invalid(
            "limit",
            format_args!("must be 1..={}", custos_api::limits::MAX_PAGE),
        ))
    }
}

/// A paging cursor: absent, or one this vault handed out as `next`.
fn check_cursor(field: &str, cursor: Option<&str>) -> Result<(), ServiceError> {
    match cursor {
        Some(c) if !custos_raft::reader::is_cursor(c) => Err(ServiceError::invalid(
            field,
            "not a cursor this vault issued (pass the previous page's `next`)",
        )),
        _ => Ok(()),
    }
}

fn check_id(field: &str, id: &str) -> Result<(), ServiceError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            field,
            "must be 1..=128 of [A-Za-z0-9._:-], not . or ..",
        ))
    }
}

fn check_name(field: &str, name: &str) -> Result<(), ServiceError> {
    if !custos_api::limits::is_valid_name(name) {
        return Err(ServiceError::invalid(
            field,
            format!("must be 1..={MAX_NAME_LEN} printable characters, not only spaces"),
        ));
    }
    Ok(())
}

/// [`check_url`], for a URL the vault itself will request: also refused when it names an
/// address the outbound guard forbids (e.g. `http://169.254.169.254/`), so it is not accepted
/// now only to fail at every attempt.
fn check_outbound_url(
    outbound: &crate::outbound::Outbound,
    field: &str,
    u: &str,
) -> Result<(), ServiceError> {
    check_url(field, u)?;
    outbound.check(u).map(|_| ()).map_err(|e| {
        // A well-formed URL the vault may not call: not a malformed request, so 422.
        ServiceError::refused(ErrorCode::ForbiddenTarget, format!("{field}: {e}"))
    })
}

fn check_url(field: &str, u: &str) -> Result<(), ServiceError> {
    if u.len() > MAX_URL_LEN {
        return Err(ServiceError::invalid(
            field,
            format!("longer than {MAX_URL_LEN}"),
        ));
    }
    static PATTERN: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| regex::Regex::new(custos_api::limits::URL_PATTERN).ok());
    if !pattern.as_ref().is_some_and(|p| p.is_match(u)) {
        return Err(ServiceError::invalid(
            field,
            "must be an http(s) URL: a host name or IPv4 address, optional port, path and query \
             (no credentials, no fragment)",
        ));
    }
    let parsed = url::Url::parse(u).map_err(|e| ServiceError::invalid(field, e))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(ServiceError::invalid(
            field,
            "must be an http(s) URL with a host",
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ServiceError::invalid(field, "must not carry credentials"));
    }
    Ok(())
}
