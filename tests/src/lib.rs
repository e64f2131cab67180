//! Test harness: real `custos` processes on port 0 with their own data directories, and real
//! HTTP receivers playing entities' command endpoints. Everything polls until ready; nothing
//! sleeps blindly.
//!
//! # Layout
//!
//! - [`browser`]: a portal browser over plain HTTP (cookies, CSRF tokens, no redirects).
//! - [`chaos`]: a cluster in network namespaces under a workload and injected faults, then
//!   checks (deliveries, unlinks, linearizability, convergence) and a one-line summary.
//! - [`cluster`]: several nodes joined into one cluster, on loopback or in network
//!   namespaces (partitions), with status, convergence and leader lookups.
//! - [`entity`]: a `custos entity-sim` reference entity registered with a node.
//! - [`node`]: start, kill (-9), stop (SIGTERM) and restart a node process.
//! - [`receiver`]: an entity's command endpoint that records what it got and answers a script.
//! - [`poll`]: wait for a condition with a deadline.
//! - [`provider`]: an OpenID provider whose answers a test makes wrong on purpose.
//! - [`oidc_mock`]: a third-party OpenID provider (PyPI `oidc-provider-mock`) as a process.
//! - [`tls`]: a test CA and leaf certificate made with openssl.
//! - [`scenario`]: the airline -> hotel scenario for many customers, through any node.

pub mod browser;
pub mod chaos;
pub mod cluster;
pub mod entity;
pub mod files;
pub mod node;
pub mod oidc_mock;
pub mod poll;
pub mod provider;
pub mod receiver;
pub mod scenario;
pub mod tls;
