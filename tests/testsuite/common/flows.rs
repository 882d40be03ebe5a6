//! Task and credential flows the end-to-end tests share: clients as dev identities, an approved
//! task for the demo agent, token requests, introspection.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::prelude::{
    ECDSAP256PublicKeyLike as _, ES256PublicKey, Ed25519PublicKey, EdDSAPublicKeyLike as _,
    JWTClaims, VerificationOptions,
};
use serde::Deserialize;
use taskcred::api::pb;
use taskcred::api::pb::admin_service_client::AdminServiceClient;
use taskcred::api::pb::credential_service_client::CredentialServiceClient;
use taskcred::api::pb::task_service_client::TaskServiceClient;
use tonic::transport::Channel;

use super::Broker;

pub const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
pub const ISSUER: &str = "http://127.0.0.1:7480";

pub async fn tasks_as(b: &Broker, name: &str) -> TaskServiceClient<Channel> {
    TaskServiceClient::new(b.channel_as(name).await)
}

pub async fn admin_as(b: &Broker, name: &str) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(b.channel_as(name).await)
}

pub async fn creds_as(b: &Broker, name: &str) -> CredentialServiceClient<Channel> {
    CredentialServiceClient::new(b.channel_as(name).await)
}

pub fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// The request of the tasks [`approved_task`] makes, for `executor`.
pub fn task_request_for(executor: &str) -> pb::RequestTaskRequest {
    pb::RequestTaskRequest {
        executor: executor.into(),
        purpose: "rotate the staging database password".into(),
        grants: vec![
            pb::Grant {
                audience: "db.staging".into(),
                actions: vec!["read".into(), "rotate".into()],
            },
            pb::Grant {
                audience: "https://vault.example.com".into(),
                actions: vec!["secret:read".into()],
            },
        ],
        deadline: secs(3600),
        ..Default::default()
    }
}

/// Requests a task for the demo agent with `labels`, and has `approver` approve it if needed.
pub async fn approved_task(b: &Broker, labels: &[(&str, &str)], ttl: Option<i64>) -> pb::Task {
    let request = pb::RequestTaskRequest {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        credential_ttl: ttl.and_then(secs),
        ..task_request_for(AGENT)
    };
    let t = tasks_as(b, "requester")
        .await
        .request_task(request)
        .await
        .unwrap()
        .into_inner();
    if t.state == pb::TaskState::Approved as i32 {
        return t;
    }
    tasks_as(b, "approver")
        .await
        .approve_task(pb::DecideTaskRequest {
            task_id: t.id.clone(),
            note: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub fn token_request(task: &str, audience: &str) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        task_id: task.into(),
        audience: audience.into(),
        ..Default::default()
    }
}

/// A token for the demo agent on `task` at `db.staging`, lasting `ttl` seconds if given.
pub async fn issue_as_agent(b: &Broker, task: &str, ttl: Option<i64>) -> pb::IssueTokenResponse {
    creds_as(b, "agent")
        .await
        .issue_token(pb::IssueTokenRequest {
            ttl: ttl.and_then(secs),
            ..token_request(task, "db.staging")
        })
        .await
        .unwrap()
        .into_inner()
}

/// Introspects `token` as the approver (any authenticated caller may).
pub async fn introspect(b: &Broker, token: &str) -> pb::IntrospectResponse {
    creds_as(b, "approver")
        .await
        .introspect(pb::IntrospectRequest {
            token: token.into(),
            certificate: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[derive(Debug, Deserialize)]
pub struct Custom {
    pub client_id: String,
    pub scope: String,
    pub task_id: String,
    pub approval_ids: Vec<String>,
    pub cnf: serde_json::Value,
}

/// Verifies `token` as an independent verifier would: JWKS from the HTTP port, jwt-simple.
pub async fn verify_independently(b: &Broker, token: &str, audience: &str) -> JWTClaims<Custom> {
    let (_, body) = b.http_get("/.well-known/jwks.json").await;
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    // As verifiers do: the key named by the token's `kid`.
    let kid = header_of(token)["kid"].as_str().unwrap().to_owned();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS"));
    let options = VerificationOptions {
        allowed_issuers: Some(HashSet::from([ISSUER.to_owned()])),
        allowed_audiences: Some(HashSet::from([audience.to_owned()])),
        required_key_id: Some(kid),
        required_signature_type: Some("at+jwt".into()),
        time_tolerance: Some(jwt_simple::prelude::Duration::from_secs(0)),
        ..Default::default()
    };
    let d = |k: &str| URL_SAFE_NO_PAD.decode(jwk[k].as_str().unwrap()).unwrap();
    match jwk["kty"].as_str() {
        Some("EC") => {
            let mut point = vec![4u8];
            point.extend(d("x"));
            point.extend(d("y"));
            ES256PublicKey::from_bytes(&point)
                .unwrap()
                .verify_token::<Custom>(token, Some(options))
                .unwrap()
        }
        Some("OKP") => Ed25519PublicKey::from_bytes(&d("x"))
            .unwrap()
            .verify_token::<Custom>(token, Some(options))
            .unwrap(),
        other => panic!("unexpected kty {other:?}"),
    }
}

/// The decoded JOSE header of `token`.
pub fn header_of(token: &str) -> serde_json::Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap()
}

/// Locks the demo agent as the operator, for `reason`, with no end.
pub async fn lock(b: &Broker, reason: &str) -> pb::LockAgentResponse {
    admin_as(b, "operator")
        .await
        .lock_agent(pb::LockAgentRequest {
            agent: AGENT.into(),
            reason: reason.into(),
            duration: None,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Lifts the demo agent's lock as the operator.
pub async fn unlock(b: &Broker) {
    admin_as(b, "operator")
        .await
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap();
}
