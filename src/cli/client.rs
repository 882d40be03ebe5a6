//! Connecting to a broker: TLS with the CA bundle, and a client certificate from `--cert/--key`
//! or the dev identity named by `--as`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::ClientArgs;
use crate::devpki;

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
    /// The broker answered with an error status.
    #[error("broker refused: {}: {}", crate::api::code_name(.0.code()), .0.message())]
    Refused(tonic::Status),
}

impl ClientError {
    /// Prints the error as one line on stderr and gives the exit code.
    pub fn report(&self) -> ExitCode {
        eprintln!("error: {self}");
        match self {
            Self::Usage(_) => ExitCode::from(2),
            Self::Unreachable { .. } | Self::Refused(_) => ExitCode::from(1),
        }
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Usage(format!("cannot read {what} {}: {e}", path.display())))
}

/// The certificate and key files to present, if any.
fn identity_files(args: &ClientArgs) -> Result<Option<(PathBuf, PathBuf)>, ClientError> {
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
    endpoint
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable {
            broker: args.broker.clone(),
            message: chain(&e),
        })
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
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
