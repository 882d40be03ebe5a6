//! What the bench runs against: a scratch `redis-server` from `PATH` (free port, its own data
//! dir, AOF on as deploy/redis/redis.conf asks) and brokers run as child processes of this very
//! binary (`serve --dev` over a dev PKI in a scratch dir), so that the broker's CPU and memory
//! are its own and can be read from /proc. Both are killed when dropped.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tonic::transport::Channel;

use crate::client::{ClientArgs, connect};

/// A port free now on loopback.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// `INFO memory`.
async fn memory_info(c: &mut MultiplexedConnection) -> Result<String, String> {
    redis::cmd("INFO")
        .arg("memory")
        .query_async(c)
        .await
        .map_err(|e| e.to_string())
}

/// A scratch Redis.
#[derive(Debug)]
pub struct RedisProcess {
    child: Child,
    /// `redis://127.0.0.1:PORT/0`.
    pub url: String,
}

impl RedisProcess {
    /// Starts `redis-server` with its data in `dir`; waits until it answers.
    ///
    /// # Errors
    /// When `redis-server` is not on `PATH` or does not come up within 10 s.
    pub fn start(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        let redis = Self {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        };
        let client = redis::Client::open(redis.url.as_str()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = client
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return Ok(redis);
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection to it.
    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        redis::Client::open(self.url.as_str())
            .map_err(|e| e.to_string())?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())
    }

    /// Empties it (it is the bench's own scratch Redis).
    ///
    /// # Errors
    /// When Redis does not answer.
    pub async fn flush(&self) -> Result<(), String> {
        let mut c = self.connection().await?;
        // Freed in the background (a synchronous flush of the load runs' keys outlasts the
        // client's response timeout); wait until it is done, so memory figures start clean.
        redis::cmd("FLUSHALL")
            .arg("ASYNC")
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = memory_info(&mut c).await?;
            let pending = info
                .lines()
                .find_map(|l| l.strip_prefix("lazyfree_pending_objects:"))
                .map_or("0", str::trim);
            if pending == "0" || Instant::now() > deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `CONFIG SET key value` on the server.
    ///
    /// # Errors
    /// When Redis does not take it.
    pub async fn config_set(&self, key: &str, value: &str) -> Result<(), String> {
        let mut c = self.connection().await?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    /// `used_memory` of `INFO memory`, in bytes.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub async fn used_memory(&self) -> Result<u64, String> {
        let mut c = self.connection().await?;
        memory_info(&mut c)
            .await?
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "INFO memory has no used_memory".into())
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A broker child process.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Child,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its HTTP address.
    pub http: SocketAddr,
    dev_dir: PathBuf,
}

impl BrokerProcess {
    /// Runs `taskcred serve --dev` over `dev_dir` with `env` on top; waits for its banner.
    ///
    /// # Errors
    /// When it cannot be started or exits before its banner (its stderr is in the error).
    pub fn start(dev_dir: &Path, env: &[(String, String)]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("--dev-dir")
            .arg(dev_dir)
            .args(["serve", "--dev", "--grpc-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0"])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the broker: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (err_tx, err_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                // Warnings and errors of the broker stay visible.
                eprintln!("  broker: {line}");
                let _ = err_tx.send(line);
            }
        });
        let mut lines = std::io::BufReader::new(stdout).lines();
        let (mut grpc, mut http) = (None, None);
        while grpc.is_none() || http.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                let err: Vec<String> = err_rx.try_iter().collect();
                return Err(format!("the broker exited: {}", err.join("; ")));
            };
            if let Some(a) = line.trim().strip_prefix("gRPC (mTLS): ") {
                grpc = a.trim().parse().ok();
            }
            if let Some(a) = line.trim().strip_prefix("HTTP:") {
                let a = a.trim().trim_start_matches("http://");
                http = a.split_whitespace().next().and_then(|a| a.parse().ok());
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Self {
            child,
            grpc: grpc.ok_or("no gRPC address")?,
            http: http.ok_or("no HTTP address")?,
            dev_dir: dev_dir.to_owned(),
        })
    }

    /// A channel as dev identity `name`, or with no client certificate.
    ///
    /// # Errors
    /// When the connection or handshake fails.
    pub async fn channel(&self, name: Option<&str>) -> Result<Channel, String> {
        channel(self.grpc, &self.dev_dir, name).await
    }

    /// The dev PKI it serves.
    pub fn dev_dir(&self) -> &Path {
        &self.dev_dir
    }

    /// Its resident memory, from /proc.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time it has used (all threads, user + system), from /proc.
    pub fn cpu_seconds(&self) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)]
        super::cost::cpu_ns(self.pid()).map(|ns| ns as f64 / 1e9)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A channel to the broker at `grpc` as dev identity `name` (or none) of `dev_dir`.
///
/// # Errors
/// When the connection or handshake fails.
pub async fn channel(
    grpc: SocketAddr,
    dev_dir: &Path,
    name: Option<&str>,
) -> Result<Channel, String> {
    let args = ClientArgs {
        broker: format!("https://{grpc}"),
        ca: None,
        cert: None,
        key: None,
        as_name: name.map(str::to_owned),
        dev_dir: dev_dir.to_owned(),
        json: false,
    };
    connect(&args).await.map_err(|e| format!("{e:?}"))
}
