//! Telemetry: the `tracing` subscriber (human or JSON lines) and the process-wide Prometheus
//! recorder, with the names of the metrics the broker exports.

use std::io::IsTerminal as _;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// gRPC requests, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "taskcred_grpc_requests_total";
/// gRPC request latency in seconds, by `method` and `code`.
pub const GRPC_DURATION: &str = "taskcred_grpc_request_duration_seconds";
/// Refused TLS handshakes, by `reason`.
pub const TLS_HANDSHAKE_FAILURES: &str = "taskcred_tls_handshake_failures_total";
/// Connections closed by the broker after the handshake, by `port` (`grpc`, `http`) and `reason`
/// (`preface`, `preface_timeout`, `anonymous_limit`, `source_limit`, `identity_limit`,
/// `idle_or_age`).
pub const CONNECTIONS_CLOSED: &str = "taskcred_connections_closed_total";

/// The build, as a gauge of 1 with labels (`version`): which broker answers, on a dashboard.
pub const BUILD_INFO: &str = "taskcred_build_info";

/// Latency buckets in seconds: from 100 us (an in-memory check) to 10 s (a stuck store).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the log subscriber. `RUST_LOG`, when set, overrides `level`. A second call (tests
/// start several brokers in one process) leaves the first subscriber in place.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The process-wide Prometheus handle, installing the recorder on first use. One recorder per
/// process: metrics macros anywhere in the crate report to it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            {
                Ok(b) => b,
                // Only fails on an empty bucket list, which LATENCY_BUCKETS is not.
                Err(_) => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            register_at_zero();
            handle
        })
        .clone()
}

/// Registers at zero every counter whose label values are known, and the gauges: each series is
/// there from the first scrape (alerts on `increase()` fire on the first event; panels are not
/// empty), and the build and process metrics.
fn register_at_zero() {
    crate::broker::metrics::register_at_zero();
    for op in crate::store::metered::OPERATIONS {
        for kind in crate::store::metered::FAILURE_KINDS {
            metrics::counter!(crate::store::metered::STORE_ERRORS, "op" => *op, "kind" => *kind)
                .absolute(0);
        }
    }
    for reason in ["client_certificate", "protocol", "timeout"] {
        metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).absolute(0);
    }
    for action in crate::policy::PolicyAction::ALL {
        for reason in ["policy", "rule", "id_token"] {
            metrics::counter!(crate::audit::DENIALS, "action" => action.name(), "reason" => reason)
                .absolute(0);
        }
    }
    for sink in ["file", "redis"] {
        metrics::counter!(crate::audit::AUDIT_WRITE_FAILURES, "sink" => sink).absolute(0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    process_collector().describe();
    process_collector().collect();
}

/// The collector of the standard `process_*` metrics (CPU seconds, resident memory, open file
/// descriptors, threads, start time), read from the OS at each scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Brings the `process_*` metrics up to date (before each `/metrics` answer).
pub fn collect_process_metrics() {
    process_collector().collect();
}

fn describe() {
    metrics::describe_gauge!(BUILD_INFO, "the broker's build: 1, labelled by version");
    metrics::describe_counter!(GRPC_REQUESTS, "gRPC requests by method and status code");
    metrics::describe_histogram!(
        GRPC_DURATION,
        metrics::Unit::Seconds,
        "gRPC request latency by method and status code"
    );
    metrics::describe_counter!(
        crate::broker::LEASES_EXPIRED,
        "leases this process's reaper ended as expired"
    );
    metrics::describe_counter!(
        crate::broker::TASKS_EXPIRED,
        "tasks this process's reaper ended past their deadline"
    );
    metrics::describe_counter!(
        crate::broker::REAPER_FAILURES,
        "reaper rounds that failed because the store was unavailable"
    );
    crate::broker::metrics::describe();
    metrics::describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes refused on the gRPC port, by reason"
    );
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "gRPC connections closed by the broker after the handshake, by reason"
    );
}
