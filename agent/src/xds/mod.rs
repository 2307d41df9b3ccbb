//! The xDS side of the agent: the proxy between Envoy and discovery (`proxy`), how it reaches
//! discovery (`upstream`, trying replicas in the order `replicas` picks), the last accepted
//! configuration (`cache`, on disk via `store`), and the servers that answer Envoy from that
//! cache while discovery is unreachable (`fallback`).

pub mod cache;
pub mod fallback;
pub mod proxy;
pub mod replicas;
pub mod store;
pub mod upstream;
