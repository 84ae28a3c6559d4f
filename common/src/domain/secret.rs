//! A string that must never be printed: `Debug` and `Display` redact it, and reading it takes
//! an explicit call to [`Secret::expose`], which is easy to grep for.

use std::fmt;

use sha2::{Digest, Sha256};

/// A secret string (signing secret, auth header value).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for signing or sending; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `sha256:` and the first 12 hex digits of SHA-256 of the secret: enough to tell secrets
    /// apart, far too little to guess one.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        format!("sha256:{}", &hex::encode(digest)[..12])
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2-abc");
        assert_eq!(format!("{s:?} {s} {s:#?}").matches("hunter2").count(), 0);
        assert_eq!(s.expose(), "hunter2-abc");
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        let a = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_eq!(a.fingerprint().len(), "sha256:".len() + 12);
        assert_ne!(a.fingerprint(), Secret::new("other").fingerprint());
    }
}
