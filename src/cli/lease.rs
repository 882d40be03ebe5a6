//! `taskcred lease ...`: renew or revoke one lease.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::{ClientArgs, ClientError, connect, rfc3339};
use crate::api::pb;
use crate::api::pb::credential_service_client::CredentialServiceClient;

/// `taskcred lease ...`.
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Get a fresh credential under the same lease (the previous one is revoked). A JWT lease
    /// prints the new token; a certificate lease needs --csr and --out-cert.
    Renew {
        /// The lease id.
        id: String,
        /// Lifetime asked; refused if it would pass the lease's renewal ceiling.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// For a certificate lease: the CSR (DER or PEM) of the key to certify.
        #[arg(long, value_name = "FILE", requires = "out_cert")]
        csr: Option<PathBuf>,
        /// For a certificate lease: where to write the certificate and its chain.
        #[arg(long, value_name = "FILE", requires = "csr")]
        out_cert: Option<PathBuf>,
    },
    /// End a lease: its credential stops being active at once.
    Revoke {
        /// The lease id.
        id: String,
    },
}

/// Runs a `lease` subcommand.
pub async fn run(args: &ClientArgs, command: &LeaseCommand) -> ExitCode {
    match execute(args, command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

async fn execute(args: &ClientArgs, command: &LeaseCommand) -> Result<(), ClientError> {
    match command {
        LeaseCommand::Renew {
            id,
            ttl,
            csr,
            out_cert,
        } => {
            let csr = match csr {
                Some(p) => std::fs::read(p).map_err(|e| {
                    ClientError::Usage(format!("cannot read CSR {}: {e}", p.display()))
                })?,
                None => Vec::new(),
            };
            let r = CredentialServiceClient::new(connect(args).await?)
                .renew_lease(pb::RenewLeaseRequest {
                    lease_id: id.clone(),
                    ttl: ttl.and_then(|d| prost_types::Duration::try_from(d).ok()),
                    csr,
                })
                .await
                .map_err(ClientError::Refused)?
                .into_inner();
            if let Some(out) = out_cert {
                std::fs::write(out, format!("{}{}", r.certificate_pem, r.chain_pem)).map_err(
                    |e| ClientError::Usage(format!("cannot write {}: {e}", out.display())),
                )?;
            }
            let expires = rfc3339(r.expires_at);
            let left = r.renewal_left.map_or(0, |d| d.seconds);
            if args.json {
                println!(
                    "{}",
                    json!({
                        "lease_id": r.lease_id,
                        "credential_id": r.credential_id,
                        "expires_at": expires,
                        "ttl_secs": r.ttl.map(|d| d.seconds),
                        "renewal_left_secs": left,
                        "token": (!r.token.is_empty()).then_some(&r.token),
                    })
                );
            } else if !r.token.is_empty() {
                println!("{}", r.token);
                eprintln!("renewed until {expires}; renewable for {left}s more");
            } else {
                println!("renewed until {expires}; renewable for {left}s more");
            }
        }
        LeaseCommand::Revoke { id } => {
            let r = CredentialServiceClient::new(connect(args).await?)
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: id.clone(),
                })
                .await
                .map_err(ClientError::Refused)?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({"lease_id": r.lease_id, "revoked": r.credential_id})
                );
            } else {
                println!(
                    "lease {} revoked (credential {})",
                    r.lease_id, r.credential_id
                );
            }
        }
    }
    Ok(())
}
