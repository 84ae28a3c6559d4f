//! Runs the real `sink` binary on a free loopback port and checks what it answers and prints:
//! signature verdicts for correctly and wrongly signed deliveries (signed with
//! `pushwire_common::webhook::signing`), `--fail-first`, and the refusal of non-loopback addresses.
//! Every child is killed when its guard drops, panics included.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pushwire_common::domain::Secret;
use pushwire_common::webhook::signing::{qualifio_signature, standard_webhooks_signature};
use pushwire_tests::receiver::send;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A running `sink`; killed on drop so a failing test leaves no process behind.
struct SinkProcess {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    base_url: String,
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl SinkProcess {
    /// Starts `sink --listen 127.0.0.1:0 ARGS` and waits for the line telling its address.
    async fn start(args: &[&str]) -> SinkProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sink"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("SINK_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sink");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut sink = SinkProcess {
            child,
            stdout,
            base_url: String::new(),
        };
        let banner = tokio::time::timeout(WAIT, stderr.next_line())
            .await
            .expect("sink printed its address in time")
            .unwrap()
            .expect("a banner line");
        let url = banner.strip_prefix("sink listening on ").expect(&banner);
        let url = url.split_whitespace().next().unwrap();
        assert!(url.starts_with("http://127.0.0.1:"), "{banner}");
        sink.base_url = url.trim_end_matches('/').to_owned();
        // Keep draining stderr so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        sink
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The next delivery printed with `--json`.
    async fn next_delivery(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .expect("a delivery printed in time")
            .unwrap()
            .expect("sink still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// POSTs `body` signed with `secret` under both schemes; returns the status answered.
async fn post_signed(sink: &SinkProcess, secret: &Secret, timestamp: i64, body: &[u8]) -> u16 {
    let id = "pa1_in1";
    let ts = timestamp.to_string();
    let qualifio = qualifio_signature(secret, body);
    let standard = standard_webhooks_signature([secret], id, timestamp, body);
    let headers = [
        ("content-type", "application/json"),
        ("x-qualifio-signature", qualifio.as_str()),
        ("webhook-id", id),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", standard.as_str()),
        ("authorization", "Bearer top-secret-token"),
    ];
    let response =
        tokio::time::timeout(WAIT, send("POST", &sink.url("/hook"), &headers, body, None))
            .await
            .expect("answered in time")
            .expect("request");
    response.status
}

#[tokio::test]
async fn verdicts_for_good_and_bad_signatures() {
    let mut sink = SinkProcess::start(&["--secret", SECRET, "--json", "--status", "202"]).await;
    let body = br#"{"participation":{"id":"pa1"},"n":1}"#;

    let status = post_signed(&sink, &Secret::new(SECRET), now(), body).await;
    assert_eq!(status, 202);
    let good = sink.next_delivery().await;
    assert_eq!(good["status"], 202, "{good}");
    assert_eq!(good["method"], "POST");
    assert_eq!(good["path"], "/hook");
    assert_eq!(good["verdicts"]["qualifio"], "ok", "{good}");
    assert_eq!(good["verdicts"]["standard_webhooks"], "ok", "{good}");
    assert_eq!(good["warnings"], Value::Array(vec![]), "{good}");
    assert_eq!(good["body"], serde_json::from_slice::<Value>(body).unwrap());
    assert_eq!(good["headers"]["webhook-id"], "pa1_in1");
    // The credential is reduced to a hint.
    assert_eq!(good["headers"]["authorization"], "Bear…", "{good}");
    assert!(!good.to_string().contains("top-secret-token"));

    // Signed with another secret, and an hour old: both schemes fail and the age is flagged.
    let status = post_signed(&sink, &Secret::new("whsec_b3RoZXI="), now() - 3600, body).await;
    assert_eq!(status, 202);
    let bad = sink.next_delivery().await;
    assert_eq!(bad["verdicts"]["qualifio"], "mismatch", "{bad}");
    assert_eq!(bad["verdicts"]["standard_webhooks"], "mismatch", "{bad}");
    let warnings = bad["warnings"].to_string();
    assert!(warnings.contains("5 minutes"), "{warnings}");

    // Unsigned: both absent; a non-JSON body comes back as text.
    let response = send("POST", &sink.url("/plain?x=1"), &[], b"not json", None)
        .await
        .unwrap();
    assert_eq!(response.status, 202);
    let unsigned = sink.next_delivery().await;
    assert_eq!(unsigned["path"], "/plain?x=1");
    assert_eq!(unsigned["verdicts"]["qualifio"], "absent", "{unsigned}");
    assert_eq!(
        unsigned["verdicts"]["standard_webhooks"], "absent",
        "{unsigned}"
    );
    assert_eq!(unsigned["body"], "not json");
}

#[tokio::test]
async fn fail_first_answers_500_then_status() {
    let mut sink = SinkProcess::start(&["--json", "--fail-first", "1"]).await;
    let body = b"{}";
    let secret = Secret::new(SECRET);

    assert_eq!(post_signed(&sink, &secret, now(), body).await, 500);
    let first = sink.next_delivery().await;
    assert_eq!(
        (first["seq"].as_u64(), first["status"].as_u64()),
        (Some(1), Some(500))
    );
    // No secret given: signatures are seen but not judged.
    assert_eq!(first["verdicts"]["qualifio"], "unchecked", "{first}");

    assert_eq!(post_signed(&sink, &secret, now(), body).await, 200);
    let second = sink.next_delivery().await;
    assert_eq!(
        (second["seq"].as_u64(), second["status"].as_u64()),
        (Some(2), Some(200))
    );
}

#[tokio::test]
async fn refuses_non_loopback_listen_address() {
    let output = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_sink"))
            .args(["--listen", "0.0.0.0:0"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exits at once")
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

/// The Qualifio-scheme rotation of docs/operations.md, step 1: a receiver that accepts either
/// of two secrets verifies `x-qualifio-signature` (one value, the newest secret's) before and
/// after the integration's secret changes.
#[tokio::test]
async fn two_secrets_accept_either_for_a_rotation() {
    const NEW: &str = "whsec_cm90YXRlZC1zaW5rLXNpZ25pbmctc2VjcmV0LTMy";
    let mut sink = SinkProcess::start(&["--secret", SECRET, "--secret", NEW, "--json"]).await;
    let body = br#"{"participation":{"id":"pa1"},"n":2}"#;
    for secret in [SECRET, NEW] {
        assert_eq!(
            post_signed(&sink, &Secret::new(secret), now(), body).await,
            200
        );
        let got = sink.next_delivery().await;
        assert_eq!(got["verdicts"]["qualifio"], "ok", "{secret}: {got}");
        assert_eq!(
            got["verdicts"]["standard_webhooks"], "ok",
            "{secret}: {got}"
        );
    }
    let other = Secret::new("whsec_b3RoZXItc2lnbmluZy1zZWNyZXQtb2YtMzItYnl0ZQ==");
    post_signed(&sink, &other, now(), body).await;
    let got = sink.next_delivery().await;
    assert_eq!(got["verdicts"]["qualifio"], "mismatch", "{got}");
    assert_eq!(got["verdicts"]["standard_webhooks"], "mismatch", "{got}");
}
