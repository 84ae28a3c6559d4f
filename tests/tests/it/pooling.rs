//! Connections per destination: integrations that share an HTTPS receiver host share the
//! worker's connections to it, and the connections opened later resume their TLS sessions.
//! Counts from the receiver's side, never timings.

use std::time::Duration;

use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::eventually::{until, within};
use pushwire_tests::receiver::{ConnectionCounts, Reply, TestReceiver};
use pushwire_tests::worker::{PublishStream, Stack, completed_doc, request};

const ACCOUNT: &str = "accounts/77";
const INTEGRATIONS: usize = 5;
/// Per integration; together more than the 32 idle connections per host the client used to
/// keep, which churned connections as soon as several integrations shared a host.
const CONCURRENCY: u32 = 16;
/// Participations per round, all sent at once: every lane fills; then every connection is
/// idle until the next round.
const ROUND: usize = 40;
/// Rounds per wave.
const ROUNDS: usize = 5;
const TEST_LIMIT: Duration = Duration::from_secs(90);

/// Publishes a wave of rounds of participations (each to every integration), each round once
/// the receiver got every delivery of the one before, and returns the receiver's counts.
async fn wave(
    stream: &mut PublishStream,
    receiver: &TestReceiver,
    n: usize,
) -> anyhow::Result<ConnectionCounts> {
    for round in 0..ROUNDS {
        let expected = receiver.received_count() + ROUND * INTEGRATIONS;
        for i in 0..ROUND {
            let id = format!("P-{n}-{round}-{i}");
            stream
                .send(pb::PublishRequest {
                    request_id: id.clone(),
                    ..request(ACCOUNT, &completed_doc(&id).to_string())
                })
                .await?;
        }
        let responses = stream.responses(ROUND).await?;
        for (id, resp) in &responses {
            anyhow::ensure!(
                resp.error.is_empty() && resp.deliveries.len() == INTEGRATIONS,
                "{id}: {resp:?}"
            );
        }
        // A delivery whose attempt found its idle connection just closed is retried from the
        // delivery store; it arrives all the same.
        until("every delivery of the round received", TEST_LIMIT, || {
            receiver.received_count() >= expected
        })
        .await?;
    }
    Ok(receiver.connections())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_sharing_an_https_host_share_connections_and_resume_sessions()
-> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let receiver = TestReceiver::https().await?;
        // Answers take a moment, so that attempts overlap and every lane's slots are used.
        receiver.set_default(Reply::ok().after(Duration::from_millis(5)));
        let stack = Stack::start_with(|c, dir| {
            c.webhook.extra_ca_file = Some(receiver.write_ca_file(dir)?);
            c.delivery.concurrency = CONCURRENCY;
            Ok(())
        })
        .await?;
        for i in 0..INTEGRATIONS {
            let id = format!("crm-{i}");
            stack
                .admin()
                .create_routed(
                    ACCOUNT,
                    &id,
                    integration(&id, &receiver.url(&format!("/hooks/{id}"))),
                )
                .await?;
        }
        stack.sync().await?;
        // Attempts in flight are at most the integrations' concurrency together; connections
        // a little more: an attempt that finds no idle connection starts one, and when another
        // attempt's connection comes back first, the new one goes to the pool once opened.
        // Not proportional to the deliveries, as when the idle pool was smaller than that.
        let bound = 2 * (CONCURRENCY as usize * INTEGRATIONS) as u64;
        let mut stream = stack.open_stream().await?;

        let first = wave(&mut stream, &receiver, 0).await?;
        assert!(
            first.accepted > 0 && first.accepted <= bound,
            "{} deliveries over at most {bound} connections (twice the integrations' \
             concurrency together): {first:?}",
            ROUNDS * ROUND * INTEGRATIONS
        );
        assert_eq!(
            first.full_handshakes + first.resumed_handshakes,
            first.accepted,
            "every connection is TLS: {first:?}"
        );

        // The receiver drops every connection (a restart, an idle timeout): the next wave
        // opens new ones, which resume the sessions of the first wave's.
        receiver.close_connections();
        let second = wave(&mut stream, &receiver, 1).await? - first;
        eprintln!("first wave: {first:?}; second wave: {second:?}");
        assert!(
            second.accepted > 0 && second.accepted <= bound,
            "second wave: {second:?}"
        );
        assert_eq!(
            second.full_handshakes, 0,
            "second wave: every new connection resumed a session: {second:?}"
        );
        assert_eq!(second.resumed_handshakes, second.accepted, "{second:?}");
        Ok(())
    })
    .await?
}
