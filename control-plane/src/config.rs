//! Command-line flags of the control plane, each with a `PUSHWIRE_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pushwire_common::delivery_store::DeliveryLogArgs;
use pushwire_common::server::access::AccessArgs;
use pushwire_common::server::telemetry::LogFormat;
use pushwire_common::webhook::WebhookArgs;
use pushwire_worker::config::{DeliveryArgs, IngestArgs};

/// Pushwire control plane: stores integrations and push scopes (in etcd, or in an embedded
/// single-file store) and streams them to workers.
#[derive(Clone, Debug, Parser)]
#[command(name = "control-plane", version)]
pub struct Config {
    /// gRPC listen address (admin API, WatchConfig, health, reflection).
    #[arg(long, env = "PUSHWIRE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address for /healthz, /readyz and /metrics.
    #[arg(long, env = "PUSHWIRE_HTTP_ADDR", default_value = "127.0.0.1:8081")]
    pub http_addr: SocketAddr,

    /// etcd endpoints, comma-separated (e.g. http://10.0.0.1:2379). When absent, the embedded
    /// store in --data-dir is used.
    #[arg(long, env = "PUSHWIRE_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// With etcd: compact its history every interval, keeping one interval of it (one replica
    /// at a time, as the Kubernetes API server does); 0 turns it off for an etcd compacted by
    /// its operators (--auto-compaction-retention or a job). The embedded store keeps a bounded
    /// history by itself.
    #[arg(long, env = "PUSHWIRE_ETCD_COMPACTION_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub etcd_compaction_interval: Duration,

    /// Directory of the embedded store (used when no etcd endpoint is given).
    #[arg(long, env = "PUSHWIRE_DATA_DIR", default_value = "./pushwire-data")]
    pub data_dir: PathBuf,

    /// File of the keys that encrypt secrets at rest: lines `key-id:base64-of-32-bytes`, the
    /// first encrypting, the others only decrypting (key rotation). Without it, the variable
    /// PUSHWIRE_ENCRYPTION_KEY (one such line); without either, on the embedded store only,
    /// `<data-dir>/encryption.key`, generated on first start.
    #[arg(long, env = "PUSHWIRE_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,

    /// One key, `key-id:base64`, from the environment variable PUSHWIRE_ENCRYPTION_KEY only:
    /// never a flag, since command lines are visible to every local user.
    #[arg(skip = crate::crypto::key_from_env())]
    pub encryption_key: Option<pushwire_common::domain::Secret>,

    /// Re-encrypt every stored secret under the current (first) key, print counts and exit,
    /// without serving. Other replicas may run meanwhile (the embedded store must be stopped).
    #[arg(long)]
    pub reencrypt: bool,

    /// Accept plain http:// integration URLs (development and tests only).
    #[arg(long, env = "PUSHWIRE_ALLOW_INSECURE_HTTP")]
    pub allow_insecure_http: bool,

    /// How long a replaced signing secret keeps signing beside the new one (e.g. 30m, 24h).
    #[arg(long, env = "PUSHWIRE_SECRET_ROTATION_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub secret_rotation_grace: Duration,

    /// Revisions kept in memory so that a reconnecting worker resumes its WatchConfig stream
    /// from where it was; older workers get a fresh snapshot.
    #[arg(long, env = "PUSHWIRE_WATCH_HISTORY", default_value_t = crate::service::feed::DEFAULT_HISTORY)]
    pub watch_history: usize,

    /// Pause between the progress messages of a WatchConfig stream (an empty message at the
    /// watcher's revision, sent while this control plane's store watch is live: the worker's
    /// proof that its configuration is current). Hidden: for tests.
    #[arg(long, env = "PUSHWIRE_WATCH_PROGRESS_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration, hide = true)]
    pub watch_progress_interval: Duration,

    /// After sending a WatchConfig stream changes, wait this long per revision sent, at most
    /// five times as long, before sending it more: revisions committed meanwhile go out
    /// together, in one message (a worker then wakes and swaps its table once for all of
    /// them). While changes come slower than one per window each waits at most one window;
    /// faster, the wait grows with each message to five windows; 0 sends each revision as
    /// soon as it is committed
    #[arg(long, env = "PUSHWIRE_WATCH_BATCH_WINDOW", default_value = "2ms", value_parser = humantime::parse_duration)]
    pub watch_batch_window: Duration,

    /// Most integrations one account may have; creating one more fails with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "PUSHWIRE_MAX_INTEGRATIONS_PER_ACCOUNT", default_value_t = crate::service::DEFAULT_MAX_INTEGRATIONS_PER_ACCOUNT, value_parser = per_account_limit)]
    pub max_integrations_per_account: usize,

    /// Most push scopes one account may have; creating one more fails with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "PUSHWIRE_MAX_PUSH_SCOPES_PER_ACCOUNT", default_value_t = crate::service::DEFAULT_MAX_PUSH_SCOPES_PER_ACCOUNT, value_parser = per_account_limit)]
    pub max_push_scopes_per_account: usize,

    /// Time allowed to finish in-flight calls after SIGTERM/SIGINT.
    #[arg(long, env = "PUSHWIRE_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Also run a worker in this process (standalone mode): IngestService is then served on
    /// --grpc-addr, beside the admin API, and delivers with the delivery flags below.
    #[arg(long, env = "PUSHWIRE_WITH_WORKER")]
    pub with_worker: bool,

    /// Tokens and TLS of the gRPC server.
    #[command(flatten)]
    pub access: AccessArgs,

    /// Ingest settings of the worker of --with-worker.
    #[command(flatten)]
    pub ingest: IngestArgs,

    /// How webhooks are sent: used by TestIntegration and URL checks, and by the worker of
    /// --with-worker.
    #[command(flatten)]
    pub webhook: WebhookArgs,

    /// Retries and isolation of the worker of --with-worker.
    #[command(flatten)]
    pub delivery: DeliveryArgs,

    /// The delivery store DeliveryService reads, and its retention.
    #[command(flatten)]
    pub deliveries: DeliveryLogArgs,

    /// Log format: text or json.
    #[arg(long, env = "PUSHWIRE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// A per-account limit: 1 to 1,000,000.
fn per_account_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=1_000_000) => Ok(n),
        _ => Err("expected a number from 1 to 1000000".into()),
    }
}

impl Config {
    /// The defaults, as if started with no flags (for tests and embedding).
    pub fn defaults() -> Self {
        Self::parse_from(["control-plane"])
    }
}
