//! The conformance suite every [`Store`] backend must pass: each case is one test against the
//! embedded store and one against a real `redis-server` (see `cases!` in `store/mod.rs`), each
//! on a fresh store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use taskcred::identity::WorkloadId;
use taskcred::lease::{
    CredentialKind, Cursor, Lease, LeaseId, LeaseState, Lock, Revocation, SUPERSEDED,
};
use taskcred::store::{
    Claim, IssueError, LockSweep, LogRead, Renewal, Store, StoreError, TaskQuery, UpdateError,
};
use taskcred::task::{
    Approval, Decision, RawTaskRequest, Task, TaskError, TaskId, TaskLimits, TaskRequest,
    TaskState, Unmet,
};

const DAY: Duration = Duration::from_secs(86400);

fn w(s: &str) -> WorkloadId {
    WorkloadId::parse(s).unwrap()
}

/// A task for `executor`, requested by `requester`, needing `quorum` approvals.
pub fn sample_task(executor: &str, requester: &str, quorum: u32) -> Task {
    let limits = TaskLimits {
        deadline_max: DAY,
        deadline_default: Duration::from_secs(3600),
        credential_ttl_default: Duration::from_secs(300),
        credential_ttl_max: Duration::from_secs(3600),
    };
    let raw = RawTaskRequest {
        executor: executor.into(),
        purpose: "conformance".into(),
        grants: vec![("db".into(), vec!["read".into()])],
        labels: vec![("env".into(), "test".into())],
        ..RawTaskRequest::default()
    };
    let req = TaskRequest::parse(raw, &limits).unwrap();
    Task::new(
        TaskId::generate(),
        req,
        w(requester),
        quorum,
        vec!["p".into()],
        SystemTime::now(),
    )
}

fn approval(who: &str, decision: Decision) -> Approval {
    Approval {
        id: TaskId::generate().to_string(),
        approver: w(who),
        decision,
        at: SystemTime::now(),
        note: "ok".into(),
    }
}

const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
const REQUESTER: &str = "spiffe://taskcred.dev/human/requester";

fn sweep<'a>(
    agent: &'a WorkloadId,
    reason: &'a str,
    at: SystemTime,
    retention: Duration,
    limit: usize,
) -> LockSweep<'a> {
    LockSweep {
        agent,
        reason,
        at,
        retention,
        limit,
    }
}

fn renewal(credential: &str, expires_at: SystemTime, now: SystemTime) -> Renewal<'_> {
    Renewal {
        credential,
        expires_at,
        now,
    }
}

fn read(after: Option<Cursor>, limit: usize, wait: Duration) -> LogRead {
    LogRead { after, limit, wait }
}

fn claim<'a>(key: &'a str, value: &'a str, until: SystemTime) -> Claim<'a> {
    Claim { key, value, until }
}

fn query() -> TaskQuery {
    TaskQuery {
        state: None,
        executor: None,
        requester: None,
        before: None,
        limit: 100,
        max_scan: 10_000,
    }
}

/// A lock holds from its own short step on (nothing more is issued), before its sweep; the
/// sweep ends the agent's open tasks and live leases at most `limit` of each per step, each
/// once, and never what had ended before.
pub async fn a_lock_holds_at_once_and_is_swept_in_bounded_steps(store: &dyn Store) {
    let now = SystemTime::now();
    let agent = format!(
        "spiffe://taskcred.dev/agent/swept-{}",
        uuid::Uuid::now_v7().simple()
    );
    let tasks: Vec<Task> = (0..3).map(|_| sample_task(&agent, REQUESTER, 0)).collect();
    for t in &tasks {
        store.create_task(t).await.unwrap();
    }
    let mut leases = Vec::new();
    for t in &tasks {
        for _ in 0..3 {
            let l = sample_lease(t, &agent);
            store.issue_lease(&l, None, now).await.unwrap();
            leases.push(l);
        }
    }
    // One already revoked: never swept again.
    store
        .revoke_lease(&leases[0].id, "test", now)
        .await
        .unwrap();
    let lock = Lock {
        agent: w(&agent),
        reason: "swept".into(),
        operator: w(REQUESTER),
        at: now,
        until: None,
    };
    assert_eq!(store.lock_agent(&lock).await.unwrap(), lock);
    let late = sample_lease(&tasks[0], &agent);
    assert!(matches!(
        store.issue_lease(&late, None, now).await,
        Err(IssueError::Locked(_))
    ));
    assert_eq!(
        store.get_lease(&leases[1].id).await.unwrap().unwrap().state,
        LeaseState::Active,
        "not swept yet"
    );
    let (mut ended_tasks, mut ended_leases, mut steps) = (Vec::new(), Vec::new(), 0);
    loop {
        let s = store
            .sweep_lock(&sweep(&lock.agent, "agent locked: swept", now, DAY, 2))
            .await
            .unwrap();
        assert!(s.tasks.len() <= 2 && s.leases.len() <= 2, "{s:?}");
        ended_tasks.extend(s.tasks);
        ended_leases.extend(s.leases.into_iter().map(|l| l.id));
        steps += 1;
        assert!(steps < 20, "the sweep does not end");
        if s.remaining == 0 {
            break;
        }
    }
    ended_tasks.sort();
    let mut expected: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    expected.sort();
    assert_eq!(ended_tasks, expected);
    ended_leases.sort();
    let mut expected: Vec<LeaseId> = leases[1..].iter().map(|l| l.id.clone()).collect();
    expected.sort();
    assert_eq!(
        ended_leases, expected,
        "each live lease once, the revoked one never"
    );
    let again = store
        .sweep_lock(&sweep(&lock.agent, "agent locked: swept", now, DAY, 2))
        .await
        .unwrap();
    assert_eq!(again, taskcred::lease::Swept::default());
}

/// Locks and sweeps to the end, as the broker does.
pub async fn lock_and_sweep(store: &dyn Store, lock: &Lock) -> taskcred::lease::LockOutcome {
    let in_force = store.lock_agent(lock).await.unwrap();
    let mut outcome = taskcred::lease::LockOutcome {
        in_force: Some(in_force),
        ..Default::default()
    };
    let reason = format!("agent locked: {}", lock.reason);
    loop {
        let swept = store
            .sweep_lock(&sweep(&lock.agent, &reason, lock.at, DAY, 500))
            .await
            .unwrap();
        outcome.tasks.extend(swept.tasks);
        outcome.leases.extend(swept.leases);
        if swept.remaining == 0 {
            return outcome;
        }
    }
}

/// A store without its epoch marker (a new one, or one reset since) records no lease: the
/// broker must begin an epoch first, so that nothing is issued before the epoch verifiers see.
pub async fn a_store_without_its_epoch_issues_nothing(store: &dyn Store) {
    let t = approved_task(store).await;
    let lease = sample_lease(&t, AGENT);
    assert_eq!(
        store.issue_lease(&lease, None, SystemTime::now()).await,
        Err(IssueError::StoreReset)
    );
    store
        .epoch(&taskcred::store::Epoch::new(SystemTime::now()))
        .await
        .unwrap();
    store
        .issue_lease(&lease, None, SystemTime::now())
        .await
        .unwrap();
}

/// A lease id is recorded once: a second attempt under the same id (a retried request) is
/// refused and changes nothing, whatever its credential.
pub async fn a_lease_id_is_recorded_once(store: &dyn Store) {
    let t = approved_task(store).await;
    let first = sample_lease(&t, AGENT);
    store
        .issue_lease(&first, None, SystemTime::now())
        .await
        .unwrap();
    let mut again = sample_lease(&t, AGENT);
    again.id = first.id.clone();
    assert_eq!(
        store.issue_lease(&again, None, SystemTime::now()).await,
        Err(IssueError::Exists)
    );
    let leases = store.task_leases(&t.id).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].credential, first.credential);
    assert!(
        store
            .find_lease(&t.id, &again.credential)
            .await
            .unwrap()
            .is_none()
    );
}

/// What one of [`concurrent_issuances_each_get_their_own_answer`]'s issuances must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Recorded,
    NotFound,
    Forbidden,
    Precondition,
    Locked,
    Exists,
    /// One of a pair with the same lease id: exactly one of the two is recorded.
    Racing,
}

/// Issuances at once, good ones among ones refused for each reason (and pairs racing with one
/// lease id): each caller gets its own answer, and only the recorded leases are there.
pub async fn concurrent_issuances_each_get_their_own_answer(store: &dyn Store) {
    let now = SystemTime::now();
    let locked_agent = format!(
        "spiffe://taskcred.dev/agent/locked-{}",
        uuid::Uuid::now_v7().simple()
    );
    let pending = sample_task(AGENT, REQUESTER, 1);
    store.create_task(&pending).await.unwrap();
    let of_locked = sample_task(&locked_agent, REQUESTER, 0);
    store.create_task(&of_locked).await.unwrap();
    let lock = Lock {
        agent: w(&locked_agent),
        reason: "concurrent".into(),
        operator: w(REQUESTER),
        at: now,
        until: None,
    };
    store.lock_agent(&lock).await.unwrap();
    let never_created = sample_task(AGENT, REQUESTER, 0);
    let shared = approved_task(store).await;
    let known = sample_lease(&shared, AGENT);
    store.issue_lease(&known, None, now).await.unwrap();

    let mut calls: Vec<(Lease, Expect)> = Vec::new();
    for _ in 0..10 {
        calls.push((
            sample_lease(&approved_task(store).await, AGENT),
            Expect::Recorded,
        ));
    }
    for _ in 0..2 {
        let t = approved_task(store).await;
        let a = sample_lease(&t, AGENT);
        let mut b = sample_lease(&t, AGENT);
        b.id = a.id.clone();
        calls.push((a, Expect::Racing));
        calls.push((b, Expect::Racing));
    }
    for _ in 0..4 {
        calls.push((sample_lease(&never_created, AGENT), Expect::NotFound));
        let other = "spiffe://taskcred.dev/agent/other";
        calls.push((sample_lease(&shared, other), Expect::Forbidden));
        calls.push((sample_lease(&pending, AGENT), Expect::Precondition));
        calls.push((sample_lease(&of_locked, &locked_agent), Expect::Locked));
    }
    for _ in 0..2 {
        let mut again = sample_lease(&shared, AGENT);
        again.id = known.id.clone();
        calls.push((again, Expect::Exists));
    }
    assert_eq!(calls.len(), 32);
    // Interleaved, so that the kinds arrive mixed.
    let calls: Vec<(Lease, Expect)> = (0..4)
        .flat_map(|k| calls.iter().skip(k).step_by(4).cloned().collect::<Vec<_>>())
        .collect();

    let answers = futures_join(calls.iter().map(|(l, _)| store.issue_lease(l, None, now))).await;

    let mut racing_won = 0;
    for ((lease, expect), answer) in calls.iter().zip(answers) {
        let stored = store
            .find_lease(&lease.task, &lease.credential)
            .await
            .unwrap();
        match (expect, &answer) {
            (Expect::Recorded | Expect::Racing, Ok(_)) => {
                assert_eq!(stored.as_ref(), Some(lease), "{expect:?}");
                if *expect == Expect::Racing {
                    racing_won += 1;
                }
            }
            (Expect::Racing, Err(IssueError::Exists)) => assert_eq!(stored, None),
            (Expect::NotFound, Err(IssueError::NotFound))
            | (Expect::Forbidden, Err(IssueError::Refused(TaskError::Forbidden(_))))
            | (Expect::Precondition, Err(IssueError::Refused(TaskError::Precondition(_))))
            | (Expect::Exists, Err(IssueError::Exists)) => assert_eq!(stored, None, "{expect:?}"),
            (Expect::Locked, Err(IssueError::Locked(reason))) => {
                assert_eq!(reason, "concurrent");
                assert_eq!(stored, None);
            }
            _ => panic!("{expect:?} answered {answer:?}"),
        }
    }
    assert_eq!(racing_won, 2, "one of each racing pair");
    for t in [&pending, &of_locked] {
        let t = store.get_task(&t.id).await.unwrap().unwrap();
        assert_eq!(t.started_at, None, "a refused issuance started a task");
    }
    assert_eq!(store.get_task(&never_created.id).await.unwrap(), None);
    let still = store.get_lease(&known.id).await.unwrap().unwrap();
    assert_eq!(still, known, "the recorded lease is unchanged");
    assert_eq!(store.task_leases(&shared.id).await.unwrap(), vec![known]);
}

/// The active-lease gauge's source: issuing adds one, revoking, ending the task and reaping
/// take them away.
pub async fn live_leases_counts_the_unrevoked(store: &dyn Store) {
    let now = SystemTime::now();
    let before = store.live_leases().await.unwrap();
    let t = approved_task(store).await;
    let (a, b, c) = (
        sample_lease(&t, AGENT),
        sample_lease(&t, AGENT),
        sample_lease(&t, AGENT),
    );
    for l in [&a, &b, &c] {
        store.issue_lease(l, None, now).await.unwrap();
    }
    assert_eq!(store.live_leases().await.unwrap(), before + 3);
    store.revoke_lease(&a.id, "test", now).await.unwrap();
    assert_eq!(store.live_leases().await.unwrap(), before + 2);
    let done: taskcred::store::TaskChange = Arc::new(move |task: &mut Task| {
        task.complete(&w(AGENT), taskcred::task::Outcome::Succeeded, now)
    });
    store
        .end_task(&t.id, done, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.live_leases().await.unwrap(), before);
}

async fn log_is_empty(store: &dyn Store) -> bool {
    let log = store
        .revocations(read(None, 10, Duration::ZERO))
        .await
        .unwrap();
    log.is_empty()
}

/// Before anything is written (run first, on an empty store): nothing due, no error.
pub async fn a_fresh_store_answers_the_reaper(store: &dyn Store) {
    let now = SystemTime::now();
    assert_eq!(store.next_due().await.unwrap(), None);
    assert!(store.expire_leases(now, 10).await.unwrap().is_empty());
    assert!(store.overdue_tasks(now, 10).await.unwrap().is_empty());
    assert!(store.published_keys(now).await.unwrap().is_empty());
    assert_eq!(store.revocation_head().await.unwrap(), Cursor::START);
    assert!(log_is_empty(store).await);
}

pub async fn create_get_round_trip(store: &dyn Store) {
    let t = sample_task(AGENT, REQUESTER, 1);
    store.create_task(&t).await.unwrap();
    assert_eq!(store.get_task(&t.id).await.unwrap(), Some(t));
    assert_eq!(store.get_task(&TaskId::generate()).await.unwrap(), None);
}

pub async fn create_twice_is_refused(store: &dyn Store) {
    let t = sample_task(AGENT, REQUESTER, 1);
    store.create_task(&t).await.unwrap();
    let mut other = t.clone();
    other.purpose = "overwrite".into();
    assert_eq!(
        store.create_task(&other).await,
        Err(StoreError::Exists(t.id))
    );
    assert_eq!(
        store.get_task(&t.id).await.unwrap().unwrap().purpose,
        t.purpose
    );
}

pub async fn update_applies_atomically_or_not_at_all(store: &dyn Store) {
    let t = sample_task(AGENT, REQUESTER, 1);
    store.create_task(&t).await.unwrap();

    // A change the rules refuse leaves the task as it was.
    let refused = store
        .update_task(
            &t.id,
            Arc::new(|task: &mut Task| {
                task.decide(approval(REQUESTER, Decision::Approve), SystemTime::now())
            }),
            DAY,
        )
        .await;
    assert!(matches!(
        refused,
        Err(UpdateError::Rejected(TaskError::Forbidden(_)))
    ));
    assert_eq!(store.get_task(&t.id).await.unwrap().unwrap(), t);

    // A change that fails half-way (mutates, then errors) leaves nothing either.
    let half = store
        .update_task(
            &t.id,
            Arc::new(|task: &mut Task| {
                task.purpose = "half-written".into();
                Err(TaskError::Precondition(Unmet::Other("no".into())))
            }),
            DAY,
        )
        .await;
    assert!(matches!(half, Err(UpdateError::Rejected(_))));
    assert_eq!(
        store.get_task(&t.id).await.unwrap().unwrap().purpose,
        t.purpose
    );

    let approved = store
        .update_task(
            &t.id,
            Arc::new(|task: &mut Task| {
                task.decide(
                    approval("spiffe://taskcred.dev/human/approver", Decision::Approve),
                    SystemTime::now(),
                )
            }),
            DAY,
        )
        .await
        .unwrap();
    assert_eq!(approved.state, TaskState::Approved);
    assert_eq!(store.get_task(&t.id).await.unwrap().unwrap(), approved);

    let missing = store
        .update_task(&TaskId::generate(), Arc::new(|_: &mut Task| Ok(())), DAY)
        .await;
    assert_eq!(missing, Err(UpdateError::NotFound));
}

pub async fn concurrent_updates_lose_nothing(store: &dyn Store) {
    let t = sample_task(AGENT, REQUESTER, 8);
    store.create_task(&t).await.unwrap();
    let approvers: Vec<String> = (0..8)
        .map(|i| format!("spiffe://taskcred.dev/human/approver-{i}"))
        .collect();
    let results = futures_join(approvers.iter().map(|who| {
        let who = who.clone();
        store.update_task(
            &t.id,
            Arc::new(move |task: &mut Task| {
                task.decide(approval(&who, Decision::Approve), SystemTime::now())
            }),
            DAY,
        )
    }))
    .await;
    for r in results {
        r.unwrap();
    }
    let done = store.get_task(&t.id).await.unwrap().unwrap();
    assert_eq!(done.approvals.len(), 8, "every concurrent approval is kept");
    assert_eq!(done.state, TaskState::Approved);
}

/// Polls the futures concurrently on this task.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

pub async fn list_filters_and_pages_newest_first(store: &dyn Store) {
    // A requester and executors of their own, so that earlier cases do not interfere.
    let requester = format!("spiffe://list.test/human/r-{}", TaskId::generate());
    let other_requester = format!("spiffe://list.test/human/o-{}", TaskId::generate());
    let exec_a = format!("spiffe://list.test/agent/a-{}", TaskId::generate());
    let exec_b = format!("spiffe://list.test/agent/b-{}", TaskId::generate());
    let mut created = Vec::new();
    for i in 0..7 {
        let executor = if i % 2 == 0 { &exec_a } else { &exec_b };
        let req = if i == 6 { &other_requester } else { &requester };
        let t = sample_task(executor, req, if i == 0 { 0 } else { 1 });
        store.create_task(&t).await.unwrap();
        created.push(t);
        // UUIDv7 ids order by millisecond; keep them distinct and ordered.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let by_requester = TaskQuery {
        requester: Some(w(&requester)),
        ..query()
    };
    let page = store.list_tasks(&by_requester).await.unwrap();
    let ids: Vec<TaskId> = page.tasks.iter().map(|t| t.id).collect();
    let expected: Vec<TaskId> = created[..6].iter().rev().map(|t| t.id).collect();
    assert_eq!(ids, expected, "newest first, only this requester");

    let by_executor = TaskQuery {
        executor: Some(w(&exec_a)),
        ..query()
    };
    let page = store.list_tasks(&by_executor).await.unwrap();
    assert_eq!(page.tasks.len(), 4);
    assert!(page.tasks.iter().all(|t| t.executor.as_str() == exec_a));

    let approved = TaskQuery {
        state: Some(TaskState::Approved),
        requester: Some(w(&requester)),
        ..query()
    };
    let page = store.list_tasks(&approved).await.unwrap();
    assert_eq!(
        page.tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![created[0].id]
    );

    // Pages of two cover the same tasks, in order, with no repeat.
    let mut seen = Vec::new();
    let mut q = TaskQuery {
        limit: 2,
        ..by_requester.clone()
    };
    loop {
        let page = store.list_tasks(&q).await.unwrap();
        assert!(page.tasks.len() <= 2);
        seen.extend(page.tasks.iter().map(|t| t.id));
        match page.next {
            Some(next) => q.before = Some(next),
            None => break,
        }
        assert!(seen.len() <= 6, "paging does not end");
    }
    assert_eq!(seen, expected);

    // The unfiltered list holds them too.
    let all = store.list_tasks(&query()).await.unwrap();
    for t in &created {
        assert!(all.tasks.iter().any(|x| x.id == t.id));
    }
}

pub async fn ended_tasks_are_pruned_after_retention(store: &dyn Store) {
    let t = sample_task(AGENT, REQUESTER, 1);
    store.create_task(&t).await.unwrap();
    let keep = sample_task(AGENT, REQUESTER, 1);
    store.create_task(&keep).await.unwrap();
    let requester = w(REQUESTER);
    let retention = Duration::from_millis(500);
    let ended = store
        .update_task(
            &t.id,
            Arc::new(move |task: &mut Task| task.cancel(&requester, SystemTime::now())),
            retention,
        )
        .await
        .unwrap();
    assert_eq!(ended.state, TaskState::Cancelled);
    // Readable with its history until the retention passes...
    assert_eq!(
        store.get_task(&t.id).await.unwrap().unwrap().state,
        TaskState::Cancelled
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    store.prune_ended(SystemTime::now()).await.unwrap();
    // ...then gone; a task that has not ended stays.
    assert_eq!(store.get_task(&t.id).await.unwrap(), None);
    assert!(store.get_task(&keep.id).await.unwrap().is_some());
    let listed = store.list_tasks(&query()).await.unwrap();
    assert!(listed.tasks.iter().all(|x| x.id != t.id));
}

/// A JWT lease of `task` for `agent`, valid five minutes.
pub fn sample_lease(task: &Task, agent: &str) -> Lease {
    let now = SystemTime::now();
    Lease {
        id: LeaseId::generate(&task.id),
        task: task.id,
        agent: w(agent),
        kind: CredentialKind::Jwt,
        credential: format!("{:032x}", rand_u128()),
        audience: Some("db".into()),
        actions: vec!["read".into()],
        cnf: "thumb".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(300),
        renew_until: now + Duration::from_secs(3600),
        state: LeaseState::Active,
        ended_at: None,
        reason: None,
    }
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u128::from_be_bytes(b)
}

async fn approved_task(store: &dyn Store) -> Task {
    let t = sample_task(AGENT, REQUESTER, 0);
    store.create_task(&t).await.unwrap();
    t
}

pub async fn leases_only_for_an_approved_task_of_its_executor(store: &dyn Store) {
    let now = SystemTime::now();
    let t = approved_task(store).await;
    let lease = sample_lease(&t, AGENT);
    store.issue_lease(&lease, None, now).await.unwrap();
    let found = store
        .find_lease(&t.id, &lease.credential)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, lease);
    assert!(
        store
            .get_task(&t.id)
            .await
            .unwrap()
            .unwrap()
            .started_at
            .is_some(),
        "task started"
    );
    assert_eq!(
        store.find_lease(&t.id, "no-such-credential").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .find_lease(&TaskId::generate(), &lease.credential)
            .await
            .unwrap(),
        None
    );

    // Another agent, a pending task, a task past its deadline, an unknown task: nothing recorded.
    let other = sample_lease(&t, "spiffe://taskcred.dev/agent/other");
    assert!(matches!(
        store.issue_lease(&other, None, now).await,
        Err(IssueError::Refused(TaskError::Forbidden(_)))
    ));
    let pending = sample_task(AGENT, REQUESTER, 1);
    store.create_task(&pending).await.unwrap();
    let l = sample_lease(&pending, AGENT);
    assert!(matches!(
        store.issue_lease(&l, None, now).await,
        Err(IssueError::Refused(TaskError::Precondition(_)))
    ));
    assert_eq!(
        store.find_lease(&pending.id, &l.credential).await.unwrap(),
        None
    );
    assert!(
        store
            .get_task(&pending.id)
            .await
            .unwrap()
            .unwrap()
            .started_at
            .is_none()
    );
    let late = t.deadline + Duration::from_secs(1);
    let l = sample_lease(&t, AGENT);
    assert!(matches!(
        store.issue_lease(&l, None, late).await,
        Err(IssueError::Refused(TaskError::Precondition(_)))
    ));
    let mut ghost = sample_task(AGENT, REQUESTER, 0);
    ghost.id = TaskId::generate();
    assert_eq!(
        store
            .issue_lease(&sample_lease(&ghost, AGENT), None, now)
            .await,
        Err(IssueError::NotFound)
    );
}

fn complete() -> taskcred::store::TaskChange {
    Arc::new(|t: &mut Task| {
        t.state = TaskState::Completed;
        t.ended_at = Some(SystemTime::now());
        t.end_reason = Some("done".into());
        Ok(())
    })
}

pub async fn ending_a_task_revokes_every_lease_even_concurrent_ones(store: &dyn Store) {
    let now = SystemTime::now();
    let t = approved_task(store).await;
    let first = sample_lease(&t, AGENT);
    store.issue_lease(&first, None, now).await.unwrap();

    // Issuances race with the end of the task: each either fails or is revoked with the rest.
    let leases: Vec<Lease> = (0..12).map(|_| sample_lease(&t, AGENT)).collect();
    let issues = futures_join(leases.iter().map(|l| store.issue_lease(l, None, now)));
    let (issued, ended) = tokio::join!(issues, store.end_task(&t.id, complete(), DAY));
    let (task, revoked) = ended.unwrap();
    assert_eq!(task.state, TaskState::Completed);
    assert!(revoked.iter().any(|l| l.id == first.id));
    for (lease, result) in leases.iter().zip(issued) {
        let stored = store.find_lease(&t.id, &lease.credential).await.unwrap();
        match result {
            Ok(_) => assert_eq!(
                stored.unwrap().state,
                LeaseState::Revoked,
                "an issued lease outlived its task"
            ),
            Err(e) => {
                assert!(matches!(e, IssueError::Refused(_)), "{e:?}");
                assert_eq!(stored, None);
            }
        }
    }
    let first_now = store
        .find_lease(&t.id, &first.credential)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_now.state, LeaseState::Revoked);
    assert_eq!(first_now.reason.as_deref(), Some("task completed"));
    assert!(first_now.ended_at.is_some());

    // Nothing more is issued, and ending it again changes nothing.
    let after = sample_lease(&t, AGENT);
    assert!(matches!(
        store.issue_lease(&after, None, now).await,
        Err(IssueError::Refused(TaskError::Precondition(_)))
    ));
    let again = store
        .end_task(
            &t.id,
            Arc::new(|t: &mut Task| Err(TaskError::Precondition(Unmet::Ended(t.state)))),
            DAY,
        )
        .await;
    assert!(matches!(again, Err(UpdateError::Rejected(_))));
}

pub async fn renewal_replaces_the_credential_and_revocation_ends_one_lease(store: &dyn Store) {
    let now = SystemTime::now();
    let t = approved_task(store).await;
    let lease = sample_lease(&t, AGENT);
    store.issue_lease(&lease, None, now).await.unwrap();
    assert_eq!(store.get_lease(&lease.id).await.unwrap().unwrap(), lease);
    assert_eq!(
        store.get_lease(&LeaseId::generate(&t.id)).await.unwrap(),
        None
    );

    let later = now + Duration::from_secs(600);
    let renewed = store
        .renew_lease(&lease.id, &renewal("second-credential", later, now))
        .await
        .unwrap();
    assert_eq!(renewed.credential, "second-credential");
    assert_eq!(renewed.expires_at, later);
    let by_new = store
        .find_lease(&t.id, "second-credential")
        .await
        .unwrap()
        .unwrap();
    assert!(by_new.is_active("second-credential", now));
    // The previous credential still finds its lease, which no longer vouches for it.
    let by_old = store
        .find_lease(&t.id, &lease.credential)
        .await
        .unwrap()
        .unwrap();
    assert!(!by_old.is_active(&lease.credential, now));

    // An expired lease is not renewed.
    let expired_at = later + Duration::from_secs(1);
    let err = store
        .renew_lease(
            &lease.id,
            &renewal("third", later + Duration::from_secs(60), expired_at),
        )
        .await;
    assert!(matches!(err, Err(IssueError::Refused(_))), "{err:?}");

    // Revocation ends one lease; the others of the task stay.
    let other = sample_lease(&t, AGENT);
    store.issue_lease(&other, None, now).await.unwrap();
    let revoked = store
        .revoke_lease(&lease.id, "revoked by the agent", now)
        .await
        .unwrap();
    assert_eq!(revoked.state, LeaseState::Revoked);
    assert_eq!(revoked.reason.as_deref(), Some("revoked by the agent"));
    assert!(
        !store
            .find_lease(&t.id, "second-credential")
            .await
            .unwrap()
            .unwrap()
            .is_active("second-credential", now)
    );
    assert!(
        store
            .get_lease(&other.id)
            .await
            .unwrap()
            .unwrap()
            .is_active(&other.credential, now)
    );
    assert!(matches!(
        store.revoke_lease(&lease.id, "again", now).await,
        Err(UpdateError::Rejected(_))
    ));
    assert!(matches!(
        store
            .renew_lease(&lease.id, &renewal("fourth", later, now))
            .await,
        Err(IssueError::Refused(_))
    ));
    assert_eq!(
        store
            .revoke_lease(&LeaseId::generate(&t.id), "x", now)
            .await,
        Err(UpdateError::NotFound)
    );

    // After the task ends, no renewal.
    store.end_task(&t.id, complete(), DAY).await.unwrap();
    assert!(matches!(
        store
            .renew_lease(&other.id, &renewal("fifth", later, now))
            .await,
        Err(IssueError::Refused(_))
    ));
}

pub async fn locking_an_agent_ends_its_tasks_and_leases_at_once(store: &dyn Store) {
    let now = SystemTime::now();
    let agent = format!("spiffe://lock.test/agent/a-{}", TaskId::generate());
    let other = format!("spiffe://lock.test/agent/b-{}", TaskId::generate());
    let mk = |executor: &str, quorum: u32| sample_task(executor, REQUESTER, quorum);

    let running = mk(&agent, 0);
    let pending = mk(&agent, 1);
    let done = mk(&agent, 0);
    let bystander = mk(&other, 0);
    for t in [&running, &pending, &done, &bystander] {
        store.create_task(t).await.unwrap();
    }
    let l1 = sample_lease(&running, &agent);
    let l2 = sample_lease(&running, &agent);
    let lb = sample_lease(&bystander, &other);
    for l in [&l1, &l2, &lb] {
        store.issue_lease(l, None, now).await.unwrap();
    }
    store.end_task(&done.id, complete(), DAY).await.unwrap();
    let live = store.live_leases().await.unwrap();

    let lock = Lock {
        agent: w(&agent),
        reason: "credential leak".into(),
        operator: w("spiffe://taskcred.dev/human/operator"),
        at: now,
        until: None,
    };
    let outcome = lock_and_sweep(store, &lock).await;
    let mut tasks = outcome.tasks.clone();
    tasks.sort();
    let mut expected = vec![running.id, pending.id];
    expected.sort();
    assert_eq!(tasks, expected, "open tasks revoked, ended ones untouched");
    let mut revoked: Vec<LeaseId> = outcome.leases.iter().map(|l| l.id.clone()).collect();
    revoked.sort();
    let mut both = vec![l1.id.clone(), l2.id.clone()];
    both.sort();
    assert_eq!(revoked, both);
    assert_eq!(
        store.live_leases().await.unwrap(),
        live - 2,
        "out of the expiry index"
    );

    for id in [running.id, pending.id] {
        let t = store.get_task(&id).await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Revoked);
        assert!(t.end_reason.unwrap().contains("credential leak"));
    }
    assert_eq!(
        store.get_task(&done.id).await.unwrap().unwrap().state,
        TaskState::Completed
    );
    for l in [&l1, &l2] {
        let now_l = store.get_lease(&l.id).await.unwrap().unwrap();
        assert_eq!(now_l.state, LeaseState::Revoked);
    }
    // Listing shows the revoked state too.
    let listed = store
        .list_tasks(&TaskQuery {
            executor: Some(w(&agent)),
            ..query()
        })
        .await
        .unwrap();
    assert!(
        listed
            .tasks
            .iter()
            .filter(|t| t.id == running.id)
            .all(|t| t.state == TaskState::Revoked)
    );
    // The other agent keeps its lease.
    assert!(
        store
            .get_lease(&lb.id)
            .await
            .unwrap()
            .unwrap()
            .is_active(&lb.credential, now)
    );

    // Nothing new for the locked agent: no new task either.
    let fresh = mk(&agent, 0);
    assert!(
        matches!(store.create_task(&fresh).await, Err(StoreError::Locked(r)) if r == "credential leak")
    );
    assert_eq!(store.get_task(&fresh.id).await.unwrap(), None);
    assert!(
        store
            .list_locks(now)
            .await
            .unwrap()
            .iter()
            .any(|x| x.agent.as_str() == agent)
    );
    assert_eq!(
        store
            .agent_lock(&w(&agent), now)
            .await
            .unwrap()
            .map(|x| x.reason),
        Some("credential leak".into())
    );
    assert_eq!(
        store
            .agent_lock(&w("spiffe://taskcred.dev/agent/never-locked"), now)
            .await
            .unwrap(),
        None
    );

    // Unlocked: issuance works again.
    assert_eq!(
        store
            .unlock_agent(&w(&agent))
            .await
            .unwrap()
            .map(|x| x.reason),
        Some("credential leak".into())
    );
    assert_eq!(store.unlock_agent(&w(&agent)).await.unwrap(), None);
    assert_eq!(store.agent_lock(&w(&agent), now).await.unwrap(), None);
    store.create_task(&fresh).await.unwrap();
    let l = sample_lease(&fresh, &agent);
    store.issue_lease(&l, None, now).await.unwrap();

    // A lock with an end lifts by itself.
    let brief = Lock {
        until: Some(SystemTime::now() + Duration::from_millis(300)),
        ..lock.clone()
    };
    lock_and_sweep(store, &brief).await;
    assert!(
        store.get_lease(&l.id).await.unwrap().unwrap().state == LeaseState::Revoked,
        "swept again"
    );
    let mut later = mk(&agent, 0);
    assert!(matches!(
        store.create_task(&later).await,
        Err(StoreError::Locked(_))
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    later.created_at = SystemTime::now();
    store.create_task(&later).await.unwrap();
    let l = sample_lease(&later, &agent);
    assert_eq!(
        store
            .agent_lock(&w(&agent), SystemTime::now())
            .await
            .unwrap(),
        None
    );
    store
        .issue_lease(&l, None, SystemTime::now())
        .await
        .unwrap();
    assert!(
        !store
            .list_locks(SystemTime::now())
            .await
            .unwrap()
            .iter()
            .any(|x| x.agent.as_str() == agent)
    );
}

pub async fn signing_keys_are_published_until_their_time(store: &dyn Store) {
    use taskcred::mint::{JwtKey, PublishedKey};
    let now = SystemTime::now();
    let a = JwtKey::generate(taskcred::config::JwtAlgorithm::ES256).unwrap();
    let b = JwtKey::generate(taskcred::config::JwtAlgorithm::EdDSA).unwrap();
    let kids = |keys: &[PublishedKey]| {
        let mut k: Vec<String> = keys.iter().map(|k| k.kid.clone()).collect();
        k.sort();
        k
    };
    let mut both = vec![a.kid().to_owned(), b.kid().to_owned()];
    both.sort();

    let a_long = PublishedKey::of(&a, now + Duration::from_secs(600));
    store.publish_key(&a_long).await.unwrap();
    store
        .publish_key(&PublishedKey::of(&b, now + Duration::from_secs(60)))
        .await
        .unwrap();
    let live = store.published_keys(now).await.unwrap();
    assert_eq!(kids(&live), both);
    assert!(
        live.contains(&a_long),
        "the JWK and time read back unchanged"
    );

    // Publishing again moves the time, earlier as well as later.
    store
        .publish_key(&PublishedKey::of(&a, now + Duration::from_secs(30)))
        .await
        .unwrap();
    let later = now + Duration::from_secs(45);
    assert_eq!(kids(&store.published_keys(later).await.unwrap()), [b.kid()]);
    // Once passed, a key is gone, also for an earlier reader.
    let after = now + Duration::from_secs(61);
    assert!(store.published_keys(after).await.unwrap().is_empty());
    assert!(store.published_keys(now).await.unwrap().is_empty());
}

/// A lease of `task` whose credential expires `ttl` after `now`.
fn lease_expiring(task: &Task, now: SystemTime, ttl: Duration) -> Lease {
    Lease {
        issued_at: now,
        expires_at: now + ttl,
        renew_until: now + Duration::from_secs(3600),
        ..sample_lease(task, AGENT)
    }
}

fn ids(leases: &[Lease], of: &[&Lease]) -> Vec<LeaseId> {
    let mine: Vec<&LeaseId> = of.iter().map(|l| &l.id).collect();
    let mut out: Vec<LeaseId> = leases
        .iter()
        .filter(|l| mine.contains(&&l.id))
        .map(|l| l.id.clone())
        .collect();
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    out
}

pub async fn the_reaper_ends_each_due_lease_once(store: &dyn Store) {
    let now = SystemTime::now();
    let ms = Duration::from_millis;
    let t = approved_task(store).await;
    let a = lease_expiring(&t, now, ms(100));
    let b = lease_expiring(&t, now, ms(200));
    let c = lease_expiring(&t, now, ms(10_000));
    for l in [&a, &b, &c] {
        store.issue_lease(l, None, now).await.unwrap();
    }
    let due = store.next_due().await.unwrap().unwrap();
    assert!(due <= now + ms(101), "the earliest expiry is next");

    // Not yet due: nothing. Due: ended once, as expired at its own expiry.
    assert!(
        ids(
            &store.expire_leases(now + ms(50), 1000).await.unwrap(),
            &[&a, &b, &c]
        )
        .is_empty()
    );
    let ended = store.expire_leases(now + ms(150), 1000).await.unwrap();
    assert_eq!(ids(&ended, &[&a, &b, &c]), std::slice::from_ref(&a.id));
    let got = ended.iter().find(|l| l.id == a.id).unwrap();
    assert_eq!(got.state, LeaseState::Expired);
    assert!(got.ended_at.unwrap() >= a.expires_at - ms(1) && got.ended_at.unwrap() <= a.expires_at);
    assert!(
        ids(
            &store.expire_leases(now + ms(150), 1000).await.unwrap(),
            &[&a]
        )
        .is_empty()
    );
    assert_eq!(
        store.get_lease(&a.id).await.unwrap().unwrap().state,
        LeaseState::Expired
    );

    // Renewed before its expiry: re-filed under the new one, ended then.
    store
        .renew_lease(
            &b.id,
            &renewal("renewed-credential", now + ms(5000), now + ms(100)),
        )
        .await
        .unwrap();
    assert!(
        ids(
            &store.expire_leases(now + ms(300), 1000).await.unwrap(),
            &[&b]
        )
        .is_empty()
    );
    assert_eq!(
        store.get_lease(&b.id).await.unwrap().unwrap().state,
        LeaseState::Active
    );
    let ended = store.expire_leases(now + ms(5001), 1000).await.unwrap();
    assert_eq!(ids(&ended, &[&b, &c]), std::slice::from_ref(&b.id));

    // Revoked before its expiry: never "expired".
    store
        .revoke_lease(&c.id, "done", now + ms(300))
        .await
        .unwrap();
    assert!(
        ids(
            &store.expire_leases(now + ms(10_001), 1000).await.unwrap(),
            &[&c]
        )
        .is_empty()
    );
    assert_eq!(
        store.get_lease(&c.id).await.unwrap().unwrap().state,
        LeaseState::Revoked
    );

    // Many due at once, several reapers racing: each lease is ended exactly once.
    let t = approved_task(store).await;
    let many: Vec<Lease> = (0..60u64)
        .map(|i| lease_expiring(&t, now, ms(20_000 + i)))
        .collect();
    for l in &many {
        store.issue_lease(l, None, now).await.unwrap();
    }
    let later = now + ms(21_000);
    let rounds = futures_join((0..4).map(|_| async move {
        let mut mine = Vec::new();
        loop {
            let ended = store.expire_leases(later, 7).await.unwrap();
            if ended.is_empty() {
                break;
            }
            mine.extend(ended);
        }
        mine
    }))
    .await;
    let all: Vec<Lease> = rounds.into_iter().flatten().collect();
    let refs: Vec<&Lease> = many.iter().collect();
    let mut expected: Vec<LeaseId> = many.iter().map(|l| l.id.clone()).collect();
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(ids(&all, &refs), expected, "each exactly once");
}

pub async fn overdue_tasks_are_found_by_deadline(store: &dyn Store) {
    let now = SystemTime::now();
    let mut t = sample_task(AGENT, REQUESTER, 0);
    t.deadline = now + Duration::from_secs(2);
    store.create_task(&t).await.unwrap();
    assert!(
        !store
            .overdue_tasks(now, 1000)
            .await
            .unwrap()
            .contains(&t.id)
    );
    let after = now + Duration::from_secs(3);
    assert!(
        store
            .overdue_tasks(after, 1000)
            .await
            .unwrap()
            .contains(&t.id)
    );
    assert!(store.next_due().await.unwrap().unwrap() <= t.deadline + Duration::from_millis(1));

    // The reaper's step: end it as expired, with its leases, then forget the deadline.
    let expire: taskcred::store::TaskChange = Arc::new(move |task: &mut Task| task.expire(after));
    let (ended, _) = store.end_task(&t.id, expire.clone(), DAY).await.unwrap();
    assert_eq!(ended.state, taskcred::task::TaskState::Expired);
    assert!(matches!(
        store.end_task(&t.id, expire, DAY).await,
        Err(UpdateError::Rejected(_))
    ));
    store.forget_deadline(&t.id).await.unwrap();
    assert!(
        !store
            .overdue_tasks(after, 1000)
            .await
            .unwrap()
            .contains(&t.id)
    );
}

/// Every way a credential stops before its expiry is logged, in order, in the same step; a
/// reader resumes after any cursor; a waiter wakes for a new entry; expiry is not logged; old
/// entries are pruned.
pub async fn revocations_are_logged_in_order_and_resumable(store: &dyn Store) {
    let now = SystemTime::now();
    let head = store.revocation_head().await.unwrap();
    let after_head = |limit| store.revocations(read(Some(head), limit, Duration::ZERO));

    // A renewal supersedes the first credential; revoking the lease ends the second.
    let t = approved_task(store).await;
    let renewed = sample_lease(&t, AGENT);
    store.issue_lease(&renewed, None, now).await.unwrap();
    let later = now + Duration::from_secs(600);
    store
        .renew_lease(&renewed.id, &renewal("renewed-credential", later, now))
        .await
        .unwrap();
    store
        .revoke_lease(&renewed.id, "by hand", now)
        .await
        .unwrap();
    // Ending the task revokes its other lease; an expired lease is not logged.
    let ended = sample_lease(&t, AGENT);
    store.issue_lease(&ended, None, now).await.unwrap();
    let expiring = lease_expiring(&t, now, Duration::from_millis(1));
    store.issue_lease(&expiring, None, now).await.unwrap();
    let reaped = store
        .expire_leases(now + Duration::from_secs(1), 1000)
        .await
        .unwrap();
    assert!(reaped.iter().any(|l| l.id == expiring.id));
    store.end_task(&t.id, complete(), DAY).await.unwrap();

    let states: Vec<(LeaseId, LeaseState)> = store
        .task_leases(&t.id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.id, l.state))
        .collect();
    assert_eq!(
        states,
        vec![
            (renewed.id.clone(), LeaseState::Revoked),
            (ended.id.clone(), LeaseState::Revoked),
            (expiring.id.clone(), LeaseState::Expired),
        ]
    );

    let log = after_head(100).await.unwrap();
    let seen: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|r| (r.lease.as_str(), r.credential.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (renewed.id.as_str(), renewed.credential.as_str(), SUPERSEDED),
            (renewed.id.as_str(), "renewed-credential", "by hand"),
            (
                ended.id.as_str(),
                ended.credential.as_str(),
                "task completed"
            ),
        ],
        "{log:#?}"
    );
    let first: &Revocation = &log[0];
    assert_eq!(first.kind, CredentialKind::Jwt);
    assert_eq!(first.task, t.id);
    assert_eq!(first.agent, w(AGENT));
    assert_eq!(first.audience.as_deref(), Some("db"));
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    assert_eq!(ms(first.expires_at), ms(renewed.expires_at));
    assert_eq!(ms(log[1].expires_at), ms(later));
    assert!(log.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert!(head < log[0].cursor);
    assert_eq!(store.revocation_head().await.unwrap(), log[2].cursor);

    // Paging and resuming: after any cursor come exactly the later entries.
    assert_eq!(after_head(1).await.unwrap(), log[..1]);
    let rest = store
        .revocations(read(Some(log[0].cursor), 100, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(rest, log[1..]);
    let none = store
        .revocations(read(Some(log[2].cursor), 100, Duration::from_millis(200)))
        .await
        .unwrap();
    assert!(none.is_empty());

    // A waiter wakes when a revocation is logged.
    let locked = format!("spiffe://log.test/agent/{}", TaskId::generate());
    let task = sample_task(&locked, REQUESTER, 0);
    store.create_task(&task).await.unwrap();
    let lease = sample_lease(&task, &locked);
    store.issue_lease(&lease, None, now).await.unwrap();
    let waiter = store.revocations(read(Some(log[2].cursor), 100, Duration::from_secs(5)));
    let lock = Lock {
        agent: w(&locked),
        reason: "compromised".into(),
        operator: w(REQUESTER),
        at: now,
        until: None,
    };
    let locker = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lock_and_sweep(store, &lock).await;
    };
    let started = std::time::Instant::now();
    let (woken, ()) = tokio::join!(waiter, locker);
    let woken = woken.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(woken.len(), 1, "{woken:#?}");
    assert_eq!(woken[0].lease, lease.id);
    assert_eq!(woken[0].reason, "agent locked: compromised");
    store.unlock_agent(&w(&locked)).await.unwrap();

    // Pruning drops what was logged before the bound.
    store
        .prune_revocations(SystemTime::now() + Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(log_is_empty(store).await);
}

/// The first epoch asked for is kept; later ones do not replace it.
pub async fn the_epoch_is_made_once(store: &dyn Store) {
    let first = taskcred::store::Epoch::new(SystemTime::now());
    let kept = store.epoch(&first).await.unwrap();
    let again = store
        .epoch(&taskcred::store::Epoch::new(SystemTime::now()))
        .await
        .unwrap();
    assert_eq!(kept, again);
}

/// A claim is held once until it expires or is released by its holder.
pub async fn claims_are_held_once(store: &dyn Store) {
    let key = format!("conformance:{}", uuid::Uuid::now_v7());
    let until = SystemTime::now() + Duration::from_secs(60);
    assert_eq!(store.claimed(&key).await.unwrap(), None);
    assert_eq!(store.claim(&claim(&key, "a", until)).await.unwrap(), None);
    assert_eq!(store.claimed(&key).await.unwrap().as_deref(), Some("a"));
    assert_eq!(
        store
            .claim(&claim(&key, "b", until))
            .await
            .unwrap()
            .as_deref(),
        Some("a")
    );
    // Only the holder releases it.
    store.release_claim(&key, "b").await.unwrap();
    assert_eq!(
        store
            .claim(&claim(&key, "b", until))
            .await
            .unwrap()
            .as_deref(),
        Some("a")
    );
    store.release_claim(&key, "a").await.unwrap();
    assert_eq!(store.claim(&claim(&key, "b", until)).await.unwrap(), None);
    // An expired claim is no claim.
    let short = format!("{key}:short");
    let soon = SystemTime::now() + Duration::from_millis(200);
    assert_eq!(store.claim(&claim(&short, "x", soon)).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.claimed(&short).await.unwrap(), None);
    assert_eq!(store.claim(&claim(&short, "y", until)).await.unwrap(), None);
    // Swapped only by what it holds: a holder keeps it longer, a mark moves forward once.
    assert!(
        !store
            .swap_claim("a", &claim(&key, "c", until))
            .await
            .unwrap()
    );
    assert!(
        store
            .swap_claim("b", &claim(&key, "c", until))
            .await
            .unwrap()
    );
    assert!(
        !store
            .swap_claim("b", &claim(&key, "d", until))
            .await
            .unwrap()
    );
    assert_eq!(store.claimed(&key).await.unwrap().as_deref(), Some("c"));
    let soon = SystemTime::now() + Duration::from_millis(200);
    assert!(
        store
            .swap_claim("c", &claim(&key, "c", soon))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.claimed(&key).await.unwrap(), None);
    assert!(
        !store
            .swap_claim("c", &claim(&key, "e", until))
            .await
            .unwrap()
    );
}

/// A lease is recorded only against the revision of the task its issuance decided on: a task
/// changed since (here revoked, then a benign change) refuses it with the task as it is, and
/// nothing is written; the current revision records it, and the first issuance returns the
/// task it marked started.
pub async fn a_lease_is_recorded_only_against_the_revision_decided_on(store: &dyn Store) {
    let now = SystemTime::now();
    let t = approved_task(store).await;
    let read = store.get_versioned_task(&t.id).await.unwrap().unwrap();
    assert_eq!(read.task, t);
    let first = sample_lease(&t, AGENT);
    let started = store
        .issue_lease(&first, Some((&read.task, read.revision)), now)
        .await
        .unwrap()
        .expect("the first issuance marks the task started");
    assert!(started.task.started_at.is_some());
    assert_ne!(started.revision, read.revision);
    assert_eq!(
        store.get_versioned_task(&t.id).await.unwrap(),
        Some(started.clone())
    );
    // The old revision is refused now, with the task as it is; nothing is recorded.
    let stale = sample_lease(&t, AGENT);
    match store
        .issue_lease(&stale, Some((&read.task, read.revision)), now)
        .await
    {
        Err(IssueError::Changed(current)) => assert_eq!(*current, started),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get_lease(&stale.id).await.unwrap(), None);
    // The current one records, and changes nothing of the task.
    let second = sample_lease(&t, AGENT);
    let unchanged = store
        .issue_lease(&second, Some((&started.task, started.revision)), now)
        .await
        .unwrap();
    assert_eq!(unchanged, None);
    // Revoked since it was read: refused as changed, even though the seen copy is approved.
    store.end_task(&t.id, complete(), DAY).await.unwrap();
    let late = sample_lease(&t, AGENT);
    match store
        .issue_lease(&late, Some((&started.task, started.revision)), now)
        .await
    {
        Err(IssueError::Changed(current)) => assert_eq!(current.task.state, TaskState::Completed),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get_lease(&late.id).await.unwrap(), None);
    assert_eq!(store.task_leases(&t.id).await.unwrap().len(), 2);
}
