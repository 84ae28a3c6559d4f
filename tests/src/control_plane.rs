//! A control plane running in the test process on loopback port 0, on the embedded store (in
//! a temporary directory) or on a real etcd, with typed gRPC clients.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::auth::Bearer;
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::{Config, Listeners};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::admin::Admin;
use crate::etcd::EtcdServer;
use crate::eventually::{Poll, eventually};
use crate::tokens::{Accounts, entry, write_token_file};

/// The admin token (every account) of the test configurations: their `PUSHWIRE_ADMIN_TOKEN`.
pub const TEST_ADMIN_TOKEN: &str = "pushwire-test-admin-token";

/// The worker token (every account) of [`test_token_file`].
pub const TEST_WORKER_TOKEN: &str = "pushwire-test-worker-token";

/// A channel whose calls carry a token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// `channel` with `authorization: Bearer <token>` on every call (nothing for `None`).
pub fn with_token(channel: Channel, token: Option<&str>) -> AuthChannel {
    let bearer = match token {
        Some(t) => Bearer::new(&Secret::new(t)).expect("a printable test token"),
        None => Bearer::none(),
    };
    InterceptedService::new(channel, bearer)
}

/// `channel` with [`TEST_ADMIN_TOKEN`].
pub fn as_admin(channel: Channel) -> AuthChannel {
    with_token(channel, Some(TEST_ADMIN_TOKEN))
}

/// A token file accepting [`TEST_WORKER_TOKEN`] as a worker of every account; written once
/// per test process (in a temporary directory left for the process's lifetime).
pub fn test_token_file() -> std::path::PathBuf {
    static FILE: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("tokens.json");
        write_token_file(
            &path,
            &[entry(
                "test worker",
                TEST_WORKER_TOKEN,
                "worker",
                Accounts::All,
            )],
        )
        .expect("writing the test token file");
        (dir, path)
    })
    .1
    .clone()
}

/// Where the control plane keeps its data.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The embedded store in this directory.
    Embedded(std::path::PathBuf),
    /// etcd at these endpoints.
    Etcd(Vec<String>),
}

/// Both backends of a test: a fresh embedded store and a fresh etcd, each kept alive as long as
/// this value.
#[derive(Debug)]
pub struct Backends {
    dir: tempfile::TempDir,
    /// The etcd server behind [`Backend::Etcd`].
    pub etcd: EtcdServer,
}

impl Backends {
    /// Starts an etcd and makes a temporary directory.
    pub fn start() -> anyhow::Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
            etcd: EtcdServer::start()?,
        })
    }

    /// The two backends, embedded first.
    pub fn all(&self) -> [Backend; 2] {
        [
            Backend::Embedded(self.dir.path().join("data")),
            Backend::Etcd(vec![self.etcd.endpoint()]),
        ]
    }
}

/// The key that encrypts secrets at rest in tests on etcd (`key-id:base64`); the embedded store
/// generates its own in the data directory.
pub const TEST_ENCRYPTION_KEY: &str = "test-key:cHVzaHdpcmUtdGVzdC1rZXktMzItYnl0ZXMtbG9uZyE=";

/// A configuration for tests: loopback port 0, the given backend, insecure HTTP allowed,
/// [`TEST_ADMIN_TOKEN`] and [`test_token_file`]'s worker token accepted, on etcd
/// [`TEST_ENCRYPTION_KEY`].
pub fn test_config(backend: &Backend) -> Config {
    let mut config = Config::defaults();
    config.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.allow_insecure_http = true;
    config.shutdown_grace = Duration::from_secs(2);
    config.access.admin_token = Some(Secret::new(TEST_ADMIN_TOKEN));
    config.access.token_file = Some(test_token_file());
    match backend {
        Backend::Embedded(dir) => {
            config.data_dir = dir.clone();
            config.etcd_endpoints.clear();
        }
        Backend::Etcd(endpoints) => {
            config.etcd_endpoints = endpoints.clone();
            config.encryption_key = Some(Secret::new(TEST_ENCRYPTION_KEY));
        }
    }
    config
}

/// A running control plane; stopped on [`ControlPlane::stop`] or drop.
#[derive(Debug)]
pub struct ControlPlane {
    /// gRPC address.
    pub grpc_addr: SocketAddr,
    /// HTTP operations address.
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), pushwire_control_plane::RunError>>>,
}

impl ControlPlane {
    /// Starts one with `config` (its addresses are replaced by loopback port 0) and waits until
    /// it reports SERVING on gRPC health (at most 20 s).
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            http: TcpListener::bind("127.0.0.1:0").await?,
        };
        let grpc_addr = listeners.grpc.local_addr()?;
        let http_addr = listeners.http.local_addr()?;
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(pushwire_control_plane::run(
            config,
            listeners,
            shutdown.clone(),
        ));
        let mut cp = Self {
            grpc_addr,
            http_addr,
            shutdown,
            task: None,
        };
        tokio::select! {
            serving = cp.wait_serving(Duration::from_secs(20)) => serving?,
            // One that stops while starting (a store it cannot open, a bad flag) fails the
            // start with its error rather than a timeout.
            ended = &mut task => {
                let error = match ended? {
                    Ok(()) => anyhow::anyhow!("it stopped"),
                    Err(e) => anyhow::Error::new(e),
                };
                return Err(error.context("the control plane did not start"));
            }
        }
        cp.task = Some(task);
        Ok(cp)
    }

    /// Starts one on `backend` with the test defaults.
    pub async fn on(backend: &Backend) -> anyhow::Result<Self> {
        Self::start(test_config(backend)).await
    }

    async fn wait_serving(&self, limit: Duration) -> anyhow::Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let what = format!("the control plane on {} SERVING", self.grpc_addr);
        eventually(&what, limit, || async {
            let channel = match self.try_channel().await {
                Ok(channel) => channel,
                Err(e) => return Ok(Poll::not_yet(e)),
            };
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status);
            let serving = status.as_ref().ok() == Some(&(ServingStatus::Serving as i32));
            Ok(Poll::when(serving, status))
        })
        .await
    }

    /// A gRPC channel to it, sending no token.
    pub async fn raw_channel(&self) -> anyhow::Result<Channel> {
        self.try_channel()
            .await
            .with_context(|| format!("connecting to {}", self.grpc_addr))
    }

    async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("valid uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// A gRPC channel to it whose calls carry [`TEST_ADMIN_TOKEN`].
    pub async fn channel(&self) -> anyhow::Result<AuthChannel> {
        Ok(as_admin(self.raw_channel().await?))
    }

    /// The admin API ([`TEST_ADMIN_TOKEN`]).
    pub async fn admin(&self) -> anyhow::Result<Admin> {
        Ok(Admin::new(self.channel().await?))
    }

    /// An IntegrationService client (admin).
    pub async fn integrations(
        &self,
    ) -> anyhow::Result<pb::integration_service_client::IntegrationServiceClient<AuthChannel>> {
        Ok(self.admin().await?.integrations())
    }

    /// A PushScopeService client (admin).
    pub async fn push_scopes(
        &self,
    ) -> anyhow::Result<pb::push_scope_service_client::PushScopeServiceClient<AuthChannel>> {
        Ok(self.admin().await?.push_scopes())
    }

    /// A ConfigService client ([`TEST_WORKER_TOKEN`]: WatchConfig is for workers).
    pub async fn config(
        &self,
    ) -> anyhow::Result<pb::config_service_client::ConfigServiceClient<AuthChannel>> {
        Ok(pb::config_service_client::ConfigServiceClient::new(
            with_token(self.raw_channel().await?, Some(TEST_WORKER_TOKEN)),
        ))
    }

    /// A WatchConfig stream from `from_revision` (0: a snapshot first), as a worker opens it.
    pub async fn watch(
        &self,
        from_revision: i64,
    ) -> anyhow::Result<tonic::Streaming<pb::WatchConfigResponse>> {
        let request = pb::WatchConfigRequest {
            from_revision,
            ..Default::default()
        };
        Ok(self
            .config()
            .await?
            .watch_config(request)
            .await?
            .into_inner())
    }

    /// Stops it and waits for the end of its drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
