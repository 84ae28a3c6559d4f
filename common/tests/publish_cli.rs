//! The `publish` command against a fake worker (an in-process `IngestService` on loopback):
//! exit statuses, the listing of what did not get through, the retry file, standard input,
//! the token.

use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pb::ingest_service_server::{IngestService, IngestServiceServer};
use pushwire_common::pb::v1 as pb;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const PUBLISH: &str = env!("CARGO_BIN_EXE_publish");
const INTEGRATION: &str = "accounts/7/integrations/crm";

/// Acknowledges every participation: `fail…` ids FAILED, `bad…` ids rejected, others
/// DELIVERED; records the requests and the `authorization` of each stream.
#[derive(Clone, Default)]
struct Fake {
    requests: Arc<Mutex<Vec<pb::PublishRequest>>>,
    authorization: Arc<Mutex<Vec<String>>>,
    /// When set, a stream without `authorization: Bearer <this>` is refused UNAUTHENTICATED
    /// at its start, as the worker's authentication does.
    token: Arc<Mutex<Option<String>>>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for Fake {
    type PublishStream = Responses;

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        self.authorization
            .lock()
            .unwrap()
            .push(authorization.clone());
        let required = self.token.lock().unwrap().clone();
        if let Some(token) = required
            && authorization != format!("Bearer {token}")
        {
            return Err(Status::unauthenticated("unknown token"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let requests = self.requests.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                requests.lock().unwrap().push(req.clone());
                let id = serde_json::from_str::<serde_json::Value>(&req.participation_json)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let mut resp = pb::PublishResponse {
                    participation_id: id.clone(),
                    request_id: req.request_id.clone(),
                    ..Default::default()
                };
                if id.starts_with("bad") {
                    resp.participation_id.clear();
                    resp.error = "participation_json: state: required string".into();
                } else {
                    let failed = id.starts_with("fail");
                    resp.deliveries.push(pb::Delivery {
                        integration: INTEGRATION.into(),
                        outcome: if failed {
                            pb::DeliveryOutcome::Failed
                        } else {
                            pb::DeliveryOutcome::Delivered
                        }
                        .into(),
                        attempts: if failed { 6 } else { 1 },
                        last_status_code: if failed { 503 } else { 200 },
                        last_error: if failed {
                            "HTTP 503".into()
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    });
                }
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish_one(
        &self,
        _: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

async fn fake_worker() -> (Fake, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Fake::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngestServiceServer::new(fake.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (fake, format!("http://{addr}"))
}

fn doc(id: &str) -> String {
    format!(r#"{{"id": "{id}", "state": "COMPLETED", "campaign": {{"id": 7}}}}"#)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn publish(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(PUBLISH);
    cmd.args(args)
        .env_remove("PUSHWIRE_PUBLISH_TOKEN")
        .env_remove("PUSHWIRE_WORKERS")
        .env_remove("PUSHWIRE_ACCOUNT")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("publish starts");
    if let Some(text) = stdin {
        let mut input = child.stdin.take().unwrap();
        input.write_all(text.as_bytes()).await.unwrap();
        drop(input);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("publish ends")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_delivered_exits_zero_with_a_summary() {
    let (fake, url) = fake_worker().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.ndjson");
    let lines: Vec<String> = (0..50).map(|i| doc(&format!("p{i}"))).collect();
    std::fs::write(&file, lines.join("\n") + "\n\n").unwrap();
    let run = publish(
        &[
            "--workers",
            &url,
            "--account",
            "accounts/7",
            file.to_str().unwrap(),
        ],
        None,
        &[("PUSHWIRE_PUBLISH_TOKEN", "pwt_cli-token")],
    )
    .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains("publish: 50 participations")
            && run.stderr.contains("50 done, 0 failed"),
        "{}",
        run.stderr
    );
    let sent = fake.requests.lock().unwrap().clone();
    assert_eq!(sent.len(), 50);
    assert_eq!(sent[0].participation_json, lines[0], "sent byte for byte");
    assert_eq!(sent[0].account, "accounts/7");
    assert!(
        fake.authorization
            .lock()
            .unwrap()
            .iter()
            .all(|a| a == "Bearer pwt_cli-token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_are_listed_written_for_retry_and_exit_one() {
    let (fake, url) = fake_worker().await;
    let dir = tempfile::tempdir().unwrap();
    let retry = dir.path().join("retry.ndjson");
    let input = [
        doc("ok-1"),
        doc("fail-2"),
        doc("bad-3"),
        "not json".to_owned(),
        format!(
            r#"{{"participationJson": {}, "masterFormId": "77", "account": "accounts/8"}}"#,
            serde_json::to_string(&doc("ok-5")).unwrap()
        ),
    ]
    .join("\n");
    let run = publish(
        &[
            "--workers",
            &url,
            "--account",
            "accounts/7",
            "--retry-file",
            retry.to_str().unwrap(),
            "-",
        ],
        Some(&input),
        &[],
    )
    .await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let listed: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(listed.len(), 3, "{}", run.stdout);
    assert!(
        listed[0].starts_with("line 2: participation fail-2: accounts/7/integrations/crm: FAILED after 6 attempt(s), last status 503"),
        "{}",
        listed[0]
    );
    assert!(
        listed[1].starts_with("line 3: participation bad-3: REJECTED: participation_json"),
        "{}",
        listed[1]
    );
    assert!(
        listed[2].starts_with("line 4: NOT PUBLISHED: not JSON"),
        "{}",
        listed[2]
    );
    assert!(
        run.stderr.contains("1 failed, 1 rejected"),
        "{}",
        run.stderr
    );

    let sent = fake.requests.lock().unwrap().clone();
    let envelope = sent
        .iter()
        .find(|r| r.participation_json.contains("ok-5"))
        .unwrap();
    assert_eq!(
        (envelope.account.as_str(), envelope.master_form_id.as_str()),
        ("accounts/8", "77")
    );

    // The retry file holds the FAILED one, restricted to its integration, ready to publish.
    let again = std::fs::read_to_string(&retry).unwrap();
    let lines: Vec<serde_json::Value> = again
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{again}");
    assert_eq!(lines[0]["onlyIntegrations"][0], INTEGRATION);
    assert_eq!(lines[0]["participationJson"], doc("fail-2"));
    let rerun = publish(
        &[
            "--workers",
            &url,
            "--account",
            "accounts/7",
            retry.to_str().unwrap(),
        ],
        None,
        &[],
    )
    .await;
    assert_eq!(rerun.code, 1, "still failing at the fake: {}", rerun.stdout);
    let last = fake.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.only_integrations, [INTEGRATION]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_or_bad_usage_exits_two() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = publish(
        &[
            "--workers",
            &format!("127.0.0.1:{port}"),
            "--account",
            "accounts/7",
            "--connect-timeout",
            "500ms",
            "-",
        ],
        Some(&doc("x")),
        &[],
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot reach any worker"),
        "{}",
        run.stderr
    );

    let run = publish(
        &["--workers", "ftp://w", "--account", "accounts/7"],
        None,
        &[],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("scheme"), "{}", run.stderr);
    let run = publish(
        &[
            "--workers",
            "w:1",
            "--account",
            "accounts/7",
            "/nonexistent/in.ndjson",
        ],
        None,
        &[],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("/nonexistent/in.ndjson"),
        "{}",
        run.stderr
    );
}

/// A wrong or missing token is said as such at once, not after the connect timeout (60 s
/// here, longer than `publish` is given to end) as "cannot reach any worker".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_reported_at_once() {
    let (fake, url) = fake_worker().await;
    *fake.token.lock().unwrap() = Some("pwt_right".into());
    for env in [&[("PUSHWIRE_PUBLISH_TOKEN", "pwt_wrong")][..], &[]] {
        let run = publish(
            &[
                "--workers",
                &url,
                "--account",
                "accounts/7",
                "--connect-timeout",
                "60s",
                "-",
            ],
            Some(&doc("x")),
            env,
        )
        .await;
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(
            run.stderr.contains("the token was refused") && run.stderr.contains("Unauthenticated"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("cannot reach"), "{}", run.stderr);
        assert!(
            !run.stderr.contains("pwt_wrong"),
            "no token in errors: {}",
            run.stderr
        );
    }
    assert!(fake.requests.lock().unwrap().is_empty());
}

/// Without --account, lines that name their account are published; one that names none is
/// listed and not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_may_come_from_every_line() {
    let (fake, url) = fake_worker().await;
    let named = |id: &str, account: &str| {
        serde_json::json!({"account": account, "participationJson": doc(id)}).to_string()
    };
    let input = [
        named("a1", "accounts/7"),
        named("a2", "accounts/8"),
        doc("bare"),
    ]
    .join("\n");
    let run = publish(&["--workers", &url, "-"], Some(&input), &[]).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("line 3") && run.stdout.contains("no account"),
        "{}",
        run.stdout
    );
    let sent = fake.requests.lock().unwrap().clone();
    let accounts: Vec<&str> = sent.iter().map(|r| r.account.as_str()).collect();
    assert_eq!(accounts, ["accounts/7", "accounts/8"]);
}
