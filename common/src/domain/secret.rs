//! A string that must never be printed: `Debug` and `Display` redact it, and reading it takes
//! an explicit call to [`Secret::expose`], which is easy to grep for.

use std::fmt;

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
}
