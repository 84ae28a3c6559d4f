//! The worker's channel to the control plane, shared by the config watch and the 410
//! consumer: its type (calls carry the worker's token) and the endpoint settings it is made
//! with.

use std::time::Duration;

use pushwire_common::auth::Bearer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A channel to the control plane whose calls carry the worker's token.
pub type ControlPlaneChannel = InterceptedService<Channel, Bearer>;

/// An endpoint for the control plane with the settings the watch needs: a connect timeout,
/// and HTTP/2 keep-alives so a control plane that vanished without closing the connection (a
/// dead node, a network partition) is noticed and the loop reconnects instead of waiting on
/// a silent stream forever. Add TLS to it as needed, then `connect_lazy()`.
pub fn endpoint(uri: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri.into())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_takes_uris_only() {
        assert!(endpoint("http://127.0.0.1:1").is_ok());
        assert!(endpoint("not a uri").is_err());
    }
}
