//! The Redis layout on a real `redis-server`: what a live lease costs in memory (every index
//! included), that no script of a lock, a task's end or a lock's sweep runs 50 ms however many
//! leases one task holds, that the leases of an ended task are inactive from the end's first
//! step, that an end interrupted between its chunks is finished by a broker's reaper (each
//! lease revoked and logged once), and that lease ids of the earlier layout find nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use redis::aio::MultiplexedConnection;
use taskcred::identity::WorkloadId;
use taskcred::lease::{CredentialKind, Lease, LeaseId, LeaseState, Lock};
use taskcred::store::redis::RedisStore;
use taskcred::store::{
    CASCADE_GRACE, DueStore as _, Epoch, IssueError, LeaseStore as _, LockStore as _, LockSweep,
    LogRead, MetaStore as _, Renewal, RevocationLog as _, TaskChange, TaskStore as _, UpdateError,
};
use taskcred::task::{Outcome, Task, TaskState};

use super::conformance::sample_task;
use crate::common::{Broker, RedisServer};

const REQUESTER: &str = "spiffe://taskcred.dev/human/requester";
const DAY: Duration = Duration::from_secs(86400);
/// The longest any one script may run.
const BOUND: Duration = Duration::from_millis(50);

fn w(s: &str) -> WorkloadId {
    WorkloadId::parse(s).unwrap()
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b
}

/// A lease as the broker issues one: a 128-bit hex `jti`, a SHA-256 `cnf` thumbprint.
fn lease(task: &Task) -> Lease {
    let now = SystemTime::now();
    Lease {
        id: LeaseId::generate(&task.id),
        task: task.id,
        agent: task.executor.clone(),
        kind: CredentialKind::Jwt,
        credential: taskcred::mint::hex(&random::<16>()),
        audience: Some("db".into()),
        actions: vec!["read".into()],
        cnf: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<32>()),
        issued_at: now,
        expires_at: now + Duration::from_secs(3000),
        renew_until: now + Duration::from_secs(3600),
        state: LeaseState::Active,
        ended_at: None,
        reason: None,
    }
}

/// A Redis of its own, without the suite's `appendfsync always` (these tests write tens of
/// thousands of leases), and a store on it with its epoch made.
async fn redis() -> (RedisServer, Arc<RedisStore>, MultiplexedConnection) {
    let redis = RedisServer::start();
    redis.command(&["CONFIG", "SET", "appendonly", "no"]);
    let store = Arc::new(RedisStore::new(&redis.url()).unwrap());
    store.epoch(&Epoch::new(SystemTime::now())).await.unwrap();
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (redis, store, conn)
}

/// An approved task of `agent`, created.
async fn task_of(store: &RedisStore, agent: &str) -> Task {
    let t = sample_task(agent, REQUESTER, 0);
    store.create_task(&t).await.unwrap();
    t
}

/// Issues `n` leases of `task`, 64 at a time; returns them.
async fn fill(store: &Arc<RedisStore>, task: &Task, n: usize) -> Vec<Lease> {
    let leases: Arc<Vec<Lease>> = Arc::new((0..n).map(|_| lease(task)).collect());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (store, leases, next) = (Arc::clone(store), Arc::clone(&leases), Arc::clone(&next));
        workers.spawn(async move {
            while let Some(l) = leases.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                store.issue_lease(l, None, SystemTime::now()).await.unwrap();
            }
        });
    }
    workers.join_all().await;
    Arc::try_unwrap(leases).unwrap()
}

async fn used_memory(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The entries of every bucket's revocation log.
async fn log_len(conn: &mut MultiplexedConnection) -> u64 {
    let logs: Vec<String> = redis::cmd("KEYS")
        .arg("tc:{*}:rev")
        .query_async(conn)
        .await
        .unwrap();
    let mut n = 0;
    for log in logs {
        n += redis::cmd("XLEN")
            .arg(log)
            .query_async::<u64>(conn)
            .await
            .unwrap();
    }
    n
}

/// The longest call the slow log holds (it logs every call of 1 ms or more), and its name.
async fn slowest(conn: &mut MultiplexedConnection) -> (Duration, String) {
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    let mut worst = (Duration::ZERO, String::new());
    for e in entries {
        let redis::Value::Array(fields) = e else {
            panic!("slow log entry {e:?}")
        };
        let redis::Value::Int(us) = fields[2] else {
            panic!("slow log duration {:?}", fields[2])
        };
        let took = Duration::from_micros(u64::try_from(us).unwrap());
        if took > worst.0 {
            let name = match &fields[3] {
                redis::Value::Array(args) => match args.first() {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    other => format!("{other:?}"),
                },
                other => format!("{other:?}"),
            };
            worst = (took, name);
        }
    }
    worst
}

/// Completion by the executor at `at`.
fn complete_at(agent: &str, at: SystemTime) -> TaskChange {
    let by = w(agent);
    Arc::new(move |t: &mut Task| t.complete(&by, Outcome::Succeeded, at))
}

/// A live lease costs at most 500 bytes of Redis memory: its record, its credential's entry,
/// its expiry entry and its share of the task's keys (1,000 leases a task, as the bench).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lease_costs_at_most_500_bytes() {
    let (_redis, store, mut conn) = redis().await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let t = task_of(&store, &format!("spiffe://taskcred.dev/agent/bulk-{i}")).await;
        // One lease first: the task's keys and the scripts exist before the measure.
        fill(&store, &t, 1).await;
        tasks.push(t);
    }
    let before = used_memory(&mut conn).await;
    for t in &tasks {
        fill(&store, t, 1000).await;
    }
    let after = used_memory(&mut conn).await;
    #[allow(clippy::cast_precision_loss)]
    let per_lease = after.saturating_sub(before) as f64 / 5000.0;
    eprintln!("redis bytes per live lease: {per_lease:.0}");
    assert!(per_lease <= 500.0, "{per_lease:.0} bytes per lease");
    assert_eq!(store.live_leases().await.unwrap(), 5005);
}

/// A task holding 20,000 leases ends, and an agent holding 20,000 is locked and swept, without
/// any one Redis call taking 50 ms: the end and the sweep go in bounded chunks. Every lease is
/// revoked and logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_script_of_an_end_or_a_lock_runs_50_ms_whatever_a_task_holds() {
    let (redis, store, mut conn) = redis().await;
    let ended_agent = "spiffe://taskcred.dev/agent/ended";
    let locked_agent = "spiffe://taskcred.dev/agent/locked";
    let big = task_of(&store, ended_agent).await;
    let held = task_of(&store, locked_agent).await;
    fill(&store, &big, 20_000).await;
    fill(&store, &held, 20_000).await;
    let log_before = log_len(&mut conn).await;
    redis.command(&["CONFIG", "SET", "slowlog-log-slower-than", "1000"]);
    redis.command(&["CONFIG", "SET", "slowlog-max-len", "100000"]);
    redis.command(&["SLOWLOG", "RESET"]);

    let t0 = Instant::now();
    let (task, revoked) = store
        .end_task(&big.id, complete_at(ended_agent, SystemTime::now()), DAY)
        .await
        .unwrap();
    let end_took = t0.elapsed();
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(
        revoked.len(),
        20_000,
        "end_task returns every lease it revoked"
    );
    assert!(revoked.iter().all(|l| l.state == LeaseState::Revoked));

    let now = SystemTime::now();
    let lock = Lock {
        agent: w(locked_agent),
        reason: "incident".into(),
        operator: w(REQUESTER),
        at: now,
        until: None,
    };
    let t0 = Instant::now();
    store.lock_agent(&lock).await.unwrap();
    let (mut tasks, mut leases, mut steps) = (Vec::new(), 0usize, 0);
    loop {
        let swept = store
            .sweep_lock(&LockSweep {
                agent: &lock.agent,
                reason: "agent locked: incident",
                at: now,
                retention: DAY,
                limit: 500,
            })
            .await
            .unwrap();
        assert!(swept.leases.len() <= 500);
        tasks.extend(swept.tasks);
        leases += swept.leases.len();
        steps += 1;
        assert!(steps < 200, "the sweep does not end");
        if swept.remaining == 0 {
            break;
        }
    }
    let lock_took = t0.elapsed();
    assert_eq!(tasks, vec![held.id]);
    assert_eq!(leases, 20_000);

    let (worst, name) = slowest(&mut conn).await;
    eprintln!(
        "end of a task of 20,000 leases: {end_took:?}; lock and sweep of 20,000: {lock_took:?} \
         ({steps} steps); slowest Redis call: {worst:?} ({name})"
    );
    assert!(worst < BOUND, "a Redis call took {worst:?} ({name})");
    assert_eq!(store.live_leases().await.unwrap(), 0);
    assert_eq!(
        log_len(&mut conn).await,
        log_before + 40_000,
        "each logged once"
    );
}

/// An end whose later chunks fail (here: its store may not load the chunk script) has ended
/// the task and every lease of it at once: each reads revoked, none renews. What it left is
/// filed due, and a broker's reaper finishes it: every lease revoked and logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_end_is_inactive_at_once_and_the_reaper_finishes_it() {
    let (redis, store, mut conn) = redis().await;
    let agent = "spiffe://taskcred.dev/agent/demo";
    // The scripts the cut-off store needs, loaded by a store that may: a small task ended in
    // one chunk loads the end's first script, not its continuation.
    let small = task_of(&store, agent).await;
    let small_leases = fill(&store, &small, 3).await;
    store
        .end_task(&small.id, complete_at(agent, SystemTime::now()), DAY)
        .await
        .unwrap();
    store.get_lease(&small_leases[0].id).await.unwrap();
    // A store whose user may run loaded scripts (EVALSHA) but load none.
    redis.command(&[
        "ACL", "SETUSER", "cut", "on", ">pw", "~*", "&*", "+@all", "-eval", "-script",
    ]);
    let cut_url = format!("redis://cut:pw@127.0.0.1:{}/0", redis.port);
    let cut = RedisStore::new(&cut_url).unwrap();

    let t = task_of(&store, agent).await;
    let leases = fill(&store, &t, 3000).await;
    let head = store.revocation_head().await.unwrap();
    let log_before = log_len(&mut conn).await;
    // Ended a minute ago: due again at once (its end plus the grace has passed).
    let ended_at = SystemTime::now() - Duration::from_secs(60);
    let (task, revoked) = cut
        .end_task(&t.id, complete_at(agent, ended_at), DAY)
        .await
        .unwrap();
    assert_eq!(task.state, TaskState::Completed);
    assert!(
        !revoked.is_empty() && revoked.len() < 3000,
        "the first chunk only: {}",
        revoked.len()
    );
    let first_chunk = u64::try_from(revoked.len()).unwrap();
    assert_eq!(log_len(&mut conn).await, log_before + first_chunk);
    assert_eq!(store.live_leases().await.unwrap(), 3000 - first_chunk);

    // Every lease is ended from the first step on, whatever its record says yet.
    let now = SystemTime::now();
    for l in &leases {
        let read = store.get_lease(&l.id).await.unwrap().unwrap();
        assert_eq!(read.state, LeaseState::Revoked, "{}", l.id);
        assert_eq!(read.reason.as_deref(), Some("task completed"));
        let found = store
            .find_lease(&t.id, &l.credential)
            .await
            .unwrap()
            .unwrap();
        assert!(!found.is_active(&l.credential, now));
    }
    let renewed = store
        .renew_lease(
            &leases[2999].id,
            &Renewal {
                credential: "next",
                expires_at: now + Duration::from_secs(60),
                now,
            },
        )
        .await;
    assert!(
        matches!(renewed, Err(IssueError::Refused(_))),
        "{renewed:?}"
    );
    assert!(matches!(
        store.revoke_lease(&leases[2999].id, "by hand", now).await,
        Err(UpdateError::Rejected(_))
    ));
    assert!(
        store
            .overdue_tasks(ended_at + CASCADE_GRACE + Duration::from_secs(1), 100)
            .await
            .unwrap()
            .contains(&t.id),
        "filed due again"
    );
    // The expiry reaper leaves them to the end, even past their expiry: they are revoked (and
    // logged) by it, not expired.
    let past_expiry = SystemTime::now() + Duration::from_secs(3 * 3600);
    assert!(
        store
            .expire_leases(past_expiry, 10_000)
            .await
            .unwrap()
            .is_empty()
    );

    // A broker's reaper finishes it.
    let broker = Broker::start_on_redis(&redis.url()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.live_leases().await.unwrap() > 0 {
        assert!(
            Instant::now() < deadline,
            "the reaper did not finish the end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.stop().await;
    let mut logged: HashMap<LeaseId, usize> = HashMap::new();
    let mut after = Some(head);
    loop {
        let page = store
            .revocations(LogRead {
                after,
                limit: 1000,
                wait: Duration::ZERO,
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.cursor);
        for r in &page {
            assert_eq!(r.task, t.id);
            assert_eq!(r.reason, "task completed");
            *logged.entry(r.lease.clone()).or_default() += 1;
        }
    }
    assert_eq!(logged.len(), 3000, "every lease logged");
    assert!(logged.values().all(|n| *n == 1), "each once");
    for l in &leases {
        let read = store.get_lease(&l.id).await.unwrap().unwrap();
        assert_eq!(read.state, LeaseState::Revoked);
        assert_eq!(read.credential, l.credential);
        assert_eq!(read.expires_at, l.expires_at);
    }
}

/// Nothing of the earlier layouts is read: a lease id of the first (a bare UUIDv7) names no
/// task; a task, a lease and a credential as the earlier layouts wrote them are not found. The
/// move shows as a store reset: the earlier layout's epoch marker is there, no bucket holds its
/// copy, so a new epoch begins (and brokers say the store was reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_earlier_layouts_are_not_read_and_moving_shows_as_a_reset() {
    let redis = RedisServer::start();
    let agent = "spiffe://taskcred.dev/agent/demo";
    let old_epoch = Epoch::new(SystemTime::now() - Duration::from_secs(3600));
    redis.command(&[
        "SET",
        "tc:epoch",
        &serde_json::to_string(&old_epoch).unwrap(),
    ]);
    // A task as the earlier layouts wrote it.
    let t = sample_task(agent, REQUESTER, 0);
    let json = serde_json::to_string(&t).unwrap();
    redis.command(&[
        "HSET",
        &format!("tc:task:{{{}}}", t.id),
        "v",
        "1",
        "data",
        &json,
        "x",
        agent,
    ]);
    let old = LeaseId::parse(&uuid::Uuid::now_v7().hyphenated().to_string()).unwrap();
    assert_eq!(old.task(), None);
    let lk = format!("tc:lease:{{{}}}:{old}", t.id);
    redis.command(&["HSET", &lk, "state", "active", "cred", "old-credential"]);
    redis.command(&["SET", &format!("tc:leaseidx:{old}"), &t.id.to_string()]);

    let store = RedisStore::new(&redis.url()).unwrap();
    let fresh = Epoch::new(SystemTime::now());
    let epoch = store.epoch(&fresh).await.unwrap();
    assert_eq!(epoch, fresh, "a new epoch replaced the earlier layout's");
    assert_eq!(
        store.epoch(&Epoch::new(SystemTime::now())).await.unwrap(),
        fresh
    );

    let now = SystemTime::now();
    assert_eq!(store.get_task(&t.id).await.unwrap(), None);
    assert_eq!(store.get_lease(&old).await.unwrap(), None);
    assert_eq!(
        store.find_lease(&t.id, "old-credential").await.unwrap(),
        None
    );
    assert!(matches!(
        store.revoke_lease(&old, "by hand", now).await,
        Err(UpdateError::NotFound)
    ));
    let renewal = Renewal {
        credential: "new",
        expires_at: now + Duration::from_secs(60),
        now,
    };
    assert!(matches!(
        store.renew_lease(&old, &renewal).await,
        Err(IssueError::NotFound)
    ));
}

/// Buckets that lost their data while the store's marker stayed (a Cluster master that came back
/// empty) are a store reset: a new epoch, and issuance in them waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_lost_its_data_is_a_reset() {
    let redis = RedisServer::start();
    let store = RedisStore::new(&redis.url()).unwrap();
    let first = Epoch::new(SystemTime::now() - Duration::from_secs(3600));
    assert_eq!(store.epoch(&first).await.unwrap(), first);
    let t = task_of(&store, "spiffe://taskcred.dev/agent/demo").await;
    let redis::Value::Array(copies) = redis.command(&["KEYS", "tc:{*}:epoch"]) else {
        panic!("KEYS answers an array")
    };
    assert_eq!(copies.len(), 16, "one copy per bucket");
    // The buckets' copies gone, the marker kept: issuance refuses until a new epoch began.
    for k in &copies {
        let redis::Value::BulkString(k) = k else {
            panic!("{k:?}")
        };
        redis.command(&["DEL", std::str::from_utf8(k).unwrap()]);
    }
    let l = lease(&t);
    assert!(matches!(
        store.issue_lease(&l, None, SystemTime::now()).await,
        Err(IssueError::StoreReset)
    ));
    let second = store.epoch(&Epoch::new(SystemTime::now())).await.unwrap();
    assert_ne!(second, first, "a new epoch");
    store
        .issue_lease(&l, None, SystemTime::now())
        .await
        .unwrap();
}
