//! `taskcred token ...`: get a task-bound JWT, or ask whether one is active.

use std::io::Read as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::shared::{answer, capped, duration_pb, exit_code, introspect, open, rfc3339};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::credential_service_client::CredentialServiceClient;

/// `taskcred token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Get a JWT for one audience of an approved task; prints the bare token (with --json,
    /// {token, lease_id, jti, expires_at}). As the task's executor.
    Issue {
        /// The task id.
        #[arg(long)]
        task: String,
        /// The audience (one of the task's grants).
        #[arg(long)]
        audience: String,
        /// An action of the grant; repeat for more [default: all of the grant's].
        #[arg(long = "action", value_name = "ACTION")]
        actions: Vec<String>,
        /// Lifetime asked, e.g. 30s, 5m (at most the task's ceiling and deadline).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Makes a retry safe: run again with the same id (1 to 64 of A-Z a-z 0-9 _ -) after a
        /// lost answer or "outcome unknown", and get the same token, never a second one.
        #[arg(long, value_name = "ID", default_value = "")]
        request_id: String,
    },
    /// Ask the broker whether a token is active; prints the RFC 7662 answer as JSON.
    Introspect {
        /// The token, or - to read it from standard input.
        token: String,
    },
}

/// Runs a `token` subcommand.
pub async fn run(args: &ClientArgs, command: &TokenCommand) -> ExitCode {
    exit_code(args, execute(args, command).await).await
}

async fn execute(args: &ClientArgs, command: &TokenCommand) -> Result<(), ClientError> {
    match command {
        TokenCommand::Issue {
            task,
            audience,
            actions,
            ttl,
            request_id,
        } => {
            let request = pb::IssueTokenRequest {
                task_id: task.clone(),
                audience: audience.clone(),
                actions: actions.clone(),
                ttl: duration_pb(*ttl),
                request_id: request_id.clone(),
            };
            let mut client = open(args, CredentialServiceClient::new).await?;
            let r = answer(client.issue_token(request)).await?;
            let ttl_capped = capped(*ttl, r.ttl);
            if args.json {
                crate::outln!(
                    "{}",
                    json!({
                        "token": r.token,
                        "lease_id": r.lease_id,
                        "jti": r.jti,
                        "expires_at": rfc3339(r.expires_at),
                        "ttl_secs": r.ttl.map(|d| d.seconds),
                        "ttl_capped": ttl_capped,
                    })
                );
            } else {
                crate::outln!("{}", r.token);
            }
        }
        TokenCommand::Introspect { token } => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .take(64 * 1024)
                    .read_to_string(&mut s)
                    .map_err(|e| {
                        ClientError::Usage(format!("reading the token from stdin: {e}"))
                    })?;
                s.trim().to_owned()
            } else {
                token.clone()
            };
            let mut client = open(args, CredentialServiceClient::new).await?;
            let request = pb::IntrospectRequest {
                token,
                certificate: Vec::new(),
            };
            introspect(&mut client, request, |r| {
                let mut v = json!({
                    "active": true,
                    "sub": r.sub,
                    "aud": r.aud,
                    "iss": r.iss,
                    "exp": r.exp,
                    "iat": r.iat,
                    "nbf": r.nbf,
                    "jti": r.jti,
                    "scope": r.scope,
                    "client_id": r.client_id,
                    "task_id": r.task_id,
                    "cnf": {"x5t#S256": r.cnf_x5t_s256},
                });
                // A delegated task's credential: the chain as RFC 8693 nests it.
                if let Some(act) = crate::mint::Actor::chain(&r.actors) {
                    v["act"] = json!(act);
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
