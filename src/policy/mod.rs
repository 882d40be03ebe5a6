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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

pub use entities::{Principal, Resource};

use crate::identity::WorkloadId;
use crate::task::Task;

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

    /// Its position in [`PolicyAction::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }

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
    /// Each policy's `@quorum`, read once at load.
    quorums: std::collections::HashMap<PolicyId, u32>,
    /// Per action (by [`PolicyAction::index`]): the policies whose action scope can match it
    /// (a policy whose scope names other actions only can never apply, so a request is decided
    /// the same by its action's subset; anything not read as a plain action name counts for
    /// every action).
    by_action: Vec<PolicySet>,
    /// Verdicts on the broker itself without context, by principal and action: they depend on
    /// nothing else (a workload's entity is made of its id), so they hold as long as these
    /// policies do. Bounded by [`ON_BROKER_CAPACITY`] (emptied when full).
    on_broker: Remembered<(String, usize)>,
}

/// Most verdicts on the broker remembered per policy set.
const ON_BROKER_CAPACITY: usize = 4096;

/// Verdicts remembered by key, at most `capacity` (emptied when full), together with the policy
/// set they were reached under: a lookup under another set finds nothing and starts afresh.
#[derive(Debug)]
struct Remembered<K> {
    capacity: usize,
    inner: std::sync::Mutex<Generation<K>>,
}

/// The policy set a [`Remembered`]'s verdicts were reached under, and the verdicts.
type Generation<K> = (Option<Arc<Policies>>, std::collections::HashMap<K, Verdict>);

impl<K: std::hash::Hash + Eq> Remembered<K> {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: std::sync::Mutex::default(),
        }
    }

    fn get(&self, under: Option<&Arc<Policies>>, key: &K) -> Option<Verdict> {
        let m = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = match (under, &m.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, _) => true,
            (Some(_), None) => false,
        };
        same.then(|| m.1.get(key).cloned()).flatten()
    }

    fn put(&self, under: Option<&Arc<Policies>>, key: K, verdict: Verdict) {
        let mut m = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stale = under.is_some_and(|a| !m.0.as_ref().is_some_and(|b| Arc::ptr_eq(a, b)));
        if stale || m.1.len() >= self.capacity {
            m.1.clear();
        }
        if let Some(a) = under {
            m.0 = Some(Arc::clone(a));
        }
        m.1.insert(key, verdict);
    }
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
    let quorums = set
        .policies()
        .filter_map(|p| {
            let q = p.annotation("quorum")?.parse::<u32>().ok()?;
            Some((p.id().clone(), q))
        })
        .collect();
    let by_action = by_action(&set)?;
    Ok(Policies {
        set,
        files,
        quorums,
        by_action,
        on_broker: Remembered::new(ON_BROKER_CAPACITY),
    })
}

/// The subsets of `set` by the actions their scopes can match (see [`Policies`]).
fn by_action(set: &PolicySet) -> Result<Vec<PolicySet>, PolicyError> {
    let index = |uid: &EntityUid| -> Option<usize> {
        if uid.type_name().to_string() != "Taskcred::Action" {
            return None;
        }
        let name = uid.id().unescaped();
        PolicyAction::ALL.iter().position(|a| a.name() == name)
    };
    let mut subsets: Vec<PolicySet> = PolicyAction::ALL.iter().map(|_| PolicySet::new()).collect();
    for policy in set.policies() {
        let named: Option<Vec<usize>> = match policy.action_constraint() {
            ActionConstraint::Eq(uid) => index(&uid).map(|i| vec![i]),
            ActionConstraint::In(uids) => uids.iter().map(index).collect(),
            _ => None,
        };
        for (i, subset) in subsets.iter_mut().enumerate() {
            if named.as_ref().is_none_or(|n| n.contains(&i)) {
                subset
                    .add(policy.clone())
                    .map_err(|e| PolicyError::Schema(format!("policy subset: {e}")))?;
            }
        }
    }
    Ok(subsets)
}

/// What policy needs of a task to decide its executor's requests on it, built once per version
/// of the task (see [`PolicyEngine::prepare_task`]).
#[derive(Debug)]
pub struct PreparedTask {
    executor: WorkloadId,
    principal: EntityUid,
    resource: EntityUid,
    entities: Entities,
    /// Verdicts already reached on this version of the task, by action and context: a
    /// verdict depends on nothing else (the policies, the entities and the context: no clock,
    /// no other input), so it is reused while the same policies are in force.
    verdicts: Remembered<(usize, String)>,
}

/// Most verdicts remembered per prepared task (emptied when full).
const MEMO_CAPACITY: usize = 32;

/// The policies in force and the means to decide and reload.
#[derive(Debug)]
pub struct PolicyEngine {
    dir: PathBuf,
    schema: Schema,
    current: RwLock<Arc<Policies>>,
    authorizer: Authorizer,
    /// Per action (by [`PolicyAction::index`]): whether a prepared request's context was checked
    /// against the schema.
    checked: [AtomicBool; PolicyAction::ALL.len()],
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
            checked: std::array::from_fn(|_| AtomicBool::new(false)),
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
        if !matches!(resource, Resource::Broker) {
            return self.decide_in(principal, action, resource, None);
        }
        let policies = self.current();
        let key = (principal.as_str().to_owned(), action.index());
        if let Some(v) = policies.on_broker.get(None, &key) {
            return v;
        }
        let verdict = self.decide_on(
            &policies,
            Principal::Workload(principal),
            action,
            resource,
            None,
        );
        policies.on_broker.put(None, key, verdict.clone());
        verdict
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
        self.decide_on(&self.current(), principal, action, resource, context)
    }

    /// [`PolicyEngine::decide_as`] by `policies`.
    fn decide_on(
        &self,
        policies: &Policies,
        principal: Principal<'_>,
        action: PolicyAction,
        resource: &Resource<'_>,
        context: Option<serde_json::Value>,
    ) -> Verdict {
        let built = entities::build(principal, resource).and_then(|(p, r, list)| {
            let entities = Entities::from_entities(list, Some(&self.schema))
                .map_err(|e| format!("entities: {e}"))?;
            let request = self.request(p, action, r, context, true)?;
            Ok((request, entities))
        });
        match built {
            Ok((request, entities)) => self.decide_built(policies, action, &request, &entities),
            Err(why) => denied(why),
        }
    }

    /// Builds what [`PolicyEngine::decide_prepared`] needs of `task`: its entities (the task,
    /// its executor as principal, the workloads it names), checked against the schema once.
    ///
    /// # Errors
    /// Why the entities cannot be built (every decision on the task is then a denial).
    pub fn prepare_task(&self, task: &Task) -> Result<PreparedTask, String> {
        let (principal, resource, list) =
            entities::build(Principal::Workload(&task.executor), &Resource::Task(task))?;
        let entities = Entities::from_entities(list, Some(&self.schema))
            .map_err(|e| format!("entities: {e}"))?;
        Ok(PreparedTask {
            executor: task.executor.clone(),
            principal,
            resource,
            entities,
            verdicts: Remembered::new(MEMO_CAPACITY),
        })
    }

    /// [`PolicyEngine::decide_as`] for `task`'s executor on `task`, from what
    /// [`PolicyEngine::prepare_task`] built of it: the same verdict, without building the
    /// entities again. Another principal is decided afresh.
    pub fn decide_prepared(
        &self,
        prepared: &PreparedTask,
        principal: &WorkloadId,
        action: PolicyAction,
        task: &Task,
        context: Option<serde_json::Value>,
    ) -> Verdict {
        if *principal != prepared.executor {
            return self.decide_as(
                Principal::Workload(principal),
                action,
                &Resource::Task(task),
                context,
            );
        }
        let policies = self.current();
        let key = (
            action.index(),
            context
                .as_ref()
                .map_or_else(String::new, ToString::to_string),
        );
        if let Some(v) = prepared.verdicts.get(Some(&policies), &key) {
            return v;
        }
        let verdict = self.decide_prepared_afresh(prepared, &policies, action, context);
        prepared.verdicts.put(Some(&policies), key, verdict.clone());
        verdict
    }

    /// [`PolicyEngine::decide_prepared`] without its memo.
    fn decide_prepared_afresh(
        &self,
        prepared: &PreparedTask,
        policies: &Policies,
        action: PolicyAction,
        context: Option<serde_json::Value>,
    ) -> Verdict {
        // The context's shape is the broker's code, the same for every request of an action:
        // checked against the schema on its first request, as every request of decide_as is.
        let first = !self.checked[action.index()].load(Ordering::Relaxed);
        let request = self.request(
            prepared.principal.clone(),
            action,
            prepared.resource.clone(),
            context,
            first,
        );
        match request {
            Ok(request) => {
                if first {
                    self.checked[action.index()].store(true, Ordering::Relaxed);
                }
                self.decide_built(policies, action, &request, &prepared.entities)
            }
            Err(why) => denied(why),
        }
    }

    /// The request of `principal` doing `action` on `resource` in `context` (built as Cedar
    /// values directly: the JSON context parser costs more than the decision), checked against
    /// the schema if `check`.
    fn request(
        &self,
        principal: EntityUid,
        action: PolicyAction,
        resource: EntityUid,
        context: Option<serde_json::Value>,
        check: bool,
    ) -> Result<Request, String> {
        let action_uid = entities::action_uid(action.name())?;
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
        Request::new(
            principal,
            action_uid,
            resource,
            context,
            check.then_some(&self.schema),
        )
        .map_err(|e| format!("request: {e}"))
    }

    /// The verdict of the policies in force on `request`.
    fn decide_built(
        &self,
        policies: &Policies,
        action: PolicyAction,
        request: &Request,
        entities: &Entities,
    ) -> Verdict {
        let default_quorum = u32::from(action != PolicyAction::ExchangeCiToken);
        let set = policies
            .by_action
            .get(action.index())
            .unwrap_or(&policies.set);
        let response = self.authorizer.is_authorized(request, set, entities);
        let determining: Vec<&PolicyId> = response.diagnostics().reason().collect();
        let allowed = response.decision() == Decision::Allow;
        let quorum = if allowed {
            determining
                .iter()
                .map(|id| policies.quorums.get(*id).copied().unwrap_or(default_quorum))
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

/// A denial for a request that could not be built.
fn denied(why: String) -> Verdict {
    Verdict {
        allowed: false,
        policies: Vec::new(),
        quorum: 0,
        errors: vec![why],
    }
}

#[cfg(test)]
mod tests;
