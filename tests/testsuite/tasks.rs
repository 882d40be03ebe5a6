//! Tasks end to end over real mTLS with the dev policies: request, approve, deny, cancel, read,
//! list; quorum from policy; separation of duties; restarts; policy reloads; an unavailable
//! store. The scenario runs against both store backends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::flows::{AGENT, tasks_as};
use crate::common::{Broker, RedisServer};
use taskcred::api::pb;
use taskcred::api::pb::admin_service_client::AdminServiceClient;
use taskcred::clock::ManualClock;
use tonic::Code;

fn request(labels: &[(&str, &str)]) -> pb::RequestTaskRequest {
    pb::RequestTaskRequest {
        executor: AGENT.into(),
        purpose: "rotate the staging database password".into(),
        grants: vec![pb::Grant {
            audience: "db.staging".into(),
            actions: vec!["read".into(), "rotate".into()],
        }],
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        deadline: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A task the dev policy approves at once: reading a low-risk audience (what is granted
/// decides, not a label).
fn low_risk_request() -> pb::RequestTaskRequest {
    pb::RequestTaskRequest {
        grants: vec![pb::Grant {
            audience: "db.staging".into(),
            actions: vec!["read".into()],
        }],
        ..request(&[])
    }
}

fn decide(id: &str) -> pb::DecideTaskRequest {
    pb::DecideTaskRequest {
        task_id: id.into(),
        note: "looks right".into(),
    }
}

fn state(t: &pb::Task) -> pb::TaskState {
    pb::TaskState::try_from(t.state).unwrap()
}

/// The scenario of the issue, on whatever store `broker` uses. Returns the ids it created.
async fn approval_scenario(broker: &Broker) -> Vec<String> {
    let mut requester = tasks_as(broker, "requester").await;
    let mut approver = tasks_as(broker, "approver").await;
    let mut approver2 = tasks_as(broker, "approver2").await;

    // One grant, no labels: one approval needed.
    let t = requester
        .request_task(request(&[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&t), pb::TaskState::PendingApproval);
    assert_eq!(t.quorum, 1);
    assert_eq!(t.requester, "spiffe://taskcred.dev/human/requester");
    assert_eq!(t.request_policies, vec!["request-default".to_owned()]);
    let t = approver
        .approve_task(decide(&t.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&t), pb::TaskState::Approved);
    assert_eq!(t.approvals.len(), 1);
    assert_eq!(
        t.approvals[0].approver,
        "spiffe://taskcred.dev/human/approver"
    );
    assert_eq!(t.approvals[0].note, "looks right");

    // Production: two approvals, from two different approvers.
    let prod = requester
        .request_task(request(&[("env", "production")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prod.quorum, 2);
    let after_one = approver
        .approve_task(decide(&prod.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&after_one), pb::TaskState::PendingApproval);
    let twice = approver.approve_task(decide(&prod.id)).await.unwrap_err();
    assert_eq!(
        twice.code(),
        Code::FailedPrecondition,
        "an approver counts once"
    );
    let after_two = approver2
        .approve_task(decide(&prod.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&after_two), pb::TaskState::Approved);

    // The requester approving its own task is refused.
    let own = requester
        .request_task(request(&[]))
        .await
        .unwrap()
        .into_inner();
    let err = requester.approve_task(decide(&own.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        state(
            &requester
                .get_task(pb::GetTaskRequest {
                    task_id: own.id.clone()
                })
                .await
                .unwrap()
                .into_inner()
        ),
        pb::TaskState::PendingApproval
    );

    // A label the requester chooses lowers nothing...
    let labelled = requester
        .request_task(request(&[("risk", "low")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(labelled.quorum, 1);
    assert_eq!(state(&labelled), pb::TaskState::PendingApproval);

    // ...what is granted does: reading a low-risk audience is approved at once.
    let low = requester
        .request_task(low_risk_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(low.quorum, 0);
    assert_eq!(state(&low), pb::TaskState::Approved);

    // The agent may not request tasks.
    let err = tasks_as(broker, "agent")
        .await
        .request_task(request(&[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A denial ends the task; nothing is decided after.
    let denied = requester
        .request_task(request(&[]))
        .await
        .unwrap()
        .into_inner();
    let d = approver2
        .deny_task(decide(&denied.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&d), pb::TaskState::Denied);
    assert!(d.ended_at.is_some());
    let late = approver.approve_task(decide(&denied.id)).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);

    vec![t.id, prod.id, own.id, low.id, denied.id]
}

#[tokio::test]
async fn approval_scenario_on_the_embedded_store_survives_a_restart() {
    let broker = Broker::start().await;
    let ids = approval_scenario(&broker).await;
    let before = read_all(&broker, &ids).await;
    let broker = broker.restart().await;
    assert_eq!(
        read_all(&broker, &ids).await,
        before,
        "every task kept by the embedded store"
    );
    broker.stop().await;
}

#[tokio::test]
async fn approval_scenario_on_redis_survives_a_restart() {
    let redis = RedisServer::start();
    let broker = Broker::start_on_redis(&redis.url()).await;
    let ids = approval_scenario(&broker).await;
    let before = read_all(&broker, &ids).await;
    let broker = broker.restart().await;
    assert_eq!(
        read_all(&broker, &ids).await,
        before,
        "every task kept by Redis"
    );
    // The tasks came from Redis: the embedded store file was never created.
    let dir = broker.stop().await;
    assert!(!dir.path().join("taskcred.db").exists());
}

async fn read_all(broker: &Broker, ids: &[String]) -> Vec<pb::Task> {
    let mut approver = tasks_as(broker, "approver").await;
    let mut out = Vec::new();
    for id in ids {
        out.push(
            approver
                .get_task(pb::GetTaskRequest {
                    task_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    out
}

#[tokio::test]
async fn approvers_see_exact_grants_labels_and_history_and_others_do_not() {
    let broker = Broker::start().await;
    let mut requester = tasks_as(&broker, "requester").await;
    let t = requester
        .request_task(request(&[("env", "production"), ("data", "pii")]))
        .await
        .unwrap()
        .into_inner();
    tasks_as(&broker, "approver")
        .await
        .approve_task(decide(&t.id))
        .await
        .unwrap();
    let seen = tasks_as(&broker, "approver2")
        .await
        .get_task(pb::GetTaskRequest {
            task_id: t.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.grants, t.grants);
    assert_eq!(
        seen.labels.get("env").map(String::as_str),
        Some("production")
    );
    assert_eq!(seen.labels.get("data").map(String::as_str), Some("pii"));
    assert_eq!(seen.approvals.len(), 1);
    assert_eq!(seen.purpose, t.purpose);

    // The executor sees its task too; the operator does (dev policy); nobody else is asked.
    tasks_as(&broker, "agent")
        .await
        .get_task(pb::GetTaskRequest {
            task_id: t.id.clone(),
        })
        .await
        .unwrap();

    // Unknown and malformed ids.
    let err = requester
        .get_task(pb::GetTaskRequest {
            task_id: "0192f4c5-0000-7000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = requester
        .get_task(pb::GetTaskRequest {
            task_id: "../etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("task_id"));
    broker.stop().await;
}

#[tokio::test]
async fn list_filters_by_state_executor_requester_and_pages() {
    let broker = Broker::start().await;
    let mut requester = tasks_as(&broker, "requester").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let asked = if i % 2 == 0 {
            low_risk_request()
        } else {
            request(&[])
        };
        ids.push(requester.request_task(asked).await.unwrap().into_inner().id);
    }
    let all = requester
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<String> = all.tasks.iter().map(|t| t.id.clone()).collect();
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);

    let approved = requester
        .list_tasks(pb::ListTasksRequest {
            state: pb::TaskState::Approved.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.tasks.len(), 3);

    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = requester
            .list_tasks(pb::ListTasksRequest {
                page_size: 2,
                page_token: token.clone(),
                requester: "spiffe://taskcred.dev/human/requester".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.extend(page.tasks.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, newest_first);

    // The agent lists only the tasks it may read: those it executes.
    let agent_view = tasks_as(&broker, "agent")
        .await
        .list_tasks(pb::ListTasksRequest {
            executor: AGENT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agent_view.tasks.len(), 5);

    let err = requester
        .list_tasks(pb::ListTasksRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    broker.stop().await;
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let broker = Broker::start().await;
    let mut requester = tasks_as(&broker, "requester").await;
    type Edit = Box<dyn Fn(&mut pb::RequestTaskRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("purpose", Box::new(|r| r.purpose = "x".repeat(1025))),
        ("purpose", Box::new(|r| r.purpose.clear())),
        (
            "executor",
            Box::new(|r| r.executor = "spiffe://Taskcred.dev/agent/demo".into()),
        ),
        ("grants", Box::new(|r| r.grants.clear())),
        (
            "grants.audience",
            Box::new(|r| r.grants[0].audience = "db staging".into()),
        ),
        (
            "grants.actions",
            Box::new(|r| r.grants[0].actions = (0..33).map(|i| format!("a{i}")).collect()),
        ),
        (
            "labels",
            Box::new(|r| {
                r.labels.insert("Env".into(), "x".into());
            }),
        ),
        (
            "deadline",
            Box::new(|r| {
                r.deadline = Some(prost_types::Duration {
                    seconds: 2 * 86400,
                    nanos: 0,
                })
            }),
        ),
        (
            "deadline",
            Box::new(|r| {
                r.deadline = Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                })
            }),
        ),
        (
            "credential_ttl",
            Box::new(|r| {
                r.credential_ttl = Some(prost_types::Duration {
                    seconds: 86400,
                    nanos: 0,
                })
            }),
        ),
    ];
    for (field, edit) in cases {
        let mut r = request(&[]);
        edit(&mut r);
        let err = requester.request_task(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn cancel_by_the_requester_only() {
    let broker = Broker::start().await;
    let mut requester = tasks_as(&broker, "requester").await;
    let t = requester
        .request_task(request(&[]))
        .await
        .unwrap()
        .into_inner();
    let err = tasks_as(&broker, "approver")
        .await
        .cancel_task(pb::CancelTaskRequest {
            task_id: t.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let c = requester
        .cancel_task(pb::CancelTaskRequest {
            task_id: t.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&c), pb::TaskState::Cancelled);
    let again = requester
        .cancel_task(pb::CancelTaskRequest {
            task_id: t.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    // Ended tasks stay readable with their history.
    let read = requester
        .get_task(pb::GetTaskRequest { task_id: t.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&read), pb::TaskState::Cancelled);
    broker.stop().await;
}

#[tokio::test]
async fn approval_after_the_deadline_is_refused() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let broker = Broker::launch(
        tempfile::tempdir().unwrap(),
        Vec::new(),
        Some(clock.clone()),
    )
    .await;
    let mut r = request(&[]);
    r.deadline = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    let t = tasks_as(&broker, "requester")
        .await
        .request_task(r)
        .await
        .unwrap()
        .into_inner();
    clock.advance(Duration::from_secs(61));
    let err = tasks_as(&broker, "approver")
        .await
        .approve_task(decide(&t.id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("deadline"), "{}", err.message());
    broker.stop().await;
}

#[tokio::test]
async fn separation_of_duties_holds_whatever_the_policy_says() {
    // A policy that permits everything to everyone.
    let dir = tempfile::tempdir().unwrap();
    taskcred::devpki::init(dir.path()).unwrap();
    let policies = dir.path().join("policies");
    for f in std::fs::read_dir(&policies).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    std::fs::write(
        policies.join("open.cedar"),
        "permit (principal, action, resource);\n",
    )
    .unwrap();
    let broker = Broker::launch(dir, Vec::new(), None).await;

    // The approver requests a task executed by the agent...
    let mut approver = tasks_as(&broker, "approver").await;
    let t = approver
        .request_task(request(&[]))
        .await
        .unwrap()
        .into_inner();
    // ...and may not approve it; nor may the executor.
    let err = approver.approve_task(decide(&t.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("separation of duties"),
        "{}",
        err.message()
    );
    let err = tasks_as(&broker, "agent")
        .await
        .approve_task(decide(&t.id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A third party may.
    let ok = tasks_as(&broker, "approver2")
        .await
        .approve_task(decide(&t.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&ok), pb::TaskState::Approved);

    // Every decision, allow and deny, is in the audit log.
    let audit = std::fs::read_to_string(broker.path("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| {
        l["action"] == "ApproveTask"
            && l["decision"] == "deny"
            && l["reason"]
                .as_str()
                .unwrap()
                .contains("separation of duties")
    }));
    assert!(lines.iter().any(|l| l["action"] == "ApproveTask"
        && l["decision"] == "allow"
        && l["details"]["state"] == "approved"));
    assert!(lines.iter().any(|l| l["action"] == "RequestTask"
        && l["decision"] == "allow"
        && l["task"] == t.id.as_str()));
    broker.stop().await;
}

#[tokio::test]
async fn invalid_policy_on_reload_is_refused_and_the_old_set_keeps_deciding() {
    let broker = Broker::start().await;
    let mut operator = AdminServiceClient::new(broker.channel_as("operator").await);
    let tasks_file = broker.path("policies/tasks.cedar");
    let good = std::fs::read_to_string(&tasks_file).unwrap();

    std::fs::write(
        &tasks_file,
        format!("{good}\npermit (principal, action, resource) when {{ resource.nope }};\n"),
    )
    .unwrap();
    let err = operator
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("tasks.cedar:"), "{}", err.message());
    // The previous policies still decide: the requester may request, the agent may not.
    tasks_as(&broker, "requester")
        .await
        .request_task(request(&[]))
        .await
        .unwrap();
    assert_eq!(
        tasks_as(&broker, "agent")
            .await
            .request_task(request(&[]))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // A valid change takes effect.
    std::fs::write(
        &tasks_file,
        good.replace("@quorum(\"1\")", "@quorum(\"3\")"),
    )
    .unwrap();
    let r = operator
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.policies >= 8);
    let t = tasks_as(&broker, "requester")
        .await
        .request_task(request(&[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.quorum, 3);

    // Reloading is itself decided by policy.
    let err = AdminServiceClient::new(broker.channel_as("requester").await)
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    broker.stop().await;
}

#[tokio::test]
async fn store_down_answers_unavailable_and_readyz_says_so() {
    let mut redis = RedisServer::start();
    let broker = Broker::start_on_redis(&redis.url()).await;
    let mut requester = tasks_as(&broker, "requester").await;
    let t = requester
        .request_task(request(&[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(broker.http_get("/readyz").await.0, 200);
    redis.stop();
    let err = requester.request_task(request(&[])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let err = tasks_as(&broker, "approver")
        .await
        .approve_task(decide(&t.id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(broker.http_get("/readyz").await.0, 503);
    redis.restart();
    // Back: the approval that failed left nothing behind and can be made now.
    let mut approver = tasks_as(&broker, "approver").await;
    let mut result = approver.approve_task(decide(&t.id)).await;
    for _ in 0..50 {
        if result.as_ref().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        result = approver.approve_task(decide(&t.id)).await;
    }
    let approved = result.unwrap().into_inner();
    assert_eq!(approved.approvals.len(), 1);
    assert_eq!(state(&approved), pb::TaskState::Approved);
    broker.stop().await;
}
