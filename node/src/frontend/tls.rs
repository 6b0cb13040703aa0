//! Mutual TLS between members: the Peer service accepts only callers whose certificate the
//! cluster's CA signed, and a member only talks to servers that present such a certificate
//! for the cluster's `server_name`.
//!
//! Gossip (UDP) is signed with the same key and certificate when no `cluster.secret_file` is set
//! ([`crate::cluster::gossip_auth::CertSealer`]), so a stranger does not reach the member list.
//!
//! Architecture invariant: PEM files are read once at start, and nothing here logs key material.

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::cluster::TlsConfig;

/// The TLS settings of both ends of the Peer service.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// For this node's Peer server.
    pub server: ServerTlsConfig,
    /// For this node's calls to other members.
    pub client: ClientTlsConfig,
}

fn read(key: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("config key `{key}`: {}: {e}", path.display()))?;
    anyhow::ensure!(
        bytes.windows(11).any(|w| w == b"-----BEGIN "),
        "config key `{key}`: {} is not a PEM file",
        path.display()
    );
    Ok(bytes)
}

impl PeerTls {
    /// Reads the PEM files `cfg` names.
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<PeerTls> {
        let ca = Certificate::from_pem(read("cluster.tls.ca", &cfg.ca)?);
        let identity = Identity::from_pem(
            read("cluster.tls.cert", &cfg.cert)?,
            read("cluster.tls.key", &cfg.key)?,
        );
        Ok(PeerTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone())
                .client_auth_optional(false)
                .timeout(super::conn::TLS_HANDSHAKE_TIMEOUT),
            client: ClientTlsConfig::new()
                .ca_certificate(ca)
                .identity(identity)
                .domain_name(cfg.server_name.clone()),
        })
    }
}
