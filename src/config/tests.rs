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
