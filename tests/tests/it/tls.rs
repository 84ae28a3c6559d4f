//! TLS and mTLS between workers and the control plane: a control plane serving TLS and
//! requiring client certificates of its CA (`--tls-cert`, `--tls-key`, `--tls-client-ca`); a
//! standalone worker (`pushwire_worker::run`) with a certificate of that CA becomes ready, one
//! without a certificate or with one of another CA never does (it connects, again and again,
//! and no call of it ever reaches the control plane: the handshake is refused), and one with a
//! valid certificate but no worker token is refused WatchConfig with PERMISSION_DENIED.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::control_plane::{
    Backend, TEST_ADMIN_TOKEN, TEST_WORKER_TOKEN, as_admin, test_config, with_token,
};
use pushwire_tests::eventually::{Poll, eventually, until};
use pushwire_tests::faults::http_get;
use pushwire_tests::worker::{INGEST_SERVICE, wait_ingest_ready};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Bound of every wait of these tests.
const WAIT: Duration = Duration::from_secs(20);

/// The control plane's count of WatchConfig calls that ended with `code`.
fn watch_calls(code: &str) -> String {
    format!(
        r#"pushwire_grpc_calls_total{{method="pushwire.v1.ConfigService/WatchConfig",code="{code}"}}"#
    )
}

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
    /// The HTTP operations address (`/metrics`).
    http: SocketAddr,
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
    let http = listeners.http.local_addr()?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { Ok(pushwire_control_plane::run(config, listeners, shutdown).await?) }
    });
    Ok(Running {
        addr,
        http,
        shutdown,
        task,
    })
}

/// A standalone worker following the control plane at `cp` over TLS, presenting `client`.
async fn start_worker(pki: &Pki, cp: SocketAddr, client: Option<&Pem>) -> anyhow::Result<Running> {
    let mut config = pushwire_worker::Config::defaults();
    config.delivery.delivery_store = Some(
        pushwire_common::delivery_store::StoreUrl::sqlite(
            pki._dir.path().join("deliveries.sqlite3"),
        )
        .into(),
    );
    config.control_plane = vec![format!("https://{cp}")];
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
    let http = listeners.http.local_addr()?;
    let shutdown = CancellationToken::new();
    config.shutdown_grace = Duration::from_secs(1);
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { Ok(pushwire_worker::run(config, listeners, shutdown).await?) }
    });
    Ok(Running {
        addr,
        http,
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

/// The worker behind `channel` reports NOT_SERVING (it has no configuration).
async fn assert_not_ready(channel: &Channel, what: &str) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: INGEST_SERVICE.into(),
        })
        .await?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::NotServing as i32,
        "{what}: status {status}, not NOT_SERVING"
    );
    Ok(())
}

/// The value of `series` in the `/metrics` of the server at `http` (0 when absent).
async fn metric(http: SocketAddr, series: &str) -> anyhow::Result<f64> {
    let (status, body) = http_get(http, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(body
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0))
}

/// A loopback TCP relay to a target address that counts the connections made through it:
/// evidence that a worker keeps trying.
struct Relay {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                // Ends with the connection, which the refused handshake closes.
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            connections,
            task,
        })
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_workers_with_a_client_certificate_of_the_ca_can_watch_config() -> anyhow::Result<()> {
    let pki = pki()?;
    let cp = start_control_plane(&pki).await?;

    // A client of the CA gets through: health, and the admin API with a token.
    eventually("the control plane serving over TLS", WAIT, || async {
        let status = health(tls_channel(&pki, cp.addr, Some(&pki.client)).await?).await;
        Ok(Poll::when(status.as_ref().is_ok_and(|s| *s == 1), status))
    })
    .await?;
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

    // Workers: the one with our certificate becomes ready; the others reach the control
    // plane through relays that count their connections, and never get further.
    let good = start_worker(&pki, cp.addr, Some(&pki.client)).await?;
    let (none_relay, rogue_relay) = (Relay::start(cp.addr).await?, Relay::start(cp.addr).await?);
    let none = start_worker(&pki, none_relay.addr, None).await?;
    let rogue = start_worker(&pki, rogue_relay.addr, Some(&pki.rogue_client)).await?;
    wait_ingest_ready(&plain(good.addr).await?, WAIT).await?;
    for (what, relay, worker) in [
        ("a worker without a client certificate", &none_relay, &none),
        (
            "a worker with another CA's certificate",
            &rogue_relay,
            &rogue,
        ),
    ] {
        // A second connection: the first one failed and the worker tried again.
        until(&format!("{what} connecting twice"), WAIT, || {
            relay.connections() >= 2
        })
        .await?;
        assert_not_ready(&plain(worker.addr).await?, what).await?;
    }
    // None of their calls reached the control plane: refused at the handshake, not by auth.
    for code in ["UNAUTHENTICATED", "PERMISSION_DENIED"] {
        assert_eq!(metric(cp.http, &watch_calls(code)).await?, 0.0, "{code}");
    }

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
    config.delivery.delivery_store = Some(
        pushwire_common::delivery_store::StoreUrl::sqlite(
            pki._dir.path().join("deliveries.sqlite3"),
        )
        .into(),
    );
    config.control_plane = vec![format!("https://{}", cp.addr)];
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
    let http = listeners.http.local_addr()?;
    let shutdown = CancellationToken::new();
    let worker = Running {
        addr,
        http,
        shutdown: shutdown.clone(),
        task: tokio::spawn(
            async move { Ok(pushwire_worker::run(config, listeners, shutdown).await?) },
        ),
    };
    // The control plane refuses its WatchConfig with PERMISSION_DENIED, again on each retry,
    // and the worker stays not ready.
    let denied = watch_calls("PERMISSION_DENIED");
    eventually("WatchConfig refused twice", WAIT, || async {
        let n = metric(cp.http, &denied).await?;
        Ok(Poll::when(n >= 2.0, n))
    })
    .await?;
    assert_not_ready(&plain(worker.addr).await?, "a worker with an admin token").await?;
    // The same credentials, called directly: the specific refusal.
    let mut as_that_worker = pb::config_service_client::ConfigServiceClient::new(with_token(
        tls_channel(&pki, cp.addr, Some(&pki.client)).await?,
        Some(TEST_ADMIN_TOKEN),
    ));
    let refused = as_that_worker
        .watch_config(pb::WatchConfigRequest {
            from_revision: 0,
            ..Default::default()
        })
        .await
        .expect_err("an admin token is no worker token");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    worker.stop().await?;
    cp.stop().await
}
