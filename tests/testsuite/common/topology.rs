//! Real local Redis topologies for the tests of a store that must outlive a node: a Redis
//! Cluster of three masters with one replica each ([`RedisCluster`]), and a primary with one
//! replica watched by three sentinels ([`RedisSentinel`]).
//!
//! Each topology owns its `redis-server` processes (from PATH, on free loopback ports) and one
//! temporary directory with a data directory per process (AOF on, fsync always, so a killed node
//! starts again with what it acknowledged, and its log). A process is killed (SIGKILL) when its
//! topology is dropped, before the directory goes. Admin work (creating the cluster, reading who
//! is master) goes through `redis-cli`, independent of the crate under test. Every call blocks
//! (a few seconds at most for the waits), panicking with what it saw when a bound is passed.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a topology may take to start, or a node to rejoin.
const READY: Duration = Duration::from_secs(20);

/// The hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// Options of every data node: loopback only, AOF fsynced on every write and no snapshots, and
/// a replica's full sync streamed at once (the default waits 5 s for more replicas to join it).
fn data_node_args(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().unwrap();
    [
        "--bind",
        "127.0.0.1",
        "--dir",
        dir,
        "--logfile",
        &format!("{dir}/redis.log"),
        "--daemonize",
        "no",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--repl-diskless-sync-delay",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

/// `n` distinct free loopback ports (all held until each is picked, so none repeats).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// `redis-cli -p PORT ARGS`: its stdout (raw, as redis-cli prints when not on a terminal).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    redis_cli_session(port, args, "")
}

/// `redis-cli -p PORT FLAGS` with `commands` (one a line) on its stdin: one connection for all
/// of them, so a `WAIT` counts the writes before it (with `-c` the connection follows a
/// redirection, and the commands after it go to the node that owns the key). Its stdout.
pub fn redis_cli_session(port: u16, flags: &[&str], commands: &str) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(flags)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli must be on PATH (apt-get install redis-tools)");
    let mut stdin = child.stdin.take().unwrap();
    // A command given as arguments makes redis-cli ignore its stdin; it may have closed it.
    let _ = stdin.write_all(commands.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `port` answers `PING` with `PONG`.
fn answers_ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// Polls `probe` every 50 ms until it gives a value; after `timeout`, panics saying `what` was
/// awaited and what the last probe saw.
fn wait_until<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last seen:\n{seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The `field:value` lines of an `INFO` or `CLUSTER INFO` answer.
fn info_fields(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Whether `INFO`-style `text` has `field:value`.
fn has_field(text: &str, field: &str, value: &str) -> bool {
    info_fields(text).get(field).is_some_and(|v| v == value)
}

/// One `redis-server` process (a data node or a sentinel): its port, its own directory, the
/// arguments it always runs with, and the child while it runs. Killed on drop.
struct Process {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Process {
    /// A process on `port` with its own directory `name` under `root`, not started yet.
    fn new(root: &Path, name: &str, port: u16, args: impl FnOnce(&Path) -> Vec<String>) -> Self {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        let args = args(&dir);
        Self {
            port,
            dir,
            args,
            child: None,
        }
    }

    /// Starts it with `extra` arguments after its own, and waits until it answers `PING`.
    fn start(&mut self, extra: &[String]) {
        assert!(self.child.is_none(), "{} is already running", self.port);
        let child = Command::new("redis-server")
            .args(&self.args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (apt-get install redis-server)");
        let child = self.child.insert(child);
        let (port, log) = (self.port, self.dir.join("redis.log"));
        wait_until(
            Duration::from_secs(10),
            &format!("redis-server on {port} starting"),
            || {
                if let Some(status) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("redis-server on {port} exited ({status}):\n{log}");
                }
                answers_ping(port)
                    .then_some(())
                    .ok_or_else(|| "no PONG".to_owned())
            },
        );
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills it at once (SIGKILL); its directory stays.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A line of `CLUSTER NODES`: a node as one node sees it.
struct ClusterNode {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The id of its master when it is a replica.
    master: Option<String>,
    /// The slot ranges it serves, both ends included.
    slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// A master with slots that nobody has marked failed (a `fail?` suspicion still counts).
    fn serving_master(&self) -> bool {
        self.has_flag("master") && !self.has_flag("fail") && !self.slots.is_empty()
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum()
    }
}

/// The nodes of a `CLUSTER NODES` answer (`<id> <ip:port@bus> <flags> <master> <ping> <pong>
/// <epoch> <link> <slot>...`); slots being migrated (`[...]`) are left out.
fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1]
                .split_once(':')?
                .1
                .split(['@', ','])
                .next()?
                .parse()
                .ok()?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(ClusterNode {
                id: f[0].to_owned(),
                port,
                flags: f[2].split(',').map(String::from).collect(),
                master: (f[3] != "-").then(|| f[3].to_owned()),
                slots,
            })
        })
        .collect()
}

/// A local Redis Cluster: six `redis-server --cluster-enabled yes` nodes, made three masters
/// with one replica each by `redis-cli --cluster create`, failing a master over about 2 s after
/// it is killed (node timeout 1 s; a replica is always eligible, however long it was cut off).
pub struct RedisCluster {
    // Before `_root`: the processes are killed before their directories are removed.
    nodes: Vec<Process>,
    _root: TempDir,
}

impl RedisCluster {
    /// Starts the six nodes, creates the cluster and waits until every node sees every slot
    /// served and every replica is in sync with its master.
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        // A client port and a cluster bus port each (the bus need not be client port + 10000,
        // which may be past 65535 for an ephemeral port).
        let ports = free_ports(12);
        let nodes = ports
            .chunks(2)
            .map(|p| {
                let (port, bus) = (p[0], p[1]);
                Process::new(root.path(), &port.to_string(), port, |dir| {
                    let mut args = data_node_args(dir);
                    args.extend(
                        [
                            "--port",
                            &port.to_string(),
                            "--cluster-enabled",
                            "yes",
                            "--cluster-port",
                            &bus.to_string(),
                            "--cluster-config-file",
                            dir.join("nodes.conf").to_str().unwrap(),
                            "--cluster-node-timeout",
                            "1000",
                            "--cluster-replica-validity-factor",
                            "0",
                        ]
                        .map(String::from),
                    );
                    args
                })
            })
            .collect();
        let mut cluster = Self { nodes, _root: root };
        for n in &mut cluster.nodes {
            n.start(&[]);
        }
        cluster.create();
        wait_until(READY, "the cluster forming", || cluster.formed());
        cluster
    }

    /// `redis-cli --cluster create` over the six nodes, one replica per master.
    fn create(&self) {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Ok once every node says `cluster_state:ok` with all slots served, knows all six nodes,
    /// sees three serving masters and three replicas, and every replica's link is up.
    fn formed(&self) -> Result<(), String> {
        for n in &self.nodes {
            let info = self.cli(n.port, &["CLUSTER", "INFO"]);
            let fields = info_fields(&info);
            let ok = fields.get("cluster_state").is_some_and(|v| v == "ok")
                && fields.get("cluster_slots_ok") == Some(&SLOTS.to_string())
                && fields.get("cluster_known_nodes").is_some_and(|v| v == "6");
            if !ok {
                return Err(format!("{}:\n{info}", n.port));
            }
            let text = self.cli(n.port, &["CLUSTER", "NODES"]);
            let view = parse_cluster_nodes(&text);
            let masters = view.iter().filter(|v| v.serving_master()).count();
            let replicas = view
                .iter()
                .filter(|v| v.has_flag("slave") && v.master.is_some())
                .count();
            if (masters, replicas) != (3, 3) {
                return Err(format!("{}:\n{text}", n.port));
            }
            let me = view.iter().find(|v| v.has_flag("myself"));
            if me.is_some_and(|m| m.has_flag("slave")) {
                let repl = self.cli(n.port, &["INFO", "replication"]);
                if !has_field(&repl, "master_link_status", "up") {
                    return Err(format!("{}:\n{repl}", n.port));
                }
            }
        }
        Ok(())
    }

    /// Seed URLs of every node, `redis://127.0.0.1:PORT/`, the current masters first.
    pub fn urls(&self) -> Vec<String> {
        let masters = self.masters();
        let others = self
            .nodes
            .iter()
            .map(|n| n.port)
            .filter(|p| !masters.contains(p));
        masters
            .iter()
            .copied()
            .chain(others)
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// The ports of the masters serving slots, as the first running node sees them.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view()
            .iter()
            .filter(|n| n.serving_master())
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of the master serving `slot` (as `CLUSTER KEYSLOT` names it).
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.view()
            .iter()
            .find(|n| n.serving_master() && n.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
            .port
    }

    /// The port of a replica of the master on `master_port` that nobody has marked failed.
    pub fn replica_of(&self, master_port: u16) -> u16 {
        let view = self.view();
        let master = view
            .iter()
            .find(|n| n.port == master_port)
            .unwrap_or_else(|| panic!("no node on {master_port}"));
        view.iter()
            .find(|n| n.master.as_ref() == Some(&master.id) && !n.has_flag("fail"))
            .unwrap_or_else(|| panic!("{master_port} has no replica"))
            .port
    }

    /// Kills the node on `port` (SIGKILL); its directory (data, `nodes.conf`) stays.
    pub fn kill(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// Starts the node on `port` again, on the same ports and directory, and waits until it has
    /// rejoined: it says `cluster_state:ok` (in sync if it is a replica, as a master killed and
    /// failed over comes back) and no running node marks it failed.
    pub fn restart(&mut self, port: u16) {
        self.node_mut(port).start(&[]);
        wait_until(READY, &format!("{port} rejoining the cluster"), || {
            let info = self.cli(port, &["CLUSTER", "INFO"]);
            if !has_field(&info, "cluster_state", "ok") {
                return Err(info);
            }
            if self.cli(port, &["ROLE"]).lines().next() == Some("slave") {
                let repl = self.cli(port, &["INFO", "replication"]);
                if !has_field(&repl, "master_link_status", "up") {
                    return Err(repl);
                }
            }
            for n in self.nodes.iter().filter(|n| n.running()) {
                let text = self.cli(n.port, &["CLUSTER", "NODES"]);
                let failed = parse_cluster_nodes(&text)
                    .iter()
                    .any(|v| v.port == port && (v.has_flag("fail") || v.has_flag("fail?")));
                if failed {
                    return Err(format!("{}:\n{text}", n.port));
                }
            }
            Ok(())
        });
    }

    /// Waits until every running node says `cluster_state:ok` and sees every slot served by a
    /// running master (so not by the killed `dead_port`): how long that took. Panics after
    /// `timeout`.
    pub fn wait_for_failover(&self, dead_port: u16, timeout: Duration) -> Duration {
        let started = Instant::now();
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.running() && n.port != dead_port)
            .map(|n| n.port)
            .collect();
        wait_until(timeout, &format!("a failover from {dead_port}"), || {
            for &port in &live {
                let info = self.cli(port, &["CLUSTER", "INFO"]);
                if !has_field(&info, "cluster_state", "ok") {
                    return Err(format!("{port}:\n{info}"));
                }
                let text = self.cli(port, &["CLUSTER", "NODES"]);
                let served: usize = parse_cluster_nodes(&text)
                    .iter()
                    .filter(|n| n.serving_master() && live.contains(&n.port))
                    .map(ClusterNode::slot_count)
                    .sum();
                if served != SLOTS {
                    return Err(format!("{port}:\n{text}"));
                }
            }
            Ok(())
        });
        started.elapsed()
    }

    /// `redis-cli -p PORT ARGS` (add `-c` to follow redirections): its stdout.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        redis_cli(port, args)
    }

    /// `CLUSTER NODES` as the first running node that answers sees it.
    fn view(&self) -> Vec<ClusterNode> {
        self.nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| parse_cluster_nodes(&self.cli(n.port, &["CLUSTER", "NODES"])))
            .find(|v| !v.is_empty())
            .expect("a running node answers CLUSTER NODES")
    }

    fn node_mut(&mut self, port: u16) -> &mut Process {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"))
    }
}

/// The entries of a `SENTINEL replicas|sentinels NAME` answer as redis-cli prints it raw: one
/// line per element, each entry's field/value pairs in a row, starting with `name`.
fn sentinel_entries(text: &str) -> Vec<HashMap<String, String>> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut entries: Vec<HashMap<String, String>> = Vec::new();
    for pair in lines.chunks_exact(2) {
        if pair[0] == "name" {
            entries.push(HashMap::new());
        }
        if let Some(e) = entries.last_mut() {
            e.insert(pair[0].to_owned(), pair[1].to_owned());
        }
    }
    entries
}

/// A local Redis Sentinel setup: a primary and one replica, watched by three sentinels (quorum
/// 2) under the name [`RedisSentinel::MASTER`], failing the primary over about 2-3 s after it is
/// killed (down after 1 s).
pub struct RedisSentinel {
    // Before `_root`: the processes are killed before their directories are removed.
    /// The primary and the replica, in the roles they started in.
    servers: Vec<Process>,
    sentinels: Vec<Process>,
    _root: TempDir,
}

impl RedisSentinel {
    /// The name the sentinels monitor the primary under.
    pub const MASTER: &str = "taskcred";

    /// Starts the primary and its replica, waits until the replica is in sync, then starts the
    /// sentinels and waits until each knows the primary, the replica and the two others.
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let ports = free_ports(5);
        let server = |port: u16| {
            Process::new(root.path(), &port.to_string(), port, |dir| {
                let mut args = data_node_args(dir);
                args.extend(["--port".to_owned(), port.to_string()]);
                args
            })
        };
        let servers = vec![server(ports[0]), server(ports[1])];
        let sentinels = ports[2..]
            .iter()
            .map(|&port| {
                Process::new(root.path(), &format!("sentinel-{port}"), port, |dir| {
                    Self::sentinel_args(dir, port, ports[0])
                })
            })
            .collect();
        let mut s = Self {
            servers,
            sentinels,
            _root: root,
        };
        let (primary, replica) = (ports[0], ports[1]);
        s.servers[0].start(&[]);
        s.servers[1].start(&Self::replica_of(primary));
        wait_until(READY, "the replica syncing", || s.in_sync(primary, replica));
        for sentinel in &mut s.sentinels {
            sentinel.start(&[]);
        }
        wait_until(READY, "the sentinels meeting", || {
            s.sentinels_know(primary, replica)
        });
        s
    }

    /// Writes the config file of the sentinel on `port` (writable: sentinels rewrite it) and
    /// gives the arguments that run it.
    fn sentinel_args(dir: &Path, port: u16, primary: u16) -> Vec<String> {
        let conf = dir.join("sentinel.conf");
        let m = Self::MASTER;
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/redis.log\ndaemonize no\n\
             sentinel monitor {m} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {m} 1000\n\
             sentinel failover-timeout {m} 5000\n\
             sentinel parallel-syncs {m} 1\n",
            dir = dir.display()
        );
        std::fs::write(&conf, text).unwrap();
        vec![conf.to_str().unwrap().to_owned(), "--sentinel".to_owned()]
    }

    fn replica_of(primary: u16) -> Vec<String> {
        vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ]
    }

    /// Ok once `primary` has one connected replica and `replica`'s link to it is up.
    fn in_sync(&self, primary: u16, replica: u16) -> Result<(), String> {
        let p = self.cli(primary, &["INFO", "replication"]);
        let r = self.cli(replica, &["INFO", "replication"]);
        if has_field(&p, "connected_slaves", "1") && has_field(&r, "master_link_status", "up") {
            Ok(())
        } else {
            Err(format!("{primary}:\n{p}\n{replica}:\n{r}"))
        }
    }

    /// Ok once every sentinel names `primary`, lists `replica` and two other sentinels.
    fn sentinels_know(&self, primary: u16, replica: u16) -> Result<(), String> {
        for s in &self.sentinels {
            let master = self.ask(s.port, "get-master-addr-by-name");
            let replicas = self.ask(s.port, "replicas");
            let others = self.ask(s.port, "sentinels");
            let knows = master.lines().nth(1) == Some(&primary.to_string())
                && sentinel_entries(&replicas)
                    .iter()
                    .any(|r| r.get("port") == Some(&replica.to_string()))
                && sentinel_entries(&others).len() == 2;
            if !knows {
                return Err(format!("{}:\n{master}\n{replicas}\n{others}", s.port));
            }
        }
        Ok(())
    }

    /// `SENTINEL <what> taskcred` on the sentinel on `port`.
    fn ask(&self, port: u16, what: &str) -> String {
        self.cli(port, &["SENTINEL", what, Self::MASTER])
    }

    /// The URLs of the three sentinels, `redis://127.0.0.1:PORT/`.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}/", s.port))
            .collect()
    }

    /// The port of the primary, as the first running sentinel names it.
    pub fn primary(&self) -> u16 {
        self.named_primaries()
            .into_iter()
            .flatten()
            .next()
            .expect("a running sentinel names the primary")
    }

    /// What each running sentinel names as the primary's port (`None`: no answer).
    fn named_primaries(&self) -> Vec<Option<u16>> {
        self.sentinels
            .iter()
            .filter(|s| s.running())
            .map(|s| {
                self.ask(s.port, "get-master-addr-by-name")
                    .lines()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Kills the primary (SIGKILL), its directory kept: its port.
    pub fn kill_primary(&mut self) -> u16 {
        let port = self.primary();
        self.process_mut(port).kill();
        port
    }

    /// Waits until every running sentinel names the same primary, not `old`, that runs and
    /// answers `ROLE` as master: how long that took. Panics after `timeout`.
    pub fn wait_for_failover(&self, old: u16, timeout: Duration) -> Duration {
        let started = Instant::now();
        wait_until(timeout, &format!("a failover from {old}"), || {
            let named = self.named_primaries();
            let new = match named.as_slice() {
                [Some(first), rest @ ..] if rest.iter().all(|p| *p == Some(*first)) => *first,
                _ => return Err(format!("the sentinels name {named:?}")),
            };
            let running = self.servers.iter().any(|s| s.port == new && s.running());
            let role = self.cli(new, &["ROLE"]);
            if new == old || !running || role.lines().next() != Some("master") {
                return Err(format!("the sentinels name {new}, whose ROLE is:\n{role}"));
            }
            Ok(())
        });
        started.elapsed()
    }

    /// Starts the server or sentinel on `port` again, on the same port and directory. A server
    /// that is not the primary the sentinels name comes back as its replica (as sentinels would
    /// make it), and this waits until it is in sync and no sentinel sees it down.
    pub fn restart(&mut self, port: u16) {
        if let Some(s) = self.sentinels.iter_mut().find(|s| s.port == port) {
            s.start(&[]);
            return;
        }
        let primary = self.primary();
        let extra = if port == primary {
            Vec::new()
        } else {
            Self::replica_of(primary)
        };
        self.process_mut(port).start(&extra);
        if port == primary {
            return;
        }
        wait_until(READY, &format!("{port} rejoining as a replica"), || {
            self.in_sync(primary, port)?;
            for s in self.sentinels.iter().filter(|s| s.running()) {
                let replicas = self.ask(s.port, "replicas");
                let up = sentinel_entries(&replicas).iter().any(|r| {
                    r.get("port") == Some(&port.to_string())
                        && r.get("flags").is_some_and(|f| f == "slave")
                });
                if !up {
                    return Err(format!("{}:\n{replicas}", s.port));
                }
            }
            Ok(())
        });
    }

    /// `redis-cli -p PORT ARGS`: its stdout.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        redis_cli(port, args)
    }

    fn process_mut(&mut self, port: u16) -> &mut Process {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no server on {port}"))
    }
}
