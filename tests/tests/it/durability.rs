//! Durability of the hand-off with real processes (DESIGN §3, §4): deliveries QUEUED in the
//! delivery store survive a stop of every process, standalone workers on PostgreSQL or
//! `control-plane --with-worker` on its default SQLite file, and a restart of PostgreSQL
//! under load loses nothing. Each test prints its figures (`--nocapture` to see them) and
//! asserts only on correctness:
//!
//! ```sh
//! cargo test -p pushwire-tests --test it -- durability:: --nocapture
//! ```
//!
//! The tests run one at a time (thousands of retries each, on shared cores).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushwire_common::delivery_store::{DeliveryStore, StoreUrl};
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::publisher::{Publisher, PublisherOptions, Receipt, ReceiptStatus};
use pushwire_tests::admin::{Admin, scope};
use pushwire_tests::eventually::{Poll, eventually, within};
use pushwire_tests::faults::{
    ACCOUNT, Behaviour, ControlPlaneProc, CountingReceiver, PUBLISHER_TOKEN, Publication, Store,
    WorkerFlags, WorkerProc, create_integration, create_scope, doc, http_get,
};
use pushwire_tests::postgres::PostgresServer;

const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_pushwire-control-plane-under-test");
const WORKER: &str = env!("CARGO_BIN_EXE_pushwire-worker-under-test");

/// Hang guard of every test body.
const LIMIT: Duration = Duration::from_secs(480);
/// Bound on every participation being delivered once the receiver is healthy.
const DRAIN: Duration = Duration::from_secs(240);
/// Bound on a process exiting after SIGTERM.
const EXIT: Duration = Duration::from_secs(30);

/// One test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Retries every 3 s for 10 minutes: the deliveries stay QUEUED through a stop of every
/// process, and are retried soon after the restart.
fn patient_schedule() -> String {
    format!("3s{}", ",3s".repeat(199))
}

fn publisher_options() -> PublisherOptions {
    PublisherOptions {
        token: Some(Secret::new(PUBLISHER_TOKEN)),
        window: 256,
        max_pending: 8192,
        deadline: Duration::from_secs(300),
        connect_timeout: Duration::from_secs(2),
        backoff: (Duration::from_millis(50), Duration::from_secs(1)),
        ..PublisherOptions::default()
    }
}

async fn connect(urls: &[String]) -> anyhow::Result<Arc<Publisher>> {
    let publisher = Arc::new(Publisher::connect(urls, ACCOUNT, publisher_options())?);
    publisher
        .wait_connected(Duration::from_secs(20))
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(publisher)
}

/// Closes the publisher once the publication that shared it is over.
async fn close(publisher: Arc<Publisher>) -> anyhow::Result<()> {
    let publisher = Arc::into_inner(publisher)
        .ok_or_else(|| anyhow::anyhow!("the publisher is still shared"))?;
    publisher.close().await;
    Ok(())
}

/// Routes every participation of [`ACCOUNT`] to `receiver`; the revision written.
async fn route_one(admin: &Admin, receiver: &CountingReceiver) -> anyhow::Result<i64> {
    let name = create_integration(admin, "crm", &receiver.url()).await?;
    create_scope(admin, "all", scope(&name, pb::PushScopeLevel::Account, "")).await
}

fn docs(n: usize) -> Vec<(String, String)> {
    (0..n).map(doc).collect()
}

/// Receipts by outcome of their one delivery: `(done, queued, delivered, not done)`.
fn outcomes(receipts: &[Receipt]) -> (usize, usize, usize, Vec<String>) {
    let (mut done, mut queued, mut delivered, mut not_done) = (0, 0, 0, Vec::new());
    for r in receipts {
        if r.status() != ReceiptStatus::Done {
            not_done.push(format!("{}: {:?}", r.participation_id(), r.outcome));
            continue;
        }
        done += 1;
        if let Ok(resp) = &r.outcome {
            for d in &resp.deliveries {
                match d.outcome() {
                    pb::DeliveryOutcome::Queued => queued += 1,
                    pb::DeliveryOutcome::Delivered => delivered += 1,
                    _ => {}
                }
            }
        }
    }
    (done, queued, delivered, not_done)
}

/// What `receiver` got of participations `0..n`: (distinct delivered, missing, repeated
/// 2xx answers).
fn arrivals(receiver: &CountingReceiver, n: usize) -> (usize, Vec<String>, u64) {
    let delivered: HashMap<String, u32> = receiver.delivered();
    let (mut distinct, mut missing, mut repeated) = (0, Vec::new(), 0u64);
    for i in 0..n {
        let (id, _) = doc(i);
        match delivered.get(&id).copied().unwrap_or(0) {
            0 => missing.push(id),
            k => {
                distinct += 1;
                repeated += u64::from(k - 1);
            }
        }
    }
    (distinct, missing, repeated)
}

/// Waits until `receiver` got every participation of `0..n`, at most [`DRAIN`].
async fn wait_all_arrived(receiver: &CountingReceiver, n: usize) -> anyhow::Result<()> {
    eventually(&format!("{n} participations delivered"), DRAIN, || async {
        let (distinct, missing, _) = arrivals(receiver, n);
        Ok(Poll::when(
            missing.is_empty(),
            format!(
                "{distinct} delivered, first missing {:?}",
                &missing[..missing.len().min(5)]
            ),
        ))
    })
    .await
}

/// Waits until `store` holds no QUEUED row, at most 60 s.
async fn wait_none_queued(store: &dyn DeliveryStore) -> anyhow::Result<()> {
    eventually("no QUEUED row left", Duration::from_secs(60), || async {
        let n = store.count_queued().await?;
        Ok(Poll::when(n == 0, format!("{n} QUEUED")))
    })
    .await
}

/// Waits until `store` holds at least `n` QUEUED rows, at most 60 s; how many.
async fn wait_queued(store: &dyn DeliveryStore, n: u64) -> anyhow::Result<u64> {
    eventually(
        &format!("{n} QUEUED rows"),
        Duration::from_secs(60),
        || async {
            let q = store.count_queued().await?;
            Ok(if q >= n {
                Poll::Ready(q)
            } else {
                Poll::not_yet(format!("{q} QUEUED"))
            })
        },
    )
    .await
}

/// SIGTERMs `process` and waits until it exited.
async fn stop(process: &mut pushwire_tests::process::Process) -> anyhow::Result<()> {
    process.terminate()?;
    process.wait_exit(EXIT).await?;
    Ok(())
}

/// Standalone workers on PostgreSQL: 5,000 participations published while the receiver
/// refuses them are all QUEUED; every process (both workers, the control plane, PostgreSQL)
/// is stopped and started again, the receiver recovers, and all 5,000 arrive; the store ends
/// with no QUEUED row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_queued_survive_a_stop_of_every_process_on_postgresql() -> anyhow::Result<()>
{
    let _one_at_a_time = SERIAL.lock().await;
    within("the test body", LIMIT, async {
        const N: usize = 5_000;
        let started = Instant::now();
        let mut pg = tokio::task::spawn_blocking(PostgresServer::start).await??;
        let url = pg.create_database("deliveries")?;
        let dir = tempfile::tempdir()?;
        let mut cp = ControlPlaneProc::start(
            Path::new(CONTROL_PLANE),
            dir.path(),
            &Store::Embedded(dir.path().join("data")),
        )
        .await?;
        let receiver = CountingReceiver::start().await?;
        receiver.set(Behaviour {
            fail_ratio: 1.0,
            ..Behaviour::default()
        });
        let revision = route_one(&cp.admin().await?, &receiver).await?;
        let flags = WorkerFlags {
            window: 256,
            retry_schedule: patient_schedule(),
            retry_window: "30m".into(),
            breaker_threshold: 1_000_000,
            delivery_store: Some(url.clone()),
            delivery_lease: "10s".into(),
            claim_interval: "100ms".into(),
            ..WorkerFlags::default()
        };
        let bin = Path::new(WORKER);
        let mut workers = [
            WorkerProc::start(bin, dir.path(), 1, &cp.url(), &flags).await?,
            WorkerProc::start(bin, dir.path(), 2, &cp.url(), &flags).await?,
        ];
        for w in &workers {
            w.wait_revision(revision, Duration::from_secs(30)).await?;
        }
        let publisher = connect(&[workers[0].url(), workers[1].url()]).await?;
        let publication = Publication::start(publisher.clone(), docs(N), None);
        let (receipts, _) = publication.finish(Duration::from_secs(300)).await?;
        let published_in = started.elapsed();
        close(publisher).await?;
        let (done, queued, delivered_first, not_done) = outcomes(&receipts);
        assert_eq!(receipts.len(), N, "every participation got a receipt");
        assert_eq!(
            done,
            N,
            "every receipt done; not: {:?}",
            &not_done[..not_done.len().min(10)]
        );
        assert_eq!(
            queued, N,
            "every delivery QUEUED while the receiver refuses"
        );

        let store =
            pushwire_common::delivery_store::open(&StoreUrl::parse(&url)?, &Default::default())
                .await?;
        let queued_at_stop = wait_queued(store.as_ref(), N as u64).await?;
        let attempts_before = receiver.attempts();
        let stopping = Instant::now();
        for w in &mut workers {
            stop(&mut w.process).await?;
        }
        stop(&mut cp.process).await?;
        let still_queued = store.count_queued().await?;
        drop(store);
        // PostgreSQL too (an immediate shutdown, no checkpoint).
        pg = tokio::task::spawn_blocking(move || pg.stop().map(|()| pg)).await??;
        let stopped_in = stopping.elapsed();

        let restarting = Instant::now();
        pg = tokio::task::spawn_blocking(move || pg.resume().map(|()| pg)).await??;
        let store =
            pushwire_common::delivery_store::open(&StoreUrl::parse(&url)?, &Default::default())
                .await?;
        cp.restart().await?;
        for w in &mut workers {
            w.restart().await?;
        }
        for w in &workers {
            w.wait_revision(revision, Duration::from_secs(30)).await?;
        }
        let restarted_in = restarting.elapsed();
        receiver.set(Behaviour::default());
        let healthy = Instant::now();
        wait_all_arrived(&receiver, N).await?;
        let drained_in = healthy.elapsed();
        wait_none_queued(store.as_ref()).await?;
        let (distinct, missing, repeated) = arrivals(&receiver, N);
        println!(
            "durability/stop-all-postgresql: published {N} in {:.1}s (first attempts: {queued} \
             QUEUED, {delivered_first} delivered), {queued_at_stop} QUEUED rows at the stop, \
             {attempts_before} refused attempts before it, workers, control plane and PostgreSQL \
             stopped in {:.1}s, \
             {still_queued} QUEUED while stopped, restarted in {:.1}s, all delivered {:.1}s \
             after the receiver recovered: {distinct} distinct, {} missing, {repeated} \
             repeated; test {:.1}s",
            published_in.as_secs_f64(),
            stopped_in.as_secs_f64(),
            restarted_in.as_secs_f64(),
            drained_in.as_secs_f64(),
            missing.len(),
            started.elapsed().as_secs_f64(),
        );
        assert_eq!(
            still_queued, N as u64,
            "every delivery still QUEUED while stopped"
        );
        assert!(missing.is_empty(), "none lost: {missing:?}");
        assert_eq!(distinct, N);
        drop(pg);
        Ok(())
    })
    .await?
}

/// Flags of `control-plane --with-worker` for the stop test: the same retries as the
/// standalone workers'.
fn with_worker_flags(schedule: &str) -> Vec<&str> {
    vec![
        "--with-worker",
        "--window",
        "256",
        "--retry-schedule",
        schedule,
        "--retry-window",
        "30m",
        "--breaker-threshold",
        "1000000",
        "--delivery-lease",
        "10s",
        "--claim-interval",
        "100ms",
        "--request-timeout",
        "2s",
    ]
}

/// `control-plane --with-worker` on its default SQLite delivery store
/// (`<data-dir>/deliveries.sqlite3`): 5,000 participations QUEUED while the receiver refuses
/// them, the process stopped and started again on the same data dir, the receiver recovers:
/// all 5,000 arrive and the store ends with no QUEUED row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_queued_survive_a_restart_of_control_plane_with_worker_on_sqlite()
-> anyhow::Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    within("the test body", LIMIT, async {
        const N: usize = 5_000;
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let schedule = patient_schedule();
        let mut cp = ControlPlaneProc::start_with(
            Path::new(CONTROL_PLANE),
            dir.path(),
            &Store::Embedded(data.clone()),
            &with_worker_flags(&schedule),
        )
        .await?;
        let receiver = CountingReceiver::start().await?;
        receiver.set(Behaviour {
            fail_ratio: 1.0,
            ..Behaviour::default()
        });
        let revision = route_one(&cp.admin().await?, &receiver).await?;
        wait_revision(cp.http, revision).await?;
        let publisher = connect(&[cp.url()]).await?;
        let publication = Publication::start(publisher.clone(), docs(N), None);
        let (receipts, _) = publication.finish(Duration::from_secs(300)).await?;
        let published_in = started.elapsed();
        close(publisher).await?;
        let (done, queued, delivered_first, not_done) = outcomes(&receipts);
        assert_eq!(receipts.len(), N, "every participation got a receipt");
        assert_eq!(
            done,
            N,
            "every receipt done; not: {:?}",
            &not_done[..not_done.len().min(10)]
        );
        assert_eq!(
            queued, N,
            "every delivery QUEUED while the receiver refuses"
        );

        let store = pushwire_common::delivery_store::open(
            &StoreUrl::sqlite(data.join("deliveries.sqlite3")),
            &Default::default(),
        )
        .await?;
        let queued_at_stop = wait_queued(store.as_ref(), N as u64).await?;
        let attempts_before = receiver.attempts();
        let stopping = Instant::now();
        stop(&mut cp.process).await?;
        let stopped_in = stopping.elapsed();
        let still_queued = store.count_queued().await?;

        let restarting = Instant::now();
        cp.restart().await?;
        wait_revision(cp.http, revision).await?;
        let restarted_in = restarting.elapsed();
        receiver.set(Behaviour::default());
        let healthy = Instant::now();
        wait_all_arrived(&receiver, N).await?;
        let drained_in = healthy.elapsed();
        wait_none_queued(store.as_ref()).await?;
        let (distinct, missing, repeated) = arrivals(&receiver, N);
        println!(
            "durability/restart-with-worker-sqlite: published {N} in {:.1}s (first attempts: \
             {queued} QUEUED, {delivered_first} delivered), {queued_at_stop} QUEUED rows at the \
             stop, {attempts_before} refused attempts before it, stopped in {:.1}s, \
             {still_queued} QUEUED while stopped, restarted in {:.1}s, all delivered {:.1}s \
             after the receiver recovered: {distinct} distinct, {} missing, {repeated} \
             repeated; test {:.1}s",
            published_in.as_secs_f64(),
            stopped_in.as_secs_f64(),
            restarted_in.as_secs_f64(),
            drained_in.as_secs_f64(),
            missing.len(),
            started.elapsed().as_secs_f64(),
        );
        assert_eq!(
            still_queued, N as u64,
            "every delivery still QUEUED while stopped"
        );
        assert!(missing.is_empty(), "none lost: {missing:?}");
        assert_eq!(distinct, N);
        Ok(())
    })
    .await?
}

/// Waits until the worker serving `/metrics` on `http` routes with `revision` or later.
async fn wait_revision(http: std::net::SocketAddr, revision: i64) -> anyhow::Result<()> {
    eventually(
        &format!("worker at revision {revision}"),
        Duration::from_secs(30),
        || async {
            let (_, metrics) = http_get(http, "/metrics").await?;
            let r = metrics
                .lines()
                .find_map(|l| l.strip_prefix("pushwire_worker_config_revision "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|v| v as i64);
            Ok(Poll::when(r.is_some_and(|r| r >= revision), r))
        },
    )
    .await
}

/// PostgreSQL restarted under load: 3,000 participations published at 200/s through two
/// standalone workers to a receiver failing 30 % of its requests (so hand-offs keep
/// happening); PostgreSQL is stopped (immediate shutdown) once a fifth are acknowledged and
/// started again once a worker reports its delivery store down and another 800 were handed to
/// the publisher. Every participation is
/// acknowledged, every delivery arrives, no QUEUED row is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_under_load_loses_nothing() -> anyhow::Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    within("the test body", LIMIT, async {
        const N: usize = 3_000;
        const RATE: f64 = 200.0;
        let started = Instant::now();
        let mut pg = tokio::task::spawn_blocking(PostgresServer::start).await??;
        let url = pg.create_database("deliveries")?;
        let dir = tempfile::tempdir()?;
        let cp = ControlPlaneProc::start(
            Path::new(CONTROL_PLANE),
            dir.path(),
            &Store::Embedded(dir.path().join("data")),
        )
        .await?;
        let receiver = CountingReceiver::start().await?;
        receiver.set(Behaviour {
            fail_ratio: 0.3,
            ..Behaviour::default()
        });
        let revision = route_one(&cp.admin().await?, &receiver).await?;
        let flags = WorkerFlags {
            window: 512,
            retry_schedule: format!("200ms,500ms{}", ",1s".repeat(120)),
            retry_window: "30m".into(),
            breaker_threshold: 1_000_000,
            delivery_store: Some(url.clone()),
            delivery_lease: "10s".into(),
            claim_interval: "50ms".into(),
            ..WorkerFlags::default()
        };
        let bin = Path::new(WORKER);
        let workers = [
            WorkerProc::start(bin, dir.path(), 1, &cp.url(), &flags).await?,
            WorkerProc::start(bin, dir.path(), 2, &cp.url(), &flags).await?,
        ];
        for w in &workers {
            w.wait_revision(revision, Duration::from_secs(30)).await?;
        }
        let publisher = connect(&[workers[0].url(), workers[1].url()]).await?;
        let publication = Publication::start(publisher.clone(), docs(N), Some(RATE));
        publication
            .wait_receipts(N / 5, Duration::from_secs(120))
            .await?;
        let handed = || {
            publication
                .published
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len()
        };
        let (acked_at_stop, handed_at_stop) = (publication.acknowledged(), handed());
        let down = Instant::now();
        pg = tokio::task::spawn_blocking(move || pg.stop().map(|()| pg)).await??;
        // Down until the workers noticed (a hand-off failed: `/readyz` names the delivery
        // store) and another 800 participations were handed to the publisher.
        let readyz = eventually(
            "a worker unready for its delivery store, 800 more participations published",
            Duration::from_secs(60),
            || async {
                let h = handed();
                let mut unready = None;
                for w in &workers {
                    if let Ok((503, body)) = http_get(w.http, "/readyz").await
                        && body.contains("delivery store")
                    {
                        unready = Some(body);
                    }
                }
                Ok(match unready {
                    Some(body) if h >= handed_at_stop + 800 => Poll::Ready(body),
                    other => Poll::not_yet((h, other)),
                })
            },
        )
        .await?;
        let acked_while_down = publication.acknowledged() - acked_at_stop;
        pg = tokio::task::spawn_blocking(move || pg.resume().map(|()| pg)).await??;
        let outage = down.elapsed();

        let (receipts, _) = publication.finish(Duration::from_secs(300)).await?;
        let published_in = started.elapsed();
        close(publisher).await?;
        receiver.set(Behaviour::default());
        let (done, queued, delivered_first, not_done) = outcomes(&receipts);
        assert_eq!(receipts.len(), N, "every participation got a receipt");
        assert_eq!(
            done,
            N,
            "every receipt done; not: {:?}",
            &not_done[..not_done.len().min(10)]
        );
        assert_eq!(
            queued + delivered_first,
            N,
            "each delivery DELIVERED or QUEUED"
        );

        let healthy = Instant::now();
        wait_all_arrived(&receiver, N).await?;
        let drained_in = healthy.elapsed();
        let store =
            pushwire_common::delivery_store::open(&StoreUrl::parse(&url)?, &Default::default())
                .await?;
        wait_none_queued(store.as_ref()).await?;
        let (distinct, missing, repeated) = arrivals(&receiver, N);
        println!(
            "durability/postgresql-restart: {N} published at {RATE}/s in {:.1}s; PostgreSQL \
             down {:.1}s from {acked_at_stop} receipts, {acked_while_down} receipts while down \
             (a worker's readyz then: {}); first attempts {delivered_first} delivered, {queued} QUEUED; \
             all delivered {:.1}s after the publication ended: {distinct} distinct, {} missing, \
             {repeated} repeated, {} attempts; test {:.1}s",
            published_in.as_secs_f64(),
            outage.as_secs_f64(),
            readyz.trim(),
            drained_in.as_secs_f64(),
            missing.len(),
            receiver.attempts(),
            started.elapsed().as_secs_f64(),
        );
        assert!(missing.is_empty(), "none lost: {missing:?}");
        assert_eq!(distinct, N);
        drop(pg);
        Ok(())
    })
    .await?
}
