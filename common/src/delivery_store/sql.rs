//! SQL both databases understand alike (PostgreSQL and SQLite 3.35+: row values, `RETURNING`,
//! upserts, table aliases, `$N` parameters). What differs lives in each implementation.

/// The conflict clause of the delivery upsert (the table is aliased `d`): a final outcome
/// overrides what is stored and takes the delivery from any claim; a queued delivery handed off
/// again keeps its schedule and claim; attempts add up either way.
macro_rules! upsert_deliveries_on_conflict {
    () => {
        "
ON CONFLICT (account, integration, participation_id) DO UPDATE SET
    state = EXCLUDED.state,
    attempt_count = d.attempt_count + EXCLUDED.attempt_count,
    last_status_code = CASE WHEN EXCLUDED.attempt_count > 0
        THEN EXCLUDED.last_status_code ELSE d.last_status_code END,
    last_error = CASE WHEN EXCLUDED.attempt_count > 0
        THEN EXCLUDED.last_error ELSE d.last_error END,
    skip_reason = EXCLUDED.skip_reason,
    next_attempt_ms = CASE WHEN d.state = 'QUEUED' AND EXCLUDED.state = 'QUEUED'
        THEN d.next_attempt_ms ELSE EXCLUDED.next_attempt_ms END,
    lease_owner = CASE WHEN d.state = 'QUEUED' AND EXCLUDED.state = 'QUEUED'
        THEN d.lease_owner END,
    lease_expires_ms = CASE WHEN d.state = 'QUEUED' AND EXCLUDED.state = 'QUEUED'
        THEN d.lease_expires_ms END,
    lease_token = CASE WHEN d.state = 'QUEUED' AND EXCLUDED.state = 'QUEUED'
        THEN d.lease_token ELSE d.lease_token + 1 END,
    traceparent = COALESCE(EXCLUDED.traceparent, d.traceparent),
    tracestate = COALESCE(EXCLUDED.tracestate, d.tracestate),
    update_ms = CASE WHEN d.state = 'QUEUED' AND EXCLUDED.state = 'QUEUED'
        THEN d.update_ms ELSE EXCLUDED.update_ms END"
    };
}
pub(super) use upsert_deliveries_on_conflict;

/// Ends up to `$5` queued deliveries of one integration as `SKIPPED`.
pub(super) const SKIP_INTEGRATION: &str = "
UPDATE pushwire_deliveries AS d SET
    state = 'SKIPPED', skip_reason = $3, next_attempt_ms = NULL, lease_owner = NULL,
    lease_expires_ms = NULL, lease_token = d.lease_token + 1, update_ms = $4
WHERE (d.account, d.integration, d.participation_id) IN (
    SELECT account, integration, participation_id FROM pushwire_deliveries
    WHERE account = $1 AND integration = $2 AND state = 'QUEUED' LIMIT $5)
  AND d.state = 'QUEUED'";

/// Bodies no delivery references, not touched by a hand-off since `before`.
pub(super) const PURGE_BODIES: &str = "
DELETE FROM pushwire_delivery_bodies AS b
WHERE (b.account, b.participation_id) IN (
    SELECT o.account, o.participation_id FROM pushwire_delivery_bodies o
    WHERE o.touched_ms < $1 AND NOT EXISTS (
        SELECT 1 FROM pushwire_deliveries d
        WHERE d.account = o.account AND d.participation_id = o.participation_id)
    LIMIT $2)
  AND b.touched_ms < $1";

pub(super) const GET: &str = "
SELECT d.*, EXISTS (
    SELECT 1 FROM pushwire_delivery_bodies b
    WHERE b.account = d.account AND b.participation_id = d.participation_id) AS body_retained
FROM pushwire_deliveries d
WHERE d.account = $1 AND d.integration = $2 AND d.participation_id = $3";

pub(super) const GET_ATTEMPTS: &str = "
SELECT attempt_ms, status_code, error_class, error_message, duration_ms
FROM pushwire_delivery_attempts
WHERE account = $1 AND integration = $2 AND participation_id = $3
ORDER BY attempt_ms, id";
