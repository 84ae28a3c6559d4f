//! What the control plane and the worker share.
//!
//! - [`auth`]: tokens, roles and the layer that authenticates every gRPC call;
//! - [`pb`]: generated protobuf/gRPC bindings (the only place prost types are defined);
//! - [`domain`]: the domain types (no prost or storage types), push-scope matching and the
//!   conversions between the two;
//! - [`participation`]: parsing and validation of participation documents;
//! - [`payload`]: the body transformations an integration can ask for (the `variables`
//!   object);
//! - [`delivery_store`] (feature `server`): where deliveries live once handed off
//!   (PostgreSQL, embedded SQLite), their attempts and bodies;
//! - [`webhook`] (feature `server`): signing, request building, the SSRF guard and the HTTP
//!   client of webhooks, shared by the worker and TestIntegration;
//! - [`publisher`] (feature `publisher`): the client that publishes participations to
//!   workers, holding each until acknowledged (the `publish` command is built on it);
//! - [`server`] (feature `server`): what both servers run on: token and TLS flags, the gRPC
//!   server stack, health, shutdown, telemetry and gRPC metrics;
//! - [`target`]: address lists (`host:port`, `https://`, `dns:///` for every address of a
//!   name), as the publisher's worker endpoints and the worker's `--control-plane` take them.
//!
//! A Rust service that only publishes takes `default-features = false, features =
//! ["publisher"]` and compiles none of the server crates.

pub mod auth;
pub mod backoff;
#[cfg(feature = "server")]
pub mod delivery_store;
pub mod domain;
pub mod participation;
pub mod payload;
pub mod pb;
#[cfg(feature = "publisher")]
pub mod publisher;
#[cfg(feature = "server")]
pub mod server;
#[cfg(any(feature = "server", feature = "publisher"))]
pub mod target;
#[cfg(feature = "server")]
pub mod webhook;
