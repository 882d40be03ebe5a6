//! The revocation log, the [`RevocationLog`] of the Redis store: the buckets' logs (streams
//! appended by the revoking scripts, keys.rs `rev`) read as one, under one cursor; waiting for
//! new entries (by polling every [`POLL`]); its head; trimming it.
//!
//! The merge. A cursor is `<ms>-<seq>` with `seq` = the stream entry's sequence number times
//! [`BUCKETS`] plus the bucket: the log's order is (ms, sequence, bucket), and a cursor names
//! one entry of one bucket. Each bucket is read with its server's clock (`log_read.lua`); a
//! stream's ids grow with that clock, so every entry a bucket logs later has a time at or
//! after the clock read. An entry is handed out only once nothing can come before it any more:
//! when its time is before every bucket's clock (a bucket read whole) or before the last entry
//! read of a bucket read only in part. A revocation therefore reaches watchers a millisecond
//! (and the clock skew between Cluster nodes) after it happened; nothing is ever handed out out
//! of order, so a watcher that resumes after its last cursor misses nothing.

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::codec::{StreamEntry, revocation_from_entry};
use super::keys::{BUCKETS, log_key};
use super::link::Link;
use super::{RedisStore, unavailable};
use crate::lease::{Cursor, Revocation};
use crate::store::{LogRead, MAX_REVOCATION_WAIT, RevocationLog, StoreError, unix_ms};

/// How often a waiting read looks again.
pub const POLL: Duration = Duration::from_millis(100);

/// How often one read looks again for entries held back by a clock that has not moved on yet
/// (a millisecond on one server; the clock skew between Cluster nodes).
const SETTLE_TRIES: usize = 20;

/// The bucket's log read after a cursor: its server's time (ms) and the entries.
type BucketRead = (u64, Vec<StreamEntry>);

#[async_trait]
impl RevocationLog for RedisStore {
    async fn revocations(&self, read: LogRead) -> Result<Vec<Revocation>, StoreError> {
        let (after, limit, wait) = (read.after, read.limit.max(1), read.wait);
        let until = Instant::now() + wait.min(MAX_REVOCATION_WAIT);
        let conn = self.conn().await?;
        loop {
            let got = self.settled(&conn, after, limit).await?;
            let now = Instant::now();
            if !got.is_empty() || now >= until {
                return Ok(got);
            }
            tokio::time::sleep(POLL.min(until - now)).await;
        }
    }

    /// The latest of the buckets' last entries that can be handed out (looking again
    /// shortly while one is held back), or the start for an empty log: whatever is logged
    /// later comes after it.
    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        let conn = self.conn().await?;
        for _ in 1..SETTLE_TRIES {
            let (head, held) = self.head_once(&conn).await?;
            if !held {
                return Ok(head);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(self.head_once(&conn).await?.0)
    }

    /// `XTRIM MINID` on every bucket's log.
    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        futures_util::future::try_join_all((0..BUCKETS).map(|b| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("XTRIM")
                    .arg(log_key(b))
                    .arg("MINID")
                    .arg(unix_ms(before))
                    .query_async::<i64>(&mut conn)
                    .await
            }
        }))
        .await
        .map_err(|e| unavailable(&e))?;
        Ok(())
    }
}

impl RedisStore {
    /// Up to `limit` entries after `after` that can be handed out; looks again shortly while
    /// some are held back only by a clock that has not moved on.
    async fn settled(
        &self,
        conn: &Link,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<Revocation>, StoreError> {
        let mut tries = 0;
        loop {
            let (out, held) = self.merged(conn, after, limit).await?;
            tries += 1;
            if !held || out.len() >= limit || tries >= SETTLE_TRIES {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The latest last entry within what is known, and whether a last entry was held back.
    async fn head_once(&self, conn: &Link) -> Result<(Cursor, bool), StoreError> {
        let reads = self.read_buckets(conn, |_| String::new(), 1).await?;
        let mut bound = Cursor {
            ms: u64::MAX,
            seq: u64::MAX,
        };
        let mut last = Vec::new();
        for (b, (clock, entries)) in reads.into_iter().enumerate() {
            bound = bound.min(Cursor {
                ms: clock.saturating_sub(1),
                seq: u64::MAX,
            });
            for entry in entries {
                last.push(merged_cursor(revocation_from_entry(entry)?.cursor, b));
            }
        }
        let held = last.iter().any(|c| *c > bound);
        let head = last
            .into_iter()
            .filter(|c| *c <= bound)
            .max()
            .unwrap_or(Cursor::START);
        Ok((head, held))
    }

    /// Every bucket's log read from `start(bucket)` (`log_read.lua`), with its server's clock.
    async fn read_buckets(
        &self,
        conn: &Link,
        start: impl Fn(usize) -> String,
        limit: usize,
    ) -> Result<Vec<BucketRead>, StoreError> {
        futures_util::future::try_join_all((0..BUCKETS).map(|b| {
            let mut conn = conn.clone();
            let start = start(b);
            async move {
                let (secs, micros, entries): (u64, u64, Vec<StreamEntry>) = self
                    .scripts
                    .log_read
                    .key(log_key(b))
                    .arg(start)
                    .arg(limit)
                    .invoke_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>((secs * 1000 + micros / 1000, entries))
            }
        }))
        .await
        .map_err(|e| unavailable(&e))
    }

    /// One merged read: the entries that can be handed out, in order, and whether any read
    /// were held back.
    async fn merged(
        &self,
        conn: &Link,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Revocation>, bool), StoreError> {
        let reads = self
            .read_buckets(conn, |b| start_in(after, b), limit)
            .await?;
        // Everything at or before `bound` is known.
        let mut bound = Cursor {
            ms: u64::MAX,
            seq: u64::MAX,
        };
        let mut all = Vec::new();
        for (b, (clock, entries)) in reads.into_iter().enumerate() {
            let whole = entries.len() < limit;
            for entry in entries {
                let mut r = revocation_from_entry(entry)?;
                r.cursor = merged_cursor(r.cursor, b);
                if after.is_none_or(|a| r.cursor > a) {
                    all.push(r);
                }
            }
            let known = if whole {
                Cursor {
                    ms: clock.saturating_sub(1),
                    seq: u64::MAX,
                }
            } else {
                all.iter()
                    .filter(|r| usize::try_from(r.cursor.seq % BUCKETS as u64) == Ok(b))
                    .map(|r| r.cursor)
                    .max()
                    .unwrap_or_default()
            };
            bound = bound.min(known);
        }
        all.sort_unstable_by_key(|r| r.cursor);
        let held = all.iter().any(|r| r.cursor > bound);
        all.retain(|r| r.cursor <= bound);
        all.truncate(limit);
        Ok((all, held))
    }
}

/// A bucket's stream id `id` (as a cursor) as a cursor of the merged log.
fn merged_cursor(id: Cursor, bucket: usize) -> Cursor {
    Cursor {
        ms: id.ms,
        seq: id
            .seq
            .saturating_mul(BUCKETS as u64)
            .saturating_add(bucket as u64),
    }
}

/// The first stream id of bucket `b` that may come after merged cursor `after` (inclusive).
fn start_in(after: Option<Cursor>, b: usize) -> String {
    let Some(a) = after else {
        return "-".to_owned();
    };
    let b = b as u64;
    // Entries of `b` in `a.ms` with `seq * BUCKETS + b > a.seq`.
    let seq = if a.seq < b {
        0
    } else {
        (a.seq - b) / BUCKETS as u64 + 1
    };
    format!("{}-{seq}", a.ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket resumes at its first entry after a merged cursor, whichever bucket that names.
    #[test]
    fn each_bucket_resumes_after_a_merged_cursor() {
        let at = |ms, seq| Some(Cursor { ms, seq });
        assert_eq!(start_in(None, 3), "-");
        // Cursor: entry 2 of bucket 5 in ms 7 (seq 2 * 16 + 5 = 37).
        assert_eq!(
            merged_cursor(Cursor { ms: 7, seq: 2 }, 5),
            Cursor { ms: 7, seq: 37 }
        );
        assert_eq!(start_in(at(7, 37), 5), "7-3");
        assert_eq!(start_in(at(7, 37), 4), "7-3"); // 2*16+4 = 36 is before, 3*16+4 after
        assert_eq!(start_in(at(7, 37), 6), "7-2"); // 2*16+6 = 38 is after
        assert_eq!(start_in(at(7, 3), 9), "7-0");
    }
}
