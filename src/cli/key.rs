//! `taskcred key ...`: rotate the broker's JWT signing key, revoke a compromised one.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::shared::{answer, emit, exit_code, open, rfc3339};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::admin_service_client::AdminServiceClient;

/// `taskcred key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Replace the signing key of the broker you connect to; the old key stays in the JWK Set
    /// until every token it signed has expired.
    Rotate,
    /// Drop a compromised signing key from the JWK Set at once (other replicas within 30 s);
    /// tokens it signed are refused from then on.
    Revoke {
        /// The key's kid, as the JWK Set lists it.
        kid: String,
    },
}

/// Runs a `key` subcommand.
pub async fn run(args: &ClientArgs, command: &KeyCommand) -> ExitCode {
    exit_code(args, execute(args, command).await).await
}

async fn execute(args: &ClientArgs, command: &KeyCommand) -> Result<(), ClientError> {
    match command {
        KeyCommand::Rotate => {
            let mut admin = open(args, AdminServiceClient::new).await?;
            let r = answer(admin.rotate_signing_key(pb::RotateSigningKeyRequest {})).await?;
            let until = rfc3339(r.previous_published_until);
            emit(
                args,
                &json!({"kid": r.kid, "previous_kid": r.previous_kid, "previous_published_until": until}),
                format_args!(
                    "signing with {}\n{} stays published until {until}",
                    r.kid, r.previous_kid
                ),
            );
        }
        KeyCommand::Revoke { kid } => {
            let mut admin = open(args, AdminServiceClient::new).await?;
            let r =
                answer(admin.revoke_signing_key(pb::RevokeSigningKeyRequest { kid: kid.clone() }))
                    .await?;
            emit(
                args,
                &json!({"revoked": kid, "kids": r.kids}),
                format_args!("{kid} revoked; the JWK Set keeps {}", r.kids.join(", ")),
            );
        }
    }
    Ok(())
}
