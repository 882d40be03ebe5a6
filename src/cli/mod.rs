//! The command line of the one `taskcred` binary: flags, and the client subcommands that talk to
//! a broker over the generated gRPC client. Exit codes: 0 success, 1 the broker refused or could
//! not be reached (or `policy check` found an invalid set), 2 bad usage (flags, missing files),
//! 64 a configuration the server refuses.

pub mod agent;
pub mod audit;
pub mod bench;
pub mod cert;
pub mod ci;
pub mod doctor;
pub mod key;
pub mod lease;
pub mod policy;
pub mod revocations;
mod shared;
pub mod stdout;
pub mod task;
pub mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use crate::client::{ClientArgs, ClientError, connect};

use crate::api::pb::WhoAmIRequest;
use crate::api::pb::identity_service_client::IdentityServiceClient;
use crate::devpki;
use shared::{answer, open, rfc3339};

/// taskcred: credentials that live exactly as long as one approved task.
#[derive(Debug, Parser)]
#[command(name = "taskcred", version, about, propagate_version = true)]
pub struct Cli {
    /// How to reach the broker and who to be.
    #[command(flatten)]
    pub client: ClientArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Check a configuration without running the broker.
    Config {
        /// Which.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Development helpers.
    Dev {
        /// Which helper.
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Print the identity the broker sees in your client certificate.
    Whoami,
    /// Check what a connection needs (the address, the CA bundle, your certificate's X509-SVID
    /// profile and validity, a handshake and WhoAmI) and say what is wrong.
    Doctor,
    /// Request, approve, deny, cancel, show and list tasks.
    Task {
        /// Which.
        #[command(subcommand)]
        command: task::TaskCommand,
    },
    /// Get task-bound X509-SVIDs, and introspect them.
    Cert {
        /// Which.
        #[command(subcommand)]
        command: cert::CertCommand,
    },
    /// Renew or revoke a lease.
    Lease {
        /// Which.
        #[command(subcommand)]
        command: lease::LeaseCommand,
    },
    /// Get task-bound tokens, and introspect them.
    Token {
        /// Which.
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Force-revoke an agent (lock it), lift a lock, list locks.
    Agent {
        /// Which.
        #[command(subcommand)]
        command: agent::AgentCommand,
    },
    /// Follow revocations as verifiers see them.
    Revocations {
        /// Which.
        #[command(subcommand)]
        command: revocations::RevocationsCommand,
    },
    /// Rotate the broker's JWT signing key.
    Key {
        /// Which.
        #[command(subcommand)]
        command: key::KeyCommand,
    },
    /// For CI pipelines: exchange the job's OIDC ID token for a credential, end the job's task.
    Ci {
        /// Which.
        #[command(subcommand)]
        command: ci::CiCommand,
    },
    /// Check an audit log's hash chain (offline).
    Audit {
        /// Which.
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Measure issuance, introspection and CI exchange against scratch brokers, with the floors
    /// (no-op RPC, raw signatures, raw Redis writes) and, without --quick, the scale runs.
    Bench(bench::BenchArgs),
    /// Check policies offline, or reload them on a broker.
    Policy {
        /// Which.
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
}

/// `taskcred serve`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["config", "dev"]))]
pub struct ServeArgs {
    /// The configuration file (see config/taskcred.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Development mode: create the dev PKI in --dev-dir if needed and serve it on loopback.
    #[arg(long)]
    pub dev: bool,
    /// Override server.grpc_addr.
    #[arg(long, value_name = "ADDR")]
    pub grpc_addr: Option<String>,
    /// Override server.http_addr.
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<String>,
    /// Override log.format: human or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Keep tasks and leases in the Redis at URL (redis://) instead of the embedded
    /// store; the same as store.backend = "redis" with store.redis_url.
    #[arg(long, value_name = "URL", conflicts_with = "redis_cluster")]
    pub redis: Option<String>,
    /// Keep tasks and leases on the Redis Cluster these seed nodes (redis://, comma-separated)
    /// belong to; the same as store.backend = "redis_cluster" with store.redis_urls.
    #[arg(long, value_name = "URL,URL")]
    pub redis_cluster: Option<String>,
}

/// `taskcred config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and check the configuration, the policies and the key files exactly as `serve`
    /// would, without binding a port, opening the store or writing anything; say what was found
    /// (exit 0) or what is wrong (exit 64).
    Check(ServeArgs),
}

/// `taskcred dev ...`.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Create the dev PKI: root CA, broker certificate, JWT key, identity certificates.
    Init {
        /// Where [default: --dev-dir].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Runs `dev init`.
pub fn dev_init(args: &ClientArgs, dir: Option<PathBuf>) -> ExitCode {
    let dir = dir.unwrap_or_else(|| args.dev_dir.clone());
    match devpki::init(&dir) {
        Ok(report) => {
            if args.json {
                let json = serde_json::json!({
                    "dir": dir,
                    "created": report.created,
                    "kept": report.kept,
                });
                crate::outln!("{json}");
            } else {
                for f in &report.created {
                    crate::outln!("created {}", f.display());
                }
                crate::outln!(
                    "dev PKI ready in {} ({} created, {} kept)",
                    dir.display(),
                    report.created.len(),
                    report.kept.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::errln!("error: dev init: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs `whoami`.
pub async fn whoami(args: &ClientArgs) -> ExitCode {
    let result = async {
        let mut client = open(args, IdentityServiceClient::new).await?;
        answer(client.who_am_i(WhoAmIRequest {})).await
    }
    .await;
    let me = match result {
        Ok(me) => me,
        Err(e) => return crate::client::explained(args, e).await.report(args.json),
    };
    let expires = rfc3339(me.cert_not_after);
    if args.json {
        let json = serde_json::json!({
            "spiffe_id": me.spiffe_id,
            "trust_domain": me.trust_domain,
            "path": me.path,
            "cert_not_after": expires,
            "cert_sha256": me.cert_sha256,
        });
        crate::outln!("{json}");
    } else {
        crate::outln!("{}", me.spiffe_id);
        crate::outln!("  trust domain:        {}", me.trust_domain);
        crate::outln!("  path:                {}", me.path);
        crate::outln!("  certificate expires: {expires}");
        crate::outln!("  certificate sha256:  {}", me.cert_sha256);
    }
    ExitCode::SUCCESS
}
