//! The `taskcred` binary as a new user runs it: `dev init`, `serve --dev`, client commands with
//! `--as`, exit codes, JSON output and logs, and a clean exit on SIGTERM.

use std::os::unix::fs::PermissionsExt as _;

use crate::common::{ServeProcess, http_get, run, run_as, serve_dev_args};

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
    let serve = ServeProcess::start(&serve_dev_args(dev_s), &[]);
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
        crate::common::sample(
            &metrics,
            "taskcred_grpc_requests_total{method=\"/taskcred.v1.IdentityService/WhoAmI\",code=\"OK\"}"
        ) >= 1.0,
        "{metrics}"
    );

    let status = serve.terminate();
    assert_eq!(status.code(), Some(0));

    // The broker is gone: a client cannot reach it (exit 69: try again later).
    let (code, _, err) = run(&[
        "--broker",
        &broker,
        "--dev-dir",
        dev_s,
        "--as",
        "agent",
        "whoami",
    ]);
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot reach the broker"), "{err}");
}

#[test]
fn serve_logs_json_lines_with_log_format_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let mut args = serve_dev_args(dev.to_str().unwrap());
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

#[test]
fn task_commands_and_policy_reload_on_sighup() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let serve = ServeProcess::start(&serve_dev_args(dev_s), &[]);
    let as_ = |name: &'static str, args: &[&str]| run_as(serve.grpc, dev_s, name, args);
    let request = [
        "task",
        "request",
        "--executor",
        "spiffe://taskcred.dev/agent/demo",
        "--grant",
        "db.staging=read,rotate",
        "--purpose",
        "rotate the staging password",
        "--deadline",
        "30m",
    ];

    // Request (prints the bare id), approve, show.
    let (code, out, err) = as_("requester", &request);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 36, "{out}");
    let (code, out, err) = as_("approver", &["task", "approve", &id, "--note", "ok"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state:      approved"), "{out}");
    let (code, out, _) = as_("approver2", &["--json", "task", "show", &id]);
    assert_eq!(code, 0);
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["state"], "approved");
    assert_eq!(t["grants"][0]["audience"], "db.staging");
    assert_eq!(
        t["approvals"][0]["approver"],
        "spiffe://taskcred.dev/human/approver"
    );

    // Production needs two; --json shows state and quorum.
    let mut prod = request.to_vec();
    prod.extend(["--label", "env=production"]);
    let (code, out, _) = as_("requester", &[&["--json"][..], &prod].concat());
    assert_eq!(code, 0);
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (p["state"].as_str(), p["quorum"].as_u64()),
        (Some("pending_approval"), Some(2))
    );
    let pid = p["id"].as_str().unwrap();
    let (code, _, err) = as_("requester", &["task", "approve", pid]);
    assert_eq!(code, 1);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");

    let (code, out, _) = as_(
        "requester",
        &["--json", "task", "list", "--state", "pending_approval"],
    );
    assert_eq!(code, 0);
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l["tasks"].as_array().unwrap().len(), 1);

    // Bad usage is caught before anything is sent.
    let (code, _, _) = as_(
        "requester",
        &[
            "task",
            "request",
            "--executor",
            "x",
            "--grant",
            "nope",
            "--purpose",
            "p",
        ],
    );
    assert_eq!(code, 2);

    // policy check: the dev policies pass; a broken file is named with its line.
    let (code, out, err) = run(&["policy", "check", dev.join("policies").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok:"), "{out}");
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(
        bad.join("x.cedar"),
        "\npermit (principal, action, resource) when { resource.nope };\n",
    )
    .unwrap();
    let (code, _, err) = run(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("x.cedar:2:"), "{err}");

    // SIGHUP loads a new valid set...
    std::fs::write(
        dev.join("policies/zz-freeze.cedar"),
        "forbid (principal, action == Taskcred::Action::\"RequestTask\", resource);\n",
    )
    .unwrap();
    let hup = |pid: u32| {
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    hup(serve.child.id());
    let (code, _, err) = as_("requester", &request);
    assert_eq!(code, 1, "the freeze applies");
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    // ...refuses an invalid one, keeping the set in force.
    std::fs::write(
        dev.join("policies/zz-freeze.cedar"),
        "forbid (principal, action, resource) when {",
    )
    .unwrap();
    hup(serve.child.id());
    let (code, _, _) = as_("requester", &request);
    assert_eq!(code, 1, "the freeze still applies");
    let (code, _, err) = as_("operator", &["policy", "reload"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("zz-freeze.cedar"),
        "{err}"
    );
    std::fs::remove_file(dev.join("policies/zz-freeze.cedar")).unwrap();
    let (code, out, err) = as_("operator", &["policy", "reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("reloaded"), "{out}");
    let (code, _, err) = as_("requester", &request);
    assert_eq!(code, 0, "{err}");

    assert_eq!(serve.terminate().code(), Some(0));
}

#[test]
fn serve_dev_with_redis_keeps_tasks_in_redis() {
    let redis = crate::common::RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let url = redis.url();
    let with_redis = |extra: bool| {
        let mut a = serve_dev_args(dev_s);
        if extra {
            a.extend(["--redis", url.as_str()]);
        }
        ServeProcess::start(&a, &[])
    };
    let cli =
        |serve: &ServeProcess, name: &str, args: &[&str]| run_as(serve.grpc, dev_s, name, args);

    let serve = with_redis(true);
    let (code, out, err) = cli(
        &serve,
        "requester",
        &[
            "task",
            "request",
            "--executor",
            "spiffe://taskcred.dev/agent/demo",
            "--grant",
            "db.staging=read",
            "--purpose",
            "p",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_owned();
    assert_eq!(serve.terminate().code(), Some(0));

    // The embedded store of the same dev dir does not have it...
    let serve = with_redis(false);
    let (code, _, err) = cli(&serve, "requester", &["task", "show", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("NOT_FOUND"), "{err}");
    assert_eq!(serve.terminate().code(), Some(0));

    // ...Redis does, across broker restarts.
    let serve = with_redis(true);
    let (code, out, err) = cli(&serve, "requester", &["--json", "task", "show", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"state\":\"approved\""), "{out}");
    assert_eq!(serve.terminate().code(), Some(0));
}

#[test]
fn operator_commands_lock_agents_and_rotate_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let serve = ServeProcess::start(&serve_dev_args(dev_s), &[]);
    let as_ = |name: &'static str, args: &[&str]| run_as(serve.grpc, dev_s, name, args);
    let agent = "spiffe://taskcred.dev/agent/demo";
    let request = [
        "task",
        "request",
        "--executor",
        agent,
        "--grant",
        "db=read",
        "--purpose",
        "p",
    ];
    let (code, out, err) = as_("requester", &request);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_owned();
    let (code, _, err) = as_("approver", &["task", "approve", &id]);
    assert_eq!(code, 0, "{err}");
    let issue = ["token", "issue", "--task", id.as_str(), "--audience", "db"];
    let (code, token, err) = as_("agent", &issue);
    assert_eq!(code, 0, "{err}");

    // Only the operator locks; the lock names what it revoked.
    let lock = ["agent", "lock", agent, "--reason", "leaked token"];
    let (code, _, err) = as_("requester", &lock);
    assert_eq!(code, 1);
    assert!(err.contains("PERMISSION_DENIED (POLICY_DENIED)"), "{err}");
    // With --json, the refusal is one JSON object a script reads: code, stable reason, message.
    let (code, out, _) = as_("requester", &[&["--json"][..], &lock].concat());
    assert_eq!(code, 1);
    let refused: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(refused["error"]["code"], "PERMISSION_DENIED", "{out}");
    assert_eq!(refused["error"]["reason"], "POLICY_DENIED", "{out}");
    assert_eq!(refused["error"]["retryable"], false, "{out}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("LockAgent"),
        "{out}"
    );
    let (code, out, err) = as_("operator", &[&["--json"][..], &lock].concat());
    assert_eq!(code, 0, "{err}");
    let locked: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(locked["revoked_tasks"][0], id.as_str());
    assert_eq!(locked["lock"]["reason"], "leaked token");
    // An inactive credential: the answer, and exit code 3 for scripts.
    let (code, out, _) = as_("approver", &["token", "introspect", token.trim()]);
    assert_eq!(out.trim(), r#"{"active":false}"#);
    assert_eq!(code, 3);
    let (code, _, err) = as_("agent", &issue);
    assert_eq!(code, 1);
    assert!(
        err.contains("PERMISSION_DENIED") && err.contains("leaked token"),
        "{err}"
    );
    let (code, out, _) = as_("operator", &["agent", "locks"]);
    assert_eq!(code, 0);
    assert!(out.contains(agent) && out.contains("leaked token"), "{out}");

    // Leases, listed by operators with their state.
    let (code, out, err) = as_("operator", &["--json", "lease", "list", "--agent", agent]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let leases = listed["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{out}");
    assert_eq!(leases[0]["state"], "revoked");
    assert_eq!(leases[0]["task_id"], id.as_str());
    assert!(
        leases[0]["reason"]
            .as_str()
            .unwrap()
            .contains("leaked token")
    );
    for filter in [
        &["--task", id.as_str(), "--state", "revoked"][..],
        &["--state", "revoked"][..],
    ] {
        let (code, out, err) = as_("operator", &[&["lease", "list"][..], filter].concat());
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.lines().count(), 1, "{filter:?}: {out}");
        assert!(out.contains("revoked") && out.contains(&id), "{out}");
    }
    let (_, out, _) = as_("operator", &["lease", "list", "--state", "active"]);
    assert_eq!(out.trim(), "no lease");
    let (code, _, err) = as_("operator", &["lease", "list", "--state", "alive"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("state"),
        "{err}"
    );
    let (code, _, err) = as_("agent", &["lease", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    let (code, out, _) = as_("operator", &["agent", "unlock", agent]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("unlocked {agent}"));
    let (_, out, _) = as_("operator", &["agent", "locks"]);
    assert_eq!(out.trim(), "no agent is locked");

    // An operator revokes one task.
    let (code, out, err) = as_("requester", &request);
    assert_eq!(code, 0, "{err}");
    let other = out.trim().to_owned();
    let (code, _, err) = as_("approver", &["task", "approve", &other]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = as_(
        "operator",
        &["task", "revoke", &other, "--reason", "wrong db"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("task {other}: revoked (0 credentials revoked)")
    );

    // Key rotation: new kid, the old one named with its end of publication.
    let (code, out, err) = as_("operator", &["--json", "key", "rotate"]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_ne!(r["kid"], r["previous_kid"]);
    assert!(
        r["previous_published_until"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let (code, _, err) = as_("agent", &["key", "rotate"]);
    assert_eq!(code, 1);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    assert_eq!(serve.terminate().code(), Some(0));
}

/// Exit codes tell a script what to do: 69 (retry later) when the broker cannot be reached, with
/// `--json` a JSON error saying so; a lifetime the broker cut is said, not silently granted.
#[test]
fn exit_codes_and_json_errors_say_whether_to_retry_and_a_capped_ttl_is_said() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let serve = ServeProcess::start(&serve_dev_args(dev_s), &[]);

    // Nobody listens on port 1.
    let unreachable = [
        "--broker",
        "https://127.0.0.1:1",
        "--dev-dir",
        dev_s,
        "--as",
        "agent",
    ];
    let (code, _, err) = run(&[&unreachable[..], &["whoami"]].concat());
    assert_eq!(code, 69, "{err}");
    let (code, out, _) = run(&[&unreachable[..], &["--json", "whoami"]].concat());
    assert_eq!(code, 69);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["error"]["code"], "UNREACHABLE", "{out}");
    assert_eq!(e["error"]["retryable"], true, "{out}");

    // Bad usage stays 2.
    let (code, _, _) = run_as(serve.grpc, dev_s, "nobody", &["whoami"]);
    assert_eq!(code, 2);

    // A day asked, less granted (the task's ceiling): said on stderr and in the JSON.
    let request = [
        "task",
        "request",
        "--executor",
        "spiffe://taskcred.dev/agent/demo",
        "--grant",
        "db.staging=read",
        "--purpose",
        "p",
    ];
    let (code, id, err) = run_as(serve.grpc, dev_s, "requester", &request);
    assert_eq!(code, 0, "{err}");
    let issue = [
        "--json",
        "token",
        "issue",
        "--task",
        id.trim(),
        "--audience",
        "db.staging",
        "--ttl",
        "1d",
    ];
    let (code, out, err) = run_as(serve.grpc, dev_s, "agent", &issue);
    assert_eq!(code, 0, "{err}");
    let issued: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(issued["ttl_capped"], true, "{out}");
    assert!(issued["ttl_secs"].as_i64().unwrap() < 86_400, "{out}");
    assert!(err.contains("less than the 86400s asked"), "{err}");
    assert_eq!(serve.terminate().code(), Some(0));
}

/// A certificate the broker refuses at the TLS handshake is explained in words (not `UNKNOWN:
/// transport error`), with exit 1: retrying does not help.
#[test]
fn refused_certificates_are_explained() {
    use rcgen::KeyPair;
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let serve = ServeProcess::start(&serve_dev_args(dev_s), &[]);
    let broker = format!("https://{}", serve.grpc);
    let ca = dev.join("ca.pem");
    let present_to = |command: &str, name: &str, pem: &crate::common::Pem| {
        let cert = tmp.path().join(format!("{name}.pem"));
        let key = tmp.path().join(format!("{name}-key.pem"));
        std::fs::write(&cert, &pem.cert).unwrap();
        std::fs::write(&key, &pem.key).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        run(&[
            "--broker",
            &broker,
            "--ca",
            ca.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            command,
        ])
    };
    let present = |name: &str, pem: &crate::common::Pem| present_to("whoami", name, pem);

    // Signed by a CA the broker does not trust.
    let other = crate::common::another_ca();
    let stranger = crate::common::issue(
        &crate::common::svid_params(&["spiffe://taskcred.dev/agent/demo"]),
        &other,
    );
    let (code, _, err) = present("stranger", &stranger);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not trust the CA"), "{err}");

    // Signed by the right CA, but expired.
    let dev_ca = {
        let key =
            KeyPair::from_pem(&std::fs::read_to_string(dev.join("ca-key.pem")).unwrap()).unwrap();
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(&ca).unwrap(), key).unwrap()
    };
    let mut expired = crate::common::svid_params(&["spiffe://taskcred.dev/agent/demo"]);
    expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
    expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let old = crate::common::issue(&expired, &dev_ca);
    let (code, _, err) = present("old", &old);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("expired"), "{err}");

    // Signed by the right CA, for a trust domain the broker does not serve: the identity is
    // refused, not the certificate's profile.
    let foreign = crate::common::issue(
        &crate::common::svid_params(&["spiffe://evil.example/agent/demo"]),
        &dev_ca,
    );
    let (code, _, err) = present("foreign", &foreign);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("trust domain the broker serves"), "{err}");

    // Signed by a CA of the same name as the trusted one but another key (a second dev PKI): a
    // signature that does not verify is another CA too.
    let twin_dir = tempfile::tempdir().unwrap();
    taskcred::devpki::init(twin_dir.path()).unwrap();
    let twin = crate::common::dev_identity_in(twin_dir.path(), "agent");
    let (code, _, err) = present("twin", &twin);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not trust the CA"), "{err}");

    // `doctor` checks the same from the client's side, one line a check.
    let (code, out, _) = present_to("doctor", "old", &old);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL client certificate") && out.contains("expired"),
        "{out}"
    );
    assert!(out.contains("FAIL handshake and WhoAmI"), "{out}");
    assert!(out.contains("ok   CA bundle"), "{out}");
    let (code, out, _) = run_as(serve.grpc, dev_s, "agent", &["doctor"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("the broker knows you as spiffe://taskcred.dev/agent/demo"),
        "{out}"
    );
    assert_eq!(serve.terminate().code(), Some(0));
}

/// A reader that goes away (`taskcred ... | head`) ends a command quietly, as SIGPIPE ends
/// `cat`: no panic, exit 141 (not 0: what was not written, a token say, is lost).
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies");
    // The reader closes its end before the command writes (the sleep keeps the pipe open on
    // the writer's side until then).
    let script = format!(
        "( sleep 0.3; \"{}\" policy check {policies} ) | ( exec 0<&- ); echo \"status ${{PIPESTATUS[0]}}\"",
        crate::common::BIN
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stdout.trim(), "status 141", "{stderr}");
}

/// A stderr that cannot be written (a full disk) never turns an error into a panic, and the
/// client reads no file without bound (`--cert /dev/zero`): found by an attack review.
#[test]
fn a_full_stderr_and_an_endless_file_are_errors_not_crashes() {
    let script = format!(
        "\"{}\" --dev-dir /nonexistent --as agent whoami 2>/dev/full; echo \"status $?\"",
        crate::common::BIN
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.trim().starts_with("status "), "{said}");
    assert_ne!(said.trim(), "status 101", "a panic");
    assert_ne!(said.trim(), "status 0");

    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().to_str().unwrap();
    let (code, _, err) = crate::common::run(&["dev", "init", "--dir", dev]);
    assert_eq!(code, 0, "{err}");
    let key = format!("{dev}/agent-key.pem");
    let (code, _, err) = crate::common::run(&[
        "--broker",
        "https://127.0.0.1:1",
        "--ca",
        &format!("{dev}/ca.pem"),
        "--cert",
        "/dev/zero",
        "--key",
        &key,
        "whoami",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("over 1024 KiB"), "{err}");
}
