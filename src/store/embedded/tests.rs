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

    fn w(id: &str) -> WorkloadId {
        WorkloadId::parse(id).unwrap()
    }

    fn agent(name: &str) -> String {
        format!("spiffe://taskcred.dev/agent/{name}")
    }

    /// A task of `executor`: approved with quorum 0, pending otherwise.
    fn task(executor: &str, quorum: u32) -> Task {
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

    fn lease(task: &Task) -> Lease {
        let now = SystemTime::now();
        Lease {
            id: LeaseId::generate(),
            task: task.id,
            agent: task.executor.clone(),
            kind: CredentialKind::Jwt,
            credential: LeaseId::generate().as_str().to_owned(),
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
    async fn begun(path: &std::path::Path) -> EmbeddedStore {
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
            store.issue_lease(&l, SystemTime::now()).await.unwrap();
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

    fn lock(agent: &str) -> Lock {
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
