//! adce-server: declares what the lake SHOULD hold (the catalog), observes
//! what it HAS, turns every gap into a durable prioritized task and hands the
//! tasks to agents over gRPC. See ARCHITECTURE.md for the map.
//!
//! The modules are listed in their layers, lowest first, one group per
//! layer: each uses only the groups above it (`server/tests/tidy.rs` checks
//! it; `reconcile::observed` and `reconcile::plan` are pure and sit below
//! the lake, the rest of `reconcile` does I/O above the scheduler).

// Domain types; the rules for keys and values; their stored form.
pub mod model;

// The languages of the config: key templates and value extraction.
pub mod extract;
pub mod template;

// The config.
pub mod config;

// What is derived from it purely, and the demo config.
pub mod dev;
pub mod limits;
pub mod priority;

// The catalog: what SHOULD exist.
pub mod catalog;

// Reconciliation (see above).
pub mod reconcile;

// The lake: what exists.
pub mod lake;

// The server's error.
pub mod error;

// The durable store.
pub mod store;

// What records events.
pub mod logs;
pub mod metrics;

// The queue's owner.
pub mod scheduler;

// The loop.
pub mod autoloop;

// What watches and guards.
pub mod auth;
pub mod health;

// Config reload.
pub mod reload;

// The services.
pub mod control;
pub mod gateway;

// How they meet the network.
pub mod transport;

// The assembly.
pub mod server;

pub use error::{Error, Result};
pub use server::run;
