//! The certificates this node presents (`[cluster.tls]`, `[nbd_tls]`): when each expires,
//! read once at start (they are loaded only then), for `status` and the metric
//! `shadowcache_certificate_expiry_timestamp_seconds{role}`. One that expires within
//! [`WARN_BEFORE`] is logged as a warning at start.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long before expiry a certificate is warned about at start.
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// One certificate this node presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// What it is for: `cluster` (members' mutual TLS, and the TCP gRPC listener) or `nbd`.
    pub role: String,
    /// Its file.
    pub path: PathBuf,
    /// Its subject (`CN=...`).
    pub subject: String,
    /// Its expiry, in seconds since the Unix epoch.
    pub not_after_unix: i64,
}

/// The first certificate in the PEM file at `path`.
pub fn read(role: &str, path: &Path) -> Result<CertificateInfo, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
    let cert = block
        .parse_x509()
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))?;
    Ok(CertificateInfo {
        role: role.to_string(),
        path: path.to_path_buf(),
        subject: cert.subject().to_string(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// The certificates `config` makes this node present, each with its gauge set; a warning for
/// each that expires within [`WARN_BEFORE`] (or has expired), and for one that cannot be read
/// (TLS itself then fails to start with its own error).
pub fn of_config(config: &crate::Config) -> Vec<CertificateInfo> {
    let mut out = Vec::new();
    let wanted = [
        (
            "cluster",
            config.cluster.tls.as_ref().map(|t| t.cert.clone()),
        ),
        ("nbd", config.nbd_tls.as_ref().map(|t| t.cert.clone())),
    ];
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (role, path) in wanted {
        let Some(path) = path else { continue };
        match read(role, &path) {
            Ok(c) => {
                metrics::gauge!(crate::telemetry::CERT_EXPIRY, "role" => role)
                    .set(c.not_after_unix as f64);
                let left = c.not_after_unix - now;
                if left <= 0 {
                    tracing::error!(role, path = %path.display(), subject = %c.subject, "certificate has expired; peers will refuse it: issue a new one (shadowcache certs issue)");
                } else if left < WARN_BEFORE.as_secs() as i64 {
                    tracing::warn!(role, path = %path.display(), subject = %c.subject, days_left = left / 86_400, "certificate expires soon: issue a new one (shadowcache certs issue) and restart");
                }
                out.push(c);
            }
            Err(e) => tracing::warn!(role, error = %e, "cannot read the certificate's expiry"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificates_expiry_and_subject_are_read_and_junk_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["shadowcache".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "host-9");
        params.not_after = rcgen::date_time_ymd(2031, 5, 6);
        let cert = params.self_signed(&key).expect("cert");
        let p = dir.path().join("c.pem");
        std::fs::write(&p, cert.pem()).expect("write");
        let c = read("nbd", &p).expect("read");
        assert_eq!(c.role, "nbd");
        assert!(c.subject.contains("CN=host-9"), "{}", c.subject);
        assert_eq!(c.not_after_unix, 1_935_792_000, "2031-05-06T00:00:00Z");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        assert!(read("nbd", &junk).is_err());
        assert!(read("nbd", &dir.path().join("missing.pem")).is_err());
    }
}

/// What a certificate of the cluster's CA may do, from the role URIs it names
/// ([`shadowcache_proto::role`]). One that names none (issued before roles) may do everything,
/// unless the node requires roles (`cluster.tls.require_roles`, [`Roles::under`]): then only
/// what a client's may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles {
    /// `member`: the Peer service and gossip.
    pub member: bool,
    /// `admin`: the Admin service over `listen_tcp`.
    pub admin: bool,
    /// Names no role at all.
    pub unmarked: bool,
    /// The node requires roles: naming none gives no right beyond a client's.
    pub required: bool,
}

impl Roles {
    /// These roles at a node whose `cluster.tls.require_roles` is `require`.
    #[must_use]
    pub fn under(self, require: bool) -> Roles {
        Roles {
            required: require,
            ..self
        }
    }

    /// Whether this certificate has every right because it names no role.
    fn legacy(self) -> bool {
        self.unmarked && !self.required
    }

    /// May call the Peer service and gossip.
    pub fn may_peer(self) -> bool {
        self.member || self.legacy()
    }

    /// May call the Admin service over `listen_tcp`.
    pub fn may_admin(self) -> bool {
        self.admin || self.legacy()
    }

    /// The roles in words, for refusals.
    pub fn describe(self) -> &'static str {
        match (self.unmarked, self.member, self.admin) {
            (true, ..) if self.required => {
                "no role (issued before roles; refused here: cluster.tls.require_roles is set)"
            }
            (true, ..) => "no role",
            (_, true, true) => "member and admin",
            (_, true, false) => "member",
            (_, false, true) => "admin",
            _ => "client",
        }
    }
}

/// The roles of the certificate `der` (DER). One that cannot be parsed may do nothing beyond
/// what any certificate the CA signed may (the Block service).
pub fn roles_of(der: &[u8]) -> Roles {
    identity_of(der).roles
}

/// What a client's certificate says of it: its roles and the nodes it speaks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertIdentity {
    /// Its roles.
    pub roles: Roles,
    /// The node ids it names (`urn:shadowcache:node:ID`); none: any node.
    pub nodes: Vec<String>,
}

impl CertIdentity {
    /// Whether a call that says it comes from member `node` may be believed: a certificate
    /// that names nodes speaks for those only; one that names none (shared by several nodes,
    /// or issued before) is believed.
    pub fn speaks_for(&self, node: &str) -> bool {
        self.nodes.is_empty() || self.nodes.iter().any(|n| n == node)
    }
}

/// The roles and names of the certificate `der` (DER).
pub fn identity_of(der: &[u8]) -> CertIdentity {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return CertIdentity::default();
    };
    let mut id = CertIdentity::default();
    let mut named = false;
    // URN namespaces compare without case (RFC 8141): `URN:SHADOWCACHE:ROLE:client` is a role.
    let strip = |uri: &str, prefix: &str| -> Option<String> {
        uri.get(..prefix.len())
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .map(|_| uri[prefix.len()..].to_string())
    };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => {
            for name in &san.value.general_names {
                let GeneralName::URI(uri) = name else {
                    continue;
                };
                if let Some(role) = strip(uri, shadowcache_proto::role::URI_PREFIX) {
                    named = true;
                    match role.to_ascii_lowercase().as_str() {
                        shadowcache_proto::role::MEMBER => id.roles.member = true,
                        shadowcache_proto::role::ADMIN => id.roles.admin = true,
                        // `client`, or a role this version does not know: the Block service
                        // only.
                        _ => {}
                    }
                } else if let Some(node) = strip(uri, shadowcache_proto::role::NODE_URI_PREFIX) {
                    id.nodes.push(node);
                }
            }
        }
        Ok(None) => {}
        // A subject alternative name that cannot be read may hide a role: no rights, rather
        // than every right of a certificate that names none.
        Err(_) => return CertIdentity::default(),
    }
    id.roles.unmarked = !named;
    id
}

#[cfg(test)]
mod role_tests {
    use super::*;

    fn cert(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["shadowcache".to_string()]).expect("params");
        for u in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                (*u).to_string().try_into().expect("uri"),
            ));
        }
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn roles_come_from_the_role_uris_and_a_certificate_without_one_may_do_everything() {
        let member = roles_of(&cert(&["urn:shadowcache:role:member"]));
        assert!(member.may_peer() && !member.may_admin(), "{member:?}");
        let admin = roles_of(&cert(&["urn:shadowcache:role:admin"]));
        assert!(!admin.may_peer() && admin.may_admin(), "{admin:?}");
        for client in [
            roles_of(&cert(&["urn:shadowcache:role:client"])),
            roles_of(&cert(&["urn:shadowcache:role:root"])),
            roles_of(b"not a certificate"),
        ] {
            assert!(!client.may_peer() && !client.may_admin(), "{client:?}");
        }
        // Case does not hide a role.
        let shouting = roles_of(&cert(&["URN:SHADOWCACHE:ROLE:client"]));
        assert!(
            !shouting.may_peer() && !shouting.may_admin(),
            "{shouting:?}"
        );
        let upper_member = roles_of(&cert(&["urn:shadowcache:role:MEMBER"]));
        assert!(upper_member.may_peer() && !upper_member.may_admin());
        // Other URIs are not roles.
        let legacy = roles_of(&cert(&["https://example.com/x"]));
        assert!(legacy.may_peer() && legacy.may_admin(), "{legacy:?}");
        let both = roles_of(&cert(&[
            "urn:shadowcache:role:member",
            "urn:shadowcache:role:admin",
        ]));
        assert!(both.may_peer() && both.may_admin());
        assert_eq!(both.describe(), "member and admin");
    }

    #[test]
    fn a_certificate_that_names_its_node_speaks_for_it_only() {
        let bound = identity_of(&cert(&[
            "urn:shadowcache:role:member",
            "urn:shadowcache:node:host-b",
        ]));
        assert_eq!(bound.nodes, ["host-b"]);
        assert!(bound.speaks_for("host-b"));
        assert!(!bound.speaks_for("host-a"));
        // Shared by several nodes, or issued before: believed.
        let shared = identity_of(&cert(&["urn:shadowcache:role:member"]));
        assert!(shared.speaks_for("host-a") && shared.speaks_for("host-b"));
    }
}
