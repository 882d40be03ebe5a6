//! `taskcred bench` runs end to end (short windows, debug build: the figures mean nothing here,
//! only that every one is measured without a failed call and reported with its floor).
#[test]
fn bench_reports_every_figure_with_its_floor() {
    let (code, out, err) = crate::common::run(&[
        "--json",
        "bench",
        "--quick",
        // Long enough that a CI exchange over a fresh handshake (debug build) completes while
        // the rest of the suite shares the two cores.
        "--seconds",
        "1.5",
        "--concurrency",
        "8",
        "--channels",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["store"], "redis", "tests have redis-server on PATH");
    for figure in [
        "noop",
        "issue_token",
        "issue_token_es256",
        "issue_token_embedded",
        "issue_certificate",
        "introspect",
        "ci_exchange_fresh_tls",
    ] {
        let f = &report[figure];
        assert!(f["per_sec"].as_f64().unwrap() > 0.0, "{figure}: {f}");
        assert_eq!(f["errors"], 0, "{figure}: {f}");
        for q in ["p50_ms", "p99_ms", "p999_ms"] {
            assert!(f[q].as_f64().is_some(), "{figure}.{q}");
        }
        // What the broker spent per call, and beyond the cryptography it cannot avoid.
        assert!(f["broker_cpu_us"].as_f64().unwrap() > 0.0, "{figure}: {f}");
        let (cpu, floor) = (
            f["broker_cpu_us"].as_f64().unwrap(),
            f["unavoidable_us"].as_f64().unwrap(),
        );
        let over = f["overhead_us"].as_f64().unwrap();
        assert!((cpu - floor - over).abs() < 0.2, "{figure}: {f}");
    }
    // Redis' CPU where Redis is the store; none where it is not.
    assert!(report["issue_token"]["redis_cpu_us"].as_f64().unwrap() > 0.0);
    assert!(report["issue_token_embedded"].get("redis_cpu_us").is_none());
    assert!(
        report["floors"]["redis_lease_write"]["redis_cpu_us"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        report["ci_exchange_fresh_tls"]["ratio_to_ci_floor"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    for ratio in [
        "ratio_to_noop",
        "ratio_to_sign_ed25519",
        "ratio_to_redis_lease_write",
    ] {
        assert!(
            report["issue_token"][ratio].as_f64().unwrap() > 0.0,
            "{ratio}"
        );
    }
    for floor in [
        "noop_per_sec",
        "sign_ed25519_per_sec",
        "sign_p256_per_sec",
        "redis_lease_write_per_sec",
        "sign_ed25519_us",
        "sign_p256_us",
        "verify_p256_us",
        "verify_ed25519_us",
        "ci_floor_per_sec",
        "ci_floor_us",
    ] {
        assert!(report["floors"][floor].as_f64().unwrap() > 0.0, "{floor}");
    }
    assert!(
        report.get("force_revoke_10k_ms").is_none(),
        "--quick has no scale runs"
    );
}

/// The scale runs, small: every lease of the locked agent introspects inactive after the lock,
/// the reaper ends what expires, and the memory and CPU figures are there.
#[test]
fn the_scale_runs_report_their_figures() {
    let (code, out, err) = crate::common::run(&[
        "--json",
        "bench",
        "--quick",
        "--scale",
        "true",
        "--scale-leases",
        "3000",
        "--revoke-leases",
        "300",
        "--seconds",
        "0.3",
        "--concurrency",
        "4",
        "--channels",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["force_revoke_leases"], 300);
    assert!(
        r["force_revoke_10k_revoked"].as_u64().unwrap() >= 300,
        "{r}"
    );
    assert_eq!(r["force_revoke_10k_inactive"], 300, "{r}");
    assert!(r["force_revoke_10k_ms"].as_f64().unwrap() > 0.0);
    let per_lease = r["redis_bytes_per_lease"].as_f64().unwrap();
    assert!(per_lease > 50.0 && per_lease < 10_000.0, "{per_lease}");
    assert!(r["reaper_lag_p99_ms"].as_f64().is_some());
    assert!(r["broker_rss_bytes_after"].as_u64().unwrap() > 0);
    assert!(r["broker_idle_cpu_percent"].as_f64().is_some());
    // A second broker started on the full store, to its first credential.
    let start = r["start_ms_1m_leases"].as_f64().unwrap();
    assert!(
        start > 0.0 && start >= r["start_ms_listening"].as_f64().unwrap(),
        "{r}"
    );
    assert!(r["start_live_leases"].as_u64().unwrap() > 0, "{r}");
    // What expired in the window was reaped (every one, and nothing else).
    assert_eq!(r["scale_expiring"], 3000);
    assert_eq!(r["scale_reaped"], r["scale_expiring"], "{r}");
}

/// The Redis Cluster run, small: issuance with each durability, bytes per lease, force-revoke,
/// and a failover under load; with `replicated` durability no credential answered before the
/// kill lost its lease.
#[test]
fn the_cluster_run_reports_its_figures() {
    let (code, out, err) = crate::common::run(&[
        "--json",
        "bench",
        "--store",
        "cluster",
        "--quick",
        "--scale-leases",
        "2000",
        "--revoke-leases",
        "300",
        "--seconds",
        "0.5",
        "--concurrency",
        "4",
        "--channels",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["store"], "cluster");
    for f in [
        "cluster_issue_token_async",
        "cluster_issue_token_replicated",
    ] {
        assert!(r[f]["per_sec"].as_f64().unwrap() > 0.0, "{f}: {r}");
        assert_eq!(r[f]["errors"], 0, "{f}: {r}");
    }
    assert_eq!(r["cluster_force_revoke_10k_inactive"], 300, "{r}");
    assert_eq!(r["cluster_live_leases_written"], 2000, "{r}");
    let per_lease = r["cluster_redis_bytes_per_lease"].as_f64().unwrap();
    assert!(per_lease > 50.0 && per_lease < 10_000.0, "{per_lease}");
    for d in ["async", "replicated"] {
        let f = &r[format!("cluster_failover_{d}")];
        assert!(f["answered_before_kill"].as_u64().unwrap() > 0, "{d}: {r}");
        assert!(
            f["all_tasks_issuing_after_s"].as_f64().is_some(),
            "{d}: {r}"
        );
    }
    assert_eq!(r["cluster_failover_replicated"]["leases_lost"], 0, "{r}");
}
