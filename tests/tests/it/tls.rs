//! TLS and mTLS between workers and the control plane: a control plane serving TLS and
//! requiring client certificates of its CA (`--tls-cert`, `--tls-key`, `--tls-client-ca`); a
//! standalone worker (`pushwire_worker::run`) with a certificate of that CA becomes ready, one
//! without a certificate or with one of another CA never does, and the control plane refuses
//! their handshakes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::control_plane::{
    Backend, TEST_ADMIN_TOKEN, TEST_WORKER_TOKEN, as_admin, test_config,
};
use pushwire_tests::worker::{INGEST_SERVICE, wait_ingest_ready};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// How long a worker without a valid certificate is watched for becoming ready (it must not).
const NEVER_READY_WINDOW: Duration = Duration::from_secs(3);

/// PEM files of a certificate and its key.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA, written as `{name}-ca.pem`, that issues certificates into the same directory.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Pushwire test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem())?;
        Ok(Self { issuer, pem })
    }

    /// A certificate for `names` (server) or for a client.
    fn issue(&self, dir: &Path, file: &str, names: &[&str], server: bool) -> anyhow::Result<Pem> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let out = Pem {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&out.cert, cert.pem())?;
        std::fs::write(&out.key, key.serialize_pem())?;
        Ok(out)
    }
}

/// Everything the test needs, in one temporary directory.
struct Pki {
    _dir: tempfile::TempDir,
    data: PathBuf,
    ca: PathBuf,
    server: Pem,
    client: Pem,
    rogue_client: Pem,
}

fn pki() -> anyhow::Result<Pki> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path(), "ours")?;
    let rogue = Ca::new(dir.path(), "rogue")?;
    Ok(Pki {
        data: dir.path().join("data"),
        ca: ca.pem.clone(),
        server: ca.issue(dir.path(), "server", &["127.0.0.1", "localhost"], true)?,
        client: ca.issue(dir.path(), "worker", &[], false)?,
        rogue_client: rogue.issue(dir.path(), "rogue-worker", &[], false)?,
        _dir: dir,
    })
}

/// A process part started in this test: its task and how to stop it.
struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .context("did not stop")???;
        Ok(())
    }
}

async fn start_control_plane(pki: &Pki) -> anyhow::Result<Running> {
    let mut config = test_config(&Backend::Embedded(pki.data.clone()));
    config.access.tls_cert = Some(pki.server.cert.clone());
    config.access.tls_key = Some(pki.server.key.clone());
    config.access.tls_client_ca = Some(pki.ca.clone());
    let listeners = pushwire_control_plane::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = listeners.grpc.local_addr()?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { Ok(pushwire_control_plane::run(config, listeners, shutdown).await?) }
    });
    Ok(Running {
        addr,
        shutdown,
        task,
    })
}

/// A standalone worker following the control plane at `cp` over TLS, presenting `client`.
async fn start_worker(pki: &Pki, cp: SocketAddr, client: Option<&Pem>) -> anyhow::Result<Running> {
    let mut config = pushwire_worker::Config::defaults();
    config.control_plane = format!("https://{cp}");
    let c = &mut config.control_plane_client;
    c.control_plane_ca = Some(pki.ca.clone());
    c.control_plane_token = Some(Secret::new(TEST_WORKER_TOKEN));
    c.tls_client_cert = client.map(|p| p.cert.clone());
    c.tls_client_key = client.map(|p| p.key.clone());
    config.access.admin_token = Some(Secret::new(TEST_ADMIN_TOKEN));
    let listeners = pushwire_worker::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = listeners.grpc.local_addr()?;
    let shutdown = CancellationToken::new();
    config.shutdown_grace = Duration::from_secs(1);
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { Ok(pushwire_worker::run(config, listeners, shutdown).await?) }
    });
    Ok(Running {
        addr,
        shutdown,
        task,
    })
}

async fn plain(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// A TLS channel to the control plane trusting our CA, presenting `identity` if any.
async fn tls_channel(pki: &Pki, cp: SocketAddr, identity: Option<&Pem>) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).context("CA")?));
    if let Some(p) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&p.cert)?,
            std::fs::read(&p.key)?,
        ));
    }
    Ok(Channel::from_shared(format!("https://{cp}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// The control plane's health over `channel`.
async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// Whether the worker behind `channel` stays not ready for `window`.
async fn never_ready(channel: &Channel, window: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(channel.clone());
    let until = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < until {
        let status = health
            .check(HealthCheckRequest {
                service: INGEST_SERVICE.into(),
            })
            .await
            .map(|r| r.into_inner().status);
        anyhow::ensure!(
            status.as_ref().ok() != Some(&(ServingStatus::Serving as i32)),
            "a worker without a valid client certificate became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_workers_with_a_client_certificate_of_the_ca_can_watch_config() -> anyhow::Result<()> {
    let pki = pki()?;
    let cp = start_control_plane(&pki).await?;

    // A client of the CA gets through: health, and the admin API with a token.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match health(tls_channel(&pki, cp.addr, Some(&pki.client)).await?).await {
            Ok(1) => break,
            other if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("control plane not serving over TLS: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let admin = as_admin(tls_channel(&pki, cp.addr, Some(&pki.client)).await?);
    pb::integration_service_client::IntegrationServiceClient::new(admin)
        .list_integrations(pb::ListIntegrationsRequest {
            parent: "accounts/42".into(),
            ..Default::default()
        })
        .await
        .context("ListIntegrations over mTLS")?;

    // The handshake fails without a client certificate, with one of another CA, and in
    // plaintext.
    for (what, identity) in [
        ("no client certificate", None),
        ("a certificate of another CA", Some(&pki.rogue_client)),
    ] {
        let refused = health(tls_channel(&pki, cp.addr, identity).await?).await;
        assert!(refused.is_err(), "{what}: {refused:?}");
    }
    let plaintext = match plain(cp.addr).await {
        Ok(ch) => health(ch).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(plaintext.is_err(), "plaintext: {plaintext:?}");

    // Workers: the one with our certificate becomes ready; the others never do.
    let good = start_worker(&pki, cp.addr, Some(&pki.client)).await?;
    let none = start_worker(&pki, cp.addr, None).await?;
    let rogue = start_worker(&pki, cp.addr, Some(&pki.rogue_client)).await?;
    wait_ingest_ready(&plain(good.addr).await?, Duration::from_secs(20)).await?;
    let (a, b) = tokio::join!(
        async { never_ready(&plain(none.addr).await?, NEVER_READY_WINDOW).await },
        async { never_ready(&plain(rogue.addr).await?, NEVER_READY_WINDOW).await },
    );
    a.context("worker without a client certificate")?;
    b.context("worker with another CA's certificate")?;

    for w in [good, none, rogue] {
        w.stop().await?;
    }
    cp.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_needs_a_worker_token_even_with_a_valid_certificate() -> anyhow::Result<()> {
    let pki = pki()?;
    let cp = start_control_plane(&pki).await?;
    let mut config = pushwire_worker::Config::defaults();
    config.control_plane = format!("https://{}", cp.addr);
    config.control_plane_client.control_plane_ca = Some(pki.ca.clone());
    config.control_plane_client.tls_client_cert = Some(pki.client.cert.clone());
    config.control_plane_client.tls_client_key = Some(pki.client.key.clone());
    // An admin token is no worker token: WatchConfig stays refused.
    config.control_plane_client.control_plane_token = Some(Secret::new(TEST_ADMIN_TOKEN));
    config.shutdown_grace = Duration::from_secs(1);
    let listeners = pushwire_worker::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = listeners.grpc.local_addr()?;
    let shutdown = CancellationToken::new();
    let worker = Running {
        addr,
        shutdown: shutdown.clone(),
        task: tokio::spawn(
            async move { Ok(pushwire_worker::run(config, listeners, shutdown).await?) },
        ),
    };
    never_ready(&plain(worker.addr).await?, NEVER_READY_WINDOW).await?;
    worker.stop().await?;
    cp.stop().await
}
