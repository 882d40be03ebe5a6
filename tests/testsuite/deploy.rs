//! deploy/ as CI can check it without a container runtime or a cluster: every YAML file parses;
//! the Kubernetes manifests run 2+ probed replicas with a disruption budget, keys from Secrets
//! and the shipped policies; Compose runs Redis with AOF and two replicas, and its Cluster
//! example six AOF cluster nodes and two replicas writing `replicated`; the configurations they
//! carry build a broker, and so do the `env:` of the Kubernetes Redis notes; the Dockerfile builds with the README's command on the crate's
//! Rust; the systemd unit passes `systemd-analyze verify` (where systemd is); the Grafana
//! dashboard only charts series the broker exports.
use std::path::{Path, PathBuf};

use taskcred::app::App;
use taskcred::config::{self, Overrides, Source};
use yaml_rust2::{Yaml, YamlLoader};

pub(crate) fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub(crate) fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{path} does not parse: {e}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

pub(crate) fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

/// Builds a broker (without serving) from `toml` whose paths are moved by `moves` into a fresh
/// dev PKI, with `files` (path under the PKI, text) written there first: the configuration is
/// accepted and its keys, certificates and policies load.
fn builds_a_broker(
    toml: &str,
    moves: &[(&str, &str)],
    env: &[(&str, &str)],
    files: &[(String, String)],
) {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    taskcred::devpki::init(&pki).unwrap();
    for (path, text) in files {
        let path = pki.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let mut text = toml.to_owned();
    for (from, to) in moves {
        text = text.replace(from, &format!("{}/{to}", pki.display()));
    }
    let path = dir.path().join("taskcred.toml");
    std::fs::write(&path, text).unwrap();
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
    let config = config::load(
        &Source::File(path),
        env,
        &Overrides {
            grpc_addr: Some("127.0.0.1:0".into()),
            http_addr: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        },
    )
    .unwrap_or_else(|e| panic!("refused: {e}"));
    crate::common::install_provider();
    if let Err(e) = App::build(config) {
        panic!("the broker does not build: {e}");
    }
}

#[test]
fn every_yaml_file_parses() {
    let mut found = 0;
    let mut dirs = vec![repo("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                // Helm templates are YAML only once rendered: helm.rs checks them so.
                if !path.ends_with("helm/taskcred/templates") {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                YamlLoader::load_from_str(&text)
                    .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
                found += 1;
            }
        }
    }
    assert!(found >= 4, "{found} YAML files");
}

#[test]
fn kubernetes_runs_probed_replicas_with_a_budget_secrets_and_the_shipped_policies() {
    check_kubernetes(
        &yaml("deploy/kubernetes/taskcred.yaml"),
        "taskcred",
        "example.org",
    );
}

/// The objects of `kind` among `docs`.
pub(crate) fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

/// What a Kubernetes deployment of taskcred must hold, the shipped manifests and the rendered
/// Helm chart alike (objects named after `release`): 2+ replicas probed on `/healthz` and
/// `/readyz`, read-only and non-root, keys from Secrets copied 0600 by the init container, a
/// Service and a budget selecting its pods; a configuration naming the one trust domain
/// `domain`, with `config/policies` for that domain beside it (no other domain named), that
/// together build a broker. Returns the configuration's TOML.
pub(crate) fn check_kubernetes(docs: &[Yaml], release: &str, domain: &str) -> toml::Value {
    let deployment = of_kind(docs, "Deployment")[0];
    assert!(deployment["spec"]["replicas"].as_i64().unwrap() >= 2);
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        str_of(&container["livenessProbe"]["httpGet"]["path"], "liveness"),
        "/healthz"
    );
    assert_eq!(
        str_of(&container["readinessProbe"]["httpGet"]["path"], "readiness"),
        "/readyz"
    );
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"],
        Yaml::Boolean(true)
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Yaml::Boolean(true));

    // Keys come from Secrets, copied 0600 by the init container; nothing secret in a ConfigMap.
    let volumes = pod["volumes"].as_vec().unwrap();
    let secrets: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert!(secrets.contains(&"taskcred-tls") && secrets.contains(&"taskcred-signing"));
    let init = str_of(&pod["initContainers"][0]["command"][2], "init command");
    for key in ["server-key.pem", "jwt-key.pem", "issuing-ca-key.pem"] {
        assert!(init.contains(key), "{key} not copied: {init}");
    }
    assert!(init.starts_with("install -m 0600"), "{init}");

    let service = of_kind(docs, "Service")[0];
    assert_eq!(&service["spec"]["selector"], labels);
    let budget = of_kind(docs, "PodDisruptionBudget")[0];
    assert_eq!(&budget["spec"]["selector"]["matchLabels"], labels);

    let maps = of_kind(docs, "ConfigMap");
    let named = |name: String| {
        *maps
            .iter()
            .find(|m| m["metadata"]["name"].as_str() == Some(&name))
            .unwrap_or_else(|| panic!("no ConfigMap {name}"))
    };
    let policies = named(format!("{release}-policies"));
    let toml_text = str_of(
        &named(format!("{release}-config"))["data"]["taskcred.toml"],
        "toml",
    );
    let shipped: Vec<PathBuf> = std::fs::read_dir(repo("config/policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(policies["data"].as_hash().unwrap().len(), shipped.len());
    // The shipped policies, for the trust domain the ConfigMap's configuration names: a policy
    // set naming another domain's identities would refuse every call.
    let config: toml::Value = toml::from_str(toml_text).unwrap();
    let domains: Vec<&str> = config["identity"]["trust_domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(domains, [domain]);
    let mut files = Vec::new();
    for file in shipped {
        let name = file.file_name().unwrap().to_str().unwrap();
        let deployed = str_of(&policies["data"][name], name);
        let expected = format!(
            "// config/policies/{name} for the trust domain {domain}: edit the names for \
             yours.\n{}",
            std::fs::read_to_string(&file)
                .unwrap()
                .replace("spiffe://taskcred.dev/", &format!("spiffe://{domain}/"))
                .replace("\"taskcred.dev\"", &format!("\"{domain}\""))
        );
        assert_eq!(
            deployed, expected,
            "the ConfigMap's {name} is not config/policies/{name} for {domain}"
        );
        for named in deployed
            .split("spiffe://")
            .skip(1)
            .map(|rest| rest.split('/').next().unwrap())
            .chain(
                deployed
                    .split("trust_domain == \"")
                    .skip(1)
                    .map(|rest| rest.split('"').next().unwrap()),
            )
        {
            assert!(
                domains.contains(&named),
                "{name} names the trust domain {named}, which the configuration does not have"
            );
        }
        files.push((format!("deployed-policies/{name}"), deployed.to_owned()));
    }
    builds_a_broker(
        toml_text,
        &[
            ("/etc/taskcred/tls/", ""),
            ("/etc/taskcred/signing/", ""),
            ("/run/taskcred/keys/", ""),
            ("/etc/taskcred/policies", "deployed-policies"),
            ("/var/log/taskcred/", ""),
        ],
        &[("TASKCRED_STORE__REDIS_URL", "redis://127.0.0.1:1/0")],
        &files,
    );
    config
}

/// A Compose service's `key`, or the one it takes from an anchor merged with `<<`.
fn field<'a>(service: &'a Yaml, key: &str) -> &'a Yaml {
    if service[key].is_badvalue() {
        &service["<<"][key]
    } else {
        &service[key]
    }
}

#[test]
fn compose_runs_redis_with_aof_and_two_replicas_of_the_image() {
    let doc = &yaml("deploy/compose/docker-compose.yml")[0];
    let brokers: Vec<&Yaml> = doc["services"]
        .as_hash()
        .unwrap()
        .values()
        .filter(|s| field(s, "command")[0].as_str() == Some("serve"))
        .collect();
    assert!(brokers.len() >= 2, "{} broker services", brokers.len());
    for b in &brokers {
        assert_eq!(
            str_of(&field(b, "build")["dockerfile"], "dockerfile"),
            "deploy/Dockerfile"
        );
        assert!(field(b, "depends_on")["redis"].as_hash().is_some());
    }
    let redis = &doc["services"]["redis"];
    let mounts: Vec<&str> = redis["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| str_of(v, "volume"))
        .collect();
    assert!(mounts.iter().any(|m| m.starts_with("../redis/redis.conf:")));
    let conf = read("deploy/redis/redis.conf");
    for setting in [
        "appendonly yes",
        "appendfsync always",
        "maxmemory-policy noeviction",
    ] {
        assert!(conf.lines().any(|l| l.trim() == setting), "{setting}");
    }
    // The issuer URL is where verifiers find the JWK Set (`<issuer>/.well-known/jwks.json`): the
    // HTTP port replica a publishes, in the scheme that port speaks; never the gRPC port.
    let config: toml::Value = toml::from_str(&read("deploy/compose/taskcred.toml")).unwrap();
    let issuer = config["issuer"]["url"].as_str().unwrap();
    let https = config["server"]
        .get("http_tls")
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    let scheme = if https { "https" } else { "http" };
    assert_eq!(issuer, format!("{scheme}://127.0.0.1:7480"), "issuer.url");
    builds_a_broker(
        &read("deploy/compose/taskcred.toml"),
        &[
            ("/var/lib/taskcred/pki/", ""),
            ("/var/lib/taskcred/pki/policies", "policies"),
            ("/var/log/taskcred/", ""),
        ],
        &[],
        &[],
    );
}

/// A Compose service's command, its arguments as strings (none when it has no list).
fn command_of(service: &Yaml) -> Vec<&str> {
    field(service, "command")
        .as_vec()
        .map(|c| c.iter().map(|a| str_of(a, "argument")).collect())
        .unwrap_or_default()
}

#[test]
fn compose_cluster_runs_six_aof_cluster_nodes_a_create_service_and_two_replicated_brokers() {
    let doc = &yaml("deploy/compose/cluster/docker-compose.yml")[0];
    let services: Vec<(&str, &Yaml)> = doc["services"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, s)| (str_of(k, "service name"), s))
        .collect();

    // Six Redis 7 nodes, each a cluster node with AOF and the settings of redis/redis.conf.
    let nodes: Vec<&(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| command_of(s).first() == Some(&"redis-server"))
        .collect();
    assert_eq!(nodes.len(), 6, "{} Redis nodes", nodes.len());
    for (name, node) in &nodes {
        let args = command_of(node);
        let flag = |f: &str| args.windows(2).find(|w| w[0] == f).map(|w| w[1]);
        assert_eq!(flag("--cluster-enabled"), Some("yes"), "{name}: {args:?}");
        assert_eq!(flag("--appendonly"), Some("yes"), "{name}: {args:?}");
        assert_eq!(
            flag("--cluster-node-timeout"),
            Some("5000"),
            "{name}: {args:?}"
        );
        // Clients reach a node at the name it announces: its own service name.
        assert_eq!(flag("--cluster-announce-hostname"), Some(*name), "{name}");
        let image = str_of(field(node, "image"), "image");
        assert!(image.starts_with("redis:7"), "{name}: {image}");
        let mounts: Vec<&str> = node["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|v| str_of(v, "volume"))
            .collect();
        let conf = mounts
            .iter()
            .find_map(|m| m.strip_prefix("../../redis/redis.conf:"))
            .unwrap_or_else(|| panic!("{name} does not mount redis/redis.conf: {mounts:?}"));
        assert_eq!(
            Some(args[1]),
            conf.strip_suffix(":ro"),
            "{name} does not start on redis/redis.conf"
        );
        assert!(
            mounts.iter().any(|m| m.ends_with(":/data")) && flag("--dir") == Some("/data"),
            "{name} keeps its AOF and nodes.conf in no volume: {mounts:?}"
        );
    }

    // One service joins them (3 masters, a replica each), once every node is up.
    let creates: Vec<&(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| {
            command_of(s)
                .join(" ")
                .contains("redis-cli --cluster create")
        })
        .collect();
    assert_eq!(creates.len(), 1, "one cluster create service");
    let (create, create_service) = creates[0];
    let script = command_of(create_service).join(" ");
    for piece in ["--cluster-replicas 1", "--cluster-yes"] {
        assert!(script.contains(piece), "{create} lacks {piece}: {script}");
    }
    for (name, _) in &nodes {
        assert_eq!(
            create_service["depends_on"][*name]["condition"].as_str(),
            Some("service_healthy"),
            "{create} does not wait for {name}"
        );
        assert!(
            script.contains("redis-$$n"),
            "{create} does not join {name}"
        );
    }

    // Two replicas of the image, started once the cluster is made.
    let brokers: Vec<&(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| command_of(s).first() == Some(&"serve"))
        .collect();
    assert!(brokers.len() >= 2, "{} broker services", brokers.len());
    for (name, b) in &brokers {
        assert_eq!(
            str_of(&field(b, "build")["dockerfile"], "dockerfile"),
            "deploy/Dockerfile"
        );
        assert_eq!(str_of(&field(b, "build")["context"], "context"), "../../..");
        for (needed, condition) in [
            (*create, "service_completed_successfully"),
            ("pki", "service_completed_successfully"),
        ] {
            assert_eq!(
                field(b, "depends_on")[needed]["condition"].as_str(),
                Some(condition),
                "{name} does not wait for {needed}"
            );
        }
        let mounts: Vec<&str> = field(b, "volumes")
            .as_vec()
            .unwrap()
            .iter()
            .map(|v| str_of(v, "volume"))
            .collect();
        assert!(
            mounts.contains(&"./taskcred.toml:/etc/taskcred/taskcred.toml:ro"),
            "{name}: {mounts:?}"
        );
    }

    // Its configuration: the Cluster backend with every node as a seed, replicated writes.
    let text = read("deploy/compose/cluster/taskcred.toml");
    let config: toml::Value = toml::from_str(&text).unwrap();
    let store = &config["store"];
    assert_eq!(store["backend"].as_str(), Some("redis_cluster"));
    assert_eq!(store["durability"].as_str(), Some("replicated"));
    let mut urls: Vec<&str> = store["redis_urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    urls.sort_unstable();
    let mut wanted: Vec<String> = nodes
        .iter()
        .map(|(name, _)| format!("redis://{name}:6379/"))
        .collect();
    wanted.sort();
    assert_eq!(urls, wanted, "store.redis_urls are not the six nodes");
    assert_eq!(
        config["issuer"]["url"].as_str(),
        Some("http://127.0.0.1:7480"),
        "issuer.url is replica a's HTTP port"
    );
    builds_a_broker(
        &text,
        &[
            ("/var/lib/taskcred/pki/", ""),
            ("/var/lib/taskcred/pki/policies", "policies"),
            ("/var/log/taskcred/", ""),
        ],
        &[],
        &[],
    );
}

/// The store variables the Kubernetes Redis notes must name: each is a key of `[store]`.
const STORE_VARIABLES: [&str; 5] = [
    "TASKCRED_STORE__BACKEND",
    "TASKCRED_STORE__REDIS_URLS",
    "TASKCRED_STORE__SENTINEL_URLS",
    "TASKCRED_STORE__SENTINEL_MASTER",
    "TASKCRED_STORE__DURABILITY",
];

/// The `env` lists of the notes' YAML blocks: (variable, literal value or None for a Secret).
fn env_blocks(notes: &str) -> Vec<Vec<(String, Option<String>)>> {
    let mut blocks = Vec::new();
    for block in notes.split("```yaml\n").skip(1) {
        let block = block.split("```").next().unwrap();
        let docs = YamlLoader::load_from_str(block)
            .unwrap_or_else(|e| panic!("a YAML block of redis.md does not parse: {e}\n{block}"));
        for doc in docs {
            let Some(env) = doc["env"].as_vec() else {
                continue;
            };
            blocks.push(
                env.iter()
                    .map(|e| {
                        let name = str_of(&e["name"], "env name").to_owned();
                        let value = e["value"].as_str().map(str::to_owned);
                        assert!(
                            value.is_some() || !e["valueFrom"]["secretKeyRef"].is_badvalue(),
                            "{name}: neither a value nor a Secret"
                        );
                        (name, value)
                    })
                    .collect(),
            );
        }
    }
    blocks
}

/// deploy/kubernetes/redis.md names the store's variables, and the `env:` it shows for the
/// Cluster and for Sentinel, set on the shipped Kubernetes configuration (Secrets standing in
/// as placeholder URLs), build a broker: the notes cannot drift from the configuration keys.
#[test]
fn the_kubernetes_redis_notes_name_the_store_variables_and_their_env_builds_a_broker() {
    let notes = read("deploy/kubernetes/redis.md");
    for var in STORE_VARIABLES {
        assert!(
            notes.contains(var),
            "deploy/kubernetes/redis.md does not name {var}"
        );
    }
    let docs = yaml("deploy/kubernetes/taskcred.yaml");
    let toml_text = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|m| m["metadata"]["name"].as_str() == Some("taskcred-config"))
        .map(|m| str_of(&m["data"]["taskcred.toml"], "toml").to_owned())
        .unwrap();
    let blocks = env_blocks(&notes);
    let mut backends = Vec::new();
    for env in &blocks {
        let env: Vec<(&str, String)> = env
            .iter()
            .map(|(name, value)| {
                let value = value.clone().unwrap_or_else(|| {
                    if name.ends_with("_URLS") {
                        r#"["redis://taskcred:secret@127.0.0.1:1/"]"#.to_owned()
                    } else if name.ends_with("_URL") {
                        "redis://taskcred:secret@127.0.0.1:1/0".to_owned()
                    } else {
                        panic!("{name} from a Secret: what would it hold?")
                    }
                });
                (name.as_str(), value)
            })
            .collect();
        for (name, _) in &env {
            assert!(
                !name.starts_with("TASKCRED_STORE__") || STORE_VARIABLES.contains(name),
                "redis.md sets {name}, which this test does not know"
            );
        }
        let value_of = |var: &str| env.iter().find(|(n, _)| *n == var).map(|(_, v)| v.as_str());
        assert_eq!(
            value_of("TASKCRED_STORE__DURABILITY"),
            Some("replicated"),
            "an env of redis.md without durability replicated: {env:?}"
        );
        backends.push(value_of("TASKCRED_STORE__BACKEND").unwrap().to_owned());
        let env: Vec<(&str, &str)> = env.iter().map(|(n, v)| (*n, v.as_str())).collect();
        builds_a_broker(
            &toml_text,
            &[
                ("/etc/taskcred/tls/", ""),
                ("/etc/taskcred/signing/", ""),
                ("/run/taskcred/keys/", ""),
                ("/etc/taskcred/policies", "policies"),
                ("/var/log/taskcred/", ""),
            ],
            &env,
            &[],
        );
    }
    backends.sort();
    assert_eq!(
        backends,
        ["redis_cluster", "redis_sentinel"],
        "redis.md shows an env for the Cluster and one for Sentinel"
    );
}

#[test]
fn the_dockerfile_builds_as_the_readme_says_on_the_crates_rust() {
    let dockerfile = read("deploy/Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let cargo = read("Cargo.toml");
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        stages[0].starts_with(&format!("FROM rust:{msrv}-")),
        "build stage {} is not on rust-version {msrv}",
        stages[0]
    );
    let builds: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("RUN cargo "))
        .collect();
    assert_eq!(builds.len(), 1, "{builds:?}");
    let readme = read("README.md");
    let command = format!("cargo {}", builds[0]);
    assert!(
        readme.lines().any(|l| l.trim() == command),
        "the README does not give the Dockerfile's build command `{command}`"
    );
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap();
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
}

#[test]
fn the_systemd_unit_verifies() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed here: the unit was not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("taskcred.service");
    std::fs::write(
        &unit,
        read("deploy/systemd/taskcred.service")
            .replace("/usr/local/bin/taskcred", env!("CARGO_BIN_EXE_taskcred")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

/// Metric names the broker source defines.
fn exported_series() -> Vec<String> {
    let mut names = Vec::new();
    let mut dirs = vec![repo("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                // Helm templates are YAML only once rendered: helm.rs checks them so.
                if !path.ends_with("helm/taskcred/templates") {
                    dirs.push(path);
                }
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for piece in text.split('"').skip(1).step_by(2) {
                if piece.starts_with("taskcred_")
                    && piece.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    names.push(piece.to_owned());
                }
            }
        }
    }
    names
}

#[test]
fn the_grafana_dashboard_charts_only_exported_series() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/taskcred.json")).unwrap();
    let exported = exported_series();
    let mut charted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in series_in(expr) {
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(&word);
                assert!(
                    exported.iter().any(|n| n == base),
                    "panel {} charts {word}, which the broker does not export",
                    panel["title"]
                );
                charted += 1;
            }
        }
    }
    assert!(charted >= 10, "{charted} series charted");
}

/// The `taskcred_*` words of `text` (metric names, as PromQL writes them).
fn series_in(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("taskcred_") && w.len() > "taskcred_".len())
        .map(str::to_owned)
        .collect()
}

/// The series named by the runbook's alert table.
fn alerted_series() -> Vec<String> {
    let runbook = read("docs/runbook.md");
    let table = runbook
        .split("| alert | expression (PromQL) | why |")
        .nth(1)
        .expect("the runbook has its alert table");
    let rows: Vec<&str> = table
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(rows.len() >= 10, "{} alerts", rows.len());
    rows.iter().flat_map(|r| series_in(r)).collect()
}

/// A broker that has just started (its own process, so that no other test's events are in its
/// metrics) already serves every series the shipped dashboard charts and the runbook's alerts
/// use, so that a panel is never empty and an `increase()` alert fires on the first event.
#[tokio::test]
async fn a_fresh_broker_serves_every_series_the_dashboard_and_the_alerts_use() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/taskcred.json")).unwrap();
    let mut wanted: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .flat_map(|t| series_in(t["expr"].as_str().unwrap_or_default()))
        .chain(alerted_series())
        .collect();
    wanted.sort();
    wanted.dedup();

    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let serve = crate::common::ServeProcess::start(
        &[
            "serve",
            "--dev",
            "--dev-dir",
            dev.to_str().unwrap(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let (status, metrics) = crate::common::http_get(serve.http, "/metrics").await;
    assert_eq!(status, 200);
    let served: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| !served.contains(&w.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not served by a fresh broker: {missing:?}\n{metrics}"
    );
    // And the series any deployment expects of a process.
    for name in [
        "taskcred_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(served.contains(&name), "{name} missing:\n{metrics}");
    }
    assert!(
        metrics.contains(&format!(
            "taskcred_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    serve.kill();
}
