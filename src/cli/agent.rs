//! `taskcred agent ...`: force-revoke an agent (lock), lift a lock, list locks.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use super::shared::{answer, duration_pb, emit, exit_code, open, rfc3339_opt};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::admin_service_client::AdminServiceClient;

/// `taskcred agent ...`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Lock an agent: revoke all its leases and open tasks at once; nothing new is issued to
    /// it until unlocked.
    Lock {
        /// The agent's SPIFFE ID.
        spiffe_id: String,
        /// Why (recorded in the lock, the audit log, and every refusal the agent gets).
        #[arg(long)]
        reason: String,
        /// Lift the lock by itself after this long (e.g. 2h); without it, only `agent unlock`
        /// lifts it.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        until: Option<Duration>,
        /// Written in the audit line, so that a retry (safe: locks only grow) is seen as one
        /// (1 to 64 of A-Z a-z 0-9 _ -).
        #[arg(long, value_name = "ID", default_value = "")]
        request_id: String,
    },
    /// Lift the lock of an agent (what it revoked stays revoked).
    Unlock {
        /// The agent's SPIFFE ID.
        spiffe_id: String,
    },
    /// List the locks in force.
    Locks,
}

/// Runs an `agent` subcommand.
pub async fn run(args: &ClientArgs, command: &AgentCommand) -> ExitCode {
    exit_code(args, execute(args, command).await).await
}

fn lock_json(l: &pb::Lock) -> Value {
    json!({
        "agent": l.agent,
        "reason": l.reason,
        "operator": l.operator,
        "locked_at": rfc3339_opt(l.locked_at),
        "until": rfc3339_opt(l.until),
    })
}

fn lock_line(l: &pb::Lock) -> String {
    format!(
        "{}  locked {} by {} until {}: {}",
        l.agent,
        rfc3339_opt(l.locked_at).unwrap_or_default(),
        l.operator,
        rfc3339_opt(l.until).unwrap_or_else(|| "unlocked".into()),
        l.reason
    )
}

async fn execute(args: &ClientArgs, command: &AgentCommand) -> Result<(), ClientError> {
    let mut client = open(args, AdminServiceClient::new).await?;
    match command {
        AgentCommand::Lock {
            spiffe_id,
            reason,
            until,
            request_id,
        } => {
            let r = answer(client.lock_agent(pb::LockAgentRequest {
                agent: spiffe_id.clone(),
                reason: reason.clone(),
                duration: duration_pb(*until),
                request_id: request_id.clone(),
            }))
            .await?;
            let lock = r.lock.unwrap_or_default();
            if args.json {
                crate::outln!(
                    "{}",
                    json!({
                        "lock": lock_json(&lock),
                        "revoked_tasks": r.revoked_tasks,
                        "revoked_leases": r.revoked_leases,
                        "revoked_task_count": r.revoked_task_count,
                        "revoked_lease_count": r.revoked_lease_count,
                        "pending": r.pending,
                    })
                );
            } else {
                crate::outln!(
                    "locked {}: {} task(s) and {} lease(s) revoked{}",
                    lock.agent,
                    r.revoked_task_count,
                    r.revoked_lease_count,
                    if r.pending {
                        " so far (the store failed; the lock holds and the broker ends the rest)"
                    } else {
                        ""
                    }
                );
                for t in &r.revoked_tasks {
                    crate::outln!("  task  {t}");
                }
                for l in &r.revoked_leases {
                    crate::outln!("  lease {l}");
                }
                if r.revoked_leases.len() < r.revoked_lease_count as usize {
                    crate::outln!(
                        "  (the first {} leases; the audit log lists every one)",
                        r.revoked_leases.len()
                    );
                }
            }
        }
        AgentCommand::Unlock { spiffe_id } => {
            let r = answer(client.unlock_agent(pb::UnlockAgentRequest {
                agent: spiffe_id.clone(),
            }))
            .await?;
            emit(
                args,
                &json!({"agent": spiffe_id, "was_locked": r.lock.is_some(), "lock": r.lock.as_ref().map(lock_json)}),
                if r.lock.is_some() {
                    format!("unlocked {spiffe_id}")
                } else {
                    format!("{spiffe_id} was not locked")
                },
            );
        }
        AgentCommand::Locks => {
            // Every page: the broker pages its answer within the message limit.
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = answer(client.list_locks(pb::ListLocksRequest {
                    page_size: 0,
                    page_token,
                }))
                .await?;
                all.extend(r.locks);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            if args.json {
                let locks: Vec<Value> = all.iter().map(lock_json).collect();
                crate::outln!("{}", json!({ "locks": locks }));
            } else if all.is_empty() {
                crate::outln!("no agent is locked");
            } else {
                for l in &all {
                    crate::outln!("{}", lock_line(l));
                }
            }
        }
    }
    Ok(())
}
