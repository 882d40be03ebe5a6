//! Agent locks, the [`LockStore`] of the Redis store: writing a lock (locks only grow) and
//! copying it into the agent's tasks, the bounded sweep that ends what a locked agent holds,
//! lifting a lock, and reading the locks in force.
//!
//! The lock and the agent's open tasks live in the agent's slot, its tasks in their buckets'
//! slots: no script can read both. Why "nothing is issued or renewed after `lock_agent`
//! returns" holds all the same, on one server and on a Cluster:
//! 1. A task is filed among its executor's open tasks (`enrol.lua`, in the agent's slot, which
//!    refuses when the lock key exists) before it is written (`create.lua`), and leaves them only
//!    for the tasks being swept (`sweep_take.lua`, one script: never in neither set) or once it
//!    has ended.
//! 2. `lock_agent` writes the lock key first, then scans the open tasks and then the tasks
//!    being swept, and marks every task it finds (`mark.lua`: the lock's end copied into the
//!    task's hash, `lk`), and only then returns. A task enrolled before the lock key was written
//!    is, during the whole scan, in the open tasks, or in the swept ones from before their scan
//!    began until it has ended (it moves only from open to swept, and the open ones are scanned
//!    first): a scan returns every member present throughout it, so the task is marked or has
//!    ended. A task enrolled after is refused.
//! 3. Issuance and renewal check the mark in their own script, with the task's revision and
//!    end; a mark on a task not written yet makes its create refuse (`create.lua`, which also
//!    refuses a create later than `CREATE_WITHIN`, far inside the mark's life, [`MARK_TTL`]).
//!
//! So every issuance or renewal that runs after `lock_agent` returned finds the task ended,
//! marked, or missing. Introspection reads the lock key itself. The sweep then ends the tasks
//! and revokes their leases in bounded steps.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::codec::ns_bytes;
use super::keys::{
    LOCKS, bucket_of, creds_key, deadlines_key, expiry_key, leases_key, lock_key, lock_key_of,
    log_key, open_key, sweep_key, task_key,
};
use super::leases::chunk_leases;
use super::link::Link;
use super::{RedisStore, unavailable, write_failed};
use crate::identity::WorkloadId;
use crate::lease::{Lock, Swept};
use crate::store::{LockStore, LockSweep, StoreError, unix_ms};
use crate::task::TaskId;

/// How long a lock's mark on a task not written yet lives (`mark.lua`).
pub(super) const MARK_TTL: Duration = Duration::from_secs(600);

/// Set members read per `SSCAN`, and tasks marked per script.
const MARK_BATCH: usize = 1_000;

#[async_trait]
impl LockStore for RedisStore {
    /// The lock key, then the mark on every open or swept task of the agent (see the module
    /// docs); the lock in force comes back.
    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError> {
        let mut conn = self.conn().await?;
        let agent = lock.agent.as_str();
        let json = serde_json::to_vec(lock)
            .map_err(|e| StoreError::Corrupt(format!("encoding lock: {e}")))?;
        // Listed before it exists: a reader drops a member without a lock.
        conn.sadd::<_, _, i64>(LOCKS, agent)
            .await
            .map_err(|e| write_failed(&e))?;
        // What the reaper finds unfinished sweeps by: it must survive a failover as the lock.
        self.settle(&mut conn, LOCKS).await?;
        let in_force: String = self
            .scripts
            .lock
            .key(lock_key(&lock.agent))
            .arg(json)
            .arg(unix_ms(lock.at))
            .arg(
                lock.until
                    .map(|u| unix_ms(u).to_string())
                    .unwrap_or_default(),
            )
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        self.settle(&mut conn, &lock_key(&lock.agent)).await?;
        let in_force: Lock = serde_json::from_str(&in_force)
            .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
        let end = in_force
            .until
            .map_or_else(|| "0".to_owned(), |u| unix_ms(u).max(1).to_string());
        for set in [open_key(agent), sweep_key(agent)] {
            self.mark_members(&mut conn, &set, &end).await?;
        }
        Ok(in_force)
    }

    /// One bounded step: up to `limit` tasks taken from the open ones (agent's slot), then
    /// ended and their leases revoked bucket by bucket, at most `limit` leases in all, whatever
    /// one task holds.
    async fn sweep_lock(&self, step: &LockSweep<'_>) -> Result<Swept, StoreError> {
        let (agent, reason, at) = (step.agent, step.reason, step.at);
        let (retention, limit) = (step.retention, step.limit.max(1));
        let mut conn = self.conn().await?;
        let taken: Vec<String> = self
            .scripts
            .sweep_take
            .key(open_key(agent.as_str()))
            .key(sweep_key(agent.as_str()))
            .arg(limit)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        let Some((open_left, ids)) = taken.split_first() else {
            return Err(StoreError::Corrupt("lock sweep: empty answer".into()));
        };
        let open_left: usize = open_left
            .parse()
            .map_err(|_| StoreError::Corrupt("lock sweep: remaining".into()))?;
        let mut swept = Swept {
            tasks: Vec::new(),
            leases: Vec::new(),
            remaining: 0,
        };
        let mut finished = Vec::new();
        for (bucket, ids) in by_bucket(ids) {
            let budget = limit.saturating_sub(swept.leases.len());
            let mut call = self.scripts.sweep.prepare_invoke();
            call.key(expiry_key(bucket))
                .key(log_key(bucket))
                .key(deadlines_key(bucket));
            for id in &ids {
                call.key(task_key(id))
                    .key(leases_key(id))
                    .key(creds_key(id));
            }
            call.arg(unix_ms(at))
                .arg(reason)
                .arg(unix_ms(at + retention))
                .arg(budget)
                .arg(unix_ms(at + crate::store::CASCADE_GRACE))
                .arg(&ns_bytes(at)[..])
                .arg(agent.as_str());
            for id in &ids {
                call.arg(id.as_str());
            }
            let outcome: Vec<Vec<u8>> = call
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            self.settle(&mut conn, &expiry_key(bucket)).await?;
            // {ended..., '|', finished..., '|', task, suffix, record, ...}
            let mut parts = outcome.split(|i| i.as_slice() == b"|");
            let (ended, done, leases) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            swept.tasks.extend(task_ids(ended));
            finished.extend(
                done.iter()
                    .filter_map(|t| String::from_utf8(t.clone()).ok()),
            );
            for triple in leases.chunks_exact(3) {
                let task = task_ids(&triple[..1])
                    .next()
                    .ok_or_else(|| StoreError::Corrupt("lock sweep: task id".into()))?;
                swept
                    .leases
                    .extend(chunk_leases(task, agent, &triple[1..])?);
            }
        }
        if !finished.is_empty() {
            conn.srem::<_, _, i64>(sweep_key(agent.as_str()), &finished)
                .await
                .map_err(|e| write_failed(&e))?;
        }
        let sweeping: usize = conn
            .scard(sweep_key(agent.as_str()))
            .await
            .map_err(|e| unavailable(&e))?;
        swept.remaining = open_left + sweeping;
        Ok(swept)
    }

    /// The lock read and deleted in one transaction (`MULTI`), then the agent taken off the
    /// list of locked ones. The marks stay on the tasks the lock marked: those are ended by its
    /// sweep (and a new task of the agent is never marked by it).
    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        let mut conn = self.conn().await?;
        let (lock, _): (Option<Vec<u8>>, i64) = redis::pipe()
            .atomic()
            .get(lock_key(agent))
            .del(lock_key(agent))
            .query_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        let _: Result<i64, _> = conn.srem(LOCKS, agent.as_str()).await;
        lock.map(|l| serde_json::from_slice(&l))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))
    }

    /// The agent's lock, kept if it holds at `now`.
    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError> {
        let mut conn = self.conn().await?;
        let lock: Option<Vec<u8>> = conn
            .get(lock_key(agent))
            .await
            .map_err(|e| unavailable(&e))?;
        let lock = lock
            .map(|l| serde_json::from_slice::<Lock>(&l))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
        Ok(lock.filter(|l| l.holds_at(now)))
    }

    /// The locks that hold at `now`; agents whose lock expired are dropped from `LOCKS`.
    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError> {
        let mut conn = self.conn().await?;
        let agents: Vec<String> = conn.smembers(LOCKS).await.map_err(|e| unavailable(&e))?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for agent in agents {
            let lock: Option<Vec<u8>> = conn
                .get(lock_key_of(&agent))
                .await
                .map_err(|e| unavailable(&e))?;
            match lock {
                Some(l) => {
                    let lock: Lock = serde_json::from_slice(&l)
                        .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
                    if lock.holds_at(now) {
                        out.push(lock);
                    }
                }
                // Lifted by its own expiry.
                None => gone.push(agent),
            }
        }
        if !gone.is_empty() {
            let _: Result<i64, _> = conn.srem(LOCKS, &gone).await;
        }
        Ok(out)
    }
}

impl RedisStore {
    /// The reason of `agent`'s lock, read now (empty when it went meanwhile or cannot be read):
    /// what a refusal because of the lock says.
    pub(super) async fn lock_reason(&self, conn: &mut Link, agent: &WorkloadId) -> String {
        let lock: Option<String> = conn.get(lock_key(agent)).await.unwrap_or(None);
        lock.as_deref().map(reason_of).unwrap_or_default()
    }

    /// Marks every task of set `set` (scanned whole) with the lock's end `end`, bucket by
    /// bucket, [`MARK_BATCH`] tasks per script.
    async fn mark_members(&self, conn: &mut Link, set: &str, end: &str) -> Result<(), StoreError> {
        let mut cursor = 0u64;
        loop {
            let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(set)
                .arg(cursor)
                .arg("COUNT")
                .arg(MARK_BATCH)
                .query_async(conn)
                .await
                .map_err(|e| unavailable(&e))?;
            for (bucket, ids) in by_bucket(&ids) {
                for batch in ids.chunks(MARK_BATCH) {
                    let mut call = self.scripts.mark.prepare_invoke();
                    for id in batch {
                        call.key(task_key(id));
                    }
                    call.arg(end)
                        .arg(u64::try_from(MARK_TTL.as_millis()).unwrap_or(u64::MAX));
                    call.invoke_async::<i64>(conn)
                        .await
                        .map_err(|e| write_failed(&e))?;
                    self.settle(conn, &expiry_key(bucket)).await?;
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// Task ids (that parse as such) grouped by bucket.
fn by_bucket(ids: &[String]) -> BTreeMap<usize, Vec<String>> {
    let mut out: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for id in ids.iter().filter(|id| TaskId::parse(id).is_ok()) {
        out.entry(bucket_of(id)).or_default().push(id.clone());
    }
    out
}

/// The reason of a lock as the store holds it (the JSON of a [`Lock`]); empty if it does not
/// decode.
pub(super) fn reason_of(json: &str) -> String {
    serde_json::from_str::<Lock>(json)
        .map(|l| l.reason)
        .unwrap_or_default()
}

/// The task ids among script answer items.
fn task_ids(items: &[Vec<u8>]) -> impl Iterator<Item = TaskId> + '_ {
    items
        .iter()
        .filter_map(|t| std::str::from_utf8(t).ok())
        .filter_map(|t| TaskId::parse(t).ok())
}
