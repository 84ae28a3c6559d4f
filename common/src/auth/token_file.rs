//! The token file (JSON, tokens by SHA-256), token hashes, and new random tokens.

use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::policy::{Accounts, Principal, Role};
use crate::domain::{AccountName, Secret};

/// SHA-256 of a token, as token files hold it.
pub type TokenHash = [u8; 32];

/// The SHA-256 of `token` (of its UTF-8 bytes, as `printf %s "$TOKEN" | sha256sum` gives).
pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token: `pwt_` and 43 characters (32 random bytes, base64url).
pub fn generate_token() -> Secret {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(format!(
        "pwt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// A token file that cannot be used; says where, never what the hashes are.
#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {reason}")]
pub struct TokenFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Reads a token file: JSON, `{"tokens": [ENTRY, ...]}` (or the list alone), each entry
///
/// ```json
/// {"name": "acme-publisher", "sha256": "<64 hex digits>", "role": "publisher",
///  "accounts": ["accounts/42"]}
/// ```
///
/// with `role` one of `admin`, `viewer`, `publisher`, `worker`, and `accounts` a list of
/// account names or `"*"` for all (required for `worker`). Unknown keys, duplicate hashes and
/// empty names are refused, so that a typo does not silently grant or deny.
pub fn parse_token_file(text: &str) -> Result<Vec<(TokenHash, Principal)>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let entries = match &doc {
        Value::Array(list) => list,
        Value::Object(map) => {
            if let Some(k) = map.keys().find(|k| *k != "tokens") {
                return Err(format!("unknown key {k:?} (expected \"tokens\")"));
            }
            map.get("tokens")
                .and_then(Value::as_array)
                .ok_or("\"tokens\" must be a list")?
        }
        _ => return Err("expected an object with a \"tokens\" list".into()),
    };
    let mut out: Vec<(TokenHash, Principal)> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let at = |what: &str| format!("tokens[{i}]{what}");
        let map = entry
            .as_object()
            .ok_or_else(|| format!("{}: must be an object", at("")))?;
        if let Some(k) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "name" | "sha256" | "role" | "accounts"))
        {
            return Err(format!(
                "{}: unknown key {k:?} (expected name, sha256, role, accounts)",
                at("")
            ));
        }
        let string = |key: &str| {
            map.get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{}: required string", at(&format!(".{key}"))))
        };
        let name = string("name")?.trim().to_owned();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(format!("{}: 1 to 100 characters", at(".name")));
        }
        let hash = parse_hash(string("sha256")?).ok_or_else(|| {
            format!(
                "{}: expected the 64 hex digits of the token's SHA-256 \
                 (printf %s \"$TOKEN\" | sha256sum), never the token itself",
                at(".sha256")
            )
        })?;
        let role = string("role")?;
        let role = Role::parse(role).ok_or_else(|| {
            format!(
                "{}: unknown role {role:?} (admin, viewer, publisher or worker)",
                at(".role")
            )
        })?;
        let accounts = match map.get("accounts") {
            Some(Value::String(s)) if s == "*" => Accounts::All,
            Some(Value::Array(list)) if !list.is_empty() => {
                let mut names = Vec::with_capacity(list.len());
                for (j, a) in list.iter().enumerate() {
                    let raw = a.as_str().unwrap_or_default();
                    let name = AccountName::parse(raw)
                        .map_err(|e| format!("{}: {e}", at(&format!(".accounts[{j}]"))))?;
                    names.push(name);
                }
                Accounts::Only(names)
            }
            _ => {
                return Err(format!(
                    "{}: required: \"*\" (all accounts) or a non-empty list of account names",
                    at(".accounts")
                ));
            }
        };
        if role == Role::Worker && accounts != Accounts::All {
            return Err(format!(
                "{}: a worker token sees every account's configuration: use \"*\"",
                at(".accounts")
            ));
        }
        if let Some((_, other)) = out.iter().find(|(h, _)| *h == hash) {
            return Err(format!(
                "{}: same sha256 as the token named {:?}",
                at(".sha256"),
                other.name
            ));
        }
        out.push((
            hash,
            Principal {
                name,
                role,
                accounts,
            },
        ));
    }
    Ok(out)
}

/// 64 hex digits (either case) as a hash.
pub fn parse_hash(s: &str) -> Option<TokenHash> {
    let bytes = hex::decode(s.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(token: &str) -> String {
        hex::encode(hash_token(token))
    }

    #[test]
    fn token_files_parse_and_refuse_mistakes() {
        let good = format!(
            r#"{{"tokens": [
                {{"name": "ops", "sha256": "{}", "role": "admin", "accounts": "*"}},
                {{"name": "acme", "sha256": "{}", "role": "publisher", "accounts": ["accounts/42", "accounts/43"]}}
            ]}}"#,
            hex_of("a"),
            hex_of("b").to_uppercase()
        );
        let entries = parse_token_file(&good).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, hash_token("a"));
        assert_eq!(entries[1].0, hash_token("b"));
        assert_eq!(entries[1].1.role, Role::Publisher);
        assert_eq!(
            entries[1].1.accounts,
            Accounts::Only(vec![
                AccountName::parse("accounts/42").unwrap(),
                AccountName::parse("accounts/43").unwrap()
            ])
        );
        let h = hex_of("a");
        for (bad, says) in [
            ("[]x".to_owned(), "not JSON"),
            (r#"{"token": []}"#.to_owned(), "unknown key \"token\""),
            (
                format!(r#"[{{"name": "x", "sha256": "{h}", "role": "root", "accounts": "*"}}]"#),
                "tokens[0].role: unknown role",
            ),
            (
                r#"[{"name": "x", "sha256": "s3cret-token", "role": "admin", "accounts": "*"}]"#
                    .to_owned(),
                "tokens[0].sha256",
            ),
            (
                format!(r#"[{{"name": "x", "sha256": "{h}", "role": "admin", "accounts": []}}]"#),
                "tokens[0].accounts",
            ),
            (
                format!(
                    r#"[{{"name": "x", "sha256": "{h}", "role": "admin", "accounts": ["42"]}}]"#
                ),
                "tokens[0].accounts[0]",
            ),
            (
                format!(
                    r#"[{{"name": "w", "sha256": "{h}", "role": "worker", "accounts": ["accounts/1"]}}]"#
                ),
                "worker token sees every account",
            ),
            (
                format!(
                    r#"[{{"name": "x", "sha256": "{h}", "role": "admin", "accounts": "*", "acounts": 1}}]"#
                ),
                "unknown key \"acounts\"",
            ),
            (
                format!(
                    r#"[{{"name": "a", "sha256": "{h}", "role": "admin", "accounts": "*"}},
                        {{"name": "b", "sha256": "{h}", "role": "viewer", "accounts": "*"}}]"#
                ),
                "tokens[1].sha256: same sha256 as the token named \"a\"",
            ),
            (
                format!(r#"[{{"name": " ", "sha256": "{h}", "role": "admin", "accounts": "*"}}]"#),
                "tokens[0].name",
            ),
        ] {
            let err = parse_token_file(&bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("s3cret-token"), "{err}");
        }
    }

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        let t = generate_token();
        assert!(t.expose().starts_with("pwt_") && t.expose().len() == 47);
        assert_ne!(generate_token().expose(), t.expose());
    }
}
