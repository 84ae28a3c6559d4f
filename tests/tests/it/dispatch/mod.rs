//! End-to-end tests of the worker's `Dispatcher` (DESIGN §4 "Delivery out") against real HTTP(S)
//! receivers on loopback: what is sent (ids, signatures, headers, body), which answers are
//! retried or final, 410 disabling, timeouts, the retry window, configuration changes between
//! attempts, the circuit breaker, per-integration concurrency and isolation, and shutdown.
//!
//! The first attempt is the dispatcher's; the retries come from a real delivery store (SQLite
//! in the test's temp dir) through the worker's claimer, as in the worker. [`Harness::deliver`]
//! follows a delivery to its end: straight from the first attempt, or, once handed off
//! (`QUEUED`), from the store's record.
//!
//! Timings are never asserted except as generous upper bounds that keep a broken dispatcher
//! from hanging the suite: every test body runs under [`LIMIT`]. Ordering and counts are
//! asserted instead, and receivers that must act "between attempts" do so from inside their
//! request handler (before answering), so nothing depends on a race.

mod answers;
mod breaker;
mod changes;
mod lanes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pushwire_common::delivery_store::{
    DeliveryKey, DeliveryRecord, DeliveryState, SqliteStore, StoreUrl,
};
use pushwire_common::domain::{
    AccountName, AuthHeader, IncompletePolicy, Integration, IntegrationName, PayloadVariables,
    Secret, SignatureScheme, SigningSecret,
};
use pushwire_common::webhook::client::{ClientOptions, WebhookClient};
use pushwire_common::webhook::signing;
use pushwire_common::webhook::ssrf::AllowList;
use pushwire_tests::eventually::{Poll, eventually, until};
use pushwire_tests::receiver::{Received, Reply, TestReceiver, serve};
use pushwire_worker::budget::MemoryBudget;
use pushwire_worker::deliver::breaker::BreakerOptions;
use pushwire_worker::deliver::dispatch::{
    DisableRequest, DispatchOptions, Dispatcher, IntegrationSource, Job, LaneStats, Outcome,
};
use pushwire_worker::deliver::retries::{self, RetryBudget, RetryOptions};
use pushwire_worker::deliver::retry::RetryPolicy;
use pushwire_worker::deliver::store::{Handoff, StoreHandle};
use pushwire_worker::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound of every test body (a hang guard, not a timing assertion).
const LIMIT: Duration = Duration::from_secs(20);
/// Upper bound of one wait for something that is expected to happen.
const WAIT: Duration = Duration::from_secs(10);

const ACCOUNT: &str = "42";
const SECRET: &str = "qualifio-secret-1";
const AUTH_VALUE: &str = "Bearer tok-123";
/// Non-ASCII on purpose: the body must arrive byte for byte.
const BODY: &str = "{\"id\":\"P-1\",\"state\":\"COMPLETED\",\"campaign\":{\"id\":\"77\"},\"name\":\"Zo\u{eb} \u{2014} caf\u{e9}\"}";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The configuration the dispatcher reads before each attempt; tests change it mid-delivery.
#[derive(Debug, Default)]
struct Source {
    map: Mutex<HashMap<IntegrationName, Arc<Integration>>>,
}

impl IntegrationSource for Source {
    fn current(&self, name: &IntegrationName) -> Option<Arc<Integration>> {
        self.lock().get(name).cloned()
    }
}

impl Source {
    fn lock(&self) -> MutexGuard<'_, HashMap<IntegrationName, Arc<Integration>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(&self, integration: Integration) -> Arc<Integration> {
        let integration = Arc::new(integration);
        self.lock()
            .insert(integration.name.clone(), Arc::clone(&integration));
        integration
    }

    fn update(&self, name: &IntegrationName, change: impl FnOnce(&mut Integration)) {
        let mut map = self.lock();
        let current = map.get_mut(name).expect("integration to update exists");
        let mut next = (**current).clone();
        change(&mut next);
        next.revision += 1;
        *current = Arc::new(next);
    }

    fn remove(&self, name: &IntegrationName) {
        self.lock().remove(name);
    }
}

fn integration(id: &str, url: &str) -> Integration {
    let account = AccountName::from_id(ACCOUNT).expect("account id");
    let now = SystemTime::now();
    Integration {
        name: IntegrationName::new(&account, id).expect("integration id"),
        display_name: format!("Test {id}"),
        url: url.to_owned(),
        enabled: true,
        disabled_reason: String::new(),
        incomplete_participations: IncompletePolicy::Skip,
        payload_variables: PayloadVariables::AsPublished,
        auth_header: Some(AuthHeader {
            name: "Authorization".to_owned(),
            value: Secret::new(AUTH_VALUE),
        }),
        secrets: vec![SigningSecret {
            secret: Secret::new(SECRET),
            expire_time: None,
        }],
        signature_schemes: vec![SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks],
        create_time: now,
        update_time: now,
        revision: 1,
    }
}

/// A retry policy without jitter (so counts are exact) waiting `delays_ms` between attempts.
fn retry_policy(delays_ms: &[u64], window: Duration) -> RetryPolicy {
    RetryPolicy {
        delays: delays_ms
            .iter()
            .copied()
            .map(Duration::from_millis)
            .collect(),
        jitter: 0.0,
        window,
    }
}

/// Dispatch options with this schedule and window, concurrency 32 and a breaker that does
/// not open within a test (tests of the breaker set their own).
fn dispatch_options(delays_ms: &[u64], window: Duration) -> DispatchOptions {
    DispatchOptions {
        retry: retry_policy(delays_ms, window),
        concurrency: 32,
        breaker_threshold: 1_000,
        slot_wait: Duration::from_secs(1),
    }
}

/// A client that may reach loopback, with a short request timeout.
fn client_options(request_timeout: Duration) -> ClientOptions {
    ClientOptions {
        allow: AllowList::parse(["127.0.0.0/8"]).expect("CIDR"),
        connect_timeout: Duration::from_secs(2),
        request_timeout,
        ..ClientOptions::default()
    }
}

struct Harness {
    dispatcher: Dispatcher,
    /// The memory budget retries from the store take their share of.
    budget: MemoryBudget,
    source: Arc<Source>,
    disabled: mpsc::Receiver<DisableRequest>,
    shutdown: CancellationToken,
    store: StoreHandle,
    _dir: tempfile::TempDir,
}

/// Lease of the harness's claims.
const LEASE: Duration = Duration::from_secs(5);

impl Harness {
    async fn new(opts: DispatchOptions, client: ClientOptions) -> Self {
        Self::build(opts, client, None).await
    }

    async fn with_breaker(
        opts: DispatchOptions,
        client: ClientOptions,
        breaker: BreakerOptions,
    ) -> Self {
        Self::build(opts, client, Some(breaker)).await
    }

    async fn build(
        opts: DispatchOptions,
        client: ClientOptions,
        breaker: Option<BreakerOptions>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = StoreUrl::sqlite(dir.path().join("deliveries.sqlite3"));
        let store = SqliteStore::open(&url, &Default::default())
            .await
            .expect("SQLite delivery store");
        pushwire_common::delivery_store::DeliveryStore::migrate(&store)
            .await
            .expect("migrations");
        let metrics = Arc::new(Metrics::default());
        let store = StoreHandle::new(Arc::new(store), metrics.clone());
        let budget = MemoryBudget::new(64 << 20, &metrics);
        let client = WebhookClient::new(client).expect("webhook client");
        let source = Arc::new(Source::default());
        let (tx, disabled) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let stop_claims = shutdown.child_token();
        let (handoff, writer) = Handoff::new(store.clone(), shutdown.clone());
        tokio::spawn(writer);
        let mut dispatcher = Dispatcher::new(
            client,
            opts,
            Arc::clone(&source) as Arc<dyn IntegrationSource>,
            tx,
            handoff,
            shutdown.clone(),
        );
        if let Some(breaker) = breaker {
            dispatcher = dispatcher.with_breaker_options(breaker);
        }
        tokio::spawn(retries::run(
            dispatcher.clone(),
            store.clone(),
            metrics,
            RetryOptions {
                worker_id: "dispatch-tests".into(),
                lease: LEASE,
                poll: Duration::from_millis(10),
                capacity: 64,
            },
            Some(RetryBudget {
                budget: budget.clone(),
                largest: MemoryBudget::share(1 << 20),
            }),
            stop_claims,
        ));
        Self {
            dispatcher,
            budget,
            source,
            disabled,
            shutdown,
            store,
            _dir: dir,
        }
    }

    /// Adds (or replaces) an integration `id` sending to `url`.
    fn add(&self, id: &str, url: &str) -> Arc<Integration> {
        self.source.put(integration(id, url))
    }

    /// Delivers `job` to its end: the first attempt's outcome, or once handed off, the final
    /// outcome of its retries from the store.
    async fn deliver(&self, job: Job) -> Outcome {
        to_end(&self.dispatcher, &self.store, job).await
    }

    /// [`Harness::deliver`] in a task.
    fn spawn(&self, job: Job) -> JoinHandle<Outcome> {
        let dispatcher = self.dispatcher.clone();
        let store = self.store.clone();
        tokio::spawn(async move { to_end(&dispatcher, &store, job).await })
    }

    /// The first attempt of `job` in a task: its outcome, `Queued` included (not followed).
    fn spawn_first(&self, job: Job) -> JoinHandle<Outcome> {
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move { dispatcher.deliver(job).await })
    }

    fn stats(&self, integration: &Integration) -> Option<LaneStats> {
        self.dispatcher
            .stats()
            .into_iter()
            .find(|s| s.integration == integration.name)
    }

    /// Waits until the integration's breaker would let an attempt through (its cool-down is
    /// over).
    async fn wait_cool_down(&self, integration: &Integration) {
        until("the breaker's cool-down ended", WAIT, || {
            !self.dispatcher.open_breakers().contains(&integration.name)
        })
        .await
        .expect("the cool-down ended");
    }

    /// Waits until the integration's lane matches `done`.
    async fn wait_stats(&self, integration: &Integration, done: impl Fn(&LaneStats) -> bool) {
        let what = format!("the lane of {} in the expected state", integration.name);
        until(&what, WAIT, || {
            self.stats(integration).is_some_and(|s| done(&s))
        })
        .await
        .expect("lane reached the expected state");
    }
}

fn job(integration: &Integration, participation: &str) -> Job {
    Job {
        integration: Arc::new(integration.clone()),
        participation_id: participation.into(),
        body: Bytes::from_static(BODY.as_bytes()),
        traceparent: Some(TRACEPARENT.to_owned()),
        tracestate: String::new(),
        campaign_id: "77".into(),
        website_id: None,
    }
}

/// The first attempt's outcome of `job`, or once handed off, its final outcome from the store
/// (as the first-attempt outcome types it).
async fn to_end(dispatcher: &Dispatcher, store: &StoreHandle, job: Job) -> Outcome {
    let outcome = dispatcher.deliver(job.clone()).await;
    if !matches!(outcome, Outcome::Queued { .. }) {
        return outcome;
    }
    let record = settled(store, &job.integration.name, &job.participation_id).await;
    let attempts = record.attempt_count;
    match record.state {
        DeliveryState::Delivered => Outcome::Delivered {
            attempts,
            status: record.last_status_code.unwrap_or_default(),
        },
        DeliveryState::Failed => Outcome::Failed {
            attempts,
            last_status: record.last_status_code,
            last_error: record.last_error.unwrap_or_default(),
        },
        DeliveryState::Skipped => Outcome::Skipped {
            reason: record.skip_reason.unwrap_or_default(),
        },
        DeliveryState::Queued => unreachable!("settled"),
    }
}

/// The stored delivery of `participation` to `integration`, once it has a final outcome.
async fn settled(
    store: &StoreHandle,
    integration: &IntegrationName,
    participation: &str,
) -> DeliveryRecord {
    let key = DeliveryKey::new(integration.clone(), participation);
    eventually("the delivery settled in the store", LIMIT, || async {
        let record = store.store().get(&key).await?;
        Ok(match record {
            Some(r) if r.state != DeliveryState::Queued => Poll::Ready(r),
            other => Poll::not_yet(other.map(|r| (r.state, r.attempt_count))),
        })
    })
    .await
    .expect("the delivery settled")
}

fn delivered(attempts: u32, status: u16) -> Outcome {
    Outcome::Delivered { attempts, status }
}

/// The last error of a `Failed` outcome with these attempts and last status; panics otherwise.
fn failed(attempts: u32, last_status: Option<u16>, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Failed {
            attempts: a,
            last_status: s,
            last_error,
        } if *a == attempts && *s == last_status => last_error.clone(),
        other => panic!(
            "expected Failed {{ attempts: {attempts}, last_status: {last_status:?} }}, got {other:?}"
        ),
    }
}

async fn next(receiver: &TestReceiver) -> Received {
    receiver
        .next(WAIT)
        .await
        .expect("the receiver got a request in time")
}

async fn wait_count(receiver: &TestReceiver, n: usize) {
    until(&format!("{n} requests received"), WAIT, || {
        receiver.received_count() >= n
    })
    .await
    .expect("the receiver got its requests");
}

/// Checks one received webhook: method, fixed headers, id, body bytes and both signatures
/// (verified with `secret`), the auth header and the `traceparent`.
fn check_webhook(r: &Received, integration: &Integration, participation: &str, secret: &str) {
    let secret = Secret::new(secret);
    let id = format!("{participation}_{}", integration.name.id());
    assert_eq!(r.method, "POST");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let agent = r.header("user-agent").expect("user-agent");
    assert!(agent.starts_with("Pushwire/"), "{agent}");
    assert_eq!(r.header("webhook-id"), Some(id.as_str()));
    assert!(!id.contains('.'), "{id}");
    assert_eq!(r.body, BODY.as_bytes(), "body sent byte for byte");
    let ts: i64 = r
        .header("webhook-timestamp")
        .expect("webhook-timestamp")
        .parse()
        .expect("unix seconds");
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("seconds fit");
    assert!(
        (now - ts).abs() < 600,
        "timestamp {ts} is the attempt's time"
    );
    let qualifio = r
        .header("x-qualifio-signature")
        .expect("qualifio signature");
    assert!(
        signing::verify_qualifio(&secret, &r.body, qualifio),
        "X-Qualifio-Signature verifies"
    );
    let standard = r.header("webhook-signature").expect("webhook-signature");
    assert!(
        signing::verify_standard_webhooks(&secret, &id, ts, &r.body, standard),
        "webhook-signature verifies"
    );
    assert_eq!(r.header("authorization"), Some(AUTH_VALUE));
    assert_eq!(r.header("traceparent"), Some(TRACEPARENT));
}

/// A receiver whose handler is the test's own function, for receivers that must act (change
/// the configuration, hold answers, count concurrency) while a request is being answered.
struct HookReceiver {
    url: String,
    shutdown: CancellationToken,
}

impl HookReceiver {
    async fn start<H, F>(handler: H) -> Self
    where
        H: Fn(Received) -> F + Send + Sync + 'static,
        F: Future<Output = Reply> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, None, handler, shutdown.clone()));
        Self { url, shutdown }
    }
}

impl Drop for HookReceiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Shared state of a [`HookReceiver`] answering with a settable status, optionally holding
/// every answer until a gate opens, and recording what it got.
#[derive(Clone)]
struct Gated {
    status: Arc<AtomicU16>,
    count: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
    seen: mpsc::UnboundedSender<Received>,
}

impl Gated {
    async fn start(status: u16) -> (HookReceiver, Self, mpsc::UnboundedReceiver<Received>) {
        let (seen, seen_rx) = mpsc::unbounded_channel();
        let state = Self {
            status: Arc::new(AtomicU16::new(status)),
            count: Arc::default(),
            gate: watch::Sender::new(true),
            seen,
        };
        let handler_state = state.clone();
        let receiver = HookReceiver::start(move |r| {
            let state = handler_state.clone();
            async move {
                state.count.fetch_add(1, Ordering::SeqCst);
                let _ = state.seen.send(r);
                let mut gate = state.gate.subscribe();
                // Err only when the sender is gone, i.e. the test is over.
                let _ = gate.wait_for(|open| *open).await;
                Reply::status(state.status.load(Ordering::SeqCst))
            }
        })
        .await;
        (receiver, state, seen_rx)
    }

    fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn hold(&self, held: bool) {
        self.gate.send_replace(!held);
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}
