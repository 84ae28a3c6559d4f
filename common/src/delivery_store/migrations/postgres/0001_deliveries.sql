-- Deliveries, their attempts and the participation bodies they share (DESIGN §6).
-- Times are unix milliseconds written by the workers (the store never reads its own clock).

-- One row per participation that has a delivery which may still be sent or redelivered.
-- touched_ms is refreshed by every hand-off that needs the body, so a purge that found it
-- unreferenced cannot delete it under a concurrent hand-off.
CREATE TABLE pushwire_delivery_bodies (
    account          TEXT   NOT NULL,
    participation_id TEXT   NOT NULL,
    body             BYTEA  NOT NULL,
    touched_ms       BIGINT NOT NULL,
    PRIMARY KEY (account, participation_id)
);

CREATE TABLE pushwire_deliveries (
    account          TEXT     NOT NULL,
    integration      TEXT     NOT NULL,
    participation_id TEXT     NOT NULL,
    campaign_id      TEXT     NOT NULL,
    website_id       TEXT,
    state            TEXT     NOT NULL
        CHECK (state IN ('QUEUED', 'DELIVERED', 'FAILED', 'SKIPPED')),
    attempt_count    INTEGER  NOT NULL DEFAULT 0,
    last_status_code INTEGER,
    last_error       TEXT,
    skip_reason      TEXT,
    -- Set while QUEUED.
    next_attempt_ms  BIGINT,
    -- The current claim: who holds it and until when; lease_token grows with every claim and
    -- every write that takes the delivery away from a claim, so a stale holder cannot finish it.
    lease_owner      TEXT,
    lease_token      BIGINT   NOT NULL DEFAULT 0,
    lease_expires_ms BIGINT,
    traceparent      TEXT,
    tracestate       TEXT,
    create_ms        BIGINT   NOT NULL,
    -- When the state last changed: for a final state, the time of the final outcome.
    update_ms        BIGINT   NOT NULL,
    PRIMARY KEY (account, integration, participation_id)
);

-- Claims: the queued rows of one integration, due first; also walked integration by
-- integration (a skip scan) for fairness, counted for the queue gauge, and used to skip all of
-- a deleted integration's queued deliveries.
CREATE INDEX pushwire_deliveries_queued
    ON pushwire_deliveries (account, integration, next_attempt_ms)
    WHERE state = 'QUEUED';

-- Delivery log: an account's deliveries newest first (keyset paging), and stats by day.
CREATE INDEX pushwire_deliveries_account_newest
    ON pushwire_deliveries (account, create_ms DESC, integration, participation_id);

-- Delivery log: one integration's deliveries newest first; redelivery and stats of one
-- integration over a time range.
CREATE INDEX pushwire_deliveries_integration_newest
    ON pushwire_deliveries (account, integration, create_ms DESC, participation_id);

-- Filter and stats by campaign over a time range (grouped by campaign and day).
CREATE INDEX pushwire_deliveries_campaign
    ON pushwire_deliveries (account, campaign_id, create_ms);

-- Filter by participation id, and whether a body is still referenced.
CREATE INDEX pushwire_deliveries_participation
    ON pushwire_deliveries (account, participation_id);

-- Retention: final outcomes oldest first.
CREATE INDEX pushwire_deliveries_finished
    ON pushwire_deliveries (update_ms)
    WHERE state <> 'QUEUED';

CREATE TABLE pushwire_delivery_attempts (
    id               BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account          TEXT     NOT NULL,
    integration      TEXT     NOT NULL,
    participation_id TEXT     NOT NULL,
    attempt_ms       BIGINT   NOT NULL,
    status_code      INTEGER,
    error_class      TEXT,
    error_message    TEXT,
    duration_ms      BIGINT   NOT NULL
);

CREATE INDEX pushwire_delivery_attempts_delivery
    ON pushwire_delivery_attempts (account, integration, participation_id, attempt_ms);
