//! Store-wide records, the [`MetaStore`] of the Redis store: what replicas share beside tasks,
//! leases and claims (those are in `claims.rs`): the store's epoch marker, the published signing
//! keys, and the readiness probe.

use std::time::SystemTime;

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::keys::{EPOCH, READY_PROBE, SIGNING_KEYS};
use super::{RedisStore, unavailable};
use crate::mint::PublishedKey;
use crate::store::{Epoch, MetaStore, StoreError};

#[async_trait]
impl MetaStore for RedisStore {
    /// `SET NX GET`, one round trip.
    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        let mut conn = self.conn().await?;
        let json =
            serde_json::to_string(fresh).map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))?;
        // Written only if absent; the old value (if any) comes back: one round trip.
        let old: Option<String> = redis::cmd("SET")
            .arg(EPOCH)
            .arg(json)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match old {
            Some(o) => {
                serde_json::from_str(&o).map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))
            }
            None => Ok(fresh.clone()),
        }
    }

    /// `HSET` under its `kid`.
    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(key)
            .map_err(|e| StoreError::Corrupt(format!("encoding key {}: {e}", key.kid)))?;
        let mut conn = self.conn().await?;
        conn.hset::<_, _, _, i64>(SIGNING_KEYS, &key.kid, bytes)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    /// Those still valid at `now`; the others are deleted.
    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
        let mut conn = self.conn().await?;
        let all: Vec<(String, Vec<u8>)> = conn
            .hgetall(SIGNING_KEYS)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for (kid, v) in all {
            let key: PublishedKey = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("signing key {kid}: {e}")))?;
            if key.until > now {
                live.push(key);
            } else {
                stale.push(kid);
            }
        }
        if !stale.is_empty() {
            // Best effort: a reader skips them anyway.
            let _: Result<i64, _> = conn.hdel(SIGNING_KEYS, &stale).await;
        }
        Ok(live)
    }

    /// A write, so that a store that refuses writes is not ready.
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        // A write: refused by a read-only replica, an out-of-memory `noeviction` Redis, or one
        // whose persistence fails (MISCONF).
        redis::cmd("SET")
            .arg(READY_PROBE)
            .arg(1)
            .arg("PX")
            .arg(60_000)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))
    }
}
