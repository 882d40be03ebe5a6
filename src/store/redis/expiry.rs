//! What falls due, the [`DueStore`] of the Redis store (what the reaper reads): leases due to
//! expire (claimed and ended once each whatever the number of reapers), tasks past their
//! deadline, forgetting a deadline, and the next moment anything falls due.

use std::time::SystemTime;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;

use super::codec::{decode_record, ns_bytes};
use super::keys::{DEADLINES, EXPIRY, leases_key, parse_member, task_key};
use super::leases::parse_agent;
use super::{RedisStore, unavailable};
use crate::lease::Lease;
use crate::store::{DueStore, StoreError, from_unix_ms, unix_ms};
use crate::task::TaskId;

#[async_trait]
impl DueStore for RedisStore {
    /// Up to `limit` leases due by `now`, each claimed by its own script (keys of one task's
    /// slot), all in one pipelined round trip; the leases this call ended come back with it.
    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let due: Vec<Vec<u8>> = due_in(&mut conn, EXPIRY, now, limit).await?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let (due, malformed): (Vec<_>, Vec<_>) = due
            .iter()
            .map(|m| (m, parse_member(m)))
            .partition(|(_, parsed)| parsed.is_some());
        let due: Vec<(&Vec<u8>, TaskId, [u8; 8])> = due
            .into_iter()
            .filter_map(|(m, p)| p.map(|(t, s)| (m, t, s)))
            .collect();
        let expire = &self.scripts.expire;
        let now8 = ns_bytes(now);
        let mut claims = redis::pipe();
        if !malformed.is_empty() {
            // Never written by this layout's broker; dropped so that they are not due forever.
            let malformed: Vec<&Vec<u8>> = malformed.into_iter().map(|(m, _)| m).collect();
            claims.zrem(EXPIRY, malformed).ignore();
        }
        claims.load_script(expire).ignore();
        for (m, task, suffix) in &due {
            claims.invoke_script(
                expire
                    .key(EXPIRY)
                    .key(leases_key(&task.to_string()))
                    .key(task_key(&task.to_string()))
                    .arg(m.as_slice())
                    .arg(&suffix[..])
                    .arg(&now8[..]),
            );
        }
        let claimed: Vec<Option<(String, Vec<u8>)>> = claims
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut ended = Vec::new();
        for ((_, task, suffix), c) in due.iter().zip(claimed) {
            if let Some((agent, rec)) = c {
                ended.push(decode_record(
                    *task,
                    &parse_agent(&agent)?,
                    *suffix,
                    &rec,
                    None,
                )?);
            }
        }
        Ok(ended)
    }

    /// Up to `limit` tasks whose deadline is past at `now`.
    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let mut conn = self.conn().await?;
        let due: Vec<String> = due_in(&mut conn, DEADLINES, now, limit).await?;
        Ok(due.iter().filter_map(|id| TaskId::parse(id).ok()).collect())
    }

    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        conn.zrem::<_, _, i64>(DEADLINES, id.to_string())
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    /// The earlier of the first lease expiry and the first task deadline.
    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError> {
        let mut conn = self.conn().await?;
        #[expect(
            clippy::type_complexity,
            reason = "two `ZRANGE .. WITHSCORES` replies, decoded as redis-rs gives them"
        )]
        let (lease, task): (Vec<(Vec<u8>, u64)>, Vec<(Vec<u8>, u64)>) = redis::pipe()
            .zrange_withscores(EXPIRY, 0, 0)
            .zrange_withscores(DEADLINES, 0, 0)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(lease
            .into_iter()
            .chain(task)
            .map(|(_, ms)| ms)
            .min()
            .map(from_unix_ms))
    }
}

/// Up to `limit` members of the time index `index` due at `now`, earliest first.
async fn due_in<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    index: &str,
    now: SystemTime,
    limit: usize,
) -> Result<Vec<T>, StoreError> {
    conn.zrangebyscore_limit(
        index,
        "-inf",
        unix_ms(now),
        0,
        isize::try_from(limit).unwrap_or(isize::MAX),
    )
    .await
    .map_err(|e| unavailable(&e))
}
