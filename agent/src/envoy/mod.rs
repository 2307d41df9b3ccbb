//! Envoy itself: the bootstrap the agent writes, the admin client, and the supervisor that
//! keeps the process alive and drains it on shutdown.

pub mod admin;
pub mod bootstrap;
pub mod handover;
mod process;
pub use process::{keep, KEEPER_ARG};
pub mod supervisor;
