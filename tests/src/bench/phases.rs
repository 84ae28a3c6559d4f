//! The measurements. Each starts its own receivers and a fresh `worker` process against the
//! shared control plane (configuration in an account of its own), drives load, measures, and
//! stops everything it started before returning.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use pushwire_common::delivery_store::{
    self, Attempt, DeliveryKey, NewDelivery, OpenOptions, Outcome, StoreUrl,
};
use pushwire_common::domain::IntegrationName;
use pushwire_common::pb::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::endpoint;
use crate::load::{self, PubStats};
use crate::procs::{self, HttpConn, Proc};
use crate::setup::{Env, auth_header_change};

/// Throughput of one run.
#[derive(Clone, Debug, Default)]
pub struct Rate {
    /// Requests (deliveries) the receiver answered per second.
    pub per_sec: f64,
    /// Participations acknowledged per second (Pushwire runs).
    pub acked_per_sec: f64,
    /// CPU the worker used, in cores (Pushwire runs).
    pub worker_cores: f64,
    /// CPU the benchmark process (publisher or client, and receiver) used, in cores.
    pub bench_cores: f64,
    /// Deliveries not `DELIVERED`, and the first of them.
    pub failures: u64,
    /// The first problem seen.
    pub problem: Option<String>,
    /// Length of the measurement, seconds.
    pub measured_secs: f64,
}

/// Latency at a fixed offered rate.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    /// Offered rate.
    pub offered: f64,
    /// Rate actually sent.
    pub achieved: f64,
    /// Longest a send was late on its schedule.
    pub max_lag_ms: f64,
    /// Publish → delivered (received by the receiver), microseconds, sorted.
    pub delivered_us: Vec<u32>,
    /// Publish → acknowledged (response on the stream), microseconds, sorted.
    pub acked_us: Vec<u32>,
    /// Worker CPU in cores.
    pub worker_cores: f64,
    /// The first problem seen.
    pub problem: Option<String>,
}

/// Config propagation times, milliseconds, sorted.
#[derive(Clone, Debug, Default)]
pub struct Propagation {
    /// One per change.
    pub ms: Vec<f64>,
}

/// Isolation runs.
#[derive(Clone, Debug, Default)]
pub struct Isolation {
    /// Healthy integrations' deliveries/s without blackholed traffic (mean of the runs).
    pub alone: f64,
    /// Each run without blackholed traffic.
    pub alone_runs: Vec<f64>,
    /// The same with a blackholed integration getting traffic on its own stream.
    pub with_blackhole: f64,
    /// The same with the blackholed integration's traffic on the same streams.
    pub shared_streams: f64,
    /// Connections the blackhole accepted in the blackholed runs.
    pub blackhole_connections: u64,
}

/// The memory run.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// Participations waiting.
    pub waiting: u64,
    /// Worker RSS when ready and idle, KiB.
    pub idle_kib: u64,
    /// Worker RSS with every participation waiting, KiB.
    pub rss_kib: u64,
    /// Peak RSS, KiB.
    pub hwm_kib: u64,
    /// Time to get every participation accepted.
    pub accept_secs: f64,
}

/// CPU time of this process (publisher, client, receivers).
fn self_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// After `warmup`, how fast `count` grows over `length`; and the CPU (in cores) used by
/// `worker` and by this process meanwhile.
async fn measure(
    count: impl Fn() -> u64,
    acked: impl Fn() -> u64,
    worker: Option<&Proc>,
    warmup: Duration,
    length: Duration,
) -> Rate {
    tokio::time::sleep(warmup).await;
    let (c0, a0, t0) = (count(), acked(), Instant::now());
    let w0 = worker.and_then(Proc::cpu_time);
    let s0 = self_cpu();
    tokio::time::sleep(length).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let (c1, a1) = (count(), acked());
    let w1 = worker.and_then(Proc::cpu_time);
    let s1 = self_cpu();
    Rate {
        per_sec: (c1 - c0) as f64 / elapsed,
        acked_per_sec: (a1 - a0) as f64 / elapsed,
        worker_cores: match (w0, w1) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() / elapsed,
            _ => 0.0,
        },
        bench_cores: (s1 - s0).as_secs_f64() / elapsed,
        failures: 0,
        problem: None,
        measured_secs: elapsed,
    }
}

/// Baseline: the plain client POSTing to the receiver.
pub async fn baseline(env: &Env) -> anyhow::Result<Rate> {
    let rx = endpoint::start_ok(&env.rx, env.epoch)?;
    let load = load::baseline(rx.addr, env.plan.conns, env.bodies.clone()).await?;
    let count = || rx.stats.count();
    let rate = measure(count, count, None, env.plan.warmup, env.plan.measure).await;
    load.stop();
    Ok(rate)
}

/// Publish → worker → receiver, one integration per participation, closed loop.
pub async fn throughput(env: &Env) -> anyhow::Result<Rate> {
    throughput_with(env, "throughput", "accounts/910001", &[]).await
}

/// As [`throughput`], with the worker's delivery log of first attempts off
/// (`--delivery-log false`): what recording every outcome costs.
pub async fn throughput_no_log(env: &Env) -> anyhow::Result<Rate> {
    throughput_with(
        env,
        "throughput-no-log",
        "accounts/910002",
        &["--delivery-log", "false"],
    )
    .await
}

async fn throughput_with(
    env: &Env,
    name: &str,
    account: &str,
    flags: &[&str],
) -> anyhow::Result<Rate> {
    let rx = endpoint::start_ok(&env.rx, env.epoch)?;
    let (_, rev) = env.routed(account, name, &rx.url("/throughput")).await?;
    let worker = env.worker(name, flags, rev).await?;
    let (stats, load) = env.warm_closed_loop(&worker, account).await?;
    let perf = env.perf(&worker, name, env.plan.measure);
    let mut rate = measure(
        || rx.stats.count(),
        || stats.acked.load(Ordering::Relaxed),
        Some(&worker.proc),
        Duration::ZERO,
        env.plan.measure,
    )
    .await;
    load.stop();
    finish_perf(perf).await;
    rate.failures = stats.not_delivered.load(Ordering::Relaxed);
    rate.problem = stats.problem();
    Ok(rate)
}

async fn finish_perf(perf: Option<Proc>) {
    if let Some(p) = perf {
        // perf writes its file when its `sleep` ends; give it that time.
        let deadline = Instant::now() + Duration::from_secs(15);
        while procs::running(p.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Fixed offered rate: publish → delivered and publish → acknowledged latencies.
pub async fn latency(env: &Env) -> anyhow::Result<Latency> {
    let rx = endpoint::start_ok(&env.rx, env.epoch)?;
    let account = "accounts/910002";
    let (_, rev) = env.routed(account, "latency", &rx.url("/latency")).await?;
    let worker = env.worker("latency", &[], rev).await?;
    let stats = Arc::new(PubStats::default());
    let target = env.target(&worker);
    let streams = load::paced_streams(&target, 2, stats.clone()).await?;
    let stop = CancellationToken::new();
    let rate = env.plan.rate;
    // Warm-up at the same rate, not recorded.
    load::pace(
        &streams,
        account,
        rate,
        env.plan.warmup,
        &env.bodies,
        &stats,
        &stop,
    )
    .await?;
    rx.stats.take_latencies();
    stats.take_latencies();
    rx.stats.record(true);
    stats.record(true);
    let cpu0 = worker.proc.cpu_time();
    let paced = load::pace(
        &streams,
        account,
        rate,
        env.plan.latency,
        &env.bodies,
        &stats,
        &stop,
    )
    .await?;
    let cpu1 = worker.proc.cpu_time();
    // The last ones are acknowledged within milliseconds; bounded anyway.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.acked.load(Ordering::Relaxed) < stats.sent.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rx.stats.record(false);
    stats.record(false);
    let mut delivered_us = rx.stats.take_latencies();
    let mut acked_us = stats.take_latencies();
    delivered_us.sort_unstable();
    acked_us.sort_unstable();
    let unacked = stats.sent.load(Ordering::Relaxed) - stats.acked.load(Ordering::Relaxed);
    let failures = stats.not_delivered.load(Ordering::Relaxed);
    let problem = match (unacked, failures) {
        (0, 0) => None,
        _ => Some(format!(
            "{unacked} not acknowledged, {failures} not delivered; first problem: {}",
            stats.problem().unwrap_or_default()
        )),
    };
    Ok(Latency {
        offered: rate,
        achieved: paced.sent as f64 / paced.elapsed.as_secs_f64(),
        max_lag_ms: paced.max_lag.as_secs_f64() * 1e3,
        delivered_us,
        acked_us,
        worker_cores: match (cpu0, cpu1) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() / paced.elapsed.as_secs_f64(),
            _ => 0.0,
        },
        problem,
    })
}

/// One participation to 10 integrations, each with a receiver (`host:port`) of its own,
/// closed loop.
pub async fn fanout(env: &Env) -> anyhow::Result<Rate> {
    let receivers = endpoint::start_ok_many(&env.rx, env.epoch, 10)?;
    let (account, name) = ("accounts/910003", "fanout");
    let mut rev = 0;
    for (i, rx) in receivers.iter().enumerate() {
        let id = format!("{name}-{i}");
        rev = env
            .routed(account, &id, &rx.url(&format!("/{id}")))
            .await?
            .1;
    }
    let worker = env.worker(name, &[], rev).await?;
    let (stats, load) = env.warm_closed_loop(&worker, account).await?;
    let perf = env.perf(&worker, name, env.plan.measure);
    // The receivers count together.
    let counter = &receivers[0].stats;
    let mut rate = measure(
        || counter.count(),
        || stats.acked.load(Ordering::Relaxed),
        Some(&worker.proc),
        Duration::ZERO,
        env.plan.measure,
    )
    .await;
    load.stop();
    finish_perf(perf).await;
    rate.failures = stats.not_delivered.load(Ordering::Relaxed);
    rate.problem = stats.problem();
    Ok(rate)
}

/// Time from `UpdateIntegration` returning to the worker's `/readyz` reporting the revision
/// it returned (the routing table that deliveries read is then the new one).
pub async fn propagation(env: &Env) -> anyhow::Result<Propagation> {
    let account = "accounts/910004";
    let (name, rev) = env
        .routed(account, "propagation", "http://127.0.0.1:9/never-called")
        .await?;
    let worker = env.worker("propagation", &[], rev).await?;
    let mut integrations =
        pb::integration_service_client::IntegrationServiceClient::new(env.admin.clone());
    let mut conn = HttpConn::new(worker.http);
    let mut ms = Vec::with_capacity(env.plan.changes);
    for i in 0..env.plan.changes {
        let updated = integrations
            .update_integration(auth_header_change(
                name.clone(),
                format!("Bearer bench-token-{i}"),
            ))
            .await
            .context("UpdateIntegration")?
            .into_inner();
        let returned = Instant::now();
        let revision: i64 = updated.etag.parse().context("etag")?;
        loop {
            let (_, body) = conn.get("/readyz").await?;
            if procs::ready_revision(&body).is_some_and(|r| r >= revision) {
                break;
            }
            anyhow::ensure!(
                returned.elapsed() < Duration::from_secs(5),
                "revision {revision} not applied after 5 s: {body}"
            );
        }
        ms.push(returned.elapsed().as_secs_f64() * 1e3);
        // Spaced out, so each change is timed on its own.
        tokio::time::sleep(Duration::from_millis(10 + (i as u64 * 7) % 20)).await;
    }
    ms.sort_by(f64::total_cmp);
    Ok(Propagation { ms })
}

/// Healthy integrations' throughput alone, with a blackholed integration getting traffic on
/// a stream of its own, and with that traffic mixed into the same streams.
pub async fn isolation(env: &Env) -> anyhow::Result<Isolation> {
    // Each integration has a receiver (host:port) of its own, as different customers do.
    let receivers = endpoint::start_ok_many(&env.rx, env.epoch, 4)?;
    let hole = endpoint::start_blackhole(&env.rx, env.epoch)?;
    let mut accounts = Vec::new();
    let mut rev = 0;
    for (i, rx) in receivers.iter().enumerate() {
        let account = format!("accounts/91001{i}");
        rev = env
            .routed(
                &account,
                &format!("healthy-{i}"),
                &rx.url(&format!("/healthy-{i}")),
            )
            .await?
            .1;
        accounts.push(account);
    }
    // They count together.
    let healthy = &receivers[0];
    let hole_account = "accounts/910019";
    let rev = rev.max(
        env.routed(hole_account, "blackholed", &hole.url("/blackholed"))
            .await?
            .1,
    );
    // A blackholed request times out (and is retried, and opens the breaker) within the run.
    let flags = ["--request-timeout", "2s"];
    let plan = &env.plan;
    let run = |name: &'static str, mixed: bool, paced_hole: bool| {
        let accounts = accounts.clone();
        let hole = &hole;
        async move {
            let holed0 = hole.stats.count();
            let worker = env.worker(name, &flags, rev).await?;
            let target = env.target(&worker);
            let stop = CancellationToken::new();
            let hole_stats = Arc::new(PubStats::default());
            let hole_load = if paced_hole {
                let streams = load::paced_streams(&target, 1, hole_stats.clone()).await?;
                let (stop, bodies, stats) = (stop.clone(), env.bodies.clone(), hole_stats.clone());
                let length = plan.warmup * 2 + plan.isolation;
                Some(tokio::spawn(async move {
                    let _ = load::pace(
                        &streams,
                        hole_account,
                        200.0,
                        length,
                        &bodies,
                        &stats,
                        &stop,
                    )
                    .await;
                    stop.cancelled().await;
                }))
            } else {
                None
            };
            if paced_hole {
                // Let the blackholed integration fill up before measuring the others.
                tokio::time::sleep(plan.warmup).await;
            }
            let mut publish_to = accounts.clone();
            if mixed {
                // One participation in ten for the blackholed account, as in the issue's
                // scenario (nine healthy accounts, a tenth whose endpoint never answers): the
                // closed loop takes the accounts in turn.
                publish_to = (0..9)
                    .map(|i| accounts[i % accounts.len()].clone())
                    .collect();
                publish_to.push(hole_account.into());
            }
            let stats = Arc::new(PubStats::default());
            let load = load::closed_loop(
                &target,
                publish_to,
                plan.streams,
                plan.window,
                stats.clone(),
                None,
            )
            .await?;
            tokio::time::sleep(plan.warmup).await;
            let perf = env.perf(&worker, name, plan.isolation);
            let rate = measure(
                || healthy.stats.count(),
                || stats.acked.load(Ordering::Relaxed),
                Some(&worker.proc),
                Duration::ZERO,
                plan.isolation,
            )
            .await;
            finish_perf(perf).await;
            stop.cancel();
            load.stop();
            if let Some(h) = hole_load {
                h.abort();
            }
            anyhow::Ok((rate.per_sec, hole.stats.count() - holed0))
        }
    };
    let mut out = Isolation::default();
    out.alone_runs
        .push(run("isolation-alone", false, false).await?.0);
    let (with, conns) = run("isolation-blackholed", false, true).await?;
    out.with_blackhole = with;
    out.blackhole_connections = conns;
    if !plan.quick {
        out.alone_runs
            .push(run("isolation-alone-again", false, false).await?.0);
    }
    let (shared, conns) = run("isolation-shared-streams", true, false).await?;
    out.shared_streams = shared;
    out.blackhole_connections += conns;
    out.alone = out.alone_runs.iter().sum::<f64>() / out.alone_runs.len() as f64;
    Ok(out)
}

/// `waiting` participations published while their receiver refuses connections, retries 10
/// minutes away: each first attempt fails (or meets the open breaker), is handed off to the
/// worker's delivery store and acknowledged `QUEUED`; the worker's RSS once all are queued.
pub async fn memory(env: &Env, limit: Duration) -> anyhow::Result<Memory> {
    let account = "accounts/910020";
    let down = procs::free_port()?;
    let (_, rev) = env
        .routed(account, "down", &format!("http://127.0.0.1:{down}/down"))
        .await?;
    let flags = ["--retry-schedule", "10m", "--retry-window", "30m"];
    let worker = env.worker("memory", &flags, rev).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_kib, _) = worker.proc.rss_kib()?;
    let n = env.plan.waiting;
    let stats = Arc::new(PubStats::default());
    let started = Instant::now();
    let load = load::closed_loop(
        &env.target(&worker),
        vec![account.into()],
        env.plan.streams,
        env.plan.window,
        stats.clone(),
        Some(n),
    )
    .await?;
    let deadline = started + limit;
    let accepted_at = loop {
        let acked = stats.acked.load(Ordering::Relaxed);
        if acked >= n {
            break started.elapsed();
        }
        anyhow::ensure!(
            stats.delivered.load(Ordering::Relaxed) == 0,
            "deliveries to a receiver that is down were reported delivered"
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {acked} of {n} participations acknowledged after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every one acknowledged QUEUED (not delivered, no rejection, no skip).
    anyhow::ensure!(
        stats.queued.load(Ordering::Relaxed) == n,
        "not every participation was queued: {:?}",
        stats.problem()
    );
    // Let the writer and the claim loop settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_kib, hwm_kib) = worker.proc.rss_kib()?;
    load.stop();
    Ok(Memory {
        waiting: n,
        idle_kib,
        rss_kib,
        hwm_kib,
        accept_secs: accepted_at.as_secs_f64(),
    })
}

/// Document size of the memory-exhaustion attack (issue 14).
pub const ATTACK_DOC_BYTES: usize = 512 * 1024;

/// One run of the memory-exhaustion attack.
#[derive(Clone, Debug, Default)]
pub struct AttackRun {
    /// The `--memory-budget` given.
    pub budget: &'static str,
    /// Requests the publishers handed to their streams.
    pub sent: u64,
    /// Participations the worker had read and not acknowledged at the end.
    pub in_flight: u64,
    /// Bytes held on the budget at the end (the worker's gauge).
    pub held_bytes: u64,
    /// Worker RSS when ready and idle, KiB.
    pub idle_kib: u64,
    /// Highest RSS sampled during the run, KiB.
    pub max_kib: u64,
    /// Peak RSS (VmHWM), KiB.
    pub hwm_kib: u64,
}

/// The memory-exhaustion attack with and without the budget.
#[derive(Clone, Debug, Default)]
pub struct Attack {
    /// Publish streams.
    pub streams: usize,
    /// Length of each run.
    pub secs: f64,
    /// One per budget.
    pub runs: Vec<AttackRun>,
}

/// The memory-exhaustion attack of issue 14: four Publish streams of 512 KiB documents, as
/// fast as the worker reads them, to a receiver that accepts connections and never answers;
/// the worker's RSS over `length`, with no effective budget (`1024GiB`), the default budget
/// and a small one.
pub async fn attack(env: &Env, length: Duration) -> anyhow::Result<Attack> {
    let account = "accounts/910030";
    let hole = endpoint::start_blackhole(&env.rx, env.epoch)?;
    let (_, rev) = env.routed(account, "attack", &hole.url("/attack")).await?;
    let bodies = Arc::new(load::Bodies::new(ATTACK_DOC_BYTES, env.epoch)?);
    let streams = env.plan.streams;
    let mut out = Attack {
        streams,
        secs: length.as_secs_f64(),
        runs: Vec::new(),
    };
    for budget in ["1024GiB", "256MiB", "64MiB"] {
        let worker = env
            .worker(
                &format!("attack-{budget}"),
                &["--memory-budget", budget],
                rev,
            )
            .await?;
        let (idle_kib, _) = worker.proc.rss_kib()?;
        let stats = Arc::new(PubStats::default());
        let target = load::Target {
            bodies: bodies.clone(),
            ..env.target(&worker)
        };
        let load = load::closed_loop(
            &target,
            vec![account.into()],
            streams,
            env.plan.window,
            stats.clone(),
            None,
        )
        .await?;
        let started = Instant::now();
        let mut max_kib = 0;
        while started.elapsed() < length {
            tokio::time::sleep(Duration::from_millis(250)).await;
            max_kib = max_kib.max(worker.proc.rss_kib()?.0);
        }
        let (_, hwm_kib) = worker.proc.rss_kib()?;
        let (_, metrics) = HttpConn::new(worker.http).get("/metrics").await?;
        let gauge = |name| procs::metric(&metrics, name).unwrap_or(0.0) as u64;
        out.runs.push(AttackRun {
            budget,
            sent: stats.sent.load(Ordering::Relaxed),
            in_flight: gauge("pushwire_worker_in_flight_participations"),
            held_bytes: gauge("pushwire_worker_memory_held_bytes"),
            idle_kib,
            max_kib,
            hwm_kib,
        });
        load.stop();
    }
    Ok(out)
}

/// Participations published per second to the healthy integration of the retry start delay
/// measurement; every other one's first attempt is answered `503`, so half are timed.
pub const RETRY_DELAY_RATE: f64 = 100.0;
/// Deliveries per hand-off (one transaction) when filling the store for a dead endpoint.
const SEED_BATCH: u64 = 1_000;
/// How long after the last timed retry was due its arrival is waited for.
const RETRY_DRAIN: Duration = Duration::from_secs(10);
/// How long the dead integration's circuit breaker is given to open before publishing.
const BREAKER_WAIT: Duration = Duration::from_secs(15);

/// The retry start delay run.
#[derive(Clone, Debug, Default)]
pub struct RetryDelay {
    /// Deliveries queued for the dead integration before the worker started.
    pub dead_queued: u64,
    /// Time to hand them off to the store (batches of 1,000, one writer).
    pub seed_secs: f64,
    /// Time from the worker ready to its breaker for the dead integration open; `None` when
    /// it had not opened within 15 s (then published to anyway).
    pub breaker_secs: Option<f64>,
    /// Participations published to the healthy integration per second.
    pub rate: f64,
    /// How long they were published.
    pub secs: f64,
    /// Participations published to the healthy integration.
    pub published: u64,
    /// Of them, acknowledged `QUEUED` with a `next_attempt_time`: the ones timed.
    pub timed: u64,
    /// Retry arrival at the receiver − `next_attempt_time` of each timed participation whose
    /// retry arrived, milliseconds (negative when it came early), sorted.
    pub delays_ms: Vec<f64>,
    /// Timed participations whose retry had not arrived 10 s after the last was due.
    pub missing: u64,
    /// Circuit breakers open at the end (the worker's `pushwire_worker_open_breakers`).
    pub open_breakers: Option<u64>,
    /// The store's `claim_due` calls from the start of publishing to the end.
    pub claims: u64,
    /// Their mean time, ms (the worker's `pushwire_worker_delivery_store_latency_seconds`).
    pub claim_ms: Option<f64>,
    /// Deliveries still queued in the worker's store once it was stopped, every integration.
    pub queued_at_end: Option<u64>,
    /// What went wrong, if anything (each problem, `; ` between them).
    pub problem: Option<String>,
}

impl RetryDelay {
    /// The start delays, each missing retry counted as unbounded (`f64::INFINITY`), sorted:
    /// what the quantiles are taken over.
    pub fn with_missing(&self) -> Vec<f64> {
        let mut all = self.delays_ms.clone();
        all.extend((0..self.missing).map(|_| f64::INFINITY));
        all
    }
}

/// Opens the store `url` names and hands off `n` deliveries for `integration`, due now, each
/// with the record of a refused connection and a small body of its own, in batches of
/// [`SEED_BATCH`]; how long the hand-offs took.
async fn seed_dead(url: &str, integration: &str, n: u64) -> anyhow::Result<Duration> {
    let url = StoreUrl::parse(url).context("the worker's delivery store URL")?;
    let store = delivery_store::open(&url, &OpenOptions::default())
        .await
        .context("opening the worker's delivery store")?;
    let integration = IntegrationName::parse(integration).context("integration name")?;
    let started = Instant::now();
    let mut next = 0;
    while next < n {
        let now = SystemTime::now();
        let batch: Vec<NewDelivery> = (next..(next + SEED_BATCH).min(n))
            .map(|i| {
                let id = format!("dead-{i:09}");
                let body = format!(r#"{{"id":"{id}","bench":"retry-delay"}}"#);
                NewDelivery {
                    key: DeliveryKey::new(integration.clone(), id),
                    campaign_id: "1".into(),
                    website_id: None,
                    trace: None,
                    outcome: Outcome::Queued { next_attempt: now },
                    attempts: vec![Attempt {
                        time: now,
                        status_code: None,
                        error_class: Some("connect".into()),
                        error_message: Some("connection refused".into()),
                        duration: Duration::from_millis(1),
                    }],
                    body: Some(Bytes::from(body)),
                }
            })
            .collect();
        store
            .hand_off(&batch, now)
            .await
            .with_context(|| format!("handing off deliveries {next}.."))?;
        next += batch.len() as u64;
    }
    let took = started.elapsed();
    let queued = store.count_queued().await.context("counting")?;
    anyhow::ensure!(queued == n, "{queued} queued after handing off {n}");
    Ok(took)
}

/// How many deliveries the store `url` holds queued (after its worker stopped).
async fn count_queued(url: &str) -> anyhow::Result<u64> {
    let url = StoreUrl::parse(url).context("the worker's delivery store URL")?;
    let store = delivery_store::open(&url, &OpenOptions::default()).await?;
    Ok(store.count_queued().await?)
}

/// What the retry start delay run reads of a worker's `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
struct RetryGauges {
    /// Circuit breakers open.
    open_breakers: Option<u64>,
    /// Time spent in the store's `claim_due` so far, seconds.
    claim_secs: f64,
    /// `claim_due` calls so far.
    claims: f64,
}

impl RetryGauges {
    /// Reads them from the worker's `/metrics`.
    async fn read(conn: &mut HttpConn) -> anyhow::Result<Self> {
        let (_, metrics) = conn.get("/metrics").await?;
        let claim = |series: &str| {
            procs::labelled_metric(
                &metrics,
                &format!("pushwire_worker_delivery_store_latency_seconds_{series}"),
                "operation",
                "claim_due",
            )
            .unwrap_or(0.0)
        };
        Ok(Self {
            open_breakers: procs::metric(&metrics, "pushwire_worker_open_breakers")
                .map(|v| v as u64),
            claim_secs: claim("sum"),
            claims: claim("count"),
        })
    }
}

/// Another integration's due retry while many deliveries are queued for a dead endpoint:
/// `dead_queued` deliveries for an integration whose URL refuses connections are handed off
/// into a worker's delivery store before the worker starts (`--retry-schedule 2s
/// --retry-window 1h`), all due; once its breaker for the dead integration is open, one
/// Publish stream sends [`RETRY_DELAY_RATE`] participations/s for `retry_delay` to a healthy
/// integration whose receiver answers `503` to every other participation's first request.
/// Those are acknowledged `QUEUED` with a `next_attempt_time`; each one's start delay is the
/// arrival of its second request at the receiver (wall clock) − that time.
pub async fn retry_delay(env: &Env) -> anyhow::Result<RetryDelay> {
    let plan = &env.plan;
    let name = "retry-delay";
    let down = procs::free_port()?;
    let (dead, dead_rev) = env
        .routed(
            "accounts/910040",
            "dead",
            &format!("http://127.0.0.1:{down}/dead"),
        )
        .await?;
    let rx = endpoint::start_fail_first(&env.rx, env.epoch)?;
    let account = "accounts/910041";
    let (_, rev) = env.routed(account, "retried", &rx.url("/retried")).await?;
    let store = env.store_url(name);
    let seeded = seed_dead(&store, &dead, plan.dead_queued).await?;
    let flags = ["--retry-schedule", "2s", "--retry-window", "1h"];
    let worker = env.worker(name, &flags, rev.max(dead_rev)).await?;
    let mut conn = HttpConn::new(worker.http);
    // The state measured: the dead integration left out of claims, its breaker open.
    let ready = Instant::now();
    let breaker_secs = loop {
        if RetryGauges::read(&mut conn)
            .await?
            .open_breakers
            .is_some_and(|n| n >= 1)
        {
            break Some(ready.elapsed().as_secs_f64());
        }
        if ready.elapsed() >= BREAKER_WAIT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let before = RetryGauges::read(&mut conn).await?;
    let stats = Arc::new(PubStats::default());
    stats.keep_next_attempts(true);
    let streams = load::paced_streams(&env.target(&worker), 1, stats.clone()).await?;
    let stop = CancellationToken::new();
    let paced = load::pace(
        &streams,
        account,
        RETRY_DELAY_RATE,
        plan.retry_delay,
        &env.bodies,
        &stats,
        &stop,
    )
    .await?;
    // Acknowledged once the first attempt is answered and the hand-off committed; bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.acked.load(Ordering::Relaxed) < stats.sent.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let due = stats.take_next_attempts();
    let last_due = due.values().max().copied().unwrap_or_else(SystemTime::now);
    let deadline = Instant::now()
        + last_due
            .duration_since(SystemTime::now())
            .unwrap_or_default()
        + RETRY_DRAIN;
    let arrived = loop {
        let (_, arrived) = rx.stats.retries();
        if due.keys().all(|id| arrived.contains_key(id)) || Instant::now() >= deadline {
            break arrived;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (failed_first, _) = rx.stats.retries();
    let mut delays_ms = Vec::with_capacity(due.len());
    let mut missing = 0;
    for (id, at) in &due {
        match arrived.get(id).map(|arrival| arrival.duration_since(*at)) {
            Some(Ok(late)) => delays_ms.push(late.as_secs_f64() * 1e3),
            Some(Err(early)) => delays_ms.push(-early.duration().as_secs_f64() * 1e3),
            None => missing += 1,
        }
    }
    delays_ms.sort_by(f64::total_cmp);
    let after = RetryGauges::read(&mut conn).await.unwrap_or_default();
    let claims = after.claims - before.claims;
    drop(streams);
    drop(worker);
    let queued_at_end = tokio::time::timeout(Duration::from_secs(10), count_queued(&store))
        .await
        .ok()
        .and_then(Result::ok);

    let sent = stats.sent.load(Ordering::Relaxed);
    let unacked = sent - stats.acked.load(Ordering::Relaxed);
    let queued = stats.queued.load(Ordering::Relaxed);
    let otherwise = stats.not_delivered.load(Ordering::Relaxed) - queued;
    let mut problems = Vec::new();
    if breaker_secs.is_none() {
        problems.push(format!(
            "the dead integration's breaker was not open after {BREAKER_WAIT:?}"
        ));
    }
    if unacked > 0 {
        problems.push(format!("{unacked} not acknowledged"));
    }
    if otherwise > 0 {
        problems.push(format!(
            "{otherwise} acknowledged neither DELIVERED nor QUEUED"
        ));
    }
    if queued != failed_first || due.len() as u64 != queued {
        problems.push(format!(
            "{queued} acknowledged QUEUED ({} with a next attempt time), {failed_first} \
             first requests answered 503",
            due.len()
        ));
    }
    Ok(RetryDelay {
        dead_queued: plan.dead_queued,
        seed_secs: seeded.as_secs_f64(),
        breaker_secs,
        rate: RETRY_DELAY_RATE,
        secs: paced.elapsed.as_secs_f64(),
        published: paced.sent,
        timed: due.len() as u64,
        delays_ms,
        missing,
        open_breakers: after.open_breakers,
        claims: claims as u64,
        claim_ms: (claims > 0.0).then(|| (after.claim_secs - before.claim_secs) / claims * 1e3),
        queued_at_end,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// One setup of the shared-host run.
#[derive(Clone, Debug, Default)]
pub struct HostRun {
    /// What it is.
    pub label: String,
    /// Throughput and CPU.
    pub rate: Rate,
    /// Connections the receivers accepted during the measurement.
    pub connections: u64,
    /// Full TLS handshakes during the measurement.
    pub full_handshakes: u64,
    /// Resumed TLS handshakes during the measurement.
    pub resumed_handshakes: u64,
    /// Connections, full and resumed TLS handshakes from the start, warm-up included.
    pub since_start: [u64; 3],
}

impl HostRun {
    /// Setup `label`: its `rate`, and the receivers' counts of connections, full and resumed
    /// handshakes `before` and `after` the measurement.
    fn new(label: &str, rate: Rate, before: [u64; 3], after: [u64; 3]) -> Self {
        Self {
            label: label.to_owned(),
            rate,
            connections: after[0] - before[0],
            full_handshakes: after[1] - before[1],
            resumed_handshakes: after[2] - before[2],
            since_start: after,
        }
    }

    /// Worker CPU per delivery, microseconds.
    pub fn worker_us_per_delivery(&self) -> f64 {
        self.rate.worker_cores * 1e6 / self.rate.per_sec
    }

    /// This process's CPU (client and receiver) per delivery, microseconds.
    pub fn bench_us_per_delivery(&self) -> f64 {
        self.rate.bench_cores * 1e6 / self.rate.per_sec
    }

    /// `n` per 100,000 deliveries.
    pub fn per_100k(&self, n: u64) -> f64 {
        let deliveries = self.rate.per_sec * self.rate.measured_secs;
        n as f64 * 100_000.0 / deliveries.max(1.0)
    }
}

/// The shared-host run: the same five integrations per participation, on one HTTPS receiver
/// (host and port) or on five, and on one plain HTTP receiver.
#[derive(Clone, Debug, Default)]
pub struct SharedHost {
    /// Integrations per participation.
    pub integrations: usize,
    /// Each setup, in the order run.
    pub runs: Vec<HostRun>,
}

/// Integrations of the shared-host run.
const SHARED_HOST_INTEGRATIONS: usize = 5;

/// Five integrations per participation, on one HTTPS receiver host vs one host each (and one
/// plain HTTP host): throughput, worker CPU per delivery, new connections and full TLS
/// handshakes during the measurement. A fresh worker per setup.
pub async fn shared_host(env: &Env) -> anyhow::Result<SharedHost> {
    let tls = pushwire_tests::receiver::TlsIdentity::generate()?;
    let ca = env.dir.join("shared-host-ca.pem");
    tls.write_ca_pem(&ca)?;
    let ca = ca.display().to_string();
    let n = SHARED_HOST_INTEGRATIONS;
    let setups: [(&str, &str, usize, bool); 3] = [
        ("5 integrations on 1 HTTPS host", "accounts/910020", 1, true),
        (
            "5 integrations on 5 HTTPS hosts",
            "accounts/910021",
            n,
            true,
        ),
        (
            "5 integrations on 1 plain HTTP host",
            "accounts/910022",
            1,
            false,
        ),
    ];
    let mut runs = Vec::new();
    for (i, (label, account, hosts, https)) in setups.into_iter().enumerate() {
        let receivers = if https {
            endpoint::start_ok_tls_many(&env.rx, env.epoch, hosts, &tls, false)?
        } else {
            endpoint::start_ok_many(&env.rx, env.epoch, hosts)?
        };
        let name = format!("shared-host-{i}");
        let mut rev = 0;
        for k in 0..n {
            let id = format!("{name}-{k}");
            let rx = &receivers[k % hosts];
            rev = env
                .routed(account, &id, &rx.url(&format!("/{id}")))
                .await?
                .1;
        }
        let worker = env
            .worker(&name, &["--extra-ca-file", ca.as_str()], rev)
            .await?;
        let (stats, load) = env.warm_closed_loop(&worker, account).await?;
        // The receivers count together.
        let counter = &receivers[0].stats;
        let before = counter.connections();
        let mut rate = measure(
            || counter.count(),
            || stats.acked.load(Ordering::Relaxed),
            Some(&worker.proc),
            Duration::ZERO,
            env.plan.measure,
        )
        .await;
        let after = counter.connections();
        load.stop();
        rate.failures = stats.not_delivered.load(Ordering::Relaxed);
        rate.problem = stats.problem();
        runs.push(HostRun::new(label, rate, before, after));
    }
    Ok(SharedHost {
        integrations: n,
        runs,
    })
}

/// The HTTP/2 run: the webhook client alone (in this process), offering HTTP/2, against one
/// HTTPS receiver that answers in HTTP/1.1 only, then one that takes HTTP/2.
#[derive(Clone, Debug, Default)]
pub struct Http2 {
    /// Requests in flight (tasks of one request at a time).
    pub concurrency: usize,
    /// HTTP/1.1, then HTTP/2.
    pub runs: Vec<HostRun>,
}

/// Requests in flight in the HTTP/2 run: five integrations' default concurrency.
const HTTP2_CONCURRENCY: usize = 5 * 32;

/// See [`Http2`]. CPU is this process's: the client and the receiver together.
pub async fn http2(env: &Env) -> anyhow::Result<Http2> {
    use pushwire_common::webhook::client::{ClientOptions, WebhookClient};
    use pushwire_common::webhook::ssrf::AllowList;
    let tls = pushwire_tests::receiver::TlsIdentity::generate()?;
    let mut runs = Vec::new();
    for (label, h2) in [
        ("receiver offers HTTP/1.1 only", false),
        ("receiver offers HTTP/2", true),
    ] {
        let receivers = endpoint::start_ok_tls_many(&env.rx, env.epoch, 1, &tls, h2)?;
        let client = WebhookClient::new(ClientOptions {
            allow: AllowList::parse(["127.0.0.0/8"])?,
            extra_ca_pem: Some(tls.ca_pem().as_bytes().to_vec()),
            http2: true,
            ..ClientOptions::default()
        })?;
        let load = load::webhook_client(
            receivers[0].url("/http2"),
            client,
            HTTP2_CONCURRENCY,
            env.bodies.clone(),
        );
        let counter = &receivers[0].stats;
        tokio::time::sleep(env.plan.warmup).await;
        let before = counter.connections();
        let rate = measure(
            || counter.count(),
            || counter.count(),
            None,
            Duration::ZERO,
            env.plan.measure,
        )
        .await;
        let after = counter.connections();
        load.stop();
        runs.push(HostRun::new(label, rate, before, after));
    }
    Ok(Http2 {
        concurrency: HTTP2_CONCURRENCY,
        runs,
    })
}
