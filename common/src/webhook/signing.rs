//! Webhook signatures (DESIGN §4): the `webhook-id`, the Qualifio `sha256=<hex>` signature and
//! the Standard Webhooks `v1,<base64>` list, plus their verification for receivers and tests.
//! Pure functions over bytes: no I/O, no clock, no logging. Secrets are only read here through
//! [`Secret::expose`] and never end up in a returned error or string other than a MAC.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::domain::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of Standard Webhooks secrets whose key is the base64 text after it.
pub const WHSEC_PREFIX: &str = "whsec_";

/// Prefix of the Qualifio signature header value.
const QUALIFIO_PREFIX: &str = "sha256=";

/// Version tag of a Standard Webhooks HMAC-SHA256 signature.
const STANDARD_V1: &str = "v1,";

/// Standard alphabet; padding optional when decoding, because `whsec_` secrets are pasted by
/// people and tools that sometimes strip the trailing `=`.
const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The `webhook-id` of one participation for one integration: `{participation}_{integration}`.
///
/// Stable across retries so receivers can de-duplicate; neither id contains `.`, which keeps
/// the Standard Webhooks signed content `id.timestamp.body` unambiguous.
pub fn webhook_id(participation_id: &str, integration_id: &str) -> String {
    format!("{participation_id}_{integration_id}")
}

/// The `X-Qualifio-Signature` value: `sha256=` and the lowercase hex HMAC-SHA256 of `body`,
/// keyed with the secret's UTF-8 bytes.
pub fn qualifio_signature(secret: &Secret, body: &[u8]) -> String {
    let mut mac = new_mac(secret.expose().as_bytes());
    mac.update(body);
    format!(
        "{QUALIFIO_PREFIX}{}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// The `webhook-signature` value: one `v1,<base64 HMAC-SHA256(key, "{id}.{ts}.{body}")>` per
/// secret, space-separated, in the order given (newest first during a rotation).
///
/// The key of a `whsec_…` secret is the base64 decoding of what follows the prefix, any other
/// secret's key is its UTF-8 bytes (see [`standard_webhooks_key`]).
pub fn standard_webhooks_signature<'a>(
    secrets: impl IntoIterator<Item = &'a Secret>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut out = String::new();
    for secret in secrets {
        let mac = standard_webhooks_mac(&standard_webhooks_key(secret), msg_id, timestamp, body);
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(STANDARD_V1);
        base64::engine::general_purpose::STANDARD
            .encode_string(mac.finalize().into_bytes(), &mut out);
    }
    out
}

/// The HMAC key of a secret for Standard Webhooks signatures.
///
/// A `whsec_` secret whose remainder is not valid base64 falls back to the UTF-8 bytes of the
/// whole secret rather than failing delivery; the control plane refuses such secrets up front
/// with [`is_valid_whsec`].
pub fn standard_webhooks_key(secret: &Secret) -> Vec<u8> {
    let raw = secret.expose();
    raw.strip_prefix(WHSEC_PREFIX)
        .and_then(|b64| B64_LENIENT.decode(b64).ok())
        .filter(|key| !key.is_empty())
        .unwrap_or_else(|| raw.as_bytes().to_vec())
}

/// Whether a secret is usable as given: not a `whsec_` secret, or one whose remainder decodes
/// as non-empty base64.
pub fn is_valid_whsec(secret: &Secret) -> bool {
    match secret.expose().strip_prefix(WHSEC_PREFIX) {
        None => true,
        Some(b64) => B64_LENIENT.decode(b64).is_ok_and(|k| !k.is_empty()),
    }
}

/// Checks an `X-Qualifio-Signature` value in constant time.
pub fn verify_qualifio(secret: &Secret, body: &[u8], header_value: &str) -> bool {
    let Some(expected) = header_value
        .trim()
        .strip_prefix(QUALIFIO_PREFIX)
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    let mut mac = new_mac(secret.expose().as_bytes());
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// Checks a `webhook-signature` value (one or more space-separated signatures) against one
/// secret in constant time per signature; true when any `v1,` signature matches.
///
/// Only the MAC is checked: a receiver must also refuse timestamps too far from its clock.
pub fn verify_standard_webhooks(
    secret: &Secret,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    header_value: &str,
) -> bool {
    let key = standard_webhooks_key(secret);
    // Bounded: a header holds a handful of signatures; more is not a real sender.
    header_value
        .split_ascii_whitespace()
        .take(16)
        .filter_map(|sig| sig.strip_prefix(STANDARD_V1))
        .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .any(|expected| {
            standard_webhooks_mac(&key, msg_id, timestamp, body)
                .verify_slice(&expected)
                .is_ok()
        })
}

fn standard_webhooks_mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = new_mac(key);
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length (long ones are hashed), so this cannot fail; keep a
    // fallback anyway rather than a panic path.
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values below were computed independently with Python's `hmac`, `hashlib` and
    // `base64` modules, not with this code.

    /// UTF-8 body with non-ASCII characters: `{"id":"P1","name":"Zoë — café ✓"}`.
    const BODY: &str = "{\"id\":\"P1\",\"name\":\"Zo\u{eb} \u{2014} caf\u{e9} \u{2713}\"}";
    const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "9C2F61A0-3B7E-4D15-A8C2-5E0B7D41F3A9_crm-sync";
    const TS: i64 = 1_795_597_200;
    const SIG_WHSEC: &str = "v1,fz3LHSmlXy+kJIFYWLeC1mDJ+dHWhye/2BdOB6JCeVU=";
    const SIG_PLAIN: &str = "v1,x5/wWxV0hWlkUhtr1tsWDhEoO71DDP1DBeVFZ16Io0A=";

    #[test]
    fn webhook_id_joins_with_underscore() {
        assert_eq!(
            webhook_id("9C2F61A0-3B7E", "crm-sync"),
            "9C2F61A0-3B7E_crm-sync"
        );
    }

    #[test]
    fn qualifio_known_vectors() {
        assert!(
            BODY.len() > BODY.chars().count(),
            "the body has multi-byte characters"
        );
        let cases = [
            (
                "s3cr3t-qualifio",
                BODY.as_bytes(),
                "sha256=2095c61ef3183077c6b0a671bea5cf006d58780d104a2085348e80fe5afe4df4",
            ),
            (
                "k",
                b"".as_slice(),
                "sha256=8bb990c40a7d61cb97597a942125025be50ac8beb74436e3735b98893a7f6620",
            ),
        ];
        for (secret, body, expected) in cases {
            let secret = Secret::new(secret);
            assert_eq!(qualifio_signature(&secret, body), expected);
            assert!(verify_qualifio(&secret, body, expected));
        }
    }

    #[test]
    fn qualifio_verify_refuses_tampering() {
        let secret = Secret::new("s3cr3t-qualifio");
        let good = qualifio_signature(&secret, BODY.as_bytes());
        assert!(!verify_qualifio(&secret, b"{\"id\":\"P2\"}", &good));
        assert!(!verify_qualifio(
            &Secret::new("other"),
            BODY.as_bytes(),
            &good
        ));
        assert!(!verify_qualifio(
            &secret,
            BODY.as_bytes(),
            good.trim_start_matches("sha256=")
        ));
        assert!(!verify_qualifio(&secret, BODY.as_bytes(), "sha256=zz"));
        assert!(!verify_qualifio(&secret, BODY.as_bytes(), ""));
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        // The vector published with the Standard Webhooks reference libraries.
        let secret = Secret::new(WHSEC);
        let body = br#"{"test": 2432232314}"#;
        let sig = standard_webhooks_signature(
            [&secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            body,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify_standard_webhooks(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            body,
            &sig
        ));
    }

    #[test]
    fn standard_webhooks_whsec_and_plain_keys() {
        let whsec = Secret::new(WHSEC);
        let plain = Secret::new("plain-old-secret");
        assert_eq!(
            standard_webhooks_signature([&whsec], MSG_ID, TS, BODY.as_bytes()),
            SIG_WHSEC
        );
        assert_eq!(
            standard_webhooks_signature([&plain], MSG_ID, TS, BODY.as_bytes()),
            SIG_PLAIN
        );
        // Padding-less base64 after the prefix decodes to the same key.
        assert_eq!(
            standard_webhooks_key(&whsec),
            standard_webhooks_key(&Secret::new(WHSEC.trim_end_matches('=')))
        );
        assert_eq!(standard_webhooks_key(&plain), b"plain-old-secret");
    }

    #[test]
    fn rotation_signs_with_every_secret_in_order() {
        let new = Secret::new(WHSEC);
        let old = Secret::new("plain-old-secret");
        let header = standard_webhooks_signature([&new, &old], MSG_ID, TS, BODY.as_bytes());
        assert_eq!(header, format!("{SIG_WHSEC} {SIG_PLAIN}"));
        // A receiver knowing either secret accepts the request.
        assert!(verify_standard_webhooks(
            &new,
            MSG_ID,
            TS,
            BODY.as_bytes(),
            &header
        ));
        assert!(verify_standard_webhooks(
            &old,
            MSG_ID,
            TS,
            BODY.as_bytes(),
            &header
        ));
        assert!(!verify_standard_webhooks(
            &Secret::new("whsec_b3RoZXI="),
            MSG_ID,
            TS,
            BODY.as_bytes(),
            &header
        ));
        assert_eq!(
            standard_webhooks_signature(std::iter::empty(), MSG_ID, TS, BODY.as_bytes()),
            ""
        );
    }

    #[test]
    fn standard_webhooks_verify_binds_id_timestamp_and_body() {
        let secret = Secret::new(WHSEC);
        let body = BODY.as_bytes();
        assert!(verify_standard_webhooks(
            &secret, MSG_ID, TS, body, SIG_WHSEC
        ));
        assert!(!verify_standard_webhooks(
            &secret, "other_id", TS, body, SIG_WHSEC
        ));
        assert!(!verify_standard_webhooks(
            &secret,
            MSG_ID,
            TS + 1,
            body,
            SIG_WHSEC
        ));
        assert!(!verify_standard_webhooks(
            &secret, MSG_ID, TS, b"{}", SIG_WHSEC
        ));
        assert!(!verify_standard_webhooks(
            &secret,
            MSG_ID,
            TS,
            body,
            "v2,fz3LHSmlXy+kJIFYWLeC1mDJ+dHWhye/2BdOB6JCeVU="
        ));
        assert!(!verify_standard_webhooks(
            &secret,
            MSG_ID,
            TS,
            body,
            "v1,not-base64!"
        ));
        assert!(!verify_standard_webhooks(&secret, MSG_ID, TS, body, ""));
    }

    #[test]
    fn whsec_validation_and_fallback() {
        assert!(is_valid_whsec(&Secret::new(WHSEC)));
        assert!(is_valid_whsec(&Secret::new("no-prefix-at-all")));
        assert!(!is_valid_whsec(&Secret::new("whsec_")));
        assert!(!is_valid_whsec(&Secret::new("whsec_!!!")));
        // An undecodable whsec_ secret still signs (with its UTF-8 bytes) instead of panicking.
        assert_eq!(
            standard_webhooks_key(&Secret::new("whsec_!!!")),
            b"whsec_!!!"
        );
    }
}
