//! The revocation auditor: one audit line for every entry of the store's durable revocation log,
//! so that no revocation goes unaccounted, even when the replica that revoked died before it
//! could write its own line (a lock, a completion, a sweep). The store logs each revocation in
//! the same atomic step as the revocation itself; one replica at a time (the holder of a store
//! claim, kept while it works and taken over when it lapses) writes a `CredentialRevoked` line
//! per entry, then moves the committed cursor (another claim, moved only from the value it
//! holds) past them. A replica that dies between its lines and the commit leaves at most one
//! batch to be written again by the next auditor: such a duplicate carries the same `cursor`,
//! by which a reader tells it apart. Expiry is not logged (verifiers check `exp`): the reaper's
//! `LeaseExpired` lines cover it.

use crate::store::{Claim, LogRead};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerError};
use crate::audit::AuditEvent;
use crate::lease::{CredentialKind, Cursor};

/// The claim of the replica that audits the log.
pub const AUDITOR_CLAIM: &str = "revocation-auditor";
/// The claim holding the cursor of the last entry audited.
pub const AUDITED_CURSOR: &str = "revocations-audited";
/// How long the auditor's claim lasts unless renewed; another replica takes over after it.
const LEADER_TTL: Duration = Duration::from_secs(6);
/// How long one step waits for new entries (well inside [`LEADER_TTL`]).
const WAIT: Duration = Duration::from_secs(2);
/// Entries audited per step.
const BATCH: usize = 256;
/// How long the committed cursor is kept (renewed at every commit).
const CURSOR_TTL: Duration = Duration::from_secs(400 * 24 * 3600);
/// Pause after a failure, and while another replica audits.
const PAUSE: Duration = Duration::from_secs(1);

/// Counter of revocation log entries audited by this process.
pub const REVOCATIONS_AUDITED: &str = "taskcred_revocations_audited_total";
/// Counter of auditor steps that failed (store or audit log unavailable).
pub const REVOCATION_AUDIT_FAILURES: &str = "taskcred_revocation_audit_failures_total";

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStep {
    /// Whether this process is the auditor.
    pub auditor: bool,
    /// Entries audited.
    pub audited: usize,
}

impl Broker {
    /// One step of the auditor `me` (a name unique to this process): unless another replica
    /// holds the auditor's claim, audits the log entries after the committed cursor (waiting a
    /// little for some) and commits the cursor past them.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] and the like from the store; [`BrokerError::AuditFailed`]
    /// when a line cannot be written (nothing is committed: the entries are audited later).
    pub async fn audit_revocations(&self, me: &str) -> Result<AuditStep, BrokerError> {
        if !self.hold_auditor_claim(me).await? {
            return Ok(AuditStep::default());
        }
        let start = Cursor::START.to_string();
        let committed = match self
            .store
            .claim(&Claim {
                key: AUDITED_CURSOR,
                value: &start,
                until: SystemTime::now() + CURSOR_TTL,
            })
            .await?
        {
            Some(c) => c,
            None => start,
        };
        let after = Cursor::parse(&committed).ok_or_else(|| {
            BrokerError::Internal(format!("audited revocation cursor {committed:?}"))
        })?;
        let read = LogRead {
            after: Some(after),
            limit: BATCH,
            wait: WAIT,
        };
        let entries = self.store.revocations(read).await?;
        let Some(last) = entries.last().map(|e| e.cursor) else {
            return Ok(AuditStep {
                auditor: true,
                audited: 0,
            });
        };
        // Still the auditor: another may have taken over while this one waited.
        if !self.hold_auditor_claim(me).await? {
            return Ok(AuditStep::default());
        }
        for e in &entries {
            let credential_key = match e.kind {
                CredentialKind::Jwt => "jti",
                CredentialKind::X509 => "serial",
            };
            self.audit
                .record_or_refuse(
                    &AuditEvent::new(e.revoked_at, "CredentialRevoked", "broker", true)
                        .task(e.task)
                        .reason(e.reason.as_str())
                        .detail("cursor", e.cursor.to_string())
                        .detail("lease_id", e.lease.as_str())
                        .detail("agent", e.agent.as_str())
                        .detail(credential_key, e.credential.as_str())
                        .detail_opt("audience", e.audience.as_deref())
                        .detail(
                            "exp",
                            e.expires_at
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                        ),
                )
                .map_err(|err| BrokerError::AuditFailed(err.to_string()))?;
        }
        // The lines reach the disk before the cursor moves past them.
        self.sync_audit().await;
        let moved = self
            .store
            .swap_claim(
                &committed,
                &Claim {
                    key: AUDITED_CURSOR,
                    value: &last.to_string(),
                    until: SystemTime::now() + CURSOR_TTL,
                },
            )
            .await?;
        if !moved {
            // Another auditor committed meanwhile (this one's claim had lapsed): what was
            // written here is a duplicate of its lines, told apart by the cursor.
            tracing::warn!(
                after = %committed,
                "revocation auditor: the cursor moved under this replica; lines may repeat"
            );
            return Ok(AuditStep::default());
        }
        metrics::counter!(REVOCATIONS_AUDITED).increment(entries.len() as u64);
        Ok(AuditStep {
            auditor: true,
            audited: entries.len(),
        })
    }

    /// Takes or keeps the auditor's claim for `me`; whether `me` holds it.
    async fn hold_auditor_claim(&self, me: &str) -> Result<bool, BrokerError> {
        let until = SystemTime::now() + LEADER_TTL;
        let claim = Claim {
            key: AUDITOR_CLAIM,
            value: me,
            until,
        };
        Ok(match self.store.claim(&claim).await? {
            None => true,
            Some(holder) if holder == me => self.store.swap_claim(me, &claim).await?,
            Some(_) => false,
        })
    }

    /// Runs the auditor until `shutdown`.
    pub async fn run_revocation_auditor(self, shutdown: CancellationToken) {
        let me = uuid::Uuid::now_v7().simple().to_string();
        let mut failing = false;
        loop {
            let pause = match self.audit_revocations(&me).await {
                Ok(step) => {
                    if failing {
                        tracing::info!("revocation auditor caught up");
                        failing = false;
                    }
                    match (step.auditor, step.audited) {
                        // More may be waiting; the log read waited already when it was empty.
                        (true, _) => Duration::ZERO,
                        (false, _) => PAUSE,
                    }
                }
                Err(e) => {
                    metrics::counter!(REVOCATION_AUDIT_FAILURES).increment(1);
                    if !failing {
                        tracing::warn!(error = %e, "revocation auditor: will retry");
                    }
                    failing = true;
                    PAUSE
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        // Let another replica take over at once.
        if let Err(e) = self.store.release_claim(AUDITOR_CLAIM, &me).await {
            tracing::debug!(error = %e, "releasing the auditor's claim failed; it lapses");
        }
    }
}
