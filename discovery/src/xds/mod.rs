//! The ADS server: per-stream protocol state (SotW and Delta) and the gRPC loop around it.

pub mod resource;
