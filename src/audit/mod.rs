//! The audit log: one JSON line per decision, allow and deny, apart from the debug logs. Lines
//! carry ids, never a token, key or CSR. (A later issue adds the hash chain.)

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// Audit write failures (a loud metric: a broker that cannot audit should be looked at).
pub const AUDIT_WRITE_FAILURES: &str = "taskcred_audit_write_failures_total";

/// One decision.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// When, RFC 3339 with milliseconds.
    pub time: String,
    /// The action decided, e.g. `RequestTask`.
    pub action: &'static str,
    /// Who asked (SPIFFE ID).
    pub principal: String,
    /// The task concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The policies that determined the decision.
    pub policies: Vec<String>,
    /// Why, when the broker (not policy) decided or something failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Facts of the decision: state reached, quorum, approval id...
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl AuditEvent {
    /// An event at `now`.
    pub fn new(now: SystemTime, action: &'static str, principal: &str, allowed: bool) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(now).to_string(),
            action,
            principal: principal.to_owned(),
            task: None,
            decision: if allowed { "allow" } else { "deny" },
            policies: Vec::new(),
            reason: None,
            details: serde_json::Map::new(),
        }
    }

    /// Names the task.
    #[must_use]
    pub fn task(mut self, id: impl ToString) -> Self {
        self.task = Some(id.to_string());
        self
    }

    /// Names the deciding policies.
    #[must_use]
    pub fn policies(mut self, p: &[String]) -> Self {
        self.policies = p.to_vec();
        self
    }

    /// Says why.
    #[must_use]
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
        self
    }

    /// Adds a fact.
    #[must_use]
    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

/// Appends audit events to a file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens `path` for appending, creating it 0600.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// Writes one event as one line. A failure is logged and counted, never silent.
    pub fn record(&self, event: &AuditEvent) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => {
                metrics::counter!(AUDIT_WRITE_FAILURES).increment(1);
                tracing::error!(error = %e, "audit event does not serialize");
                return;
            }
        };
        line.push(b'\n');
        // One write per line under the lock, so lines never interleave.
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line).and_then(|()| file.flush()) {
            metrics::counter!(AUDIT_WRITE_FAILURES).increment(1);
            tracing::error!(path = %self.path.display(), error = %e, "audit write failed");
        }
    }
}
