//! A control plane running in the test process on loopback port 0, on the embedded store (in
//! a temporary directory) or on a real etcd, with typed gRPC clients.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::{Config, Listeners};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::etcd::EtcdServer;

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

/// A configuration for tests: loopback port 0, the given backend, insecure HTTP allowed.
pub fn test_config(backend: &Backend) -> Config {
    let mut config = Config::defaults();
    config.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.allow_insecure_http = true;
    config.shutdown_grace = Duration::from_secs(2);
    match backend {
        Backend::Embedded(dir) => {
            config.data_dir = dir.clone();
            config.etcd_endpoints.clear();
        }
        Backend::Etcd(endpoints) => config.etcd_endpoints = endpoints.clone(),
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
        let task = tokio::spawn(pushwire_control_plane::run(
            config,
            listeners,
            shutdown.clone(),
        ));
        let cp = Self {
            grpc_addr,
            http_addr,
            shutdown,
            task: Some(task),
        };
        cp.wait_serving(Duration::from_secs(20)).await?;
        Ok(cp)
    }

    /// Starts one on `backend` with the test defaults.
    pub async fn on(backend: &Backend) -> anyhow::Result<Self> {
        Self::start(test_config(backend)).await
    }

    async fn wait_serving(&self, limit: Duration) -> anyhow::Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(channel) = self.try_channel().await {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.ok() == Some(ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "control plane on {} not serving after {limit:?}",
                    self.grpc_addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("valid uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        self.try_channel()
            .await
            .with_context(|| format!("connecting to {}", self.grpc_addr))
    }

    /// An IntegrationService client.
    pub async fn integrations(
        &self,
    ) -> anyhow::Result<pb::integration_service_client::IntegrationServiceClient<Channel>> {
        Ok(pb::integration_service_client::IntegrationServiceClient::new(self.channel().await?))
    }

    /// A PushScopeService client.
    pub async fn push_scopes(
        &self,
    ) -> anyhow::Result<pb::push_scope_service_client::PushScopeServiceClient<Channel>> {
        Ok(pb::push_scope_service_client::PushScopeServiceClient::new(
            self.channel().await?,
        ))
    }

    /// A ConfigService client.
    pub async fn config(
        &self,
    ) -> anyhow::Result<pb::config_service_client::ConfigServiceClient<Channel>> {
        Ok(pb::config_service_client::ConfigServiceClient::new(
            self.channel().await?,
        ))
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
