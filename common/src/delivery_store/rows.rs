//! Reading rows back, the same way for both databases: [`Columns`] gives PostgreSQL and SQLite
//! rows one typed accessor per column kind, and the decoders build the store's types from it.

use std::time::Duration;

use bytes::Bytes;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::{
    Attempt, ClaimedDelivery, DeliveryKey, DeliveryRecord, DeliveryState, Lease, StoreError,
    TraceContext, from_ms, integration_name,
};

/// Typed column access shared by both databases' rows.
pub(super) trait Columns {
    fn text(&self, name: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, name: &str) -> Result<Option<String>, sqlx::Error>;
    fn int8(&self, name: &str) -> Result<i64, sqlx::Error>;
    fn opt_int8(&self, name: &str) -> Result<Option<i64>, sqlx::Error>;
    fn int4(&self, name: &str) -> Result<i32, sqlx::Error>;
    fn opt_int4(&self, name: &str) -> Result<Option<i32>, sqlx::Error>;
    fn flag(&self, name: &str) -> Result<bool, sqlx::Error>;
    fn opt_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, sqlx::Error>;

    /// A flag the row may not have.
    fn try_flag(&self, name: &str) -> Result<Option<bool>, sqlx::Error> {
        match self.flag(name) {
            Ok(flag) => Ok(Some(flag)),
            Err(sqlx::Error::ColumnNotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, name: &str) -> Result<String, sqlx::Error> {
                self.try_get(name)
            }
            fn opt_text(&self, name: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(name)
            }
            fn int8(&self, name: &str) -> Result<i64, sqlx::Error> {
                self.try_get(name)
            }
            fn opt_int8(&self, name: &str) -> Result<Option<i64>, sqlx::Error> {
                self.try_get(name)
            }
            fn int4(&self, name: &str) -> Result<i32, sqlx::Error> {
                self.try_get(name)
            }
            fn opt_int4(&self, name: &str) -> Result<Option<i32>, sqlx::Error> {
                self.try_get(name)
            }
            fn flag(&self, name: &str) -> Result<bool, sqlx::Error> {
                self.try_get(name)
            }
            fn opt_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
                self.try_get(name)
            }
        }
    };
}

columns_for!(PgRow);
columns_for!(SqliteRow);

fn corrupt(err: sqlx::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

fn trace(row: &impl Columns) -> Result<Option<TraceContext>, sqlx::Error> {
    Ok(row
        .opt_text("traceparent")?
        .map(|traceparent| TraceContext {
            traceparent,
            tracestate: row
                .opt_text("tracestate")
                .ok()
                .flatten()
                .unwrap_or_default(),
        }))
}

fn status(code: Option<i32>) -> Option<u16> {
    code.and_then(|code| u16::try_from(code).ok())
}

/// A row of the claim query: the delivery's columns, `lease_token`, `body` and, where the query
/// has it, `expired`.
pub(super) fn claimed_from_row(
    row: &impl Columns,
    worker: &str,
    expires_ms: i64,
) -> Result<ClaimedDelivery, StoreError> {
    let integration = integration_name(
        &row.text("account").map_err(corrupt)?,
        &row.text("integration").map_err(corrupt)?,
    )?;
    let read = || -> Result<ClaimedDelivery, sqlx::Error> {
        Ok(ClaimedDelivery {
            lease: Lease {
                key: DeliveryKey::new(integration.clone(), row.text("participation_id")?),
                worker: worker.to_owned(),
                token: row.int8("lease_token")?,
                expires: from_ms(expires_ms),
            },
            campaign_id: row.text("campaign_id")?,
            website_id: row.opt_text("website_id")?,
            trace: trace(row)?,
            attempt_count: row.int4("attempt_count")?.unsigned_abs(),
            next_attempt: from_ms(row.int8("next_attempt_ms")?),
            create_time: from_ms(row.int8("create_ms")?),
            body: row.opt_bytes("body")?.map(Bytes::from),
            lease_expired: row.try_flag("expired")?.unwrap_or(false),
        })
    };
    read().map_err(corrupt)
}

/// A row of `pushwire_delivery_attempts`.
pub(super) fn attempt_from_row(row: &impl Columns) -> Result<Attempt, StoreError> {
    let read = || -> Result<Attempt, sqlx::Error> {
        Ok(Attempt {
            time: from_ms(row.int8("attempt_ms")?),
            status_code: status(row.opt_int4("status_code")?),
            error_class: row.opt_text("error_class")?,
            error_message: row.opt_text("error_message")?,
            duration: Duration::from_millis(row.int8("duration_ms")?.unsigned_abs()),
        })
    };
    read().map_err(corrupt)
}

/// A row of `pushwire_deliveries` with a `body_retained` flag.
pub(super) fn record_from_row(
    row: &impl Columns,
    key: &DeliveryKey,
    attempts: Vec<Attempt>,
) -> Result<DeliveryRecord, StoreError> {
    let state = DeliveryState::parse(&row.text("state").map_err(corrupt)?)?;
    let read = || -> Result<DeliveryRecord, sqlx::Error> {
        let owner = row.opt_text("lease_owner")?;
        let expires = row.opt_int8("lease_expires_ms")?;
        Ok(DeliveryRecord {
            key: key.clone(),
            campaign_id: row.text("campaign_id")?,
            website_id: row.opt_text("website_id")?,
            state,
            attempt_count: row.int4("attempt_count")?.unsigned_abs(),
            last_status_code: status(row.opt_int4("last_status_code")?),
            last_error: row.opt_text("last_error")?,
            skip_reason: row.opt_text("skip_reason")?,
            next_attempt: row.opt_int8("next_attempt_ms")?.map(from_ms),
            lease: owner.zip(expires.map(from_ms)),
            trace: trace(row)?,
            create_time: from_ms(row.int8("create_ms")?),
            update_time: from_ms(row.int8("update_ms")?),
            body_retained: row.flag("body_retained")?,
            attempts,
        })
    };
    read().map_err(corrupt)
}
