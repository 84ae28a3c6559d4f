//! Fault injection: nothing is lost when workers, the control plane, etcd or receivers fail.
//! Real processes (the `*-under-test` binaries, a real etcd), loopback only, every wait
//! bounded, every child killed when the test ends however it ends. Participations go through
//! the publisher library (`pushwire_common::publisher`), which re-publishes what a failed
//! stream did not acknowledge. Each scenario prints its figures (`--nocapture` to see them):
//!
//! ```sh
//! cargo test -p pushwire-tests --test it -- faults:: --nocapture
//! ```
//!
//! The scenarios run one at a time (they measure latency, and share two cores in CI).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::publisher::{Publisher, PublisherOptions};
use pushwire_tests::admin::{Admin, scope};
use pushwire_tests::etcd::{EtcdCluster, EtcdServer};
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::faults::{
    ACCOUNT, Behaviour, ControlPlaneProc, CountingReceiver, Figures, PUBLISHER_TOKEN, Publication,
    Store, WorkerFlags, WorkerProc, create_integration, create_scope, doc, expected_routes,
    http_get, route_three, tally,
};

const WORKER: &str = env!("CARGO_BIN_EXE_pushwire-worker-under-test");
const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_pushwire-control-plane-under-test");

/// Bound on a whole scenario.
const SCENARIO: Duration = Duration::from_secs(180);

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn publisher_options(window: u32) -> PublisherOptions {
    PublisherOptions {
        token: Some(Secret::new(PUBLISHER_TOKEN)),
        window: window as usize,
        max_pending: 8192,
        deadline: Duration::from_secs(150),
        connect_timeout: Duration::from_secs(2),
        backoff: (Duration::from_millis(50), Duration::from_secs(1)),
        ..PublisherOptions::default()
    }
}

/// Three receivers routed as [`route_three`] says, a control plane on `store` and two
/// workers with `flags`, every worker on the routing revision.
struct Rig {
    cp: ControlPlaneProc,
    /// A second control plane on the same store, when the scenario has one; the workers are
    /// given both.
    standby: Option<ControlPlaneProc>,
    workers: [WorkerProc; 2],
    receivers: [CountingReceiver; 3],
    admin: Admin,
    publisher: Arc<Publisher>,
}

impl Rig {
    async fn start(dir: &Path, store: Store, flags: WorkerFlags) -> anyhow::Result<Self> {
        Self::start_with(dir, store, flags, false).await
    }

    /// [`Rig::start`], with a second control plane on `store` when `standby`.
    async fn start_with(
        dir: &Path,
        store: Store,
        flags: WorkerFlags,
        standby: bool,
    ) -> anyhow::Result<Self> {
        let cp = ControlPlaneProc::start(Path::new(CONTROL_PLANE), dir, &store).await?;
        let standby = match standby {
            true => Some(ControlPlaneProc::start(Path::new(CONTROL_PLANE), dir, &store).await?),
            false => None,
        };
        let control_planes = std::iter::once(cp.url())
            .chain(standby.iter().map(ControlPlaneProc::url))
            .collect::<Vec<_>>()
            .join(",");
        let receivers = [
            CountingReceiver::start().await?,
            CountingReceiver::start().await?,
            CountingReceiver::start().await?,
        ];
        let admin = cp.admin().await?;
        let revision = route_three(&admin, [&receivers[0], &receivers[1], &receivers[2]]).await?;
        let bin = Path::new(WORKER);
        let workers = [
            WorkerProc::start(bin, dir, 1, &control_planes, &flags).await?,
            WorkerProc::start(bin, dir, 2, &control_planes, &flags).await?,
        ];
        for w in &workers {
            w.wait_revision(revision, Duration::from_secs(15)).await?;
        }
        let publisher = Arc::new(Publisher::connect(
            &[workers[0].url(), workers[1].url()],
            ACCOUNT,
            publisher_options(flags.window),
        )?);
        publisher
            .wait_connected(Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            cp,
            standby,
            workers,
            receivers,
            admin,
            publisher,
        })
    }

    fn receivers(&self) -> Vec<&CountingReceiver> {
        self.receivers.iter().collect()
    }

    /// Waits until the publisher has a stream to each worker again, at most `limit`.
    async fn wait_streams(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        eventually(&format!("{n} publisher streams open"), limit, || async {
            let stats = self.publisher.stats();
            Ok(Poll::when(stats.open_streams >= n, stats))
        })
        .await
    }
}

fn docs(ids: std::ops::Range<usize>) -> Vec<(String, String)> {
    ids.map(doc).collect()
}

fn routes3(i: usize) -> Vec<bool> {
    expected_routes(i).to_vec()
}

async fn scenario<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    tokio::time::timeout(SCENARIO, f)
        .await
        .map_err(|_| anyhow::anyhow!("scenario not over within {SCENARIO:?}"))?
}

/// 10,000 participations through 2 workers to 3 receivers; one worker is SIGKILLed a third of
/// the way and restarted. Every participation reaches every receiver it routes to at least
/// once; participations delivered twice are at most the killed stream's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_nothing() -> anyhow::Result<()> {
    scenario(async {
        const N: usize = 10_000;
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        let flags = WorkerFlags {
            window: 64,
            ..WorkerFlags::default()
        };
        let mut rig = Rig::start(
            dir.path(),
            Store::Embedded(dir.path().join("data")),
            flags.clone(),
        )
        .await?;
        let publication = Publication::start(rig.publisher.clone(), docs(0..N), None);
        publication
            .wait_receipts(N * 3 / 10, Duration::from_secs(60))
            .await?;
        let in_flight = rig.publisher.stats().in_flight;
        rig.workers[0].process.kill().await?;
        let at_kill = publication.acknowledged();
        tokio::time::sleep(Duration::from_millis(500)).await;
        rig.workers[0].restart().await?;
        // The publisher finds the restarted worker again.
        rig.wait_streams(2, Duration::from_secs(10)).await?;
        let (f, _) = publication_finish(publication, &rig, 0..N, started, "worker-sigkill").await?;
        let stats = rig.publisher.stats();
        println!(
            "  killed worker 1 at {at_kill} receipts with {in_flight} in flight over both streams; \
             publisher {stats:?}"
        );
        f.assert_nothing_lost(N);
        assert!(
            stats.stream_failures >= 1,
            "the killed stream failed: {stats:?}"
        );
        assert!(f.resent > 0, "what the killed worker held was sent again");
        assert!(
            f.duplicated_participations <= flags.window as usize,
            "duplicates bounded by the window: {} > {}",
            f.duplicated_participations,
            flags.window
        );
        Ok(())
    })
    .await
}

/// Receiver 0 answers 500 to half the requests at random, receiver 2 stalls for 30 s (no
/// answer at all), receiver 1 is healthy. Everything is delivered in the end, and receiver 1's
/// latency stays that of a healthy endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_and_stalled_receivers_delay_no_one_else() -> anyhow::Result<()> {
    scenario(async {
        const N: usize = 2_000;
        const RATE: f64 = 50.0;
        const STALL: Duration = Duration::from_secs(30);
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        let flags = WorkerFlags {
            // Room for what waits on the stalled receiver: 50/s × 30 s × 3/4 over 2 workers.
            window: 1024,
            // Retries enough to outlast the stall (30 s) and half the answers failing.
            retry_schedule: format!("100ms,200ms,400ms,800ms{}", ",1s".repeat(36)),
            retry_window: "120s".into(),
            // No breaker: its cool-down would make the end of the stall a matter of timing.
            breaker_threshold: 100_000,
            ..WorkerFlags::default()
        };
        let rig = Rig::start(dir.path(), Store::Embedded(dir.path().join("data")), flags).await?;
        rig.receivers[0].set(Behaviour {
            fail_ratio: 0.5,
            ..Behaviour::default()
        });
        let publication = Publication::start(rig.publisher.clone(), docs(0..N), Some(RATE));
        tokio::time::sleep(Duration::from_secs(3)).await;
        rig.receivers[2].set(Behaviour {
            stall_until: Some(Instant::now() + STALL),
            ..Behaviour::default()
        });
        let (f, _) =
            publication_finish(publication, &rig, 0..N, started, "flaky-and-stalled").await?;
        f.assert_nothing_lost(N);
        assert!(
            rig.receivers[0].attempts() > rig.receivers[0].delivered().len() as u64 * 3 / 2,
            "receiver 0 failed about half the attempts"
        );
        assert!(
            f.max_delivery_latency[2] >= STALL / 2,
            "receiver 2 was stalled: {:?}",
            f.max_delivery_latency
        );
        // The healthy receiver's deliveries did not wait for the stalled one: none took as
        // long as half the stall (the figures themselves are printed above, and measured by
        // the benchmark; a latency threshold here would only measure the machine's load).
        assert!(
            f.max_delivery_latency[1] < STALL / 2,
            "receiver 1 waited for the stalled receiver: p99 {:?}, max {:?}",
            f.p99_delivery_latency[1],
            f.max_delivery_latency[1]
        );
        Ok(())
    })
    .await
}

/// Waits (at most [`SETTLE`]) until every expected delivery of `ids` arrived: the receipts of
/// participations handed off (QUEUED) come before the store's retries deliver them. Missing
/// ones are then reported by the tally.
async fn wait_delivered(
    receivers: &[&CountingReceiver],
    ids: std::ops::Range<usize>,
    routes: impl Fn(usize) -> Vec<bool>,
) {
    let _ = eventually("every expected delivery made", SETTLE, || {
        let delivered: Vec<_> = receivers.iter().map(|rx| rx.delivered()).collect();
        let missing = ids
            .clone()
            .map(|i| {
                let id = format!("fault-{i:05}");
                let r = routes(i);
                (0..delivered.len())
                    .filter(|k| r[*k] && !delivered[*k].contains_key(&id))
                    .count()
            })
            .sum::<usize>();
        async move { Ok(Poll::when(missing == 0, format!("{missing} missing"))) }
    })
    .await;
}

/// How long the retries from the store may take after the last receipt.
const SETTLE: Duration = Duration::from_secs(60);

/// Waits for every receipt of `publication` and tallies it.
async fn publication_finish(
    publication: Publication,
    rig: &Rig,
    ids: std::ops::Range<usize>,
    started: Instant,
    name: &str,
) -> anyhow::Result<(Figures, Vec<pushwire_common::publisher::Receipt>)> {
    let (receipts, at) = publication.finish(Duration::from_secs(150)).await?;
    wait_delivered(&rig.receivers(), ids.clone(), routes3).await;
    let f = tally(
        name,
        &receipts,
        &at,
        &rig.receivers(),
        ids,
        routes3,
        started,
    );
    f.print();
    Ok((f, receipts))
}

/// The control plane is SIGKILLed and restarted, then etcd is killed and restarted, while
/// participations flow: the workers keep delivering on their last configuration, the control
/// plane answers UNAVAILABLE (instead of hanging) while etcd is away and re-establishes its
/// watch, and a change made after the recovery reaches both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_and_etcd_restarts_lose_nothing() -> anyhow::Result<()> {
    scenario(async {
        const N: usize = 4_000;
        const LATE: usize = 500;
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        let mut etcd = tokio::task::spawn_blocking(EtcdServer::start).await??;
        let mut rig = Rig::start(
            dir.path(),
            Store::Etcd(etcd.endpoint()),
            WorkerFlags::default(),
        )
        .await?;
        let publication = Publication::start(rig.publisher.clone(), docs(0..N), Some(400.0));
        publication
            .wait_receipts(N / 10, Duration::from_secs(30))
            .await?;

        // The control plane dies: deliveries go on.
        rig.cp.kill().await?;
        let before = publication.acknowledged();
        publication
            .wait_receipts(before + 400, Duration::from_secs(20))
            .await?;
        let during_cp_outage = publication.acknowledged() - before;
        rig.cp.restart().await?;

        // etcd dies for a few seconds: the control plane answers reads from memory (marked
        // stale) and writes UNAVAILABLE, within a bound, and stays ready with a warning;
        // deliveries go on.
        etcd.stop()?;
        let etcd_down = Instant::now();
        let before = publication.acknowledged();
        let read = tokio::time::timeout(
            Duration::from_secs(15),
            rig.admin
                .integrations()
                .list_integrations(pb::ListIntegrationsRequest {
                    parent: ACCOUNT.into(),
                    ..Default::default()
                }),
        )
        .await;
        match &read {
            Ok(Ok(list)) => assert!(
                list.metadata()
                    .get(pushwire_control_plane::api::STALE_REVISION_HEADER)
                    .is_some(),
                "a read while etcd is down is marked stale: {list:?}"
            ),
            other => panic!("a read while etcd is down gave {other:?}"),
        }
        let write = tokio::time::timeout(
            Duration::from_secs(15),
            rig.admin.create_integration(
                ACCOUNT,
                "while-etcd-is-down",
                pushwire_tests::admin::integration("down", "http://127.0.0.1:9/"),
            ),
        )
        .await;
        let unavailable_after = etcd_down.elapsed();
        match &write {
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {}
            other => panic!("a write while etcd is down gave {other:?}"),
        }
        let (ready, body) = http_get(rig.cp.http, "/readyz").await?;
        assert_eq!(ready, 200, "ready, from memory, while etcd is down: {body}");
        assert!(body.contains("warning: store unreachable"), "{body}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let etcd = tokio::task::spawn_blocking(move || etcd.resume().map(|()| etcd)).await??;
        let etcd_outage = etcd_down.elapsed();
        let during_etcd_outage = publication.acknowledged() - before;
        assert!(etcd_outage >= Duration::from_secs(2));
        rig.cp.process.check_running()?;

        // A change after the recovery reaches both workers; new participations follow it.
        let late = CountingReceiver::start().await?;
        let revision = retry_until_ok(Duration::from_secs(20), || async {
            let name = create_integration(&rig.admin, "late", &late.url()).await?;
            create_scope(
                &rig.admin,
                "late",
                scope(&name, pb::PushScopeLevel::Account, ""),
            )
            .await
        })
        .await?;
        let propagated = Instant::now();
        for w in &rig.workers {
            w.wait_revision(revision, Duration::from_secs(20)).await?;
        }
        let propagation = propagated.elapsed();
        let first = publication_finish(publication, &rig, 0..N, started, "cp-and-etcd-restarts")
            .await?
            .0;
        let second = Publication::start(rig.publisher.clone(), docs(N..N + LATE), None);
        let (receipts, at) = second.finish(Duration::from_secs(60)).await?;
        let mut receivers = rig.receivers();
        receivers.push(&late);
        wait_delivered(&receivers, N..N + LATE, |i| {
            let mut r = routes3(i);
            r.push(true);
            r
        })
        .await;
        let after = tally(
            "after-recovery",
            &receipts,
            &at,
            &receivers,
            N..N + LATE,
            |i| {
                let mut r = routes3(i);
                r.push(true);
                r
            },
            started,
        );
        after.print();
        println!(
            "  receipts during the control-plane outage {during_cp_outage}, during the etcd \
             outage ({etcd_outage:.1?}) {during_etcd_outage}; UNAVAILABLE after \
             {unavailable_after:?}; change after recovery on both workers within {propagation:?}"
        );
        first.assert_nothing_lost(N);
        after.assert_nothing_lost(LATE);
        assert!(
            during_cp_outage > 0 && during_etcd_outage > 0,
            "deliveries went on during both outages"
        );
        assert!(
            unavailable_after < Duration::from_secs(10),
            "{unavailable_after:?}"
        );
        drop(etcd);
        Ok(())
    })
    .await
}

/// High availability under load: three etcd members, two control planes, two workers given
/// both, participations at 200/s. The etcd leader is killed, then the first control plane:
/// deliveries go on, the workers follow the surviving control plane, a change made through it
/// reaches both, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_leader_and_a_control_plane_die_under_load_and_nothing_is_lost()
-> anyhow::Result<()> {
    scenario(async {
        const N: usize = 3_000;
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        let mut cluster = tokio::task::spawn_blocking(EtcdCluster::start).await??;
        let mut rig = Rig::start_with(
            dir.path(),
            Store::Etcd(cluster.endpoints()),
            WorkerFlags::default(),
            true,
        )
        .await?;
        let publication = Publication::start(rig.publisher.clone(), docs(0..N), Some(200.0));
        publication
            .wait_receipts(N / 5, Duration::from_secs(30))
            .await?;

        // The etcd leader dies: a new one is elected; deliveries go on.
        let leader = eventually("an etcd leader", Duration::from_secs(20), || {
            let leader = cluster.leader();
            async move { Ok(leader.map_or_else(|| Poll::not_yet("none"), Poll::Ready)) }
        })
        .await?;
        cluster.member(leader).stop()?;
        eventually("a new etcd leader", Duration::from_secs(20), || {
            let now = cluster.leader();
            async move { Ok(Poll::when(now.is_some_and(|l| l != leader), now)) }
        })
        .await?;

        // The first control plane dies: the workers follow the other one.
        rig.cp.kill().await?;
        let killed = Instant::now();
        let standby = rig.standby.as_ref().expect("a second control plane");
        let admin = standby.admin().await?;
        let late = CountingReceiver::start().await?;
        let revision = retry_until_ok(Duration::from_secs(20), || async {
            let name = create_integration(&admin, "late", &late.url()).await?;
            create_scope(
                &admin,
                "late",
                scope(&name, pb::PushScopeLevel::Account, ""),
            )
            .await
        })
        .await?;
        for w in &rig.workers {
            w.wait_revision(revision, Duration::from_secs(20)).await?;
        }
        let followed = killed.elapsed();
        let (figures, _) = publication_finish(
            publication,
            &rig,
            0..N,
            started,
            "etcd-leader-and-cp-killed",
        )
        .await?;
        println!(
            "  a change through the surviving control plane on both workers {followed:?} after \
             the first was killed"
        );
        figures.assert_nothing_lost(N);
        let member =
            tokio::task::spawn_blocking(move || cluster.member(leader).resume().map(|()| cluster));
        drop(member.await??);
        Ok(())
    })
    .await
}

/// Calls `f` until it succeeds, at most `limit` (the store may take a moment to answer after
/// its restart).
async fn retry_until_ok<T, F, Fut>(limit: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    eventually("a call answered after the restart", limit, || {
        let call = f();
        async move {
            Ok(match call.await {
                Ok(v) => Poll::Ready(v),
                Err(e) => Poll::not_yet(e),
            })
        }
    })
    .await
}

/// A worker gets SIGTERM mid-run while attempts are in flight (slow answers, retries): it
/// stops taking streams, finishes what it can within its grace period, ends its streams with
/// UNAVAILABLE and exits; the publisher re-sends the rest elsewhere. No loss, no FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_back_what_it_did_not_finish() -> anyhow::Result<()> {
    scenario(async {
        const N: usize = 4_000;
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        let flags = WorkerFlags {
            shutdown_grace: "2s".into(),
            request_timeout: "5s".into(),
            ..WorkerFlags::default()
        };
        let mut rig =
            Rig::start(dir.path(), Store::Embedded(dir.path().join("data")), flags).await?;
        // Slow answers (beyond the grace period: those in flight then are cut and handed
        // back) and retries keep attempts in flight.
        rig.receivers[0].set(Behaviour {
            slow_ratio: 0.02,
            slow_delay: Duration::from_secs(3),
            ..Behaviour::default()
        });
        rig.receivers[2].set(Behaviour {
            fail_ratio: 0.2,
            ..Behaviour::default()
        });
        let publication = Publication::start(rig.publisher.clone(), docs(0..N), Some(500.0));
        publication
            .wait_receipts(N * 3 / 10, Duration::from_secs(30))
            .await?;
        let in_flight = rig.publisher.stats().in_flight;
        let failures_before = rig.publisher.stats().stream_failures;
        rig.workers[0].process.terminate()?;
        let terminated = Instant::now();
        let status = rig.workers[0]
            .process
            .wait_exit(Duration::from_secs(15))
            .await?;
        let drained_in = terminated.elapsed();
        rig.workers[0].restart().await?;
        let (f, _) = publication_finish(publication, &rig, 0..N, started, "sigterm-drain").await?;
        let stats = rig.publisher.stats();
        println!(
            "  worker 1 exited {status} {drained_in:?} after SIGTERM ({in_flight} in flight over \
             both streams then); publisher {stats:?}"
        );
        f.assert_nothing_lost(N);
        assert!(status.success(), "a drained worker exits cleanly: {status}");
        assert!(
            drained_in < Duration::from_secs(8),
            "drained within the grace period and a margin: {drained_in:?}"
        );
        assert!(
            stats.stream_failures > failures_before,
            "the drained stream ended with a status: {stats:?}"
        );
        Ok(())
    })
    .await
}
