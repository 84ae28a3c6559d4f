//! Pushwire worker: watches the configuration, accepts participation streams, routes each
//! participation by push scope and delivers it as signed webhooks.

pub mod config;
pub mod config_watch;
pub mod deliver;
pub mod router;
