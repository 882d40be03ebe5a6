//! Tasks, the [`TaskStore`] of the Redis store: creating one with its index entries, reading it
//! (JSON and overlay), the compare-and-set update and the end of a task with its leases, listing
//! by index, and pruning (which Redis does by itself).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::codec::{TASK_FIELDS, TaskFields, TaskRecord, ns_bytes};
use super::keys::{
    ALL_TASKS, bucket_of, creds_key, deadlines_key, executor_key, expiry_key, leases_key, lock_key,
    log_key, open_key, requester_key, task_key,
};
use super::leases::{chunk_leases, parse_agent};
use super::link::Link;
use super::{CAS_ATTEMPTS, RedisStore, unavailable, write_failed};
use crate::lease::Lease;
use crate::store::{
    CASCADE_GRACE, Revision, StoreError, TaskChange, TaskPage, TaskQuery, TaskStore, UpdateError,
    VersionedTask, encode, task_ended_reason, unix_ms, unix_ms_ceil,
};
use crate::task::{Task, TaskError, TaskId, Unmet};

/// How long after a task's end it is filed due when its leases are not all revoked yet in the
/// first step: the ender goes on meanwhile; past this any replica's reaper finishes the end
/// (chunks are atomic and revoke only active leases, so two finishing at once log each lease
/// once). Short: until its lease is revoked and logged, a verifier that follows only the
/// revocation log or the CRL does not hear of it (introspection refuses it from the first step).
const UNFINISHED_END_GRACE: Duration = Duration::from_secs(1);

/// Ids read from an index per round trip when listing.
const LIST_BATCH: usize = 64;

/// Leases one script of a task's end revokes at most: each script stays well under 50 ms (a
/// revocation is a record rewrite, an index removal and a log entry, a few microseconds).
const END_CHUNK: usize = 1_000;

/// How long after its enrolment among its executor's open tasks a task may still be written
/// (`create.lua`); well inside [`MARK_TTL`](super::locks::MARK_TTL).
const CREATE_WITHIN: Duration = Duration::from_secs(60);

#[async_trait]
impl TaskStore for RedisStore {
    /// The index entries, then the task among its executor's open tasks (refused when the
    /// executor is locked), then the task itself: in that order, a lock taken at any point
    /// either refuses the task or marks it (see `locks.rs`).
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let id = task.id.to_string();
        let data = encode(task)?;
        // Index entries first (each its own slot): if the create below fails they point nowhere
        // and are skipped.
        futures_util::future::try_join_all(
            [
                ALL_TASKS.to_owned(),
                executor_key(task.executor.as_str()),
                requester_key(task.requester.as_str()),
            ]
            .map(|index| {
                let (mut conn, id) = (conn.clone(), &id);
                async move { conn.zadd::<_, _, _, ()>(index, id, 0).await }
            }),
        )
        .await
        .map_err(|e| unavailable(&e))?;
        let enrolled: Vec<String> = self
            .scripts
            .enrol
            .key(lock_key(&task.executor))
            .key(open_key(task.executor.as_str()))
            .arg(&id)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        let enrolled_ms = match enrolled.as_slice() {
            [ok, ms] if ok == "ok" => {
                // The lock's argument rests on this entry (locks.rs): it must survive a
                // failover as the task does.
                self.settle(&mut conn, &open_key(task.executor.as_str()))
                    .await?;
                ms.clone()
            }
            [locked, lock] if locked == "locked" => {
                return Err(StoreError::Locked(super::locks::reason_of(lock)));
            }
            _ => return Err(StoreError::Corrupt("task enrolment: bad answer".into())),
        };
        let created: i64 = self
            .scripts
            .create
            .key(task_key(&id))
            .key(deadlines_key(bucket_of(&id)))
            .arg(data)
            .arg(&id)
            .arg(task.executor.as_str())
            .arg(unix_ms_ceil(task.deadline))
            .arg(enrolled_ms)
            .arg(u64::try_from(CREATE_WITHIN.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        match created {
            1 => self.settle(&mut conn, &task_key(&id)).await,
            0 => Err(StoreError::Exists(task.id)),
            -2 => Err(StoreError::Locked(
                self.lock_reason(&mut conn, &task.executor).await,
            )),
            _ => Err(StoreError::Unavailable(format!(
                "task {id}: written too long after it was filed; retry"
            ))),
        }
    }

    async fn get_versioned_task(&self, id: &TaskId) -> Result<Option<VersionedTask>, StoreError> {
        let mut conn = self.conn().await?;
        self.read(&mut conn, &id.to_string()).await
    }

    /// The change applied to the task as read, written if nobody changed it since; else read
    /// again, up to `CAS_ATTEMPTS` times.
    async fn update_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<Task, UpdateError> {
        let mut conn = self.conn().await?;
        let key = id.to_string();
        for _ in 0..CAS_ATTEMPTS {
            let Changed {
                version,
                current,
                next,
            } = self.changed(&mut conn, &key, &change).await?;
            let expire_at = match (current.ended_at, next.ended_at) {
                (None, Some(ended)) => unix_ms(ended + retention).to_string(),
                _ => String::new(),
            };
            let ended = next.ended_at.unwrap_or(next.updated_at);
            let applied: i64 = self
                .scripts
                .cas
                .key(task_key(&key))
                .key(leases_key(&key))
                .key(creds_key(&key))
                .arg(&version)
                .arg(next_version(&key, &version)?)
                .arg(encode(&next)?)
                .arg(expire_at)
                .arg(if next.state.is_terminal() { "1" } else { "" })
                .arg(&key)
                .arg(&ns_bytes(ended)[..])
                .arg(unix_ms(ended))
                .arg(task_ended_reason(&next))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            match applied {
                1 => {
                    self.settle(&mut conn, &task_key(&key)).await?;
                    if next.state.is_terminal() && !current.state.is_terminal() {
                        self.leave_open(&mut conn, &next).await;
                    }
                    return Ok(next);
                }
                -1 => return Err(UpdateError::NotFound),
                _ => continue, // another writer changed it: apply the change to its version
            }
        }
        Err(StoreError::Contention(*id).into())
    }

    /// The change, which must end the task, and the first chunk of the revocation of its
    /// active leases in one script (retried like `update_task`); then the other chunks, one
    /// script each, until none is left. From the first script on every lease of the task reads
    /// as ended. A task already ended whose chunks a dead or failed ender left is finished
    /// first, whatever the change says (a repeated end continues what is left).
    async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<(Task, Vec<Lease>), UpdateError> {
        let mut conn = self.conn().await?;
        let key = id.to_string();
        let bucket = bucket_of(&key);
        for _ in 0..CAS_ATTEMPTS {
            let step = match self.changed(&mut conn, &key, &change).await {
                Ok(step) => step,
                Err(UpdateError::Rejected(refused)) => {
                    // Ended already: finish what its end left, then say no.
                    if let Some(VersionedTask { task, .. }) = self.read(&mut conn, &key).await?
                        && task.state.is_terminal()
                    {
                        self.finish_end(&mut conn, id).await?;
                        self.leave_open(&mut conn, &task).await;
                    }
                    return Err(UpdateError::Rejected(refused));
                }
                Err(e) => return Err(e),
            };
            let (version, current, next) = (step.version, step.current, step.next);
            let Some(ended) = next.ended_at.filter(|_| next.state.is_terminal()) else {
                return Err(TaskError::Precondition(Unmet::NotAnEnd).into());
            };
            let expire_at = if current.ended_at.is_none() {
                unix_ms(ended + retention).to_string()
            } else {
                String::new()
            };
            let outcome: Vec<Vec<u8>> = self
                .scripts
                .end_task
                .key(task_key(&key))
                .key(leases_key(&key))
                .key(creds_key(&key))
                .key(expiry_key(bucket))
                .key(log_key(bucket))
                .key(deadlines_key(bucket))
                .arg(&version)
                .arg(next_version(&key, &version)?)
                .arg(encode(&next)?)
                .arg(expire_at)
                .arg(&ns_bytes(ended)[..])
                .arg(unix_ms(ended))
                .arg(task_ended_reason(&next))
                .arg(&key)
                .arg(if next.children.is_empty() || current.ended_at.is_some() {
                    String::new()
                } else {
                    unix_ms(ended + CASCADE_GRACE).to_string()
                })
                .arg(END_CHUNK)
                .arg(current.executor.as_str())
                .arg(unix_ms(ended + UNFINISHED_END_GRACE))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            let (done, pairs) = match outcome.split_first() {
                Some((status, rest)) if status.as_slice() == b"ok" => match rest.split_first() {
                    Some((done, pairs)) => (done.as_slice() == b"1", pairs),
                    None => {
                        return Err(StoreError::Corrupt("end of task: short answer".into()).into());
                    }
                },
                Some((status, _)) if status.as_slice() == b"missing" => {
                    return Err(UpdateError::NotFound);
                }
                _ => continue, // the task changed since it was read: apply the change again
            };
            let mut revoked = chunk_leases(*id, &current.executor, pairs)?;
            self.settle(&mut conn, &task_key(&key)).await?;
            self.leave_open(&mut conn, &next).await;
            if !done {
                // The task has ended, its leases with it, and it is filed due again: a chunk
                // that fails leaves the rest to the reaper (their records, index entries and
                // log entries). The end stands, so the answer is the end with what was revoked.
                match self.finish_end(&mut conn, id).await {
                    Ok(rest) => revoked.extend(rest),
                    Err(e) => tracing::warn!(
                        task = %id,
                        revoked = revoked.len(),
                        error = %e,
                        "the task ended; the reaper revokes the rest of its leases"
                    ),
                }
            }
            return Ok((next, revoked));
        }
        Err(StoreError::Contention(*id).into())
    }

    /// Walks the index the query names, newest first, `LIST_BATCH` ids per round trip.
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
            // One HMGET per task (tasks are in different slots), all in flight at once.
            let data: Vec<TaskFields> = futures_util::future::try_join_all(ids.iter().map(|id| {
                let mut conn = conn.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(task_key(id))
                        .arg(&TASK_FIELDS)
                        .query_async::<TaskFields>(&mut conn)
                        .await
                }
            }))
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
                match data.into_task()? {
                    Some(task) => {
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
}

impl RedisStore {
    /// Reads a task and its version; `None` when it does not exist.
    pub(super) async fn read(
        &self,
        conn: &mut Link,
        id: &str,
    ) -> Result<Option<VersionedTask>, StoreError> {
        let TaskRecord { version, fields }: TaskRecord = redis::cmd("HMGET")
            .arg(task_key(id))
            .arg("v")
            .arg(&TASK_FIELDS)
            .query_async(conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let Some(version) = version else {
            return Ok(None);
        };
        let revision = version
            .parse()
            .map(Revision)
            .map_err(|_| StoreError::Corrupt(format!("task {id}: bad version")))?;
        Ok(fields
            .into_task()?
            .map(|task| VersionedTask { task, revision }))
    }

    /// Takes an ended task out of its executor's open tasks (another slot than the task's, so
    /// after the end). Best effort: a member left behind is an ended task, which a lock's sweep
    /// skips and drops.
    async fn leave_open(&self, conn: &mut Link, task: &Task) {
        let _: Result<i64, _> = conn
            .srem(open_key(task.executor.as_str()), task.id.to_string())
            .await;
    }

    /// Removes index entries whose task no longer exists (pruned, or a create that failed after
    /// writing its index entries). Best effort: a failure leaves them for the next reader.
    async fn drop_dangling(&self, conn: &mut Link, key: &str, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let _: Result<i64, _> = conn.zrem(key, ids).await;
    }
}

/// A task as read, with its version, and the change applied to a copy: what one
/// compare-and-set attempt writes.
struct Changed {
    version: String,
    current: Task,
    next: Task,
}

impl RedisStore {
    /// Reads task `key` and applies `change` to a copy (the first half of every
    /// compare-and-set attempt of `update_task` and `end_task`).
    async fn changed(
        &self,
        conn: &mut Link,
        key: &str,
        change: &TaskChange,
    ) -> Result<Changed, UpdateError> {
        let Some(VersionedTask {
            task: current,
            revision,
        }) = self.read(conn, key).await?
        else {
            return Err(UpdateError::NotFound);
        };
        let version = revision.0.to_string();
        let mut next = current.clone();
        change(&mut next)?;
        Ok(Changed {
            version,
            current,
            next,
        })
    }
}

impl RedisStore {
    /// Revokes what is left of an ended task's leases, [`END_CHUNK`] per script; returns them.
    async fn finish_end(&self, conn: &mut Link, id: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let key = id.to_string();
        let bucket = bucket_of(&key);
        let mut revoked = Vec::new();
        loop {
            let outcome: Vec<Vec<u8>> = self
                .scripts
                .end_chunk
                .key(task_key(&key))
                .key(leases_key(&key))
                .key(expiry_key(bucket))
                .key(log_key(bucket))
                .arg(&key)
                .arg(END_CHUNK)
                .invoke_async(conn)
                .await
                .map_err(|e| write_failed(&e))?;
            let [done, agent, pairs @ ..] = outcome.as_slice() else {
                return Err(StoreError::Corrupt(
                    "end of task chunk: short answer".into(),
                ));
            };
            if !pairs.is_empty() {
                self.settle(conn, &task_key(&key)).await?;
                let agent = std::str::from_utf8(agent)
                    .map_err(|_| StoreError::Corrupt("end of task chunk: executor".into()))?;
                revoked.extend(chunk_leases(*id, &parse_agent(agent)?, pairs)?);
            }
            if done.as_slice() == b"1" {
                return Ok(revoked);
            }
        }
    }
}

/// The version a compare-and-set writes after `version` of task `key`.
fn next_version(key: &str, version: &str) -> Result<u64, StoreError> {
    version
        .parse::<u64>()
        .map(|v| v + 1)
        .map_err(|_| StoreError::Corrupt(format!("task {key}: bad version")))
}
