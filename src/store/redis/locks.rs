//! Agent locks, the [`LockStore`] of the Redis store: writing a lock (locks only grow), the
//! bounded sweep that ends what a locked agent holds, lifting a lock, and reading the locks in
//! force.

use std::time::SystemTime;

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::codec::ns_bytes;
use super::keys::{
    DEADLINES, EXPIRY, LOCKS, REVOCATIONS, creds_template, leases_template, live_key, lock_key,
    lock_key_of, open_key, task_template,
};
use super::leases::chunk_leases;
use super::{RedisStore, unavailable, write_failed};
use crate::identity::WorkloadId;
use crate::lease::{Lock, Swept};
use crate::store::{LockStore, LockSweep, StoreError, unix_ms};
use crate::task::TaskId;

#[async_trait]
impl LockStore for RedisStore {
    /// One script; the lock in force comes back.
    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError> {
        let mut conn = self.conn().await?;
        let json = serde_json::to_vec(lock)
            .map_err(|e| StoreError::Corrupt(format!("encoding lock: {e}")))?;
        let in_force: String = self
            .scripts
            .lock
            .key(lock_key(&lock.agent))
            .key(LOCKS)
            .arg(json)
            .arg(unix_ms(lock.at))
            .arg(
                lock.until
                    .map(|u| unix_ms(u).to_string())
                    .unwrap_or_default(),
            )
            .arg(lock.agent.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        serde_json::from_str(&in_force)
            .map_err(|e| StoreError::Corrupt(format!("lock of {}: {e}", lock.agent)))
    }

    /// One bounded step, one script: at most `limit` tasks ended and `limit` leases revoked,
    /// whatever one task holds.
    async fn sweep_lock(&self, step: &LockSweep<'_>) -> Result<Swept, StoreError> {
        let (agent, reason, at) = (step.agent, step.reason, step.at);
        let (retention, limit) = (step.retention, step.limit);
        let mut conn = self.conn().await?;
        let outcome: Vec<Vec<u8>> = self
            .scripts
            .sweep
            .key(open_key(agent.as_str()))
            .key(live_key(agent.as_str()))
            .key(EXPIRY)
            .key(REVOCATIONS)
            .key(DEADLINES)
            .arg(unix_ms(at))
            .arg(reason)
            .arg(unix_ms(at + retention))
            .arg(limit.max(1))
            .arg(task_template())
            .arg(leases_template())
            .arg(creds_template())
            .arg(unix_ms(at + crate::store::CASCADE_GRACE))
            .arg(&ns_bytes(at)[..])
            .arg(agent.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        // {remaining, tasks..., '|', task, suffix, record, ...}
        let Some((remaining, outcome)) = outcome.split_first() else {
            return Err(StoreError::Corrupt("lock sweep: empty answer".into()));
        };
        let remaining = std::str::from_utf8(remaining)
            .ok()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| StoreError::Corrupt("lock sweep: remaining".into()))?;
        let (tasks, leases) = match outcome.iter().position(|i| i.as_slice() == b"|") {
            Some(bar) => (&outcome[..bar], &outcome[bar + 1..]),
            None => (outcome, &[][..]),
        };
        let mut revoked = Vec::with_capacity(leases.len() / 3);
        for triple in leases.chunks_exact(3) {
            let task = std::str::from_utf8(&triple[0])
                .ok()
                .and_then(|t| TaskId::parse(t).ok())
                .ok_or_else(|| StoreError::Corrupt("lock sweep: task id".into()))?;
            revoked.extend(chunk_leases(task, agent, &triple[1..])?);
        }
        Ok(Swept {
            tasks: tasks
                .iter()
                .filter_map(|t| std::str::from_utf8(t).ok())
                .filter_map(|t| TaskId::parse(t).ok())
                .collect(),
            leases: revoked,
            remaining,
        })
    }

    /// The lock read and deleted in one transaction (`MULTI`).
    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        let mut conn = self.conn().await?;
        let (lock, _, _): (Option<Vec<u8>>, i64, i64) = redis::pipe()
            .atomic()
            .get(lock_key(agent))
            .del(lock_key(agent))
            .srem(LOCKS, agent.as_str())
            .query_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
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
