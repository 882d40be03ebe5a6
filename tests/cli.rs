//! The `taskcred` binary as a new user runs it: `dev init`, `serve --dev`, client commands with
//! `--as`, exit codes, JSON output and logs, and a clean exit on SIGTERM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{ServeProcess, http_get, run};

fn ephemeral(dev_dir: &str) -> Vec<&str> {
    vec![
        "serve",
        "--dev",
        "--dev-dir",
        dev_dir,
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]
}

#[test]
fn dev_init_writes_keys_0600_and_keeps_what_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let dir_s = dir.to_str().unwrap();
    let (code, out, err) = run(&["dev", "init", "--dir", dir_s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created"), "{out}");
    for name in [
        "ca",
        "server",
        "agent",
        "requester",
        "approver",
        "approver2",
        "operator",
    ] {
        assert!(dir.join(format!("{name}.pem")).exists(), "{name}.pem");
        let mode = std::fs::metadata(dir.join(format!("{name}-key.pem")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}-key.pem");
    }
    let jwt = std::fs::metadata(dir.join("jwt-key.pem")).unwrap();
    assert_eq!(jwt.permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(dir.join("ca.pem")).unwrap();

    let (code, out, _) = run(&["--json", "dev", "init", "--dir", dir_s]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["created"].as_array().unwrap().len(), 0, "{out}");
    assert_eq!(before, std::fs::read(dir.join("ca.pem")).unwrap());
}

#[test]
fn serve_dev_answers_whoami_for_each_identity_and_exits_zero_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let serve = ServeProcess::start(&ephemeral(dev_s), &[]);
    let broker = format!("https://{}", serve.grpc);

    let (code, out, err) = run(&[
        "--broker",
        &broker,
        "--dev-dir",
        dev_s,
        "--as",
        "agent",
        "whoami",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let me: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(me["spiffe_id"], "spiffe://taskcred.dev/agent/demo");
    assert_eq!(me["trust_domain"], "taskcred.dev");
    assert_eq!(me["path"], "/agent/demo");
    assert_eq!(me["cert_sha256"].as_str().unwrap().len(), 43);
    assert!(me["cert_not_after"].as_str().unwrap().ends_with('Z'));

    for (name, id) in [
        ("requester", "spiffe://taskcred.dev/human/requester"),
        ("approver", "spiffe://taskcred.dev/human/approver"),
        ("approver2", "spiffe://taskcred.dev/human/approver2"),
        ("operator", "spiffe://taskcred.dev/human/operator"),
    ] {
        let (code, out, err) = run(&[
            "--broker",
            &broker,
            "--dev-dir",
            dev_s,
            "--as",
            name,
            "whoami",
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.lines().next(), Some(id), "{out}");
    }

    // The same with explicit files, as with TASKCRED_CA/CERT/KEY.
    let f = |n: &str| dev.join(n).to_str().unwrap().to_owned();
    let (code, out, _) = run(&[
        "--broker",
        &broker,
        "--ca",
        &f("ca.pem"),
        "--cert",
        &f("agent.pem"),
        "--key",
        &f("agent-key.pem"),
        "whoami",
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("spiffe://taskcred.dev/agent/demo"));

    // Refused by the broker: exit 1, one line on stderr.
    let (code, _, err) = run(&["--broker", &broker, "--dev-dir", dev_s, "whoami"]);
    assert_eq!(code, 1);
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Bad usage: exit 2.
    for args in [
        vec![
            "--broker",
            &broker,
            "--dev-dir",
            dev_s,
            "--as",
            "nobody",
            "whoami",
        ],
        vec![
            "--broker",
            "http://127.0.0.1:1",
            "--dev-dir",
            dev_s,
            "whoami",
        ],
        vec![
            "--broker",
            &broker,
            "--dev-dir",
            dev_s,
            "--cert",
            "x.pem",
            "whoami",
        ],
        vec!["--broker", &broker, "--ca", "/nonexistent/ca.pem", "whoami"],
        vec!["no-such-command"],
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, metrics) = rt.block_on(http_get(serve.http, "/metrics"));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("taskcred_grpc_requests_total{method=\"/taskcred.v1.IdentityService/WhoAmI\",code=\"OK\"}"),
        "{metrics}"
    );

    let status = serve.terminate();
    assert_eq!(status.code(), Some(0));

    // The broker is gone: a client cannot reach it (exit 1).
    let (code, _, err) = run(&[
        "--broker",
        &broker,
        "--dev-dir",
        dev_s,
        "--as",
        "agent",
        "whoami",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the broker"), "{err}");
}

#[test]
fn serve_logs_json_lines_with_log_format_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let mut args = ephemeral(dev.to_str().unwrap());
    args.extend(["--log-format", "json"]);
    let serve = ServeProcess::start(&args, &[]);
    let line = serve
        .stderr
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    // The first line may be the dev PKI notice; find the first log line.
    let line = if line.starts_with("dev PKI") {
        serve
            .stderr
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap()
    } else {
        line
    };
    let event: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(event.get("level").is_some(), "{line}");
    assert_eq!(serve.terminate().code(), Some(0));
}
