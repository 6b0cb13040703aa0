//! A cluster's certificate authority, members' certificates and the cluster key, as
//! `shadowcache certs init` and `shadowcache certs issue` make them.
//!
//! - `init DIR` writes `ca.pem` (the CA certificate, public), `ca.key` (its private key) and
//!   `cluster.key` (32 random bytes, hex: the `cluster.secret_file` that seals gossip and Peer
//!   calls). Private files are created with mode 0600 in a directory of mode 0700, and nothing
//!   that exists is overwritten: a second CA for the same cluster would split it in two.
//! - `issue --ca DIR NAME` writes `NAME.pem` and `NAME.key` (0600): a member's certificate,
//!   signed by the CA, for the names `shadowcache` (the default `server_name` members and the
//!   CLI check), `NAME` and any `--san` (a DNS name, or an IP address). It serves for
//!   `[cluster.tls]`, `[nbd_tls]` and the TCP gRPC listener, as a server and as a client.
//!
//! Keys are ECDSA P-256 (what rustls and qemu's gnutls both take).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The name members' certificates are issued for, whatever the member: the default
/// `server_name` of `[cluster.tls]` and of the CLI.
pub const SERVER_NAME: &str = "shadowcache";

/// What `certs init` wrote.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The CA's private key (PEM, 0600).
    pub ca_key: PathBuf,
    /// The cluster key (`cluster.secret_file`, 0600).
    pub cluster_key: PathBuf,
    /// When the CA certificate expires.
    pub not_after: SystemTime,
}

/// What `certs issue` wrote.
#[derive(Debug, Clone)]
pub struct MemberFiles {
    /// The member's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, 0600).
    pub key: PathBuf,
    /// The names it is valid for.
    pub names: Vec<String>,
    /// When it expires.
    pub not_after: SystemTime,
}

fn validity(days: u32) -> anyhow::Result<(time::OffsetDateTime, time::OffsetDateTime)> {
    if days == 0 || days > 36_500 {
        bail!("--days {days}: give 1 to 36500");
    }
    // A little in the past: a member whose clock is a minute behind still accepts it.
    let now = time::OffsetDateTime::now_utc();
    Ok((
        now - time::Duration::minutes(5),
        now + time::Duration::days(i64::from(days)),
    ))
}

fn system_time(t: time::OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// Creates `path` with `contents` and `mode`; refuses a file that exists.
fn create(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "{} exists already; it is not replaced (move it away first)",
                path.display()
            ),
            _ => anyhow::anyhow!("cannot create {}: {e}", path.display()),
        })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    Ok(())
}

/// The subject of every certificate `certs` makes: `CN=common_name, O=shadowcache`.
fn subject(params: &mut CertificateParams, common_name: &str) {
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "shadowcache");
}

/// `certs init DIR`: a new cluster CA (valid `days`) named `cluster`, and a cluster key.
pub fn init(dir: &Path, cluster: &str, days: u32) -> anyhow::Result<CaFiles> {
    let files = CaFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        cluster_key: dir.join("cluster.key"),
        not_after: SystemTime::UNIX_EPOCH,
    };
    for p in [&files.ca_cert, &files.ca_key, &files.cluster_key] {
        if p.exists() {
            bail!(
                "{} exists already: {} holds a cluster's CA; a second one would split the cluster (issue members' certificates from it with `shadowcache certs issue --ca {}`)",
                p.display(),
                dir.display(),
                dir.display()
            );
        }
    }
    private_dir(dir)?;
    {
        // The CA's directory is private even when it existed before.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (0700)", dir.display()))?;
    }
    let (from, to) = validity(days)?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    subject(&mut params, &format!("{cluster} shadowcache CA"));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = from;
    params.not_after = to;
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    // All or nothing: a half-made CA would block the next `init` and serve nobody.
    let made = [
        (&files.ca_key, key.serialize_pem().into_bytes(), 0o600),
        (&files.ca_cert, cert.pem().into_bytes(), 0o644),
        (&files.cluster_key, format!("{hex}\n").into_bytes(), 0o600),
    ];
    for (n, (path, contents, mode)) in made.iter().enumerate() {
        if let Err(e) = create(path, contents, *mode) {
            for (done, _, _) in &made[..n] {
                let _ = std::fs::remove_file(done);
            }
            return Err(e);
        }
    }
    Ok(CaFiles {
        not_after: system_time(to),
        ..files
    })
}

/// `certs issue --ca DIR NAME`: a certificate and key for `name` in `role`
/// ([`shadowcache_proto::role`]: `member`, `client` or `admin`), signed by the CA in `ca_dir`,
/// valid `days` for `shadowcache`, `name` and `sans`, written to `out`. A member's serves as a
/// server and a client; a client's and an admin's as a client only.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    sans: &[String],
    out: &Path,
    days: u32,
    role: &str,
) -> anyhow::Result<MemberFiles> {
    issue_for(ca_dir, name, sans, out, days, role, true)
}

/// [`issue`], and with `bound`, a member's certificate names `name` as the one node it speaks
/// for (its node id); without, it serves any node (a certificate several nodes share, as a
/// Kubernetes DaemonSet's Secret).
pub fn issue_for(
    ca_dir: &Path,
    name: &str,
    sans: &[String],
    out: &Path,
    days: u32,
    role: &str,
    bound: bool,
) -> anyhow::Result<MemberFiles> {
    if !shadowcache_proto::role::ALL.contains(&role) {
        bail!(
            "role {role:?}: give one of {}",
            shadowcache_proto::role::ALL.join(", ")
        );
    }
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!(
            "member name {name:?}: give 1 to 64 letters, digits, '-', '_' or '.' (it names the files too)"
        );
    }
    let ca_cert = ca_dir.join("ca.pem");
    let ca_key = ca_dir.join("ca.key");
    let cert_pem = std::fs::read_to_string(&ca_cert).with_context(|| {
        format!(
            "cannot read the CA certificate {} (make one with `shadowcache certs init {}`)",
            ca_cert.display(),
            ca_dir.display()
        )
    })?;
    let key_pem = std::fs::read_to_string(&ca_key)
        .with_context(|| format!("cannot read the CA key {}", ca_key.display()))?;
    let ca_signing = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} is not a private key in PEM", ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, ca_signing)
        .with_context(|| format!("{} is not a certificate in PEM", ca_cert.display()))?;
    let (from, to) = validity(days)?;
    // Never past the CA's own expiry: members would refuse the chain then anyway.
    let (ca_expiry, _) = not_after(&ca_cert)?;
    let ca_to = time::OffsetDateTime::from_unix_timestamp(
        ca_expiry
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    )
    .context("the CA's expiry")?;
    let to = to.min(ca_to);
    if to <= from {
        bail!("the CA in {} has expired: make a new one", ca_dir.display());
    }
    let mut names = vec![SERVER_NAME.to_string()];
    for n in std::iter::once(name.to_string()).chain(sans.iter().cloned()) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for n in &names {
        let dns_name = !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        let san = match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if !dns_name => {
                bail!("{n:?} is neither a DNS name nor an IP address")
            }
            Err(_) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .with_context(|| format!("{n:?} is neither a DNS name nor an IP address"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    // What it may do, read by every node that checks it.
    params.subject_alt_names.push(SanType::URI(
        format!("{}{role}", shadowcache_proto::role::URI_PREFIX)
            .try_into()
            .context("the role URI")?,
    ));
    if bound && role == shadowcache_proto::role::MEMBER {
        // The one node it speaks for: its node id.
        params.subject_alt_names.push(SanType::URI(
            format!("{}{name}", shadowcache_proto::role::NODE_URI_PREFIX)
                .try_into()
                .context("the node URI")?,
        ));
    }
    subject(&mut params, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if role == shadowcache_proto::role::MEMBER {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.not_before = from;
    params.not_after = to;
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().context("cannot generate the member's key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the member's certificate")?;
    private_dir(out)?;
    let files = MemberFiles {
        cert: out.join(format!("{name}.pem")),
        key: out.join(format!("{name}.key")),
        names,
        not_after: system_time(to),
    };
    for p in [&files.cert, &files.key] {
        if p.exists() {
            bail!(
                "{} exists already; it is not replaced (to renew, move the old files away first, then reload the member)",
                p.display()
            );
        }
    }
    create(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    create(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// When the first certificate in the PEM file at `path` expires, and its subject.
pub fn not_after(path: &Path) -> anyhow::Result<(SystemTime, String)> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    let cert = block
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("{}: not an X.509 certificate: {e}", path.display()))?;
    let secs = cert.validity().not_after.timestamp();
    Ok((
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64),
        cert.subject().to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn init_then_issue_writes_private_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let files = init(&ca, "test", 3650).expect("init");
        assert_eq!(mode(&ca), 0o700);
        assert_eq!(mode(&files.ca_key), 0o600);
        assert_eq!(mode(&files.cluster_key), 0o600);
        let secret = std::fs::read_to_string(&files.cluster_key).expect("key");
        assert_eq!(secret.trim().len(), 64);
        assert!(secret.trim().chars().all(|c| c.is_ascii_hexdigit()));
        let err = init(&ca, "test", 3650).expect_err("a second CA in the same place");
        assert!(format!("{err:#}").contains("exists already"), "{err:#}");

        let m = issue(
            &ca,
            "host-1",
            &["10.0.0.7".into(), "host-1.example".into()],
            &ca,
            30,
            "member",
        )
        .expect("issue");
        assert_eq!(mode(&m.key), 0o600);
        assert_eq!(
            m.names,
            ["shadowcache", "host-1", "10.0.0.7", "host-1.example"]
        );
        let (expires, subject) = not_after(&m.cert).expect("parse");
        let days = expires
            .duration_since(SystemTime::now())
            .expect("in the future")
            .as_secs()
            / 86_400;
        assert!((29..=30).contains(&days), "{days} days");
        assert!(subject.contains("CN=host-1"), "{subject}");
        let err = issue(&ca, "host-1", &[], &ca, 30, "member").expect_err("the same member twice");
        assert!(format!("{err:#}").contains("exists already"), "{err:#}");
        for bad in ["", "a/b", "../x"] {
            assert!(issue(&ca, bad, &[], &ca, 30, "member").is_err(), "{bad:?}");
        }
        assert!(issue(&dir.path().join("none"), "h", &[], &ca, 30, "member").is_err());
        // A member's certificate never outlives its CA.
        let short = dir.path().join("short-ca");
        init(&short, "short", 10).expect("init");
        let m = issue(&short, "h3", &[], &short, 397, "member").expect("issue");
        let left = m
            .not_after
            .duration_since(SystemTime::now())
            .expect("future")
            .as_secs();
        assert!(left <= 10 * 86_400, "{left} s: past the CA's 10 days");
        assert!(issue(&ca, "h2", &["not a name!".into()], &ca, 30, "member").is_err());
        assert!(
            issue(&ca, "h4", &[], &ca, 30, "root").is_err(),
            "an unknown role"
        );
    }
}
