//! Envoy itself: the bootstrap the agent writes, the admin client, and the supervisor that
//! keeps the process alive and drains it on shutdown.

pub mod admin;
pub mod bootstrap;
mod process;
pub mod supervisor;
