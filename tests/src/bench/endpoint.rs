//! The webhook receivers of the benchmark, on their own tokio runtime: a minimal HTTP/1.1
//! keep-alive server answering `200` with an empty body and counting requests (the same one
//! serves the baseline client and the worker), and a blackhole that accepts connections,
//! reads what comes and never answers.
//!
//! While recording is on, the receiver takes the publish time out of each request's
//! `webhook-id` (see [`crate::load::sent_ns`]) and keeps publish → delivered latencies.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::load;

/// What a receiver saw.
#[derive(Debug)]
pub struct Stats {
    /// Requests answered (the blackhole: connections accepted).
    pub requests: AtomicU64,
    recording: AtomicBool,
    /// Publish → delivered latencies recorded, in microseconds.
    latencies_us: Mutex<Vec<u32>>,
    epoch: Instant,
}

impl Stats {
    fn new(epoch: Instant) -> Self {
        Self {
            requests: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            latencies_us: Mutex::new(Vec::new()),
            epoch,
        }
    }

    /// Requests so far.
    pub fn count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
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
}

/// A running receiver; stops on drop.
#[derive(Debug)]
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub stats: Arc<Stats>,
    shutdown: CancellationToken,
}

impl Server {
    /// `http://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
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

fn start_ok_counting(rt: &Handle, stats: Arc<Stats>) -> anyhow::Result<Server> {
    let listener = bind()?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    rt.spawn(accept_loop(listener, shutdown.clone(), {
        let stats = stats.clone();
        move |stream, shutdown| serve_ok(stream, stats.clone(), shutdown)
    }));
    Ok(Server {
        addr,
        stats,
        shutdown,
    })
}

/// Starts a blackhole on `rt`: connections are accepted and read, never answered.
pub fn start_blackhole(rt: &Handle, epoch: Instant) -> anyhow::Result<Server> {
    let listener = bind()?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(Stats::new(epoch));
    let shutdown = CancellationToken::new();
    rt.spawn(accept_loop(listener, shutdown.clone(), {
        let stats = stats.clone();
        move |stream, shutdown| {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            swallow(stream, shutdown)
        }
    }));
    Ok(Server {
        addr,
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

async fn serve_ok(stream: TcpStream, stats: Arc<Stats>, shutdown: CancellationToken) {
    let service = service_fn(move |req: Request<Incoming>| {
        let stats = stats.clone();
        async move {
            let sent = if stats.recording.load(Ordering::Relaxed) {
                req.headers()
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .and_then(load::sent_ns)
            } else {
                None
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
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        () = shutdown.cancelled() => {}
    }
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
