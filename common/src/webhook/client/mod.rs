//! The one HTTP client of webhook attempts (DESIGN §4): rustls (ring) with platform roots plus
//! an optional private CA, no proxy, no redirects, bounded timeouts and response size, and the
//! SSRF guard wired into name resolution so the vetted address is the one dialled.
//! It sends one prepared [`WebhookRequest`] and reports what happened; retry decisions, breakers
//! and signing belong elsewhere. Errors never carry header values, bodies or URL queries.

//!
//! This module builds the client and reads responses; `resolve` vets every address a name
//! resolves to before the connector may dial it; `error` says what an attempt that got no
//! response ran into, from reqwest's cause chain; `tickets` keeps the TLS sessions that new
//! connections resume.
//!
//! Connections are pooled per destination (scheme, host and port), whichever integrations send
//! there: one client serves every integration and has no per-integration TLS setting. The
//! idle pool of a destination, and the TLS tickets kept per server, are sized for the
//! concurrency of every integration that may share it ([`ClientOptions::max_idle_per_destination`]),
//! not for one integration's.

mod error;
mod resolve;
#[cfg(test)]
mod tests;
mod tickets;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

pub use error::AttemptError;
use error::{chain_message, classify};
use resolve::{LookupFn, VettingResolver};

use super::request::{self, WebhookRequest};
use super::ssrf::{self, AllowList};

/// Default of [`ClientOptions::max_idle_per_destination`]: 32 integrations sharing a host at
/// the default per-integration concurrency (32). Idle connections to a destination never
/// outnumber the attempts that were in flight to it at once within the idle timeout (60 s), so a
/// generous limit costs nothing until the concurrency is there; the limit it replaces, 32 per
/// host, churned connections as soon as two integrations shared a host.
pub const DEFAULT_MAX_IDLE_PER_DESTINATION: usize = 1024;
/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Servers whose TLS sessions are kept (least recently used forgotten first).
const TLS_SESSION_SERVERS: usize = 256;
/// TLS 1.3 tickets kept in all servers together (each is a few hundred bytes plus its share
/// of the server's certificate chain).
const TLS_TICKETS_TOTAL: usize = 8192;

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
    /// Idle keep-alive connections kept per destination (scheme, host, port), shared by every
    /// integration sending there; also the TLS 1.3 tickets kept per server, so that as many
    /// new connections at once resume their session (default
    /// [`DEFAULT_MAX_IDLE_PER_DESTINATION`]). Below the concurrency of the integrations
    /// sharing a host, connections are closed and opened again under load.
    pub max_idle_per_destination: usize,
    /// Offer HTTP/2 in the TLS handshake (ALPN) beside HTTP/1.1 (default: no, HTTP/1.1 only).
    /// A receiver that takes it gets one multiplexed connection per destination instead of
    /// one per concurrent attempt. See docs/performance.md for what it was measured to change.
    pub http2: bool,
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
            max_idle_per_destination: DEFAULT_MAX_IDLE_PER_DESTINATION,
            http2: false,
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
            .field("max_idle_per_destination", &self.max_idle_per_destination)
            .field("http2", &self.http2)
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

        let tls = tls_config(&opts)?;
        let builder = reqwest::Client::builder()
            .user_agent(opts.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .no_proxy()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            .pool_max_idle_per_host(opts.max_idle_per_destination.max(1))
            .pool_idle_timeout(IDLE_TIMEOUT)
            .dns_resolver(VettingResolver::new(Arc::new(opts.allow.clone()), lookup))
            .tls_backend_preconfigured(tls);
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

/// The TLS settings: ring, TLS 1.2 and 1.3, the platform's verifier (its roots plus the extra
/// CA), HTTP/1.1 (and HTTP/2 if [`ClientOptions::http2`]), and sessions resumed from a [`tickets::TicketStore`] sized for
/// [`ClientOptions::max_idle_per_destination`].
fn tls_config(opts: &ClientOptions) -> Result<rustls::ClientConfig, ClientBuildError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match &opts.extra_ca_pem {
        None => rustls_platform_verifier::Verifier::new(provider.clone()),
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientBuildError::InvalidCa(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientBuildError::InvalidCa(
                    "no PEM certificate found".into(),
                ));
            }
            rustls_platform_verifier::Verifier::new_with_extra_roots(certs, provider.clone())
        }
    }
    .map_err(|e| ClientBuildError::Build(format!("certificate verifier: {e}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientBuildError::Build(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = if opts.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let per_server = opts.max_idle_per_destination.max(1);
    config.resumption = rustls::client::Resumption::store(Arc::new(tickets::TicketStore::new(
        tickets::TicketLimits {
            servers: TLS_SESSION_SERVERS,
            per_server,
            total: TLS_TICKETS_TOTAL.max(per_server),
        },
    )));
    Ok(config)
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
