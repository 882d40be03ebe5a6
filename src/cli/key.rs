//! `taskcred key ...`: rotate the broker's JWT signing key, revoke a compromised one.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::{ClientArgs, ClientError, connect, rfc3339};
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
    match execute(args, command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

async fn execute(args: &ClientArgs, command: &KeyCommand) -> Result<(), ClientError> {
    match command {
        KeyCommand::Rotate => {
            let r = AdminServiceClient::new(connect(args).await?)
                .rotate_signing_key(pb::RotateSigningKeyRequest {})
                .await
                .map_err(ClientError::Refused)?
                .into_inner();
            let until = rfc3339(r.previous_published_until);
            if args.json {
                println!(
                    "{}",
                    json!({"kid": r.kid, "previous_kid": r.previous_kid, "previous_published_until": until})
                );
            } else {
                println!("signing with {}", r.kid);
                println!("{} stays published until {until}", r.previous_kid);
            }
        }
        KeyCommand::Revoke { kid } => {
            let r = AdminServiceClient::new(connect(args).await?)
                .revoke_signing_key(pb::RevokeSigningKeyRequest { kid: kid.clone() })
                .await
                .map_err(ClientError::Refused)?
                .into_inner();
            if args.json {
                println!("{}", json!({"revoked": kid, "kids": r.kids}));
            } else {
                println!("{kid} revoked; the JWK Set keeps {}", r.kids.join(", "));
            }
        }
    }
    Ok(())
}
