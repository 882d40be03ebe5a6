//! Signing keys over time: every replica publishes the public key it signs with through the
//! store (a heartbeat that keeps it listed while it signs and for as long after as a token it
//! signed can live), reads back every published key so that its JWK Set and introspection know
//! them all, rotates its own key on an operator's request, and drops a revoked (compromised) key
//! everywhere: at once on the replica asked, at the next refresh on the others.

use crate::broker::Precondition;
use crate::store::Claim;
use std::time::{Duration, SystemTime};

use super::{Broker, BrokerError};
use crate::audit::AuditEvent;
use crate::identity::WorkloadId;
use crate::mint::{JwtKey, PublishedKey};
use crate::policy::{PolicyAction, Resource};

/// Prefix of the claim marking a signing key revoked.
const REVOKED_KEY_CLAIM: &str = "revoked-key";

/// How often each replica republishes its key and reads back the others'.
pub const KEY_REFRESH: Duration = Duration::from_secs(30);

/// Clock skew allowed to verifiers that check `exp` loosely: a key stays published this much
/// longer than the last token it signed can live.
const VERIFIER_LEEWAY: Duration = Duration::from_secs(60);

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The key that signed until now.
    pub previous_kid: String,
    /// The key that signs from now on.
    pub kid: String,
    /// Until when the previous key stays published (every token it signed has expired then).
    pub previous_published_until: SystemTime,
}

impl Broker {
    /// How long after its last signature a key must stay published.
    fn key_lifetime(&self) -> Duration {
        self.settings.limits.credential_ttl_max + VERIFIER_LEEWAY
    }

    /// Republishes the key this replica signs with (until its longest token could outlive two
    /// missed refreshes) and loads every published key into the ring. Run at start and every
    /// [`KEY_REFRESH`].
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`]; the ring keeps the keys it had.
    pub async fn refresh_signing_keys(&self) -> Result<usize, BrokerError> {
        let now = self.clock.now();
        let mut current = self.keys.current();
        // A key revoked on another replica is never signed with again.
        if self.key_revoked(current.kid()).await? {
            let _one = self.rotation.lock().await;
            if self.keys.current().kid() == current.kid() {
                tracing::error!(
                    kid = current.kid(),
                    "this replica's signing key was revoked; rotating"
                );
                self.rotate_now("key revocation", now).await?;
            }
            current = self.keys.current();
        }
        let until = now + self.key_lifetime() + 2 * KEY_REFRESH;
        self.store
            .publish_key(&PublishedKey::of(&current, until))
            .await?;
        let mut published = self.store.published_keys(now).await?;
        let mut kept = Vec::with_capacity(published.len());
        for p in published.drain(..) {
            if !self.key_revoked(&p.kid).await? {
                kept.push(p);
            }
        }
        Ok(self.keys.set_published(&kept))
    }

    /// Whether `kid` was revoked (`RevokeSigningKey`, on any replica).
    async fn key_revoked(&self, kid: &str) -> Result<bool, BrokerError> {
        Ok(self
            .store
            .claimed(&format!("{REVOKED_KEY_CLAIM}:{kid}"))
            .await?
            .is_some())
    }

    /// Drops the signing key `kid` from the JWK Set and introspection, if policy permits
    /// `caller`: at once here, at the next key refresh on the other replicas (a replica that
    /// signs with it rotates then). Returns the kids that still verify here.
    ///
    /// # Errors
    /// [`BrokerError::Denied`]; [`BrokerError::Precondition`] when this replica signs with it;
    /// [`BrokerError::NotFound`] when no key it knows has that kid; [`BrokerError::Unavailable`].
    pub async fn revoke_signing_key(
        &self,
        caller: &WorkloadId,
        kid: &str,
    ) -> Result<Vec<String>, BrokerError> {
        self.authorize(caller, PolicyAction::RevokeSigningKey, &Resource::Broker)?;
        let _one = self.rotation.lock().await;
        let now = self.clock.now();
        let refuse = |e: BrokerError| {
            self.audit.record(
                &AuditEvent::new(now, "RevokeSigningKey", caller.as_str(), false)
                    .reason(e.to_string())
                    .detail("kid", kid),
            );
            e
        };
        if self.keys.current().kid() == kid {
            return Err(refuse(BrokerError::Precondition(Precondition::KeyInUse)));
        }
        let Some(published) = self
            .store
            .published_keys(now)
            .await?
            .into_iter()
            .find(|p| p.kid == kid)
        else {
            return Err(refuse(BrokerError::NotFound(super::Missing::Key)));
        };
        // The mark first: every replica refuses the key once it sees it, whatever else fails.
        let until = now + self.key_lifetime() + 2 * KEY_REFRESH;
        self.store
            .claim(&Claim {
                key: &format!("{REVOKED_KEY_CLAIM}:{kid}"),
                value: "revoked",
                until,
            })
            .await?;
        self.store
            .publish_key(&PublishedKey {
                until: now,
                ..published
            })
            .await?;
        self.keys.forget(kid);
        tracing::warn!(%kid, operator = %caller, "signing key revoked");
        self.audit.record(
            &AuditEvent::new(now, "RevokeSigningKey", caller.as_str(), true).detail("kid", kid),
        );
        Ok(self.keys.kids())
    }

    /// Replaces this replica's JWT signing key, if policy permits `caller`: a fresh key of the
    /// same algorithm is published through the store, written over the configured key file
    /// (atomically, 0600, so a restart signs with it), and signs from then on. The previous key
    /// stays published until every token it signed has expired.
    ///
    /// With several replicas, each signs with the key of its own file: rotate each one (the
    /// JWK Set of every replica lists every replica's keys).
    ///
    /// # Errors
    /// [`BrokerError::Denied`]; [`BrokerError::Unavailable`] when the store cannot be written
    /// (nothing changed); [`BrokerError::Internal`] when the key file cannot be written (the
    /// old key keeps signing).
    pub async fn rotate_signing_key(&self, caller: &WorkloadId) -> Result<Rotation, BrokerError> {
        self.authorize(caller, PolicyAction::RotateSigningKey, &Resource::Broker)?;
        // One rotation at a time in this process: the key file has one writer.
        let _one = self.rotation.lock().await;
        self.rotate_now(caller.as_str(), self.clock.now()).await
    }

    /// Rotates (the caller holds `rotation`, or is the key refresh); `principal` is who asked.
    async fn rotate_now(&self, principal: &str, now: SystemTime) -> Result<Rotation, BrokerError> {
        let previous = self.keys.current();
        let next = JwtKey::generate(previous.algorithm())
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        // Verifiers learn the new key before it signs anything; a store that cannot be written
        // refuses the rotation with nothing changed.
        let until = now + self.key_lifetime() + 2 * KEY_REFRESH;
        self.store
            .publish_key(&PublishedKey::of(&next, until))
            .await?;
        // Then the file, so that a restart signs with the new key. A failure here leaves the
        // old key signing (the new one's publication lapses unused).
        let path = self.key_file.clone();
        let next = tokio::task::spawn_blocking(move || next.save(&path).map(|()| next))
            .await
            .map_err(|e| BrokerError::Internal(format!("writing the key: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "key rotation failed; the current key keeps signing");
                self.audit.record(
                    &AuditEvent::new(now, "RotateSigningKey", principal, false)
                        .reason(e.to_string()),
                );
                BrokerError::Internal(e.to_string())
            })?;
        let kid = next.kid().to_owned();
        self.keys
            .rotate(next)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        let previous_published_until = now + self.key_lifetime();
        if let Err(e) = self
            .store
            .publish_key(&PublishedKey::of(&previous, previous_published_until))
            .await
        {
            // Its heartbeat stays, a little longer than needed; never shorter.
            tracing::warn!(error = %e, kid = previous.kid(), "could not shorten the old key's publication");
        }
        tracing::info!(previous_kid = previous.kid(), kid, "signing key rotated");
        self.audit.record(
            &AuditEvent::new(now, "RotateSigningKey", principal, true)
                .detail("previous_kid", previous.kid())
                .detail("kid", kid.as_str()),
        );
        Ok(Rotation {
            previous_kid: previous.kid().to_owned(),
            kid,
            previous_published_until,
        })
    }
}
