//! Store reset detection: every broker remembers the store's epoch marker and checks it often.
//! A different (or missing, hence re-made) marker means the store lost its data - Redis
//! restarted without persistence: leases, locks and the revocation log are gone. The broker
//! says so loudly (an error log, `/readyz`, metrics) and verifiers learn the new epoch from the
//! watch stream, so that they refuse credentials issued before it. Introspection already answers
//! inactive for them: their leases are gone.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use super::{Broker, BrokerError};
use crate::store::Epoch;

/// How often a broker checks the store's epoch.
pub const EPOCH_CHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// Counter of store resets this process detected.
pub const STORE_RESETS: &str = "taskcred_store_resets_total";
/// Gauge: when the store's current epoch began (Unix seconds).
pub const STORE_EPOCH_STARTED: &str = "taskcred_store_epoch_started_seconds";

/// A reset this process detected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreReset {
    /// When it was noticed.
    pub detected_at: SystemTime,
    /// The epoch before.
    pub previous: Epoch,
    /// The epoch after.
    pub current: Epoch,
}

/// What this process knows of the store's epoch.
#[derive(Debug, Default)]
pub(super) struct EpochState {
    known: RwLock<Option<Epoch>>,
    reset: RwLock<Option<StoreReset>>,
}

impl EpochState {
    /// The epoch last seen.
    pub(super) fn current(&self) -> Option<Epoch> {
        self.known.read().ok().and_then(|k| k.clone())
    }
}

impl Broker {
    /// The issuance step found the store without its epoch marker (a reset since the last
    /// check): start the new epoch now, so that what is issued next is issued in it, and
    /// verifiers learn it at once.
    pub(super) async fn after_store_reset(&self) {
        if let Err(e) = self.check_store_epoch().await {
            tracing::warn!(error = %e, "starting a new store epoch after a reset failed; will retry");
        }
    }

    /// Reads the store's epoch (making it on a new store) and compares it with the one this
    /// process saw before. Returns the reset, if this check found one.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`].
    pub async fn check_store_epoch(&self) -> Result<Option<StoreReset>, BrokerError> {
        let now = self.clock.now();
        let epoch = self.store.epoch(&Epoch::new(now)).await?;
        let previous = {
            let mut known = self
                .epoch
                .known
                .write()
                .map_err(|_| BrokerError::Internal("epoch lock poisoned".into()))?;
            known.replace(epoch.clone())
        };
        metrics::gauge!(STORE_EPOCH_STARTED).set(
            epoch
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let Some(previous) = previous.filter(|p| p.id != epoch.id) else {
            return Ok(None);
        };
        let reset = StoreReset {
            detected_at: now,
            previous,
            current: epoch,
        };
        tracing::error!(
            previous_epoch = %reset.previous.id,
            epoch = %reset.current.id,
            "THE STORE WAS RESET: it came back without its data (leases, locks, revocations). \
             Credentials issued before are inactive; re-apply agent locks; run Redis with AOF \
             persistence"
        );
        metrics::counter!(STORE_RESETS).increment(1);
        if let Ok(mut r) = self.epoch.reset.write() {
            *r = Some(reset.clone());
        }
        Ok(Some(reset))
    }

    /// The last store reset this process detected, if any.
    pub fn store_reset(&self) -> Option<StoreReset> {
        self.epoch.reset.read().ok().and_then(|r| r.clone())
    }

    /// The store epoch this process last saw.
    pub fn store_epoch(&self) -> Option<Epoch> {
        self.epoch.current()
    }

    /// The shared view, for watches.
    pub(super) fn epoch_state(&self) -> Arc<EpochState> {
        self.epoch.clone()
    }
}
