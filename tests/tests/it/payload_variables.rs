//! End-to-end tests of the `payload_variables` option: a control plane with its in-process
//! worker on the embedded store delivers one participation to two loopback receivers, one
//! integration adding the `variables` object and one sending the document as published; both
//! bodies are checked byte for byte and their signatures verified over what was received.

use std::time::Duration;

use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::signing;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::AuthChannel;
use pushwire_tests::control_plane::{Backend, ControlPlane, test_config};
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::receiver::{Received, TestReceiver};

const ACCOUNT: &str = "accounts/77";
/// `whsec_` + base64("payload-variables-test-key").
const SECRET: &str = "whsec_cGF5bG9hZC12YXJpYWJsZXMtdGVzdC1rZXk=";
/// Bound of every wait: worker readiness, configuration propagation, deliveries.
const WAIT: Duration = Duration::from_secs(15);

/// An incomplete participation of the same campaign: routed to both integrations and skipped by
/// both (their default policy), so publishing it shows routing without sending anything.
const PROBE: &str = include_str!("../../../common/tests/data/participation-v2-incomplete.json");

/// A completed participation with every answer shape, pretty-printed as a publisher might.
const PARTICIPATION_ID: &str = "B1E7C0DE-0000-4A5B-8C9D-0E1F2A3B4C5D";
const PARTICIPATION: &str = r#"{
  "id": "B1E7C0DE-0000-4A5B-8C9D-0E1F2A3B4C5D",
  "state": "COMPLETED",
  "campaign": { "id": "418207", "channel": { "website": { "id": 5120 } } },
  "form": [
    { "id": 1, "type": "EMAIL", "variable": "email", "responses": [{ "value": "jo@example.org" }] },
    { "id": 2, "type": "GENDER", "variable": "gender", "responses": [{ "label": "Female", "value": "F" }] },
    { "id": 3, "type": "CHECKBOX", "variable": "hobbies",
      "responses": [{ "label": "Ski", "value": "SKI" }, { "label": "Golf", "value": "GOLF" }] },
    { "id": 4, "type": "UPLOAD", "variable": "photo",
      "responses": [{ "value": "me.jpg", "path": "https://files.example.org/u/me.jpg" }] },
    { "id": 5, "type": "TEXT", "variable": "", "responses": [{ "value": "no variable" }] },
    { "id": 6, "type": "TEXT", "responses": [{ "value": "no variable either" }] }
  ],
  "optins": [
    { "id": 10, "variable": "newsletter", "response": "1" },
    { "id": 11, "variable": "partners", "response": "0" },
    { "id": 12, "variable": "sms", "response": "" },
    { "id": 13, "variable": "email", "response": "1" }
  ],
  "questionnaire": [
    { "id": 20, "variable": "colours", "responses": [{ "value": "Red" }, { "value": "Blue" }] }
  ]
}
"#;

/// What the ADD integration receives: the object after the last member (`questionnaire`'s
/// `]`), every other byte as published; `email` is the form field's (first) value.
fn with_variables() -> String {
    let at = PARTICIPATION.len() - "\n}\n".len();
    format!(
        "{}{}{}",
        &PARTICIPATION[..at],
        concat!(
            r#","variables":{"email":"jo@example.org","gender":"F","hobbies":["SKI","GOLF"],"#,
            r#""photo":"https://files.example.org/u/me.jpg","newsletter":"1","partners":"0","#,
            r#""sms":"","colours":["Red","Blue"]}"#
        ),
        &PARTICIPATION[at..]
    )
}

async fn start(dir: &std::path::Path) -> anyhow::Result<ControlPlane> {
    let mut config = test_config(&Backend::Embedded(dir.join("data")));
    config.with_worker = true;
    config.allow_insecure_http = true;
    config.webhook.allow_cidr = vec!["127.0.0.0/8".into()];
    ControlPlane::start(config).await
}

/// Creates an integration signing with both schemes and an ACCOUNT scope for it.
async fn create(
    cp: &ControlPlane,
    id: &str,
    url: String,
    payload_variables: Option<pb::PayloadVariables>,
) -> anyhow::Result<pb::Integration> {
    let admin = cp.admin().await?;
    let created = admin
        .create_integration(
            ACCOUNT,
            id,
            pb::Integration {
                secret: SECRET.into(),
                signature_schemes: vec![
                    pb::SignatureScheme::Qualifio.into(),
                    pb::SignatureScheme::StandardWebhooks.into(),
                ],
                payload_variables: payload_variables.map(Into::into).unwrap_or_default(),
                ..integration(id, &url)
            },
        )
        .await?;
    admin
        .create_scope(
            ACCOUNT,
            &format!("all-to-{id}"),
            pb::PushScope {
                integration: created.name.clone(),
                level: pb::PushScopeLevel::Account.into(),
                ..Default::default()
            },
        )
        .await?;
    Ok(created)
}

fn publish_request(json: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        account: ACCOUNT.into(),
        participation_json: json.into(),
        ..Default::default()
    }
}

/// Publishes [`PROBE`] until the worker is ready and routes it to every one of `names`.
async fn wait_routed(channel: &AuthChannel, names: &[&str]) -> anyhow::Result<()> {
    let ingest = pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    eventually(&format!("{names:?} routed"), WAIT, || {
        let mut ingest = ingest.clone();
        async move {
            // Not ready yet answers UNAVAILABLE; an older configuration routes to fewer.
            let last = ingest.publish_one(publish_request(PROBE)).await;
            let routed = last.as_ref().is_ok_and(|resp| {
                let routed: Vec<&str> = resp
                    .get_ref()
                    .deliveries
                    .iter()
                    .map(|d| d.integration.as_str())
                    .collect();
                names.iter().all(|n| routed.contains(n))
            });
            Ok(Poll::when(routed, last))
        }
    })
    .await
}

/// `got` is `body`, sent for integration `integration_id` and signed over what was received
/// with both schemes.
fn assert_signed(got: &Received, body: &str, integration_id: &str) {
    assert_eq!(got.body_text(), body, "{integration_id}");
    let msg_id = format!("{PARTICIPATION_ID}_{integration_id}");
    assert_eq!(got.header("webhook-id"), Some(msg_id.as_str()));
    let ts: i64 = got
        .header("webhook-timestamp")
        .expect("webhook-timestamp")
        .parse()
        .expect("unix seconds");
    let secret = Secret::new(SECRET);
    let qualifio = got.header("x-qualifio-signature").expect("qualifio");
    assert!(
        signing::verify_qualifio(&secret, &got.body, qualifio),
        "{integration_id}"
    );
    let standard = got.header("webhook-signature").expect("standard webhooks");
    assert!(
        signing::verify_standard_webhooks(&secret, &msg_id, ts, &got.body, standard),
        "{integration_id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_gets_the_object_and_as_published_the_original_bytes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = start(dir.path()).await?;
    let adds = TestReceiver::http().await?;
    let keeps = TestReceiver::http().await?;
    let add = create(
        &cp,
        "adds",
        adds.url("/hook"),
        Some(pb::PayloadVariables::Add),
    )
    .await?;
    // Not set: the default.
    let keep = create(&cp, "keeps", keeps.url("/hook"), None).await?;
    assert_eq!(add.payload_variables(), pb::PayloadVariables::Add);
    assert_eq!(keep.payload_variables(), pb::PayloadVariables::AsPublished);

    let channel = cp.channel().await?;
    wait_routed(&channel, &[&add.name, &keep.name]).await?;
    let resp = pb::ingest_service_client::IngestServiceClient::new(channel.clone())
        .publish_one(publish_request(PARTICIPATION))
        .await?
        .into_inner();
    assert_eq!(resp.error, "");
    assert_eq!(resp.participation_id, PARTICIPATION_ID);
    let mut outcomes: Vec<(&str, pb::DeliveryOutcome)> = resp
        .deliveries
        .iter()
        .map(|d| (d.integration.as_str(), d.outcome()))
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            (add.name.as_str(), pb::DeliveryOutcome::Delivered),
            (keep.name.as_str(), pb::DeliveryOutcome::Delivered)
        ]
    );

    let got = adds.next(WAIT).await.expect("a delivery with variables");
    assert_signed(&got, &with_variables(), "adds");
    let json = got.json()?;
    assert_eq!(
        json["variables"]["hobbies"],
        serde_json::json!(["SKI", "GOLF"])
    );
    let got = keeps.next(WAIT).await.expect("a delivery as published");
    assert_signed(&got, PARTICIPATION, "keeps");
    // The probes were skipped, not sent: one delivery each.
    assert_eq!((adds.received_count(), keeps.received_count()), (1, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_the_feature_relies_on_are_checked_at_publish() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = start(dir.path()).await?;
    let receiver = TestReceiver::http().await?;
    let add = create(
        &cp,
        "adds",
        receiver.url("/hook"),
        Some(pb::PayloadVariables::Add),
    )
    .await?;
    let channel = cp.channel().await?;
    wait_routed(&channel, &[&add.name]).await?;
    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(channel);
    // (replaced text of PARTICIPATION, path the error must name)
    let rows = [
        (
            r#"[{ "value": "Red" }, { "value": "Blue" }]"#,
            r#"["Red", "Blue"]"#,
            "$.questionnaire[0].responses[0]",
        ),
        (
            r#""variable": "newsletter""#,
            r#""variable": 1"#,
            "$.optins[0].variable",
        ),
        (
            r#"{ "id": 11, "variable": "partners", "response": "0" }"#,
            r#""partners""#,
            "$.optins[1]",
        ),
        (
            r#""campaign": { "id": "418207""#,
            r#""campaign": { "id": "41-8207""#,
            "$.campaign.id",
        ),
    ];
    for (from, to, path) in rows {
        assert!(PARTICIPATION.contains(from), "{from}");
        let resp = ingest
            .publish_one(publish_request(&PARTICIPATION.replacen(from, to, 1)))
            .await?
            .into_inner();
        assert!(
            resp.error.contains(&format!("{path}: ")),
            "{path}: {}",
            resp.error
        );
        assert!(resp.deliveries.is_empty(), "{path}");
    }
    assert_eq!(receiver.received_count(), 0);
    Ok(())
}
