//! The one mapping from domain errors to gRPC statuses. Messages for the caller say what to fix;
//! internals (store errors, bugs) are logged and answered with a generic message. Every status
//! also carries a `google.rpc.ErrorInfo` in its details: a stable `reason`
//! ([`BrokerError::reason`]) that clients switch on, in the domain [`ERROR_DOMAIN`].

use std::collections::HashMap;

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::broker::BrokerError;

/// The `google.rpc.ErrorInfo.domain` of the broker's refusals.
pub const ERROR_DOMAIN: &str = "taskcred.dev";

/// The status for a use-case error, with its `ErrorInfo`.
pub fn status(e: BrokerError) -> Status {
    let reason = e.reason();
    let mut metadata = HashMap::new();
    if let BrokerError::Invalid { field, .. } = &e {
        metadata.insert("field".to_owned(), (*field).to_owned());
    }
    with_reason(&bare_status(e), reason, metadata)
}

/// `status` with a stable reason of its own and `metadata`, its code, message and metadata kept:
/// for the refusals made outside the use cases (the authentication layer, the protobuf edge).
pub fn with_reason(status: &Status, reason: &str, metadata: HashMap<String, String>) -> Status {
    let mut with_info = Status::with_error_details(
        status.code(),
        status.message(),
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    );
    *with_info.metadata_mut() = status.metadata().clone();
    with_info
}

/// Handlers answer a use-case error with `?`: the status is [`status`]'s.
impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        status(e)
    }
}

/// The stable reason of a status made by [`status`], if it has one (for clients).
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .filter(|i| i.domain == ERROR_DOMAIN)
        .map(|i| i.reason.clone())
}

/// The code, message and metadata of a use-case error.
fn bare_status(e: BrokerError) -> Status {
    match e {
        BrokerError::Invalid { field, reason } => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        BrokerError::Denied(d) => Status::permission_denied(d.to_string()),
        BrokerError::NotFound(what) => Status::not_found(what.to_string()),
        BrokerError::Precondition(p) => Status::failed_precondition(p.to_string()),
        BrokerError::Unavailable(detail) => {
            tracing::warn!(%detail, "store unavailable");
            Status::unavailable("the store is unavailable; nothing was changed, retry later")
        }
        e @ BrokerError::TaskChanged => Status::unavailable(e.to_string()),
        BrokerError::OutcomeUnknown(detail) => {
            tracing::warn!(%detail, "store did not answer a change: outcome unknown");
            let mut s = Status::unavailable(
                "the store did not answer in time: the change may or may not have been made; \
                 retry with the same request_id, or look before you retry",
            );
            s.metadata_mut().insert(
                "taskcred-outcome",
                tonic::metadata::MetadataValue::from_static("unknown"),
            );
            s
        }
        BrokerError::AuditFailed(detail) => {
            tracing::error!(%detail, "refused: the audit log cannot be written");
            Status::unavailable(
                "the broker cannot write its audit log; nothing was done, retry later",
            )
        }
        BrokerError::Exhausted(limit) => Status::resource_exhausted(limit.to_string()),
        e @ BrokerError::OutOfRange { .. } => Status::out_of_range(e.to_string()),
        BrokerError::Unauthenticated(refused) => Status::unauthenticated(refused.to_string()),
        e @ BrokerError::CertificateExpired => Status::unauthenticated(e.to_string()),
        BrokerError::RateLimited(wait) => {
            let mut s = Status::resource_exhausted(BrokerError::RateLimited(wait).to_string());
            if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
                s.metadata_mut().insert("retry-after-ms", v);
            }
            s
        }
        BrokerError::Incomplete(what) => Status::unavailable(what),
        BrokerError::Pending(task) => {
            let mut s = Status::failed_precondition(BrokerError::Pending(task).to_string());
            // Machine-readable too, for pipelines that wait for the approval.
            if let Ok(v) = task.to_string().parse() {
                s.metadata_mut().insert("taskcred-task-id", v);
            }
            s
        }
        BrokerError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            Status::internal("internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use crate::broker::{Denial, Precondition};
    use crate::task::{Forbidden, Unmet};

    #[test]
    fn every_refusal_carries_its_reason_beside_its_message() {
        for (e, code, reason, message) in [
            (
                BrokerError::Denied(Denial::AudienceNotGranted("db.prod".into())),
                tonic::Code::PermissionDenied,
                "AUDIENCE_NOT_GRANTED",
                "audience db.prod is not granted by the task",
            ),
            (
                BrokerError::Denied(Denial::Rule(Forbidden::RequesterDecides)),
                tonic::Code::PermissionDenied,
                "REQUESTER_MAY_NOT_DECIDE",
                "separation of duties: the requester may not decide on its own task",
            ),
            (
                BrokerError::Precondition(Precondition::Task(Unmet::DeadlinePassed)),
                tonic::Code::FailedPrecondition,
                "TASK_DEADLINE_PASSED",
                "the task's deadline has passed",
            ),
            (
                BrokerError::Invalid {
                    field: "ttl",
                    reason: "must be at least 1s".into(),
                },
                tonic::Code::InvalidArgument,
                "INVALID_FIELD",
                "ttl: must be at least 1s",
            ),
            (
                BrokerError::Unavailable("redis: connection refused".into()),
                tonic::Code::Unavailable,
                "STORE_UNAVAILABLE",
                "the store is unavailable; nothing was changed, retry later",
            ),
        ] {
            let s = status(e);
            assert_eq!((s.code(), s.message()), (code, message));
            assert_eq!(reason_of(&s).as_deref(), Some(reason));
        }
        let invalid = status(BrokerError::Invalid {
            field: "audience",
            reason: "x".into(),
        });
        let details = invalid.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("field").map(String::as_str),
            Some("audience")
        );
    }

    #[test]
    fn metadata_survives_beside_the_details() {
        let s = status(BrokerError::RateLimited(std::time::Duration::from_millis(
            250,
        )));
        assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "250");
        assert_eq!(reason_of(&s).as_deref(), Some("RATE_LIMITED"));
    }
}
