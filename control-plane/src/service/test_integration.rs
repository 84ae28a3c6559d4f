//! `TestIntegration`'s rule: send the sample participation to an integration's endpoint, built,
//! signed and sent exactly as a worker's delivery would be (`pushwire_common::webhook`), and
//! report what came back without the integration's secrets. Disabled integrations are tested
//! too: checking an endpoint before enabling it is the point.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use pushwire_common::domain::{Integration, IntegrationName};
use pushwire_common::webhook::client::{AttemptError, HttpResponse, WebhookClient};
use pushwire_common::webhook::request::{self, SAMPLE_PARTICIPATION, SAMPLE_PARTICIPATION_ID};
use tracing::Instrument as _;

use super::{Catalog, Result};

/// Bytes of the response body `TestIntegration` returns.
const BODY_PREFIX_BYTES: usize = 4 * 1024;

/// Secret values shorter than this are not searched for in answers (a one-letter secret would
/// blank out every occurrence of that letter); validation allows them, they are weak anyway.
const MIN_REDACTED_LEN: usize = 8;

/// What replaces a secret value an endpoint echoed back.
const REDACTED: &str = "<redacted>";

/// What a test request ran into. An HTTP error status is an answer, not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestReport {
    /// The endpoint answered, whatever the status.
    Answered(TestAnswer),
    /// No answer; the message holds no header value, body or URL query/userinfo.
    NoAnswer(String),
}

/// An endpoint's answer to a test request, with the integration's secrets redacted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestAnswer {
    /// Status code.
    pub status: u16,
    /// Time from sending until the response headers arrived.
    pub latency: Duration,
    /// Headers by name (lower case); repeated headers joined with `, `.
    pub headers: HashMap<String, String>,
    /// The first 4 KiB of the body as text, without a character cut in two.
    pub body_prefix: String,
}

impl Catalog {
    /// Sends the sample participation to `name`'s endpoint with `client` and reports the
    /// answer. Fails only when the integration cannot be read.
    pub async fn test_integration(
        &self,
        name: &IntegrationName,
        client: &WebhookClient,
    ) -> Result<TestReport> {
        let integration = self.get_integration(name).await?;
        let span = tracing::info_span!("test_integration", integration = %name);
        let traceparent = test_traceparent(&span);
        let report = async {
            let req = request::build(
                &integration,
                SAMPLE_PARTICIPATION_ID,
                Bytes::from_static(SAMPLE_PARTICIPATION.as_bytes()),
                SystemTime::now(),
                Some(&traceparent),
            );
            let outcome = client.post(&req).await;
            match &outcome {
                Ok(r) => tracing::info!(
                    status = r.status,
                    latency_ms = r.latency.as_millis(),
                    "test webhook answered"
                ),
                Err(e) => tracing::info!(error.type = e.kind(), "test webhook got no answer"),
            }
            report(&integration, outcome)
        }
        .instrument(span)
        .await;
        Ok(report)
    }
}

/// The report of `outcome`. Secret values of `integration` echoed by the endpoint (an echo
/// service reflecting the auth header, say) are replaced by [`REDACTED`] in headers and body:
/// they are write-only.
/// The `traceparent` of the test webhook, like every delivery's: the test span's when traces
/// are exported (the receiver's spans join the caller's trace), else a new sampled trace.
fn test_traceparent(span: &tracing::Span) -> String {
    pushwire_common::server::telemetry::traceparent_of(span)
        .unwrap_or_else(|| pushwire_worker::trace::TraceParent::child_of(None).to_string())
}

fn report(integration: &Integration, outcome: Result<HttpResponse, AttemptError>) -> TestReport {
    let resp = match outcome {
        Ok(resp) => resp,
        // AttemptError messages hold no header value, body or URL query/userinfo.
        Err(e) => return TestReport::NoAnswer(e.to_string()),
    };
    let secrets: Vec<&str> = integration
        .auth_header
        .iter()
        .map(|h| h.value.expose())
        .chain(integration.secrets.iter().map(|s| s.secret.expose()))
        .filter(|s| s.len() >= MIN_REDACTED_LEN)
        .collect();
    let mut headers: HashMap<String, String> = HashMap::with_capacity(resp.headers.len());
    for (name, value) in resp.headers {
        let value = redact_str(value, &secrets);
        headers
            .entry(name)
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    let body = redact_bytes(resp.body_prefix, &secrets);
    TestReport::Answered(TestAnswer {
        status: resp.status,
        latency: resp.latency,
        headers,
        body_prefix: body_prefix(&body),
    })
}

/// The first [`BODY_PREFIX_BYTES`] of `body` as text (invalid UTF-8 replaced). A character
/// the cut goes through is left out rather than turned into a replacement character.
fn body_prefix(body: &[u8]) -> String {
    let mut prefix = &body[..body.len().min(BODY_PREFIX_BYTES)];
    if prefix.len() < body.len() {
        // Only a lead byte with too few continuation bytes after it, within the last 3 bytes,
        // is a character cut in two.
        for back in 1..=prefix.len().min(3) {
            let tail = &prefix[prefix.len() - back..];
            if let Err(e) = std::str::from_utf8(tail)
                && e.valid_up_to() == 0
                && e.error_len().is_none()
            {
                prefix = &prefix[..prefix.len() - back];
                break;
            }
        }
    }
    String::from_utf8_lossy(prefix).into_owned()
}

fn redact_str(value: String, secrets: &[&str]) -> String {
    if !secrets.iter().any(|s| value.contains(s)) {
        return value;
    }
    secrets
        .iter()
        .fold(value, |v, secret| v.replace(secret, REDACTED))
}

fn redact_bytes(mut body: Vec<u8>, secrets: &[&str]) -> Vec<u8> {
    for secret in secrets {
        let needle = secret.as_bytes();
        if !body.windows(needle.len()).any(|w| w == needle) {
            continue;
        }
        let mut out = Vec::with_capacity(body.len());
        let mut rest = body.as_slice();
        while !rest.is_empty() {
            if rest.starts_with(needle) {
                out.extend_from_slice(REDACTED.as_bytes());
                rest = &rest[needle.len()..];
            } else {
                out.push(rest[0]);
                rest = &rest[1..];
            }
        }
        body = out;
    }
    body
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use pushwire_common::domain::{
        AccountName, AuthHeader, IncompletePolicy, PayloadVariables, Secret, SignatureScheme,
        SigningSecret,
    };

    use super::*;

    fn integration() -> Integration {
        let account = AccountName::from_id("acme").unwrap();
        Integration {
            name: IntegrationName::new(&account, "crm").unwrap(),
            display_name: "CRM".into(),
            url: "https://hooks.example.com/in".into(),
            enabled: false,
            disabled_reason: String::new(),
            incomplete_participations: IncompletePolicy::Skip,
            payload_variables: PayloadVariables::AsPublished,
            auth_header: Some(AuthHeader {
                name: "Authorization".into(),
                value: Secret::new("Bearer auth-s3cret"),
            }),
            secrets: vec![
                SigningSecret {
                    secret: Secret::new("signing-s3cret"),
                    expire_time: None,
                },
                SigningSecret {
                    secret: Secret::new("short"),
                    expire_time: Some(UNIX_EPOCH),
                },
            ],
            signature_schemes: vec![SignatureScheme::Qualifio],
            create_time: UNIX_EPOCH,
            update_time: UNIX_EPOCH,
            revision: 1,
        }
    }

    fn answer(headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        HttpResponse {
            status: 410,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body_prefix: body.to_vec(),
            latency: Duration::from_micros(12_345),
        }
    }

    fn answered(report: TestReport) -> TestAnswer {
        match report {
            TestReport::Answered(a) => a,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn answers_are_reported_whatever_the_status() {
        let a = answered(report(
            &integration(),
            Ok(answer(
                &[("set-cookie", "a=1"), ("x-one", "1"), ("set-cookie", "b=2")],
                b"gone",
            )),
        ));
        assert_eq!(a.status, 410);
        assert_eq!(a.latency, Duration::from_micros(12_345));
        assert_eq!(a.body_prefix, "gone");
        assert_eq!(a.headers.len(), 2);
        assert_eq!(a.headers["set-cookie"], "a=1, b=2");
        assert_eq!(a.headers["x-one"], "1");
    }

    #[test]
    fn no_answer_is_reported_with_its_reason() {
        assert_eq!(
            report(&integration(), Err(AttemptError::Timeout)),
            TestReport::NoAnswer("timed out".into())
        );
    }

    #[test]
    fn body_is_cut_at_4_kib_without_splitting_a_character() {
        let ascii = vec![b'a'; 10 * 1024];
        assert_eq!(body_prefix(&ascii), "a".repeat(4096));
        assert_eq!(body_prefix(b"short"), "short");
        // "é" is 2 bytes, "€" 3, "😀" 4: each straddling the cut in every possible place.
        for ch in ["é", "€", "😀"] {
            for before in 4096 - ch.len() + 1..4096 {
                let body = format!("{}{ch}tail", "a".repeat(before));
                let prefix = body_prefix(body.as_bytes());
                assert_eq!(prefix, "a".repeat(before), "{ch} at {before}");
            }
            let fits = format!("{}{ch}tail", "a".repeat(4096 - ch.len()));
            assert!(body_prefix(fits.as_bytes()).ends_with(ch));
        }
        // Invalid bytes are replaced, not dropped, and an uncut body is shown as it is.
        assert_eq!(body_prefix(b"a\xffb\xc3"), "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn echoed_secrets_are_redacted() {
        let a = answered(report(
            &integration(),
            Ok(answer(
                &[
                    ("x-echo-auth", "Bearer auth-s3cret"),
                    ("x-echo-auth", "signing-s3cret"),
                ],
                b"got Bearer auth-s3cret and signing-s3cret; short stays",
            )),
        ));
        assert_eq!(a.headers["x-echo-auth"], "<redacted>, <redacted>");
        assert_eq!(a.body_prefix, "got <redacted> and <redacted>; short stays");
    }
}
