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
//!
//! One job per module:
//!
//! - [`policy`]: roles, accounts and what a token may do; refusals are a [`Denied`], not a
//!   gRPC status;
//! - [`token_file`]: the JSON token file, token hashes and new tokens;
//! - [`authenticator`]: the tokens a server accepts, reloaded from the token file;
//! - [`layer`]: the tower layer on the servers, and the one place where a refusal becomes a
//!   `Status`;
//! - [`bearer`]: the client side, which publishers need too (the only part outside the
//!   `server` feature).

#[cfg(feature = "server")]
pub mod authenticator;
pub mod bearer;
#[cfg(feature = "server")]
pub mod layer;
#[cfg(feature = "server")]
pub mod policy;
#[cfg(feature = "server")]
pub mod token_file;

#[cfg(feature = "server")]
pub use authenticator::{ADMIN_TOKEN_ENV, Authenticator, AuthenticatorBuilder, RELOAD_INTERVAL};
pub use bearer::{AUTHORIZATION, Bearer, InvalidToken};
#[cfg(feature = "server")]
pub use layer::{AuthLayer, Authenticated, authorize, caller};
#[cfg(feature = "server")]
pub use policy::{Accounts, Action, Denied, Principal, Role};
#[cfg(feature = "server")]
pub use token_file::{
    TokenFileError, TokenHash, generate_token, hash_token, parse_hash, parse_token_file,
};
