//! What the client subcommands do alike: connect and build a generated client, await a call,
//! print `--json` or text, read and write the files they share, and format times.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tonic::transport::Channel;

use super::{ClientArgs, ClientError, connect};
use crate::api::pb;
use crate::api::pb::credential_service_client::CredentialServiceClient;
use crate::client::read;

/// The exit code of a client subcommand: 0, or the error reported (see
/// [`ClientError::report`]), a bare transport error first explained
/// ([`crate::client::explained`]).
pub(super) async fn exit_code(args: &ClientArgs, result: Result<(), ClientError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::client::explained(args, e).await.report(args.json),
    }
}

/// Connects to the broker and wraps the channel in the generated client that `new` makes
/// (e.g. `AdminServiceClient::new`).
pub(super) async fn open<C>(
    args: &ClientArgs,
    new: impl FnOnce(Channel) -> C,
) -> Result<C, ClientError> {
    Ok(new(connect(args).await?))
}

/// Awaits a unary call: the broker's answer, or its refusal.
pub(super) async fn answer<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ClientError> {
    call.await
        .map(tonic::Response::into_inner)
        .map_err(|status| match crate::client::explain_tls(&status) {
            Some(explanation) => ClientError::Tls {
                explanation,
                detail: crate::client::chain(&status),
            },
            None => ClientError::Refused(status),
        })
}

/// Prints `json` as one line with `--json`, else `text` and a newline.
pub(super) fn emit(args: &ClientArgs, json: &serde_json::Value, text: impl std::fmt::Display) {
    if args.json {
        crate::outln!("{json}");
    } else {
        crate::outln!("{text}");
    }
}

/// Asks the broker whether a credential is active and prints its answer as one JSON object:
/// what `active` makes of the answer, or `{"active": false}` alone.
pub(super) async fn introspect(
    client: &mut CredentialServiceClient<Channel>,
    request: pb::IntrospectRequest,
    active: impl FnOnce(&pb::IntrospectResponse) -> serde_json::Value,
) -> Result<(), ClientError> {
    let r = answer(client.introspect(request)).await?;
    if !r.active {
        crate::outln!("{}", serde_json::json!({"active": false}));
        return Err(ClientError::Inactive);
    }
    crate::outln!("{}", active(&r));
    Ok(())
}

/// A `--ttl`-like flag as a protobuf duration, `None` when unset or out of range.
pub(super) fn duration_pb(d: Option<Duration>) -> Option<prost_types::Duration> {
    d.and_then(|d| prost_types::Duration::try_from(d).ok())
}

/// Whether the lifetime `granted` is less than the `asked` one; if so, says so on stderr (the
/// broker gives the least of what was asked, the task's ceiling, `ttl.credential_max` and the
/// time to the task's deadline).
pub(super) fn capped(asked: Option<Duration>, granted: Option<prost_types::Duration>) -> bool {
    let (Some(asked), Some(granted)) = (asked, granted) else {
        return false;
    };
    let granted = u64::try_from(granted.seconds).unwrap_or(0);
    if granted >= asked.as_secs() {
        return false;
    }
    crate::errln!(
        "note: the broker granted {granted}s, less than the {}s asked (the task's ceiling, \
         ttl.credential_max or the time left to the task's deadline)",
        asked.as_secs()
    );
    true
}

/// The bytes of the `--csr` file, empty without one.
pub(super) fn read_csr(csr: Option<&PathBuf>) -> Result<Vec<u8>, ClientError> {
    csr.map_or_else(|| Ok(Vec::new()), |p| read("CSR", p))
}

/// The error for a file that cannot be written.
pub(super) fn cannot_write(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    |e| ClientError::Usage(format!("cannot write {}: {e}", path.display()))
}

/// Writes a certificate followed by its chain (PEM) to `path`.
pub(super) fn write_chain(
    path: &Path,
    certificate_pem: &str,
    chain_pem: &str,
) -> Result<(), ClientError> {
    std::fs::write(path, format!("{certificate_pem}{chain_pem}")).map_err(cannot_write(path))
}

/// A protobuf timestamp as RFC 3339 to the second, `None` when unset or out of range.
pub(super) fn rfc3339_opt(t: Option<prost_types::Timestamp>) -> Option<String> {
    t.and_then(|t| std::time::SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// A protobuf timestamp as RFC 3339 to the second, empty when unset or out of range.
pub(super) fn rfc3339(t: Option<prost_types::Timestamp>) -> String {
    rfc3339_opt(t).unwrap_or_default()
}
