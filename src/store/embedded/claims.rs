//! Claims: a value under a key until an expiry, taken, read, released and swapped each in one
//! transaction. Expired claims are dropped by [`Store::prune_ended`](crate::store::Store::prune_ended)
//! (Redis drops its own).

use std::time::SystemTime;

use redb::{ReadableDatabase as _, ReadableTable as _};

use super::EmbeddedStore;
use super::tables::CLAIMS;
use crate::store::{StoreError, unix_ms, unix_ms_ceil};

impl EmbeddedStore {
    /// [`Store::claim`](crate::store::Store::claim): records `value` under `key` unless `key`
    /// holds an unexpired value, which comes back.
    pub(super) async fn take_claim(
        &self,
        key: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<Option<String>, StoreError> {
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

    /// [`Store::claimed`](crate::store::Store::claimed): the value of the unexpired claim `key`.
    pub(super) async fn read_claim(&self, key: &str) -> Result<Option<String>, StoreError> {
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

    /// [`Store::release_claim`](crate::store::Store::release_claim): removes the claim `key`
    /// if it still holds `value`.
    pub(super) async fn drop_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
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

    /// [`Store::swap_claim`](crate::store::Store::swap_claim): replaces the unexpired claim
    /// `key` if it still holds `expected`; returns whether it did.
    pub(super) async fn replace_claim(
        &self,
        key: &str,
        expected: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<bool, StoreError> {
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
