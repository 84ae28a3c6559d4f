//! Resource names (AIP-122): `accounts/{account}`, `accounts/{account}/integrations/{id}`,
//! `accounts/{account}/pushScopes/{id}`. Every id is 1 to 63 characters of `a-z`, `0-9` and
//! `-`, not starting or ending with `-`, so ids are safe inside store keys and URLs.

use std::fmt;
use std::sync::Arc;

/// Why a resource name or id was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(String);

/// Checks an id against the id rules.
pub fn validate_id(id: &str) -> Result<(), InvalidName> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "invalid id {:?}: use 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
            truncate(id)
        )))
    }
}

/// Shortens what we echo back in errors, so a 10 MB input does not come back 10 MB long.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn split_collection<'a>(
    name: &'a str,
    collection: &str,
) -> Result<(&'a str, &'a str), InvalidName> {
    let bad = || {
        InvalidName(format!(
            "invalid name {:?}: expected accounts/{{account}}/{collection}/{{id}}",
            truncate(name)
        ))
    };
    let rest = name.strip_prefix("accounts/").ok_or_else(bad)?;
    let (account, rest) = rest.split_once('/').ok_or_else(bad)?;
    let id = rest
        .strip_prefix(collection)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(bad)?;
    validate_id(account)?;
    validate_id(id)?;
    Ok((account, id))
}

/// `accounts/{account}`. Its id is shared by its clones (and by the names built from it), so
/// the many names of one account in the worker's routing table hold one copy of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountName(Arc<str>);

impl AccountName {
    /// Parses `accounts/{account}`.
    pub fn parse(name: &str) -> Result<Self, InvalidName> {
        let id = name.strip_prefix("accounts/").ok_or_else(|| {
            InvalidName(format!(
                "invalid account {:?}: expected accounts/{{account}}",
                truncate(name)
            ))
        })?;
        validate_id(id)?;
        Ok(Self(id.into()))
    }

    /// From an already validated id.
    pub fn from_id(id: &str) -> Result<Self, InvalidName> {
        validate_id(id)?;
        Ok(Self(id.into()))
    }

    /// The account id (`42` in `accounts/42`).
    pub fn id(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "accounts/{}", self.0)
    }
}

macro_rules! child_name {
    ($(#[$doc:meta])* $ty:ident, $collection:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty {
            account: AccountName,
            id: String,
        }

        impl $ty {
            /// Parses the full resource name.
            pub fn parse(name: &str) -> Result<Self, InvalidName> {
                let (account, id) = split_collection(name, $collection)?;
                Ok(Self { account: AccountName(account.into()), id: id.to_owned() })
            }

            /// Builds the name from an account and an id, checking the id.
            pub fn new(account: &AccountName, id: &str) -> Result<Self, InvalidName> {
                validate_id(id)?;
                Ok(Self { account: account.clone(), id: id.to_owned() })
            }

            /// The account this resource belongs to.
            pub fn account(&self) -> &AccountName {
                &self.account
            }

            /// Makes this name hold `account`'s copy of the account id when it is the same
            /// account (a name parsed on its own has a copy of its own); else leaves it.
            pub fn share_account(&mut self, account: &AccountName) {
                if self.account == *account {
                    self.account = account.clone();
                }
            }

            /// The resource id (last segment of the name).
            pub fn id(&self) -> &str {
                &self.id
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}/{}/{}", self.account, $collection, self.id)
            }
        }
    };
}

child_name!(
    /// `accounts/{account}/integrations/{integration}`.
    IntegrationName,
    "integrations"
);
child_name!(
    /// `accounts/{account}/pushScopes/{scope}`.
    PushScopeName,
    "pushScopes"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = IntegrationName::parse("accounts/42/integrations/crm-1").unwrap();
        assert_eq!(n.account().id(), "42");
        assert_eq!(n.id(), "crm-1");
        assert_eq!(n.to_string(), "accounts/42/integrations/crm-1");
        let s = PushScopeName::parse("accounts/42/pushScopes/all").unwrap();
        assert_eq!(s.to_string(), "accounts/42/pushScopes/all");
        assert_eq!(
            AccountName::parse("accounts/42").unwrap().to_string(),
            "accounts/42"
        );
    }

    #[test]
    fn names_share_their_account() {
        let acme = AccountName::from_id("acme").unwrap();
        let mut crm = IntegrationName::parse("accounts/acme/integrations/crm").unwrap();
        assert!(!Arc::ptr_eq(&crm.account().0, &acme.0));
        crm.share_account(&acme);
        assert!(Arc::ptr_eq(&crm.account().0, &acme.0));
        assert_eq!(crm.to_string(), "accounts/acme/integrations/crm");
        // Another account is left alone.
        let mut other = PushScopeName::parse("accounts/beta/pushScopes/all").unwrap();
        other.share_account(&acme);
        assert_eq!(other.account().id(), "beta");
        let built = IntegrationName::new(&acme, "erp").unwrap();
        assert!(Arc::ptr_eq(&built.account().0, &acme.0));
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            "accounts/42",
            "accounts//integrations/x",
            "accounts/42/integrations/",
            "accounts/42/integrations/X",
            "accounts/42/integrations/a/b",
            "accounts/42/pushScopes/x",
            "accounts/42/integrations/-x",
            "integrations/x",
        ] {
            assert!(IntegrationName::parse(bad).is_err(), "{bad}");
        }
        assert!(AccountName::parse("accounts/a b").is_err());
        assert!(validate_id(&"a".repeat(64)).is_err());
        assert!(validate_id(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn errors_do_not_echo_huge_input() {
        let huge = "x".repeat(10 << 20);
        let err = IntegrationName::parse(&huge).unwrap_err().to_string();
        assert!(err.len() < 300, "{}", err.len());
    }
}
