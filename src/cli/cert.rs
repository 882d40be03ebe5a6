//! `taskcred cert ...`: get an X509-SVID for a task, or ask whether one is active.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::shared::{
    answer, cannot_write, capped, duration_pb, emit, exit_code, introspect, open, rfc3339,
    write_chain,
};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::credential_service_client::CredentialServiceClient;
use crate::client::read;

/// `taskcred cert ...`.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Get an X509-SVID for an approved task, as its executor. Without --csr a P-256 key is
    /// made locally and written to --out-key (0600); the private key never leaves this machine.
    Issue {
        /// The task id.
        #[arg(long)]
        task: String,
        /// Where to write the certificate followed by its chain (PEM).
        #[arg(long, value_name = "FILE")]
        out_cert: PathBuf,
        /// Where to write the new private key (PEM, 0600); not with --csr.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "csr",
            conflicts_with = "csr"
        )]
        out_key: Option<PathBuf>,
        /// Use this PKCS#10 request (DER or PEM) instead of making a key.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        /// Lifetime asked, e.g. 5m (at most the task's ceiling and deadline).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Makes a retry safe: run again with the same id (1 to 64 of A-Z a-z 0-9 _ -) after a
        /// lost answer or "outcome unknown", and no second lease is made (a
        /// certificate already issued under it is refused, naming its lease: renew that one).
        #[arg(long, value_name = "ID", default_value = "")]
        request_id: String,
    },
    /// Ask the broker whether a certificate it issued is active; prints the answer as JSON.
    Introspect {
        /// The certificate (PEM or DER).
        file: PathBuf,
    },
}

/// Runs a `cert` subcommand.
pub async fn run(args: &ClientArgs, command: &CertCommand) -> ExitCode {
    exit_code(args, execute(args, command).await).await
}

/// Writes `contents` to `path` readable by its owner only, whatever mode it had.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), ClientError> {
    let err = cannot_write(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(&err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(&err)?;
    f.write_all(contents).map_err(err)
}

async fn execute(args: &ClientArgs, command: &CertCommand) -> Result<(), ClientError> {
    match command {
        CertCommand::Issue {
            task,
            out_cert,
            out_key,
            csr,
            ttl,
            request_id,
        } => {
            // The key is made (and the request signed) before anything is sent.
            let (csr, key_pem) = match (csr, out_key) {
                (Some(path), _) => (read("CSR", path)?, None),
                (None, Some(_)) => {
                    let key = rcgen::KeyPair::generate()
                        .map_err(|e| ClientError::Usage(format!("generating a key: {e}")))?;
                    let request = rcgen::CertificateParams::default()
                        .serialize_request(&key)
                        .map_err(|e| ClientError::Usage(format!("making the CSR: {e}")))?;
                    (
                        request.der().to_vec(),
                        Some(zeroize::Zeroizing::new(key.serialize_pem())),
                    )
                }
                (None, None) => {
                    return Err(ClientError::Usage("--out-key or --csr is required".into()));
                }
            };
            let mut client = open(args, CredentialServiceClient::new).await?;
            let r = answer(client.issue_certificate(pb::IssueCertificateRequest {
                task_id: task.clone(),
                csr,
                ttl: duration_pb(*ttl),
                request_id: request_id.clone(),
            }))
            .await?;
            if let (Some(path), Some(pem)) = (out_key, &key_pem) {
                write_private(path, pem.as_bytes())?;
            }
            write_chain(out_cert, &r.certificate_pem, &r.chain_pem)?;
            let ttl_capped = capped(*ttl, r.ttl);
            let expires = rfc3339(r.expires_at);
            emit(
                args,
                &json!({
                    "cert": out_cert,
                    "key": out_key,
                    "lease_id": r.lease_id,
                    "serial": r.serial,
                    "expires_at": expires,
                    "ttl_secs": r.ttl.map(|d| d.seconds),
                    "ttl_capped": ttl_capped,
                }),
                format_args!(
                    "certificate {} (serial {}, lease {}) expires {expires}",
                    out_cert.display(),
                    r.serial,
                    r.lease_id
                ),
            );
        }
        CertCommand::Introspect { file } => {
            let mut client = open(args, CredentialServiceClient::new).await?;
            let request = pb::IntrospectRequest {
                token: String::new(),
                certificate: read("certificate", file)?,
            };
            introspect(&mut client, request, |r| {
                let mut v = json!({
                    "active": true,
                    "sub": r.sub,
                    "exp": r.exp,
                    "iat": r.iat,
                    "serial": r.serial,
                    "task_id": r.task_id,
                });
                if !r.root_task_id.is_empty() {
                    v["root_task_id"] = json!(r.root_task_id);
                    v["parent_task_id"] = json!(r.parent_task_id);
                }
                v
            })
            .await?;
        }
    }
    Ok(())
}
