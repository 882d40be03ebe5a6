use std::time::{Duration, SystemTime};

use super::*;
use crate::identity::WorkloadId;

fn id(s: &str) -> WorkloadId {
    WorkloadId::parse(s).unwrap()
}

fn raw() -> RawTaskRequest {
    RawTaskRequest {
        executor: "spiffe://taskcred.dev/agent/demo".into(),
        purpose: "rotate the staging database password".into(),
        grants: vec![("db.staging".into(), vec!["read".into(), "rotate".into()])],
        labels: vec![("env".into(), "staging".into())],
        ..RawTaskRequest::default()
    }
}

fn task(quorum: u32, now: SystemTime) -> Task {
    let req = TaskRequest::parse(raw(), &TaskLimits::default()).unwrap();
    Task::new(
        TaskId::generate(),
        req,
        id("spiffe://taskcred.dev/human/requester"),
        quorum,
        vec![],
        now,
    )
}

fn approval(who: &str, decision: Decision, now: SystemTime) -> Approval {
    Approval {
        id: TaskId::generate().to_string(),
        approver: id(who),
        decision,
        at: now,
        note: String::new(),
    }
}

const A1: &str = "spiffe://taskcred.dev/human/approver";
const A2: &str = "spiffe://taskcred.dev/human/approver2";

#[test]
fn quorum_of_two_needs_two_distinct_approvers() {
    let now = SystemTime::now();
    let mut t = task(2, now);
    assert_eq!(t.state, TaskState::PendingApproval);
    t.decide(approval(A1, Decision::Approve, now), now).unwrap();
    assert_eq!(t.state, TaskState::PendingApproval);
    // The same approver again does not count twice.
    let again = t.decide(approval(A1, Decision::Approve, now), now);
    assert!(matches!(again, Err(TaskError::Precondition(_))));
    assert_eq!(t.approval_count(), 1);
    t.decide(approval(A2, Decision::Approve, now), now).unwrap();
    assert_eq!(t.state, TaskState::Approved);
}

#[test]
fn quorum_zero_is_approved_at_once_and_one_needs_one() {
    let now = SystemTime::now();
    assert_eq!(task(0, now).state, TaskState::Approved);
    let mut t = task(1, now);
    t.decide(approval(A1, Decision::Approve, now), now).unwrap();
    assert_eq!(t.state, TaskState::Approved);
}

#[test]
fn requester_and_executor_may_not_decide() {
    let now = SystemTime::now();
    let mut t = task(1, now);
    for who in [
        "spiffe://taskcred.dev/human/requester",
        "spiffe://taskcred.dev/agent/demo",
    ] {
        for d in [Decision::Approve, Decision::Deny] {
            let r = t.decide(approval(who, d, now), now);
            assert!(
                matches!(r, Err(TaskError::Forbidden(_))),
                "{who} {d:?}: {r:?}"
            );
        }
    }
    assert_eq!(t.state, TaskState::PendingApproval);
    assert!(t.approvals.is_empty());
}

#[test]
fn denial_ends_the_task_and_nothing_decides_after() {
    let now = SystemTime::now();
    let mut t = task(2, now);
    t.decide(approval(A1, Decision::Approve, now), now).unwrap();
    t.decide(approval(A2, Decision::Deny, now), now).unwrap();
    assert_eq!(t.state, TaskState::Denied);
    assert!(t.ended_at.is_some());
    let late = t.decide(
        approval("spiffe://taskcred.dev/human/other", Decision::Approve, now),
        now,
    );
    assert!(matches!(late, Err(TaskError::Precondition(_))));
    assert_eq!(t.approvals.len(), 2, "history is kept");
}

#[test]
fn approval_after_the_deadline_is_refused() {
    let now = SystemTime::now();
    let mut t = task(1, now);
    let later = t.deadline + Duration::from_secs(1);
    let r = t.decide(approval(A1, Decision::Approve, later), later);
    assert!(matches!(r, Err(TaskError::Precondition(_))));
    assert_eq!(t.state, TaskState::PendingApproval);
}

#[test]
fn approval_on_an_approved_task_is_refused() {
    let now = SystemTime::now();
    let mut t = task(1, now);
    t.decide(approval(A1, Decision::Approve, now), now).unwrap();
    let r = t.decide(approval(A2, Decision::Approve, now), now);
    assert!(matches!(r, Err(TaskError::Precondition(_))));
}

#[test]
fn cancel_by_requester_only_and_before_running() {
    let now = SystemTime::now();
    let mut t = task(1, now);
    let r = t.cancel(&id(A1), now);
    assert!(matches!(r, Err(TaskError::Forbidden(_))));
    let mut running = t.clone();
    running.started_at = Some(now);
    assert!(matches!(
        running.cancel(&t.requester.clone(), now),
        Err(TaskError::Precondition(_))
    ));
    let requester = t.requester.clone();
    t.cancel(&requester, now).unwrap();
    assert_eq!(t.state, TaskState::Cancelled);
    assert!(matches!(
        t.cancel(&requester, now),
        Err(TaskError::Precondition(_))
    ));
}

fn field_of(r: Result<TaskRequest, TaskError>) -> &'static str {
    match r {
        Err(TaskError::Invalid { field, .. }) => field,
        other => panic!("expected invalid, got {other:?}"),
    }
}

#[test]
fn request_bounds_name_the_field() {
    let l = TaskLimits::default();
    let with = |f: &dyn Fn(&mut RawTaskRequest)| {
        let mut r = raw();
        f(&mut r);
        TaskRequest::parse(r, &l)
    };
    assert!(with(&|_| {}).is_ok());
    assert_eq!(
        field_of(with(&|r| r.executor = "spiffe://x/a/".into())),
        "executor"
    );
    assert_eq!(field_of(with(&|r| r.purpose = String::new())), "purpose");
    assert_eq!(field_of(with(&|r| r.purpose = "x".repeat(1025))), "purpose");
    assert!(with(&|r| r.purpose = "x".repeat(1024)).is_ok());
    assert_eq!(field_of(with(&|r| r.purpose = "a\nb".into())), "purpose");
    assert_eq!(field_of(with(&|r| r.grants.clear())), "grants");
    assert_eq!(
        field_of(with(&|r| r.grants = (0..17)
            .map(|i| (format!("a{i}"), vec!["x".into()]))
            .collect())),
        "grants"
    );
    assert!(
        with(&|r| r.grants = (0..16)
            .map(|i| (format!("a{i}"), vec!["x".into()]))
            .collect())
        .is_ok()
    );
    assert_eq!(
        field_of(with(
            &|r| r.grants = vec![("db".into(), (0..33).map(|i| format!("a{i}")).collect())]
        )),
        "grants.actions"
    );
    assert_eq!(
        field_of(with(&|r| r.grants = vec![("db".into(), vec![])])),
        "grants.actions"
    );
    assert_eq!(
        field_of(with(&|r| r.grants = vec![("d b".into(), vec!["x".into()])])),
        "grants.audience"
    );
    assert_eq!(
        field_of(with(
            &|r| r.grants = vec![("a".repeat(257), vec!["x".into()])]
        )),
        "grants.audience"
    );
    assert!(
        with(&|r| r.grants = vec![(
            "https://api.example.com/v1".into(),
            vec!["repo:read".into()]
        )])
        .is_ok()
    );
    assert_eq!(
        field_of(with(&|r| r.grants = vec![("db".into(), vec!["x*".into()])])),
        "grants.actions"
    );
    assert_eq!(
        field_of(with(&|r| r.grants = vec![
            ("db".into(), vec!["x".into()]),
            ("db".into(), vec!["y".into()])
        ])),
        "grants.audience"
    );
    assert_eq!(
        field_of(with(&|r| r.labels = vec![("Env".into(), "x".into())])),
        "labels"
    );
    assert_eq!(
        field_of(with(&|r| r.labels = vec![("env".into(), "a b".into())])),
        "labels"
    );
    assert_eq!(
        field_of(with(&|r| r.labels = vec![("k".repeat(64), "x".into())])),
        "labels"
    );
    assert_eq!(
        field_of(with(
            &|r| r.labels = vec![("env".into(), "a".into()), ("env".into(), "b".into())]
        )),
        "labels"
    );
    assert_eq!(
        field_of(with(
            &|r| r.labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect()
        )),
        "labels"
    );
    assert_eq!(
        field_of(with(
            &|r| r.deadline_in = Some(Duration::from_secs(25 * 3600))
        )),
        "deadline"
    );
    assert_eq!(
        field_of(with(&|r| r.deadline_in = Some(Duration::ZERO))),
        "deadline"
    );
    assert_eq!(
        field_of(with(&|r| r.credential_ttl = Some(Duration::from_secs(7200)))),
        "credential_ttl"
    );
}

#[test]
fn task_ids_are_canonical_uuid_v7() {
    let id = TaskId::generate();
    assert_eq!(TaskId::parse(&id.to_string()).unwrap(), id);
    assert!(TaskId::parse(&id.to_string().to_uppercase()).is_err());
    assert!(
        TaskId::parse("00000000-0000-4000-8000-000000000000").is_err(),
        "v4"
    );
    assert!(TaskId::parse(&id.to_string().replace('-', "")).is_err());
    assert!(TaskId::parse("").is_err());
    assert!(TaskId::parse("../../etc/passwd").is_err());
}

#[test]
fn tasks_round_trip_through_json() {
    let t = task(1, SystemTime::now());
    let json = serde_json::to_string(&t).unwrap();
    assert_eq!(serde_json::from_str::<Task>(&json).unwrap(), t);
}

#[test]
fn complete_by_executor_or_requester_once() {
    let now = SystemTime::now();
    let mut t = task(0, now);
    assert!(matches!(
        t.complete(&id(A1), Outcome::Succeeded, now),
        Err(TaskError::Forbidden(_))
    ));
    let executor = t.executor.clone();
    t.complete(&executor, Outcome::Failed, now).unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.ended_at.is_some());
    // A replayed completion is refused.
    let requester = t.requester.clone();
    assert!(matches!(
        t.complete(&requester, Outcome::Succeeded, now),
        Err(TaskError::Precondition(_))
    ));
    // A task never approved cannot be completed.
    let mut pending = task(1, now);
    assert!(matches!(
        pending.complete(&requester, Outcome::Succeeded, now),
        Err(TaskError::Precondition(_))
    ));
}

mod delegation {
    use super::*;

    const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
    const HELPER: &str = "spiffe://taskcred.dev/agent/helper";
    const TESTER: &str = "spiffe://taskcred.dev/agent/tester";

    fn child_request(executor: &str, grants: &[(&str, &[&str])]) -> RawTaskRequest {
        RawTaskRequest {
            executor: executor.into(),
            purpose: "part of the work".into(),
            grants: grants
                .iter()
                .map(|(a, acts)| {
                    (
                        (*a).to_owned(),
                        acts.iter().map(|s| (*s).to_owned()).collect(),
                    )
                })
                .collect(),
            deadline_in: Some(Duration::from_secs(600)),
            credential_ttl: Some(Duration::from_secs(60)),
            ..RawTaskRequest::default()
        }
    }

    fn delegate(
        parent: &Task,
        by: &str,
        raw: RawTaskRequest,
        now: SystemTime,
    ) -> Result<Task, TaskError> {
        let req = TaskRequest::parse(raw, &TaskLimits::default())?;
        parent.delegate(
            TaskId::generate(),
            &id(by),
            req,
            &DelegationLimits::default(),
            now,
        )
    }

    #[test]
    fn a_chain_narrows_and_carries_who_acted() {
        let now = SystemTime::now();
        let root = task(0, now);
        let child = delegate(
            &root,
            AGENT,
            child_request(HELPER, &[("db.staging", &["read"])]),
            now,
        )
        .unwrap();
        assert_eq!(child.parent, Some(root.id));
        assert_eq!(child.requester, id(AGENT));
        assert_eq!(child.depth(), 1);
        assert_eq!(child.root_id(), root.id);
        assert_eq!(
            child.labels, root.labels,
            "a child keeps its parent's labels"
        );
        assert!(root.strictly_wider_than(&child));
        let mut child = child;
        child.state = TaskState::Approved;
        let grandchild = delegate(
            &child,
            HELPER,
            child_request(TESTER, &[("db.staging", &["read"])]),
            now,
        )
        .unwrap();
        assert_eq!(grandchild.depth(), 2);
        assert_eq!(
            grandchild.subject(),
            &id(AGENT),
            "sub is the root's executor"
        );
        let actors: Vec<&str> = grandchild.actors().iter().map(|w| w.as_str()).collect();
        assert_eq!(actors, [TESTER, HELPER], "the current actor first");
        assert!(!child.strictly_wider_than(&grandchild));
    }

    #[test]
    fn every_widening_is_refused() {
        let now = SystemTime::now();
        let root = task(0, now);
        let widens = |raw| matches!(delegate(&root, AGENT, raw, now), Err(TaskError::Widens(_)));
        assert!(widens(child_request(
            HELPER,
            &[("db.production", &["read"])]
        )));
        assert!(widens(child_request(HELPER, &[("db.staging", &["drop"])])));
        let mut later = child_request(HELPER, &[("db.staging", &["read"])]);
        later.deadline_in = Some(Duration::from_secs(7200));
        assert!(widens(later));
        let mut longer = child_request(HELPER, &[("db.staging", &["read"])]);
        longer.credential_ttl = Some(Duration::from_secs(3600));
        assert!(widens(longer));
        let mut relabel = child_request(HELPER, &[("db.staging", &["read"])]);
        relabel.labels = vec![("env".into(), "dev".into())];
        assert!(widens(relabel));
    }

    #[test]
    fn chains_are_bounded_and_never_loop() {
        let now = SystemTime::now();
        let root = task(0, now);
        let read = &[("db.staging", &["read"][..])];
        let twice = delegate(&root, AGENT, child_request(AGENT, read), now);
        assert!(matches!(
            twice,
            Err(TaskError::Forbidden(Forbidden::AgentTwice))
        ));
        let not_mine = delegate(&root, HELPER, child_request(TESTER, read), now);
        assert!(matches!(
            not_mine,
            Err(TaskError::Forbidden(Forbidden::NotDelegator))
        ));
        let req = TaskRequest::parse(child_request(HELPER, read), &TaskLimits::default()).unwrap();
        let shallow = DelegationLimits {
            max_depth: 0,
            ..DelegationLimits::default()
        };
        let deep = root.delegate(TaskId::generate(), &id(AGENT), req, &shallow, now);
        assert!(matches!(
            deep,
            Err(TaskError::Forbidden(Forbidden::TooDeep))
        ));
        let pending = task(1, now);
        let refused = delegate(&pending, AGENT, child_request(HELPER, read), now);
        assert!(matches!(refused, Err(TaskError::Precondition(_))));
    }

    #[test]
    fn nobody_in_the_chain_decides_on_a_step() {
        let now = SystemTime::now();
        let root = task(0, now);
        let mut child = delegate(
            &root,
            AGENT,
            child_request(HELPER, &[("db.staging", &["read", "rotate"])]),
            now,
        )
        .unwrap();
        for who in [AGENT, HELPER, "spiffe://taskcred.dev/human/requester"] {
            let r = child.decide(approval(who, Decision::Approve, now), now);
            assert!(matches!(r, Err(TaskError::Forbidden(_))), "{who} decided");
        }
        child
            .decide(approval(A1, Decision::Approve, now), now)
            .unwrap();
        assert_eq!(child.state, TaskState::Approved);
    }

    #[test]
    fn a_parent_adopts_within_its_budgets() {
        let now = SystemTime::now();
        let mut root = task(0, now);
        let limits = DelegationLimits {
            max_children: 2,
            max_tree_tasks: 3,
            ..DelegationLimits::default()
        };
        let (a, b) = (TaskId::generate(), TaskId::generate());
        root.adopt(a, &limits, now).unwrap();
        root.adopt(a, &limits, now).unwrap();
        root.adopt(b, &limits, now).unwrap();
        assert_eq!(root.children, [a, b]);
        assert_eq!(root.descendants, 2);
        assert!(root.adopt(TaskId::generate(), &limits, now).is_err());
        root.count_descendant(&limits).unwrap();
        assert!(root.count_descendant(&limits).is_err());
        root.revoke("done", now);
        assert!(root.adopt(TaskId::generate(), &limits, now).is_err());
    }
}
