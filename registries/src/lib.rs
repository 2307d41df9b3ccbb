//! The mesh model operators declare, and the registry adapters that fill it.
//!
//! Each adapter publishes whole [`model::Catalog`] snapshots on a `tokio::sync::watch` channel;
//! consumers compute what changed. Restarting an adapter is therefore harmless.

pub mod config_vocab;
pub mod consul;
pub mod files;
pub mod last_good;
pub mod merge;
pub mod model;
pub mod references;
