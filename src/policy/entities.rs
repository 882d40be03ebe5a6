//! The Cedar entities of a request: the principal, the resource, and the workloads a task refers
//! to, shaped as `config/taskcred.cedarschema` declares them.

use std::str::FromStr as _;
use std::time::Duration;

use cedar_policy::{Entity, EntityUid, RestrictedExpression};

use crate::identity::WorkloadId;
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

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    // The id is quoted as a Cedar string literal; escape_debug escapes quotes and backslashes.
    EntityUid::from_str(&format!("Taskcred::{kind}::\"{}\"", id.escape_debug()))
        .map_err(|e| format!("entity id: {e}"))
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

/// The principal and resource uids and every entity the request refers to.
pub(super) fn build(principal: &WorkloadId, resource: &Resource<'_>) -> Result<Built, String> {
    let (p, pe) = workload(principal)?;
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
            if *w != principal {
                list.push(e);
            }
            u
        }
        Resource::Task(t) => {
            let (u, e) = task(t)?;
            list.push(e);
            for w in [&t.executor, &t.requester] {
                if w != principal && !list.iter().any(|e| e.uid().id().unescaped() == w.as_str()) {
                    list.push(workload(w)?.1);
                }
            }
            u
        }
    };
    Ok((p, r, list))
}
