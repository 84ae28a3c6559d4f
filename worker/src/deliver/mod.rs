//! Delivery: per-integration queues, HTTP client with the SSRF guard, retries and breakers.

pub mod breaker;
pub mod client;
pub mod dispatch;
pub mod lane;
pub mod request;
pub mod retry;
pub mod ssrf;
