//! Store-wide records, the [`MetaStore`] of the embedded store: the epoch marker (in `meta`),
//! the published signing keys, and the readiness probe.

use std::time::SystemTime;

use async_trait::async_trait;
use redb::ReadableTable as _;

use super::EmbeddedStore;
use super::tables::{META, SIGNING_KEYS, from_json, to_json};
use crate::mint::PublishedKey;
use crate::store::{Epoch, MetaStore, StoreError};

#[async_trait]
impl MetaStore for EmbeddedStore {
    /// The epoch marker, `fresh` written first when there is none, in one transaction.
    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
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

    /// Writes `key` under its `kid`.
    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
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

    /// The keys published until after `now`, dropping the others.
    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
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

    async fn ping(&self) -> Result<(), StoreError> {
        // A write transaction (committed empty): a file that can no longer be written (a full
        // or read-only disk) is not ready.
        self.blocking(|db| {
            db.begin_write()?.commit()?;
            Ok(())
        })
        .await
    }
}
