//! gRPC handlers of the control plane: requests become [`crate::service`] calls, and this is
//! the one place where service errors become `tonic::Status`. No business rule lives here
//! beyond reading update masks.

mod config;
mod deliveries;
mod ingest;
mod integrations;
mod push_scopes;

pub use config::ConfigApi;
pub use deliveries::DeliveryApi;
pub use ingest::IngestApi;
pub use integrations::{IntegrationApi, create_patch as integration_create_patch};
pub use push_scopes::{PushScopeApi, create_patch as push_scope_create_patch};
use pushwire_common::domain::convert::InvalidField;
use pushwire_common::domain::{AccountName, IntegrationName, PushScopeName};
use tonic::{Code, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::service::{Read, ServiceError};
use crate::store::StoreError;

/// `google.rpc.ErrorInfo` reason of a write whose outcome is unknown (code UNKNOWN).
pub const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";

/// Largest request the admin services (integrations, push scopes, WatchConfig) decode: far
/// above what valid input needs (a URL of 2 KiB, a header value of 4 KiB, a secret of 1 KiB);
/// larger messages are refused before they are parsed (OUT_OF_RANGE, tonic's code for it,
/// naming the limit).
pub const MAX_ADMIN_REQUEST_BYTES: usize = 64 * 1024;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument(f) => bad_request(&f),
            ServiceError::NotFound(name) => Status::not_found(format!("{name} not found")),
            ServiceError::AlreadyExists(m) => Status::already_exists(m),
            ServiceError::Aborted(m) => Status::aborted(m),
            ServiceError::FailedPrecondition(m) => {
                let details = ErrorDetails::with_precondition_failure_violation(
                    "STATE",
                    subject(&m),
                    m.clone(),
                );
                Status::with_error_details(Code::FailedPrecondition, m, details)
            }
            ServiceError::ResourceExhausted(m) => {
                let details = ErrorDetails::with_quota_failure_violation(subject(&m), m.clone());
                Status::with_error_details(Code::ResourceExhausted, m, details)
            }
            ServiceError::Store(e @ StoreError::Unavailable(_)) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "store unavailable");
                Status::unavailable("configuration store unavailable; retry later")
            }
            ServiceError::Store(e @ StoreError::OutcomeUnknown(_)) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "write outcome unknown");
                let details = ErrorDetails::with_error_info(
                    OUTCOME_UNKNOWN,
                    "pushwire.v1",
                    std::collections::HashMap::new(),
                );
                Status::with_error_details(
                    Code::Unknown,
                    "outcome unknown: the configuration store lost its answer after the change \
                     was sent, so it may or may not have been applied; read the resource before \
                     retrying, and retry with its etag",
                    details,
                )
            }
            ServiceError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                Status::internal("configuration store failure")
            }
        }
    }
}

/// Response header of a read answered from the control plane's in-memory copy of the
/// configuration because the store was unavailable: the copy's revision, possibly behind.
pub const STALE_REVISION_HEADER: &str = "pushwire-stale-revision";

/// The response to a read, marked with [`STALE_REVISION_HEADER`] when it came from memory.
fn answer<T, M>(read: Read<T>, to_pb: impl FnOnce(T) -> M) -> Response<M> {
    let mut response = Response::new(to_pb(read.value));
    if let Some(revision) = read.stale_at {
        response
            .metadata_mut()
            .insert(STALE_REVISION_HEADER, revision.into());
    }
    response
}

/// `INVALID_ARGUMENT` naming the field in the message and, for generated clients, in a
/// `google.rpc.BadRequest` field violation (`field`: the proto path, snake_case, e.g.
/// `integration.url`; `description`: what is wrong).
fn bad_request(f: &InvalidField) -> Status {
    let details = ErrorDetails::with_bad_request_violation(f.field.clone(), f.reason.clone());
    Status::with_error_details(Code::InvalidArgument, f.to_string(), details)
}

/// The resource a precondition or quota error is about: the first resource name
/// (`accounts/…`) its message names, else empty.
fn subject(message: &str) -> String {
    message
        .split_whitespace()
        .find(|w| w.starts_with("accounts/"))
        .map(|w| w.trim_end_matches([',', ';', ':', '.', ')']).to_owned())
        .unwrap_or_default()
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    bad_request(&InvalidField::new(field, e.to_string()))
}

/// An update mask path as the proto names it: protobuf JSON and most non-Rust clients write
/// field names in lowerCamelCase (`displayName`), which is accepted as the snake_case name.
fn snake_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn account(field: &str, raw: &str) -> Result<AccountName, Status> {
    AccountName::parse(raw).map_err(|e| invalid(field, e))
}

fn integration_name(field: &str, raw: &str) -> Result<IntegrationName, Status> {
    IntegrationName::parse(raw).map_err(|e| invalid(field, e))
}

fn push_scope_name(field: &str, raw: &str) -> Result<PushScopeName, Status> {
    PushScopeName::parse(raw).map_err(|e| invalid(field, e))
}

/// The paths of an update mask, checked against `allowed`; `None` when the mask is empty.
fn mask_paths(
    mask: Option<prost_types::FieldMask>,
    allowed: &[&str],
) -> Result<Option<Vec<String>>, Status> {
    let paths: Vec<String> = mask
        .map(|m| m.paths)
        .unwrap_or_default()
        .iter()
        .map(|p| snake_case(p))
        .collect();
    if paths.is_empty() {
        return Ok(None);
    }
    for p in &paths {
        if !allowed.contains(&p.as_str()) {
            return Err(invalid(
                "update_mask",
                format!(
                    "unknown or read-only field {p:?}; allowed: {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(Some(paths))
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt as _;

    use super::*;

    #[test]
    fn a_lost_write_answer_is_unknown_with_its_reason_and_what_to_do() {
        let lost = StoreError::OutcomeUnknown("connection reset".into());
        let status = Status::from(ServiceError::Store(lost));
        assert_eq!(status.code(), Code::Unknown);
        assert!(status.message().contains("outcome unknown"));
        assert!(status.message().contains("etag"));
        let info = status.get_error_details().error_info().cloned();
        assert_eq!(info.map(|i| i.reason), Some(OUTCOME_UNKNOWN.to_owned()));
        let down = StoreError::unavailable(std::io::Error::other("refused"));
        assert_eq!(
            Status::from(ServiceError::Store(down)).code(),
            Code::Unavailable
        );
    }
}
