//! End-to-end harness for the worker's `IngestService`: a control plane with its in-process
//! worker (`--with-worker`) on a fresh embedded store, delivering to loopback receivers; a wait
//! for the worker's readiness (gRPC health) and a barrier for configuration propagation;
//! participation documents derived from the Qualifio v2 fixtures; admin and publish shortcuts.
//! It starts real servers only and never reaches into the worker's internals.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::Config;
use pushwire_worker::config::Schedule;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::admin::Admin;
// The request literals live in `admin`; re-exported where the ingest tests first found them.
pub use crate::admin::{integration, scope};
use crate::control_plane::{AuthChannel, Backend, ControlPlane, as_admin, test_config};
use crate::eventually::{Poll, eventually};

/// The gRPC health service name the worker reports its readiness under.
pub const INGEST_SERVICE: &str = "pushwire.v1.IngestService";

/// A completed Qualifio v2 participation (campaign 418207 on website 5120, identified).
pub const COMPLETED: &str = include_str!("../../common/tests/data/participation-v2-completed.json");
/// `id` of [`COMPLETED`].
pub const COMPLETED_ID: &str = "9C2F61A0-3B7E-4D15-A8C2-5E0B7D41F3A9";

/// A participation in state `STARTED` (campaign 418207 on website 5120, identified).
pub const INCOMPLETE: &str =
    include_str!("../../common/tests/data/participation-v2-incomplete.json");
/// `id` of [`INCOMPLETE`].
pub const INCOMPLETE_ID: &str = "E47B0D3C-5A21-4C8F-B6D9-0A1B2C3D4E5F";

/// Campaign of both fixtures.
pub const FIXTURE_CAMPAIGN: &str = "418207";
/// Website of both fixtures.
pub const FIXTURE_WEBSITE: &str = "5120";

/// Account the propagation barrier ([`Stack::sync`]) creates its probes in; tests use others.
pub const PROBE_ACCOUNT: &str = "accounts/pushwire-probe";

/// Bound of every wait in this module (readiness, propagation, stream reads).
pub const WAIT: Duration = Duration::from_secs(10);

/// The test configuration of a control plane with its in-process worker, on the embedded store
/// in `dir`: plain `http://` and loopback receivers allowed, retries 50 ms apart within 2 s from
/// the default delivery store (SQLite in the data directory), claimed every 20 ms.
pub fn worker_config(dir: &Path) -> Config {
    let mut config = test_config(&Backend::Embedded(dir.join("data")));
    config.with_worker = true;
    config.allow_insecure_http = true;
    config.webhook.allow_cidr = vec!["127.0.0.0/8".into()];
    config.delivery.retry_schedule = Schedule(vec![Duration::from_millis(50); 10]);
    config.delivery.retry_window = Duration::from_secs(2);
    config.delivery.claim_interval = Duration::from_millis(20);
    config.delivery.delivery_lease = Duration::from_secs(5);
    config
}

/// Waits until the worker behind `channel` reports SERVING for [`INGEST_SERVICE`] (it has
/// applied a configuration snapshot), at most `limit`.
pub async fn wait_ingest_ready(channel: &Channel, limit: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let health = HealthClient::new(channel.clone());
    eventually(&format!("{INGEST_SERVICE} SERVING"), limit, || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest {
                    service: INGEST_SERVICE.into(),
                })
                .await
                .map(|r| r.into_inner().status);
            let serving = status.as_ref().ok() == Some(&(ServingStatus::Serving as i32));
            Ok(Poll::when(serving, status))
        }
    })
    .await
}

/// A control plane with its in-process worker, ready to ingest; stopped on drop.
#[derive(Debug)]
pub struct Stack {
    /// The control plane (admin API and IngestService on one address).
    pub cp: ControlPlane,
    channel: Channel,
    probes: AtomicUsize,
    // Dropped last: the store lives there.
    dir: tempfile::TempDir,
}

impl Stack {
    /// Starts one with [`worker_config`] and waits until the worker is ready.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_, _| Ok(())).await
    }

    /// Like [`Stack::start`], with `tweak` adjusting the configuration first; it gets the
    /// stack's temporary directory (for CA files and the like).
    pub async fn start_with(
        tweak: impl FnOnce(&mut Config, &Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = worker_config(dir.path());
        tweak(&mut config, dir.path())?;
        let cp = ControlPlane::start(config).await?;
        let channel = cp.raw_channel().await?;
        wait_ingest_ready(&channel, WAIT).await?;
        Ok(Self {
            cp,
            channel,
            probes: AtomicUsize::new(0),
            dir,
        })
    }

    /// The stack's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The worker's delivery store (the default of `--with-worker`: SQLite in the data
    /// directory), opened beside it.
    pub async fn delivery_store(
        &self,
    ) -> anyhow::Result<std::sync::Arc<dyn pushwire_common::delivery_store::DeliveryStore>> {
        let url = pushwire_common::delivery_store::StoreUrl::sqlite(
            self.dir
                .path()
                .join("data")
                .join(pushwire_control_plane::DELIVERY_STORE_FILE),
        );
        Ok(pushwire_common::delivery_store::open(&url, &Default::default()).await?)
    }

    /// The stored delivery of `participation` to `integration` (a resource name) once it has
    /// a final outcome, waiting at most `limit`.
    pub async fn settled(
        &self,
        integration: &str,
        participation: &str,
        limit: Duration,
    ) -> anyhow::Result<pushwire_common::delivery_store::DeliveryRecord> {
        use pushwire_common::delivery_store::{DeliveryKey, DeliveryState};
        let store = self.delivery_store().await?;
        let key = DeliveryKey::new(
            pushwire_common::domain::IntegrationName::parse(integration)?,
            participation,
        );
        eventually("the delivery settled in the store", limit, || async {
            Ok(match store.get(&key).await? {
                Some(r) if r.state != DeliveryState::Queued => Poll::Ready(r),
                other => Poll::not_yet(other.map(|r| (r.state, r.attempt_count))),
            })
        })
        .await
    }

    /// Stops the control plane (and its worker) and waits for the end of its drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        let Self { cp, dir, .. } = self;
        let stopped = cp.stop().await;
        drop(dir);
        stopped
    }

    /// A channel to the stack, sending no token.
    pub fn raw_channel(&self) -> Channel {
        self.channel.clone()
    }

    /// An IngestService client (admin token, which may publish).
    pub fn ingest(&self) -> pb::ingest_service_client::IngestServiceClient<AuthChannel> {
        pb::ingest_service_client::IngestServiceClient::new(as_admin(self.channel.clone()))
    }

    /// The admin API over the stack's address (admin token).
    pub fn admin(&self) -> Admin {
        Admin::new(as_admin(self.channel.clone()))
    }

    /// `PublishOne`, bounded by [`WAIT`].
    pub async fn publish_one(
        &self,
        req: pb::PublishRequest,
    ) -> anyhow::Result<Result<pb::PublishResponse, tonic::Status>> {
        let mut client = self.ingest();
        Ok(tokio::time::timeout(WAIT, client.publish_one(req))
            .await
            .context("PublishOne did not answer")?
            .map(tonic::Response::into_inner))
    }

    /// Opens a `Publish` stream.
    pub async fn open_stream(&self) -> anyhow::Result<PublishStream> {
        PublishStream::open(self.ingest()).await
    }

    /// Propagation barrier: returns once the worker routes with every configuration change made
    /// before the call.
    ///
    /// Changes reach the worker asynchronously, one revision at a time and in order. This makes
    /// one more change (a new probe integration with an ACCOUNT scope in [`PROBE_ACCOUNT`],
    /// incomplete participations SKIPped) and publishes an incomplete participation there until
    /// the response lists the probe as SKIPPED: routed, and nothing sent. The worker has then
    /// applied that revision, hence every earlier one.
    pub async fn sync(&self) -> anyhow::Result<()> {
        let n = self.probes.fetch_add(1, Ordering::SeqCst) + 1;
        let id = format!("probe-{n}");
        let probe = pb::Integration {
            // Never called: SKIP policy and incomplete participations only.
            incomplete_participations: pb::IncompleteParticipations::Skip.into(),
            ..integration(&format!("Probe {n}"), "http://127.0.0.1:9/never-called")
        };
        let name = self
            .admin()
            .create_routed(PROBE_ACCOUNT, &id, probe)
            .await?;
        let req = pb::PublishRequest {
            only_integrations: vec![name.clone()],
            ..request(PROBE_ACCOUNT, INCOMPLETE)
        };
        eventually(
            "the configuration propagated to the worker",
            WAIT,
            || async {
                let resp = self.publish_one(req.clone()).await??;
                let routed = resp
                    .deliveries
                    .iter()
                    .any(|d| d.integration == name && d.outcome() == pb::DeliveryOutcome::Skipped);
                anyhow::ensure!(
                    routed || (resp.error.is_empty() && resp.deliveries.is_empty()),
                    "unexpected probe response: {resp:?}"
                );
                Ok(Poll::when(routed, resp))
            },
        )
        .await
    }
}

/// A request publishing `json` for `account`, with no routing context and no trace context.
pub fn request(account: &str, json: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        account: account.into(),
        participation_json: json.into(),
        ..Default::default()
    }
}

/// The [`COMPLETED`] fixture as a JSON value with its `id` replaced, for tests to adjust.
pub fn completed_doc(id: &str) -> Value {
    let mut doc: Value = serde_json::from_str(COMPLETED).expect("the fixture is JSON");
    doc["id"] = json!(id);
    doc
}

/// A completed participation `id` of `campaign`, on `website` (none: the document has no
/// channel), identified (the form holds responses) or not (empty form).
pub fn participation(id: &str, campaign: u64, website: Option<u64>, identified: bool) -> String {
    let mut doc = completed_doc(id);
    doc["campaign"]["id"] = json!(campaign);
    match website {
        Some(w) => doc["campaign"]["channel"]["website"]["id"] = json!(w),
        None => {
            doc["campaign"]
                .as_object_mut()
                .expect("campaign is an object")
                .remove("channel");
        }
    }
    if !identified {
        doc["form"] = json!([]);
    }
    doc.to_string()
}

/// The deliveries of a response by integration name.
pub fn by_integration(resp: &pb::PublishResponse) -> BTreeMap<String, pb::Delivery> {
    resp.deliveries
        .iter()
        .map(|d| (d.integration.clone(), d.clone()))
        .collect()
}

/// The names of the integrations a response reports as DELIVERED.
pub fn delivered(resp: &pb::PublishResponse) -> BTreeSet<String> {
    resp.deliveries
        .iter()
        .filter(|d| d.outcome() == pb::DeliveryOutcome::Delivered)
        .map(|d| d.integration.clone())
        .collect()
}

/// A delivery as the worker reports a first attempt answered `status` (a retryable failure)
/// and handed off to the delivery store, without its `next_attempt_time` (compare with it
/// cleared).
pub fn queued_after(integration: &str, status: u16) -> pb::Delivery {
    pb::Delivery {
        integration: integration.into(),
        outcome: pb::DeliveryOutcome::Queued.into(),
        attempts: 1,
        last_status_code: i32::from(status),
        last_error: format!("HTTP {status}"),
        skip_reason: String::new(),
        next_attempt_time: None,
    }
}

/// `d` without its `next_attempt_time` (after checking a QUEUED one has it).
pub fn without_next_attempt(d: &pb::Delivery) -> pb::Delivery {
    if d.outcome() == pb::DeliveryOutcome::Queued {
        assert!(
            d.next_attempt_time.is_some(),
            "QUEUED without a time: {d:?}"
        );
    }
    pb::Delivery {
        next_attempt_time: None,
        ..d.clone()
    }
}

/// A delivery as the worker reports a first-try success with `200`.
pub fn delivered_once(integration: &str) -> pb::Delivery {
    pb::Delivery {
        integration: integration.into(),
        outcome: pb::DeliveryOutcome::Delivered.into(),
        attempts: 1,
        last_status_code: 200,
        last_error: String::new(),
        skip_reason: String::new(),
        next_attempt_time: None,
    }
}

/// A bidirectional `Publish` stream: requests go through a channel, responses are read with a
/// bound.
#[derive(Debug)]
pub struct PublishStream {
    tx: Option<mpsc::Sender<pb::PublishRequest>>,
    rx: tonic::Streaming<pb::PublishResponse>,
}

impl PublishStream {
    /// Opens a stream with `client`.
    pub async fn open(
        mut client: pb::ingest_service_client::IngestServiceClient<AuthChannel>,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(64);
        let call = client.publish(ReceiverStream::new(rx));
        let rx = tokio::time::timeout(WAIT, call)
            .await
            .context("Publish did not answer")?
            .context("Publish refused")?
            .into_inner();
        Ok(Self { tx: Some(tx), rx })
    }

    /// A sender of requests on this stream (for sending from another task).
    pub fn sender(&self) -> mpsc::Sender<pb::PublishRequest> {
        self.tx.clone().expect("the stream is not closed")
    }

    /// Sends one request.
    pub async fn send(&self, req: pb::PublishRequest) -> anyhow::Result<()> {
        self.sender()
            .send(req)
            .await
            .map_err(|_| anyhow::anyhow!("the request stream is gone"))
    }

    /// Closes the publisher's side (end of requests); responses keep coming.
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// The next response, `Ok(None)` at the end of the stream, `Err` when it ended with a
    /// status; fails when nothing comes within `limit`.
    pub async fn next(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<Result<Option<pb::PublishResponse>, tonic::Status>> {
        tokio::time::timeout(limit, self.rx.message())
            .await
            .with_context(|| format!("no response on the Publish stream within {limit:?}"))
    }

    /// The next `n` responses, by `request_id` (each must be distinct), each within [`WAIT`].
    pub async fn responses(
        &mut self,
        n: usize,
    ) -> anyhow::Result<HashMap<String, pb::PublishResponse>> {
        let mut out = HashMap::new();
        while out.len() < n {
            let resp = self
                .next(WAIT)
                .await?
                .context("the stream ended with an error")?
                .with_context(|| format!("the stream ended after {} responses", out.len()))?;
            let id = resp.request_id.clone();
            anyhow::ensure!(
                out.insert(id.clone(), resp).is_none(),
                "two responses for request {id:?}"
            );
        }
        Ok(out)
    }
}
