//! High availability of the configuration: a three-member etcd cluster (real etcd processes) and
//! control planes given every member. While a quorum holds, a dead or frozen member costs the
//! admin calls nothing beyond the election a dead leader causes; without a quorum reads are
//! answered from memory (marked stale) and writes fail; a write whose answer is lost says its
//! outcome is unknown. Each scenario prints its figures (`--nocapture`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::api::STALE_REVISION_HEADER;
use pushwire_control_plane::store::{EtcdStore, Op, Store as _, StoreError, Txn};
use pushwire_tests::admin::{Admin, integration, scope};
use pushwire_tests::control_plane::{Backend, ControlPlane, test_config};
use pushwire_tests::etcd::{EtcdCluster, EtcdServer};
use pushwire_tests::eventually::{Poll, eventually, until, within};
use pushwire_tests::faults::{
    ACCOUNT, ControlPlaneProc, CountingReceiver, Store, WorkerFlags, WorkerProc,
    create_integration, create_scope, http_get,
};
use tokio_util::sync::CancellationToken;

const WORKER: &str = env!("CARGO_BIN_EXE_pushwire-worker-under-test");
const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_pushwire-control-plane-under-test");

/// Bound on waiting for the cluster or a process to settle.
const SETTLE: Duration = Duration::from_secs(30);

/// Blocking cluster operations (etcd start-up waits) off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// One admin call of the background traffic.
#[derive(Debug)]
struct Call {
    started: Instant,
    took: Duration,
    what: String,
    /// `None` when it succeeded; the status otherwise.
    failure: Option<String>,
}

/// Admin traffic through every control plane in turn: an update then a read, each through a
/// different control plane, and `/readyz` of each, recorded until stopped.
struct Traffic {
    calls: Arc<Mutex<Vec<Call>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(control_planes: Vec<(Admin, std::net::SocketAddr)>, name: String) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (log, until) = (calls.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            for n in 0usize.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = until.cancelled() => return,
                }
                let (writer, _) = &control_planes[n % control_planes.len()];
                let (reader, http) = &control_planes[(n + 1) % control_planes.len()];
                let started = Instant::now();
                let mut change = integration(&format!("update {n}"), "http://127.0.0.1:9/");
                change.name = name.clone();
                let updated = writer.update_integration(change, &["display_name"]).await;
                let record = |what: String, failure: Option<String>| Call {
                    started,
                    took: started.elapsed(),
                    what,
                    failure,
                };
                let mut done = vec![record(
                    format!("update through {}", n % control_planes.len()),
                    updated
                        .err()
                        .map(|s| format!("{:?}: {}", s.code(), s.message())),
                )];
                let started = Instant::now();
                let read = reader.get_integration(&name).await;
                done.push(Call {
                    started,
                    took: started.elapsed(),
                    what: "get".into(),
                    failure: read
                        .err()
                        .map(|s| format!("{:?}: {}", s.code(), s.message())),
                });
                let started = Instant::now();
                let ready = match http_get(*http, "/readyz").await {
                    Ok((200, body)) if !body.contains("warning") => None,
                    Ok((status, body)) => Some(format!("{status} {}", body.trim())),
                    Err(e) => Some(e.to_string()),
                };
                done.push(Call {
                    started,
                    took: started.elapsed(),
                    what: "readyz".into(),
                    failure: ready,
                });
                log.lock().unwrap().extend(done);
            }
        });
        Self { calls, stop, task }
    }

    /// Waits until `n` more calls than now were recorded.
    async fn more(&self, n: usize) -> anyhow::Result<()> {
        let target = self.calls.lock().unwrap().len() + n;
        until("traffic calls", SETTLE, || {
            self.calls.lock().unwrap().len() >= target
        })
        .await
    }

    /// The calls that started at or after `from` (and before `to`, if given).
    fn between(
        &self,
        from: Instant,
        to: Option<Instant>,
    ) -> Vec<(Duration, String, Option<String>)> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.started >= from && to.is_none_or(|t| c.started < t))
            .map(|c| (c.took, c.what.clone(), c.failure.clone()))
            .collect()
    }

    async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Prints a phase's figures and returns its failures.
fn report(phase: &str, calls: &[(Duration, String, Option<String>)]) -> Vec<String> {
    let failures: Vec<String> = calls
        .iter()
        .filter_map(|(_, what, f)| f.as_ref().map(|f| format!("{what}: {f}")))
        .collect();
    let slowest = calls
        .iter()
        .map(|(took, ..)| *took)
        .max()
        .unwrap_or_default();
    println!(
        "ha {phase}: {} calls, {} failed, slowest {slowest:?}",
        calls.len(),
        failures.len()
    );
    failures
}

/// A follower killed, a follower frozen, the leader killed: with two control planes on the
/// three members, no admin call and no readiness check fails while a quorum holds, except
/// during the election that follows the leader's death.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_down_costs_admin_calls_nothing_while_a_quorum_holds() -> anyhow::Result<()> {
    let mut cluster = blocking(EtcdCluster::start).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::Etcd(cluster.endpoints());
    let cps = [
        ControlPlaneProc::start(CONTROL_PLANE.as_ref(), dir.path(), &store).await?,
        ControlPlaneProc::start(CONTROL_PLANE.as_ref(), dir.path(), &store).await?,
    ];
    let first = cps[0].admin().await?;
    let name = create_integration(&first, "ha", "http://127.0.0.1:9/").await?;
    let mut admins = Vec::new();
    for cp in &cps {
        admins.push((cp.admin().await?, cp.http));
    }
    let traffic = Traffic::start(admins, name.clone());
    traffic.more(30).await?;

    let leader = eventually("a leader", SETTLE, || {
        let leader = cluster.leader();
        async move { Ok(leader.map_or_else(|| Poll::not_yet("none"), Poll::Ready)) }
    })
    .await?;
    let follower = (leader + 1) % EtcdCluster::SIZE;

    // A follower dies, then comes back.
    let killed = Instant::now();
    cluster.member(follower).stop()?;
    traffic.more(60).await?;
    let back = Instant::now();
    let follower_dead = report("follower killed", &traffic.between(killed, Some(back)));
    let mut cluster = blocking(move || cluster.member(follower).resume().map(|()| cluster)).await?;

    // A follower hangs (SIGSTOP: its connections stay open, nothing answers), then resumes.
    let frozen = Instant::now();
    cluster.member(follower).freeze()?;
    traffic.more(60).await?;
    let thawed = Instant::now();
    cluster.member(follower).thaw()?;
    let follower_frozen = report("follower frozen", &traffic.between(frozen, Some(thawed)));
    traffic.more(15).await?;

    // The leader dies: calls may fail until another member is elected, none after.
    let leader = cluster.leader().unwrap_or(leader);
    let killed = Instant::now();
    cluster.member(leader).stop()?;
    let elected = eventually("a new leader", SETTLE, || {
        let now = cluster.leader();
        async move {
            Ok(match now {
                Some(l) if l != leader => Poll::Ready(Instant::now()),
                other => Poll::not_yet(other),
            })
        }
    })
    .await?;
    traffic.more(60).await?;
    let during_election = report(
        "leader killed, until elected",
        &traffic.between(killed, Some(elected)),
    );
    let after_election = report(
        "leader killed, after the election",
        &traffic.between(elected, None),
    );
    println!(
        "ha election: a new leader seen {:?} after the kill; {} calls failed meanwhile",
        elected - killed,
        during_election.len()
    );
    traffic.finish().await;

    assert!(
        follower_dead.is_empty(),
        "a follower down: {follower_dead:#?}"
    );
    assert!(
        follower_frozen.is_empty(),
        "a follower frozen: {follower_frozen:#?}"
    );
    assert!(
        after_election.is_empty(),
        "after the election: {after_election:#?}"
    );
    Ok(())
}

/// Without a quorum, reads (get, list, ResolvePushes) are answered from the control plane's
/// memory with the stale-revision header, writes fail UNAVAILABLE, `/readyz` stays ready with a
/// warning, and the worker keeps delivering; once the quorum is back, writes work and reach
/// the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_quorum_reads_come_from_memory_and_writes_fail() -> anyhow::Result<()> {
    let cluster = blocking(EtcdCluster::start).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::Etcd(cluster.endpoints());
    let cp = ControlPlaneProc::start(CONTROL_PLANE.as_ref(), dir.path(), &store).await?;
    let admin = cp.admin().await?;
    let receiver = CountingReceiver::start().await?;
    let name = create_integration(&admin, "ha", &receiver.url()).await?;
    create_scope(&admin, "ha", scope(&name, pb::PushScopeLevel::Account, "")).await?;
    let worker = WorkerProc::start(
        WORKER.as_ref(),
        dir.path(),
        0,
        &cp.url(),
        &WorkerFlags::default(),
    )
    .await?;

    // Two of three members die: no quorum.
    let mut cluster = cluster;
    cluster.member(1).stop()?;
    cluster.member(2).stop()?;
    let lost = Instant::now();
    let warning = eventually(
        "/readyz warns that the store is unreachable",
        SETTLE,
        || async {
            Ok(match http_get(cp.http, "/readyz").await {
                Ok((status, body)) if body.contains("warning") => Poll::Ready((status, body)),
                other => Poll::not_yet(other),
            })
        },
    )
    .await?;
    assert_eq!(warning.0, 200, "ready without a quorum: {}", warning.1);

    let get = admin
        .integrations()
        .get_integration(pb::GetIntegrationRequest { name: name.clone() })
        .await?;
    assert!(
        get.metadata().get(STALE_REVISION_HEADER).is_some(),
        "{get:?}"
    );
    assert_eq!(get.get_ref().name, name);
    let list = admin
        .integrations()
        .list_integrations(pb::ListIntegrationsRequest {
            parent: ACCOUNT.into(),
            ..Default::default()
        })
        .await?;
    assert!(list.metadata().get(STALE_REVISION_HEADER).is_some());
    assert_eq!(list.get_ref().integrations.len(), 1);
    let resolved = admin
        .push_scopes()
        .resolve_pushes(pb::ResolvePushesRequest {
            account: ACCOUNT.into(),
            campaign_id: "1".into(),
            identified: Some(true),
            ..Default::default()
        })
        .await?;
    assert!(resolved.metadata().get(STALE_REVISION_HEADER).is_some());
    assert_eq!(resolved.get_ref().pushes.len(), 1, "{resolved:?}");
    let mut change = get.into_inner();
    change.display_name = "during the outage".into();
    let refused = admin
        .update_integration(change.clone(), &["display_name"])
        .await
        .expect_err("a write without a quorum");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // The quorum comes back: the write goes through and reaches the worker.
    let mut cluster = blocking(move || cluster.member(1).resume().map(|()| cluster)).await?;
    let restored = Instant::now();
    let written = eventually("a write after the quorum is back", SETTLE, || {
        let (admin, change) = (admin.clone(), change.clone());
        async move {
            Ok(
                match admin.update_integration(change, &["display_name"]).await {
                    Ok(i) => Poll::Ready(i.etag.parse::<i64>()?),
                    Err(s) => Poll::not_yet(s),
                },
            )
        }
    })
    .await?;
    let writable = restored.elapsed();
    worker.wait_revision(written, SETTLE).await?;
    println!(
        "ha quorum: lost {:?} before restoring; writable {writable:?} after, the worker at the \
         new revision {:?} after",
        restored - lost,
        restored.elapsed()
    );
    let fresh = admin
        .integrations()
        .get_integration(pb::GetIntegrationRequest { name })
        .await?;
    assert!(fresh.metadata().get(STALE_REVISION_HEADER).is_none());
    assert_eq!(fresh.get_ref().display_name, "during the outage");
    cluster.member(2).resume()?;
    Ok(())
}

/// A write sent to a member that then answers nothing (frozen: the request sits in its socket
/// and may be applied when it resumes) fails as "outcome unknown"; a write to a member that is
/// dead (the connection is refused: nothing was sent) fails as "unavailable". The store layer,
/// where the difference is known; `api` maps the first to UNKNOWN with the OUTCOME_UNKNOWN
/// reason (its unit tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_is_lost_has_an_unknown_outcome() -> anyhow::Result<()> {
    let mut etcd = blocking(EtcdServer::start).await?;
    let store = EtcdStore::connect(&[etcd.endpoint()]).await?;
    let put = |value: &str| Txn {
        compares: Vec::new(),
        ops: vec![Op::Put {
            key: "/pushwire/v1/ha-test".into(),
            value: value.as_bytes().to_vec(),
        }],
    };
    store.txn(put("before")).await?;

    etcd.freeze()?;
    let lost = store.txn(put("maybe")).await;
    let read = store.get("/pushwire/v1/ha-test").await;
    etcd.thaw()?;
    assert!(
        matches!(lost, Err(StoreError::OutcomeUnknown(_))),
        "{lost:?}"
    );
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");

    // Answers again once resumed (the prober puts it back into rotation).
    eventually("etcd answers again", SETTLE, || async {
        Ok(Poll::when(store.revision().await.is_ok(), ()))
    })
    .await?;
    // Dead: once a call has found its connection gone, a write is refused before it is sent.
    etcd.stop()?;
    eventually("the dead member noticed", SETTLE, || async {
        Ok(Poll::when(store.revision().await.is_err(), ()))
    })
    .await?;
    let refused = store.txn(put("never")).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    Ok(())
}

/// The value of the sample `name` (no labels) in a Prometheus text exposition.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// Two control planes on one etcd compact its history, one at a time: the history before the
/// compacted revision is gone, each replica knows the revision, and the configuration still
/// reads and changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_planes_compact_the_etcd_history() -> anyhow::Result<()> {
    let etcd = blocking(EtcdServer::start).await?;
    let backend = Backend::Etcd(vec![etcd.endpoint()]);
    let mut config = test_config(&backend);
    config.etcd_compaction_interval = Duration::from_millis(300);
    let cps = [
        ControlPlane::start(config.clone()).await?,
        ControlPlane::start(config).await?,
    ];
    let admin = cps[0].admin().await?;
    let created = admin
        .create_integration(
            ACCOUNT,
            "compacted",
            integration("v0", "https://hooks.example.com/compacted"),
        )
        .await?;
    let first = created.etag.parse::<i64>()?;
    let mut change = created;
    for n in 1..=5 {
        change.display_name = format!("v{n}");
        change = admin
            .update_integration(change.clone(), &["display_name"])
            .await?;
    }
    let last = change.etag.parse::<i64>()?;

    // Both replicas see a compaction past the last update (made one interval after it).
    for cp in &cps {
        eventually("a compaction past the updates", SETTLE, || async {
            let (_, metrics) = http_get(cp.http_addr, "/metrics").await?;
            let revision = sample(&metrics, "pushwire_store_compacted_revision").unwrap_or(0.0);
            Ok(Poll::when(revision >= last as f64, revision))
        })
        .await?;
    }
    let compactions: f64 = {
        let mut total = 0.0;
        for cp in &cps {
            let (_, metrics) = http_get(cp.http_addr, "/metrics").await?;
            total += sample(&metrics, "pushwire_store_compactions_total").unwrap_or(0.0);
        }
        total
    };
    assert!(compactions >= 1.0);
    let store = EtcdStore::connect(&[etcd.endpoint()]).await?;
    // "Compacted", from the call or as the stream's first item.
    let history = match store.watch("/pushwire/v1/", first).await {
        Err(e) => Some(e),
        Ok(mut stream) => within("the watch's first item", SETTLE, stream.next())
            .await?
            .and_then(Result::err),
    };
    assert!(
        matches!(history, Some(StoreError::Compacted { .. })),
        "{history:?}"
    );
    let read = admin.get_integration(&change.name).await?;
    assert_eq!(read.display_name, "v5");
    change.display_name = "after".into();
    admin.update_integration(change, &["display_name"]).await?;
    for cp in cps {
        cp.stop().await?;
    }
    Ok(())
}
