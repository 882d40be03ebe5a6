//! [`Sampler`]: the audit record of refusals that anyone can cause without proving anything (an
//! ID token that fails verification, sent to a public RPC). Each one cannot have a line of its
//! own, or garbage would fill the disk and, with `audit.required`, stop every issuance. The
//! first [`SAMPLES_PER_WINDOW`] of each [`SAMPLE_WINDOW`] are written whole; the others are
//! counted, and one [`SUMMARY_ACTION`] line per window says how many were left out. Every one
//! is counted in the denials metric.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::{AuditEvent, AuditLog, DENIALS};

/// How long a window of samples lasts.
pub const SAMPLE_WINDOW: Duration = Duration::from_secs(60);
/// Refusals written whole per window.
pub const SAMPLES_PER_WINDOW: u32 = 20;
/// The action of a window's summary line.
pub const SUMMARY_ACTION: &str = "RefusalsSampled";

#[derive(Debug, Default)]
struct Window {
    started: Option<SystemTime>,
    written: u32,
    left_out: u64,
    principal: String,
}

/// Samples refusals into the audit log; see the module docs.
#[derive(Debug, Default)]
pub struct Sampler {
    window: Mutex<Window>,
}

impl Sampler {
    /// Records `event` (a refusal at `now`) whole if this window still has room, else counts it.
    pub fn record(&self, log: &AuditLog, event: &AuditEvent, now: SystemTime) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.started
            .is_none_or(|s| now >= s + SAMPLE_WINDOW || now < s)
        {
            Self::summarize(&mut w, log, now);
            w.started = Some(now);
        }
        if w.written < SAMPLES_PER_WINDOW {
            w.written += 1;
            drop(w);
            log.record(event);
            return;
        }
        w.left_out += 1;
        event.principal.clone_into(&mut w.principal);
        drop(w);
        metrics::counter!(DENIALS, "action" => event.action, "reason" => "id_token").increment(1);
    }

    /// Writes the summary of a window that has passed by `now` (called periodically, so that a
    /// burst is accounted for even when nothing follows it).
    pub fn flush(&self, log: &AuditLog, now: SystemTime) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.started.is_some_and(|s| now >= s + SAMPLE_WINDOW) {
            Self::summarize(&mut w, log, now);
        }
    }

    /// Writes the summary of the window (if anything was left out) and empties it.
    fn summarize(w: &mut Window, log: &AuditLog, now: SystemTime) {
        if let (Some(started), true) = (w.started, w.left_out > 0) {
            log.record(
                &AuditEvent::new(now, SUMMARY_ACTION, &w.principal, false)
                    .reason("refusals of unverified callers beyond the window's samples")
                    .detail("left_out", w.left_out)
                    .detail("samples", w.written)
                    .detail(
                        "window_start",
                        humantime::format_rfc3339_millis(started).to_string(),
                    ),
            );
        }
        *w = Window::default();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_burst_writes_its_samples_and_one_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let sampler = Sampler::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let event = AuditEvent::new(t0, "ExchangeCiToken", "ci:unverified", false);
        for i in 0..1000 {
            sampler.record(&log, &event, t0 + Duration::from_millis(i));
        }
        let lines = || std::fs::read_to_string(&path).unwrap();
        assert_eq!(lines().lines().count(), SAMPLES_PER_WINDOW as usize);
        // Not yet over: nothing more.
        sampler.flush(&log, t0 + Duration::from_secs(30));
        assert_eq!(lines().lines().count(), SAMPLES_PER_WINDOW as usize);
        sampler.flush(&log, t0 + SAMPLE_WINDOW);
        let text = lines();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["action"], SUMMARY_ACTION);
        assert_eq!(
            last["details"]["left_out"],
            1000 - u64::from(SAMPLES_PER_WINDOW)
        );
        // A new window samples again.
        sampler.record(&log, &event, t0 + 2 * SAMPLE_WINDOW);
        assert_eq!(
            lines().lines().count(),
            SAMPLES_PER_WINDOW as usize + 2,
            "samples, the summary, one new sample"
        );
        assert!(matches!(
            crate::audit::verify_chain(std::fs::File::open(&path).unwrap()).unwrap(),
            crate::audit::ChainReport::Intact { .. }
        ));
    }
}
