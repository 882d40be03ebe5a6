//! The validated parts of a task: ids, audiences, actions, grants, labels, and a task request
//! checked field by field against its bounds. Each type can only be built by fallible parsing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use super::TaskError;
use crate::identity::WorkloadId;

/// Longest purpose, in bytes.
pub const MAX_PURPOSE_BYTES: usize = 1024;
/// Most grants on one task.
pub const MAX_GRANTS: usize = 16;
/// Most actions in one grant.
pub const MAX_ACTIONS_PER_GRANT: usize = 32;
/// Longest audience or action, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most labels on one task.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Most bytes of text one task holds in all (purpose, audiences, actions, label keys and
/// values): a task is read whole by every listing, so its size is a budget too.
pub const MAX_TASK_TEXT_BYTES: usize = 16 * 1024;

fn invalid(field: &'static str, reason: impl Into<String>) -> TaskError {
    TaskError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// `value` if it lies within 1 s and `max`, else [`TaskError::Invalid`] naming `field` and
/// the bounds (`suffix` ends the message).
fn between_1s_and(
    field: &'static str,
    value: Duration,
    max: Duration,
    suffix: &str,
) -> Result<Duration, TaskError> {
    if value < Duration::from_secs(1) || value > max {
        return Err(invalid(
            field,
            format!(
                "must be between 1s and {}{suffix}",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}

/// A task id: a UUIDv7 in canonical lowercase hyphenated form, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A fresh id for a task created now.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a canonical task id.
    ///
    /// # Errors
    /// [`TaskError::Invalid`] (field `task_id`) for anything but a canonical UUIDv7.
    pub fn parse(s: &str) -> Result<Self, TaskError> {
        let bad = || invalid("task_id", "not a task id (a lowercase UUIDv7)");
        if s.len() != 36 {
            return Err(bad());
        }
        let id = Uuid::try_parse(s).map_err(|_| bad())?;
        if id.get_version_num() != 7 || id.hyphenated().to_string() != s {
            return Err(bad());
        }
        Ok(Self(id))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for TaskId {
    type Err = TaskError;
    fn from_str(s: &str) -> Result<Self, TaskError> {
        Self::parse(s)
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether `s` is 1..=256 bytes of `[A-Za-z0-9._:/-]`: the alphabet of audiences (which may be
/// URLs) and actions.
fn check_name(field: &'static str, s: &str) -> Result<(), TaskError> {
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err(invalid(
            field,
            format!("must be 1 to {MAX_NAME_BYTES} bytes"),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')))
    {
        return Err(invalid(
            field,
            format!("character {c:?} is not allowed (only A-Z a-z 0-9 . _ : / -)"),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses one.
            ///
            /// # Errors
            /// [`TaskError::Invalid`] when out of bounds or alphabet.
            pub fn parse(s: &str) -> Result<Self, TaskError> {
                check_name($field, s)?;
                Ok(Self(s.to_owned()))
            }

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// Who a credential is for: a service name or URL, `[A-Za-z0-9._:/-]{1,256}`.
    Audience,
    "grants.audience"
);
name_type!(
    /// What a credential allows at its audience, `[A-Za-z0-9._:/-]{1,256}`.
    Action,
    "grants.actions"
);

/// The actions a task may perform at one audience.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Where.
    pub audience: Audience,
    /// What (1 to 32, distinct, sorted).
    pub actions: BTreeSet<Action>,
}

/// Labels: lowercase keys `[a-z0-9][a-z0-9._/-]{0,62}`, values `[A-Za-z0-9._:/-]{0,256}`, at most
/// 32. Policy reads them as Cedar entity tags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Parses labels.
    ///
    /// # Errors
    /// [`TaskError::Invalid`] (field `labels`) on a bad key or value, a repeated key, or too many.
    pub fn parse<I, K, V>(pairs: I) -> Result<Self, TaskError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            let (k, v) = (k.as_ref(), v.as_ref());
            let key_ok = !k.is_empty()
                && k.len() <= MAX_LABEL_KEY_BYTES
                && k.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && k.chars().all(|c| {
                    c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || matches!(c, '.' | '_' | '/' | '-')
                });
            if !key_ok {
                return Err(invalid(
                    "labels",
                    format!(
                        "key {k:?}: 1 to {MAX_LABEL_KEY_BYTES} bytes of a-z 0-9 . _ / -, starting with a letter or digit"
                    ),
                ));
            }
            let value_ok = v.len() <= MAX_LABEL_VALUE_BYTES
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-'));
            if !value_ok {
                return Err(invalid(
                    "labels",
                    format!(
                        "value of {k:?}: at most {MAX_LABEL_VALUE_BYTES} bytes of A-Z a-z 0-9 . _ : / -"
                    ),
                ));
            }
            if map.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(invalid("labels", format!("key {k:?} given twice")));
            }
        }
        if map.len() > MAX_LABELS {
            return Err(invalid("labels", format!("more than {MAX_LABELS} labels")));
        }
        Ok(Self(map))
    }

    /// The labels, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// Limits a task request is checked against, from the `[ttl]` configuration.
#[derive(Debug, Clone, Copy)]
pub struct TaskLimits {
    /// Latest deadline, from now.
    pub deadline_max: Duration,
    /// Deadline when none is asked: one hour, or `deadline_max` if shorter.
    pub deadline_default: Duration,
    /// Credential lifetime when none is asked.
    pub credential_ttl_default: Duration,
    /// Longest credential lifetime.
    pub credential_ttl_max: Duration,
}

impl Default for TaskLimits {
    /// What the default `[ttl]` configuration gives: deadlines up to a day (an hour when none is
    /// asked), credentials of 5 minutes when no lifetime is asked and of an hour at most.
    fn default() -> Self {
        Self {
            deadline_max: Duration::from_secs(24 * 60 * 60),
            deadline_default: Duration::from_secs(60 * 60),
            credential_ttl_default: Duration::from_secs(5 * 60),
            credential_ttl_max: Duration::from_secs(60 * 60),
        }
    }
}

/// A task request as it arrives, before any check.
#[derive(Debug, Clone, Default)]
pub struct RawTaskRequest {
    /// The executor's SPIFFE ID.
    pub executor: String,
    /// Why.
    pub purpose: String,
    /// (audience, actions) pairs.
    pub grants: Vec<(String, Vec<String>)>,
    /// (key, value) pairs.
    pub labels: Vec<(String, String)>,
    /// Deadline from now; `None` for the default.
    pub deadline_in: Option<Duration>,
    /// Credential lifetime ceiling; `None` for the default.
    pub credential_ttl: Option<Duration>,
}

/// A task request whose every field is within bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRequest {
    /// Who will do the work.
    pub executor: WorkloadId,
    /// Why.
    pub purpose: String,
    /// What, per audience.
    pub grants: Vec<Grant>,
    /// Labels.
    pub labels: Labels,
    /// Deadline from the moment of the request.
    pub deadline_in: Duration,
    /// Credential lifetime ceiling.
    pub credential_ttl: Duration,
}

impl TaskRequest {
    /// Checks every field of `raw` against its bounds.
    ///
    /// # Errors
    /// [`TaskError::Invalid`] naming the first field at fault.
    pub fn parse(raw: RawTaskRequest, limits: &TaskLimits) -> Result<Self, TaskError> {
        let executor =
            WorkloadId::parse(&raw.executor).map_err(|e| invalid("executor", e.to_string()))?;

        let purpose = raw.purpose;
        if purpose.trim().is_empty() {
            return Err(invalid("purpose", "must not be empty"));
        }
        if purpose.len() > MAX_PURPOSE_BYTES {
            return Err(invalid(
                "purpose",
                format!("longer than {MAX_PURPOSE_BYTES} bytes"),
            ));
        }
        if crate::text::has_deceptive(&purpose) {
            return Err(invalid(
                "purpose",
                "must not contain control, separator or format characters",
            ));
        }

        if raw.grants.is_empty() {
            return Err(invalid("grants", "at least one grant is required"));
        }
        if raw.grants.len() > MAX_GRANTS {
            return Err(invalid("grants", format!("more than {MAX_GRANTS} grants")));
        }
        let mut grants: Vec<Grant> = Vec::with_capacity(raw.grants.len());
        for (audience, actions) in raw.grants {
            let audience = Audience::parse(&audience)?;
            if grants.iter().any(|g| g.audience == audience) {
                return Err(invalid(
                    "grants.audience",
                    format!("{audience} appears in two grants; merge them"),
                ));
            }
            if actions.is_empty() {
                return Err(invalid(
                    "grants.actions",
                    format!("no action for {audience}"),
                ));
            }
            if actions.len() > MAX_ACTIONS_PER_GRANT {
                return Err(invalid(
                    "grants.actions",
                    format!("more than {MAX_ACTIONS_PER_GRANT} actions for {audience}"),
                ));
            }
            let mut set = BTreeSet::new();
            for a in actions {
                if !set.insert(Action::parse(&a)?) {
                    return Err(invalid("grants.actions", format!("{a} given twice")));
                }
            }
            grants.push(Grant {
                audience,
                actions: set,
            });
        }

        let labels = Labels::parse(raw.labels)?;

        let deadline = raw.deadline_in.unwrap_or(limits.deadline_default);
        let deadline_in = between_1s_and("deadline", deadline, limits.deadline_max, " from now")?;
        let ttl = raw.credential_ttl.unwrap_or(limits.credential_ttl_default);
        let credential_ttl = between_1s_and("credential_ttl", ttl, limits.credential_ttl_max, "")?;
        let text = purpose.len()
            + grants
                .iter()
                .map(|g| {
                    g.audience.as_str().len()
                        + g.actions.iter().map(|a| a.as_str().len()).sum::<usize>()
                })
                .sum::<usize>()
            + labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if text > MAX_TASK_TEXT_BYTES {
            return Err(invalid(
                "grants",
                format!(
                    "the task holds {text} bytes of text (purpose, grants, labels); at most \
                     {MAX_TASK_TEXT_BYTES}"
                ),
            ));
        }
        Ok(Self {
            executor,
            purpose,
            grants,
            labels,
            deadline_in,
            credential_ttl,
        })
    }
}
