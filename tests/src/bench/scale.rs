//! The `scale` phase (`--only scale`, never in a default run): configuration at internet
//! scale. For each size (`--scale`, integrations), on a fresh data directory:
//!
//! 1. bulk-loads accounts of 5 integrations and 10 push scopes each through
//!    `Catalog::import_account` (the creates' validation, defaults, encryption and limits,
//!    one guarded transaction per account), several accounts in flight, straight into the
//!    embedded store while no control plane runs;
//! 2. starts the `control-plane` process on it: time to `/readyz` 200, its RSS;
//! 3. starts a `worker`: time until it routes on the loaded revision, its RSS;
//! 4. the worker's CPU per change, with nothing polling it: its CPU over a quiet period
//!    (while a thread of this process, waking as often as the changes will come and doing
//!    nothing else, measures what a wake-up costs on this machine), then over
//!    `UpdateIntegration` calls (the auth header of random integrations) until its `/readyz`
//!    shows the last one's revision, the changes' CPU minus the quiet period's rate over as
//!    long, divided by the changes: once at a fixed rate, open loop, and once
//!    [`BACK_TO_BACK`] calls as fast as the control plane takes them (the cost of a change
//!    when changes come in bulk: warm caches, and revisions the control plane sends together);
//! 5. propagation: as many changes again, with the worker's `/readyz` polled every
//!    millisecond on one keep-alive connection; each change is timed from its call's return
//!    to the first poll after it that shows its revision or a later one. (The polls cost the
//!    worker more CPU than the changes, hence the separate run for 4.)
//!
//! Every step is bounded in time; the processes are stopped and the data directory removed
//! at the end of each size, failed or not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use pushwire_common::domain::AccountName;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::api::{integration_create_patch, push_scope_create_patch};
use pushwire_control_plane::service::Catalog;
use serde_json::{Value, json};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::procs::{self, Binaries, HttpConn};
use crate::report::quantile;
use crate::setup::{ControlPlaneData, Env, Plan, auth_header_change, wait_revision};

/// Integrations per account.
pub const INTEGRATIONS_PER_ACCOUNT: usize = 5;
/// Push scopes per account.
pub const SCOPES_PER_ACCOUNT: usize = 10;
/// Accounts imported at once (they are disjoint, so their transactions do not conflict).
const IMPORTS_IN_FLIGHT: usize = 16;
/// `UpdateIntegration` calls in flight at most while changing at the fixed rate.
const CHANGES_IN_FLIGHT: usize = 32;
/// How long after the last change's return its revision may take to show.
const DRAIN: Duration = Duration::from_secs(5);
/// Changes made back to back, to measure what one costs the worker when changes come in bulk.
const BACK_TO_BACK: usize = 2000;
/// The pause between two polls of the worker's `/readyz`.
const POLL_EVERY: Duration = Duration::from_millis(1);

/// Targets of the issue.
pub const TARGET_CPU_PER_CHANGE_US: f64 = 50.0;
/// p99 propagation at the change rate, ms.
pub const TARGET_PROPAGATION_P99_MS: f64 = 10.0;
/// New worker ready, s.
pub const TARGET_WORKER_READY_SECS: f64 = 10.0;
/// Worker RSS per integration, KiB.
pub const TARGET_WORKER_KIB_PER_INTEGRATION: f64 = 1.5;
/// The memory target is judged from this size on: below it the worker's fixed part (about
/// 18 MiB, 1.8 KiB per integration at 10,000) is most of its RSS.
const MEMORY_JUDGED_FROM: usize = 100_000;
/// Control-plane start-up, s.
pub const TARGET_CP_READY_SECS: f64 = 10.0;

/// What `--scale` and the phase's other settings ask.
#[derive(Clone, Debug)]
pub struct ScalePlan {
    /// Sizes, in integrations (multiples of [`INTEGRATIONS_PER_ACCOUNT`]).
    pub sizes: Vec<usize>,
    /// Changes per second.
    pub rate: f64,
    /// How long changes are made, and how long the quiet period lasts.
    pub length: Duration,
}

impl ScalePlan {
    /// The longest one size may take: loading at 1,000 objects/s at least, the control plane
    /// and the worker each starting within a minute plus 10 s per 100,000 integrations, the
    /// quiet and change periods, the drain, and slack.
    pub fn limit(&self, integrations: usize) -> Duration {
        let objects = integrations / INTEGRATIONS_PER_ACCOUNT
            * (INTEGRATIONS_PER_ACCOUNT + SCOPES_PER_ACCOUNT);
        let load = Duration::from_secs(60 + objects as u64 / 1000);
        load + self.start_limit(integrations) * 2
            + self.length * 2
            + DRAIN * 2
            + Duration::from_secs(60)
    }

    /// How long the control plane, and then the worker, may take to be ready.
    fn start_limit(&self, integrations: usize) -> Duration {
        Duration::from_secs(60 + integrations as u64 / 10_000)
    }
}

/// One size's figures.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Integrations.
    pub integrations: usize,
    /// Push scopes.
    pub scopes: usize,
    /// Accounts.
    pub accounts: usize,
    /// Bulk load time, s.
    pub load_secs: f64,
    /// Size of the embedded store file after the load, bytes.
    pub store_bytes: u64,
    /// Control plane: start to `/readyz` 200, s.
    pub cp_ready_secs: f64,
    /// Control plane RSS once ready, KiB.
    pub cp_rss_kib: u64,
    /// Control plane RSS after the changes, and its peak, KiB.
    pub cp_rss_end_kib: (u64, u64),
    /// Worker: start to routing on the loaded revision, s.
    pub worker_ready_secs: f64,
    /// Worker RSS once ready, KiB.
    pub worker_rss_kib: u64,
    /// Worker RSS after the changes, and its peak, KiB.
    pub worker_rss_end_kib: (u64, u64),
    /// Changes made (calls answered).
    pub changes: usize,
    /// Calls that failed.
    pub failed_calls: usize,
    /// Changes whose revision never showed within the drain.
    pub missing: usize,
    /// Offered rate, and the rate the calls were made at.
    pub rate: (f64, f64),
    /// Longest a call was late on its schedule, ms.
    pub max_send_lag_ms: f64,
    /// Propagation of each change, ms, sorted.
    pub propagation_ms: Vec<f64>,
    /// Polls of the worker's `/readyz` during the changes of the propagation run, and the
    /// longest gap between two, ms.
    pub polls: (usize, f64),
    /// Propagation's lower bounds, ms, sorted: from each change's return to the poll before
    /// the one that showed it, when that poll answered after the return (else 0). The true
    /// time lies between this and [`Row::propagation_ms`]; they part when the benchmark
    /// process itself is starved of CPU and polls late.
    pub propagation_floor_ms: Vec<f64>,
    /// Worker CPU over the quiet period and its length, ms and s.
    pub idle_cpu: (f64, f64),
    /// Worker CPU over the unobserved changes at the rate.
    pub change_cpu: Cpu,
    /// Worker CPU over [`BACK_TO_BACK`] unobserved changes made as fast as the control plane
    /// takes them.
    pub back_to_back_cpu: Cpu,
    /// What it costs this machine to wake a thread that does nothing else, at the rate, µs
    /// of CPU per wake-up.
    pub wake_up_us: Option<f64>,
}

/// A process's CPU over some changes: from the first call until it showed the last one's
/// revision.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// CPU, ms.
    pub ms: f64,
    /// How long, s.
    pub secs: f64,
    /// Changes made (calls answered; 0 when the worker did not show the last).
    pub changes: usize,
    /// Messages of changes the worker applied meanwhile.
    pub messages: u64,
}

impl Cpu {
    /// Changes per message the worker applied.
    pub fn changes_per_message(&self) -> Option<f64> {
        (self.messages > 0).then(|| self.changes as f64 / self.messages as f64)
    }
}

impl Row {
    /// Objects (integrations and push scopes) loaded per second.
    pub fn load_rate(&self) -> f64 {
        (self.integrations + self.scopes) as f64 / self.load_secs
    }

    /// Worker CPU per change beyond idle, µs: at the rate, and back to back.
    pub fn cpu_per_change_us(&self) -> [Option<f64>; 2] {
        let (idle_ms, idle_secs) = self.idle_cpu;
        [self.change_cpu, self.back_to_back_cpu].map(|busy| {
            (busy.changes > 0).then(|| {
                let extra_ms = busy.ms - idle_ms / idle_secs * busy.secs;
                extra_ms * 1000.0 / busy.changes as f64
            })
        })
    }

    /// The worker's RSS once settled (at the end, some 30 s after it was ready: what it
    /// holds, without the snapshot's scratch space its allocator returns meanwhile), KiB per
    /// integration.
    fn worker_kib_per_integration(&self) -> f64 {
        self.worker_rss_end_kib.0 as f64 / self.integrations.max(1) as f64
    }

    /// The targets judged at this size, by name, and whether each figure meets its target
    /// (`None`: no figure, so not met).
    fn targets(&self) -> Vec<(&'static str, Option<bool>)> {
        let mut targets = vec![
            (
                "control-plane start-up",
                Some(self.cp_ready_secs <= TARGET_CP_READY_SECS),
            ),
            (
                "worker ready",
                Some(self.worker_ready_secs <= TARGET_WORKER_READY_SECS),
            ),
            (
                "propagation p99",
                self.p99().map(|p| p <= TARGET_PROPAGATION_P99_MS),
            ),
            // Judged back to back, where changes come in bulk, as the issue measured a
            // worker's capacity (at the rate each change comes alone and also pays for
            // waking the idle worker, `wake_up_us` on this machine, and cold caches).
            (
                "CPU per change",
                self.cpu_per_change_us()[1].map(|c| c <= TARGET_CPU_PER_CHANGE_US),
            ),
        ];
        if self.integrations >= MEMORY_JUDGED_FROM {
            targets.push((
                "worker memory",
                Some(self.worker_kib_per_integration() <= TARGET_WORKER_KIB_PER_INTEGRATION),
            ));
        }
        targets
    }

    fn p50(&self) -> Option<f64> {
        quantile(&self.propagation_ms, 0.5)
    }

    /// p99 propagation; a change never seen counts as unbounded.
    fn p99(&self) -> Option<f64> {
        let mut all = self.propagation_ms.clone();
        all.extend(std::iter::repeat_n(f64::INFINITY, self.missing));
        quantile(&all, 0.99)
    }
}

/// One size and its outcome.
pub type Outcome = (usize, Result<Row, String>);

/// Measures one size: loads, starts, measures, and stops and removes everything it made.
pub async fn size(
    bins: Binaries,
    root: &Path,
    rx: Handle,
    plan: Plan,
    scale: &ScalePlan,
    integrations: usize,
) -> anyhow::Result<Row> {
    anyhow::ensure!(
        integrations >= INTEGRATIONS_PER_ACCOUNT
            && integrations.is_multiple_of(INTEGRATIONS_PER_ACCOUNT),
        "--scale {integrations}: sizes are multiples of {INTEGRATIONS_PER_ACCOUNT} integrations"
    );
    let dir = root.join(format!("scale-{integrations}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Dropped last: after the processes below are killed.
    let _remove = RemoveOnDrop(dir.clone());
    let data = dir.join("cp-data");
    let accounts = integrations / INTEGRATIONS_PER_ACCOUNT;
    let mut row = Row {
        integrations,
        scopes: accounts * SCOPES_PER_ACCOUNT,
        accounts,
        rate: (scale.rate, 0.0),
        ..Row::default()
    };

    // (a) The bulk load.
    let started = Instant::now();
    let loaded_revision = load(&data, accounts).await?;
    row.load_secs = started.elapsed().as_secs_f64();
    row.store_bytes = std::fs::metadata(data.join(pushwire_control_plane::EMBEDDED_STORE_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "bench: scale {integrations}: loaded {} objects in {:.1} s ({:.0}/s)",
        row.integrations + row.scopes,
        row.load_secs,
        row.load_rate()
    );

    // (b) The control plane.
    let start_limit = scale.start_limit(integrations);
    let data = ControlPlaneData {
        dir: data,
        ready_within: start_limit,
    };
    let env = Env::start_on(bins, dir.clone(), rx, plan, None, data).await?;
    row.cp_ready_secs = env.cp_ready.as_secs_f64();
    row.cp_rss_kib = env.control_plane().rss_kib()?.0;

    // (c) A worker.
    let worker = env
        .worker_within(
            &format!("scale-{integrations}"),
            &[],
            loaded_revision,
            start_limit,
        )
        .await?;
    row.worker_ready_secs = worker.ready_in.as_secs_f64();
    row.worker_rss_kib = worker.proc.rss_kib()?.0;
    eprintln!(
        "bench: scale {integrations}: control plane ready in {:.2} s, worker in {:.2} s",
        row.cp_ready_secs, row.worker_ready_secs
    );

    // (d) The worker's CPU per change: a quiet period, then the changes, with nothing
    // polling the worker (the polls of (e), one a millisecond, cost it more than the changes
    // and would blur them); its `/readyz` is asked only at the end, for the last revision.
    let cpu = |what: &str| {
        worker
            .proc
            .cpu_time()
            .with_context(|| format!("reading the worker's CPU time {what}"))
    };
    // Meanwhile a thread of this process wakes as often as the changes will come and does
    // nothing else: what one wake-up costs on this machine.
    let changes = (scale.rate * scale.length.as_secs_f64()).round() as usize;
    let every = Duration::from_secs_f64(1.0 / scale.rate);
    let floor = tokio::task::spawn_blocking(move || wake_up_cost(every, changes));
    let quiet_from = (Instant::now(), cpu("before the quiet period")?);
    tokio::time::sleep(scale.length).await;
    let quiet_to = (Instant::now(), cpu("after the quiet period")?);
    row.idle_cpu = (
        (quiet_to.1 - quiet_from.1).as_secs_f64() * 1e3,
        (quiet_to.0 - quiet_from.0).as_secs_f64(),
    );
    row.wake_up_us = floor.await.ok().flatten();
    // At the rate, then back to back.
    let (mut unobserved_failed, mut unobserved_lag) = (0, Duration::ZERO);
    let mut conn = HttpConn::new(worker.http);
    for (rate, total) in [(Some(scale.rate), changes), (None, BACK_TO_BACK)] {
        let applied_before = messages_applied(&mut conn).await?;
        let from = (Instant::now(), cpu("before the changes")?);
        let sent = send_changes(&env, accounts, total, rate).await?;
        unobserved_failed += sent.failed;
        if wait_revision(&worker, sent.last_revision(), DRAIN)
            .await
            .is_ok()
        {
            let to = (Instant::now(), cpu("after the changes")?);
            let used = Cpu {
                ms: (to.1 - from.1).as_secs_f64() * 1e3,
                secs: (to.0 - from.0).as_secs_f64(),
                changes: sent.returned.len(),
                messages: messages_applied(&mut conn)
                    .await?
                    .saturating_sub(applied_before),
            };
            if rate.is_some() {
                unobserved_lag = sent.max_lag;
                row.change_cpu = used;
            } else {
                row.back_to_back_cpu = used;
            }
        }
    }

    // (e) Propagation: as many changes again, the worker's `/readyz` polled every
    // millisecond.
    let stop = CancellationToken::new();
    let progress = Arc::new(Progress::default());
    let poll_limit = scale.length + DRAIN * 3;
    // On a thread and runtime of its own, so the calls being made do not delay the polls.
    let poller = {
        let (http, progress, stop) = (worker.http, progress.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            anyhow::Ok(runtime.block_on(poll(http, progress, stop, poll_limit)))
        })
    };
    let stop_on_drop = stop.clone().drop_guard();
    let sent = send_changes(&env, accounts, changes, Some(scale.rate)).await?;
    row.changes = sent.returned.len();
    row.failed_calls = sent.failed + unobserved_failed;
    row.max_send_lag_ms = sent.max_lag.max(unobserved_lag).as_secs_f64() * 1e3;
    row.rate.1 = sent.total as f64 / sent.sending.as_secs_f64();
    let last = sent.last_revision();
    let drain_until = Instant::now() + DRAIN;
    while progress.latest.load(Ordering::Relaxed) < last && Instant::now() < drain_until {
        tokio::time::sleep(POLL_EVERY).await;
    }
    // Every call has returned: one more poll answered after now covers any change that
    // returned after the worker had shown it.
    let polled = progress.polls.load(Ordering::Relaxed);
    while progress.polls.load(Ordering::Relaxed) < polled + 2 && Instant::now() < drain_until {
        tokio::time::sleep(POLL_EVERY).await;
    }
    drop(stop_on_drop);
    let samples = poller.await.context("the poller")??;
    let during: Vec<&(Instant, i64)> = samples
        .iter()
        .filter(|(at, _)| *at >= sent.started)
        .collect();
    row.polls = (
        during.len(),
        during
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1e3)
            .fold(0.0, f64::max),
    );
    let mut timed = propagation(&samples, &sent.returned);
    timed.times.sort_by(f64::total_cmp);
    timed.floors.sort_by(f64::total_cmp);
    row.propagation_ms = timed.times;
    row.propagation_floor_ms = timed.floors;
    row.missing = timed.missing;
    row.cp_rss_end_kib = env.control_plane().rss_kib()?;
    row.worker_rss_end_kib = worker.proc.rss_kib()?;
    anyhow::ensure!(
        row.changes > 0,
        "no UpdateIntegration call succeeded ({} failed)",
        row.failed_calls
    );
    drop(worker);
    drop(env);
    Ok(row)
}

/// How many messages of changes the worker has applied (one table built from each).
async fn messages_applied(conn: &mut HttpConn) -> anyhow::Result<u64> {
    let (_, metrics) = conn.get("/metrics").await?;
    let count = procs::metric(&metrics, "pushwire_worker_config_updates_total")
        .context("no pushwire_worker_config_updates_total in the worker's /metrics")?;
    Ok(count as u64)
}

/// The CPU one wake-up costs a thread of this process that sleeps `every` between wake-ups
/// and does nothing else, `wakes` times, µs (the thread's own CPU time, as the kernel
/// counts it for the worker's threads); `None` where the kernel does not say.
fn wake_up_cost(every: Duration, wakes: usize) -> Option<f64> {
    let own = || procs::run_time(Path::new("/proc/thread-self/schedstat"));
    let from = own()?;
    for _ in 0..wakes {
        std::thread::sleep(every);
    }
    let to = own()?;
    Some((to - from).as_secs_f64() * 1e6 / wakes.max(1) as f64)
}

/// Removes a directory when dropped (the size's data, also when it failed or timed out).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `accounts` accounts into the embedded store in `data` (created with its key file,
/// as the control plane would), [`IMPORTS_IN_FLIGHT`] at a time; the last revision.
async fn load(data: &Path, accounts: usize) -> anyhow::Result<i64> {
    let mut config = pushwire_control_plane::Config::defaults();
    config.data_dir = data.to_owned();
    config.etcd_endpoints.clear();
    let catalog = pushwire_control_plane::open_catalog(&config)
        .await
        .with_context(|| format!("opening the store in {}", data.display()))?;
    let mut imports = futures_util::stream::iter(0..accounts)
        .map(|a| import(&catalog, a))
        .buffer_unordered(IMPORTS_IN_FLIGHT);
    let mut revision = 0;
    let mut done = 0;
    let started = Instant::now();
    while let Some(imported) = imports.next().await {
        revision = revision.max(imported?);
        done += 1;
        if done % (accounts / 10).max(1) == 0 && accounts >= 10_000 {
            eprintln!(
                "bench: scale: {done} of {accounts} accounts loaded ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    drop(imports);
    // The store file is one process's at a time: closed here, before the control plane opens it.
    drop(catalog);
    Ok(revision)
}

/// The account of index `a`.
fn account_id(a: usize) -> String {
    (a + 1).to_string()
}

/// Imports account `a`: 5 integrations (https URLs of about 60 characters, an auth header, a
/// signing secret with both schemes) and 10 push scopes at every level, one of them
/// DO_NOT_PUSH; made as an admin's requests would be, read by the API's own conversion.
async fn import(catalog: &Catalog, a: usize) -> anyhow::Result<i64> {
    const NAMES: [&str; INTEGRATIONS_PER_ACCOUNT] =
        ["CRM", "Mailing", "Analytics", "Loyalty", "Data warehouse"];
    let id = account_id(a);
    let account = AccountName::from_id(&id)?;
    let mut integrations = Vec::with_capacity(INTEGRATIONS_PER_ACCOUNT);
    for (j, display_name) in NAMES.iter().enumerate() {
        let i = pb::Integration {
            display_name: (*display_name).into(),
            url: format!("https://hooks.customer-{a:07}.example.com/pushwire/v1/in/{j}?src=q"),
            auth_header: Some(pb::AuthHeader {
                name: "Authorization".into(),
                value: format!("Bearer scale-{a:07}-{j}-0123456789abcdef0123456789"),
                value_set: false,
            }),
            secret: "whsec_c2NhbGUtYmVuY2htYXJrLXNpZ25pbmctc2VjcmV0LTMy".into(),
            signature_schemes: vec![
                pb::SignatureScheme::Qualifio.into(),
                pb::SignatureScheme::StandardWebhooks.into(),
            ],
            ..Default::default()
        };
        integrations.push((format!("i{j}"), integration_create_patch(i)?));
    }
    use pb::PushAction::{DoNotPush, Push};
    use pb::PushScopeLevel::{Account, Campaign, MasterForm, Website};
    let rules: [(
        usize,
        pb::PushScopeLevel,
        String,
        pb::Audience,
        pb::PushAction,
    ); SCOPES_PER_ACCOUNT] = [
        (0, Account, String::new(), pb::Audience::All, Push),
        (0, Campaign, format!("c{a}-1"), pb::Audience::All, DoNotPush),
        (1, Website, format!("w{a}-1"), pb::Audience::All, Push),
        (
            1,
            Website,
            format!("w{a}-2"),
            pb::Audience::Identified,
            Push,
        ),
        (2, MasterForm, format!("mf{a}-1"), pb::Audience::All, Push),
        (2, Campaign, format!("c{a}-2"), pb::Audience::All, Push),
        (3, Account, String::new(), pb::Audience::Anonymous, Push),
        (3, Website, format!("w{a}-1"), pb::Audience::All, DoNotPush),
        (4, Campaign, format!("c{a}-3"), pb::Audience::All, Push),
        (
            4,
            Campaign,
            format!("c{a}-4"),
            pb::Audience::Identified,
            Push,
        ),
    ];
    let mut scopes = Vec::with_capacity(SCOPES_PER_ACCOUNT);
    for (k, (j, level, target_id, audience, action)) in rules.into_iter().enumerate() {
        let s = pb::PushScope {
            integration: format!("accounts/{id}/integrations/i{j}"),
            level: level.into(),
            target_id,
            audience: audience.into(),
            action: action.into(),
            ..Default::default()
        };
        scopes.push((format!("s{k}"), push_scope_create_patch(s)?));
    }
    let imported = catalog
        .import_account(&account, integrations, scopes)
        .await
        .with_context(|| format!("importing {account}"))?;
    Ok(imported.revision)
}

/// Polls the worker's `/readyz` every [`POLL_EVERY`] on one keep-alive connection until
/// `stop` or `limit`: when each answer arrived and the revision it showed, followed in
/// `progress`.
async fn poll(
    http: std::net::SocketAddr,
    progress: Arc<Progress>,
    stop: CancellationToken,
    limit: Duration,
) -> Vec<(Instant, i64)> {
    let mut conn = HttpConn::new(http);
    let mut samples = Vec::with_capacity(limit.as_millis() as usize);
    let until = Instant::now() + limit;
    while !stop.is_cancelled() && Instant::now() < until {
        if let Ok((_, body)) = conn.get("/readyz").await
            && let Some(revision) = procs::ready_revision(&body)
        {
            samples.push((Instant::now(), revision));
            progress.latest.fetch_max(revision, Ordering::Relaxed);
            progress.polls.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
    samples
}

/// What the poller has seen so far.
#[derive(Debug, Default)]
struct Progress {
    /// The highest revision shown.
    latest: AtomicI64,
    /// Polls answered with a revision.
    polls: AtomicU64,
}

/// The changes made.
struct Sent {
    /// When the first call was made.
    started: Instant,
    /// How long the calls were made for (first to last call made).
    sending: Duration,
    /// Calls made.
    total: usize,
    /// Each answered call's revision and when it returned.
    returned: Vec<(i64, Instant)>,
    /// Calls that failed.
    failed: usize,
    /// Longest a call started late on its schedule.
    max_lag: Duration,
}

impl Sent {
    /// The highest revision an answered call returned (0 if none did).
    fn last_revision(&self) -> i64 {
        self.returned.iter().map(|(r, _)| *r).max().unwrap_or(0)
    }
}

/// `total` `UpdateIntegration` calls of random integrations' auth header at `rate` a
/// second, open loop, or without a schedule (`None`: back to back); at most
/// [`CHANGES_IN_FLIGHT`] calls in flight (a call waits for a place and is then late on its
/// schedule), each bounded to 5 s.
async fn send_changes(
    env: &Env,
    accounts: usize,
    total: usize,
    rate: Option<f64>,
) -> anyhow::Result<Sent> {
    let places = Arc::new(Semaphore::new(CHANGES_IN_FLIGHT));
    let mut calls = JoinSet::new();
    let mut returned = Vec::with_capacity(total);
    let mut failed = 0;
    let mut first_error = None;
    let mut max_lag = Duration::ZERO;
    // A fixed-seed xorshift: the same integrations on every run.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut reap = |done: Result<Result<(i64, Instant), anyhow::Error>, _>| match done {
        Ok(Ok(change)) => returned.push(change),
        Ok(Err(e)) => {
            failed += 1;
            first_error.get_or_insert(format!("{e:#}"));
        }
        Err(e) => {
            failed += 1;
            first_error.get_or_insert(format!("{e}"));
        }
    };
    let started = Instant::now();
    for k in 0..total {
        let at = rate.map_or(started, |rate| {
            started + Duration::from_secs_f64(k as f64 / rate)
        });
        tokio::time::sleep_until(at.into()).await;
        let place = places.clone().acquire_owned().await?;
        max_lag = max_lag.max(at.elapsed());
        let a = (next() % accounts as u64) as usize;
        let j = next() % INTEGRATIONS_PER_ACCOUNT as u64;
        let name = format!("accounts/{}/integrations/i{j}", account_id(a));
        let mut client =
            pb::integration_service_client::IntegrationServiceClient::new(env.admin.clone());
        calls.spawn(async move {
            let _place = place;
            let call = client.update_integration(auth_header_change(
                name.clone(),
                format!("Bearer scale-change-{k}"),
            ));
            let updated = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .with_context(|| format!("UpdateIntegration {name}: no answer within 5 s"))?
                .with_context(|| format!("UpdateIntegration {name}"))?
                .into_inner();
            let at = Instant::now();
            let revision: i64 = updated.etag.parse().context("etag")?;
            Ok((revision, at))
        });
        while let Some(done) = calls.try_join_next() {
            reap(done);
        }
    }
    let sending = started.elapsed();
    while let Some(done) = calls.join_next().await {
        reap(done);
    }
    if let Some(e) = &first_error {
        eprintln!("bench: scale: {failed} UpdateIntegration calls failed; the first: {e}");
    }
    Ok(Sent {
        started,
        sending,
        total,
        returned,
        failed,
        max_lag,
    })
}

/// Propagation times, ms.
#[derive(Debug, Default, PartialEq)]
struct Timed {
    /// From each change's return to the first poll answered after it that showed its revision
    /// or a later one.
    times: Vec<f64>,
    /// From each change's return to the poll before that one, if it answered after the
    /// return, else 0: no change can have been applied earlier than this.
    floors: Vec<f64>,
    /// Changes no poll showed.
    missing: usize,
}

/// Each change's propagation: `samples` are the polls (when answered, revision shown),
/// `returned` the changes (revision, when its call returned).
fn propagation(samples: &[(Instant, i64)], returned: &[(i64, Instant)]) -> Timed {
    // The highest revision seen up to each poll (a worker's revision never goes back, but a
    // reconnection could show an older one for a moment).
    let mut seen = Vec::with_capacity(samples.len());
    let mut high = i64::MIN;
    for (at, revision) in samples {
        high = high.max(*revision);
        seen.push((*at, high));
    }
    let mut timed = Timed::default();
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
    for (revision, at) in returned {
        let after = seen.partition_point(|(t, _)| t < at);
        let showing = seen.partition_point(|(_, r)| r < revision);
        let first = after.max(showing);
        match seen.get(first) {
            Some((t, _)) => {
                timed.times.push(ms(*at, *t));
                let before = first.checked_sub(1).map(|i| seen[i].0);
                timed.floors.push(before.map_or(0.0, |b| ms(*at, b)));
            }
            None => timed.missing += 1,
        }
    }
    timed
}

fn num(v: f64) -> String {
    let s = format!("{v:.0}");
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The Markdown table: a row per size.
pub fn table(outcomes: &[Outcome], scale: &ScalePlan) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| Integrations (push scopes; accounts) | Bulk load | Control plane: ready (RSS) | Worker: ready (RSS then; settled, per integration) | Propagation at {}/s: p50 / p99 | Worker CPU per change: back to back (changes a message); at {}/s (this machine's cost of {} wake-ups a second, each) | Targets missed |",
        scale.rate, scale.rate, scale.rate
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    for (n, outcome) in outcomes {
        let row = match outcome {
            Ok(row) => row,
            Err(e) => {
                let _ = writeln!(
                    t,
                    "| {} | failed: {} | | | | | |",
                    num(*n as f64),
                    e.replace('|', "/").replace('\n', " ")
                );
                continue;
            }
        };
        let missed: Vec<&str> = row
            .targets()
            .iter()
            .filter(|(_, met)| *met != Some(true))
            .map(|(name, _)| *name)
            .collect();
        let _ = writeln!(
            t,
            "| {} ({}; {}) | {} objects/s ({:.1} s; store {:.0} MiB) | {:.2} s ({:.0} MiB) | {:.2} s ({:.0} MiB; {:.0} MiB, {:.2} KiB) | {} / {} ms ({} changes, {} missing; p99 at least {} ms, longest poll gap {:.0} ms) | {} | {} |",
            num(row.integrations as f64),
            num(row.scopes as f64),
            num(row.accounts as f64),
            num(row.load_rate()),
            row.load_secs,
            row.store_bytes as f64 / 1048576.0,
            row.cp_ready_secs,
            mib(row.cp_rss_kib),
            row.worker_ready_secs,
            mib(row.worker_rss_kib),
            mib(row.worker_rss_end_kib.0),
            row.worker_kib_per_integration(),
            row.p50().map_or("?".into(), |v| format!("{v:.2}")),
            row.p99().map_or("?".into(), |v| if v.is_finite() {
                format!("{v:.2}")
            } else {
                "missing".into()
            }),
            row.changes,
            row.missing,
            quantile(&row.propagation_floor_ms, 0.99).map_or("?".into(), |v| format!("{v:.2}")),
            row.polls.1,
            {
                let [at_rate, back_to_back] = row
                    .cpu_per_change_us()
                    .map(|c| c.map_or("?".into(), |v| format!("{v:.0} µs")));
                let batched = row
                    .back_to_back_cpu
                    .changes_per_message()
                    .map_or("?".into(), |v| format!("{v:.1}"));
                format!(
                    "{back_to_back} ({batched} changes a message); at {}/s {at_rate} ({} a wake-up)",
                    scale.rate,
                    row.wake_up_us.map_or("?".into(), |v| format!("{v:.0} µs"))
                )
            },
            if missed.is_empty() {
                "none".into()
            } else {
                missed.join(", ")
            },
        );
    }
    let _ = writeln!(
        t,
        "\nTargets: control-plane start-up ≤ {TARGET_CP_READY_SECS} s, a new worker ready ≤ {TARGET_WORKER_READY_SECS} s, worker RSS once settled ≤ {TARGET_WORKER_KIB_PER_INTEGRATION} KiB per integration (judged from {MEMORY_JUDGED_FROM} integrations on), propagation p99 ≤ {TARGET_PROPAGATION_P99_MS} ms at {}/s, ≤ {TARGET_CPU_PER_CHANGE_US} µs of worker CPU per change (back to back: the work of a change; at {}/s each change also wakes the idle worker).",
        scale.rate, scale.rate
    );
    t
}

/// The JSON of every size.
pub fn to_json(outcomes: &[Outcome], scale: &ScalePlan) -> Value {
    let rows: Vec<Value> = outcomes
        .iter()
        .map(|(n, outcome)| match outcome {
            Err(e) => json!({ "integrations": n, "error": e }),
            Ok(r) => {
                let targets: serde_json::Map<String, Value> = r
                    .targets()
                    .iter()
                    .map(|(name, met)| ((*name).to_owned(), json!(met)))
                    .collect();
                json!({
                    "integrations": r.integrations,
                    "push_scopes": r.scopes,
                    "accounts": r.accounts,
                    "load_secs": r.load_secs,
                    "load_objects_per_sec": r.load_rate(),
                    "store_mib": r.store_bytes as f64 / 1048576.0,
                    "control_plane_ready_secs": r.cp_ready_secs,
                    "control_plane_rss_mib": mib(r.cp_rss_kib),
                    "control_plane_rss_end_mib": mib(r.cp_rss_end_kib.0),
                    "control_plane_peak_rss_mib": mib(r.cp_rss_end_kib.1),
                    "worker_ready_secs": r.worker_ready_secs,
                    "worker_rss_mib": mib(r.worker_rss_kib),
                    "worker_kib_per_integration": r.worker_kib_per_integration(),
                    "worker_rss_end_mib": mib(r.worker_rss_end_kib.0),
                    "worker_peak_rss_mib": mib(r.worker_rss_end_kib.1),
                    "offered_rate": r.rate.0,
                    "achieved_rate": r.rate.1,
                    "max_send_lag_ms": r.max_send_lag_ms,
                    "changes": r.changes,
                    "failed_calls": r.failed_calls,
                    "missing": r.missing,
                    "propagation_p50_ms": r.p50(),
                    "propagation_p99_ms": r.p99().filter(|v| v.is_finite()),
                    "propagation_max_ms": r.propagation_ms.last(),
                    "propagation_p99_floor_ms": quantile(&r.propagation_floor_ms, 0.99),
                    "polls_during_changes": r.polls.0,
                    "longest_poll_gap_ms": r.polls.1,
                    "worker_idle_cpu_ms": r.idle_cpu.0,
                    "quiet_secs": r.idle_cpu.1,
                    "unobserved_changes": r.change_cpu.changes,
                    "worker_change_cpu_ms": r.change_cpu.ms,
                    "change_secs": r.change_cpu.secs,
                    "worker_cpu_per_change_us": r.cpu_per_change_us()[0],
                    "back_to_back_changes": r.back_to_back_cpu.changes,
                    "worker_back_to_back_cpu_ms": r.back_to_back_cpu.ms,
                    "back_to_back_secs": r.back_to_back_cpu.secs,
                    "worker_cpu_per_change_back_to_back_us": r.cpu_per_change_us()[1],
                    "back_to_back_changes_per_message": r.back_to_back_cpu.changes_per_message(),
                    "wake_up_cpu_us": r.wake_up_us,
                    "targets_met": targets,
                })
            }
        })
        .collect();
    json!({
        "rate": scale.rate,
        "length_secs": scale.length.as_secs_f64(),
        "integrations_per_account": INTEGRATIONS_PER_ACCOUNT,
        "push_scopes_per_account": SCOPES_PER_ACCOUNT,
        "sizes": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_is_matched_to_the_first_poll_after_it_showing_its_revision() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let samples = [(ms(1), 5), (ms(2), 7), (ms(4), 7), (ms(6), 9)];
        let returned = [
            // Shown before the call returned: the next poll after the return.
            (6, ms(3)),
            // Shown 3 ms after.
            (9, ms(3)),
            // Never shown.
            (10, ms(3)),
        ];
        let timed = propagation(&samples, &returned);
        assert_eq!(timed.times, vec![1.0, 3.0]);
        // The first: shown at the first poll after the return (none between); the second:
        // the poll at 4 ms did not show it yet.
        assert_eq!(timed.floors, vec![0.0, 1.0]);
        assert_eq!(timed.missing, 1);
    }

    #[test]
    fn worker_memory_is_judged_from_a_hundred_thousand_integrations() {
        let judged = |integrations: usize, rss_mib: u64| {
            let row = Row {
                integrations,
                worker_rss_end_kib: (rss_mib * 1024, 0),
                ..Row::default()
            };
            row.targets()
                .into_iter()
                .find(|(name, _)| *name == "worker memory")
                .map(|(_, met)| met)
        };
        // 34 MiB at 10,000 is 3.5 KiB each, mostly the fixed part: not judged.
        assert_eq!(judged(10_000, 34), None);
        assert_eq!(judged(100_000, 145), Some(Some(true)));
        assert_eq!(judged(100_000, 160), Some(Some(false)));
    }

    #[test]
    fn cpu_per_change_takes_idle_off() {
        let row = Row {
            idle_cpu: (100.0, 10.0),
            change_cpu: Cpu {
                ms: 250.0,
                secs: 12.0,
                changes: 1000,
                messages: 1000,
            },
            back_to_back_cpu: Cpu {
                ms: 90.0,
                secs: 2.0,
                changes: 2000,
                messages: 500,
            },
            ..Row::default()
        };
        let [at_rate, back_to_back] = row.cpu_per_change_us();
        // 250 ms - 10 ms/s × 12 s = 130 ms over 1,000 changes.
        assert!((at_rate.unwrap() - 130.0).abs() < 1e-9);
        // 90 ms - 10 ms/s × 2 s = 70 ms over 2,000 changes.
        assert!((back_to_back.unwrap() - 35.0).abs() < 1e-9);
        assert_eq!(row.back_to_back_cpu.changes_per_message(), Some(4.0));
        // A run whose last change never showed has no figure.
        let unseen = Row {
            back_to_back_cpu: Cpu::default(),
            ..row
        };
        assert_eq!(unseen.cpu_per_change_us()[1], None);
    }
}
