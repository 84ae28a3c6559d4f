//! The traffic side of the fault-injection suite: receivers whose answers a scenario sets and
//! which count deliveries by participation, the routing set-up over three receivers, a
//! background publication, and the figures each scenario prints.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_common::publisher::{Publisher, Receipt, ReceiptStatus};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, integration, scope};
use crate::eventually::{Poll, eventually};
use crate::receiver::{self, Received, Reply};
use crate::worker::participation;

use super::ACCOUNT;

/// How a [`CountingReceiver`] answers.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Share of requests answered `500` at random.
    pub fail_ratio: f64,
    /// Requests arriving before this instant get no answer until then (and `503` then: the
    /// sender has long given up).
    pub stall_until: Option<Instant>,
    /// Share of requests answered only after `slow_delay`.
    pub slow_ratio: f64,
    /// See `slow_ratio`.
    pub slow_delay: Duration,
}

#[derive(Debug, Default)]
struct Records {
    /// 2xx answers by participation id.
    delivered: HashMap<String, u32>,
    /// First 2xx answer by participation id.
    first: HashMap<String, Instant>,
}

/// A loopback webhook receiver that answers as its [`Behaviour`] says and counts 2xx answers
/// by participation (the part of `webhook-id` before its last `_`).
#[derive(Debug)]
pub struct CountingReceiver {
    addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    records: Arc<Mutex<Records>>,
    attempts: Arc<AtomicU64>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Uniform in [0, 1), from a shared xorshift (no cryptographic quality needed).
fn random_unit(state: &AtomicU64) -> f64 {
    let mut x = state.load(Ordering::Relaxed);
    loop {
        let mut y = x;
        y ^= y << 13;
        y ^= y >> 7;
        y ^= y << 17;
        match state.compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return (y >> 11) as f64 / (1u64 << 53) as f64,
            Err(now) => x = now,
        }
    }
}

impl CountingReceiver {
    /// Starts one answering `200` at once.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let records = Arc::new(Mutex::new(Records::default()));
        let attempts = Arc::new(AtomicU64::new(0));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        let rng = Arc::new(AtomicU64::new(seed ^ u64::from(addr.port())));
        let shutdown = CancellationToken::new();
        let (b, r, a) = (behaviour.clone(), records.clone(), attempts.clone());
        let handler = move |req: Received| {
            a.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let behaviour = b.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let reply = if let Some(until) = behaviour.stall_until.filter(|u| *u > now) {
                Reply::status(503).after(until - now)
            } else if random_unit(&rng) < behaviour.fail_ratio {
                Reply::status(500)
            } else {
                let id = req
                    .header("webhook-id")
                    .and_then(|w| w.rsplit_once('_'))
                    .map_or_else(String::new, |(p, _)| p.to_owned());
                let mut records = r.lock().unwrap_or_else(PoisonError::into_inner);
                *records.delivered.entry(id.clone()).or_default() += 1;
                records.first.entry(id).or_insert(now);
                drop(records);
                if behaviour.slow_ratio > 0.0 && random_unit(&rng) < behaviour.slow_ratio {
                    Reply::ok().after(behaviour.slow_delay)
                } else {
                    Reply::ok()
                }
            };
            std::future::ready(reply)
        };
        let task = tokio::spawn(receiver::serve(listener, None, handler, shutdown.clone()));
        Ok(Self {
            addr,
            behaviour,
            records,
            attempts,
            shutdown,
            task,
        })
    }

    /// Changes how it answers from now on.
    pub fn set(&self, behaviour: Behaviour) {
        *self
            .behaviour
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = behaviour;
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Requests received, answered or not.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// 2xx answers by participation id.
    pub fn delivered(&self) -> HashMap<String, u32> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .delivered
            .clone()
    }

    /// First 2xx answer by participation id.
    pub fn first_deliveries(&self) -> HashMap<String, Instant> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first
            .clone()
    }
}

impl Drop for CountingReceiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// Creates integration `id` of [`ACCOUNT`] posting to `url`; its name.
pub async fn create_integration(admin: &Admin, id: &str, url: &str) -> anyhow::Result<String> {
    Ok(admin
        .create_integration(ACCOUNT, id, integration(id, url))
        .await
        .with_context(|| format!("creating integration {id}"))?
        .name)
}

/// Creates push scope `id` of [`ACCOUNT`]; the revision it was written at.
pub async fn create_scope(admin: &Admin, id: &str, scope: pb::PushScope) -> anyhow::Result<i64> {
    let created = admin
        .create_scope(ACCOUNT, id, scope)
        .await
        .with_context(|| format!("creating push scope {id}"))?;
    Ok(created.etag.parse()?)
}

/// Routes to three receivers: 0 gets everything, 1 the participations on website 1, 2
/// everything but campaign 3 (see [`expected_routes`]). The last revision written.
pub async fn route_three(admin: &Admin, receivers: [&CountingReceiver; 3]) -> anyhow::Result<i64> {
    let all = create_integration(admin, "all", &receivers[0].url()).await?;
    create_scope(admin, "all", scope(&all, pb::PushScopeLevel::Account, "")).await?;
    let site = create_integration(admin, "site-1", &receivers[1].url()).await?;
    create_scope(
        admin,
        "site-1",
        scope(&site, pb::PushScopeLevel::Website, "1"),
    )
    .await?;
    let most = create_integration(admin, "not-campaign-3", &receivers[2].url()).await?;
    create_scope(
        admin,
        "not-campaign-3",
        scope(&most, pb::PushScopeLevel::Account, ""),
    )
    .await?;
    let mut except = scope(&most, pb::PushScopeLevel::Campaign, "3");
    except.set_action(pb::PushAction::DoNotPush);
    create_scope(admin, "not-campaign-3-except", except).await
}

/// Participation `i`: id `fault-{i}`, campaign `1 + i % 4`, website `1 + i % 2`, completed and
/// identified.
pub fn doc(i: usize) -> (String, String) {
    let id = format!("fault-{i:05}");
    let json = participation(&id, 1 + (i % 4) as u64, Some(1 + (i % 2) as u64), true);
    (id, json)
}

/// Which of [`route_three`]'s receivers participation `i` goes to.
pub fn expected_routes(i: usize) -> [bool; 3] {
    [true, i.is_multiple_of(2), i % 4 != 2]
}

/// Participations published in the background, at a rate or as fast as the publisher takes
/// them.
#[derive(Debug)]
pub struct Publication {
    /// When each participation was handed to the publisher, by id.
    pub published: Arc<Mutex<HashMap<String, Instant>>>,
    /// Receipts so far.
    pub receipts: Arc<AtomicUsize>,
    task: JoinHandle<Vec<Receipt>>,
    /// How many.
    pub n: usize,
}

impl Publication {
    /// Publishes `docs` through `publisher`, at most `rate` a second when given.
    pub fn start(
        publisher: Arc<Publisher>,
        docs: Vec<(String, String)>,
        rate: Option<f64>,
    ) -> Self {
        let n = docs.len();
        let published = Arc::new(Mutex::new(HashMap::with_capacity(n)));
        let receipts = Arc::new(AtomicUsize::new(0));
        let (p, r) = (published.clone(), receipts.clone());
        let task = tokio::spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut pace =
                rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1.0))));
            let mut out = Vec::with_capacity(n);
            for (id, json) in docs {
                if let Some(pace) = pace.as_mut() {
                    pace.tick().await;
                }
                while let Ok(receipt) = rx.try_recv() {
                    out.push(receipt);
                }
                p.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id, Instant::now());
                let (tx, r) = (tx.clone(), r.clone());
                publisher
                    .publish_with(
                        pb::PublishRequest {
                            participation_json: json,
                            ..Default::default()
                        },
                        move |receipt| {
                            r.fetch_add(1, Ordering::Relaxed);
                            let _ = tx.send(receipt);
                        },
                    )
                    .await;
            }
            drop(tx);
            while let Some(receipt) = rx.recv().await {
                out.push(receipt);
            }
            out
        });
        Self {
            published,
            receipts,
            task,
            n,
        }
    }

    /// Receipts so far.
    pub fn acknowledged(&self) -> usize {
        self.receipts.load(Ordering::Relaxed)
    }

    /// Waits until at least `count` receipts came, at most `limit`.
    pub async fn wait_receipts(&self, count: usize, limit: Duration) -> anyhow::Result<()> {
        eventually(&format!("{count} receipts"), limit, || async {
            let n = self.acknowledged();
            Ok(Poll::when(n >= count, format!("{n} receipts")))
        })
        .await
    }

    /// Every receipt and when each participation was handed to the publisher, at most
    /// `limit` from now.
    pub async fn finish(
        self,
        limit: Duration,
    ) -> anyhow::Result<(Vec<Receipt>, HashMap<String, Instant>)> {
        let n = self.n;
        let receipts = &self.receipts;
        let out = tokio::time::timeout(limit, self.task)
            .await
            .with_context(|| {
                format!(
                    "{} of {n} receipts after {limit:?}",
                    receipts.load(Ordering::Relaxed)
                )
            })?
            .context("the publication task failed")?;
        let published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok((out, published))
    }
}

/// What a scenario measured, printed as one line.
#[derive(Debug, Default)]
pub struct Figures {
    /// Scenario name.
    pub scenario: String,
    /// Participations published.
    pub sent: usize,
    /// Receipts `Done`.
    pub done: usize,
    /// Receipts not `Done`, with why (at most 10).
    pub not_done: Vec<String>,
    /// Count of receipts not `Done`.
    pub not_done_count: usize,
    /// (participation, receiver) pairs expected.
    pub expected: usize,
    /// Expected pairs delivered at least once.
    pub delivered: usize,
    /// Expected pairs missing (at most 10).
    pub missing: Vec<String>,
    /// Count of expected pairs missing.
    pub missing_count: usize,
    /// 2xx answers beyond the first for a pair.
    pub duplicates: u64,
    /// Participations delivered twice or more to some receiver.
    pub duplicated_participations: usize,
    /// Deliveries to a receiver the participation should not reach.
    pub unexpected: u64,
    /// Receipts written to more than one stream.
    pub resent: usize,
    /// Longest publish → receipt.
    pub max_latency: Duration,
    /// Per receiver: longest publish → first delivery.
    pub max_delivery_latency: Vec<Duration>,
    /// Per receiver: 99th percentile of publish → first delivery.
    pub p99_delivery_latency: Vec<Duration>,
    /// Scenario time.
    pub elapsed: Duration,
}

/// Counts receipts, and deliveries of participations `ids` ([`doc`]) against their routes
/// `routes(i)` (one flag per receiver).
pub fn tally(
    scenario: &str,
    receipts: &[Receipt],
    published: &HashMap<String, Instant>,
    receivers: &[&CountingReceiver],
    ids: std::ops::Range<usize>,
    routes: impl Fn(usize) -> Vec<bool>,
    started: Instant,
) -> Figures {
    let mut f = Figures {
        scenario: scenario.to_owned(),
        sent: receipts.len(),
        elapsed: started.elapsed(),
        ..Figures::default()
    };
    for r in receipts {
        f.max_latency = f.max_latency.max(r.elapsed);
        if r.sends > 1 {
            f.resent += 1;
        }
        if r.status() == ReceiptStatus::Done {
            f.done += 1;
        } else {
            f.not_done_count += 1;
            if f.not_done.len() < 10 {
                f.not_done
                    .push(format!("{}: {:?}", r.participation_id(), r.outcome));
            }
        }
    }
    let mut duplicated = std::collections::HashSet::new();
    for (k, rx) in receivers.iter().enumerate() {
        let delivered = rx.delivered();
        let first = rx.first_deliveries();
        let mut latencies = Vec::new();
        for i in ids.clone() {
            let id = format!("fault-{i:05}");
            let count = delivered.get(&id).copied().unwrap_or(0);
            if !routes(i)[k] {
                f.unexpected += u64::from(count);
                continue;
            }
            f.expected += 1;
            if count == 0 {
                f.missing_count += 1;
                if f.missing.len() < 10 {
                    f.missing.push(format!("{id} → receiver {k}"));
                }
                continue;
            }
            f.delivered += 1;
            if count > 1 {
                f.duplicates += u64::from(count - 1);
                duplicated.insert(id.clone());
            }
            if let (Some(at), Some(p)) = (first.get(&id), published.get(&id)) {
                latencies.push(at.saturating_duration_since(*p));
            }
        }
        latencies.sort();
        f.max_delivery_latency
            .push(latencies.last().copied().unwrap_or_default());
        f.p99_delivery_latency.push(
            latencies
                .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default(),
        );
    }
    f.duplicated_participations = duplicated.len();
    f
}

impl Figures {
    /// Prints the figures (one line, then the problems if any).
    pub fn print(&self) {
        let ms = |d: &Duration| format!("{:.0}ms", d.as_secs_f64() * 1000.0);
        let per_receiver: BTreeMap<usize, String> = self
            .max_delivery_latency
            .iter()
            .zip(&self.p99_delivery_latency)
            .enumerate()
            .map(|(k, (max, p99))| (k, format!("p99 {} max {}", ms(p99), ms(max))))
            .collect();
        println!(
            "faults/{}: sent {}, acknowledged done {}, deliveries expected {}, delivered {}, \
             duplicates {} (in {} participations), unexpected {}, re-sent {}, max latency {} \
             (publish → receipt), delivery latency by receiver {:?}, scenario {:.1}s",
            self.scenario,
            self.sent,
            self.done,
            self.expected,
            self.delivered,
            self.duplicates,
            self.duplicated_participations,
            self.unexpected,
            self.resent,
            ms(&self.max_latency),
            per_receiver,
            self.elapsed.as_secs_f64(),
        );
        if self.not_done_count > 0 {
            println!(
                "  {} receipts not done: {:?}",
                self.not_done_count, self.not_done
            );
        }
        if self.missing_count > 0 {
            println!(
                "  {} deliveries missing: {:?}",
                self.missing_count, self.missing
            );
        }
    }

    /// The invariants every scenario holds: every participation acknowledged `Done`, every
    /// expected delivery made, nothing delivered where it does not belong.
    pub fn assert_nothing_lost(&self, n: usize) {
        assert_eq!(self.sent, n, "every participation got a receipt");
        assert_eq!(
            self.done, n,
            "every receipt done: {} not: {:?}",
            self.not_done_count, self.not_done
        );
        assert_eq!(
            self.missing_count, 0,
            "every expected delivery made; missing: {:?}",
            self.missing
        );
        assert_eq!(self.delivered, self.expected);
        assert_eq!(self.unexpected, 0, "no delivery outside the routes");
    }
}
