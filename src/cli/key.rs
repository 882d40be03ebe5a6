//! `taskcred key ...`: rotate the broker's JWT signing key.

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
    }
    Ok(())
}
