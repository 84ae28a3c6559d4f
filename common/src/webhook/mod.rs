//! Webhooks as Pushwire sends them, shared by the worker's deliveries and the control plane's
//! `TestIntegration` and URL checks, so that a test request is exactly a delivery's:
//!
//! - [`signing`]: the `webhook-id` and the Qualifio and Standard Webhooks signatures (also
//!   used by receivers and tests to verify them);
//! - [`request`]: one attempt's request (headers, signatures, body), pure;
//! - [`ssrf`]: which addresses a webhook may go to, and the `--allow-cidr` allow-list;
//! - [`client`]: the one HTTP client, with the SSRF guard wired into name resolution;
//! - [`traceparent`]: the W3C `traceparent` a webhook carries, continuing the publisher's trace;
//! - [`WebhookArgs`]: the flags both binaries take to build that client.
//!
//! Nothing here knows about retries, breakers, metrics or routing: those are the worker's.

mod args;
pub mod client;
pub mod request;
pub mod signing;
pub mod ssrf;
pub mod traceparent;

pub use args::{DeliveryConfigError, WebhookArgs};
