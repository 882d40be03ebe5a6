//! Policy as code with Cedar: loads `*.cedar` files from a directory, validates them against the
//! built-in schema (`config/taskcred.cedarschema`, strict mode), and decides requests. Nothing
//! is allowed by code alone: every RPC asks [`PolicyEngine::decide`]. The approval quorum of a
//! task comes from `@quorum("N")` annotations on the permitting policies, the largest winning and
//! a permit without one counting as 1 (fail closed).
//!
//! A reload that fails to parse or validate leaves the policies in force untouched. Pure apart
//! from reading the policy files.

mod entities;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

pub use entities::{Principal, Resource};

use crate::identity::WorkloadId;

/// The schema every policy is validated against, built into the broker.
pub const SCHEMA_SOURCE: &str = include_str!("../../config/taskcred.cedarschema");

/// The actions policy decides. Their names are the Cedar action ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyAction {
    /// Ask for a task.
    RequestTask,
    /// Read a task.
    GetTask,
    /// List tasks (each result is then filtered by `GetTask`).
    ListTasks,
    /// Approve a task.
    ApproveTask,
    /// Deny a task.
    DenyTask,
    /// Cancel a task.
    CancelTask,
    /// Reload the policies.
    ReloadPolicy,
    /// Get a JWT for a task, fresh or renewed (context: kind, audience, actions, ttl_secs,
    /// renewal).
    IssueToken,
    /// Get an X509-SVID for a task, fresh or renewed (the same context).
    IssueCertificate,
    /// End a task.
    CompleteTask,
    /// Renew a lease. Not a Cedar action of its own: a renewal is decided as `IssueToken` or
    /// `IssueCertificate` with `context.renewal` true; this names its audit lines.
    RenewLease,
    /// Revoke a lease.
    RevokeLease,
    /// Force-revoke an agent.
    LockAgent,
    /// Lift a lock.
    UnlockAgent,
    /// List the locks.
    ListLocks,
    /// List leases.
    ListLeases,
    /// Whether a failed task locks its agent.
    LockOnFailure,
    /// End one task's leases as an operator.
    RevokeTask,
    /// Replace the JWT signing key.
    RotateSigningKey,
    /// Drop a (compromised) signing key from the JWK Set at once.
    RevokeSigningKey,
    /// Follow the revocation stream (a verifier's role).
    WatchRevocations,
    /// Ask whether a credential is active.
    Introspect,
    /// A CI job exchanges its ID token for a credential of its task (the context of
    /// `IssueToken`). A permit's `@quorum` (default 0) is the approvals a new task needs.
    ExchangeCiToken,
    /// A CI job ends its task.
    CompleteCiTask,
    /// Delegate part of a task to another agent: the resource is the child task as it would
    /// be made (context: depth, chain, strictly_narrower, the parent's id, labels, audiences
    /// and actions). A permit's `@quorum` (default 1) is the approvals the step needs.
    DelegateTask,
}

impl PolicyAction {
    /// Every action.
    pub const ALL: [Self; 25] = [
        Self::RequestTask,
        Self::GetTask,
        Self::ListTasks,
        Self::ApproveTask,
        Self::DenyTask,
        Self::CancelTask,
        Self::ReloadPolicy,
        Self::IssueToken,
        Self::IssueCertificate,
        Self::CompleteTask,
        Self::RenewLease,
        Self::RevokeLease,
        Self::LockAgent,
        Self::UnlockAgent,
        Self::ListLocks,
        Self::ListLeases,
        Self::LockOnFailure,
        Self::RevokeTask,
        Self::RotateSigningKey,
        Self::RevokeSigningKey,
        Self::WatchRevocations,
        Self::Introspect,
        Self::ExchangeCiToken,
        Self::CompleteCiTask,
        Self::DelegateTask,
    ];

    /// The Cedar action id.
    pub fn name(self) -> &'static str {
        match self {
            Self::RequestTask => "RequestTask",
            Self::GetTask => "GetTask",
            Self::ListTasks => "ListTasks",
            Self::ApproveTask => "ApproveTask",
            Self::DenyTask => "DenyTask",
            Self::CancelTask => "CancelTask",
            Self::ReloadPolicy => "ReloadPolicy",
            Self::IssueToken => "IssueToken",
            Self::IssueCertificate => "IssueCertificate",
            Self::CompleteTask => "CompleteTask",
            Self::RenewLease => "RenewLease",
            Self::RevokeLease => "RevokeLease",
            Self::LockAgent => "LockAgent",
            Self::UnlockAgent => "UnlockAgent",
            Self::ListLocks => "ListLocks",
            Self::ListLeases => "ListLeases",
            Self::LockOnFailure => "LockOnFailure",
            Self::RevokeTask => "RevokeTask",
            Self::RotateSigningKey => "RotateSigningKey",
            Self::RevokeSigningKey => "RevokeSigningKey",
            Self::WatchRevocations => "WatchRevocations",
            Self::Introspect => "Introspect",
            Self::ExchangeCiToken => "ExchangeCiToken",
            Self::CompleteCiTask => "CompleteCiTask",
            Self::DelegateTask => "DelegateTask",
        }
    }
}

/// Why a policy set could not be loaded. File and line are named where Cedar gives them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A file or the directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory holds no `.cedar` file: that would deny everything, surely by mistake.
    #[error("{0}: no .cedar policy file")]
    Empty(PathBuf),
    /// A policy file does not parse.
    #[error("{location}: {message}")]
    Parse {
        /// `file:line:column`.
        location: String,
        /// Cedar's message.
        message: String,
    },
    /// A policy does not validate against the schema.
    #[error("{location}: policy {policy}: {message}")]
    Invalid {
        /// `file:line:column`.
        location: String,
        /// The policy id.
        policy: String,
        /// Cedar's message.
        message: String,
    },
    /// Two policies share an id.
    #[error("{location}: policy id {policy:?} is used twice")]
    DuplicateId {
        /// Where the second one is.
        location: String,
        /// The id.
        policy: String,
    },
    /// A `@quorum` annotation is not a number from 0 to 16.
    #[error("{location}: policy {policy}: @quorum({value:?}) is not a number from 0 to 16")]
    BadQuorum {
        /// `file`.
        location: String,
        /// The policy id.
        policy: String,
        /// The annotation.
        value: String,
    },
    /// The directory or a file of it can be changed by someone other than the broker's user
    /// or root: whoever can write it writes the policy.
    #[error("{path}: {problem}")]
    Untrusted {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        problem: crate::files::FileTrustError,
    },
    /// The built-in schema is broken (a bug, caught by the tests).
    #[error("built-in Cedar schema: {0}")]
    Schema(String),
}

/// Largest quorum a policy may ask for.
pub const MAX_QUORUM: u32 = 16;

/// A loaded, validated policy set.
#[derive(Debug)]
pub struct Policies {
    set: PolicySet,
    files: Vec<PathBuf>,
}

impl Policies {
    /// Number of policies.
    pub fn len(&self) -> usize {
        self.set.policies().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The files they came from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// What policy said about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Permitted.
    pub allowed: bool,
    /// The policies that determined the decision (the permits, or the forbids).
    pub policies: Vec<String>,
    /// For a permitted `RequestTask`: the approvals needed.
    pub quorum: u32,
    /// Evaluation errors (a policy that errors does not apply; deny by default still holds).
    pub errors: Vec<String>,
}

/// Parses the built-in schema.
///
/// # Errors
/// [`PolicyError::Schema`] if it does not parse (a bug).
pub fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA_SOURCE)
        .map(|(s, _warnings)| s)
        .map_err(|e| PolicyError::Schema(e.to_string()))
}

/// `file:line:column` of byte `offset` in `text`.
fn location(file: &Path, text: &str, offset: Option<usize>) -> String {
    let Some(before) = offset.and_then(|o| text.get(..o)) else {
        return file.display().to_string();
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{}:{line}:{column}", file.display())
}

fn first_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels().and_then(|mut l| l.next()).map(|l| l.offset())
}

/// Loads and validates every `*.cedar` file of `dir`.
///
/// # Errors
/// [`PolicyError`] naming the file (and line) at fault.
pub fn load_dir(dir: &Path, schema: &Schema) -> Result<Policies, PolicyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PolicyError::Io { path, source }
    };
    let writable = |path: &Path| -> Result<(), PolicyError> {
        crate::files::check_trusted(path).map_err(|problem| PolicyError::Untrusted {
            path: path.to_owned(),
            problem,
        })
    };
    writable(dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cedar") && p.is_file())
        .collect();
    files.sort();
    for file in &files {
        writable(file)?;
    }
    if files.is_empty() {
        return Err(PolicyError::Empty(dir.to_owned()));
    }

    let mut set = PolicySet::new();
    // Policy id -> (file, text) for locating validation errors.
    let mut origin: BTreeMap<String, (PathBuf, Arc<str>)> = BTreeMap::new();
    for file in &files {
        let text: Arc<str> = std::fs::read_to_string(file).map_err(io(file))?.into();
        let parsed = PolicySet::from_str(&text).map_err(|e| PolicyError::Parse {
            location: location(file, &text, first_offset(&e)),
            message: e.to_string(),
        })?;
        let stem = file
            .file_stem()
            .map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned());
        for policy in parsed.policies() {
            // Cedar numbers the policies of a text policy0, policy1... in order of appearance.
            let n = policy.id().to_string();
            let id = policy.annotation("id").map_or_else(
                || format!("{stem}#{}", n.trim_start_matches("policy")),
                str::to_owned,
            );
            let loc = || {
                let src = policy.to_cedar();
                location(file, &text, src.and_then(|s| text.find(s.as_str())))
            };
            if let Some(q) = policy.annotation("quorum")
                && q.parse::<u32>().map_or(true, |q| q > MAX_QUORUM)
            {
                return Err(PolicyError::BadQuorum {
                    location: loc(),
                    policy: id,
                    value: q.to_owned(),
                });
            }
            if origin.contains_key(&id) {
                return Err(PolicyError::DuplicateId {
                    location: loc(),
                    policy: id,
                });
            }
            let renamed = policy.new_id(PolicyId::new(&id));
            set.add(renamed).map_err(|e| PolicyError::DuplicateId {
                location: format!("{}: {e}", loc()),
                policy: id.clone(),
            })?;
            origin.insert(id, (file.clone(), text.clone()));
        }
        if parsed.templates().next().is_some() {
            return Err(PolicyError::Parse {
                location: file.display().to_string(),
                message: "policy templates are not supported".into(),
            });
        }
    }

    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if let Some(e) = result.validation_errors().next() {
        let policy = e.policy_id().to_string();
        let location = origin.get(&policy).map_or_else(
            || policy.clone(),
            |(file, text)| {
                // Offsets are relative to the text the policy was parsed from: its file.
                location(file, text, first_offset(e))
            },
        );
        return Err(PolicyError::Invalid {
            location,
            policy,
            message: e.to_string(),
        });
    }
    Ok(Policies { set, files })
}

/// The policies in force and the means to decide and reload.
#[derive(Debug)]
pub struct PolicyEngine {
    dir: PathBuf,
    schema: Schema,
    current: RwLock<Arc<Policies>>,
    authorizer: Authorizer,
}

/// `value` as a Cedar value: strings, longs, booleans, sets and records (what the broker puts
/// in a context; a float or null is refused).
fn restricted(value: serde_json::Value) -> Result<RestrictedExpression, String> {
    use serde_json::Value;
    Ok(match value {
        Value::String(s) => RestrictedExpression::new_string(s),
        Value::Bool(b) => RestrictedExpression::new_bool(b),
        Value::Number(n) => RestrictedExpression::new_long(
            n.as_i64()
                .ok_or_else(|| format!("context: {n} is not a Long"))?,
        ),
        Value::Array(items) => RestrictedExpression::new_set(
            items
                .into_iter()
                .map(restricted)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Value::Object(fields) => RestrictedExpression::new_record(
            fields
                .into_iter()
                .map(|(k, v)| restricted(v).map(|v| (k, v)))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .map_err(|e| format!("context: {e}"))?,
        Value::Null => return Err("context: null".into()),
    })
}

impl PolicyEngine {
    /// Loads the policies of `dir`.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file and line at fault.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let schema = schema()?;
        let policies = load_dir(dir, &schema)?;
        Ok(Self {
            dir: dir.to_owned(),
            schema,
            current: RwLock::new(Arc::new(policies)),
            authorizer: Authorizer::new(),
        })
    }

    /// Reloads the directory. On any error the policies in force stay.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file and line at fault.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let fresh = load_dir(&self.dir, &self.schema)?;
        let n = fresh.len();
        // A poisoned lock only means a panic elsewhere while swapping an Arc; the value is whole.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(n)
    }

    /// The policies in force.
    pub fn current(&self) -> Arc<Policies> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Decides whether `principal` may do `action` on `resource`, with an empty context. Any
    /// failure to build the request is a denial.
    pub fn decide(
        &self,
        principal: &WorkloadId,
        action: PolicyAction,
        resource: &Resource<'_>,
    ) -> Verdict {
        self.decide_in(principal, action, resource, None)
    }

    /// Decides with a request context (a JSON object shaped as the schema declares for
    /// `action`). Any failure to build the request is a denial.
    pub fn decide_in(
        &self,
        principal: &WorkloadId,
        action: PolicyAction,
        resource: &Resource<'_>,
        context: Option<serde_json::Value>,
    ) -> Verdict {
        self.decide_as(Principal::Workload(principal), action, resource, context)
    }

    /// Decides for any kind of principal (a workload, a CI job), with an optional context.
    /// The quorum of a permit without `@quorum` is 1, except for `ExchangeCiToken`, where the
    /// exchange itself is the decision: 0 unless a permitting policy asks for approvals.
    pub fn decide_as(
        &self,
        principal: Principal<'_>,
        action: PolicyAction,
        resource: &Resource<'_>,
        context: Option<serde_json::Value>,
    ) -> Verdict {
        let default_quorum = u32::from(action != PolicyAction::ExchangeCiToken);
        let policies = self.current();
        let denied = |why: String| Verdict {
            allowed: false,
            policies: Vec::new(),
            quorum: 0,
            errors: vec![why],
        };
        let built = entities::build(principal, resource)
            .and_then(|(p, r, list)| {
                let entities = Entities::from_entities(list, Some(&self.schema))
                    .map_err(|e| format!("entities: {e}"))?;
                Ok((p, r, entities))
            })
            .and_then(|(p, r, entities)| {
                let action =
                    EntityUid::from_str(&format!("Taskcred::Action::\"{}\"", action.name()))
                        .map_err(|e| format!("action: {e}"))?;
                // Built as Cedar values directly (the JSON context parser costs more than the
                // decision); `Request::new` below still checks it against the schema.
                let context = match context {
                    Some(serde_json::Value::Object(fields)) => Context::from_pairs(
                        fields
                            .into_iter()
                            .map(|(k, v)| restricted(v).map(|v| (k, v)))
                            .collect::<Result<Vec<_>, String>>()?,
                    )
                    .map_err(|e| format!("context: {e}"))?,
                    Some(other) => return Err(format!("context: not a record: {other}")),
                    None => Context::empty(),
                };
                let request = Request::new(p, action, r, context, Some(&self.schema))
                    .map_err(|e| format!("request: {e}"))?;
                Ok((request, entities))
            });
        let (request, entities) = match built {
            Ok(b) => b,
            Err(why) => return denied(why),
        };
        let response = self
            .authorizer
            .is_authorized(&request, &policies.set, &entities);
        let determining: Vec<&PolicyId> = response.diagnostics().reason().collect();
        let allowed = response.decision() == Decision::Allow;
        let quorum = if allowed {
            determining
                .iter()
                .map(|id| {
                    policies
                        .set
                        .annotation(id, "quorum")
                        .and_then(|q| q.parse::<u32>().ok())
                        .unwrap_or(default_quorum)
                })
                .max()
                .unwrap_or(default_quorum)
        } else {
            0
        };
        Verdict {
            allowed,
            policies: determining.iter().map(ToString::to_string).collect(),
            quorum,
            errors: response
                .diagnostics()
                .errors()
                .map(ToString::to_string)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
