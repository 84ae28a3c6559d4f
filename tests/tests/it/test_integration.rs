//! End-to-end tests of `IntegrationService.TestIntegration`: a control plane on the embedded
//! store sends the sample participation with the workers' client to a real `TestReceiver`
//! (HTTP or HTTPS on loopback) and reports what it answered.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::request::{
    SAMPLE_PARTICIPATION, SAMPLE_PARTICIPATION_ID, USER_AGENT,
};
use pushwire_common::webhook::signing;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backend, ControlPlane, test_config};
use pushwire_tests::receiver::{Received, Reply, TestReceiver};
use tonic::Code;

const ACCOUNT: &str = "accounts/42";
const AUTH_VALUE: &str = "Bearer test-auth-t0ken-value";
/// `whsec_` + base64("test-integration-signing-key").
const SECRET: &str = "whsec_dGVzdC1pbnRlZ3JhdGlvbi1zaWduaW5nLWtleQ==";
/// In the URL's query: receivers sometimes take a token there; it must not show in errors.
const QUERY_TOKEN: &str = "q-t0ken-in-query";
/// A request that reached the receiver is recorded before it answers, so by the time
/// TestIntegration returns it is there; this only bounds a failing test.
const RECORD_WAIT: Duration = Duration::from_secs(5);

/// How the control plane under test delivers.
#[derive(Default)]
struct Delivery<'a> {
    /// Allow-list loopback (otherwise the SSRF guard refuses it, as in production).
    allow_loopback: bool,
    /// Trust the CA of this HTTPS receiver.
    trust: Option<&'a TestReceiver>,
    request_timeout: Option<Duration>,
}

async fn start(dir: &Path, delivery: Delivery<'_>) -> anyhow::Result<ControlPlane> {
    let mut config = test_config(&Backend::Embedded(dir.join("data")));
    if delivery.allow_loopback {
        // ::1 too: `localhost` may resolve to both, and one refused answer refuses the host.
        config.webhook.allow_cidr = vec!["127.0.0.0/8".into(), "::1/128".into()];
    }
    if let Some(receiver) = delivery.trust {
        config.webhook.extra_ca_file = Some(receiver.write_ca_file(dir)?);
    }
    if let Some(timeout) = delivery.request_timeout {
        config.webhook.request_timeout = timeout;
    }
    ControlPlane::start(config).await
}

fn loopback() -> Delivery<'static> {
    Delivery {
        allow_loopback: true,
        ..Delivery::default()
    }
}

/// An integration with an auth header and a secret, signed with both schemes.
fn crm(url: &str) -> pb::Integration {
    pb::Integration {
        auth_header: Some(pb::AuthHeader {
            name: "Authorization".into(),
            value: AUTH_VALUE.into(),
            value_set: false,
        }),
        secret: SECRET.into(),
        signature_schemes: vec![
            pb::SignatureScheme::Qualifio.into(),
            pb::SignatureScheme::StandardWebhooks.into(),
        ],
        ..integration("CRM", url)
    }
}

async fn create(cp: &ControlPlane, id: &str, i: pb::Integration) -> anyhow::Result<String> {
    Ok(cp
        .admin()
        .await?
        .create_integration(ACCOUNT, id, i)
        .await?
        .name)
}

async fn test_integration(
    cp: &ControlPlane,
    name: &str,
) -> anyhow::Result<Result<pb::TestIntegrationResponse, tonic::Status>> {
    Ok(cp
        .integrations()
        .await?
        .test_integration(pb::TestIntegrationRequest { name: name.into() })
        .await
        .map(tonic::Response::into_inner))
}

async fn get(cp: &ControlPlane, name: &str) -> anyhow::Result<pb::Integration> {
    Ok(cp.admin().await?.get_integration(name).await?)
}

/// Neither the auth header value nor the signing secret nor the URL's query appears anywhere
/// in `resp`.
fn assert_no_secret(resp: &pb::TestIntegrationResponse) {
    let printed = format!("{resp:?}");
    for hidden in [
        AUTH_VALUE,
        "test-auth-t0ken",
        SECRET,
        "test-integration-signing-key",
        QUERY_TOKEN,
    ] {
        assert!(!printed.contains(hidden), "{hidden} in {printed}");
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The request is the sample participation (under a fresh id), sent and signed as a worker
/// would.
fn assert_sample_delivery(got: &Received, integration_id: &str, sent: (i64, i64)) {
    let sample = sample_under_id(&sample_id(got));
    assert_delivery_of(got, sample.as_bytes(), integration_id, sent);
}

/// The participation id of a TestIntegration request: a fresh one each time, never the
/// fixture's (a de-duplicating receiver would drop the real participation of that id).
fn sample_id(got: &Received) -> String {
    let json = got.json().expect("JSON body");
    let id = json["id"].as_str().expect("an id").to_owned();
    assert_ne!(id, SAMPLE_PARTICIPATION_ID, "the fixture's id");
    assert_eq!(id.len(), SAMPLE_PARTICIPATION_ID.len(), "{id}");
    id
}

/// The sample participation as sent under `id`.
fn sample_under_id(id: &str) -> String {
    SAMPLE_PARTICIPATION.replacen(SAMPLE_PARTICIPATION_ID, id, 1)
}

/// The request carries `body` (the sample participation or a transformation of it), sent and
/// signed over that body as a worker would.
fn assert_delivery_of(got: &Received, body: &[u8], integration_id: &str, sent: (i64, i64)) {
    assert_eq!(got.method, "POST");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("user-agent"), Some(USER_AGENT));
    assert!(USER_AGENT.starts_with("Pushwire/"), "{USER_AGENT}");
    // A traceparent, as every delivery has: the receiver's spans join a trace.
    let traceparent = got.header("traceparent").expect("a traceparent");
    assert!(
        pushwire_common::webhook::traceparent::TraceParent::parse(traceparent).is_some(),
        "{traceparent}"
    );
    let msg_id = format!("{}_{integration_id}", sample_id(got));
    assert_eq!(got.header("webhook-id"), Some(msg_id.as_str()));
    let ts: i64 = got
        .header("webhook-timestamp")
        .expect("webhook-timestamp")
        .parse()
        .expect("unix seconds");
    assert!(sent.0 <= ts && ts <= sent.1, "{ts} not in {sent:?}");
    assert_eq!(got.header("authorization"), Some(AUTH_VALUE));
    assert_eq!(got.body, body);

    let secret = Secret::new(SECRET);
    let qualifio = got
        .header("x-qualifio-signature")
        .expect("x-qualifio-signature");
    assert!(signing::verify_qualifio(&secret, &got.body, qualifio));
    assert!(!signing::verify_qualifio(
        &Secret::new("another secret"),
        &got.body,
        qualifio
    ));
    let standard = got.header("webhook-signature").expect("webhook-signature");
    assert!(signing::verify_standard_webhooks(
        &secret, &msg_id, ts, &got.body, standard
    ));
}

#[tokio::test]
async fn https_answer_is_reported_and_the_request_is_a_signed_sample() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::https().await?;
    receiver.set_default(
        Reply::ok()
            .with_header("X-Receiver", "crm-1")
            .with_header("x-multi", "a")
            .with_header("x-multi", "b")
            .with_body("thanks, got it"),
    );
    let cp = start(
        dir.path(),
        Delivery {
            trust: Some(&receiver),
            ..loopback()
        },
    )
    .await?;
    let url = receiver.localhost_url(&format!("/hooks/qualifio?token={QUERY_TOKEN}"));
    let name = create(&cp, "crm", crm(&url)).await?;

    let before = unix_now();
    let resp = test_integration(&cp, &name).await??;
    let after = unix_now();

    assert_eq!(resp.status_code, 200, "{resp:?}");
    assert_eq!(resp.error, "");
    assert!(
        (0..15_000).contains(&resp.latency_ms),
        "{}",
        resp.latency_ms
    );
    assert_eq!(resp.response_body_prefix, "thanks, got it");
    assert_eq!(
        resp.response_headers.get("x-receiver").map(String::as_str),
        Some("crm-1")
    );
    assert_eq!(
        resp.response_headers.get("x-multi").map(String::as_str),
        Some("a, b")
    );
    assert_eq!(
        resp.response_headers
            .get("content-length")
            .map(String::as_str),
        Some("14")
    );
    assert!(
        resp.response_headers
            .keys()
            .all(|k| *k == k.to_ascii_lowercase()),
        "{:?}",
        resp.response_headers.keys()
    );
    assert_no_secret(&resp);

    let got = receiver.next(RECORD_WAIT).await.expect("a request");
    assert_eq!(got.path, format!("/hooks/qualifio?token={QUERY_TOKEN}"));
    assert_sample_delivery(&got, "crm", (before, after));
    // Sent once: TestIntegration does not retry.
    assert_eq!(receiver.received_count(), 1);
    Ok(())
}

#[tokio::test]
async fn http_error_statuses_are_answers_and_410_disables_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    let big = "0123456789abcdef".repeat(640); // 10 KiB
    receiver.respond_with(vec![
        Reply::status(500).with_body(big.clone()),
        Reply::status(404).with_body("no such hook"),
        Reply::status(410).with_body("gone for good"),
    ]);
    let cp = start(dir.path(), loopback()).await?;
    let name = create(&cp, "crm", crm(&receiver.url("/hook"))).await?;

    let resp = test_integration(&cp, &name).await??;
    assert_eq!((resp.status_code, resp.error.as_str()), (500, ""));
    assert_eq!(resp.response_body_prefix.len(), 4096);
    assert_eq!(resp.response_body_prefix, big[..4096]);
    assert_eq!(
        resp.response_headers
            .get("content-length")
            .map(String::as_str),
        Some("10240")
    );

    let resp = test_integration(&cp, &name).await??;
    assert_eq!(
        (resp.status_code, resp.response_body_prefix.as_str()),
        (404, "no such hook")
    );

    let resp = test_integration(&cp, &name).await??;
    assert_eq!(
        (
            resp.status_code,
            resp.response_body_prefix.as_str(),
            resp.error.as_str()
        ),
        (410, "gone for good", "")
    );
    let after = get(&cp, &name).await?;
    assert_eq!(after.enabled, Some(true));
    assert_eq!(after.disabled_reason, "");
    assert_eq!(receiver.received_count(), 3);
    Ok(())
}

#[tokio::test]
async fn ssrf_guard_refuses_loopback_without_the_allow_list() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    let port = receiver.addr().port();
    let urls = [("literal", "127.0.0.1"), ("by-name", "localhost")].map(|(id, host)| {
        (
            id,
            host,
            format!("http://{host}:{port}/hook?token={QUERY_TOKEN}"),
        )
    });

    // The production default (no --allow-cidr) refuses such URLs when they are set...
    let cp = start(dir.path(), Delivery::default()).await?;
    for (id, host, url) in &urls {
        let mut i = crm(url);
        i.display_name = (*id).into();
        let err = create(&cp, id, i).await.unwrap_err();
        let status = err.downcast_ref::<tonic::Status>().expect("a gRPC error");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(
            status.message().starts_with("integration.url: host ")
                && status.message().contains(host)
                && status.message().contains("is loopback"),
            "{url}: {}",
            status.message()
        );
    }
    cp.stop().await?;

    // ...and the worker's guard refuses to send to those stored while the allow-list allowed
    // them: created with loopback allowed, tested after a restart without.
    let cp = start(dir.path(), loopback()).await?;
    let mut names = Vec::new();
    for (id, _, url) in &urls {
        let mut i = crm(url);
        i.display_name = (*id).into();
        names.push(create(&cp, id, i).await?);
    }
    cp.stop().await?;
    let cp = start(dir.path(), Delivery::default()).await?;
    for ((_, host, url), name) in urls.iter().zip(&names) {
        let resp = test_integration(&cp, name).await??;
        assert_eq!(resp.status_code, 0, "{url}");
        assert!(
            resp.error
                .starts_with(&format!("refused to connect to {host}: "))
                && resp.error.contains(" is loopback (")
                && resp.error.ends_with(", not public and not allow-listed"),
            "{url}: {}",
            resp.error
        );
        assert_eq!(
            (
                resp.latency_ms,
                resp.response_headers.len(),
                resp.response_body_prefix.as_str()
            ),
            (0, 0, "")
        );
        assert_no_secret(&resp);
    }
    // Refused before connecting: the receiver never saw a connection's request.
    assert_eq!(receiver.received_count(), 0);
    assert!(receiver.drain().is_empty());
    Ok(())
}

#[tokio::test]
async fn nothing_listening_is_a_connection_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let cp = start(dir.path(), loopback()).await?;
    let url = format!("http://127.0.0.1:{port}/hook?token={QUERY_TOKEN}");
    let name = create(&cp, "crm", crm(&url)).await?;
    let resp = test_integration(&cp, &name).await??;
    assert_eq!(resp.status_code, 0);
    assert!(
        resp.error.starts_with("connection failed"),
        "{}",
        resp.error
    );
    assert!(!resp.error.contains("token"), "{}", resp.error);
    assert_no_secret(&resp);
    Ok(())
}

#[tokio::test]
async fn untrusted_certificate_and_timeout_are_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tls = TestReceiver::https().await?;
    let silent = TestReceiver::http().await?;
    silent.set_default(Reply::hang());
    // Loopback allowed but the receiver's CA not trusted; a short request timeout.
    let cp = start(
        dir.path(),
        Delivery {
            request_timeout: Some(Duration::from_millis(500)),
            ..loopback()
        },
    )
    .await?;

    let name = create(&cp, "tls", crm(&tls.localhost_url("/hook"))).await?;
    let resp = test_integration(&cp, &name).await??;
    assert_eq!(resp.status_code, 0);
    assert!(
        resp.error.starts_with("TLS handshake failed"),
        "{}",
        resp.error
    );
    assert_eq!(tls.received_count(), 0);

    let mut i = crm(&silent.url("/hook"));
    i.display_name = "silent".into();
    let name = create(&cp, "silent", i).await?;
    let resp = test_integration(&cp, &name).await??;
    assert_eq!((resp.status_code, resp.error.as_str()), (0, "timed out"));
    // It did get the request; the answer is what never came.
    assert!(silent.next(RECORD_WAIT).await.is_some());
    Ok(())
}

#[tokio::test]
async fn sample_shows_the_added_variables() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    let cp = start(dir.path(), loopback()).await?;
    let mut i = crm(&receiver.url("/hook"));
    i.payload_variables = pb::PayloadVariables::Add.into();
    let name = create(&cp, "crm", i).await?;
    assert_eq!(
        get(&cp, &name).await?.payload_variables(),
        pb::PayloadVariables::Add
    );

    let before = unix_now();
    let resp = test_integration(&cp, &name).await??;
    let after = unix_now();
    assert_eq!((resp.status_code, resp.error.as_str()), (200, ""));
    let got = receiver.next(RECORD_WAIT).await.expect("a request");
    // The sample ends with `  ]\n}\n`: the object follows the last member, the rest is as is.
    let sample = sample_under_id(&sample_id(&got));
    let at = sample.len() - "\n}\n".len();
    let want = format!(
        "{}{}{}",
        &sample[..at],
        r#","variables":{"email":"jo.peeters@example.org","gender":"F","newsletter":"1","q_shortest_day":"December"}"#,
        &sample[at..],
    );
    assert_delivery_of(&got, want.as_bytes(), "crm", (before, after));

    // Back to the document as published, by update mask.
    cp.integrations()
        .await?
        .update_integration(pb::UpdateIntegrationRequest {
            integration: Some(pb::Integration {
                name: name.clone(),
                payload_variables: pb::PayloadVariables::AsPublished.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["payload_variables".into()],
            }),
        })
        .await?;
    let before = unix_now();
    test_integration(&cp, &name).await??;
    let after = unix_now();
    let got = receiver.next(RECORD_WAIT).await.expect("a request");
    assert_sample_delivery(&got, "crm", (before, after));
    Ok(())
}

#[tokio::test]
async fn disabled_integration_is_tested_and_stays_disabled() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    receiver.set_default(Reply::status(204));
    let cp = start(dir.path(), loopback()).await?;
    let mut i = crm(&receiver.url("/hook"));
    i.enabled = Some(false);
    i.disabled_reason = "checking the endpoint first".into();
    let name = create(&cp, "crm", i).await?;
    assert_eq!(get(&cp, &name).await?.enabled, Some(false));

    let before = unix_now();
    let resp = test_integration(&cp, &name).await??;
    let after = unix_now();
    assert_eq!((resp.status_code, resp.error.as_str()), (204, ""));
    let got = receiver.next(RECORD_WAIT).await.expect("a request");
    assert_sample_delivery(&got, "crm", (before, after));

    let still = get(&cp, &name).await?;
    assert_eq!(still.enabled, Some(false));
    assert_eq!(still.disabled_reason, "checking the endpoint first");
    Ok(())
}

#[tokio::test]
async fn unknown_and_invalid_names_are_grpc_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    let cp = start(dir.path(), loopback()).await?;
    // An integration exists in the account: only the asked one is missing.
    create(&cp, "crm", crm(&receiver.url("/hook"))).await?;

    for missing in [
        "accounts/42/integrations/other",
        "accounts/7/integrations/crm",
    ] {
        let status = test_integration(&cp, missing)
            .await?
            .expect_err("unknown integration");
        assert_eq!(status.code(), Code::NotFound, "{missing}: {status:?}");
        assert!(status.message().contains(missing), "{}", status.message());
    }
    for invalid in [
        "",
        "crm",
        "accounts/42",
        "accounts/42/integrations/",
        "accounts/42/integrations/Not_Valid",
        "accounts/42/pushScopes/crm",
        "accounts/42/integrations/crm/extra",
    ] {
        let status = test_integration(&cp, invalid)
            .await?
            .expect_err("invalid name");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{invalid:?}: {status:?}"
        );
        assert!(status.message().contains("name"), "{}", status.message());
    }
    assert_eq!(receiver.received_count(), 0);
    Ok(())
}

#[tokio::test]
async fn echoed_secrets_are_not_returned() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    // An echo service reflecting what it got, credentials included.
    receiver.set_default(
        Reply::status(401)
            .with_header("x-echo-authorization", AUTH_VALUE)
            .with_body(format!(
                "{{\"authorization\":\"{AUTH_VALUE}\",\"secret\":\"{SECRET}\",\"ok\":false}}"
            )),
    );
    let cp = start(dir.path(), loopback()).await?;
    let name = create(&cp, "crm", crm(&receiver.url("/echo"))).await?;
    let resp = test_integration(&cp, &name).await??;
    assert_eq!(resp.status_code, 401);
    assert_eq!(
        resp.response_headers
            .get("x-echo-authorization")
            .map(String::as_str),
        Some("<withheld: it held a stored credential>")
    );
    assert_eq!(
        resp.response_body_prefix,
        "<withheld: it held a stored credential>"
    );
    assert_no_secret(&resp);
    // The receiver did get the real values: withholding is on the way back only.
    let got = receiver.next(RECORD_WAIT).await.expect("a request");
    assert_eq!(got.header("authorization"), Some(AUTH_VALUE));
    Ok(())
}

#[tokio::test]
async fn each_test_sends_a_fresh_participation_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    let cp = start(dir.path(), loopback()).await?;
    let name = create(&cp, "crm", crm(&receiver.url("/hook"))).await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        test_integration(&cp, &name).await??;
        let got = receiver.next(RECORD_WAIT).await.expect("a request");
        let id = sample_id(&got);
        assert_eq!(got.header("webhook-id"), Some(format!("{id}_crm").as_str()));
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    Ok(())
}

/// A receiver that echoes the auth header value back, in each of the forms the outside check
/// saw (and a few more): none reaches the caller; what holds one is withheld whole.
#[tokio::test]
async fn echoed_credentials_are_withheld_in_every_form() -> anyhow::Result<()> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    const WITHHELD: &str = "<withheld: it held a stored credential>";
    let json_escaped: String = AUTH_VALUE
        .chars()
        .map(|c| format!("\\u{:04X}", c as u32))
        .collect();
    let (first, second) = AUTH_VALUE.split_at(AUTH_VALUE.len() / 2);
    let forms = [
        format!(r#"{{"headers":{{"authorization":"{json_escaped}"}}}}"#),
        format!(
            "authorization={}",
            AUTH_VALUE.replace(' ', "%20").replace('-', "%2D")
        ),
        format!("echo {}", STANDARD.encode(AUTH_VALUE)),
        format!("echo {}", URL_SAFE_NO_PAD.encode(AUTH_VALUE)),
        AUTH_VALUE.to_uppercase(),
        format!(r#"{{"a":"{first}","b":"{second}"}}"#),
        format!(
            "hex {}",
            AUTH_VALUE
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
    ];
    let receiver = TestReceiver::http().await?;
    receiver.respond_with(
        forms
            .iter()
            .map(|form| {
                Reply::status(401)
                    .with_header("x-echo", form)
                    .with_body(form.clone())
            })
            .collect(),
    );
    let dir = tempfile::tempdir()?;
    let cp = start(dir.path(), loopback()).await?;
    let name = create(&cp, "crm", crm(&receiver.url("/hook"))).await?;
    for form in &forms {
        let resp = test_integration(&cp, &name).await??;
        assert_eq!(resp.status_code, 401, "{form}: {resp:?}");
        assert_eq!(resp.response_body_prefix, WITHHELD, "{form}");
        assert_eq!(
            resp.response_headers.get("x-echo").map(String::as_str),
            Some(WITHHELD),
            "{form}"
        );
        assert_no_secret(&resp);
    }
    Ok(())
}
