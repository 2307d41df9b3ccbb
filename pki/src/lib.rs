//! Pilotfish identity, shared by discovery and the agent.
//!
//! - [`spiffe`]: the SPIFFE ID scheme (`/service/<name>`, `/node/<node>`, `/discovery`).
//! - [`ca`]: discovery's CA: root on disk (created, or the operator's root or intermediate),
//!   the trust bundle and root rotation, and the rules for what it signs.
//! - [`tokens`]: join tokens that let a host enrol once, stored only as hashes.
//! - [`keys`]: the host side: a local ECDSA P-256 key, CSRs, reading certificates and peers.
//! - [`revocation`]: revoked nodes (`revocations.json`) and the certificates issued to each
//!   node (`issued.jsonl`), from which discovery builds the CRL ([`Ca::sign_crl`]).
//! - [`rotation`]: when to renew a certificate.
//! - [`wire`]: the `pilotfish.identity.v1.Identity` gRPC service (Enrol, Sign, Bundle,
//!   WatchBundle).
//!
//! Data flow: the agent makes a key ([`LocalKey`]), sends a CSR with its join token
//! (`Enrol`), discovery redeems the token ([`TokenStore::redeem`]) and signs the node
//! certificate ([`Ca::sign_workload`]) for the node ID the token is bound to; later calls
//! (`Sign`) are authenticated by that certificate over mTLS, and discovery decides from the
//! peer's ID ([`peer_spiffe_id`]) which IDs it may hold.

pub mod ca;
pub mod keys;
mod private_file;
pub mod revocation;
pub mod rotation;
pub mod shared;
pub mod spiffe;
pub mod tokens;
pub mod wire;

pub use ca::{
    Ca, CaError, CaOptions, CrlError, CsrRejected, IntermediateError, Issued, SignedIntermediate,
    TrustedRoot,
};
pub use keys::{parse_cert_pem, peer_spiffe_id, CertInfo, CertUnreadable, KeyError, LocalKey};
pub use private_file::FileError;
pub use revocation::{IssuedCert, IssuedLog, RevocationError, RevocationStore, Revocations};
pub use rotation::renew_at;
pub use shared::{SharedDoc, SharedDocument, SharedError};
pub use spiffe::{InvalidSpiffeId, Role, SpiffeId, TrustDomain};
pub use tokens::{TokenInfo, TokenRejected, TokenStore, TokenStoreError};
