//! Generated protobuf and gRPC bindings (`pushwire.v1`), plus the hand-written `Debug` of the
//! messages that carry secrets, which must never print them. (The storage records are the
//! control plane's: `pushwire_control_plane::store::pb`.)

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

/// Generated modules, nested as the proto packages are (prost refers across them by path).
mod pushwire {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/pushwire.v1.rs"));
    }
}

/// The public API, package `pushwire.v1`.
pub use pushwire::v1;

pub mod codec;

/// Encoded `FileDescriptorSet` of every Pushwire proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pushwire_descriptor.bin"));

use std::fmt;

const REDACTED: &str = "<redacted>";

fn redact(s: &str) -> &'static str {
    if s.is_empty() { "" } else { REDACTED }
}

impl fmt::Debug for v1::Integration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Integration")
            .field("name", &self.name)
            .field("display_name", &self.display_name)
            .field("url", &self.url)
            .field("enabled", &self.enabled)
            .field("incomplete_participations", &self.incomplete_participations)
            .field("payload_variables", &self.payload_variables)
            .field("auth_header", &self.auth_header)
            .field("secret", &redact(&self.secret))
            .field("secret_set", &self.secret_set)
            .field("secret_fingerprint", &self.secret_fingerprint)
            .field("signature_schemes", &self.signature_schemes)
            .field("disabled_reason", &self.disabled_reason)
            .field("etag", &self.etag)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::AuthHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthHeader")
            .field("name", &self.name)
            .field("value", &redact(&self.value))
            .field("value_set", &self.value_set)
            .finish()
    }
}

impl fmt::Debug for v1::IntegrationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntegrationConfig")
            .field("integration", &self.integration)
            .field("auth_header_value", &redact(&self.auth_header_value))
            .field("signing_secrets", &self.signing_secrets)
            .finish()
    }
}

impl fmt::Debug for v1::SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningSecret")
            .field("secret", &redact(&self.secret))
            .field("expire_time", &self.expire_time)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn debug_never_prints_secrets() {
        let cfg = v1::IntegrationConfig {
            integration: Some(v1::Integration {
                secret: "s3cr3t-one".into(),
                auth_header: Some(v1::AuthHeader {
                    name: "Authorization".into(),
                    value: "Bearer s3cr3t-two".into(),
                    value_set: true,
                }),
                ..Default::default()
            }),
            auth_header_value: "Bearer s3cr3t-two".into(),
            signing_secrets: vec![v1::SigningSecret {
                secret: "s3cr3t-one".into(),
                expire_time: None,
            }],
        };
        let printed = format!("{cfg:?} {cfg:#?}");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(printed.contains("Authorization"), "{printed}");
    }
}
