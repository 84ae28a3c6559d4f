//! Traces end to end: a real OTLP/gRPC collector (opentelemetry-proto's `TraceService`) on
//! loopback receives the spans of a participation published with a known parent trace through
//! a control plane with its worker, to a receiver that fails once then succeeds. The telemetry
//! is installed as in the binaries (`telemetry::init`), in a test process of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use pushwire_common::pb::v1 as pb;
use pushwire_common::server::telemetry::{self, LogFormat, Settings};
use pushwire_tests::admin::integration;
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::receiver::{Reply, TestReceiver};
use pushwire_tests::worker::{COMPLETED, COMPLETED_ID, Stack, request};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

const TRACE_ID: &str = "5a1e0c2f9b8d4e6f8a7b6c5d4e3f2a1b";
const PUBLISHER_SPAN: &str = "1f2e3d4c5b6a7988";
const TRACESTATE: &str = "pushwire-test=t61,other=x";
const SECRET: &str = "whsec_dGVsZW1ldHJ5LXRlc3Qtc2lnbmluZy1zZWNyZXQ=";
const AUTH_VALUE: &str = "Bearer telemetry-test-token-7c41";

/// Every span exported to it, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn string(v: &AnyValue) -> Option<String> {
    match v {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
}

/// An attribute that must be an integer (the conventions' type), not its digits as a string.
fn int_attr(span: &Span, key: &str) -> Option<i64> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::IntValue(i) => Some(*i),
            _ => None,
        })
}

/// Whether the span's status is Error.
fn is_error(span: &Span) -> bool {
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    span.status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32)
}

fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// In a process of its own: it installs the process-wide subscriber.
#[test]
fn a_participation_is_traced_from_the_publisher_to_each_attempt() {
    crate::alone::in_own_process(
        "telemetry::a_participation_is_traced_from_the_publisher_to_each_attempt",
        async { tokio::time::timeout(Duration::from_secs(60), traced()).await? },
    );
}

async fn traced() -> anyhow::Result<()> {
    let collector = Collector::default();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let telemetry = telemetry::init(Settings {
        service_name: "pushwire-control-plane",
        log_format: LogFormat::Text,
        otlp_endpoint: Some(format!("http://{addr}")),
    })
    .map_err(|e| anyhow::anyhow!(e))?;

    let stack = Stack::start().await?;
    let receiver = TestReceiver::http().await?;
    receiver.respond_with(vec![Reply::status(500)]);
    let name = stack
        .admin()
        .create_routed(
            "accounts/7",
            "traced",
            pb::Integration {
                secret: SECRET.into(),
                auth_header: Some(pb::AuthHeader {
                    name: "Authorization".into(),
                    value: AUTH_VALUE.into(),
                    ..Default::default()
                }),
                signature_schemes: vec![
                    pb::SignatureScheme::Qualifio.into(),
                    pb::SignatureScheme::StandardWebhooks.into(),
                ],
                ..integration("Traced", &receiver.url("/hook"))
            },
        )
        .await?;
    stack.sync().await?;

    let resp = stack
        .publish_one(pb::PublishRequest {
            trace_context: Some(pb::TraceContext {
                traceparent: format!("00-{TRACE_ID}-{PUBLISHER_SPAN}-01"),
                tracestate: TRACESTATE.into(),
            }),
            ..request("accounts/7", COMPLETED)
        })
        .await??;
    assert_eq!(resp.deliveries.len(), 1, "{resp:?}");
    // The first attempt fails: handed off to the delivery store, whose retry delivers it.
    assert_eq!(resp.deliveries[0].outcome(), pb::DeliveryOutcome::Queued);
    assert_eq!(resp.deliveries[0].attempts, 1);
    eventually(
        "the retry from the store",
        Duration::from_secs(10),
        || async {
            let n = receiver.received_count();
            Ok(Poll::when(n >= 2, n))
        },
    )
    .await?;

    // Both attempts reached the receiver within our trace, each with its own span id.
    let got = receiver.drain();
    assert_eq!(got.len(), 2);
    let sent: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            // The publisher's tracestate travels with its trace.
            assert_eq!(r.header("tracestate"), Some(TRACESTATE));
            let tp = r.header("traceparent").expect("traceparent sent");
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts.len(), 4, "{tp}");
            (parts[1].to_owned(), parts[2].to_owned())
        })
        .collect();
    assert!(sent.iter().all(|(t, _)| t == TRACE_ID), "{sent:?}");
    assert_ne!(sent[0].1, sent[1].1);

    // The spans of our trace, once both attempts are exported.
    let spans = eventually(
        "both attempts exported",
        Duration::from_secs(20),
        || async {
            telemetry.flush().await;
            let spans: Vec<(String, Span)> = collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| hex_id(&s.trace_id) == TRACE_ID)
                .cloned()
                .collect();
            if spans.iter().filter(|(_, s)| s.name == "attempt").count() == 2
                && spans.iter().any(|(_, s)| s.name == "publish")
            {
                return Ok(Poll::Ready(spans));
            }
            let names: Vec<String> = spans.into_iter().map(|(_, s)| s.name).collect();
            Ok(Poll::not_yet(names))
        },
    )
    .await?;
    let one = |name: &str| -> &Span {
        let found: Vec<&Span> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == name)
            .collect();
        assert_eq!(found.len(), 1, "one {name} span: {found:?}");
        found[0]
    };
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "pushwire-control-plane")
    );

    // publish → (route, deliver → (attempt, handoff)), under the publisher's span; the retry's
    // attempt continues the trace from the stored traceparent (the deliver span).
    let publish = one("publish");
    assert_eq!(hex_id(&publish.parent_span_id), PUBLISHER_SPAN);
    assert_eq!(
        attr(publish, "pushwire.participation.id").as_deref(),
        Some(COMPLETED_ID)
    );
    let route = one("route");
    assert_eq!(route.parent_span_id, publish.span_id);
    let deliver = one("deliver");
    assert_eq!(deliver.parent_span_id, publish.span_id);
    assert_eq!(
        attr(deliver, "pushwire.integration").as_deref(),
        Some(name.as_str())
    );
    assert_eq!(attr(deliver, "pushwire.outcome").as_deref(), Some("queued"));
    let handoff = one("handoff");
    assert_eq!(handoff.parent_span_id, deliver.span_id);
    assert_eq!(
        attr(handoff, "pushwire.handoff.reason").as_deref(),
        Some("failure")
    );
    let mut attempts: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "attempt")
        .collect();
    attempts.sort_by_key(|s| attr(s, "pushwire.attempt"));
    for (n, (attempt, status)) in attempts.iter().zip(["500", "200"]).enumerate() {
        assert_eq!(attempt.parent_span_id, deliver.span_id);
        assert_eq!(attr(attempt, "pushwire.attempt"), Some((n + 1).to_string()));
        assert_eq!(
            attr(attempt, "http.response.status_code").as_deref(),
            Some(status)
        );
        assert_eq!(
            attr(attempt, "http.request.method").as_deref(),
            Some("POST")
        );
        assert_eq!(attr(attempt, "url.full"), Some(receiver.url("/hook")));
        assert_eq!(
            attr(attempt, "pushwire.participation.id").as_deref(),
            Some(COMPLETED_ID)
        );
        // The receiver saw this attempt's span as its parent.
        assert_eq!(sent[n].1, hex_id(&attempt.span_id));
    }
    // The semantic conventions: integers, the status code as error.type, the server's address
    // and port, Error status on the failed attempt only, no non-OpenTelemetry attributes.
    let port = i64::from(receiver.addr().port());
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(int_attr(attempt, "pushwire.attempt"), Some(n as i64 + 1));
        assert_eq!(
            attr(attempt, "server.address").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(int_attr(attempt, "server.port"), Some(port));
    }
    assert_eq!(
        int_attr(attempts[0], "http.response.status_code"),
        Some(500)
    );
    assert_eq!(
        int_attr(attempts[1], "http.response.status_code"),
        Some(200)
    );
    assert_eq!(attr(attempts[0], "error.type").as_deref(), Some("500"));
    assert_eq!(attr(attempts[1], "error.type"), None);
    assert!(is_error(attempts[0]), "{:?}", attempts[0].status);
    assert!(!is_error(attempts[1]), "{:?}", attempts[1].status);
    assert!(!is_error(deliver) && !is_error(publish));
    // The deliver span counts the first attempt; the retry came from the delivery store
    // (QUEUED in between), with an attempt span of its own in the same trace.
    assert_eq!(int_attr(deliver, "pushwire.attempts"), Some(1));
    assert_eq!(int_attr(publish, "pushwire.deliveries"), Some(1));
    assert_eq!(int_attr(route, "pushwire.routes"), Some(1));
    for (_, span) in &spans {
        for leak in [
            "target",
            "busy_ns",
            "idle_ns",
            "code.namespace",
            "thread.id",
        ] {
            assert!(attr(span, leak).is_none(), "{leak} on {}", span.name);
        }
    }

    // A gRPC call's server span: named after the method, with the status code as an integer;
    // a client's mistake (INVALID_ARGUMENT) leaves the server span's status unset.
    let refused = stack
        .admin()
        .integrations()
        .get_integration(pb::GetIntegrationRequest {
            name: "not a name".into(),
        })
        .await
        .expect_err("a malformed name is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let get = eventually(
        "the GetIntegration span exported",
        Duration::from_secs(20),
        || async {
            telemetry.flush().await;
            let found = collector
                .spans
                .lock()
                .unwrap()
                .iter()
                .map(|(_, s)| s)
                .find(|s| s.name == "pushwire.v1.IntegrationService/GetIntegration")
                .cloned();
            Ok(match found {
                Some(span) => Poll::Ready(span),
                None => Poll::not_yet("no GetIntegration span yet"),
            })
        },
    )
    .await?;
    assert_eq!(
        int_attr(&get, "rpc.grpc.status_code"),
        Some(tonic::Code::InvalidArgument as i64)
    );
    assert_eq!(attr(&get, "rpc.system").as_deref(), Some("grpc"));
    assert!(!is_error(&get), "{:?}", get.status);

    // Nothing secret and no body in any exported attribute or event of any span.
    let everything = format!("{:?}", collector.spans.lock().unwrap());
    for needle in [
        SECRET,
        "dGVsZW1ldHJ5LXRlc3Qtc2lnbmluZy1zZWNyZXQ",
        AUTH_VALUE,
        "telemetry-test-token",
        "Winter quiz 2026",
    ] {
        assert!(!everything.contains(needle), "{needle} leaked into spans");
    }

    stack.stop().await?;
    telemetry.shutdown().await;
    Ok(())
}
