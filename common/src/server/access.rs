//! The flags both servers take for who may call them and over what: tokens
//! (`--token-file`, `PUSHWIRE_ADMIN_TOKEN`) and TLS (`--tls-cert`, `--tls-key`,
//! `--tls-client-ca`), each with its `PUSHWIRE_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::auth::{Authenticator, AuthenticatorBuilder};
use crate::domain::Secret;

/// Who may call a gRPC server and over what: tokens and TLS. Shared by the worker and the
/// control plane.
#[derive(Clone, Debug, Args)]
pub struct AccessArgs {
    /// JSON file of the accepted tokens, by SHA-256 (never the tokens themselves), each with a
    /// role and accounts (see docs/operations.md); reloaded within seconds when it changes. Health and
    /// reflection need no token.
    #[arg(long, env = "PUSHWIRE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// PUSHWIRE_ADMIN_TOKEN, from the environment only (never a flag: command lines are
    /// visible to every local user): one more token, admin of every account, for
    /// bootstrapping.
    #[arg(skip = secret_from_env(crate::auth::ADMIN_TOKEN_ENV))]
    pub admin_token: Option<Secret>,

    /// PEM certificate chain of the gRPC server: with --tls-key, the server speaks TLS only.
    #[arg(long, env = "PUSHWIRE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "PUSHWIRE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: every client must then present a certificate they signed (mTLS).
    #[arg(long, env = "PUSHWIRE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Why the access settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A file cannot be read.
    #[error("{flag} {path}: {source}")]
    File {
        /// The flag naming it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token file is invalid.
    #[error(transparent)]
    TokenFile(#[from] crate::auth::TokenFileError),
    /// A token cannot be sent.
    #[error("{0}: {1}")]
    Token(&'static str, crate::auth::InvalidToken),
    /// Other TLS settings problems.
    #[error("{0}")]
    Tls(String),
}

/// Reads a file named by `flag`.
pub fn read_file(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, AccessError> {
    std::fs::read(path).map_err(|source| AccessError::File {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// A secret from the environment variable `name`, when set and not blank.
pub fn secret_from_env(name: &str) -> Option<Secret> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| Secret::new(v.trim()))
}

impl AccessArgs {
    /// The defaults, as if given no flags (the environment's admin token aside).
    pub fn defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            access: AccessArgs,
        }
        Only::parse_from(["access"]).access
    }

    /// The tokens accepted: the token file and `PUSHWIRE_ADMIN_TOKEN`, plus what `extra` adds.
    /// An unreadable or invalid token file is an error.
    pub fn authenticator(
        &self,
        extra: impl FnOnce(AuthenticatorBuilder) -> AuthenticatorBuilder,
    ) -> Result<Authenticator, AccessError> {
        let builder = Authenticator::builder()
            .token_file(self.token_file.clone())
            .admin_token(self.admin_token.as_ref());
        let auth = extra(builder).build()?;
        if auth.is_empty() && auth.token_file().is_none() {
            tracing::warn!(
                "no token configured (--token-file, PUSHWIRE_ADMIN_TOKEN): every call but health \
                 and reflection will be refused with UNAUTHENTICATED"
            );
        }
        Ok(auth)
    }

    /// The server's TLS settings, `None` without --tls-cert.
    pub fn server_tls(&self) -> Result<Option<ServerTlsConfig>, AccessError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let identity =
            Identity::from_pem(read_file("--tls-cert", cert)?, read_file("--tls-key", key)?);
        let mut tls = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read_file("--tls-client-ca", ca)?));
        }
        Ok(Some(tls))
    }
}
