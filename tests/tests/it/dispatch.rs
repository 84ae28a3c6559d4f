//! End-to-end tests of the worker's `Dispatcher` (DESIGN §4 "Delivery out") against real HTTP(S)
//! receivers on loopback: what is sent (ids, signatures, headers, body), which answers are
//! retried or final, 410 disabling, timeouts, the retry window, configuration changes between
//! attempts, the circuit breaker, per-integration concurrency and isolation, and shutdown.
//!
//! Timings are never asserted except as generous upper bounds that keep a broken dispatcher
//! from hanging the suite: every test body runs under [`LIMIT`]. Ordering and counts are
//! asserted instead, and receivers that must act "between attempts" do so from inside their
//! request handler (before answering), so nothing depends on a race.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pushwire_common::domain::{
    AccountName, AuthHeader, IncompletePolicy, Integration, IntegrationName, PayloadVariables,
    Secret, SignatureScheme, SigningSecret,
};
use pushwire_common::webhook::client::{ClientOptions, WebhookClient};
use pushwire_common::webhook::signing;
use pushwire_common::webhook::ssrf::AllowList;
use pushwire_tests::eventually::{until, within};
use pushwire_tests::receiver::{Received, Reply, TestReceiver, serve};
use pushwire_worker::deliver::breaker::BreakerOptions;
use pushwire_worker::deliver::dispatch::{
    DisableRequest, DispatchOptions, Dispatcher, IntegrationSource, Job, LaneStats, Outcome,
};
use pushwire_worker::deliver::retry::RetryPolicy;
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
    source: Arc<Source>,
    disabled: mpsc::Receiver<DisableRequest>,
    shutdown: CancellationToken,
}

impl Harness {
    fn new(opts: DispatchOptions, client: ClientOptions) -> Self {
        Self::build(opts, client, None)
    }

    fn with_breaker(opts: DispatchOptions, client: ClientOptions, breaker: BreakerOptions) -> Self {
        Self::build(opts, client, Some(breaker))
    }

    fn build(
        opts: DispatchOptions,
        client: ClientOptions,
        breaker: Option<BreakerOptions>,
    ) -> Self {
        let client = WebhookClient::new(client).expect("webhook client");
        let source = Arc::new(Source::default());
        let (tx, disabled) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let mut dispatcher = Dispatcher::new(
            client,
            opts,
            Arc::clone(&source) as Arc<dyn IntegrationSource>,
            tx,
            shutdown.clone(),
        );
        if let Some(breaker) = breaker {
            dispatcher = dispatcher.with_breaker_options(breaker);
        }
        Self {
            dispatcher,
            source,
            disabled,
            shutdown,
        }
    }

    /// Adds (or replaces) an integration `id` sending to `url`.
    fn add(&self, id: &str, url: &str) -> Arc<Integration> {
        self.source.put(integration(id, url))
    }

    async fn deliver(&self, job: Job) -> Outcome {
        self.dispatcher.deliver(job).await
    }

    fn spawn(&self, job: Job) -> JoinHandle<Outcome> {
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move { dispatcher.deliver(job).await })
    }

    fn stats(&self, integration: &Integration) -> Option<LaneStats> {
        self.dispatcher
            .stats()
            .into_iter()
            .find(|s| s.integration == integration.name)
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
    }
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

// ---------------------------------------------------------------------------------------------
// 1. What is sent
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_on_first_try_with_a_signed_request() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 40], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/hooks/crm?tenant=7"));

        let outcome = h.deliver(job(&crm, "P-1")).await;
        assert_eq!(outcome, delivered(1, 200));
        let r = next(&receiver).await;
        assert_eq!(r.path, "/hooks/crm?tenant=7");
        check_webhook(&r, &crm, "P-1", SECRET);
        assert_eq!(r.header("webhook-id"), Some("P-1_crm"));

        // No traceparent given: none sent. Another participation: another id.
        let mut untraced = job(&crm, "P-2");
        untraced.traceparent = None;
        assert_eq!(h.deliver(untraced).await, delivered(1, 200));
        let r = next(&receiver).await;
        assert_eq!(r.header("webhook-id"), Some("P-2_crm"));
        assert_eq!(r.header("traceparent"), None);
        assert_eq!(receiver.received_count(), 2);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_2xx_is_delivered_over_https_with_a_private_ca() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::https().await.unwrap();
        receiver.set_default(Reply::status(204));
        let h = Harness::new(
            dispatch_options(&[20], Duration::from_secs(10)),
            ClientOptions {
                extra_ca_pem: Some(receiver.ca_pem().expect("CA").as_bytes().to_vec()),
                ..client_options(Duration::from_secs(5))
            },
        );
        let crm = h.add("crm-tls", &receiver.localhost_url("/in"));
        assert_eq!(h.deliver(job(&crm, "P-9")).await, delivered(1, 204));
        check_webhook(&next(&receiver).await, &crm, "P-9", SECRET);
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 2, 3. Retried answers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_a_stable_webhook_id() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.respond_with(vec![Reply::status(500), Reply::status(500), Reply::ok()]);
        let h = Harness::new(
            dispatch_options(&[20, 40, 80, 160], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));

        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(3, 200));
        let seen = receiver.drain();
        assert_eq!(seen.len(), 3);
        for r in &seen {
            // Each attempt is signed for its own timestamp.
            check_webhook(r, &crm, "P-1", SECRET);
        }
        let ids: HashSet<_> = seen.iter().map(|r| r.header("webhook-id")).collect();
        assert_eq!(ids, HashSet::from([Some("P-1_crm")]));
        assert_eq!(receiver.received_count(), 3);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_429_408_and_503_are_retried() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.respond_with(vec![
            Reply::status(429).with_header("Retry-After", "0"),
            Reply::status(408),
            Reply::status(503).with_header("Retry-After", "0"),
            Reply::status(502),
            Reply::status(201),
        ]);
        let h = Harness::new(
            dispatch_options(&[20; 6], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(5, 201));
        assert_eq!(receiver.received_count(), 5);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_capped_at_twice_the_scheduled_delay() {
    // An hour-long Retry-After (seconds) and a far-future HTTP date are clamped to 2 × 20 ms:
    // the delivery completes well within the test's limit instead of stalling.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.respond_with(vec![
            Reply::status(503).with_header("Retry-After", "3600"),
            Reply::status(429).with_header("Retry-After", "Fri, 01 Jan 2100 00:00:00 GMT"),
            Reply::ok(),
        ]);
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(3, 200));
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 4, 5. Final answers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_final() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        for (n, status) in [400u16, 404, 401, 403, 422].into_iter().enumerate() {
            receiver.respond_with(vec![Reply::status(status)]);
            let outcome = h.deliver(job(&crm, &format!("P-{status}"))).await;
            let error = failed(1, Some(status), &outcome);
            assert!(error.contains(&status.to_string()), "{error}");
            assert_eq!(
                receiver.received_count(),
                n + 1,
                "{status}: one attempt only"
            );
        }
        assert!(h.disabled.is_empty(), "only 410 disables");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_final_and_not_followed() {
    within("the test body", LIMIT, async {
        let target = TestReceiver::http().await.unwrap();
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        for (n, status) in [301u16, 302, 307, 308].into_iter().enumerate() {
            receiver.respond_with(vec![
                Reply::status(status).with_header("Location", target.url("/elsewhere")),
            ]);
            let outcome = h.deliver(job(&crm, &format!("P-{status}"))).await;
            failed(1, Some(status), &outcome);
            assert_eq!(receiver.received_count(), n + 1);
        }
        // Each outcome came after its answer was read: a client following the Location would
        // have sent (and been answered by) the target before.
        assert_eq!(target.received_count(), 0, "the Location was not followed");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_fails_and_asks_to_disable_the_integration() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(410));
        let mut h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        let error = failed(1, Some(410), &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("410"), "{error}");
        assert_eq!(receiver.received_count(), 1, "410 is not retried");

        let request = tokio::time::timeout(WAIT, h.disabled.recv())
            .await
            .expect("a disable request in time")
            .expect("channel open");
        assert_eq!(request.integration, crm.name);
        assert!(request.reason.contains("410"), "{}", request.reason);
        assert!(h.disabled.is_empty(), "one request per 410");
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 6, 7, 8. Timeouts, the retry window, connection errors
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_times_out_and_is_retried_until_the_schedule_ends() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            dispatch_options(&[20, 40], Duration::from_secs(15)),
            client_options(Duration::from_millis(300)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        let error = failed(3, None, &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("timed out"), "{error}");
        assert_eq!(
            receiver.received_count(),
            3,
            "each attempt reached the endpoint"
        );
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_window_ends_retries_before_the_schedule_does() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(500));
        // 20 retries 100 ms apart, but a 350 ms window: attempts at 0, 100, 200 and 300 ms at
        // most; the one due at 400 ms would start after the window.
        let h = Harness::new(
            dispatch_options(&[100; 20], Duration::from_millis(350)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        let outcome = h.deliver(job(&crm, "P-1")).await;
        let Outcome::Failed {
            attempts,
            last_status,
            last_error,
        } = outcome
        else {
            panic!("expected Failed, got {outcome:?}");
        };
        assert!((1..=4).contains(&attempts), "{attempts} attempts");
        assert_eq!(last_status, Some(500));
        assert!(last_error.contains("500"), "{last_error}");
        // The outcome is the barrier: every attempt of a job is awaited before it is reported.
        assert_eq!(receiver.received_count(), attempts as usize);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_first_attempt_does_not_start_after_the_window() {
    // Concurrency 1: job A holds the only slot on a hanging endpoint for 1.5 s; job B, queued
    // behind it, must get its final answer when its 300 ms window ends, not start an attempt
    // once A's slot frees up long after the window.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                ..dispatch_options(&[], Duration::from_millis(300))
            },
            client_options(Duration::from_millis(1500)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        let a = h.spawn(job(&crm, "P-A"));
        let first = next(&receiver).await;
        assert_eq!(first.header("webhook-id"), Some("P-A_crm"));

        let b = h.deliver(job(&crm, "P-B")).await;
        let error = failed(0, None, &b);
        assert!(error.contains("window"), "{error}");

        let a = a.await.unwrap();
        assert!(failed(1, None, &a).contains("timed out"));
        // Barrier: a sentinel through the same single slot, after A. Had B kept its place in
        // the queue, it would have been sent before the sentinel.
        receiver.set_default(Reply::ok());
        assert_eq!(h.deliver(job(&crm, "P-S")).await, delivered(1, 200));
        let sent: Vec<_> = receiver
            .drain()
            .iter()
            .map(|r| r.header("webhook-id").map(str::to_owned))
            .collect();
        assert_eq!(
            sent,
            [Some("P-S_crm".to_owned())],
            "B never reached the endpoint"
        );
        assert_eq!(h.stats(&crm).map(|s| (s.in_flight, s.queued)), Some((0, 0)));
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_then_fails_without_a_status() {
    within("the test body", LIMIT, async {
        let port = closed_port().await;
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &format!("http://127.0.0.1:{port}/hook"));
        let error = failed(3, None, &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("connection"), "{error}");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_address_is_final() {
    // Without the allow-list, loopback is refused by the SSRF guard: final, not retried.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            ClientOptions {
                allow: AllowList::default(),
                ..client_options(Duration::from_secs(5))
            },
        );
        let crm = h.add("crm", &receiver.url("/"));
        let error = failed(1, None, &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("127.0.0.1"), "{error}");
        assert_eq!(receiver.received_count(), 0);
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 9. Configuration changes between attempts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_the_new_url() {
    within("the test body", LIMIT, async {
        let b = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        // Receiver A moves the integration to B before answering 500, so the change is in
        // place before the retry reads the configuration.
        let count_a = Arc::new(AtomicUsize::new(0));
        let a = HookReceiver::start({
            let (source, name, url_b, count_a) = (
                Arc::clone(&h.source),
                crm.name.clone(),
                b.url("/b"),
                Arc::clone(&count_a),
            );
            move |_| {
                count_a.fetch_add(1, Ordering::SeqCst);
                source.update(&name, |i| i.url.clone_from(&url_b));
                std::future::ready(Reply::status(500))
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(2, 200));
        assert_eq!(count_a.load(Ordering::SeqCst), 1);
        let r = next(&b).await;
        assert_eq!(r.path, "/b");
        check_webhook(&r, &crm, "P-1", SECRET);
        assert_eq!(b.received_count(), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_signed_with_the_rotated_secret() {
    within("the test body", LIMIT, async {
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        let a = HookReceiver::start({
            let (source, name) = (Arc::clone(&h.source), crm.name.clone());
            move |r: Received| {
                let first = r.header("x-qualifio-signature").is_some_and(|sig| {
                    signing::verify_qualifio(&Secret::new(SECRET), &r.body, sig)
                });
                let _ = seen_tx.send(r);
                if first {
                    // Rotate: the new secret signs, the old one keeps signing Standard
                    // Webhooks for an hour.
                    source.update(&name, |i| {
                        i.secrets = vec![
                            SigningSecret {
                                secret: Secret::new("rotated-secret"),
                                expire_time: None,
                            },
                            SigningSecret {
                                secret: Secret::new(SECRET),
                                expire_time: Some(SystemTime::now() + Duration::from_secs(3600)),
                            },
                        ];
                    });
                    std::future::ready(Reply::status(503))
                } else {
                    std::future::ready(Reply::ok())
                }
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(2, 200));
        let first = seen.recv().await.unwrap();
        check_webhook(&first, &crm, "P-1", SECRET);
        let retry = seen.recv().await.unwrap();
        check_webhook(&retry, &crm, "P-1", "rotated-secret");
        let qualifio = retry.header("x-qualifio-signature").unwrap();
        assert!(
            !signing::verify_qualifio(&Secret::new(SECRET), &retry.body, qualifio),
            "Qualifio carries the newest secret only"
        );
        let ts: i64 = retry.header("webhook-timestamp").unwrap().parse().unwrap();
        let standard = retry.header("webhook-signature").unwrap();
        assert_eq!(standard.split(' ').count(), 2, "{standard}");
        assert!(signing::verify_standard_webhooks(
            &Secret::new(SECRET),
            "P-1_crm",
            ts,
            &retry.body,
            standard
        ));
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_between_attempts_fails_with_the_reason() {
    within("the test body", LIMIT, async {
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        let count = Arc::new(AtomicUsize::new(0));
        let a = HookReceiver::start({
            let (source, name, count) = (Arc::clone(&h.source), crm.name.clone(), count.clone());
            move |_| {
                count.fetch_add(1, Ordering::SeqCst);
                source.remove(&name);
                std::future::ready(Reply::status(500))
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        let error = failed(1, Some(500), &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("deleted"), "{error}");
        assert!(error.contains("500"), "keeps the last error: {error}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_between_attempts_fails_with_the_reason() {
    within("the test body", LIMIT, async {
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        let count = Arc::new(AtomicUsize::new(0));
        let a = HookReceiver::start({
            let (source, name, count) = (Arc::clone(&h.source), crm.name.clone(), count.clone());
            move |_| {
                count.fetch_add(1, Ordering::SeqCst);
                source.update(&name, |i| i.enabled = false);
                std::future::ready(Reply::status(503))
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        let error = failed(1, Some(503), &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("disabled"), "{error}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_or_disabled_before_the_first_attempt_is_skipped() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let gone = h.add("gone", &receiver.url("/"));
        h.source.remove(&gone.name);
        match h.deliver(job(&gone, "P-1")).await {
            Outcome::Skipped { reason } => assert!(reason.contains("deleted"), "{reason}"),
            other => panic!("expected Skipped, got {other:?}"),
        }

        let off = h.add("off", &receiver.url("/"));
        h.source.update(&off.name, |i| i.enabled = false);
        match h.deliver(job(&off, "P-1")).await {
            Outcome::Skipped { reason } => assert!(reason.contains("disabled"), "{reason}"),
            other => panic!("expected Skipped, got {other:?}"),
        }
        assert_eq!(receiver.received_count(), 0);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_while_waiting_for_a_slot_is_not_sent() {
    // Concurrency 1: job B waits behind A's hanging attempt; the integration is deleted
    // meanwhile. B must read the configuration again once it has the slot, not send to the
    // version it read before queueing.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                ..dispatch_options(&[], Duration::from_secs(10))
            },
            client_options(Duration::from_millis(800)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        let a = h.spawn(job(&crm, "P-A"));
        next(&receiver).await;
        let b = h.spawn(job(&crm, "P-B"));
        h.wait_stats(&crm, |s| s.queued == 1).await;
        h.source.remove(&crm.name);

        match b.await.unwrap() {
            Outcome::Skipped { reason } => assert!(reason.contains("deleted"), "{reason}"),
            other => panic!("expected Skipped, got {other:?}"),
        }
        assert!(failed(1, None, &a.await.unwrap()).contains("timed out"));
        // Barrier: the integration back, and a sentinel through the same single slot after A.
        // Had B been sent to the version it read before queueing, it would have come first.
        h.source.put((*crm).clone());
        receiver.set_default(Reply::ok());
        assert_eq!(h.deliver(job(&crm, "P-S")).await, delivered(1, 200));
        let sent: Vec<_> = receiver
            .drain()
            .iter()
            .map(|r| r.header("webhook-id").map(str::to_owned))
            .collect();
        assert_eq!(sent, [Some("P-S_crm".to_owned())], "B was not sent");
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 10. Circuit breaker
// ---------------------------------------------------------------------------------------------

fn test_breaker(threshold: u32, cool_down: Duration) -> BreakerOptions {
    BreakerOptions {
        failure_threshold: threshold,
        cool_down,
        max_cool_down: cool_down * 4,
        probe_timeout: Duration::from_secs(60),
        probe_recheck: Duration::from_millis(20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_opens_holds_jobs_back_and_one_probe_closes_it() {
    within("the test body", LIMIT, async {
        let (receiver, state, mut seen) = Gated::start(500).await;
        // No retries: one attempt per job, so requests and jobs can be counted against each
        // other. The window is long enough to outlast the cool-down.
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_secs(15)),
            client_options(Duration::from_secs(10)),
            test_breaker(3, Duration::from_millis(400)),
        );
        let crm = h.add("crm", &receiver.url);

        // Three consecutive failures open it.
        for n in 1..=3 {
            let error = failed(1, Some(500), &h.deliver(job(&crm, &format!("F-{n}"))).await);
            assert!(error.contains("500"), "{error}");
        }
        assert_eq!(state.count(), 3);
        assert!(h.stats(&crm).expect("lane").breaker_open);
        while seen.try_recv().is_ok() {}

        // The endpoint recovers, but answers are held so the probe stays in flight.
        state.set_status(200);
        state.hold(true);
        let jobs: Vec<_> = (1..=4)
            .map(|n| h.spawn(job(&crm, &format!("R-{n}"))))
            .collect();
        // While open nothing is sent; after the cool-down exactly one probe goes out.
        let probe = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("a probe after the cool-down")
            .expect("receiver alive");
        assert_eq!(state.count(), 4, "one probe, the other jobs held back");
        // Other jobs keep asking every 20 ms (`probe_recheck`) while the probe is out: still
        // nothing sent after a dozen of their rechecks. (A span of time on purpose: the
        // rechecks themselves are not observable from here.)
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(state.count(), 4, "one probe at a time while half-open");
        assert!(jobs.iter().all(|j| !j.is_finished()));
        assert!(h.stats(&crm).expect("lane").breaker_open);

        // The probe succeeds: the breaker closes and the held-back jobs go.
        state.hold(false);
        for j in jobs {
            assert_eq!(j.await.unwrap(), delivered(1, 200));
        }
        assert_eq!(state.count(), 7, "each job sent exactly once");
        assert!(!h.stats(&crm).expect("lane").breaker_open);
        let mut ids: Vec<String> = vec![probe.header("webhook-id").unwrap().to_owned()];
        while let Ok(r) = seen.try_recv() {
            ids.push(r.header("webhook-id").unwrap().to_owned());
        }
        ids.sort();
        assert_eq!(ids, ["R-1_crm", "R-2_crm", "R-3_crm", "R-4_crm"]);

        // A failing probe opens it again.
        state.set_status(500);
        for n in 4..=6 {
            failed(1, Some(500), &h.deliver(job(&crm, &format!("F-{n}"))).await);
        }
        assert!(h.stats(&crm).expect("lane").breaker_open);
        let before = state.count();
        failed(1, Some(500), &h.deliver(job(&crm, "F-probe")).await);
        assert_eq!(state.count(), before + 1, "the probe itself was sent");
        assert!(h.stats(&crm).expect("lane").breaker_open, "re-opened");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_outlasting_the_window_fails_jobs_without_sending() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(503));
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_millis(500)),
            client_options(Duration::from_secs(5)),
            test_breaker(2, Duration::from_secs(60)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        for n in 0..2 {
            failed(1, Some(503), &h.deliver(job(&crm, &format!("F-{n}"))).await);
        }
        for n in 0..5 {
            let error = failed(0, None, &h.deliver(job(&crm, &format!("H-{n}"))).await);
            assert!(error.contains("circuit breaker open"), "{error}");
        }
        assert_eq!(receiver.received_count(), 2, "nothing sent while open");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_is_per_integration_and_client_errors_do_not_open_it() {
    within("the test body", LIMIT, async {
        let bad = TestReceiver::http().await.unwrap();
        bad.set_default(Reply::status(500));
        let good = TestReceiver::http().await.unwrap();
        good.set_default(Reply::status(404));
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_millis(500)),
            client_options(Duration::from_secs(5)),
            test_breaker(1, Duration::from_secs(60)),
        );
        let x = h.add("x", &bad.url("/"));
        let y = h.add("y", &good.url("/"));
        failed(1, Some(500), &h.deliver(job(&x, "P-1")).await);
        assert!(h.stats(&x).unwrap().breaker_open);
        // A 4xx is the endpoint working: no failure counted even at threshold 1.
        for n in 0..3 {
            failed(1, Some(404), &h.deliver(job(&y, &format!("P-{n}"))).await);
        }
        assert!(!h.stats(&y).unwrap().breaker_open);
        good.set_default(Reply::ok());
        assert_eq!(h.deliver(job(&y, "P-ok")).await, delivered(1, 200));
        assert_eq!(bad.received_count(), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_probe_does_not_wedge_the_breaker() {
    // The probe's delivery is dropped mid-request (its task aborted, as when a publish stream
    // goes away). The next job must be able to probe at once, not after the 60 s probe timeout.
    within("the test body", LIMIT, async {
        let (receiver, state, mut seen) = Gated::start(500).await;
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_secs(5)),
            client_options(Duration::from_secs(10)),
            test_breaker(1, Duration::from_millis(100)),
        );
        let crm = h.add("crm", &receiver.url);
        failed(1, Some(500), &h.deliver(job(&crm, "P-1")).await);
        assert!(h.stats(&crm).unwrap().breaker_open);
        let _ = seen.recv().await;

        state.set_status(200);
        state.hold(true);
        let probe = h.spawn(job(&crm, "P-probe"));
        let r = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("the probe is sent")
            .unwrap();
        assert_eq!(r.header("webhook-id"), Some("P-probe_crm"));
        probe.abort();
        assert!(probe.await.unwrap_err().is_cancelled());
        state.hold(false);

        assert_eq!(h.deliver(job(&crm, "P-next")).await, delivered(1, 200));
        assert!(!h.stats(&crm).unwrap().breaker_open);
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 11, 12. Concurrency limit and isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_limited_per_integration() {
    const JOBS: usize = 10;
    within("the test body", LIMIT, async {
        // The receiver counts requests being answered at once, and holds each one until a
        // second is in (or it is the last), so the limit is reached and not merely allowed.
        let current = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(AtomicUsize::new(0));
        let (ids_tx, mut ids) = mpsc::unbounded_channel();
        let receiver = HookReceiver::start({
            let (current, peak, arrived) = (current.clone(), peak.clone(), arrived.clone());
            move |r: Received| {
                let (current, peak, arrived) = (current.clone(), peak.clone(), arrived.clone());
                let _ = ids_tx.send(r.header("webhook-id").unwrap_or_default().to_owned());
                async move {
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let all_in = arrived.fetch_add(1, Ordering::SeqCst) + 1 >= JOBS;
                    if !all_in {
                        // Held at most 2 s: then answered anyway (the peak assertion fails).
                        let _ = until("a second request in", Duration::from_secs(2), || {
                            current.load(Ordering::SeqCst) >= 2
                                || arrived.load(Ordering::SeqCst) >= JOBS
                        })
                        .await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                    Reply::ok()
                }
            }
        })
        .await;
        let h = Harness::new(
            DispatchOptions {
                concurrency: 2,
                ..dispatch_options(&[20], Duration::from_secs(15))
            },
            client_options(Duration::from_secs(10)),
        );
        let crm = h.add("crm", &receiver.url);

        let jobs: Vec<_> = (0..JOBS)
            .map(|n| h.spawn(job(&crm, &format!("P-{n}"))))
            .collect();
        // Sample the lane while the jobs run.
        let (mut max_in_flight, mut max_queued) = (0, 0);
        while !jobs.iter().all(JoinHandle::is_finished) {
            if let Some(s) = h.stats(&crm) {
                max_in_flight = max_in_flight.max(s.in_flight);
                max_queued = max_queued.max(s.queued);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for j in jobs {
            assert_eq!(j.await.unwrap(), delivered(1, 200));
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2, "receiver-side concurrency");
        assert!(max_in_flight <= 2, "in flight {max_in_flight}");
        assert!(max_queued > 0, "jobs waited for a slot");
        let mut seen = HashSet::new();
        while let Ok(id) = ids.try_recv() {
            assert!(seen.insert(id), "each job sent once");
        }
        assert_eq!(seen.len(), JOBS);
        assert_eq!(h.stats(&crm).map(|s| (s.in_flight, s.queued)), Some((0, 0)));
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_integration_does_not_delay_another() {
    within("the test body", LIMIT, async {
        let stuck = TestReceiver::http().await.unwrap();
        stuck.set_default(Reply::hang());
        let fine = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            DispatchOptions {
                concurrency: 2,
                ..dispatch_options(&[], Duration::from_secs(60))
            },
            client_options(Duration::from_secs(30)),
        );
        let x = h.add("x", &stuck.url("/"));
        let y = h.add("y", &fine.url("/"));

        // X's two slots hang and two more jobs queue behind them.
        let x_jobs: Vec<_> = (0..4)
            .map(|n| h.spawn(job(&x, &format!("X-{n}"))))
            .collect();
        wait_count(&stuck, 2).await;
        h.wait_stats(&x, |s| s.in_flight == 2 && s.queued == 2)
            .await;

        // Y delivers every job while X is still stuck.
        for n in 0..5 {
            assert_eq!(
                h.deliver(job(&y, &format!("Y-{n}"))).await,
                delivered(1, 200)
            );
        }
        assert_eq!(fine.received_count(), 5);
        assert!(x_jobs.iter().all(|j| !j.is_finished()), "X is still stuck");
        assert_eq!(stuck.received_count(), 2);
        for j in x_jobs {
            j.abort();
        }
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 13. Shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_interrupts_a_job_waiting_for_its_retry() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(500));
        // The retry is 30 s away: only shutdown can end the job within the limit.
        let h = Harness::new(
            dispatch_options(&[30_000], Duration::from_secs(60)),
            client_options(Duration::from_secs(5)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        let waiting = h.spawn(job(&crm, "P-1"));
        next(&receiver).await;
        h.wait_stats(&crm, |s| s.in_flight == 0).await;
        assert!(!waiting.is_finished());

        h.shutdown.cancel();
        let outcome = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("interrupted promptly")
            .unwrap();
        assert_eq!(outcome, Outcome::Interrupted);

        // After shutdown nothing new is sent.
        for n in 0..20 {
            assert_eq!(
                h.deliver(job(&crm, &format!("late-{n}"))).await,
                Outcome::Interrupted
            );
        }
        // Each of them reported Interrupted without an attempt: nothing can be in flight.
        assert_eq!(receiver.received_count(), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_interrupts_a_job_waiting_for_a_slot() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                ..dispatch_options(&[20], Duration::from_secs(60))
            },
            client_options(Duration::from_millis(1500)),
        );
        let crm = h.add("crm", &receiver.url("/"));
        let running = h.spawn(job(&crm, "P-run"));
        next(&receiver).await;
        let queued = h.spawn(job(&crm, "P-queued"));
        h.wait_stats(&crm, |s| s.queued == 1).await;

        h.shutdown.cancel();
        let outcome = tokio::time::timeout(WAIT, queued)
            .await
            .expect("interrupted promptly")
            .unwrap();
        assert_eq!(outcome, Outcome::Interrupted);
        // The attempt in flight is finished (here: its timeout), then not retried.
        assert_eq!(running.await.unwrap(), Outcome::Interrupted);
        assert_eq!(receiver.received_count(), 1);
        assert_eq!(h.stats(&crm).map(|s| (s.in_flight, s.queued)), Some((0, 0)));
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// Lanes of deleted integrations
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_of_deleted_integrations_are_dropped() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        );
        let many: Vec<_> = (0..100)
            .map(|n| h.add(&format!("i{n}"), &receiver.url("/")))
            .collect();
        for i in &many {
            assert_eq!(h.deliver(job(i, "P-1")).await, delivered(1, 200));
        }
        assert_eq!(
            h.dispatcher.stats().len(),
            100,
            "live integrations keep their lanes"
        );
        for i in &many {
            h.source.remove(&i.name);
        }
        // New integrations come and go; the lanes of the deleted ones do not pile up.
        let fresh: Vec<_> = (0..100)
            .map(|n| h.add(&format!("j{n}"), &receiver.url("/")))
            .collect();
        for i in &fresh {
            assert_eq!(h.deliver(job(i, "P-2")).await, delivered(1, 200));
        }
        let lanes: HashSet<_> = h
            .dispatcher
            .stats()
            .into_iter()
            .map(|s| s.integration)
            .collect();
        let live: HashSet<_> = fresh.iter().map(|i| i.name.clone()).collect();
        assert_eq!(lanes, live, "only live integrations keep lanes");
        assert_eq!(receiver.received_count(), 200);
    })
    .await
    .expect("the test finished within its limit");
}
