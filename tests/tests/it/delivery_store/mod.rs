//! The delivery store's conformance suite: every case runs against a real PostgreSQL (a
//! throw-away cluster per test) and an embedded SQLite file. Times are passed to the store
//! explicitly, so leases and retention are tested without waiting.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pushwire_common::delivery_store::{
    self, Attempt, ClaimRequest, ClaimedDelivery, DeliveryFilter, DeliveryKey, DeliveryParent,
    DeliveryState, DeliveryStore, Finish, FinishResult, INCOMPLETE_SKIP_PREFIX, ListRequest,
    NewDelivery, OpenOptions, Outcome, StatsRequest, StatsRow, StoreError, StoreUrl, TraceContext,
};
use pushwire_common::domain::AccountName;
use pushwire_common::domain::IntegrationName;
use pushwire_tests::postgres::PostgresServer;

/// A fixed "now" far from the epoch, so "an hour before" stays positive.
const T0_MS: u64 = 1_800_000_000_000;
const LEASE: Duration = Duration::from_secs(30);

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(T0_MS)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn integration(account: &str, id: &str) -> IntegrationName {
    IntegrationName::parse(&format!("accounts/{account}/integrations/{id}")).unwrap()
}

fn key(account: &str, id: &str, participation: &str) -> DeliveryKey {
    DeliveryKey::new(integration(account, id), participation)
}

fn body_of(participation: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{participation}","campaign":{{"id":7}}}}"#
    ))
}

fn failed_attempt(at: SystemTime) -> Attempt {
    Attempt {
        time: at,
        status_code: Some(503),
        error_class: Some("status".into()),
        error_message: Some("503 Service Unavailable".into()),
        duration: Duration::from_millis(12),
    }
}

/// A delivery handed off after a failed first attempt, due at `due`.
fn queued(key: DeliveryKey, due: SystemTime) -> NewDelivery {
    let participation = key.participation_id.clone();
    NewDelivery {
        key,
        campaign_id: "7".into(),
        website_id: Some("3".into()),
        trace: Some(TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "vendor=1".into(),
        }),
        outcome: Outcome::Queued { next_attempt: due },
        attempts: vec![failed_attempt(due - secs(5))],
        body: Some(body_of(&participation)),
    }
}

fn claim(worker: &str, now: SystemTime, limit: u32) -> ClaimRequest {
    ClaimRequest {
        worker: worker.into(),
        lease: LEASE,
        now,
        limit,
        max_per_integration: 0,
        exclude: vec![],
    }
}

fn keys(claimed: &[ClaimedDelivery]) -> Vec<DeliveryKey> {
    let mut keys: Vec<_> = claimed.iter().map(|c| c.lease.key.clone()).collect();
    keys.sort();
    keys
}

/// One backend under test: the database (kept alive for the test) and a way to open stores.
struct Backend {
    url: String,
    _postgres: Option<PostgresServer>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    async fn postgres() -> Self {
        let server = tokio::task::spawn_blocking(PostgresServer::start)
            .await
            .unwrap()
            .expect("starting PostgreSQL");
        let url = server.create_database("deliveries").unwrap();
        Self {
            url,
            _postgres: Some(server),
            _dir: None,
        }
    }

    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("deliveries.db").display());
        Self {
            url,
            _postgres: None,
            _dir: Some(dir),
        }
    }

    async fn open(&self) -> Arc<dyn DeliveryStore> {
        delivery_store::open(
            &StoreUrl::parse(&self.url).unwrap(),
            &OpenOptions::default(),
        )
        .await
        .expect("opening the delivery store")
    }
}

/// Runs each case against PostgreSQL and SQLite.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Backend::postgres().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Backend::sqlite()).await;
                }
            )*
        }
    };
}

conformance!(
    migrations_run_twice_and_concurrently,
    hand_off_then_claim,
    lease_expiry_returns_claims,
    lease_guard_refuses_a_stale_finish,
    finish_batch_applies_each_finish_whose_lease_holds,
    rescheduled_delivery_is_claimed_again_when_due,
    claims_are_fair_across_integrations,
    no_backlog_starves_another_integration,
    concurrent_claims_never_overlap,
    excluded_integrations_are_not_claimed,
    skip_integration_ends_its_pending_deliveries,
    final_outcomes_are_recorded_and_override_claims,
    purge_removes_old_rows_and_orphaned_bodies_only,
    list_pages_newest_first_without_duplicates_or_gaps_while_rows_arrive,
    list_filters_by_each_field,
    stats_count_what_was_written_by_campaign_and_day,
    redeliver_requeues_retained_deliveries_with_the_same_key,
);

mod log;
mod postgres_only;
mod queue;

use log::*;
use queue::*;
