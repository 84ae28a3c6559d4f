//! The one HTTP client of webhook attempts (DESIGN §4): rustls (ring) with platform roots plus
//! an optional private CA, no proxy, no redirects, bounded timeouts and response size, and the
//! SSRF guard wired into name resolution so the vetted address is the one dialled.
//! It sends one prepared [`WebhookRequest`] and reports what happened; retry decisions, breakers
//! and signing belong elsewhere. Errors never carry header values, bodies or URL queries.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::request::{self, WebhookRequest};
use super::ssrf::{self, AllowList, NonPublic};

/// Most resolved addresses handed to the connector for one host (all are vetted first).
const MAX_ADDRS: usize = 16;
/// Idle keep-alive connections kept per host; matches the default per-integration concurrency.
const MAX_IDLE_PER_HOST: usize = 32;
/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest error message kept: messages end up in delivery records and spans.
const MAX_MESSAGE_CHARS: usize = 300;

/// Settings of a [`WebhookClient`].
#[derive(Clone)]
pub struct ClientOptions {
    /// Time to resolve, connect and finish the TLS handshake (default 5 s).
    pub connect_timeout: Duration,
    /// Time for the whole attempt, reading the response included (default 15 s).
    pub request_timeout: Duration,
    /// Bytes of the response body kept; the rest is not read (default 64 KiB).
    pub max_response_body: usize,
    /// Non-public networks that may be contacted anyway (default: none).
    pub allow: AllowList,
    /// PEM certificates trusted in addition to the platform roots (`--extra-ca-file`).
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Default `User-Agent` (default `Pushwire/<version>`); a request's own header wins.
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_response_body: 64 * 1024,
            allow: AllowList::default(),
            extra_ca_pem: None,
            user_agent: request::USER_AGENT.to_owned(),
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_response_body", &self.max_response_body)
            .field("allow", &self.allow)
            .field(
                "extra_ca_pem_len",
                &self.extra_ca_pem.as_ref().map(Vec::len),
            )
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

/// Why a [`WebhookClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// The extra CA file holds no usable PEM certificate.
    #[error("extra CA file: {0}")]
    InvalidCa(String),
    /// The HTTP client could not be set up (e.g. no usable trust roots).
    #[error("HTTP client: {0}")]
    Build(String),
}

/// A webhook endpoint's answer.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values (non-UTF-8 bytes replaced), in received order.
    pub headers: Vec<(String, String)>,
    /// The first `max_response_body` bytes of the body at most.
    pub body_prefix: Vec<u8>,
    /// Time from sending until the response headers arrived.
    pub latency: Duration,
}

impl HttpResponse {
    /// The value of the first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values and the body are the receiver's data: sizes only.
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("body_prefix_len", &self.body_prefix.len())
            .field("latency", &self.latency)
            .finish()
    }
}

/// Why an attempt got no HTTP response. Messages never hold header values, bodies or URLs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// The SSRF guard refused an address of the host.
    #[error("refused to connect to {host}: {addr} is {class}, {}", class.verdict())]
    Blocked {
        /// The URL's host.
        host: String,
        /// The refused address (a literal one, or one the host resolved to).
        addr: IpAddr,
        /// Why: the special-purpose range the address is in.
        class: NonPublic,
    },
    /// The host name could not be resolved.
    #[error("could not resolve host: {0}")]
    Resolve(String),
    /// No connection could be made, or it broke before a response.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The connect or request timeout ran out.
    #[error("timed out")]
    Timeout,
    /// The TLS handshake failed (e.g. untrusted or mismatched certificate).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The URL is not an absolute http(s) URL with a host.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// A header name or value cannot be sent (only the name is reported).
    #[error("invalid header {name:?}")]
    InvalidHeader {
        /// The offending header's name.
        name: String,
    },
    /// The exchange failed after the connection was made.
    #[error("I/O error: {0}")]
    Io(String),
}

impl AttemptError {
    /// Whether a later attempt may succeed: network trouble yes; refusals, bad URLs and
    /// TLS failures (a certificate does not fix itself within a retry window) no.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Resolve(_) | Self::Connect(_) | Self::Timeout | Self::Io(_) => true,
            Self::Blocked { .. }
            | Self::Tls(_)
            | Self::InvalidUrl(_)
            | Self::InvalidHeader { .. } => false,
        }
    }

    /// A short stable name, for the `error.type` span attribute and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Blocked { .. } => "blocked",
            Self::Resolve(_) => "resolve",
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Tls(_) => "tls",
            Self::InvalidUrl(_) => "invalid_url",
            Self::InvalidHeader { .. } => "invalid_header",
            Self::Io(_) => "io",
        }
    }
}

/// Sends webhook attempts; cheap to clone (connections are pooled and shared).
#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    opts: Arc<ClientOptions>,
}

impl fmt::Debug for WebhookClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookClient")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl WebhookClient {
    /// A client with `opts`. Installs rustls's ring provider as the process default if no
    /// provider is installed yet.
    pub fn new(opts: ClientOptions) -> Result<Self, ClientBuildError> {
        Self::build(opts, None)
    }

    /// A client whose host names are looked up by `lookup` instead of the system resolver:
    /// tests make names resolve to what they need (several addresses, changing answers).
    #[cfg(test)]
    fn with_lookup(opts: ClientOptions, lookup: Arc<LookupFn>) -> Result<Self, ClientBuildError> {
        Self::build(opts, Some(lookup))
    }

    fn build(opts: ClientOptions, lookup: Option<Arc<LookupFn>>) -> Result<Self, ClientBuildError> {
        // Err only means a provider is already installed, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();

        let mut builder = reqwest::Client::builder()
            .user_agent(opts.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .no_proxy()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .dns_resolver(VettingResolver {
                allow: Arc::new(opts.allow.clone()),
                lookup,
            });
        if let Some(pem) = &opts.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientBuildError::InvalidCa(chain_message(&e)))?;
            if certs.is_empty() {
                return Err(ClientBuildError::InvalidCa(
                    "no PEM certificate found".into(),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ClientBuildError::Build(chain_message(&e)))?;
        Ok(Self {
            http,
            opts: Arc::new(opts),
        })
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// POSTs `req` and returns the response, whatever its status (a 3xx is not followed).
    pub async fn post(&self, req: &WebhookRequest) -> Result<HttpResponse, AttemptError> {
        let url =
            reqwest::Url::parse(&req.url).map_err(|e| AttemptError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(AttemptError::InvalidUrl(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        // A literal address never reaches the resolver, so it is vetted here, before any
        // connection; names are vetted by `VettingResolver`.
        match url.host() {
            None => return Err(AttemptError::InvalidUrl("no host".into())),
            Some(url::Host::Domain(_)) => {}
            Some(url::Host::Ipv4(v4)) => self.vet_literal(&url, IpAddr::V4(v4))?,
            Some(url::Host::Ipv6(v6)) => self.vet_literal(&url, IpAddr::V6(v6))?,
        }
        let headers = header_map(&req.headers)?;

        let started = Instant::now();
        let mut resp = self
            .http
            .post(url)
            .headers(headers)
            .body(req.body.clone())
            .send()
            .await
            .map_err(classify)?;
        let latency = started.elapsed();

        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let max_body = self.opts.max_response_body;
        let mut body_prefix = Vec::with_capacity(max_body.min(16 * 1024));
        while body_prefix.len() < max_body {
            // The status is the outcome; a body that breaks off or outlasts the request
            // timeout only shortens the prefix kept for diagnostics.
            let Ok(Some(chunk)) = resp.chunk().await else {
                break;
            };
            let room = max_body - body_prefix.len();
            body_prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        // Dropping the response closes the connection instead of draining a large body.
        drop(resp);
        Ok(HttpResponse {
            status,
            headers,
            body_prefix,
            latency,
        })
    }

    fn vet_literal(&self, url: &reqwest::Url, addr: IpAddr) -> Result<(), AttemptError> {
        ssrf::vet(addr, &self.opts.allow).map_err(|b| AttemptError::Blocked {
            host: url.host_str().unwrap_or_default().to_owned(),
            addr,
            class: b.class,
        })
    }
}

fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, AttemptError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let invalid = || AttemptError::InvalidHeader {
            name: name.chars().take(64).collect(),
        };
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        let mut value = HeaderValue::from_str(value).map_err(|_| invalid())?;
        // Keeps HTTP/2 HPACK from indexing credentials and signatures, should h2 be enabled.
        if !request::is_printable_header(name.as_str()) {
            value.set_sensitive(true);
        }
        map.append(name, value);
    }
    Ok(map)
}

/// A host name lookup: every address the name has (ports are ignored).
type LookupFn = dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
    + Send
    + Sync;

/// Resolves with the system resolver and refuses the host when any answer is not public and
/// not allow-listed: a name mixing public and private answers is an SSRF attempt, not a
/// choice. Only vetted addresses are handed to the connector, which dials those very
/// addresses: nothing is looked up twice, so a DNS answer that changes between the check and
/// the connection (DNS rebinding) cannot slip a private address in.
struct VettingResolver {
    allow: Arc<AllowList>,
    /// `None`: the system resolver.
    lookup: Option<Arc<LookupFn>>,
}

impl fmt::Debug for VettingResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VettingResolver")
            .field("allow", &self.allow)
            .field("system_lookup", &self.lookup.is_none())
            .finish()
    }
}

/// A resolution refused by [`VettingResolver`]; found again in reqwest's error chain.
#[derive(Debug, thiserror::Error)]
enum ResolveFailure {
    #[error("{host} resolves to {addr}, which is {class}, {}", class.verdict())]
    Blocked {
        host: String,
        addr: IpAddr,
        class: NonPublic,
    },
    #[error("{host}: {reason}")]
    Lookup { host: String, reason: String },
}

impl Resolve for VettingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        let lookup = self.lookup.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let looked_up = match lookup {
                None => tokio::net::lookup_host((host.clone(), 0))
                    .await
                    .map(Iterator::collect),
                Some(lookup) => lookup(host.clone()).await,
            };
            let answers: Vec<SocketAddr> = match looked_up {
                Ok(addrs) => addrs,
                Err(e) => {
                    return Err(ResolveFailure::Lookup {
                        host,
                        reason: e.to_string(),
                    }
                    .into());
                }
            };
            let vetted = vet_answers(host, answers, &allow)?;
            let addrs: Addrs = Box::new(vetted.into_iter());
            Ok(addrs)
        })
    }
}

/// All of a host's answers must pass [`ssrf::vet`]; at most [`MAX_ADDRS`] of them are kept.
fn vet_answers(
    host: String,
    answers: Vec<SocketAddr>,
    allow: &AllowList,
) -> Result<Vec<SocketAddr>, ResolveFailure> {
    if answers.is_empty() {
        return Err(ResolveFailure::Lookup {
            host,
            reason: "no addresses".into(),
        });
    }
    if let Some((addr, blocked)) = answers
        .iter()
        .find_map(|a| ssrf::vet(a.ip(), allow).err().map(|b| (a.ip(), b)))
    {
        return Err(ResolveFailure::Blocked {
            host,
            addr,
            class: blocked.class,
        });
    }
    let mut answers = answers;
    answers.truncate(MAX_ADDRS);
    Ok(answers)
}

/// Maps a reqwest error to an [`AttemptError`] by what is found in its cause chain.
fn classify(err: reqwest::Error) -> AttemptError {
    // The URL may carry a token in its query: never let it into a message.
    let err = err.without_url();
    if let Some(failure) = find_cause::<ResolveFailure>(&err) {
        return match failure {
            ResolveFailure::Blocked { host, addr, class } => AttemptError::Blocked {
                host: host.clone(),
                addr: *addr,
                class: *class,
            },
            ResolveFailure::Lookup { .. } => AttemptError::Resolve(truncate(failure.to_string())),
        };
    }
    if err.is_timeout() {
        return AttemptError::Timeout;
    }
    if let Some(tls) = find_cause::<rustls::Error>(&err) {
        return AttemptError::Tls(truncate(tls.to_string()));
    }
    if err.is_builder() {
        return AttemptError::InvalidUrl(chain_message(&err));
    }
    if err.is_connect() {
        return AttemptError::Connect(chain_message(&err));
    }
    AttemptError::Io(chain_message(&err))
}

/// The first error of type `T` in `err`'s cause chain. An `io::Error` is looked into with
/// `get_ref` rather than `source`, which skips the error it wraps (TLS failures arrive as a
/// `rustls::Error` inside two nested `io::Error`s).
fn find_cause<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next = Some(err);
    // Bounded: cause chains are short; a cycle must not hang an attempt.
    for _ in 0..32 {
        let e = next?;
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    None
}

/// `outer: cause: root cause`, without repeats, truncated.
fn chain_message(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    for _ in 0..8 {
        let Some(e) = next else { break };
        let msg = e.to_string();
        if !parts.last().is_some_and(|last| last.contains(&msg)) {
            parts.push(msg);
        }
        next = e.source();
    }
    truncate(parts.join(": "))
}

fn truncate(mut s: String) -> String {
    if let Some((i, _)) = s.char_indices().nth(MAX_MESSAGE_CHARS) {
        s.truncate(i);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

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
            let (tx, seen) = mpsc::channel(16);
            let response = response.map(Arc::new);
            let count = connections.clone();
            let task = tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let (response, tx, tls) = (response.clone(), tx.clone(), tls.clone());
                    conns.spawn(async move {
                        match tls {
                            None => serve(stream, response, tx).await,
                            Some(cfg) => {
                                if let Ok(s) =
                                    tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                                {
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
        let mut server =
            TestServer::start(Some(http_response("204 No Content", &[], b"")), None).await;
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
        let mut server =
            TestServer::start(Some(http_response("204 No Content", &[], b"")), None).await;
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
}
