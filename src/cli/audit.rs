//! `taskcred audit ...`: offline checks of an audit log (no broker needed), and the export of
//! the shared Redis stream of all replicas' events.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::ClientArgs;
use crate::audit::{ChainReport, GENESIS, verify_chain};

/// `taskcred audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of an audit log; name the first broken line (exit 1).
    Verify {
        /// The audit log (JSON lines), or - for standard input.
        file: PathBuf,
    },
    /// Print the shared audit stream (`audit.redis_stream`) as JSON lines, oldest first; pipe
    /// it to `taskcred audit verify -` to check the chain of all replicas' events.
    Export {
        /// The store's Redis URL (one server).
        #[arg(
            long,
            env = "TASKCRED_STORE__REDIS_URL",
            required_unless_present = "redis_cluster"
        )]
        redis_url: Option<String>,
        /// The store's Redis Cluster: seed node URLs, comma-separated.
        #[arg(long, value_name = "URL,URL", conflicts_with = "redis_url")]
        redis_cluster: Option<String>,
    },
}

/// Runs an `audit` subcommand.
pub async fn run(args: &ClientArgs, command: &AuditCommand) -> ExitCode {
    match command {
        AuditCommand::Verify { file } => verify(args, file),
        AuditCommand::Export {
            redis_url,
            redis_cluster,
        } => {
            let topology = match (redis_cluster, redis_url) {
                (Some(urls), _) => crate::store::redis::Topology::Cluster(
                    urls.split(',').map(|u| u.trim().to_owned()).collect(),
                ),
                (None, Some(url)) => crate::store::redis::Topology::Single(url.clone()),
                (None, None) => {
                    crate::errln!("error: audit export: give --redis-url or --redis-cluster");
                    return ExitCode::from(2);
                }
            };
            export(&topology).await
        }
    }
}

async fn export(topology: &crate::store::redis::Topology) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = crate::audit::stream::export(topology, |line| {
        out.write_all(line)?;
        out.write_all(b"\n")
    })
    .await;
    match written.and_then(|n| out.flush().map(|()| n).map_err(|e| e.to_string())) {
        Ok(n) => {
            crate::errln!("exported {n} lines");
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::errln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn verify(args: &ClientArgs, file: &std::path::Path) -> ExitCode {
    let report = if file.as_os_str() == "-" {
        verify_chain(std::io::stdin().lock())
    } else {
        std::fs::File::open(file).and_then(verify_chain)
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            crate::errln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    match report {
        ChainReport::Intact {
            lines,
            anchor,
            head,
        } => {
            if args.json {
                crate::outln!(
                    "{}",
                    json!({"intact": true, "lines": lines, "anchor": anchor, "head": head})
                );
            } else {
                crate::outln!("ok: {lines} lines, the chain is intact");
                if anchor != GENESIS {
                    crate::outln!("  the first line continues a chain ending in {anchor}");
                }
                crate::outln!("  hash of the last line: {head}");
            }
            ExitCode::SUCCESS
        }
        ChainReport::Broken { line, problem } => {
            if args.json {
                crate::outln!(
                    "{}",
                    json!({"intact": false, "line": line, "problem": problem})
                );
            } else {
                crate::outln!("broken at line {line}: {problem}");
            }
            ExitCode::from(1)
        }
    }
}
