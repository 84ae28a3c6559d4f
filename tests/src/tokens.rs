//! Token files as the servers read them (`--token-file`): entries by SHA-256 of the token,
//! written in one step, as Kubernetes replaces a mounted Secret.

use std::path::Path;

use anyhow::Context as _;
use serde_json::{Value, json};

/// The accounts a token may act for.
#[derive(Clone, Copy, Debug)]
pub enum Accounts<'a> {
    /// Every account (`"*"`).
    All,
    /// These accounts only.
    Only(&'a [&'a str]),
}

/// One entry of a token file: `token` (stored as its hash) with `role` for `accounts`.
pub fn entry(name: &str, token: &str, role: &str, accounts: Accounts<'_>) -> Value {
    let sha256: String = pushwire_common::auth::hash_token(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let accounts = match accounts {
        Accounts::All => json!("*"),
        Accounts::Only(list) => json!(list),
    };
    json!({"name": name, "sha256": sha256, "role": role, "accounts": accounts})
}

/// The text of a token file holding `entries`.
pub fn token_file_text(entries: &[Value]) -> String {
    json!({ "tokens": entries }).to_string()
}

/// Writes `text` to `path` in one step (a temporary file renamed over it): a reloading reader
/// sees the old file or the new one, never half of it.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Writes a token file holding `entries` to `path` (see [`write_atomically`]).
pub fn write_token_file(path: &Path, entries: &[Value]) -> anyhow::Result<()> {
    write_atomically(path, &token_file_text(entries))
}
