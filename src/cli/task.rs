//! `taskcred task ...`: request, show, list, approve, deny, cancel, complete, revoke and delegate
//! tasks, and show the tree delegated below one.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::shared::{answer, duration_pb, exit_code, open, rfc3339_opt};
use super::{ClientArgs, ClientError};
use crate::api::pb;
use crate::api::pb::task_service_client::TaskServiceClient;
use crate::task::TaskState;

/// `taskcred task ...`.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Ask for a task; prints its id (with --json, the task).
    Request(RequestArgs),
    /// Show a task with its grants, labels and approvals.
    Show {
        /// The task id.
        id: String,
    },
    /// List tasks, newest first.
    List(ListArgs),
    /// Approve a task.
    Approve {
        /// The task id.
        id: String,
        /// Why (kept with the approval).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Deny a task: it ends as denied.
    Deny {
        /// The task id.
        id: String,
        /// Why (kept with the denial).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Cancel a task you requested, before it runs.
    Cancel {
        /// The task id.
        id: String,
    },
    /// End an approved task (as its executor or requester): every credential of it is revoked.
    Complete {
        /// The task id.
        id: String,
        /// succeeded, failed or cancelled.
        #[arg(long, default_value = "succeeded")]
        outcome: String,
        /// Makes a retry safe: run again with the same id (1 to 64 of A-Z a-z 0-9 _ -) after a
        /// lost answer or "outcome unknown", and get OK once the task has ended as asked.
        #[arg(long, value_name = "ID", default_value = "")]
        request_id: String,
    },
    /// End an open task as an operator: it becomes revoked and every credential of it is
    /// revoked at once.
    Revoke {
        /// The task id.
        id: String,
        /// Why (recorded in the task and the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Hand part of a task you execute to another agent: a child task with grants inside the
    /// parent's, a deadline and credential ceiling no larger. Prints its id (with --json, the
    /// task). Ending the parent ends it.
    Delegate(DelegateArgs),
    /// Show a task and every task delegated below it (states, executors, grants).
    Tree {
        /// The task id.
        id: String,
    },
}

/// `taskcred task delegate`.
#[derive(Debug, Args)]
pub struct DelegateArgs {
    /// The parent task (one you execute, approved).
    pub parent: String,
    /// SPIFFE ID of the agent that will do the delegated work.
    #[arg(long)]
    pub executor: String,
    /// AUDIENCE=ACTION[,ACTION...] inside the parent's grants; repeat for more audiences.
    #[arg(long = "grant", required = true, value_name = "AUDIENCE=ACTIONS")]
    pub grants: Vec<String>,
    /// Why the delegated work is needed.
    #[arg(long)]
    pub purpose: String,
    /// Deadline from now [default and latest: the parent's].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// Longest lifetime of one credential [default and longest: the parent's].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// KEY=VALUE label added to the parent's; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

/// `taskcred task request`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// SPIFFE ID of the workload that will do the work.
    #[arg(long)]
    pub executor: String,
    /// AUDIENCE=ACTION[,ACTION...]; repeat for more audiences.
    #[arg(long = "grant", required = true, value_name = "AUDIENCE=ACTIONS")]
    pub grants: Vec<String>,
    /// Why the work is needed.
    #[arg(long)]
    pub purpose: String,
    /// Deadline from now, e.g. 30m, 4h [default: 1h, at most the broker's maximum].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// Longest lifetime of one credential of the task, e.g. 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// KEY=VALUE label; repeat for more (e.g. --label env=production).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

/// `taskcred task list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this state (pending_approval, approved, denied, completed, failed, cancelled,
    /// expired, revoked).
    #[arg(long)]
    pub state: Option<String>,
    /// Only this executor (SPIFFE ID).
    #[arg(long)]
    pub executor: Option<String>,
    /// Only this requester (SPIFFE ID).
    #[arg(long)]
    pub requester: Option<String>,
    /// Page size (1 to 100).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Continue from a previous page's token.
    #[arg(long)]
    pub page_token: Option<String>,
}

fn usage(m: impl Into<String>) -> ClientError {
    ClientError::Usage(m.into())
}

fn parse_grant(s: &str) -> Result<pb::Grant, ClientError> {
    let (audience, actions) = s.split_once('=').ok_or_else(|| {
        usage(format!(
            "--grant {s:?}: expected AUDIENCE=ACTION[,ACTION...]"
        ))
    })?;
    Ok(pb::Grant {
        audience: audience.to_owned(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>, ClientError> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| usage(format!("--label {l:?}: expected KEY=VALUE")))
        })
        .collect()
}

fn parse_grants(grants: &[String]) -> Result<Vec<pb::Grant>, ClientError> {
    grants.iter().map(|g| parse_grant(g)).collect()
}

fn state_pb(s: &str) -> Result<pb::TaskState, ClientError> {
    let state =
        TaskState::parse(s).ok_or_else(|| usage(format!("--state {s:?}: unknown state")))?;
    Ok(crate::api::state_to_pb(state))
}

fn time(t: Option<&prost_types::Timestamp>) -> Value {
    json!(rfc3339_opt(t.copied()))
}

/// The request of `task approve` and `task deny`.
fn decision(id: &str, note: &str) -> pb::DecideTaskRequest {
    pb::DecideTaskRequest {
        task_id: id.to_owned(),
        note: note.to_owned(),
    }
}

fn state_name(v: i32) -> &'static str {
    crate::api::state_from_pb(v)
        .ok()
        .flatten()
        .map_or("unspecified", TaskState::as_str)
}

/// A task as one JSON object.
pub fn task_json(t: &pb::Task) -> Value {
    json!({
        "id": t.id,
        "state": state_name(t.state),
        "executor": t.executor,
        "requester": t.requester,
        "purpose": t.purpose,
        "grants": t.grants.iter().map(|g| json!({"audience": g.audience, "actions": g.actions})).collect::<Vec<_>>(),
        "labels": t.labels,
        "quorum": t.quorum,
        "approvals": t.approvals.iter().map(|a| json!({
            "id": a.id,
            "approver": a.approver,
            "decision": if a.decision == pb::Decision::Deny as i32 { "deny" } else { "approve" },
            "decided_at": time(a.decided_at.as_ref()),
            "note": a.note,
        })).collect::<Vec<_>>(),
        "credential_ttl_secs": t.credential_ttl.map(|d| d.seconds),
        "deadline": time(t.deadline.as_ref()),
        "parent_id": (!t.parent_id.is_empty()).then_some(&t.parent_id),
        "root_id": t.root_id,
        "depth": t.depth,
        "chain": t.chain,
        "children": t.children,
        "request_policies": t.request_policies,
        "created_at": time(t.created_at.as_ref()),
        "started_at": time(t.started_at.as_ref()),
        "ended_at": time(t.ended_at.as_ref()),
        "end_reason": (!t.end_reason.is_empty()).then_some(&t.end_reason),
    })
}

fn print_task(t: &pb::Task) {
    let approvals = t
        .approvals
        .iter()
        .filter(|a| a.decision == pb::Decision::Approve as i32)
        .count();
    crate::outln!("task {}", t.id);
    crate::outln!("  state:      {}", state_name(t.state));
    crate::outln!("  executor:   {}", t.executor);
    crate::outln!("  requester:  {}", t.requester);
    crate::outln!("  purpose:    {}", t.purpose);
    for g in &t.grants {
        crate::outln!("  grant:      {} = {}", g.audience, g.actions.join(","));
    }
    let mut labels: Vec<_> = t.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        crate::outln!("  label:      {k}={v}");
    }
    crate::outln!("  approvals:  {approvals} of {} needed", t.quorum);
    for a in &t.approvals {
        let d = if a.decision == pb::Decision::Deny as i32 {
            "denied"
        } else {
            "approved"
        };
        let note = if a.note.is_empty() {
            String::new()
        } else {
            format!(": {}", a.note)
        };
        crate::outln!(
            "    {d} by {} at {}{note}",
            a.approver,
            time(a.decided_at.as_ref()).as_str().unwrap_or("?")
        );
    }
    if let Some(d) = t.credential_ttl {
        crate::outln!("  credential ttl: {}s", d.seconds);
    }
    crate::outln!(
        "  deadline:   {}",
        time(t.deadline.as_ref()).as_str().unwrap_or("?")
    );
    if !t.parent_id.is_empty() {
        crate::outln!("  parent:     {} (depth {})", t.parent_id, t.depth);
        crate::outln!("  root:       {}", t.root_id);
        crate::outln!("  chain:      {}", t.chain.join(" -> "));
    }
    for c in &t.children {
        crate::outln!("  child:      {c}");
    }
    if !t.end_reason.is_empty() {
        crate::outln!(
            "  ended:      {} ({})",
            time(t.ended_at.as_ref()).as_str().unwrap_or("?"),
            t.end_reason
        );
    }
}

/// Runs a `task` subcommand.
pub async fn run(args: &ClientArgs, command: &TaskCommand) -> ExitCode {
    exit_code(args, execute(args, command).await).await
}

async fn execute(args: &ClientArgs, command: &TaskCommand) -> Result<(), ClientError> {
    // Check what can be checked locally before connecting.
    let request = match command {
        TaskCommand::Request(r) => Some(pb::RequestTaskRequest {
            executor: r.executor.clone(),
            purpose: r.purpose.clone(),
            grants: parse_grants(&r.grants)?,
            labels: parse_labels(&r.labels)?,
            deadline: duration_pb(r.deadline),
            credential_ttl: duration_pb(r.ttl),
            parent_id: String::new(),
        }),
        _ => None,
    };
    let delegation = match command {
        TaskCommand::Delegate(d) => Some(pb::DelegateTaskRequest {
            parent_id: d.parent.clone(),
            executor: d.executor.clone(),
            purpose: d.purpose.clone(),
            grants: parse_grants(&d.grants)?,
            labels: parse_labels(&d.labels)?,
            deadline: duration_pb(d.deadline),
            credential_ttl: duration_pb(d.ttl),
        }),
        _ => None,
    };
    let mut client = open(args, TaskServiceClient::new).await?;
    let task = match command {
        TaskCommand::Request(_) => {
            let Some(req) = request else {
                return Err(usage("internal: no request"));
            };
            let t = answer(client.request_task(req)).await?;
            if !args.json {
                crate::outln!("{}", t.id);
                return Ok(());
            }
            t
        }
        TaskCommand::Delegate(_) => {
            let Some(req) = delegation else {
                return Err(usage("internal: no request"));
            };
            let t = answer(client.delegate_task(req)).await?;
            if !args.json {
                crate::outln!("{}", t.id);
                return Ok(());
            }
            t
        }
        TaskCommand::Tree { id } => {
            let tree = answer(client.get_task_tree(pb::GetTaskTreeRequest {
                task_id: id.clone(),
            }))
            .await?;
            print_tree(args, &tree);
            return Ok(());
        }
        TaskCommand::Show { id } => {
            answer(client.get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            }))
            .await?
        }
        TaskCommand::Approve { id, note } => {
            answer(client.approve_task(decision(id, note))).await?
        }
        TaskCommand::Deny { id, note } => answer(client.deny_task(decision(id, note))).await?,
        TaskCommand::Cancel { id } => {
            answer(client.cancel_task(pb::CancelTaskRequest {
                task_id: id.clone(),
            }))
            .await?
        }
        TaskCommand::Complete {
            id,
            outcome,
            request_id,
        } => {
            let outcome = match outcome.as_str() {
                "succeeded" => pb::Outcome::Succeeded,
                "failed" => pb::Outcome::Failed,
                "cancelled" => pb::Outcome::Cancelled,
                other => {
                    return Err(usage(format!(
                        "--outcome {other:?}: one of succeeded, failed, cancelled"
                    )));
                }
            };
            let r = answer(client.complete_task(pb::CompleteTaskRequest {
                task_id: id.clone(),
                outcome: outcome.into(),
                request_id: request_id.clone(),
            }))
            .await?;
            print_ended(args, r);
            return Ok(());
        }
        TaskCommand::Revoke { id, reason } => {
            let r = answer(client.revoke_task(pb::RevokeTaskRequest {
                task_id: id.clone(),
                reason: reason.clone(),
            }))
            .await?;
            print_ended(args, r);
            return Ok(());
        }
        TaskCommand::List(l) => {
            let list = answer(
                client.list_tasks(pb::ListTasksRequest {
                    state: l
                        .state
                        .as_deref()
                        .map(state_pb)
                        .transpose()?
                        .map_or(0, Into::into),
                    executor: l.executor.clone().unwrap_or_default(),
                    requester: l.requester.clone().unwrap_or_default(),
                    page_size: l.limit,
                    page_token: l.page_token.clone().unwrap_or_default(),
                }),
            )
            .await?;
            if args.json {
                let tasks: Vec<Value> = list.tasks.iter().map(task_json).collect();
                crate::outln!(
                    "{}",
                    json!({"tasks": tasks, "next_page_token": list.next_page_token})
                );
            } else {
                for t in &list.tasks {
                    crate::outln!(
                        "{}  {:<16}  {}  {}",
                        t.id,
                        state_name(t.state),
                        t.executor,
                        t.purpose
                    );
                }
                if !list.next_page_token.is_empty() {
                    crate::outln!("more: --page-token {}", list.next_page_token);
                }
            }
            return Ok(());
        }
    };
    if args.json {
        crate::outln!("{}", task_json(&task));
    } else {
        print_task(&task);
    }
    Ok(())
}

/// Prints a tree of tasks: one line each, indented by depth below the first (or, with --json,
/// the tasks nested under `children`).
fn print_tree(args: &ClientArgs, tree: &pb::GetTaskTreeResponse) {
    let Some(top) = tree.tasks.first() else {
        return;
    };
    if args.json {
        fn nest(t: &pb::Task, all: &[pb::Task]) -> Value {
            let mut v = task_json(t);
            v["children"] = all
                .iter()
                .filter(|c| c.parent_id == t.id)
                .map(|c| nest(c, all))
                .collect::<Vec<_>>()
                .into();
            v
        }
        let mut v = nest(top, &tree.tasks);
        v["hidden"] = json!(tree.hidden);
        v["truncated"] = json!(tree.truncated);
        crate::outln!("{v}");
        return;
    }
    for t in &tree.tasks {
        let indent = "  ".repeat(t.depth.saturating_sub(top.depth) as usize);
        let grants: Vec<String> = t
            .grants
            .iter()
            .map(|g| format!("{}={}", g.audience, g.actions.join(",")))
            .collect();
        crate::outln!(
            "{indent}{}  {:<16}  {}  {}",
            t.id,
            state_name(t.state),
            t.executor,
            grants.join(" ")
        );
    }
    if tree.hidden > 0 {
        crate::outln!(
            "({} tasks below that you may not read are left out)",
            tree.hidden
        );
    }
    if tree.truncated {
        crate::outln!("(cut to fit the message limit)");
    }
}

/// Prints a task that ended with the credentials it revoked.
fn print_ended(args: &ClientArgs, r: pb::CompleteTaskResponse) {
    let task = r.task.unwrap_or_default();
    if args.json {
        let mut v = task_json(&task);
        v["revoked_leases"] = json!(r.revoked_leases);
        crate::outln!("{v}");
    } else {
        crate::outln!(
            "task {}: {} ({} credentials revoked)",
            task.id,
            state_name(task.state),
            r.revoked_leases
        );
    }
}
