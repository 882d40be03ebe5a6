//! The development setup of `taskcred dev init` and `serve --dev`: a root CA, the issuing CA of
//! X509-SVIDs below it, the broker's server certificate, the JWT signing key and a client
//! certificate for each dev identity, all made
//! with rcgen into one directory, plus the dev Cedar policies (`policies/`, copied from the
//! built-in `config/policies`). Private keys are written 0600 in a 0700 directory; files that
//! exist are kept, so running it again changes nothing (edit the copied policies freely).
//!
//! Never for production: the CA key sits next to the certificates it signs.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// The dev trust domain.
pub const TRUST_DOMAIN: &str = "taskcred.dev";

/// Default dev directory, relative to the working directory.
pub const DEFAULT_DIR: &str = ".taskcred-dev";

/// The dev identities: the short name used by `--as` and file names, and the SPIFFE ID.
pub const IDENTITIES: [(&str, &str); 8] = [
    ("agent", "spiffe://taskcred.dev/agent/demo"),
    ("agent2", "spiffe://taskcred.dev/agent/helper"),
    ("agent3", "spiffe://taskcred.dev/agent/tester"),
    ("requester", "spiffe://taskcred.dev/human/requester"),
    ("approver", "spiffe://taskcred.dev/human/approver"),
    ("approver2", "spiffe://taskcred.dev/human/approver2"),
    ("operator", "spiffe://taskcred.dev/human/operator"),
    ("verifier", "spiffe://taskcred.dev/verifier/demo"),
];

/// Root CA certificate: the trust bundle of both sides.
pub const CA_CERT: &str = "ca.pem";
/// Root CA key.
pub const CA_KEY: &str = "ca-key.pem";
/// The broker's server certificate.
pub const SERVER_CERT: &str = "server.pem";
/// The broker's server key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The JWT signing key (ES256, PKCS#8).
pub const JWT_KEY: &str = "jwt-key.pem";
/// The dev policy directory.
pub const POLICY_DIR: &str = "policies";
/// The organization of the dev PKI's CA certificates: how a trust bundle made by `dev init` is
/// recognized outside `--dev`.
pub const ORGANIZATION: &str = "taskcred development";
/// The issuing CA of X509-SVIDs (an intermediate below the root).
pub const ISSUING_CA_CERT: &str = "issuing-ca.pem";
/// Its key.
pub const ISSUING_CA_KEY: &str = "issuing-ca-key.pem";

/// The development policies of `serve --dev` (`config/policies/`), built in so that `dev init`
/// can write them into the dev directory.
pub const DEV_POLICIES: &[(&str, &str)] = &[
    (
        "tasks.cedar",
        include_str!("../config/policies/tasks.cedar"),
    ),
    (
        "admin.cedar",
        include_str!("../config/policies/admin.cedar"),
    ),
    (
        "credentials.cedar",
        include_str!("../config/policies/credentials.cedar"),
    ),
    ("ci.cedar", include_str!("../config/policies/ci.cedar")),
];

/// Why the dev PKI could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevPkiError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Key or certificate generation failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being made.
        what: String,
        /// Why.
        source: rcgen::Error,
    },
    /// One file of a certificate/key pair exists without the other.
    #[error("{present} exists but {missing} does not: remove {present} to regenerate the pair")]
    HalfPair {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
}

/// What `init` did.
#[derive(Debug, Default)]
pub struct InitReport {
    /// Files written by this run.
    pub created: Vec<PathBuf>,
    /// Files that existed and were kept.
    pub kept: Vec<PathBuf>,
}

/// Creates whatever of the dev PKI is missing in `dir`.
///
/// # Errors
/// [`DevPkiError`] when a file cannot be written, a pair is half present, or generation fails.
pub fn init(dir: &Path) -> Result<InitReport, DevPkiError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DevPkiError::Io { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let mut report = InitReport::default();

    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    keep_or_make_pair(
        ca_cert.clone(),
        ca_key.clone(),
        "the dev CA key",
        |key| {
            ca_params()
                .self_signed(key)
                .map_err(gen_err("the dev CA certificate"))
        },
        &mut report,
    )?;
    let issuer = load_issuer(&ca_cert, &ca_key)?;

    // Signed by the dev CA: the broker's server certificate, and the issuing CA of X509-SVIDs.
    type Params = fn() -> Result<CertificateParams, DevPkiError>;
    let signed: [(&str, &str, &str, Params); 2] = [
        (SERVER_CERT, SERVER_KEY, "the server", server_params),
        (
            ISSUING_CA_CERT,
            ISSUING_CA_KEY,
            "the issuing CA",
            issuing_ca_params,
        ),
    ];
    for (cert, key, what, params) in signed {
        keep_or_make_pair(
            dir.join(cert),
            dir.join(key),
            &format!("{what} key"),
            |key| {
                params()?
                    .signed_by(key, &issuer)
                    .map_err(gen_err(&format!("{what} certificate")))
            },
            &mut report,
        )?;
    }

    let jwt_key = dir.join(JWT_KEY);
    if jwt_key.exists() {
        report.kept.push(jwt_key);
    } else {
        let key = generate_key("the JWT signing key")?;
        write_new(&jwt_key, &key.serialize_pem(), 0o600)?;
        report.created.push(jwt_key);
    }

    let policies = dir.join(POLICY_DIR);
    if policies.exists() {
        report.kept.push(policies);
    } else {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&policies)
            .map_err(io(&policies))?;
        for (name, text) in DEV_POLICIES {
            let path = policies.join(name);
            write_new(&path, text, 0o644)?;
            report.created.push(path);
        }
    }

    for (name, spiffe_id) in IDENTITIES {
        let (cert_path, key_path) = identity_files(dir, name);
        keep_or_make_pair(
            cert_path,
            key_path,
            &format!("the key of {name}"),
            |key| {
                client_params(name, spiffe_id)?
                    .signed_by(key, &issuer)
                    .map_err(gen_err(&format!("the certificate of {name}")))
            },
            &mut report,
        )?;
    }
    Ok(report)
}

/// The certificate and key files of dev identity `name` in `dir`.
pub fn identity_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    )
}

/// Whether the dev PKI in `dir` is complete.
pub fn is_complete(dir: &Path) -> bool {
    let mut files = vec![
        dir.join(CA_CERT),
        dir.join(CA_KEY),
        dir.join(SERVER_CERT),
        dir.join(SERVER_KEY),
        dir.join(JWT_KEY),
        dir.join(POLICY_DIR),
        dir.join(ISSUING_CA_CERT),
        dir.join(ISSUING_CA_KEY),
    ];
    for (name, _) in IDENTITIES {
        let (c, k) = identity_files(dir, name);
        files.extend([c, k]);
    }
    files.iter().all(|f| f.exists())
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> DevPkiError + '_ {
    move |source| DevPkiError::Generate {
        what: what.to_owned(),
        source,
    }
}

fn generate_key(what: &str) -> Result<KeyPair, DevPkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err(what))
}

fn pair_exists(cert: &Path, key: &Path) -> Result<bool, DevPkiError> {
    match (cert.exists(), key.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(DevPkiError::HalfPair {
            present: cert.to_owned(),
            missing: key.to_owned(),
        }),
        (false, true) => Err(DevPkiError::HalfPair {
            present: key.to_owned(),
            missing: cert.to_owned(),
        }),
    }
}

fn load_issuer(cert: &Path, key: &Path) -> Result<Issuer<'static, KeyPair>, DevPkiError> {
    let read = |p: &Path| {
        fs::read_to_string(p).map_err(|source| DevPkiError::Io {
            path: p.to_owned(),
            source,
        })
    };
    let key = KeyPair::from_pem(&read(key)?).map_err(gen_err("loading the dev CA key"))?;
    Issuer::from_ca_cert_pem(&read(cert)?, key).map_err(gen_err("loading the dev CA certificate"))
}

/// Keeps the certificate/key pair at `cert_path` and `key_path` when both exist; else makes a
/// P-256 key (`key_what` names it in errors), its certificate by `sign`, and writes both.
fn keep_or_make_pair(
    cert_path: PathBuf,
    key_path: PathBuf,
    key_what: &str,
    sign: impl FnOnce(&KeyPair) -> Result<rcgen::Certificate, DevPkiError>,
    report: &mut InitReport,
) -> Result<(), DevPkiError> {
    if pair_exists(&cert_path, &key_path)? {
        report.kept.extend([cert_path, key_path]);
        return Ok(());
    }
    let key = generate_key(key_what)?;
    let cert = sign(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    report.created.extend([cert_path, key_path]);
    Ok(())
}

/// Writes a new file with `mode` from its creation (no window where a key is world-readable).
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), DevPkiError> {
    let io = |source| DevPkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// A positive random serial of 128 bits (STANDARDS.md I).
fn random_serial() -> Result<SerialNumber, DevPkiError> {
    let bytes = crate::mint::random_serial()
        .map_err(|_| gen_err("a serial number")(rcgen::Error::RingUnspecified))?;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(days);
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "taskcred dev root CA");
    p.distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    // One intermediate below is allowed: the issuing CA of X509-SVIDs.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, 3650);
    p
}

fn issuing_ca_params() -> Result<CertificateParams, DevPkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "taskcred dev issuing CA");
    p.distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    // A signing certificate's SPIFFE ID is the trust domain's, without a path.
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}")
            .try_into()
            .map_err(gen_err("the issuing CA SAN"))?,
    )];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial()?);
    validity(&mut p, 3650);
    Ok(p)
}

fn server_params() -> Result<CertificateParams, DevPkiError> {
    let mut p = CertificateParams::new(vec!["localhost".to_owned()])
        .map_err(gen_err("the server certificate"))?;
    p.subject_alt_names.extend([
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ]);
    p.distinguished_name
        .push(DnType::CommonName, "taskcred dev broker");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial()?);
    validity(&mut p, 365);
    Ok(p)
}

fn client_params(name: &str, spiffe_id: &str) -> Result<CertificateParams, DevPkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names = vec![SanType::URI(
        spiffe_id.try_into().map_err(gen_err("a SPIFFE ID SAN"))?,
    )];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // X509-SVIDs carry both (SPIFFE asks for it when EKU is present).
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial()?);
    validity(&mut p, 365);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rustls_pki_types::pem::PemObject as _;

    use super::*;
    use crate::identity::{PeerIdentity, TrustDomains};
    use crate::mint::{JwtAlgorithm, JwtKey};

    #[test]
    fn init_writes_everything_with_private_keys_0600_and_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        let first = init(&dir).unwrap();
        assert!(first.kept.is_empty());
        assert!(is_complete(&dir));
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for f in &first.created {
            let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
            if f.to_string_lossy().ends_with("-key.pem") {
                assert_eq!(mode, 0o600, "{}", f.display());
            }
        }

        let before = fs::read(dir.join("agent.pem")).unwrap();
        let second = init(&dir).unwrap();
        assert!(second.created.is_empty());
        assert_eq!(before, fs::read(dir.join("agent.pem")).unwrap());

        // A missing identity is re-made from the existing CA; the rest is kept.
        fs::remove_file(dir.join("approver2.pem")).unwrap();
        fs::remove_file(dir.join("approver2-key.pem")).unwrap();
        let third = init(&dir).unwrap();
        assert_eq!(third.created.len(), 2);
    }

    #[test]
    fn identity_certs_are_svids_of_their_ids() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path()).unwrap();
        let allowed = TrustDomains::parse([TRUST_DOMAIN]).unwrap();
        for (name, id) in IDENTITIES {
            let pem = fs::read(tmp.path().join(format!("{name}.pem"))).unwrap();
            let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
            let peer = PeerIdentity::from_leaf(&der, &allowed).unwrap();
            assert_eq!(peer.id.as_str(), id);
        }
    }

    #[test]
    fn half_pair_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path()).unwrap();
        fs::remove_file(tmp.path().join("agent-key.pem")).unwrap();
        assert!(matches!(
            init(tmp.path()),
            Err(DevPkiError::HalfPair { .. })
        ));
    }

    /// The key `init` writes is what the broker loads: ES256, and only as ES256.
    #[test]
    fn loads_the_dev_key() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let key = JwtKey::load(&dir.path().join("jwt-key.pem"), JwtAlgorithm::ES256).unwrap();
        assert_eq!(key.kid().len(), 43);
        assert!(JwtKey::load(&dir.path().join("jwt-key.pem"), JwtAlgorithm::EdDSA).is_err());
        assert!(JwtKey::load(&dir.path().join("ca.pem"), JwtAlgorithm::ES256).is_err());
    }

    #[test]
    fn built_in_dev_policies_are_exactly_the_shipped_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
        let mut shipped: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect();
        shipped.sort();
        let mut built_in: Vec<(String, String)> = DEV_POLICIES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        built_in.sort();
        assert_eq!(built_in, shipped);
    }
}
