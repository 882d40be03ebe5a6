//! The one mapping from domain errors to gRPC statuses. Messages for the caller say what to fix;
//! internals (store errors, bugs) are logged and answered with a generic message.

use tonic::Status;

use crate::broker::BrokerError;

/// The status for a use-case error.
pub fn status(e: BrokerError) -> Status {
    match e {
        BrokerError::Invalid { field, reason } => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        BrokerError::Denied(m) => Status::permission_denied(m),
        BrokerError::NotFound(what) => Status::not_found(what.to_string()),
        BrokerError::Precondition(m) => Status::failed_precondition(m),
        BrokerError::Unavailable(detail) => {
            tracing::warn!(%detail, "store unavailable");
            Status::unavailable("the store is unavailable; nothing was changed, retry later")
        }
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
        BrokerError::Exhausted(m) => Status::resource_exhausted(m),
        BrokerError::OutOfRange(m) => Status::out_of_range(m),
        BrokerError::Unauthenticated(m) => Status::unauthenticated(m),
        BrokerError::RateLimited(wait) => {
            let mut s = Status::resource_exhausted(BrokerError::RateLimited(wait).to_string());
            if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
                s.metadata_mut().insert("retry-after-ms", v);
            }
            s
        }
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
