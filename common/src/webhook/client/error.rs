//! What an attempt that got no HTTP response ran into ([`AttemptError`]), read from reqwest's
//! cause chain. Messages are cut short and never hold header values, bodies or URL queries.

use std::error::Error as StdError;
use std::net::IpAddr;

use super::resolve::ResolveFailure;
use crate::webhook::ssrf::NonPublic;

/// Longest error message kept: messages end up in delivery records and spans.
const MAX_MESSAGE_CHARS: usize = 300;

/// Why an attempt got no HTTP response. Messages never hold header values, bodies or URLs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// The SSRF guard refused an address of the host.
    #[error("refused to connect to {host}: {addr} is {class}, {}", class.verdict())]
    Blocked {
        /// The URL's host.
        host: String,
        /// The refused address (a literal one, or one the host resolved to).
        addr: IpAddr,
        /// Why: the special-purpose range the address is in.
        class: NonPublic,
    },
    /// The host name could not be resolved.
    #[error("could not resolve host: {0}")]
    Resolve(String),
    /// No connection could be made, or it broke before a response.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The connect or request timeout ran out.
    #[error("timed out")]
    Timeout,
    /// The TLS handshake failed (e.g. untrusted or mismatched certificate).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The URL is not an absolute http(s) URL with a host.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// A header name or value cannot be sent (only the name is reported).
    #[error("invalid header {name:?}")]
    InvalidHeader {
        /// The offending header's name.
        name: String,
    },
    /// The exchange failed after the connection was made.
    #[error("I/O error: {0}")]
    Io(String),
}

impl AttemptError {
    /// Whether a later attempt may succeed: network trouble yes; refusals, bad URLs and
    /// TLS failures (a certificate does not fix itself within a retry window) no.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Resolve(_) | Self::Connect(_) | Self::Timeout | Self::Io(_) => true,
            Self::Blocked { .. }
            | Self::Tls(_)
            | Self::InvalidUrl(_)
            | Self::InvalidHeader { .. } => false,
        }
    }

    /// A short stable name, for the `error.type` span attribute and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Blocked { .. } => "blocked",
            Self::Resolve(_) => "resolve",
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Tls(_) => "tls",
            Self::InvalidUrl(_) => "invalid_url",
            Self::InvalidHeader { .. } => "invalid_header",
            Self::Io(_) => "io",
        }
    }
}

/// Maps a reqwest error to an [`AttemptError`] by what is found in its cause chain.
pub(super) fn classify(err: reqwest::Error) -> AttemptError {
    // The URL may carry a token in its query: never let it into a message.
    let err = err.without_url();
    if let Some(failure) = find_cause::<ResolveFailure>(&err) {
        return match failure {
            ResolveFailure::Blocked { host, addr, class } => AttemptError::Blocked {
                host: host.clone(),
                addr: *addr,
                class: *class,
            },
            ResolveFailure::Lookup { .. } => AttemptError::Resolve(truncate(failure.to_string())),
        };
    }
    if err.is_timeout() {
        return AttemptError::Timeout;
    }
    if let Some(tls) = find_cause::<rustls::Error>(&err) {
        return AttemptError::Tls(truncate(tls.to_string()));
    }
    if err.is_builder() {
        return AttemptError::InvalidUrl(chain_message(&err));
    }
    if err.is_connect() {
        return AttemptError::Connect(chain_message(&err));
    }
    AttemptError::Io(chain_message(&err))
}

/// The first error of type `T` in `err`'s cause chain. An `io::Error` is looked into with
/// `get_ref` rather than `source`, which skips the error it wraps (TLS failures arrive as a
/// `rustls::Error` inside two nested `io::Error`s).
fn find_cause<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next = Some(err);
    // Bounded: cause chains are short; a cycle must not hang an attempt.
    for _ in 0..32 {
        let e = next?;
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    None
}

/// `outer: cause: root cause`, without repeats, truncated.
pub(super) fn chain_message(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    for _ in 0..8 {
        let Some(e) = next else { break };
        let msg = e.to_string();
        if !parts.last().is_some_and(|last| last.contains(&msg)) {
            parts.push(msg);
        }
        next = e.source();
    }
    truncate(parts.join(": "))
}

fn truncate(mut s: String) -> String {
    if let Some((i, _)) = s.char_indices().nth(MAX_MESSAGE_CHARS) {
        s.truncate(i);
        s.push('…');
    }
    s
}
