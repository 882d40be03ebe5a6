//! The revocation log, the [`RevocationLog`] of the Redis store (the stream keys.rs names
//! `REVOCATIONS`, appended by the revoking scripts): reading it after a cursor, waiting for new
//! entries on a connection of its own, its head, and trimming it.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::codec::{StreamEntry, StreamReply, revocation_from_entry};
use super::keys::REVOCATIONS;
use super::{RedisStore, unavailable};
use crate::lease::{Cursor, Revocation};
use crate::store::{LogRead, MAX_REVOCATION_WAIT, RevocationLog, StoreError, unix_ms};

#[async_trait]
impl RevocationLog for RedisStore {
    /// `XRANGE` when not waiting, else a blocking read.
    async fn revocations(&self, read: LogRead) -> Result<Vec<Revocation>, StoreError> {
        let (after, limit, wait) = (read.after, read.limit, read.wait);
        let entries: Vec<StreamEntry> = if wait.is_zero() {
            let mut conn = self.conn().await?;
            let start = after.map_or_else(|| "-".to_owned(), |c| format!("({c}"));
            redis::cmd("XRANGE")
                .arg(REVOCATIONS)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?
        } else {
            self.wait_revocations(after.unwrap_or(Cursor::START), limit, wait)
                .await?
        };
        entries.into_iter().map(revocation_from_entry).collect()
    }

    /// The id of the last entry, or the start for an empty log.
    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        let mut conn = self.conn().await?;
        let last: Vec<StreamEntry> = redis::cmd("XREVRANGE")
            .arg(REVOCATIONS)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match last.first() {
            Some((id, _)) => Cursor::parse(id)
                .ok_or_else(|| StoreError::Corrupt(format!("revocation id {id:?}"))),
            None => Ok(Cursor::START),
        }
    }

    /// `XTRIM MINID`.
    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("XTRIM")
            .arg(REVOCATIONS)
            .arg("MINID")
            .arg(unix_ms(before))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }
}

impl RedisStore {
    /// Blocks in `XREAD` on the watch connection for up to `wait` for log entries after
    /// `after`. A failed connection is dropped and made again on the next call.
    async fn wait_revocations(
        &self,
        after: Cursor,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let wait = wait.min(MAX_REVOCATION_WAIT);
        let mut slot = self.watch.lock().await;
        let conn = match slot.as_mut() {
            Some(c) => c,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(MAX_REVOCATION_WAIT + Duration::from_secs(2)));
                let c = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| unavailable(&e))?;
                slot.insert(c)
            }
        };
        // Nil when nothing came in time; else one (stream, entries) pair.
        let read: Result<Option<Vec<StreamReply>>, _> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(limit)
            .arg("BLOCK")
            .arg(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(REVOCATIONS)
            .arg(after.to_string())
            .query_async(conn)
            .await;
        match read {
            Ok(streams) => Ok(streams
                .into_iter()
                .flatten()
                .flat_map(|(_, entries)| entries)
                .collect()),
            Err(e) => {
                *slot = None;
                Err(unavailable(&e))
            }
        }
    }
}
