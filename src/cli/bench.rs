//! `taskcred bench`: runs the benchmark ([`crate::bench`]) and prints its table, or its JSON.

use std::process::ExitCode;

use clap::Args;

use super::ClientArgs;
use crate::bench::{Options, run, table};

/// `taskcred bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The reduced set: 3 s windows, no scale runs (under two minutes on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Calls in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Reused mTLS channels the calls share.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Measured seconds per figure [default: 3 with --quick, else 10].
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Run the scale runs even with --quick, or skip them without it (--scale false).
    #[arg(long)]
    pub scale: Option<bool>,
    /// Live leases of the scale runs.
    #[arg(long, default_value_t = 1_000_000)]
    pub scale_leases: usize,
    /// Leases of the force-revoke run.
    #[arg(long, default_value_t = 10_000)]
    pub revoke_leases: usize,
    /// Which Redis: `single` (one server, and the embedded store) or `cluster` (a local Redis
    /// Cluster of 3 masters and 3 replicas the bench starts: issuance with each durability,
    /// bytes per lease, force-revoke, a failover under load).
    #[arg(long, value_name = "STORE", default_value = "single", value_parser = ["single", "cluster"])]
    pub store: String,
}

/// Runs `taskcred bench`.
pub async fn run_bench(client: &ClientArgs, args: &BenchArgs) -> ExitCode {
    let opts = Options {
        quick: args.quick,
        concurrency: args.concurrency,
        channels: args.channels,
        seconds: args.seconds,
        scale: args.scale.unwrap_or(!args.quick),
        scale_leases: args.scale_leases,
        revoke_leases: args.revoke_leases,
        cluster: args.store == "cluster",
    };
    match run(&opts).await {
        Ok(report) => {
            if client.json {
                crate::outln!("{report}");
            } else {
                crate::out!("{}", table(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::errln!("error: bench: {e}");
            ExitCode::from(1)
        }
    }
}
