//! adce-server: declares what the lake SHOULD hold (the catalog), observes
//! what it HAS, turns every gap into a durable prioritized task and hands the
//! tasks to agents over gRPC. See ARCHITECTURE.md for the map.

pub mod auth;
pub mod autoloop;
pub mod catalog;
pub mod config;
pub mod control;
pub mod dev;
pub mod error;
pub mod extract;
pub mod gateway;
pub mod health;
pub mod lake;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod observed;
pub mod priority;
pub mod reconcile;
pub mod reconciler;
pub mod reload;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod template;

pub use error::{Error, Result};
pub use server::run;
