//! Disables integrations whose endpoint answered `410 Gone` (DESIGN §4), through the control
//! plane's `UpdateIntegration` (`enabled: false` and a `disabled_reason`). The update carries
//! the etag of the integration as it was when it answered 410, so an admin's change made in
//! the meantime (a new URL, say) wins and nothing is disabled. Requests come from the
//! dispatcher over a bounded channel; the loop ends when the channel closes or on shutdown.
//!
//! Each attempt asks the control plane the config watch uses first, then the other
//! addresses of `--control-plane` in turn, so a surviving replica takes the update; only when
//! none answers does it back off.

use std::collections::HashMap;
use std::time::Duration;

use pb::integration_service_client::IntegrationServiceClient;
use pushwire_common::backoff::Backoff;
use pushwire_common::pb::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::control_plane::ControlPlanes;
use crate::deliver::dispatch::DisableRequest;

/// Capacity of the request channel: 410s are rare, and a full channel only means a later 410
/// asks again.
pub const QUEUE: usize = 64;

/// Attempts per request while no control plane is reachable (each tries every address).
const ATTEMPTS: u32 = 5;

/// Runs until `requests` closes or `shutdown`.
pub async fn run(
    planes: ControlPlanes,
    mut requests: mpsc::Receiver<DisableRequest>,
    shutdown: CancellationToken,
) {
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
        if disable(&planes, &req, &shutdown).await {
            done.insert(name, req.revision);
        }
    }
}

/// One request, retried while no control plane is available; true once settled.
async fn disable(
    planes: &ControlPlanes,
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
        for candidate in planes.for_call().await {
            let mut client = IntegrationServiceClient::new(candidate.channel);
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
                    tracing::warn!(integration = %req.integration, control_plane = %candidate.name, code = ?s.code(), "cannot reach the control plane to disable an integration; trying the next");
                }
                Err(s) => {
                    tracing::error!(integration = %req.integration, control_plane = %candidate.name, code = ?s.code(), message = s.message(), "control plane refused to disable an integration");
                    return false;
                }
            }
        }
        let wait = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep_until(Instant::now() + wait) => {}
            () = shutdown.cancelled() => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    //! The retries on the paused Tokio clock: a fake control plane over the in-memory channel
    //! (no socket), so the backoff's waits take no real time and are measured exactly.

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex, PoisonError};

    use pb::integration_service_server::{IntegrationService, IntegrationServiceServer};
    use pushwire_common::auth::Bearer;
    use pushwire_common::domain::IntegrationName;
    use tonic::service::interceptor::InterceptedService;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::control_plane::Candidate;

    /// Answers UpdateIntegration with the codes of its script in turn (OK once it is empty),
    /// and records when each call came.
    #[derive(Clone, Default)]
    struct Fake {
        script: Arc<Mutex<VecDeque<Code>>>,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl Fake {
        fn calls(&self) -> Vec<Instant> {
            self.calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl IntegrationService for Fake {
        async fn create_integration(
            &self,
            _: Request<pb::CreateIntegrationRequest>,
        ) -> Result<Response<pb::Integration>, Status> {
            unimplemented()
        }
        async fn get_integration(
            &self,
            _: Request<pb::GetIntegrationRequest>,
        ) -> Result<Response<pb::Integration>, Status> {
            unimplemented()
        }
        async fn list_integrations(
            &self,
            _: Request<pb::ListIntegrationsRequest>,
        ) -> Result<Response<pb::ListIntegrationsResponse>, Status> {
            unimplemented()
        }
        async fn update_integration(
            &self,
            request: Request<pb::UpdateIntegrationRequest>,
        ) -> Result<Response<pb::Integration>, Status> {
            self.calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Instant::now());
            let next = self
                .script
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            match next {
                None | Some(Code::Ok) => Ok(Response::new(
                    request.into_inner().integration.unwrap_or_default(),
                )),
                Some(code) => Err(Status::new(code, "scripted")),
            }
        }
        async fn delete_integration(
            &self,
            _: Request<pb::DeleteIntegrationRequest>,
        ) -> Result<Response<()>, Status> {
            unimplemented()
        }
        async fn test_integration(
            &self,
            _: Request<pb::TestIntegrationRequest>,
        ) -> Result<Response<pb::TestIntegrationResponse>, Status> {
            unimplemented()
        }
    }

    /// `fake` served in this runtime over in-memory pipes, as a control plane called `name`.
    fn candidate(fake: &Fake, name: &str) -> Candidate {
        let (channel, incoming) = crate::in_process::channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IntegrationServiceServer::new(fake.clone()))
                .serve_with_incoming(incoming),
        );
        Candidate {
            name: name.into(),
            channel: InterceptedService::new(channel, Bearer::none()),
        }
    }

    /// A control plane set of `fake` alone.
    fn client_of(fake: &Fake) -> ControlPlanes {
        ControlPlanes::channels(vec![candidate(fake, "fake")])
    }

    fn gone() -> DisableRequest {
        DisableRequest {
            integration: IntegrationName::parse("accounts/42/integrations/crm").expect("a name"),
            reason: "410 Gone".into(),
            revision: 7,
        }
    }

    fn scripted(codes: &[Code]) -> Fake {
        let fake = Fake::default();
        fake.script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(codes.iter().copied());
        fake
    }

    /// The waits between consecutive calls.
    fn gaps(calls: &[Instant]) -> Vec<Duration> {
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_control_plane_is_retried_with_a_growing_backoff() {
        let fake = scripted(&[Code::Unavailable, Code::DeadlineExceeded, Code::Unavailable]);
        let client = client_of(&fake);
        let settled = disable(&client, &gone(), &CancellationToken::new()).await;
        assert!(settled, "disabled on the fourth call");
        let calls = fake.calls();
        assert_eq!(calls.len(), 4);
        // Backoff from 200 ms, doubling, each wait jittered down to half at most.
        let gaps = gaps(&calls);
        for (gap, full) in gaps.iter().zip([200, 400, 800]) {
            let full = Duration::from_millis(full);
            assert!(*gap >= full / 2 && *gap <= full, "{gaps:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_control_plane_in_use_is_asked_first_then_the_others_without_waiting() {
        let (down, up, spare) = (
            scripted(&[Code::Unavailable]),
            Fake::default(),
            Fake::default(),
        );
        let planes = ControlPlanes::channels(vec![
            candidate(&spare, "spare"),
            candidate(&down, "down"),
            candidate(&up, "up"),
        ]);
        // The watch uses "down": asked first; then the list in order, "spare" taking it.
        planes.set_current(Some(planes.candidates().await[1].clone()));
        let started = Instant::now();
        assert!(disable(&planes, &gone(), &CancellationToken::new()).await);
        assert_eq!(down.calls().len(), 1);
        assert_eq!(spare.calls().len(), 1);
        assert!(up.calls().is_empty());
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no backoff between control planes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_end_after_five_attempts_and_refusals_are_not_retried() {
        let fake = scripted(&[Code::Unavailable; 6]);
        let client = client_of(&fake);
        assert!(!disable(&client, &gone(), &CancellationToken::new()).await);
        assert_eq!(fake.calls().len(), ATTEMPTS as usize);

        for (code, settled) in [
            (Code::Aborted, true),
            (Code::NotFound, true),
            (Code::PermissionDenied, false),
        ] {
            let fake = scripted(&[code]);
            let client = client_of(&fake);
            let got = disable(&client, &gone(), &CancellationToken::new()).await;
            assert_eq!(got, settled, "{code:?}");
            assert_eq!(fake.calls().len(), 1, "{code:?} is not retried");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_backoff_wait_at_once() {
        let fake = scripted(&[Code::Unavailable; 6]);
        let client = client_of(&fake);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let calls = fake.clone();
        tokio::spawn(async move {
            // Once the first call failed, the loop is in its backoff wait.
            while calls.calls().is_empty() {
                tokio::task::yield_now().await;
            }
            stop.cancel();
        });
        let started = Instant::now();
        assert!(!disable(&client, &gone(), &shutdown).await);
        assert_eq!(fake.calls().len(), 1, "no call after shutdown");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
    }
}
