//! What one delivery carries: the published bytes, ids, trace context and signatures,
//! checked with the Standard Webhooks reference library, and secret rotation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::signing;
use pushwire_tests::admin::{integration, scope};
use pushwire_tests::eventually::within;
use pushwire_tests::receiver::{Received, TestReceiver};
use pushwire_tests::worker::{
    COMPLETED, COMPLETED_ID, FIXTURE_WEBSITE, Stack, by_integration, completed_doc, delivered_once,
    participation, request,
};
use serde_json::json;

use super::{
    ACCOUNT, AUTH_VALUE, PARENT_TRACEPARENT, QUALIFIO_SECRET, STANDARDWEBHOOKS_PIN, TEST_LIMIT,
    WHSEC_NEW, WHSEC_OLD, WHSEC_UNPADDED, body, header, next, traceparent_parts, unix_now,
};

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
        // Unpadded base64 after the prefix, which both official libraries accept.
        let unpadded = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "unpadded",
                pb::Integration {
                    secret: WHSEC_UNPADDED.into(),
                    signature_schemes: vec![pb::SignatureScheme::Qualifio as i32, standard],
                    ..integration("Unpadded", &receiver.url("/unpadded"))
                },
            )
            .await?;
        // A plain secret would sign what the libraries, given that secret, cannot verify:
        // refused, with the way to make a good one.
        const PLAIN: &str = "plain-signing-secret-of-24-bytes";
        let refused = stack
            .admin()
            .create_integration(
                ACCOUNT,
                "plain",
                pb::Integration {
                    secret: PLAIN.into(),
                    signature_schemes: vec![pb::SignatureScheme::Qualifio as i32, standard],
                    ..integration("Plain", &receiver.url("/plain"))
                },
            )
            .await
            .expect_err("a plain secret with STANDARD_WEBHOOKS");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("integration.secret")
                && refused.message().contains("takes a whsec_ secret")
                && refused.message().contains("head -c 32 /dev/urandom"),
            "{refused:?}"
        );
        assert!(!refused.message().contains(PLAIN), "{refused:?}");
        stack.sync().await?;

        // Multi-byte characters: the signed content is the UTF-8 bytes.
        let mut doc = completed_doc("SW-1");
        doc["campaign"]["name"] = json!("Quiz d'hiver — café ✓ Zoë");
        let body = doc.to_string();
        assert!(body.len() > body.chars().count());
        let resp = stack.publish_one(request(ACCOUNT, &body)).await??;
        assert_eq!(
            by_integration(&resp).into_values().collect::<Vec<_>>(),
            vec![delivered_once(&unpadded), delivered_once(&whsec)]
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

        // The unpadded secret, as given, in the library's normal use.
        let u = &got["/unpadded"];
        assert_eq!(header(u, "webhook-id")?, "SW-1_unpadded");
        assert_eq!(
            reference_verify(dir.path(), u, WHSEC_UNPADDED, false).await?,
            Ok("SW-1".to_owned())
        );
        let refused = reference_verify(dir.path(), u, WHSEC_OLD, false).await?;
        assert!(refused.is_err(), "another key must not verify: {refused:?}");
        assert!(signing::verify_qualifio(
            &Secret::new(WHSEC_UNPADDED),
            body.as_bytes(),
            header(u, "x-qualifio-signature")?
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
