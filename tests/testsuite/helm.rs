//! The Helm chart (`deploy/helm/taskcred`) and the Kubernetes manifests, checked by independent
//! tools: the chart rendered by Helm's own Go SDK (as `helm template` does) must hold what the
//! shipped manifests hold (`deploy::check_kubernetes`: the same configuration and policies for
//! the same trust domain, and for any other); its Ingress publishes only the verification
//! endpoints; its ServiceMonitor and NetworkPolicy select the broker's pods; bad values are
//! refused at render; and every object passes the Kubernetes API's JSON schema of its version
//! (`kubernetes-validate --strict`). The tools come from PyPI (tests/tools/requirements.txt) into
//! a virtual environment under target/, made on first use.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use yaml_rust2::{Yaml, YamlLoader};

use crate::deploy::{check_kubernetes, of_kind, repo, str_of, yaml};

/// The Kubernetes versions the objects are validated against: the oldest still supported by
/// its project when this was written, and a recent one.
const KUBERNETES_VERSIONS: &[&str] = &["1.31.0", "1.35.0"];

/// The virtual environment with the tools of tests/tools/requirements.txt, installed once (a
/// file lock keeps concurrent test processes from installing it twice).
fn tools() -> &'static Path {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-tools");
        std::fs::create_dir_all(&venv).unwrap();
        let lock = std::fs::File::create(venv.with_extension("lock")).unwrap();
        lock.lock().unwrap();
        let wanted = std::fs::read_to_string(repo("tests/tools/requirements.txt")).unwrap();
        let marker = venv.join("installed-requirements.txt");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            let made = Command::new(&python)
                .args(["-m", "venv", "--clear"])
                .arg(&venv)
                .status()
                .unwrap_or_else(|e| panic!("{python} (for the deploy tools): {e}"));
            assert!(made.success(), "{python} -m venv failed");
            let installed = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(repo("tests/tools/requirements.txt"))
                .status()
                .unwrap();
            assert!(
                installed.success(),
                "pip could not install tests/tools/requirements.txt (PyPI must be reachable \
                 on first use)"
            );
            std::fs::write(&marker, &wanted).unwrap();
        }
        venv
    })
}

/// The chart rendered for `release` in `namespace` with `values` (JSON): the manifests, or
/// Helm's refusal.
fn render(release: &str, namespace: &str, values: &str) -> Result<String, String> {
    let out = Command::new(tools().join("bin/python"))
        .arg(repo("tests/tools/helm_render.py"))
        .arg(repo("deploy/helm/taskcred"))
        .args([release, namespace, values])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn documents(text: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(text)
        .unwrap_or_else(|e| panic!("the rendered chart does not parse: {e}\n{text}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// `kubernetes-validate --strict` of `file` against each of [`KUBERNETES_VERSIONS`]: every
/// object passes its schema, and only `allowed_unknown` kinds (custom resources) have none.
fn validate(file: &Path, allowed_unknown: &[&str]) {
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(tools().join("bin/kubernetes-validate"))
            .args(["--strict", "-k", version])
            .arg(file)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{} fails the Kubernetes {version} schemas:\n{said}",
            file.display()
        );
        for line in said.lines().filter(|l| l.starts_with("WARN")) {
            assert!(
                allowed_unknown
                    .iter()
                    .any(|kind| line.contains(&format!("kind {kind} "))),
                "{line}"
            );
        }
        assert!(said.contains("passed for resource deployment/"), "{said}");
    }
}

const ISSUER: &str = r#"{"issuerUrl": "https://taskcred.example.org"}"#;

const EVERYTHING_ELSE: &str = r#"{
    "trustDomain": "corp.example",
    "replicas": 4,
    "ingress": {"enabled": true, "host": "broker.corp.example", "className": "nginx"},
    "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
    "networkPolicy": {"grpcFrom": [{"namespaceSelector": {"matchLabels": {"agents": "yes"}}}]},
    "redis": {"existingSecret": "taskcred-redis", "urlKey": "url", "port": 6379,
              "networkPeers": [{"ipBlock": {"cidr": "10.20.0.5/32"}}]},
    "extraEnv": [{"name": "TASKCRED_SERVER__MAX_HTTP_CONNECTIONS_PER_SOURCE", "value": "512"}]
}"#;

#[test]
fn the_chart_renders_what_the_shipped_manifests_hold() {
    let docs = documents(&render("taskcred", "taskcred", ISSUER).unwrap());
    let config = check_kubernetes(&docs, "taskcred", "example.org");
    assert_eq!(
        config["issuer"]["url"].as_str(),
        Some("https://taskcred.example.org")
    );
    // The same configuration and policies as deploy/kubernetes/taskcred.yaml: one source of
    // truth rendered two ways.
    let shipped = yaml("deploy/kubernetes/taskcred.yaml");
    for map in ["taskcred-config", "taskcred-policies"] {
        let data = |docs: &[Yaml]| {
            of_kind(docs, "ConfigMap")
                .into_iter()
                .find(|m| m["metadata"]["name"].as_str() == Some(map))
                .unwrap()["data"]
                .clone()
        };
        assert_eq!(data(&docs), data(&shipped), "{map}");
    }
}

#[test]
fn the_chart_for_another_domain_publishes_only_the_verification_endpoints() {
    let docs = documents(&render("cred", "security", EVERYTHING_ELSE).unwrap());
    let config = check_kubernetes(&docs, "cred", "corp.example");
    assert_eq!(
        config["issuer"]["url"].as_str(),
        Some("https://broker.corp.example"),
        "the issuer URL is the Ingress's HTTPS URL"
    );
    for d in &docs {
        assert_eq!(
            d["metadata"]["namespace"].as_str(),
            Some("security"),
            "{d:?}"
        );
    }
    let deployment = of_kind(&docs, "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(4));
    let pods = &deployment["spec"]["template"]["metadata"]["labels"];

    // The Ingress: HTTPS for the issuer's host, and only the public verification paths, to the
    // HTTP port (never /metrics, never gRPC).
    let ingress = of_kind(&docs, "Ingress")[0];
    assert_eq!(ingress["spec"]["ingressClassName"].as_str(), Some("nginx"));
    assert_eq!(
        ingress["spec"]["tls"][0]["hosts"][0].as_str(),
        Some("broker.corp.example")
    );
    let rule = &ingress["spec"]["rules"][0];
    assert_eq!(rule["host"].as_str(), Some("broker.corp.example"));
    let mut paths: Vec<&str> = rule["http"]["paths"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["pathType"].as_str(), Some("Exact"));
            assert_eq!(p["backend"]["service"]["name"].as_str(), Some("cred"));
            assert_eq!(
                p["backend"]["service"]["port"]["name"].as_str(),
                Some("http")
            );
            str_of(&p["path"], "path")
        })
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/.well-known/jwks.json",
            "/.well-known/openid-configuration",
            "/crl"
        ]
    );

    // Prometheus scrapes every replica's /metrics on the HTTP port (a ServiceMonitor selects
    // the Service by its labels).
    let monitor = of_kind(&docs, "ServiceMonitor")[0];
    assert_eq!(
        monitor["metadata"]["labels"]["release"].as_str(),
        Some("prometheus")
    );
    let service = of_kind(&docs, "Service")[0];
    let selects = monitor["spec"]["selector"]["matchLabels"]
        .as_hash()
        .unwrap();
    assert!(!selects.is_empty());
    for (k, v) in selects {
        assert_eq!(
            &service["metadata"]["labels"][k.as_str().unwrap()],
            v,
            "{k:?}"
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        Some("http")
    );
    assert_eq!(
        monitor["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );

    // The NetworkPolicy: the broker's pods, both directions denied but for its two ports (gRPC
    // from the peers given) and DNS, Redis and HTTPS out.
    let policy = of_kind(&docs, "NetworkPolicy")[0];
    assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], pods);
    let types: Vec<&str> = policy["spec"]["policyTypes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|t| str_of(t, "policy type"))
        .collect();
    assert_eq!(types, ["Ingress", "Egress"]);
    let ingress_rules = policy["spec"]["ingress"].as_vec().unwrap();
    let ports: Vec<&str> = ingress_rules
        .iter()
        .map(|r| str_of(&r["ports"][0]["port"], "port"))
        .collect();
    assert_eq!(ports, ["grpc", "http"]);
    assert_eq!(
        ingress_rules[0]["from"][0]["namespaceSelector"]["matchLabels"]["agents"].as_str(),
        Some("yes")
    );
    let egress: Vec<i64> = policy["spec"]["egress"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_vec().unwrap())
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(
        egress,
        [53, 53, 6379],
        "DNS and Redis only, unless extraEgress adds"
    );
    let rules = policy["spec"]["egress"].as_vec().unwrap();
    assert_eq!(
        rules[0]["to"][0]["podSelector"]["matchLabels"]["k8s-app"].as_str(),
        Some("kube-dns"),
        "DNS to the cluster's DNS pods only"
    );
    assert_eq!(
        rules[1]["to"][0]["ipBlock"]["cidr"].as_str(),
        Some("10.20.0.5/32"),
        "Redis where redis.networkPeers says"
    );
    // More environment for the broker, as given (here: a limit of a table the chart writes).
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_vec()
        .unwrap();
    assert!(env.iter().any(|e| e["name"].as_str()
        == Some("TASKCRED_SERVER__MAX_HTTP_CONNECTIONS_PER_SOURCE")
        && e["value"].as_str() == Some("512")));
}

#[test]
fn the_chart_refuses_values_that_would_deploy_a_broken_broker() {
    for (values, said) in [
        ("{}", "set issuerUrl"),
        (
            r#"{"issuerUrl": "http://taskcred.example.org"}"#,
            "/issuerUrl",
        ),
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "replicas": 1}"#,
            "/replicas",
        ),
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "trustDomain": "Example.ORG/x"}"#,
            "/trustDomain",
        ),
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "jwtAlgorithm": "HS256"}"#,
            "/jwtAlgorithm",
        ),
        // The broker refuses an issuer with a trailing slash: so does the chart.
        (
            r#"{"issuerUrl": "https://taskcred.example.org/"}"#,
            "/issuerUrl",
        ),
        // A typo is no silent default.
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "networkPolicy": {"grpcfrom": []}}"#,
            "'grpcfrom' not allowed",
        ),
        // The issuer's host is the Ingress's, or verifiers fetch keys from a host nobody
        // serves (or somebody else does).
        (
            r#"{"issuerUrl": "https://creds.corp.example", "ingress": {"enabled": true}}"#,
            "does not serve",
        ),
        // The development policies permit example repository ids: never with CI issuers.
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "extraConfig": "[[ci.issuers]]\nname = \"github\""}"#,
            "give your own policies",
        ),
        // A value cannot add YAML (here: an environment variable turning the audit off).
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "redis": {"existingSecret": "taskcred-redis", "port": 6379, "networkPeers": [{"namespaceSelector": {}}], "urlKey": "url\n            - name: TASKCRED_AUDIT__REQUIRED\n              value: \"false\""}}"#,
            "/redis/urlKey",
        ),
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "serviceMonitor": {"enabled": true, "interval": "30s\n      basicAuth: {}"}}"#,
            "/serviceMonitor/interval",
        ),
        (
            r#"{"issuerUrl": "https://taskcred.example.org", "networkPolicy": {"extraEgress": [{}]}}"#,
            "/networkPolicy/extraEgress",
        ),
    ] {
        let refused =
            render("taskcred", "taskcred", values).expect_err(&format!("{values} was rendered"));
        assert!(refused.contains(said), "{values}: {refused}");
    }
}

#[test]
fn every_kubernetes_object_passes_its_api_schema() {
    validate(&repo("deploy/kubernetes/taskcred.yaml"), &[]);
    let dir = tempfile::tempdir().unwrap();
    for (name, release, namespace, values) in [
        ("defaults.yaml", "taskcred", "taskcred", ISSUER),
        ("everything.yaml", "cred", "security", EVERYTHING_ELSE),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, render(release, namespace, values).unwrap()).unwrap();
        validate(&path, &["ServiceMonitor"]);
    }
    // The schema check is real: a wrong type in the Deployment is refused.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(repo("deploy/kubernetes/taskcred.yaml"))
            .unwrap()
            .replace("replicas: 3", "replicas: three"),
    )
    .unwrap();
    let out = Command::new(tools().join("bin/kubernetes-validate"))
        .args(["--strict", "--quiet"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("spec.replicas"));
}
