//! The delivery log's reads and writes (DESIGN §10 `DeliveryService`): which deliveries a list,
//! a stats query or a redelivery covers, and the SQL both databases run for them. Statements are
//! built from a fixed set of fragments; every value is a bound parameter.

use std::time::SystemTime;

use super::{DeliveryRecord, DeliveryState, to_ms};
use crate::domain::{AccountName, IntegrationName};

/// Skip reasons of participations that were not completed (an integration that takes completed
/// participations only) start with this text; stats count them apart
/// ([`StatsRow::skipped_incomplete`]).
pub const INCOMPLETE_SKIP_PREFIX: &str = "participation state is ";

/// Whose deliveries: a whole account's or one integration's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryParent {
    /// Every integration of the account.
    Account(AccountName),
    /// One integration.
    Integration(IntegrationName),
}

impl DeliveryParent {
    fn account(&self) -> &str {
        match self {
            Self::Account(account) => account.id(),
            Self::Integration(integration) => integration.account().id(),
        }
    }

    fn integration(&self) -> Option<&str> {
        match self {
            Self::Account(_) => None,
            Self::Integration(integration) => Some(integration.id()),
        }
    }
}

/// Which deliveries of a parent: every field set must match (AND).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    /// In this state.
    pub state: Option<DeliveryState>,
    /// Of this campaign.
    pub campaign_id: Option<String>,
    /// Of this website.
    pub website_id: Option<String>,
    /// Of this participation.
    pub participation_id: Option<String>,
    /// First written at or after this time.
    pub created_from: Option<SystemTime>,
    /// First written before this time.
    pub created_before: Option<SystemTime>,
}

/// Where a page of [`super::DeliveryStore::list`] ends: the next page starts after it. The
/// order is newest first (`create_time` descending), then integration and participation id
/// ascending, so a cursor is exact and rows written after the first page (newer) never shift
/// later pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListCursor {
    /// `create_time` of the last row, unix milliseconds.
    pub create_ms: i64,
    /// Its integration id.
    pub integration: String,
    /// Its participation id.
    pub participation_id: String,
}

/// A [`super::DeliveryStore::list`] query.
#[derive(Clone, Debug)]
pub struct ListRequest {
    /// Whose deliveries.
    pub parent: DeliveryParent,
    /// Which of them.
    pub filter: DeliveryFilter,
    /// At most this many (at least 1).
    pub page_size: u32,
    /// Continue after this row (the previous page's `next`).
    pub after: Option<ListCursor>,
}

/// A page of deliveries, newest first, without their attempts.
#[derive(Clone, Debug, Default)]
pub struct DeliveryPage {
    /// The deliveries.
    pub deliveries: Vec<DeliveryRecord>,
    /// Where the next page starts, when there may be more.
    pub next: Option<ListCursor>,
}

/// A [`super::DeliveryStore::stats`] query: the deliveries of `parent` first written in
/// `[start, end)`.
#[derive(Clone, Debug)]
pub struct StatsRequest {
    /// Whose deliveries.
    pub parent: DeliveryParent,
    /// From this time (inclusive).
    pub start: SystemTime,
    /// To this time (exclusive).
    pub end: SystemTime,
    /// One row per campaign.
    pub by_campaign: bool,
    /// One row per UTC day.
    pub by_day: bool,
}

/// One group of a stats answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsRow {
    /// The campaign, when grouped by campaign.
    pub campaign_id: Option<String>,
    /// The UTC day (days since 1970-01-01), when grouped by day.
    pub day: Option<i64>,
    /// `DELIVERED`.
    pub delivered: u64,
    /// `FAILED`.
    pub failed: u64,
    /// `SKIPPED`, except the incomplete participations.
    pub skipped: u64,
    /// `SKIPPED` because the participation was not completed.
    pub skipped_incomplete: u64,
    /// `QUEUED`.
    pub queued: u64,
}

/// A bound parameter.
#[derive(Clone, Debug)]
pub(super) enum Param {
    Text(String),
    Int(i64),
}

/// A statement and its parameters (`$1`, `$2`, … in order).
#[derive(Debug, Default)]
pub(super) struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
}

impl Statement {
    fn bind(&mut self, param: Param) -> String {
        self.params.push(param);
        format!("${}", self.params.len())
    }

    /// `AND`-joined conditions on the deliveries table aliased `d`, parent and filter.
    fn conditions(&mut self, parent: &DeliveryParent, filter: &DeliveryFilter) -> String {
        let mut sql = format!(
            "d.account = {}",
            self.bind(Param::Text(parent.account().into()))
        );
        if let Some(integration) = parent.integration() {
            let p = self.bind(Param::Text(integration.into()));
            sql += &format!(" AND d.integration = {p}");
        }
        if let Some(state) = filter.state {
            let p = self.bind(Param::Text(state.as_str().into()));
            sql += &format!(" AND d.state = {p}");
        }
        for (column, value) in [
            ("campaign_id", &filter.campaign_id),
            ("website_id", &filter.website_id),
            ("participation_id", &filter.participation_id),
        ] {
            if let Some(value) = value {
                let p = self.bind(Param::Text(value.clone()));
                sql += &format!(" AND d.{column} = {p}");
            }
        }
        if let Some(from) = filter.created_from {
            let p = self.bind(Param::Int(to_ms(from)));
            sql += &format!(" AND d.create_ms >= {p}");
        }
        if let Some(before) = filter.created_before {
            let p = self.bind(Param::Int(to_ms(before)));
            sql += &format!(" AND d.create_ms < {p}");
        }
        sql
    }
}

/// One page of deliveries, one row more than the page to tell whether there are more.
pub(super) fn list(request: &ListRequest) -> Statement {
    let mut statement = Statement::default();
    let mut conditions = statement.conditions(&request.parent, &request.filter);
    let by_integration = request.parent.integration().is_some();
    if let Some(after) = &request.after {
        let create = statement.bind(Param::Int(after.create_ms));
        let participation = statement.bind(Param::Text(after.participation_id.clone()));
        if by_integration {
            conditions += &format!(
                " AND d.create_ms <= {create} AND (d.create_ms < {create} \
                 OR d.participation_id > {participation})"
            );
        } else {
            let integration = statement.bind(Param::Text(after.integration.clone()));
            conditions += &format!(
                " AND d.create_ms <= {create} AND (d.create_ms < {create} \
                 OR d.integration > {integration} \
                 OR (d.integration = {integration} AND d.participation_id > {participation}))"
            );
        }
    }
    let limit = statement.bind(Param::Int(i64::from(request.page_size.max(1)) + 1));
    let order = if by_integration {
        "d.create_ms DESC, d.participation_id"
    } else {
        "d.create_ms DESC, d.integration, d.participation_id"
    };
    statement.sql = format!(
        "SELECT d.*, EXISTS (
    SELECT 1 FROM pushwire_delivery_bodies b
    WHERE b.account = d.account AND b.participation_id = d.participation_id) AS body_retained
FROM pushwire_deliveries d
WHERE {conditions}
ORDER BY {order}
LIMIT {limit}"
    );
    statement
}

/// Counts by state over a time range, grouped as asked.
pub(super) fn stats(request: &StatsRequest) -> Statement {
    let mut statement = Statement::default();
    let filter = DeliveryFilter {
        created_from: Some(request.start),
        created_before: Some(request.end),
        ..DeliveryFilter::default()
    };
    let conditions = statement.conditions(&request.parent, &filter);
    let incomplete = statement.bind(Param::Text(format!("{INCOMPLETE_SKIP_PREFIX}%")));
    let campaign = if request.by_campaign {
        "d.campaign_id"
    } else {
        "CAST(NULL AS TEXT)"
    };
    let day = if request.by_day {
        "(d.create_ms / 86400000)"
    } else {
        "CAST(NULL AS BIGINT)"
    };
    let mut group = Vec::new();
    if request.by_campaign {
        group.push("d.campaign_id");
    }
    if request.by_day {
        group.push("(d.create_ms / 86400000)");
    }
    let group_by = if group.is_empty() {
        String::new()
    } else {
        format!("GROUP BY {}", group.join(", "))
    };
    statement.sql = format!(
        "SELECT {campaign} AS campaign_id, {day} AS day,
    CAST(COALESCE(SUM(CASE WHEN d.state = 'DELIVERED' THEN 1 ELSE 0 END), 0) AS BIGINT) AS delivered,
    CAST(COALESCE(SUM(CASE WHEN d.state = 'FAILED' THEN 1 ELSE 0 END), 0) AS BIGINT) AS failed,
    CAST(COALESCE(SUM(CASE WHEN d.state = 'SKIPPED' AND (d.skip_reason IS NULL
        OR d.skip_reason NOT LIKE {incomplete}) THEN 1 ELSE 0 END), 0) AS BIGINT) AS skipped,
    CAST(COALESCE(SUM(CASE WHEN d.state = 'SKIPPED' AND d.skip_reason LIKE {incomplete}
        THEN 1 ELSE 0 END), 0) AS BIGINT) AS skipped_incomplete,
    CAST(COALESCE(SUM(CASE WHEN d.state = 'QUEUED' THEN 1 ELSE 0 END), 0) AS BIGINT) AS queued
FROM pushwire_deliveries d
WHERE {conditions}
{group_by}
ORDER BY 2, 1"
    );
    statement
}

/// Keeps the retained bodies of the deliveries [`redeliver_deliveries`] will re-queue from a
/// purge: refreshes their `touched_ms` (`$` last parameter).
pub(super) fn redeliver_touch_bodies(
    integration: &IntegrationName,
    filter: &DeliveryFilter,
    now: SystemTime,
) -> Statement {
    let mut statement = Statement::default();
    let conditions =
        statement.conditions(&DeliveryParent::Integration(integration.clone()), filter);
    let now = statement.bind(Param::Int(to_ms(now)));
    statement.sql = format!(
        "UPDATE pushwire_delivery_bodies AS b SET touched_ms = {now}
WHERE (b.account, b.participation_id) IN (
    SELECT d.account, d.participation_id FROM pushwire_deliveries d WHERE {conditions})"
    );
    statement
}

/// Re-queues the matching deliveries of one integration whose body is retained, due now. A
/// delivery already queued keeps its claim (it is only made due no later than now); any other
/// is taken from a stale claim (its token moves on).
pub(super) fn redeliver_deliveries(
    integration: &IntegrationName,
    filter: &DeliveryFilter,
    now: SystemTime,
) -> Statement {
    let mut statement = Statement::default();
    let conditions =
        statement.conditions(&DeliveryParent::Integration(integration.clone()), filter);
    let now = statement.bind(Param::Int(to_ms(now)));
    statement.sql = format!(
        "UPDATE pushwire_deliveries AS d SET
    next_attempt_ms = CASE WHEN d.state = 'QUEUED' AND d.next_attempt_ms < {now}
        THEN d.next_attempt_ms ELSE {now} END,
    lease_owner = CASE WHEN d.state = 'QUEUED' THEN d.lease_owner END,
    lease_expires_ms = CASE WHEN d.state = 'QUEUED' THEN d.lease_expires_ms END,
    lease_token = CASE WHEN d.state = 'QUEUED' THEN d.lease_token ELSE d.lease_token + 1 END,
    update_ms = CASE WHEN d.state = 'QUEUED' THEN d.update_ms ELSE {now} END,
    skip_reason = NULL,
    state = 'QUEUED'
WHERE {conditions} AND EXISTS (
    SELECT 1 FROM pushwire_delivery_bodies b
    WHERE b.account = d.account AND b.participation_id = d.participation_id)"
    );
    statement
}

/// Reads a stats row.
pub(super) fn stats_from_row(
    row: &impl super::rows::Columns,
) -> Result<StatsRow, super::StoreError> {
    let read = || -> Result<StatsRow, sqlx::Error> {
        Ok(StatsRow {
            campaign_id: row.opt_text("campaign_id")?,
            day: row.opt_int8("day")?,
            delivered: row.int8("delivered")?.unsigned_abs(),
            failed: row.int8("failed")?.unsigned_abs(),
            skipped: row.int8("skipped")?.unsigned_abs(),
            skipped_incomplete: row.int8("skipped_incomplete")?.unsigned_abs(),
            queued: row.int8("queued")?.unsigned_abs(),
        })
    };
    read().map_err(|err| super::StoreError::Corrupt(err.to_string()))
}

/// Reads a page's rows (one more than the page size means more follow).
pub(super) fn page_from_rows<R: super::rows::Columns>(
    rows: &[R],
    page_size: u32,
) -> Result<DeliveryPage, super::StoreError> {
    let page_size = usize::try_from(page_size.max(1)).unwrap_or(usize::MAX);
    let mut deliveries = Vec::with_capacity(rows.len().min(page_size));
    for row in rows.iter().take(page_size) {
        let key = super::DeliveryKey::new(
            super::integration_name(
                &row.text("account")
                    .map_err(|e| super::StoreError::Corrupt(e.to_string()))?,
                &row.text("integration")
                    .map_err(|e| super::StoreError::Corrupt(e.to_string()))?,
            )?,
            row.text("participation_id")
                .map_err(|e| super::StoreError::Corrupt(e.to_string()))?,
        );
        deliveries.push(super::rows::record_from_row(row, &key, Vec::new())?);
    }
    let next = if rows.len() > page_size {
        deliveries.last().map(|last| ListCursor {
            create_ms: to_ms(last.create_time),
            integration: last.key.integration.id().to_owned(),
            participation_id: last.key.participation_id.clone(),
        })
    } else {
        None
    };
    Ok(DeliveryPage { deliveries, next })
}
