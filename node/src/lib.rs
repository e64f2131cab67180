//! Custos node: profile actors, the gateway, delivery, and the `custos` binary's server.
//!
//! # Layout
//!
//! - [`server`]: `run(config, listeners, shutdown)`: opens storage, starts Raft on its own
//!   multi-threaded runtime, the profile arbiters, the delivery worker, and both HTTP servers.
//! - [`config`]: defaults < commented TOML < `CUSTOS_*` variables < flags.
//! - [`gateway`]: client API handlers (decode, call one service, encode) and OpenAPI.
//! - [`peer`]: the peer port's Raft RPC handlers.
//! - [`service`]: the vault's operations, one method per API call (portal ones in
//!   `service::portal`: accounts, sessions, export, erasure, trying a rule).
//! - [`portal`]: the customer portal's pages (server-rendered, CSRF-checked forms).
//! - [`seal`]: AES-256-GCM sealing of entities' access tokens, with key rotation.
//! - [`profile`]: one actix actor per active customer, owning its links and compiled rules.
//! - [`rules`]: CEL conditions and mappings, indexed by (source entity, event type).
//! - [`recommend`]: rule recommendations (RP3beta, calibrated) and their offline evaluation.
//! - [`delivery`]: the outbox worker: signed POSTs, retries, SSRF guard, batched results.
//! - [`entity_sim`]: `custos entity-sim`, a reference entity (OAuth server, command receiver).
//! - [`core`]: what all of the above share: Raft handle, state reader, entity cache.
//! - [`error`]: the service error, mapped once to problem+json.
//! - [`telemetry`]: tracing and Prometheus metrics.
//!
//! Crate ladder: `custos-api` <- `custos-raft` <- `custos-node`; nothing points back.

pub mod config;
pub mod core;
pub mod delivery;
pub mod entity_sim;
pub mod error;
pub mod gateway;
pub mod peer;
pub mod portal;
pub mod profile;
pub mod recommend;
pub mod rules;
pub mod seal;
pub mod server;
pub mod service;
pub mod telemetry;

/// The Raft group holding all vault state on this node (sharding adds more).
pub const DATA_GROUP: custos_raft::GroupId = 1;
