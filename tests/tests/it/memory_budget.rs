//! The worker's memory budget (issue 14, item 5), end to end: with a 1 MiB `--memory-budget`
//! and a receiver that holds every request open (first attempts stay in flight, so their
//! participations stay held), publishers writing large documents on several streams are not
//! read past the budget and their sends block, `PublishOne` gets `RESOURCE_EXHAUSTED`, and the
//! bytes held never exceed the budget; once the receiver answers, everything is acknowledged
//! and nothing stays held.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{AuthChannel, as_admin};
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::receiver::{self, Reply};
use pushwire_tests::worker::{Stack, WAIT, completed_doc, request};
use pushwire_worker::budget::{ByteSize, MemoryBudget};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const BUDGET: u64 = 1 << 20;
/// Padding that makes each document about 100 KiB.
const PADDING: usize = 100 * 1024;
const STREAMS: usize = 4;
/// Far more than the budget, the stream windows and HTTP/2 buffers hold together.
const PER_STREAM: usize = 64;
const ACCOUNT: &str = "accounts/budget";

const HELD: &str = "pushwire_worker_memory_held_bytes";

/// The value of every sample of the stack's `/metrics`, by series.
async fn scrape(addr: SocketAddr) -> anyhow::Result<HashMap<String, f64>> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    let (_, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

async fn metric(addr: SocketAddr, series: &str) -> anyhow::Result<f64> {
    scrape(addr)
        .await?
        .get(series)
        .copied()
        .with_context(|| format!("no {series} on /metrics"))
}

/// A receiver that holds every request open until `gate` turns true, then answers 200.
async fn gated_receiver(
    gate: watch::Receiver<bool>,
    stop: CancellationToken,
) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let handler = move |_received| {
        counted.fetch_add(1, Ordering::SeqCst);
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Reply::ok()
        }
    };
    tokio::spawn(receiver::serve(listener, None, handler, stop));
    Ok((url, count))
}

/// An IngestService client on a connection of its own (as separate publishers have).
async fn own_connection(
    stack: &Stack,
) -> anyhow::Result<pb::ingest_service_client::IngestServiceClient<AuthChannel>> {
    let channel = Channel::from_shared(format!("http://{}", stack.cp.grpc_addr))?
        .connect_timeout(WAIT)
        .connect()
        .await?;
    Ok(pb::ingest_service_client::IngestServiceClient::new(
        as_admin(channel),
    ))
}

fn big_request(id: &str) -> pb::PublishRequest {
    let mut doc = completed_doc(id);
    doc["padding"] = json!("x".repeat(PADDING));
    pb::PublishRequest {
        request_id: id.to_owned(),
        ..request(ACCOUNT, &doc.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_wait_and_publish_one_is_refused_at_the_budget() -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (open, gate) = watch::channel(false);
    let (url, received) = gated_receiver(gate, stop.clone()).await?;
    let stack = Stack::start_with(|c, _| {
        c.ingest.memory_budget = ByteSize(BUDGET);
        // Held requests stay in flight for the whole test.
        c.webhook.request_timeout = Duration::from_secs(120);
        Ok(())
    })
    .await?;
    stack
        .admin()
        .create_routed(ACCOUNT, "held", integration("Held", &url))
        .await?;
    stack.sync().await?;
    let http = stack.cp.http_addr;
    assert_eq!(
        metric(http, "pushwire_worker_memory_budget_bytes").await?,
        BUDGET as f64
    );
    let share = {
        let len = big_request("sizing").participation_json.len();
        MemoryBudget::share(len).div_ceil(1024) * 1024
    };
    let fits = (BUDGET / share) as usize;
    assert!(fits >= 2, "a few documents fit in the budget: {fits}");

    // The highest bytes-held seen, sampled all along.
    let highest = Arc::new(AtomicU64::new(0));
    let sampler = {
        let highest = highest.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.is_cancelled() {
                tick.tick().await;
                if let Ok(held) = metric(http, HELD).await {
                    highest.fetch_max(held as u64, Ordering::SeqCst);
                }
            }
        })
    };

    // Publishers, each on a stream (and a connection) of its own, sending as fast as they may.
    let sent = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    let mut streams = Vec::new();
    for s in 0..STREAMS {
        let (tx, rx) = mpsc::channel(1);
        let responses = tokio::time::timeout(
            WAIT,
            own_connection(&stack)
                .await?
                .publish(ReceiverStream::new(rx)),
        )
        .await
        .context("Publish did not answer")??
        .into_inner();
        streams.push(responses);
        let sent = sent.clone();
        senders.push(tokio::spawn(async move {
            for n in 0..PER_STREAM {
                if tx.send(big_request(&format!("s{s}-{n}"))).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // The budget fills up: no room for one more document.
    eventually("the memory budget is spent", WAIT, || async {
        let held = metric(http, HELD).await? as u64;
        let state = (
            ("held", held),
            ("sent", sent.load(Ordering::SeqCst)),
            ("received", received.load(Ordering::SeqCst)),
        );
        Ok(Poll::when(held + share > BUDGET, state))
    })
    .await?;
    eventually(
        "the held participations reach the receiver",
        WAIT,
        || async {
            let n = received.load(Ordering::SeqCst);
            Ok(Poll::when(n >= fits, n))
        },
    )
    .await?;
    // Streams are no longer read: only what fits reached the receiver, and every publisher is
    // stuck in a send.
    assert!(
        received.load(Ordering::SeqCst) <= fits,
        "{} requests at the receiver, at most {fits} fit in the budget",
        received.load(Ordering::SeqCst)
    );
    assert!(
        senders.iter().all(|s| !s.is_finished()),
        "every publisher waits"
    );
    assert!(sent.load(Ordering::SeqCst) < STREAMS * PER_STREAM);

    // PublishOne waits a moment, then is refused with a clear reason.
    let refused = own_connection(&stack)
        .await?
        .publish_one(big_request("one"))
        .await
        .expect_err("no room for PublishOne");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("memory budget"),
        "{}",
        refused.message()
    );
    {
        use tonic_types::StatusExt as _;
        let retry = refused.get_details_retry_info().context("RetryInfo")?;
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
        let quota = refused
            .get_details_quota_failure()
            .context("QuotaFailure")?;
        assert_eq!(quota.violations[0].subject, "--memory-budget");
    }
    assert_eq!(
        metric(http, "pushwire_worker_memory_budget_refusals_total").await?,
        1.0
    );
    assert!(metric(http, "pushwire_worker_memory_budget_wait_seconds_count").await? >= 1.0);
    // Being full is backpressure, not ill health.
    let ready = http_get(http, "/readyz").await?;
    assert!(
        ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200"),
        "{ready}"
    );

    // The receiver answers: everything is read, delivered and acknowledged.
    open.send(true)?;
    for (s, mut responses) in streams.into_iter().enumerate() {
        let mut acked = 0;
        while acked < PER_STREAM {
            let resp = tokio::time::timeout(WAIT, responses.message())
                .await
                .with_context(|| format!("stream {s}: no response within {WAIT:?}"))??
                .with_context(|| format!("stream {s} ended after {acked} responses"))?;
            assert_eq!(resp.error, "", "{}", resp.request_id);
            assert_eq!(resp.deliveries.len(), 1, "{resp:?}");
            assert_eq!(
                resp.deliveries[0].outcome(),
                pb::DeliveryOutcome::Delivered,
                "{resp:?}"
            );
            acked += 1;
        }
    }
    for s in senders {
        s.await?;
    }
    assert_eq!(sent.load(Ordering::SeqCst), STREAMS * PER_STREAM);
    eventually("nothing is held any more", WAIT, || async {
        let held = metric(http, HELD).await?;
        Ok(Poll::when(held == 0.0, held))
    })
    .await?;
    stop.cancel();
    sampler.await?;
    let highest = highest.load(Ordering::SeqCst);
    assert!(highest > 0, "the sampler saw the budget in use");
    assert!(
        highest <= BUDGET,
        "bytes held peaked at {highest}, over the budget {BUDGET}"
    );
    stack.stop().await
}

/// `GET path` on the stack's HTTP address: the whole answer, status line first.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    Ok(text)
}
