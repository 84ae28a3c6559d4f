//! The delivery store (DESIGN §3, §4, §6): deliveries a worker handed off (`QUEUED`), their
//! attempts and final outcomes, and the participation bodies they need to be sent again. One
//! trait, [`DeliveryStore`], with a PostgreSQL implementation (production) and an embedded SQLite
//! one (`control-plane --with-worker`), both opened from a [`StoreUrl`] by [`open`], and schema
//! migrations shipped in the binary (`migrations/`). SQL appears only in this module.
//!
//! Driver: `sqlx` 0.8 without its query macros (so no database at build time and no proc-macro
//! compile cost), with rustls + ring for TLS (no OpenSSL, no aws-lc). One well-kept async driver
//! for both databases with connection pools, PostgreSQL array binding (a whole batch in one
//! statement) and a bundled SQLite, which a pair of single-database drivers (`tokio-postgres` and
//! the synchronous `rusqlite`) would need a pool, a TLS adapter and a blocking thread to match.
//! It adds no second tonic, prost, hyper, http or h2 to the tree.
//!
//! Times are passed in by the caller (`now`) and stored as unix milliseconds, so the store never
//! reads a clock: tests control time, and PostgreSQL and SQLite behave the same. Leases compare
//! the callers' clocks, so workers' clocks must agree to well within a lease (NTP does).

mod log;
mod migrations;
mod postgres;
mod rows;
mod sql;
mod sqlite;
mod url;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

pub use self::log::{
    DeliveryFilter, DeliveryPage, DeliveryParent, INCOMPLETE_SKIP_PREFIX, ListCursor, ListRequest,
    StatsRequest, StatsRow,
};
pub use self::migrations::Migration;
pub use self::postgres::PostgresStore;
pub use self::sqlite::SqliteStore;
pub use self::url::{InvalidStoreUrl, StoreUrl};
use crate::domain::IntegrationName;

/// A delivery's identity: one participation for one integration. Its `webhook-id` is
/// `{participation id}_{integration id}` ([`DeliveryKey::webhook_id`]); the account is part of
/// the key because integration ids are only unique within an account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryKey {
    /// The integration the participation is delivered to.
    pub integration: IntegrationName,
    /// The participation's `id`.
    pub participation_id: String,
}

impl DeliveryKey {
    /// The key of `participation_id` for `integration`.
    pub fn new(integration: IntegrationName, participation_id: impl Into<String>) -> Self {
        Self {
            integration,
            participation_id: participation_id.into(),
        }
    }

    /// The `webhook-id` header of every attempt of this delivery.
    pub fn webhook_id(&self) -> String {
        crate::webhook::signing::webhook_id(&self.participation_id, self.integration.id())
    }
}

/// Where a delivery stands (DESIGN §10 `DeliveryState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    /// Owned by the store: waiting for its next attempt (or being attempted under a lease).
    Queued,
    /// A 2xx answer was received.
    Delivered,
    /// Final failure: a non-retryable answer or the retry window ran out.
    Failed,
    /// Not sent, with a reason (e.g. the integration was deleted).
    Skipped,
}

impl DeliveryState {
    /// The value stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Delivered => "DELIVERED",
            Self::Failed => "FAILED",
            Self::Skipped => "SKIPPED",
        }
    }

    fn parse(value: &str) -> Result<Self, StoreError> {
        Ok(match value {
            "QUEUED" => Self::Queued,
            "DELIVERED" => Self::Delivered,
            "FAILED" => Self::Failed,
            "SKIPPED" => Self::Skipped,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown delivery state {other:?}"
                )));
            }
        })
    }
}

/// The W3C trace context of the participation, so attempts made from the store continue its
/// trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`.
    pub traceparent: String,
    /// `tracestate` (may be empty).
    pub tracestate: String,
}

/// One HTTP attempt of a delivery. Holds no request or response body and no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// When the attempt started.
    pub time: SystemTime,
    /// The HTTP status received, if any.
    pub status_code: Option<u16>,
    /// A short machine-readable class of the error (`timeout`, `connect`, `status`, …), if it
    /// failed.
    pub error_class: Option<String>,
    /// A human-readable message of the error, if it failed.
    pub error_message: Option<String>,
    /// How long the attempt took.
    pub duration: Duration,
}

/// The state a write puts a delivery in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Owned by the store from now on; due at `next_attempt`.
    Queued {
        /// When the next attempt may start.
        next_attempt: SystemTime,
    },
    /// Delivered (final).
    Delivered,
    /// Failed (final).
    Failed,
    /// Skipped (final), with the reason.
    Skipped {
        /// Why the delivery was not (or no longer) sent.
        reason: String,
    },
}

impl Outcome {
    /// The state this outcome puts a delivery in.
    pub fn state(&self) -> DeliveryState {
        match self {
            Self::Queued { .. } => DeliveryState::Queued,
            Self::Delivered => DeliveryState::Delivered,
            Self::Failed => DeliveryState::Failed,
            Self::Skipped { .. } => DeliveryState::Skipped,
        }
    }

    fn next_attempt_ms(&self) -> Option<i64> {
        match self {
            Self::Queued { next_attempt } => Some(to_ms(*next_attempt)),
            _ => None,
        }
    }

    fn skip_reason(&self) -> Option<&str> {
        match self {
            Self::Skipped { reason } => Some(reason),
            _ => None,
        }
    }
}

/// A delivery written by [`DeliveryStore::hand_off`] or [`DeliveryStore::record_outcomes`].
#[derive(Clone, Debug)]
pub struct NewDelivery {
    /// Which participation for which integration.
    pub key: DeliveryKey,
    /// `$.campaign.id` of the participation.
    pub campaign_id: String,
    /// `$.campaign.channel.website.id`, when the participation has one.
    pub website_id: Option<String>,
    /// The participation's trace.
    pub trace: Option<TraceContext>,
    /// The state it is written in.
    pub outcome: Outcome,
    /// The attempts made before this write (the first attempt, usually), oldest first.
    pub attempts: Vec<Attempt>,
    /// The participation body as published. Stored once per participation (deliveries of the
    /// same participation share it; pass the same bytes) and kept while any of its deliveries is
    /// stored. Required when queued; optional for a final outcome (without it, and with no
    /// other delivery of the participation holding it, the delivery cannot be redelivered).
    pub body: Option<Bytes>,
}

/// What [`DeliveryStore::claim_due`] claims.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// Who claims (a worker's stable id); recorded on the lease.
    pub worker: String,
    /// How long the claim is exclusive. When it runs out without a finish (the worker died), any
    /// worker can claim the delivery again.
    pub lease: Duration,
    /// The caller's clock: due means `next_attempt <= now`.
    pub now: SystemTime,
    /// At most this many deliveries, spread across integrations.
    pub limit: u32,
    /// At most this many per integration (e.g. the free slots of its lane); 0 means `limit`.
    pub max_per_integration: u32,
    /// Integrations not to claim for (e.g. their circuit breaker is open).
    pub exclude: Vec<IntegrationName>,
}

impl ClaimRequest {
    /// The per-integration cap in force: `max_per_integration`, at most `limit`.
    pub fn per_integration_limit(&self) -> u32 {
        match self.max_per_integration {
            0 => self.limit,
            cap => cap.min(self.limit),
        }
    }
}

/// The proof of a claim, required to finish the delivery. A lease that was taken over by a newer
/// claim no longer finishes anything ([`FinishResult::LeaseLost`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The claimed delivery.
    pub key: DeliveryKey,
    /// The claiming worker.
    pub worker: String,
    /// Distinguishes successive claims of the same delivery, even by the same worker.
    pub token: i64,
    /// When the claim stops being exclusive.
    pub expires: SystemTime,
}

/// A claimed delivery, with what an attempt needs.
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    /// Finishes the delivery ([`DeliveryStore::finish`]).
    pub lease: Lease,
    /// `$.campaign.id`.
    pub campaign_id: String,
    /// `$.campaign.channel.website.id`.
    pub website_id: Option<String>,
    /// The participation's trace.
    pub trace: Option<TraceContext>,
    /// Attempts made so far.
    pub attempt_count: u32,
    /// When it became due.
    pub next_attempt: SystemTime,
    /// When it was first written.
    pub create_time: SystemTime,
    /// The body to send; `None` only if it is no longer retained (then skip the delivery).
    pub body: Option<Bytes>,
    /// Whether an earlier claim ran out without a finish (its worker died or stalled): a lease
    /// expiry, for the metrics.
    pub lease_expired: bool,
}

/// One finish of a [`DeliveryStore::finish_batch`].
#[derive(Clone, Debug)]
pub struct Finish {
    /// The claim being finished.
    pub lease: Lease,
    /// The attempt just made, if any.
    pub attempt: Option<Attempt>,
    /// The outcome: final, or `Queued` to reschedule.
    pub outcome: Outcome,
}

/// Whether a [`DeliveryStore::finish`] applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishResult {
    /// The delivery now has the outcome given.
    Applied,
    /// Another claim (or a write of the live path, or a skip) took the delivery over; nothing
    /// was written. A finish after the lease ran out still applies when no one else claimed it.
    LeaseLost,
}

/// A stored delivery, as [`DeliveryStore::get`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// Which participation for which integration.
    pub key: DeliveryKey,
    /// `$.campaign.id`.
    pub campaign_id: String,
    /// `$.campaign.channel.website.id`.
    pub website_id: Option<String>,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempt_count: u32,
    /// Status of the last attempt, if it got one.
    pub last_status_code: Option<u16>,
    /// Error of the last attempt, if it failed.
    pub last_error: Option<String>,
    /// Why it was skipped (`SKIPPED`).
    pub skip_reason: Option<String>,
    /// When it is due (`QUEUED`).
    pub next_attempt: Option<SystemTime>,
    /// The worker holding a claim and when the claim runs out, if it was claimed and not
    /// finished since.
    pub lease: Option<(String, SystemTime)>,
    /// The participation's trace.
    pub trace: Option<TraceContext>,
    /// When it was first written.
    pub create_time: SystemTime,
    /// When its state last changed.
    pub update_time: SystemTime,
    /// Whether its participation's body is still stored.
    pub body_retained: bool,
    /// Its attempts, oldest first.
    pub attempts: Vec<Attempt>,
}

/// What [`DeliveryStore::purge`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeStats {
    /// Deliveries removed.
    pub deliveries: u64,
    /// Attempts removed with them.
    pub attempts: u64,
    /// Bodies no delivery referenced any more.
    pub bodies: u64,
}

/// A delivery store failure. Never holds credentials: connection URLs appear only redacted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is not a delivery store URL.
    #[error(transparent)]
    Url(#[from] InvalidStoreUrl),
    /// The database could not be reached or answered with an error.
    #[error("delivery store {url}: {source}")]
    Database {
        /// The store, redacted.
        url: StoreUrl,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema could not be brought up to date.
    #[error("delivery store {url}: migration {version} ({name}) failed: {source}")]
    Migration {
        /// The store, redacted.
        url: StoreUrl,
        /// The migration that failed.
        version: i64,
        /// Its name.
        name: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The caller passed something the store cannot write.
    #[error("invalid delivery store request: {0}")]
    InvalidArgument(String),
    /// A stored row could not be read back.
    #[error("unreadable delivery store row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether trying again later may succeed: the database is unreachable, restarting or
    /// overloaded, a connection could not be had in time, or a transaction lost a race
    /// (deadlock, serialization, SQLite's lock). A worker keeps what it could not write and
    /// retries; anything else is a bug or a misconfiguration.
    pub fn is_transient(&self) -> bool {
        let (url, source) = match self {
            Self::Database { url, source } | Self::Migration { url, source, .. } => (url, source),
            Self::Url(_) | Self::InvalidArgument(_) | Self::Corrupt(_) => return false,
        };
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(err) => {
                let Some(code) = err.code() else {
                    return false;
                };
                if url.is_postgres() {
                    // SQLSTATE classes: 08 connection exception, 40 transaction rollback
                    // (deadlock, serialization), 53 insufficient resources, 57 operator
                    // intervention (shutdown, crash recovery).
                    ["08", "40", "53", "57"]
                        .iter()
                        .any(|class| code.starts_with(class))
                } else {
                    // SQLite's extended codes; the primary code is the low byte: BUSY, LOCKED.
                    code.parse::<i32>()
                        .is_ok_and(|code| matches!(code & 0xff, 5 | 6))
                }
            }
            _ => false,
        }
    }
}

/// Options for [`open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Connections kept to PostgreSQL (SQLite uses its own small pool).
    pub max_connections: u32,
    /// How long to wait for a connection (or, on SQLite, for the write lock).
    pub acquire_timeout: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// Where deliveries a worker can no longer hold in memory live, with their attempts and bodies.
///
/// Every write is atomic: a batch is either wholly stored or not at all. Times come from the
/// caller (`now`), never from the database's clock.
#[async_trait]
pub trait DeliveryStore: fmt::Debug + Send + Sync {
    /// Brings the schema up to date. Idempotent, and safe when several processes run it at once;
    /// [`open`] already did it.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Hands off a batch of deliveries in one transaction: they are `QUEUED` when this returns
    /// `Ok`. Each needs [`Outcome::Queued`] and its body. A delivery already stored keeps its
    /// schedule and claim if it is queued, and is queued again if it had a final outcome; its
    /// attempts are added either way.
    async fn hand_off(&self, batch: &[NewDelivery], now: SystemTime) -> Result<(), StoreError>;

    /// Records deliveries with their outcomes and attempts in one transaction (the delivery log
    /// of the live path: final outcomes, usually). A final outcome overrides whatever is stored,
    /// and any claim on it is lost.
    async fn record_outcomes(
        &self,
        batch: &[NewDelivery],
        now: SystemTime,
    ) -> Result<(), StoreError>;

    /// Claims due deliveries (`QUEUED`, `next_attempt <= now`, not under an unexpired claim),
    /// fairly across integrations, for `request.lease`: every due integration gets one before
    /// any gets a second, the oldest due first within an integration. May return fewer than
    /// `limit` while more are due (each integration's share is taken, not more); empty means
    /// nothing due is left unclaimed. Claim again while the result is not empty.
    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<ClaimedDelivery>, StoreError>;

    /// Finishes a claimed delivery with an outcome (`Queued` reschedules it) and the attempt
    /// just made, if any; refused ([`FinishResult::LeaseLost`]) when a newer claim or write took
    /// it over.
    async fn finish(
        &self,
        lease: &Lease,
        attempt: Option<&Attempt>,
        outcome: &Outcome,
        now: SystemTime,
    ) -> Result<FinishResult, StoreError> {
        let finish = Finish {
            lease: lease.clone(),
            attempt: attempt.cloned(),
            outcome: outcome.clone(),
        };
        let results = self
            .finish_batch(std::slice::from_ref(&finish), now)
            .await?;
        Ok(results.first().copied().unwrap_or(FinishResult::LeaseLost))
    }

    /// [`DeliveryStore::finish`] for many claimed deliveries in one transaction (one commit for
    /// all: a worker collects the finishes of a few milliseconds). Returns one result per
    /// finish, in order; a delivery finished twice in the batch is finished once, by the first.
    async fn finish_batch(
        &self,
        batch: &[Finish],
        now: SystemTime,
    ) -> Result<Vec<FinishResult>, StoreError>;

    /// Ends every queued delivery of `integration` as `SKIPPED` with `reason` (the integration
    /// was deleted), claimed or not; returns how many.
    async fn skip_integration(
        &self,
        integration: &IntegrationName,
        reason: &str,
        now: SystemTime,
    ) -> Result<u64, StoreError>;

    /// How many deliveries are queued.
    async fn count_queued(&self) -> Result<u64, StoreError>;

    /// Removes deliveries whose final outcome is older than `before`, with their attempts, then
    /// the bodies no delivery references any more, `batch_size` rows per statement.
    async fn purge(&self, before: SystemTime, batch_size: u32) -> Result<PurgeStats, StoreError>;

    /// One delivery with its attempts, if stored.
    async fn get(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError>;

    /// How many deliveries are stored, in any state (the retention gauge).
    async fn count_stored(&self) -> Result<u64, StoreError>;

    /// A page of deliveries of an account or an integration matching a filter, newest first,
    /// without their attempts. Pages follow each other by [`ListCursor`] (keyset): deliveries
    /// written between two pages with a newer `create_time` do not shift or repeat later pages.
    async fn list(&self, request: &ListRequest) -> Result<DeliveryPage, StoreError>;

    /// Counts by state of the deliveries first written in a time range, grouped by campaign
    /// and/or UTC day (one row in all when neither), ordered by day then campaign.
    async fn stats(&self, request: &StatsRequest) -> Result<Vec<StatsRow>, StoreError>;

    /// Re-queues the deliveries of `integration` matching `filter` whose participation body is
    /// still stored, due at `now`, keeping their key (so their `webhook-id`); refreshes those
    /// bodies' `touched_ms` in the same transaction so a concurrent purge keeps them. A delivery
    /// already queued stays under its claim and is only made due. Returns how many.
    async fn redeliver(
        &self,
        integration: &IntegrationName,
        filter: &DeliveryFilter,
        now: SystemTime,
    ) -> Result<u64, StoreError>;
}

/// Default of `--delivery-retention`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The delivery log's flags (control plane). `--delivery-store` itself is one flag of the
/// worker's delivery flags, which the control plane takes too.
#[derive(Clone, Debug, clap::Args)]
pub struct DeliveryLogArgs {
    /// How long a delivery is kept after its final outcome (delivered, failed or skipped);
    /// queued deliveries are never removed. Enforced by the control plane in batches.
    #[arg(long, env = "PUSHWIRE_DELIVERY_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub delivery_retention: Duration,
}

/// Opens the store `url` names and brings its schema up to date.
pub async fn open(
    url: &StoreUrl,
    options: &OpenOptions,
) -> Result<Arc<dyn DeliveryStore>, StoreError> {
    let store: Arc<dyn DeliveryStore> = match url.kind() {
        url::StoreKind::Postgres => Arc::new(PostgresStore::connect(url, options).await?),
        url::StoreKind::Sqlite => Arc::new(SqliteStore::open(url, options).await?),
    };
    store.migrate().await?;
    Ok(store)
}

/// Unix milliseconds of `time` (negative before 1970).
fn to_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The time `ms` unix milliseconds stand for.
fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn integration_name(account: &str, integration: &str) -> Result<IntegrationName, StoreError> {
    IntegrationName::parse(&format!("accounts/{account}/integrations/{integration}"))
        .map_err(|err| StoreError::Corrupt(err.to_string()))
}

/// A batch ready for the SQL of either implementation: bodies once per participation,
/// deliveries once per key (the last wins), sorted so concurrent writers lock rows in the same
/// order.
struct PreparedBatch<'a> {
    bodies: Vec<(&'a str, &'a str, &'a [u8])>,
    deliveries: Vec<&'a NewDelivery>,
}

impl<'a> PreparedBatch<'a> {
    fn new(batch: &'a [NewDelivery], hand_off: bool) -> Result<Self, StoreError> {
        let mut deliveries: std::collections::BTreeMap<&DeliveryKey, &NewDelivery> =
            std::collections::BTreeMap::new();
        let mut bodies: std::collections::BTreeMap<(&str, &str), &[u8]> =
            std::collections::BTreeMap::new();
        for delivery in batch {
            let queued = matches!(delivery.outcome, Outcome::Queued { .. });
            if hand_off && !queued {
                return Err(StoreError::InvalidArgument(format!(
                    "hand-off of {} with state {}: only QUEUED deliveries are handed off",
                    delivery.key.webhook_id(),
                    delivery.outcome.state().as_str()
                )));
            }
            if queued && delivery.body.is_none() {
                return Err(StoreError::InvalidArgument(format!(
                    "{} queued without its body",
                    delivery.key.webhook_id()
                )));
            }
            if let Some(body) = &delivery.body {
                bodies.insert(
                    (
                        delivery.key.integration.account().id(),
                        delivery.key.participation_id.as_str(),
                    ),
                    body,
                );
            }
            deliveries.insert(&delivery.key, delivery);
        }
        Ok(Self {
            bodies: bodies
                .into_iter()
                .map(|((account, participation), body)| (account, participation, body))
                .collect(),
            deliveries: deliveries.into_values().collect(),
        })
    }
}

/// Body bytes per statement (at least one body): a statement's parameters are copies, and a
/// batch of large documents must not be copied whole at once.
const BODY_BYTES_PER_STATEMENT: usize = 1 << 20;

/// `bodies` in runs of at most `rows` rows and [`BODY_BYTES_PER_STATEMENT`] bytes (a larger
/// body alone).
fn body_chunks<'a, 'b>(
    bodies: &'b [(&'a str, &'a str, &'a [u8])],
    rows: usize,
) -> impl Iterator<Item = &'b [(&'a str, &'a str, &'a [u8])]> {
    let mut rest = bodies;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut end = 0;
        while end < rest.len().min(rows)
            && (end == 0 || bytes + rest[end].2.len() <= BODY_BYTES_PER_STATEMENT)
        {
            bytes += rest[end].2.len();
            end += 1;
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

/// The indexes of `batch` to apply, sorted by key (so concurrent writers lock rows in the same
/// order), the first of each key only; the others are refused.
fn unique_finishes(batch: &[Finish]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by(|a, b| batch[*a].lease.key.cmp(&batch[*b].lease.key).then(a.cmp(b)));
    order.dedup_by(|later, first| batch[*later].lease.key == batch[*first].lease.key);
    order
}

/// The last attempt's status and error, as stored on the delivery row.
fn last_attempt_columns(attempts: &[Attempt]) -> (Option<i32>, Option<String>) {
    match attempts.last() {
        Some(attempt) => (
            attempt.status_code.map(i32::from),
            attempt_error_text(attempt),
        ),
        None => (None, None),
    }
}

fn attempt_error_text(attempt: &Attempt) -> Option<String> {
    match (&attempt.error_class, &attempt.error_message) {
        (Some(class), Some(message)) => Some(format!("{class}: {message}")),
        (Some(text), None) | (None, Some(text)) => Some(text.clone()),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip_both_sides_of_the_epoch() {
        for ms in [0, 1, 1_700_000_000_123, -5_000] {
            assert_eq!(to_ms(from_ms(ms)), ms);
        }
    }

    #[test]
    fn webhook_id_is_participation_then_integration() {
        let integration = IntegrationName::parse("accounts/42/integrations/crm").unwrap();
        assert_eq!(DeliveryKey::new(integration, "p1").webhook_id(), "p1_crm");
    }

    #[test]
    fn states_round_trip_through_their_column_values() {
        for state in [
            DeliveryState::Queued,
            DeliveryState::Delivered,
            DeliveryState::Failed,
            DeliveryState::Skipped,
        ] {
            assert_eq!(DeliveryState::parse(state.as_str()).unwrap(), state);
        }
        assert!(DeliveryState::parse("LOST").is_err());
    }

    #[test]
    fn a_hand_off_needs_queued_deliveries_with_bodies() {
        let key = DeliveryKey::new(
            IntegrationName::parse("accounts/42/integrations/crm").unwrap(),
            "p1",
        );
        let mut delivery = NewDelivery {
            key,
            campaign_id: "7".into(),
            website_id: None,
            trace: None,
            outcome: Outcome::Delivered,
            attempts: vec![],
            body: Some(Bytes::from_static(b"{}")),
        };
        let err = PreparedBatch::new(std::slice::from_ref(&delivery), true)
            .err()
            .unwrap();
        assert!(err.to_string().contains("only QUEUED"), "{err}");
        delivery.outcome = Outcome::Queued {
            next_attempt: UNIX_EPOCH,
        };
        delivery.body = None;
        let err = PreparedBatch::new(std::slice::from_ref(&delivery), true)
            .err()
            .unwrap();
        assert!(err.to_string().contains("without its body"), "{err}");
        let err = PreparedBatch::new(std::slice::from_ref(&delivery), false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("without its body"), "{err}");
    }

    #[test]
    fn bodies_go_in_runs_bounded_by_rows_and_bytes() {
        let small = vec![0u8; 100];
        let large = vec![0u8; BODY_BYTES_PER_STATEMENT + 1];
        let mut bodies: Vec<(&str, &str, &[u8])> = vec![("1", "a", &small); 5];
        bodies.insert(2, ("1", "big", &large));
        let sizes = |rows| {
            body_chunks(&bodies, rows)
                .map(<[_]>::len)
                .collect::<Vec<_>>()
        };
        // The large body goes alone; every body is in exactly one run.
        assert_eq!(sizes(usize::MAX), [2, 1, 3]);
        assert_eq!(sizes(2), [2, 1, 2, 1]);
        assert_eq!(body_chunks(&[], 2).count(), 0);
    }

    #[test]
    fn a_finish_batch_applies_the_first_finish_of_each_key_in_key_order() {
        let finish = |id: &str, token: i64| Finish {
            lease: Lease {
                key: DeliveryKey::new(
                    IntegrationName::parse(&format!("accounts/1/integrations/{id}")).unwrap(),
                    "p1",
                ),
                worker: "w".into(),
                token,
                expires: UNIX_EPOCH,
            },
            attempt: None,
            outcome: Outcome::Delivered,
        };
        let batch = [finish("b", 1), finish("a", 2), finish("b", 3)];
        assert_eq!(unique_finishes(&batch), [1, 0]);
    }

    #[test]
    fn a_batch_stores_each_body_and_key_once() {
        let integration =
            |id: &str| IntegrationName::parse(&format!("accounts/42/integrations/{id}")).unwrap();
        let delivery = |id: &str| NewDelivery {
            key: DeliveryKey::new(integration(id), "p1"),
            campaign_id: "7".into(),
            website_id: None,
            trace: None,
            outcome: Outcome::Queued {
                next_attempt: UNIX_EPOCH,
            },
            attempts: vec![],
            body: Some(Bytes::from_static(b"{}")),
        };
        let batch = [delivery("b"), delivery("a"), delivery("b")];
        let prepared = PreparedBatch::new(&batch, true).unwrap();
        assert_eq!(prepared.bodies.len(), 1);
        let ids: Vec<_> = prepared
            .deliveries
            .iter()
            .map(|d| d.key.integration.id())
            .collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
