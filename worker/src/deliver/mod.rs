//! Delivery: per-integration queues, retries and breakers. Requests are built, signed and sent
//! by [`pushwire_common::webhook`] (HTTP client with the SSRF guard).

pub mod breaker;
pub mod dispatch;
pub mod lane;
pub mod retry;
