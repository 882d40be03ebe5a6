//! What falls due, the [`DueStore`] of the Redis store (what the reaper reads), bucket by
//! bucket: leases due to expire (each bucket reaped by one replica at a time, each lease claimed
//! and ended once whatever the number of reapers), tasks past their deadline, forgetting a
//! deadline, and the next moment anything falls due.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::codec::{decode_record, ns_bytes};
use super::keys::{
    BUCKETS, bucket_of, deadlines_key, expiry_key, leases_key, parse_member, reaper_key, task_key,
};
use super::leases::parse_agent;
use super::link::Link;
use super::{RedisStore, unavailable, write_failed};
use crate::lease::Lease;
use crate::store::{DueStore, StoreError, from_unix_ms, unix_ms};
use crate::task::TaskId;

/// How long a replica holds a bucket it reaps (`tc:{B}:reaper`, expiring by itself if the
/// replica dies mid-way).
const REAP_HOLD: Duration = Duration::from_secs(5);

#[async_trait]
impl DueStore for RedisStore {
    /// The buckets' due leases (read at once, up to `limit` in all), then each bucket with
    /// some is held by this replica for the while (other replicas take other buckets) and its
    /// leases claimed and ended in one script; the leases this call ended come back.
    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        let conn = self.conn().await?;
        let due = per_bucket(&conn, now, limit, expiry_key).await?;
        let now8 = ns_bytes(now);
        let mut ended = Vec::new();
        let mut left = limit;
        for (bucket, first) in due.into_iter().enumerate() {
            if first.is_empty() || left == 0 {
                continue;
            }
            let mut conn = conn.clone();
            let hold = reaper_key(bucket);
            let holder = uuid::Uuid::now_v7().to_string();
            let held: Option<String> = redis::cmd("SET")
                .arg(&hold)
                .arg(&holder)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(REAP_HOLD.as_millis()).unwrap_or(u64::MAX))
                .query_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            if held.is_none() {
                continue; // another replica reaps this bucket now
            }
            // Read again, held: what another replica ended meanwhile is no longer due.
            let outcome = match due_in(&mut conn, expiry_key(bucket), now, left).await {
                Ok(members) => {
                    self.expire_bucket(&mut conn, bucket, &members, &now8, left)
                        .await
                }
                Err(e) => Err(e),
            };
            let _: Result<i64, _> = self
                .scripts
                .release
                .key(&hold)
                .arg(&holder)
                .invoke_async(&mut conn)
                .await;
            let some = outcome?;
            left = left.saturating_sub(some.len());
            ended.extend(some);
        }
        Ok(ended)
    }

    /// Up to `limit` tasks whose deadline is past at `now`, from every bucket.
    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let conn = self.conn().await?;
        let due: Vec<Vec<Vec<u8>>> = per_bucket(&conn, now, limit, deadlines_key).await?;
        Ok(due
            .iter()
            .flatten()
            .filter_map(|id| std::str::from_utf8(id).ok())
            .filter_map(|id| TaskId::parse(id).ok())
            .take(limit)
            .collect())
    }

    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let id = id.to_string();
        conn.zrem::<_, _, i64>(deadlines_key(bucket_of(&id)), id)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    /// The earliest first lease expiry and first task deadline of every bucket.
    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError> {
        let conn = self.conn().await?;
        let firsts = futures_util::future::try_join_all((0..BUCKETS).flat_map(|b| {
            [expiry_key(b), deadlines_key(b)].map(|index| {
                let mut conn = conn.clone();
                async move {
                    conn.zrange_withscores::<_, Vec<(Vec<u8>, u64)>>(index, 0, 0)
                        .await
                }
            })
        }))
        .await
        .map_err(|e| unavailable(&e))?;
        Ok(firsts
            .into_iter()
            .flatten()
            .map(|(_, ms)| ms)
            .min()
            .map(from_unix_ms))
    }
}

impl RedisStore {
    /// Claims and ends the due `members` of `bucket` (at most `limit`), one script.
    async fn expire_bucket(
        &self,
        conn: &mut Link,
        bucket: usize,
        members: &[Vec<u8>],
        now8: &[u8; 8],
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let (due, malformed): (Vec<_>, Vec<_>) = members
            .iter()
            .take(limit)
            .map(|m| (m, parse_member(m)))
            .partition(|(_, parsed)| parsed.is_some());
        if !malformed.is_empty() {
            // Never written by this layout's broker; dropped so that they are not due forever.
            let malformed: Vec<&Vec<u8>> = malformed.into_iter().map(|(m, _)| m).collect();
            let _: Result<i64, _> = conn.zrem(expiry_key(bucket), malformed).await;
        }
        let due: Vec<(&Vec<u8>, TaskId, [u8; 8])> = due
            .into_iter()
            .filter_map(|(m, p)| p.map(|(t, s)| (m, t, s)))
            .filter(|(_, t, _)| bucket_of(&t.to_string()) == bucket)
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.expire.prepare_invoke();
        call.key(expiry_key(bucket));
        call.arg(&now8[..]);
        for (m, task, suffix) in &due {
            let id = task.to_string();
            call.key(leases_key(&id)).key(task_key(&id));
            call.arg(m.as_slice()).arg(&suffix[..]);
        }
        let claimed: Vec<Vec<u8>> = call
            .invoke_async(conn)
            .await
            .map_err(|e| write_failed(&e))?;
        self.settle(conn, &expiry_key(bucket)).await?;
        let mut ended = Vec::with_capacity(claimed.len() / 3);
        for triple in claimed.chunks_exact(3) {
            let place = std::str::from_utf8(&triple[0])
                .ok()
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| due.get(i.wrapping_sub(1)))
                .ok_or_else(|| StoreError::Corrupt("expiry: bad answer".into()))?;
            let agent = std::str::from_utf8(&triple[1])
                .map_err(|_| StoreError::Corrupt("expiry: executor".into()))?;
            ended.push(decode_record(
                place.1,
                &parse_agent(agent)?,
                place.2,
                &triple[2],
                None,
            )?);
        }
        Ok(ended)
    }
}

/// Up to `limit` members of time index `index` due at `now`, earliest first.
async fn due_in(
    conn: &mut Link,
    index: String,
    now: SystemTime,
    limit: usize,
) -> Result<Vec<Vec<u8>>, StoreError> {
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

/// Up to `limit` members due at `now` of each bucket's time index `index`, earliest first.
async fn per_bucket(
    conn: &Link,
    now: SystemTime,
    limit: usize,
    index: fn(usize) -> String,
) -> Result<Vec<Vec<Vec<u8>>>, StoreError> {
    let limit = isize::try_from(limit).unwrap_or(isize::MAX);
    futures_util::future::try_join_all((0..BUCKETS).map(|b| {
        let mut conn = conn.clone();
        async move {
            conn.zrangebyscore_limit::<_, _, _, Vec<Vec<u8>>>(
                index(b),
                "-inf",
                unix_ms(now),
                0,
                limit,
            )
            .await
        }
    }))
    .await
    .map_err(|e| unavailable(&e))
}
