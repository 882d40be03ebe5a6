//! Store-wide records: the epoch marker (in `meta`) and the published signing keys.

use std::time::SystemTime;

use redb::ReadableTable as _;

use super::EmbeddedStore;
use super::tables::{META, SIGNING_KEYS, from_json, to_json};
use crate::mint::PublishedKey;
use crate::store::{Epoch, StoreError};

impl EmbeddedStore {
    /// [`Store::epoch`](crate::store::Store::epoch): the epoch marker, `fresh` written first
    /// when there is none.
    pub(super) async fn epoch_or(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        let fresh = fresh.clone();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let epoch = {
                let mut meta = txn.open_table(META)?;
                let known = meta
                    .get("epoch")?
                    .map(|v| from_json::<Epoch>(v.value(), "epoch"));
                match known {
                    Some(e) => e?,
                    None => {
                        let json = to_json(&fresh, "epoch")?;
                        meta.insert("epoch", json.as_slice())?;
                        fresh
                    }
                }
            };
            txn.commit()?;
            Ok(epoch)
        })
        .await
    }

    /// [`Store::publish_key`](crate::store::Store::publish_key): writes `key` under its `kid`.
    pub(super) async fn write_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        let bytes = to_json(key, format_args!("encoding key {}", key.kid))?;
        let kid = key.kid.clone();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(SIGNING_KEYS)?
                .insert(kid.as_str(), bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// [`Store::published_keys`](crate::store::Store::published_keys): the keys published
    /// until after `now`, dropping the others.
    pub(super) async fn live_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let mut live = Vec::new();
            {
                let mut table = txn.open_table(SIGNING_KEYS)?;
                let mut stale = Vec::new();
                for entry in table.iter()? {
                    let (kid, v) = entry?;
                    let key: PublishedKey =
                        from_json(v.value(), format_args!("signing key {}", kid.value()))?;
                    if key.until > now {
                        live.push(key);
                    } else {
                        stale.push(key.kid);
                    }
                }
                for kid in stale {
                    table.remove(kid.as_str())?;
                }
            }
            txn.commit()?;
            Ok(live)
        })
        .await
    }
}
