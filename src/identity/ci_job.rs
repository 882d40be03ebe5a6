//! [`CiJob`]: what was verified about a CI job's identity. The `ci` module reads it out of a
//! verified ID token; policy sees it as the Cedar principal `CiJob`, and minting puts it in the
//! `ci` claim. It lives here, below all three, so that none of them depends on another for it.

use serde::{Deserialize, Serialize};

/// A CI job as its ID token proves it: the Cedar principal `CiJob` and the `ci` claim of the
/// credentials it gets. Every value was bounded and checked for control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiJob {
    /// The configured name of the issuer (e.g. `github`).
    pub issuer_name: String,
    /// The token's `iss`.
    pub issuer: String,
    /// The token's `sub`.
    pub subject: String,
    /// e.g. `org/app` (GitLab: the project path).
    pub repository: String,
    /// The immutable repository (project) id.
    pub repository_id: String,
    /// e.g. `org` (GitLab: the namespace path).
    pub repository_owner: String,
    /// The immutable owner (namespace) id.
    pub repository_owner_id: String,
    /// e.g. `refs/heads/main` (GitLab: `main`).
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// `branch` or `tag`.
    pub ref_type: String,
    /// Whether the ref is protected (GitLab); `false` when the provider does not say.
    pub ref_protected: bool,
    /// The deployment environment, empty when none.
    pub environment: String,
    /// What started the run (`push`, `pull_request`, GitLab's pipeline source...).
    pub event: String,
    /// The workflow (GitLab: CI config) with its ref.
    pub workflow_ref: String,
    /// The workflow the job runs (a reusable workflow's ref, when one is used).
    pub job_workflow_ref: String,
    /// The run (GitLab: pipeline) id.
    pub run_id: String,
    /// The attempt of the run, from 1.
    pub run_attempt: i64,
    /// The job's signed id (GitHub's `check_run_id`, GitLab's `job_id`); empty when the token
    /// carries none. Never a name the pipeline gave: that is not signed.
    pub job: String,
    /// Who triggered the run.
    pub actor: String,
    /// The commit.
    pub sha: String,
    /// `github-hosted`, `self-hosted`...
    pub runner_environment: String,
}
