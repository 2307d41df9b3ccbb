//! Pilotfish discovery: builds the mesh snapshot from the registries, translates it into Envoy
//! resources per proxy, and serves them over ADS.

pub mod proxy;
pub mod translate;
pub mod xds;
