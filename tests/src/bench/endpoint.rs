//! The webhook receivers of the benchmark, on their own tokio runtime: a minimal HTTP/1.1
//! keep-alive server answering `200` with an empty body and counting requests (the same one
//! serves the baseline client and the worker), the same server answering `503` to the first
//! request of every other participation (so that those are retried from the delivery store),
//! and a blackhole that accepts connections, reads what comes and never answers.
//!
//! While recording is on, the receiver takes the publish time out of each request's
//! `webhook-id` (see [`crate::load::sent_ns`]) and keeps publish → delivered latencies.
//! The `200` receiver also serves HTTPS ([`start_ok_tls_many`]), counting new connections and
//! full vs resumed TLS handshakes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pushwire_tests::receiver::TlsIdentity;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::load;

/// What a receiver saw.
#[derive(Debug)]
pub struct Stats {
    /// Requests answered (the blackhole: connections accepted).
    pub requests: AtomicU64,
    /// Connections accepted (the blackhole excepted).
    pub connections: AtomicU64,
    /// TLS handshakes that were full (a new session).
    pub full_handshakes: AtomicU64,
    /// TLS handshakes that resumed a session.
    pub resumed_handshakes: AtomicU64,
    recording: AtomicBool,
    /// Publish → delivered latencies recorded, in microseconds.
    latencies_us: Mutex<Vec<u32>>,
    /// What a [`start_fail_first`] receiver saw of each participation.
    participations: Mutex<FailFirst>,
    epoch: Instant,
}

/// The participations a [`start_fail_first`] receiver saw, by participation id.
#[derive(Debug, Default)]
struct FailFirst {
    /// New participations seen so far (every other one's first request is answered `503`).
    new: u64,
    /// What became of each.
    seen: HashMap<String, Seen>,
}

/// What a [`start_fail_first`] receiver did with one participation.
#[derive(Clone, Copy, Debug)]
enum Seen {
    /// Its first request was answered `200`.
    Answered,
    /// Its first request was answered `503`; no second request yet.
    Failed,
    /// Its first request was answered `503`; the second arrived then (wall clock).
    Retried(SystemTime),
}

/// How a receiver answers.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `200` to everything.
    Ok,
    /// `503` to the first request of every other new participation, `200` otherwise.
    FailEveryOtherFirst,
}

impl Stats {
    fn new(epoch: Instant) -> Self {
        Self {
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            full_handshakes: AtomicU64::new(0),
            resumed_handshakes: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            latencies_us: Mutex::new(Vec::new()),
            participations: Mutex::new(FailFirst::default()),
            epoch,
        }
    }

    /// Requests so far.
    pub fn count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Connections accepted, full and resumed TLS handshakes so far.
    pub fn connections(&self) -> [u64; 3] {
        [
            &self.connections,
            &self.full_handshakes,
            &self.resumed_handshakes,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    /// Starts or stops recording latencies.
    pub fn record(&self, on: bool) {
        self.recording.store(on, Ordering::SeqCst);
    }

    /// The latencies recorded so far, emptied.
    pub fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(
            &mut *self
                .latencies_us
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// A [`start_fail_first`] receiver: how many participations' first request it answered
    /// `503`, and when (wall clock) the second request of those that came again arrived, by
    /// participation id.
    pub fn retries(&self) -> (u64, HashMap<String, SystemTime>) {
        let p = self
            .participations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut failed = 0;
        let mut arrived = HashMap::new();
        for (id, seen) in &p.seen {
            match seen {
                Seen::Answered => {}
                Seen::Failed => failed += 1,
                Seen::Retried(at) => {
                    failed += 1;
                    arrived.insert(id.clone(), *at);
                }
            }
        }
        (failed, arrived)
    }

    /// The status a [`start_fail_first`] receiver gives the request of `webhook-id` `id`,
    /// which arrived at `at`: `503` to every other new participation's first request, `200`
    /// to the rest; notes the arrival of each second request.
    fn fail_first(&self, id: Option<&str>, at: SystemTime) -> StatusCode {
        let Some(participation) = id.and_then(|id| id.split('_').next()) else {
            return StatusCode::OK;
        };
        let mut p = self
            .participations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let FailFirst { new, seen } = &mut *p;
        match seen.get_mut(participation) {
            Some(state @ Seen::Failed) => {
                *state = Seen::Retried(at);
                StatusCode::OK
            }
            Some(Seen::Answered | Seen::Retried(_)) => StatusCode::OK,
            None => {
                *new += 1;
                // Every other one: the integration's circuit breaker opens after 10 failures
                // in a row, and an answer in between keeps it closed.
                let (state, status) = if *new % 2 == 1 {
                    (Seen::Failed, StatusCode::SERVICE_UNAVAILABLE)
                } else {
                    (Seen::Answered, StatusCode::OK)
                };
                seen.insert(participation.to_owned(), state);
                status
            }
        }
    }
}

/// A running receiver; stops on drop.
#[derive(Debug)]
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// What it saw.
    pub stats: Arc<Stats>,
    shutdown: CancellationToken,
}

impl Server {
    /// `http(s)://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://{}/{}",
            self.scheme,
            self.addr,
            path.trim_start_matches('/')
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn bind() -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a receiver")?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Starts a `200 OK` receiver on `rt`. `epoch` is the clock of the ids in `webhook-id`.
pub fn start_ok(rt: &Handle, epoch: Instant) -> anyhow::Result<Server> {
    start_ok_counting(rt, Arc::new(Stats::new(epoch)))
}

/// Starts `n` `200 OK` receivers on `rt`, each on its own port, counting together.
pub fn start_ok_many(rt: &Handle, epoch: Instant, n: usize) -> anyhow::Result<Vec<Server>> {
    let stats = Arc::new(Stats::new(epoch));
    (0..n)
        .map(|_| start_ok_counting(rt, stats.clone()))
        .collect()
}

/// Starts `n` `200 OK` HTTPS receivers on `rt` serving `tls`'s certificate, each on its own
/// port, counting together; HTTP/2 too when a client offers it, if `http2`.
pub fn start_ok_tls_many(
    rt: &Handle,
    epoch: Instant,
    n: usize,
    tls: &TlsIdentity,
    http2: bool,
) -> anyhow::Result<Vec<Server>> {
    let stats = Arc::new(Stats::new(epoch));
    let acceptor = if http2 {
        tls.acceptor_with_alpn(&[b"h2", b"http/1.1"])
    } else {
        tls.acceptor()
    };
    (0..n)
        .map(|_| start_tls(rt, stats.clone(), acceptor.clone()))
        .collect()
}

fn start_tls(rt: &Handle, stats: Arc<Stats>, acceptor: TlsAcceptor) -> anyhow::Result<Server> {
    listen(rt, "https", stats.clone(), move |stream, shutdown| {
        let (stats, acceptor) = (stats.clone(), acceptor.clone());
        async move {
            stats.connections.fetch_add(1, Ordering::Relaxed);
            let tls = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = acceptor.accept(stream) => match accepted {
                    Ok(tls) => tls,
                    Err(_) => return,
                },
            };
            let counter = match tls.get_ref().1.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => &stats.resumed_handshakes,
                _ => &stats.full_handshakes,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                serve_h2(TokioIo::new(tls), stats, shutdown).await;
            } else {
                serve(TokioIo::new(tls), stats, Mode::Ok, shutdown).await;
            }
        }
    })
}

/// Starts a receiver on `rt` that answers `503` to the first request of every other
/// participation (the first, the third, …, in the order their first requests arrive) and
/// `200` to every other request, noting when each failed participation's second request
/// arrives ([`Stats::retries`]). Participations are told apart by the `webhook-id` header
/// (`{participation id}_{integration id}`), so one integration per receiver.
pub fn start_fail_first(rt: &Handle, epoch: Instant) -> anyhow::Result<Server> {
    start_serving(rt, Arc::new(Stats::new(epoch)), Mode::FailEveryOtherFirst)
}

fn start_ok_counting(rt: &Handle, stats: Arc<Stats>) -> anyhow::Result<Server> {
    start_serving(rt, stats, Mode::Ok)
}

fn start_serving(rt: &Handle, stats: Arc<Stats>, mode: Mode) -> anyhow::Result<Server> {
    listen(rt, "http", stats.clone(), move |stream, shutdown| {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        serve(TokioIo::new(stream), stats.clone(), mode, shutdown)
    })
}

/// Starts a blackhole on `rt`: connections are accepted and read, never answered.
pub fn start_blackhole(rt: &Handle, epoch: Instant) -> anyhow::Result<Server> {
    let stats = Arc::new(Stats::new(epoch));
    listen(rt, "http", stats.clone(), move |stream, shutdown| {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        swallow(stream, shutdown)
    })
}

/// A server on a free loopback port, `conn` serving each connection it accepts (on `rt`)
/// until it is shut down.
fn listen<F, Fut>(
    rt: &Handle,
    scheme: &'static str,
    stats: Arc<Stats>,
    conn: F,
) -> anyhow::Result<Server>
where
    F: Fn(TcpStream, CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = bind()?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    rt.spawn(accept_loop(listener, shutdown.clone(), conn));
    Ok(Server {
        addr,
        scheme,
        stats,
        shutdown,
    })
}

async fn accept_loop<F, Fut>(listener: std::net::TcpListener, shutdown: CancellationToken, conn: F)
where
    F: Fn(TcpStream, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(conn(stream, shutdown.clone()));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
        }
    }
    // Connections end by themselves on `shutdown`.
}

async fn serve<I>(io: I, stats: Arc<Stats>, mode: Mode, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service(stats, mode));
    tokio::select! {
        _ = conn => {}
        () = shutdown.cancelled() => {}
    }
}

/// [`serve`] for a connection that negotiated HTTP/2 (`200` to everything).
async fn serve_h2<I>(io: I, stats: Arc<Stats>, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(io, service(stats, Mode::Ok));
    tokio::select! {
        _ = conn => {}
        () = shutdown.cancelled() => {}
    }
}

/// Answers by `mode`, counting requests and recording latencies.
fn service(
    stats: Arc<Stats>,
    mode: Mode,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Empty<Bytes>>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        let stats = stats.clone();
        async move {
            let arrived = SystemTime::now();
            let webhook_id = req
                .headers()
                .get("webhook-id")
                .and_then(|v| v.to_str().ok());
            let sent = if stats.recording.load(Ordering::Relaxed) {
                webhook_id.and_then(load::sent_ns)
            } else {
                None
            };
            let status = match mode {
                Mode::Ok => StatusCode::OK,
                Mode::FailEveryOtherFirst => stats.fail_first(webhook_id, arrived),
            };
            // Read the whole body, as any receiver does (and keep-alive needs).
            let _ = req.into_body().collect().await;
            stats.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = sent {
                let now = u64::try_from(stats.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let us = u32::try_from(now.saturating_sub(sent) / 1000).unwrap_or(u32::MAX);
                stats
                    .latencies_us
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(us);
            }
            let mut response = Response::new(Empty::<Bytes>::new());
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    })
}

async fn swallow(mut stream: TcpStream, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            n = stream.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}
