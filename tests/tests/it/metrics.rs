//! `/metrics` after known traffic: participations, deliveries, attempts by status class, the
//! delivery latency histogram and gRPC calls move by exactly what the traffic implies. The
//! telemetry is installed with an OTLP endpoint where nothing listens (deliveries must not
//! care), in a test process of its own.

use std::collections::HashMap;
use std::time::Duration;

use pushwire_common::pb::v1 as pb;
use pushwire_common::server::telemetry::{self, LogFormat, Settings};
use pushwire_tests::admin::integration;
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::receiver::{Reply, TestReceiver};
use pushwire_tests::worker::{COMPLETED, Stack, request};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Every sample of the OpenMetrics exposition (what a Prometheus server asks for), by series
/// (name and labels as written).
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<HashMap<String, f64>> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(
        b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nAccept: application/openmetrics-text\r\n\r\n",
    )
    .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    anyhow::ensure!(
        body.trim_end().ends_with("# EOF"),
        "exposition must end with # EOF"
    );
    anyhow::ensure!(body.matches("# EOF").count() == 1, "one # EOF only");
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

/// In a process of its own: it installs the process-wide subscriber.
#[test]
fn counters_follow_known_traffic_with_the_trace_exporter_down() {
    crate::alone::in_own_process(
        "metrics::counters_follow_known_traffic_with_the_trace_exporter_down",
        async { tokio::time::timeout(Duration::from_secs(60), counted()).await? },
    );
}

async fn counted() -> anyhow::Result<()> {
    // Nothing listens there: every export fails, nothing else may.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let _telemetry = telemetry::init(Settings {
        service_name: "pushwire-control-plane",
        log_format: LogFormat::Text,
        otlp_endpoint: Some(format!("http://{dead}")),
    })
    .map_err(|e| anyhow::anyhow!(e))?;

    let stack = Stack::start().await?;
    let ok = TestReceiver::http().await?;
    let flaky = TestReceiver::http().await?;
    flaky.respond_with(vec![Reply::status(500)]);
    let refusing = TestReceiver::http().await?;
    refusing.set_default(Reply::status(400));
    stack
        .admin()
        .create_routed("accounts/1", "ok", integration("Ok", &ok.url("/")))
        .await?;
    stack
        .admin()
        .create_routed("accounts/2", "flaky", integration("Flaky", &flaky.url("/")))
        .await?;
    stack
        .admin()
        .create_routed(
            "accounts/3",
            "refusing",
            integration("Refusing", &refusing.url("/")),
        )
        .await?;
    stack.sync().await?;

    let before = scrape(stack.cp.http_addr).await?;
    let mut outcomes = Vec::new();
    for account in [
        "accounts/1",
        "accounts/1",
        "accounts/1",
        "accounts/2",
        "accounts/3",
    ] {
        outcomes.push(stack.publish_one(request(account, COMPLETED)).await??);
    }
    for bad in [request("accounts/1", "{}"), request("nope", COMPLETED)] {
        let resp = stack.publish_one(bad).await??;
        anyhow::ensure!(!resp.error.is_empty(), "{resp:?}");
    }
    let outcome_of = |n: usize| outcomes[n].deliveries[0].outcome();
    assert_eq!(
        (0..5).map(outcome_of).collect::<Vec<_>>(),
        [
            pb::DeliveryOutcome::Delivered,
            pb::DeliveryOutcome::Delivered,
            pb::DeliveryOutcome::Delivered,
            pb::DeliveryOutcome::Queued,
            pb::DeliveryOutcome::Failed,
        ]
    );
    let w = "pushwire_worker_";
    // The flaky one's retry comes from the delivery store.
    let retried = format!(r#"{w}retries_total{{outcome="delivered"}}"#);
    let after = eventually(
        "the queued delivery retried",
        Duration::from_secs(10),
        || {
            let (before, retried) = (&before, &retried);
            async move {
                let after = scrape(stack.cp.http_addr).await?;
                let done = delta(before, &after, retried) == 1.0;
                Ok(if done {
                    Poll::Ready(after)
                } else {
                    Poll::not_yet(delta(before, &after, retried))
                })
            }
        },
    )
    .await?;
    assert_eq!(flaky.received_count(), 2);

    for (series, want) in [
        (
            format!(r#"{w}participations_total{{result="acknowledged"}}"#),
            5.0,
        ),
        (
            format!(r#"{w}participations_total{{result="rejected"}}"#),
            2.0,
        ),
        (
            format!(r#"{w}deliveries_total{{outcome="delivered"}}"#),
            3.0,
        ),
        (format!(r#"{w}deliveries_total{{outcome="queued"}}"#), 1.0),
        (format!(r#"{w}deliveries_total{{outcome="failed"}}"#), 1.0),
        (format!(r#"{w}handoffs_total{{reason="failure"}}"#), 1.0),
        (format!("{w}claims_total"), 1.0),
        (format!(r#"{w}attempts_total{{class="2xx"}}"#), 4.0),
        (format!(r#"{w}attempts_total{{class="5xx"}}"#), 1.0),
        (format!(r#"{w}attempts_total{{class="4xx"}}"#), 1.0),
        (format!("{w}delivery_latency_seconds_count"), 3.0),
        (format!("{w}attempt_latency_seconds_count"), 6.0),
        (
            r#"pushwire_grpc_calls_total{method="pushwire.v1.IngestService/PublishOne",code="OK"}"#
                .to_owned(),
            7.0,
        ),
    ] {
        assert_eq!(delta(&before, &after, &series), want, "{series}");
    }
    assert_eq!(after[&format!("{w}in_flight_participations")], 0.0);
    assert_eq!(after[&format!("{w}publish_streams")], 0.0);
    assert_eq!(after[&format!("{w}open_breakers")], 0.0);
    assert_eq!(after[&format!("{w}delivery_store_up")], 1.0);
    assert!(after[&format!("{w}config_revision")] >= 7.0);
    assert_eq!(
        after["pushwire_config_revision"],
        after[&format!("{w}config_revision")]
    );
    // Config changes reached the worker, in tables of one or more each, every change timed.
    let updates = after[&format!("{w}config_updates_total")];
    assert!(updates >= 1.0);
    assert!(after[&format!("{w}config_propagation_lag_seconds_count")] >= updates);
    assert!(after[r#"pushwire_store_call_duration_seconds_count{op="txn"}"#] >= 6.0);
    stack.stop().await
}
