//! End-to-end tests of the worker's `IngestService` (`Publish` and `PublishOne`) with real
//! parts only: a control plane running its in-process worker (`--with-worker`) on the embedded
//! store, tonic clients, and loopback `TestReceiver`s (HTTP and HTTPS) that record what they
//! get. Standard Webhooks signatures are also checked with the reference Python library.

mod documents;
mod outcomes;
mod routing;
mod signatures;
mod stream;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use pushwire_tests::receiver::{Received, TestReceiver};

const ACCOUNT: &str = "accounts/42";
const OTHER_ACCOUNT: &str = "accounts/43";
/// Bound of every test.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// A webhook is recorded before the receiver answers, so once the participation is
/// acknowledged it is there; this only bounds a failing test.
const RECORD_WAIT: Duration = Duration::from_secs(5);
/// The Standard Webhooks reference library the signature test runs (also in `./dev`).
const STANDARDWEBHOOKS_PIN: &str = "standardwebhooks==1.1.0";

const QUALIFIO_SECRET: &str = "crm-signing-s3cret-of-24-bytes";
const AUTH_VALUE: &str = "Bearer ingest-t0ken";
/// `whsec_` + base64("pushwire-rotation-old-key-0001").
const WHSEC_OLD: &str = "whsec_cHVzaHdpcmUtcm90YXRpb24tb2xkLWtleS0wMDAx";
/// `whsec_` + base64("pushwire-rotation-new-key-0002").
const WHSEC_NEW: &str = "whsec_cHVzaHdpcmUtcm90YXRpb24tbmV3LWtleS0wMDAy";
/// `whsec_` + base64("pushwire-unpadded-whsec-key-0032") without its trailing `=`.
const WHSEC_UNPADDED: &str = "whsec_cHVzaHdpcmUtdW5wYWRkZWQtd2hzZWMta2V5LTAwMzI";
/// The W3C specification's example: a sampled trace.
const PARENT_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn name(account: &str, id: &str) -> String {
    format!("{account}/integrations/{id}")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The next webhook a receiver got, failing when none comes.
async fn next(receiver: &TestReceiver) -> anyhow::Result<Received> {
    receiver
        .next(RECORD_WAIT)
        .await
        .with_context(|| format!("no webhook at {}", receiver.addr()))
}

/// The body of a webhook as text; fails unless it is UTF-8 (every body published here is).
fn body(got: &Received) -> anyhow::Result<&str> {
    std::str::from_utf8(&got.body).context("the body is not UTF-8")
}

fn header<'a>(got: &'a Received, name: &str) -> anyhow::Result<&'a str> {
    got.header(name)
        .with_context(|| format!("no {name} header in {:?}", got.headers))
}

/// `(trace id, span id, flags)` of a version-00 `traceparent`, checked against the W3C rules
/// independently of the worker's own parser.
fn traceparent_parts(value: &str) -> anyhow::Result<(String, String, String)> {
    let parts: Vec<&str> = value.split('-').collect();
    anyhow::ensure!(parts.len() == 4, "traceparent {value:?}: not 4 fields");
    let (version, trace, span, flags) = (parts[0], parts[1], parts[2], parts[3]);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    anyhow::ensure!(version == "00", "traceparent {value:?}: version");
    anyhow::ensure!(hex(trace, 32), "traceparent {value:?}: trace id");
    anyhow::ensure!(hex(span, 16), "traceparent {value:?}: span id");
    anyhow::ensure!(hex(flags, 2), "traceparent {value:?}: flags");
    anyhow::ensure!(
        trace.bytes().any(|b| b != b'0'),
        "traceparent {value:?}: zero trace id"
    );
    anyhow::ensure!(
        span.bytes().any(|b| b != b'0'),
        "traceparent {value:?}: zero span id"
    );
    Ok((trace.to_owned(), span.to_owned(), flags.to_owned()))
}

/// `(participation id, integration id)` of a webhook, from its `webhook-id`.
fn webhook_parts(got: &Received) -> anyhow::Result<(String, String)> {
    let id = header(got, "webhook-id")?;
    let (participation, integration) = id
        .rsplit_once('_')
        .with_context(|| format!("webhook-id {id:?} without '_'"))?;
    Ok((participation.to_owned(), integration.to_owned()))
}
