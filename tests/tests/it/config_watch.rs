//! The config watch against a real control plane run in-process on the embedded store: the
//! table follows creations, survives the control plane going away, and catches up with a
//! control plane restarted on the same data directory and address.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::domain::matching::Placement;
use pushwire_common::domain::{AccountName, IntegrationName, Secret};
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::{Config, Listeners};
use pushwire_tests::admin::{Admin, integration};
use pushwire_tests::control_plane::{
    AuthChannel, TEST_ADMIN_TOKEN, TEST_WORKER_TOKEN, as_admin, test_token_file, with_token,
};
use pushwire_tests::eventually::{until, within};
use pushwire_worker::config_watch;
use pushwire_worker::router::RoutingTable;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);

type Table = Option<Arc<RoutingTable>>;

/// A control plane running in this process.
struct ControlPlane {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), pushwire_control_plane::RunError>>,
}

impl ControlPlane {
    /// Starts one on the embedded store in `dir`, gRPC on `grpc` (port 0 for any).
    async fn start(dir: &Path, grpc: SocketAddr) -> anyhow::Result<Self> {
        let mut config = Config::defaults();
        config.data_dir = dir.to_path_buf();
        config.etcd_endpoints.clear();
        config.allow_insecure_http = true;
        config.shutdown_grace = Duration::from_secs(2);
        config.access.admin_token = Some(Secret::new(TEST_ADMIN_TOKEN));
        config.access.token_file = Some(test_token_file());
        let listeners = Listeners {
            grpc: TcpListener::bind(grpc)
                .await
                .with_context(|| format!("binding {grpc}"))?,
            http: TcpListener::bind("127.0.0.1:0").await?,
        };
        let addr = listeners.grpc.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pushwire_control_plane::run(
            config,
            listeners,
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            shutdown,
            task,
        })
    }

    async fn channel(&self) -> anyhow::Result<AuthChannel> {
        Ok(as_admin(
            Channel::from_shared(format!("http://{}", self.addr))?
                .connect()
                .await?,
        ))
    }

    async fn create_integration(&self, account: &str, id: &str) -> anyhow::Result<pb::Integration> {
        let integration = pb::Integration {
            secret: "s3cr3t-for-the-test-24-bytes".into(),
            ..integration(
                &id.to_uppercase(),
                &format!("https://{id}.example.com/hook"),
            )
        };
        Ok(Admin::new(self.channel().await?)
            .create_integration(account, id, integration)
            .await?)
    }

    async fn create_account_scope(
        &self,
        account: &str,
        id: &str,
        integration: &str,
    ) -> anyhow::Result<pb::PushScope> {
        let scope = pb::PushScope {
            integration: integration.into(),
            level: pb::PushScopeLevel::Account.into(),
            action: pb::PushAction::Push.into(),
            ..Default::default()
        };
        Ok(Admin::new(self.channel().await?)
            .create_scope(account, id, scope)
            .await?)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

/// Waits (at most [`WAIT`]) until the published table satisfies `pred`, and returns it.
async fn wait_for(
    rx: &mut watch::Receiver<Table>,
    what: &str,
    pred: impl Fn(&RoutingTable) -> bool,
) -> anyhow::Result<Arc<RoutingTable>> {
    let wait = async {
        loop {
            if let Some(t) = rx.borrow_and_update().clone().filter(|t| pred(t)) {
                return Ok(t);
            }
            rx.changed()
                .await
                .context("config watch dropped the table sender")?;
        }
    };
    within(what, WAIT, wait).await?
}

/// A listener that accepts connections, counts them and closes them at once: a control plane
/// address where nothing answers, observable.
struct ClosingListener {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ClosingListener {
    async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        Ok(Self {
            addr,
            accepted,
            task,
        })
    }

    /// Waits until `n` connections were accepted.
    async fn wait_connections(&self, n: usize) -> anyhow::Result<()> {
        until(&format!("{n} connections from the watch"), WAIT, || {
            self.accepted.load(Ordering::SeqCst) >= n
        })
        .await
    }

    /// Stops listening; the address is free again on return.
    async fn close(mut self) {
        self.task.abort();
        // Resolves once the task, and the listener with it, is dropped.
        let _ = (&mut self.task).await;
    }
}

impl Drop for ClosingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn name(s: &str) -> IntegrationName {
    IntegrationName::parse(s).expect("valid name")
}

fn anywhere() -> Placement<'static> {
    Placement {
        website_id: Some("7"),
        master_form_id: None,
        campaign_id: "1",
        identified: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_control_plane_and_survives_its_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = cp.addr;

    // The worker's side: a lazily connecting channel, so it reconnects on its own.
    let channel = config_watch::endpoint(format!("http://{addr}"))?.connect_lazy();
    let (tx, mut rx) = watch::channel::<Table>(None);
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(config_watch::run(
        with_token(channel, Some(TEST_WORKER_TOKEN)),
        tx,
        shutdown.clone(),
    ));

    // Ready once the (empty) snapshot is in.
    let first = wait_for(&mut rx, "the first snapshot", |_| true).await?;
    assert_eq!(first.integration_count(), 0);

    let crm = cp.create_integration("accounts/42", "crm").await?;
    let scope = cp
        .create_account_scope("accounts/42", "all", &crm.name)
        .await?;
    let account = AccountName::parse("accounts/42")?;
    let table = wait_for(&mut rx, "crm and its scope", |t| {
        !t.route(&account, &anywhere()).is_empty()
    })
    .await?;
    let routes = table.route(&account, &anywhere());
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].integration.name.to_string(), crm.name);
    assert_eq!(routes[0].decided_by.to_string(), scope.name);
    // The worker gets the secret the control plane never shows on reads.
    let secrets: Vec<_> = routes[0]
        .integration
        .valid_secrets(std::time::SystemTime::now())
        .map(|s| s.expose().to_owned())
        .collect();
    assert_eq!(secrets, ["s3cr3t-for-the-test-24-bytes"]);
    let revision = table.revision();
    assert_eq!(
        revision.to_string(),
        scope.etag,
        "the table is at the scope's revision"
    );

    // The control plane goes away: the worker keeps the table it has. Barrier: on its
    // address, a listener that closes every connection sees the watch fail and come back
    // twice; the table has not changed meanwhile.
    cp.stop().await?;
    let closing = ClosingListener::bind(addr).await?;
    closing.wait_connections(2).await?;
    closing.close().await;
    assert!(
        !rx.has_changed()?,
        "the table must not change while the control plane is down"
    );
    let kept = rx.borrow().clone().context("table kept")?;
    assert!(Arc::ptr_eq(&kept, &table));
    assert_eq!(kept.route(&account, &anywhere()).len(), 1);

    // A new control plane on the same data and address: the watch resumes from its revision
    // and a change made there arrives.
    let cp = ControlPlane::start(dir.path(), addr).await?;
    let erp = cp.create_integration("accounts/42", "erp").await?;
    let table = wait_for(&mut rx, "erp from the restarted control plane", |t| {
        t.integration(&name(&erp.name)).is_some()
    })
    .await?;
    assert!(table.revision() > revision);
    assert!(
        table.integration(&name(&crm.name)).is_some(),
        "earlier configuration kept"
    );
    assert_eq!(
        table.route(&account, &anywhere()).len(),
        1,
        "erp has no scope yet"
    );

    // Shutdown ends the loop promptly.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .context("watch loop did not stop")??;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_an_unreachable_control_plane_and_stops_on_shutdown() -> anyhow::Result<()> {
    // A peer that closes every connection: no control plane, again and again.
    let closing = ClosingListener::bind("127.0.0.1:0".parse()?).await?;
    let addr = closing.addr;
    let channel = config_watch::endpoint(format!("http://{addr}"))?.connect_lazy();
    let (tx, rx) = watch::channel::<Table>(None);
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(config_watch::run(
        with_token(channel, Some(TEST_WORKER_TOKEN)),
        tx,
        shutdown.clone(),
    ));
    // Barrier: the watch failed and tried again twice.
    closing.wait_connections(3).await?;
    assert!(!rx.has_changed()?, "no table without a control plane");
    assert!(rx.borrow().is_none());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .context("watch loop did not stop")??;
    Ok(())
}
