//! Admin-input rules for integrations: display names, endpoint URLs, the auth header and
//! signing secrets. Each failure names the field it is about. Pure functions, no I/O.

use base64::Engine as _;
use pushwire_common::domain::convert::InvalidField;

/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;
const MAX_URL_BYTES: usize = 2048;
const MAX_HEADER_NAME_BYTES: usize = 256;
const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
const MAX_SECRET_BYTES: usize = 1024;
const MAX_REASON_CHARS: usize = 500;

/// Headers Pushwire sets itself (or that HTTP/1.1 framing owns): an auth header may not
/// replace them. Compared case-insensitively.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "content-type",
    "expect",
    "host",
    "keep-alive",
    "te",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "webhook-id",
    "webhook-signature",
    "webhook-timestamp",
    "x-qualifio-signature",
];

fn invalid(field: &str, reason: impl Into<String>) -> InvalidField {
    InvalidField::new(field, reason)
}

/// 1 to 100 characters, not only spaces, no control characters.
pub fn display_name(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.trim().is_empty() {
        return Err(invalid(field, "required"));
    }
    // Count at most one past the limit: a 10 MB name must not cost a 10 MB scan twice.
    if name.chars().take(MAX_DISPLAY_NAME_CHARS + 1).count() > MAX_DISPLAY_NAME_CHARS {
        return Err(invalid(
            field,
            format!("at most {MAX_DISPLAY_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// An absolute `https://` URL with a host (`http://` only when allowed), no user info, no
/// fragment.
pub fn endpoint_url(field: &str, raw: &str, allow_http: bool) -> Result<(), InvalidField> {
    if raw.is_empty() {
        return Err(invalid(field, "required"));
    }
    if raw.len() > MAX_URL_BYTES {
        return Err(invalid(field, format!("at most {MAX_URL_BYTES} bytes")));
    }
    let url =
        url::Url::parse(raw).map_err(|e| invalid(field, format!("not an absolute URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => {
            return Err(invalid(
                field,
                "plain http:// is refused; use https:// (a development server may allow http with --allow-insecure-http)",
            ));
        }
        other => {
            return Err(invalid(
                field,
                format!("scheme {other:?} is not supported; use https://"),
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(field, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            field,
            "must not hold credentials; use auth_header instead",
        ));
    }
    if url.fragment().is_some() {
        return Err(invalid(field, "must not have a #fragment"));
    }
    Ok(())
}

/// An HTTP token (RFC 9110 `tchar`s) that is not a header Pushwire sets itself.
pub fn header_name(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.is_empty() {
        return Err(invalid(field, "required"));
    }
    if name.len() > MAX_HEADER_NAME_BYTES {
        return Err(invalid(
            field,
            format!("at most {MAX_HEADER_NAME_BYTES} bytes"),
        ));
    }
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(tchar) {
        return Err(invalid(
            field,
            "must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)",
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
        return Err(invalid(
            field,
            format!("{name} is set by Pushwire itself and cannot be replaced"),
        ));
    }
    Ok(())
}

/// A non-empty header value of visible ASCII, spaces and tabs, without CR or LF. The value is
/// secret: it is never echoed in the error.
pub fn header_value(field: &str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() {
        return Err(invalid(field, "required when auth_header.name is set"));
    }
    if value.len() > MAX_HEADER_VALUE_BYTES {
        return Err(invalid(
            field,
            format!("at most {MAX_HEADER_VALUE_BYTES} bytes"),
        ));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(invalid(field, "must not contain CR or LF"));
    }
    if !value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(invalid(
            field,
            "must be visible ASCII characters, spaces or tabs",
        ));
    }
    Ok(())
}

/// A signing secret: 1 to 1024 bytes without control characters; a `whsec_` secret must be
/// base64 after the prefix (that is how Standard Webhooks reads it). Never echoed.
pub fn secret(field: &str, secret: &str) -> Result<(), InvalidField> {
    if secret.len() > MAX_SECRET_BYTES {
        return Err(invalid(field, format!("at most {MAX_SECRET_BYTES} bytes")));
    }
    if secret.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    if let Some(b64) = secret.strip_prefix("whsec_") {
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| invalid(field, "a whsec_ secret must be base64 after the prefix"))?;
        if key.is_empty() {
            return Err(invalid(
                field,
                "a whsec_ secret must hold a key after the prefix",
            ));
        }
    }
    Ok(())
}

/// A short free-text reason, without control characters.
pub fn reason(field: &str, reason: &str) -> Result<(), InvalidField> {
    if reason.chars().take(MAX_REASON_CHARS + 1).count() > MAX_REASON_CHARS {
        return Err(invalid(
            field,
            format!("at most {MAX_REASON_CHARS} characters"),
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(endpoint_url("url", "https://crm.example.com/hook?x=1", false).is_ok());
        assert!(endpoint_url("url", "http://127.0.0.1:9000/", true).is_ok());
        for (bad, why) in [
            ("", "required"),
            ("crm.example.com", "absolute"),
            ("ftp://crm.example.com/", "scheme"),
            ("http://crm.example.com/", "--allow-insecure-http"),
            ("https://user:pw@crm.example.com/", "credentials"),
            ("https://crm.example.com/#x", "fragment"),
        ] {
            let err = endpoint_url("url", bad, false).unwrap_err();
            assert!(err.reason.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn headers() {
        assert!(header_name("n", "Authorization").is_ok());
        assert!(header_name("n", "X-Api-Key").is_ok());
        for bad in [
            "",
            "Bad Header",
            "Content-Type",
            "webhook-signature",
            "X-Qualifio-Signature",
            "Proxy-Authorization",
            "a:b",
        ] {
            assert!(header_name("n", bad).is_err(), "{bad}");
        }
        assert!(header_value("v", "Bearer abc.def").is_ok());
        for bad in ["", "a\r\nX-Evil: 1", "a\nb", "caf\u{e9}"] {
            let err = header_value("v", bad).unwrap_err();
            assert!(!err.to_string().contains(bad) || bad.is_empty(), "{err}");
        }
    }

    #[test]
    fn names_and_secrets() {
        assert!(display_name("d", "CRM").is_ok());
        assert!(display_name("d", &"é".repeat(100)).is_ok());
        assert!(display_name("d", &"é".repeat(101)).is_err());
        assert!(display_name("d", "  ").is_err());
        assert!(display_name("d", "a\nb").is_err());
        assert!(secret("s", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(secret("s", "plain secret").is_ok());
        assert!(secret("s", "whsec_not base64!").is_err());
        assert!(secret("s", &"x".repeat(1025)).is_err());
    }
}
