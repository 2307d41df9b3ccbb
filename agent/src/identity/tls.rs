//! Client TLS towards discovery (security checklist c.6): discovery's certificate must chain to
//! a trusted root and carry the DNS name `discovery.<trust_domain>`, whatever address is
//! dialled. Verification is never skipped; there is no setting to skip it.
//!
//! The trusted roots are `ca_file` plus the bundle discovery last handed out (stored in
//! `state_dir/roots.pem`): the bundle came over a connection verified against `ca_file`, and it
//! is how an agent learns a new root before discovery's certificate moves to it.

use std::time::Duration;

use pilotfish_pki::TrustDomain;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::Credential;

/// TLS handshake deadline.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many PEM certificates `pem` holds (an error when a block does not decode).
pub fn pem_cert_count(pem: &str) -> Result<usize, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .try_fold(0, |n, c| c.map(|_| n + 1))
        .map_err(|e| format!("not valid PEM: {e}"))
}

/// The roots to verify discovery with: `ca_file`'s, then the stored bundle's.
pub fn trusted_roots(ca_pem: &str, bundle_pem: Option<&str>) -> String {
    let mut roots = ca_pem.trim_end().to_owned();
    roots.push('\n');
    if let Some(bundle) = bundle_pem {
        roots.push_str(bundle.trim_end());
        roots.push('\n');
    }
    roots
}

/// TLS settings for dialling discovery. `client` is the node credential (mTLS); `None` for
/// enrolment, which is authenticated by the join token instead.
pub fn client_config(
    roots_pem: &str,
    trust_domain: &TrustDomain,
    client: Option<&Credential>,
) -> ClientTlsConfig {
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name(trust_domain.discovery_dns_name())
        .timeout(HANDSHAKE_TIMEOUT);
    match client {
        Some(c) => config.identity(Identity::from_pem(&c.chain_pem, &c.key_pem)),
        None => config,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_certificates_and_rejects_garbage() {
        assert_eq!(pem_cert_count("").unwrap(), 0);
        assert_eq!(pem_cert_count("just text").unwrap(), 0);
        assert!(
            pem_cert_count("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
                .is_err()
        );
        let roots = trusted_roots("A\n\n", Some("B"));
        assert_eq!(roots, "A\nB\n");
    }
}
