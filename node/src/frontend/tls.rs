//! Mutual TLS between members: the Peer service accepts only callers whose certificate the
//! cluster's CA signed, and a member only talks to servers that present such a certificate
//! for the cluster's `server_name`.
//!
//! Gossip (UDP) is signed with the same key and certificate when no `cluster.secret_file` is set
//! ([`crate::cluster::gossip_auth::CertSealer`]), so a stranger does not reach the member list.
//!
//! Architecture invariant: PEM files are read once at start, and nothing here logs key material.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::cluster::TlsConfig;

/// The TLS settings of both ends of the Peer service.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// For this node's Peer server.
    pub server: ServerTlsConfig,
    /// For this node's calls to other members.
    pub client: PeerClientTls,
}

/// The client side of the Peer service's mutual TLS: this member's certificate, the cluster's
/// CA, and a check that the member answering is the one called. A server certificate that
/// names its node (`urn:shadowcache:node:ID`) must name the node the call is for, and must be a
/// member's: a member whose certificate the CA signed cannot stand in for another at an
/// address gossip gave for it (found in review).
#[derive(Clone)]
pub struct PeerClientTls {
    roots: Arc<rustls::RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    server_name: ServerName<'static>,
    /// `cluster.tls.require_roles`: a server certificate that names no role is not a member's.
    require_roles: bool,
}

impl std::fmt::Debug for PeerClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClientTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl PeerClientTls {
    /// The name the servers' certificates are checked for.
    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }

    /// A connector for calls to member `node` (empty: any member, as a hello to an address
    /// whose member is not known yet).
    pub fn connector_for(&self, node: &str) -> anyhow::Result<tokio_rustls::TlsConnector> {
        use anyhow::Context;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .context("cluster.tls.ca")?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("cluster.tls: protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MemberVerifier {
                inner,
                node: node.to_string(),
                require_roles: self.require_roles,
            }))
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .context("cluster.tls: the certificate and key do not make a client identity")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// The CA's check of a server certificate, then the member's: see [`PeerClientTls`].
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    node: String,
    require_roles: bool,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let id = crate::certs::identity_of(end_entity);
        let roles = id.roles.under(self.require_roles);
        if !roles.may_peer() {
            return Err(rustls::Error::General(format!(
                "the server's certificate is not a member's (its role is {})",
                roles.describe()
            )));
        }
        if !self.node.is_empty() && !id.speaks_for(&self.node) {
            return Err(rustls::Error::General(format!(
                "the server's certificate speaks for {:?}, not for {:?}, the member called",
                id.nodes, self.node
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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
        use anyhow::Context;
        use rustls_pki_types::pem::PemObject;
        let ca_pem = read("cluster.tls.ca", &cfg.ca)?;
        let cert_pem = read("cluster.tls.cert", &cfg.cert)?;
        let key_pem = read("cluster.tls.key", &cfg.key)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.with_context(|| format!("cluster.tls.ca: {}", cfg.ca.display()))?;
            roots
                .add(c)
                .with_context(|| format!("cluster.tls.ca: {}", cfg.ca.display()))?;
        }
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("cluster.tls.cert: {}", cfg.cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .with_context(|| format!("cluster.tls.key: {}", cfg.key.display()))?;
        let server_name = ServerName::try_from(cfg.server_name.clone())
            .with_context(|| format!("cluster.tls.server_name {:?}", cfg.server_name))?;
        Ok(PeerTls {
            server: ServerTlsConfig::new()
                .identity(Identity::from_pem(cert_pem, key_pem))
                .client_ca_root(Certificate::from_pem(ca_pem))
                .client_auth_optional(false)
                .timeout(super::conn::TLS_HANDSHAKE_TIMEOUT),
            client: PeerClientTls {
                roots: Arc::new(roots),
                certs,
                key: Arc::new(key),
                server_name,
                require_roles: cfg.require_roles,
            },
        })
    }
}
