//! `taskcred lease ...`: renew or revoke one lease; list leases (operators).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use super::shared::{
    answer, duration_pb, emit, exit_code, open, read_csr, rfc3339, rfc3339_opt, write_chain,
};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::admin_service_client::AdminServiceClient;
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
    /// List leases (operators): newest task first, one line each (with --json, one object
    /// with every lease and its state).
    List {
        /// Only this agent's (a SPIFFE ID).
        #[arg(long, value_name = "SPIFFE_ID")]
        agent: Option<String>,
        /// Only this task's.
        #[arg(long, value_name = "ID")]
        task: Option<String>,
        /// Only in this state: active, revoked or expired.
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
        /// Print at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// Runs a `lease` subcommand.
pub async fn run(args: &ClientArgs, command: &LeaseCommand) -> ExitCode {
    exit_code(args, execute(args, command).await).await
}

async fn execute(args: &ClientArgs, command: &LeaseCommand) -> Result<(), ClientError> {
    match command {
        LeaseCommand::Renew {
            id,
            ttl,
            csr,
            out_cert,
        } => {
            let csr = read_csr(csr.as_ref())?;
            let mut client = open(args, CredentialServiceClient::new).await?;
            let r = answer(client.renew_lease(pb::RenewLeaseRequest {
                lease_id: id.clone(),
                ttl: duration_pb(*ttl),
                csr,
            }))
            .await?;
            if let Some(out) = out_cert {
                write_chain(out, &r.certificate_pem, &r.chain_pem)?;
            }
            let expires = rfc3339(r.expires_at);
            let left = r.renewal_left.map_or(0, |d| d.seconds);
            if args.json {
                crate::outln!(
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
                crate::outln!("{}", r.token);
                crate::errln!("renewed until {expires}; renewable for {left}s more");
            } else {
                crate::outln!("renewed until {expires}; renewable for {left}s more");
            }
        }
        LeaseCommand::List {
            agent,
            task,
            state,
            limit,
        } => {
            list(
                args,
                agent.as_deref(),
                task.as_deref(),
                state.as_deref(),
                *limit,
            )
            .await?;
        }
        LeaseCommand::Revoke { id } => {
            let mut client = open(args, CredentialServiceClient::new).await?;
            let r = answer(client.revoke_lease(pb::RevokeLeaseRequest {
                lease_id: id.clone(),
            }))
            .await?;
            emit(
                args,
                &json!({"lease_id": r.lease_id, "revoked": r.credential_id}),
                format_args!(
                    "lease {} revoked (credential {})",
                    r.lease_id, r.credential_id
                ),
            );
        }
    }
    Ok(())
}

async fn list(
    args: &ClientArgs,
    agent: Option<&str>,
    task: Option<&str>,
    state: Option<&str>,
    limit: usize,
) -> Result<(), ClientError> {
    let mut client = open(args, AdminServiceClient::new).await?;
    let mut leases = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = answer(client.list_leases(pb::ListLeasesRequest {
            agent: agent.unwrap_or_default().to_owned(),
            task_id: task.unwrap_or_default().to_owned(),
            state: state.unwrap_or_default().to_owned(),
            page_size: 500,
            page_token,
        }))
        .await?;
        leases.extend(page.leases);
        if page.next_page_token.is_empty() || leases.len() >= limit {
            break;
        }
        page_token = page.next_page_token;
    }
    leases.truncate(limit);
    if args.json {
        let all: Vec<Value> = leases
            .iter()
            .map(|l| {
                json!({
                    "lease_id": l.lease_id,
                    "task_id": l.task_id,
                    "agent": l.agent,
                    "kind": l.kind,
                    "credential_id": l.credential_id,
                    "audience": Some(&l.audience).filter(|a| !a.is_empty()),
                    "actions": l.actions,
                    "state": l.state,
                    "issued_at": rfc3339_opt(l.issued_at),
                    "expires_at": rfc3339_opt(l.expires_at),
                    "renew_until": rfc3339_opt(l.renew_until),
                    "ended_at": rfc3339_opt(l.ended_at),
                    "reason": Some(&l.reason).filter(|r| !r.is_empty()),
                })
            })
            .collect();
        crate::outln!("{}", json!({ "leases": all }));
    } else if leases.is_empty() {
        crate::outln!("no lease");
    } else {
        for l in &leases {
            crate::outln!(
                "{}  {:<7}  {:<4}  expires {}  task {}  {}{}",
                l.lease_id,
                l.state,
                l.kind,
                rfc3339_opt(l.expires_at).unwrap_or_default(),
                l.task_id,
                l.agent,
                if l.reason.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", l.reason)
                }
            );
        }
    }
    Ok(())
}
