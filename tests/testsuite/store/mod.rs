//! The store conformance suite ([`conformance`]) against both backends: the embedded redb file
//! and a real `redis-server` started for the test. Plus what differs: durability across restarts and the
//! behaviour when the store is gone.

use std::time::{Duration, Instant, SystemTime};

use crate::common::RedisServer;
use conformance::sample_task;
use taskcred::store::embedded::EmbeddedStore;
use taskcred::store::redis::{Durability, RedisStore, Topology};
use taskcred::store::{Epoch, MetaStore as _, Store, StoreError, TaskStore as _};

pub mod conformance;
mod redis_layout;

const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
const REQUESTER: &str = "spiffe://taskcred.dev/human/requester";

/// One test per conformance case and backend, each on a fresh store: `fresh` cases see the store
/// as a new broker finds it; the others begin with its epoch made, as a broker does first.
macro_rules! cases {
    (fresh: [$($fresh:ident),* $(,)?], begun: [$($begun:ident),* $(,)?] $(,)?) => {
        mod embedded {
            use taskcred::store::MetaStore as _;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $fresh() {
                    let (_dir, store) = super::embedded();
                    super::conformance::$fresh(&store).await;
                    store.ping().await.unwrap();
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $begun() {
                    let (_dir, store) = super::embedded();
                    super::begin(&store).await;
                    super::conformance::$begun(&store).await;
                    store.ping().await.unwrap();
                }
            )*
        }
        /// The whole suite, case by case, on one local Redis Cluster (3 masters, 3 replicas),
        /// flushed between cases.
        mod cluster {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn conformance() {
                let cluster = tokio::task::spawn_blocking(crate::common::topology::RedisCluster::start)
                    .await
                    .unwrap();
                $(
                    let store = super::on_cluster(&cluster, stringify!($fresh));
                    super::conformance::$fresh(&store).await;
                )*
                $(
                    let store = super::on_cluster(&cluster, stringify!($begun));
                    super::begin(&store).await;
                    super::conformance::$begun(&store).await;
                )*
            }
        }
        /// The whole suite, case by case, on a local Sentinel setup (a primary, a replica, 3
        /// sentinels), flushed between cases.
        mod sentinel {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn conformance() {
                let sentinel = tokio::task::spawn_blocking(crate::common::topology::RedisSentinel::start)
                    .await
                    .unwrap();
                $(
                    let store = super::on_sentinel(&sentinel, stringify!($fresh));
                    super::conformance::$fresh(&store).await;
                )*
                $(
                    let store = super::on_sentinel(&sentinel, stringify!($begun));
                    super::begin(&store).await;
                    super::conformance::$begun(&store).await;
                )*
            }
        }
        mod redis {
            use taskcred::store::MetaStore as _;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $fresh() {
                    let (_redis, store) = super::redis();
                    super::conformance::$fresh(&store).await;
                    store.ping().await.unwrap();
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $begun() {
                    let (_redis, store) = super::redis();
                    super::begin(&store).await;
                    super::conformance::$begun(&store).await;
                    store.ping().await.unwrap();
                }
            )*
        }
    };
}

cases! {
    fresh: [a_fresh_store_answers_the_reaper, a_store_without_its_epoch_issues_nothing],
    begun: [
        a_lease_id_is_recorded_once,
        concurrent_issuances_each_get_their_own_answer,
        create_get_round_trip,
        create_twice_is_refused,
        update_applies_atomically_or_not_at_all,
        concurrent_updates_lose_nothing,
        list_filters_and_pages_newest_first,
        ended_tasks_are_pruned_after_retention,
        leases_only_for_an_approved_task_of_its_executor,
        ending_a_task_revokes_every_lease_even_concurrent_ones,
        renewal_replaces_the_credential_and_revocation_ends_one_lease,
        locking_an_agent_ends_its_tasks_and_leases_at_once,
        a_lock_holds_at_once_and_is_swept_in_bounded_steps,
        signing_keys_are_published_until_their_time,
        the_reaper_ends_each_due_lease_once,
        overdue_tasks_are_found_by_deadline,
        revocations_are_logged_in_order_and_resumable,
        the_epoch_is_made_once,
        claims_are_held_once,
        live_leases_counts_the_unrevoked,
        a_lease_is_recorded_only_against_the_revision_decided_on,
    ],
}

/// A fresh embedded store in a directory of its own.
fn embedded() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("taskcred.db")).unwrap();
    (dir, store)
}

/// A store on a `redis-server` of its own.
fn redis() -> (RedisServer, RedisStore) {
    let redis = RedisServer::start();
    let store = RedisStore::new(&redis.url()).unwrap();
    (redis, store)
}

/// A store on `cluster`, emptied first (every master flushed), for conformance case `case`.
fn on_cluster(cluster: &crate::common::topology::RedisCluster, case: &str) -> RedisStore {
    eprintln!("cluster: {case}");
    for port in cluster.masters() {
        cluster.cli(port, &["FLUSHALL"]);
    }
    RedisStore::with(&Topology::Cluster(cluster.urls()), Durability::Async).unwrap()
}

/// A store on the primary `sentinel` names, emptied first, for conformance case `case`.
fn on_sentinel(sentinel: &crate::common::topology::RedisSentinel, case: &str) -> RedisStore {
    eprintln!("sentinel: {case}");
    sentinel.cli(sentinel.primary(), &["FLUSHALL"]);
    let topology = Topology::Sentinel {
        urls: sentinel.sentinel_urls(),
        master: crate::common::topology::RedisSentinel::MASTER.into(),
    };
    RedisStore::with(&topology, Durability::Async).unwrap()
}

/// Makes the store's epoch, as the first broker on a store does.
async fn begin(store: &dyn Store) {
    store.epoch(&Epoch::new(SystemTime::now())).await.unwrap();
}

#[tokio::test]
async fn embedded_store_keeps_tasks_across_reopen_and_is_single_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskcred.db");
    let t = sample_task(AGENT, REQUESTER, 1);
    {
        let store = EmbeddedStore::open(&path).unwrap();
        store.create_task(&t).await.unwrap();
        // A second broker on the same file is refused while the first holds it.
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(StoreError::Unavailable(_))
        ));
    }
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get_task(&t.id).await.unwrap(), Some(t));
}

#[tokio::test]
async fn redis_store_keeps_tasks_across_broker_and_redis_restarts() {
    let mut redis = RedisServer::start();
    let t = sample_task(AGENT, REQUESTER, 1);
    RedisStore::new(&redis.url())
        .unwrap()
        .create_task(&t)
        .await
        .unwrap();
    // A new broker (a new store instance) sees it.
    let store = RedisStore::new(&redis.url()).unwrap();
    assert_eq!(store.get_task(&t.id).await.unwrap(), Some(t.clone()));
    // Redis restarted with AOF: still there, and the old connection manager reconnects.
    redis.restart();
    let mut got = store.get_task(&t.id).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = store.get_task(&t.id).await;
    }
    assert_eq!(got.unwrap(), Some(t));
}

#[tokio::test]
async fn unreachable_redis_answers_unavailable_quickly_and_writes_nothing() {
    let mut redis = RedisServer::start();
    let store = RedisStore::new(&redis.url()).unwrap();
    store.ping().await.unwrap();
    redis.stop();
    let t = sample_task(AGENT, REQUESTER, 1);
    let started = Instant::now();
    let err = store.create_task(&t).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(
        store.get_task(&t.id).await,
        Err(StoreError::Unavailable(_))
    ));

    // A store that never reached Redis fails the same way.
    let never = RedisStore::new(&redis.url()).unwrap();
    assert!(matches!(
        never.ping().await,
        Err(StoreError::Unavailable(_))
    ));

    // Back up: the task was never written.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.get_task(&t.id).await {
            Ok(got) => {
                assert_eq!(got, None);
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("redis did not come back: {e}"),
        }
    }
}
