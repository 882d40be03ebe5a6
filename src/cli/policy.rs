//! `taskcred policy ...`: check a policy directory offline, or ask a broker to reload.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::shared::{answer, emit, exit_code, open};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::admin_service_client::AdminServiceClient;
use crate::policy;

/// `taskcred policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory against the built-in schema, offline.
    Check {
        /// The directory of *.cedar files.
        #[arg(default_value = "config/policies")]
        dir: std::path::PathBuf,
    },
    /// Ask the broker to reload its policies (the ReloadPolicy RPC; as SIGHUP does).
    Reload,
}

/// Runs a `policy` subcommand.
pub async fn run(args: &ClientArgs, command: &PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Check { dir } => check(args, dir),
        PolicyCommand::Reload => exit_code(args, reload(args).await).await,
    }
}

fn check(args: &ClientArgs, dir: &Path) -> ExitCode {
    let result = policy::schema().and_then(|s| policy::load_dir(dir, &s));
    match result {
        Ok(p) => {
            let files: Vec<String> = p.files().iter().map(|f| f.display().to_string()).collect();
            emit(
                args,
                &serde_json::json!({"valid": true, "policies": p.len(), "files": files}),
                format_args!(
                    "ok: {} policies in {} files valid against the schema",
                    p.len(),
                    files.len()
                ),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            if args.json {
                crate::outln!(
                    "{}",
                    serde_json::json!({"valid": false, "error": e.to_string()})
                );
            }
            crate::errln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn reload(args: &ClientArgs) -> Result<(), ClientError> {
    let mut admin = open(args, AdminServiceClient::new).await?;
    let r = answer(admin.reload_policy(pb::ReloadPolicyRequest {})).await?;
    emit(
        args,
        &serde_json::json!({"policies": r.policies, "files": r.files}),
        format_args!(
            "reloaded: {} policies from {} files",
            r.policies,
            r.files.len()
        ),
    );
    Ok(())
}
