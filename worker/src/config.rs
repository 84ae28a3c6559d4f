//! Command-line flags of the worker, each with a `PUSHWIRE_*` environment variable.
//! [`WebhookArgs`] (how webhooks are sent) come from `pushwire_common::webhook` and the token
//! and TLS flags ([`AccessArgs`]) from `pushwire_common::server::access`; [`IngestArgs`] and
//! [`DeliveryArgs`] are also taken by the control plane for its in-process worker
//! (`--with-worker`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use pushwire_common::auth::Bearer;
use pushwire_common::domain::Secret;
use pushwire_common::server::access::{AccessArgs, AccessError, read_file, secret_from_env};
use pushwire_common::server::telemetry::LogFormat;
use pushwire_common::target::{CONTROL_PLANE_PORT, Target};
use pushwire_common::webhook::WebhookArgs;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::control_plane::ControlPlanes;

use crate::budget::{self, ByteSize};
use pushwire_common::delivery_store::{InvalidStoreUrl, StoreUrl};

use crate::deliver::dispatch::DispatchOptions;
use crate::deliver::retries::{self, RetryOptions};
use crate::deliver::retry::{self, RetryPolicy};

/// The worker's own delivery flags: the delivery store, retries and isolation. How webhooks
/// are sent (timeouts, SSRF allow-list, trusted CAs) is [`WebhookArgs`], shared with the control
/// plane.
#[derive(Clone, Debug, Args)]
pub struct DeliveryArgs {
    /// Where deliveries whose first attempt did not succeed are handed off and retried from:
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite://PATH. Required by a standalone
    /// worker; control-plane --with-worker defaults to sqlite://DATA_DIR/deliveries.sqlite3.
    #[arg(long, env = "PUSHWIRE_DELIVERY_STORE", value_parser = DeliveryStoreArg::parse, hide_env_values = true)]
    pub delivery_store: Option<DeliveryStoreArg>,

    /// Also record the final outcomes of first attempts (delivered, failed, skipped), with
    /// their attempts and bodies, in the delivery store (the delivery log), in batches the
    /// acknowledgement does not wait for.
    #[arg(long, env = "PUSHWIRE_DELIVERY_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub delivery_log: bool,

    /// Delays between attempts, comma-separated; the first attempt is immediate, the retries
    /// come from the delivery store. Each delay gets ±20 % jitter.
    #[arg(long, env = "PUSHWIRE_RETRY_SCHEDULE", default_value = retry::DEFAULT_SCHEDULE_FLAG, value_parser = Schedule::parse)]
    pub retry_schedule: Schedule,

    /// Time from a delivery's acceptance after which no retry starts: it then ends as FAILED.
    #[arg(long, env = "PUSHWIRE_RETRY_WINDOW", default_value = "36h", value_parser = humantime::parse_duration)]
    pub retry_window: Duration,

    /// How long a claim on a due delivery is exclusive; a killed worker's claims are retried
    /// by another worker after it.
    #[arg(long, env = "PUSHWIRE_DELIVERY_LEASE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub delivery_lease: Duration,

    /// Pause between looks for due retries when none was due; a delivery this worker queued is
    /// looked for when it falls due, so this only bounds how late another worker's are noticed.
    #[arg(long, env = "PUSHWIRE_CLAIM_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub claim_interval: Duration,

    /// This worker's name on its claims (default: host name, process id and a random suffix).
    #[arg(long, env = "PUSHWIRE_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Attempts in flight per integration.
    #[arg(long, env = "PUSHWIRE_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,

    /// Consecutive failures that open an integration's circuit breaker.
    #[arg(long, env = "PUSHWIRE_BREAKER_THRESHOLD", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_threshold: u32,
}

/// `--delivery-store` as given. Parsing never fails here (a parse error would quote the URL,
/// password included): an invalid URL is reported, redacted, when the worker starts.
#[derive(Clone, Debug)]
pub struct DeliveryStoreArg(pub Result<StoreUrl, InvalidStoreUrl>);

impl DeliveryStoreArg {
    fn parse(s: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(StoreUrl::parse(s)))
    }
}

impl From<StoreUrl> for DeliveryStoreArg {
    fn from(url: StoreUrl) -> Self {
        Self(Ok(url))
    }
}

/// The waits between attempts, as given to `--retry-schedule` (empty: no retries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

impl Schedule {
    fn parse(s: &str) -> Result<Self, String> {
        retry::parse_schedule(s).map(Self)
    }
}

impl DeliveryArgs {
    /// The defaults, as if given no flags.
    pub fn defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            delivery: DeliveryArgs,
        }
        Only::parse_from(["delivery"]).delivery
    }

    /// Retry and isolation settings.
    pub fn dispatch_options(&self) -> DispatchOptions {
        DispatchOptions {
            retry: RetryPolicy {
                delays: self.retry_schedule.0.clone(),
                jitter: retry::DEFAULT_JITTER,
                window: self.retry_window,
            },
            concurrency: self.concurrency as usize,
            breaker_threshold: self.breaker_threshold,
            slot_wait: crate::deliver::dispatch::DEFAULT_SLOT_WAIT,
        }
    }

    /// Claimer settings.
    pub fn retry_options(&self) -> RetryOptions {
        RetryOptions {
            worker_id: self
                .worker_id
                .clone()
                .unwrap_or_else(retries::default_worker_id),
            lease: self.delivery_lease,
            poll: self.claim_interval,
            capacity: retries::DEFAULT_CAPACITY,
        }
    }
}

/// Ingest settings shared by the standalone worker and `control-plane --with-worker`.
#[derive(Clone, Debug, Args)]
pub struct IngestArgs {
    /// Participations in flight per Publish stream; when full the worker stops reading the
    /// stream and gRPC flow control pushes back on the publisher.
    #[arg(long, env = "PUSHWIRE_WINDOW", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub window: u32,

    /// Largest participation document accepted, in bytes.
    #[arg(long, env = "PUSHWIRE_MAX_PARTICIPATION_BYTES", default_value_t = pushwire_common::participation::DEFAULT_MAX_BYTES)]
    pub max_participation_bytes: usize,

    /// Bytes of participations held in memory, every stream and PublishOne call together
    /// (each counts its document plus 8 KiB until acknowledged), e.g. 256MiB. When spent,
    /// streams are not read and PublishOne waits up to 1 s, then gets RESOURCE_EXHAUSTED. At
    /// least --max-participation-bytes.
    #[arg(long, env = "PUSHWIRE_MEMORY_BUDGET", default_value_t = budget::DEFAULT_BUDGET)]
    pub memory_budget: ByteSize,
}

/// `--memory-budget` cannot hold the largest participation allowed.
#[derive(Debug, thiserror::Error)]
#[error(
    "--memory-budget {budget} is smaller than --max-participation-bytes {max}: the largest \
     participation could never be held"
)]
pub struct BudgetTooSmall {
    /// The budget given.
    pub budget: ByteSize,
    /// `--max-participation-bytes`.
    pub max: usize,
}

impl IngestArgs {
    /// Checks the flags together: the budget holds at least the largest participation.
    pub fn check(&self) -> Result<(), BudgetTooSmall> {
        if self.memory_budget.bytes() < self.max_participation_bytes as u64 {
            return Err(BudgetTooSmall {
                budget: self.memory_budget,
                max: self.max_participation_bytes,
            });
        }
        Ok(())
    }
}

/// How the worker authenticates to the control plane: its token and TLS.
#[derive(Clone, Debug, Args)]
pub struct ControlPlaneClientArgs {
    /// File holding the token (a `worker` token) this worker presents to the control plane.
    /// Without it, the variable PUSHWIRE_CONTROL_PLANE_TOKEN.
    #[arg(long, env = "PUSHWIRE_CONTROL_PLANE_TOKEN_FILE")]
    pub control_plane_token_file: Option<PathBuf>,

    /// PUSHWIRE_CONTROL_PLANE_TOKEN, from the environment only.
    #[arg(skip = secret_from_env("PUSHWIRE_CONTROL_PLANE_TOKEN"))]
    pub control_plane_token: Option<Secret>,

    /// PEM CA certificates trusted for an https:// --control-plane (else the system's roots).
    #[arg(long, env = "PUSHWIRE_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,

    /// PEM client certificate presented to the control plane (mTLS), with --tls-client-key.
    #[arg(long, env = "PUSHWIRE_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "PUSHWIRE_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ControlPlaneClientArgs {
    /// The token to present: the token file's content (trimmed), else the variable.
    pub fn bearer(&self) -> Result<Bearer, AccessError> {
        let token = match &self.control_plane_token_file {
            Some(path) => {
                let bytes = read_file("--control-plane-token-file", path)?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    AccessError::Tls("--control-plane-token-file: not UTF-8".into())
                })?;
                Some(Secret::new(text.trim()))
            }
            None => self.control_plane_token.clone(),
        };
        match token {
            Some(t) if !t.expose().is_empty() => {
                Bearer::new(&t).map_err(|e| AccessError::Token("control-plane token", e))
            }
            _ => {
                tracing::warn!(
                    "no control-plane token (--control-plane-token-file, \
                     PUSHWIRE_CONTROL_PLANE_TOKEN): WatchConfig will be refused"
                );
                Ok(Bearer::none())
            }
        }
    }

    /// The control planes at `entries` (`--control-plane`), with the token and, for
    /// `https://` entries, TLS: the CA, client certificate and server name (the entry's host,
    /// whichever of its addresses is connected to) apply to every address. The files are read
    /// once, here.
    pub fn control_planes(&self, entries: &[String]) -> Result<ControlPlanes, AccessError> {
        let targets = entries
            .iter()
            .map(|e| Target::parse(e, CONTROL_PLANE_PORT))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AccessError::Tls(format!("--control-plane: {e}")))?;
        if targets.is_empty() {
            return Err(AccessError::Tls("--control-plane: no address given".into()));
        }
        let tls_files = self.control_plane_ca.is_some() || self.tls_client_cert.is_some();
        if tls_files && targets.iter().any(|t| !t.tls) {
            return Err(AccessError::Tls(
                "--control-plane-ca and --tls-client-cert need https:// --control-plane addresses"
                    .into(),
            ));
        }
        let ca = match &self.control_plane_ca {
            Some(ca) => Some(read_file("--control-plane-ca", ca)?),
            None => None,
        };
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Some((
                read_file("--tls-client-cert", cert)?,
                read_file("--tls-client-key", key)?,
            )),
            _ => None,
        };
        let connect = move |target: &Target, addr: SocketAddr| -> Result<Endpoint, String> {
            let origin = target.origin().parse().map_err(|e| format!("{e}"))?;
            let endpoint = crate::control_plane::endpoint(format!("{}://{addr}", target.scheme()))
                .map_err(|e| e.to_string())?
                .origin(origin);
            if !target.tls {
                return Ok(endpoint);
            }
            let mut tls = ClientTlsConfig::new().domain_name(target.host.clone());
            tls = match &ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS settings: {e}"))
        };
        Ok(ControlPlanes::targets(
            targets,
            self.bearer()?,
            Box::new(connect),
        ))
    }
}

/// Checks one `--control-plane` value (each of its comma-separated entries is one value).
fn control_plane_entry(s: &str) -> Result<String, String> {
    Target::parse(s, CONTROL_PLANE_PORT)
        .map(|_| s.trim().to_owned())
        .map_err(|e| e.to_string())
}

/// Pushwire worker: watches the configuration, accepts participation streams and delivers
/// them as signed webhooks.
#[derive(Clone, Debug, Parser)]
#[command(name = "worker", version)]
pub struct Config {
    /// gRPC listen address (IngestService, health, reflection).
    #[arg(long, env = "PUSHWIRE_GRPC_ADDR", default_value = "127.0.0.1:50052")]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address for /healthz, /readyz and /metrics.
    #[arg(long, env = "PUSHWIRE_HTTP_ADDR", default_value = "127.0.0.1:8082")]
    pub http_addr: SocketAddr,

    /// The control planes' gRPC addresses, for WatchConfig and for disabling integrations
    /// that answer 410 Gone: comma-separated and/or repeated; https:// for TLS; a name stands
    /// for every address it resolves to (dns:///NAME:PORT for a headless service), resolved
    /// again on each failover cycle. The worker follows one at a time and moves to the next
    /// when it fails.
    #[arg(
        long,
        env = "PUSHWIRE_CONTROL_PLANE",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ',',
        value_parser = control_plane_entry,
    )]
    pub control_plane: Vec<String>,

    /// Time without confirmation from a control plane that the configuration is current
    /// after which the worker logs a warning (it keeps routing with the configuration it has).
    #[arg(long, env = "PUSHWIRE_CONFIG_STALE_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub config_stale_after: Duration,

    /// Largest WatchConfig message accepted, in bytes; snapshots larger than half of it come
    /// in parts. For tests of snapshots in parts.
    #[arg(long, env = "PUSHWIRE_WATCH_MAX_MESSAGE_SIZE", hide = true, default_value_t = crate::config_watch::DEFAULT_MAX_MESSAGE_SIZE)]
    pub watch_max_message_size: usize,

    #[command(flatten)]
    pub control_plane_client: ControlPlaneClientArgs,

    #[command(flatten)]
    pub access: AccessArgs,

    #[command(flatten)]
    pub ingest: IngestArgs,

    #[command(flatten)]
    pub webhook: WebhookArgs,

    #[command(flatten)]
    pub delivery: DeliveryArgs,

    /// Time allowed to finish in-flight attempts after SIGTERM/SIGINT; unacknowledged
    /// participations are then left to the publisher to re-publish, and claimed retries to
    /// their leases.
    #[arg(long, env = "PUSHWIRE_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format: text or json.
    #[arg(long, env = "PUSHWIRE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The defaults, as if started with no flags (for tests and embedding).
    pub fn defaults() -> Self {
        Self::parse_from(["worker"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::defaults();
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50052");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8082");
        assert_eq!(c.control_plane, ["http://127.0.0.1:50051"]);
        assert_eq!(c.config_stale_after, Duration::from_secs(30));
        let d = c.delivery.dispatch_options();
        assert_eq!(d.retry.delays, retry::DEFAULT_SCHEDULE.to_vec());
        assert_eq!(d.retry.window, retry::DEFAULT_WINDOW);
        assert_eq!(d.concurrency, 32);
        assert_eq!(d.breaker_threshold, 10);
        assert_eq!(c.webhook.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.webhook.request_timeout, Duration::from_secs(15));
        assert!(c.webhook.client().is_ok());
    }

    #[test]
    fn flags_parse() {
        let c = Config::parse_from([
            "worker",
            "--allow-cidr",
            "127.0.0.0/8",
            "--allow-cidr",
            "::1/128",
            "--retry-schedule",
            "10ms,20ms",
            "--retry-window",
            "1s",
            "--window",
            "8",
        ]);
        assert_eq!(c.webhook.allow_cidr, ["127.0.0.0/8", "::1/128"]);
        assert_eq!(
            c.delivery.retry_schedule.0,
            [Duration::from_millis(10), Duration::from_millis(20)]
        );
        assert_eq!(c.ingest.window, 8);
        assert!(c.webhook.client().is_ok());
    }

    #[test]
    fn control_planes_are_a_list() {
        let c = Config::parse_from([
            "worker",
            "--control-plane",
            "http://10.0.0.1:50051, 10.0.0.2",
            "--control-plane",
            "dns:///pushwire-control-plane-headless.pushwire.svc:50051",
        ]);
        assert_eq!(
            c.control_plane,
            [
                "http://10.0.0.1:50051",
                "10.0.0.2",
                "dns:///pushwire-control-plane-headless.pushwire.svc:50051"
            ]
        );
        let single = Config::parse_from(["worker", "--control-plane", "https://cp.example:443"]);
        assert_eq!(single.control_plane, ["https://cp.example:443"]);
        let err = Config::try_parse_from(["worker", "--control-plane", "http://a:1,ftp://b:2"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ftp://b:2"), "{err}");
        assert!(Config::try_parse_from(["worker", "--control-plane", "a:0"]).is_err());
    }

    #[tokio::test]
    async fn control_plane_tls_files_need_https_everywhere() {
        let mut c = Config::parse_from(["worker", "--control-plane", "https://a:1,http://b:2"]);
        c.control_plane_client.control_plane_ca = Some("/nonexistent/ca.pem".into());
        let err = c
            .control_plane_client
            .control_planes(&c.control_plane)
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
        let plain = Config::parse_from(["worker", "--control-plane", "127.0.0.1:1,127.0.0.1:2"]);
        let planes = plain
            .control_plane_client
            .control_planes(&plain.control_plane)
            .unwrap();
        let names: Vec<_> = planes
            .candidates()
            .await
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["127.0.0.1:1", "127.0.0.1:2"]);
    }

    #[test]
    fn the_memory_budget_holds_the_largest_participation() {
        let c = Config::defaults();
        assert_eq!(c.ingest.memory_budget, budget::DEFAULT_BUDGET);
        assert!(c.ingest.check().is_ok());
        let c = Config::parse_from(["worker", "--memory-budget", "64MiB"]);
        assert_eq!(c.ingest.memory_budget.bytes(), 64 << 20);
        let small = Config::parse_from([
            "worker",
            "--memory-budget",
            "512KiB",
            "--max-participation-bytes",
            "1048576",
        ]);
        let err = small.ingest.check().unwrap_err().to_string();
        assert!(
            err.starts_with("--memory-budget 512KiB is smaller than --max-participation-bytes"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let bad_cidr = Config::parse_from(["worker", "--allow-cidr", "10.0.0.0/33"]);
        let err = bad_cidr.webhook.client().unwrap_err().to_string();
        assert!(err.starts_with("--allow-cidr"), "{err}");

        let missing_ca = Config::parse_from(["worker", "--extra-ca-file", "/nonexistent/ca.pem"]);
        let err = missing_ca.webhook.client().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");

        assert!(Config::try_parse_from(["worker", "--window", "0"]).is_err());
        assert!(Config::try_parse_from(["worker", "--memory-budget", "lots"]).is_err());
        assert!(Config::try_parse_from(["worker", "--retry-schedule", "soon"]).is_err());
    }

    #[test]
    fn the_delivery_store_url_is_never_shown_with_its_password() {
        let c = Config::parse_from([
            "worker",
            "--delivery-store",
            "postgres://pushwire:hunter2@db:5432/pushwire",
        ]);
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(c.delivery.delivery_store.unwrap().0.is_ok());
        let bad = Config::parse_from(["worker", "--delivery-store", "mysql://u:hunter2@db/x"]);
        let err = bad
            .delivery
            .delivery_store
            .unwrap()
            .0
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn the_default_schedule_spans_a_day_within_the_window() {
        let d = DeliveryArgs::defaults().dispatch_options();
        let total: Duration = d.retry.delays.iter().sum();
        assert!(total >= Duration::from_secs(24 * 3600), "{total:?}");
        // Without jitter every step starts within the window.
        assert!(total <= d.retry.window);
    }
}
