//! Claims, the [`ClaimStore`] of the embedded store: a value under a key until an expiry, taken,
//! read, released and swapped each in one transaction. Expired claims are dropped by
//! [`TaskStore::prune_ended`](crate::store::TaskStore::prune_ended) (Redis drops its own).

use std::time::SystemTime;

use async_trait::async_trait;
use redb::{ReadableDatabase as _, ReadableTable as _};

use super::EmbeddedStore;
use super::tables::CLAIMS;
use crate::store::{Claim, ClaimStore, StoreError, unix_ms, unix_ms_ceil};

#[async_trait]
impl ClaimStore for EmbeddedStore {
    /// Records `value` under `key` unless `key` holds an unexpired value, which comes back.
    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<String>, StoreError> {
        let (key, value, until) = (claim.key, claim.value, claim.until);
        let (key, value) = (key.to_owned(), value.to_owned());
        let now = unix_ms(SystemTime::now());
        let until = unix_ms_ceil(until);
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let held = {
                let mut claims = txn.open_table(CLAIMS)?;
                let held = claims
                    .get(key.as_str())?
                    .map(|v| (v.value().0, v.value().1.to_owned()))
                    .filter(|(exp, _)| *exp > now)
                    .map(|(_, v)| v);
                if held.is_none() {
                    claims.insert(key.as_str(), (until, value.as_str()))?;
                }
                held
            };
            txn.commit()?;
            Ok(held)
        })
        .await
    }

    /// Read, then kept if unexpired.
    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        let now = unix_ms(SystemTime::now());
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let claims = txn.open_table(CLAIMS)?;
            let held = claims
                .get(key.as_str())?
                .filter(|v| v.value().0 > now)
                .map(|v| v.value().1.to_owned());
            Ok(held)
        })
        .await
    }

    /// Removes the claim `key` if it still holds `value`, in one transaction.
    async fn release_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            {
                let mut claims = txn.open_table(CLAIMS)?;
                let holds = claims
                    .get(key.as_str())?
                    .is_some_and(|v| v.value().1 == value);
                if holds {
                    claims.remove(key.as_str())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// Replaces the unexpired claim `key` if it still holds `expected`, in one transaction.
    async fn swap_claim(&self, expected: &str, claim: &Claim<'_>) -> Result<bool, StoreError> {
        let (key, value, until) = (claim.key, claim.value, claim.until);
        let (key, expected, value) = (key.to_owned(), expected.to_owned(), value.to_owned());
        let now = unix_ms(SystemTime::now());
        let until = unix_ms_ceil(until);
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let holds = {
                let mut claims = txn.open_table(CLAIMS)?;
                let holds = claims
                    .get(key.as_str())?
                    .is_some_and(|v| v.value().0 > now && v.value().1 == expected);
                if holds {
                    claims.insert(key.as_str(), (until, value.as_str()))?;
                }
                holds
            };
            txn.commit()?;
            Ok(holds)
        })
        .await
    }
}
