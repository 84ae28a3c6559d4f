//! End-to-end tests of the worker's `IngestService` (`Publish` and `PublishOne`) with real
//! parts only: a control plane running its in-process worker (`--with-worker`) on the embedded
//! store, tonic clients, and loopback `TestReceiver`s (HTTP and HTTPS) that record what they
//! get. Standard Webhooks signatures are also checked with the reference Python library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::signing;
use pushwire_tests::admin::{integration, scope};
use pushwire_tests::eventually::{Poll, eventually, within};
use pushwire_tests::receiver::{Received, Reply, TestReceiver};
use pushwire_tests::worker::{
    COMPLETED, COMPLETED_ID, FIXTURE_CAMPAIGN, FIXTURE_WEBSITE, INCOMPLETE, INCOMPLETE_ID, Stack,
    WAIT, by_integration, completed_doc, delivered, delivered_once, participation, request,
    wait_ingest_ready, worker_config,
};
use pushwire_worker::config::Schedule;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const ACCOUNT: &str = "accounts/42";
const OTHER_ACCOUNT: &str = "accounts/43";
/// Bound of every test.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// A webhook is recorded before the receiver answers, so once the participation is
/// acknowledged it is there; this only bounds a failing test.
const RECORD_WAIT: Duration = Duration::from_secs(5);
/// The Standard Webhooks reference library the signature test runs (also in `./dev`).
const STANDARDWEBHOOKS_PIN: &str = "standardwebhooks==1.1.0";

const QUALIFIO_SECRET: &str = "crm-signing-s3cret";
const AUTH_VALUE: &str = "Bearer ingest-t0ken";
/// `whsec_` + base64("pushwire-rotation-old-key-0001").
const WHSEC_OLD: &str = "whsec_cHVzaHdpcmUtcm90YXRpb24tb2xkLWtleS0wMDAx";
/// `whsec_` + base64("pushwire-rotation-new-key-0002").
const WHSEC_NEW: &str = "whsec_cHVzaHdpcmUtcm90YXRpb24tbmV3LWtleS0wMDAy";
/// The W3C specification's example: a sampled trace.
const PARENT_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn name(account: &str, id: &str) -> String {
    format!("{account}/integrations/{id}")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The next webhook a receiver got, failing when none comes.
async fn next(receiver: &TestReceiver) -> anyhow::Result<Received> {
    receiver
        .next(RECORD_WAIT)
        .await
        .with_context(|| format!("no webhook at {}", receiver.addr()))
}

/// The body of a webhook as text; fails unless it is UTF-8 (every body published here is).
fn body(got: &Received) -> anyhow::Result<&str> {
    std::str::from_utf8(&got.body).context("the body is not UTF-8")
}

fn header<'a>(got: &'a Received, name: &str) -> anyhow::Result<&'a str> {
    got.header(name)
        .with_context(|| format!("no {name} header in {:?}", got.headers))
}

/// `(trace id, span id, flags)` of a version-00 `traceparent`, checked against the W3C rules
/// independently of the worker's own parser.
fn traceparent_parts(value: &str) -> anyhow::Result<(String, String, String)> {
    let parts: Vec<&str> = value.split('-').collect();
    anyhow::ensure!(parts.len() == 4, "traceparent {value:?}: not 4 fields");
    let (version, trace, span, flags) = (parts[0], parts[1], parts[2], parts[3]);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    anyhow::ensure!(version == "00", "traceparent {value:?}: version");
    anyhow::ensure!(hex(trace, 32), "traceparent {value:?}: trace id");
    anyhow::ensure!(hex(span, 16), "traceparent {value:?}: span id");
    anyhow::ensure!(hex(flags, 2), "traceparent {value:?}: flags");
    anyhow::ensure!(
        trace.bytes().any(|b| b != b'0'),
        "traceparent {value:?}: zero trace id"
    );
    anyhow::ensure!(
        span.bytes().any(|b| b != b'0'),
        "traceparent {value:?}: zero span id"
    );
    Ok((trace.to_owned(), span.to_owned(), flags.to_owned()))
}

/// `(participation id, integration id)` of a webhook, from its `webhook-id`.
fn webhook_parts(got: &Received) -> anyhow::Result<(String, String)> {
    let id = header(got, "webhook-id")?;
    let (participation, integration) = id
        .rsplit_once('_')
        .with_context(|| format!("webhook-id {id:?} without '_'"))?;
    Ok((participation.to_owned(), integration.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// 1. One participation, one integration: bytes, ids, signature, trace context.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_one_delivers_the_published_bytes_signed_with_the_trace_continued()
-> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        let crm = stack
            .admin()
            .create_integration(
                ACCOUNT,
                "crm",
                pb::Integration {
                    secret: QUALIFIO_SECRET.into(),
                    auth_header: Some(pb::AuthHeader {
                        name: "Authorization".into(),
                        value: AUTH_VALUE.into(),
                        value_set: false,
                    }),
                    ..integration("CRM", &receiver.url("/hooks/crm"))
                },
            )
            .await?
            .name;
        stack
            .admin()
            .create_scope(
                ACCOUNT,
                "news",
                scope(&crm, pb::PushScopeLevel::Website, FIXTURE_WEBSITE),
            )
            .await?;
        stack.sync().await?;

        let before = unix_now();
        let resp = stack
            .publish_one(pb::PublishRequest {
                trace_context: Some(pb::TraceContext {
                    traceparent: PARENT_TRACEPARENT.into(),
                    tracestate: "vendor=opaque".into(),
                }),
                request_id: "req-1".into(),
                ..request(ACCOUNT, COMPLETED)
            })
            .await??;
        let after = unix_now();
        assert_eq!(
            resp,
            pb::PublishResponse {
                participation_id: COMPLETED_ID.into(),
                error: String::new(),
                deliveries: vec![delivered_once(&crm)],
                request_id: "req-1".into(),
            }
        );

        let got = next(&receiver).await?;
        assert_eq!(receiver.received_count(), 1, "exactly one webhook");
        assert_eq!(got.method, "POST");
        assert_eq!(got.path, "/hooks/crm");
        assert_eq!(body(&got)?, COMPLETED, "the published bytes, unchanged");
        assert_eq!(header(&got, "content-type")?, "application/json");
        assert!(header(&got, "user-agent")?.starts_with("Pushwire/"));
        assert_eq!(header(&got, "authorization")?, AUTH_VALUE);
        assert_eq!(
            header(&got, "webhook-id")?,
            format!("{COMPLETED_ID}_crm"),
            "{{participation id}}_{{integration id}}"
        );
        let ts: i64 = header(&got, "webhook-timestamp")?.parse()?;
        assert!(
            (before..=after).contains(&ts),
            "{ts} not in {before}..={after}"
        );
        let secret = Secret::new(QUALIFIO_SECRET);
        let qualifio = header(&got, "x-qualifio-signature")?;
        assert!(signing::verify_qualifio(
            &secret,
            COMPLETED.as_bytes(),
            qualifio
        ));
        assert_eq!(
            qualifio,
            signing::qualifio_signature(&secret, COMPLETED.as_bytes())
        );
        assert!(!signing::verify_qualifio(
            &Secret::new("another"),
            COMPLETED.as_bytes(),
            qualifio
        ));
        assert_eq!(
            got.header("webhook-signature"),
            None,
            "QUALIFIO scheme only"
        );

        // The publisher's trace goes on: same trace id and flags, a span id of our own.
        let (trace, span, flags) = traceparent_parts(header(&got, "traceparent")?)?;
        let (parent_trace, parent_span, parent_flags) = traceparent_parts(PARENT_TRACEPARENT)?;
        assert_eq!(trace, parent_trace);
        assert_ne!(span, parent_span);
        assert_eq!(flags, parent_flags);

        // Without a trace context: a fresh, valid trace.
        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&crm)]);
        assert_eq!(resp.request_id, "");
        let got = next(&receiver).await?;
        assert_eq!(body(&got)?, COMPLETED);
        let (fresh_trace, fresh_span, _) = traceparent_parts(header(&got, "traceparent")?)?;
        assert_ne!(fresh_trace, parent_trace);
        assert_ne!(fresh_span, span);

        // A malformed traceparent is not forwarded: a new trace starts.
        let resp = stack
            .publish_one(pb::PublishRequest {
                trace_context: Some(pb::TraceContext {
                    traceparent: "00-not-a-trace".into(),
                    tracestate: String::new(),
                }),
                ..request(ACCOUNT, COMPLETED)
            })
            .await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&crm)]);
        let got = next(&receiver).await?;
        let (garbage_trace, _, _) = traceparent_parts(header(&got, "traceparent")?)?;
        assert_ne!(garbage_trace, fresh_trace);
        assert_eq!(receiver.received_count(), 3);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 2. Standard Webhooks signatures, checked by the reference library.

/// The venv Python with the `standardwebhooks` package (`./dev test` installs it).
fn reference_python() -> anyhow::Result<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: the Standard Webhooks check runs the reference library. Install it \
         with `python3 -m venv .tools/venv && .tools/venv/bin/pip install {STANDARDWEBHOOKS_PIN}` \
         (./dev test does)",
        python.display()
    );
    Ok(python)
}

/// Verifies a webhook with `standardwebhooks.Webhook(key).verify(body, headers)`; the key is
/// the `whsec_` string as given, or (`raw`) the secret's UTF-8 bytes. `Ok(Ok(id))` when it
/// verified (the participation id of the parsed body), `Ok(Err(why))` when it refused.
async fn reference_verify(
    dir: &Path,
    got: &Received,
    secret: &str,
    raw: bool,
) -> anyhow::Result<Result<String, String>> {
    const SCRIPT: &str = r#"
import json, sys
try:
    from standardwebhooks import Webhook, WebhookVerificationError
except ImportError as e:
    print(f"the standardwebhooks package is not installed: {e}", file=sys.stderr)
    sys.exit(4)
headers_file, body_file, mode, secret = sys.argv[1:5]
headers = json.load(open(headers_file))
body = open(body_file, "rb").read()
key = secret.encode() if mode == "raw" else secret
try:
    doc = Webhook(key).verify(body, headers)
except WebhookVerificationError as e:
    print(f"REFUSED {e}")
    sys.exit(3)
print(f"VERIFIED {doc['id']}")
"#;
    let python = reference_python()?;
    let n = std::fs::read_dir(dir)?.count();
    let headers_file = dir.join(format!("headers-{n}.json"));
    let body_file = dir.join(format!("body-{n}.bin"));
    let headers: serde_json::Map<String, serde_json::Value> = got
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    std::fs::write(&headers_file, serde_json::to_vec(&headers)?)?;
    std::fs::write(&body_file, &got.body)?;
    let out = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&headers_file)
        .arg(&body_file)
        .arg(if raw { "raw" } else { "whsec" })
        .arg(secret)
        .output()
        .await
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    match out.status.code() {
        Some(0) => Ok(Ok(stdout
            .strip_prefix("VERIFIED ")
            .with_context(|| format!("unexpected output {stdout:?}"))?
            .to_owned())),
        Some(3) => Ok(Err(stdout)),
        _ => anyhow::bail!(
            "the reference verifier failed ({}): {stderr}{stdout}; install it with \
             `.tools/venv/bin/pip install {STANDARDWEBHOOKS_PIN}`",
            out.status
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks_signatures_verify_with_the_reference_library() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        // Over HTTPS this time, trusting the receiver's CA.
        let receiver = TestReceiver::https().await?;
        let stack = Stack::start_with(|c, dir| {
            c.webhook.extra_ca_file = Some(receiver.write_ca_file(dir)?);
            Ok(())
        })
        .await?;
        let standard = pb::SignatureScheme::StandardWebhooks as i32;
        let whsec = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "whsec",
                pb::Integration {
                    secret: WHSEC_OLD.into(),
                    signature_schemes: vec![standard],
                    ..integration("Whsec", &receiver.url("/whsec"))
                },
            )
            .await?;
        const PLAIN: &str = "plain-signing-secret";
        let plain = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "plain",
                pb::Integration {
                    secret: PLAIN.into(),
                    signature_schemes: vec![pb::SignatureScheme::Qualifio as i32, standard],
                    ..integration("Plain", &receiver.url("/plain"))
                },
            )
            .await?;
        stack.sync().await?;

        // Multi-byte characters: the signed content is the UTF-8 bytes.
        let mut doc = completed_doc("SW-1");
        doc["campaign"]["name"] = json!("Quiz d'hiver — café ✓ Zoë");
        let body = doc.to_string();
        assert!(body.len() > body.chars().count());
        let resp = stack.publish_one(request(ACCOUNT, &body)).await??;
        assert_eq!(
            by_integration(&resp).into_values().collect::<Vec<_>>(),
            vec![delivered_once(&plain), delivered_once(&whsec)]
        );

        let mut got: BTreeMap<String, Received> = BTreeMap::new();
        for _ in 0..2 {
            let r = next(&receiver).await?;
            got.insert(r.path.clone(), r);
        }
        let dir = tempfile::tempdir()?;
        let w = &got["/whsec"];
        assert_eq!(self::body(w)?, body);
        assert_eq!(header(w, "webhook-id")?, "SW-1_whsec");
        assert_eq!(
            w.header("x-qualifio-signature"),
            None,
            "STANDARD_WEBHOOKS only"
        );
        assert_eq!(
            reference_verify(dir.path(), w, WHSEC_OLD, false).await?,
            Ok("SW-1".to_owned())
        );
        let refused = reference_verify(dir.path(), w, WHSEC_NEW, false).await?;
        assert!(refused.is_err(), "another key must not verify: {refused:?}");

        // A plain secret's key is its UTF-8 bytes, which the library takes as bytes.
        let p = &got["/plain"];
        assert_eq!(header(p, "webhook-id")?, "SW-1_plain");
        assert_eq!(
            reference_verify(dir.path(), p, PLAIN, true).await?,
            Ok("SW-1".to_owned())
        );
        let refused = reference_verify(dir.path(), p, "plain-signing-secreT", true).await?;
        assert!(refused.is_err(), "another key must not verify: {refused:?}");
        assert!(signing::verify_qualifio(
            &Secret::new(PLAIN),
            body.as_bytes(),
            header(p, "x-qualifio-signature")?
        ));
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 3. Secret rotation: both secrets sign during the grace period.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_secret_signs_beside_the_previous_one() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        let rot = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "rot",
                pb::Integration {
                    secret: WHSEC_OLD.into(),
                    signature_schemes: vec![
                        pb::SignatureScheme::Qualifio as i32,
                        pb::SignatureScheme::StandardWebhooks as i32,
                    ],
                    ..integration("Rotating", &receiver.url("/rot"))
                },
            )
            .await?;
        stack.sync().await?;
        let (old, new) = (Secret::new(WHSEC_OLD), Secret::new(WHSEC_NEW));

        let first = participation("ROT-1", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &first)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&rot)]);
        let got = next(&receiver).await?;
        let ts: i64 = header(&got, "webhook-timestamp")?.parse()?;
        let sig = header(&got, "webhook-signature")?;
        assert_eq!(sig.split(' ').count(), 1, "{sig}");
        assert!(signing::verify_standard_webhooks(
            &old,
            "ROT-1_rot",
            ts,
            first.as_bytes(),
            sig
        ));

        let before = stack
            .admin()
            .get_integration(&rot)
            .await?
            .secret_fingerprint;
        let updated = stack
            .admin()
            .update_integration(
                pb::Integration {
                    name: rot.clone(),
                    secret: WHSEC_NEW.into(),
                    ..Default::default()
                },
                &["secret"],
            )
            .await?;
        assert_ne!(updated.secret_fingerprint, before);
        stack.sync().await?;

        let second = participation("ROT-2", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &second)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&rot)]);
        let got = next(&receiver).await?;
        let id = header(&got, "webhook-id")?;
        assert_eq!(id, "ROT-2_rot");
        let ts: i64 = header(&got, "webhook-timestamp")?.parse()?;
        let sig = header(&got, "webhook-signature")?;
        let sigs: Vec<&str> = sig.split(' ').collect();
        assert_eq!(sigs.len(), 2, "two signatures during the rotation: {sig}");
        assert!(sigs.iter().all(|s| s.starts_with("v1,")), "{sig}");
        // Newest first, each verifiable with exactly one of the secrets.
        let body = second.as_bytes();
        assert!(signing::verify_standard_webhooks(
            &new, id, ts, body, sigs[0]
        ));
        assert!(!signing::verify_standard_webhooks(
            &old, id, ts, body, sigs[0]
        ));
        assert!(signing::verify_standard_webhooks(
            &old, id, ts, body, sigs[1]
        ));
        assert!(!signing::verify_standard_webhooks(
            &new, id, ts, body, sigs[1]
        ));
        // The Qualifio header holds one value: the newest secret's.
        let qualifio = header(&got, "x-qualifio-signature")?;
        assert!(signing::verify_qualifio(&new, body, qualifio));
        assert!(!signing::verify_qualifio(&old, body, qualifio));
        // Receivers on either secret accept it, per the reference library too.
        let dir = tempfile::tempdir()?;
        for secret in [WHSEC_OLD, WHSEC_NEW] {
            assert_eq!(
                reference_verify(dir.path(), &got, secret, false).await?,
                Ok("ROT-2".to_owned()),
                "with {secret}"
            );
        }
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 4. Routing: what the worker delivers is what ResolvePushes answers.

/// One routing case: a participation and the integrations (ids) that must fire.
struct Case {
    id: &'static str,
    campaign: serde_json::Value,
    website: Option<serde_json::Value>,
    /// Whether the form holds responses (inferred identification).
    form_responses: bool,
    /// `identified` of the request, when given.
    identified: Option<bool>,
    master_form: &'static str,
    expected: &'static [&'static str],
}

impl Case {
    fn json(&self) -> String {
        let mut doc = completed_doc(self.id);
        doc["campaign"]["id"] = self.campaign.clone();
        match &self.website {
            Some(w) => doc["campaign"]["channel"]["website"]["id"] = w.clone(),
            None => {
                doc["campaign"]
                    .as_object_mut()
                    .expect("object")
                    .remove("channel");
            }
        }
        if !self.form_responses {
            doc["form"] = json!([]);
        }
        doc.to_string()
    }

    fn resolve_request(&self) -> pb::ResolvePushesRequest {
        let id = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        pb::ResolvePushesRequest {
            account: ACCOUNT.into(),
            website_id: self.website.as_ref().map(id).unwrap_or_default(),
            master_form_id: self.master_form.into(),
            campaign_id: id(&self.campaign),
            identified: Some(self.identified.unwrap_or(self.form_responses)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_matches_resolve_pushes_across_levels_actions_and_audiences() -> anyhow::Result<()>
{
    within("the test body", TEST_LIMIT, async {
        use pb::PushScopeLevel::{Account, Campaign, MasterForm, Website};
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        for id in ["site", "known", "unknown", "quiz", "form", "most"] {
            stack
                .admin()
                .create_integration(ACCOUNT, id, integration(id, &receiver.url(id)))
                .await?;
        }
        let off = pb::Integration {
            enabled: Some(false),
            ..integration("off", &receiver.url("off"))
        };
        stack
            .admin()
            .create_integration(ACCOUNT, "off", off)
            .await?;
        stack
            .admin()
            .create_routed(
                OTHER_ACCOUNT,
                "elsewhere",
                integration("x", &receiver.url("x")),
            )
            .await?;
        let audience = |s: pb::PushScope, a: pb::Audience| pb::PushScope {
            audience: a.into(),
            ..s
        };
        let exclude = |s: pb::PushScope| pb::PushScope {
            action: pb::PushAction::DoNotPush.into(),
            ..s
        };
        let n = |id| name(ACCOUNT, id);
        let scopes = [
            // Every campaign of website 5120 except campaign 99.
            ("site-5120", scope(&n("site"), Website, "5120")),
            ("site-not-99", exclude(scope(&n("site"), Campaign, "99"))),
            // Identified participants only / anonymous ones only.
            (
                "known",
                audience(scope(&n("known"), Account, ""), pb::Audience::Identified),
            ),
            (
                "unknown",
                audience(scope(&n("unknown"), Account, ""), pb::Audience::Anonymous),
            ),
            ("quiz", scope(&n("quiz"), Campaign, FIXTURE_CAMPAIGN)),
            ("form-77", scope(&n("form"), MasterForm, "77")),
            // Everything except website 6000, where campaign 555 is wanted anyway.
            ("most", scope(&n("most"), Account, "")),
            ("most-not-6000", exclude(scope(&n("most"), Website, "6000"))),
            ("most-555", scope(&n("most"), Campaign, "555")),
            ("off", scope(&n("off"), Account, "")),
        ];
        for (id, s) in scopes {
            stack.admin().create_scope(ACCOUNT, id, s).await?;
        }
        stack.sync().await?;

        let cases = [
            Case {
                id: "M1",
                campaign: json!(418207),
                website: Some(json!(5120)),
                form_responses: true,
                identified: None,
                master_form: "",
                expected: &["known", "most", "quiz", "site"],
            },
            Case {
                id: "M2",
                campaign: json!(99),
                website: Some(json!(5120)),
                form_responses: true,
                identified: None,
                master_form: "",
                expected: &["known", "most"],
            },
            Case {
                id: "M3",
                campaign: json!(1234),
                website: Some(json!(6000)),
                form_responses: false,
                identified: None,
                master_form: "",
                expected: &["unknown"],
            },
            Case {
                id: "M4",
                campaign: json!(555),
                website: Some(json!(6000)),
                form_responses: false,
                identified: None,
                master_form: "",
                expected: &["most", "unknown"],
            },
            // The request's `identified` overrides what the form suggests.
            Case {
                id: "M5",
                campaign: json!(1234),
                website: Some(json!(6000)),
                form_responses: false,
                identified: Some(true),
                master_form: "",
                expected: &["known"],
            },
            Case {
                id: "M6",
                campaign: json!(418207),
                website: None,
                form_responses: true,
                identified: Some(false),
                master_form: "",
                expected: &["most", "quiz", "unknown"],
            },
            Case {
                id: "M7",
                campaign: json!(1234),
                website: Some(json!(7000)),
                form_responses: false,
                identified: None,
                master_form: "77",
                expected: &["form", "most", "unknown"],
            },
            // Digit-only ids compare as numbers, wherever they come from.
            Case {
                id: "M8",
                campaign: json!(1234),
                website: Some(json!(7000)),
                form_responses: false,
                identified: None,
                master_form: "077",
                expected: &["form", "most", "unknown"],
            },
            Case {
                id: "M9",
                campaign: json!("0418207"),
                website: Some(json!("05120")),
                form_responses: true,
                identified: None,
                master_form: "",
                expected: &["known", "most", "quiz", "site"],
            },
        ];

        let mut stream = stack.open_stream().await?;
        for case in &cases {
            stream
                .send(pb::PublishRequest {
                    master_form_id: case.master_form.into(),
                    identified: case.identified,
                    request_id: case.id.into(),
                    ..request(ACCOUNT, &case.json())
                })
                .await?;
        }
        let responses = stream.responses(cases.len()).await?;

        let mut total = 0;
        for case in &cases {
            let resp = &responses[case.id];
            assert_eq!(resp.error, "", "{}", case.id);
            assert_eq!(resp.participation_id, case.id);
            let expected: BTreeSet<String> = case.expected.iter().map(|i| n(i)).collect();
            let resolved = stack.admin().resolve(case.resolve_request()).await?;
            assert_eq!(resolved, expected, "ResolvePushes for {}", case.id);
            assert_eq!(delivered(resp), expected, "deliveries of {}", case.id);
            assert_eq!(
                resp.deliveries,
                case.expected
                    .iter()
                    .map(|i| delivered_once(&n(i)))
                    .collect::<Vec<_>>(),
                "{}",
                case.id
            );
            total += expected.len();
        }

        // The receiver saw exactly those webhooks, each with the participation's bytes.
        let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for got in receiver.drain() {
            let (participation, integration) = webhook_parts(&got)?;
            assert_eq!(got.path, format!("/{integration}"));
            let case = cases
                .iter()
                .find(|c| c.id == participation)
                .with_context(|| format!("unexpected participation {participation}"))?;
            assert_eq!(body(&got)?, case.json());
            assert!(seen.entry(participation).or_default().insert(integration));
        }
        assert_eq!(receiver.received_count(), total);
        for case in &cases {
            let expected: BTreeSet<String> = case.expected.iter().map(|i| (*i).into()).collect();
            assert_eq!(
                seen.remove(case.id).unwrap_or_default(),
                expected,
                "{}",
                case.id
            );
        }
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 5. Incomplete participations: SKIP or SEND per integration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_participations_are_skipped_or_sent_per_policy() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let (skip_rx, send_rx) = (TestReceiver::http().await?, TestReceiver::http().await?);
        let skipper = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "skipper",
                integration("Skipper", &skip_rx.url("/")),
            )
            .await?;
        let sender = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "sender",
                pb::Integration {
                    incomplete_participations: pb::IncompleteParticipations::Send.into(),
                    ..integration("Sender", &send_rx.url("/"))
                },
            )
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, INCOMPLETE)).await??;
        assert_eq!(resp.participation_id, INCOMPLETE_ID);
        assert_eq!(resp.error, "");
        let outcomes = by_integration(&resp);
        assert_eq!(outcomes.len(), 2, "{resp:?}");
        let skipped = &outcomes[&skipper];
        assert_eq!(skipped.outcome(), pb::DeliveryOutcome::Skipped);
        assert_eq!((skipped.attempts, skipped.last_status_code), (0, 0));
        assert!(
            skipped.skip_reason.contains("STARTED") && skipped.skip_reason.contains("completed"),
            "{:?}",
            skipped.skip_reason
        );
        assert_eq!(outcomes[&sender], delivered_once(&sender));
        let got = next(&send_rx).await?;
        assert_eq!(body(&got)?, INCOMPLETE);
        assert_eq!(
            header(&got, "webhook-id")?,
            format!("{INCOMPLETE_ID}_sender")
        );
        assert_eq!(
            skip_rx.received_count(),
            0,
            "nothing sent for a SKIPPED delivery"
        );

        // Completed participations go to both.
        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        assert_eq!(
            resp.deliveries,
            vec![delivered_once(&sender), delivered_once(&skipper)]
        );
        assert_eq!(body(&next(&skip_rx).await?)?, COMPLETED);
        assert_eq!(body(&next(&send_rx).await?)?, COMPLETED);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 6. Retries.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_status_and_end_with_the_window() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        const SCHEDULE: usize = 50;
        let stack = Stack::start_with(|c, _| {
            // 100 ms (± 20 %) apart, within 450 ms: a few attempts, then the window ends it
            // long before the schedule does.
            c.delivery.retry_schedule = Schedule(vec![Duration::from_millis(100); SCHEDULE]);
            c.delivery.retry_window = Duration::from_millis(450);
            Ok(())
        })
        .await?;
        let flaky_rx = TestReceiver::http().await?;
        flaky_rx.respond_with(vec![Reply::status(500), Reply::status(500)]);
        let refusing_rx = TestReceiver::http().await?;
        refusing_rx.set_default(Reply::status(400).with_body("bad payload"));
        let down_rx = TestReceiver::http().await?;
        down_rx.set_default(Reply::status(503));
        let flaky = stack
            .admin()
            .create_routed(ACCOUNT, "flaky", integration("Flaky", &flaky_rx.url("/")))
            .await?;
        let refusing = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "refusing",
                integration("Refusing", &refusing_rx.url("/")),
            )
            .await?;
        let down = stack
            .admin()
            .create_routed(ACCOUNT, "down", integration("Down", &down_rx.url("/")))
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        let outcomes = by_integration(&resp);
        assert_eq!(outcomes.len(), 3, "{resp:?}");
        assert_eq!(
            outcomes[&flaky],
            pb::Delivery {
                attempts: 3,
                ..delivered_once(&flaky)
            }
        );
        assert_eq!(
            outcomes[&refusing],
            pb::Delivery {
                integration: refusing.clone(),
                outcome: pb::DeliveryOutcome::Failed.into(),
                attempts: 1,
                last_status_code: 400,
                last_error: "HTTP 400".into(),
                skip_reason: String::new(),
            },
            "a 400 is final"
        );
        let d = &outcomes[&down];
        assert_eq!(d.outcome(), pb::DeliveryOutcome::Failed);
        assert_eq!(
            (d.last_status_code, d.last_error.as_str()),
            (503, "HTTP 503")
        );
        assert!(
            (2..=6).contains(&d.attempts),
            "retried until the 450 ms window ended: {} attempts",
            d.attempts
        );

        // Every attempt reached the receiver, with the same webhook-id and body.
        assert_eq!(flaky_rx.received_count(), 3);
        assert_eq!(refusing_rx.received_count(), 1);
        assert_eq!(down_rx.received_count(), d.attempts as usize);
        for (rx, id) in [(&flaky_rx, "flaky"), (&down_rx, "down")] {
            for got in rx.drain() {
                assert_eq!(body(&got)?, COMPLETED);
                assert_eq!(
                    webhook_parts(&got)?,
                    (COMPLETED_ID.to_owned(), id.to_owned())
                );
            }
        }
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 7. 410 Gone disables the integration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_fails_and_disables_the_integration() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let gone_rx = TestReceiver::http().await?;
        gone_rx.set_default(Reply::status(410));
        let alive_rx = TestReceiver::http().await?;
        let gone = stack
            .admin()
            .create_routed(ACCOUNT, "gone", integration("Gone", &gone_rx.url("/")))
            .await?;
        let alive = stack
            .admin()
            .create_routed(ACCOUNT, "alive", integration("Alive", &alive_rx.url("/")))
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        let outcomes = by_integration(&resp);
        assert_eq!(outcomes[&alive], delivered_once(&alive));
        let g = &outcomes[&gone];
        assert_eq!(g.outcome(), pb::DeliveryOutcome::Failed);
        assert_eq!((g.attempts, g.last_status_code), (1, 410), "410 is final");
        assert!(g.last_error.contains("410"), "{:?}", g.last_error);

        // The worker disables it through the control plane.
        let disabled = eventually(&format!("{gone} disabled"), WAIT, || async {
            let i = stack.admin().get_integration(&gone).await?;
            Ok(if i.enabled == Some(false) {
                Poll::Ready(i)
            } else {
                Poll::not_yet(i)
            })
        })
        .await?;
        assert!(
            disabled.disabled_reason.contains("410"),
            "{:?}",
            disabled.disabled_reason
        );
        assert_eq!(
            stack.admin().get_integration(&alive).await?.enabled,
            Some(true),
            "only the integration that answered 410"
        );

        // From then on it is not routed to.
        stack.sync().await?;
        let placement = pb::ResolvePushesRequest {
            account: ACCOUNT.into(),
            website_id: FIXTURE_WEBSITE.into(),
            master_form_id: String::new(),
            campaign_id: FIXTURE_CAMPAIGN.into(),
            identified: Some(true),
        };
        assert_eq!(
            stack.admin().resolve(placement).await?,
            BTreeSet::from([alive.clone()])
        );
        let later = participation("AFTER-410", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &later)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&alive)]);
        assert_eq!(gone_rx.received_count(), 1);
        assert_eq!(alive_rx.received_count(), 2);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 8. Per-message errors keep the stream open.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_errors_and_the_stream_stays_open() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        let crm = stack
            .admin()
            .create_routed(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?;
        stack.sync().await?;

        let mut no_campaign_id = completed_doc("S-3");
        no_campaign_id["campaign"]
            .as_object_mut()
            .expect("object")
            .remove("id");
        let requests = [
            ("r1", ACCOUNT, completed_doc("S-1").to_string()),
            ("r2", ACCOUNT, r#"{"id": "S-2", "state": "#.to_owned()),
            ("r3", ACCOUNT, no_campaign_id.to_string()),
            ("r4", "acct/42", completed_doc("S-4").to_string()),
            ("r5", ACCOUNT, completed_doc("S-5").to_string()),
            ("r4m", ACCOUNT, completed_doc("S-4M").to_string()),
        ];
        let mut stream = stack.open_stream().await?;
        for (id, account, json) in &requests {
            stream
                .send(pb::PublishRequest {
                    request_id: (*id).into(),
                    master_form_id: if *id == "r4m" {
                        "form 7!".into()
                    } else {
                        String::new()
                    },
                    ..request(account, json)
                })
                .await?;
        }
        let responses = stream.responses(requests.len()).await?;

        for (id, participation) in [("r1", "S-1"), ("r5", "S-5")] {
            let r = &responses[id];
            assert_eq!(r.error, "", "{id}");
            assert_eq!(r.participation_id, participation);
            assert_eq!(r.deliveries, vec![delivered_once(&crm)]);
        }
        let rejected = |id: &str| {
            let r = &responses[id];
            assert_eq!(r.participation_id, "", "{id}");
            assert!(r.deliveries.is_empty(), "{id}");
            r.error.clone()
        };
        let e = rejected("r2");
        assert!(
            e.starts_with("participation_json: $: not valid JSON"),
            "{e}"
        );
        assert_eq!(rejected("r3"), "participation_json: $.campaign.id: missing");
        let e = rejected("r4m");
        assert!(e.starts_with("master_form_id: must be"), "{e}");
        let e = rejected("r4");
        assert!(
            e.starts_with(r#"account: invalid account "acct/42""#),
            "{e}"
        );

        // Still open: another participation goes through.
        stream
            .send(pb::PublishRequest {
                request_id: "r6".into(),
                ..request(ACCOUNT, &completed_doc("S-6").to_string())
            })
            .await?;
        let r6 = stream.responses(1).await?.remove("r6").context("r6")?;
        assert_eq!(r6.participation_id, "S-6");
        assert_eq!(r6.deliveries, vec![delivered_once(&crm)]);

        // Only the valid ones were sent.
        let sent: BTreeSet<String> = receiver
            .drain()
            .iter()
            .map(|g| webhook_parts(g).map(|(p, _)| p))
            .collect::<Result<_, _>>()?;
        assert_eq!(
            sent,
            BTreeSet::from(["S-1".into(), "S-5".into(), "S-6".into()])
        );
        assert_eq!(receiver.received_count(), 3);

        // Closing the publisher's side ends the stream cleanly.
        stream.close();
        let end = stream.next(WAIT).await?;
        assert!(matches!(end, Ok(None)), "{end:?}");
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 9. only_integrations.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_integrations_limits_a_republish() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let (first_rx, second_rx) = (TestReceiver::http().await?, TestReceiver::http().await?);
        let first = stack
            .admin()
            .create_routed(ACCOUNT, "first", integration("First", &first_rx.url("/")))
            .await?;
        let second = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "second",
                integration("Second", &second_rx.url("/")),
            )
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        assert_eq!(
            resp.deliveries,
            vec![delivered_once(&first), delivered_once(&second)]
        );
        let original = next(&second_rx).await?;

        let only = |names: Vec<String>| pb::PublishRequest {
            only_integrations: names,
            ..request(ACCOUNT, COMPLETED)
        };
        let resp = stack.publish_one(only(vec![second.clone()])).await??;
        assert_eq!(resp.participation_id, COMPLETED_ID);
        assert_eq!(resp.deliveries, vec![delivered_once(&second)]);
        let again = next(&second_rx).await?;
        assert_eq!(
            header(&again, "webhook-id")?,
            header(&original, "webhook-id")?,
            "the same webhook-id, for receivers to de-duplicate"
        );
        assert_eq!(first_rx.received_count(), 1);
        assert_eq!(second_rx.received_count(), 2);

        // An integration of another account is refused; nothing is sent.
        let resp = stack
            .publish_one(only(vec![name(OTHER_ACCOUNT, "first")]))
            .await??;
        assert_eq!(
            resp.error,
            "only_integrations[0]: not an integration of accounts/42"
        );
        assert_eq!(
            (resp.participation_id.as_str(), resp.deliveries.len()),
            ("", 0)
        );
        let resp = stack
            .publish_one(only(vec![second.clone(), "second".into()]))
            .await??;
        assert!(
            resp.error.starts_with("only_integrations[1]: invalid name"),
            "{}",
            resp.error
        );
        // A name that does not route: nothing to deliver, no error.
        let resp = stack
            .publish_one(only(vec![name(ACCOUNT, "nobody")]))
            .await??;
        assert_eq!((resp.error.as_str(), resp.deliveries.len()), ("", 0));
        assert_eq!(first_rx.received_count() + second_rx.received_count(), 3);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 10. The in-flight window of a stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_at_most_its_window_in_flight() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        const WINDOW: usize = 2;
        const MESSAGES: usize = 10;
        const REPLY_DELAY: Duration = Duration::from_millis(100);
        let stack = Stack::start_with(|c, _| {
            c.ingest.window = WINDOW as u32;
            // Hung attempts end after 2 s and are retried at once.
            c.webhook.request_timeout = Duration::from_secs(2);
            c.delivery.retry_schedule = Schedule(vec![Duration::from_millis(10); 3]);
            c.delivery.retry_window = Duration::from_secs(10);
            Ok(())
        })
        .await?;
        let receiver = TestReceiver::http().await?;
        receiver.set_default(Reply::hang());
        let slow = stack
            .admin()
            .create_routed(ACCOUNT, "slow", integration("Slow", &receiver.url("/")))
            .await?;
        stack.sync().await?;

        let mut stream = stack.open_stream().await?;
        let sender = stream.sender();
        let publisher = tokio::spawn(async move {
            for i in 0..MESSAGES {
                let json = participation(&format!("W-{i}"), 418207, Some(5120), true);
                let req = pb::PublishRequest {
                    request_id: format!("w{i}"),
                    ..request(ACCOUNT, &json)
                };
                if sender.send(req).await.is_err() {
                    break;
                }
            }
        });

        // Blocked replies: the window's worth arrives, and nothing more.
        let mut arrivals = vec![next(&receiver).await?, next(&receiver).await?];
        let third = receiver.next(Duration::from_millis(700)).await;
        assert!(
            third.is_none(),
            "a third request while {WINDOW} hang: {:?}",
            third.map(|r| r.header("webhook-id").map(str::to_owned))
        );
        assert_eq!(receiver.received_count(), WINDOW);

        // Unblocked (the hung attempts time out and are retried): all are acknowledged.
        receiver.set_default(Reply::ok().after(REPLY_DELAY));
        let responses = stream.responses(MESSAGES).await?;
        publisher.await?;
        let hung: BTreeSet<String> = arrivals
            .iter()
            .map(|g| webhook_parts(g).map(|(p, _)| p))
            .collect::<Result<_, _>>()?;
        for (id, resp) in &responses {
            let expected_attempts = if hung.contains(&resp.participation_id) {
                2
            } else {
                1
            };
            assert_eq!(
                resp.deliveries,
                vec![pb::Delivery {
                    attempts: expected_attempts,
                    ..delivered_once(&slow)
                }],
                "{id}"
            );
        }
        arrivals.extend(receiver.drain());
        assert_eq!(arrivals.len(), MESSAGES + WINDOW);
        assert_eq!(receiver.received_count(), MESSAGES + WINDOW);

        // Never more than WINDOW requests outstanding: each answer takes REPLY_DELAY (or the
        // request timeout), so of any three consecutive arrivals the third came at least
        // REPLY_DELAY after the first.
        arrivals.sort_by_key(|g| g.at);
        for w in arrivals.windows(WINDOW + 1) {
            let gap = w[WINDOW].at.duration_since(w[0].at);
            assert!(
                gap >= REPLY_DELAY,
                "{} requests in flight: {gap:?} between arrivals",
                WINDOW + 1
            );
        }
        stream.close();
        let end = stream.next(WAIT).await?;
        assert!(matches!(end, Ok(None)), "{end:?}");
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 11. Configuration changes apply to the next participation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_url_applies_to_the_next_participation() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let (old_rx, new_rx) = (TestReceiver::http().await?, TestReceiver::http().await?);
        let moving = stack
            .admin()
            .create_routed(ACCOUNT, "moving", integration("Moving", &old_rx.url("/v1")))
            .await?;
        stack.sync().await?;
        let p1 = participation("URL-1", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &p1)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&moving)]);
        assert_eq!(body(&next(&old_rx).await?)?, p1);

        stack
            .admin()
            .update_integration(
                pb::Integration {
                    name: moving.clone(),
                    url: new_rx.url("/v2"),
                    ..Default::default()
                },
                &["url"],
            )
            .await?;
        stack.sync().await?;
        let p2 = participation("URL-2", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &p2)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&moving)]);
        let got = next(&new_rx).await?;
        assert_eq!((got.path.as_str(), body(&got)?), ("/v2", p2.as_str()));
        assert_eq!(old_rx.received_count(), 1);
        assert_eq!(new_rx.received_count(), 1);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 12. Readiness, and accounts with nothing configured.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_integrations_is_acknowledged_with_no_delivery() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        stack
            .admin()
            .create_routed(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?;
        stack.sync().await?;
        let expected = pb::PublishResponse {
            participation_id: COMPLETED_ID.into(),
            error: String::new(),
            deliveries: Vec::new(),
            request_id: "u1".into(),
        };
        let req = pb::PublishRequest {
            request_id: "u1".into(),
            ..request("accounts/777", COMPLETED)
        };
        assert_eq!(stack.publish_one(req.clone()).await??, expected);
        let mut stream = stack.open_stream().await?;
        stream.send(req).await?;
        assert_eq!(stream.responses(1).await?.remove("u1"), Some(expected));
        assert_eq!(receiver.received_count(), 0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_participations_until_it_has_a_configuration() -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    within("the test body", TEST_LIMIT, async {
        let dir = tempfile::tempdir()?;
        // The control plane's port is taken now and served later: until then the worker gets
        // no snapshot.
        let cp_listeners = pushwire_control_plane::Listeners {
            grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        };
        let mut worker_config_ = pushwire_worker::Config::defaults();
        worker_config_.control_plane = format!("http://{}", cp_listeners.grpc.local_addr()?);
        worker_config_.control_plane_client.control_plane_token = Some(
            pushwire_common::domain::Secret::new(pushwire_tests::control_plane::TEST_WORKER_TOKEN),
        );
        worker_config_.access.admin_token = Some(pushwire_common::domain::Secret::new(
            pushwire_tests::control_plane::TEST_ADMIN_TOKEN,
        ));
        let worker_listeners = pushwire_worker::Listeners {
            grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        };
        let worker_addr = worker_listeners.grpc.local_addr()?;
        let worker_shutdown = CancellationToken::new();
        let worker = tokio::spawn(pushwire_worker::run(
            worker_config_,
            worker_listeners,
            worker_shutdown.clone(),
        ));
        let channel = tonic::transport::Channel::from_shared(format!("http://{worker_addr}"))?
            .connect()
            .await?;

        let health = HealthClient::new(channel.clone());
        let check = HealthCheckRequest {
            service: pushwire_tests::worker::INGEST_SERVICE.into(),
        };
        // The status is registered as the server starts; until then the service is unknown.
        let status = eventually("the ingest health status registered", WAIT, || {
            let (mut health, check) = (health.clone(), check.clone());
            async move {
                match health.check(check).await {
                    Ok(r) => Ok(Poll::Ready(r.into_inner().status)),
                    Err(s) if s.code() == Code::NotFound => Ok(Poll::not_yet(s)),
                    Err(s) => Err(s.into()),
                }
            }
        })
        .await?;
        assert_eq!(status, ServingStatus::NotServing as i32);
        let mut ingest = pb::ingest_service_client::IngestServiceClient::new(
            pushwire_tests::control_plane::as_admin(channel.clone()),
        );
        let refused = ingest
            .publish_one(request(ACCOUNT, COMPLETED))
            .await
            .expect_err("not ready");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains("no configuration"),
            "{refused:?}"
        );
        let refused = pushwire_tests::worker::PublishStream::open(ingest.clone())
            .await
            .expect_err("not ready");
        let status = refused
            .downcast_ref::<tonic::Status>()
            .with_context(|| format!("{refused:#}"))?;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");

        // The control plane comes up: the worker gets its snapshot and serves.
        let mut cp_config = worker_config(dir.path());
        cp_config.with_worker = false;
        let cp_shutdown = CancellationToken::new();
        let cp = tokio::spawn(pushwire_control_plane::run(
            cp_config,
            cp_listeners,
            cp_shutdown.clone(),
        ));
        wait_ingest_ready(&channel, Duration::from_secs(20)).await?;
        let resp = ingest
            .publish_one(request(ACCOUNT, COMPLETED))
            .await?
            .into_inner();
        assert_eq!(
            (resp.participation_id.as_str(), resp.error.as_str()),
            (COMPLETED_ID, "")
        );
        assert!(resp.deliveries.is_empty());

        worker_shutdown.cancel();
        cp_shutdown.cancel();
        worker.await??;
        cp.await??;
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 13. The size limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_document_gets_an_error_naming_the_limit() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        const LIMIT: usize = 2048;
        let stack = Stack::start_with(|c, _| {
            c.ingest.max_participation_bytes = LIMIT;
            Ok(())
        })
        .await?;
        let receiver = TestReceiver::http().await?;
        let crm = stack
            .admin()
            .create_routed(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?;
        stack.sync().await?;

        let mut big = completed_doc("BIG-1");
        big["padding"] = json!("x".repeat(4 * LIMIT));
        let big = big.to_string();
        let expected = format!(
            "participation_json: $: document is {} bytes, over the limit of {LIMIT} bytes",
            big.len()
        );
        let resp = stack.publish_one(request(ACCOUNT, &big)).await??;
        assert_eq!(resp.error, expected);
        assert!(resp.deliveries.is_empty());

        let mut stream = stack.open_stream().await?;
        for (id, json) in [("big", big.as_str()), ("small", COMPLETED)] {
            stream
                .send(pb::PublishRequest {
                    request_id: id.into(),
                    ..request(ACCOUNT, json)
                })
                .await?;
        }
        assert!(COMPLETED.len() <= LIMIT);
        let responses = stream.responses(2).await?;
        assert_eq!(responses["big"].error, expected);
        assert_eq!(responses["small"].deliveries, vec![delivered_once(&crm)]);
        assert_eq!(receiver.received_count(), 1);

        // Beyond the gRPC message limit (the document limit plus room for the envelope) a
        // request cannot even be decoded: PublishOne fails, and a stream acknowledges what it
        // holds, then ends with that status.
        let mut huge = completed_doc("HUGE-1");
        huge["padding"] = json!("x".repeat(100 * 1024));
        let huge = huge.to_string();
        let refused = stack
            .publish_one(request(ACCOUNT, &huge))
            .await?
            .expect_err("too large to decode");
        assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
        assert!(refused.message().contains("limit"), "{refused:?}");

        assert_eq!(body(&next(&receiver).await?)?, COMPLETED);
        receiver.set_default(Reply::ok().after(Duration::from_millis(300)));
        let held = participation("HELD-1", 418207, Some(5120), true);
        stream
            .send(pb::PublishRequest {
                request_id: "held".into(),
                ..request(ACCOUNT, &held)
            })
            .await?;
        assert_eq!(body(&next(&receiver).await?)?, held);
        stream
            .send(pb::PublishRequest {
                request_id: "huge".into(),
                ..request(ACCOUNT, &huge)
            })
            .await?;
        match stream.next(WAIT).await? {
            Ok(Some(r)) => {
                assert_eq!(r.request_id, "held");
                assert_eq!(r.deliveries, vec![delivered_once(&crm)]);
            }
            other => anyhow::bail!("expected the acknowledgement of HELD-1, got {other:?}"),
        }
        match stream.next(WAIT).await? {
            Err(status) => {
                assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
                assert!(status.message().contains("limit"), "{status:?}");
            }
            other => anyhow::bail!("expected OUT_OF_RANGE, got {other:?}"),
        }
        assert_eq!(receiver.received_count(), 2);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 14. Shutdown hands unacknowledged participations back.

/// Publishes one participation to an integration whose receiver answers `reply`, stops the
/// control plane once the first attempt arrived, and checks that the stream ends with
/// UNAVAILABLE, with no acknowledgement, within the shutdown grace.
async fn shutdown_while_delivering(
    reply: Reply,
    tweak: fn(&mut pushwire_control_plane::Config),
) -> anyhow::Result<()> {
    let stack = Stack::start_with(|c, _| {
        tweak(c);
        Ok(())
    })
    .await?;
    let grace = Duration::from_secs(2);
    assert_eq!(worker_config(stack.dir()).shutdown_grace, grace);
    let receiver = TestReceiver::http().await?;
    receiver.set_default(reply);
    stack
        .admin()
        .create_routed(ACCOUNT, "stuck", integration("Stuck", &receiver.url("/")))
        .await?;
    stack.sync().await?;

    let mut stream = stack.open_stream().await?;
    stream
        .send(pb::PublishRequest {
            request_id: "held".into(),
            ..request(ACCOUNT, COMPLETED)
        })
        .await?;
    next(&receiver).await?;

    let started = Instant::now();
    let stop = tokio::spawn(stack.stop());
    let end = stream.next(Duration::from_secs(20)).await?;
    let ended_after = started.elapsed();
    let status = match end {
        Err(status) => status,
        Ok(other) => anyhow::bail!("expected UNAVAILABLE and no acknowledgement, got {other:?}"),
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("re-publish"), "{status:?}");
    stop.await??;
    assert!(
        ended_after < grace + Duration::from_secs(1),
        "the stream ended {ended_after:?} after the stop, beyond the {grace:?} grace"
    );
    assert_eq!(receiver.received_count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_a_participation_waiting_for_a_retry() -> anyhow::Result<()> {
    within(
        "the test body",
        TEST_LIMIT,
        shutdown_while_delivering(Reply::status(503), |c| {
            // The retry would come long after the grace.
            c.delivery.retry_schedule = Schedule(vec![Duration::from_secs(30)]);
            c.delivery.retry_window = Duration::from_secs(60);
        }),
    )
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_interrupts_an_attempt_in_flight() -> anyhow::Result<()> {
    within(
        "the test body",
        TEST_LIMIT,
        shutdown_while_delivering(Reply::hang(), |c| {
            c.delivery.retry_window = Duration::from_secs(600);
        }),
    )
    .await?
}
