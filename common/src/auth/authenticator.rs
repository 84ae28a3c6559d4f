//! The tokens a server accepts: those of the token file, reloaded while the server runs, and
//! fixed ones added by the process (`PUSHWIRE_ADMIN_TOKEN`, an in-process worker's token).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::policy::{Principal, Role};
use super::token_file::{TokenFileError, TokenHash, hash_token, parse_token_file};
use crate::domain::Secret;

/// How often the token file is read again to pick up changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Environment variable of the bootstrap admin token (all accounts); never a flag, since
/// command lines are visible to every local user.
pub const ADMIN_TOKEN_ENV: &str = "PUSHWIRE_ADMIN_TOKEN";

type Table = HashMap<TokenHash, Arc<Principal>>;

/// The tokens a server accepts: those of the token file (reloaded by [`Authenticator::watch`])
/// and fixed ones added by the process. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    file: Option<PathBuf>,
    fixed: Vec<(TokenHash, Arc<Principal>)>,
    table: RwLock<Arc<Table>>,
    /// The file's bytes as last loaded, to notice changes.
    loaded: RwLock<Option<Vec<u8>>>,
    /// Why the file as it is now is not in force (the previous tokens are), if it is not.
    problem: RwLock<Option<String>>,
    /// Gauges set to 1 while the file is in force, 0 while it is not ([`Authenticator::report_to`]).
    gauges: Mutex<Vec<Gauge>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("file", &self.inner.file)
            .field("tokens", &self.len())
            .finish_non_exhaustive()
    }
}

/// Builds an [`Authenticator`].
#[derive(Debug, Default)]
pub struct AuthenticatorBuilder {
    file: Option<PathBuf>,
    fixed: Vec<(TokenHash, Arc<Principal>)>,
}

impl AuthenticatorBuilder {
    /// Tokens from this file, reloaded on change.
    pub fn token_file(mut self, path: Option<PathBuf>) -> Self {
        self.file = path;
        self
    }

    /// One more token, by its hash.
    pub fn hash(mut self, hash: TokenHash, principal: Principal) -> Self {
        self.fixed.push((hash, Arc::new(principal)));
        self
    }

    /// One more token.
    pub fn token(self, token: &Secret, principal: Principal) -> Self {
        self.hash(hash_token(token.expose()), principal)
    }

    /// `PUSHWIRE_ADMIN_TOKEN`, when given: an admin of every account.
    pub fn admin_token(self, token: Option<&Secret>) -> Self {
        match token {
            Some(t) => self.token(t, Principal::everywhere(ADMIN_TOKEN_ENV, Role::Admin)),
            None => self,
        }
    }

    /// Whether no token source was given at all (every call would be refused).
    pub fn is_empty(&self) -> bool {
        self.file.is_none() && self.fixed.is_empty()
    }

    /// Loads the token file; an unreadable or invalid one is an error (refuse to start).
    pub fn build(self) -> Result<Authenticator, TokenFileError> {
        let auth = Authenticator {
            inner: Arc::new(Inner {
                file: self.file,
                fixed: self.fixed,
                table: RwLock::new(Arc::default()),
                loaded: RwLock::new(None),
                problem: RwLock::new(None),
                gauges: Mutex::new(Vec::new()),
            }),
        };
        auth.swap(Vec::new());
        // A missing file at startup is a mistake (a wrong path, a volume not mounted); while
        // running, deleting it revokes its tokens (see `reload`).
        if let Some(path) = &auth.inner.file
            && let Err(e) = std::fs::metadata(path)
        {
            return Err(TokenFileError {
                path: path.clone(),
                reason: e.to_string(),
            });
        }
        auth.reload()?;
        Ok(auth)
    }
}

impl Authenticator {
    /// A builder with no token.
    pub fn builder() -> AuthenticatorBuilder {
        AuthenticatorBuilder::default()
    }

    /// The principal of `token`, if known.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        let table = self
            .inner
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        table.get(&hash_token(token)).cloned()
    }

    /// How many tokens are accepted now.
    pub fn len(&self) -> usize {
        self.inner
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no token is accepted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the token file again; swaps the tokens in when it changed and is valid. `Ok(true)`
    /// when new tokens are in use; on error the previous tokens stay, and
    /// [`Authenticator::token_file_problem`] says why until the file is in force again.
    ///
    /// An empty file (or only whitespace), and a file deleted while the server runs, hold no
    /// token: every token of the file is revoked at once (those the process adds itself stay).
    /// That is what an operator emptying it in an emergency expects; keeping the previous
    /// tokens would revoke nothing.
    pub fn reload(&self) -> Result<bool, TokenFileError> {
        let result = self.reload_file();
        let problem = result.as_ref().err().map(|e| e.reason.clone());
        let changed = {
            let mut current = self
                .inner
                .problem
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let changed = *current != problem;
            current.clone_from(&problem);
            changed
        };
        for gauge in self
            .inner
            .gauges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            gauge.set(i64::from(problem.is_none()));
        }
        if changed && problem.is_none() && self.inner.loaded.read().is_ok_and(|l| l.is_some()) {
            tracing::info!("token file in force again");
        }
        result
    }

    /// Why the token file as it is now is not in force (the previous tokens are): unreadable or
    /// invalid. `None` while it is, or without a token file.
    pub fn token_file_problem(&self) -> Option<String> {
        self.inner
            .problem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The line `/readyz` adds while the token file is not in force. Readiness itself does not
    /// fail: the previous tokens still work, and a mistake in a file every replica mounts
    /// would otherwise take every replica out of its Service at once (Prometheus treats a
    /// configuration it cannot reload the same way).
    pub fn readiness_warning(&self) -> Option<String> {
        self.token_file_problem().map(|problem| {
            format!("warning: token file not applied, the previous tokens stay in use: {problem}")
        })
    }

    /// Keeps `gauge` at 1 while the token file is in force (or there is none), 0 while it is
    /// not.
    pub fn report_to(&self, gauge: Gauge) {
        gauge.set(i64::from(self.token_file_problem().is_none()));
        self.inner
            .gauges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(gauge);
    }

    fn reload_file(&self) -> Result<bool, TokenFileError> {
        let Some(path) = &self.inner.file else {
            return Ok(false);
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            // Deleted: no token any more (a missing file at startup is refused by `build`).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(TokenFileError {
                    path: path.clone(),
                    reason: e.to_string(),
                });
            }
        };
        if self
            .inner
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(bytes.as_slice())
        {
            return Ok(false);
        }
        let entries = std::str::from_utf8(&bytes)
            .map_err(|_| "not UTF-8".to_owned())
            .and_then(|text| {
                if text.trim().is_empty() {
                    Ok(Vec::new())
                } else {
                    parse_token_file(text)
                }
            })
            .map_err(|reason| TokenFileError {
                path: path.clone(),
                reason,
            })?;
        let count = entries.len();
        self.swap(entries);
        *self.inner.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        if count == 0 {
            tracing::warn!(
                path = %path.display(),
                "token file empty or deleted: none of its tokens is accepted any more"
            );
        } else {
            tracing::info!(path = %path.display(), tokens = count, "token file loaded");
        }
        Ok(true)
    }

    fn swap(&self, entries: Vec<(TokenHash, Principal)>) {
        let mut table: Table = entries.into_iter().map(|(h, p)| (h, Arc::new(p))).collect();
        // Tokens of the process itself win over a file entry with the same hash.
        for (h, p) in &self.inner.fixed {
            table.insert(*h, p.clone());
        }
        *self.inner.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    /// The token file, if any.
    pub fn token_file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// Reloads the token file every `interval` until `stop`; an invalid file is logged and the
    /// previous tokens stay in use. Returns at once without a token file.
    pub async fn watch(self, interval: Duration, stop: CancellationToken) {
        if self.inner.file.is_none() {
            return;
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => return,
            }
            let before = self.token_file_problem();
            if let Err(e) = self.reload()
                && before.as_deref() != Some(e.reason.as_str())
            {
                // Once per new problem, not every interval; /readyz and the
                // token_file_applied gauge keep saying it.
                tracing::error!(error = %e, "token file not reloaded; the previous tokens stay in use");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(token: &str) -> String {
        hex::encode(hash_token(token))
    }

    #[test]
    fn reload_swaps_valid_files_and_keeps_the_last_good_one() {
        let dir = std::env::temp_dir().join(format!("pushwire-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.json");
        let entry = |token: &str, role: &str| {
            format!(
                r#"{{"tokens": [{{"name": "t", "sha256": "{}", "role": "{role}", "accounts": "*"}}]}}"#,
                hex_of(token)
            )
        };
        std::fs::write(&path, entry("one", "viewer")).unwrap();
        let auth = Authenticator::builder()
            .token_file(Some(path.clone()))
            .admin_token(Some(&Secret::new("boot")))
            .build()
            .unwrap();
        assert_eq!(auth.authenticate("one").unwrap().role, Role::Viewer);
        assert_eq!(auth.authenticate("boot").unwrap().role, Role::Admin);
        assert!(auth.authenticate("two").is_none());
        assert!(!auth.reload().unwrap(), "unchanged");

        std::fs::write(&path, entry("two", "publisher")).unwrap();
        assert!(auth.reload().unwrap());
        assert!(auth.authenticate("one").is_none());
        assert_eq!(auth.authenticate("two").unwrap().role, Role::Publisher);

        let gauge = Gauge::default();
        auth.report_to(gauge.clone());
        assert_eq!(gauge.get(), 1);
        assert_eq!(auth.token_file_problem(), None);
        std::fs::write(&path, "{ broken").unwrap();
        assert!(auth.reload().is_err());
        assert_eq!(auth.authenticate("two").unwrap().role, Role::Publisher);
        assert!(auth.authenticate("boot").is_some());
        // Not in force, and said so.
        assert_eq!(gauge.get(), 0);
        assert!(auth.token_file_problem().unwrap().contains("not JSON"));

        // Emptied: every token of the file is revoked, the process's own stay.
        // (Back to the tokens in use: in force again, nothing to swap.)
        std::fs::write(&path, entry("two", "publisher")).unwrap();
        assert!(!auth.reload().unwrap());
        assert_eq!(gauge.get(), 1);
        assert_eq!(auth.token_file_problem(), None);
        std::fs::write(&path, " \n").unwrap();
        assert!(auth.reload().unwrap());
        assert!(auth.authenticate("two").is_none());
        assert!(auth.authenticate("boot").is_some());
        assert_eq!(auth.token_file_problem(), None);
        // Deleted likewise.
        std::fs::write(&path, entry("two", "publisher")).unwrap();
        assert!(auth.reload().unwrap());
        assert!(auth.authenticate("two").is_some());
        std::fs::remove_file(&path).unwrap();
        assert!(auth.reload().unwrap());
        assert!(auth.authenticate("two").is_none());
        assert_eq!(gauge.get(), 1);
        // A missing file is still refused at startup.
        let refused = Authenticator::builder()
            .token_file(Some(path.clone()))
            .build()
            .unwrap_err();
        assert!(refused.to_string().contains("tokens.json"), "{refused}");

        std::fs::write(&path, "{ broken").unwrap();
        let refused = Authenticator::builder()
            .token_file(Some(path.clone()))
            .build()
            .unwrap_err();
        assert!(refused.to_string().contains("tokens.json"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
