//! The record codec of the Redis store: how a task's hash fields, a lease record and a
//! revocation log entry become domain values. Tasks are JSON as written, with the fields a
//! lock's sweep changes in place laid over them; leases are compact binary records (see
//! [`encode_record`]) that the scripts change in place (`lua/lease.lua` reads the same
//! offsets).

use std::time::{Duration, SystemTime};

use redis::{FromRedisValue, ParsingError, Value};

use crate::identity::WorkloadId;
use crate::lease::{CredentialKind, Cursor, Lease, LeaseId, LeaseState, Revocation};
use crate::store::{StoreError, decode, from_unix_ms};
use crate::task::{Task, TaskId, TaskState};

/// The hash fields of a task as listed, in the order of [`TASK_FIELDS`].
pub(super) const TASK_FIELDS: [&str; 4] = ["data", "state", "ended_ms", "end_reason"];

/// The hash fields of a task as listed: `data`, and the overlay `state`, `ended_ms`,
/// `end_reason` a lock's sweep writes beside the JSON.
pub(super) struct TaskFields {
    /// The task as last written, JSON; `None` when the task does not exist.
    pub(super) data: Option<Vec<u8>>,
    /// The state a sweep gave it.
    pub(super) state: Option<String>,
    /// When the sweep ended it (ms since the epoch).
    pub(super) ended_ms: Option<u64>,
    /// Why the sweep ended it.
    pub(super) end_reason: Option<String>,
}

impl TaskFields {
    /// The task with its overlay laid over it; `None` when it does not exist.
    pub(super) fn into_task(self) -> Result<Option<Task>, StoreError> {
        let Some(data) = self.data else {
            return Ok(None);
        };
        with_overlay(decode(&data)?, self.state, self.ended_ms, self.end_reason).map(Some)
    }
}

impl FromRedisValue for TaskFields {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (data, state, ended_ms, end_reason) = FromRedisValue::from_redis_value(v)?;
        Ok(Self {
            data,
            state,
            ended_ms,
            end_reason,
        })
    }
}

/// The hash fields of a task as read for an update: `v`, then [`TASK_FIELDS`].
pub(super) struct TaskRecord {
    /// The version compare-and-set checks.
    pub(super) version: Option<String>,
    /// The task.
    pub(super) fields: TaskFields,
}

impl FromRedisValue for TaskRecord {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (version, data, state, ended_ms, end_reason) = FromRedisValue::from_redis_value(v)?;
        Ok(Self {
            version,
            fields: TaskFields {
                data,
                state,
                ended_ms,
                end_reason,
            },
        })
    }
}

/// Lays the state a lock script wrote beside the JSON over the task.
pub(super) fn with_overlay(
    mut task: Task,
    state: Option<String>,
    ended_ms: Option<u64>,
    reason: Option<String>,
) -> Result<Task, StoreError> {
    if let Some(s) = state {
        task.state = TaskState::parse(&s)
            .ok_or_else(|| StoreError::Corrupt(format!("task {}: state {s:?}", task.id)))?;
        task.ended_at = ended_ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        task.updated_at = task.ended_at.unwrap_or(task.updated_at);
        task.end_reason = reason;
    }
    Ok(task)
}

/// The version byte the lease records of this layout begin with.
pub(super) const RECORD_V1: u8 = 1;

/// Byte offsets in a record (Lua's are one more): version, state, kind, then the expiry, issue
/// and renewal-ceiling times (8 bytes each, ns since the epoch, big-endian), then the
/// credential (see [`credential_field`]). `lua/lease.lua` reads the same offsets.
const STATE: usize = 1;
const KIND: usize = 2;
const EXPIRES: usize = 3;
const ISSUED: usize = 11;
const RENEW_UNTIL: usize = 19;
const CREDENTIAL: usize = 27;

/// The `cnf` tag of a thumbprint kept as its 32 raw bytes (an unpadded base64url SHA-256).
const CNF_RAW: u8 = 0;
/// The `cnf` tag of a thumbprint kept as text (anything else).
const CNF_TEXT: u8 = 1;
/// The audience tag of a record without one (a certificate's lease).
const AUDIENCE_NONE: u8 = 0;
/// The audience tag of a record with one (a 2-byte length and the text follow).
const AUDIENCE_SOME: u8 = 1;

fn too_long(what: &str) -> StoreError {
    StoreError::Corrupt(format!("lease {what} too long for the record"))
}

/// 8 big-endian bytes of ns since the epoch (0 before it).
pub(super) fn ns_bytes(t: SystemTime) -> [u8; 8] {
    unix_ns(t).to_be_bytes()
}

fn time_at(rec: &[u8], at: usize) -> Option<SystemTime> {
    let b: [u8; 8] = rec.get(at..at + 8)?.try_into().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::from_be_bytes(b)))
}

/// Whether `s` is lowercase hex of an even length: kept as its bytes.
fn packs(s: &str) -> bool {
    !s.is_empty()
        && s.len().is_multiple_of(2)
        && s.len() / 2 <= 0x7f
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A credential id as the record and the credential hash keep it: a byte, then the id. For
/// lowercase hex (a `jti`, a serial) the byte is `0x80 | n` and `n` raw bytes follow; else it
/// is the text's length (at most 127) and the text follows.
///
/// # Errors
/// [`StoreError::Corrupt`] for an id longer than the record holds.
pub(super) fn credential_field(credential: &str) -> Result<Vec<u8>, StoreError> {
    if packs(credential) {
        let n = credential.len() / 2;
        let mut out = Vec::with_capacity(n + 1);
        // n <= 0x7f (packs).
        out.push(0x80 | u8::try_from(n).map_err(|_| too_long("credential"))?);
        for pair in credential.as_bytes().chunks_exact(2) {
            let hex = std::str::from_utf8(pair).map_err(|_| too_long("credential"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| too_long("credential"))?);
        }
        return Ok(out);
    }
    let n = u8::try_from(credential.len())
        .ok()
        .filter(|n| *n <= 0x7f)
        .ok_or_else(|| too_long("credential"))?;
    let mut out = Vec::with_capacity(credential.len() + 1);
    out.push(n);
    out.extend_from_slice(credential.as_bytes());
    Ok(out)
}

/// The credential field at `rec[at..]` and where what follows it starts.
fn read_credential(rec: &[u8], at: usize) -> Option<(String, usize)> {
    let head = *rec.get(at)?;
    let n = usize::from(head & 0x7f);
    let body = rec.get(at + 1..at + 1 + n)?;
    let text = if head & 0x80 == 0 {
        String::from_utf8(body.to_vec()).ok()?
    } else {
        crate::mint::hex(body)
    };
    Some((text, at + 1 + n))
}

/// `s` with a 2-byte big-endian length (names are up to 256 bytes: one byte does not hold
/// every length).
fn push_short(out: &mut Vec<u8>, s: &str, what: &str) -> Result<(), StoreError> {
    let n = u16::try_from(s.len()).map_err(|_| too_long(what))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn read_short(rec: &[u8], at: usize) -> Option<(String, usize)> {
    let len = rec.get(at..at + 2)?;
    let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let body = rec.get(at + 2..at + 2 + n)?;
    Some((String::from_utf8(body.to_vec()).ok()?, at + 2 + n))
}

/// The record of an active lease as issuance writes it: version [`RECORD_V1`], state 0
/// (active; 1 revoked, 2 expired), kind (0 JWT, 1 X.509), expiry, issue time and renewal
/// ceiling (8 bytes each), the credential ([`credential_field`]), the audience (0 for none,
/// else 1, a 2-byte length and the text), the actions (a count, then each with a 2-byte
/// length), the `cnf` (0 and 32 raw bytes for a base64url SHA-256 thumbprint, else 1, a 2-byte
/// length and the text). An ended
/// lease has, after these, when it ended (8 bytes, ns) and why (2-byte length, then the text).
/// Ids, task and agent are not in it: the key and the task say them.
///
/// # Errors
/// [`StoreError::Corrupt`] for a field longer than the record holds.
pub(super) fn encode_record(lease: &Lease) -> Result<Vec<u8>, StoreError> {
    use base64::Engine as _;
    let mut out = Vec::with_capacity(96);
    out.push(RECORD_V1);
    out.push(0);
    out.push(match lease.kind {
        CredentialKind::Jwt => 0,
        CredentialKind::X509 => 1,
    });
    out.extend_from_slice(&ns_bytes(lease.expires_at));
    out.extend_from_slice(&ns_bytes(lease.issued_at));
    out.extend_from_slice(&ns_bytes(lease.renew_until));
    out.extend_from_slice(&credential_field(&lease.credential)?);
    match &lease.audience {
        Some(a) => {
            out.push(AUDIENCE_SOME);
            push_short(&mut out, a, "audience")?;
        }
        None => out.push(AUDIENCE_NONE),
    }
    out.push(u8::try_from(lease.actions.len()).map_err(|_| too_long("actions"))?);
    for a in &lease.actions {
        push_short(&mut out, a, "action")?;
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    match b64.decode(&lease.cnf) {
        Ok(raw) if raw.len() == 32 && b64.encode(&raw) == lease.cnf => {
            out.push(CNF_RAW);
            out.extend_from_slice(&raw);
        }
        _ => {
            out.push(CNF_TEXT);
            push_short(&mut out, &lease.cnf, "cnf")?;
        }
    }
    if lease.state != LeaseState::Active {
        out[STATE] = if lease.state == LeaseState::Revoked {
            1
        } else {
            2
        };
        out.extend_from_slice(&ns_bytes(lease.ended_at.unwrap_or(lease.expires_at)));
        let reason = lease.reason.as_deref().unwrap_or_default();
        out.extend_from_slice(
            &u16::try_from(reason.len())
                .map_err(|_| too_long("reason"))?
                .to_be_bytes(),
        );
        out.extend_from_slice(reason.as_bytes());
    }
    Ok(out)
}

/// When a task's leases ended with it (its `le` and `lr` fields): from then on every lease of
/// the task is ended, whatever its record says.
#[derive(Debug, Clone)]
pub(super) struct TaskEnd {
    /// When.
    pub(super) at: SystemTime,
    /// Why (the reason its leases carry).
    pub(super) reason: String,
}

impl TaskEnd {
    /// The end from the `le` (8 bytes, ns) and `lr` fields; `None` when the task has not ended.
    pub(super) fn from_fields(le: Option<Vec<u8>>, lr: Option<String>) -> Option<Self> {
        let le: [u8; 8] = le?.as_slice().try_into().ok()?;
        Some(Self {
            at: SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::from_be_bytes(le)),
            reason: lr.unwrap_or_default(),
        })
    }
}

/// The lease of `task` (executed by `agent`) with `suffix` from its record; `ended`, when its
/// task has ended, ends a lease the record still says is active.
///
/// # Errors
/// [`StoreError::Corrupt`] for a record that does not decode (or of an unknown version).
pub(super) fn decode_record(
    task: TaskId,
    agent: &WorkloadId,
    suffix: [u8; 8],
    rec: &[u8],
    ended: Option<&TaskEnd>,
) -> Result<Lease, StoreError> {
    let id = LeaseId::from_parts(&task, suffix);
    let bad = || StoreError::Corrupt(format!("lease {id}: record does not decode"));
    if rec.first() != Some(&RECORD_V1) {
        return Err(StoreError::Corrupt(format!(
            "lease {id}: record version {:?}",
            rec.first()
        )));
    }
    let state = match rec.get(STATE) {
        Some(0) => LeaseState::Active,
        Some(1) => LeaseState::Revoked,
        Some(2) => LeaseState::Expired,
        _ => return Err(bad()),
    };
    let kind = match rec.get(KIND) {
        Some(0) => CredentialKind::Jwt,
        Some(1) => CredentialKind::X509,
        _ => return Err(bad()),
    };
    let expires_at = time_at(rec, EXPIRES).ok_or_else(bad)?;
    let issued_at = time_at(rec, ISSUED).ok_or_else(bad)?;
    let renew_until = time_at(rec, RENEW_UNTIL).ok_or_else(bad)?;
    let (credential, mut at) = read_credential(rec, CREDENTIAL).ok_or_else(bad)?;
    let audience = match rec.get(at) {
        Some(&AUDIENCE_NONE) => {
            at += 1;
            None
        }
        Some(&AUDIENCE_SOME) => {
            let (a, next) = read_short(rec, at + 1).ok_or_else(bad)?;
            at = next;
            Some(a)
        }
        _ => return Err(bad()),
    };
    let count = *rec.get(at).ok_or_else(bad)?;
    at += 1;
    let mut actions = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (a, next) = read_short(rec, at).ok_or_else(bad)?;
        actions.push(a);
        at = next;
    }
    let cnf = match rec.get(at) {
        Some(&CNF_RAW) => {
            use base64::Engine as _;
            let raw = rec.get(at + 1..at + 33).ok_or_else(bad)?;
            at += 33;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        }
        Some(&CNF_TEXT) => {
            let (c, next) = read_short(rec, at + 1).ok_or_else(bad)?;
            at = next;
            c
        }
        _ => return Err(bad()),
    };
    let (mut ended_at, mut reason) = (None, None);
    if state != LeaseState::Active {
        ended_at = Some(time_at(rec, at).ok_or_else(bad)?);
        let n: [u8; 2] = rec
            .get(at + 8..at + 10)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        let n = usize::from(u16::from_be_bytes(n));
        let text = rec.get(at + 10..at + 10 + n).ok_or_else(bad)?;
        reason = Some(String::from_utf8(text.to_vec()).map_err(|_| bad())?);
    }
    let mut lease = Lease {
        id,
        task,
        agent: agent.clone(),
        kind,
        credential,
        audience,
        actions,
        cnf,
        issued_at,
        expires_at,
        renew_until,
        state,
        ended_at,
        reason,
    };
    if let Some(end) = ended
        && lease.state == LeaseState::Active
    {
        lease.state = LeaseState::Revoked;
        lease.ended_at = Some(end.at);
        lease.reason = Some(end.reason.clone());
    }
    Ok(lease)
}

/// A suffix (hash field) as read back: exactly 8 bytes.
pub(super) fn suffix_of(field: &[u8]) -> Result<[u8; 8], StoreError> {
    field
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("lease field of {} bytes", field.len())))
}

/// One stream entry: its id and its fields, flat (`field, value, ...`; values may be binary).
/// A tuple: redis-rs decodes stream replies into it directly.
pub(super) type StreamEntry = (String, Vec<Vec<u8>>);

/// A revocation from a log entry: this layout's (`lua/lease.lua` `log_revocation`: `task`, `s`
/// the lease suffix, `agent`, `r` the lease record as it was, `reason`, `at_ms`), or an earlier
/// layout's (text fields `lease`, `task`, `agent`, `kind`, `cred`, `aud`, `exp_ns`, `reason`,
/// `at_ms`).
pub(super) fn revocation_from_entry((id, flat): StreamEntry) -> Result<Revocation, StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("revocation {id}: {what}"));
    let cursor = Cursor::parse(&id).ok_or_else(|| bad("id"))?;
    let mut fields = std::collections::HashMap::new();
    for pair in flat.chunks_exact(2) {
        fields.insert(pair[0].as_slice(), pair[1].as_slice());
    }
    let raw = |name: &str| {
        fields
            .get(name.as_bytes())
            .copied()
            .ok_or_else(|| bad(name))
    };
    let get = |name: &str| -> Result<&str, StoreError> {
        std::str::from_utf8(raw(name)?).map_err(|_| bad(name))
    };
    let number = |name: &str| -> Result<u64, StoreError> {
        get(name)?.parse::<u64>().map_err(|_| bad(name))
    };
    let task = TaskId::parse(get("task")?).map_err(|_| bad("task"))?;
    let agent = WorkloadId::parse(get("agent")?).map_err(|_| bad("agent"))?;
    let reason = get("reason")?.to_owned();
    let revoked_at = from_unix_ms(number("at_ms")?);
    if let Ok(rec) = raw("r") {
        let suffix = suffix_of(raw("s")?)?;
        let lease = decode_record(task, &agent, suffix, rec, None)?;
        return Ok(Revocation {
            cursor,
            kind: lease.kind,
            credential: lease.credential,
            lease: lease.id,
            task,
            agent,
            audience: lease.audience,
            reason,
            revoked_at,
            expires_at: lease.expires_at,
        });
    }
    Ok(Revocation {
        cursor,
        kind: match get("kind")? {
            "jwt" => CredentialKind::Jwt,
            "x509" => CredentialKind::X509,
            _ => return Err(bad("kind")),
        },
        credential: get("cred")?.to_owned(),
        lease: LeaseId::parse(get("lease")?).map_err(|_| bad("lease"))?,
        task,
        agent,
        audience: Some(get("aud")?)
            .filter(|a| !a.is_empty())
            .map(str::to_owned),
        reason,
        revoked_at,
        expires_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(number("exp_ns")?),
    })
}

/// Nanoseconds since the Unix epoch (0 before it): exact for lease expiries (Lua compares them
/// as doubles, to within a microsecond, which is all it needs).
pub(super) fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(credential: &str, cnf: &str) -> Lease {
        let task = TaskId::generate();
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
        Lease {
            id: LeaseId::generate(&task),
            task,
            agent: WorkloadId::parse("spiffe://taskcred.dev/agent/demo").unwrap(),
            kind: CredentialKind::X509,
            credential: credential.into(),
            audience: None,
            actions: vec!["read".into(), "write".into()],
            cnf: cnf.into(),
            issued_at: at,
            expires_at: at + Duration::from_nanos(300_000_000_001),
            renew_until: at + Duration::from_secs(3600),
            state: LeaseState::Active,
            ended_at: None,
            reason: None,
        }
    }

    fn round_trip(lease: &Lease) -> Lease {
        let rec = encode_record(lease).unwrap();
        let suffix = lease.id.suffix().unwrap();
        decode_record(lease.task, &lease.agent, suffix, &rec, None).unwrap()
    }

    /// Every field comes back exactly (ns times included), hex credentials packed or not, a
    /// raw or a textual `cnf`, active or ended.
    #[test]
    fn records_round_trip() {
        let thumb = "a".repeat(43);
        for (cred, cnf) in [("00ff17ab", thumb.as_str()), ("second-credential", "thumb")] {
            let mut lease = sample(cred, cnf);
            assert_eq!(round_trip(&lease), lease);
            lease.audience = Some("db".into());
            lease.revoke("task completed", lease.issued_at + Duration::from_nanos(7));
            assert_eq!(round_trip(&lease), lease);
        }
        // Names of every length a task allows (1 to 256 bytes), and the empty `cnf` of a CI job.
        for n in [1, 254, 255, 256] {
            let mut lease = sample("00ff17ab", "");
            lease.audience = Some("a".repeat(n));
            lease.actions = vec!["b".repeat(n), "c".into()];
            assert_eq!(round_trip(&lease), lease, "{n}");
        }
        assert_eq!(credential_field("00ff").unwrap(), vec![0x82, 0x00, 0xff]);
        assert_eq!(credential_field("ABCD").unwrap(), b"\x04ABCD".to_vec());
        assert!(credential_field(&"x".repeat(128)).is_err());
    }

    /// A task's end ends an active record, and only an active one; an unknown version is
    /// damage, never a lease.
    #[test]
    fn a_task_end_ends_its_leases_and_unknown_versions_do_not_decode() {
        let lease = sample(&"ab".repeat(16), "thumb");
        let rec = encode_record(&lease).unwrap();
        let suffix = lease.id.suffix().unwrap();
        let end = TaskEnd {
            at: lease.issued_at + Duration::from_secs(1),
            reason: "task completed".into(),
        };
        let read = decode_record(lease.task, &lease.agent, suffix, &rec, Some(&end)).unwrap();
        assert_eq!(read.state, LeaseState::Revoked);
        assert_eq!(read.ended_at, Some(end.at));
        let mut future = rec.clone();
        future[0] = 2;
        assert!(decode_record(lease.task, &lease.agent, suffix, &future, None).is_err());
        assert!(decode_record(lease.task, &lease.agent, suffix, &rec[..20], None).is_err());
    }
}
