//! Hand-offs per second into the delivery store: starts a throw-away PostgreSQL cluster with
//! production durability (every commit flushed) or an SQLite file, and hands off batches of
//! queued deliveries from several concurrent writers, as workers do; then claims and finishes
//! them all, and with `--dead-endpoint N` times claims for a healthy integration while N
//! deliveries of a dead one are due.
//!
//! With `--log`, measures the delivery log instead: records `--deliveries` final outcomes
//! (spread over 7 days, `--log-accounts` accounts, `--fan-out` integrations each, 1,000
//! campaigns), then times ListDeliveries' query of one integration (first pages, filtered by
//! state, and deep pages by token) and GetDeliveryStats' by campaign (an account, 7 days).
//!
//! `cargo run --release -p pushwire-tests --bin delivery-store-bench -- --deliveries 100000`
//! `cargo run --release -p pushwire-tests --bin delivery-store-bench -- --log --fast --deliveries 1000000`

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use pushwire_common::delivery_store::{
    self, Attempt, ClaimRequest, DeliveryKey, DeliveryStore, Finish, FinishResult, NewDelivery,
    OpenOptions, Outcome, StoreUrl, TraceContext,
};
use pushwire_common::delivery_store::{
    DeliveryFilter, DeliveryParent, DeliveryState, ListRequest, StatsRequest,
};
use pushwire_common::domain::{AccountName, IntegrationName};
use pushwire_tests::postgres::{Durability, PostgresServer};

#[derive(Debug, Parser)]
struct Args {
    /// Deliveries handed off in all.
    #[arg(long, default_value_t = 100_000)]
    deliveries: usize,
    /// Deliveries per hand-off (one transaction).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Integrations per participation (deliveries sharing one body).
    #[arg(long, default_value_t = 2)]
    fan_out: usize,
    /// Bytes of each participation body.
    #[arg(long, default_value_t = 2048)]
    body_bytes: usize,
    /// Deliveries due for one dead integration while another's claim is timed (0: skip).
    #[arg(long, default_value_t = 0)]
    dead_endpoint: usize,
    /// Measure the embedded SQLite store instead of PostgreSQL.
    #[arg(long)]
    sqlite: bool,
    /// PostgreSQL with fsync and synchronous commit off (not what production runs).
    #[arg(long)]
    fast: bool,
    /// Measure the delivery log's queries (list, stats) instead of hand-offs and claims.
    #[arg(long)]
    log: bool,
    /// Accounts the deliveries of `--log` are spread over.
    #[arg(long, default_value_t = 10)]
    log_accounts: usize,
    /// Queries timed per measure of `--log`.
    #[arg(long, default_value_t = 200)]
    log_queries: usize,
    /// Print PostgreSQL's plan of an account's stats by campaign (`--log` only).
    #[arg(long)]
    log_explain: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch > 0 && args.writers > 0 && args.fan_out > 0);
    let dir = tempfile::tempdir()?;
    let (_server, url) = if args.sqlite {
        let url = StoreUrl::sqlite(dir.path().join("deliveries.db"));
        (None, url)
    } else {
        let durability = if args.fast {
            Durability::Fast
        } else {
            Durability::Durable
        };
        let server =
            tokio::task::spawn_blocking(move || PostgresServer::start_with(durability)).await??;
        let url = StoreUrl::parse(&server.create_database("bench")?)?;
        (Some(server), url)
    };
    let options = OpenOptions {
        max_connections: u32::try_from(args.writers)?.max(1),
        ..OpenOptions::default()
    };
    let store = delivery_store::open(&url, &options)
        .await
        .context("opening the store")?;

    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    if args.log {
        return log_bench(store, _server.as_ref(), &args, &body).await;
    }
    let batches: Vec<Vec<NewDelivery>> = (0..args.deliveries)
        .map(|i| delivery(i, args.fan_out, &body))
        .collect::<Vec<_>>()
        .chunks(args.batch)
        .map(<[NewDelivery]>::to_vec)
        .collect();
    let batches = Arc::new(std::sync::Mutex::new(batches));

    let started = Instant::now();
    let writers: Vec<_> = (0..args.writers)
        .map(|_| tokio::spawn(writer(Arc::clone(&store), Arc::clone(&batches))))
        .collect();
    let mut latencies = Vec::new();
    for writer in writers {
        latencies.extend(writer.await??);
    }
    let elapsed = started.elapsed();
    let queued = store.count_queued().await?;
    anyhow::ensure!(
        usize::try_from(queued)? == args.deliveries,
        "{queued} queued, {} handed off",
        args.deliveries
    );

    println!(
        "store: {}{}",
        if args.sqlite { "sqlite" } else { "postgres" },
        if !args.sqlite && args.fast {
            " (fsync off)"
        } else {
            " (durable commits)"
        }
    );
    println!(
        "{} deliveries in batches of {}, {} writers, {} per participation, {} B bodies",
        args.deliveries, args.batch, args.writers, args.fan_out, args.body_bytes
    );
    println!(
        "hand-offs: {:.0}/s ({:.2} s); batch latency p50 {:?}, p99 {:?}",
        args.deliveries as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99)
    );

    // Every worker claims and finishes until nothing is due.
    let due = SystemTime::now() + Duration::from_secs(10);
    let started = Instant::now();
    let claimers: Vec<_> = (0..args.writers)
        .map(|w| tokio::spawn(claimer(Arc::clone(&store), format!("bench-{w}"), due)))
        .collect();
    let mut finished = 0;
    let mut latencies = Vec::new();
    for claimer in claimers {
        let (count, claim_latencies) = claimer.await??;
        finished += count;
        latencies.extend(claim_latencies);
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(finished == args.deliveries, "{finished} finished");
    let finish_mean = Duration::from_nanos(
        FINISH_NANOS.load(std::sync::atomic::Ordering::Relaxed)
            / FINISH_BATCHES
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1),
    );
    anyhow::ensure!(store.count_queued().await? == 0);
    println!(
        "claimed and finished: {:.0}/s ({:.2} s, claims of up to {CLAIM_LIMIT}); claim latency p50 {:?}, p99 {:?}; finish of a claim (one transaction) mean {finish_mean:?}",
        finished as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99)
    );

    if args.dead_endpoint > 0 {
        dead_endpoint(store.as_ref(), args.dead_endpoint, &body).await?;
    }
    Ok(())
}

/// Time spent in `finish_batch` and its calls, all claimers together.
static FINISH_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static FINISH_BATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Claims at most this many deliveries at once.
const CLAIM_LIMIT: u32 = 100;
const LEASE: Duration = Duration::from_secs(60);
/// Per-integration cap of a claim: the default lane concurrency.
const LANE: u32 = 32;

async fn claimer(
    store: Arc<dyn DeliveryStore>,
    worker: String,
    now: SystemTime,
) -> anyhow::Result<(usize, Vec<Duration>)> {
    let mut finished = 0;
    let mut batches = 0u64;
    let mut latencies = Vec::new();
    loop {
        let started = Instant::now();
        let claimed = store
            .claim_due(&ClaimRequest {
                worker: worker.clone(),
                lease: LEASE,
                now,
                limit: CLAIM_LIMIT,
                max_per_integration: LANE,
                exclude: vec![],
            })
            .await?;
        latencies.push(started.elapsed());
        if claimed.is_empty() {
            FINISH_BATCHES.fetch_add(batches, std::sync::atomic::Ordering::Relaxed);
            return Ok((finished, latencies));
        }
        let attempt = Attempt {
            time: now,
            status_code: Some(200),
            error_class: None,
            error_message: None,
            duration: Duration::from_millis(15),
        };
        let finishes: Vec<Finish> = claimed
            .into_iter()
            .map(|delivery| Finish {
                lease: delivery.lease,
                attempt: Some(attempt.clone()),
                outcome: Outcome::Delivered,
            })
            .collect();
        let started = Instant::now();
        let results = store.finish_batch(&finishes, now).await?;
        FINISH_NANOS.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        anyhow::ensure!(
            results.iter().all(|r| *r == FinishResult::Applied),
            "lease lost"
        );
        finished += results.len();
        batches += 1;
    }
}

/// `dead` deliveries due for one integration (its breaker open), one for another: how long
/// the healthy integration's claim takes.
async fn dead_endpoint(store: &dyn DeliveryStore, dead: usize, body: &Bytes) -> anyhow::Result<()> {
    let dead_integration = IntegrationName::parse("accounts/1/integrations/dead")?;
    let healthy_integration = IntegrationName::parse("accounts/2/integrations/healthy")?;
    let queued = |integration: &IntegrationName, i: usize| {
        let mut d = delivery(i, 1, body);
        d.key = DeliveryKey::new(integration.clone(), format!("dead-endpoint-{i:09}"));
        d
    };
    let all: Vec<NewDelivery> = (0..dead).map(|i| queued(&dead_integration, i)).collect();
    for batch in all.chunks(1000) {
        store.hand_off(batch, SystemTime::now()).await?;
    }
    store
        .hand_off(&[queued(&healthy_integration, dead)], SystemTime::now())
        .await?;
    let base = SystemTime::now() + Duration::from_secs(10);
    let mut latencies = Vec::new();
    for round in 0..20u32 {
        // A round after the previous lease ran out, so the healthy delivery is due again.
        let now = base + (LEASE + Duration::from_secs(1)) * round;
        let started = Instant::now();
        let claimed = store
            .claim_due(&ClaimRequest {
                worker: "bench".into(),
                lease: LEASE,
                now,
                limit: CLAIM_LIMIT,
                max_per_integration: LANE,
                exclude: vec![dead_integration.clone()],
            })
            .await?;
        latencies.push(started.elapsed());
        anyhow::ensure!(
            claimed.len() == 1 && claimed[0].lease.key.integration == healthy_integration,
            "claimed {} deliveries",
            claimed.len()
        );
    }
    let mut fair = Vec::new();
    for round in 20..40u32 {
        // Without the exclusion (breaker closed again): the healthy delivery is in the claim.
        let now = base + (LEASE + Duration::from_secs(1)) * round;
        let started = Instant::now();
        let claimed = store
            .claim_due(&ClaimRequest {
                worker: "bench".into(),
                lease: LEASE,
                now,
                limit: LANE,
                max_per_integration: LANE,
                exclude: vec![],
            })
            .await?;
        fair.push(started.elapsed());
        anyhow::ensure!(
            claimed
                .iter()
                .any(|c| c.lease.key.integration == healthy_integration),
            "the healthy delivery was not claimed"
        );
    }
    println!(
        "{dead} due for a dead integration: another's claim with the dead one excluded p50 {:?}, \
         p99 {:?}; not excluded (limit {LANE}) p50 {:?}, p99 {:?}",
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
        percentile(&mut fair, 0.5),
        percentile(&mut fair, 0.99)
    );
    Ok(())
}

fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    latencies.sort();
    let index = ((latencies.len().saturating_sub(1)) as f64 * p).round() as usize;
    latencies.get(index).copied().unwrap_or_default()
}

async fn writer(
    store: Arc<dyn DeliveryStore>,
    batches: Arc<std::sync::Mutex<Vec<Vec<NewDelivery>>>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    loop {
        let Some(batch) = batches
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .pop()
        else {
            return Ok(latencies);
        };
        let started = Instant::now();
        store.hand_off(&batch, SystemTime::now()).await?;
        latencies.push(started.elapsed());
    }
}

/// Delivery `i`: participation `i / fan_out` to integration `i % fan_out` of one of 100
/// accounts, after a failed first attempt.
fn delivery(i: usize, fan_out: usize, body: &Bytes) -> NewDelivery {
    let participation = i / fan_out;
    let account = participation % 100;
    let integration = IntegrationName::parse(&format!(
        "accounts/{account}/integrations/crm-{}",
        i % fan_out
    ))
    .expect("valid name");
    let now = SystemTime::now();
    NewDelivery {
        key: DeliveryKey::new(integration, format!("participation-{participation:09}")),
        campaign_id: format!("{}", participation % 1000),
        website_id: Some("42".into()),
        trace: Some(TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: String::new(),
        }),
        outcome: Outcome::Queued {
            next_attempt: now + Duration::from_secs(5),
        },
        attempts: vec![Attempt {
            time: now,
            status_code: Some(503),
            error_class: Some("status".into()),
            error_message: Some("503 Service Unavailable".into()),
            duration: Duration::from_millis(20),
        }],
        body: Some(body.clone()),
    }
}

/// The delivery log's measures: load `args.deliveries` final outcomes, then time the list and
/// stats queries.
async fn log_bench(
    store: Arc<dyn DeliveryStore>,
    server: Option<&PostgresServer>,
    args: &Args,
    body: &Bytes,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.log_accounts > 0 && args.log_queries > 0);
    let week = Duration::from_secs(7 * 24 * 3600);
    let end = SystemTime::now();
    let start = end - week;
    let total = args.deliveries;
    let loaded = Instant::now();
    let batches: Vec<Vec<NewDelivery>> = (0..total)
        .map(|i| {
            let participation = i / args.fan_out;
            let account = participation % args.log_accounts;
            let integration = IntegrationName::parse(&format!(
                "accounts/{account}/integrations/crm-{}",
                i % args.fan_out
            ))
            .expect("valid name");
            // Spread evenly over the week, in order of i.
            let at = start + week.mul_f64(i as f64 / total as f64);
            let outcome = match i % 20 {
                0 => Outcome::Failed,
                1 => Outcome::Skipped {
                    reason: "participation state is STARTED; completed only".into(),
                },
                _ => Outcome::Delivered,
            };
            NewDelivery {
                key: DeliveryKey::new(integration, format!("participation-{participation:09}")),
                campaign_id: format!("{}", participation % 1000),
                website_id: Some("42".into()),
                trace: None,
                outcome,
                attempts: vec![Attempt {
                    time: at,
                    status_code: Some(200),
                    error_class: None,
                    error_message: None,
                    duration: Duration::from_millis(20),
                }],
                body: Some(body.clone()),
            }
        })
        .collect::<Vec<_>>()
        .chunks(args.batch)
        .map(<[NewDelivery]>::to_vec)
        .collect();
    // Recorded at their own time: the batches are in time order.
    let batches = Arc::new(std::sync::Mutex::new(batches));
    let writers: Vec<_> = (0..args.writers)
        .map(|_| {
            let store = Arc::clone(&store);
            let batches = Arc::clone(&batches);
            tokio::spawn(async move {
                loop {
                    let Some(batch) = batches
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .pop()
                    else {
                        return anyhow::Ok(());
                    };
                    let at = batch[0].attempts[0].time;
                    store.record_outcomes(&batch, at).await?;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let held = store.count_stored().await?;
    println!(
        "delivery log: {held} deliveries over 7 days, {} accounts x {} integrations, 1000 campaigns (loaded in {:.0} s)",
        args.log_accounts,
        args.fan_out,
        loaded.elapsed().as_secs_f64()
    );

    if let Some(server) = server {
        // What autovacuum does to a table after many inserts: statistics for the planner, and
        // the visibility map that lets the stats be answered from an index alone.
        let vacuumed = Instant::now();
        server.psql("bench", "VACUUM ANALYZE pushwire_deliveries")?;
        println!(
            "VACUUM ANALYZE pushwire_deliveries: {:.1} s",
            vacuumed.elapsed().as_secs_f64()
        );
        if args.log_explain {
            let plan = server.psql(
                "bench",
                &format!(
                    "EXPLAIN (ANALYZE, BUFFERS) SELECT campaign_id, \
                     count(*) FILTER (WHERE state = 'DELIVERED'), \
                     count(*) FILTER (WHERE state = 'SKIPPED' AND skip_reason LIKE 'x%') \
                     FROM pushwire_deliveries WHERE account = '0' AND create_ms >= {} \
                     AND create_ms < {} GROUP BY campaign_id",
                    start.duration_since(SystemTime::UNIX_EPOCH)?.as_millis(),
                    end.duration_since(SystemTime::UNIX_EPOCH)?.as_millis(),
                ),
            )?;
            println!("{plan}");
        }
    }

    let integration =
        DeliveryParent::Integration(IntegrationName::parse("accounts/0/integrations/crm-0")?);
    let measures: [(&str, DeliveryFilter, usize); 3] = [
        ("first page of 50", DeliveryFilter::default(), 0),
        (
            "first page of 50, state = FAILED",
            DeliveryFilter {
                state: Some(DeliveryState::Failed),
                ..DeliveryFilter::default()
            },
            0,
        ),
        ("page 20 of 50 (by token)", DeliveryFilter::default(), 19),
    ];
    for (what, filter, skip_pages) in measures {
        let mut latencies = Vec::new();
        let mut after = None;
        for _ in 0..skip_pages {
            let page = store
                .list(&ListRequest {
                    parent: integration.clone(),
                    filter: filter.clone(),
                    page_size: 50,
                    after,
                })
                .await?;
            after = page.next;
        }
        for _ in 0..args.log_queries {
            let started = Instant::now();
            let page = store
                .list(&ListRequest {
                    parent: integration.clone(),
                    filter: filter.clone(),
                    page_size: 50,
                    after: after.clone(),
                })
                .await?;
            latencies.push(started.elapsed());
            anyhow::ensure!(
                page.deliveries.len() == 50,
                "{} listed",
                page.deliveries.len()
            );
        }
        println!(
            "ListDeliveries of one integration, {what}: p50 {:?}, p99 {:?}",
            percentile(&mut latencies, 0.5),
            percentile(&mut latencies, 0.99)
        );
    }
    let account = DeliveryParent::Account(AccountName::from_id("0")?);
    for (what, parent, by_day) in [
        ("an account (7 days) by campaign", account.clone(), false),
        ("an account (7 days) by campaign and day", account, true),
        ("one integration (7 days) by campaign", integration, false),
    ] {
        let mut latencies = Vec::new();
        for _ in 0..args.log_queries {
            let started = Instant::now();
            let rows = store
                .stats(&StatsRequest {
                    parent: parent.clone(),
                    start,
                    end: end + Duration::from_secs(1),
                    by_campaign: true,
                    by_day,
                })
                .await?;
            latencies.push(started.elapsed());
            anyhow::ensure!(!rows.is_empty());
        }
        println!(
            "GetDeliveryStats of {what}: p50 {:?}, p99 {:?}",
            percentile(&mut latencies, 0.5),
            percentile(&mut latencies, 0.99)
        );
    }
    Ok(())
}
