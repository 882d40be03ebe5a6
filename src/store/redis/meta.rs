//! The records in Redis that replicas share beside tasks and leases: the store's epoch marker,
//! the published signing keys, claims (short-lived named values with a holder), and the
//! readiness probe.

use std::time::SystemTime;

use redis::AsyncCommands as _;

use super::keys::{EPOCH, READY_PROBE, SIGNING_KEYS, claim_key};
use super::{RedisStore, unavailable, write_failed};
use crate::mint::PublishedKey;
use crate::store::{Epoch, StoreError, unix_ms_ceil};

impl RedisStore {
    /// [`Store::epoch`](crate::store::Store::epoch): `SET NX GET`, one round trip.
    pub(super) async fn epoch_marker(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
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

    /// [`Store::publish_key`](crate::store::Store::publish_key).
    pub(super) async fn put_signing_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(key)
            .map_err(|e| StoreError::Corrupt(format!("encoding key {}: {e}", key.kid)))?;
        let mut conn = self.conn().await?;
        conn.hset::<_, _, _, i64>(SIGNING_KEYS, &key.kid, bytes)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    /// [`Store::published_keys`](crate::store::Store::published_keys): those still valid at
    /// `now`; the others are deleted.
    pub(super) async fn live_signing_keys(
        &self,
        now: SystemTime,
    ) -> Result<Vec<PublishedKey>, StoreError> {
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

    /// [`Store::claim`](crate::store::Store::claim): `SET NX GET PXAT`.
    pub(super) async fn set_claim(
        &self,
        key: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        // Written only if absent, expiring by itself; the holder (if any) comes back.
        redis::cmd("SET")
            .arg(claim_key(key))
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("PXAT")
            .arg(unix_ms_ceil(until).max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))
    }

    /// [`Store::release_claim`](crate::store::Store::release_claim): only if it still holds
    /// `value`.
    pub(super) async fn drop_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.scripts
            .release
            .key(claim_key(key))
            .arg(value)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    /// [`Store::swap_claim`](crate::store::Store::swap_claim): only if it still holds
    /// `expected`.
    pub(super) async fn replace_claim(
        &self,
        key: &str,
        expected: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        self.scripts
            .swap
            .key(claim_key(key))
            .arg(expected)
            .arg(value)
            .arg(unix_ms_ceil(until).max(1))
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|n| n == 1)
            .map_err(|e| write_failed(&e))
    }

    /// [`Store::ping`](crate::store::Store::ping): a write, so that a store that refuses writes
    /// is not ready.
    pub(super) async fn write_probe(&self) -> Result<(), StoreError> {
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
