//! Load generators: participation documents of a fixed size whose id carries the time they
//! were made; publishers over `IngestService.Publish` (closed loop, keeping a window of
//! participations in flight per stream; or paced, at a fixed offered rate); the baseline's
//! plain HTTP/1.1 keep-alive client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::control_plane::with_token;
use pushwire_tests::worker::completed_doc;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Size of every participation document, in bytes.
pub const BODY_BYTES: usize = 2048;
/// Length of a generated participation id: `b` + 15-digit sequence + `-` + 19-digit time.
const ID_LEN: usize = 36;

/// Nanoseconds since `epoch`.
pub fn now_ns(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The time (ns since the benchmark's epoch) a participation was made, out of its id or of
/// a `webhook-id` (`{participation id}_{integration id}`).
pub fn sent_ns(id: &str) -> Option<u64> {
    let participation = id.split('_').next()?;
    let rest = participation.strip_prefix('b')?;
    rest.rsplit('-').next()?.parse().ok()
}

/// Makes participation documents: the completed Qualifio v2 fixture, padded to a fixed size,
/// with a fresh id each.
#[derive(Debug)]
pub struct Bodies {
    template: String,
    id_at: usize,
    epoch: Instant,
    seq: AtomicU64,
}

impl Bodies {
    /// Documents of exactly `size` bytes; ids carry times since `epoch`.
    pub fn new(size: usize, epoch: Instant) -> anyhow::Result<Self> {
        let placeholder = "Z".repeat(ID_LEN);
        let mut doc = completed_doc(&placeholder);
        doc["benchPadding"] = json!("");
        let bare = doc.to_string().len();
        anyhow::ensure!(
            bare <= size,
            "the fixture alone is {bare} bytes, over {size}"
        );
        doc["benchPadding"] = json!("x".repeat(size - bare));
        let template = doc.to_string();
        anyhow::ensure!(template.len() == size, "padding missed {size} bytes");
        let id_at = template
            .find(&placeholder)
            .context("id placeholder not in the document")?;
        anyhow::ensure!(
            template.matches(&placeholder).count() == 1,
            "id placeholder found twice"
        );
        Ok(Self {
            template,
            id_at,
            epoch,
            seq: AtomicU64::new(0),
        })
    }

    /// A new participation, made now: its id and its document.
    pub fn next(&self) -> (String, String) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) % 1_000_000_000_000_000;
        let id = format!("b{seq:015}-{:019}", now_ns(self.epoch));
        debug_assert_eq!(id.len(), ID_LEN);
        let mut doc = self.template.clone();
        doc.replace_range(self.id_at..self.id_at + ID_LEN, &id);
        (id, doc)
    }
}

/// What publishers saw, shared by the streams of a run.
#[derive(Debug, Default)]
pub struct PubStats {
    /// Requests handed to a stream.
    pub sent: AtomicU64,
    /// Responses received.
    pub acked: AtomicU64,
    /// Deliveries reported `DELIVERED`.
    pub delivered: AtomicU64,
    /// Deliveries reported otherwise, and rejected requests.
    pub not_delivered: AtomicU64,
    /// Deliveries reported `QUEUED` (handed off to the delivery store; also in
    /// `not_delivered`).
    pub queued: AtomicU64,
    recording: AtomicBool,
    ack_latencies_us: Mutex<Vec<u32>>,
    keeping_next_attempts: AtomicBool,
    /// `next_attempt_time` of each delivery acknowledged `QUEUED`, by participation id.
    next_attempts: Mutex<HashMap<String, SystemTime>>,
    first_problem: Mutex<Option<String>>,
}

impl PubStats {
    /// Starts or stops recording publish → acknowledged latencies.
    pub fn record(&self, on: bool) {
        self.recording.store(on, Ordering::SeqCst);
    }

    /// The latencies recorded so far, emptied.
    pub fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(
            &mut *self
                .ack_latencies_us
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Starts or stops keeping the `next_attempt_time` of deliveries acknowledged `QUEUED`
    /// (streams publishing to one integration: one per participation).
    pub fn keep_next_attempts(&self, on: bool) {
        self.keeping_next_attempts.store(on, Ordering::SeqCst);
    }

    /// The `next_attempt_time`s kept so far, by participation id, emptied.
    pub fn take_next_attempts(&self) -> HashMap<String, SystemTime> {
        std::mem::take(
            &mut *self
                .next_attempts
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The first thing that went wrong, if anything did.
    pub fn problem(&self) -> Option<String> {
        self.first_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn note(&self, problem: String) {
        let mut first = self
            .first_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(problem);
        }
    }

    fn on_response(&self, r: &pb::PublishResponse, epoch: Instant) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        if !r.error.is_empty() {
            self.not_delivered.fetch_add(1, Ordering::Relaxed);
            self.note(format!("request {} rejected: {}", r.request_id, r.error));
        }
        for d in &r.deliveries {
            if d.outcome() == pb::DeliveryOutcome::Queued {
                self.queued.fetch_add(1, Ordering::Relaxed);
                if self.keeping_next_attempts.load(Ordering::Relaxed)
                    && let Some(at) = d.next_attempt_time
                    && let Ok(at) = SystemTime::try_from(at)
                {
                    self.next_attempts
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(r.request_id.clone(), at);
                }
            }
            if d.outcome() == pb::DeliveryOutcome::Delivered {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                self.not_delivered.fetch_add(1, Ordering::Relaxed);
                self.note(format!(
                    "{} to {}: {:?} {} {}",
                    r.request_id,
                    d.integration,
                    d.outcome(),
                    d.last_error,
                    d.skip_reason
                ));
            }
        }
        if self.recording.load(Ordering::Relaxed)
            && let Some(sent) = sent_ns(&r.request_id)
        {
            let us = (now_ns(epoch).saturating_sub(sent) / 1000).min(u64::from(u32::MAX));
            self.ack_latencies_us
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(us as u32);
        }
    }
}

/// A gRPC channel (its own HTTP/2 connection) to `addr`.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// Opens a Publish stream on its own connection, as a publisher with `token`; a task reads
/// the responses into `stats` and gives a permit back to `window` for each. Requests go
/// through the returned sender (room for `queue` of them).
async fn open_stream(
    target: &Target,
    stats: Arc<PubStats>,
    window: Option<Arc<Semaphore>>,
    queue: usize,
) -> anyhow::Result<(mpsc::Sender<pb::PublishRequest>, JoinHandle<()>)> {
    let epoch = target.epoch;
    let channel = with_token(channel(target.addr).await?, Some(&target.token));
    let mut client = pb::ingest_service_client::IngestServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(queue);
    let mut responses = tokio::time::timeout(
        Duration::from_secs(10),
        client.publish(ReceiverStream::new(rx)),
    )
    .await
    .context("Publish did not answer")?
    .context("Publish refused")?
    .into_inner();
    let reader = tokio::spawn(async move {
        loop {
            match responses.message().await {
                Ok(Some(r)) => {
                    if let Some(w) = &window {
                        w.add_permits(1);
                    }
                    stats.on_response(&r, epoch);
                }
                Ok(None) => break,
                Err(status) => {
                    stats.note(format!("Publish stream ended: {status}"));
                    break;
                }
            }
        }
    });
    Ok((tx, reader))
}

fn request(account: &str, bodies: &Bodies) -> pb::PublishRequest {
    let (id, doc) = bodies.next();
    pb::PublishRequest {
        account: account.to_owned(),
        participation_json: doc,
        request_id: id,
        ..Default::default()
    }
}

/// Publishers running in the background; stopped (streams dropped) on [`Load::stop`] or drop.
#[derive(Debug)]
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Stops sending and reading.
    pub fn stop(self) {}
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where and what publishers publish.
#[derive(Clone, Debug)]
pub struct Target {
    /// The worker's gRPC address.
    pub addr: SocketAddr,
    /// The clock of participation ids.
    pub epoch: Instant,
    /// The documents.
    pub bodies: Arc<Bodies>,
    /// A `publisher` token.
    pub token: Arc<str>,
}

/// Closed loop: `streams` Publish streams, each keeping `window` participations in flight
/// (a new one as each is acknowledged), the accounts taken in turn; at most `limit`
/// participations in all when given.
pub async fn closed_loop(
    target: &Target,
    accounts: Vec<String>,
    streams: usize,
    window: usize,
    stats: Arc<PubStats>,
    limit: Option<u64>,
) -> anyhow::Result<Load> {
    let bodies = &target.bodies;
    let stop = CancellationToken::new();
    let issued = Arc::new(AtomicU64::new(0));
    let accounts = Arc::new(accounts);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let sem = Arc::new(Semaphore::new(window));
        let (tx, reader) =
            open_stream(target, stats.clone(), Some(sem.clone()), window.min(1024)).await?;
        tasks.push(reader);
        let (stop, issued, accounts, bodies, stats) = (
            stop.clone(),
            issued.clone(),
            accounts.clone(),
            bodies.clone(),
            stats.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut turn = s;
            loop {
                let permit = tokio::select! {
                    () = stop.cancelled() => break,
                    p = sem.acquire() => match p { Ok(p) => p, Err(_) => break },
                };
                permit.forget();
                if limit.is_some_and(|l| issued.fetch_add(1, Ordering::Relaxed) >= l) {
                    break;
                }
                let req = request(&accounts[turn % accounts.len()], &bodies);
                turn += 1;
                tokio::select! {
                    () = stop.cancelled() => break,
                    r = tx.send(req) => if r.is_err() { break },
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            // Keep the request side open: closing it would end the stream early.
            stop.cancelled().await;
            drop(tx);
        }));
    }
    Ok(Load { stop, tasks })
}

/// How a paced run went.
#[derive(Clone, Copy, Debug)]
pub struct Paced {
    /// Participations sent.
    pub sent: u64,
    /// Time from the first to the last send.
    pub elapsed: Duration,
    /// Longest a participation was sent after its scheduled time.
    pub max_lag: Duration,
}

/// Open streams for [`pace`].
#[derive(Debug)]
pub struct PacedStreams {
    txs: Vec<mpsc::Sender<pb::PublishRequest>>,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for PacedStreams {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Opens `streams` Publish streams for paced sending (no window kept on this side).
pub async fn paced_streams(
    target: &Target,
    streams: usize,
    stats: Arc<PubStats>,
) -> anyhow::Result<PacedStreams> {
    let mut out = PacedStreams {
        txs: Vec::new(),
        readers: Vec::new(),
    };
    for _ in 0..streams {
        let (tx, reader) = open_stream(target, stats.clone(), None, 65_536).await?;
        out.txs.push(tx);
        out.readers.push(reader);
    }
    Ok(out)
}

/// Sends to `account` at `rate` per second for `duration`, the streams taken in turn: an
/// open loop (what is sent does not wait for what was acknowledged). Sends happen on timer
/// ticks (about 1 ms apart), every participation due by then at once.
pub async fn pace(
    streams: &PacedStreams,
    account: &str,
    rate: f64,
    duration: Duration,
    bodies: &Bodies,
    stats: &PubStats,
    stop: &CancellationToken,
) -> anyhow::Result<Paced> {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut max_lag = Duration::ZERO;
    let mut i = 0u64;
    while i < total && !stop.is_cancelled() {
        let due = start + period.mul_f64(i as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let now = Instant::now();
        max_lag = max_lag.max(now.saturating_duration_since(due));
        while i < total && start + period.mul_f64(i as f64) <= now {
            let tx = &streams.txs[(i as usize) % streams.txs.len()];
            tx.send(request(account, bodies))
                .await
                .map_err(|_| anyhow::anyhow!("a Publish stream closed"))?;
            stats.sent.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
    }
    Ok(Paced {
        sent: i,
        elapsed: start.elapsed(),
        max_lag,
    })
}

/// The baseline: `conns` keep-alive HTTP/1.1 connections to `addr`, each POSTing documents
/// one after the other (as each of the worker's per-integration slots does) until stopped.
pub async fn baseline(addr: SocketAddr, conns: usize, bodies: Arc<Bodies>) -> anyhow::Result<Load> {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tasks.push(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let (bodies, stop) = (bodies.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let result: anyhow::Result<()> = async {
                while !stop.is_cancelled() {
                    let (id, doc) = bodies.next();
                    let req = hyper::Request::post("/baseline")
                        .header(hyper::header::HOST, addr.to_string())
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .header("webhook-id", format!("{id}_baseline"))
                        .body(Full::new(Bytes::from(doc)))?;
                    sender.ready().await?;
                    let resp = sender.send_request(req).await?;
                    anyhow::ensure!(resp.status() == 200, "answered {}", resp.status());
                    resp.into_body().collect().await?;
                }
                Ok(())
            }
            .await;
            if let Err(e) = result
                && !stop.is_cancelled()
            {
                eprintln!("bench: a baseline connection failed: {e}");
            }
        }));
    }
    Ok(Load { stop, tasks })
}

/// `tasks` tasks POSTing the documents to `url` with the webhook client, one request at a
/// time each, until stopped: the client's side of a worker, without the worker.
pub fn webhook_client(
    url: String,
    client: pushwire_common::webhook::client::WebhookClient,
    tasks: usize,
    bodies: Arc<Bodies>,
) -> Load {
    use pushwire_common::webhook::request::WebhookRequest;
    let stop = CancellationToken::new();
    let handles = (0..tasks)
        .map(|_| {
            let (url, client, bodies, stop) =
                (url.clone(), client.clone(), bodies.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let (id, doc) = bodies.next();
                    let req = WebhookRequest {
                        url: url.clone(),
                        headers: vec![
                            ("content-type".into(), "application/json".into()),
                            ("webhook-id".into(), format!("{id}_client")),
                        ],
                        body: Bytes::from(doc),
                    };
                    match client.post(&req).await {
                        Ok(resp) if resp.status == 200 => {}
                        Ok(resp) => {
                            eprintln!("bench: the receiver answered {}", resp.status);
                            return;
                        }
                        Err(e) => {
                            if !stop.is_cancelled() {
                                eprintln!("bench: a client request failed: {e}");
                            }
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    Load {
        stop,
        tasks: handles,
    }
}
