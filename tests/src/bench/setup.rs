//! The set-up every measurement shares: the plan of a run, the control plane and its tokens,
//! integrations routed to a receiver, and worker processes started and profiled on demand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::{Admin, integration, scope};
use pushwire_tests::control_plane::{AuthChannel, with_token};
use pushwire_tests::tokens::{Accounts, entry, write_token_file};
use tokio::runtime::Handle;

use crate::load::{self, Bodies, Target};
use crate::procs::{self, Binaries, HttpConn, Proc};

/// A Standard Webhooks secret: both signature schemes are computed for every delivery.
const SECRET: &str = "whsec_YmVuY2htYXJrLXNpZ25pbmctc2VjcmV0LTMyYnl0ZXM=";

/// Durations and sizes of a run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `--quick`.
    pub quick: bool,
    /// Load before each throughput measurement starts.
    pub warmup: Duration,
    /// Length of each throughput measurement.
    pub measure: Duration,
    /// Length of the fixed-rate latency measurement.
    pub latency: Duration,
    /// Offered rate of the latency measurement, participations per second.
    pub rate: f64,
    /// Happy-path deliveries/s before the durable hand-off (`--before-rps`).
    pub before_rps: f64,
    /// Configuration changes timed.
    pub changes: usize,
    /// Length of each isolation measurement.
    pub isolation: Duration,
    /// Participations left waiting for the memory measurement.
    pub waiting: u64,
    /// Deliveries queued for a dead endpoint in the retry start delay measurement.
    pub dead_queued: u64,
    /// How long the retry start delay measurement publishes.
    pub retry_delay: Duration,
    /// Publish streams of the throughput runs.
    pub streams: usize,
    /// Participations in flight per stream (the worker's default `--window`).
    pub window: usize,
    /// Connections of the baseline client (the worker's default per-integration
    /// `--concurrency`).
    pub conns: usize,
}

/// What every phase uses.
#[derive(Debug)]
pub struct Env {
    /// The binaries.
    pub bins: Binaries,
    /// Logs and data.
    pub dir: PathBuf,
    /// The receivers' runtime.
    pub rx: Handle,
    /// The clock of participation ids.
    pub epoch: Instant,
    /// The documents.
    pub bodies: Arc<Bodies>,
    /// Durations.
    pub plan: Plan,
    /// `perf record` output directory, if profiling.
    pub perf_dir: Option<PathBuf>,
    cp_grpc: SocketAddr,
    /// The control plane's gRPC channel, with the admin token.
    pub admin: AuthChannel,
    /// From starting the control plane to its `/readyz` answering 200.
    pub cp_ready: Duration,
    tokens: Tokens,
    cp: Proc,
}

/// Where the control plane of an [`Env`] keeps its data, and how long it may take to start.
#[derive(Clone, Debug)]
pub struct ControlPlaneData {
    /// `--data-dir` (the embedded store); may be filled before the control plane starts.
    pub dir: PathBuf,
    /// How long it may take to answer `/readyz` with 200.
    pub ready_within: Duration,
}

/// A worker process.
#[derive(Debug)]
pub struct Worker {
    /// The process.
    pub proc: Proc,
    /// gRPC (IngestService).
    pub grpc: SocketAddr,
    /// HTTP (/readyz, /metrics).
    pub http: SocketAddr,
    /// From starting the process to its routing on the revision it was waited for.
    pub ready_in: Duration,
}

/// The tokens of a run, and the files that hold them.
#[derive(Debug)]
struct Tokens {
    admin: String,
    publisher: Arc<str>,
    /// The token file (admin, publisher and worker, every account), for both binaries.
    file: PathBuf,
    /// The worker's token, for `--control-plane-token-file`.
    worker_file: PathBuf,
}

impl Tokens {
    /// Fresh random tokens; files in `dir`.
    fn write(dir: &std::path::Path) -> anyhow::Result<Self> {
        use pushwire_common::auth::generate_token;
        let [admin, publisher, worker] = [(); 3].map(|()| generate_token().expose().to_owned());
        let file = dir.join("tokens.json");
        write_token_file(
            &file,
            &[
                entry("bench admin", &admin, "admin", Accounts::All),
                entry("bench publisher", &publisher, "publisher", Accounts::All),
                entry("bench worker", &worker, "worker", Accounts::All),
            ],
        )?;
        let worker_file = dir.join("worker-token");
        std::fs::write(&worker_file, &worker)?;
        Ok(Self {
            admin,
            publisher: publisher.into(),
            file,
            worker_file,
        })
    }
}

impl Env {
    /// Starts the control plane (embedded store in `dir`).
    pub async fn start(
        bins: Binaries,
        dir: PathBuf,
        rx: Handle,
        plan: Plan,
        perf_dir: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let data = ControlPlaneData {
            dir: dir.join("cp-data"),
            ready_within: Duration::from_secs(30),
        };
        Self::start_on(bins, dir, rx, plan, perf_dir, data).await
    }

    /// Starts the control plane on `data` (logs and tokens in `dir`).
    pub async fn start_on(
        bins: Binaries,
        dir: PathBuf,
        rx: Handle,
        plan: Plan,
        perf_dir: Option<PathBuf>,
        data: ControlPlaneData,
    ) -> anyhow::Result<Self> {
        let epoch = Instant::now();
        let bodies = Arc::new(Bodies::new(load::BODY_BYTES, epoch)?);
        let tokens = Tokens::write(&dir)?;
        let grpc = procs::free_addr()?;
        let http = procs::free_addr()?;
        let args = vec![
            "--grpc-addr".into(),
            grpc.to_string(),
            "--http-addr".into(),
            http.to_string(),
            "--data-dir".into(),
            data.dir.display().to_string(),
            "--allow-insecure-http".into(),
            "--allow-cidr".into(),
            "127.0.0.0/8".into(),
            "--token-file".into(),
            tokens.file.display().to_string(),
        ];
        let started = Instant::now();
        let cp = Proc::spawn(
            "control-plane",
            &bins.control_plane,
            &args,
            dir.join("control-plane.log"),
        )?;
        procs::wait_ready(&cp, http, data.ready_within).await?;
        let cp_ready = started.elapsed();
        let admin = with_token(load::channel(grpc).await?, Some(&tokens.admin));
        Ok(Self {
            bins,
            dir,
            rx,
            epoch,
            bodies,
            plan,
            perf_dir,
            cp_grpc: grpc,
            admin,
            cp_ready,
            tokens,
            cp,
        })
    }

    /// The control plane's process.
    pub fn control_plane(&self) -> &Proc {
        &self.cp
    }

    pub fn target(&self, worker: &Worker) -> Target {
        Target {
            addr: worker.grpc,
            epoch: self.epoch,
            bodies: self.bodies.clone(),
            token: self.tokens.publisher.clone(),
        }
    }

    /// The closed loop of the Pushwire row on `worker`: `account`'s participations on the
    /// plan's streams and window, started, then left the warm-up; what it publishes is counted
    /// on the returned stats.
    pub async fn warm_closed_loop(
        &self,
        worker: &Worker,
        account: &str,
    ) -> anyhow::Result<(Arc<load::PubStats>, load::Load)> {
        let stats = Arc::new(load::PubStats::default());
        let load = load::closed_loop(
            &self.target(worker),
            vec![account.to_owned()],
            self.plan.streams,
            self.plan.window,
            stats.clone(),
            None,
        )
        .await?;
        tokio::time::sleep(self.plan.warmup).await;
        Ok((stats, load))
    }

    /// Creates integration `id` in `account`, posting to `url`, signed with both schemes,
    /// with an `Authorization` header and an ACCOUNT-level scope; its name and the revision
    /// of the last change.
    pub async fn routed(
        &self,
        account: &str,
        id: &str,
        url: &str,
    ) -> anyhow::Result<(String, i64)> {
        let admin = Admin::new(self.admin.clone());
        let created = admin
            .create_integration(
                account,
                id,
                pb::Integration {
                    secret: SECRET.into(),
                    signature_schemes: vec![
                        pb::SignatureScheme::Qualifio.into(),
                        pb::SignatureScheme::StandardWebhooks.into(),
                    ],
                    auth_header: Some(pb::AuthHeader {
                        name: "Authorization".into(),
                        value: "Bearer bench-token".into(),
                        value_set: false,
                    }),
                    ..integration(id, url)
                },
            )
            .await
            .with_context(|| format!("creating {account}/integrations/{id}"))?;
        let scope = admin
            .create_scope(
                account,
                id,
                scope(&created.name, pb::PushScopeLevel::Account, ""),
            )
            .await
            .with_context(|| format!("creating {account}/pushScopes/{id}"))?;
        Ok((created.name, scope.etag.parse().context("scope etag")?))
    }

    /// The delivery store (`sqlite://PATH`) of the worker [`Env::worker`] starts as `name`
    /// unless told another: a phase may fill it before the worker starts.
    pub fn store_url(&self, name: &str) -> String {
        format!(
            "sqlite://{}",
            self.dir
                .join(format!("deliveries-{name}.sqlite3"))
                .display()
        )
    }

    /// Starts a worker with the defaults plus `extra` flags, waits until it routes with
    /// configuration revision `revision` or later.
    pub async fn worker(
        &self,
        name: &str,
        extra: &[&str],
        revision: i64,
    ) -> anyhow::Result<Worker> {
        self.worker_within(name, extra, revision, Duration::from_secs(30))
            .await
    }

    /// [`Env::worker`], waiting at most `limit` for it to answer `/readyz` and then as long
    /// again for `revision`.
    pub async fn worker_within(
        &self,
        name: &str,
        extra: &[&str],
        revision: i64,
        limit: Duration,
    ) -> anyhow::Result<Worker> {
        let grpc = procs::free_addr()?;
        let http = procs::free_addr()?;
        let mut args: Vec<String> = vec![
            "--grpc-addr".into(),
            grpc.to_string(),
            "--http-addr".into(),
            http.to_string(),
            "--control-plane".into(),
            format!("http://{}", self.cp_grpc),
            "--allow-cidr".into(),
            "127.0.0.0/8".into(),
            "--token-file".into(),
            self.tokens.file.display().to_string(),
            "--control-plane-token-file".into(),
            self.tokens.worker_file.display().to_string(),
        ];
        if !extra.contains(&"--delivery-store") {
            // An SQLite store of its own unless the phase names one (PostgreSQL, say).
            args.push("--delivery-store".into());
            args.push(self.store_url(name));
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let started = Instant::now();
        let proc = Proc::spawn(
            &format!("worker ({name})"),
            &self.bins.worker,
            &args,
            self.dir.join(format!("worker-{name}.log")),
        )?;
        procs::wait_ready(&proc, http, limit).await?;
        let mut worker = Worker {
            proc,
            grpc,
            http,
            ready_in: Duration::ZERO,
        };
        wait_revision(&worker, revision, limit.max(Duration::from_secs(10))).await?;
        worker.ready_in = started.elapsed();
        Ok(worker)
    }

    /// Records the worker with `perf` for `length`, if profiling.
    pub fn perf(&self, worker: &Worker, phase: &str, length: Duration) -> Option<Proc> {
        let dir = self.perf_dir.as_ref()?;
        // `PUSHWIRE_BENCH_PERF_ARGS` replaces the sampling options, e.g. "-F 499 --call-graph dwarf".
        let options = std::env::var("PUSHWIRE_BENCH_PERF_ARGS").unwrap_or("-F 999 -g".into());
        let mut args: Vec<String> = vec!["record".into()];
        args.extend(options.split_whitespace().map(str::to_owned));
        args.extend([
            "-o".into(),
            dir.join(format!("{phase}.perf.data")).display().to_string(),
            "-p".into(),
            worker.proc.pid.to_string(),
            "--".into(),
            "sleep".into(),
            length.as_secs().max(1).to_string(),
        ]);
        match Proc::spawn(
            "perf",
            std::path::Path::new("perf"),
            &args,
            dir.join(format!("{phase}.perf.log")),
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("bench: perf not started: {e:#}");
                None
            }
        }
    }
}

/// Waits until the worker's `/readyz` reports `revision` or later.
pub async fn wait_revision(worker: &Worker, revision: i64, limit: Duration) -> anyhow::Result<()> {
    let mut conn = HttpConn::new(worker.http);
    let deadline = Instant::now() + limit;
    loop {
        let (_, body) = conn.get("/readyz").await?;
        if procs::ready_revision(&body).is_some_and(|r| r >= revision) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "worker not at revision {revision} after {limit:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `UpdateIntegration` of `name`'s `Authorization` header to `value`: the change whose
/// propagation the benchmarks time.
pub fn auth_header_change(name: String, value: String) -> pb::UpdateIntegrationRequest {
    pb::UpdateIntegrationRequest {
        integration: Some(pb::Integration {
            name,
            auth_header: Some(pb::AuthHeader {
                name: "Authorization".into(),
                value,
                value_set: false,
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["auth_header".into()],
        }),
    }
}
