//! The `taskcred` binary: parses flags and hands over to the library. Server: config, logging,
//! app. Client: one subcommand over gRPC.

use std::process::ExitCode;

use clap::Parser as _;
use taskcred::app::{App, AppError, Listeners};
use taskcred::broker::Broker;
use taskcred::cli::{self, Cli, Command, ConfigCommand, DevCommand, ServeArgs};
use taskcred::config::{self, Overrides, Source};
use taskcred::{devpki, telemetry};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// sysexits.h EX_USAGE: the configuration is refused.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The only crypto provider this crate builds with; installing it first means every rustls
    // config (tonic's client included) uses ring. An error means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // jsonwebtoken has no ring backend of its own; without this, decoding would panic.
    taskcred::mint::install_jose_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            taskcred::errln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Serve(ref serve_args) => serve(&cli, serve_args).await,
            Command::Config {
                command: ConfigCommand::Check(ref args),
            } => check_config(&cli, args),
            Command::Dev {
                command: DevCommand::Init { ref dir },
            } => cli::dev_init(&cli.client, dir.clone()),
            Command::Whoami => cli::whoami(&cli.client).await,
            Command::Doctor => cli::doctor::run(&cli.client).await,
            Command::Task { ref command } => cli::task::run(&cli.client, command).await,
            Command::Policy { ref command } => cli::policy::run(&cli.client, command).await,
            Command::Bench(ref args) => cli::bench::run_bench(&cli.client, args).await,
            Command::Audit { ref command } => cli::audit::run(&cli.client, command).await,
            Command::Token { ref command } => cli::token::run(&cli.client, command).await,
            Command::Cert { ref command } => cli::cert::run(&cli.client, command).await,
            Command::Lease { ref command } => cli::lease::run(&cli.client, command).await,
            Command::Agent { ref command } => cli::agent::run(&cli.client, command).await,
            Command::Key { ref command } => cli::key::run(&cli.client, command).await,
            Command::Ci { ref command } => cli::ci::run(&cli.client, command).await,
            Command::Revocations { ref command } => {
                cli::revocations::run(&cli.client, command).await
            }
        }
    })
}

/// `config check`: what `serve` would load, loaded, and said.
fn check_config(cli: &Cli, args: &ServeArgs) -> ExitCode {
    // Under --json a refusal is JSON too: {"ok": false, "error": "..."}.
    let refuse = |message: String, code: u8| {
        if cli.client.json {
            taskcred::outln!("{}", serde_json::json!({"ok": false, "error": message}));
        } else {
            taskcred::errln!("error: {message}");
        }
        ExitCode::from(code)
    };
    if args.dev && !devpki::is_complete(&cli.client.dev_dir) {
        return refuse(
            format!(
                "no dev PKI in {} (`taskcred dev init` makes one)",
                cli.client.dev_dir.display()
            ),
            EXIT_BAD_CONFIG,
        );
    }
    let config = match load_config_or(cli, args) {
        Ok(c) => c,
        Err((message, code)) => return refuse(message, code),
    };
    match App::check(&config, args.dev) {
        Ok(found) => {
            if cli.client.json {
                taskcred::outln!("{}", serde_json::json!({"ok": true, "found": found}));
            } else {
                taskcred::outln!("configuration OK");
                taskcred::outln!("  trust domains: {}", found.trust_domains.join(", "));
                taskcred::outln!(
                    "  policies:      {} in {} files",
                    found.policies,
                    found.policy_files.len()
                );
                taskcred::outln!("  signing key:   {}", found.signing_key);
                taskcred::outln!(
                    "  issuing CA:    {}",
                    if found.issuing_ca {
                        "yes"
                    } else {
                        "none (no certificates)"
                    }
                );
                taskcred::outln!("  CI issuers:    {}", found.ci_issuers.join(", "));
                taskcred::outln!("  store:         {}", found.store);
                taskcred::outln!("  audit log:     {}", found.audit.display());
                taskcred::outln!(
                    "  listen:        gRPC {}, HTTP {}",
                    found.listen.0,
                    found.listen.1
                );
                for w in &found.warnings {
                    taskcred::outln!("  warning: {w}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => refuse(format!("configuration refused: {e}"), EXIT_BAD_CONFIG),
    }
}

/// The configuration `serve` and `config check` read: `--config FILE`, or the dev PKI's with
/// `--dev`, with the flags' overrides; a refusal is reported and is the exit code.
fn load_config(cli: &Cli, args: &ServeArgs) -> Result<taskcred::config::Config, ExitCode> {
    load_config_or(cli, args).map_err(|(message, code)| {
        taskcred::errln!("error: {message}");
        ExitCode::from(code)
    })
}

/// As [`load_config`], the refusal and its exit code returned instead of said.
fn load_config_or(cli: &Cli, args: &ServeArgs) -> Result<taskcred::config::Config, (String, u8)> {
    let source = if args.dev {
        Source::Dev(cli.client.dev_dir.clone())
    } else if let Some(path) = &args.config {
        Source::File(path.clone())
    } else {
        // clap's argument group makes one of the two required.
        return Err(("needs --config FILE or --dev".into(), 2));
    };
    let overrides = Overrides {
        grpc_addr: args.grpc_addr.clone(),
        http_addr: args.http_addr.clone(),
        log_format: args.log_format.clone(),
        redis_url: args.redis.clone(),
        redis_cluster: args.redis_cluster.clone(),
    };
    config::load(&source, std::env::vars(), &overrides)
        .map_err(|e| (format!("configuration refused: {e}"), EXIT_BAD_CONFIG))
}

async fn serve(cli: &Cli, args: &ServeArgs) -> ExitCode {
    if args.dev {
        let dir = &cli.client.dev_dir;
        if !devpki::is_complete(dir) {
            match devpki::init(dir) {
                Ok(report) => taskcred::errln!(
                    "dev PKI: {} files created in {}",
                    report.created.len(),
                    dir.display()
                ),
                Err(e) => {
                    taskcred::errln!("error: dev init: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    let config = match load_config(cli, args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    telemetry::init_logging(config.log.format, &config.log.level);
    let server = config.server.clone();
    let warnings = taskcred::app::startup_warnings(&config, args.dev);
    let listeners = match Listeners::bind(&server).await {
        Ok(l) => l,
        Err(e) => {
            taskcred::errln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    // A dev broker on a port the kernel picked: its issuer (the JWK Set's address in
    // discovery) is the address it really listens on.
    let mut config = config;
    if args.dev
        && server.http_addr.port() == 0
        && let Some(addr) = listeners.http_addr()
    {
        let scheme = if server.http_tls { "https" } else { "http" };
        config.issuer.url = format!("{scheme}://{addr}");
    }
    let app = match App::build(config) {
        Ok(app) => app,
        // The store is configured right but cannot be opened (another broker holds the file).
        Err(e @ AppError::Store(_)) => {
            taskcred::errln!("error: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            taskcred::errln!("error: configuration refused: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    // Signal handlers are installed before the banner: whoever waits for the banner may signal
    // at once, and the default action of SIGTERM, SIGINT and SIGHUP is to die.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            taskcred::errln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals.run(app.broker().clone(), shutdown.clone()));
    print_banner(&listeners, server.http_tls, args.dev, cli);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    match app.run(listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            taskcred::errln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn print_banner(listeners: &Listeners, http_tls: bool, dev: bool, cli: &Cli) {
    let show = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "?".into(), |a| a.to_string());
    taskcred::outln!("taskcred broker listening");
    taskcred::outln!("  gRPC (mTLS): {}", show(listeners.grpc_addr()));
    taskcred::outln!(
        "  HTTP:        {}://{}  (/healthz /readyz /metrics)",
        if http_tls { "https" } else { "http" },
        show(listeners.http_addr())
    );
    if dev {
        taskcred::outln!("  dev PKI:     {}", cli.client.dev_dir.display());
        taskcred::outln!("try:  cargo run --release -- --as agent whoami");
    }
}

/// The signals the broker handles.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGINT or SIGTERM cancel `shutdown`. SIGHUP reloads the policies; a refused set is logged
    /// and audited by the broker, and the policies in force stay.
    async fn run(mut self, broker: Broker, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = self.interrupt.recv() => {
                    tracing::info!("SIGINT received");
                    break;
                }
                _ = self.terminate.recv() => {
                    tracing::info!("SIGTERM received");
                    break;
                }
                _ = self.hangup.recv() => {
                    let _ = broker.reload_policy_on_signal();
                }
            }
        }
        shutdown.cancel();
    }
}
