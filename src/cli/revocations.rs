//! `taskcred revocations watch`: follow the revocation stream, one JSON line per event,
//! resuming after its last cursor when the connection drops.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use super::shared::{answer, open, rfc3339_opt};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::revocation_event::Event;
use crate::api::pb::revocation_service_client::RevocationServiceClient;

/// `taskcred revocations ...`.
#[derive(Debug, Subcommand)]
pub enum RevocationsCommand {
    /// Print each revoked credential as one JSON line: first those revoked and not yet
    /// expired, then a `synced` line, then each new revocation as it happens. Reconnects and
    /// resumes (from the last cursor) when the connection drops; stop it with Ctrl-C.
    Watch {
        /// Resume after this cursor (the `cursor` of a line printed before).
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// Only JWTs for this audience.
        #[arg(long)]
        audience: Option<String>,
        /// Also print the heartbeat lines (every 5 s while nothing happens).
        #[arg(long)]
        heartbeats: bool,
    },
}

/// Runs a `revocations` subcommand.
pub async fn run(args: &ClientArgs, command: &RevocationsCommand) -> ExitCode {
    let RevocationsCommand::Watch {
        after,
        audience,
        heartbeats,
    } = command;
    let mut cursor = after.clone().unwrap_or_default();
    let mut backoff = Duration::from_millis(250);
    loop {
        match follow(args, &mut cursor, audience.as_deref(), *heartbeats).await {
            // Only what retrying cannot fix ends the watch.
            Err(e) if !retryable(&e) => return e.report(args.json),
            Err(e) => crate::errln!("warning: {e}; resuming after {cursor:?} in {backoff:?}"),
            Ok(()) => crate::errln!("warning: the stream ended; resuming after {cursor:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Whether the watch reconnects after `e`: what any command may retry, and a stream that broke
/// (a replica restarting ends its streams with these codes).
fn retryable(e: &ClientError) -> bool {
    e.retryable()
        || matches!(e, ClientError::Refused(s) if matches!(
            s.code(),
            tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
        ))
}

/// One connection: prints events until the stream ends or fails, keeping `cursor` current.
async fn follow(
    args: &ClientArgs,
    cursor: &mut String,
    audience: Option<&str>,
    heartbeats: bool,
) -> Result<(), ClientError> {
    let mut client = open(args, RevocationServiceClient::new).await?;
    let mut stream = answer(client.watch_revocations(pb::WatchRevocationsRequest {
        after: cursor.clone(),
        audience: audience.unwrap_or_default().to_owned(),
    }))
    .await?;
    while let Some(event) = stream.message().await.map_err(ClientError::Refused)? {
        cursor.clone_from(&event.cursor);
        let line = match event.event {
            Some(Event::Revoked(r)) => revoked_json(&r, &event.cursor),
            Some(Event::Synced(s)) => json!({
                "type": "synced",
                "cursor": event.cursor,
                "store_epoch": s.store_epoch,
                "store_epoch_started_at": rfc3339_opt(s.store_epoch_started_at),
            }),
            Some(Event::Heartbeat(h)) if heartbeats => json!({
                "type": "heartbeat",
                "cursor": event.cursor,
                "store_epoch": h.store_epoch,
            }),
            Some(Event::Heartbeat(_)) | None => continue,
        };
        crate::outln!("{line}");
    }
    Ok(())
}

fn revoked_json(r: &pb::Revoked, cursor: &str) -> Value {
    json!({
        "type": "revoked",
        "cursor": cursor,
        "kind": r.kind,
        "credential_id": r.credential_id,
        "lease_id": r.lease_id,
        "task_id": r.task_id,
        "agent": r.agent,
        "audience": Some(&r.audience).filter(|a| !a.is_empty()),
        "reason": r.reason,
        "revoked_at": rfc3339_opt(r.revoked_at),
        "expires_at": rfc3339_opt(r.expires_at),
    })
}
