//! Shared test harness: a real broker on ephemeral loopback ports with a real dev PKI, real TLS
//! clients, and certificates made by rcgen at test time.

pub mod flows;
pub mod topology;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use taskcred::app::{App, AppError, Listeners};
use taskcred::clock::Clock;
use taskcred::config::{self, Overrides, Source};
use taskcred::devpki;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A broker running in this process on ephemeral ports, over a fresh dev PKI.
pub struct Broker {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub dir: Arc<TempDir>,
    env: Vec<(String, String)>,
    clock: Option<Arc<dyn Clock>>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AppError>>,
}

pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Broker {
    /// Starts a broker with the `--dev` configuration over `dir`, `env` overrides and `clock`.
    pub async fn launch(
        dir: impl Into<Arc<TempDir>>,
        env: Vec<(String, String)>,
        clock: Option<Arc<dyn Clock>>,
    ) -> Self {
        let dir = dir.into();
        install_provider();
        devpki::init(dir.path()).unwrap();
        let overrides = Overrides {
            grpc_addr: Some("127.0.0.1:0".into()),
            http_addr: Some("127.0.0.1:0".into()),
            log_format: None,
            redis_url: None,
            redis_cluster: None,
        };
        let config =
            config::load(&Source::Dev(dir.path().to_owned()), env.clone(), &overrides).unwrap();
        let listeners = Listeners::bind(&config.server).await.unwrap();
        let (grpc, http) = (
            listeners.grpc_addr().unwrap(),
            listeners.http_addr().unwrap(),
        );
        let app = match &clock {
            Some(c) => App::build_with_clock(config, c.clone()).unwrap(),
            None => App::build(config).unwrap(),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(listeners, shutdown.clone()));
        Self {
            grpc,
            http,
            dir,
            env,
            clock,
            shutdown,
            task,
        }
    }

    pub async fn start_with_env(env: Vec<(String, String)>) -> Self {
        Self::launch(tempfile::tempdir().unwrap(), env, None).await
    }

    pub async fn start() -> Self {
        Self::start_with_env(Vec::new()).await
    }

    /// A broker whose store is the Redis at `url`.
    pub async fn start_on_redis(url: &str) -> Self {
        Self::start_with_env(redis_env(url)).await
    }

    /// Another broker over the same dev PKI and policies (a replica), with `env`.
    pub async fn replica(&self, env: Vec<(String, String)>) -> Self {
        Self::launch(Arc::clone(&self.dir), env, self.clock.clone()).await
    }

    /// Stops the broker and checks it stopped cleanly; returns its directory.
    pub async fn stop(self) -> Arc<TempDir> {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        self.dir
    }

    /// Stops it and starts a new broker over the same directory, settings and clock.
    pub async fn restart(self) -> Self {
        let (env, clock) = (self.env.clone(), self.clock.clone());
        let dir = self.stop().await;
        Self::launch(dir, env, clock).await
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The PEM files of dev identity `name`.
    pub fn dev_identity(&self, name: &str) -> Pem {
        dev_identity_in(self.dir.path(), name)
    }

    /// The dev root CA, to sign test certificates with.
    pub fn dev_ca(&self) -> Issuer<'static, KeyPair> {
        let key =
            KeyPair::from_pem(&std::fs::read_to_string(self.path("ca-key.pem")).unwrap()).unwrap();
        Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.path("ca.pem")).unwrap(), key)
            .unwrap()
    }

    /// A tonic channel to the broker, presenting `identity` if given.
    pub async fn channel(&self, identity: Option<&Pem>) -> Channel {
        self.channel_to(self.grpc, identity).await
    }

    /// A tonic channel to `grpc`, another broker over the same dev PKI (a `serve` process
    /// replica), presenting `identity` if given.
    pub async fn channel_to(&self, grpc: SocketAddr, identity: Option<&Pem>) -> Channel {
        channel_at(grpc, self.dir.path(), identity).await
    }

    pub async fn channel_as(&self, name: &str) -> Channel {
        self.channel(Some(&self.dev_identity(name))).await
    }

    /// `GET path` on the HTTP port: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }
}

/// The PEM files of dev identity `name` in the dev PKI at `dev`.
pub fn dev_identity_in(dev: &Path, name: &str) -> Pem {
    let (c, k) = devpki::identity_files(dev, name);
    Pem {
        cert: std::fs::read_to_string(c).unwrap(),
        key: std::fs::read_to_string(k).unwrap(),
    }
}

/// A tonic channel to the broker at `grpc` serving the dev PKI at `dev`, presenting `identity`
/// if given.
pub async fn channel_at(grpc: SocketAddr, dev: &Path, identity: Option<&Pem>) -> Channel {
    let ca = std::fs::read(dev.join("ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Endpoint::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A minimal HTTP/1.1 GET, enough for /healthz, /readyz and /metrics.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_bytes(addr, path).await;
    (status, String::from_utf8(body).unwrap())
}

/// A minimal HTTP/1.1 GET of a body with a length (not chunked): (status, head, body bytes).
pub async fn http_get_bytes(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (status, head, out[split..].to_vec())
}

/// Parameters of an X509-SVID leaf with the given URI SANs.
pub fn svid_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "test workload");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.use_authority_key_identifier_extension = true;
    p
}

/// Signs `params` with `issuer` for a fresh P-256 key.
pub fn issue(params: &CertificateParams, issuer: &Issuer<'_, KeyPair>) -> Pem {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Performs a real TLS handshake with the broker presenting `client` and waits for the server's
/// first bytes (its HTTP/2 SETTINGS) or its alert. With TLS 1.3 the server judges the client
/// certificate after the client considers the handshake done, so the refusal arrives on read.
pub async fn handshake(
    addr: SocketAddr,
    ca_pem: &Path,
    client: Option<&Pem>,
) -> Result<(), rustls::Error> {
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match client {
        Some(pem) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pem.cert.as_bytes())
                    .map(Result::unwrap)
                    .collect();
            let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let as_rustls = |e: std::io::Error| {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| rustls::Error::General(e.to_string()))
    };
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(as_rustls)?;
    // A client speaks first (the HTTP/2 preface): the broker closes a connection that does not.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .map_err(as_rustls)?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(0) => Err(rustls::Error::General("closed without a word".into())),
        Ok(_) => Ok(()),
        Err(e) => Err(as_rustls(e)),
    }
}

/// The `taskcred` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_taskcred");

/// A `taskcred serve` child process, killed on drop if still running.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub stderr: std::sync::mpsc::Receiver<String>,
}

impl ServeProcess {
    /// Runs `taskcred ARGS` and waits for its banner; panics with its stderr if it exits first.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_program(BIN, args, env)
    }

    /// Runs `program ARGS` (a wrapper that ends in `exec taskcred ...`) and waits for the
    /// broker's banner.
    pub fn start_program(program: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (err_tx, err_rx) = std::sync::mpsc::channel();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let (mut grpc, mut http) = (None, None);
        let mut lines = stdout.lines();
        while grpc.is_none() || http.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                let err: Vec<String> = err_rx.try_iter().collect();
                panic!("serve exited before its banner:\n{}", err.join("\n"));
            };
            if let Some(a) = line.trim().strip_prefix("gRPC (mTLS): ") {
                grpc = Some(a.trim().parse().unwrap());
            }
            if let Some(a) = line.trim().strip_prefix("HTTP:") {
                let a = a
                    .trim()
                    .trim_start_matches("http://")
                    .trim_start_matches("https://");
                http = Some(a.split_whitespace().next().unwrap().parse().unwrap());
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            grpc: grpc.unwrap(),
            http: http.unwrap(),
            stderr: err_rx,
        }
    }

    /// Kills it at once (SIGKILL): whatever it was doing stops half-way.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "serve did not exit on SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `taskcred ARGS` to completion: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A real `redis-server` from PATH on a free loopback port, with its own data directory (AOF on,
/// so a restart keeps the data). Killed on drop.
pub struct RedisServer {
    pub port: u16,
    pub dir: TempDir,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            port,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self.dir.path().to_str().unwrap(),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read as _, Write as _};
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the server: `STOP` hangs it (connections stay
    /// open, nothing answers), `CONT` lets it go on with what was queued.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// A command run on the server (as an operator would with redis-cli).
    pub fn command(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).unwrap()
    }

    /// The entries of the Redis store's revocation log (every bucket's).
    pub fn log_len(&self) -> i64 {
        let redis::Value::Array(logs) = self.command(&["KEYS", "tc:{*}:rev"]) else {
            panic!("KEYS answers an array")
        };
        logs.iter()
            .map(|k| match k {
                redis::Value::BulkString(k) => {
                    match self.command(&["XLEN", std::str::from_utf8(k).unwrap()]) {
                        redis::Value::Int(n) => n,
                        other => panic!("{other:?}"),
                    }
                }
                other => panic!("{other:?}"),
            })
            .sum()
    }

    /// Stops the server (its data stays in its directory).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again on the same port with its data gone (as a Redis without persistence).
    pub fn restart_empty(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(path).unwrap();
            } else {
                std::fs::remove_file(path).unwrap();
            }
        }
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Environment overrides that put a broker's store on the Redis at `url`.
pub fn redis_env(url: &str) -> Vec<(String, String)> {
    vec![
        ("TASKCRED_STORE__BACKEND".into(), "redis".into()),
        ("TASKCRED_STORE__REDIS_URL".into(), url.into()),
    ]
}

/// Runs `taskcred --broker https://GRPC --dev-dir DEV --as NAME ARGS` to completion.
pub fn run_as(grpc: SocketAddr, dev_dir: &str, name: &str, args: &[&str]) -> (i32, String, String) {
    let broker = format!("https://{grpc}");
    let mut all = vec![
        "--broker",
        broker.as_str(),
        "--dev-dir",
        dev_dir,
        "--as",
        name,
    ];
    all.extend_from_slice(args);
    run(&all)
}

/// The wait a RESOURCE_EXHAUSTED answer asks for (trailer `retry-after-ms`).
pub fn retry_after_ms(status: &tonic::Status) -> u64 {
    status
        .metadata()
        .get("retry-after-ms")
        .expect("a retry-after-ms trailer")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The sum of the samples of `series` (a metric name, or a name and its labels as written, e.g.
/// `taskcred_rate_limited_total{kind="agent"}`) in a Prometheus exposition; 0 when absent. Every
/// known series is served at zero from a broker's start, so tests compare values, not presence;
/// the metrics are the test process's, shared by every broker of the suite, so they compare a
/// value before and after.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(series).is_some_and(|rest| {
                rest.starts_with(' ') || (rest.starts_with(',') || rest.starts_with('{'))
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The whole lines of the audit file at `path`, parsed (none when it does not exist yet). A
/// running broker may be halfway through writing the last line: that one is left out.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `taskcred serve --dev` on ephemeral loopback ports, with the dev PKI in `dev_dir`.
pub fn serve_dev_args(dev_dir: &str) -> Vec<&str> {
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

/// A CA nobody trusts, to sign certificates a broker must refuse.
pub fn another_ca() -> Issuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "another CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    Issuer::new(params, KeyPair::generate().unwrap())
}

/// What `taskcred --json config check --config PATH` found, which must pass (exit 0).
pub fn config_check_json(path: &Path) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(["--json", "config", "check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(found["ok"], true);
    found
}

/// The lines of the file at `path` (an audit log).
pub fn line_count(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .unwrap()
        .iter()
        .filter(|c| **c == b'\n')
        .count()
}
