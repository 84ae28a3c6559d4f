//! `TestIntegration`'s rule: send the sample participation to an integration's endpoint, built,
//! signed and sent exactly as a worker's delivery would be (`pushwire_common::webhook`), and
//! report what came back without the integration's secrets. Disabled integrations are tested
//! too: checking an endpoint before enabling it is the point.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rand::RngCore as _;

use bytes::Bytes;
use pushwire_common::domain::{Integration, IntegrationName};
use pushwire_common::webhook::client::{AttemptError, HttpResponse, WebhookClient};
use pushwire_common::webhook::request::{self, SAMPLE_PARTICIPATION, SAMPLE_PARTICIPATION_ID};
use tracing::Instrument as _;

use super::{Catalog, Result};

/// Bytes of the response body `TestIntegration` returns.
const BODY_PREFIX_BYTES: usize = 4 * 1024;

/// What replaces a body or header value that holds a stored credential in some form.
const WITHHELD: &str = "<withheld: it held a stored credential>";

/// Credentials shorter than this are searched for whole only, not by their halves (a 2-letter
/// half would match any text).
const MIN_SPLIT_LEN: usize = 8;

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
        let integration = self.get_integration(name).await?.value;
        let span = tracing::info_span!("test_integration", integration = %name);
        let traceparent = test_traceparent(&span);
        let report = async {
            let (id, body) = fresh_sample();
            let req = request::build(
                &integration,
                &id,
                body,
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

/// The sample participation under a fresh random id (the form of Qualifio's, an upper-case
/// UUID), so that its `webhook-id` is never that of a real participation: a receiver that
/// de-duplicates on it must not drop the next real one.
fn fresh_sample() -> (String, Bytes) {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex = hex_upper(&b);
    let id = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    let body = SAMPLE_PARTICIPATION.replacen(SAMPLE_PARTICIPATION_ID, &id, 1);
    (id, Bytes::from(body))
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The `traceparent` of the test webhook, like every delivery's: the test span's when traces
/// are exported (the receiver's spans join the caller's trace), else a new sampled trace.
fn test_traceparent(span: &tracing::Span) -> String {
    pushwire_common::server::telemetry::traceparent_of(span).unwrap_or_else(|| {
        pushwire_common::webhook::traceparent::TraceParent::child_of(None).to_string()
    })
}

/// The report of `outcome`. The endpoint was sent the auth header value and may echo it back
/// (an echo service, a debugging page), in any encoding; stored credentials are write-only,
/// so a header value or a body that holds one of them in a form [`Needles`] recognises is
/// withheld whole ([`WITHHELD`]) rather than redacted in place.
fn report(integration: &Integration, outcome: Result<HttpResponse, AttemptError>) -> TestReport {
    let resp = match outcome {
        Ok(resp) => resp,
        // AttemptError messages hold no header value, body or URL query/userinfo.
        Err(e) => return TestReport::NoAnswer(e.to_string()),
    };
    let needles = Needles::of(integration);
    let mut headers: HashMap<String, String> = HashMap::with_capacity(resp.headers.len());
    for (name, value) in resp.headers {
        let value = match needles.found_in(value.as_bytes()) {
            true => WITHHELD.to_owned(),
            false => value,
        };
        headers
            .entry(name)
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    // What is shown, and as much again: a credential across the cut shows a piece of itself.
    let scanned = &resp.body_prefix[..resp.body_prefix.len().min(2 * BODY_PREFIX_BYTES)];
    let body_prefix = match needles.found_in(scanned) {
        true => WITHHELD.to_owned(),
        false => body_prefix(&resp.body_prefix),
    };
    TestReport::Answered(TestAnswer {
        status: resp.status,
        latency: resp.latency,
        headers,
        body_prefix,
    })
}

/// What betrays a stored credential in an answer: each credential (the auth header value, its
/// token without the scheme word, every signing secret and the key of a `whsec_` one), lower
/// case, and, for those of [`MIN_SPLIT_LEN`] or more but the whole `Scheme token` value, every
/// piece of half its length: a value cut in two leaves one half at least that long. Searched for in the answer as it is and
/// decoded (JSON string escapes, percent-encoding, base64 and hex runs, twice over), all lower
/// case, which covers the escaped, encoded, case-changed and split echoes.
/// By length, for one pass over a text per length.
struct Needles(BTreeMap<usize, HashSet<Vec<u8>>>);

impl Needles {
    fn of(integration: &Integration) -> Self {
        // (credential, whether its halves are searched for too)
        let mut credentials: Vec<(Vec<u8>, bool)> = Vec::new();
        if let Some(h) = &integration.auth_header {
            let value = h.value.expose();
            match value.split_once(' ') {
                // `Bearer <token>`: the halves of the token, not of `Bearer t…`, which any
                // "Bearer authentication required" would match.
                Some((_, token)) => {
                    credentials.push((value.as_bytes().to_vec(), false));
                    credentials.push((token.trim().as_bytes().to_vec(), true));
                }
                None => credentials.push((value.as_bytes().to_vec(), true)),
            }
        }
        for s in &integration.secrets {
            let secret = s.secret.expose();
            credentials.push((secret.as_bytes().to_vec(), true));
            if secret.starts_with("whsec_") {
                let key = pushwire_common::webhook::signing::standard_webhooks_key(&s.secret);
                credentials.push((key, true));
            }
        }
        let mut needles: BTreeMap<usize, HashSet<Vec<u8>>> = BTreeMap::new();
        for (c, halves) in credentials.into_iter().filter(|(c, _)| !c.is_empty()) {
            let c = c.to_ascii_lowercase();
            if halves && c.len() >= MIN_SPLIT_LEN {
                let half = c.len().div_ceil(2);
                let set = needles.entry(half).or_default();
                set.extend(c.windows(half).map(<[u8]>::to_vec));
            }
            needles.entry(c.len()).or_default().insert(c);
        }
        Self(needles)
    }

    /// Whether `text`, as it is or decoded, holds any needle.
    fn found_in(&self, text: &[u8]) -> bool {
        if self.0.is_empty() || text.is_empty() {
            return false;
        }
        let mut views = vec![text.to_vec()];
        for _ in 0..2 {
            let decoded: Vec<Vec<u8>> = views.iter().flat_map(|v| decodings(v)).collect();
            views.extend(decoded);
        }
        views.iter().any(|view| {
            let view = view.to_ascii_lowercase();
            self.0
                .iter()
                .any(|(len, set)| view.windows(*len).any(|w| set.contains(w)))
        })
    }
}

/// `text` decoded every way an echo may have encoded it (the runs of each decoding joined by a
/// NUL, which no needle holds).
fn decodings(text: &[u8]) -> [Vec<u8>; 4] {
    [
        json_unescape(text),
        percent_decode(text),
        runs(
            text,
            |b| b.is_ascii_alphanumeric() || b"+/-_".contains(&b),
            |run| {
                // Every alignment: the encoded value may start anywhere in the run.
                let mut out = Vec::new();
                for skip in 0..4.min(run.len()) {
                    let run = &run[skip..];
                    let run = &run[..run.len() - usize::from(run.len() % 4 == 1)];
                    let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(run)
                        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(run));
                    if let Ok(bytes) = decoded {
                        out.extend_from_slice(&bytes);
                        out.push(0);
                    }
                }
                Some(out)
            },
        ),
        runs(
            text,
            |b| b.is_ascii_hexdigit(),
            |run| hex::decode(&run[..run.len() & !1]).ok(),
        ),
    ]
}

/// The decodings by `decode` of the maximal runs of bytes that `member` accepts, 8 bytes or
/// longer, joined by NUL.
fn runs(
    text: &[u8],
    member: impl Fn(u8) -> bool,
    decode: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for run in text.split(|&b| !member(b)).filter(|r| r.len() >= 8) {
        if let Some(bytes) = decode(run) {
            out.extend_from_slice(&bytes);
            out.push(0);
        }
    }
    out
}

/// JSON string escapes undone (`\"`, `\\`, `\/`, `\n` and the like, `\uXXXX` with surrogate
/// pairs); anything else kept as it is.
fn json_unescape(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    let hex4 = |at: usize| {
        text.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    while i < text.len() {
        if text[i] != b'\\' || i + 1 >= text.len() {
            out.push(text[i]);
            i += 1;
            continue;
        }
        let simple = match text[i + 1] {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(8),
            b'f' => Some(12),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            i += 2;
            continue;
        }
        match (text[i + 1], hex4(i + 2)) {
            (b'u', Some(hi)) => {
                let pair = (0xD800..0xDC00).contains(&hi)
                    && text.get(i + 6..i + 8) == Some(b"\\u".as_slice());
                let (c, len) = match (pair, hex4(i + 8)) {
                    (true, Some(lo)) if (0xDC00..0xE000).contains(&lo) => (
                        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)),
                        12,
                    ),
                    _ => (char::from_u32(hi), 6),
                };
                let c = c.unwrap_or(char::REPLACEMENT_CHARACTER);
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                i += len;
            }
            _ => {
                out.push(text[i]);
                i += 1;
            }
        }
    }
    out
}

/// Percent-encoding (and `+` for a space) undone; a `%` not followed by two hex digits kept.
fn percent_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'%' => match text
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
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
    fn echoed_secrets_are_withheld() {
        let a = answered(report(
            &integration(),
            Ok(answer(
                &[
                    ("x-echo-auth", "Bearer auth-s3cret"),
                    ("x-echo-auth", "signing-s3cret"),
                    ("x-fine", "nothing to hide"),
                ],
                b"got Bearer auth-s3cret and signing-s3cret",
            )),
        ));
        assert_eq!(a.headers["x-echo-auth"], format!("{WITHHELD}, {WITHHELD}"));
        assert_eq!(a.headers["x-fine"], "nothing to hide");
        assert_eq!(a.body_prefix, WITHHELD);
    }

    /// Every way a receiver echoed the auth header value in the outside check, and a few more.
    #[test]
    fn echoed_secrets_are_withheld_in_any_encoding() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let auth = "Bearer auth-s3cret";
        let json_escaped: String = auth
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        let forms = [
            format!(r#"{{"headers":{{"Authorization":"{json_escaped}"}}}}"#),
            r#"{"auth":"Bearer auth\u002ds3cret"}"#.to_owned(),
            r#"{"auth":"Bearer\/auth-s3cret"}"#.to_owned(),
            "authorization=Bearer%20auth%2Ds3cret".to_owned(),
            "authorization=Bearer+auth-s3cret".to_owned(),
            format!("echo: {}", STANDARD.encode(auth)),
            format!("echo={}", URL_SAFE_NO_PAD.encode(auth)),
            format!("token:{}", STANDARD.encode("auth-s3cret")),
            format!("hex {}", hex::encode(auth)),
            auth.to_uppercase(),
            "first half: Bearer auth- ... second half: s3cret".to_owned(),
            "[\"Bearer a\", \"uth-s3cret\"]".to_owned(),
            format!(
                "b64 of the json: {}",
                STANDARD.encode(format!(r#"{{"a":"{auth}"}}"#))
            ),
            format!(
                "url-encoded base64: {}",
                STANDARD
                    .encode(auth)
                    .replace('=', "%3D")
                    .replace('+', "%2B")
            ),
            // The signing secret, which the receiver should not even know.
            "SIGNING-S3CRET".to_owned(),
            STANDARD.encode("signing-s3cret"),
        ];
        for form in forms {
            let a = answered(report(
                &integration(),
                Ok(answer(&[("x-echo", &form)], form.as_bytes())),
            ));
            assert_eq!(a.body_prefix, WITHHELD, "{form}");
            assert_eq!(a.headers["x-echo"], WITHHELD, "{form}");
        }
    }

    #[test]
    fn answers_without_credentials_are_shown() {
        for body in [
            "thanks, got it",
            r#"{"error":"invalid bearer token","hint":"Bearer auth required"}"#,
            "401: Bearer authentication required",
            "aGVsbG8gd29ybGQsIG5vdGhpbmcgaGVyZQ==",
        ] {
            let a = answered(report(&integration(), Ok(answer(&[], body.as_bytes()))));
            assert_eq!(a.body_prefix, body);
        }
    }

    #[test]
    fn each_test_sends_a_fresh_participation_id() {
        let (a, body_a) = fresh_sample();
        let (b, _) = fresh_sample();
        assert_ne!(a, b);
        assert_ne!(a, SAMPLE_PARTICIPATION_ID);
        assert_eq!(a.len(), SAMPLE_PARTICIPATION_ID.len());
        assert_eq!(a, a.to_uppercase());
        let p = pushwire_common::participation::parse(
            std::str::from_utf8(&body_a).unwrap(),
            pushwire_common::participation::DEFAULT_MAX_BYTES,
        )
        .unwrap();
        assert_eq!(p.id, a);
    }
}
