//! Workers fail over between control planes, and say how stale their configuration is. Real
//! processes (the `*-under-test` binaries) on one real etcd, loopback only, every wait bounded:
//!
//! - two control planes, one worker given both: the first is killed, a change made through the
//!   second reaches the worker, which resumed from its revision (one snapshot in all);
//! - with every control plane gone the worker stays ready and delivers with the configuration
//!   it has while `pushwire_worker_config_staleness_seconds` grows and a warning is logged;
//!   once a control plane is back the staleness drops;
//! - a control plane cut off from etcd stops confirming (no progress messages), so the
//!   staleness grows although the stream is up, and refuses workers that resume.
//!
//! The control planes send progress messages every 200 ms and the worker warns after 1 s
//! (hidden flags), so the tests take seconds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::{Admin, scope};
use pushwire_tests::control_plane::with_token;
use pushwire_tests::etcd::EtcdServer;
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::faults::{
    ACCOUNT, ControlPlaneProc, CountingReceiver, PUBLISHER_TOKEN, Store, WORKER_TOKEN, WorkerFlags,
    WorkerProc, create_integration, create_scope, doc, http_get,
};
use pushwire_tests::worker::request;
use tonic::transport::Channel;

const WORKER: &str = env!("CARGO_BIN_EXE_pushwire-worker-under-test");
const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_pushwire-control-plane-under-test");

/// Bound on a whole test.
const TEST: Duration = Duration::from_secs(120);

/// Bound on one wait.
const WAIT: Duration = Duration::from_secs(20);

/// The worker's `--config-stale-after`.
const STALE_AFTER: &str = "1s";

const STALENESS: &str = "pushwire_worker_config_staleness_seconds";
const SNAPSHOTS: &str = "pushwire_worker_config_snapshots_total";

/// A directory of its own under `dir` (logs, token file) for one process.
fn subdir(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

async fn control_plane(
    dir: &Path,
    name: &str,
    etcd: &EtcdServer,
) -> anyhow::Result<ControlPlaneProc> {
    ControlPlaneProc::start_with(
        Path::new(CONTROL_PLANE),
        &subdir(dir, name)?,
        &Store::Etcd(etcd.endpoint()),
        &["--watch-progress-interval", "200ms"],
    )
    .await
}

/// A worker following `control_planes` (its token file is the first control plane's, in
/// `cp_dir`).
async fn worker(cp_dir: &Path, control_planes: &[&ControlPlaneProc]) -> anyhow::Result<WorkerProc> {
    let list: Vec<String> = control_planes.iter().map(|cp| cp.url()).collect();
    let flags = WorkerFlags {
        extra: vec!["--config-stale-after".into(), STALE_AFTER.into()],
        ..WorkerFlags::default()
    };
    WorkerProc::start(Path::new(WORKER), cp_dir, 1, &list.join(","), &flags).await
}

/// Creates integration `id` posting to `receiver`, with an ACCOUNT scope; the revision.
async fn route_to(admin: &Admin, id: &str, receiver: &CountingReceiver) -> anyhow::Result<i64> {
    let name = create_integration(admin, id, &receiver.url()).await?;
    create_scope(admin, id, scope(&name, pb::PushScopeLevel::Account, "")).await
}

/// Publishes participation `i` to `worker` with PublishOne; the integrations it was
/// delivered to.
async fn publish(worker: &WorkerProc, i: usize) -> anyhow::Result<Vec<String>> {
    let channel = Channel::from_shared(worker.url())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut client = pb::ingest_service_client::IngestServiceClient::new(with_token(
        channel,
        Some(PUBLISHER_TOKEN),
    ));
    let (_, json) = doc(i);
    let resp = client
        .publish_one(request(ACCOUNT, &json))
        .await
        .context("PublishOne")?
        .into_inner();
    let mut delivered: Vec<String> = resp
        .deliveries
        .iter()
        .filter(|d| d.outcome() == pb::DeliveryOutcome::Delivered)
        .map(|d| {
            d.integration
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    delivered.sort();
    Ok(delivered)
}

/// Opens a WatchConfig stream on `cp` from `revision`, as a resuming worker.
async fn watch_from(
    cp: &ControlPlaneProc,
    revision: i64,
) -> Result<tonic::Streaming<pb::WatchConfigResponse>, tonic::Status> {
    let channel = Channel::from_shared(cp.url())
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    pb::config_service_client::ConfigServiceClient::new(with_token(channel, Some(WORKER_TOKEN)))
        .watch_config(pb::WatchConfigRequest {
            from_revision: revision,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Waits until the worker's staleness satisfies `pred`; its value.
async fn staleness_until(
    worker: &WorkerProc,
    what: &str,
    pred: impl Fn(f64) -> bool,
) -> anyhow::Result<f64> {
    eventually(what, WAIT, || async {
        let s = worker.metric(STALENESS).await?;
        Ok(if pred(s) {
            Poll::Ready(s)
        } else {
            Poll::not_yet(s)
        })
    })
    .await
}

/// Waits until the worker's log contains `text`.
async fn logged(worker: &WorkerProc, text: &str) -> anyhow::Result<()> {
    eventually(&format!("the worker logged {text:?}"), WAIT, || async {
        let tail = worker.process.log_tail();
        Ok(Poll::when(tail.contains(text), tail.len()))
    })
    .await
}

/// Waits until `/readyz` answers 200 naming `control_plane`.
async fn ready_via(worker: &WorkerProc, control_plane: &str) -> anyhow::Result<String> {
    eventually(
        &format!("the worker ready via {control_plane}"),
        WAIT,
        || async {
            let (status, body) = http_get(worker.http, "/readyz").await?;
            Ok(if status == 200 && body.contains(control_plane) {
                Poll::Ready(body)
            } else {
                Poll::not_yet((status, body))
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_follows_the_surviving_control_plane_and_resumes() -> anyhow::Result<()> {
    tokio::time::timeout(TEST, async {
        let etcd = EtcdServer::start()?;
        let dir = tempfile::tempdir()?;
        let mut cp1 = control_plane(dir.path(), "cp1", &etcd).await?;
        let cp2 = control_plane(dir.path(), "cp2", &etcd).await?;
        let receivers = [
            CountingReceiver::start().await?,
            CountingReceiver::start().await?,
        ];
        let first = route_to(&cp1.admin().await?, "first", &receivers[0]).await?;

        let w = worker(&dir.path().join("cp1"), &[&cp1, &cp2]).await?;
        w.wait_revision(first, WAIT).await?;
        ready_via(&w, &cp1.grpc.to_string()).await?;
        assert_eq!(
            w.metric(SNAPSHOTS).await?,
            1.0,
            "one snapshot to start with"
        );
        assert_eq!(publish(&w, 0).await?, ["first"]);

        // The first control plane dies; a change is made through the second.
        cp1.kill().await?;
        let killed = Instant::now();
        let second = route_to(&cp2.admin().await?, "second", &receivers[1]).await?;
        w.wait_revision(second, WAIT).await?;
        let took = killed.elapsed();
        println!("failover: the change made through the survivor arrived {took:?} after the kill");
        assert!(took < Duration::from_secs(10), "{took:?}");
        ready_via(&w, &cp2.grpc.to_string()).await?;
        assert_eq!(
            w.metric(SNAPSHOTS).await?,
            1.0,
            "the stream resumed from the worker's revision: no second snapshot"
        );
        assert_eq!(publish(&w, 1).await?, ["first", "second"]);
        let staleness = w.metric(STALENESS).await?;
        assert!(staleness < 1.0, "confirmed by the survivor: {staleness}");
        Ok(())
    })
    .await
    .context("the test took too long")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_control_planes_the_worker_serves_stale_and_says_so() -> anyhow::Result<()> {
    tokio::time::timeout(TEST, async {
        let etcd = EtcdServer::start()?;
        let dir = tempfile::tempdir()?;
        let mut cp1 = control_plane(dir.path(), "cp1", &etcd).await?;
        let mut cp2 = control_plane(dir.path(), "cp2", &etcd).await?;
        let receiver = CountingReceiver::start().await?;
        let revision = route_to(&cp1.admin().await?, "only", &receiver).await?;
        let w = worker(&dir.path().join("cp1"), &[&cp1, &cp2]).await?;
        w.wait_revision(revision, WAIT).await?;
        staleness_until(&w, "the configuration confirmed current", |s| s < 1.0).await?;

        // Every control plane gone: the staleness grows past the threshold, the worker warns,
        // stays ready and delivers with what it has.
        cp1.kill().await?;
        cp2.kill().await?;
        let stale = staleness_until(&w, "the staleness past 2 s", |s| s > 2.0).await?;
        println!("staleness with no control plane: {stale}s");
        logged(&w, "was not confirmed current").await?;
        let (status, body) = http_get(w.http, "/readyz").await?;
        assert_eq!(status, 200, "still ready: {body}");
        assert!(body.contains("confirmed current"), "{body}");
        assert_eq!(publish(&w, 2).await?, ["only"]);
        assert_eq!(w.config_revision().await?, revision);

        // One is back: confirmed current again, resumed without a snapshot.
        cp2.restart().await?;
        staleness_until(&w, "the staleness back under 1 s", |s| s < 1.0).await?;
        logged(&w, "confirmed current again").await?;
        assert_eq!(w.metric(SNAPSHOTS).await?, 1.0);
        Ok(())
    })
    .await
    .context("the test took too long")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_cut_off_from_etcd_stops_confirming() -> anyhow::Result<()> {
    tokio::time::timeout(TEST, async {
        let mut etcd = EtcdServer::start()?;
        let dir = tempfile::tempdir()?;
        let cp = control_plane(dir.path(), "cp", &etcd).await?;
        let receiver = CountingReceiver::start().await?;
        let revision = route_to(&cp.admin().await?, "only", &receiver).await?;
        let w = worker(&dir.path().join("cp"), &[&cp]).await?;
        w.wait_revision(revision, WAIT).await?;
        staleness_until(&w, "the configuration confirmed current", |s| s < 1.0).await?;

        // etcd goes away: the control plane stays up but is no longer current, so it sends
        // no progress messages and the worker's staleness grows.
        tokio::task::block_in_place(|| etcd.stop())?;
        staleness_until(&w, "the staleness past 2 s", |s| s > 2.0).await?;
        assert_eq!(publish(&w, 3).await?, ["only"]);
        // Nor does it take workers that resume: they should find a current replica.
        let refused = watch_from(&cp, revision).await;
        assert_eq!(
            refused.as_ref().err().map(tonic::Status::code),
            Some(tonic::Code::Unavailable),
            "{refused:?}"
        );

        tokio::task::block_in_place(|| etcd.resume())?;
        staleness_until(&w, "the staleness back under 1 s", |s| s < 1.0).await?;
        watch_from(&cp, revision)
            .await
            .context("a current control plane takes a resuming worker")?;
        Ok(())
    })
    .await
    .context("the test took too long")?
}

/// A snapshot larger than the worker's message cap comes in parts and is applied whole: 40
/// integrations with 4 KiB auth headers (about 170 KiB) to a worker accepting messages of
/// 64 KiB (parts of at most 32 KiB). A raw WatchConfig client sees the parts; a client that
/// does not ask for parts (as before they existed) gets one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_over_the_message_cap_comes_in_parts() -> anyhow::Result<()> {
    const N: usize = 40;
    const CAP: usize = 64 * 1024;
    let dir = tempfile::tempdir()?;
    let store = Store::Embedded(dir.path().join("data"));
    let cp = ControlPlaneProc::start(Path::new(CONTROL_PLANE), dir.path(), &store).await?;
    let admin = cp.admin().await?;
    let receiver = CountingReceiver::start().await?;
    let mut revision = 0;
    for n in 0..N {
        let mut integration =
            pushwire_tests::admin::integration(&format!("big {n}"), &receiver.url());
        integration.auth_header = Some(pb::AuthHeader {
            name: "Authorization".into(),
            value: format!("Bearer {}", "x".repeat(4000)),
            value_set: false,
        });
        let name = admin
            .create_integration(ACCOUNT, &format!("big-{n:02}"), integration)
            .await?
            .name;
        revision = create_scope(
            &admin,
            &format!("big-{n:02}"),
            scope(&name, pb::PushScopeLevel::Account, ""),
        )
        .await?;
    }

    // The parts, as a client that accepts 64 KiB sees them.
    let channel = Channel::from_shared(cp.url())?.connect().await?;
    let mut config = pb::config_service_client::ConfigServiceClient::new(with_token(
        channel,
        Some(WORKER_TOKEN),
    ))
    .max_decoding_message_size(CAP);
    let mut stream = config
        .watch_config(pb::WatchConfigRequest {
            from_revision: 0,
            max_message_bytes: CAP as i64,
        })
        .await?
        .into_inner();
    let (mut parts, mut integrations, mut scopes) = (0, 0, 0);
    loop {
        let msg = tokio::time::timeout(WAIT, stream.message())
            .await?
            .context("WatchConfig")?
            .context("stream ended inside the snapshot")?;
        assert_eq!(
            msg.revision, revision,
            "every part at the snapshot's revision"
        );
        let part = msg.snapshot.as_ref().context("a part without a snapshot")?;
        assert!(
            prost::Message::encoded_len(&msg) <= CAP,
            "part {parts} over the cap"
        );
        parts += 1;
        integrations += part.integrations.len();
        scopes += part.push_scopes.len();
        if !msg.snapshot_continues {
            break;
        }
    }
    assert!(parts >= 5, "{parts} parts");
    assert_eq!((integrations, scopes), (N, N));

    // A client that does not ask for parts gets the snapshot in one message.
    let whole = watch_from(&cp, 0)
        .await?
        .message()
        .await?
        .context("no snapshot")?;
    assert!(!whole.snapshot_continues);
    assert_eq!(whole.snapshot.map(|s| s.integrations.len()), Some(N));

    // A worker with that cap routes with the whole snapshot.
    let flags = WorkerFlags {
        extra: vec!["--watch-max-message-size".into(), CAP.to_string()],
        ..WorkerFlags::default()
    };
    let worker = WorkerProc::start(Path::new(WORKER), dir.path(), 1, &cp.url(), &flags).await?;
    worker.wait_revision(revision, WAIT).await?;
    let delivered = publish(&worker, 1).await?;
    assert_eq!(delivered.len(), N, "{delivered:?}");
    assert_eq!(worker.metric(SNAPSHOTS).await?, 1.0);
    Ok(())
}
