//! What a CI ID token says about its job: the claim names of each provider (presets for GitHub
//! Actions and GitLab CI, overridable per issuer) and the normalized [`CiJob`] policy sees.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::CiError;
use crate::identity::CiJob;

/// Longest claim value taken from an ID token, in bytes.
pub const MAX_CLAIM_BYTES: usize = 1024;

/// Which provider's claim names an issuer uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// GitHub Actions (`token.actions.githubusercontent.com` and GHES).
    Github,
    /// GitLab CI (`id_tokens:`).
    Gitlab,
    /// Any other issuer: GitHub's names as a start, each overridable.
    #[default]
    Generic,
}

/// The claim that carries each attribute of a [`CiJob`]; `None` when the provider has none
/// (the attribute is then empty, `false` or 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct ClaimNames {
    pub repository: Option<String>,
    pub repository_id: Option<String>,
    pub repository_owner: Option<String>,
    pub repository_owner_id: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub ref_type: Option<String>,
    pub ref_protected: Option<String>,
    pub environment: Option<String>,
    pub event: Option<String>,
    pub workflow_ref: Option<String>,
    pub job_workflow_ref: Option<String>,
    pub run_id: Option<String>,
    pub run_attempt: Option<String>,
    /// A signed job id (GitHub's `check_run_id`, GitLab's `job_id`); a token without one is
    /// told apart from its siblings by its other signed claims only.
    pub job: Option<String>,
    pub actor: Option<String>,
    pub sha: Option<String>,
    pub runner_environment: Option<String>,
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

impl ClaimNames {
    /// The names `preset` uses (STANDARDS.md H).
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Github | Preset::Generic => Self {
                repository: some("repository"),
                repository_id: some("repository_id"),
                repository_owner: some("repository_owner"),
                repository_owner_id: some("repository_owner_id"),
                git_ref: some("ref"),
                ref_type: some("ref_type"),
                // GitHub says nothing of branch protection: policy sees `false`.
                ref_protected: None,
                environment: some("environment"),
                event: some("event_name"),
                workflow_ref: some("workflow_ref"),
                job_workflow_ref: some("job_workflow_ref"),
                run_id: some("run_id"),
                run_attempt: some("run_attempt"),
                // Since November 2025; older GitHub Enterprise Servers leave it out.
                job: some("check_run_id"),
                actor: some("actor"),
                sha: some("sha"),
                runner_environment: some("runner_environment"),
            },
            Preset::Gitlab => Self {
                repository: some("project_path"),
                repository_id: some("project_id"),
                repository_owner: some("namespace_path"),
                repository_owner_id: some("namespace_id"),
                git_ref: some("ref"),
                ref_type: some("ref_type"),
                ref_protected: some("ref_protected"),
                environment: some("environment"),
                event: some("pipeline_source"),
                workflow_ref: some("ci_config_ref_uri"),
                job_workflow_ref: some("ci_config_ref_uri"),
                run_id: some("pipeline_id"),
                // A retried GitLab job is a new job with its own id.
                run_attempt: None,
                job: some("job_id"),
                actor: some("user_login"),
                sha: some("sha"),
                runner_environment: some("runner_environment"),
            },
        }
    }

    /// The preset's names with the given overrides on top (a table of `field = "claim"`).
    ///
    /// # Errors
    /// A one-line reason when the overrides name an unknown field.
    pub fn with_overrides(preset: Preset, overrides: &toml::Table) -> Result<Self, String> {
        let mut merged = toml::Table::new();
        let base = Self::preset(preset);
        for (field, claim) in base.fields() {
            if let Some(c) = claim {
                merged.insert(field.to_owned(), toml::Value::String(c.clone()));
            }
        }
        for (k, v) in overrides {
            merged.insert(k.clone(), v.clone());
        }
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_owned())
    }

    fn fields(&self) -> [(&'static str, &Option<String>); 17] {
        [
            ("repository", &self.repository),
            ("repository_id", &self.repository_id),
            ("repository_owner", &self.repository_owner),
            ("repository_owner_id", &self.repository_owner_id),
            ("ref", &self.git_ref),
            ("ref_type", &self.ref_type),
            ("ref_protected", &self.ref_protected),
            ("environment", &self.environment),
            ("event", &self.event),
            ("workflow_ref", &self.workflow_ref),
            ("job_workflow_ref", &self.job_workflow_ref),
            ("run_id", &self.run_id),
            ("run_attempt", &self.run_attempt),
            ("job", &self.job),
            ("actor", &self.actor),
            ("sha", &self.sha),
            ("runner_environment", &self.runner_environment),
        ]
    }
}

/// Why a claim value is refused.
fn bad_claim(name: &str, why: &str) -> CiError {
    CiError::Claims(format!("claim {name}: {why}"))
}

/// The text of claim `name`: a string, or an integer written in decimal.
fn text(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, CiError> {
    let value = match claims.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        Some(_) => return Err(bad_claim(name, "not a string")),
    };
    if value.len() > MAX_CLAIM_BYTES {
        return Err(bad_claim(name, "too long"));
    }
    if crate::text::has_deceptive(&value) {
        return Err(bad_claim(name, "control characters"));
    }
    Ok(Some(value))
}

fn field(
    claims: &Map<String, Value>,
    claim: Option<&String>,
    required: bool,
) -> Result<String, CiError> {
    let Some(name) = claim else {
        return Ok(String::new());
    };
    match text(claims, name)? {
        Some(v) if !v.is_empty() => Ok(v),
        _ if required => Err(bad_claim(name, "missing")),
        _ => Ok(String::new()),
    }
}

// `CiJob` lives in `identity`, below the modules that use it; reading one out of the claims of a
// verified ID token is this module's job, so these methods are written here.
impl CiJob {
    /// The job the verified `claims` describe, read with `names`: signed claims only.
    ///
    /// # Errors
    /// [`CiError::Claims`]: a required claim missing, a value too long, of the wrong type or with
    /// control characters.
    pub fn from_claims(
        issuer_name: &str,
        names: &ClaimNames,
        claims: &Map<String, Value>,
    ) -> Result<Self, CiError> {
        let ref_protected = match &names.ref_protected {
            None => false,
            Some(name) => match claims.get(name) {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) if s == "true" => true,
                Some(Value::String(s)) if s == "false" => false,
                Some(_) => return Err(bad_claim(name, "not \"true\" or \"false\"")),
            },
        };
        let run_attempt = match field(claims, names.run_attempt.as_ref(), false)? {
            a if a.is_empty() => 1,
            a => match a.parse::<i64>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(bad_claim("run_attempt", "not a positive integer")),
            },
        };
        let job = field(claims, names.job.as_ref(), false)?;
        let subject = text(claims, "sub")?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad_claim("sub", "missing"))?;
        let issuer = text(claims, "iss")?.unwrap_or_default();
        Ok(Self {
            issuer_name: issuer_name.to_owned(),
            issuer,
            subject,
            repository: field(claims, names.repository.as_ref(), true)?,
            repository_id: field(claims, names.repository_id.as_ref(), true)?,
            repository_owner: field(claims, names.repository_owner.as_ref(), false)?,
            repository_owner_id: field(claims, names.repository_owner_id.as_ref(), false)?,
            git_ref: field(claims, names.git_ref.as_ref(), false)?,
            ref_type: field(claims, names.ref_type.as_ref(), false)?,
            ref_protected,
            environment: field(claims, names.environment.as_ref(), false)?,
            event: field(claims, names.event.as_ref(), false)?,
            workflow_ref: field(claims, names.workflow_ref.as_ref(), false)?,
            job_workflow_ref: field(claims, names.job_workflow_ref.as_ref(), false)?,
            run_id: field(claims, names.run_id.as_ref(), true)?,
            run_attempt,
            job,
            actor: field(claims, names.actor.as_ref(), false)?,
            sha: field(claims, names.sha.as_ref(), false)?,
            runner_environment: field(claims, names.runner_environment.as_ref(), false)?,
        })
    }

    /// The key of the job's task: the same for every ID token of one job of one run attempt,
    /// made of signed claims only, so that no job can name itself into another's task. Jobs
    /// whose tokens carry no job id are told apart by their subject, workflow and environment;
    /// two such jobs that agree on all of them are one principal and share one task.
    pub fn task_key(&self) -> String {
        let parts = [
            self.issuer.as_str(),
            self.repository_id.as_str(),
            self.run_id.as_str(),
            &self.run_attempt.to_string(),
            self.job.as_str(),
            self.subject.as_str(),
            self.job_workflow_ref.as_str(),
            self.environment.as_str(),
        ];
        // Length-prefixed, so that no two different tuples hash alike.
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p.as_bytes());
        }
        crate::mint::hex(ctx.finish().as_ref())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn github_and_gitlab_claims_normalize_alike() {
        let gh = obj(json!({
            "iss": "https://token.actions.githubusercontent.com", "sub": "repo:org/app:ref:refs/heads/main",
            "repository": "org/app", "repository_id": "42", "repository_owner": "org",
            "repository_owner_id": "7", "ref": "refs/heads/main", "ref_type": "branch",
            "event_name": "push", "run_id": "1001", "run_attempt": "2", "actor": "octocat",
            "check_run_id": "77",
        }));
        let job = CiJob::from_claims("github", &ClaimNames::preset(Preset::Github), &gh).unwrap();
        assert_eq!(
            (
                job.repository_id.as_str(),
                job.run_attempt,
                job.job.as_str()
            ),
            ("42", 2, "77")
        );
        assert!(!job.ref_protected);

        let gl = obj(json!({
            "iss": "https://gitlab.example.com", "sub": "project_path:g/p:ref_type:branch:ref:main",
            "project_path": "g/p", "project_id": 12, "namespace_path": "g", "namespace_id": "3",
            "ref": "main", "ref_type": "branch", "ref_protected": "true", "pipeline_id": "55",
            "job_id": "900", "user_login": "alice",
        }));
        let names = ClaimNames::preset(Preset::Gitlab);
        let job = CiJob::from_claims("gitlab", &names, &gl).unwrap();
        assert_eq!(
            (
                job.repository_id.as_str(),
                job.job.as_str(),
                job.run_attempt
            ),
            ("12", "900", 1)
        );
        assert!(job.ref_protected);
    }

    #[test]
    fn bad_claims_are_refused() {
        let names = ClaimNames::preset(Preset::Gitlab);
        let base = json!({"iss": "i", "sub": "s", "project_path": "g/p", "project_id": "1",
            "pipeline_id": "5", "job_id": "9"});
        assert!(CiJob::from_claims("x", &names, &obj(base.clone())).is_ok());
        for (k, v) in [
            ("project_id", json!(null)),
            ("project_id", json!({"a": 1})),
            ("ref_protected", json!("yes")),
            ("project_path", json!("a\nb")),
            ("project_path", json!("x".repeat(MAX_CLAIM_BYTES + 1))),
            ("sub", json!("")),
        ] {
            let mut c = obj(base.clone());
            c.insert(k.into(), v);
            assert!(
                matches!(CiJob::from_claims("x", &names, &c), Err(CiError::Claims(_))),
                "{k}"
            );
        }
    }

    #[test]
    fn overrides_replace_single_names() {
        let mut t = toml::Table::new();
        t.insert("job".into(), toml::Value::String("job_name".into()));
        let n = ClaimNames::with_overrides(Preset::Github, &t).unwrap();
        assert_eq!(n.job.as_deref(), Some("job_name"));
        assert_eq!(n.repository.as_deref(), Some("repository"));
        // Names a preset leaves out stay out.
        assert_eq!(
            ClaimNames::with_overrides(Preset::Gitlab, &toml::Table::new()).unwrap(),
            ClaimNames::preset(Preset::Gitlab)
        );
        t.insert("nope".into(), toml::Value::String("x".into()));
        assert!(ClaimNames::with_overrides(Preset::Github, &t).is_err());
    }

    #[test]
    fn task_keys_differ_by_every_signed_part() {
        let names = ClaimNames::preset(Preset::Github);
        let base = json!({"iss": "i", "sub": "s", "repository": "o/r", "repository_id": "1",
            "run_id": "2", "run_attempt": "1", "check_run_id": "3",
            "job_workflow_ref": "o/r/.github/workflows/w.yml@refs/heads/main",
            "environment": "production"});
        let key = |v: &Value| {
            CiJob::from_claims("g", &names, &obj(v.clone()))
                .unwrap()
                .task_key()
        };
        let k = key(&base);
        assert_eq!(k, key(&base));
        for (claim, other) in [
            ("iss", json!("j")),
            ("sub", json!("t")),
            ("repository_id", json!("9")),
            ("run_id", json!("9")),
            ("run_attempt", json!("2")),
            ("check_run_id", json!("9")),
            (
                "job_workflow_ref",
                json!("o/r/.github/workflows/x.yml@refs/heads/main"),
            ),
            ("environment", json!("staging")),
        ] {
            let mut changed = base.clone();
            changed[claim] = other;
            assert_ne!(key(&changed), k, "{claim}");
        }
        // An unsigned job name is nowhere in the key: the repository name is not either.
        let mut renamed = base.clone();
        renamed["repository"] = json!("o/other");
        assert_eq!(key(&renamed), k);
    }
}
