//! The Redis topology harness itself (common/topology.rs): a local Redis Cluster and a local
//! Sentinel setup start, keep a write acknowledged by a replica across the kill of its master,
//! fail over within bounds, and take the killed node back.

use std::time::{Duration, Instant};

use crate::common::topology::{RedisCluster, RedisSentinel, redis_cli_session};

/// Writes `key` through a `redis-cli` session started on `port` (with `flags`) and waits until
/// one replica has it: the session's last answer is the number of replicas that acknowledged.
fn write_acknowledged(port: u16, flags: &[&str], key: &str, value: &str) {
    let out = redis_cli_session(port, flags, &format!("SET {key} {value}\nWAIT 1 1000\n"));
    assert_eq!(out.lines().last(), Some("1"), "{out}");
}

/// A cluster starts with three masters; a key written with `redis-cli -c` (and acknowledged by a
/// replica) survives the kill of its slot's master, whose replica takes over within 10 s; the
/// killed node comes back as the new master's replica.
#[test]
fn a_cluster_fails_over_the_master_of_a_key_and_keeps_it() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start();
    let up = started.elapsed();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 6);
    assert_eq!(urls[0], format!("redis://127.0.0.1:{}/", masters[0]));

    let key = "topology:kept";
    write_acknowledged(masters[0], &["-c"], key, "yes");
    let slot: u16 = cluster
        .cli(masters[0], &["CLUSTER", "KEYSLOT", key])
        .trim()
        .parse()
        .unwrap();
    let master = cluster.master_of_slot(slot);
    let replica = cluster.replica_of(master);
    assert_eq!(cluster.cli(master, &["GET", key]).trim(), "yes");

    cluster.kill(master);
    let took = cluster.wait_for_failover(master, Duration::from_secs(10));
    assert_eq!(cluster.master_of_slot(slot), replica);
    assert!(!cluster.masters().contains(&master));
    assert_eq!(cluster.cli(replica, &["GET", key]).trim(), "yes");

    let back = Instant::now();
    cluster.restart(master);
    assert_eq!(cluster.replica_of(replica), master);
    eprintln!(
        "cluster: up in {up:?}, failed over in {took:?}, rejoined in {:?}",
        back.elapsed()
    );
}

/// A Sentinel setup starts; a key acknowledged by the replica survives the kill of the primary,
/// and the primary the sentinels name within 15 s answers it; the old primary comes back as a
/// replica with the key.
#[test]
fn sentinels_fail_over_the_primary_and_keep_a_replicated_key() {
    let started = Instant::now();
    let mut sentinel = RedisSentinel::start();
    let up = started.elapsed();
    assert_eq!(sentinel.sentinel_urls().len(), 3);
    let old = sentinel.primary();

    write_acknowledged(old, &[], "topology:kept", "yes");
    assert_eq!(sentinel.kill_primary(), old);
    let took = sentinel.wait_for_failover(old, Duration::from_secs(15));
    let new = sentinel.primary();
    assert_ne!(new, old);
    assert_eq!(sentinel.cli(new, &["GET", "topology:kept"]).trim(), "yes");

    let back = Instant::now();
    sentinel.restart(old);
    assert_eq!(sentinel.cli(old, &["ROLE"]).lines().next(), Some("slave"));
    assert_eq!(sentinel.cli(old, &["GET", "topology:kept"]).trim(), "yes");
    eprintln!(
        "sentinel ({}): up in {up:?}, failed over in {took:?}, rejoined in {:?}",
        RedisSentinel::MASTER,
        back.elapsed()
    );
}
