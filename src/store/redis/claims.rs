//! Claims, the [`ClaimStore`] of the Redis store: short-lived named values with a holder, each
//! under its own key expiring by itself (see `keys.rs`), taken, read, released and swapped in one
//! step each.

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::keys::claim_key;
use super::{RedisStore, unavailable, write_failed};
use crate::store::{Claim, ClaimStore, StoreError, unix_ms_ceil};

#[async_trait]
impl ClaimStore for RedisStore {
    /// `SET NX GET PXAT`.
    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<String>, StoreError> {
        let (key, value, until) = (claim.key, claim.value, claim.until);
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

    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        conn.get(claim_key(key)).await.map_err(|e| unavailable(&e))
    }

    /// Only if it still holds `value` (one script).
    async fn release_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
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

    /// Only if it still holds `expected` (one script).
    async fn swap_claim(&self, expected: &str, claim: &Claim<'_>) -> Result<bool, StoreError> {
        let (key, value, until) = (claim.key, claim.value, claim.until);
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
}
