//! The Redis store, shared by any number of broker replicas. redis-rs async with a connection
//! manager (reconnects by itself; bounded connection and response timeouts so that a dead Redis
//! answers `UNAVAILABLE` quickly). Every multi-step change is one Lua script.
//!
//! Keys (`{}` is the hash tag, so that everything of one task stays in one Redis Cluster slot):
//! - `tc:task:{<id>}`: hash `v` (version), `data` (JSON). Updates compare-and-set on `v`.
//! - `tc:idx:tasks`, `tc:idx:executor:<spiffe id>`, `tc:idx:requester:<spiffe id>`: sorted sets
//!   of task ids (score 0, ordered by id, which is creation order). Index entries are written
//!   before the task, so a failure leaves at most an entry that points nowhere; readers skip and
//!   remove such entries. Nothing else is ever half-written.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::{
    Store, StoreError, TaskChange, TaskPage, TaskQuery, UpdateError, decode, encode, unix_ms,
};
use crate::task::{Task, TaskId};

/// Attempts of one compare-and-set update before giving up with [`StoreError::Contention`].
const CAS_ATTEMPTS: usize = 16;
/// Ids read from an index per round trip when listing.
const LIST_BATCH: usize = 64;

const ALL_TASKS: &str = "tc:idx:tasks";

fn task_key(id: &str) -> String {
    format!("tc:task:{{{id}}}")
}

fn executor_key(who: &str) -> String {
    format!("tc:idx:executor:{who}")
}

fn requester_key(who: &str) -> String {
    format!("tc:idx:requester:{who}")
}

/// Creates the task unless its key exists.
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'data', ARGV[1])
return 1";

/// Replaces the task if its version is still ARGV[1]; sets an expiry time when ARGV[4] is given.
const COMPARE_AND_SET: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3])
if ARGV[4] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[4]) end
return 1";

fn unavailable(e: &redis::RedisError) -> StoreError {
    // The error text names the server and failure, never the URL's password.
    StoreError::Unavailable(format!("redis: {e}"))
}

/// The Redis store. Connects on first use, so a broker starts while Redis is down and answers
/// `UNAVAILABLE` until it is back.
pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    create: redis::Script,
    cas: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may hold a password: never print it.
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for the Redis at `url` (`redis://` or `rediss://`).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL does not parse.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::Unavailable(format!("redis URL does not parse ({:?})", e.kind()))
        })?;
        Ok(Self {
            client,
            conn: OnceCell::new(),
            create: redis::Script::new(CREATE),
            cas: redis::Script::new(COMPARE_AND_SET),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        self.conn
            .get_or_try_init(|| async {
                self.client
                    .get_connection_manager_with_config(config)
                    .await
                    .map_err(|e| unavailable(&e))
            })
            .await
            .cloned()
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
    ) -> Result<Option<(String, Task)>, StoreError> {
        let (v, data): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(task_key(id))
            .arg("v")
            .arg("data")
            .query_async(conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match (v, data) {
            (Some(v), Some(data)) => Ok(Some((v, decode(&data)?))),
            _ => Ok(None),
        }
    }
}

impl RedisStore {
    /// Removes index entries whose task no longer exists (pruned, or a create that failed after
    /// writing its index entries). Best effort: a failure leaves them for the next reader.
    async fn drop_dangling(&self, conn: &mut ConnectionManager, key: &str, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let _: Result<i64, _> = conn.zrem(key, ids).await;
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let id = task.id.to_string();
        let data = encode(task)?;
        // Index entries first: if the create below fails they point nowhere and are skipped.
        redis::pipe()
            .zadd(ALL_TASKS, &id, 0)
            .ignore()
            .zadd(executor_key(task.executor.as_str()), &id, 0)
            .ignore()
            .zadd(requester_key(task.requester.as_str()), &id, 0)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let created: i64 = self
            .create
            .key(task_key(&id))
            .arg(data)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::Exists(task.id))
        }
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(self.read(&mut conn, &id.to_string()).await?.map(|(_, t)| t))
    }

    async fn update_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<Task, UpdateError> {
        let mut conn = self.conn().await?;
        let key = id.to_string();
        for _ in 0..CAS_ATTEMPTS {
            let Some((version, current)) = self.read(&mut conn, &key).await? else {
                return Err(UpdateError::NotFound);
            };
            let mut next = current.clone();
            change(&mut next)?;
            let next_version = version
                .parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("task {key}: bad version")))?
                + 1;
            let expire_at = match (current.ended_at, next.ended_at) {
                (None, Some(ended)) => unix_ms(ended + retention).to_string(),
                _ => String::new(),
            };
            let applied: i64 = self
                .cas
                .key(task_key(&key))
                .arg(&version)
                .arg(next_version)
                .arg(encode(&next)?)
                .arg(expire_at)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            match applied {
                1 => return Ok(next),
                -1 => return Err(UpdateError::NotFound),
                _ => continue, // another writer changed it: apply the change to its version
            }
        }
        Err(StoreError::Contention(*id).into())
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let mut conn = self.conn().await?;
        let index = match (&query.executor, &query.requester) {
            (Some(e), _) => executor_key(e.as_str()),
            (None, Some(r)) => requester_key(r.as_str()),
            (None, None) => ALL_TASKS.to_owned(),
        };
        let mut page = TaskPage::default();
        let mut upper = query
            .before
            .map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let mut scanned = 0usize;
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&index)
                .arg(&upper)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(LIST_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            if ids.is_empty() {
                return Ok(page);
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hget(task_key(id), "data");
            }
            let data: Vec<Option<Vec<u8>>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            let mut dangling = Vec::new();
            for (id, data) in ids.iter().zip(data) {
                if page.tasks.len() >= query.limit || scanned >= query.max_scan {
                    // Continue after the last id examined.
                    page.next = TaskId::parse(upper.trim_start_matches('(')).ok();
                    self.drop_dangling(&mut conn, &index, &dangling).await;
                    return Ok(page);
                }
                scanned += 1;
                upper = format!("({id}");
                match data {
                    Some(d) => {
                        let task = decode(&d)?;
                        if query.matches(&task) {
                            page.tasks.push(task);
                        }
                    }
                    None => dangling.push(id.clone()),
                }
            }
            self.drop_dangling(&mut conn, &index, &dangling).await;
            if ids.len() < LIST_BATCH {
                return Ok(page);
            }
        }
    }

    async fn prune_ended(&self, _ended_before: SystemTime) -> Result<usize, StoreError> {
        // Redis expires ended tasks itself (PEXPIREAT set when they end); readers drop the index
        // entries left behind.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }
}
