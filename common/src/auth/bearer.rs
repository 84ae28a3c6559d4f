//! The client side: `authorization: Bearer <token>` on every call, for the worker's channel to
//! the control plane and for publishers (so not behind the `server` feature).

use std::fmt;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::domain::Secret;

/// The metadata key of the token.
pub const AUTHORIZATION: &str = "authorization";

/// Client side: adds `authorization: Bearer <token>` to every call (nothing when empty). Its
/// `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// No token.
    pub fn none() -> Self {
        Self(None)
    }

    /// Sends `token`; fails when it cannot be a header value (control characters, non-ASCII).
    pub fn new(token: &Secret) -> Result<Self, InvalidToken> {
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", token.expose().trim()))
                .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Whether a token is sent.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

/// A token that cannot be sent as a header value.
#[derive(Debug, thiserror::Error)]
#[error("the token holds characters a header cannot carry (printable ASCII only)")]
pub struct InvalidToken;

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Bearer(<redacted>)",
            None => "Bearer(none)",
        })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_never_shows_its_token() {
        let b = Bearer::new(&Secret::new("pwt_s3cret")).unwrap();
        assert_eq!(format!("{b:?}"), "Bearer(<redacted>)");
        let mut b2 = b.clone();
        let req = b2.call(Request::new(())).unwrap();
        let v = req.metadata().get(AUTHORIZATION).unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer pwt_s3cret");
        assert!(!format!("{v:?}").contains("s3cret"));
        assert!(Bearer::new(&Secret::new("bad\ntoken")).is_err());
    }
}
