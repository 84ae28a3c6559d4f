//! The embedded SQLite delivery store (`control-plane --with-worker`, one node): one file in WAL
//! mode, every write in a `BEGIN IMMEDIATE` transaction (so writers wait for the file lock,
//! also across processes, instead of failing), one writer of the process at a time in arrival
//! order, a batch in a few multi-row statements; readers run beside it.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Executor as _, QueryBuilder, Row, Sqlite, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::log::{self, Param, Statement};
use super::migrations::{self, Migration, VERSIONS_TABLE_SQL};
use super::rows::{attempt_from_row, claimed_from_row, record_from_row};
use super::sql;
use super::{
    Attempt, ClaimRequest, ClaimedDelivery, DeliveryFilter, DeliveryKey, DeliveryPage,
    DeliveryRecord, DeliveryStore, Finish, FinishResult, ListRequest, NewDelivery, OpenOptions,
    PreparedBatch, PurgeStats, StatsRequest, StatsRow, StoreError, StoreUrl, attempt_error_text,
    body_chunks, duration_ms, last_attempt_columns, to_ms, unique_finishes,
};
use crate::domain::IntegrationName;

/// Connections in the pool: readers run beside the one writer WAL allows.
const MAX_CONNECTIONS: u32 = 4;

/// Rows changed per statement by [`DeliveryStore::skip_integration`].
const SKIP_BATCH: i64 = 1000;

/// The next integration with queued rows in the account of the walk's row `w`.
macro_rules! next_in_account {
    () => {
        "(SELECT d.integration FROM pushwire_deliveries d INDEXED BY pushwire_deliveries_queued
          WHERE d.state = 'QUEUED' AND d.account = w.account AND d.integration > w.integration
          ORDER BY d.integration LIMIT 1)"
    };
}

/// The next account with queued rows after the walk's row `w`.
macro_rules! next_account {
    () => {
        "(SELECT d.account FROM pushwire_deliveries d INDEXED BY pushwire_deliveries_queued
          WHERE d.state = 'QUEUED' AND d.account > w.account ORDER BY d.account LIMIT 1)"
    };
}

/// Rows per multi-row statement of a batch write: 15 parameters a delivery row stay far below
/// SQLite's limit of 32,766 parameters a statement.
const ROWS_PER_STATEMENT: usize = 500;

const INSERT_BODIES: &str =
    "INSERT INTO pushwire_delivery_bodies (account, participation_id, body, touched_ms) ";

const BODY_CONFLICT: &str = "
ON CONFLICT (account, participation_id) DO UPDATE SET touched_ms = excluded.touched_ms";

const INSERT_DELIVERIES: &str = "
INSERT INTO pushwire_deliveries AS d (
    account, integration, participation_id, campaign_id, website_id, state, attempt_count,
    last_status_code, last_error, skip_reason, next_attempt_ms, traceparent, tracestate,
    create_ms, update_ms) ";

const INSERT_ATTEMPTS: &str = "
INSERT INTO pushwire_delivery_attempts (
    account, integration, participation_id, attempt_ms, status_code, error_class, error_message,
    duration_ms) ";

const INSERT_ATTEMPT: &str = "
INSERT INTO pushwire_delivery_attempts (
    account, integration, participation_id, attempt_ms, status_code, error_class, error_message,
    duration_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Due, unclaimed deliveries: the integrations that have queued rows are walked one index seek
/// each (a recursive skip scan: a dead endpoint's 200,000 due rows cost nothing to step over),
/// each one not excluded gives its oldest due rows, its share of the `$2` wanted (at least one,
/// at most `$4`); ranked within their integration, the best `$2` ranks are claimed, ties in
/// random order: every due integration gets its first delivery before any gets its second, and
/// none waits behind another's backlog. `$3` is a JSON array of excluded integration names.
/// Every step names the queued index: without statistics the planner may prefer an index of
/// all rows and step over the final ones. (One writer at a time: no claim races to care about.)
const CLAIM_CANDIDATES: &str = concat!(
    "
WITH RECURSIVE walk(account, integration) AS (
    SELECT * FROM (
        SELECT account, integration FROM pushwire_deliveries INDEXED BY pushwire_deliveries_queued
        WHERE state = 'QUEUED' ORDER BY account, integration LIMIT 1)
    UNION ALL
    SELECT CASE WHEN ",
    next_in_account!(),
    " IS NOT NULL THEN w.account ELSE ",
    next_account!(),
    " END,
        COALESCE(",
    next_in_account!(),
    ", (SELECT d.integration FROM pushwire_deliveries d INDEXED BY pushwire_deliveries_queued
            WHERE d.state = 'QUEUED' AND d.account = ",
    next_account!(),
    "
            ORDER BY d.integration LIMIT 1))
    FROM walk w WHERE w.account IS NOT NULL
),
candidates AS (
    SELECT d.account, d.integration, d.participation_id, d.lease_owner IS NOT NULL AS expired,
        row_number() OVER (PARTITION BY d.account, d.integration
                           ORDER BY d.next_attempt_ms, d.participation_id) AS rank
    -- CROSS JOIN: SQLite keeps this order (the walk outside, one key look-up inside).
    FROM walk w
    CROSS JOIN pushwire_deliveries d ON d.account = w.account AND d.integration = w.integration
    WHERE w.account IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM json_each($3) AS x
          WHERE x.value = 'accounts/' || w.account || '/integrations/' || w.integration)
      AND d.participation_id IN (
          SELECT e.participation_id FROM pushwire_deliveries e INDEXED BY pushwire_deliveries_queued
          WHERE e.account = w.account AND e.integration = w.integration AND e.state = 'QUEUED'
            AND e.next_attempt_ms <= $1
            AND (e.lease_expires_ms IS NULL OR e.lease_expires_ms <= $1)
          ORDER BY e.next_attempt_ms
          LIMIT (SELECT min($4, max(1, ($2 + count(*) - 1) / max(count(*), 1)))
                 FROM walk WHERE account IS NOT NULL))
)
SELECT account, integration, participation_id, expired FROM candidates
ORDER BY rank, random()
LIMIT $2"
);

const CLAIM_ONE: &str = "
UPDATE pushwire_deliveries
SET lease_owner = $4, lease_token = lease_token + 1, lease_expires_ms = $5
WHERE account = $1 AND integration = $2 AND participation_id = $3";

const CLAIMED_ROW: &str = "
SELECT d.*, b.body FROM pushwire_deliveries AS d
LEFT JOIN pushwire_delivery_bodies AS b
    ON b.account = d.account AND b.participation_id = d.participation_id
WHERE d.account = $1 AND d.integration = $2 AND d.participation_id = $3";

const FINISH: &str = "
UPDATE pushwire_deliveries SET
    state = $6,
    attempt_count = attempt_count + $7,
    last_status_code = CASE WHEN $7 > 0 THEN $8 ELSE last_status_code END,
    last_error = CASE WHEN $7 > 0 THEN $9 ELSE last_error END,
    skip_reason = $10,
    next_attempt_ms = $11,
    lease_owner = NULL,
    lease_expires_ms = NULL,
    update_ms = $12
WHERE account = $1 AND integration = $2 AND participation_id = $3
  AND state = 'QUEUED' AND lease_owner = $4 AND lease_token = $5";

/// The oldest `$2` final outcomes before `$1`; the same set for both deletes of one transaction.
macro_rules! doomed {
    () => {
        "(SELECT account, integration, participation_id FROM pushwire_deliveries
          WHERE state <> 'QUEUED' AND update_ms < $1 ORDER BY update_ms LIMIT $2)"
    };
}

const PURGE_ATTEMPTS: &str = concat!(
    "DELETE FROM pushwire_delivery_attempts
     WHERE (account, integration, participation_id) IN ",
    doomed!()
);

const PURGE_DELIVERIES: &str = concat!(
    "DELETE FROM pushwire_deliveries
     WHERE (account, integration, participation_id) IN ",
    doomed!()
);

/// The embedded SQLite delivery store.
#[derive(Clone)]
pub struct SqliteStore {
    url: StoreUrl,
    pool: SqlitePool,
    /// One write transaction at a time in this process, first come first served.
    writer: Arc<Mutex<()>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the file a `sqlite://PATH` URL names,
    /// without migrating: [`DeliveryStore::migrate`] or [`super::open`] does that.
    pub async fn open(url: &StoreUrl, options: &OpenOptions) -> Result<Self, StoreError> {
        let path = url
            .sqlite_path()
            .ok_or_else(|| StoreError::InvalidArgument(format!("{url} is not a sqlite:// URL")))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| StoreError::Database {
                url: url.clone(),
                source: sqlx::Error::Io(err),
            })?;
        }
        let connect = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // QUEUED promises the delivery survives a crash of the machine, not only of the
            // process: every commit reaches the disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(options.acquire_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|source| StoreError::Database {
                url: url.clone(),
                source,
            })?;
        Ok(Self {
            url: url.clone(),
            pool,
            writer: Arc::new(Mutex::new(())),
        })
    }

    fn error(&self) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        |source| StoreError::Database {
            url: self.url.clone(),
            source,
        }
    }

    /// A write transaction holding the file's write lock from its start, and this process's
    /// turn to write: writers of one process queue in order here rather than polling for the
    /// file lock, where a busy one could starve the others past the busy timeout.
    async fn begin_write(
        &self,
    ) -> Result<(OwnedMutexGuard<()>, Transaction<'static, Sqlite>), StoreError> {
        let turn = Arc::clone(&self.writer).lock_owned().await;
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.error())?;
        Ok((turn, tx))
    }

    /// Writes a batch in one transaction, a few multi-row statements per table (a statement
    /// per row cost a round trip to the connection's thread each).
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
        let attempts: Vec<(&DeliveryKey, &Attempt)> = prepared
            .deliveries
            .iter()
            .flat_map(|d| d.attempts.iter().map(|a| (&d.key, a)))
            .collect();
        let (_writing, mut tx) = self.begin_write().await?;
        for chunk in body_chunks(&prepared.bodies, ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(INSERT_BODIES);
            q.push_values(chunk, |mut row, (account, participation_id, body)| {
                row.push_bind(*account)
                    .push_bind(*participation_id)
                    .push_bind(*body)
                    .push_bind(now);
            });
            q.push(BODY_CONFLICT);
            execute(&mut tx, q).await.map_err(self.error())?;
        }
        for chunk in prepared.deliveries.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(INSERT_DELIVERIES);
            q.push_values(chunk, |mut row, d| {
                let (status, error) = last_attempt_columns(&d.attempts);
                row.push_bind(d.key.integration.account().id())
                    .push_bind(d.key.integration.id())
                    .push_bind(d.key.participation_id.as_str())
                    .push_bind(d.campaign_id.as_str())
                    .push_bind(d.website_id.as_deref())
                    .push_bind(d.outcome.state().as_str())
                    .push_bind(i64::try_from(d.attempts.len()).unwrap_or(i64::MAX))
                    .push_bind(status)
                    .push_bind(error)
                    .push_bind(d.outcome.skip_reason())
                    .push_bind(d.outcome.next_attempt_ms())
                    .push_bind(d.trace.as_ref().map(|t| t.traceparent.as_str()))
                    .push_bind(d.trace.as_ref().map(|t| t.tracestate.as_str()))
                    .push_bind(now)
                    .push_bind(now);
            });
            q.push(sql::upsert_deliveries_on_conflict!());
            execute(&mut tx, q).await.map_err(self.error())?;
        }
        for chunk in attempts.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(INSERT_ATTEMPTS);
            q.push_values(chunk, |mut row, (key, attempt)| {
                row.push_bind(key.integration.account().id())
                    .push_bind(key.integration.id())
                    .push_bind(key.participation_id.as_str())
                    .push_bind(to_ms(attempt.time))
                    .push_bind(attempt.status_code.map(i32::from))
                    .push_bind(attempt.error_class.as_deref())
                    .push_bind(attempt.error_message.as_deref())
                    .push_bind(duration_ms(attempt.duration));
            });
            execute(&mut tx, q).await.map_err(self.error())?;
        }
        tx.commit().await.map_err(self.error())
    }
}

/// Runs a built statement once; not kept in the connection's statement cache (every batch
/// size is another statement).
async fn execute(
    conn: &mut SqliteConnection,
    mut query: QueryBuilder<'_, Sqlite>,
) -> Result<(), sqlx::Error> {
    query
        .build()
        .persistent(false)
        .execute(conn)
        .await
        .map(drop)
}

async fn insert_attempt(
    conn: &mut SqliteConnection,
    key: &DeliveryKey,
    attempt: &Attempt,
) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_ATTEMPT)
        .bind(key.integration.account().id())
        .bind(key.integration.id())
        .bind(&key.participation_id)
        .bind(to_ms(attempt.time))
        .bind(attempt.status_code.map(i32::from))
        .bind(attempt.error_class.as_deref())
        .bind(attempt.error_message.as_deref())
        .bind(duration_ms(attempt.duration))
        .execute(conn)
        .await
        .map(drop)
}

/// Finishes one delivery if its claim still holds; whether it did.
async fn finish_one(
    conn: &mut SqliteConnection,
    finish: &Finish,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let Finish {
        lease,
        attempt,
        outcome,
    } = finish;
    let done = sqlx::query(FINISH)
        .bind(lease.key.integration.account().id())
        .bind(lease.key.integration.id())
        .bind(&lease.key.participation_id)
        .bind(&lease.worker)
        .bind(lease.token)
        .bind(outcome.state().as_str())
        .bind(i64::from(attempt.is_some()))
        .bind(attempt.as_ref().and_then(|a| a.status_code).map(i32::from))
        .bind(attempt.as_ref().and_then(attempt_error_text))
        .bind(outcome.skip_reason())
        .bind(outcome.next_attempt_ms())
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if done == 0 {
        return Ok(false);
    }
    if let Some(attempt) = attempt {
        insert_attempt(conn, &lease.key, attempt).await?;
    }
    Ok(true)
}

#[async_trait]
impl DeliveryStore for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        // The write lock serialises concurrent runs, across processes too.
        let (_writing, mut tx) = self.begin_write().await?;
        tx.execute(VERSIONS_TABLE_SQL).await.map_err(self.error())?;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM pushwire_schema_migrations")
                .fetch_all(&mut *tx)
                .await
                .map_err(self.error())?;
        for migration in migrations::pending(migrations::SQLITE, &applied) {
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
        let excluded = serde_json::Value::from(
            request
                .exclude
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
        .to_string();
        let (_writing, mut tx) = self.begin_write().await?;
        let candidates = sqlx::query(CLAIM_CANDIDATES)
            .bind(now)
            .bind(i64::from(request.limit))
            .bind(excluded)
            .bind(i64::from(request.per_integration_limit()))
            .fetch_all(&mut *tx)
            .await
            .map_err(self.error())?;
        let mut claimed = Vec::with_capacity(candidates.len());
        for candidate in &candidates {
            let account: String = candidate.try_get("account").map_err(self.error())?;
            let integration: String = candidate.try_get("integration").map_err(self.error())?;
            let participation: String = candidate
                .try_get("participation_id")
                .map_err(self.error())?;
            sqlx::query(CLAIM_ONE)
                .bind(&account)
                .bind(&integration)
                .bind(&participation)
                .bind(&request.worker)
                .bind(expires)
                .execute(&mut *tx)
                .await
                .map_err(self.error())?;
            let row = sqlx::query(CLAIMED_ROW)
                .bind(&account)
                .bind(&integration)
                .bind(&participation)
                .fetch_one(&mut *tx)
                .await
                .map_err(self.error())?;
            let expired: bool = candidate.try_get("expired").map_err(self.error())?;
            let mut delivery = claimed_from_row(&row, &request.worker, expires)?;
            delivery.lease_expired = expired;
            claimed.push(delivery);
        }
        tx.commit().await.map_err(self.error())?;
        claimed.sort_by_key(|d| d.next_attempt);
        Ok(claimed)
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
        let (_writing, mut tx) = self.begin_write().await?;
        for index in apply {
            if finish_one(&mut tx, &batch[index], to_ms(now))
                .await
                .map_err(self.error())?
            {
                results[index] = FinishResult::Applied;
            }
        }
        tx.commit().await.map_err(self.error())?;
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
            let (_writing, mut tx) = self.begin_write().await?;
            let done = sqlx::query(sql::SKIP_INTEGRATION)
                .bind(integration.account().id())
                .bind(integration.id())
                .bind(reason)
                .bind(to_ms(now))
                .bind(SKIP_BATCH)
                .execute(&mut *tx)
                .await
                .map_err(self.error())?
                .rows_affected();
            tx.commit().await.map_err(self.error())?;
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
            let (_writing, mut tx) = self.begin_write().await?;
            let attempts = sqlx::query(PURGE_ATTEMPTS)
                .bind(before)
                .bind(batch)
                .execute(&mut *tx)
                .await
                .map_err(self.error())?
                .rows_affected();
            let deliveries = sqlx::query(PURGE_DELIVERIES)
                .bind(before)
                .bind(batch)
                .execute(&mut *tx)
                .await
                .map_err(self.error())?
                .rows_affected();
            tx.commit().await.map_err(self.error())?;
            stats.attempts += attempts;
            stats.deliveries += deliveries;
            if deliveries < batch.unsigned_abs() {
                break;
            }
        }
        loop {
            let (_writing, mut tx) = self.begin_write().await?;
            let bodies = sqlx::query(sql::PURGE_BODIES)
                .bind(before)
                .bind(batch)
                .execute(&mut *tx)
                .await
                .map_err(self.error())?
                .rows_affected();
            tx.commit().await.map_err(self.error())?;
            stats.bodies += bodies;
            if bodies < batch.unsigned_abs() {
                return Ok(stats);
            }
        }
    }

    async fn get(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        let account = key.integration.account().id();
        let mut conn = self.pool.acquire().await.map_err(self.error())?;
        let Some(row) = sqlx::query(sql::GET)
            .bind(account)
            .bind(key.integration.id())
            .bind(&key.participation_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(self.error())?
        else {
            return Ok(None);
        };
        let attempts = sqlx::query(sql::GET_ATTEMPTS)
            .bind(account)
            .bind(key.integration.id())
            .bind(&key.participation_id)
            .fetch_all(&mut *conn)
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
        let (_writing, mut tx) = self.begin_write().await?;
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

/// Runs one migration and records it, inside the caller's transaction.
async fn apply_migration(
    conn: &mut SqliteConnection,
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
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    let mut query = sqlx::query(&statement.sql);
    for param in &statement.params {
        query = match param {
            Param::Text(text) => query.bind(text.as_str()),
            Param::Int(int) => query.bind(*int),
        };
    }
    query
}
