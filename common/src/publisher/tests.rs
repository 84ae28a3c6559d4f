//! The publisher against fake workers: in-process `IngestService` servers on loopback whose
//! behaviour each test sets (acknowledge, hold, fail the stream after some messages, refuse).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use pb::ingest_service_server::{IngestService, IngestServiceServer};

const ACCOUNT: &str = "accounts/1";
const INTEGRATION: &str = "accounts/1/integrations/crm";

#[derive(Default)]
struct FakeState {
    /// Participation ids read, in order, every stream together.
    received: Mutex<Vec<String>>,
    /// Streams opened.
    streams: AtomicUsize,
    /// A stream ends with UNAVAILABLE once it read this many (what it holds is not acked).
    fail_after: Mutex<Option<usize>>,
    /// New streams are refused with UNAVAILABLE.
    refuse: AtomicBool,
    /// Nothing is acknowledged.
    hold: AtomicBool,
    /// Time before each acknowledgement.
    delay: Mutex<Duration>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// `authorization` of each stream.
    authorization: Mutex<Vec<String>>,
}

#[derive(Clone, Default)]
struct Fake(Arc<FakeState>);

fn response_for(req: &pb::PublishRequest) -> pb::PublishResponse {
    let id = serde_json::from_str::<serde_json::Value>(&req.participation_json)
        .ok()
        .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut resp = pb::PublishResponse {
        participation_id: id.clone(),
        request_id: req.request_id.clone(),
        ..Default::default()
    };
    if id.starts_with("bad") {
        resp.participation_id.clear();
        resp.error = "participation_json: not a participation".into();
    } else {
        let outcome = if id.starts_with("fail") {
            pb::DeliveryOutcome::Failed
        } else if id.starts_with("queued") {
            pb::DeliveryOutcome::Queued
        } else {
            pb::DeliveryOutcome::Delivered
        };
        resp.deliveries = vec![pb::Delivery {
            integration: INTEGRATION.into(),
            outcome: outcome.into(),
            attempts: 1,
            last_status_code: if id.starts_with("fail") { 400 } else { 200 },
            ..Default::default()
        }];
    }
    resp
}

type Responses = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for Fake {
    type PublishStream = Responses;

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let s = self.0.clone();
        if s.refuse.load(Ordering::SeqCst) {
            return Err(Status::unavailable("refusing streams"));
        }
        s.streams.fetch_add(1, Ordering::SeqCst);
        s.authorization.lock().unwrap().push(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        );
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut read = 0;
            let mut acks = tokio::task::JoinSet::new();
            while let Ok(Some(req)) = inbound.message().await {
                read += 1;
                let resp = response_for(&req);
                s.received
                    .lock()
                    .unwrap()
                    .push(resp.participation_id.clone());
                if resp.participation_id.starts_with("deny") {
                    // As a worker does for an account the token may not use: answer for what
                    // it holds, then end the stream.
                    while acks.join_next().await.is_some() {}
                    let _ = tx
                        .send(Err(Status::permission_denied(
                            "this token may not use accounts/2",
                        )))
                        .await;
                    return;
                }
                let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                s.max_in_flight.fetch_max(now, Ordering::SeqCst);
                if *s.fail_after.lock().unwrap() == Some(read) {
                    acks.abort_all();
                    let _ = tx
                        .send(Err(Status::unavailable("worker is shutting down")))
                        .await;
                    return;
                }
                if s.hold.load(Ordering::SeqCst) {
                    continue;
                }
                let delay = *s.delay.lock().unwrap();
                let (tx, s) = (tx.clone(), s.clone());
                acks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    s.in_flight.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(Ok(resp)).await;
                });
            }
            while acks.join_next().await.is_some() {}
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish_one(
        &self,
        _: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

struct Server {
    fake: Fake,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Fake::default();
        let stop = CancellationToken::new();
        let serve = tonic::transport::Server::builder()
            .add_service(IngestServiceServer::new(fake.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(serve);
        Self { fake, addr, stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<String> {
        self.fake.0.received.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn doc(id: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        participation_json: format!(r#"{{"id":"{id}","state":"COMPLETED","campaign":{{"id":7}}}}"#),
        request_id: format!("caller-{id}"),
        ..Default::default()
    }
}

fn quick() -> PublisherOptions {
    PublisherOptions {
        window: 8,
        connect_timeout: Duration::from_secs(2),
        backoff: (Duration::from_millis(20), Duration::from_millis(100)),
        deadline: Duration::from_secs(20),
        ..PublisherOptions::default()
    }
}

async fn publish_n(p: &Publisher, prefix: &str, n: usize) -> Report {
    let requests = tokio_stream::iter((0..n).map(|i| doc(&format!("{prefix}{i}"))));
    tokio::time::timeout(Duration::from_secs(30), p.publish_all(requests, |_| {}))
        .await
        .expect("publish_all finished")
}

#[tokio::test]
async fn every_participation_is_acknowledged_and_both_workers_get_some() {
    let (a, b) = (Server::start().await, Server::start().await);
    let p = Publisher::connect(&[a.url(), b.url()], ACCOUNT, quick()).unwrap();
    p.wait_connected(Duration::from_secs(5)).await.unwrap();
    let receipt = p.publish(doc("one")).await.await;
    assert_eq!(receipt.status(), ReceiptStatus::Done);
    let response = receipt.outcome.as_ref().unwrap();
    assert_eq!(
        response.request_id, "caller-one",
        "the caller's request id comes back"
    );
    assert_eq!(receipt.request.request_id, "caller-one");
    assert_eq!(
        receipt.request.account, ACCOUNT,
        "the publisher's account is filled in"
    );
    assert_eq!(receipt.participation_id(), "one");

    *a.fake.0.delay.lock().unwrap() = Duration::from_millis(2);
    *b.fake.0.delay.lock().unwrap() = Duration::from_millis(2);
    let report = publish_n(&p, "p", 500).await;
    assert_eq!((report.receipts, report.done), (500, 500), "{report:?}");
    assert_eq!(report.delivered_deliveries, 500);
    let (ra, rb) = (a.received().len(), b.received().len());
    assert_eq!(ra + rb, 501, "each sent once");
    assert!(ra > 50 && rb > 50, "both workers used: {ra} / {rb}");
    p.close().await;
}

#[tokio::test]
async fn a_failed_stream_is_republished_on_another_worker() {
    let (a, b) = (Server::start().await, Server::start().await);
    // Each of A's streams dies after reading 20, holding what it read.
    *a.fake.0.fail_after.lock().unwrap() = Some(20);
    *a.fake.0.delay.lock().unwrap() = Duration::from_millis(50);
    *b.fake.0.delay.lock().unwrap() = Duration::from_millis(5);
    let p = Publisher::connect(&[a.url(), b.url()], ACCOUNT, quick()).unwrap();
    p.wait_connected(Duration::from_secs(5)).await.unwrap();
    let report = publish_n(&p, "p", 300).await;
    assert_eq!(report.done, 300, "{:?}", report.problems);
    let got: HashSet<String> = a.received().into_iter().chain(b.received()).collect();
    assert_eq!(got.len(), 300, "every participation reached a worker");
    assert!(report.resent > 0, "some were sent twice: {report:?}");
    let stats = p.stats();
    assert!(stats.stream_failures >= 1 && stats.resent >= 1, "{stats:?}");
    p.close().await;
}

#[tokio::test]
async fn the_window_bounds_what_is_in_flight_per_stream() {
    let a = Server::start().await;
    *a.fake.0.delay.lock().unwrap() = Duration::from_millis(20);
    let p = Publisher::connect(
        &[a.url()],
        ACCOUNT,
        PublisherOptions {
            window: 5,
            ..quick()
        },
    )
    .unwrap();
    let report = publish_n(&p, "w", 60).await;
    assert_eq!(report.done, 60);
    let max = a.fake.0.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=5).contains(&max), "max in flight {max}");
    assert_eq!(a.fake.0.streams.load(Ordering::SeqCst), 1, "one stream");
}

#[tokio::test]
async fn queued_is_done_and_counted_apart() {
    let a = Server::start().await;
    let p = Publisher::connect(&[a.url()], ACCOUNT, quick()).unwrap();
    let queued = p.publish(doc("queued-1")).await.await;
    assert_eq!(
        queued.status(),
        ReceiptStatus::Done,
        "the store owns it now"
    );
    assert!(queued.republish().is_none(), "nothing to publish again");
    let mut report = Report::default();
    report.add(queued);
    report.add(p.publish(doc("ok-1")).await.await);
    assert_eq!(
        (
            report.done,
            report.queued_deliveries,
            report.delivered_deliveries
        ),
        (2, 1, 1),
        "{report:?}"
    );
    assert_eq!(a.received().len(), 2, "neither was sent again");
}

#[tokio::test]
async fn rejected_and_failed_are_final_and_say_what_to_republish() {
    let a = Server::start().await;
    let p = Publisher::connect(&[a.url()], ACCOUNT, quick()).unwrap();
    let bad = p.publish(doc("bad-1")).await.await;
    assert_eq!(bad.status(), ReceiptStatus::Rejected);
    assert!(bad.republish().is_none());
    let failed = p.publish(doc("fail-1")).await.await;
    assert_eq!(failed.status(), ReceiptStatus::Failed);
    let again = failed.republish().unwrap();
    assert_eq!(again.only_integrations, [INTEGRATION]);
    assert_eq!(again.participation_json, doc("fail-1").participation_json);
    assert_eq!(failed.sends, 1);
    assert_eq!(a.received().len(), 2, "neither was sent again");
}

#[tokio::test]
async fn unacknowledged_participations_are_given_up_at_the_deadline() {
    let a = Server::start().await;
    a.fake.0.hold.store(true, Ordering::SeqCst);
    let opts = PublisherOptions {
        deadline: Duration::from_millis(400),
        ..quick()
    };
    let p = Publisher::connect(&[a.url()], ACCOUNT, opts.clone()).unwrap();
    let started = tokio::time::Instant::now();
    // More than the window: some wait in the queue, some are in flight.
    let report = publish_n(&p, "h", 20).await;
    assert_eq!(report.gave_up, 20, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let r = &report.problems[0];
    assert!(r.republish().is_some());
    assert!(r.outcome.as_ref().unwrap_err().message.contains("deadline"));
    // Closing does not wait on a worker that never answers: nothing is left to answer for.
    tokio::time::timeout(Duration::from_secs(2), p.close())
        .await
        .expect("close returns");

    // Nothing listening: given up too, with the connection error.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = Publisher::connect(&[format!("127.0.0.1:{port}")], ACCOUNT, opts).unwrap();
    let err = p
        .wait_connected(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.contains(&port.to_string()), "{err}");
    let r = p.publish(doc("x")).await.await;
    let why = r.outcome.unwrap_err().message;
    assert!(why.contains("deadline"), "{why}");
}

#[tokio::test]
async fn a_name_resolves_to_its_addresses() {
    let a = Server::start().await;
    let p = Publisher::connect(
        &[format!("dns:///localhost:{}", a.addr.port())],
        ACCOUNT,
        quick(),
    )
    .unwrap();
    p.wait_connected(Duration::from_secs(5)).await.unwrap();
    let report = publish_n(&p, "d", 20).await;
    assert_eq!(report.done, 20);
    assert!(p.stats().lanes >= 1);
}

#[test]
fn bad_arguments_are_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(matches!(
            Publisher::connect::<&str>(&[], ACCOUNT, quick()),
            Err(ConnectError::NoEndpoints)
        ));
        assert!(matches!(
            Publisher::connect(&["w:1"], "42", quick()),
            Err(ConnectError::Account(_))
        ));
        assert!(matches!(
            Publisher::connect(&["ftp://w:1"], ACCOUNT, quick()),
            Err(ConnectError::Endpoint(_))
        ));
    });
}

#[tokio::test]
async fn a_refusing_worker_is_retried_until_it_takes_streams() {
    let a = Server::start().await;
    a.fake.0.refuse.store(true, Ordering::SeqCst);
    let p = Publisher::connect(&[a.url()], ACCOUNT, quick()).unwrap();
    let err = p
        .wait_connected(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.contains("Unavailable: refusing streams"), "{err}");
    let pending = p.publish(doc("late")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.fake.0.refuse.store(false, Ordering::SeqCst);
    let receipt = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap();
    assert_eq!(receipt.status(), ReceiptStatus::Done);
    assert_eq!(receipt.sends, 1, "queued, not sent, while refused");
    assert!(p.stats().stream_failures >= 1);
    p.close().await;
}

#[tokio::test]
async fn the_token_goes_with_every_stream() {
    let a = Server::start().await;
    let p = Publisher::connect(
        &[a.url()],
        ACCOUNT,
        PublisherOptions {
            token: Some(crate::domain::Secret::new("pwt_publisher-token")),
            ..quick()
        },
    )
    .unwrap();
    assert_eq!(
        p.publish(doc("t")).await.await.status(),
        ReceiptStatus::Done
    );
    assert_eq!(
        *a.fake.0.authorization.lock().unwrap(),
        ["Bearer pwt_publisher-token"]
    );
    let debug = format!(
        "{:?}",
        PublisherOptions {
            token: Some(crate::domain::Secret::new("pwt_publisher-token")),
            ..quick()
        }
    );
    assert!(!debug.contains("pwt_"), "{debug}");
    assert!(matches!(
        Publisher::connect(
            &[a.url()],
            ACCOUNT,
            PublisherOptions {
                token: Some(crate::domain::Secret::new("bad\ntoken")),
                ..quick()
            }
        ),
        Err(ConnectError::Token(_))
    ));
}

#[tokio::test]
async fn a_request_that_ends_streams_is_refused_and_the_rest_goes_through() {
    let (a, b) = (Server::start().await, Server::start().await);
    for s in [&a, &b] {
        *s.fake.0.delay.lock().unwrap() = Duration::from_millis(5);
    }
    let p = Publisher::connect(&[a.url(), b.url()], ACCOUNT, quick()).unwrap();
    let mut requests: Vec<_> = (0..40).map(|i| doc(&format!("p{i}"))).collect();
    requests.insert(20, doc("deny-me"));
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        p.publish_all(tokio_stream::iter(requests), |_| {}),
    )
    .await
    .unwrap();
    assert_eq!((report.done, report.rejected), (40, 1), "{report:?}");
    let refused = &report.problems[0];
    assert_eq!(refused.status(), ReceiptStatus::Rejected);
    assert_eq!(refused.request.request_id, "caller-deny-me");
    let error = &refused.outcome.as_ref().unwrap().error;
    assert!(error.contains("PermissionDenied"), "{error}");
    assert_eq!(refused.sends, 1, "sent once only");
}
