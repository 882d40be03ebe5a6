//! `taskcred audit ...`: offline checks of an audit log (no broker needed).

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
}

/// Runs an `audit` subcommand.
pub fn run(args: &ClientArgs, command: &AuditCommand) -> ExitCode {
    let AuditCommand::Verify { file } = command;
    let report = if file.as_os_str() == "-" {
        verify_chain(std::io::stdin().lock())
    } else {
        std::fs::File::open(file).and_then(verify_chain)
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
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
                println!(
                    "{}",
                    json!({"intact": true, "lines": lines, "anchor": anchor, "head": head})
                );
            } else {
                println!("ok: {lines} lines, the chain is intact");
                if anchor != GENESIS {
                    println!("  the first line continues a chain ending in {anchor}");
                }
                println!("  hash of the last line: {head}");
            }
            ExitCode::SUCCESS
        }
        ChainReport::Broken { line, problem } => {
            if args.json {
                println!(
                    "{}",
                    json!({"intact": false, "line": line, "problem": problem})
                );
            } else {
                println!("broken at line {line}: {problem}");
            }
            ExitCode::from(1)
        }
    }
}
