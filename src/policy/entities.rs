//! The Cedar entities of a request: the principal, the resource, and the workloads a task refers
//! to, shaped as `config/taskcred.cedarschema` declares them.

use std::str::FromStr as _;
use std::time::Duration;

use std::sync::LazyLock;

use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};

use crate::identity::{CiJob, WorkloadId};
use crate::task::Task;

/// What a request is about.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    /// A task (as requested, or as stored).
    Task(&'a Task),
    /// The broker itself.
    Broker,
    /// A workload (the agent of LockAgent and UnlockAgent).
    Workload(&'a WorkloadId),
}

type Built = (EntityUid, EntityUid, Vec<Entity>);

/// The entity types of the schema, parsed once.
static TYPES: LazyLock<Result<[EntityTypeName; 5], String>> = LazyLock::new(|| {
    let t = |name: &str| {
        EntityTypeName::from_str(&format!("Taskcred::{name}")).map_err(|e| e.to_string())
    };
    Ok([
        t("Workload")?,
        t("Task")?,
        t("CiJob")?,
        t("Broker")?,
        t("Action")?,
    ])
});

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    let i = ["Workload", "Task", "CiJob", "Broker", "Action"]
        .iter()
        .position(|k| *k == kind)
        .ok_or_else(|| format!("entity type {kind}"))?;
    let types = TYPES.as_ref().map_err(|e| format!("entity type: {e}"))?;
    // By type and id: no Cedar text is parsed, so no id can be read as anything but an id.
    Ok(EntityUid::from_type_name_and_id(
        types[i].clone(),
        EntityId::new(id),
    ))
}

/// The uid of action `name`.
pub(super) fn action_uid(name: &str) -> Result<EntityUid, String> {
    uid("Action", name)
}

fn workload(id: &WorkloadId) -> Result<(EntityUid, Entity), String> {
    let u = uid("Workload", id.as_str())?;
    let e = Entity::new(
        u.clone(),
        std::collections::HashMap::from([
            (
                "trust_domain".to_owned(),
                RestrictedExpression::new_string(id.trust_domain().to_owned()),
            ),
            (
                "path".to_owned(),
                RestrictedExpression::new_string(id.path().to_owned()),
            ),
        ]),
        std::collections::HashSet::new(),
    )
    .map_err(|e| format!("workload entity: {e}"))?;
    Ok((u, e))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn task(t: &Task) -> Result<(EntityUid, Entity), String> {
    let u = uid("Task", &t.id.to_string())?;
    let executor = uid("Workload", t.executor.as_str())?;
    let requester = uid("Workload", t.requester.as_str())?;
    let strings = |v: Vec<String>| {
        RestrictedExpression::new_set(v.into_iter().map(RestrictedExpression::new_string))
    };
    let grants = t.grants.iter().map(|g| {
        RestrictedExpression::new_record([
            (
                "audience".to_owned(),
                RestrictedExpression::new_string(g.audience.to_string()),
            ),
            (
                "actions".to_owned(),
                strings(g.actions.iter().map(ToString::to_string).collect()),
            ),
        ])
    });
    let grants = grants
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("grant record: {e}"))?;
    let audiences = t.grants.iter().map(|g| g.audience.to_string()).collect();
    let mut actions: Vec<String> = t
        .grants
        .iter()
        .flat_map(|g| g.actions.iter().map(ToString::to_string))
        .collect();
    actions.sort();
    actions.dedup();
    let deadline_in = t.deadline.duration_since(t.created_at).unwrap_or_default();
    let (delegators, root_requester) = match &t.delegation {
        Some(d) => (
            d.chain
                .iter()
                .map(|w| uid("Workload", w.as_str()).map(RestrictedExpression::new_entity_uid))
                .collect::<Result<Vec<_>, _>>()?,
            uid("Workload", d.root_requester.as_str())?,
        ),
        None => (Vec::new(), requester.clone()),
    };
    let attrs = [
        ("executor", RestrictedExpression::new_entity_uid(executor)),
        ("requester", RestrictedExpression::new_entity_uid(requester)),
        (
            "purpose",
            RestrictedExpression::new_string(t.purpose.clone()),
        ),
        ("grants", RestrictedExpression::new_set(grants)),
        ("audiences", strings(audiences)),
        ("actions", strings(actions)),
        (
            "state",
            RestrictedExpression::new_string(t.state.as_str().to_owned()),
        ),
        (
            "credential_ttl_secs",
            RestrictedExpression::new_long(secs(t.credential_ttl)),
        ),
        (
            "deadline_in_secs",
            RestrictedExpression::new_long(secs(deadline_in)),
        ),
        (
            "depth",
            RestrictedExpression::new_long(i64::try_from(t.depth()).unwrap_or(i64::MAX)),
        ),
        ("delegators", RestrictedExpression::new_set(delegators)),
        (
            "root_requester",
            RestrictedExpression::new_entity_uid(root_requester),
        ),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let tags = t
        .labels
        .iter()
        .map(|(k, v)| (k.to_owned(), RestrictedExpression::new_string(v.to_owned())));
    let e = Entity::new_with_tags(u.clone(), attrs, [], tags)
        .map_err(|e| format!("task entity: {e}"))?;
    Ok((u, e))
}

/// Who asks.
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    /// A caller proven by its client certificate.
    Workload(&'a WorkloadId),
    /// A CI job proven by its provider's ID token.
    CiJob(&'a CiJob),
}

/// The `CiJob` entity: its id is the token's `sub`; every attribute of the job.
fn ci_job(job: &CiJob) -> Result<(EntityUid, Entity), String> {
    let u = uid("CiJob", &job.subject)?;
    let string = |v: &str| RestrictedExpression::new_string(v.to_owned());
    let attrs = [
        ("issuer", string(&job.issuer)),
        ("issuer_name", string(&job.issuer_name)),
        ("subject", string(&job.subject)),
        ("repository", string(&job.repository)),
        ("repository_id", string(&job.repository_id)),
        ("repository_owner", string(&job.repository_owner)),
        ("repository_owner_id", string(&job.repository_owner_id)),
        ("ref", string(&job.git_ref)),
        ("ref_type", string(&job.ref_type)),
        (
            "ref_protected",
            RestrictedExpression::new_bool(job.ref_protected),
        ),
        ("environment", string(&job.environment)),
        ("event", string(&job.event)),
        ("workflow_ref", string(&job.workflow_ref)),
        ("job_workflow_ref", string(&job.job_workflow_ref)),
        ("run_id", string(&job.run_id)),
        (
            "run_attempt",
            RestrictedExpression::new_long(job.run_attempt),
        ),
        ("job", string(&job.job)),
        ("actor", string(&job.actor)),
        ("sha", string(&job.sha)),
        ("runner_environment", string(&job.runner_environment)),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let e = Entity::new(u.clone(), attrs.into(), std::collections::HashSet::new())
        .map_err(|e| format!("CI job entity: {e}"))?;
    Ok((u, e))
}

/// The principal and resource uids and every entity the request refers to.
pub(super) fn build(principal: Principal<'_>, resource: &Resource<'_>) -> Result<Built, String> {
    let (p, pe) = match principal {
        Principal::Workload(w) => workload(w)?,
        Principal::CiJob(j) => ci_job(j)?,
    };
    let mut list = vec![pe];
    let r = match resource {
        Resource::Broker => {
            let u = uid("Broker", "taskcred")?;
            list.push(Entity::new_no_attrs(
                u.clone(),
                std::collections::HashSet::new(),
            ));
            u
        }
        Resource::Workload(w) => {
            let (u, e) = workload(w)?;
            if !list.iter().any(|x| x.uid() == u) {
                list.push(e);
            }
            u
        }
        Resource::Task(t) => {
            let (u, e) = task(t)?;
            list.push(e);
            let root_requester = t.delegation.as_ref().map(|d| &d.root_requester);
            for w in [&t.executor, &t.requester]
                .into_iter()
                .chain(root_requester)
            {
                // By type and id: a CI job whose `sub` reads like a SPIFFE ID is no Workload.
                let (wu, we) = workload(w)?;
                if !list.iter().any(|e| e.uid() == wu) {
                    list.push(we);
                }
            }
            u
        }
    };
    Ok((p, r, list))
}
