//! Configuration refused at start, through the binary: each case exits 64 with a message naming
//! the key, variable or file at fault. The shipped example `config/taskcred.toml` is accepted.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{BIN, ServeProcess};

/// A dev PKI and the shipped example config pointed at it, on ephemeral ports.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    example: String,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        taskcred::devpki::init(&dir).unwrap();
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/taskcred.toml"))
                .unwrap()
                .replace("/etc/taskcred/", &format!("{}/", dir.display()))
                .replace("/var/lib/taskcred/", &format!("{}/", dir.display()))
                .replace("/var/log/taskcred/", &format!("{}/", dir.display()))
                .replace("127.0.0.1:7443", "127.0.0.1:0")
                .replace("127.0.0.1:7480", "127.0.0.1:0");
        Self {
            _tmp: tmp,
            dir,
            example,
        }
    }

    fn write(&self, text: &str) -> PathBuf {
        let p = self.dir.join("taskcred.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn edited(&self, from: &str, to: &str) -> PathBuf {
        assert!(self.example.contains(from), "example lacks {from:?}");
        self.write(&self.example.replacen(from, to, 1))
    }
}

/// Runs `serve --config path` expecting a refusal: returns stderr. `config check` on the same
/// file and environment refuses it too, with the same line.
fn refused(path: &Path, env: &[(&str, &str)]) -> String {
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg(path)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: expected exit 64, stderr: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        err
    };
    let err = run(&["serve", "--config"]);
    assert_eq!(run(&["config", "check", "--config"]), err);
    err
}

fn assert_names(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "{n:?} not named in: {err}");
    }
}

#[test]
fn the_shipped_example_starts_a_broker() {
    let s = Setup::new();
    let path = s.write(&s.example);
    // `config check` says what serve will load, without binding or opening anything: it
    // passes while the broker runs and holds the store.
    let serve = ServeProcess::start(&["serve", "--config", path.to_str().unwrap()], &[]);
    let found = crate::common::config_check_json(&path);
    assert_eq!(
        found["found"]["trust_domains"],
        serde_json::json!(["example.org"]),
        "{found}"
    );
    assert!(found["found"]["policies"].as_u64().unwrap() > 5, "{found}");
    assert!(
        found["found"]["store"]
            .as_str()
            .unwrap()
            .starts_with("embedded "),
        "{found}"
    );
    // The dev PKI outside --dev is said.
    let warnings = found["found"]["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{found}");
    assert!(warnings[0].as_str().unwrap().contains("dev PKI"), "{found}");
    let out = Command::new(BIN)
        .args(["config", "check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("configuration OK"),
        "{out:?}"
    );
    assert_eq!(serve.terminate().code(), Some(0));
}

#[test]
fn missing_and_malformed_files() {
    let s = Setup::new();
    let missing = s.dir.join("nope.toml");
    assert_names(&refused(&missing, &[]), &["nope.toml"]);

    let p = s.write("[server\ngrpc_addr = 1");
    assert_names(&refused(&p, &[]), &["taskcred.toml", "line 1"]);

    // The parser's quote of the line is not repeated: it may hold a secret.
    let p = s.write("[store]\nredis_url = \"redis://u:S3CRETPW@127.0.0.1:1/0\" x\n");
    let err = refused(&p, &[]);
    assert_names(&err, &["taskcred.toml", "line 2"]);
    assert!(!err.contains("S3CRETPW"), "{err}");
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    let s = Setup::new();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "grpc_addr = ",
            "grpc_adr = ",
            &["server", "unknown field `grpc_adr`"],
        ),
        (
            "[log]",
            "[logging]\nx = 1\n[log]",
            &["unknown field `logging`"],
        ),
        (
            "grpc_addr = \"127.0.0.1:0\"",
            "grpc_addr = \"nowhere\"",
            &["server.grpc_addr"],
        ),
        (
            "request_timeout = \"30s\"",
            "request_timeout = \"soon\"",
            &["server.request_timeout"],
        ),
        (
            "max_message_bytes = 262144",
            "max_message_bytes = 10",
            &["server.max_message_bytes"],
        ),
        (
            "max_message_bytes = 262144",
            "max_message_bytes = \"big\"",
            &["server.max_message_bytes"],
        ),
        (
            "min_version = \"tls1.2\"",
            "min_version = \"ssl3\"",
            &["tls.min_version"],
        ),
        (
            "\nname = \"example.org\"",
            "\nname = \"Example.org\"",
            &["identity.trust_domains.name"],
        ),
        // The earlier form is refused with what replaced it.
        (
            "[[identity.trust_domains]]",
            "[identity]\nallowed_trust_domains = [\"example.org\"]\n[[identity.trust_domains]]",
            &[
                "identity.allowed_trust_domains",
                "[[identity.trust_domains]]",
            ],
        ),
        (
            "min_version = \"tls1.2\"",
            "min_version = \"tls1.2\"\nclient_ca = [\"/etc/ca.pem\"]",
            &["tls.client_ca", "[[identity.trust_domains]]"],
        ),
        (
            "url = \"https://taskcred.example.org\"",
            "url = \"https://taskcred.example.org/\"",
            &["issuer.url"],
        ),
        (
            "url = \"https://taskcred.example.org\"",
            "url = \"http://taskcred.example.org\"",
            &["issuer.url"],
        ),
        (
            "jwt_algorithm = \"ES256\"",
            "jwt_algorithm = \"none\"",
            &["issuer.jwt_algorithm"],
        ),
        (
            "backend = \"embedded\"",
            "backend = \"redis\"",
            &["store.redis_url"],
        ),
        (
            "# redis_url = \"redis://127.0.0.1:6379/0\"",
            "redis_url = \"http://secret@x\"",
            &["store.redis_url"],
        ),
        (
            "credential_default = \"5m\"",
            "credential_default = \"2h\"",
            &["ttl.credential_default"],
        ),
        (
            "# redis_url = \"redis://127.0.0.1:6379/0\"",
            "redis_url = \"rediss://:secret@redis.example:6379/0\"",
            &["store.redis_url", "rediss://"],
        ),
        (
            "redis_stream = false",
            "redis_stream = true",
            &["audit.redis_stream", "store.redis_url"],
        ),
        ("format = \"human\"", "format = \"xml\"", &["log.format"]),
        ("level = \"info\"", "level = \"[[[\"", &["log.level"]),
        (
            "min_version = \"tls1.2\"",
            "min_version_x = 1\nmin_version = \"tls1.2\"",
            &["unknown field `min_version_x`"],
        ),
    ];
    for (from, to, needles) in cases {
        let err = refused(&s.edited(from, to), &[]);
        assert_names(&err, needles);
        assert!(
            !err.contains("secret"),
            "a value that may be secret was echoed: {err}"
        );
    }
    // A missing required key.
    let without_issuer = s.example.replace("[issuer]", "[issuer_gone]");
    let err = refused(&s.write(&without_issuer), &[]);
    assert_names(&err, &["issuer"]);
}

#[test]
fn environment_overrides_are_applied_and_named_in_errors() {
    let s = Setup::new();
    let path = s.write(&s.example);
    let err = refused(&path, &[("TASKCRED_SERVER__GRPC_ADDR", "nowhere")]);
    assert_names(&err, &["TASKCRED_SERVER__GRPC_ADDR", "server.grpc_addr"]);
    let err = refused(&path, &[("TASKCRED_SERVER__NO_SUCH_KEY", "1")]);
    assert_names(&err, &["no_such_key"]);
    let err = refused(&path, &[("TASKCRED_TLS__KEY", "/nonexistent/key.pem")]);
    assert_names(&err, &["tls.key", "/nonexistent/key.pem"]);
    // A good override is applied: the broker starts on the address it names.
    let serve = ServeProcess::start(
        &["serve", "--config", path.to_str().unwrap()],
        &[
            ("TASKCRED_SERVER__GRPC_ADDR", "127.0.0.1:0"),
            ("TASKCRED_LOG__FORMAT", "json"),
        ],
    );
    assert_eq!(serve.terminate().code(), Some(0));
}

#[test]
fn key_files_readable_by_others_or_unreadable_are_refused() {
    let s = Setup::new();
    let path = s.write(&s.example);
    let chmod = |name: &str, mode: u32| {
        std::fs::set_permissions(s.dir.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    };

    chmod("server-key.pem", 0o644);
    assert_names(
        &refused(&path, &[]),
        &["tls.key", "server-key.pem", "chmod 600"],
    );
    chmod("server-key.pem", 0o640);
    assert_names(&refused(&path, &[]), &["tls.key", "server-key.pem"]);
    chmod("server-key.pem", 0o600);

    chmod("jwt-key.pem", 0o604);
    assert_names(&refused(&path, &[]), &["issuer.jwt_key", "jwt-key.pem"]);
    chmod("jwt-key.pem", 0o600);

    std::fs::remove_file(s.dir.join("jwt-key.pem")).unwrap();
    assert_names(&refused(&path, &[]), &["issuer.jwt_key", "jwt-key.pem"]);
}

#[test]
fn unusable_tls_material_is_refused() {
    let s = Setup::new();
    let path = s.write(&s.example);
    std::fs::remove_file(s.dir.join("ca.pem")).unwrap();
    assert_names(
        &refused(&path, &[]),
        &["identity.trust_domains.bundle", "ca.pem"],
    );

    let s = Setup::new();
    let path = s.write(&s.example);
    std::fs::write(s.dir.join("server.pem"), "not a certificate\n").unwrap();
    assert_names(&refused(&path, &[]), &["tls.cert", "server.pem"]);

    // A key that does not belong to the certificate.
    let s = Setup::new();
    let path = s.write(&s.example);
    let other = std::fs::read(s.dir.join("agent-key.pem")).unwrap();
    std::fs::write(s.dir.join("server-key.pem"), other).unwrap();
    assert_names(&refused(&path, &[]), &["tls.key"]);
}

#[test]
fn invalid_policies_refuse_to_start_naming_file_and_line() {
    let s = Setup::new();
    let path = s.write(&s.example);
    std::fs::write(
        s.dir.join("policies/broken.cedar"),
        "// first line\npermit (principal, action == Taskcred::Action::\"NoSuchAction\", resource);\n",
    )
    .unwrap();
    assert_names(&refused(&path, &[]), &["policy", "broken.cedar:2:"]);

    std::fs::write(s.dir.join("policies/broken.cedar"), "permit (principal,").unwrap();
    assert_names(&refused(&path, &[]), &["broken.cedar:1:"]);

    let path = s.edited("dir = \"", "dir = \"/nonexistent");
    assert_names(&refused(&path, &[]), &["/nonexistent"]);
}

/// The `[[identity.trust_domains]]` of the example (its comments included), with its bundle
/// path.
fn domain_block(s: &Setup) -> String {
    let start = s.example.find("[[identity.trust_domains]]\n").unwrap();
    let end = start + s.example[start..].find("\n\n").unwrap() + 1;
    let block = s.example[start..end].to_owned();
    let bundle = format!("bundle = \"{}/ca.pem\"\n", s.dir.display());
    assert!(block.ends_with(&bundle), "{block}");
    block
}

/// Issue 16, point 1: a trust domain is bound to its own bundle. A configuration that lets two
/// domains share one (the same file, or the same CA certificate in two files) is refused at
/// start, as is one without any domain.
#[test]
fn trust_domains_sharing_a_bundle_are_refused() {
    let s = Setup::new();
    let block = domain_block(&s);
    assert!(s.example.contains(&block), "example lacks {block}");
    let partner_same_file = format!(
        "{block}[[identity.trust_domains]]\nname = \"partner.example\"\nbundle = \"{}/ca.pem\"\n",
        s.dir.display()
    );
    let err = refused(&s.edited(&block, &partner_same_file), &[]);
    assert_names(
        &err,
        &[
            "identity.trust_domains.bundle",
            "bundle of two trust domains",
        ],
    );

    std::fs::copy(s.dir.join("ca.pem"), s.dir.join("partner-ca.pem")).unwrap();
    let partner_same_ca = format!(
        "{block}[[identity.trust_domains]]\nname = \"partner.example\"\nbundle = \"{}/partner-ca.pem\"\n",
        s.dir.display()
    );
    let err = refused(&s.edited(&block, &partner_same_ca), &[]);
    assert_names(&err, &["partner-ca.pem", "also in the bundle of"]);

    let err = refused(&s.edited(&block, "[identity]\ntrust_domains = []\n"), &[]);
    assert_names(&err, &["identity.trust_domains", "lists no trust domain"]);

    let err = refused(
        &s.edited(&block, &block.replace("example.org", "Example.org")),
        &[],
    );
    assert_names(&err, &["identity.trust_domains.name"]);
}

/// Issue 16, point 2: CI identities have a trust domain of their own, never one of mTLS.
#[test]
fn a_ci_trust_domain_accepted_for_mtls_is_refused() {
    let s = Setup::new();
    let err = refused(
        &s.edited(
            "# trust_domain = \"ci.example.org\"",
            "trust_domain = \"example.org\"",
        ),
        &[],
    );
    assert_names(&err, &["ci.trust_domain", "never accepted for mutual TLS"]);
}

/// With several trust domains, the CI domain is named, never guessed: a default could put CI
/// identities in a partner's namespace, and reordering the domains would rename them.
#[test]
fn several_trust_domains_need_a_named_ci_domain() {
    let s = Setup::new();
    let partner = s.dir.join("partner-ca.pem");
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=partner", "-days", "1", "-keyout"])
        .arg(s.dir.join("partner-key.pem"))
        .arg("-out")
        .arg(&partner)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let block = domain_block(&s);
    let two = format!(
        "[[identity.trust_domains]]\nname = \"aaa-partner.example\"\nbundle = \"{}\"\n{block}",
        partner.display()
    );
    let issuers = r#"[{name = "github", preset = "github", issuer = "https://token.actions.githubusercontent.com", audience = "https://taskcred.example.org", jwks_file = "/nonexistent/jwks.json"}]"#;
    let err = refused(
        &s.edited(&block, &two),
        &[("TASKCRED_CI__ISSUERS", issuers)],
    );
    assert_names(&err, &["ci.trust_domain", "more than one domain"]);
}

/// Issue 16, point 11: what decides whom the broker trusts is refused when others may write it.
#[test]
fn trust_files_writable_by_others_are_refused() {
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let s = Setup::new();
    let path = s.write(&s.example);
    chmod(&path, 0o666);
    assert_names(
        &refused(&path, &[]),
        &["taskcred.toml", "writable by group or others"],
    );
    chmod(&path, 0o644);

    let policies = s.dir.join("policies");
    chmod(&policies, 0o777);
    assert_names(
        &refused(&path, &[]),
        &["policies", "writable by group or others"],
    );
    chmod(&policies, 0o755);
    let file = policies.join("tasks.cedar");
    chmod(&file, 0o664);
    assert_names(
        &refused(&path, &[]),
        &["tasks.cedar", "writable by group or others"],
    );
    chmod(&file, 0o644);

    let bundle = s.dir.join("ca.pem");
    chmod(&bundle, 0o646);
    assert_names(
        &refused(&path, &[]),
        &[
            "identity.trust_domains.bundle",
            "writable by group or others",
        ],
    );
    chmod(&bundle, 0o644);
    let serve = ServeProcess::start(&["serve", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(serve.terminate().code(), Some(0));
}

/// Issue 16, point 11: `serve --dev` never listens beyond loopback.
#[test]
fn serve_dev_refuses_addresses_beyond_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    for flag in ["--grpc-addr", "--http-addr"] {
        let out = Command::new(BIN)
            .args([
                "--dev-dir",
                dev.to_str().unwrap(),
                "serve",
                "--dev",
                flag,
                "0.0.0.0:0",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flag}: {err}");
        assert!(err.contains("loopback only"), "{flag}: {err}");
    }
}

/// An issuing CA that is also the CA of a trust bundle would have every client certificate it
/// signed refused (task certificates are never identities): `config check` and `serve` say so.
#[test]
fn an_issuing_ca_that_is_an_identity_ca_is_warned_of() {
    let s = Setup::new();
    let text = s.example.replacen("issuing-ca.pem", "ca.pem", 1).replacen(
        "issuing-ca-key.pem",
        "ca-key.pem",
        1,
    );
    assert_ne!(text, s.example);
    let path = s.write(&text);
    let out = Command::new(BIN)
        .args(["config", "check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "warning: issuer.ca_cert is also a CA of the bundle of trust domain example.org"
        ),
        "{stdout}"
    );
    // serve starts, and logs the same warning.
    let serve = ServeProcess::start(&["serve", "--config", path.to_str().unwrap()], &[]);
    let mut said = false;
    while let Ok(line) = serve.stderr.recv_timeout(std::time::Duration::from_secs(5)) {
        if line.contains("issuer.ca_cert is also a CA") {
            said = true;
            break;
        }
    }
    assert!(said, "serve did not warn");
    assert_eq!(serve.terminate().code(), Some(0));
}

/// `config check --json` answers in JSON whatever refuses the configuration, a file that does
/// not parse included, with exit 64.
#[test]
fn config_check_refusals_are_json_under_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[server\n").unwrap();
    let (code, out, err) = crate::common::run(&[
        "--json",
        "config",
        "check",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{out}{err}");
    let said: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(said["ok"], serde_json::Value::Bool(false));
    assert!(said["error"].as_str().unwrap().contains("line 1"), "{said}");
}
