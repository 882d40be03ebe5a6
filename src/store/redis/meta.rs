//! Store-wide records, the [`MetaStore`] of the Redis store: what replicas share beside tasks,
//! leases and claims (those are in `claims.rs`): the store's epoch marker, the published signing
//! keys, and the readiness probe.
//!
//! The epoch marker has a copy in every bucket (keys.rs), checked by issuance in the bucket's
//! own slot.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::keys::{BUCKETS, EPOCH, READY_PROBE, SIGNING_KEYS, epoch_key};
use super::{RedisStore, unavailable, write_failed};
use crate::mint::PublishedKey;
use crate::store::{Epoch, MetaStore, StoreError};

#[async_trait]
impl MetaStore for RedisStore {
    /// `SET NX GET` on the store's marker, then every bucket's copy made where it is missing.
    /// A store whose marker stayed while a bucket's copy went (a Cluster master that came back
    /// empty: that bucket's leases, revocations and marks are gone) was reset in part, and is
    /// treated as reset: a new epoch replaces the old one, marker and copies, so that every
    /// broker notices, as for a store that lost everything.
    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        let mut conn = self.conn().await?;
        let json =
            serde_json::to_string(fresh).map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))?;
        // Written only if absent; the old value (if any) comes back: one round trip.
        let old: Option<String> = redis::cmd("SET")
            .arg(EPOCH)
            .arg(&json)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let copies: Vec<Option<String>> =
            futures_util::future::try_join_all((0..BUCKETS).map(|b| {
                let mut conn = conn.clone();
                async move { conn.get::<_, Option<String>>(epoch_key(b)).await }
            }))
            .await
            .map_err(|e| unavailable(&e))?;
        let mut current = old.clone().unwrap_or_else(|| json.clone());
        if let Some(old) = &old
            && copies.iter().any(Option::is_none)
            && made_before(old, fresh.started_at)
        {
            // Replaced only if no other broker replaced it meanwhile (then that one stands).
            let _: i64 = self
                .scripts
                .replace
                .key(EPOCH)
                .arg(old)
                .arg(&json)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            current = conn
                .get::<_, Option<String>>(EPOCH)
                .await
                .map_err(|e| unavailable(&e))?
                .unwrap_or(json);
        }
        futures_util::future::try_join_all(copies.iter().enumerate().map(|(b, copy)| {
            let mut conn = conn.clone();
            let current = current.clone();
            let stale = copy.as_deref() != Some(current.as_str());
            async move {
                if stale {
                    conn.set::<_, _, ()>(epoch_key(b), current).await?;
                }
                Ok::<_, redis::RedisError>(())
            }
        }))
        .await
        .map_err(|e| write_failed(&e))?;
        serde_json::from_str(&current).map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))
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

/// How long after a store's epoch was made its bucket copies may still be missing because its
/// maker is writing them: a copy missing later means the bucket lost its data.
const COPIES_MADE_WITHIN: Duration = Duration::from_secs(30);

/// Whether epoch `json` was made more than [`COPIES_MADE_WITHIN`] before `now`.
fn made_before(json: &str, now: SystemTime) -> bool {
    serde_json::from_str::<Epoch>(json).is_ok_and(|e| e.started_at + COPIES_MADE_WITHIN < now)
}
