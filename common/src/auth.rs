//! Authentication and roles on every gRPC call (DESIGN §7).
//!
//! A caller sends `authorization: Bearer <token>`. The server knows tokens by their SHA-256
//! only: a token file (see [`parse_token_file`]) maps each hash to a [`Principal`] (a name for
//! the logs, a [`Role`] and the [`Accounts`] it may use), reloaded when the file changes;
//! `PUSHWIRE_ADMIN_TOKEN` and tokens made by the process itself are added beside it.
//!
//! Authentication is a tower layer ([`AuthLayer`]) in front of every service: a missing or
//! unknown token is refused with `UNAUTHENTICATED` before any handler runs; a known one puts
//! its [`Principal`] into the request's extensions (and the `authorization` header is removed).
//! Health checks and reflection stay open. Authorization is explicit in each handler, which
//! knows the account a request names: [`authorize`] checks the role against an [`Action`],
//! then [`Principal::account`] the account, both with `PERMISSION_DENIED`. The account check
//! never looks anything up, so a token of account A learns nothing about account B, not even
//! whether a resource exists there.
//!
//! Tokens never reach logs, errors or `Debug` output: the server only ever holds hashes, and
//! the client side ([`Bearer`]) redacts its value.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::codegen::{Service, http};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::domain::AccountName;
use crate::domain::Secret;

/// The metadata key of the token.
pub const AUTHORIZATION: &str = "authorization";

/// How often the token file is read again to pick up changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Environment variable of the bootstrap admin token (all accounts); never a flag, since
/// command lines are visible to every local user.
pub const ADMIN_TOKEN_ENV: &str = "PUSHWIRE_ADMIN_TOKEN";

/// Calls open without a token: health checks and server reflection (the API's schema only).
const OPEN_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Manage integrations and push scopes (TestIntegration included), read them, resolve,
    /// publish participations, for its accounts.
    Admin,
    /// Read integrations and push scopes, resolve pushes, for its accounts.
    Viewer,
    /// Publish participations (IngestService), for its accounts.
    Publisher,
    /// What a worker needs: WatchConfig (every account's configuration, secrets included) and
    /// disabling an integration that answered 410 Gone. Always for all accounts.
    Worker,
}

impl Role {
    /// Every role, in the order the token file documents them.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Viewer, Role::Publisher, Role::Worker];

    /// The name used in token files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Publisher => "publisher",
            Role::Worker => "worker",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this role may do `action` (on the accounts of its token).
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => matches!(action, Read | Manage | Disable | Publish),
            Role::Viewer => matches!(action, Read),
            Role::Publisher => matches!(action, Publish),
            Role::Worker => matches!(action, WatchConfig | Disable),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call does, as far as permissions go; each RPC names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Get, List, ResolvePushes.
    Read,
    /// Create, Update, Delete, TestIntegration.
    Manage,
    /// An UpdateIntegration that only sets `enabled: false` and `disabled_reason` (a worker
    /// after 410 Gone).
    Disable,
    /// Publish, PublishOne.
    Publish,
    /// WatchConfig: every account's configuration with its secrets.
    WatchConfig,
}

impl Action {
    fn describe(self) -> &'static str {
        match self {
            Action::Read => "read integrations and push scopes",
            Action::Manage => "change or test integrations and push scopes",
            Action::Disable => "disable integrations",
            Action::Publish => "publish participations",
            Action::WatchConfig => "watch the configuration",
        }
    }
}

/// The accounts a token may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accounts {
    /// Every account (`"*"` in the token file).
    All,
    /// These accounts only.
    Only(Vec<AccountName>),
}

/// Who is calling: what a known token stands for. Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// A label for logs (the token file's `name`).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Where.
    pub accounts: Accounts,
}

impl Principal {
    /// A principal for every account.
    pub fn everywhere(name: impl Into<String>, role: Role) -> Self {
        Self {
            name: name.into(),
            role,
            accounts: Accounts::All,
        }
    }

    /// `Ok` when the role allows `action`, else `PERMISSION_DENIED`.
    pub fn allow(&self, action: Action) -> Result<(), Status> {
        if self.role.allows(action) {
            return Ok(());
        }
        tracing::info!(token = %self.name, role = %self.role, ?action, "permission denied: role");
        Err(Status::permission_denied(format!(
            "the {} role may not {}",
            self.role,
            action.describe()
        )))
    }

    /// `Ok` when the token may use `account`, else `PERMISSION_DENIED`. Decided from the token
    /// alone, before anything is looked up: the answer is the same whether or not the account
    /// or the resource exists.
    pub fn account(&self, account: &AccountName) -> Result<(), Status> {
        let allowed = match &self.accounts {
            Accounts::All => true,
            Accounts::Only(list) => list.contains(account),
        };
        if allowed {
            return Ok(());
        }
        tracing::info!(token = %self.name, %account, "permission denied: account");
        Err(Status::permission_denied(format!(
            "this token may not use {account}"
        )))
    }

    /// `Ok` when the token may use every account, else `PERMISSION_DENIED`.
    pub fn all_accounts(&self) -> Result<(), Status> {
        if self.accounts == Accounts::All {
            return Ok(());
        }
        tracing::info!(token = %self.name, "permission denied: needs all accounts");
        Err(Status::permission_denied(
            "this call covers every account; the token is limited to some",
        ))
    }
}

/// The caller of `request`, as the [`AuthLayer`] found it; `UNAUTHENTICATED` when there is
/// none (a server without the layer).
pub fn caller<T>(request: &Request<T>) -> Result<Arc<Principal>, Status> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credentials"))
}

/// The caller of `request` if its role allows `action`; `PERMISSION_DENIED` otherwise. The
/// account, once the request is read, goes to [`Principal::account`].
pub fn authorize<T>(request: &Request<T>, action: Action) -> Result<Arc<Principal>, Status> {
    let who = caller(request)?;
    who.allow(action)?;
    Ok(who)
}

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
            }),
        };
        auth.swap(Vec::new());
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
    /// when new tokens are in use; on error the previous tokens stay.
    pub fn reload(&self) -> Result<bool, TokenFileError> {
        let Some(path) = &self.inner.file else {
            return Ok(false);
        };
        let bytes = std::fs::read(path).map_err(|e| TokenFileError {
            path: path.clone(),
            reason: e.to_string(),
        })?;
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
            .and_then(parse_token_file)
            .map_err(|reason| TokenFileError {
                path: path.clone(),
                reason,
            })?;
        let count = entries.len();
        self.swap(entries);
        *self.inner.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        tracing::info!(path = %path.display(), tokens = count, "token file loaded");
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
            if let Err(e) = self.reload() {
                tracing::error!(error = %e, "token file not reloaded; the previous tokens stay in use");
            }
        }
    }

    /// The layer that authenticates every call to a server.
    pub fn layer(&self) -> AuthLayer {
        AuthLayer { auth: self.clone() }
    }
}

/// Tower layer: authenticates every call except health and reflection (see the module).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// A service whose calls carry a known token.
#[derive(Clone, Debug)]
pub struct Authenticated<S> {
    inner: S,
    auth: Authenticator,
}

/// Why a call is not authenticated (the message of `UNAUTHENTICATED`).
fn authenticate<B>(auth: &Authenticator, req: &http::Request<B>) -> Result<Arc<Principal>, Status> {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Err(Status::unauthenticated(
            "missing credentials: send the metadata \"authorization: Bearer <token>\"",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("malformed credentials: expected \"Bearer <token>\"")
        })?;
    auth.authenticate(token)
        .ok_or_else(|| Status::unauthenticated("unknown token"))
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authenticated<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            req.headers_mut().remove(AUTHORIZATION);
            return Box::pin(self.inner.call(req));
        }
        match authenticate(&self.auth, &req) {
            Ok(principal) => {
                // The token goes no further than this layer.
                req.headers_mut().remove(AUTHORIZATION);
                req.extensions_mut().insert(principal);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::debug!(path, reason = status.message(), "call not authenticated");
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

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

    fn hex_of(token: &str) -> String {
        hex::encode(hash_token(token))
    }

    #[test]
    fn roles_allow_what_the_readme_says() {
        use Action::*;
        let table = [
            (Role::Admin, [true, true, true, true, false]),
            (Role::Viewer, [true, false, false, false, false]),
            (Role::Publisher, [false, false, false, true, false]),
            (Role::Worker, [false, false, true, false, true]),
        ];
        for (role, want) in table {
            for (action, allowed) in [Read, Manage, Disable, Publish, WatchConfig]
                .into_iter()
                .zip(want)
            {
                assert_eq!(role.allows(action), allowed, "{role} {action:?}");
            }
        }
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

        std::fs::write(&path, "{ broken").unwrap();
        assert!(auth.reload().is_err());
        assert_eq!(auth.authenticate("two").unwrap().role, Role::Publisher);
        assert!(auth.authenticate("boot").is_some());

        std::fs::write(&path, "{ broken").unwrap();
        let refused = Authenticator::builder()
            .token_file(Some(path.clone()))
            .build()
            .unwrap_err();
        assert!(refused.to_string().contains("tokens.json"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn accounts_are_checked_without_looking_anything_up() {
        let p = Principal {
            name: "acme".into(),
            role: Role::Viewer,
            accounts: Accounts::Only(vec![AccountName::parse("accounts/1").unwrap()]),
        };
        assert!(
            p.account(&AccountName::parse("accounts/1").unwrap())
                .is_ok()
        );
        let denied = p
            .account(&AccountName::parse("accounts/2").unwrap())
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "this token may not use accounts/2");
        assert!(p.all_accounts().is_err());
        assert_eq!(
            p.allow(Action::Manage).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

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
        let t = generate_token();
        assert!(t.expose().starts_with("pwt_") && t.expose().len() == 47);
    }
}
