//! Unit tests of the environment overlay; file and key errors are tested end to end in
//! `tests/testsuite/config.rs` through the binary.

use super::*;

#[test]
fn env_values_are_typed_where_they_look_typed() {
    assert_eq!(env_value("8080"), toml::Value::Integer(8080));
    assert_eq!(env_value("true"), toml::Value::Boolean(true));
    assert_eq!(
        env_value("127.0.0.1:7443"),
        toml::Value::String("127.0.0.1:7443".into())
    );
    assert_eq!(env_value("30s"), toml::Value::String("30s".into()));
    assert_eq!(env_value("json"), toml::Value::String("json".into()));
    assert!(matches!(env_value("[\"a\", \"b\"]"), toml::Value::Array(_)));
    // Something TOML would read as a date stays the text it is.
    assert_eq!(
        env_value("2026-01-01"),
        toml::Value::String("2026-01-01".into())
    );
}

#[test]
fn env_sets_nested_keys_and_names_itself_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    crate::devpki::init(dir.path()).unwrap();
    let source = Source::Dev(dir.path().to_owned());
    // The dev configuration with one environment variable set.
    let load_with = |var: &str, value: &str| {
        load(
            &source,
            vec![(var.to_owned(), value.to_owned())],
            &Overrides::default(),
        )
    };
    let error_with = |var: &str, value: &str| load_with(var, value).unwrap_err().to_string();

    let c = load_with("TASKCRED_SERVER__MAX_CONNECTIONS", "12").unwrap();
    assert_eq!(c.server.accept.max_connections, 12);

    let err = error_with("TASKCRED_SERVER__GRPC_ADDR", "nowhere");
    assert!(err.contains("TASKCRED_SERVER__GRPC_ADDR"), "{err}");
    assert!(err.contains("server.grpc_addr"), "{err}");

    let err = error_with("TASKCRED_SERVR__GRPC_ADDR", "1");
    assert!(err.contains("unknown field `servr`"), "{err}");

    // Client variables (no `__`) are not configuration keys.
    assert!(load_with("TASKCRED_BROKER", "https://x").is_ok());
}

#[test]
fn flags_win_over_env() {
    let dir = tempfile::tempdir().unwrap();
    crate::devpki::init(dir.path()).unwrap();
    let flags = Overrides {
        grpc_addr: Some("127.0.0.1:9000".into()),
        ..Overrides::default()
    };
    let c = load(
        &Source::Dev(dir.path().to_owned()),
        vec![("TASKCRED_SERVER__GRPC_ADDR".into(), "127.0.0.1:8000".into())],
        &flags,
    )
    .unwrap();
    assert_eq!(c.server.grpc_addr.port(), 9000);
}

/// The Redis backends from the environment and the flags: a Cluster's seed nodes as a TOML
/// array or `--redis-cluster a,b`, Sentinel's URLs and master; what each requires; durability.
#[test]
fn redis_backends_load_from_the_environment_and_the_flags() {
    use crate::store::redis::{Durability, Topology};
    let dir = tempfile::tempdir().unwrap();
    crate::devpki::init(dir.path()).unwrap();
    let source = Source::Dev(dir.path().to_owned());
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let load_env = |pairs: &[(&str, &str)]| load(&source, env(pairs), &Overrides::default());

    let c = load_env(&[
        ("TASKCRED_STORE__BACKEND", "redis_cluster"),
        (
            "TASKCRED_STORE__REDIS_URLS",
            r#"["redis://127.0.0.1:7001/","redis://127.0.0.1:7002/"]"#,
        ),
        ("TASKCRED_STORE__DURABILITY", "replicated"),
        ("TASKCRED_STORE__REPLICATION_TIMEOUT", "250ms"),
    ])
    .unwrap();
    assert_eq!(
        c.store.topology,
        Some(Topology::Cluster(vec![
            "redis://127.0.0.1:7001/".into(),
            "redis://127.0.0.1:7002/".into()
        ]))
    );
    assert_eq!(
        c.store.durability,
        Durability::Replicated {
            timeout: Duration::from_millis(250)
        }
    );

    let flags = Overrides {
        redis_cluster: Some("redis://10.0.0.1:6379/, redis://10.0.0.2:6379/".into()),
        ..Overrides::default()
    };
    let c = load(&source, Vec::new(), &flags).unwrap();
    assert_eq!(c.store.backend, StoreBackend::RedisCluster);
    assert_eq!(
        c.store.topology,
        Some(Topology::Cluster(vec![
            "redis://10.0.0.1:6379/".into(),
            "redis://10.0.0.2:6379/".into()
        ]))
    );
    assert_eq!(c.store.durability, Durability::Async);

    let c = load_env(&[
        ("TASKCRED_STORE__BACKEND", "redis_sentinel"),
        (
            "TASKCRED_STORE__SENTINEL_URLS",
            r#"["redis://127.0.0.1:26379/"]"#,
        ),
        ("TASKCRED_STORE__SENTINEL_MASTER", "taskcred"),
    ])
    .unwrap();
    assert_eq!(
        c.store.topology,
        Some(Topology::Sentinel {
            urls: vec!["redis://127.0.0.1:26379/".into()],
            master: "taskcred".into()
        })
    );

    let refused = |pairs: &[(&str, &str)], key: &str| {
        let err = load_env(pairs).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
        // A URL may hold a password: it is never echoed.
        assert!(!err.contains("secret"), "{err}");
    };
    refused(
        &[("TASKCRED_STORE__BACKEND", "redis_cluster")],
        "store.redis_urls",
    );
    refused(
        &[
            ("TASKCRED_STORE__BACKEND", "redis_cluster"),
            ("TASKCRED_STORE__REDIS_URLS", r#"["rediss://:secret@h:1/"]"#),
        ],
        "store.redis_urls",
    );
    refused(
        &[
            ("TASKCRED_STORE__BACKEND", "redis_sentinel"),
            (
                "TASKCRED_STORE__SENTINEL_URLS",
                r#"["redis://:secret@h:1/"]"#,
            ),
        ],
        "store.sentinel_master",
    );
    refused(
        &[("TASKCRED_STORE__DURABILITY", "replicated")],
        "store.durability",
    );
    // A value of the wrong type is not quoted back either (serde would).
    for (var, value) in [
        ("TASKCRED_STORE__REDIS_URLS", r#""redis://:secret@h:1/""#),
        ("TASKCRED_STORE__REDIS_URLS", r#"["redis://:secret@h:1/", "#),
        ("TASKCRED_STORE__SENTINEL_URLS", "redis://:secret@h:1/"),
        ("TASKCRED_STORE__REDIS_URL", "[\"redis://:secret@h:1/\"]"),
    ] {
        let err = load_env(&[(var, value)]).unwrap_err().to_string();
        assert!(err.contains("store."), "{err}");
        assert!(!err.contains("secret"), "{var}={value}: {err}");
    }
    refused(
        &[
            ("TASKCRED_STORE__BACKEND", "redis"),
            ("TASKCRED_STORE__REDIS_URL", "redis://h:1/"),
            ("TASKCRED_STORE__DURABILITY", "replicated"),
            ("TASKCRED_STORE__REPLICATION_TIMEOUT", "5s"),
        ],
        "store.replication_timeout",
    );
}
