//! The audit log's second sink: a Redis stream that every replica appends to, one ordered,
//! hash-chained log for the whole deployment (`audit.redis_stream`). Each replica's file stays
//! the record it answers for (`audit.required` applies to it); the stream is written behind it,
//! from a bounded queue, and catches up after Redis returns. Lines are chained across replicas:
//! a Lua script appends a batch only if the stream's head is still the hash the batch was chained
//! to, so that `taskcred audit export | taskcred audit verify -` checks the shared log.

use std::time::Duration;

use crate::store::redis::Topology;
use crate::store::redis::link::{Link, Links};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{AUDIT_WRITE_FAILURES, GENESIS};

/// The stream's key; a hash tag keeps it and [`HEAD`] in one Redis Cluster slot.
pub const STREAM: &str = "tc:{audit}";
/// The hash of the stream's last line.
pub const HEAD: &str = "tc:{audit}:head";
/// Events waiting for the stream, at most; more are dropped and counted.
pub const QUEUE: usize = 100_000;
/// Lines appended by one script call, at most.
const BATCH: usize = 256;
/// How long a stopping broker tries to write what is queued.
const DRAIN: Duration = Duration::from_secs(5);

/// KEYS: stream, head, this writer's last applied batch. ARGV: the head the batch is chained to,
/// the stream's approximate maximum length (0: unbounded), the batch's last hash, the genesis
/// hash, the batch's sequence number, then the lines. Appends the lines and moves the head, or,
/// when another replica moved it first, returns the head to chain to; a batch applied already
/// (its answer was lost, a timeout or a reconnect) is not appended twice.
const APPEND: &str = r"
local head = redis.call('GET', KEYS[2]) or ARGV[4]
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[5]) then return {2, head} end
if head ~= ARGV[1] then return {0, head} end
for i = 6, #ARGV do
  if ARGV[2] == '0' then
    redis.call('XADD', KEYS[1], '*', 'line', ARGV[i])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'line', ARGV[i])
  end
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[5], 'EX', 86400)
return {1, ARGV[3]}
";

/// The queue's sending end, held by the [`super::AuditLog`]: events serialized without `prev`.
pub type StreamQueue = mpsc::Sender<Vec<u8>>;

/// Appends `event` (a JSON object, without `prev`) with `prev` set.
pub(super) fn chain(mut event: Vec<u8>, prev: &str) -> Vec<u8> {
    event.pop();
    event.extend_from_slice(b",\"prev\":\"");
    event.extend_from_slice(prev.as_bytes());
    event.extend_from_slice(b"\"}");
    event
}

/// Counts every failed or dropped stream write; logs at most one a second (a long Redis outage
/// with a full queue would otherwise log every event).
pub(super) fn failed(error: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_SECS: AtomicU64 = AtomicU64::new(0);
    metrics::counter!(AUDIT_WRITE_FAILURES, "sink" => "redis").increment(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_LOG_SECS.swap(now, Ordering::Relaxed) != now {
        tracing::error!(
            error,
            "audit stream write failed (counted in taskcred_audit_write_failures_total{{sink=\"redis\"}})"
        );
    }
}

/// Writes queued events to the stream until `shutdown`, then for at most a few seconds more.
pub struct StreamWriter {
    links: Links,
    rx: mpsc::Receiver<Vec<u8>>,
    max_len: u64,
    /// This process's key for its last applied batch (`tc:{audit}:writer:<random id>`).
    writer_key: String,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's connection info may hold a password.
        f.debug_struct("StreamWriter").finish_non_exhaustive()
    }
}

impl StreamWriter {
    /// A writer to the Redis of `topology` (one server, Sentinel or a Cluster: the stream's
    /// keys share one slot) and the queue that feeds it.
    ///
    /// # Errors
    /// When a URL does not parse (the error names its kind, never the URL).
    pub fn new(topology: &Topology, max_len: u64) -> Result<(Self, StreamQueue), String> {
        let links = Links::new(topology, crate::store::redis::Durability::Async)
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(QUEUE);
        Ok((
            Self {
                links,
                rx,
                max_len,
                writer_key: format!("tc:{{audit}}:writer:{}", uuid::Uuid::now_v7().simple()),
            },
            tx,
        ))
    }

    /// Runs until `shutdown` is cancelled and the queue is written (or [`DRAIN`] has passed).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let script = redis::Script::new(APPEND);
        let mut conn: Option<Link> = None;
        let mut head = GENESIS.to_owned();
        // Batches this writer has applied: the next one is `seq + 1`.
        let mut seq = 0u64;
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
        let mut backoff = Duration::from_millis(200);
        let mut stopping: Option<tokio::time::Instant> = None;
        loop {
            if batch.is_empty() {
                let got = tokio::select! {
                    n = self.rx.recv_many(&mut batch, BATCH) => n,
                    () = shutdown.cancelled(), if stopping.is_none() => {
                        stopping = Some(tokio::time::Instant::now() + DRAIN);
                        self.rx.close();
                        continue;
                    }
                };
                if got == 0 {
                    return;
                }
            }
            if stopping.is_some_and(|until| tokio::time::Instant::now() > until) {
                for _ in 0..batch.len() + self.rx.len() {
                    failed("the broker stopped before Redis took the line");
                }
                return;
            }
            match self
                .append(&script, &mut conn, &mut head, &batch, seq + 1)
                .await
            {
                Ok(()) => {
                    seq += 1;
                    batch.clear();
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    metrics::counter!(AUDIT_WRITE_FAILURES, "sink" => "redis").increment(1);
                    tracing::warn!(error = %e, queued = batch.len() + self.rx.len(),
                        "audit stream unavailable; retrying");
                    conn = None;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled(), if stopping.is_none() => {
                            stopping = Some(tokio::time::Instant::now() + DRAIN);
                            self.rx.close();
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Appends `batch` chained to the stream's head, re-chaining when another replica wrote first.
    async fn append(
        &self,
        script: &redis::Script,
        conn: &mut Option<Link>,
        head: &mut String,
        batch: &[Vec<u8>],
        seq: u64,
    ) -> redis::RedisResult<()> {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(self.links.get().await.map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Io, "audit stream", e.to_string()))
            })?),
        };
        // Each try reads the head another replica left; contention ends as soon as one batch
        // lands, so a few tries suffice.
        for _ in 0..64 {
            let mut prev = head.clone();
            let mut lines = Vec::with_capacity(batch.len());
            for event in batch {
                let line = chain(event.clone(), &prev);
                prev = crate::mint::sha256_hex(&line);
                lines.push(line);
            }
            let mut call = script.prepare_invoke();
            call.key(STREAM)
                .key(HEAD)
                .key(&self.writer_key)
                .arg(head.as_str())
                .arg(self.max_len)
                .arg(prev.as_str())
                .arg(GENESIS)
                .arg(seq);
            for line in &lines {
                call.arg(line.as_slice());
            }
            let (done, now): (i64, String) = call.invoke_async(c).await?;
            *head = now;
            if done != 0 {
                return Ok(());
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "the audit stream's head kept moving",
        )))
    }
}

/// Reads the whole stream in the Redis of `topology`, oldest first, calling `line` with each
/// line.
///
/// # Errors
/// When Redis cannot be reached or an entry has no `line` field.
pub async fn export(
    topology: &Topology,
    mut line: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<u64, String> {
    let links =
        Links::new(topology, crate::store::redis::Durability::Async).map_err(|e| e.to_string())?;
    let mut conn = links.get().await.map_err(|e| e.to_string())?;
    let mut after = "-".to_owned();
    let mut n = 0u64;
    loop {
        // Each entry: its id and its field-value pairs, flat.
        let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg(&after)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        if reply.is_empty() {
            return Ok(n);
        }
        for (id, fields) in &reply {
            let value = fields
                .chunks_exact(2)
                .find(|kv| kv[0] == b"line")
                .map(|kv| kv[1].as_slice());
            let Some(bytes) = value else {
                return Err(format!("stream entry {id} has no line"));
            };
            line(bytes).map_err(|e| e.to_string())?;
            n += 1;
            after = format!("({id}");
        }
    }
}
