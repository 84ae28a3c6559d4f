//! The client against loopback servers (plain and TLS) and scripted name lookups: what is
//! sent, what is refused before any connection, and how failures are reported.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::resolve::{LookupFn, MAX_ADDRS, ResolveFailure, vet_answers};
use super::*;

/// Every await on the network is bounded by this.
const LIMIT: Duration = Duration::from_secs(10);

/// What the test server saw of one request.
#[derive(Debug)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// A loopback HTTP/1.1 server answering every request with one canned response (or never).
struct TestServer {
    port: u16,
    connections: Arc<AtomicUsize>,
    /// TLS handshakes that resumed a session.
    resumed: Arc<AtomicUsize>,
    seen: mpsc::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// `response: None` accepts and reads requests but never answers.
    async fn start(response: Option<Vec<u8>>, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let resumed = Arc::new(AtomicUsize::new(0));
        let (tx, seen) = mpsc::channel(16);
        let response = response.map(Arc::new);
        let count = connections.clone();
        let resumed_count = resumed.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let (response, tx, tls) = (response.clone(), tx.clone(), tls.clone());
                let resumed = resumed_count.clone();
                conns.spawn(async move {
                    match tls {
                        None => serve(stream, response, tx).await,
                        Some(cfg) => {
                            if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                            {
                                if s.get_ref().1.handshake_kind()
                                    == Some(rustls::HandshakeKind::Resumed)
                                {
                                    resumed.fetch_add(1, Ordering::SeqCst);
                                }
                                serve(s, response, tx).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            port,
            connections,
            resumed,
            seen,
            task,
        }
    }

    async fn next_request(&mut self) -> Seen {
        tokio::time::timeout(LIMIT, self.seen.recv())
            .await
            .unwrap()
            .unwrap()
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    response: Option<Arc<Vec<u8>>>,
    tx: mpsc::Sender<Seen>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) if buf.len() + n <= 256 * 1024 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = tx
        .send(Seen {
            head,
            body: buf[head_end..head_end + len].to_vec(),
        })
        .await;
    match response {
        // The client may hang up mid-body (it keeps a prefix only): write errors are fine.
        Some(r) => {
            let _ = s.write_all(&r).await;
            let _ = s.shutdown().await;
        }
        // Never answer; the task is aborted with the server.
        None => std::future::pending::<()>().await,
    }
}

fn http_response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn loopback_allowed() -> ClientOptions {
    ClientOptions {
        allow: AllowList::parse(["127.0.0.0/8", "::1/128"]).unwrap(),
        ..ClientOptions::default()
    }
}

fn client(opts: ClientOptions) -> WebhookClient {
    WebhookClient::new(opts).unwrap()
}

fn webhook(url: String) -> WebhookRequest {
    WebhookRequest {
        url,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("user-agent".into(), request::USER_AGENT.into()),
            ("webhook-id".into(), "P1_crm".into()),
            ("authorization".into(), "Bearer auth-s3cret".into()),
        ],
        body: Bytes::from_static(br#"{"id":"P1","name":"Zo\xc3\xab"}"#),
    }
}

async fn post(c: &WebhookClient, url: String) -> Result<HttpResponse, AttemptError> {
    tokio::time::timeout(LIMIT, c.post(&webhook(url)))
        .await
        .unwrap()
}

#[tokio::test]
async fn success_and_server_error_pass_through() {
    let mut ok = TestServer::start(
        Some(http_response("200 OK", &[("x-receiver", "A")], b"thanks")),
        None,
    )
    .await;
    let c = client(loopback_allowed());
    let resp = post(&c, format!("http://127.0.0.1:{}/hook?token=t", ok.port))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-receiver"), Some("A"));
    assert_eq!(resp.body_prefix, b"thanks");
    assert!(resp.latency < LIMIT);
    let seen = ok.next_request().await;
    assert!(
        seen.head.starts_with("post /hook?token=t http/1.1\r\n"),
        "{}",
        seen.head
    );
    for line in [
        "content-type: application/json",
        "webhook-id: p1_crm",
        "authorization: bearer auth-s3cret",
    ] {
        assert!(seen.head.contains(line), "{line} missing");
    }
    assert!(seen.head.contains(&format!(
        "user-agent: {}",
        request::USER_AGENT.to_ascii_lowercase()
    )));
    assert_eq!(seen.body, webhook(String::new()).body);

    let failing = TestServer::start(
        Some(http_response(
            "503 Service Unavailable",
            &[("retry-after", "7")],
            b"busy",
        )),
        None,
    )
    .await;
    let resp = post(&c, format!("http://127.0.0.1:{}/", failing.port))
        .await
        .unwrap();
    assert_eq!(
        (
            resp.status,
            resp.header("retry-after"),
            resp.body_prefix.as_slice()
        ),
        (503, Some("7"), b"busy".as_slice())
    );
}

#[tokio::test]
async fn response_body_is_capped() {
    let big = vec![b'x'; 1024 * 1024];
    let server = TestServer::start(Some(http_response("200 OK", &[], &big)), None).await;
    let resp = post(
        &client(loopback_allowed()),
        format!("http://127.0.0.1:{}/", server.port),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_prefix.len(), 64 * 1024);

    let tiny = ClientOptions {
        max_response_body: 10,
        ..loopback_allowed()
    };
    let resp = post(&client(tiny), format!("http://127.0.0.1:{}/", server.port))
        .await
        .unwrap();
    assert_eq!(resp.body_prefix, b"xxxxxxxxxx");
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let server = TestServer::start(
        Some(http_response(
            "302 Found",
            &[("location", "http://127.0.0.1:9/elsewhere")],
            b"",
        )),
        None,
    )
    .await;
    let resp = post(
        &client(loopback_allowed()),
        format!("http://127.0.0.1:{}/", server.port),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 302);
    assert_eq!(
        resp.header("location"),
        Some("http://127.0.0.1:9/elsewhere")
    );
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn silent_server_times_out() {
    let mut server = TestServer::start(None, None).await;
    let opts = ClientOptions {
        request_timeout: Duration::from_millis(300),
        ..loopback_allowed()
    };
    let started = Instant::now();
    let err = post(&client(opts), format!("http://127.0.0.1:{}/", server.port))
        .await
        .unwrap_err();
    assert_eq!(err, AttemptError::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(err.is_retryable());
    assert_eq!(err.kind(), "timeout");
    // It did get the request: the timeout is on the answer.
    assert_eq!(
        server.next_request().await.body,
        webhook(String::new()).body
    );
}

#[tokio::test]
async fn refused_connection_is_a_retryable_connect_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let err = post(
        &client(loopback_allowed()),
        format!("http://127.0.0.1:{port}/?token=q-s3cret"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AttemptError::Connect(_)), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.kind(), "connect");
    let msg = err.to_string();
    assert!(!msg.contains("s3cret") && !msg.contains("token"), "{msg}");
}

#[tokio::test]
async fn loopback_is_refused_unless_allow_listed() {
    let mut server = TestServer::start(Some(http_response("204 No Content", &[], b"")), None).await;
    let port = server.port;
    let guarded = client(ClientOptions::default());
    for (url, host) in [
        (format!("http://127.0.0.1:{port}/"), "127.0.0.1"),
        (format!("http://localhost:{port}/"), "localhost"),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            "[::ffff:7f00:1]",
        ),
        (format!("http://2130706433:{port}/"), "127.0.0.1"),
        (format!("http://0x7f.1:{port}/"), "127.0.0.1"),
    ] {
        let err = post(&guarded, url.clone()).await.unwrap_err();
        match &err {
            AttemptError::Blocked {
                host: h,
                addr,
                class,
            } => {
                assert_eq!(h, host, "{url}");
                assert!(
                    addr.is_loopback() || addr.to_canonical().is_loopback(),
                    "{url}: {addr}"
                );
                assert_eq!(class.class(), ssrf::AddressClass::Loopback, "{url}");
            }
            other => panic!("{url}: {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("refused to connect to {host}: "))
                && msg.contains("loopback (")
                && msg.ends_with(", not public and not allow-listed"),
            "{msg}"
        );
        assert!(!err.is_retryable());
        assert_eq!(err.kind(), "blocked");
        assert!(!err.to_string().contains("s3cret"));
    }
    // Nothing reached the server: the refusals happened before connecting.
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);

    let allowed = client(loopback_allowed());
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
    ] {
        assert_eq!(post(&allowed, url).await.unwrap().status, 204);
        server.next_request().await;
    }
}

#[tokio::test]
async fn private_and_metadata_addresses_are_never_dialled() {
    // These must be refused before any packet leaves: the test would hang on a connect
    // timeout otherwise, and nothing but loopback may be contacted from tests.
    let c = client(ClientOptions {
        connect_timeout: Duration::from_secs(60),
        ..loopback_allowed()
    });
    // (URL, refused address, what the message names)
    for (url, addr, reason) in [
        (
            "http://10.0.0.1/hook",
            "10.0.0.1",
            "private (RFC 1918, 10.0.0.0/8), not public and not allow-listed",
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254",
            "cloud metadata (169.254.169.254), never contacted, even when allow-listed",
        ),
        (
            "https://192.168.1.1:8443/",
            "192.168.1.1",
            "private (RFC 1918",
        ),
        ("http://100.64.1.2/", "100.64.1.2", "carrier-grade NAT"),
        ("http://[fe80::1]/", "fe80::1", "link-local (fe80::/10)"),
        (
            "http://[fd00::1]:8080/",
            "fd00::1",
            "unique local (fc00::/7)",
        ),
        (
            "http://[::ffff:169.254.169.254]/",
            "::ffff:169.254.169.254",
            "IPv4-mapped (::ffff:0:0/96) form of 169.254.169.254, cloud metadata",
        ),
        (
            "http://[64:ff9b::a00:1]/",
            "64:ff9b::a00:1",
            "NAT64 (64:ff9b::/96) form of 10.0.0.1, private",
        ),
        (
            "http://[2002:c0a8:101::1]/",
            "2002:c0a8:101::1",
            "6to4 (2002::/16) form of 192.168.1.1, private",
        ),
        ("http://[2001::1]/", "2001::1", "Teredo (2001::/32)"),
        ("http://0.0.0.0:80/", "0.0.0.0", "unspecified (0.0.0.0)"),
        ("http://255.255.255.255/", "255.255.255.255", "broadcast"),
        ("http://224.0.0.1/", "224.0.0.1", "multicast (224.0.0.0/4)"),
        (
            "http://198.18.0.1/",
            "198.18.0.1",
            "benchmarking (198.18.0.0/15)",
        ),
        (
            "http://192.0.2.1/",
            "192.0.2.1",
            "documentation (TEST-NET-1",
        ),
    ] {
        let started = Instant::now();
        let err = post(&c, url.to_owned()).await.unwrap_err();
        let addr: IpAddr = addr.parse().unwrap();
        assert_eq!(
            err,
            AttemptError::Blocked {
                host: err_host(&err),
                addr,
                class: ssrf::classify(addr).unwrap_err(),
            },
            "{url}"
        );
        assert!(err.to_string().contains(reason), "{url}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{url} took {:?}",
            started.elapsed()
        );
    }
}

fn err_host(err: &AttemptError) -> String {
    match err {
        AttemptError::Blocked { host, .. } => host.clone(),
        _ => String::new(),
    }
}

#[tokio::test]
async fn invalid_requests_are_final() {
    let c = client(loopback_allowed());
    for url in [
        "not a url",
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "http://",
    ] {
        let err = post(&c, url.to_owned()).await.unwrap_err();
        assert!(matches!(err, AttemptError::InvalidUrl(_)), "{url}: {err:?}");
        assert!(!err.is_retryable());
    }
    let mut req = webhook("http://127.0.0.1:9/".into());
    req.headers
        .push(("x-api-key".into(), "line\nbreak-s3cret".into()));
    let err = tokio::time::timeout(LIMIT, c.post(&req))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err,
        AttemptError::InvalidHeader {
            name: "x-api-key".into()
        }
    );
    assert!(!err.to_string().contains("s3cret"));
    assert_eq!(err.kind(), "invalid_header");
}

#[test]
fn answers_mixing_public_and_private_addresses_are_refused() {
    let sa = |s: &str| SocketAddr::new(s.parse().unwrap(), 0);
    let none = AllowList::default();
    let public = vec![
        sa("93.184.215.14"),
        sa("2606:2800:21f:cb07:6820:80da:af6b:8b2c"),
    ];
    assert_eq!(
        vet_answers("example.com".into(), public.clone(), &none).unwrap(),
        public
    );
    for bad in ["10.0.0.5", "169.254.169.254", "::1", "::ffff:127.0.0.1"] {
        let mixed = vec![sa("93.184.215.14"), sa(bad)];
        match vet_answers("rebind.example".into(), mixed, &none) {
            Err(ResolveFailure::Blocked { host, addr, class }) => {
                assert_eq!(
                    (host.as_str(), addr),
                    ("rebind.example", bad.parse().unwrap())
                );
                assert_eq!(Err(class), ssrf::classify(addr));
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    let local = AllowList::parse(["10.0.0.0/8"]).unwrap();
    assert!(
        vet_answers(
            "onprem".into(),
            vec![sa("10.0.0.5"), sa("93.184.215.14")],
            &local
        )
        .is_ok()
    );
    assert!(matches!(
        vet_answers("empty".into(), vec![], &none),
        Err(ResolveFailure::Lookup { .. })
    ));
    let many: Vec<SocketAddr> = (1..=40).map(|i| sa(&format!("93.184.215.{i}"))).collect();
    assert_eq!(
        vet_answers("many".into(), many, &none).unwrap().len(),
        MAX_ADDRS
    );
}

/// A lookup answering `answers(n)` for the `n`th lookup (from 0), counting lookups.
fn scripted_lookup(
    answers: impl Fn(usize) -> Vec<&'static str> + Send + Sync + 'static,
) -> (Arc<LookupFn>, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let lookup: Arc<LookupFn> = Arc::new(move |_host: String| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let addrs: Vec<SocketAddr> = answers(n)
            .into_iter()
            .map(|a| SocketAddr::new(a.parse().unwrap(), 0))
            .collect();
        Box::pin(async move { Ok(addrs) })
    });
    (lookup, count)
}

/// Only 127.0.0.1 is allow-listed: 127.0.0.2 stands for a private address that, should
/// the guard fail, would still be dialled on this machine only.
fn only_127_0_0_1() -> ClientOptions {
    ClientOptions {
        allow: AllowList::parse(["127.0.0.1/32"]).unwrap(),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn a_name_with_mixed_answers_is_refused_whole() {
    let server = TestServer::start(Some(http_response("204 No Content", &[], b"")), None).await;
    // The allowed address first: a guard that let the name through would connect there.
    for (bad, reason) in [
        ("127.0.0.2", "loopback (127.0.0.0/8)"),
        ("169.254.169.254", "cloud metadata (169.254.169.254)"),
        ("10.1.2.3", "private (RFC 1918, 10.0.0.0/8)"),
        (
            "::ffff:192.168.0.1",
            "IPv4-mapped (::ffff:0:0/96) form of 192.168.0.1",
        ),
        ("fd00::1", "unique local (fc00::/7)"),
    ] {
        let (lookup, lookups) = scripted_lookup(move |_| vec!["127.0.0.1", bad]);
        let c = WebhookClient::with_lookup(only_127_0_0_1(), lookup).unwrap();
        let err = post(&c, format!("http://mixed.test:{}/", server.port))
            .await
            .unwrap_err();
        let addr: IpAddr = bad.parse().unwrap();
        match &err {
            AttemptError::Blocked {
                host,
                addr: refused,
                class,
            } => {
                assert_eq!((host.as_str(), *refused), ("mixed.test", addr));
                assert_eq!(Err(*class), ssrf::classify(addr));
            }
            other => panic!("{bad}: {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("refused to connect to mixed.test: {addr} is "))
                && msg.contains(reason),
            "{msg}"
        );
        assert_eq!(lookups.load(Ordering::SeqCst), 1);
    }
    // Not even the allowed address was contacted.
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_vetted_address_is_the_one_dialled() {
    let mut server = TestServer::start(Some(http_response("204 No Content", &[], b"")), None).await;
    // DNS rebinding: the first answer is allowed, every later one is not. A connector that
    // resolved again after the check would dial the second answer, or fail to resolve the
    // made-up name with the system resolver.
    let (lookup, lookups) = scripted_lookup(|n| match n {
        0 => vec!["127.0.0.1"],
        _ => vec!["127.0.0.2"],
    });
    let c = WebhookClient::with_lookup(only_127_0_0_1(), lookup).unwrap();
    let url = format!("http://rebind.test:{}/hook", server.port);
    let resp = post(&c, url.clone()).await.unwrap();
    assert_eq!(resp.status, 204);
    let seen = server.next_request().await;
    assert!(
        seen.head
            .contains(&format!("host: rebind.test:{}", server.port)),
        "{}",
        seen.head
    );
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        1,
        "one lookup per connection"
    );
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);

    // The server closed the connection: the next attempt looks the name up again, and
    // gets the rebound answer refused before any connection.
    let err = post(&c, url).await.unwrap_err();
    assert!(
        matches!(&err, AttemptError::Blocked { addr, .. } if *addr == "127.0.0.2".parse::<IpAddr>().unwrap()),
        "{err:?}"
    );
    assert_eq!(lookups.load(Ordering::SeqCst), 2);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn bad_extra_ca_is_refused() {
    let opts = ClientOptions {
        extra_ca_pem: Some(b"not a certificate".to_vec()),
        ..ClientOptions::default()
    };
    assert!(matches!(
        WebhookClient::new(opts),
        Err(ClientBuildError::InvalidCa(_))
    ));
}

#[test]
fn debug_shows_no_bodies() {
    let resp = HttpResponse {
        status: 200,
        headers: vec![("set-cookie".into(), "session=abc".into())],
        body_prefix: b"private".to_vec(),
        latency: Duration::from_millis(3),
    };
    let printed = format!("{resp:?}");
    assert!(
        !printed.contains("abc") && !printed.contains("private"),
        "{printed}"
    );
    let opts = ClientOptions {
        extra_ca_pem: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
        ..ClientOptions::default()
    };
    assert!(format!("{opts:?}").contains("extra_ca_pem_len: Some(27)"));
}

/// A private CA and a `localhost`/127.0.0.1 certificate it signed, served over TLS.
fn tls_fixture() -> (Vec<u8>, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Pushwire test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
        )
        .unwrap();
    (ca_cert.pem().into_bytes(), Arc::new(server))
}

#[tokio::test]
async fn https_trusts_the_extra_ca_only_when_given() {
    let (ca_pem, server_config) = tls_fixture();
    let mut server = TestServer::start(
        Some(http_response("200 OK", &[], b"tls ok")),
        Some(server_config),
    )
    .await;
    let with_ca = client(ClientOptions {
        extra_ca_pem: Some(ca_pem),
        ..loopback_allowed()
    });
    for host in ["localhost", "127.0.0.1"] {
        let resp = post(&with_ca, format!("https://{host}:{}/hook", server.port))
            .await
            .unwrap();
        assert_eq!(
            (resp.status, resp.body_prefix.as_slice()),
            (200, b"tls ok".as_slice()),
            "{host}"
        );
        assert_eq!(
            server.next_request().await.body,
            webhook(String::new()).body
        );
    }

    let without_ca = client(loopback_allowed());
    let err = post(
        &without_ca,
        format!("https://localhost:{}/hook", server.port),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AttemptError::Tls(_)), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(err.kind(), "tls");
}

/// Every request on a new connection (the server closes each): after a first wave of
/// concurrent connections, a second wave as large resumes every session, which rustls's own
/// cache (8 tickets per server) could not.
#[tokio::test]
async fn a_burst_of_new_tls_connections_resumes_every_session() {
    const WAVE: usize = 24;
    let (ca_pem, server_config) = tls_fixture();
    let mut server =
        TestServer::start(Some(http_response("200 OK", &[], b"")), Some(server_config)).await;
    let c = client(ClientOptions {
        extra_ca_pem: Some(ca_pem),
        max_idle_per_destination: 32,
        ..loopback_allowed()
    });
    let url = format!("https://localhost:{}/hook", server.port);
    let mut resumed = Vec::new();
    for _ in 0..2 {
        let before = server.resumed.load(Ordering::SeqCst);
        let mut wave = tokio::task::JoinSet::new();
        for _ in 0..WAVE {
            let (c, url) = (c.clone(), url.clone());
            wave.spawn(async move { post(&c, url).await.map(|r| r.status) });
        }
        for _ in 0..WAVE {
            server.next_request().await;
        }
        while let Some(status) = wave.join_next().await {
            assert_eq!(status.unwrap().unwrap(), 200);
        }
        resumed.push(server.resumed.load(Ordering::SeqCst) - before);
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 2 * WAVE);
    assert_eq!(
        resumed[1], WAVE,
        "second wave: every connection resumed ({resumed:?})"
    );
}

/// The protocol a receiver offering both gets: HTTP/1.1 unless the client is told to offer h2.
#[tokio::test]
async fn http2_is_negotiated_only_when_offered() {
    let (ca_pem, server_config) = tls_fixture();
    let mut config = (*server_config).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    for (http2, expected) in [(false, b"http/1.1".as_slice()), (true, b"h2".as_slice())] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = client(ClientOptions {
            extra_ca_pem: Some(ca_pem.clone()),
            http2,
            ..loopback_allowed()
        });
        let attempt = tokio::spawn(async move {
            let _ = post(&c, format!("https://localhost:{port}/hook")).await;
        });
        let (stream, _) = tokio::time::timeout(LIMIT, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let tls = tokio::time::timeout(LIMIT, acceptor.accept(stream))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(expected),
            "http2: {http2}"
        );
        drop(tls);
        attempt.abort();
    }
}
