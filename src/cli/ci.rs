//! `taskcred ci ...`: what a CI pipeline runs. Its CI provider's ID token (a file, or `-` for
//! standard input) is the only proof; no client certificate is needed (`--ca` still names the
//! CA that signed the broker's certificate).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde_json::json;

use super::shared::{answer, duration_pb, emit, exit_code, open, read_csr, rfc3339};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::ci_service_client::CiServiceClient;
use crate::ci::MAX_ID_TOKEN_BYTES;

/// How `ci exchange` prints the credential.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The bare token (or the certificate PEM).
    #[default]
    Token,
    /// `export TASKCRED_...=` lines for `eval`.
    Env,
    /// One JSON object.
    Json,
}

/// The outcome `ci complete` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum CiOutcome {
    /// The job did its work.
    #[default]
    Succeeded,
    /// The job failed (policy may lock the repository's CI identity).
    Failed,
    /// The job was cancelled.
    Cancelled,
}

/// `taskcred ci ...`.
#[derive(Debug, Subcommand)]
pub enum CiCommand {
    /// Exchange the job's ID token for a credential of the job's task, for one audience.
    Exchange {
        /// The CI provider's ID token: a file, or - for standard input.
        #[arg(long, value_name = "FILE|-")]
        id_token: PathBuf,
        /// The audience of the credential.
        #[arg(long)]
        audience: String,
        /// An action asked for at the audience; repeat for more (at least one).
        #[arg(long = "action", value_name = "ACTION", required = true)]
        actions: Vec<String>,
        /// Lifetime asked, e.g. 5m (never past the ID token's expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// A CSR (PEM or DER): get an X509-SVID instead of a JWT.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        /// token: the bare credential; env: export lines; json: one object.
        #[arg(long, value_enum, default_value_t = Format::Token)]
        format: Format,
    },
    /// End the job's task (its last step): every credential of it is revoked.
    Complete {
        /// An ID token of the same job: a file, or - for standard input.
        #[arg(long, value_name = "FILE|-")]
        id_token: PathBuf,
        /// How the job ended.
        #[arg(long, value_enum, default_value_t = CiOutcome::Succeeded)]
        outcome: CiOutcome,
    },
}

/// Runs a `ci` subcommand.
pub async fn run(args: &ClientArgs, command: &CiCommand) -> ExitCode {
    exit_code(args, execute(args, command).await).await
}

fn read_token(path: &PathBuf) -> Result<String, ClientError> {
    let mut text = String::new();
    let limit = (MAX_ID_TOKEN_BYTES + 2) as u64;
    let result = if path.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_string(&mut text))
    };
    result.map_err(|e| {
        ClientError::Usage(format!("cannot read the ID token {}: {e}", path.display()))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ClientError::Usage(format!(
            "the ID token {} is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

async fn execute(args: &ClientArgs, command: &CiCommand) -> Result<(), ClientError> {
    match command {
        CiCommand::Exchange {
            id_token,
            audience,
            actions,
            ttl,
            csr,
            format,
        } => {
            let csr = read_csr(csr.as_ref())?;
            let request = pb::ExchangeCiTokenRequest {
                id_token: read_token(id_token)?,
                audience: audience.clone(),
                actions: actions.clone(),
                ttl: duration_pb(*ttl),
                csr,
            };
            let mut client = open(args, CiServiceClient::new).await?;
            let r = answer(client.exchange_ci_token(request)).await?;
            let expires_at = rfc3339(r.expires_at);
            match (format, args.json) {
                (Format::Json, _) | (_, true) => crate::outln!(
                    "{}",
                    json!({
                        "token": r.token,
                        "certificate_pem": r.certificate_pem,
                        "chain_pem": r.chain_pem,
                        "lease_id": r.lease_id,
                        "credential_id": r.credential_id,
                        "expires_at": expires_at,
                        "ttl_secs": r.ttl.map(|d| d.seconds),
                        "task_id": r.task_id,
                        "identity": r.identity,
                    })
                ),
                (Format::Env, false) => {
                    let credential = if r.token.is_empty() {
                        ("TASKCRED_CERTIFICATE_PEM", &r.certificate_pem)
                    } else {
                        ("TASKCRED_TOKEN", &r.token)
                    };
                    for (k, v) in [
                        credential,
                        ("TASKCRED_LEASE_ID", &r.lease_id),
                        ("TASKCRED_TASK_ID", &r.task_id),
                        ("TASKCRED_EXPIRES_AT", &expires_at),
                    ] {
                        crate::outln!("export {k}={}", shell_quote(v));
                    }
                }
                (Format::Token, false) => {
                    if r.token.is_empty() {
                        crate::out!("{}", r.certificate_pem);
                    } else {
                        crate::outln!("{}", r.token);
                    }
                }
            }
        }
        CiCommand::Complete { id_token, outcome } => {
            let outcome = match outcome {
                CiOutcome::Succeeded => pb::Outcome::Succeeded,
                CiOutcome::Failed => pb::Outcome::Failed,
                CiOutcome::Cancelled => pb::Outcome::Cancelled,
            };
            let mut client = open(args, CiServiceClient::new).await?;
            let r = answer(client.complete_ci_task(pb::CompleteCiTaskRequest {
                id_token: read_token(id_token)?,
                outcome: outcome.into(),
            }))
            .await?;
            let task = r.task.unwrap_or_default();
            emit(
                args,
                &json!({"task_id": task.id, "revoked_leases": r.revoked_leases}),
                format_args!(
                    "task {} ended; {} credential(s) revoked",
                    task.id, r.revoked_leases
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn env_values_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("a.b-c"), "'a.b-c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
