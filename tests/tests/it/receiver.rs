//! Tests of the `TestReceiver` harness itself: programmed answers in order then the default,
//! headers and body bytes recorded exactly, delays and hangs, HTTPS trusted through its own CA,
//! and a clean shutdown on drop. Everything stays on loopback.

use std::time::{Duration, Instant};

use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::receiver::{Reply, TestReceiver, TlsIdentity, send};

const WAIT: Duration = Duration::from_secs(10);

async fn post(receiver: &TestReceiver, path: &str) -> u16 {
    let response = tokio::time::timeout(
        WAIT,
        send("POST", &receiver.url(path), &[], b"{}", receiver.ca_pem()),
    )
    .await
    .expect("answer in time")
    .expect("request");
    response.status
}

#[tokio::test]
async fn programmed_statuses_in_order_then_default() {
    let receiver = TestReceiver::http().await.unwrap();
    receiver.respond_with(vec![
        Reply::status(500),
        Reply::status(429).with_header("retry-after", "1"),
        Reply::status(201).with_body("created"),
    ]);
    receiver.set_default(Reply::status(204));

    let first = send("POST", &receiver.url("/a"), &[], b"1", None)
        .await
        .unwrap();
    assert_eq!(first.status, 500);
    let second = send("POST", &receiver.url("/a"), &[], b"2", None)
        .await
        .unwrap();
    assert_eq!(second.status, 429);
    assert_eq!(second.header("Retry-After"), Some("1"));
    let third = send("POST", &receiver.url("/a"), &[], b"3", None)
        .await
        .unwrap();
    assert_eq!(
        (third.status, third.body.as_slice()),
        (201, &b"created"[..])
    );
    assert_eq!(post(&receiver, "/a").await, 204);
    assert_eq!(post(&receiver, "/a").await, 204);

    // Flipped mid-test, as a receiver going down and coming back.
    receiver.set_default(Reply::status(503));
    assert_eq!(post(&receiver, "/a").await, 503);
    receiver.set_default(Reply::ok());
    assert_eq!(post(&receiver, "/a").await, 200);

    assert_eq!(receiver.received_count(), 7);
    let bodies: Vec<Vec<u8>> = receiver.drain().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies[..3], [b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
    assert_eq!(bodies.len(), 7);
    assert!(receiver.drain().is_empty());
}

#[tokio::test]
async fn records_method_path_headers_and_exact_body() {
    let receiver = TestReceiver::http().await.unwrap();
    // Not UTF-8, with NUL and CRLF: must come back byte for byte.
    let body: Vec<u8> = vec![0xff, 0x00, b'\r', b'\n', 0xc3, 0x28, b'{', b'}', 0x80];
    let before = Instant::now();
    let response = send(
        "PUT",
        &receiver.url("/hooks/x?a=1&b=two"),
        &[
            ("Webhook-Id", "p1_i1"),
            ("X-Qualifio-Signature", "sha256=00"),
            ("content-type", "application/json"),
        ],
        &body,
        None,
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);

    let got = receiver.next(WAIT).await.expect("recorded");
    assert_eq!(got.method, "PUT");
    assert_eq!(got.path, "/hooks/x?a=1&b=two");
    assert_eq!(got.body, body);
    assert!(got.at >= before);
    assert_eq!(got.header("webhook-id"), Some("p1_i1"));
    assert_eq!(got.header("X-QUALIFIO-SIGNATURE"), Some("sha256=00"));
    assert!(
        got.headers
            .iter()
            .all(|(n, _)| *n == n.to_ascii_lowercase()),
        "{:?}",
        got.headers
    );
    assert!(
        got.headers
            .contains(&("webhook-id".to_owned(), "p1_i1".to_owned()))
    );
    assert!(
        got.headers
            .contains(&("content-length".to_owned(), body.len().to_string()))
    );

    assert!(receiver.next(Duration::from_millis(50)).await.is_none());
}

#[tokio::test]
async fn delayed_reply_waits_and_hang_never_answers_until_drop() {
    let receiver = TestReceiver::http().await.unwrap();
    receiver.respond_with(vec![
        Reply::ok().after(Duration::from_millis(200)),
        Reply::hang(),
    ]);

    let start = Instant::now();
    assert_eq!(post(&receiver, "/slow").await, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );

    let url = receiver.url("/hang");
    let hung = tokio::spawn(async move { send("POST", &url, &[], b"h", None).await });
    let got = receiver.next(WAIT).await.expect("hung request recorded");
    assert_eq!(got.path, "/slow");
    let got = receiver.next(WAIT).await.expect("hung request recorded");
    assert_eq!(got.path, "/hang");
    assert!(!hung.is_finished());

    // Dropping the receiver closes the hung connection: the client sees an error, not a reply.
    drop(receiver);
    let result = tokio::time::timeout(WAIT, hung)
        .await
        .expect("closed on drop")
        .unwrap();
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn drop_stops_listening() {
    let receiver = TestReceiver::http().await.unwrap();
    let addr = receiver.addr();
    assert_eq!(post(&receiver, "/").await, 200);
    drop(receiver);
    // The listener closes when the aborted task is dropped by the runtime, which is prompt but
    // asynchronous: retry, bounded, until connections are refused.
    eventually("the listener closed after drop", WAIT, || async move {
        let connected = tokio::net::TcpStream::connect(addr).await.is_ok();
        Ok(Poll::when(!connected, "connections accepted"))
    })
    .await
    .expect("listener closed after drop");
}

#[tokio::test]
async fn https_is_trusted_through_its_ca_by_ip_and_by_name() {
    let receiver = TestReceiver::https().await.unwrap();
    assert!(receiver.url("/x").starts_with("https://127.0.0.1:"));
    assert!(
        receiver
            .localhost_url("x")
            .starts_with("https://localhost:")
    );
    let ca = receiver.ca_pem().unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");

    receiver.respond_with(vec![Reply::status(202)]);
    let by_ip = send("POST", &receiver.url("/x"), &[], b"tls-body", Some(ca))
        .await
        .unwrap();
    assert_eq!(by_ip.status, 202);
    let by_name = send("POST", &receiver.localhost_url("/y"), &[], b"", Some(ca))
        .await
        .unwrap();
    assert_eq!(by_name.status, 200);
    let got = receiver.next(WAIT).await.unwrap();
    assert_eq!(
        (got.path.as_str(), got.body.as_slice()),
        ("/x", &b"tls-body"[..])
    );

    // Another CA is not trusted, and plain HTTP to the TLS port gets no answer.
    let other = TlsIdentity::generate().unwrap();
    assert!(
        send("POST", &receiver.url("/z"), &[], b"", Some(other.ca_pem()))
            .await
            .is_err()
    );
    let plain = receiver.url("/z").replacen("https", "http", 1);
    assert!(send("POST", &plain, &[], b"", None).await.is_err());
    assert_eq!(receiver.received_count(), 2);

    let dir = tempfile::tempdir().unwrap();
    let path = receiver.write_ca_file(dir.path()).unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), ca);
    assert!(
        TestReceiver::http()
            .await
            .unwrap()
            .write_ca_file(dir.path())
            .is_err()
    );
}

#[tokio::test]
async fn refuses_non_loopback_targets() {
    let err = send("POST", "http://192.0.2.1:80/", &[], b"", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
    let err = send("POST", "http://example.com/", &[], b"", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}
