//! Admin-input rules for integrations: display names, endpoint URLs (and the early SSRF
//! check of their host), the auth header and signing secrets. Each failure names the field it
//! is about. Pure functions, no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use pushwire_common::domain::SignatureScheme;
use pushwire_common::domain::convert::InvalidField;
use pushwire_common::webhook::ssrf::{self, AllowList};

/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;
/// Longest endpoint URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Longest auth header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Longest auth header value, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 4 * 1024;
/// Longest signing secret, in bytes.
pub const MAX_SECRET_BYTES: usize = 1024;
/// Shortest signing key, in bytes: a plain secret's UTF-8 bytes, or the key a `whsec_` secret
/// holds. The Standard Webhooks specification asks for 24 to 64 bytes; anything shorter can be
/// guessed from one signed request.
pub const MIN_SECRET_KEY_BYTES: usize = 24;
/// Longest key of a `whsec_` secret, in bytes (Standard Webhooks: 24 to 64).
pub const MAX_WHSEC_KEY_BYTES: usize = 64;
/// How to make a good secret, for the errors.
const MAKE_SECRET: &str = "make one with `echo \"whsec_$(head -c 32 /dev/urandom | base64)\"`";

/// Standard base64, padding optional: both official Standard Webhooks libraries accept
/// `whsec_` secrets without their trailing `=`, and so does the signer.
const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Longest `disabled_reason`, in characters.
pub const MAX_REASON_CHARS: usize = 500;

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

/// Whether `c` is invisible or reorders the text around it: the Unicode default-ignorable code
/// points (zero-width spaces and joiners, word joiner, soft hyphen, variation selectors, tags,
/// the byte-order mark, Hangul fillers...) and the bidirectional controls (U+061C, U+200E/F,
/// U+202A–U+202E, U+2066–U+2069, all default-ignorable too). Such a character makes a name
/// or URL look like another one: `C\u{200B}RM` reads as `CRM`, U+202E prints what follows
/// reversed.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{AD}'
            | '\u{34F}'
            | '\u{61C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// A display name being set: a [`display_name`] without invisible or direction-changing
/// characters ([`is_invisible`]) and without whitespace other than the ASCII space (a no-break
/// or ideographic space looks like a space but makes another name).
///
/// Only for a name being set: one stored before this rule stays updatable (disabling it, say).
pub fn new_display_name(field: &str, name: &str) -> Result<(), InvalidField> {
    display_name(field, name)?;
    if let Some(c) = name
        .chars()
        .find(|&c| is_invisible(c) || (c.is_whitespace() && c != ' '))
    {
        return Err(invalid(
            field,
            format!(
                "must not contain invisible, direction-changing or non-ASCII space characters, \
                 found U+{:04X}",
                u32::from(c)
            ),
        ));
    }
    Ok(())
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

/// A URL being set: an [`endpoint_url`] without any character that URL parsing would drop or
/// that could not be seen (no control characters such as CR, LF, NUL or tab, no whitespace,
/// spaces included: a space in a path is written `%20`, no invisible or direction-changing
/// character, see [`is_invisible`]), at most [`MAX_URL_BYTES`] once normalised. Returns it
/// as it is stored and called: [`normalize_url`].
///
/// Only for a URL being set: one stored before these rules stays updatable (disabling it,
/// say), [`endpoint_url`] still checks it.
pub fn new_endpoint_url(field: &str, raw: &str, allow_http: bool) -> Result<String, InvalidField> {
    if let Some((at, c)) = raw
        .char_indices()
        .find(|&(_, c)| c.is_control() || c.is_whitespace() || is_invisible(c))
    {
        return Err(invalid(
            field,
            format!(
                "must not contain control, whitespace or invisible characters, found U+{:04X} \
                 at byte {at} (write a space as %20)",
                u32::from(c)
            ),
        ));
    }
    endpoint_url(field, raw, allow_http)?;
    let normalized = normalize_url(raw);
    if normalized.len() > MAX_URL_BYTES {
        return Err(invalid(
            field,
            format!(
                "at most {MAX_URL_BYTES} bytes once normalised (non-ASCII characters are \
                 percent-encoded)"
            ),
        ));
    }
    Ok(normalized)
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

/// The URL as it is called and stored: the serialisation of the parsed URL (scheme and host
/// lower-cased, an internationalised host in its ASCII form, a default port dropped, an empty
/// path written `/`, non-ASCII characters of the path and query percent-encoded). `raw` is
/// expected to have passed [`endpoint_url`]; anything that does not parse is returned as is.
pub fn normalize_url(raw: &str) -> String {
    url::Url::parse(raw).map_or_else(|_| raw.to_owned(), String::from)
}

/// Refuses early a URL whose host is a literal IP address that is not public, or a
/// `localhost` name (RFC 6761: always loopback), unless the SSRF allow-list (`--allow-cidr`)
/// lets it through; the reason names the address class, as the worker's guard does. Host names
/// are not resolved here (DNS may answer differently at delivery time): the worker vets every
/// address it dials. `raw` is expected to have passed [`endpoint_url`]; anything that does not
/// parse is left to it.
pub fn endpoint_host(field: &str, raw: &str, allow: &AllowList) -> Result<(), InvalidField> {
    const HINT: &str =
        "webhooks go to public addresses (a server may allow a network with --allow-cidr)";
    let Ok(url) = url::Url::parse(raw) else {
        return Ok(());
    };
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let localhost = name == "localhost" || name.ends_with(".localhost");
            if localhost
                && !allow.allows(Ipv4Addr::LOCALHOST.into())
                && !allow.allows(Ipv6Addr::LOCALHOST.into())
            {
                return Err(invalid(
                    field,
                    format!(
                        "host {name:?} is loopback (localhost names, 127.0.0.0/8 and ::1), not public and not allow-listed; {HINT}"
                    ),
                ));
            }
            return Ok(());
        }
        None => return Ok(()),
    };
    ssrf::vet(ip, allow).map_err(|blocked| {
        let class = blocked.class;
        let reason = if class.may_be_allow_listed() {
            format!("host {ip} is {class}, {}; {HINT}", class.verdict())
        } else {
            format!("host {ip} is {class}, {}", class.verdict())
        };
        invalid(field, reason)
    })
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

/// A non-empty header value of at most 4 KiB: visible ASCII, spaces and tabs, without CR or
/// LF, and neither starting nor ending with a space or tab (RFC 9110 `field-value`, less
/// `obs-text`). The value is secret: it is never echoed in the error.
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
    if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        return Err(invalid(field, "must not start or end with a space or tab"));
    }
    Ok(())
}

/// A signing secret of at most 1024 bytes without control characters, holding a key of at
/// least [`MIN_SECRET_KEY_BYTES`]: a `whsec_` secret must be base64 after the prefix (padding
/// optional) of a 24 to 64 byte key (how Standard Webhooks reads it); any other secret is its
/// UTF-8 bytes and must be at least 24 of them. Never echoed.
pub fn secret(field: &str, secret: &str) -> Result<(), InvalidField> {
    if secret.len() > MAX_SECRET_BYTES {
        return Err(invalid(field, format!("at most {MAX_SECRET_BYTES} bytes")));
    }
    if secret.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    if let Some(b64) = secret.strip_prefix("whsec_") {
        let key = B64_LENIENT.decode(b64).map_err(|_| {
            invalid(
                field,
                "a whsec_ secret must be base64 after the prefix (standard alphabet)",
            )
        })?;
        if !(MIN_SECRET_KEY_BYTES..=MAX_WHSEC_KEY_BYTES).contains(&key.len()) {
            return Err(invalid(
                field,
                format!(
                    "a whsec_ secret must hold a key of {MIN_SECRET_KEY_BYTES} to \
                     {MAX_WHSEC_KEY_BYTES} bytes after the prefix; {MAKE_SECRET}"
                ),
            ));
        }
    } else if secret.len() < MIN_SECRET_KEY_BYTES {
        return Err(invalid(
            field,
            format!(
                "at least {MIN_SECRET_KEY_BYTES} bytes: a shorter secret can be guessed from \
                 one signed request; {MAKE_SECRET}"
            ),
        ));
    }
    Ok(())
}

/// The current secret against the schemes it signs with: Standard Webhooks libraries read a
/// secret as `whsec_` and base64, so a plain secret there would sign requests that their
/// verifiers reject. Never echoes the secret.
pub fn secret_for_schemes(
    field: &str,
    secret: &str,
    schemes: &[SignatureScheme],
) -> Result<(), InvalidField> {
    if schemes.contains(&SignatureScheme::StandardWebhooks) && !secret.starts_with("whsec_") {
        return Err(invalid(
            field,
            format!(
                "SIGNATURE_SCHEME_STANDARD_WEBHOOKS takes a whsec_ secret (whsec_ and the base64 \
                 of {MIN_SECRET_KEY_BYTES} to {MAX_WHSEC_KEY_BYTES} random bytes), the form \
                 Standard Webhooks verifiers read; {MAKE_SECRET}"
            ),
        ));
    }
    Ok(())
}

/// Whether moving from `old` to `new` changes the origin (scheme, host or port, default ports
/// filled in): a request to another origin goes to another server. URLs that do not parse
/// count as changed.
pub fn origin_changes(old: &str, new: &str) -> bool {
    match (url::Url::parse(old), url::Url::parse(new)) {
        (Ok(old), Ok(new)) => old.origin() != new.origin(),
        _ => true,
    }
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
            // Characters URL parsing drops or hides: refused, not silently changed.
            (
                "https://crm.example.com/a\r\nX-Evil: 1",
                "U+000D at byte 25",
            ),
            ("https://crm.example.com/a\nb", "U+000A"),
            ("https://crm.example.com/\0", "U+0000"),
            ("https://crm.exa\tmple.com/", "U+0009"),
            (" https://crm.example.com/", "U+0020 at byte 0"),
            ("https://crm.example.com/ ", "U+0020"),
            ("https://crm.example.com/a b", "%20"),
            ("https://crm.example.com/\u{a0}", "U+00A0"),
            ("https://crm.exa\u{200b}mple.com/", "U+200B"),
            ("https://crm.example.com/\u{202e}moc", "U+202E"),
        ] {
            let err = new_endpoint_url("url", bad, false).unwrap_err();
            assert!(err.reason.contains(why), "{bad:?}: {err}");
        }
        // What is stored is what is called.
        for (typed, stored) in [
            (
                "https://crm.example.com/hook?x=1",
                "https://crm.example.com/hook?x=1",
            ),
            ("HTTPS://CRM.Example.COM", "https://crm.example.com/"),
            ("https://crm.example.com:443/a", "https://crm.example.com/a"),
            (
                "https://bücher.example/caf\u{e9}",
                "https://xn--bcher-kva.example/caf%C3%A9",
            ),
            (
                "https://crm.example.com\\a\\b",
                "https://crm.example.com/a/b",
            ),
        ] {
            assert_eq!(new_endpoint_url("url", typed, false), Ok(stored.to_owned()));
        }
        let long = format!("https://crm.example.com/{}", "\u{e9}".repeat(1000));
        assert!(long.len() <= MAX_URL_BYTES);
        assert!(endpoint_url("url", &long, false).is_ok());
        let err = new_endpoint_url("url", &long, false).unwrap_err();
        assert!(err.reason.contains("once normalised"), "{err}");
        // A URL stored before these rules still passes the check of stored ones.
        assert!(endpoint_url("url", "https://crm.example.com/a b", false).is_ok());
    }

    #[test]
    fn literal_non_public_hosts_are_refused_early() {
        let none = AllowList::default();
        let loopback = AllowList::parse(["127.0.0.0/8"]).unwrap();
        let v6_loopback = AllowList::parse(["::1/128"]).unwrap();
        for ok in [
            "https://crm.example.com/hook",
            "https://8.8.8.8/",
            "https://[2606:4700:4700::1111]/",
            "https://internal.corp.example/", // names are not resolved here
            "https://localhost.example.com/",
            "https://notlocalhost/",
        ] {
            assert_eq!(endpoint_host("url", ok, &none), Ok(()), "{ok}");
        }
        // (URL, text the reason holds)
        for (bad, why) in [
            (
                "http://127.0.0.1:9000/",
                "host 127.0.0.1 is loopback (127.0.0.0/8)",
            ),
            ("http://2130706433/", "host 127.0.0.1 is loopback"),
            ("http://0x7f.1/", "host 127.0.0.1 is loopback"),
            ("http://[::1]/", "host ::1 is loopback (::1)"),
            ("https://10.1.2.3/", "private (RFC 1918, 10.0.0.0/8)"),
            ("https://172.16.0.1/", "private (RFC 1918, 172.16.0.0/12)"),
            ("https://192.168.1.1/", "private (RFC 1918, 192.168.0.0/16)"),
            ("https://100.64.0.1/", "carrier-grade NAT (100.64.0.0/10)"),
            (
                "http://169.254.169.254/latest/",
                "cloud metadata (169.254.169.254), never contacted",
            ),
            ("https://169.254.1.1/", "link-local (169.254.0.0/16)"),
            ("https://198.18.0.1/", "benchmarking (198.18.0.0/15)"),
            ("https://192.0.2.1/", "documentation (TEST-NET-1"),
            ("https://224.0.0.1/", "multicast (224.0.0.0/4)"),
            ("https://255.255.255.255/", "broadcast (255.255.255.255)"),
            ("https://0.0.0.0/", "unspecified (0.0.0.0)"),
            ("https://240.0.0.1/", "reserved (240.0.0.0/4)"),
            ("https://[::]/", "unspecified (::)"),
            (
                "https://[::ffff:10.0.0.1]/",
                "IPv4-mapped (::ffff:0:0/96) form of 10.0.0.1, private",
            ),
            (
                "https://[::10.0.0.1]/",
                "IPv4-compatible (::/96, deprecated)",
            ),
            (
                "https://[64:ff9b::a9fe:a9fe]/",
                "NAT64 (64:ff9b::/96) form of 169.254.169.254",
            ),
            (
                "https://[2002:c0a8:101::1]/",
                "6to4 (2002::/16) form of 192.168.1.1, private",
            ),
            ("https://[2001::1]/", "Teredo (2001::/32)"),
            ("https://[fd00::1]/", "unique local (fc00::/7)"),
            ("https://[fe80::1]/", "link-local (fe80::/10)"),
            ("https://[fec0::1]/", "site-local (fec0::/10"),
            ("https://[ff02::1]/", "multicast (ff00::/8)"),
            ("https://[2001:db8::1]/", "documentation (2001:db8::/32)"),
            ("https://[2001:2::1]/", "benchmarking (2001:2::/48)"),
            (
                "https://[fd00:ec2::254]/",
                "cloud metadata (AWS fd00:ec2::254)",
            ),
            ("http://localhost:9000/", "host \"localhost\" is loopback"),
            ("http://LOCALHOST./", "host \"localhost\" is loopback"),
            (
                "http://api.localhost/",
                "host \"api.localhost\" is loopback",
            ),
        ] {
            let err = endpoint_host("integration.url", bad, &none).unwrap_err();
            assert_eq!(err.field, "integration.url");
            assert!(err.reason.contains(why), "{bad}: {err}");
            let allowable = !err.reason.contains("cloud metadata");
            assert_eq!(
                err.reason.contains("--allow-cidr"),
                allowable,
                "{bad}: {err}"
            );
        }
        // The allow-list lets loopback through, localhost names included.
        for ok in [
            "http://127.0.0.1:9000/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:9000/",
            "http://api.localhost/",
        ] {
            assert_eq!(endpoint_host("url", ok, &loopback), Ok(()), "{ok}");
        }
        assert_eq!(
            endpoint_host("url", "http://localhost/", &v6_loopback),
            Ok(())
        );
        assert!(endpoint_host("url", "http://[::1]/", &loopback).is_err());
        assert!(endpoint_host("url", "http://10.0.0.1/", &loopback).is_err());
        // Never cloud metadata, whatever the allow-list says.
        let everything = AllowList::parse(["0.0.0.0/0", "::/0"]).unwrap();
        assert!(endpoint_host("url", "http://169.254.169.254/", &everything).is_err());
        assert_eq!(
            endpoint_host("url", "http://10.0.0.1/", &everything),
            Ok(())
        );
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
        assert!(header_value("v", "a\tb c").is_ok());
        assert!(header_value("v", &"x".repeat(MAX_HEADER_VALUE_BYTES)).is_ok());
        assert!(header_name("n", &"x".repeat(MAX_HEADER_NAME_BYTES)).is_ok());
        assert!(header_name("n", &"x".repeat(MAX_HEADER_NAME_BYTES + 1)).is_err());
        for bad in [
            "",
            "a\r\nX-Evil: 1",
            "a\nb",
            "caf\u{e9}",
            " leading",
            "trailing\t",
            "nul\0byte",
            "del\u{7f}",
            &"x".repeat(MAX_HEADER_VALUE_BYTES + 1),
        ] {
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
        assert!(new_display_name("d", "CRM sync (été) 🚀").is_ok());
        // A name stored before the rule still passes the check of stored ones.
        assert!(display_name("d", "C\u{200b}RM").is_ok());
        for bad in [
            "C\u{200b}RM",
            "\u{202e}MRC",
            "CRM\u{2066}",
            "C\u{ad}RM",
            "CRM\u{feff}",
            "CRM\u{fe0f}",
            "C\u{a0}RM",
            "C\u{3000}RM",
            "C\u{2028}RM",
        ] {
            let err = new_display_name("d", bad).unwrap_err();
            assert!(err.reason.contains("invisible"), "{bad:?}: {err}");
        }
        assert!(secret("s", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(secret("s", "a plain secret of 24 byte").is_ok());
        assert!(secret("s", "whsec_not base64!").is_err());
        assert!(secret("s", &"x".repeat(1025)).is_err());
    }

    #[test]
    fn secrets_too_short_to_sign_are_refused() {
        for short in ["hunter2", "s", &"x".repeat(MIN_SECRET_KEY_BYTES - 1)] {
            let err = secret("s", short).unwrap_err();
            assert!(err.reason.contains("at least 24 bytes"), "{err}");
            assert!(short.len() < 3 || !err.to_string().contains(short), "{err}");
        }
        assert!(secret("s", &"x".repeat(MIN_SECRET_KEY_BYTES)).is_ok());
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        for n in [1, 16, 23, 65, 200] {
            let err = secret("s", &format!("whsec_{}", b64(n))).unwrap_err();
            assert!(err.reason.contains("24 to 64 bytes"), "{n}: {err}");
        }
        for n in [24, 32, 64] {
            assert_eq!(secret("s", &format!("whsec_{}", b64(n))), Ok(()), "{n}");
        }
    }

    #[test]
    fn unpadded_whsec_secrets_are_accepted() {
        // 32 bytes: base64 ends with one `=`; 25 bytes: with `==`.
        for n in [32, 25] {
            let padded = base64::engine::general_purpose::STANDARD.encode(vec![9u8; n]);
            assert!(padded.ends_with('='), "{padded}");
            let unpadded = format!("whsec_{}", padded.trim_end_matches('='));
            assert_eq!(secret("s", &unpadded), Ok(()), "{unpadded}");
        }
    }

    #[test]
    fn standard_webhooks_takes_whsec_secrets_only() {
        let both = [SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks];
        let plain = "a plain secret of 24 bytes or more";
        let err = secret_for_schemes("s", plain, &both).unwrap_err();
        assert!(err.reason.contains("takes a whsec_ secret"), "{err}");
        assert!(!err.to_string().contains(plain), "{err}");
        assert_eq!(
            secret_for_schemes("s", plain, &[SignatureScheme::Qualifio]),
            Ok(())
        );
        assert_eq!(
            secret_for_schemes("s", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &both),
            Ok(())
        );
    }

    #[test]
    fn origins() {
        let a = "https://crm.example.com/hooks/a?x=1";
        assert!(!origin_changes(a, "https://crm.example.com/other"));
        assert!(!origin_changes(a, "https://CRM.example.com:443/a"));
        assert!(origin_changes(a, "https://evil.example.com/hooks/a?x=1"));
        assert!(origin_changes(a, "http://crm.example.com/hooks/a"));
        assert!(origin_changes(a, "https://crm.example.com:8443/hooks/a"));
        assert!(origin_changes(a, "not a url"));
    }
}
