//! Delegation (issue 20), end to end over real mTLS with the dev policies, on both stores: a
//! chain agent -> agent2 -> agent3 whose credentials carry the chain (`act`, `sub` the root's
//! executor, `cnf` the current executor's certificate, root and parent ids, in tokens,
//! introspection and certificates); every rule of delegation refused with its status and reason
//! and nothing written; the approvals policy fixes for a step and who may not give them; the end
//! of a task ending the tasks below it (completion, an operator's revoke, a lock; on one broker
//! and across two replicas on one Redis), revocations streamed; the tree over gRPC and the CLI;
//! one audit line per step.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use taskcred::api::pb::revocation_event::Event;
use taskcred::api::pb::revocation_service_client::RevocationServiceClient;
use taskcred::api::pb::task_service_client::TaskServiceClient;
use taskcred::api::{pb, reason_of};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::common::flows::{AGENT, admin_as, creds_as, introspect, secs, tasks_as};
use crate::common::{
    Broker, Pem, RedisServer, ServeProcess, audit_lines, redis_env, run_as, serve_dev_args,
};

const AGENT2: &str = "spiffe://taskcred.dev/agent/helper";
const AGENT3: &str = "spiffe://taskcred.dev/agent/tester";
const APPROVER: &str = "spiffe://taskcred.dev/human/approver";
const APPROVER2: &str = "spiffe://taskcred.dev/human/approver2";
/// The private extension binding a certificate to its task.
const TASK_OID: &str = "2.25.2308847322465903446.1";

/// Where a broker of these tests keeps its tasks.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Embedded,
    Redis,
}

/// A broker on `backend` with `env`, and the Redis it uses (stop the broker first).
async fn start(backend: Backend, mut env: Vec<(String, String)>) -> (Broker, Option<RedisServer>) {
    match backend {
        Backend::Embedded => (Broker::start_with_env(env).await, None),
        Backend::Redis => {
            let redis = RedisServer::start();
            env.extend(redis_env(&redis.url()));
            (Broker::start_with_env(env).await, Some(redis))
        }
    }
}

fn grant(audience: &str, actions: &[&str]) -> pb::Grant {
    pb::Grant {
        audience: audience.into(),
        actions: actions.iter().map(|a| (*a).to_owned()).collect(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn state(t: &pb::Task) -> pb::TaskState {
    pb::TaskState::try_from(t.state).unwrap()
}

/// What a root task is asked with.
struct Root<'a> {
    executor: &'a str,
    grants: Vec<pb::Grant>,
    labels: &'a [(&'a str, &'a str)],
    deadline: i64,
    ttl: Option<i64>,
}

impl Default for Root<'_> {
    /// The demo agent at db.staging (read, write) and docs.staging (read), for an hour: one
    /// approval.
    fn default() -> Self {
        Self {
            executor: AGENT,
            grants: vec![
                grant("db.staging", &["read", "write"]),
                grant("docs.staging", &["read"]),
            ],
            labels: &[],
            deadline: 3600,
            ttl: None,
        }
    }
}

/// Requests `root` as the requester, without deciding on it.
async fn request_root(b: &Broker, root: Root<'_>) -> pb::Task {
    tasks_as(b, "requester")
        .await
        .request_task(pb::RequestTaskRequest {
            executor: root.executor.into(),
            purpose: "migrate the staging database".into(),
            grants: root.grants,
            labels: labels(root.labels),
            deadline: secs(root.deadline),
            credential_ttl: root.ttl.and_then(secs),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Requests `root` and has approver, then approver2, approve it while it is pending.
async fn approved_root(b: &Broker, root: Root<'_>) -> pb::Task {
    let mut t = request_root(b, root).await;
    for who in ["approver", "approver2"] {
        if state(&t) == pb::TaskState::Approved {
            break;
        }
        t = approve(b, who, &t.id).await;
    }
    assert_eq!(state(&t), pb::TaskState::Approved, "{t:#?}");
    t
}

/// A task the dev policy approves at once (reading a low-risk audience), executed by `executor`.
async fn outside_task(b: &Broker, executor: &str) -> pb::Task {
    let t = request_root(
        b,
        Root {
            executor,
            grants: vec![grant("db.staging", &["read"])],
            ..Root::default()
        },
    )
    .await;
    assert_eq!(state(&t), pb::TaskState::Approved);
    t
}

async fn approve(b: &Broker, who: &str, id: &str) -> pb::Task {
    try_approve(b, who, id).await.unwrap()
}

async fn try_approve(b: &Broker, who: &str, id: &str) -> Result<pb::Task, tonic::Status> {
    tasks_as(b, who)
        .await
        .approve_task(pb::DecideTaskRequest {
            task_id: id.into(),
            note: "checked the step".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A delegation of `parent` to `executor` with `grants`, everything else defaulted.
fn step(parent: &str, executor: &str, grants: Vec<pb::Grant>) -> pb::DelegateTaskRequest {
    pb::DelegateTaskRequest {
        parent_id: parent.into(),
        executor: executor.into(),
        purpose: format!("hand part of {parent} to {executor}"),
        grants,
        ..Default::default()
    }
}

async fn delegate(b: &Broker, who: &str, request: pb::DelegateTaskRequest) -> pb::Task {
    tasks_as(b, who)
        .await
        .delegate_task(request)
        .await
        .unwrap()
        .into_inner()
}

async fn get(b: &Broker, id: &str) -> pb::Task {
    tasks_as(b, "operator")
        .await
        .get_task(pb::GetTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn tree_as(
    b: &Broker,
    who: &str,
    id: &str,
) -> Result<pb::GetTaskTreeResponse, tonic::Status> {
    tasks_as(b, who)
        .await
        .get_task_tree(pb::GetTaskTreeRequest { task_id: id.into() })
        .await
        .map(tonic::Response::into_inner)
}

/// A token for `who` on `task` at `audience` (all the task grants there).
async fn token(b: &Broker, who: &str, task: &str, audience: &str) -> pb::IssueTokenResponse {
    try_token(b, who, task, audience, &[]).await.unwrap()
}

async fn try_token(
    b: &Broker,
    who: &str,
    task: &str,
    audience: &str,
    actions: &[&str],
) -> Result<pb::IssueTokenResponse, tonic::Status> {
    creds_as(b, who)
        .await
        .issue_token(pb::IssueTokenRequest {
            task_id: task.into(),
            audience: audience.into(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn x5t_s256(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &der))
}

/// The claims of `token` as JSON (read after jwt-simple verified the same token).
fn payload(token: &str) -> serde_json::Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()
}

/// A chain agent -> agent2 -> agent3, each step strictly narrower (approved at once), below a
/// root of the default grants approved by one approver.
struct Chain {
    root: pb::Task,
    child: pb::Task,
    grandchild: pb::Task,
}

async fn chain(b: &Broker) -> Chain {
    let root = approved_root(b, Root::default()).await;
    let child = delegate(
        b,
        "agent",
        step(
            &root.id,
            AGENT2,
            vec![grant("db.staging", &["read", "write"])],
        ),
    )
    .await;
    assert_eq!(state(&child), pb::TaskState::Approved, "{child:#?}");
    let grandchild = delegate(
        b,
        "agent2",
        step(&child.id, AGENT3, vec![grant("db.staging", &["read"])]),
    )
    .await;
    assert_eq!(
        state(&grandchild),
        pb::TaskState::Approved,
        "{grandchild:#?}"
    );
    Chain {
        root,
        child,
        grandchild,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The chain and its credentials.

async fn chain_scenario(b: &Broker) {
    let Chain {
        root,
        child,
        grandchild,
    } = chain(b).await;

    // The tasks say where they sit.
    assert_eq!(root.root_id, root.id);
    assert_eq!((root.depth, root.parent_id.as_str()), (0, ""));
    assert!(root.chain.is_empty());
    assert_eq!(child.executor, AGENT2);
    assert_eq!(child.requester, AGENT, "the delegator asks for the child");
    assert_eq!(child.parent_id, root.id);
    assert_eq!(child.root_id, root.id);
    assert_eq!(child.depth, 1);
    assert_eq!(child.chain, vec![AGENT.to_owned()]);
    assert_eq!(child.grants, vec![grant("db.staging", &["read", "write"])]);
    assert_eq!(child.quorum, 0);
    assert_eq!(child.request_policies, vec!["delegate-narrower".to_owned()]);
    assert_eq!(
        child.credential_ttl, root.credential_ttl,
        "the ceiling defaults to the parent's"
    );
    let (root_deadline, child_deadline) = (
        root.deadline.as_ref().unwrap().seconds,
        child.deadline.as_ref().unwrap().seconds,
    );
    assert!(
        child_deadline <= root_deadline && child_deadline >= root_deadline - 60,
        "the deadline defaults to the parent's: {child_deadline} vs {root_deadline}"
    );
    assert_eq!(grandchild.executor, AGENT3);
    assert_eq!(grandchild.requester, AGENT2);
    assert_eq!(grandchild.parent_id, child.id);
    assert_eq!(grandchild.root_id, root.id);
    assert_eq!(grandchild.depth, 2);
    assert_eq!(grandchild.chain, vec![AGENT.to_owned(), AGENT2.to_owned()]);
    assert_eq!(get(b, &root.id).await.children, vec![child.id.clone()]);
    assert_eq!(
        get(b, &child.id).await.children,
        vec![grandchild.id.clone()]
    );

    // agent3's token: verified by an independent JOSE implementation against the JWKS.
    let issued = token(b, "agent3", &grandchild.id, "db.staging").await;
    let claims = crate::common::flows::verify_independently(b, &issued.token, "db.staging").await;
    assert_eq!(
        claims.subject.as_deref(),
        Some(AGENT),
        "sub: the root task's executor"
    );
    assert_eq!(claims.custom.client_id, AGENT3);
    assert_eq!(claims.custom.task_id, grandchild.id);
    assert_eq!(claims.custom.scope, "read");
    assert_eq!(
        claims.custom.approval_ids,
        vec![root.approvals[0].id.clone()],
        "the approvals of the chain above"
    );
    let agent3_cert = b.dev_identity("agent3").cert;
    assert_eq!(
        claims.custom.cnf["x5t#S256"],
        x5t_s256(&agent3_cert).as_str(),
        "bound to the current executor's certificate"
    );
    let raw = payload(&issued.token);
    assert_eq!(
        raw["act"],
        serde_json::json!({"sub": AGENT3, "act": {"sub": AGENT2}}),
        "the actors, the current one outermost: {raw}"
    );
    assert_eq!(raw["task_id"], grandchild.id.as_str());
    assert_eq!(raw["root_task_id"], root.id.as_str());
    assert_eq!(raw["parent_task_id"], child.id.as_str());

    let i = introspect(b, &issued.token).await;
    assert!(i.active);
    assert_eq!(i.sub, AGENT);
    assert_eq!(i.client_id, AGENT3);
    assert_eq!(i.task_id, grandchild.id);
    assert_eq!(i.actors, vec![AGENT3.to_owned(), AGENT2.to_owned()]);
    assert_eq!(i.root_task_id, root.id);
    assert_eq!(i.parent_task_id, child.id);
    assert_eq!(i.cnf_x5t_s256, x5t_s256(&agent3_cert));

    // One step down: one actor.
    let middle = token(b, "agent2", &child.id, "db.staging").await;
    let raw = payload(&middle.token);
    assert_eq!(raw["sub"], AGENT);
    assert_eq!(raw["act"], serde_json::json!({"sub": AGENT2}));
    assert_eq!(raw["root_task_id"], root.id.as_str());
    assert_eq!(raw["parent_task_id"], root.id.as_str());
    assert_eq!(raw["scope"], "read write");
    let i = introspect(b, &middle.token).await;
    assert_eq!(i.actors, vec![AGENT2.to_owned()]);
    assert_eq!(
        (i.root_task_id.as_str(), i.parent_task_id.as_str()),
        (root.id.as_str(), root.id.as_str())
    );

    // The root: no chain at all.
    let top = token(b, "agent", &root.id, "db.staging").await;
    let raw = payload(&top.token);
    assert_eq!(raw["sub"], AGENT);
    for claim in ["act", "root_task_id", "parent_task_id"] {
        assert!(raw.get(claim).is_none(), "{claim} in a root's token: {raw}");
    }
    let i = introspect(b, &top.token).await;
    assert!(i.actors.is_empty());
    assert_eq!(
        (i.root_task_id.as_str(), i.parent_task_id.as_str()),
        ("", "")
    );

    // Only each task's executor gets its credentials, within its grants.
    for (who, task) in [
        ("agent", &grandchild.id),
        ("agent2", &grandchild.id),
        ("agent3", &child.id),
    ] {
        let err = try_token(b, who, task, "db.staging", &[])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
        assert_eq!(
            reason_of(&err).as_deref(),
            Some("NOT_THE_EXECUTOR"),
            "{who}: {err:?}"
        );
    }
    let err = try_token(b, "agent3", &grandchild.id, "db.staging", &["write"])
        .await
        .unwrap_err();
    assert_eq!(
        reason_of(&err).as_deref(),
        Some("ACTION_NOT_GRANTED"),
        "{err:?}"
    );
    let err = try_token(b, "agent2", &child.id, "docs.staging", &[])
        .await
        .unwrap_err();
    assert_eq!(
        reason_of(&err).as_deref(),
        Some("AUDIENCE_NOT_GRANTED"),
        "{err:?}"
    );

    // A certificate for the grandchild names the task, its root and its parent.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let cert = creds_as(b, "agent3")
        .await
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: grandchild.id.clone(),
            csr,
            ttl: secs(120),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        task_extension(&cert.certificate_pem),
        vec![grandchild.id.clone(), root.id.clone(), child.id.clone()]
    );
    let i = creds_as(b, "approver")
        .await
        .introspect(pb::IntrospectRequest {
            token: String::new(),
            certificate: cert.certificate_pem.clone().into_bytes(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(i.active);
    assert_eq!(i.sub, AGENT3, "a certificate names its holder");
    assert_eq!(i.task_id, grandchild.id);
    assert_eq!(i.root_task_id, root.id);
    assert_eq!(i.parent_task_id, child.id);
    // A root's certificate keeps the plain form: one UTF8String.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let plain = creds_as(b, "agent")
        .await
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: root.id.clone(),
            csr,
            ttl: secs(120),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        task_extension(&plain.certificate_pem),
        vec![root.id.clone()]
    );

    // The tree over gRPC: depth first, as far as the caller may read.
    for who in ["requester", "agent", "operator"] {
        let t = tree_as(b, who, &root.id).await.unwrap();
        let ids: Vec<&str> = t.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![root.id.as_str(), child.id.as_str(), grandchild.id.as_str()],
            "{who}"
        );
        assert_eq!((t.hidden, t.truncated), (0, false), "{who}");
        let parents: Vec<&str> = t.tasks.iter().map(|t| t.parent_id.as_str()).collect();
        assert_eq!(parents, vec!["", root.id.as_str(), child.id.as_str()]);
        let executors: Vec<&str> = t.tasks.iter().map(|t| t.executor.as_str()).collect();
        assert_eq!(executors, vec![AGENT, AGENT2, AGENT3]);
        assert!(t.tasks.iter().all(|t| state(t) == pb::TaskState::Approved));
        assert_eq!(t.tasks[2].grants, vec![grant("db.staging", &["read"])]);
    }
    let below = tree_as(b, "agent2", &child.id).await.unwrap();
    let ids: Vec<&str> = below.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, vec![child.id.as_str(), grandchild.id.as_str()]);
    let err = tree_as(b, "agent2", &root.id).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "agent2 does not read the root"
    );
    let err = tree_as(b, "agent3", &child.id).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "agent3 does not read its parent"
    );
}

/// The values of the task extension of `pem`: the task id alone (a DER UTF8String), or a DER
/// SEQUENCE of UTF8Strings (task, root, parent).
fn task_extension(pem: &str) -> Vec<String> {
    use x509_parser::prelude::*;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    let ext = c
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == TASK_OID)
        .expect("the task extension");
    assert!(!ext.critical);
    let utf8s = |mut der: &[u8]| {
        let mut out = Vec::new();
        while !der.is_empty() {
            assert_eq!(der[0], 0x0c, "a UTF8String: {der:02x?}");
            let len = usize::from(der[1]);
            assert!(len < 0x80 && der.len() >= 2 + len, "{der:02x?}");
            out.push(String::from_utf8(der[2..2 + len].to_vec()).unwrap());
            der = &der[2 + len..];
        }
        out
    };
    match ext.value {
        [0x0c, ..] => {
            let one = utf8s(ext.value);
            assert_eq!(one.len(), 1);
            one
        }
        [0x30, len, items @ ..] => {
            assert_eq!(usize::from(*len), items.len(), "a short-form DER length");
            let all = utf8s(items);
            assert_eq!(all.len(), 3, "task, root, parent");
            all
        }
        other => panic!("unexpected extension value {other:02x?}"),
    }
}

#[tokio::test]
async fn chain_carries_its_actors_on_the_embedded_store() {
    let (b, _redis) = start(Backend::Embedded, Vec::new()).await;
    chain_scenario(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn chain_carries_its_actors_on_redis() {
    let (b, _redis) = start(Backend::Redis, Vec::new()).await;
    chain_scenario(&b).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Refusals: a clear status, and nothing written.

/// Every task the operator lists, and the tree below `root`.
async fn snapshot(b: &Broker, root: &str) -> (Vec<pb::Task>, pb::GetTaskTreeResponse) {
    let mut operator = tasks_as(b, "operator").await;
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = operator
            .list_tasks(pb::ListTasksRequest {
                page_size: 100,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.tasks);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    (all, tree_as(b, "operator", root).await.unwrap())
}

/// What a refused delegation must answer.
struct Refusal<'a> {
    case: &'a str,
    code: Code,
    reason: &'a str,
    /// Words the message must hold (it says what to fix).
    says: &'a str,
}

/// Sends `request` through `client`, which must refuse it as `expected` says and leave every
/// task (the list and the tree of `root`) as it was.
async fn refused(
    b: &Broker,
    client: &mut TaskServiceClient<Channel>,
    root: &str,
    request: pb::DelegateTaskRequest,
    expected: Refusal<'_>,
) {
    let case = expected.case;
    let before = snapshot(b, root).await;
    let err = client.delegate_task(request).await.unwrap_err();
    assert_eq!(err.code(), expected.code, "{case}: {err:?}");
    assert_eq!(
        reason_of(&err).as_deref(),
        Some(expected.reason),
        "{case}: {err:?}"
    );
    assert!(
        err.message().contains(expected.says),
        "{case}: {:?} does not say {:?}",
        err.message(),
        expected.says
    );
    let after = snapshot(b, root).await;
    assert!(
        before == after,
        "{case}: a refused delegation changed the tasks:\nbefore {before:#?}\nafter {after:#?}"
    );
}

const fn widens<'a>(case: &'a str, says: &'a str) -> Refusal<'a> {
    Refusal {
        case,
        code: Code::PermissionDenied,
        reason: "DELEGATION_WIDENS",
        says,
    }
}

const fn unmet<'a>(case: &'a str, reason: &'a str, says: &'a str) -> Refusal<'a> {
    Refusal {
        case,
        code: Code::FailedPrecondition,
        reason,
        says,
    }
}

const fn denied<'a>(case: &'a str, reason: &'a str, says: &'a str) -> Refusal<'a> {
    Refusal {
        case,
        code: Code::PermissionDenied,
        reason,
        says,
    }
}

/// A client presenting a certificate for `spiffe_id`, signed by the dev CA.
async fn tasks_with(b: &Broker, spiffe_id: &str) -> (TaskServiceClient<Channel>, Pem) {
    let mut params = crate::common::svid_params(&[spiffe_id]);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let pem = crate::common::issue(&params, &b.dev_ca());
    (TaskServiceClient::new(b.channel(Some(&pem)).await), pem)
}

async fn lock(b: &Broker, agent: &str, reason: &str) -> pb::LockAgentResponse {
    admin_as(b, "operator")
        .await
        .lock_agent(pb::LockAgentRequest {
            agent: agent.into(),
            reason: reason.into(),
            duration: None,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn unlock(b: &Broker, agent: &str) {
    admin_as(b, "operator")
        .await
        .unlock_agent(pb::UnlockAgentRequest {
            agent: agent.into(),
        })
        .await
        .unwrap();
}

async fn refusals_scenario(b: &Broker) {
    let mut agent = tasks_as(b, "agent").await;
    let mut agent2 = tasks_as(b, "agent2").await;
    let root = approved_root(
        b,
        Root {
            labels: &[("team", "payments")],
            ttl: Some(300),
            ..Root::default()
        },
    )
    .await;
    let child = delegate(
        b,
        "agent",
        step(
            &root.id,
            AGENT2,
            vec![grant("db.staging", &["read", "write"])],
        ),
    )
    .await;
    assert_eq!(state(&child), pb::TaskState::Approved);
    let narrow = || step(&root.id, AGENT2, vec![grant("db.staging", &["read"])]);

    // Widening, in each of its forms.
    refused(
        b,
        &mut agent,
        &root.id,
        step(&root.id, AGENT2, vec![grant("db.production", &["read"])]),
        widens("an audience the parent lacks", "db.production"),
    )
    .await;
    refused(
        b,
        &mut agent,
        &root.id,
        step(
            &root.id,
            AGENT2,
            vec![grant("db.staging", &["read", "delete"])],
        ),
        widens("an action the parent lacks", "delete"),
    )
    .await;
    refused(
        b,
        &mut agent2,
        &root.id,
        step(&child.id, AGENT3, vec![grant("docs.staging", &["read"])]),
        widens(
            "an audience the grandparent has and the parent not",
            "docs.staging",
        ),
    )
    .await;
    refused(
        b,
        &mut agent,
        &root.id,
        pb::DelegateTaskRequest {
            deadline: secs(7200),
            ..narrow()
        },
        widens("a later deadline", "deadline"),
    )
    .await;
    refused(
        b,
        &mut agent,
        &root.id,
        pb::DelegateTaskRequest {
            credential_ttl: secs(600),
            ..narrow()
        },
        widens("a longer credential ceiling", "credential_ttl"),
    )
    .await;
    refused(
        b,
        &mut agent,
        &root.id,
        pb::DelegateTaskRequest {
            labels: labels(&[("team", "platform")]),
            ..narrow()
        },
        widens("a label of the parent changed", "team"),
    )
    .await;

    // The chain: no agent twice, only the executor delegates.
    refused(
        b,
        &mut agent2,
        &root.id,
        step(&child.id, AGENT, vec![grant("db.staging", &["read"])]),
        denied(
            "agent2 delegating back to agent",
            "AGENT_TWICE_IN_CHAIN",
            "chain",
        ),
    )
    .await;
    refused(
        b,
        &mut agent,
        &root.id,
        step(&root.id, AGENT, vec![grant("db.staging", &["read"])]),
        denied(
            "agent delegating to itself",
            "AGENT_TWICE_IN_CHAIN",
            "chain",
        ),
    )
    .await;
    refused(
        b,
        &mut agent2,
        &root.id,
        step(&root.id, AGENT3, vec![grant("db.staging", &["read"])]),
        denied("agent2 delegating the root", "NOT_THE_EXECUTOR", "executor"),
    )
    .await;
    refused(
        b,
        &mut agent,
        &root.id,
        step(&child.id, AGENT3, vec![grant("db.staging", &["read"])]),
        denied(
            "agent delegating its delegate's task",
            "NOT_THE_EXECUTOR",
            "executor",
        ),
    )
    .await;
    let mut requester = tasks_as(b, "requester").await;
    refused(
        b,
        &mut requester,
        &root.id,
        narrow(),
        denied(
            "the root's requester delegating it",
            "NOT_THE_EXECUTOR",
            "executor",
        ),
    )
    .await;

    // Bad ids.
    refused(
        b,
        &mut agent,
        &root.id,
        step(
            "0192f4c5-0000-7000-8000-000000000000",
            AGENT2,
            vec![grant("db.staging", &["read"])],
        ),
        Refusal {
            case: "an unknown parent",
            code: Code::NotFound,
            reason: "TASK_NOT_FOUND",
            says: "task",
        },
    )
    .await;
    refused(
        b,
        &mut agent,
        &root.id,
        step("../etc", AGENT2, vec![grant("db.staging", &["read"])]),
        Refusal {
            case: "a malformed parent id",
            code: Code::InvalidArgument,
            reason: "INVALID_FIELD",
            says: "parent_id",
        },
    )
    .await;

    // The parent's state: pending, ended, expired.
    let pending = request_root(b, Root::default()).await;
    assert_eq!(state(&pending), pb::TaskState::PendingApproval);
    refused(
        b,
        &mut agent,
        &pending.id,
        step(&pending.id, AGENT2, vec![grant("db.staging", &["read"])]),
        unmet("a pending parent", "TASK_NOT_APPROVED", "pending"),
    )
    .await;
    let ended = approved_root(b, Root::default()).await;
    tasks_as(b, "requester")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: ended.id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    refused(
        b,
        &mut agent,
        &ended.id,
        step(&ended.id, AGENT2, vec![grant("db.staging", &["read"])]),
        unmet("an ended parent", "TASK_NOT_APPROVED", "completed"),
    )
    .await;
    let short = request_root(
        b,
        Root {
            grants: vec![grant("db.staging", &["read"])],
            deadline: 2,
            ..Root::default()
        },
    )
    .await;
    assert_eq!(state(&short), pb::TaskState::Approved);
    // The reaper ends it within a second of its deadline.
    let until = Instant::now() + Duration::from_secs(20);
    while state(&get(b, &short.id).await) != pb::TaskState::Expired {
        assert!(Instant::now() < until, "the reaper did not expire the task");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused(
        b,
        &mut agent,
        &short.id,
        step(&short.id, AGENT2, vec![grant("db.staging", &["read"])]),
        unmet("an expired parent", "TASK_NOT_APPROVED", "expired"),
    )
    .await;

    // RequestTask does not make children.
    let err = tasks_as(b, "requester")
        .await
        .request_task(pb::RequestTaskRequest {
            executor: AGENT2.into(),
            purpose: "a child the wrong way".into(),
            grants: vec![grant("db.staging", &["read"])],
            parent_id: root.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason_of(&err).as_deref(), Some("INVALID_FIELD"));
    assert!(err.message().starts_with("parent_id"), "{}", err.message());
    assert_eq!(
        get(b, &root.id).await.children,
        vec![child.id.clone()],
        "nothing was added below the root"
    );

    // Depth: the default limit is 4 below the root. Three more agents, with certificates of the
    // dev CA, make a chain of six.
    let deep_root = approved_root(
        b,
        Root {
            grants: vec![grant(
                "db.staging",
                &["read", "list", "describe", "stat", "head", "tail"],
            )],
            ..Root::default()
        },
    )
    .await;
    let (x4, _) = tasks_with(b, "spiffe://taskcred.dev/agent/x4").await;
    let (x5, _) = tasks_with(b, "spiffe://taskcred.dev/agent/x5").await;
    let steps = [
        (agent.clone(), AGENT2),
        (agent2.clone(), AGENT3),
        (
            tasks_as(b, "agent3").await,
            "spiffe://taskcred.dev/agent/x4",
        ),
        (x4, "spiffe://taskcred.dev/agent/x5"),
    ];
    let mut parent = deep_root.clone();
    let mut actions = vec!["read", "list", "describe", "stat", "head", "tail"];
    for (depth, (mut delegator, executor)) in (1..).zip(steps) {
        actions.pop();
        let t = delegator
            .delegate_task(step(
                &parent.id,
                executor,
                vec![grant("db.staging", &actions)],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((t.depth, state(&t)), (depth, pb::TaskState::Approved));
        parent = t;
    }
    let mut delegator = x5;
    assert_eq!(parent.depth, 4);
    actions.pop();
    refused(
        b,
        &mut delegator,
        &deep_root.id,
        step(
            &parent.id,
            "spiffe://taskcred.dev/agent/x6",
            vec![grant("db.staging", &actions)],
        ),
        denied("depth 5 below the root", "DELEGATION_TOO_DEEP", "max_depth"),
    )
    .await;

    // Locks: of the delegate, of the delegator (a task requested after its lock: the lock's
    // own sweep ended the ones before).
    lock(b, AGENT3, "test: the delegate is locked").await;
    refused(
        b,
        &mut agent2,
        &root.id,
        step(&child.id, AGENT3, vec![grant("db.staging", &["read"])]),
        denied("a locked delegate", "AGENT_LOCKED", AGENT3),
    )
    .await;
    unlock(b, AGENT3).await;
    // A locked delegator's tasks were ended by its lock, and it gets no new one to delegate
    // from.
    lock(b, AGENT, "test: the delegator is locked").await;
    let err = tasks_as(b, "requester")
        .await
        .request_task(pb::RequestTaskRequest {
            executor: AGENT.into(),
            purpose: "migrate the staging database".into(),
            grants: vec![grant("db.staging", &["read"])],
            deadline: secs(600),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(reason_of(&err).as_deref(), Some("AGENT_LOCKED"), "{err:?}");
    unlock(b, AGENT).await;
}

#[tokio::test]
async fn refusals_write_nothing_on_the_embedded_store() {
    let (b, _redis) = start(Backend::Embedded, Vec::new()).await;
    refusals_scenario(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn refusals_write_nothing_on_redis() {
    let (b, _redis) = start(Backend::Redis, Vec::new()).await;
    refusals_scenario(&b).await;
    b.stop().await;
}

/// With `[delegation] max_depth = 1` one step is allowed, the second refused; with 0, none.
async fn configured_depth(backend: Backend) {
    let (b, redis) = start(
        backend,
        vec![("TASKCRED_DELEGATION__MAX_DEPTH".into(), "1".into())],
    )
    .await;
    let root = approved_root(&b, Root::default()).await;
    let child = delegate(
        &b,
        "agent",
        step(
            &root.id,
            AGENT2,
            vec![grant("db.staging", &["read", "write"])],
        ),
    )
    .await;
    assert_eq!(child.depth, 1);
    refused(
        &b,
        &mut tasks_as(&b, "agent2").await,
        &root.id,
        step(&child.id, AGENT3, vec![grant("db.staging", &["read"])]),
        denied(
            "depth 2 with max_depth 1",
            "DELEGATION_TOO_DEEP",
            "max_depth",
        ),
    )
    .await;
    b.stop().await;
    drop(redis);

    let (b, redis) = start(
        backend,
        vec![("TASKCRED_DELEGATION__MAX_DEPTH".into(), "0".into())],
    )
    .await;
    let root = approved_root(&b, Root::default()).await;
    refused(
        &b,
        &mut tasks_as(&b, "agent").await,
        &root.id,
        step(&root.id, AGENT2, vec![grant("db.staging", &["read"])]),
        denied(
            "any step with max_depth 0",
            "DELEGATION_TOO_DEEP",
            "max_depth",
        ),
    )
    .await;
    b.stop().await;
    drop(redis);
}

#[tokio::test]
async fn the_configured_depth_holds_on_the_embedded_store() {
    configured_depth(Backend::Embedded).await;
}

#[tokio::test]
async fn the_configured_depth_holds_on_redis() {
    configured_depth(Backend::Redis).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Policy: the approvals a step needs, and who may not give them.

async fn policy_scenario(b: &Broker) {
    // A production root: two approvals.
    let root = approved_root(
        b,
        Root {
            labels: &[("env", "production")],
            ..Root::default()
        },
    )
    .await;
    assert_eq!(root.quorum, 2);

    // Strictly narrower, nothing write-like: approved at once.
    let reads = delegate(
        b,
        "agent",
        step(&root.id, AGENT2, vec![grant("db.staging", &["read"])]),
    )
    .await;
    assert_eq!(state(&reads), pb::TaskState::Approved);
    assert_eq!(reads.quorum, 0);
    assert_eq!(reads.request_policies, vec!["delegate-narrower".to_owned()]);
    assert_eq!(
        reads.labels.get("env").map(String::as_str),
        Some("production"),
        "a child keeps its parent's labels"
    );

    // Keeping `write` on a production task: one approver.
    let writes = delegate(
        b,
        "agent",
        step(
            &root.id,
            AGENT3,
            vec![grant("db.staging", &["read", "write"])],
        ),
    )
    .await;
    assert_eq!(state(&writes), pb::TaskState::PendingApproval);
    assert_eq!(writes.quorum, 1);
    assert_eq!(
        writes.request_policies,
        vec!["delegate-production-writes".to_owned()]
    );
    // Pending: no credentials yet.
    let err = try_token(b, "agent3", &writes.id, "db.staging", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Neither the delegator, the delegate nor the root's requester approves it.
    for who in ["agent", "agent3", "requester"] {
        let err = try_approve(b, who, &writes.id).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
        assert_eq!(
            state(&get(b, &writes.id).await),
            pb::TaskState::PendingApproval
        );
    }
    // An approver does (one who approved the root too: they are not in the chain).
    let approved = approve(b, "approver", &writes.id).await;
    assert_eq!(state(&approved), pb::TaskState::Approved);
    assert_eq!(approved.approvals.len(), 1);
    assert_eq!(approved.approvals[0].approver, APPROVER);
    // Its token carries every approval of the chain: the root's two, then the step's.
    let issued = token(b, "agent3", &writes.id, "db.staging").await;
    let claims = crate::common::flows::verify_independently(b, &issued.token, "db.staging").await;
    let mut expected: Vec<String> = root.approvals.iter().map(|a| a.id.clone()).collect();
    expected.push(approved.approvals[0].id.clone());
    assert_eq!(claims.custom.approval_ids, expected);

    // Handing on all of a task: one approver, production or not.
    let plain = approved_root(b, Root::default()).await;
    let all = delegate(b, "agent", step(&plain.id, AGENT2, plain.grants.clone())).await;
    assert_eq!(state(&all), pb::TaskState::PendingApproval);
    assert_eq!(all.quorum, 1);
    assert_eq!(all.request_policies, vec!["delegate-all-of-it".to_owned()]);
    assert_eq!(
        state(&approve(b, "approver2", &all.id).await),
        pb::TaskState::Approved
    );

    // Separation of duties holds whatever the policy says: with a policy that lets anyone
    // approve, nobody of the chain decides on a step of it.
    let path = b.path("policies/tasks.cedar");
    let policies = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{policies}\n@id(\"anyone-approves\")\npermit (principal, action == \
             Taskcred::Action::\"ApproveTask\", resource);\n"
        ),
    )
    .unwrap();
    admin_as(b, "operator")
        .await
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap();
    // agent3 hands all of its (approved) step on to agent2: pending, quorum 1.
    let deeper = delegate(b, "agent3", step(&writes.id, AGENT2, writes.grants.clone())).await;
    assert_eq!(state(&deeper), pb::TaskState::PendingApproval);
    assert_eq!(deeper.chain, vec![AGENT.to_owned(), AGENT3.to_owned()]);
    for (who, reason) in [
        ("agent3", "REQUESTER_MAY_NOT_DECIDE"),
        ("agent2", "EXECUTOR_MAY_NOT_DECIDE"),
        ("agent", "CHAIN_MAY_NOT_DECIDE"),
        ("requester", "CHAIN_MAY_NOT_DECIDE"),
    ] {
        let err = try_approve(b, who, &deeper.id).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
        assert_eq!(reason_of(&err).as_deref(), Some(reason), "{who}: {err:?}");
    }
    assert_eq!(
        state(&get(b, &deeper.id).await),
        pb::TaskState::PendingApproval
    );
    let done = approve(b, "approver2", &deeper.id).await;
    assert_eq!(state(&done), pb::TaskState::Approved);
    assert_eq!(done.approvals[0].approver, APPROVER2);
}

#[tokio::test]
async fn policy_fixes_the_approvals_of_a_step_on_the_embedded_store() {
    let (b, _redis) = start(Backend::Embedded, Vec::new()).await;
    policy_scenario(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn policy_fixes_the_approvals_of_a_step_on_redis() {
    let (b, _redis) = start(Backend::Redis, Vec::new()).await;
    policy_scenario(&b).await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. The end of a task ends the tasks below it.

async fn watch(b: &Broker) -> Streaming<pb::RevocationEvent> {
    let mut s = RevocationServiceClient::new(b.channel_as("verifier").await)
        .watch_revocations(pb::WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // The current set first, up to `Synced`.
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("no synced in time")
            .unwrap()
            .expect("the stream ended");
        if matches!(e.event, Some(Event::Synced(_))) {
            return s;
        }
    }
}

/// Reads `s` until every credential of `jtis` was streamed as revoked, by `deadline`.
async fn streamed(
    s: &mut Streaming<pb::RevocationEvent>,
    jtis: &[&str],
    deadline: Instant,
    what: &str,
) -> Vec<pb::Revoked> {
    let mut missing: HashSet<&str> = jtis.iter().copied().collect();
    let mut seen = Vec::new();
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(message) = tokio::time::timeout(left, s.message()).await else {
            panic!("{what}: {missing:?} not streamed in time (saw {seen:#?})");
        };
        let e = message.unwrap().expect("the stream ended");
        if let Some(Event::Revoked(r)) = e.event {
            missing.remove(r.credential_id.as_str());
            seen.push(r);
        }
    }
    seen
}

/// The three tasks of a chain with a token each.
struct Issued {
    chain: Chain,
    root: pb::IssueTokenResponse,
    child: pb::IssueTokenResponse,
    grandchild: pb::IssueTokenResponse,
}

async fn issued_chain(b: &Broker) -> Issued {
    let chain = chain(b).await;
    Issued {
        root: token(b, "agent", &chain.root.id, "db.staging").await,
        child: token(b, "agent2", &chain.child.id, "db.staging").await,
        grandchild: token(b, "agent3", &chain.grandchild.id, "db.staging").await,
        chain,
    }
}

/// Whether `token` is active on each of `brokers`, the same on all.
async fn active_on(brokers: &[&Broker], token: &str) -> bool {
    let mut answers = Vec::new();
    for b in brokers {
        answers.push(introspect(b, token).await.active);
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "the replicas disagree: {answers:?}"
    );
    answers[0]
}

/// The cascade, its tree made on `a` and ended through `b` (the same broker on the embedded
/// store, two replicas on one Redis).
async fn cascade(a: &Broker, b: &Broker) {
    let both = [a, b];
    let mut on_a = watch(a).await;
    let mut on_b = watch(b).await;

    // (a) Completing the root ends the child and the grandchild, with their credentials.
    let t = issued_chain(a).await;
    let other = outside_task(a, AGENT2).await;
    let other_token = token(a, "agent2", &other.id, "db.staging").await;
    for tok in [&t.root, &t.child, &t.grandchild, &other_token] {
        assert!(active_on(&both, &tok.token).await);
    }
    let done = tasks_as(b, "requester")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: t.chain.root.id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let returned = Instant::now();
    for tok in [&t.root, &t.child, &t.grandchild] {
        assert!(
            !active_on(&both, &tok.token).await,
            "a token of the tree is active after the root's completion: {}",
            tok.jti
        );
    }
    assert_eq!(
        done.revoked_leases, 3,
        "the root's credential and the two below"
    );
    assert_eq!(state(&done.task.unwrap()), pb::TaskState::Completed);
    for id in [&t.chain.child.id, &t.chain.grandchild.id] {
        let ended = get(a, id).await;
        assert_eq!(state(&ended), pb::TaskState::Revoked, "{ended:#?}");
        assert!(ended.ended_at.is_some());
        assert!(!ended.end_reason.is_empty());
    }
    for s in [&mut on_a, &mut on_b] {
        let seen = streamed(
            s,
            &[&t.child.jti, &t.grandchild.jti],
            returned + Duration::from_secs(1),
            "completion",
        )
        .await;
        let child = seen
            .iter()
            .find(|r| r.credential_id == t.child.jti)
            .unwrap();
        assert_eq!(
            (child.task_id.as_str(), child.agent.as_str()),
            (t.chain.child.id.as_str(), AGENT2)
        );
        let grandchild = seen
            .iter()
            .find(|r| r.credential_id == t.grandchild.jti)
            .unwrap();
        assert_eq!(
            (grandchild.task_id.as_str(), grandchild.agent.as_str()),
            (t.chain.grandchild.id.as_str(), AGENT3)
        );
    }
    // A task of agent2 outside the tree is untouched.
    assert_eq!(state(&get(b, &other.id).await), pb::TaskState::Approved);
    assert!(active_on(&both, &other_token.token).await);
    // Nothing more is delegated below an ended tree, and nothing issued in it.
    let err = tasks_as(a, "agent2")
        .await
        .delegate_task(step(
            &t.chain.child.id,
            AGENT3,
            vec![grant("db.staging", &["read"])],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = try_token(a, "agent3", &t.chain.grandchild.id, "db.staging", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let tree = tree_as(b, "requester", &t.chain.root.id).await.unwrap();
    let states: Vec<pb::TaskState> = tree.tasks.iter().map(state).collect();
    assert_eq!(
        states,
        vec![
            pb::TaskState::Completed,
            pb::TaskState::Revoked,
            pb::TaskState::Revoked
        ]
    );

    // (b) Revoking the middle task ends it and the grandchild, not the root.
    let t = issued_chain(a).await;
    let revoked = tasks_as(b, "operator")
        .await
        .revoke_task(pb::RevokeTaskRequest {
            task_id: t.chain.child.id.clone(),
            reason: "test: the helper went astray".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let returned = Instant::now();
    assert_eq!(state(&revoked.task.unwrap()), pb::TaskState::Revoked);
    assert!(!active_on(&both, &t.child.token).await);
    assert!(!active_on(&both, &t.grandchild.token).await);
    assert!(active_on(&both, &t.root.token).await, "the root lives on");
    assert_eq!(
        state(&get(a, &t.chain.child.id).await),
        pb::TaskState::Revoked
    );
    assert_eq!(
        state(&get(a, &t.chain.grandchild.id).await),
        pb::TaskState::Revoked
    );
    assert_eq!(
        state(&get(a, &t.chain.root.id).await),
        pb::TaskState::Approved
    );
    streamed(
        &mut on_a,
        &[&t.child.jti, &t.grandchild.jti],
        returned + Duration::from_secs(5),
        "revoke",
    )
    .await;

    // (c) Locking agent2 ends its task and agent3's below it; not the root, not agent3's task
    // outside the tree.
    let t = issued_chain(a).await;
    let elsewhere = outside_task(a, AGENT3).await;
    let elsewhere_token = token(a, "agent3", &elsewhere.id, "db.staging").await;
    let locked = lock(b, AGENT2, "test: helper compromised").await;
    let returned = Instant::now();
    assert!(
        locked.revoked_leases.contains(&t.child.lease_id)
            && locked.revoked_tasks.contains(&t.chain.child.id),
        "{locked:#?}"
    );
    assert!(!active_on(&both, &t.child.token).await);
    assert!(
        !active_on(&both, &t.grandchild.token).await,
        "agent3's credential below the locked agent"
    );
    assert!(active_on(&both, &t.root.token).await, "the root lives on");
    assert!(active_on(&both, &elsewhere_token.token).await);
    assert_eq!(
        state(&get(a, &t.chain.child.id).await),
        pb::TaskState::Revoked
    );
    assert_eq!(
        state(&get(a, &t.chain.grandchild.id).await),
        pb::TaskState::Revoked
    );
    assert_eq!(
        state(&get(a, &t.chain.root.id).await),
        pb::TaskState::Approved
    );
    assert_eq!(state(&get(a, &elsewhere.id).await), pb::TaskState::Approved);
    streamed(
        &mut on_b,
        &[&t.child.jti, &t.grandchild.jti],
        returned + Duration::from_secs(5),
        "lock",
    )
    .await;
    unlock(b, AGENT2).await;
}

#[tokio::test]
async fn the_end_of_a_task_ends_its_tree_on_the_embedded_store() {
    let (b, _redis) = start(Backend::Embedded, Vec::new()).await;
    cascade(&b, &b).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_task_ends_its_tree_across_two_replicas_on_redis() {
    let redis = RedisServer::start();
    let a = Broker::start_on_redis(&redis.url()).await;
    let b = a.replica(redis_env(&redis.url())).await;
    cascade(&a, &b).await;
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. The CLI: `task delegate` and `task tree`.

#[test]
fn cli_delegates_and_shows_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let serve = ServeProcess::start(&serve_dev_args(dev_s), &[]);
    let as_ = |name: &str, args: &[&str]| run_as(serve.grpc, dev_s, name, args);

    let (code, out, err) = as_(
        "requester",
        &[
            "task",
            "request",
            "--executor",
            AGENT,
            "--grant",
            "db.staging=read,write",
            "--grant",
            "docs.staging=read",
            "--purpose",
            "migrate the staging database",
            "--deadline",
            "30m",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let root = out.trim().to_owned();
    let (code, _, err) = as_("approver", &["task", "approve", &root]);
    assert_eq!(code, 0, "{err}");

    // `task delegate` prints the child's id.
    let (code, out, err) = as_(
        "agent",
        &[
            "task",
            "delegate",
            &root,
            "--executor",
            AGENT2,
            "--grant",
            "db.staging=read,write",
            "--purpose",
            "run the migration",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let child = out.trim().to_owned();
    assert_eq!(child.len(), 36, "{out}");
    assert_ne!(child, root);
    // With --json, the task.
    let (code, out, err) = as_(
        "agent2",
        &[
            "--json",
            "task",
            "delegate",
            &child,
            "--executor",
            AGENT3,
            "--grant",
            "db.staging=read",
            "--purpose",
            "check the migrated rows",
            "--ttl",
            "2m",
            "--label",
            "step=verify",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    let grandchild = g["id"].as_str().unwrap().to_owned();
    assert_eq!(g["state"], "approved", "{g}");
    assert_eq!(g["parent_id"], child.as_str());
    assert_eq!(g["root_id"], root.as_str());
    assert_eq!(g["depth"], 2);
    assert_eq!(g["chain"], serde_json::json!([AGENT, AGENT2]));
    assert_eq!(g["credential_ttl_secs"], 120);
    assert_eq!(g["labels"]["step"], "verify");

    // A widening is refused: exit 1, the reason said.
    let (code, out, _) = as_(
        "agent2",
        &[
            "--json",
            "task",
            "delegate",
            &child,
            "--executor",
            AGENT3,
            "--grant",
            "db.staging=delete",
            "--purpose",
            "too much",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["error"]["code"], "PERMISSION_DENIED", "{out}");
    assert_eq!(e["error"]["reason"], "DELEGATION_WIDENS", "{out}");

    // `task tree --json`: the tasks nested, with states, executors and grants.
    let tree = |who: &str| -> serde_json::Value {
        let (code, out, err) = as_(who, &["--json", "task", "tree", &root]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let t = tree("requester");
    assert_eq!(t["id"], root.as_str(), "{t}");
    assert_eq!(t["state"], "approved");
    assert_eq!(t["executor"], AGENT);
    assert_eq!(
        t["grants"],
        serde_json::json!([
            {"audience": "db.staging", "actions": ["read", "write"]},
            {"audience": "docs.staging", "actions": ["read"]}
        ])
    );
    assert_eq!(
        (t["hidden"].as_u64(), t["truncated"].as_bool()),
        (Some(0), Some(false))
    );
    let c = &t["children"];
    assert_eq!(c.as_array().unwrap().len(), 1, "{t}");
    assert_eq!(c[0]["id"], child.as_str());
    assert_eq!(c[0]["state"], "approved");
    assert_eq!(c[0]["executor"], AGENT2);
    assert_eq!(
        c[0]["grants"],
        serde_json::json!([{"audience": "db.staging", "actions": ["read", "write"]}])
    );
    let gc = &c[0]["children"];
    assert_eq!(gc.as_array().unwrap().len(), 1, "{t}");
    assert_eq!(gc[0]["id"], grandchild.as_str());
    assert_eq!(gc[0]["state"], "approved");
    assert_eq!(gc[0]["executor"], AGENT3);
    assert_eq!(
        gc[0]["grants"],
        serde_json::json!([{"audience": "db.staging", "actions": ["read"]}])
    );
    assert_eq!(gc[0]["children"], serde_json::json!([]));

    // The human form: a line a task, indented by depth.
    let (code, out, err) = as_("agent", &["task", "tree", &root]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, (indent, id, executor)) in lines.iter().zip([
        ("", &root, AGENT),
        ("  ", &child, AGENT2),
        ("    ", &grandchild, AGENT3),
    ]) {
        assert!(line.starts_with(&format!("{indent}{id}")), "{out}");
        assert!(
            line.contains("approved") && line.contains(executor),
            "{out}"
        );
    }

    // Completing the root ends the tree.
    let (code, _, err) = as_("agent", &["task", "complete", &root]);
    assert_eq!(code, 0, "{err}");
    let t = tree("requester");
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["children"][0]["state"], "revoked", "{t}");
    assert_eq!(t["children"][0]["children"][0]["state"], "revoked", "{t}");

    assert_eq!(serve.terminate().code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 6. The audit log: one provenance line per step.

async fn audit_scenario(b: &Broker) {
    let root = approved_root(
        b,
        Root {
            labels: &[("env", "production")],
            ..Root::default()
        },
    )
    .await;
    let child = delegate(
        b,
        "agent",
        pb::DelegateTaskRequest {
            purpose: "run the production migration".into(),
            ..step(
                &root.id,
                AGENT2,
                vec![grant("db.staging", &["read", "write"])],
            )
        },
    )
    .await;
    assert_eq!(state(&child), pb::TaskState::PendingApproval);
    let child = approve(b, "approver", &child.id).await;
    let grandchild = delegate(
        b,
        "agent2",
        pb::DelegateTaskRequest {
            purpose: "check the migrated rows".into(),
            labels: labels(&[("step", "verify")]),
            ..step(&child.id, AGENT3, vec![grant("db.staging", &["read"])])
        },
    )
    .await;
    assert_eq!(state(&grandchild), pb::TaskState::Approved);
    // A refusal is a line too.
    tasks_as(b, "agent2")
        .await
        .delegate_task(step(
            &child.id,
            AGENT3,
            vec![grant("db.staging", &["delete"])],
        ))
        .await
        .unwrap_err();

    let path = b.path("audit.jsonl");
    let until = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines: Vec<serde_json::Value> = audit_lines(&path)
            .into_iter()
            .filter(|l| l["action"] == "DelegateTask")
            .collect();
        if lines.len() >= 3 || Instant::now() > until {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let allowed: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["decision"] == "allow").collect();
    assert_eq!(allowed.len(), 2, "one line per step: {lines:#?}");
    let denied: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["decision"] == "deny").collect();
    assert_eq!(denied.len(), 1, "{lines:#?}");
    assert_eq!(denied[0]["principal"], AGENT2);
    assert_eq!(denied[0]["task"], child.id.as_str());
    assert!(
        denied[0]["reason"].as_str().unwrap().contains("delete"),
        "{:#?}",
        denied[0]
    );

    let (first, second) = (allowed[0], allowed[1]);
    let root_reviewers: Vec<String> = [APPROVER, APPROVER2]
        .iter()
        .map(|a| format!("{a} ({})", root.id))
        .collect();

    assert_eq!(first["principal"], AGENT, "{first:#?}");
    assert_eq!(first["task"], child.id.as_str());
    assert_eq!(
        first["policies"],
        serde_json::json!(["delegate-production-writes"])
    );
    let d = &first["details"];
    assert_eq!(d["purpose"], "run the production migration", "{first:#?}");
    assert_eq!(d["parent"], root.id.as_str());
    assert_eq!(d["root"], root.id.as_str());
    assert_eq!(d["executor"], AGENT2);
    assert_eq!(d["grants"], serde_json::json!(["db.staging=read,write"]));
    assert_eq!(d["depth"], 1);
    assert_eq!(d["chain"], serde_json::json!([AGENT]));
    assert_eq!(d["reviewers"], serde_json::json!(root_reviewers));
    assert_eq!(d["quorum"], 1);

    assert_eq!(second["principal"], AGENT2, "{second:#?}");
    assert_eq!(second["task"], grandchild.id.as_str());
    assert_eq!(second["policies"], serde_json::json!(["delegate-narrower"]));
    let d = &second["details"];
    assert_eq!(d["purpose"], "check the migrated rows", "{second:#?}");
    assert_eq!(d["parent"], child.id.as_str());
    assert_eq!(d["root"], root.id.as_str());
    assert_eq!(d["executor"], AGENT3);
    assert_eq!(d["grants"], serde_json::json!(["db.staging=read"]));
    assert_eq!(d["depth"], 2);
    assert_eq!(d["chain"], serde_json::json!([AGENT, AGENT2]));
    let mut reviewers = root_reviewers.clone();
    reviewers.push(format!("{APPROVER} ({})", child.id));
    assert_eq!(d["reviewers"], serde_json::json!(reviewers));
    assert_eq!(d["quorum"], 0);

    // The labels of each step: the first keeps the root's; the second adds one, which is part
    // of what was decided on and must be on the record.
    let label_set = |v: &serde_json::Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("labels: {v}"))
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        label_set(&first["details"]["labels"]),
        BTreeSet::from(["env=production".to_owned()])
    );
    assert_eq!(
        label_set(&second["details"]["labels"]),
        BTreeSet::from(["env=production".to_owned(), "step=verify".to_owned()]),
        "the audit line of a step names the labels of the task it made: {second:#?}"
    );
}

#[tokio::test]
async fn the_audit_log_holds_one_line_per_step_on_the_embedded_store() {
    let (b, _redis) = start(Backend::Embedded, Vec::new()).await;
    audit_scenario(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn the_audit_log_holds_one_line_per_step_on_redis() {
    let (b, _redis) = start(Backend::Redis, Vec::new()).await;
    audit_scenario(&b).await;
    b.stop().await;
}
