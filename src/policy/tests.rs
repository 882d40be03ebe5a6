use std::path::Path;
use std::time::SystemTime;

use super::*;
use crate::task::{RawTaskRequest, Task, TaskId, TaskLimits, TaskRequest};

const REQUESTER: &str = "spiffe://taskcred.dev/human/requester";
const AGENT: &str = "spiffe://taskcred.dev/agent/demo";

fn dev_engine() -> PolicyEngine {
    PolicyEngine::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies")).unwrap()
}

fn w(s: &str) -> WorkloadId {
    WorkloadId::parse(s).unwrap()
}

fn task(executor: &str, labels: &[(&str, &str)]) -> Task {
    task_granting(executor, labels, &[("db", &["read"])])
}

fn task_granting(executor: &str, labels: &[(&str, &str)], grants: &[(&str, &[&str])]) -> Task {
    let limits = TaskLimits::default();
    let raw = RawTaskRequest {
        executor: executor.into(),
        purpose: "test".into(),
        grants: grants
            .iter()
            .map(|(a, acts)| ((*a).into(), acts.iter().map(|x| (*x).into()).collect()))
            .collect(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..RawTaskRequest::default()
    };
    let req = TaskRequest::parse(raw, &limits).unwrap();
    Task::new(
        TaskId::generate(),
        req,
        w(REQUESTER),
        1,
        vec![],
        SystemTime::now(),
    )
}

fn request(engine: &PolicyEngine, principal: &str, t: &Task) -> Verdict {
    engine.decide(&w(principal), PolicyAction::RequestTask, &Resource::Task(t))
}

#[test]
fn built_in_schema_parses_and_dev_policies_validate() {
    schema().unwrap();
    assert!(dev_engine().current().len() >= 8);
}

#[test]
fn dev_quorum_by_what_is_granted() {
    let e = dev_engine();
    let v = request(&e, REQUESTER, &task(AGENT, &[]));
    assert!(v.allowed, "{v:?}");
    assert_eq!(v.quorum, 1);
    assert_eq!(v.policies, vec!["request-default".to_owned()]);
    let quorum = |labels: &[(&str, &str)], grants: &[(&str, &[&str])]| {
        request(&e, REQUESTER, &task_granting(AGENT, labels, grants)).quorum
    };
    // A label can raise the quorum...
    assert_eq!(quorum(&[("env", "production")], &[("db", &["read"])]), 2);
    // ...never lower it: `risk=low` chosen by the requester changes nothing.
    assert_eq!(quorum(&[("risk", "low")], &[("db", &["read"])]), 1);
    assert_eq!(
        quorum(&[("risk", "low")], &[("prod-cluster", &["deploy"])]),
        2
    );
    // What is granted decides: a production audience needs two without any label.
    assert_eq!(quorum(&[], &[("prod-cluster", &["deploy"])]), 2);
    assert_eq!(
        quorum(
            &[],
            &[("db.staging", &["read"]), ("db.production", &["read"])]
        ),
        2
    );
    // Reads of the listed low-risk audiences need none, unless labelled production.
    assert_eq!(quorum(&[], &[("db.staging", &["read"])]), 0);
    assert_eq!(
        quorum(
            &[],
            &[("db.staging", &["read"]), ("docs.staging", &["read"])]
        ),
        0
    );
    assert_eq!(
        quorum(&[("env", "production")], &[("db.staging", &["read"])]),
        2
    );
    // Anything more than reading them needs one.
    assert_eq!(quorum(&[], &[("db.staging", &["read", "rotate"])]), 1);
    assert_eq!(
        quorum(&[], &[("db.staging", &["read"]), ("other", &["read"])]),
        1
    );
}

#[test]
fn dev_policy_denies_what_it_does_not_permit() {
    let e = dev_engine();
    // The agent may not request tasks.
    assert!(!request(&e, AGENT, &task(AGENT, &[])).allowed);
    // Nor may the requester ask for a person to execute one.
    assert!(
        !request(
            &e,
            REQUESTER,
            &task("spiffe://taskcred.dev/human/approver", &[])
        )
        .allowed
    );
    // Nor for an agent of another trust domain.
    assert!(!request(&e, REQUESTER, &task("spiffe://other.dev/agent/demo", &[])).allowed);
    let t = task(AGENT, &[]);
    let approve = |p: &str| {
        e.decide(&w(p), PolicyAction::ApproveTask, &Resource::Task(&t))
            .allowed
    };
    assert!(approve("spiffe://taskcred.dev/human/approver"));
    assert!(approve("spiffe://taskcred.dev/human/approver2"));
    assert!(!approve(REQUESTER));
    assert!(!approve("spiffe://taskcred.dev/human/operator"));
    let reload = |p: &str| {
        e.decide(&w(p), PolicyAction::ReloadPolicy, &Resource::Broker)
            .allowed
    };
    assert!(reload("spiffe://taskcred.dev/human/operator"));
    assert!(!reload(REQUESTER));
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

const PERMIT_ALL_REQUESTS: &str =
    "permit (principal, action == Taskcred::Action::\"RequestTask\", resource);\n";

#[test]
fn quorum_fails_closed() {
    // The engine of one policy file holding `text`.
    let load = |text: &str| {
        let dir = dir_with(&[("a.cedar", text)]);
        PolicyEngine::load(dir.path())
    };
    let quorum = |text: &str| request(&load(text).unwrap(), REQUESTER, &task(AGENT, &[])).quorum;

    assert_eq!(quorum(PERMIT_ALL_REQUESTS), 1, "no annotation means 1");
    assert_eq!(
        quorum(&format!(
            "@quorum(\"0\")\n{PERMIT_ALL_REQUESTS}{PERMIT_ALL_REQUESTS}"
        )),
        1,
        "largest wins"
    );
    assert_eq!(
        quorum(&format!("@quorum(\"0\")\n{PERMIT_ALL_REQUESTS}")),
        0,
        "explicit 0"
    );
    for bad in ["-1", "99"] {
        assert!(
            matches!(
                load(&format!("@quorum(\"{bad}\")\n{PERMIT_ALL_REQUESTS}")),
                Err(PolicyError::BadQuorum { .. })
            ),
            "@quorum(\"{bad}\")"
        );
    }
}

#[test]
fn forbid_overrides_permit() {
    let d = dir_with(&[(
        "a.cedar",
        &format!(
            "{PERMIT_ALL_REQUESTS}forbid (principal, action, resource) when {{ resource.hasTag(\"env\") }};\n"
        ),
    )]);
    let e = PolicyEngine::load(d.path()).unwrap();
    assert!(!request(&e, REQUESTER, &task(AGENT, &[("env", "x")])).allowed);
    assert!(request(&e, REQUESTER, &task(AGENT, &[])).allowed);
}

#[test]
fn invalid_policies_are_refused_with_file_and_line() {
    let parse = dir_with(&[
        ("good.cedar", PERMIT_ALL_REQUESTS),
        (
            "bad.cedar",
            "\n\npermit (principal, action, resource) when { ;\n",
        ),
    ]);
    let err = PolicyEngine::load(parse.path()).unwrap_err();
    assert!(matches!(err, PolicyError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("bad.cedar:3:"), "{err}");

    let invalid = dir_with(&[(
        "x.cedar",
        "// comment\npermit (principal, action == Taskcred::Action::\"RequestTask\", resource)\nwhen { resource.no_such_attribute == 1 };\n",
    )]);
    let err = PolicyEngine::load(invalid.path()).unwrap_err();
    assert!(matches!(err, PolicyError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("x.cedar:"), "{err}");
    assert!(err.to_string().contains("x#0"), "{err}");

    let unknown_action = dir_with(&[(
        "y.cedar",
        "permit (principal, action == Taskcred::Action::\"Nope\", resource);",
    )]);
    assert!(matches!(
        PolicyEngine::load(unknown_action.path()),
        Err(PolicyError::Invalid { .. })
    ));

    let empty = dir_with(&[("notes.txt", "x")]);
    assert!(matches!(
        PolicyEngine::load(empty.path()),
        Err(PolicyError::Empty(_))
    ));

    let dup = dir_with(&[
        ("a.cedar", &format!("@id(\"same\")\n{PERMIT_ALL_REQUESTS}")),
        ("b.cedar", &format!("@id(\"same\")\n{PERMIT_ALL_REQUESTS}")),
    ]);
    assert!(matches!(
        PolicyEngine::load(dup.path()),
        Err(PolicyError::DuplicateId { .. })
    ));
}

#[test]
fn failed_reload_keeps_the_policies_in_force() {
    let d = dir_with(&[("a.cedar", PERMIT_ALL_REQUESTS)]);
    let e = PolicyEngine::load(d.path()).unwrap();
    std::fs::write(
        d.path().join("a.cedar"),
        "permit (principal, action, resource) when {",
    )
    .unwrap();
    assert!(e.reload().is_err());
    assert!(
        request(&e, REQUESTER, &task(AGENT, &[])).allowed,
        "old set still decides"
    );
    std::fs::write(
        d.path().join("a.cedar"),
        "forbid (principal, action, resource);",
    )
    .unwrap();
    assert_eq!(e.reload().unwrap(), 1);
    assert!(
        !request(&e, REQUESTER, &task(AGENT, &[])).allowed,
        "new set decides"
    );
}

#[test]
fn entity_ids_cannot_be_escaped() {
    let e = dev_engine();
    // A quote in a label value or purpose cannot change the request: they are values, not ids.
    let t = task(AGENT, &[("env", "production")]);
    assert!(request(&e, REQUESTER, &t).allowed);
}

#[test]
fn issue_token_is_decided_with_its_context() {
    let e = dev_engine();
    let t = task(AGENT, &[]);
    let ctx = serde_json::json!({"kind": "jwt", "audience": "db", "actions": ["read"],
        "ttl_secs": 60, "renewal": false});
    let v = e.decide_in(
        &w(AGENT),
        PolicyAction::IssueToken,
        &Resource::Task(&t),
        Some(ctx.clone()),
    );
    assert!(v.allowed, "{v:?}");
    assert!(
        !e.decide_in(
            &w(REQUESTER),
            PolicyAction::IssueToken,
            &Resource::Task(&t),
            Some(ctx)
        )
        .allowed
    );
    // Without the context the schema requires, the request is refused (deny by default).
    assert!(
        !e.decide(&w(AGENT), PolicyAction::IssueToken, &Resource::Task(&t))
            .allowed
    );
}

/// A decision from a prepared task is the decision made afresh, whatever the context, the
/// task and the principal (another principal than the executor is decided afresh); a context
/// of the wrong shape is refused on an action's first prepared request.
#[test]
fn a_prepared_task_is_decided_as_the_task_itself() {
    let e = dev_engine();
    let ctx = |kind: &str, audience: &str, actions: &[&str], ttl: i64| {
        serde_json::json!({"kind": kind, "audience": audience, "actions": actions,
            "ttl_secs": ttl, "renewal": false})
    };
    let mut approved = task(AGENT, &[("env", "production")]);
    approved.state = crate::task::TaskState::Approved;
    for t in [task(AGENT, &[]), approved, task(REQUESTER, &[])] {
        let prepared = e.prepare_task(&t).unwrap();
        for who in [AGENT, REQUESTER, "spiffe://taskcred.dev/agent/other"] {
            for (action, context) in [
                (PolicyAction::IssueToken, ctx("jwt", "db", &["read"], 60)),
                (
                    PolicyAction::IssueToken,
                    ctx("jwt", "db", &["read"], 100_000),
                ),
                (
                    PolicyAction::IssueToken,
                    ctx("jwt", "other", &["write"], 60),
                ),
                (PolicyAction::IssueCertificate, ctx("x509", "", &[], 60)),
            ] {
                let fresh = e.decide_as(
                    Principal::Workload(&w(who)),
                    action,
                    &Resource::Task(&t),
                    Some(context.clone()),
                );
                let from_prepared =
                    e.decide_prepared(&prepared, &w(who), action, &t, Some(context));
                assert_eq!(fresh, from_prepared, "{who} {action:?}");
            }
        }
    }
    // A context the schema does not allow: refused on the first prepared request of an action.
    let fresh_engine = dev_engine();
    let t = task(AGENT, &[]);
    let prepared = fresh_engine.prepare_task(&t).unwrap();
    let v = fresh_engine.decide_prepared(
        &prepared,
        &w(AGENT),
        PolicyAction::IssueToken,
        &t,
        Some(serde_json::json!({"kind": 1})),
    );
    assert!(!v.allowed && !v.errors.is_empty(), "{v:?}");
}

/// Each action is decided by the policies whose scope can match it: every policy with an open
/// action scope is in every subset, one naming actions only in theirs; a forbid on any action
/// still forbids.
#[test]
fn each_action_is_decided_by_the_policies_that_can_match_it() {
    let dir = dir_with(&[(
        "p.cedar",
        r#"
        permit(principal, action == Taskcred::Action::"GetTask", resource);
        permit(principal, action in [Taskcred::Action::"ListTasks", Taskcred::Action::"GetTask"], resource);
        forbid(principal is Taskcred::Workload, action, resource) when { principal.path == "/agent/evil" };
        "#,
    )]);
    let e = PolicyEngine::load(dir.path()).unwrap();
    let p = e.current();
    let size = |a: PolicyAction| p.by_action[a.index()].policies().count();
    assert_eq!(size(PolicyAction::GetTask), 3);
    assert_eq!(size(PolicyAction::ListTasks), 2);
    assert_eq!(size(PolicyAction::IssueToken), 1);
    let t = task(AGENT, &[]);
    assert!(
        e.decide(&w(AGENT), PolicyAction::GetTask, &Resource::Task(&t))
            .allowed
    );
    assert!(
        !e.decide(&w(AGENT), PolicyAction::CancelTask, &Resource::Task(&t))
            .allowed
    );
    let evil = e.decide(
        &w("spiffe://taskcred.dev/agent/evil"),
        PolicyAction::GetTask,
        &Resource::Task(&t),
    );
    assert!(!evil.allowed, "{evil:?}");
    // The dev policies: a smaller set per action, and the same verdicts as the whole set.
    let dev = dev_engine();
    let all = dev.current();
    for action in PolicyAction::ALL {
        assert!(all.by_action[action.index()].policies().count() <= all.len());
    }
    assert!(
        all.by_action[PolicyAction::IssueToken.index()]
            .policies()
            .count()
            < all.len()
    );
    let t = task(AGENT, &[("env", "production")]);
    let ctx = serde_json::json!({"kind": "jwt", "audience": "db", "actions": ["read"],
        "ttl_secs": 60, "renewal": false});
    for who in [AGENT, REQUESTER, "spiffe://taskcred.dev/human/approver"] {
        for (action, context) in [
            (PolicyAction::IssueToken, Some(ctx.clone())),
            (PolicyAction::GetTask, None),
            (PolicyAction::RequestTask, None),
            (PolicyAction::ApproveTask, None),
            (PolicyAction::CancelTask, None),
        ] {
            let (p, r, list) =
                entities::build(Principal::Workload(&w(who)), &Resource::Task(&t)).unwrap();
            let ents = Entities::from_entities(list, Some(&dev.schema)).unwrap();
            let request = dev.request(p, action, r, context, true).unwrap();
            let whole = dev.authorizer.is_authorized(&request, &all.set, &ents);
            let subset = dev.decide_built(&all, action, &request, &ents);
            assert_eq!(
                whole.decision() == Decision::Allow,
                subset.allowed,
                "{who} {action:?}"
            );
            let mut reasons: Vec<String> = whole
                .diagnostics()
                .reason()
                .map(ToString::to_string)
                .collect();
            reasons.sort();
            let mut got = subset.policies.clone();
            got.sort();
            assert_eq!(reasons, got, "{who} {action:?}");
        }
    }
}

/// A verdict remembered on a prepared task holds only while the same policies are in force,
/// and only for the same action and context.
#[test]
fn a_remembered_verdict_ends_with_its_policies() {
    let permit = r#"permit(principal, action == Taskcred::Action::"IssueToken", resource) when { context.ttl_secs <= 60 };"#;
    let dir = dir_with(&[("p.cedar", permit)]);
    let e = PolicyEngine::load(dir.path()).unwrap();
    let t = task(AGENT, &[]);
    let prepared = e.prepare_task(&t).unwrap();
    let ctx = |ttl: i64| {
        Some(
            serde_json::json!({"kind": "jwt", "audience": "db", "actions": ["read"],
            "ttl_secs": ttl, "renewal": false}),
        )
    };
    let decide =
        |ttl| e.decide_prepared(&prepared, &w(AGENT), PolicyAction::IssueToken, &t, ctx(ttl));
    assert!(decide(60).allowed);
    assert!(decide(60).allowed);
    assert!(!decide(61).allowed);
    std::fs::write(
        dir.path().join("p.cedar"),
        r#"permit(principal, action == Taskcred::Action::"IssueToken", resource) when { context.ttl_secs <= 30 };"#,
    )
    .unwrap();
    e.reload().unwrap();
    assert!(!decide(60).allowed, "a reload ends what was remembered");
    assert!(decide(30).allowed);
}
