//! The publisher library against a real worker speaking TLS and requiring client
//! certificates: reached by name (`https://localhost:PORT`, checked against the certificate
//! whichever address is connected to), with a client certificate and a token; without the
//! client certificate, or without a token, no stream opens and it says why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::publisher::{Publisher, PublisherOptions, ReceiptStatus, TlsOptions};
use pushwire_tests::admin::{integration, scope};
use pushwire_tests::control_plane::{
    Backend, ControlPlane, TEST_ADMIN_TOKEN, TEST_WORKER_TOKEN, test_config,
};
use pushwire_tests::faults::CountingReceiver;
use pushwire_tests::worker::participation;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio_util::sync::CancellationToken;

const ACCOUNT: &str = "accounts/tls";

/// A CA and what it issued, PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (Vec<u8>, String),
}

fn pki(dir: &Path) -> anyhow::Result<Pki> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "Pushwire publisher test CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let issue = |names: &[&str], usage| -> anyhow::Result<(String, String)> {
        let mut p =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        p.distinguished_name.push(DnType::CommonName, "test");
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_cert, client_key) = issue(&[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let out = Pki {
        ca: dir.join("ca.pem"),
        server: (dir.join("server.pem"), dir.join("server-key.pem")),
        client: (client_cert.into_bytes(), client_key),
    };
    std::fs::write(&out.ca, ca.pem())?;
    std::fs::write(&out.server.0, server_cert)?;
    std::fs::write(&out.server.1, server_key)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_mtls_by_name_with_a_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let mut cp_config = test_config(&Backend::Embedded(dir.path().join("data")));
    cp_config.webhook.allow_cidr = vec!["127.0.0.0/8".into()];
    let cp = ControlPlane::start(cp_config).await?;
    let receiver = CountingReceiver::start().await?;
    let admin = cp.admin().await?;
    let name = admin
        .create_integration(ACCOUNT, "hook", integration("Hook", &receiver.url()))
        .await?
        .name;
    admin
        .create_scope(
            ACCOUNT,
            "all",
            scope(&name, pb::PushScopeLevel::Account, ""),
        )
        .await?;

    // A standalone worker serving TLS only, requiring certificates of the CA.
    let mut config = pushwire_worker::Config::defaults();
    config.delivery.delivery_store = Some(
        pushwire_common::delivery_store::StoreUrl::sqlite(dir.path().join("deliveries.sqlite3"))
            .into(),
    );
    config.control_plane = vec![format!("http://{}", cp.grpc_addr)];
    config.control_plane_client.control_plane_token = Some(Secret::new(TEST_WORKER_TOKEN));
    config.access.admin_token = Some(Secret::new(TEST_ADMIN_TOKEN));
    config.access.tls_cert = Some(pki.server.0.clone());
    config.access.tls_key = Some(pki.server.1.clone());
    config.access.tls_client_ca = Some(pki.ca.clone());
    config.webhook.allow_cidr = vec!["127.0.0.0/8".into()];
    config.shutdown_grace = Duration::from_secs(1);
    let listeners = pushwire_worker::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let port = listeners.grpc.local_addr()?.port();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(pushwire_worker::run(config, listeners, shutdown.clone()));
    let _stop = shutdown.clone().drop_guard();

    let endpoint = format!("https://localhost:{port}");
    let tls = TlsOptions {
        ca_pem: Some(std::fs::read(&pki.ca)?),
        client_identity: Some((pki.client.0.clone(), Secret::new(pki.client.1.clone()))),
    };
    let opts = PublisherOptions {
        token: Some(Secret::new(TEST_ADMIN_TOKEN)),
        tls: tls.clone(),
        connect_timeout: Duration::from_secs(2),
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::connect(&[endpoint.as_str()], ACCOUNT, opts.clone())?;
    publisher
        .wait_connected(Duration::from_secs(20))
        .await
        .map_err(anyhow::Error::msg)?;
    let requests = (0..20).map(|i| pb::PublishRequest {
        participation_json: participation(&format!("tls-{i}"), 1, Some(1), true),
        ..Default::default()
    });
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        publisher.publish_all(tokio_stream::iter(requests), |_| {}),
    )
    .await?;
    assert_eq!(report.done, 20, "{:?}", report.problems);
    assert_eq!(report.delivered_deliveries, 20);
    assert_eq!(receiver.delivered().len(), 20);
    publisher.close().await;

    // No client certificate: the handshake is refused; no token: UNAUTHENTICATED.
    let no_cert = Publisher::connect(
        &[endpoint.as_str()],
        ACCOUNT,
        PublisherOptions {
            tls: TlsOptions {
                client_identity: None,
                ..tls.clone()
            },
            ..opts.clone()
        },
    )?;
    assert!(
        no_cert
            .wait_connected(Duration::from_secs(2))
            .await
            .is_err()
    );
    let no_token = Publisher::connect(
        &[endpoint.as_str()],
        ACCOUNT,
        PublisherOptions {
            token: None,
            ..opts.clone()
        },
    )?;
    let why = no_token
        .wait_connected(Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(why.contains("Unauthenticated"), "{why}");
    let one = no_token
        .publish(pb::PublishRequest {
            participation_json: participation("tls-x", 1, Some(1), true),
            ..Default::default()
        })
        .await;
    drop(no_token);
    assert_eq!(one.await.status(), ReceiptStatus::GaveUp);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker).await???;
    Ok(())
}
