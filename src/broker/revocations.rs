//! Revocations reaching verifiers: one feed loop per broker process follows the store's
//! revocation log (for Redis, the stream every replica appends to, so a revocation made on any
//! replica reaches the watchers of all) and fans each entry out to this process's watchers. A
//! watch first delivers the current revoked-and-unexpired set (or, resuming after a cursor,
//! every entry since), then live entries, with heartbeats while the feed is known to be current.

use super::Exhaustion;
use crate::store::LogRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerError};
use crate::identity::PeerIdentity;
use crate::lease::{Cursor, Revocation};
use crate::net::{KeyedSlot, KeyedSlots};
use crate::policy::{Policies, PolicyAction, Resource};
use crate::store::{Epoch, Store, unix_ms};

/// How long one read of the log waits for an entry; also how often an idle feed proves the
/// store answers.
const FEED_WAIT: Duration = Duration::from_secs(2);
/// Entries read per store call.
const PAGE: usize = 512;
/// Live entries buffered per process; a watcher further behind catches up from the store.
const BUFFER: usize = 4096;
/// First and longest pause after the store failed.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How often a watch says it is alive when nothing happens.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A feed whose last successful read is older than this (ms) is not current: watches get no
/// heartbeat, so verifiers see their view go stale.
const FEED_CURRENT_MS: u64 = 6000;
/// Most open watches per broker process.
pub const MAX_WATCHES: usize = 1024;
/// Most open watches of one identity per broker process: a verifier that opens more is
/// misbehaving, and no identity can take the slots of the others.
pub const MAX_WATCHES_PER_IDENTITY: usize = 16;
/// Longest audience filter accepted.
const MAX_AUDIENCE_BYTES: usize = 256;

/// Gauge of open watches in this process.
pub const WATCHERS: &str = "taskcred_revocation_watchers";
/// Counter of revocation entries this process's feed read from the store.
pub const FED: &str = "taskcred_revocations_fed_total";

/// The fan-out point of one process: the feed loop sends, watches receive.
#[derive(Debug)]
pub(super) struct RevocationHub {
    live: broadcast::Sender<Arc<Revocation>>,
    /// Set once the feed knows where the log ends: a backlog read after that misses nothing.
    ready: tokio::sync::watch::Sender<bool>,
    /// When the feed last read the log successfully (ms since the epoch; 0 never).
    current_ms: AtomicU64,
    watches: Arc<Semaphore>,
    /// Open watches by identity.
    per_identity: KeyedSlots,
    /// Cancelled when the feed stops (the broker shuts down): watches end, so that the server
    /// can drain.
    stopping: CancellationToken,
}

impl Default for RevocationHub {
    fn default() -> Self {
        Self {
            live: broadcast::Sender::new(BUFFER),
            ready: tokio::sync::watch::Sender::new(false),
            current_ms: AtomicU64::new(0),
            watches: Arc::new(Semaphore::new(MAX_WATCHES)),
            per_identity: KeyedSlots::new(MAX_WATCHES_PER_IDENTITY),
            stopping: CancellationToken::new(),
        }
    }
}

/// What a watch delivers next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A credential revoked before its expiry.
    Revoked(Arc<Revocation>),
    /// Everything up to `cursor` was delivered: the backlog is done and live entries follow.
    /// `epoch`: the store's epoch (credentials issued before it began are void).
    Synced {
        /// Where the watch stands.
        cursor: Cursor,
        /// The store's epoch, once known.
        epoch: Option<Epoch>,
    },
    /// Nothing new up to `cursor`, and the feed is current.
    Heartbeat {
        /// Where the watch stands.
        cursor: Cursor,
        /// The store's epoch, once known.
        epoch: Option<Epoch>,
    },
}

/// One watcher's view: the backlog from the store, then the live entries of the hub.
#[derive(Debug)]
pub struct RevocationWatch {
    /// The broker that authorized the watch: it authorizes it again when the policies change.
    broker: Broker,
    /// Who watches, and until when its certificate is honoured.
    caller: PeerIdentity,
    /// The policies the watch was last authorized under.
    policies: Arc<Policies>,
    store: Arc<dyn Store>,
    hub: Arc<RevocationHub>,
    epoch: Arc<super::epoch::EpochState>,
    clock: Arc<dyn crate::clock::Clock>,
    live: broadcast::Receiver<Arc<Revocation>>,
    audience: Option<String>,
    /// Everything up to here was delivered or passed over.
    at: Cursor,
    /// Entries read from the store and not yet delivered (the backlog or a catch-up).
    pending: std::collections::VecDeque<Revocation>,
    /// Still reading from the store (the backlog, or catching up after falling behind).
    catching_up: bool,
    /// Whether `Synced` was sent.
    synced: bool,
    /// When the last event was delivered (heartbeats count from there).
    last_sent: tokio::time::Instant,
    _permit: OwnedSemaphorePermit,
    _identity: KeyedSlot,
}

impl Broker {
    /// Follows the store's revocation log until `shutdown`, fanning entries out to this
    /// process's watches. Retries with backoff while the store fails.
    pub async fn run_revocation_feed(self, shutdown: CancellationToken) {
        let hub = self.revocations.clone();
        let _stop_watches = hub.stopping.clone().drop_guard();
        let mut backoff = BACKOFF.0;
        let mut cursor: Option<Cursor> = None;
        loop {
            let read = async {
                let after = match cursor {
                    Some(c) => c,
                    None => self.store.revocation_head().await?,
                };
                let read = LogRead {
                    after: Some(after),
                    limit: PAGE,
                    wait: FEED_WAIT,
                };
                let got = self.store.revocations(read).await?;
                Ok::<_, crate::store::StoreError>((after, got))
            };
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                r = read => r,
            };
            match result {
                Ok((after, got)) => {
                    backoff = BACKOFF.0;
                    cursor = Some(got.last().map_or(after, |r| r.cursor));
                    hub.ready.send_replace(true);
                    metrics::counter!(FED).increment(got.len() as u64);
                    for r in got {
                        // No receiver is fine: nobody watches.
                        let _ = hub.live.send(Arc::new(r));
                    }
                    hub.current_ms
                        .store(unix_ms(SystemTime::now()), Ordering::Release);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the revocation log failed; will retry");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// Opens a watch of revocations for a caller policy lets watch (`WatchRevocations`: a
    /// verifier's role): after `after` when resuming, else from the current
    /// revoked-and-unexpired set; only JWTs for `audience` when given.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] for a bad audience; [`BrokerError::Denied`] by policy;
    /// [`BrokerError::OutOfRange`] for a cursor past the end of the log (a verifier that
    /// resumed there would believe itself current while missing what follows);
    /// [`BrokerError::Exhausted`] when this process has [`MAX_WATCHES`] open, or the caller
    /// [`MAX_WATCHES_PER_IDENTITY`]; [`BrokerError::Unavailable`].
    pub async fn watch_revocations(
        &self,
        peer: &PeerIdentity,
        after: Option<Cursor>,
        audience: Option<String>,
    ) -> Result<RevocationWatch, BrokerError> {
        if let Some(a) = &audience
            && (a.is_empty() || a.len() > MAX_AUDIENCE_BYTES || a.chars().any(char::is_control))
        {
            return Err(BrokerError::Invalid {
                field: "audience",
                reason: format!(
                    "must be 1 to {MAX_AUDIENCE_BYTES} bytes without control characters"
                ),
            });
        }
        let caller = &peer.id;
        let policies = self.policy.current();
        self.authorize(caller, PolicyAction::WatchRevocations, &Resource::Broker)?;
        if let Some(after) = after {
            let head = self.store.revocation_head().await?;
            if after > head {
                return Err(BrokerError::OutOfRange { after, head });
            }
        }
        let identity = self
            .revocations
            .per_identity
            .try_take(caller.as_str())
            .ok_or(BrokerError::Exhausted(Exhaustion::WatchesOfIdentity))?;
        let permit = self
            .revocations
            .watches
            .clone()
            .try_acquire_owned()
            .map_err(|_| BrokerError::Exhausted(Exhaustion::Watches))?;
        tracing::debug!(%caller, ?after, ?audience, "revocation watch opened");
        Ok(RevocationWatch {
            broker: self.clone(),
            caller: peer.clone(),
            policies,
            store: self.store.clone(),
            hub: self.revocations.clone(),
            epoch: self.epoch_state(),
            clock: self.clock.clone(),
            // Subscribed before the backlog is read: nothing falls between the two.
            live: self.revocations.live.subscribe(),
            audience,
            at: after.unwrap_or(Cursor::START),
            pending: std::collections::VecDeque::new(),
            catching_up: true,
            synced: false,
            last_sent: tokio::time::Instant::now(),
            _permit: permit,
            _identity: identity,
        })
        .inspect(|_| metrics::gauge!(WATCHERS).increment(1.0))
    }
}

impl RevocationWatch {
    /// Whether `r` is for this watcher: unexpired, and for its audience if it has one.
    fn wanted(&self, r: &Revocation) -> bool {
        r.expires_at > self.clock.now()
            && self
                .audience
                .as_ref()
                .is_none_or(|a| r.audience.as_ref() == Some(a))
    }

    /// The next event: backlog entries, `Synced`, then live entries and heartbeats; `None`
    /// once the broker stops (the watcher resumes on another replica or after the restart).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the store fails while reading the backlog or catching
    /// up (the watcher reconnects and resumes from its last cursor).
    pub async fn next(&mut self) -> Result<Option<WatchEvent>, BrokerError> {
        self.still_authorized()?;
        let stopping = self.hub.stopping.clone();
        let event = tokio::select! {
            () = stopping.cancelled() => Ok(None),
            e = self.next_event() => e,
        };
        self.last_sent = tokio::time::Instant::now();
        // An event waits at most a heartbeat: the watch ends within one of the certificate's
        // expiry or of a policy set that no longer permits it.
        self.still_authorized()?;
        event
    }

    /// The watch's authorization, checked again before each event: the certificate is
    /// unexpired, and policy still permits `WatchRevocations` (asked again, and audited, when
    /// the policies in force changed since it last was).
    fn still_authorized(&mut self) -> Result<(), BrokerError> {
        if self.clock.now() >= self.caller.not_after {
            return Err(BrokerError::CertificateExpired);
        }
        let current = self.broker.policy.current();
        if !Arc::ptr_eq(&current, &self.policies) {
            self.broker.authorize(
                &self.caller.id,
                PolicyAction::WatchRevocations,
                &Resource::Broker,
            )?;
            self.policies = current;
        }
        Ok(())
    }

    /// As [`RevocationWatch::next`]; `None` too if the hub's senders are gone (they live as
    /// long as the hub this watch holds, so only in theory).
    async fn next_event(&mut self) -> Result<Option<WatchEvent>, BrokerError> {
        if !self.synced {
            // The backlog is read once the feed knows where the log ends (see `ready`).
            let mut ready = self.hub.ready.subscribe();
            if ready.wait_for(|r| *r).await.is_err() {
                return Ok(None);
            }
        }
        loop {
            if let Some(r) = self.pending.pop_front() {
                self.at = r.cursor;
                if self.wanted(&r) {
                    return Ok(Some(WatchEvent::Revoked(Arc::new(r))));
                }
                continue;
            }
            if self.catching_up {
                let page = self
                    .store
                    .revocations(LogRead {
                        after: Some(self.at),
                        limit: PAGE,
                        wait: Duration::ZERO,
                    })
                    .await?;
                if page.is_empty() {
                    self.catching_up = false;
                    if !self.synced {
                        self.synced = true;
                        return Ok(Some(WatchEvent::Synced {
                            cursor: self.at,
                            epoch: self.epoch.current(),
                        }));
                    }
                }
                self.pending.extend(page);
                continue;
            }
            let heartbeat = tokio::time::sleep_until(self.last_sent + HEARTBEAT);
            tokio::select! {
                got = self.live.recv() => match got {
                    Ok(r) if r.cursor > self.at => {
                        self.at = r.cursor;
                        if self.wanted(&r) {
                            return Ok(Some(WatchEvent::Revoked(r)));
                        }
                    }
                    Ok(_) => {} // delivered with the backlog already
                    Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                    Err(broadcast::error::RecvError::Closed) => return Ok(None),
                },
                () = heartbeat => {
                    let current = self.hub.current_ms.load(Ordering::Acquire);
                    if unix_ms(SystemTime::now()).saturating_sub(current) < FEED_CURRENT_MS {
                        return Ok(Some(WatchEvent::Heartbeat {
                            cursor: self.at,
                            epoch: self.epoch.current(),
                        }));
                    }
                    // Not current: no heartbeat; look again in a while.
                    self.last_sent = tokio::time::Instant::now();
                }
            }
        }
    }
}

impl Drop for RevocationWatch {
    fn drop(&mut self) {
        metrics::gauge!(WATCHERS).decrement(1.0);
        tracing::debug!(at = %self.at, "revocation watch closed");
    }
}
