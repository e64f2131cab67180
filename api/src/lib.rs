//! Custos wire contract: the types, errors, signatures and client that entities,
//! customers and operators use to talk to a Custos node.
//!
//! # Layout
//!
//! - [`types`]: request and response bodies of the public HTTP API.
//! - [`cloudevent`]: the CloudEvents 1.0 structured-mode envelope used for events and commands.
//! - [`webhook`]: Standard Webhooks 1.0 signing and verification (both directions).
//! - [`oauth`]: PKCE and random tokens for account linking.
//! - [`problem`]: RFC 9457 problem details with the stable error codes.
//! - [`limits`]: the bounds every node enforces on input from outside.
//! - [`client`]: a small async HTTP client for the API (used by the CLI, tests and bench).
//!
//! This crate knows nothing of actix, openraft or RocksDB: it is what other programs link
//! against, so it stays small and stable.

pub mod client;
pub mod cloudevent;
pub mod limits;
pub mod oauth;
pub mod problem;
pub mod types;
pub mod webhook;

pub use cloudevent::CloudEvent;
pub use problem::{ErrorCode, Problem};
