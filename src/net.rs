//! Connection budgets shared by the gRPC and HTTP ports: [`KeyedSlots`], a cap on how many
//! connections (or watches) one key holds at once (a source address, an identity), and
//! [`Lifetime`], the clock that ends a connection once it has been idle for too long or has
//! lived its maximum age.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// At most `cap` slots per key at once.
#[derive(Debug, Clone)]
pub struct KeyedSlots {
    cap: usize,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// One slot of a key, given back when dropped.
#[derive(Debug)]
pub struct KeyedSlot {
    key: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl KeyedSlots {
    /// Slots of at most `cap` per key.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            counts: Arc::default(),
        }
    }

    /// A slot of `key`, unless it holds `cap` already.
    pub fn try_take(&self, key: &str) -> Option<KeyedSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key.to_owned()).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(KeyedSlot {
            key: key.to_owned(),
            counts: self.counts.clone(),
        })
    }
}

impl Drop for KeyedSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// When a connection ends by itself: `idle` after its last activity (while nothing is in
/// flight), and in any case `max_age` after it began. Polled from the connection's `poll_read`
/// when there is nothing to read.
#[derive(Debug)]
pub struct Lifetime {
    idle: Duration,
    ends_at: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl Lifetime {
    /// A clock started now.
    pub fn new(idle: Duration, max_age: Option<Duration>) -> Self {
        let now = Instant::now();
        Self {
            idle,
            ends_at: max_age.map(|m| now + m),
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Whether the connection has ended: `last` is when it was last busy, `None` while busy
    /// (something in flight). Registers a wake-up for when it would end.
    pub fn poll_ended(&mut self, cx: &mut Context<'_>, last: Option<Instant>) -> bool {
        loop {
            let now = Instant::now();
            if self.ends_at.is_some_and(|e| e <= now) {
                return true;
            }
            let idle_end = match last {
                Some(l) if l + self.idle <= now => return true,
                Some(l) => l + self.idle,
                None => now + self.idle,
            };
            let next = self.ends_at.map_or(idle_end, |e| e.min(idle_end));
            self.timer.as_mut().reset(next);
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_cap() {
        let slots = KeyedSlots::new(2);
        let a = slots.try_take("a").unwrap();
        let _b = slots.try_take("a").unwrap();
        assert!(slots.try_take("a").is_none());
        assert!(slots.try_take("other").is_some());
        drop(a);
        assert!(slots.try_take("a").is_some());
    }

    #[tokio::test]
    async fn idle_and_max_age_end_a_connection() {
        let waker = std::task::Waker::noop().clone();
        let mut cx = Context::from_waker(&waker);
        let ms = Duration::from_millis;
        let mut life = Lifetime::new(ms(200), Some(ms(600)));
        let start = Instant::now();
        assert!(!life.poll_ended(&mut cx, Some(start)));
        tokio::time::sleep(ms(100)).await;
        assert!(!life.poll_ended(&mut cx, Some(start)));
        tokio::time::sleep(ms(150)).await;
        assert!(life.poll_ended(&mut cx, Some(start)), "idle");
        // Busy: only the maximum age ends it.
        assert!(!life.poll_ended(&mut cx, None));
        tokio::time::sleep(ms(400)).await;
        assert!(life.poll_ended(&mut cx, None), "max age");
    }
}
