//! Custos node: profile actors, the gateway, delivery, the cluster, and the `custos` binary's
//! server.
//!
//! # Layout
//!
//! - [`server`]: `run(config, listeners, shutdown)`: opens storage, starts Raft on its own
//!   multi-threaded runtime, forms or joins the cluster, starts the workers and both HTTP
//!   servers.
//! - [`config`]: defaults < commented TOML < `CUSTOS_*` variables < flags.
//! - [`core`]: what all of the below share: the groups this node holds, proposing to any
//!   group (forwarded to its leader), reads, the entity cache, where customers live.
//! - [`cluster`]: the cluster secret, joining, and the manager that moves replicas and
//!   leaders to where the placement wants them; cluster status.
//! - [`forward`]: any node takes any call; calls for a group led elsewhere go to its leader.
//! - [`relay`]: events for a group led elsewhere go to its leader in batches.
//! - [`read_cache`]: answers read from a replica (routes of events, customers' links), kept
//!   in memory until an apply changes them.
//! - [`gateway`]: client API handlers (decode, call one service, encode) and OpenAPI.
//! - [`peer`]: the peer port: Raft RPCs, forwarded proposals and calls, joins, status.
//! - [`service`]: the vault's operations, one file per resource.
//! - [`portal`]: the customer portal's pages (server-rendered, CSRF-checked forms).
//! - [`seal`]: AES-256-GCM sealing of entities' access tokens, with key rotation.
//! - [`profile`]: one actix actor per active customer, on its group's leader.
//! - [`rules`]: CEL conditions and mappings, indexed by (source entity, event type).
//! - [`recommend`]: rule recommendations (RP3beta, calibrated) and their offline evaluation.
//! - [`delivery`]: one outbox worker per data group: signed POSTs, retries, SSRF guard.
//! - [`outbound`]: the one guarded HTTP client for every request the vault makes.
//! - [`oidc`]: OAuth 2.0 / OpenID Connect providers: discovery, client authentication, ID
//!   tokens checked against the provider's keys.
//! - [`scrub`]: after an erasure, rewrites the logs, snapshots and files that still hold it.
//! - [`intents`]: finishes operations spanning groups that a call or a crash left half done.
//! - [`entity_sim`]: `custos entity-sim`, a reference entity (OAuth server, command receiver).
//! - [`error`]: the service error, mapped once to problem+json.
//! - [`telemetry`]: tracing and Prometheus metrics.
//!
//! Crate ladder: `custos-api` <- `custos-raft` <- `custos-node`; nothing points back.

pub mod cluster;
pub mod config;
pub mod core;
pub mod delivery;
pub mod entity_sim;
pub mod error;
pub mod forward;
pub mod gateway;
pub mod intents;
pub mod oidc;
pub mod outbound;
pub mod peer;
pub mod portal;
pub mod profile;
pub mod read_cache;
pub mod recommend;
pub mod relay;
pub mod rules;
pub mod scrub;
pub mod seal;
pub mod server;
pub mod service;
pub mod telemetry;
