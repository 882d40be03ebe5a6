//! Rate limits: a token bucket per identity (an agent's SPIFFE ID, a CI job's repository
//! identity) or per source address (the public RPCs, before anything is verified), in this
//! replica's memory. A bucket refills at `rate` per second
//! up to `burst`; an empty one refuses with the time until the next token. The map is bounded:
//! full buckets (identities quiet for a while) are dropped first, as they carry no state.
//!
//! Hand-written rather than `governor`: the keyed case is these few lines, without the extra
//! dependencies (dashmap, quanta) and their clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Identities refused because they went over their rate, by `kind`: the burst alert.
pub const RATE_LIMITED: &str = "taskcred_rate_limited_total";

/// Most identities tracked at once; past it, quiet ones are forgotten.
const MAX_KEYS: usize = 100_000;

/// What a bucket is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// An agent's issuance (tokens, certificates, renewals), by SPIFFE ID.
    Agent,
    /// A CI repository's exchanges, by its CI identity.
    CiRepository,
    /// The public RPCs (no client certificate), by source address, before any verification.
    Source,
}

impl Limited {
    /// The `kind` label of [`RATE_LIMITED`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::CiRepository => "ci",
            Self::Source => "source",
        }
    }
}

/// The key of a source address: the address itself for IPv4, its /64 for IPv6 (one host
/// commonly holds a whole /64, so finer keys would let it take many buckets).
pub fn source_key(addr: std::net::IpAddr) -> String {
    match addr {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = a.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The rate of one kind of identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens per second.
    pub per_second: f64,
    /// Largest burst.
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by identity.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Option<Rate>,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_key: HashMap<String, Bucket>,
    /// When the map was last swept for quiet keys: at most once a second, so that a flood of
    /// new keys (many source addresses) cannot make every call scan the whole map.
    swept: Option<Instant>,
}

impl RateLimiter {
    /// Buckets of `rate`; `None` limits nothing.
    pub fn new(rate: Option<Rate>) -> Self {
        Self {
            rate,
            buckets: Mutex::default(),
        }
    }

    /// Takes a token of `key` at `now`, or says how long until one is there.
    ///
    /// # Errors
    /// The wait until the next token.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        let buckets = &mut state.by_key;
        if !buckets.contains_key(key) {
            if buckets.len() >= MAX_KEYS {
                if state
                    .swept
                    .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
                {
                    state.swept = Some(now);
                    let full_after = Duration::from_secs_f64(rate.burst / rate.per_second);
                    buckets.retain(|_, b| now.saturating_duration_since(b.at) < full_after);
                }
                if buckets.len() >= MAX_KEYS {
                    // Every bucket is busy: refuse the newcomer rather than grow without bound.
                    return Err(Duration::from_secs(1));
                }
            }
            // The key is copied only for an identity not seen (or forgotten) before.
            buckets.insert(
                key.to_owned(),
                Bucket {
                    tokens: rate.burst,
                    at: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(rate.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / rate.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_identity() {
        let limiter = RateLimiter::new(Some(Rate {
            per_second: 10.0,
            burst: 3.0,
        }));
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take("a", t0).unwrap();
        }
        let wait = limiter.take("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        // Another identity has its own bucket.
        limiter.take("b", t0).unwrap();
        // 100 ms later one token is back, not two.
        let t1 = t0 + Duration::from_millis(100);
        limiter.take("a", t1).unwrap();
        assert!(limiter.take("a", t1).is_err());
        // Unlimited without a rate.
        let open = RateLimiter::new(None);
        for _ in 0..1000 {
            open.take("a", t0).unwrap();
        }
    }
}
