//! A gRPC client over mutual TLS to the broker: how to reach it and who to be ([`ClientArgs`],
//! the global flags of every client subcommand), and [`connect`], which opens the channel with
//! the CA bundle and a client certificate from `--cert/--key` or the dev identity named by
//! `--as`. The `cli` subcommands and `bench` both use it; it uses neither.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::devpki;

/// Global client flags; each also reads its `TASKCRED_*` variable.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The broker's gRPC URL.
    #[arg(
        long,
        global = true,
        env = "TASKCRED_BROKER",
        default_value = "https://127.0.0.1:7443"
    )]
    pub broker: String,
    /// CA bundle (PEM) that signed the broker's certificate [default: <dev-dir>/ca.pem].
    #[arg(long, global = true, env = "TASKCRED_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) presenting your SPIFFE ID.
    #[arg(long, global = true, env = "TASKCRED_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, global = true, env = "TASKCRED_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Use dev identity NAME from the dev dir (agent, agent2, agent3, requester, approver, approver2, operator, verifier).
    #[arg(long = "as", global = true, value_name = "NAME", conflicts_with_all = ["cert", "key"])]
    pub as_name: Option<String>,
    /// The dev directory of `dev init` and `serve --dev`.
    #[arg(long, global = true, env = "TASKCRED_DEV_DIR", default_value = devpki::DEFAULT_DIR)]
    pub dev_dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Flags or files are wrong; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The broker could not be reached or the TLS handshake failed.
    #[error("cannot reach the broker at {broker}: {message}")]
    Unreachable {
        /// The URL.
        broker: String,
        /// Why, with the whole error chain.
        message: String,
    },
    /// The broker answered with an error status: its code, its stable reason (the status's
    /// `google.rpc.ErrorInfo`, when it has one) and its message.
    #[error("broker refused: {}{}: {}", crate::api::code_name(.0.code()), reason_suffix(.0), .0.message())]
    Refused(tonic::Status),
    /// The broker answered that the credential asked about is not active (its answer was
    /// printed).
    #[error("the credential is not active")]
    Inactive,
    /// The TLS connection was refused, by the broker (its alert) or by this client (the
    /// broker's certificate): what it means, and the error as it came.
    #[error("TLS refused: {explanation} ({detail})")]
    Tls {
        /// What the refusal means, in words.
        explanation: &'static str,
        /// The error chain.
        detail: String,
    },
}

/// What a failed TLS connection means, from the rustls error in `error`'s chain: the alert the
/// broker sent about this client's certificate, or why this client refused the broker's.
pub fn explain_tls(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    let mut next = Some(error);
    while let Some(e) = next {
        let found = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        let said = match found {
            Some(rustls::Error::AlertReceived(alert)) => match alert {
                // A CA of the same name that did not sign it (a bad signature) is another CA.
                Alert::UnknownCA | Alert::DecryptError | Alert::BadCertificateHashValue => Some(
                    "the broker does not trust the CA that signed your certificate: it must \
                     chain to the bundle of its SPIFFE ID's trust domain",
                ),
                Alert::CertificateExpired => {
                    Some("the broker refused your certificate as expired or not yet valid")
                }
                Alert::CertificateRevoked => Some("the broker refused your certificate as revoked"),
                Alert::CertificateRequired => Some(
                    "the broker requires a client certificate here (--as NAME, or --cert and --key)",
                ),
                Alert::AccessDenied => Some(
                    "the broker refused your certificate's identity: its SPIFFE ID must be in a \
                     trust domain the broker serves, bound to that domain's bundle",
                ),
                Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateUnknown => Some(
                    "the broker refused your certificate: it must be an X509-SVID (one URI \
                         SAN spiffe://<trust domain>/<path>, key usage digitalSignature, extended \
                         key usage clientAuth, not a CA)",
                ),
                _ => None,
            },
            Some(rustls::Error::InvalidCertificate(cert)) => match cert {
                Cert::UnknownIssuer => Some(
                    "the broker's certificate is not signed by the CA given with --ca (or \
                     <dev-dir>/ca.pem)",
                ),
                Cert::Expired | Cert::ExpiredContext { .. } => {
                    Some("the broker's certificate has expired")
                }
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                    Some("the broker's certificate does not name the host of --broker")
                }
                _ => Some("this client refused the broker's certificate"),
            },
            _ => None,
        };
        if said.is_some() {
            return said;
        }
        next = e.source();
    }
    None
}

/// Exit code of a refusal: the broker said no, or the command failed for good.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code of bad usage: flags or files are wrong, nothing was sent.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of an introspection whose credential is not active.
pub const EXIT_INACTIVE: u8 = 3;
/// Exit code of a failure worth retrying: the broker unreachable, unavailable, over a rate
/// limit, or timed out (`EX_UNAVAILABLE` of sysexits.h).
pub const EXIT_RETRY: u8 = 69;

/// ` (REASON)` for a status with a stable reason, else nothing.
fn reason_suffix(status: &tonic::Status) -> String {
    crate::api::reason_of(status).map_or_else(String::new, |r| format!(" ({r})"))
}

impl ClientError {
    /// Whether trying again later may succeed (the broker unreachable or unavailable, a rate
    /// limit, a timeout), as opposed to a refusal that stands.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
            ),
            Self::Usage(_) | Self::Inactive | Self::Tls { .. } => false,
        }
    }

    /// The exit code: [`EXIT_USAGE`], [`EXIT_INACTIVE`], [`EXIT_RETRY`] or [`EXIT_REFUSED`].
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Inactive => EXIT_INACTIVE,
            e if e.retryable() => EXIT_RETRY,
            _ => EXIT_REFUSED,
        }
    }

    /// The error as one JSON object: `{"error": {"code", "reason", "message", "retryable"}}`;
    /// `code` is the gRPC code's name (or `USAGE`, `UNREACHABLE`), `reason` the broker's stable
    /// reason when it gave one.
    pub fn to_json(&self) -> serde_json::Value {
        let (code, reason, message) = match self {
            Self::Usage(m) => ("USAGE", None, m.clone()),
            Self::Unreachable { .. } => ("UNREACHABLE", None, self.to_string()),
            Self::Refused(s) => (
                crate::api::code_name(s.code()),
                crate::api::reason_of(s),
                s.message().to_owned(),
            ),
            Self::Inactive => ("INACTIVE", None, self.to_string()),
            Self::Tls { .. } => ("TLS_REFUSED", None, self.to_string()),
        };
        serde_json::json!({"error": {
            "code": code,
            "reason": reason,
            "message": message,
            "retryable": self.retryable(),
        }})
    }

    /// Reports the error (one line on stderr; with `json`, one JSON object on stdout instead)
    /// and gives the exit code. An inactive credential's answer was printed already.
    pub fn report(&self, json: bool) -> ExitCode {
        match (self, json) {
            (Self::Inactive, _) => {}
            (_, true) => crate::outln!("{}", self.to_json()),
            (_, false) => crate::errln!("error: {self}"),
        }
        ExitCode::from(self.exit_code())
    }
}

/// Reads the file at `path` (at most 1 MiB); `what` names it in the error.
///
/// # Errors
/// [`ClientError::Usage`] when the file cannot be read.
pub(crate) fn read(what: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    use std::io::Read as _;
    let cannot = |e: std::io::Error| {
        ClientError::Usage(format!("cannot read {what} {}: {e}", path.display()))
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ClientError::Usage(format!(
            "{what} {} is over {} KiB: not a certificate, key or CSR",
            path.display(),
            MAX_FILE_BYTES / 1024
        )));
    }
    Ok(bytes)
}

/// The largest certificate, key, CA bundle or CSR file the client reads.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The certificate and key files to present, if any.
pub(crate) fn identity_files(args: &ClientArgs) -> Result<Option<(PathBuf, PathBuf)>, ClientError> {
    if let Some(name) = &args.as_name {
        if !devpki::IDENTITIES.iter().any(|(n, _)| n == name) {
            let names: Vec<&str> = devpki::IDENTITIES.iter().map(|(n, _)| *n).collect();
            return Err(ClientError::Usage(format!(
                "--as {name:?}: not a dev identity (one of {})",
                names.join(", ")
            )));
        }
        return Ok(Some(devpki::identity_files(&args.dev_dir, name)));
    }
    Ok(match (&args.cert, &args.key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => return Err(ClientError::Usage("--cert and --key go together".into())),
    })
}

/// Opens a channel to the broker.
///
/// # Errors
/// [`ClientError::Usage`] for bad flags or unreadable files, [`ClientError::Unreachable`] when
/// the connection or handshake fails.
pub async fn connect(args: &ClientArgs) -> Result<Channel, ClientError> {
    if !args.broker.starts_with("https://") {
        return Err(ClientError::Usage(format!(
            "--broker {}: the broker speaks TLS only; use an https:// URL",
            args.broker
        )));
    }
    let ca_path = args
        .ca
        .clone()
        .unwrap_or_else(|| args.dev_dir.join(devpki::CA_CERT));
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("CA bundle", &ca_path)?));
    if let Some((cert, key)) = identity_files(args)? {
        tls = tls.identity(Identity::from_pem(
            read("client certificate", &cert)?,
            read("client key", &key)?,
        ));
    }
    let endpoint = Endpoint::from_shared(args.broker.clone())
        .map_err(|e| ClientError::Usage(format!("--broker {}: {e}", args.broker)))?
        .tls_config(tls)
        .map_err(|e| ClientError::Usage(format!("TLS settings: {}", chain(&e))))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    endpoint.connect().await.map_err(|e| match explain_tls(&e) {
        Some(explanation) => ClientError::Tls {
            explanation,
            detail: chain(&e),
        },
        None => ClientError::Unreachable {
            broker: args.broker.clone(),
            message: chain(&e),
        },
    })
}

/// An error and its sources on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// A refusal that came as a bare transport error (`UNKNOWN` or `CANCELLED`, no reason from the
/// broker: with TLS 1.3 the broker judges a client certificate after the client thinks the
/// handshake done, and its alert is lost in the connection's teardown) is explained by one more
/// handshake with the same files, whose alert this client reads itself. Anything else is
/// returned as it is.
pub async fn explained(args: &ClientArgs, e: ClientError) -> ClientError {
    let ClientError::Refused(status) = &e else {
        return e;
    };
    if !matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
        || crate::api::reason_of(status).is_some()
    {
        return e;
    }
    match diagnose(args).await {
        Some((explanation, detail)) => ClientError::Tls {
            explanation,
            detail,
        },
        None => e,
    }
}

/// One TLS handshake with the broker presenting the client's files, then a read: the broker's
/// alert, if it sends one, explained.
async fn diagnose(args: &ClientArgs) -> Option<(&'static str, String)> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt as _;

    let uri: http::Uri = args.broker.parse().ok()?;
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let ca_path = args
        .ca
        .clone()
        .unwrap_or_else(|| args.dev_dir.join(devpki::CA_CERT));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca_path).ok()? {
        roots.add(cert.ok()?).ok()?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match identity_files(args).ok()? {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                .ok()?
                .collect::<Result<_, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_file(&key).ok()?;
            builder.with_client_auth_cert(chain, key).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(host.clone()).ok()?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let mut tls = connector.connect(name, tcp).await?;
        // The broker's first bytes (its HTTP/2 SETTINGS), or its alert.
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await.map(|_| ())
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Err(e)) => explain_tls(&e).map(|x| (x, chain(&e))),
        _ => None,
    }
}
