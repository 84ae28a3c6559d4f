//! The PostgreSQL delivery store: a connection pool, batches written with one `UNNEST` statement
//! per table, claims walking the queued index integration by integration (a skip scan, so one
//! integration's many due rows cost another nothing), and migrations under an advisory lock.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Executor as _, Row};

use super::log::{self, Param, Statement};
use super::migrations::{self, Migration, VERSIONS_TABLE_SQL};
use super::rows::{attempt_from_row, claimed_from_row, record_from_row};
use super::sql;
use super::{
    ClaimRequest, ClaimedDelivery, DeliveryFilter, DeliveryKey, DeliveryPage, DeliveryRecord,
    DeliveryStore, Finish, FinishResult, ListRequest, NewDelivery, OpenOptions, PreparedBatch,
    PurgeStats, StatsRequest, StatsRow, StoreError, StoreUrl, attempt_error_text, body_chunks,
    duration_ms, last_attempt_columns, to_ms, unique_finishes,
};
use crate::domain::IntegrationName;

/// The advisory lock every migration run holds (an arbitrary constant: "pushwire" in ASCII).
const MIGRATION_LOCK: i64 = 0x7075_7368_7769_7265;

/// Rows changed per statement by [`DeliveryStore::skip_integration`].
const SKIP_BATCH: i64 = 1000;

const INSERT_BODIES: &str = "
INSERT INTO pushwire_delivery_bodies (account, participation_id, body, touched_ms)
SELECT account, participation_id, body, $4
FROM UNNEST($1::text[], $2::text[], $3::bytea[]) AS t(account, participation_id, body)
ON CONFLICT (account, participation_id) DO UPDATE SET touched_ms = EXCLUDED.touched_ms";

const UPSERT_DELIVERIES: &str = concat!(
    "
INSERT INTO pushwire_deliveries AS d (
    account, integration, participation_id, campaign_id, website_id, state, attempt_count,
    last_status_code, last_error, skip_reason, next_attempt_ms, traceparent, tracestate,
    create_ms, update_ms)
SELECT account, integration, participation_id, campaign_id, website_id, state, attempt_count,
    last_status_code, last_error, skip_reason, next_attempt_ms, traceparent, tracestate, $14, $14
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::int4[], $8::int4[], $9::text[], $10::text[], $11::int8[], $12::text[], $13::text[])
    AS t(account, integration, participation_id, campaign_id, website_id, state, attempt_count,
         last_status_code, last_error, skip_reason, next_attempt_ms, traceparent, tracestate)
",
    sql::upsert_deliveries_on_conflict!()
);

const INSERT_ATTEMPTS: &str = "
INSERT INTO pushwire_delivery_attempts (
    account, integration, participation_id, attempt_ms, status_code, error_class, error_message,
    duration_ms)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int4[], $6::text[],
    $7::text[], $8::int8[])";

/// Walks the integrations that have queued rows (a recursive skip scan over the queued index),
/// keeps those with a due, unclaimed row and not excluded, and takes the oldest due rows of each:
/// its share of the `$2` wanted (at least one, at most `$7`). Ranked within their integration,
/// the best `$2` ranks are claimed, ties in random order: every due integration gets its first
/// delivery before any gets its second, and when more integrations are due than `$2`, which of
/// them go first is drawn anew each claim, so none waits behind another's backlog. Candidates
/// are locked as they are read, skipping rows another claim is locking, so concurrent claimers
/// take different rows instead of queueing for the same ones; the update re-checks each row.
const CLAIM: &str = "
WITH RECURSIVE integrations(account, integration) AS (
    (SELECT account, integration FROM pushwire_deliveries
     WHERE state = 'QUEUED' ORDER BY account, integration LIMIT 1)
    UNION ALL
    SELECT n.account, n.integration FROM integrations i
    CROSS JOIN LATERAL (
        SELECT d.account, d.integration FROM pushwire_deliveries d
        WHERE d.state = 'QUEUED' AND (d.account, d.integration) > (i.account, i.integration)
        ORDER BY d.account, d.integration LIMIT 1) n
),
due AS (
    -- A LATERAL probe rather than EXISTS: one index look-up per integration, never a semi-join
    -- over every queued row.
    SELECT i.account, i.integration FROM integrations i
    CROSS JOIN LATERAL (
        SELECT 1 FROM pushwire_deliveries d
        WHERE d.account = i.account AND d.integration = i.integration AND d.state = 'QUEUED'
          AND d.next_attempt_ms <= $1
          AND (d.lease_expires_ms IS NULL OR d.lease_expires_ms <= $1)
        ORDER BY d.next_attempt_ms LIMIT 1) probe
    WHERE NOT EXISTS (
        SELECT 1 FROM UNNEST($3::text[], $4::text[]) AS x(account, integration)
        WHERE x.account = i.account AND x.integration = i.integration)
),
candidates AS (
    SELECT c.account, c.integration, c.participation_id, c.lease_owner IS NOT NULL AS expired,
        row_number() OVER (PARTITION BY c.account, c.integration
                           ORDER BY c.next_attempt_ms, c.participation_id) AS rank
    FROM due i
    CROSS JOIN LATERAL (
        SELECT d.account, d.integration, d.participation_id, d.next_attempt_ms, d.lease_owner
        FROM pushwire_deliveries d
        WHERE d.account = i.account AND d.integration = i.integration AND d.state = 'QUEUED'
          AND d.next_attempt_ms <= $1
          AND (d.lease_expires_ms IS NULL OR d.lease_expires_ms <= $1)
        ORDER BY d.next_attempt_ms
        LIMIT (SELECT LEAST($7, GREATEST(1, CEIL($2::float8 / GREATEST(count(*), 1))))::int8
               FROM due)
        FOR UPDATE OF d SKIP LOCKED) c
),
picked AS (
    SELECT account, integration, participation_id, expired FROM candidates
    ORDER BY rank, random() LIMIT $2
),
claimed AS (
    UPDATE pushwire_deliveries d
    SET lease_owner = $5, lease_token = d.lease_token + 1, lease_expires_ms = $6
    FROM picked p
    WHERE d.account = p.account AND d.integration = p.integration
      AND d.participation_id = p.participation_id
      AND d.state = 'QUEUED' AND d.next_attempt_ms <= $1
      AND (d.lease_expires_ms IS NULL OR d.lease_expires_ms <= $1)
    RETURNING d.account, d.integration, d.participation_id, d.campaign_id, d.website_id,
        d.attempt_count, d.next_attempt_ms, d.create_ms, d.traceparent, d.tracestate,
        d.lease_token, p.expired
)
SELECT c.*, b.body FROM claimed c
LEFT JOIN pushwire_delivery_bodies b
    ON b.account = c.account AND b.participation_id = c.participation_id
ORDER BY c.next_attempt_ms";

/// Finishes the deliveries whose claim (`worker`, `token`) still holds, recording the attempts
/// of those; returns the keys finished.
const FINISH: &str = "
WITH input AS (
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
        $6::text[], $7::bool[], $8::int4[], $9::text[], $10::text[], $11::int8[], $12::int8[],
        $13::text[], $14::text[], $15::int8[])
    AS t(account, integration, participation_id, worker, token, state, has_attempt,
         status_code, last_error, skip_reason, next_attempt_ms, attempt_ms, error_class,
         error_message, duration_ms)
),
done AS (
    UPDATE pushwire_deliveries AS d SET
        state = i.state,
        attempt_count = d.attempt_count + CASE WHEN i.has_attempt THEN 1 ELSE 0 END,
        last_status_code = CASE WHEN i.has_attempt THEN i.status_code ELSE d.last_status_code END,
        last_error = CASE WHEN i.has_attempt THEN i.last_error ELSE d.last_error END,
        skip_reason = i.skip_reason,
        next_attempt_ms = i.next_attempt_ms,
        lease_owner = NULL,
        lease_expires_ms = NULL,
        update_ms = $16
    FROM input i
    WHERE d.account = i.account AND d.integration = i.integration
      AND d.participation_id = i.participation_id
      AND d.state = 'QUEUED' AND d.lease_owner = i.worker AND d.lease_token = i.token
    RETURNING d.account, d.integration, d.participation_id
),
attempts AS (
    INSERT INTO pushwire_delivery_attempts (
        account, integration, participation_id, attempt_ms, status_code, error_class,
        error_message, duration_ms)
    SELECT i.account, i.integration, i.participation_id, i.attempt_ms, i.status_code,
        i.error_class, i.error_message, i.duration_ms
    FROM input i JOIN done USING (account, integration, participation_id)
    WHERE i.has_attempt
    RETURNING 1
)
SELECT account, integration, participation_id FROM done";

const PURGE_DELIVERIES: &str = "
WITH doomed AS (
    SELECT account, integration, participation_id FROM pushwire_deliveries
    WHERE state <> 'QUEUED' AND update_ms < $1
    ORDER BY update_ms LIMIT $2
    FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM pushwire_deliveries d USING doomed x
    WHERE d.account = x.account AND d.integration = x.integration
      AND d.participation_id = x.participation_id
    RETURNING d.account, d.integration, d.participation_id
),
gone_attempts AS (
    DELETE FROM pushwire_delivery_attempts a USING gone g
    WHERE a.account = g.account AND a.integration = g.integration
      AND a.participation_id = g.participation_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT count(*) FROM gone_attempts) AS attempts";

/// The PostgreSQL delivery store.
#[derive(Clone)]
pub struct PostgresStore {
    url: StoreUrl,
    pool: PgPool,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the pool: its connect options hold the password.
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL; `sslmode` and the other libpq parameters apply)
    /// without migrating: [`DeliveryStore::migrate`] or [`super::open`] does that.
    pub async fn connect(url: &StoreUrl, options: &OpenOptions) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(url.expose())
            .map_err(|source| database_error(url, source))?
            .application_name("pushwire");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|source| database_error(url, source))?;
        Ok(Self {
            url: url.clone(),
            pool,
        })
    }

    fn error(&self) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        |source| database_error(&self.url, source)
    }

    async fn write(
        &self,
        batch: &[NewDelivery],
        now: SystemTime,
        hand_off: bool,
    ) -> Result<(), StoreError> {
        let prepared = PreparedBatch::new(batch, hand_off)?;
        if prepared.deliveries.is_empty() {
            return Ok(());
        }
        let now = to_ms(now);
        let columns = DeliveryColumns::new(&prepared.deliveries);
        let attempts = AttemptColumns::new(&prepared.deliveries);
        let mut tx = self.pool.begin().await.map_err(self.error())?;
        // In runs of about a megabyte: a statement's parameters are a copy of the bodies.
        for chunk in body_chunks(&prepared.bodies, usize::MAX) {
            let accounts: Vec<&str> = chunk.iter().map(|b| b.0).collect();
            let participations: Vec<&str> = chunk.iter().map(|b| b.1).collect();
            let bodies: Vec<&[u8]> = chunk.iter().map(|b| b.2).collect();
            sqlx::query(INSERT_BODIES)
                .bind(accounts)
                .bind(participations)
                .bind(bodies)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(self.error())?;
        }
        sqlx::query(UPSERT_DELIVERIES)
            .bind(columns.account)
            .bind(columns.integration)
            .bind(columns.participation_id)
            .bind(columns.campaign_id)
            .bind(columns.website_id)
            .bind(columns.state)
            .bind(columns.attempt_count)
            .bind(columns.last_status_code)
            .bind(columns.last_error)
            .bind(columns.skip_reason)
            .bind(columns.next_attempt_ms)
            .bind(columns.traceparent)
            .bind(columns.tracestate)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(self.error())?;
        if !attempts.account.is_empty() {
            sqlx::query(INSERT_ATTEMPTS)
                .bind(attempts.account)
                .bind(attempts.integration)
                .bind(attempts.participation_id)
                .bind(attempts.attempt_ms)
                .bind(attempts.status_code)
                .bind(attempts.error_class)
                .bind(attempts.error_message)
                .bind(attempts.duration_ms)
                .execute(&mut *tx)
                .await
                .map_err(self.error())?;
        }
        tx.commit().await.map_err(self.error())
    }
}

#[async_trait]
impl DeliveryStore for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(self.error())?;
        // Held until commit: concurrent runs wait here, then find the versions applied.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(self.error())?;
        tx.execute(VERSIONS_TABLE_SQL).await.map_err(self.error())?;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM pushwire_schema_migrations")
                .fetch_all(&mut *tx)
                .await
                .map_err(self.error())?;
        for migration in migrations::pending(migrations::POSTGRES, &applied) {
            if let Err(source) = apply_migration(&mut tx, migration).await {
                return Err(StoreError::Migration {
                    url: self.url.clone(),
                    version: migration.version,
                    name: migration.name,
                    source,
                });
            }
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "delivery store schema migrated"
            );
        }
        tx.commit().await.map_err(self.error())
    }

    async fn hand_off(&self, batch: &[NewDelivery], now: SystemTime) -> Result<(), StoreError> {
        self.write(batch, now, true).await
    }

    async fn record_outcomes(
        &self,
        batch: &[NewDelivery],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.write(batch, now, false).await
    }

    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<ClaimedDelivery>, StoreError> {
        if request.limit == 0 {
            return Ok(Vec::new());
        }
        let now = to_ms(request.now);
        let expires = to_ms(request.now + request.lease);
        let excluded_accounts: Vec<&str> =
            request.exclude.iter().map(|i| i.account().id()).collect();
        let excluded_integrations: Vec<&str> = request.exclude.iter().map(|i| i.id()).collect();
        let rows = sqlx::query(CLAIM)
            .bind(now)
            .bind(i64::from(request.limit))
            .bind(excluded_accounts)
            .bind(excluded_integrations)
            .bind(&request.worker)
            .bind(expires)
            .bind(i64::from(request.per_integration_limit()))
            .fetch_all(&self.pool)
            .await
            .map_err(self.error())?;
        rows.iter()
            .map(|row| claimed_from_row(row, &request.worker, expires))
            .collect()
    }

    async fn finish_batch(
        &self,
        batch: &[Finish],
        now: SystemTime,
    ) -> Result<Vec<FinishResult>, StoreError> {
        let apply = unique_finishes(batch);
        let mut results = vec![FinishResult::LeaseLost; batch.len()];
        if apply.is_empty() {
            return Ok(results);
        }
        let columns = FinishColumns::new(apply.iter().map(|i| &batch[*i]));
        let rows = sqlx::query(FINISH)
            .bind(columns.account)
            .bind(columns.integration)
            .bind(columns.participation_id)
            .bind(columns.worker)
            .bind(columns.token)
            .bind(columns.state)
            .bind(columns.has_attempt)
            .bind(columns.status_code)
            .bind(columns.last_error)
            .bind(columns.skip_reason)
            .bind(columns.next_attempt_ms)
            .bind(columns.attempt_ms)
            .bind(columns.error_class)
            .bind(columns.error_message)
            .bind(columns.duration_ms)
            .bind(to_ms(now))
            .fetch_all(&self.pool)
            .await
            .map_err(self.error())?;
        let mut done = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            let account: String = row.try_get("account").map_err(self.error())?;
            let integration: String = row.try_get("integration").map_err(self.error())?;
            let participation: String = row.try_get("participation_id").map_err(self.error())?;
            done.insert((account, integration, participation));
        }
        for index in apply {
            let key = &batch[index].lease.key;
            let finished = done.contains(&(
                key.integration.account().id().to_owned(),
                key.integration.id().to_owned(),
                key.participation_id.clone(),
            ));
            if finished {
                results[index] = FinishResult::Applied;
            }
        }
        Ok(results)
    }

    async fn skip_integration(
        &self,
        integration: &IntegrationName,
        reason: &str,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        let mut skipped = 0;
        loop {
            let done = sqlx::query(sql::SKIP_INTEGRATION)
                .bind(integration.account().id())
                .bind(integration.id())
                .bind(reason)
                .bind(to_ms(now))
                .bind(SKIP_BATCH)
                .execute(&self.pool)
                .await
                .map_err(self.error())?
                .rows_affected();
            skipped += done;
            if done == 0 {
                return Ok(skipped);
            }
        }
    }

    async fn count_queued(&self) -> Result<u64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pushwire_deliveries WHERE state = 'QUEUED'")
                .fetch_one(&self.pool)
                .await
                .map_err(self.error())?;
        Ok(count.unsigned_abs())
    }

    async fn purge(&self, before: SystemTime, batch_size: u32) -> Result<PurgeStats, StoreError> {
        let before = to_ms(before);
        let batch = i64::from(batch_size.max(1));
        let mut stats = PurgeStats::default();
        loop {
            let row = sqlx::query(PURGE_DELIVERIES)
                .bind(before)
                .bind(batch)
                .fetch_one(&self.pool)
                .await
                .map_err(self.error())?;
            let deliveries: i64 = row.try_get("deliveries").map_err(self.error())?;
            let attempts: i64 = row.try_get("attempts").map_err(self.error())?;
            stats.deliveries += deliveries.unsigned_abs();
            stats.attempts += attempts.unsigned_abs();
            if deliveries < batch {
                break;
            }
        }
        loop {
            let bodies = sqlx::query(sql::PURGE_BODIES)
                .bind(before)
                .bind(batch)
                .execute(&self.pool)
                .await
                .map_err(self.error())?
                .rows_affected();
            stats.bodies += bodies;
            if bodies < batch.unsigned_abs() {
                return Ok(stats);
            }
        }
    }

    async fn get(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        let account = key.integration.account().id();
        let Some(row) = sqlx::query(sql::GET)
            .bind(account)
            .bind(key.integration.id())
            .bind(&key.participation_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.error())?
        else {
            return Ok(None);
        };
        let attempts = sqlx::query(sql::GET_ATTEMPTS)
            .bind(account)
            .bind(key.integration.id())
            .bind(&key.participation_id)
            .fetch_all(&self.pool)
            .await
            .map_err(self.error())?
            .iter()
            .map(attempt_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        record_from_row(&row, key, attempts).map(Some)
    }

    async fn count_stored(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pushwire_deliveries")
            .fetch_one(&self.pool)
            .await
            .map_err(self.error())?;
        Ok(count.unsigned_abs())
    }

    async fn list(&self, request: &ListRequest) -> Result<DeliveryPage, StoreError> {
        let statement = log::list(request);
        let rows = bound(&statement)
            .fetch_all(&self.pool)
            .await
            .map_err(self.error())?;
        log::page_from_rows(&rows, request.page_size)
    }

    async fn stats(&self, request: &StatsRequest) -> Result<Vec<StatsRow>, StoreError> {
        let statement = log::stats(request);
        bound(&statement)
            .fetch_all(&self.pool)
            .await
            .map_err(self.error())?
            .iter()
            .map(log::stats_from_row)
            .collect()
    }

    async fn redeliver(
        &self,
        integration: &IntegrationName,
        filter: &DeliveryFilter,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        let touch = log::redeliver_touch_bodies(integration, filter, now);
        let requeue = log::redeliver_deliveries(integration, filter, now);
        let mut tx = self.pool.begin().await.map_err(self.error())?;
        bound(&touch)
            .execute(&mut *tx)
            .await
            .map_err(self.error())?;
        let redelivered = bound(&requeue)
            .execute(&mut *tx)
            .await
            .map_err(self.error())?
            .rows_affected();
        tx.commit().await.map_err(self.error())?;
        Ok(redelivered)
    }
}

fn database_error(url: &StoreUrl, source: sqlx::Error) -> StoreError {
    StoreError::Database {
        url: url.clone(),
        source,
    }
}

/// A batch of deliveries as one array per column, for `UNNEST`.
struct DeliveryColumns<'a> {
    account: Vec<&'a str>,
    integration: Vec<&'a str>,
    participation_id: Vec<&'a str>,
    campaign_id: Vec<&'a str>,
    website_id: Vec<Option<&'a str>>,
    state: Vec<&'static str>,
    attempt_count: Vec<i32>,
    last_status_code: Vec<Option<i32>>,
    last_error: Vec<Option<String>>,
    skip_reason: Vec<Option<&'a str>>,
    next_attempt_ms: Vec<Option<i64>>,
    traceparent: Vec<Option<&'a str>>,
    tracestate: Vec<Option<&'a str>>,
}

impl<'a> DeliveryColumns<'a> {
    fn new(deliveries: &[&'a NewDelivery]) -> Self {
        let n = deliveries.len();
        let mut columns = Self {
            account: Vec::with_capacity(n),
            integration: Vec::with_capacity(n),
            participation_id: Vec::with_capacity(n),
            campaign_id: Vec::with_capacity(n),
            website_id: Vec::with_capacity(n),
            state: Vec::with_capacity(n),
            attempt_count: Vec::with_capacity(n),
            last_status_code: Vec::with_capacity(n),
            last_error: Vec::with_capacity(n),
            skip_reason: Vec::with_capacity(n),
            next_attempt_ms: Vec::with_capacity(n),
            traceparent: Vec::with_capacity(n),
            tracestate: Vec::with_capacity(n),
        };
        for d in deliveries {
            let (status, error) = last_attempt_columns(&d.attempts);
            columns.account.push(d.key.integration.account().id());
            columns.integration.push(d.key.integration.id());
            columns.participation_id.push(&d.key.participation_id);
            columns.campaign_id.push(&d.campaign_id);
            columns.website_id.push(d.website_id.as_deref());
            columns.state.push(d.outcome.state().as_str());
            columns
                .attempt_count
                .push(i32::try_from(d.attempts.len()).unwrap_or(i32::MAX));
            columns.last_status_code.push(status);
            columns.last_error.push(error);
            columns.skip_reason.push(d.outcome.skip_reason());
            columns.next_attempt_ms.push(d.outcome.next_attempt_ms());
            columns
                .traceparent
                .push(d.trace.as_ref().map(|t| t.traceparent.as_str()));
            columns
                .tracestate
                .push(d.trace.as_ref().map(|t| t.tracestate.as_str()));
        }
        columns
    }
}

/// A batch of finishes as one array per column, for `UNNEST`.
#[derive(Default)]
struct FinishColumns<'a> {
    account: Vec<&'a str>,
    integration: Vec<&'a str>,
    participation_id: Vec<&'a str>,
    worker: Vec<&'a str>,
    token: Vec<i64>,
    state: Vec<&'static str>,
    has_attempt: Vec<bool>,
    status_code: Vec<Option<i32>>,
    last_error: Vec<Option<String>>,
    skip_reason: Vec<Option<&'a str>>,
    next_attempt_ms: Vec<Option<i64>>,
    attempt_ms: Vec<Option<i64>>,
    error_class: Vec<Option<&'a str>>,
    error_message: Vec<Option<&'a str>>,
    duration_ms: Vec<Option<i64>>,
}

impl<'a> FinishColumns<'a> {
    fn new(finishes: impl Iterator<Item = &'a Finish>) -> Self {
        let mut columns = Self::default();
        for f in finishes {
            let attempt = f.attempt.as_ref();
            columns.account.push(f.lease.key.integration.account().id());
            columns.integration.push(f.lease.key.integration.id());
            columns.participation_id.push(&f.lease.key.participation_id);
            columns.worker.push(&f.lease.worker);
            columns.token.push(f.lease.token);
            columns.state.push(f.outcome.state().as_str());
            columns.has_attempt.push(attempt.is_some());
            columns
                .status_code
                .push(attempt.and_then(|a| a.status_code).map(i32::from));
            columns
                .last_error
                .push(attempt.and_then(attempt_error_text));
            columns.skip_reason.push(f.outcome.skip_reason());
            columns.next_attempt_ms.push(f.outcome.next_attempt_ms());
            columns.attempt_ms.push(attempt.map(|a| to_ms(a.time)));
            columns
                .error_class
                .push(attempt.and_then(|a| a.error_class.as_deref()));
            columns
                .error_message
                .push(attempt.and_then(|a| a.error_message.as_deref()));
            columns
                .duration_ms
                .push(attempt.map(|a| duration_ms(a.duration)));
        }
        columns
    }
}

/// A batch's attempts as one array per column, for `UNNEST`.
#[derive(Default)]
struct AttemptColumns<'a> {
    account: Vec<&'a str>,
    integration: Vec<&'a str>,
    participation_id: Vec<&'a str>,
    attempt_ms: Vec<i64>,
    status_code: Vec<Option<i32>>,
    error_class: Vec<Option<&'a str>>,
    error_message: Vec<Option<&'a str>>,
    duration_ms: Vec<i64>,
}

impl<'a> AttemptColumns<'a> {
    fn new(deliveries: &[&'a NewDelivery]) -> Self {
        let mut columns = Self::default();
        for d in deliveries {
            for attempt in &d.attempts {
                columns.account.push(d.key.integration.account().id());
                columns.integration.push(d.key.integration.id());
                columns.participation_id.push(&d.key.participation_id);
                columns.attempt_ms.push(to_ms(attempt.time));
                columns.status_code.push(attempt.status_code.map(i32::from));
                columns.error_class.push(attempt.error_class.as_deref());
                columns.error_message.push(attempt.error_message.as_deref());
                columns.duration_ms.push(duration_ms(attempt.duration));
            }
        }
        columns
    }
}

/// Runs one migration and records it, inside the caller's transaction.
async fn apply_migration(
    conn: &mut PgConnection,
    migration: &Migration,
) -> Result<(), sqlx::Error> {
    conn.execute(migration.sql).await?;
    sqlx::query(
        "INSERT INTO pushwire_schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
    )
    .bind(migration.version)
    .bind(migration.name)
    .bind(to_ms(SystemTime::now()))
    .execute(&mut *conn)
    .await
    .map(drop)
}

/// `statement`'s SQL with its parameters bound.
fn bound<'q>(
    statement: &'q Statement,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut query = sqlx::query(&statement.sql);
    for param in &statement.params {
        query = match param {
            Param::Text(text) => query.bind(text.as_str()),
            Param::Int(int) => query.bind(*int),
        };
    }
    query
}
