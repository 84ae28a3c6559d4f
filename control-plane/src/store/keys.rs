//! The etcd key layout, in one place. Every key lives under [`ROOT`]:
//!
//! ```text
//! /pushwire/v1/accounts/{account}/integrations/{integration}   IntegrationRecord (protobuf)
//! /pushwire/v1/accounts/{account}/pushScopes/{scope}           PushScopeRecord (protobuf)
//! /pushwire/v1/meta/encryption-check                           EncryptionCheckRecord (protobuf)
//! ```
//!
//! Prefixes always end with `/`, so account `4` never matches account `42`.

/// Prefix of every Pushwire key.
pub const ROOT: &str = "/pushwire/v1/";

/// A known text encrypted with the keys of the secrets at rest: a control plane whose keys do
/// not decrypt it refuses to start (see `store::encryption`).
pub const ENCRYPTION_CHECK: &str = "/pushwire/v1/meta/encryption-check";

/// Prefix of everything stored for one account.
pub fn account_prefix(account: &str) -> String {
    format!("{ROOT}accounts/{account}/")
}

/// Prefix of the integrations of one account.
pub fn integrations_prefix(account: &str) -> String {
    format!("{ROOT}accounts/{account}/integrations/")
}

/// Key of one integration.
pub fn integration(account: &str, id: &str) -> String {
    format!("{ROOT}accounts/{account}/integrations/{id}")
}

/// Prefix of the push scopes of one account.
pub fn push_scopes_prefix(account: &str) -> String {
    format!("{ROOT}accounts/{account}/pushScopes/")
}

/// Key of one push scope.
pub fn push_scope(account: &str, id: &str) -> String {
    format!("{ROOT}accounts/{account}/pushScopes/{id}")
}

/// What a key under [`ROOT`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// An integration key: account and integration ids.
    Integration(&'a str, &'a str),
    /// A push scope key: account and scope ids.
    PushScope(&'a str, &'a str),
}

/// Parses a key written by this module; `None` for anything else.
pub fn parse(key: &str) -> Option<Parsed<'_>> {
    let rest = key.strip_prefix(ROOT)?.strip_prefix("accounts/")?;
    let mut parts = rest.split('/');
    let (account, collection, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || account.is_empty() || id.is_empty() {
        return None;
    }
    match collection {
        "integrations" => Some(Parsed::Integration(account, id)),
        "pushScopes" => Some(Parsed::PushScope(account, id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = integration("42", "crm");
        assert_eq!(k, "/pushwire/v1/accounts/42/integrations/crm");
        assert_eq!(parse(&k), Some(Parsed::Integration("42", "crm")));
        let k = push_scope("42", "all");
        assert_eq!(parse(&k), Some(Parsed::PushScope("42", "all")));
        assert!(k.starts_with(&push_scopes_prefix("42")));
        assert!(!k.starts_with(&account_prefix("4")));
    }

    #[test]
    fn foreign_keys_are_rejected() {
        for k in [
            "/pushwire/v1/accounts/42/other/x",
            "/pushwire/v1/accounts/42/integrations/",
            "/pushwire/v1/accounts/42/integrations/a/b",
            ENCRYPTION_CHECK,
            "/elsewhere/accounts/42/integrations/a",
        ] {
            assert_eq!(parse(k), None, "{k}");
        }
    }
}
