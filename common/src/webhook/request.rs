//! One webhook attempt's request (DESIGN §4): URL, headers (ids, timestamp, signatures, the
//! integration's auth header, `traceparent`) and the body: exactly as published, or with the
//! `variables` object the integration asks for ([`crate::payload`]). Pure: the clock
//! is passed in and nothing is sent; sending is the [`client`](super::client)'s job. Signing
//! rules live in [`signing`]; this module only picks the secrets.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::signing;
use crate::domain::{Integration, PayloadVariables, SignatureScheme};
use crate::payload;

/// `User-Agent` of every webhook.
pub const USER_AGENT: &str = concat!("Pushwire/", env!("CARGO_PKG_VERSION"));

/// Header carrying `{participation id}_{integration id}`, stable across retries.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Header carrying the attempt's unix time in seconds.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Standard Webhooks signature header.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Qualifio signature header.
pub const X_QUALIFIO_SIGNATURE: &str = "x-qualifio-signature";
/// W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// Headers whose values are harmless to print; every other value (auth header, signatures,
/// anything added later) is redacted by [`WebhookRequest`]'s `Debug`.
const PRINTABLE: &[&str] = &[
    "content-type",
    "user-agent",
    WEBHOOK_ID,
    WEBHOOK_TIMESTAMP,
    TRACEPARENT,
];

/// Names an integration's auth header may not take: the ones set here (so a customer cannot
/// replace a signature) and the ones that frame the HTTP message.
const RESERVED: &[&str] = &[
    "content-type",
    "user-agent",
    WEBHOOK_ID,
    WEBHOOK_TIMESTAMP,
    WEBHOOK_SIGNATURE,
    X_QUALIFIO_SIGNATURE,
    TRACEPARENT,
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

/// A realistic completed Qualifio v2 participation, sent by `TestIntegration`.
pub const SAMPLE_PARTICIPATION: &str = include_str!("sample-participation.json");

/// The `id` of [`SAMPLE_PARTICIPATION`].
pub const SAMPLE_PARTICIPATION_ID: &str = "9C2F61A0-3B7E-4D15-A8C2-5E0B7D41F3A9";

/// One attempt's request, ready to send.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    /// The integration's endpoint.
    pub url: String,
    /// Header names (lower case) and values, in sending order.
    pub headers: Vec<(String, String)>,
    /// The body sent (and signed): as published, or with the `variables` object added.
    pub body: Bytes,
}

impl WebhookRequest {
    /// The value of the first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Debug for WebhookRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Headers<'a>(&'a [(String, String)]);
        impl fmt::Debug for Headers<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut map = f.debug_map();
                for (name, value) in self.0 {
                    if is_printable_header(name) {
                        map.entry(name, value);
                    } else {
                        map.entry(name, &format_args!("<redacted>"));
                    }
                }
                map.finish()
            }
        }
        f.debug_struct("WebhookRequest")
            .field("url", &format_args!("{}", redacted_url(&self.url)))
            .field("headers", &Headers(&self.headers))
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Whether a header's value may be printed or indexed: true only for the headers this module
/// sets that carry no secret (never for the auth header or signatures).
pub(crate) fn is_printable_header(name: &str) -> bool {
    PRINTABLE.iter().any(|p| name.eq_ignore_ascii_case(p))
}

/// The URL without credentials or query (either may carry a receiver's token).
pub fn redacted_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return "<invalid url>".to_owned();
    };
    let had_query = url.query().is_some();
    // Both only fail for URLs that cannot have credentials, which then have none to hide.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let mut out = url[..url::Position::AfterPath].to_owned();
    if had_query {
        out.push_str("?<redacted>");
    }
    out
}

/// W3C `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// Adds the publisher's `tracestate` to `req`, as the W3C Trace Context asks of a participant
/// that continues a trace: forwarded as received, when it is a header value the specification
/// allows (at most 512 characters of printable ASCII; otherwise dropped, never repaired).
pub fn add_tracestate(req: &mut WebhookRequest, tracestate: &str) {
    let tracestate = tracestate.trim();
    if !tracestate.is_empty()
        && tracestate.len() <= 512
        && tracestate.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        req.headers
            .push((TRACESTATE.to_owned(), tracestate.to_owned()));
    }
}

/// The host and port `raw` is sent to (the scheme's port when none is written), for the
/// `server.address` and `server.port` attributes of an attempt's span; `("", 0)` for a URL that
/// does not parse.
pub fn server_of(raw: &str) -> (String, u16) {
    url::Url::parse(raw)
        .ok()
        .map(|u| {
            let host = u.host_str().unwrap_or_default();
            // An IPv6 literal without its brackets, as the convention writes it.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            (host, u.port_or_known_default().unwrap_or(0))
        })
        .unwrap_or_default()
}

/// Builds the request of one attempt of `body` (participation `participation_id`) to
/// `integration` at `now`.
///
/// - the body is `body`, or, when the integration asks for `PAYLOAD_VARIABLES_ADD`, `body` with
///   the `variables` object added (see [`payload::add_variables`]; parsed here, so only those
///   integrations pay for it); signatures cover the body sent;
/// - `x-qualifio-signature` with the newest secret valid at `now`, when the integration uses
///   the Qualifio scheme and has one;
/// - `webhook-signature` with every secret valid at `now` (newest first), when it uses
///   Standard Webhooks and has any;
/// - the auth header unless its name is one this function sets or one that frames the
///   message (the control plane refuses those; skipping keeps signatures unspoofable).
pub fn build(
    integration: &Integration,
    participation_id: &str,
    body: Bytes,
    now: SystemTime,
    traceparent: Option<&str>,
) -> WebhookRequest {
    let body = match integration.payload_variables {
        PayloadVariables::AsPublished => body,
        PayloadVariables::Add => with_variables(integration, participation_id, body),
    };
    let msg_id = signing::webhook_id(participation_id, integration.name.id());
    // A clock before 1970 is not worth a panic; receivers will refuse the timestamp.
    let timestamp = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);

    let mut headers = Vec::with_capacity(8);
    headers.push(("content-type".to_owned(), "application/json".to_owned()));
    headers.push(("user-agent".to_owned(), USER_AGENT.to_owned()));
    headers.push((WEBHOOK_ID.to_owned(), msg_id.clone()));
    headers.push((WEBHOOK_TIMESTAMP.to_owned(), timestamp.to_string()));

    let schemes = &integration.signature_schemes;
    if schemes.contains(&SignatureScheme::Qualifio)
        && let Some(newest) = integration.valid_secrets(now).next()
    {
        headers.push((
            X_QUALIFIO_SIGNATURE.to_owned(),
            signing::qualifio_signature(newest, &body),
        ));
    }
    if schemes.contains(&SignatureScheme::StandardWebhooks) {
        let signature = signing::standard_webhooks_signature(
            integration.valid_secrets(now),
            &msg_id,
            timestamp,
            &body,
        );
        if !signature.is_empty() {
            headers.push((WEBHOOK_SIGNATURE.to_owned(), signature));
        }
    }
    if let Some(auth) = &integration.auth_header {
        let name = auth.name.to_ascii_lowercase();
        if !RESERVED.contains(&name.as_str()) {
            headers.push((name, auth.value.expose().to_owned()));
        }
    }
    if let Some(tp) = traceparent {
        headers.push((TRACEPARENT.to_owned(), tp.to_owned()));
    }

    WebhookRequest {
        url: integration.url.clone(),
        headers,
        body,
    }
}

/// `body` with the `variables` object added, or `body` itself when nothing is to be added or
/// it is not a JSON document (impossible for a published one: it was validated). Names set more
/// than once are reported as a warning event in the current span (the delivery's, where the
/// caller has one): a configuration problem of the campaign. Names only, never values.
fn with_variables(integration: &Integration, participation_id: &str, body: Bytes) -> Bytes {
    let Ok(raw) = std::str::from_utf8(&body) else {
        return body;
    };
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(raw) else {
        return body;
    };
    let Some(added) = payload::add_variables(raw, &doc) else {
        return body;
    };
    if !added.duplicates.is_empty() {
        tracing::warn!(
            integration = %integration.name,
            participation = participation_id,
            variables.duplicates = ?added.duplicates,
            "mapping variables named more than once; each one's first value is sent"
        );
    }
    Bytes::from(added.body)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::domain::{
        AccountName, AuthHeader, IncompletePolicy, IntegrationName, PayloadVariables, Secret,
        SigningSecret,
    };

    use super::*;

    const NOW_SECS: u64 = 1_795_597_200;
    const BODY: &[u8] = br#"{"id":"P1","state":"COMPLETED"}"#;
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn integration(schemes: &[SignatureScheme], secrets: Vec<SigningSecret>) -> Integration {
        let account = AccountName::from_id("acme").unwrap();
        Integration {
            name: IntegrationName::new(&account, "crm-sync").unwrap(),
            display_name: "CRM sync".into(),
            url: "https://hooks.example.com/in?token=q-s3cret".into(),
            enabled: true,
            disabled_reason: String::new(),
            incomplete_participations: IncompletePolicy::Skip,
            payload_variables: PayloadVariables::AsPublished,
            auth_header: Some(AuthHeader {
                name: "Authorization".into(),
                value: Secret::new("Bearer auth-s3cret"),
            }),
            secrets,
            signature_schemes: schemes.to_vec(),
            create_time: now(),
            update_time: now(),
            revision: 1,
        }
    }

    fn current(s: &str) -> SigningSecret {
        SigningSecret {
            secret: Secret::new(s),
            expire_time: None,
        }
    }

    fn previous(s: &str, expires_in_secs: i64) -> SigningSecret {
        let expire = if expires_in_secs >= 0 {
            now() + Duration::from_secs(expires_in_secs.unsigned_abs())
        } else {
            now() - Duration::from_secs(expires_in_secs.unsigned_abs())
        };
        SigningSecret {
            secret: Secret::new(s),
            expire_time: Some(expire),
        }
    }

    fn names(req: &WebhookRequest) -> Vec<&str> {
        req.headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn common_headers_and_body() {
        let i = integration(&[SignatureScheme::Qualifio], vec![current("new-secret")]);
        let req = build(&i, "P1", Bytes::from_static(BODY), now(), Some(TP));
        assert_eq!(req.url, "https://hooks.example.com/in?token=q-s3cret");
        assert_eq!(req.body, BODY);
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(
            req.header("user-agent"),
            Some(concat!("Pushwire/", env!("CARGO_PKG_VERSION")))
        );
        assert_eq!(req.header(WEBHOOK_ID), Some("P1_crm-sync"));
        assert_eq!(req.header(WEBHOOK_TIMESTAMP), Some("1795597200"));
        assert_eq!(req.header("authorization"), Some("Bearer auth-s3cret"));
        assert_eq!(req.header(TRACEPARENT), Some(TP));
        let without_tp = build(&i, "P1", Bytes::from_static(BODY), now(), None);
        assert_eq!(without_tp.header(TRACEPARENT), None);
    }

    #[test]
    fn signature_headers_per_scheme_and_secret_state() {
        use SignatureScheme::{Qualifio, StandardWebhooks};
        let cases: &[(&[SignatureScheme], Vec<SigningSecret>, bool, bool)] = &[
            (&[Qualifio], vec![current("a")], true, false),
            (&[StandardWebhooks], vec![current("a")], false, true),
            (
                &[Qualifio, StandardWebhooks],
                vec![current("a")],
                true,
                true,
            ),
            (&[Qualifio, StandardWebhooks], vec![], false, false),
            // Only an expired secret left: nothing valid to sign with.
            (
                &[Qualifio, StandardWebhooks],
                vec![previous("old", -1)],
                false,
                false,
            ),
        ];
        for (schemes, secrets, qualifio, standard) in cases {
            let req = build(
                &integration(schemes, secrets.clone()),
                "P1",
                Bytes::from_static(BODY),
                now(),
                None,
            );
            assert_eq!(
                req.header(X_QUALIFIO_SIGNATURE).is_some(),
                *qualifio,
                "{schemes:?} {}",
                secrets.len()
            );
            assert_eq!(
                req.header(WEBHOOK_SIGNATURE).is_some(),
                *standard,
                "{schemes:?} {}",
                secrets.len()
            );
        }
    }

    #[test]
    fn signatures_verify_and_rotation_signs_twice() {
        let i = integration(
            &[SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks],
            vec![
                current("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                previous("old-secret", 3600),
                previous("older", -1),
            ],
        );
        let req = build(&i, "P1", Bytes::from_static(BODY), now(), None);
        let sig = req.header(WEBHOOK_SIGNATURE).unwrap();
        assert_eq!(
            sig.split(' ').filter(|s| s.starts_with("v1,")).count(),
            2,
            "{}",
            sig.len()
        );
        let ts = NOW_SECS as i64;
        for secret in ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "old-secret"] {
            assert!(signing::verify_standard_webhooks(
                &Secret::new(secret),
                "P1_crm-sync",
                ts,
                BODY,
                sig
            ));
        }
        assert!(!signing::verify_standard_webhooks(
            &Secret::new("older"),
            "P1_crm-sync",
            ts,
            BODY,
            sig
        ));
        // Qualifio holds one value: the newest secret's.
        let q = req.header(X_QUALIFIO_SIGNATURE).unwrap();
        assert!(signing::verify_qualifio(
            &Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            BODY,
            q
        ));
        assert!(!signing::verify_qualifio(
            &Secret::new("old-secret"),
            BODY,
            q
        ));
    }

    #[test]
    fn auth_header_cannot_replace_ours() {
        let mut i = integration(&[SignatureScheme::StandardWebhooks], vec![current("a")]);
        for name in ["Webhook-Signature", "content-length", "Host", "user-agent"] {
            i.auth_header = Some(AuthHeader {
                name: name.into(),
                value: Secret::new("spoof"),
            });
            let req = build(&i, "P1", Bytes::from_static(BODY), now(), None);
            assert!(req.headers.iter().all(|(_, v)| v != "spoof"), "{name}");
        }
        i.auth_header = Some(AuthHeader {
            name: "X-Api-Key".into(),
            value: Secret::new("k"),
        });
        let req = build(&i, "P1", Bytes::from_static(BODY), now(), None);
        assert_eq!(req.header("x-api-key"), Some("k"));
        i.auth_header = None;
        let req = build(&i, "P1", Bytes::from_static(BODY), now(), None);
        assert_eq!(
            names(&req),
            [
                "content-type",
                "user-agent",
                WEBHOOK_ID,
                WEBHOOK_TIMESTAMP,
                WEBHOOK_SIGNATURE
            ]
        );
    }

    #[test]
    fn debug_redacts_secrets_and_body() {
        let i = integration(
            &[SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks],
            vec![current("sig-s3cret")],
        );
        let mut url_with_credentials = i.clone();
        url_with_credentials.url =
            "https://user:pa55@hooks.example.com/in?token=q-s3cret#frag".into();
        for i in [i, url_with_credentials] {
            let req = build(&i, "P1", Bytes::from_static(BODY), now(), Some(TP));
            let printed = format!("{req:?} {req:#?}");
            let signature = req.header(WEBHOOK_SIGNATURE).unwrap();
            let qualifio = req.header(X_QUALIFIO_SIGNATURE).unwrap();
            for hidden in [
                "auth-s3cret",
                "sig-s3cret",
                "q-s3cret",
                "pa55",
                "COMPLETED",
                signature,
                qualifio,
            ] {
                assert!(!printed.contains(hidden), "{hidden} printed");
            }
            for shown in [
                "authorization",
                WEBHOOK_SIGNATURE,
                X_QUALIFIO_SIGNATURE,
                "P1_crm-sync",
                "1795597200",
                TP,
                "https://hooks.example.com/in?<redacted>",
                "body_len: 31",
            ] {
                assert!(printed.contains(shown), "{shown} missing from {printed}");
            }
        }
    }

    #[test]
    fn payload_variables_are_added_and_signed() {
        let mut i = integration(
            &[SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks],
            vec![current("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
        );
        let sample = Bytes::from_static(SAMPLE_PARTICIPATION.as_bytes());
        let as_published = build(&i, SAMPLE_PARTICIPATION_ID, sample.clone(), now(), None);
        assert_eq!(as_published.body, sample);

        i.payload_variables = PayloadVariables::Add;
        let req = build(&i, SAMPLE_PARTICIPATION_ID, sample.clone(), now(), None);
        let added = r#","variables":{"email":"jo.peeters@example.org","gender":"F","newsletter":"1","q_shortest_day":"December"}"#;
        let at = SAMPLE_PARTICIPATION.len() - "\n}\n".len();
        let want = format!(
            "{}{added}{}",
            &SAMPLE_PARTICIPATION[..at],
            &SAMPLE_PARTICIPATION[at..]
        );
        assert_eq!(std::str::from_utf8(&req.body).unwrap(), want);

        // Both signatures cover the body sent, not the one published.
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let msg_id = format!("{SAMPLE_PARTICIPATION_ID}_crm-sync");
        let standard = req.header(WEBHOOK_SIGNATURE).unwrap();
        let qualifio = req.header(X_QUALIFIO_SIGNATURE).unwrap();
        let ts = NOW_SECS as i64;
        assert!(signing::verify_standard_webhooks(
            &secret, &msg_id, ts, &req.body, standard
        ));
        assert!(signing::verify_qualifio(&secret, &req.body, qualifio));
        assert!(!signing::verify_qualifio(&secret, &sample, qualifio));
        assert_ne!(qualifio, as_published.header(X_QUALIFIO_SIGNATURE).unwrap());

        // A document with its own `variables`, or none to add, or not JSON: as published.
        for body in [
            r#"{"id":"P1","optins":[{"variable":"n","response":"1"}],"variables":{}}"#,
            r#"{"id":"P1","optins":[{"response":"1"}]}"#,
            "not json",
        ] {
            let body = Bytes::from(body);
            assert_eq!(build(&i, "P1", body.clone(), now(), None).body, body);
        }
    }

    #[test]
    fn sample_participation_is_a_valid_completed_participation() {
        let p = crate::participation::parse(
            SAMPLE_PARTICIPATION,
            crate::participation::DEFAULT_MAX_BYTES,
        )
        .unwrap();
        assert!(p.is_complete());
        assert_eq!(p.id, SAMPLE_PARTICIPATION_ID);
    }
}
