//! The audit log: one JSON line per decision, allow and deny, apart from the debug logs. Lines
//! carry ids and hashes, never a token, key or CSR. The log is tamper-evident: each line carries,
//! in `prev`, the SHA-256 (hex) of the line before it (the first line of a new file: 64 zeros),
//! so that changing, removing or inserting a line breaks the chain at that line;
//! [`verify_chain`] (`taskcred audit verify FILE`) finds the first broken line. With
//! `audit.redis_stream`, every event also goes to one Redis stream shared by all replicas
//! ([`stream`]).

mod sample;
pub mod stream;

pub use sample::{SAMPLE_WINDOW, SAMPLES_PER_WINDOW, SUMMARY_ACTION, Sampler};

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// Audit write failures by `sink` (`file`, `redis`): a loud metric, a broker that cannot audit
/// should be looked at.
pub const AUDIT_WRITE_FAILURES: &str = "taskcred_audit_write_failures_total";

/// Refusals, by `action` and `reason`: `policy` (no permit), `rule` (the broker's own checks:
/// executor, grant, state, lock, replay...), `id_token` (a CI ID token failed verification).
pub const DENIALS: &str = "taskcred_denials_total";

/// The reason of a refusal because no policy permits: denials counted as `policy`.
pub const NOT_PERMITTED: &str = "not permitted by policy";

/// The principal of a refusal of a CI ID token that failed verification (who sent it is not
/// known): denials counted as `id_token`.
pub const UNVERIFIED_CI: &str = "ci:unverified";

/// The `prev` of the first line of a new log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Items one line lists at most: a decision that revoked more credentials is written as several
/// lines (`part` "i/n", `<key>_total`), so that no line nears [`MAX_LINE_BYTES`].
pub const LIST_PER_LINE: usize = 1000;

/// Longest line [`verify_chain`] reads, in bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Why an audit event was not written.
#[derive(Debug, thiserror::Error)]
#[error("audit write failed: {0}")]
pub struct AuditError(String);

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
    /// `allow`, `deny`, or `unknown` (a change the store did not answer: it may have been made).
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

    /// Marks the decision's outcome unknown (`"decision": "unknown"`): the store did not answer
    /// a change it was sent, so it may or may not have been made.
    #[must_use]
    pub fn outcome_unknown(mut self) -> Self {
        self.decision = "unknown";
        self
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

    /// Adds a fact that may be missing (nothing is written then).
    #[must_use]
    pub fn detail_opt(self, key: &str, value: Option<impl Into<serde_json::Value>>) -> Self {
        match value {
            Some(v) => self.detail(key, v),
            None => self,
        }
    }
}

/// The action of the line that records a torn last line cut at start.
pub const TORN_LINE_CUT: &str = "AuditTornLineCut";

/// When audit lines reach the disk (`audit.fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Each line is fsynced before the decision it records is answered: a power loss loses no
    /// line that was answered for; concurrent decisions share one fsync.
    Always,
    /// Lines are fsynced by a background task at most `audit.fsync_interval` after they are
    /// written (the default): a power loss (not a crash of the broker: the kernel has the
    /// lines) can lose up to that much.
    #[default]
    Interval,
    /// Left to the kernel (typically within 30 s).
    Never,
}

/// The open file, the hash of its last line, and its length up to the end of that line.
#[derive(Debug)]
struct Tail {
    file: File,
    last: String,
    /// Bytes of whole lines: a failed write is cut back to here.
    len: u64,
    /// A failed write could not be cut back: the next write tries again first.
    torn: bool,
}

/// Appends audit events to a file, chained.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
    required: bool,
    fsync: Fsync,
    /// A second handle of the file, to fsync it without holding up the writers.
    sync_handle: File,
    /// Lines written since the last fsync.
    dirty: std::sync::atomic::AtomicBool,
    /// With [`Fsync::Always`]: bytes of whole lines written so far, and (under its lock) the
    /// bytes known to be on disk. A writer fsyncs after its line unless an fsync begun after
    /// its line was written covered it: concurrent decisions share one fsync (group commit),
    /// and each is answered only once its own line is on disk.
    written: std::sync::atomic::AtomicU64,
    synced: Mutex<u64>,
    stream: Option<stream::StreamQueue>,
}

/// The end of a log as found at start.
struct End {
    /// The hash of the last whole line ([`GENESIS`] for none).
    last: String,
    /// Where the whole lines end.
    len: u64,
    /// Bytes after the last whole line: a line whose write was cut short.
    torn: Option<Vec<u8>>,
}

/// Reads the end of `file` (at most two [`MAX_LINE_BYTES`] back): the last whole line's hash,
/// and a torn fragment after it, if any.
fn read_end(file: &mut File) -> std::io::Result<End> {
    let len = file.seek(SeekFrom::End(0))?;
    // An empty file, or not a file (a device: nothing to read back, nothing to repair).
    if len == 0 || !file.metadata()?.is_file() {
        return Ok(End {
            last: GENESIS.to_owned(),
            len: 0,
            torn: None,
        });
    }
    let start = len.saturating_sub(2 * MAX_LINE_BYTES as u64);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(2 * MAX_LINE_BYTES as u64)
        .read_to_end(&mut tail)?;
    // The whole lines end after the last newline; what follows is torn.
    let whole = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn = (whole < tail.len()).then(|| tail[whole..].to_vec());
    let body = &tail[..whole.saturating_sub(1)];
    let last = if whole == 0 && start == 0 {
        GENESIS.to_owned()
    } else {
        let line = match body.iter().rposition(|b| *b == b'\n') {
            Some(i) => &body[i + 1..],
            None => body,
        };
        crate::mint::sha256_hex(line)
    };
    Ok(End {
        last,
        len: start + whole as u64,
        torn,
    })
}

/// Whether `fragment` is in fact a whole line that only lacks its newline: a JSON object chained
/// to `last`.
fn is_whole_line(fragment: &[u8], last: &str) -> bool {
    serde_json::from_slice::<serde_json::Value>(fragment)
        .ok()
        .and_then(|v| v.get("prev").and_then(|p| p.as_str()).map(|p| p == last))
        .unwrap_or(false)
}

impl AuditLog {
    /// Opens `path` for appending, creating it 0600, and continues the chain from its last
    /// whole line. A last line cut short (a crash or a full disk mid-write) is cut off and a
    /// [`TORN_LINE_CUT`] line records the cut (its length and hash), chained to the last whole
    /// line: the chain stays verifiable and the loss is on record. A last line that is whole but
    /// for its newline gets its newline.
    ///
    /// # Errors
    /// When the file cannot be opened, read or repaired.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let end = read_end(&mut file)?;
        let sync_handle = file.try_clone()?;
        let mut tail = Tail {
            file,
            last: end.last,
            len: end.len,
            torn: false,
        };
        let mut cut = None;
        match end.torn {
            None => {}
            Some(fragment) if is_whole_line(&fragment, &tail.last) => {
                tail.file.write_all(b"\n")?;
                tail.last = crate::mint::sha256_hex(&fragment);
                tail.len += fragment.len() as u64 + 1;
            }
            Some(fragment) => {
                tracing::error!(
                    path = %path.display(),
                    bytes = fragment.len(),
                    "the audit log's last line was cut short (a crash or a full disk while it \
                     was written); it is cut off and the cut is recorded"
                );
                tail.file.set_len(tail.len)?;
                cut = Some(fragment);
            }
        }
        let log = Self {
            path: path.to_owned(),
            written: std::sync::atomic::AtomicU64::new(tail.len),
            tail: Mutex::new(tail),
            required: true,
            fsync: Fsync::default(),
            synced: Mutex::new(0),
            sync_handle,
            dirty: std::sync::atomic::AtomicBool::new(false),
            stream: None,
        };
        if let Some(fragment) = cut {
            log.write(
                &AuditEvent::new(SystemTime::now(), TORN_LINE_CUT, "audit", true)
                    .reason("a line cut short at the end of the log was removed at start")
                    .detail("cut_bytes", fragment.len())
                    .detail("cut_sha256", crate::mint::sha256_hex(&fragment)),
            )
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            log.sync()?;
        }
        Ok(log)
    }

    /// When lines reach the disk (`audit.fsync`).
    #[must_use]
    pub fn fsync(mut self, fsync: Fsync) -> Self {
        self.fsync = fsync;
        self
    }

    /// Fsyncs what was written (with [`Fsync::Interval`], the broker calls this every
    /// `audit.fsync_interval`; without new lines it does nothing).
    ///
    /// # Errors
    /// When the file cannot be synced.
    pub fn sync(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.sync_handle.sync_data().inspect_err(|_| {
                self.dirty.store(true, Ordering::Release);
            })?;
        }
        Ok(())
    }

    /// Makes sure the bytes up to `end` are on disk: at once if an fsync begun after they were
    /// written has covered them, else by an fsync of everything written so far.
    fn sync_through(&self, end: u64) -> std::io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if *synced >= end {
            return Ok(());
        }
        let upto = self.written.load(std::sync::atomic::Ordering::Acquire);
        self.sync_handle.sync_data()?;
        *synced = upto.max(end);
        Ok(())
    }

    /// Whether the background fsync is asked for.
    pub fn syncs_on_interval(&self) -> bool {
        self.fsync == Fsync::Interval
    }

    /// Also sends every event to the shared Redis stream, through `queue`
    /// ([`stream::StreamWriter`]).
    #[must_use]
    pub fn with_stream(mut self, queue: stream::StreamQueue) -> Self {
        self.stream = Some(queue);
        self
    }

    /// Whether issuance fails closed when its audit line cannot be written (`audit.required`).
    #[must_use]
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// Writes one event as one line, chained to the previous one. A failure is logged and
    /// counted, never silent; the use cases that must not go on unaudited use
    /// [`AuditLog::record_or_refuse`].
    pub fn record(&self, event: &AuditEvent) {
        let _ = self.write(event);
    }

    /// Records `event` listing `items` under `key`: one line, or one line per
    /// [`LIST_PER_LINE`] items, each a copy of the event with its part and the total.
    pub fn record_listing(&self, event: AuditEvent, key: &str, items: &[&str]) {
        let parts = items.len().div_ceil(LIST_PER_LINE);
        if parts <= 1 {
            self.record(&event.detail(key, items.to_vec()));
            return;
        }
        for (i, chunk) in items.chunks(LIST_PER_LINE).enumerate() {
            self.record(
                &event
                    .clone()
                    .detail(key, chunk.to_vec())
                    .detail(&format!("{key}_total"), items.len())
                    .detail("part", format!("{}/{parts}", i + 1)),
            );
        }
    }

    /// As [`AuditLog::record`]; when the line could not be written and the log is required,
    /// the caller must not go on (no credential leaves unaudited).
    ///
    /// # Errors
    /// [`AuditError`] when the line was not written and the log is required.
    pub fn record_or_refuse(&self, event: &AuditEvent) -> Result<(), AuditError> {
        match self.write(event) {
            Err(e) if self.required => Err(e),
            _ => Ok(()),
        }
    }

    fn write(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let fail = |what: String| {
            metrics::counter!(AUDIT_WRITE_FAILURES, "sink" => "file").increment(1);
            tracing::error!(path = %self.path.display(), error = %what, "audit write failed");
            AuditError(what)
        };
        // Serialized outside the lock; under it only `prev` is spliced in (the event is a
        // non-empty JSON object, so it ends with `}`), hashed and written: lines never
        // interleave, and each names the line before it.
        let json = serde_json::to_vec(event).map_err(|e| fail(e.to_string()))?;
        if let Some(Err(e)) = self.stream.as_ref().map(|q| q.try_send(json.clone())) {
            stream::failed(&format!("event dropped: {e}"));
        }
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.torn {
            // An earlier failed write left part of a line: cut it before going on.
            let len = tail.len;
            tail.file
                .set_len(len)
                .map_err(|e| fail(format!("cutting back a failed write: {e}")))?;
            tail.torn = false;
        }
        let mut line = stream::chain(json, &tail.last);
        let hash = crate::mint::sha256_hex(&line);
        line.push(b'\n');
        if let Err(e) = tail.file.write_all(&line).and_then(|()| tail.file.flush()) {
            // A full disk may have taken part of the line: cut the file back to the last whole
            // line, so that the next line follows it (else the chain would break there for good).
            let len = tail.len;
            if tail.file.set_len(len).is_err() {
                tail.torn = true;
            }
            return Err(fail(e.to_string()));
        }
        tail.last = hash;
        tail.len += line.len() as u64;
        let end = tail.len;
        self.written
            .store(end, std::sync::atomic::Ordering::Release);
        drop(tail);
        if self.fsync == Fsync::Always {
            self.sync_through(end)
                .map_err(|e| fail(format!("fsync: {e}")))?;
        }
        if self.fsync == Fsync::Interval {
            self.dirty.store(true, std::sync::atomic::Ordering::Release);
        }
        if event.decision == "deny" && event.action != SUMMARY_ACTION {
            let reason = if event.principal == UNVERIFIED_CI {
                "id_token"
            } else if event.reason.as_deref() == Some(NOT_PERMITTED) {
                "policy"
            } else {
                "rule"
            };
            metrics::counter!(DENIALS, "action" => event.action, "reason" => reason).increment(1);
        }
        Ok(())
    }
}

/// What [`verify_chain`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainReport {
    /// Every line is JSON with the hash of the line before it.
    Intact {
        /// Lines read.
        lines: u64,
        /// The `prev` of the first line ([`GENESIS`] for a log started from nothing; another
        /// value for a log that continues a rotated-out file).
        anchor: String,
        /// The hash of the last line: keep it elsewhere to detect a truncated tail.
        head: String,
    },
    /// The first line that breaks the chain.
    Broken {
        /// Its number, from 1.
        line: u64,
        /// What is wrong.
        problem: String,
    },
}

/// Checks the chain of the audit log read from `input`.
///
/// # Errors
/// When `input` cannot be read.
pub fn verify_chain(input: impl std::io::Read) -> std::io::Result<ChainReport> {
    let mut reader = std::io::BufReader::new(input);
    let mut prev: Option<String> = None;
    let mut anchor = String::new();
    let mut n = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        n += 1;
        let broken = |problem: &str| {
            Ok(ChainReport::Broken {
                line: n,
                problem: problem.to_owned(),
            })
        };
        if line.last() != Some(&b'\n') {
            return broken(if line.len() > MAX_LINE_BYTES {
                "longer than the longest line the broker writes"
            } else {
                "incomplete (no newline at its end)"
            });
        }
        line.pop();
        let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(&line) else {
            return broken("not a JSON object");
        };
        let Some(claimed) = fields.get("prev").and_then(serde_json::Value::as_str) else {
            return broken("has no prev");
        };
        match &prev {
            None => anchor = claimed.to_owned(),
            Some(p) if p != claimed => {
                return broken(&format!(
                    "its prev is not the hash of line {}: that line or this one was changed, \
                     or lines were removed or inserted between them",
                    n - 1
                ));
            }
            Some(_) => {}
        }
        prev = Some(crate::mint::sha256_hex(&line));
    }
    Ok(ChainReport::Intact {
        lines: n,
        anchor,
        head: prev.unwrap_or_else(|| GENESIS.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(i: u64) -> AuditEvent {
        AuditEvent::new(SystemTime::now(), "IssueToken", "spiffe://t/a", true).detail("i", i)
    }

    #[test]
    fn a_long_listing_is_split_into_bounded_chained_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let ids: Vec<String> = (0..2500).map(|i| format!("{i:032x}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        log.record_listing(event(1), "revoked_credentials", &refs);
        log.record_listing(event(2), "revoked_credentials", &refs[..3]);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        let mut listed = Vec::new();
        for (i, l) in lines[..3].iter().enumerate() {
            assert_eq!(l["details"]["part"], format!("{}/3", i + 1));
            assert_eq!(l["details"]["revoked_credentials_total"], 2500);
            listed.extend(
                l["details"]["revoked_credentials"]
                    .as_array()
                    .unwrap()
                    .clone(),
            );
        }
        assert_eq!(listed.len(), 2500, "every id once");
        assert!(
            lines[3]["details"].get("part").is_none(),
            "short lists stay one line"
        );
        assert!(matches!(
            verify_chain(std::fs::File::open(&path).unwrap()).unwrap(),
            ChainReport::Intact { lines: 4, .. }
        ));
    }

    /// With fsync = always, concurrent writers share fsyncs, every line is written once and
    /// whole, and the chain holds; each writer's own line is on disk when it returns (its end
    /// is at most what is known synced).
    #[test]
    fn concurrent_lines_share_fsyncs_and_keep_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = std::sync::Arc::new(AuditLog::open(&path).unwrap().fsync(Fsync::Always));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = std::sync::Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..25 {
                        log.record_or_refuse(&event(t * 100 + i)).unwrap();
                        let written = log.written.load(std::sync::atomic::Ordering::Acquire);
                        assert!(*log.synced.lock().unwrap() > 0 && written > 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let synced = *log.synced.lock().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(synced, len, "every line written is known to be on disk");
        assert!(matches!(
            verify_chain(std::fs::File::open(&path).unwrap()).unwrap(),
            ChainReport::Intact { lines: 200, .. }
        ));
    }

    #[test]
    fn the_chain_continues_across_reopens_and_shows_the_first_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..3 {
            log.record(&event(i));
        }
        drop(log);
        let log = AuditLog::open(&path).unwrap();
        log.record_or_refuse(&event(3)).unwrap();
        drop(log);
        let text = std::fs::read(&path).unwrap();
        let report = verify_chain(text.as_slice()).unwrap();
        let ChainReport::Intact { lines, anchor, .. } = report else {
            panic!("{report:?}")
        };
        assert_eq!((lines, anchor.as_str()), (4, GENESIS));

        // One byte of line 2 changed: line 3 no longer follows.
        let mut changed = text.clone();
        let second = changed.iter().position(|b| *b == b'\n').unwrap() + 1;
        let at = second
            + changed[second..]
                .windows(5)
                .position(|w| w == b"Issue")
                .unwrap();
        changed[at] = b'X';
        assert_eq!(
            verify_chain(changed.as_slice()).unwrap(),
            ChainReport::Broken {
                line: 3,
                problem: "its prev is not the hash of line 2: that line or this one was changed, \
                          or lines were removed or inserted between them"
                    .into()
            }
        );
        // A line removed.
        let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
        let removed = [lines[0], lines[2], lines[3], b""].join(&b'\n');
        assert!(matches!(
            verify_chain(removed.as_slice()).unwrap(),
            ChainReport::Broken { line: 2, .. }
        ));
        // A cut-short tail (a crash, a full disk) is cut off on reopen and the cut recorded:
        // the chain stays whole, and says what was lost.
        std::fs::write(&path, &text[..text.len() - 5]).unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.record(&event(9));
        drop(log);
        let repaired = std::fs::read_to_string(&path).unwrap();
        assert!(matches!(
            verify_chain(repaired.as_bytes()).unwrap(),
            ChainReport::Intact { lines: 5, .. }
        ));
        let marker: serde_json::Value =
            serde_json::from_str(repaired.lines().nth(3).unwrap()).unwrap();
        assert_eq!(marker["action"], TORN_LINE_CUT);
        assert_eq!(
            marker["details"]["cut_bytes"],
            text.split(|b| *b == b'\n').nth(3).unwrap().len() - 4
        );
        // A last line whole but for its newline is kept.
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.record(&event(10));
        drop(log);
        assert!(matches!(
            verify_chain(std::fs::File::open(&path).unwrap()).unwrap(),
            ChainReport::Intact { lines: 6, .. }
        ));
    }
}
