//! Disables integrations whose endpoint answered `410 Gone` (DESIGN §4), through the control
//! plane's `UpdateIntegration` (`enabled: false` and a `disabled_reason`). The update carries
//! the etag of the integration as it was when it answered 410, so an admin's change made in
//! the meantime (a new URL, say) wins and nothing is disabled. Requests come from the
//! dispatcher over a bounded channel; the loop ends when the channel closes or on shutdown.

use std::collections::HashMap;
use std::time::Duration;

use pb::integration_service_client::IntegrationServiceClient;
use pushwire_common::backoff::Backoff;
use pushwire_common::pb::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::control_plane::ControlPlaneChannel;
use crate::deliver::dispatch::DisableRequest;

/// Capacity of the request channel: 410s are rare, and a full channel only means a later 410
/// asks again.
pub const QUEUE: usize = 64;

/// Attempts per request while the control plane is unreachable.
const ATTEMPTS: u32 = 5;

/// Runs until `requests` closes or `shutdown`.
pub async fn run(
    channel: ControlPlaneChannel,
    mut requests: mpsc::Receiver<DisableRequest>,
    shutdown: CancellationToken,
) {
    let mut client = IntegrationServiceClient::new(channel);
    // Revision already disabled per integration, so the many 410s of one endpoint make one
    // update.
    let mut done: HashMap<String, i64> = HashMap::new();
    loop {
        let req = tokio::select! {
            r = requests.recv() => match r { Some(r) => r, None => return },
            () = shutdown.cancelled() => return,
        };
        let name = req.integration.to_string();
        if done.get(&name).is_some_and(|r| *r >= req.revision) {
            continue;
        }
        if disable(&mut client, &req, &shutdown).await {
            done.insert(name, req.revision);
        }
    }
}

/// One request, retried while the control plane is unavailable; true once settled.
async fn disable(
    client: &mut IntegrationServiceClient<ControlPlaneChannel>,
    req: &DisableRequest,
    shutdown: &CancellationToken,
) -> bool {
    let update = pb::UpdateIntegrationRequest {
        integration: Some(pb::Integration {
            name: req.integration.to_string(),
            enabled: Some(false),
            disabled_reason: req.reason.clone(),
            etag: req.revision.to_string(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["enabled".into(), "disabled_reason".into()],
        }),
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    for _ in 0..ATTEMPTS {
        let mut call = tonic::Request::new(update.clone());
        call.set_timeout(Duration::from_secs(10));
        match client.update_integration(call).await {
            Ok(_) => {
                tracing::warn!(integration = %req.integration, "endpoint answered 410 Gone: integration disabled");
                return true;
            }
            // Changed, deleted or already gone since: nothing to do.
            Err(s) if matches!(s.code(), Code::Aborted | Code::NotFound) => {
                tracing::info!(integration = %req.integration, code = ?s.code(), "not disabled after 410: the integration changed meanwhile");
                return true;
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
                ) =>
            {
                tracing::warn!(integration = %req.integration, code = ?s.code(), "cannot reach the control plane to disable an integration; retrying");
                let wait = backoff.next_delay();
                tokio::select! {
                    () = tokio::time::sleep_until(Instant::now() + wait) => {}
                    () = shutdown.cancelled() => return false,
                }
            }
            Err(s) => {
                tracing::error!(integration = %req.integration, code = ?s.code(), message = s.message(), "control plane refused to disable an integration");
                return false;
            }
        }
    }
    false
}
