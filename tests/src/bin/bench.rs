//! `bench`: Pushwire's benchmark harness (not a pass/fail test). On one machine, over
//! loopback only, bounded in time: a baseline (a plain HTTP/1.1 client against a minimal
//! keep-alive receiver), then the real thing (publisher streams → `worker` process →
//! the same receiver, with a `control-plane` process, real signing), fan-out, latency at a
//! fixed offered rate, config propagation, isolation from a blackholed endpoint and memory
//! with 100,000 deliveries handed off to the delivery store, and under a memory-exhaustion
//! attack with and without `--memory-budget`; `--only throughput-no-log` repeats the
//! throughput run with the delivery log off, and `--only retry-delay` (not in a default run)
//! times another integration's due retries while 200,000 deliveries are queued for a dead
//! endpoint; `--only shared-host` (not in a default run either) compares five integrations on
//! one HTTPS receiver host with five on a host each; `--only scale` (not in a default run
//! either) loads 10,000 to 1,000,000 integrations (`--scale`) and measures the control plane's
//! start-up, a new worker's readiness, both processes' memory, and propagation and the
//! worker's CPU per change at 100 changes/s. Prints a Markdown table and writes a JSON file.
//!
//! ```sh
//! cargo run --release -p pushwire-tests --bin bench -- --json bench.json [--quick]
//! ```
//!
//! It builds the release `control-plane` and `worker` binaries first (`cargo build --release`,
//! quiet; `--no-build` skips that). Every child process is killed when the benchmark ends,
//! fails, panics, times out or gets Ctrl-C.

#[path = "../bench/endpoint.rs"]
mod endpoint;
#[path = "../bench/load.rs"]
mod load;
#[path = "../bench/phases.rs"]
mod phases;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/scale.rs"]
mod scale;
#[path = "../bench/setup.rs"]
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use serde_json::json;

use report::Results;
use setup::{Env, Plan};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Pushwire benchmark: baseline vs publish → worker → receiver throughput, latency at a \
             fixed rate, fan-out, config propagation, isolation and memory; loopback only."
)]
struct Args {
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Shorter measurements: the whole run in under a minute.
    #[arg(long)]
    quick: bool,

    /// Offered rate of the latency measurement, participations per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,

    /// Participations left waiting in the memory measurement.
    #[arg(long, default_value_t = 100_000)]
    waiting: u64,

    /// Happy-path deliveries/s of the build before the durable hand-off, to compare with
    /// (default: issue 14's figure, measured on another machine; give the figure of that build
    /// on this machine for a like-for-like ratio).
    #[arg(long, default_value_t = report::BEFORE_HANDOFF_RPS)]
    before_rps: f64,

    /// Run only these measurements (repeatable; default: all but `retry-delay`,
    /// `shared-host`, `http2` and `scale`).
    #[arg(long, value_enum)]
    only: Vec<Phase>,

    /// Do not build the control-plane and worker binaries (use what is there).
    #[arg(long)]
    no_build: bool,

    /// Directory holding `control-plane` and `worker` (implies --no-build).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Record the worker with `perf record` during the throughput, fan-out and isolation measurements,
    /// into this directory.
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,

    /// Keep the temporary directory (logs of the control plane and workers; the `scale`
    /// phase removes its data directories whatever this says).
    #[arg(long)]
    keep_logs: bool,

    /// Sizes of the `scale` phase, in integrations (multiples of 5: accounts of 5
    /// integrations and 10 push scopes), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 100_000])]
    scale: Vec<usize>,

    /// Changes per second of the `scale` phase.
    #[arg(long, default_value_t = 100.0)]
    scale_rate: f64,

    /// Seconds of changes (and of the quiet period before them) in the `scale` phase.
    #[arg(long, default_value_t = 10)]
    scale_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Phase {
    Baseline,
    Throughput,
    /// As `throughput`, with the worker's delivery log off (`--delivery-log false`).
    ThroughputNoLog,
    Latency,
    Fanout,
    Propagation,
    Isolation,
    Memory,
    /// The memory-exhaustion attack (512 KiB documents, a receiver that never answers) with
    /// and without `--memory-budget`.
    Attack,
    /// Start delay of another integration's due retries while 200,000 deliveries (20,000 with
    /// --quick) are queued for a dead endpoint. About a minute, so not in a default run: only
    /// with `--only retry-delay`.
    RetryDelay,
    /// Five integrations per participation on one HTTPS receiver host vs on five hosts (and
    /// on one plain HTTP host): throughput, worker CPU per delivery, new connections and full
    /// TLS handshakes. Three workers in turn, so not in a default run: only with
    /// `--only shared-host`.
    SharedHost,
    /// The webhook client alone, offering HTTP/2, against an HTTPS receiver that answers in
    /// HTTP/1.1 only, then one that takes HTTP/2. Only with `--only http2`.
    Http2,
    /// Configuration at scale (`--scale` sizes): bulk load, control-plane start-up, new-worker
    /// readiness, memory, propagation and worker CPU per change at 100 changes/s. Long, so
    /// only when named.
    Scale,
}

fn plan(args: &Args) -> Plan {
    let (warmup, measure, latency, changes, isolation) = if args.quick {
        (1, 3, 5, 30, 3)
    } else {
        (2, 15, 30, 100, 10)
    };
    Plan {
        quick: args.quick,
        warmup: Duration::from_secs(warmup),
        measure: Duration::from_secs(measure),
        latency: Duration::from_secs(latency),
        rate: args.rate,
        before_rps: args.before_rps,
        changes,
        isolation: Duration::from_secs(isolation),
        waiting: args.waiting,
        dead_queued: if args.quick { 20_000 } else { 200_000 },
        retry_delay: Duration::from_secs(if args.quick { 10 } else { 20 }),
        streams: 4,
        window: 256,
        conns: 32,
    }
}

/// Runs a phase within `limit`, recording its result or why it failed.
async fn phase<T>(
    name: &str,
    limit: Duration,
    f: impl Future<Output = anyhow::Result<T>>,
) -> Option<Result<T, String>> {
    eprintln!("bench: {name} ...");
    let started = Instant::now();
    let result = match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("did not finish within {limit:?}")),
    };
    match &result {
        Ok(_) => eprintln!("bench: {name} done in {:.1?}", started.elapsed()),
        Err(e) => eprintln!("bench: {name} FAILED: {e}"),
    }
    Some(result)
}

/// Whether the shared control plane of [`run`] is needed: some phase other than `scale`,
/// which starts its own for each size.
fn shared_env(only: &[Phase]) -> bool {
    only.is_empty() || only.iter().any(|p| *p != Phase::Scale)
}

/// The `scale` phase: each size on its own data directory, control plane and worker, each
/// bounded by [`scale::ScalePlan::limit`].
async fn run_scale(
    bins: &procs::Binaries,
    dir: &std::path::Path,
    rx: &tokio::runtime::Handle,
    plan: &Plan,
    scale_plan: &scale::ScalePlan,
) -> Vec<scale::Outcome> {
    let mut outcomes = Vec::new();
    for &n in &scale_plan.sizes {
        let name = format!("scale: {n} integrations");
        let work = scale::size(bins.clone(), dir, rx.clone(), plan.clone(), scale_plan, n);
        if let Some(outcome) = phase(&name, scale_plan.limit(n), work).await {
            outcomes.push((n, outcome));
        }
    }
    outcomes
}

async fn run(env: &Env, only: &[Phase]) -> Results {
    let wanted = |p| only.is_empty() || only.contains(&p);
    let plan = &env.plan;
    let slack = Duration::from_secs(30);
    let mut r = Results::default();
    if wanted(Phase::Baseline) {
        let limit = plan.warmup + plan.measure + slack;
        r.baseline = phase("baseline", limit, phases::baseline(env)).await;
    }
    if wanted(Phase::Throughput) {
        let limit = plan.warmup + plan.measure + slack;
        r.throughput = phase("pushwire throughput", limit, phases::throughput(env)).await;
    }
    if wanted(Phase::ThroughputNoLog) {
        let limit = plan.warmup + plan.measure + slack;
        r.throughput_no_log = phase(
            "pushwire throughput, delivery log off",
            limit,
            phases::throughput_no_log(env),
        )
        .await;
    }
    if wanted(Phase::Latency) {
        let limit = plan.warmup + plan.latency + slack;
        r.latency = phase("latency at a fixed rate", limit, phases::latency(env)).await;
    }
    if wanted(Phase::Fanout) {
        let limit = plan.warmup + plan.measure + slack;
        r.fanout = phase("fan-out", limit, phases::fanout(env)).await;
    }
    if wanted(Phase::Propagation) {
        let limit = Duration::from_secs(10) + slack * 2;
        r.propagation = phase("config propagation", limit, phases::propagation(env)).await;
    }
    if wanted(Phase::Isolation) {
        let limit = (plan.warmup * 2 + plan.isolation) * 4 + slack * 2;
        r.isolation = phase("isolation", limit, phases::isolation(env)).await;
    }
    if wanted(Phase::Memory) {
        let accept = if plan.quick { 30 } else { 90 };
        let limit = Duration::from_secs(accept) + slack;
        r.memory = phase(
            "memory",
            limit,
            phases::memory(env, Duration::from_secs(accept)),
        )
        .await;
    }
    if wanted(Phase::Attack) {
        let length = Duration::from_secs(if plan.quick { 8 } else { 20 });
        let limit = (length + slack) * 3;
        r.attack = phase(
            "memory-exhaustion attack",
            limit,
            phases::attack(env, length),
        )
        .await;
    }
    if only.contains(&Phase::SharedHost) {
        let limit = (plan.warmup + plan.measure + slack) * 3;
        r.shared_host = phase(
            "integrations sharing an HTTPS receiver host",
            limit,
            phases::shared_host(env),
        )
        .await;
    }
    if only.contains(&Phase::Http2) {
        let limit = (plan.warmup + plan.measure + slack) * 2;
        r.http2 = phase("HTTP/1.1 vs HTTP/2", limit, phases::http2(env)).await;
    }
    // Only when asked for: filling the store alone takes a while.
    if only.contains(&Phase::RetryDelay) {
        let seeding = Duration::from_secs(if plan.quick { 30 } else { 120 });
        let limit = seeding + plan.retry_delay + slack * 2;
        r.retry_delay = phase(
            "retry start delay beside a dead endpoint's queue",
            limit,
            phases::retry_delay(env),
        )
        .await;
    }
    r
}

fn main() -> ExitCode {
    let args = Args::parse();
    match main_result(args) {
        Ok(code) => code,
        Err(e) => {
            procs::kill_all();
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main_result(args: Args) -> anyhow::Result<ExitCode> {
    if cfg!(debug_assertions) {
        eprintln!(
            "bench: WARNING: built without optimisations; the client, publisher and receiver \
             are slow. Use `cargo run --release`."
        );
    }
    let plan = plan(&args);
    let bins = procs::binaries(
        args.no_build || args.bin_dir.is_some(),
        args.bin_dir.clone(),
    )?;

    let scale_plan = scale::ScalePlan {
        sizes: args.scale.clone(),
        rate: args.scale_rate,
        length: Duration::from_secs(args.scale_secs),
    };
    let with_scale = args.only.contains(&Phase::Scale);
    // The whole run is bounded: 5 minutes (1 with --quick), plus each scale size's bound,
    // then everything is killed.
    let mut deadline = Duration::from_secs(if args.quick { 60 } else { 300 });
    if with_scale {
        deadline += scale_plan
            .sizes
            .iter()
            .map(|&n| scale_plan.limit(n))
            .sum::<Duration>();
    }
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(deadline + Duration::from_secs(15));
            eprintln!("bench: still running after {deadline:?}; killing everything");
            procs::kill_all();
            std::process::exit(3);
        })?;

    let dir = tempfile::Builder::new()
        .prefix("pushwire-bench-")
        .tempdir()?;
    if let Some(perf) = &args.perf {
        std::fs::create_dir_all(perf).with_context(|| format!("creating {}", perf.display()))?;
    }
    // Receivers on a runtime of their own; publishers, the baseline client and the
    // orchestration on another. Both share the machine's cores with the worker and the
    // control plane.
    let receivers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("receiver")
        .enable_all()
        .build()?;
    let driver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench")
        .enable_all()
        .build()?;
    let load_start = report::loadavg();
    let started = Instant::now();
    let rx = receivers.handle().clone();
    let perf = args.perf.clone();
    let dir_path = dir.path().to_path_buf();
    let only = args.only.clone();
    let plan_for_env = plan.clone();
    let outcome = driver.block_on(async move {
        let work = async {
            let mut results = if shared_env(&only) {
                let env = Env::start(
                    bins.clone(),
                    dir_path.clone(),
                    rx.clone(),
                    plan_for_env.clone(),
                    perf,
                )
                .await?;
                run(&env, &only).await
            } else {
                Results::default()
            };
            if with_scale {
                let outcomes = run_scale(&bins, &dir_path, &rx, &plan_for_env, &scale_plan).await;
                results.scale = Some((outcomes, scale_plan.clone()));
            }
            anyhow::Ok(results)
        };
        tokio::select! {
            r = tokio::time::timeout(deadline, work) => match r {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("the run did not finish within {deadline:?}")),
            },
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    procs::kill_all();
    driver.shutdown_timeout(Duration::from_secs(1));
    receivers.shutdown_timeout(Duration::from_secs(1));
    if args.keep_logs {
        eprintln!("bench: logs kept in {}", dir.keep().display());
    }
    let results = outcome?;
    let elapsed = started.elapsed();

    let table = report::table(&results, &plan);
    let context = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "quick": plan.quick,
        "elapsed_secs": elapsed.as_secs_f64(),
        "machine": report::machine(),
        "loadavg_start": load_start,
        "loadavg_end": report::loadavg(),
        "body_bytes": load::BODY_BYTES,
        "durations_secs": {
            "warmup": plan.warmup.as_secs_f64(),
            "throughput": plan.measure.as_secs_f64(),
            "latency": plan.latency.as_secs_f64(),
            "isolation": plan.isolation.as_secs_f64(),
            "retry_delay": plan.retry_delay.as_secs_f64(),
        },
    });
    let doc = report::to_json(&results, &plan, context);
    println!();
    println!("{table}");
    println!(
        "machine: {}; load average at start {}, at end {}; {:.0} s",
        doc["context"]["machine"],
        load_start,
        doc["context"]["loadavg_end"],
        elapsed.as_secs_f64()
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: results written to {}", path.display());
    }
    let failed = doc["errors"].as_object().is_some_and(|e| !e.is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
