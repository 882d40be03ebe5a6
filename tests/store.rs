//! The store conformance suite against both backends: the embedded redb file and a real
//! `redis-server` started for the test. Plus what differs: durability across restarts and the
//! behaviour when the store is gone.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::time::{Duration, Instant};

use common::RedisServer;
use taskcred::store::conformance::{run_all, sample_task};
use taskcred::store::embedded::EmbeddedStore;
use taskcred::store::redis::RedisStore;
use taskcred::store::{Store, StoreError};

const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
const REQUESTER: &str = "spiffe://taskcred.dev/human/requester";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("taskcred.db")).unwrap();
    run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let redis = RedisServer::start();
    let store = RedisStore::new(&redis.url()).unwrap();
    run_all(&store).await;
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
