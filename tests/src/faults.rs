//! Harness of the fault-injection suite (`tests/tests/it/faults.rs`): the control plane and the
//! workers as real processes (the `*-under-test` binaries) on loopback ports that survive their
//! restarts; in-process receivers whose answers a scenario sets (random 500s, a stall, slow
//! answers) and which count every delivery by participation; a routing set-up over three
//! receivers; a background publication ([`Publication`]); and the figures each scenario
//! prints. Every wait is bounded.

mod traffic;

pub use traffic::{
    Behaviour, CountingReceiver, Figures, Publication, create_integration, create_scope, doc,
    expected_routes, route_three, tally,
};

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::Channel;

use crate::admin::Admin;
use crate::control_plane::with_token;
use crate::eventually::{Poll, eventually};
use crate::process::{Process, free_port};
use crate::receiver;
use crate::tokens::{Accounts, entry, write_token_file};

/// The account every scenario publishes for.
pub const ACCOUNT: &str = "accounts/faults";

/// The key that encrypts secrets at rest in the control planes of the suite.
const ENCRYPTION_KEY: &str = "faults:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The admin token of the control planes (`PUSHWIRE_ADMIN_TOKEN`).
pub const ADMIN_TOKEN: &str = "faults-admin-token";
/// The token workers present to the control plane (role `worker`).
pub const WORKER_TOKEN: &str = "faults-worker-token";
/// The token the publisher presents to workers (role `publisher` of [`ACCOUNT`]).
pub const PUBLISHER_TOKEN: &str = "faults-publisher-token";

/// Writes `dir/tokens.json`, the token file of the control plane and the workers: the worker
/// and publisher tokens, by hash.
fn token_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("tokens.json");
    write_token_file(
        &path,
        &[
            entry("faults worker", WORKER_TOKEN, "worker", Accounts::All),
            entry(
                "faults publisher",
                PUBLISHER_TOKEN,
                "publisher",
                Accounts::Only(&[ACCOUNT]),
            ),
        ],
    )?;
    Ok(path)
}

/// Bound on a process becoming ready.
pub const READY: Duration = Duration::from_secs(30);

/// Where the control plane keeps its data.
#[derive(Clone, Debug)]
pub enum Store {
    /// The embedded store in this directory.
    Embedded(PathBuf),
    /// etcd at this endpoint.
    Etcd(String),
}

/// `GET http://addr/path`: status and body, within 2 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let resp = tokio::time::timeout(
        Duration::from_secs(2),
        receiver::send("GET", &url, &[], b"", None),
    )
    .await
    .with_context(|| format!("GET {url} timed out"))??;
    Ok((
        resp.status,
        String::from_utf8_lossy(&resp.body).into_owned(),
    ))
}

/// Waits until `GET /readyz` on `http` answers 200 while `process` runs, at most `limit`.
async fn wait_ready(
    process: &mut Process,
    http: SocketAddr,
    limit: Duration,
) -> anyhow::Result<()> {
    let what = format!("{} ready", process.name());
    let ready = eventually(&what, limit, || {
        let running = process.check_running();
        async move {
            running?;
            Ok(match http_get(http, "/readyz").await {
                Ok((200, _)) => Poll::Ready(()),
                Ok((status, body)) => Poll::not_yet(format!("{status} {body}")),
                Err(e) => Poll::not_yet(e),
            })
        }
    })
    .await;
    ready.with_context(|| format!("log tail:\n{}", process.log_tail()))
}

fn args(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

/// A control plane process.
#[derive(Debug)]
pub struct ControlPlaneProc {
    /// The process.
    pub process: Process,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP operations address.
    pub http: SocketAddr,
}

impl ControlPlaneProc {
    /// Starts `bin` on `store` (plain `http://` loopback integrations allowed), its log in
    /// `dir`, and waits until it is ready.
    pub async fn start(bin: &Path, dir: &Path, store: &Store) -> anyhow::Result<Self> {
        Self::start_with(bin, dir, store, &[]).await
    }

    /// [`ControlPlaneProc::start`] with `extra` flags (`--with-worker` and its delivery flags,
    /// say).
    pub async fn start_with(
        bin: &Path,
        dir: &Path,
        store: &Store,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (g, h) = (grpc.to_string(), http.to_string());
        let tokens = token_file(dir)?;
        let mut a = args(&[
            "--grpc-addr",
            &g,
            "--http-addr",
            &h,
            "--token-file",
            &tokens.to_string_lossy(),
            "--allow-insecure-http",
            "--allow-cidr",
            "127.0.0.0/8",
            "--shutdown-grace",
            "2s",
        ]);
        match store {
            Store::Embedded(data) => a.extend([OsString::from("--data-dir"), data.into()]),
            Store::Etcd(endpoint) => {
                a.extend([OsString::from("--etcd-endpoints"), endpoint.into()]);
            }
        }
        a.extend(args(extra));
        let env = vec![
            ("PUSHWIRE_ENCRYPTION_KEY".into(), ENCRYPTION_KEY.into()),
            ("PUSHWIRE_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ];
        let process = Process::start("control plane", bin, a, env, dir.join("control-plane.log"))?;
        let mut cp = Self {
            process,
            grpc,
            http,
        };
        wait_ready(&mut cp.process, cp.http, READY).await?;
        Ok(cp)
    }

    /// SIGKILLs it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill().await
    }

    /// Starts it again on the same ports and store, and waits until it is ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()?;
        wait_ready(&mut self.process, self.http, READY).await
    }

    /// `http://` URL of its gRPC address.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Its admin API.
    pub async fn admin(&self) -> anyhow::Result<Admin> {
        let channel = Channel::from_shared(self.url())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .connect()
            .await?;
        Ok(Admin::new(with_token(channel, Some(ADMIN_TOKEN))))
    }
}

/// Worker settings of a scenario.
#[derive(Clone, Debug)]
pub struct WorkerFlags {
    /// `--window`.
    pub window: u32,
    /// `--retry-schedule`.
    pub retry_schedule: String,
    /// `--retry-window`.
    pub retry_window: String,
    /// `--request-timeout`.
    pub request_timeout: String,
    /// `--shutdown-grace`.
    pub shutdown_grace: String,
    /// `--breaker-threshold`.
    pub breaker_threshold: u32,
    /// `--delivery-store`; `None`: an SQLite file in the test's directory, shared by the
    /// workers of the test (`Some("")` starts the worker without one).
    pub delivery_store: Option<String>,
    /// `--delivery-lease`.
    pub delivery_lease: String,
    /// `--claim-interval`.
    pub claim_interval: String,
    /// More flags, as given.
    pub extra: Vec<String>,
}

impl Default for WorkerFlags {
    fn default() -> Self {
        Self {
            window: 128,
            // Ten retries: a receiver failing a fifth of its answers at random fails a delivery
            // about once in fifty million.
            retry_schedule: "50ms,100ms,200ms,400ms,800ms,1s,1s,1s,1s,1s".into(),
            retry_window: "60s".into(),
            request_timeout: "2s".into(),
            shutdown_grace: "3s".into(),
            breaker_threshold: 10,
            delivery_store: None,
            delivery_lease: "5s".into(),
            claim_interval: "20ms".into(),
            extra: Vec::new(),
        }
    }
}

/// The SQLite delivery store the workers of a test share, in its directory.
pub const DELIVERY_STORE_FILE: &str = "deliveries.sqlite3";

/// A worker process.
#[derive(Debug)]
pub struct WorkerProc {
    /// The process.
    pub process: Process,
    /// gRPC address (`IngestService`).
    pub grpc: SocketAddr,
    /// HTTP operations address.
    pub http: SocketAddr,
}

impl WorkerProc {
    /// Starts worker `n` (`bin`) following `control_plane`, its log in `dir`, and waits until
    /// it is ready (it applied a configuration snapshot).
    pub async fn start(
        bin: &Path,
        dir: &Path,
        n: usize,
        control_plane: &str,
        flags: &WorkerFlags,
    ) -> anyhow::Result<Self> {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (g, h, w, b) = (
            grpc.to_string(),
            http.to_string(),
            flags.window.to_string(),
            flags.breaker_threshold.to_string(),
        );
        let tokens = dir.join("tokens.json");
        let store = match &flags.delivery_store {
            None => format!("sqlite://{}", dir.join(DELIVERY_STORE_FILE).display()),
            Some(url) => url.clone(),
        };
        let mut a = args(&[
            "--grpc-addr",
            &g,
            "--http-addr",
            &h,
            "--token-file",
            &tokens.to_string_lossy(),
            "--control-plane",
            control_plane,
            "--allow-cidr",
            "127.0.0.0/8",
            "--window",
            &w,
            "--retry-schedule",
            &flags.retry_schedule,
            "--retry-window",
            &flags.retry_window,
            "--connect-timeout",
            "1s",
            "--request-timeout",
            &flags.request_timeout,
            "--shutdown-grace",
            &flags.shutdown_grace,
            "--breaker-threshold",
            &b,
            "--delivery-lease",
            &flags.delivery_lease,
            "--claim-interval",
            &flags.claim_interval,
        ]);
        if !store.is_empty() {
            a.extend(args(&["--delivery-store", &store]));
        }
        a.extend(flags.extra.iter().map(OsString::from));
        let process = Process::start(
            &format!("worker {n}"),
            bin,
            a,
            vec![("PUSHWIRE_CONTROL_PLANE_TOKEN".into(), WORKER_TOKEN.into())],
            dir.join(format!("worker-{n}.log")),
        )?;
        let mut w = Self {
            process,
            grpc,
            http,
        };
        wait_ready(&mut w.process, w.http, READY).await?;
        Ok(w)
    }

    /// Starts it again on the same ports, and waits until it is ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()?;
        wait_ready(&mut self.process, self.http, READY).await
    }

    /// `http://` URL of its gRPC address, for the publisher.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The configuration revision it routes with (`pushwire_worker_config_revision`).
    pub async fn config_revision(&self) -> anyhow::Result<i64> {
        let (_, metrics) = http_get(self.http, "/metrics").await?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("pushwire_worker_config_revision "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as i64)
            .context("no pushwire_worker_config_revision in /metrics")
    }

    /// The value of the unlabelled metric `name` in its `/metrics`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (_, metrics) = http_get(self.http, "/metrics").await?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no {name} in /metrics"))
    }

    /// Waits until it routes with `revision` or later, at most `limit`.
    pub async fn wait_revision(&self, revision: i64, limit: Duration) -> anyhow::Result<()> {
        let what = format!("{} at revision {revision}", self.process.name());
        eventually(&what, limit, || async {
            let r = self.config_revision().await;
            Ok(Poll::when(r.as_ref().is_ok_and(|r| *r >= revision), r))
        })
        .await
    }
}
