//! What falls due, the [`DueStore`] of the Redis store (what the reaper reads): leases due to
//! expire (claimed and ended once each whatever the number of reapers), tasks past their
//! deadline, forgetting a deadline, and the next moment anything falls due.

use std::time::SystemTime;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;

use super::codec::unix_ns;
use super::keys::{DEADLINES, EXPIRY, lease_key, live_template, member};
use super::{RedisStore, unavailable};
use crate::lease::Lease;
use crate::store::{DueStore, StoreError, from_unix_ms, unix_ms};
use crate::task::TaskId;

#[async_trait]
impl DueStore for RedisStore {
    /// Up to `limit` leases due by `now`, each claimed by its own script, all in one pipelined
    /// round trip.
    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let due = due_in(&mut conn, EXPIRY, now, limit).await?;
        // One round trip claims them all (each claim is its own atomic script), one more reads
        // the leases this call ended.
        let (due, malformed): (Vec<&String>, Vec<&String>) =
            due.iter().partition(|m| m.contains('/'));
        let due: Vec<(String, String)> = due
            .iter()
            .filter_map(|m| m.split_once('/'))
            .map(|(task, lease)| (task.to_owned(), lease.to_owned()))
            .collect();
        if due.is_empty() && malformed.is_empty() {
            return Ok(Vec::new());
        }
        let expire = &self.scripts.expire;
        let live = live_template();
        let mut claims = redis::pipe();
        if !malformed.is_empty() {
            // Never written by the broker; dropped so that they are not due forever.
            claims.zrem(EXPIRY, malformed).ignore();
        }
        claims.load_script(expire).ignore();
        for (task, lease) in &due {
            claims.invoke_script(
                expire
                    .key(EXPIRY)
                    .key(lease_key(task, lease))
                    .arg(member(task, lease))
                    .arg(unix_ns(now))
                    .arg(&live),
            );
        }
        let claimed: Vec<i64> = claims
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mine: Vec<&(String, String)> = due
            .iter()
            .zip(claimed)
            .filter(|(_, c)| *c == 1)
            .map(|(d, _)| d)
            .collect();
        let mine: Vec<(&str, &str)> = mine.iter().map(|(t, l)| (t.as_str(), l.as_str())).collect();
        self.read_leases(&mut conn, &mine).await
    }

    /// Up to `limit` tasks whose deadline is past at `now`.
    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let mut conn = self.conn().await?;
        let due = due_in(&mut conn, DEADLINES, now, limit).await?;
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
        let (lease, task): (Vec<(String, u64)>, Vec<(String, u64)>) = redis::pipe()
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
async fn due_in(
    conn: &mut ConnectionManager,
    index: &str,
    now: SystemTime,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
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
