//! The gRPC surface: generated code, the middleware (metrics outermost, then authentication,
//! deny by default), thin handlers and the server assembly with its limits (message size,
//! RPCs per connection, request timeout). Domain logic lives below this module.

mod admin;
pub mod auth;
mod ci;
mod convert;
mod credentials;
mod error;
mod identity;
mod malformed;
pub mod metrics;
mod ready_or;
mod revocations;
mod tasks;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use tokio_stream::Stream;
use tonic::transport::Server;

pub use admin::AdminApi;
pub use ci::CiApi;
pub use convert::{state_from_pb, state_to_pb};
pub use credentials::CredentialApi;
pub use error::{ERROR_DOMAIN, reason_of};
pub use identity::IdentityApi;
pub use metrics::RpcMetricsLayer;
pub use revocations::RevocationApi;
pub use tasks::TaskApi;

use crate::broker::Broker;
use crate::clock::Clock;
use crate::tls::TlsConn;
use auth::AuthLayer;

/// What a handler answers: its response, or the status of a refusal.
type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

/// Code generated from `proto/taskcred/v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod pb {
    tonic::include_proto!("taskcred.v1");

    /// The encoded descriptor set of `taskcred.v1`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/taskcred_descriptor.bin"));
}

/// Server limits.
#[derive(Debug, Clone, Copy)]
pub struct GrpcOptions {
    /// Largest message accepted or sent.
    pub max_message_bytes: usize,
    /// RPCs in flight on one connection.
    pub max_concurrent_rpcs_per_connection: u32,
    /// Time limit of one RPC.
    pub request_timeout: Duration,
    /// RPCs per identity (`limits.rpc_per_second`); `None`: unlimited.
    pub rpc_rate: Option<crate::broker::limits::Rate>,
}

/// The canonical upper-case name of a gRPC status code (`UNAUTHENTICATED`), as metrics and the
/// CLI print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Every `/package.Service/Method` path this server answers, from the descriptor sets it serves.
pub fn known_methods() -> HashSet<String> {
    let mut known = HashSet::new();
    for fds in [
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        // The sets are compiled in; one that fails to decode only loses its metric labels.
        let Ok(set) = prost_types::FileDescriptorSet::decode(fds) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    known
}

/// Serves every gRPC service on `incoming` until `shutdown`, then drains in-flight RPCs.
/// `health` comes with its limits set by the caller (it holds the health reporter's state).
///
/// # Errors
/// When reflection cannot be built from the descriptor sets or the transport fails.
pub async fn serve<H, I>(
    options: GrpcOptions,
    clock: Arc<dyn Clock>,
    broker: Broker,
    health: H,
    incoming: I,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    H: tonic::server::NamedService
        + tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
    I: Stream<Item = std::io::Result<TlsConn>>,
{
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let max = options.max_message_bytes;
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()?
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()?
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let identity = pb::identity_service_server::IdentityServiceServer::new(IdentityApi)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let tasks = pb::task_service_server::TaskServiceServer::new(TaskApi::new(broker.clone(), max))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let credentials = pb::credential_service_server::CredentialServiceServer::new(
        CredentialApi::new(broker.clone()),
    )
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let revocations = pb::revocation_service_server::RevocationServiceServer::new(
        RevocationApi::new(broker.clone()),
    )
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let ci = pb::ci_service_server::CiServiceServer::new(CiApi::new(broker.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin = pb::admin_service_server::AdminServiceServer::new(AdminApi::new(broker, max))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    Server::builder()
        .concurrency_limit_per_connection(options.max_concurrent_rpcs_per_connection as usize)
        .max_concurrent_streams(Some(options.max_concurrent_rpcs_per_connection))
        .timeout(options.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(RpcMetricsLayer::new(known_methods()))
        .layer(AuthLayer::new(clock, options.rpc_rate))
        .layer(tower::util::MapResponseLayer::new(
            malformed::hide_decode_errors::<tonic::body::Body>,
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(identity)
        .add_service(tasks)
        .add_service(credentials)
        .add_service(admin)
        .add_service(revocations)
        .add_service(ci)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
