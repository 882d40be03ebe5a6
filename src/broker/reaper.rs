//! The reaper: ends leases whose credential has expired and tasks past their deadline
//! (revoking their leases), in every broker process, and finishes the sweeps of locks that a
//! replica could not finish. It works from the store's indexes by
//! time, so its cost follows what falls due, not what lives; the store claims each lease
//! atomically, so with several replicas each is ended once. It sleeps until the next thing is
//! due (at most [`MAX_SLEEP`], which bounds how late it notices work filed by another
//! replica), or until this process files a lease that expires before then; when the store
//! fails it backs off and catches up once the store is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Broker;
use super::revoker::{Cause, Revoker};
use crate::audit::AuditEvent;
use crate::clock::Clock;
use crate::lease::LockOutcome;
use crate::store::{Store, StoreError, TaskChange, UpdateError, unix_ms};
use crate::task::Task;

/// Longest sleep between two rounds.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);
/// Shortest pause, so that a stuck entry cannot spin the reaper.
const MIN_SLEEP: Duration = Duration::from_millis(20);
/// First and longest pause after the store failed.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// Leases or tasks taken per store call.
const BATCH: usize = 256;
/// How often the reaper finishes the sweeps of locks in force (what a replica that died inside
/// a lock, or whose store failed during the sweep, left).
pub const LOCK_SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How long a new lock is left to the replica that wrote it: its own sweep answers the operator
/// with everything it ended, so the reaper does not take chunks from under it.
pub const LOCK_SWEEP_GRACE: Duration = Duration::from_secs(10);

/// Counter of leases the reaper ended as expired.
pub const LEASES_EXPIRED: &str = "taskcred_leases_expired_total";
/// Counter of tasks the reaper ended past their deadline.
pub const TASKS_EXPIRED: &str = "taskcred_tasks_expired_total";
/// Counter of reaper rounds that failed (store unavailable).
pub const REAPER_FAILURES: &str = "taskcred_reaper_failures_total";

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Leases ended as expired by this process.
    pub leases: usize,
    /// Tasks ended as expired by this process.
    pub tasks: usize,
    /// When the next thing falls due, if anything is filed.
    pub next: Option<SystemTime>,
}

/// How the issuance path reaches the reaper: the time it plans to wake, and a wake-up for a
/// lease that falls due before then. Most leases outlive the reaper's next round and cost one
/// atomic load.
#[derive(Debug, Default)]
pub(super) struct ReaperSignal {
    wake: Notify,
    /// When the reaper wakes next, in ms since the epoch (`u64::MAX` while a round runs).
    planned_ms: AtomicU64,
}

/// The reaper: holds only what it needs (the store, the revocation owner, the clock and its
/// wake-up signal), never the broker.
#[derive(Debug, Clone)]
pub struct Reaper {
    store: Arc<dyn Store>,
    revoker: Arc<Revoker>,
    clock: Arc<dyn Clock>,
    signal: Arc<ReaperSignal>,
}

impl ReaperSignal {
    /// Wakes the reaper if a lease filed now expires before it would wake.
    pub(super) fn wake_for(&self, expires_at: SystemTime) {
        if unix_ms(expires_at) < self.planned_ms.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }
}

impl Broker {
    /// Wakes the reaper if a lease filed now expires before it would wake.
    pub(super) fn wake_reaper_for(&self, expires_at: SystemTime) {
        self.reaper.wake_for(expires_at);
    }

    /// The reaper of this broker's store, woken by its issuances.
    pub fn reaper(&self) -> Reaper {
        Reaper {
            store: Arc::clone(&self.store),
            revoker: Arc::clone(&self.revoker),
            clock: Arc::clone(&self.clock),
            signal: Arc::clone(&self.reaper),
        }
    }
}

impl Reaper {
    /// One round: ends every lease and task due now, then says when the next is due.
    ///
    /// # Errors
    /// [`StoreError`]; what was ended stays ended.
    pub async fn reap(&self) -> Result<Reaped, StoreError> {
        let now = self.clock.now();
        let mut reaped = Reaped::default();
        loop {
            let ended = self.revoker.expire_leases(now, BATCH).await?;
            reaped.leases += ended.len();
            if ended.len() < BATCH {
                break;
            }
        }
        let expire: TaskChange = Arc::new(move |task: &mut Task| task.expire(now));
        // A task whose end fails stays due (the next round tries again) and does not hold up
        // the others of its batch; a batch of nothing but failures ends the round.
        let mut failed = 0usize;
        loop {
            let due = self.store.overdue_tasks(now, BATCH + failed).await?;
            let mut progressed = false;
            for id in due.iter().skip(failed) {
                let ended = self
                    .revoker
                    .end_task(id, expire.clone(), Cause::Deadline, |task| {
                        AuditEvent::new(now, "TaskExpired", "reaper", true)
                            .task(task.id)
                            .reason("deadline passed")
                    })
                    .await;
                // An ended task with children (filed due again when it ended, or past its
                // deadline): the tasks delegated below it end too, whoever ended it.
                let below = match ended {
                    Ok((task, _)) => {
                        metrics::counter!(TASKS_EXPIRED).increment(1);
                        reaped.tasks += 1;
                        Ok(Some(task))
                    }
                    // Ended before its deadline, by another replica, or pruned.
                    Err(UpdateError::Rejected(_) | UpdateError::NotFound) => {
                        self.store.get_task(id).await
                    }
                    Err(UpdateError::Store(e)) => Err(e),
                };
                let below = match below {
                    Ok(Some(task)) if task.state.is_terminal() && !task.children.is_empty() => self
                        .revoker
                        .end_below(&task, "reaper", now)
                        .await
                        .map(|_| ()),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = below {
                    metrics::counter!(REAPER_FAILURES).increment(1);
                    tracing::warn!(task = %id, error = %e, "reaper: ending an overdue task, or the tasks below it, failed; it stays due");
                    failed += 1;
                    continue;
                }
                self.store.forget_deadline(id).await?;
                progressed = true;
            }
            if due.len() < BATCH + failed || !progressed {
                break;
            }
        }
        reaped.next = self.store.next_due().await?;
        Ok(reaped)
    }

    /// The catch-up of locks: ends what a lock covers but a replica could not (it died inside
    /// the lock, or the store failed during its sweep), once the lock is older than
    /// [`LOCK_SWEEP_GRACE`]. Returns how many leases it revoked.
    ///
    /// # Errors
    /// [`StoreError`]; what was ended stays ended.
    pub async fn sweep_locks(&self) -> Result<usize, StoreError> {
        let mut revoked = 0;
        let now = self.clock.now();
        for lock in self.store.list_locks(now).await? {
            if now.duration_since(lock.at).unwrap_or_default() < LOCK_SWEEP_GRACE {
                continue;
            }
            let mut outcome = LockOutcome::default();
            let reason = format!("agent locked: {}", lock.reason);
            self.revoker
                .sweep_lock(&lock.agent, &reason, lock.at, &mut outcome)
                .await?;
            if !outcome.tasks.is_empty() || !outcome.leases.is_empty() {
                tracing::warn!(
                    agent = %lock.agent,
                    tasks = outcome.tasks.len(),
                    leases = outcome.leases.len(),
                    "ended what a lock covered and its replica could not"
                );
            }
            revoked += outcome.leases.len();
        }
        Ok(revoked)
    }

    /// Runs the reaper until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let signal = Arc::clone(&self.signal);
        let mut backoff = BACKOFF.0;
        let mut locks_swept = std::time::Instant::now();
        loop {
            if locks_swept.elapsed() >= LOCK_SWEEP_EVERY {
                locks_swept = std::time::Instant::now();
                if let Err(e) = self.sweep_locks().await {
                    tracing::warn!(error = %e, "reaper: finishing lock sweeps failed; will retry");
                }
            }
            // While a round runs, any lease filed may be missed by it: every filing leaves a
            // wake-up, so the round after starts at once.
            signal.planned_ms.store(u64::MAX, Ordering::Relaxed);
            let pause = match self.reap().await {
                Ok(r) => {
                    if backoff > BACKOFF.0 {
                        tracing::info!("reaper caught up after the store came back");
                    }
                    backoff = BACKOFF.0;
                    if r.leases + r.tasks > 0 {
                        tracing::debug!(leases = r.leases, tasks = r.tasks, "reaped");
                    }
                    r.next.map_or(MAX_SLEEP, |t| {
                        t.duration_since(self.clock.now())
                            .unwrap_or_default()
                            .clamp(MIN_SLEEP, MAX_SLEEP)
                    })
                }
                Err(e) => {
                    metrics::counter!(REAPER_FAILURES).increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, "reaper: store unavailable");
                    let pause = backoff;
                    backoff = (backoff * 2).min(BACKOFF.1);
                    pause
                }
            };
            signal
                .planned_ms
                .store(unix_ms(self.clock.now() + pause), Ordering::Relaxed);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
                () = signal.wake.notified() => {}
            }
        }
    }
}
