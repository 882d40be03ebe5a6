//! Unit tests of the embedded store's own behaviour (the conformance suite covers the
//! [`Store`](crate::store::Store) contract).

use std::os::unix::fs::PermissionsExt as _;

use super::EmbeddedStore;

#[test]
fn the_database_file_is_its_owners_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskcred.db");
    drop(EmbeddedStore::open(&path).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = EmbeddedStore::open(&path).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
}

/// What the lock sweep walks, and the index of open tasks that bounds it.
mod open_tasks {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use redb::{ReadableDatabase as _, ReadableTable as _, WriteTransaction};

    use super::super::EmbeddedStore;
    use super::super::tables::{META, OPEN_BY_EXECUTOR, OPEN_BY_EXECUTOR_V1, TASKS};
    use crate::identity::WorkloadId;
    use crate::lease::{CredentialKind, Lease, LeaseId, LeaseState, Lock};
    use crate::store::{
        Epoch, LeaseStore as _, LockStore as _, LockSweep, MetaStore as _, TaskChange,
        TaskStore as _, decode, encode,
    };
    use crate::task::{
        Approval, Decision, Outcome, RawTaskRequest, Task, TaskId, TaskLimits, TaskRequest,
    };

    const REQUESTER: &str = "spiffe://taskcred.dev/human/requester";
    const APPROVER: &str = "spiffe://taskcred.dev/human/approver";
    const DAY: Duration = Duration::from_secs(86_400);

    pub(super) fn w(id: &str) -> WorkloadId {
        WorkloadId::parse(id).unwrap()
    }

    pub(super) fn agent(name: &str) -> String {
        format!("spiffe://taskcred.dev/agent/{name}")
    }

    /// A task of `executor`: approved with quorum 0, pending otherwise.
    pub(super) fn task(executor: &str, quorum: u32) -> Task {
        let raw = RawTaskRequest {
            executor: executor.into(),
            purpose: "unit".into(),
            grants: vec![("db".into(), vec!["read".into()])],
            ..RawTaskRequest::default()
        };
        let request = TaskRequest::parse(raw, &TaskLimits::default()).unwrap();
        Task::new(
            TaskId::generate(),
            request,
            w(REQUESTER),
            quorum,
            Vec::new(),
            SystemTime::now(),
        )
    }

    pub(super) fn lease(task: &Task) -> Lease {
        let now = SystemTime::now();
        Lease {
            id: LeaseId::generate(&task.id),
            task: task.id,
            agent: task.executor.clone(),
            kind: CredentialKind::Jwt,
            credential: LeaseId::generate(&task.id).as_str().to_owned(),
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

    /// A store with its epoch made, as a broker begins.
    pub(super) async fn begun(path: &std::path::Path) -> EmbeddedStore {
        let store = EmbeddedStore::open(path).unwrap();
        store.epoch(&Epoch::new(SystemTime::now())).await.unwrap();
        store
    }

    /// Creates `task` and records `leases` leases for it.
    async fn with_leases(store: &EmbeddedStore, task: &Task, leases: usize) -> Vec<LeaseId> {
        store.create_task(task).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..leases {
            let l = lease(task);
            store
                .issue_lease(&l, None, SystemTime::now())
                .await
                .unwrap();
            ids.push(l.id);
        }
        ids
    }

    fn change(
        f: impl Fn(&mut Task) -> Result<(), crate::task::TaskError> + Send + Sync + 'static,
    ) -> TaskChange {
        Arc::new(f)
    }

    fn complete() -> TaskChange {
        change(|t: &mut Task| {
            let by = t.executor.clone();
            t.complete(&by, Outcome::Succeeded, SystemTime::now())
        })
    }

    fn decide(decision: Decision) -> TaskChange {
        change(move |t: &mut Task| {
            let approval = Approval {
                id: TaskId::generate().to_string(),
                approver: w(APPROVER),
                decision,
                at: SystemTime::now(),
                note: String::new(),
            };
            t.decide(approval, SystemTime::now())
        })
    }

    fn raw_write(store: &EmbeddedStore, f: impl FnOnce(&WriteTransaction)) {
        let txn = store.db.begin_write().unwrap();
        f(&txn);
        txn.commit().unwrap();
    }

    /// The entries of the open-task index.
    fn indexed(store: &EmbeddedStore) -> BTreeSet<(String, String)> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(OPEN_BY_EXECUTOR).unwrap();
        table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, _) = e.unwrap();
                let (who, id) = k.value();
                (who.to_owned(), id.to_owned())
            })
            .collect()
    }

    /// What the open-task index must hold: every task not ended, read from `tasks`.
    fn open_in_tasks(store: &EmbeddedStore) -> BTreeSet<(String, String)> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(TASKS).unwrap();
        table
            .iter()
            .unwrap()
            .filter_map(|e| {
                let (k, v) = e.unwrap();
                let t = decode(v.value()).unwrap();
                (!t.state.is_terminal())
                    .then(|| (t.executor.as_str().to_owned(), k.value().to_owned()))
            })
            .collect()
    }

    fn entry(t: &Task) -> (String, String) {
        (t.executor.as_str().to_owned(), t.id.to_string())
    }

    pub(super) fn lock(agent: &str) -> Lock {
        Lock {
            agent: w(agent),
            reason: "unit".into(),
            operator: w(REQUESTER),
            at: SystemTime::now(),
            until: None,
        }
    }

    /// Locks `agent` and sweeps to the end `limit` at a time; after each step, no ended task of
    /// `watched` holds an active lease. Returns what was ended.
    async fn lock_and_sweep(
        store: &EmbeddedStore,
        agent: &str,
        limit: usize,
        watched: &[Task],
    ) -> (BTreeSet<TaskId>, BTreeSet<LeaseId>) {
        let lock = store.lock_agent(&lock(agent)).await.unwrap();
        let (mut tasks, mut leases) = (BTreeSet::new(), BTreeSet::new());
        for _ in 0..100 {
            let step = LockSweep {
                agent: &lock.agent,
                reason: "agent locked: unit",
                at: lock.at,
                retention: DAY,
                limit,
            };
            let swept = store.sweep_lock(&step).await.unwrap();
            assert!(swept.tasks.len() <= limit && swept.leases.len() <= limit);
            for t in swept.tasks {
                assert!(tasks.insert(t), "task {t} ended twice");
            }
            for l in swept.leases {
                assert!(leases.insert(l.id.clone()), "lease {} revoked twice", l.id);
            }
            for t in watched {
                let task = store.get_task(&t.id).await.unwrap().unwrap();
                if task.state.is_terminal() {
                    let live = store.task_leases(&t.id).await.unwrap();
                    assert!(
                        live.iter().all(|l| l.state != LeaseState::Active),
                        "ended task {} holds an active lease",
                        t.id
                    );
                }
            }
            if swept.remaining == 0 {
                return (tasks, leases);
            }
        }
        panic!("the sweep does not end");
    }

    /// An agent with a long history and a few open tasks: the sweep ends exactly the open ones
    /// and their active leases, each task only after its last lease, and never reads the
    /// history (made undecodable here, which a walk of it would trip on).
    #[tokio::test]
    async fn a_lock_sweep_walks_the_open_tasks_never_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = begun(&dir.path().join("taskcred.db")).await;
        let (locked, other) = (agent("locked"), agent("other"));
        let mut history = Vec::new();
        for _ in 0..40 {
            let t = task(&locked, 0);
            with_leases(&store, &t, 1).await;
            store.end_task(&t.id, complete(), DAY).await.unwrap();
            history.push(t);
        }
        let mut open = Vec::new();
        let mut open_leases = BTreeSet::new();
        for n in [2, 3, 0] {
            let t = task(&locked, 0);
            open_leases.extend(with_leases(&store, &t, n).await);
            open.push(t);
        }
        for _ in 0..2 {
            let t = task(&locked, 1);
            store.create_task(&t).await.unwrap();
            open.push(t);
        }
        let bystander = task(&other, 0);
        let bystander_lease = with_leases(&store, &bystander, 1).await;
        raw_write(&store, |txn| {
            let mut tasks = txn.open_table(TASKS).unwrap();
            for t in &history {
                tasks
                    .insert(t.id.to_string().as_str(), b"{".as_slice())
                    .unwrap();
            }
        });

        let (tasks, leases) = lock_and_sweep(&store, &locked, 2, &open).await;

        assert_eq!(tasks, open.iter().map(|t| t.id).collect());
        assert_eq!(leases, open_leases);
        assert_eq!(indexed(&store), BTreeSet::from([entry(&bystander)]));
        let lease = store.get_lease(&bystander_lease[0]).await.unwrap().unwrap();
        assert_eq!(lease.state, LeaseState::Active, "another agent's lease");
        assert_eq!(store.live_leases().await.unwrap(), 1);
    }

    /// Creating, deciding, cancelling, ending, sweeping and pruning keep the index exactly the
    /// tasks not ended.
    #[tokio::test]
    async fn the_open_task_index_follows_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = begun(&dir.path().join("taskcred.db")).await;
        let (a, b) = (agent("a"), agent("b"));
        let check = |what: &str| {
            assert_eq!(indexed(&store), open_in_tasks(&store), "after {what}");
        };
        let approved = task(&a, 0);
        let denied = task(&a, 1);
        let approving = task(&a, 1);
        let cancelled = task(&a, 0);
        let swept = task(&b, 0);
        with_leases(&store, &approved, 1).await;
        for t in [&denied, &approving, &cancelled] {
            store.create_task(t).await.unwrap();
        }
        with_leases(&store, &swept, 2).await;
        check("creating");
        assert_eq!(indexed(&store).len(), 5);

        store
            .update_task(&denied.id, decide(Decision::Deny), DAY)
            .await
            .unwrap();
        check("a denial");
        store
            .update_task(&approving.id, decide(Decision::Approve), DAY)
            .await
            .unwrap();
        check("an approval");
        let requester = w(REQUESTER);
        store
            .update_task(
                &cancelled.id,
                change(move |t: &mut Task| t.cancel(&requester, SystemTime::now())),
                DAY,
            )
            .await
            .unwrap();
        check("a cancellation");
        store.end_task(&approved.id, complete(), DAY).await.unwrap();
        check("an end");
        lock_and_sweep(&store, &b, 1, &[swept]).await;
        check("a sweep");
        assert_eq!(indexed(&store), BTreeSet::from([entry(&approving)]));
        let pruned = store
            .prune_ended(SystemTime::now() + 2 * DAY)
            .await
            .unwrap();
        assert_eq!(pruned, 4);
        check("pruning");
        assert_eq!(indexed(&store), BTreeSet::from([entry(&approving)]));
    }

    /// A file written before the index (no marker, no entries, and a task an earlier sweep
    /// revoked before its lease) is indexed when opened, its leftover lease revoked as that
    /// sweep would have; the sweep then finds the open tasks and their leases.
    #[tokio::test]
    async fn a_file_from_an_earlier_version_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taskcred.db");
        let store = begun(&path).await;
        let locked = agent("old");
        let open = task(&locked, 0);
        let open_lease = with_leases(&store, &open, 1).await;
        let pending = task(&locked, 1);
        store.create_task(&pending).await.unwrap();
        let done = task(&locked, 0);
        with_leases(&store, &done, 1).await;
        store.end_task(&done.id, complete(), DAY).await.unwrap();
        let mut half_swept = task(&locked, 0);
        let leftover = with_leases(&store, &half_swept, 1).await;
        let at = SystemTime::now();
        assert!(half_swept.revoke("agent locked: earlier", at));
        raw_write(&store, |txn| {
            // What an earlier version wrote: the task revoked, its lease still active.
            txn.open_table(TASKS)
                .unwrap()
                .insert(
                    half_swept.id.to_string().as_str(),
                    encode(&half_swept).unwrap().as_slice(),
                )
                .unwrap();
            assert!(txn.delete_table(OPEN_BY_EXECUTOR).unwrap());
            txn.open_table(META)
                .unwrap()
                .remove(OPEN_BY_EXECUTOR_V1)
                .unwrap();
        });
        drop(store);

        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            indexed(&store),
            BTreeSet::from([entry(&open), entry(&pending)])
        );
        {
            let txn = store.db.begin_read().unwrap();
            let meta = txn.open_table(META).unwrap();
            assert!(meta.get(OPEN_BY_EXECUTOR_V1).unwrap().is_some());
        }
        let revoked = store.get_lease(&leftover[0]).await.unwrap().unwrap();
        assert_eq!(revoked.state, LeaseState::Revoked);
        assert_eq!(revoked.reason.as_deref(), Some("agent locked: earlier"));
        assert_eq!(store.live_leases().await.unwrap(), 1);

        let (tasks, leases) =
            lock_and_sweep(&store, &locked, 500, &[open.clone(), pending.clone()]).await;
        assert_eq!(tasks, BTreeSet::from([open.id, pending.id]));
        assert_eq!(leases, open_lease.into_iter().collect());
        assert!(indexed(&store).is_empty());
        drop(store);
        // Indexed once: opened again, nothing is redone.
        let store = EmbeddedStore::open(&path).unwrap();
        assert!(indexed(&store).is_empty());
        assert_eq!(store.live_leases().await.unwrap(), 0);
    }
}

/// Issuances recorded together: each answered alone, and only once durable.
mod group_commit {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use tokio::task::JoinHandle;

    use super::super::EmbeddedStore;
    use super::super::tables::TASKS;
    use super::open_tasks::{agent, begun, lease, lock, task};
    use crate::lease::Lease;
    use crate::store::{
        IssueError, LeaseStore as _, LockStore as _, StoreError, TaskStore as _, VersionedTask,
    };
    use crate::task::Task;

    type Answer = Result<Option<VersionedTask>, IssueError>;

    /// Waits until `n` issuances wait in the writer's queue.
    async fn queued(store: &EmbeddedStore, n: usize) {
        for _ in 0..500 {
            if store.writer.queued() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} queued, not {n}", store.writer.queued());
    }

    /// Issues `lease` in a tokio task of its own; it is queued once `queued` counts it.
    fn issue(
        store: &Arc<EmbeddedStore>,
        lease: &Lease,
        seen: Option<VersionedTask>,
    ) -> JoinHandle<Answer> {
        let (store, lease) = (store.clone(), lease.clone());
        tokio::spawn(async move {
            let seen = seen.as_ref().map(|v| (&v.task, v.revision));
            store.issue_lease(&lease, seen, SystemTime::now()).await
        })
    }

    /// The answers of `issued`, in order.
    async fn answered(issued: Vec<JoinHandle<Answer>>) -> Vec<Answer> {
        let mut out = Vec::new();
        for done in issued {
            out.push(done.await.unwrap());
        }
        out
    }

    /// Holds the write lock while the writer takes an issuance of `other`, so that what is
    /// queued before the returned closure is called (it lets go of the lock) is one batch.
    async fn hold_the_writer(store: &Arc<EmbeddedStore>, other: &Task) -> impl FnOnce() {
        let held = store.db.begin_write().unwrap();
        let before = issue(store, &lease(other), None);
        tokio::time::sleep(Duration::from_millis(200)).await;
        queued(store, 0).await;
        move || {
            drop(held);
            drop(before);
        }
    }

    /// 64 callers at once, each on a task of its own: each lease is recorded and its task
    /// started.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_issuances_on_distinct_tasks_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(begun(&dir.path().join("taskcred.db")).await);
        let mut leases = Vec::new();
        for _ in 0..64 {
            let t = task(&agent("many"), 0);
            store.create_task(&t).await.unwrap();
            leases.push(lease(&t));
        }
        let issued: Vec<_> = leases.iter().map(|l| issue(&store, l, None)).collect();
        for (done, l) in issued.into_iter().zip(&leases) {
            let started = done
                .await
                .unwrap()
                .unwrap()
                .expect("the first lease starts its task");
            assert_eq!(started.task.id, l.task);
            assert!(started.task.started_at.is_some());
        }
        for l in &leases {
            assert_eq!(store.get_lease(&l.id).await.unwrap().as_ref(), Some(l));
            let task = store.get_task(&l.task).await.unwrap().unwrap();
            assert!(task.started_at.is_some());
        }
        assert_eq!(store.live_leases().await.unwrap(), 64);
    }

    /// One batch (the write lock is held while it queues) of good and refused issuances: each
    /// refused one gets its own error and writes nothing; a later one sees what an earlier one
    /// wrote.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_issuance_in_a_batch_fails_alone_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(begun(&dir.path().join("taskcred.db")).await);
        let locked_agent = agent("locked");
        let (good, locked, other) = (
            task(&agent("good"), 0),
            task(&locked_agent, 0),
            task(&agent("other"), 0),
        );
        for t in [&good, &locked, &other] {
            store.create_task(t).await.unwrap();
        }
        store.lock_agent(&lock(&locked_agent)).await.unwrap();
        let seen = store.get_versioned_task(&good.id).await.unwrap().unwrap();
        let unknown_task = task(&agent("good"), 0);
        let first = lease(&good);
        let unknown = lease(&unknown_task);
        let of_locked = lease(&locked);
        let mut again = lease(&good);
        again.id = first.id.clone();
        let second = lease(&good);
        let stale = lease(&good);

        let release = hold_the_writer(&store, &other).await;
        let mut answers = Vec::new();
        for (n, l) in [&first, &unknown, &of_locked, &again, &second]
            .into_iter()
            .enumerate()
        {
            answers.push(issue(&store, l, None));
            queued(&store, n + 1).await;
        }
        // Decided on the task as it was before `first` started it.
        answers.push(issue(&store, &stale, Some(seen)));
        queued(&store, 6).await;
        release();

        let answers = answered(answers).await;
        assert!(
            matches!(&answers[0], Ok(Some(_))),
            "first starts the task: {:?}",
            answers[0]
        );
        assert_eq!(answers[1], Err(IssueError::NotFound), "unknown task");
        assert_eq!(
            answers[2],
            Err(IssueError::Locked("unit".into())),
            "locked agent"
        );
        assert_eq!(
            answers[3],
            Err(IssueError::Exists),
            "the same lease id again"
        );
        assert_eq!(answers[4], Ok(None), "second: the task had started");
        assert!(
            matches!(answers[5], Err(IssueError::Changed(_))),
            "{:?}",
            answers[5]
        );

        assert_eq!(store.get_lease(&first.id).await.unwrap(), Some(first));
        assert_eq!(store.get_lease(&second.id).await.unwrap(), Some(second));
        for refused in [&unknown, &of_locked, &stale] {
            assert_eq!(store.get_lease(&refused.id).await.unwrap(), None);
        }
        let found = store.find_lease(&good.id, &again.credential).await.unwrap();
        assert_eq!(found, None, "the duplicate's credential");
        assert_eq!(store.get_task(&unknown_task.id).await.unwrap(), None);
        let locked = store.get_task(&locked.id).await.unwrap().unwrap();
        assert_eq!(locked.started_at, None, "the locked agent's task");
        assert_eq!(store.live_leases().await.unwrap(), 3);
    }

    /// A lease whose task record does not decode fails the batch's transaction (a store
    /// error, not a refusal): the batch is run again one by one, and only that lease fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_issuance_in_a_batch_is_retried_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(begun(&dir.path().join("taskcred.db")).await);
        let tasks: Vec<Task> = (0..4).map(|_| task(&agent("retried"), 0)).collect();
        for t in &tasks {
            store.create_task(t).await.unwrap();
        }
        let damaged = &tasks[1];
        let txn = store.db.begin_write().unwrap();
        txn.open_table(TASKS)
            .unwrap()
            .insert(damaged.id.to_string().as_str(), b"{".as_slice())
            .unwrap();
        txn.commit().unwrap();
        let leases: Vec<Lease> = tasks[..3].iter().map(lease).collect();

        let release = hold_the_writer(&store, &tasks[3]).await;
        let mut issued = Vec::new();
        for (n, l) in leases.iter().enumerate() {
            issued.push(issue(&store, l, None));
            queued(&store, n + 1).await;
        }
        release();

        let answers = answered(issued).await;
        assert!(matches!(answers[0], Ok(Some(_))), "{:?}", answers[0]);
        assert!(
            matches!(answers[1], Err(IssueError::Store(StoreError::Corrupt(_)))),
            "{:?}",
            answers[1]
        );
        assert!(matches!(answers[2], Ok(Some(_))), "{:?}", answers[2]);
        assert_eq!(store.get_lease(&leases[1].id).await.unwrap(), None);
        for l in [&leases[0], &leases[2]] {
            assert_eq!(store.get_lease(&l.id).await.unwrap().as_ref(), Some(l));
        }
        assert_eq!(
            store.live_leases().await.unwrap(),
            3,
            "with the one that held the writer"
        );
    }

    /// An `Ok` is on disk: the lease is there after the store is dropped and opened again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answered_issuance_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taskcred.db");
        let store = Arc::new(begun(&path).await);
        let t = task(&agent("durable"), 0);
        store.create_task(&t).await.unwrap();
        let leases: Vec<Lease> = (0..8).map(|_| lease(&t)).collect();
        let issued: Vec<_> = leases.iter().map(|l| issue(&store, l, None)).collect();
        for done in answered(issued).await {
            done.unwrap();
        }
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        for l in &leases {
            assert_eq!(store.get_lease(&l.id).await.unwrap().as_ref(), Some(l));
        }
    }

    /// Dropping the last handle ends the writer thread (it lets go of the database) before the
    /// drop returns, so the file opens again at once, time after time.
    #[tokio::test]
    async fn dropping_the_store_ends_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taskcred.db");
        for _ in 0..20 {
            let store = begun(&path).await;
            let t = task(&agent("reopened"), 0);
            store.create_task(&t).await.unwrap();
            store
                .issue_lease(&lease(&t), None, SystemTime::now())
                .await
                .unwrap();
            let clone = store.clone();
            let db = Arc::downgrade(&store.db);
            drop(store);
            assert!(db.upgrade().is_some(), "a clone holds it");
            drop(clone);
            assert!(
                db.upgrade().is_none(),
                "the writer still holds the database"
            );
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.live_leases().await.unwrap(), 20);
    }
}
