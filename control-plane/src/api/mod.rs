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
pub use integrations::IntegrationApi;
pub use push_scopes::PushScopeApi;
use pushwire_common::domain::convert::InvalidField;
use pushwire_common::domain::{AccountName, IntegrationName, PushScopeName};
use tonic::Status;

use crate::service::ServiceError;
use crate::store::StoreError;

/// Largest request the admin services (integrations, push scopes, WatchConfig) decode: far
/// above what valid input needs (a URL of 2 KiB, a header value of 4 KiB, a secret of 1 KiB);
/// larger messages are refused before they are parsed (OUT_OF_RANGE, tonic's code for it,
/// naming the limit).
pub const MAX_ADMIN_REQUEST_BYTES: usize = 64 * 1024;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument(f) => Status::invalid_argument(f.to_string()),
            ServiceError::NotFound(name) => Status::not_found(format!("{name} not found")),
            ServiceError::AlreadyExists(m) => Status::already_exists(m),
            ServiceError::Aborted(m) => Status::aborted(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ServiceError::Store(e @ StoreError::Unavailable(_)) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "store unavailable");
                Status::unavailable("configuration store unavailable; retry later")
            }
            ServiceError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                Status::internal("configuration store failure")
            }
        }
    }
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(InvalidField::new(field, e.to_string()).to_string())
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
    let paths = mask.map(|m| m.paths).unwrap_or_default();
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
