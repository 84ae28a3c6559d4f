//! Delivery: per-integration queues and breakers, the first attempt ([`dispatch`]), the hand-off
//! to the delivery store and the retries claimed from it ([`store`], [`retries`]). Requests are
//! built, signed and sent by [`pushwire_common::webhook`] (HTTP client with the SSRF guard).

pub mod breaker;
pub mod dispatch;
pub mod due;
pub mod lane;
pub mod retries;
pub mod retry;
pub mod store;
