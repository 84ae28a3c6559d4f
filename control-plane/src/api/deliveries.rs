//! `pushwire.v1.DeliveryService`.

use std::time::SystemTime;

use pb::delivery_service_server::DeliveryService;
use pushwire_common::auth::{Action, authorize};
use pushwire_common::delivery_store::{
    DeliveryKey, DeliveryParent, DeliveryRecord, DeliveryState, StatsRequest, StatsRow,
};
use pushwire_common::domain::{AccountName, IntegrationName};
use pushwire_common::pb::v1 as pb;
use tonic::{Request, Response, Status};

use super::{integration_name, invalid};
use crate::service::deliveries::{Deliveries, DeliveryError, ListQuery, delivery_name};

/// Serves `DeliveryService` from the delivery log.
#[derive(Clone, Debug)]
pub struct DeliveryApi {
    deliveries: Deliveries,
}

impl DeliveryApi {
    /// The service over `deliveries`.
    pub fn new(deliveries: Deliveries) -> Self {
        Self { deliveries }
    }
}

impl From<DeliveryError> for Status {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::InvalidArgument(f) => Status::invalid_argument(f.to_string()),
            DeliveryError::NotFound(name) => Status::not_found(format!("{name} not found")),
            DeliveryError::NoStore => Status::failed_precondition(e.to_string()),
            DeliveryError::NotReady => Status::unavailable(e.to_string()),
            DeliveryError::Store(e) if e.is_transient() => {
                tracing::warn!(error = %e, "delivery store unavailable");
                Status::unavailable("delivery store unavailable; retry later")
            }
            DeliveryError::Store(e) => {
                tracing::error!(error = %e, "delivery store failure");
                Status::internal("delivery store failure")
            }
        }
    }
}

/// `accounts/{a}` or `accounts/{a}/integrations/{i}`.
fn parent(field: &str, raw: &str) -> Result<DeliveryParent, Status> {
    if raw.contains("/integrations/") {
        return Ok(DeliveryParent::Integration(integration_name(field, raw)?));
    }
    AccountName::parse(raw)
        .map(DeliveryParent::Account)
        .map_err(|_| {
            invalid(
                field,
                "expected accounts/{account} or accounts/{account}/integrations/{integration}",
            )
        })
}

fn parent_account(parent: &DeliveryParent) -> &AccountName {
    match parent {
        DeliveryParent::Account(account) => account,
        DeliveryParent::Integration(integration) => integration.account(),
    }
}

/// `accounts/{a}/integrations/{i}/deliveries/{participation id}`.
fn delivery_key(raw: &str) -> Result<DeliveryKey, Status> {
    let bad = || {
        invalid(
            "name",
            "expected accounts/{account}/integrations/{integration}/deliveries/{participation id}",
        )
    };
    let (integration, participation) = raw.split_once("/deliveries/").ok_or_else(bad)?;
    if participation.is_empty() {
        return Err(bad());
    }
    let integration = IntegrationName::parse(integration).map_err(|_| bad())?;
    Ok(DeliveryKey::new(integration, participation))
}

fn timestamp(time: SystemTime) -> Option<prost_types::Timestamp> {
    Some(time.into())
}

fn time(field: &str, ts: Option<prost_types::Timestamp>) -> Result<SystemTime, Status> {
    let ts = ts.ok_or_else(|| invalid(field, "required"))?;
    SystemTime::try_from(ts).map_err(|e| invalid(field, e))
}

fn state(state: DeliveryState) -> pb::DeliveryState {
    match state {
        DeliveryState::Queued => pb::DeliveryState::Queued,
        DeliveryState::Delivered => pb::DeliveryState::Delivered,
        DeliveryState::Failed => pb::DeliveryState::Failed,
        DeliveryState::Skipped => pb::DeliveryState::Skipped,
    }
}

fn error_text(class: Option<String>, message: Option<String>) -> String {
    match (class, message) {
        (Some(class), Some(message)) => format!("{class}: {message}"),
        (Some(text), None) | (None, Some(text)) => text,
        (None, None) => String::new(),
    }
}

fn record(d: DeliveryRecord) -> pb::DeliveryRecord {
    pb::DeliveryRecord {
        name: delivery_name(&d.key),
        integration: d.key.integration.to_string(),
        participation_id: d.key.participation_id.clone(),
        campaign_id: d.campaign_id,
        website_id: d.website_id.unwrap_or_default(),
        state: state(d.state).into(),
        attempt_count: i32::try_from(d.attempt_count).unwrap_or(i32::MAX),
        last_status_code: d.last_status_code.map(i32::from).unwrap_or_default(),
        last_error: d.last_error.unwrap_or_default(),
        skip_reason: d.skip_reason.unwrap_or_default(),
        next_attempt_time: match d.state {
            DeliveryState::Queued => d.next_attempt.and_then(timestamp),
            _ => None,
        },
        create_time: timestamp(d.create_time),
        update_time: timestamp(d.update_time),
        attempts: d
            .attempts
            .into_iter()
            .map(|a| pb::DeliveryAttempt {
                attempt_time: timestamp(a.time),
                status_code: a.status_code.map(i32::from).unwrap_or_default(),
                error: error_text(a.error_class, a.error_message),
                duration_ms: i64::try_from(a.duration.as_millis()).unwrap_or(i64::MAX),
            })
            .collect(),
        body_retained: d.body_retained,
    }
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01, UTC).
fn day_text(day: i64) -> String {
    let start = SystemTime::UNIX_EPOCH
        + std::time::Duration::from_secs(day.unsigned_abs().saturating_mul(86_400));
    humantime::format_rfc3339_seconds(start).to_string()[..10].to_owned()
}

fn counts(row: StatsRow) -> pb::DeliveryStatsGroupCounts {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::DeliveryStatsGroupCounts {
        campaign_id: row.campaign_id.unwrap_or_default(),
        day: row.day.map(day_text).unwrap_or_default(),
        delivered: n(row.delivered),
        failed: n(row.failed),
        skipped: n(row.skipped),
        skipped_incomplete: n(row.skipped_incomplete),
        queued: n(row.queued),
    }
}

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let who = authorize(&request, Action::Read)?;
        let req = request.into_inner();
        let parent = parent("parent", &req.parent)?;
        who.account(parent_account(&parent))?;
        let answer = self
            .deliveries
            .list(ListQuery {
                parent,
                filter: &req.filter,
                page_size: req.page_size,
                page_token: &req.page_token,
            })
            .await?;
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries: answer.deliveries.into_iter().map(record).collect(),
            next_page_token: answer.next_page_token,
        }))
    }

    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::DeliveryRecord>, Status> {
        let who = authorize(&request, Action::Read)?;
        let key = delivery_key(&request.get_ref().name)?;
        who.account(key.integration.account())?;
        Ok(Response::new(record(self.deliveries.get(&key).await?)))
    }

    async fn get_delivery_stats(
        &self,
        request: Request<pb::GetDeliveryStatsRequest>,
    ) -> Result<Response<pb::GetDeliveryStatsResponse>, Status> {
        let who = authorize(&request, Action::Read)?;
        let req = request.into_inner();
        let parent = parent("parent", &req.parent)?;
        who.account(parent_account(&parent))?;
        let mut by_campaign = false;
        let mut by_day = false;
        for (i, group) in req.group_by.iter().enumerate() {
            match pb::DeliveryStatsGroup::try_from(*group) {
                Ok(pb::DeliveryStatsGroup::Campaign) => by_campaign = true,
                Ok(pb::DeliveryStatsGroup::Day) => by_day = true,
                _ => {
                    return Err(invalid(
                        &format!("group_by[{i}]"),
                        "expected DELIVERY_STATS_GROUP_CAMPAIGN or DELIVERY_STATS_GROUP_DAY",
                    ));
                }
            }
        }
        let rows = self
            .deliveries
            .stats(StatsRequest {
                parent,
                start: time("start_time", req.start_time)?,
                end: time("end_time", req.end_time)?,
                by_campaign,
                by_day,
            })
            .await?;
        Ok(Response::new(pb::GetDeliveryStatsResponse {
            groups: rows.into_iter().map(counts).collect(),
        }))
    }

    async fn redeliver_deliveries(
        &self,
        request: Request<pb::RedeliverDeliveriesRequest>,
    ) -> Result<Response<pb::RedeliverDeliveriesResponse>, Status> {
        let who = authorize(&request, Action::Manage)?;
        let req = request.into_inner();
        let integration = integration_name("parent", &req.parent)?;
        who.account(integration.account())?;
        let redelivered = self
            .deliveries
            .redeliver(&integration, &req.filter, SystemTime::now())
            .await?;
        Ok(Response::new(pb::RedeliverDeliveriesResponse {
            redelivered: i64::try_from(redelivered).unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_text(0), "1970-01-01");
        assert_eq!(day_text(20_788), "2026-12-01");
    }

    #[test]
    fn delivery_names_are_parsed_and_checked() {
        let key = delivery_key("accounts/42/integrations/crm/deliveries/p-1").unwrap();
        assert_eq!(key.integration.to_string(), "accounts/42/integrations/crm");
        assert_eq!(key.participation_id, "p-1");
        assert_eq!(
            delivery_name(&key),
            "accounts/42/integrations/crm/deliveries/p-1"
        );
        for bad in [
            "accounts/42/integrations/crm",
            "accounts/42/integrations/crm/deliveries/",
            "accounts/42/deliveries/p1",
        ] {
            assert!(delivery_key(bad).is_err(), "{bad}");
        }
    }
}
