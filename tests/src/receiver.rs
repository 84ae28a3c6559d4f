//! `TestReceiver`: a real HTTP/1.1 (optionally HTTPS) webhook receiver on `127.0.0.1:0` whose
//! answers tests program and change mid-test, recording every request it gets.
//! Also owns the pieces the `sink` binary reuses (self-signed TLS identity, the serving loop) and
//! a one-shot loopback client for checking receivers. Loopback only; nothing here signs payloads.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// How many recorded requests wait unread before further ones are counted but not recorded.
/// Large enough for load tests; dropping beats blocking, which would stall the sender under
/// test on a test that simply does not read.
pub const RECORD_CAPACITY: usize = 16_384;

/// Largest request body read; a bigger one fails that request (no sender of ours sends more).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The crypto provider for every TLS config here: ring, so aws-lc-rs stays out of the tree.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One programmed answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Extra response headers, in order.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: String,
    /// How long to wait before answering; [`Duration::MAX`] never answers (see [`Reply::hang`]).
    pub delay: Duration,
}

impl Reply {
    /// An immediate answer with this status, no extra header and an empty body.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    /// An immediate `200 OK`.
    pub fn ok() -> Self {
        Self::status(200)
    }

    /// Accepts the request and never answers; the connection stays open until the receiver is
    /// dropped (for sender timeouts).
    pub fn hang() -> Self {
        Self::ok().after(Duration::MAX)
    }

    /// Whether this reply never answers.
    pub fn is_hang(&self) -> bool {
        self.delay == Duration::MAX
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the response body.
    pub fn with_body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Answers only after `delay`.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

impl Default for Reply {
    fn default() -> Self {
        Self::ok()
    }
}

/// One request as the receiver got it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Method, e.g. `POST`.
    pub method: String,
    /// Path and query, e.g. `/hooks/a?x=1`.
    pub path: String,
    /// Headers in arrival order, names lower-case, values decoded lossily as UTF-8.
    pub headers: Vec<(String, String)>,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// When the whole request had been read.
    pub at: Instant,
}

impl Received {
    /// The first value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }
}

/// A freshly generated certificate authority and a server certificate it signed for
/// `localhost` and `127.0.0.1`, ready to serve. Cheap to clone.
#[derive(Clone)]
pub struct TlsIdentity {
    ca_pem: String,
    server_config: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config holds the private key: show only the public part.
        f.debug_struct("TlsIdentity")
            .field("ca_pem", &self.ca_pem)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Generates a new CA and server certificate (ECDSA P-256, ring).
    ///
    /// A separate CA rather than one self-signed leaf: some TLS stacks refuse an end-entity
    /// certificate used as its own trust anchor, and a CA is what `--extra-ca-file` expects.
    pub fn generate() -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Pushwire test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let mut server_config = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .context("building the TLS server config")?;
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Stateless tickets (as most HTTPS servers issue), so that clients can resume any
        // number of sessions; 2 tickets per TLS 1.3 handshake, the rustls default.
        server_config.ticketer =
            rustls::crypto::ring::Ticketer::new().context("the TLS session ticketer")?;
        Ok(Self {
            ca_pem: ca.as_ref().pem(),
            server_config: Arc::new(server_config),
        })
    }

    /// The CA certificate, PEM-encoded: what a client must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write_ca_pem(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    /// An acceptor serving the server certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server_config))
    }

    /// An acceptor serving the server certificate that offers `protocols` in ALPN (e.g. `h2`
    /// and `http/1.1`) instead of HTTP/1.1 alone; it shares the session tickets of the others.
    pub fn acceptor_with_alpn(&self, protocols: &[&[u8]]) -> TlsAcceptor {
        let mut config = (*self.server_config).clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// What a receiver saw of its connections: how many it accepted, and how their TLS handshakes
/// went. Also closes the open ones on demand ([`Connections::close_all`]).
#[derive(Debug, Default)]
pub struct Connections {
    accepted: AtomicU64,
    full: AtomicU64,
    resumed: AtomicU64,
    /// Cancelled by `close_all`, then replaced: every connection watches the one of its time.
    generation: Mutex<CancellationToken>,
}

/// A snapshot of [`Connections`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// TCP connections accepted.
    pub accepted: u64,
    /// TLS handshakes that were full (a new session).
    pub full_handshakes: u64,
    /// TLS handshakes that resumed a session.
    pub resumed_handshakes: u64,
}

impl std::ops::Sub for ConnectionCounts {
    type Output = Self;
    fn sub(self, earlier: Self) -> Self {
        Self {
            accepted: self.accepted - earlier.accepted,
            full_handshakes: self.full_handshakes - earlier.full_handshakes,
            resumed_handshakes: self.resumed_handshakes - earlier.resumed_handshakes,
        }
    }
}

impl Connections {
    /// The counts so far.
    pub fn counts(&self) -> ConnectionCounts {
        ConnectionCounts {
            accepted: self.accepted.load(Ordering::SeqCst),
            full_handshakes: self.full.load(Ordering::SeqCst),
            resumed_handshakes: self.resumed.load(Ordering::SeqCst),
        }
    }

    /// Closes every open connection (as a receiver's restart or idle timeout would); the
    /// listener stays, and so do the session tickets it issued.
    pub fn close_all(&self) {
        let mut current = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.cancel();
        *current = CancellationToken::new();
    }

    fn current(&self) -> CancellationToken {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn handshake(&self, kind: Option<rustls::HandshakeKind>) {
        let counter = match kind {
            Some(rustls::HandshakeKind::Resumed) => &self.resumed,
            _ => &self.full,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// Serves HTTP/1.1 (over TLS when `tls` is set) on `listener` until `shutdown` is cancelled,
/// answering each request with what `handler` returns for it; the reply's delay is applied here.
///
/// Returning (or dropping this future) closes every open connection, hung ones included.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    serve_counted(listener, tls, handler, shutdown, Arc::default()).await;
}

/// [`serve`], counting connections and handshakes in `connections`.
pub async fn serve_counted<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    shutdown: CancellationToken,
    connections_seen: Arc<Connections>,
) where
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    // Owning the connection tasks here ties their lifetime to this loop: the set aborts them
    // when dropped.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections_seen.accepted.fetch_add(1, Ordering::SeqCst);
                    connections.spawn(serve_connection(
                        stream,
                        tls.clone(),
                        Arc::clone(&handler),
                        shutdown.clone(),
                        Arc::clone(&connections_seen),
                    ));
                }
                Err(_) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            },
            // Reap finished connections so the set does not grow for the whole test.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection<H, F>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    shutdown: CancellationToken,
    seen: Arc<Connections>,
) where
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    // Small requests and answers: do not let Nagle add latency to timing-sensitive tests.
    let _ = stream.set_nodelay(true);
    let closed = seen.current();
    match tls {
        None => serve_http1(TokioIo::new(stream), handler, shutdown, closed).await,
        Some(acceptor) => {
            let tls_stream = tokio::select! {
                () = shutdown.cancelled() => return,
                () = closed.cancelled() => return,
                accepted = acceptor.accept(stream) => match accepted {
                    Ok(s) => s,
                    // A client that does not trust us, or not TLS at all: nothing to serve.
                    Err(_) => return,
                },
            };
            seen.handshake(tls_stream.get_ref().1.handshake_kind());
            serve_http1(TokioIo::new(tls_stream), handler, shutdown, closed).await;
        }
    }
}

async fn serve_http1<I, H, F>(
    io: I,
    handler: Arc<H>,
    shutdown: CancellationToken,
    closed: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let service_shutdown = shutdown.clone();
    let service =
        service_fn(move |request| answer(request, Arc::clone(&handler), service_shutdown.clone()));
    let connection = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::select! {
        _ = connection => {}
        () = shutdown.cancelled() => {}
        () = closed.cancelled() => {}
    }
}

async fn answer<H, F>(
    request: Request<Incoming>,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<Response<Full<Bytes>>, BoxError>
where
    H: Fn(Received) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let (parts, body) = request.into_parts();
    let body = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await?
        .to_bytes();
    let received = Received {
        method: parts.method.as_str().to_owned(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
    };
    let reply = handler(received).await;
    if !reply.delay.is_zero() {
        tokio::select! {
            // tokio clamps an overflowing deadline, so Duration::MAX (hang) waits forever.
            () = tokio::time::sleep(reply.delay) => {}
            () = shutdown.cancelled() => return Err("receiver shut down".into()),
        }
    }
    let mut response = Response::builder().status(StatusCode::from_u16(reply.status)?);
    for (name, value) in &reply.headers {
        response = response.header(name.as_str(), value.as_str());
    }
    Ok(response.body(Full::new(Bytes::from(reply.body)))?)
}

/// State shared between the test and the serving task.
#[derive(Debug)]
struct Shared {
    replies: Mutex<Replies>,
    count: AtomicUsize,
    records: mpsc::Sender<Received>,
}

#[derive(Debug)]
struct Replies {
    queue: VecDeque<Reply>,
    default: Reply,
}

impl Shared {
    fn next_reply(&self) -> Reply {
        // A panic elsewhere while holding the lock cannot leave the queue half-updated.
        let mut replies = self.replies.lock().unwrap_or_else(PoisonError::into_inner);
        match replies.queue.pop_front() {
            Some(reply) => reply,
            None => replies.default.clone(),
        }
    }

    fn on_request(&self, received: Received) -> Reply {
        let reply = self.next_reply();
        // Counted before it is visible through `next`, so a test that got it sees the count.
        self.count.fetch_add(1, Ordering::SeqCst);
        // Full only when a test stopped reading; see RECORD_CAPACITY.
        let _ = self.records.try_send(received);
        reply
    }
}

/// A webhook receiver on `127.0.0.1:<free port>`, plain or HTTPS, serving until dropped.
///
/// Answers come from a queue ([`TestReceiver::respond_with`]) and then a default
/// ([`TestReceiver::set_default`], `200` at first); both can change while a test runs.
pub struct TestReceiver {
    addr: SocketAddr,
    tls: Option<TlsIdentity>,
    shared: Arc<Shared>,
    connections: Arc<Connections>,
    records: tokio::sync::Mutex<mpsc::Receiver<Received>>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl fmt::Debug for TestReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestReceiver")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("received", &self.received_count())
            .finish_non_exhaustive()
    }
}

impl TestReceiver {
    /// Starts a plain HTTP receiver.
    pub async fn http() -> anyhow::Result<Self> {
        Self::start(None).await
    }

    /// Starts an HTTPS receiver with a freshly generated CA (see [`TestReceiver::ca_pem`]).
    pub async fn https() -> anyhow::Result<Self> {
        Self::start(Some(TlsIdentity::generate()?)).await
    }

    async fn start(tls: Option<TlsIdentity>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the test receiver")?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(RECORD_CAPACITY);
        let shared = Arc::new(Shared {
            replies: Mutex::new(Replies {
                queue: VecDeque::new(),
                default: Reply::ok(),
            }),
            count: AtomicUsize::new(0),
            records: tx,
        });
        let shutdown = CancellationToken::new();
        let handler_state = Arc::clone(&shared);
        let handler = move |received| {
            let reply = handler_state.on_request(received);
            std::future::ready(reply)
        };
        let connections = Arc::new(Connections::default());
        let task = tokio::spawn(serve_counted(
            listener,
            tls.as_ref().map(TlsIdentity::acceptor),
            handler,
            shutdown.clone(),
            Arc::clone(&connections),
        ));
        Ok(Self {
            addr,
            tls,
            shared,
            connections,
            records: tokio::sync::Mutex::new(rx),
            shutdown,
            task,
        })
    }

    /// The listening address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether this receiver speaks HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn scheme(&self) -> &'static str {
        if self.is_tls() { "https" } else { "http" }
    }

    /// `http(s)://127.0.0.1:PORT/path` (a leading `/` in `path` is optional).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://{}/{}",
            self.scheme(),
            self.addr,
            path.trim_start_matches('/')
        )
    }

    /// `http(s)://localhost:PORT/path`: the same endpoint by the DNS name in the certificate.
    pub fn localhost_url(&self, path: &str) -> String {
        format!(
            "{}://localhost:{}/{}",
            self.scheme(),
            self.addr.port(),
            path.trim_start_matches('/')
        )
    }

    /// The CA certificate to trust (PEM), for HTTPS receivers.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(TlsIdentity::ca_pem)
    }

    /// Writes the CA certificate to `dir/receiver-ca-PORT.pem` and returns that path, for the
    /// worker's `--extra-ca-file`.
    pub fn write_ca_file(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let tls = self
            .tls
            .as_ref()
            .context("a plain HTTP receiver has no CA")?;
        let path = dir.join(format!("receiver-ca-{}.pem", self.addr.port()));
        tls.write_ca_pem(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Replaces the queue of answers: each request takes the next one, and once it is empty
    /// requests get the default.
    pub fn respond_with(&self, replies: Vec<Reply>) {
        let mut r = self
            .shared
            .replies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        r.queue = replies.into();
    }

    /// Sets the answer given when the queue is empty (`200` until set).
    pub fn set_default(&self, reply: Reply) {
        let mut r = self
            .shared
            .replies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        r.default = reply;
    }

    /// The next recorded request, waiting at most `timeout`; `None` when none came in time.
    pub async fn next(&self, timeout: Duration) -> Option<Received> {
        let mut records = self.records.lock().await;
        tokio::time::timeout(timeout, records.recv())
            .await
            .ok()
            .flatten()
    }

    /// The connections accepted so far and how their TLS handshakes went.
    pub fn connections(&self) -> ConnectionCounts {
        self.connections.counts()
    }

    /// Closes every open connection; new ones are accepted as before.
    pub fn close_connections(&self) {
        self.connections.close_all();
    }

    /// How many requests have been received (read or not, hung ones included).
    pub fn received_count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Every recorded request not yet returned by [`TestReceiver::next`], without waiting.
    ///
    /// Empty while another task is inside `next` (that call is the one consuming them).
    pub fn drain(&self) -> Vec<Received> {
        let mut out = Vec::new();
        if let Ok(mut records) = self.records.try_lock() {
            while let Ok(received) = records.try_recv() {
                out.push(received);
            }
        }
        out
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        // Cancelling ends the accept loop and every connection; aborting covers a runtime that
        // is shutting down and no longer polls the task.
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// An answer read by [`send`].
#[derive(Clone, Debug)]
pub struct ClientResponse {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Sends one request over a new connection to a loopback `http://` or `https://` URL and reads
/// the whole answer; for HTTPS only `ca_pem` is trusted. For tests of receivers: no redirects,
/// no timeout (wrap it in `tokio::time::timeout`), refuses any host that is not loopback.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    ca_pem: Option<&str>,
) -> anyhow::Result<ClientResponse> {
    let url = url::Url::parse(url).with_context(|| format!("parsing {url}"))?;
    let host = url.host_str().context("URL without a host")?.to_owned();
    let ip = match url.host() {
        Some(url::Host::Domain("localhost")) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => anyhow::bail!("{host} is not a loopback host"),
    };
    anyhow::ensure!(ip.is_loopback(), "{ip} is not a loopback address");
    let port = url.port_or_known_default().context("URL without a port")?;
    let stream = TcpStream::connect((ip, port)).await?;
    let _ = stream.set_nodelay(true);

    let mut request = Request::builder()
        .method(method)
        .uri(&url[url::Position::BeforePath..url::Position::AfterQuery])
        .header(hyper::header::HOST, format!("{host}:{port}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::copy_from_slice(body)))?;

    match url.scheme() {
        "http" => exchange(TokioIo::new(stream), request).await,
        "https" => {
            let ca_pem = ca_pem.context("https needs the CA to trust")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(cert.context("reading the CA PEM")?)?;
            }
            let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
            let tls = TlsConnector::from(Arc::new(config))
                .connect(name, stream)
                .await?;
            exchange(TokioIo::new(tls), request).await
        }
        other => anyhow::bail!("unsupported scheme {other}"),
    }
}

async fn exchange<I>(io: I, request: Request<Full<Bytes>>) -> anyhow::Result<ClientResponse>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    // The connection ends on its own once `sender` is dropped at the end of this function.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the response body: {e}"))?
        .to_bytes();
    Ok(ClientResponse {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    })
}

impl ClientResponse {
    /// The first value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
