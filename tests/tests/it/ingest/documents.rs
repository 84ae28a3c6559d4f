//! Documents that a publisher in any language can send and that must be refused one by one,
//! each with its own `error`, on a stream that stays open: bytes that are not UTF-8 (a
//! protobuf `string` must be UTF-8, which a client encoding the field as bytes need not
//! respect), duplicate keys, and participation ids that cannot be a `webhook-id` header as
//! they are.

use anyhow::Context as _;
use pushwire_common::pb::codec::PushwireCodec;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::as_admin;
use pushwire_tests::eventually::within;
use pushwire_tests::receiver::TestReceiver;
use pushwire_tests::worker::{Stack, WAIT, completed_doc, delivered_once};
use tonic::codegen::http::uri::PathAndQuery;

use super::{ACCOUNT, TEST_LIMIT, next, webhook_parts};

/// `PublishRequest` as a client may encode it: the document as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPublishRequest {
    #[prost(string, tag = "1")]
    account: String,
    #[prost(bytes = "vec", tag = "2")]
    participation_json: Vec<u8>,
    #[prost(string, tag = "7")]
    request_id: String,
}

fn raw(request_id: &str, json: impl Into<Vec<u8>>) -> RawPublishRequest {
    RawPublishRequest {
        account: ACCOUNT.into(),
        participation_json: json.into(),
        request_id: request_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_get_their_own_error_and_the_stream_goes_on() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        let crm = stack
            .admin()
            .create_routed(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?;
        stack.sync().await?;

        let mut not_utf8 = completed_doc("N-1").to_string().into_bytes();
        not_utf8.splice(2..2, [0xC3, 0x28]); // an invalid two-byte sequence
        // `state` twice: serde_json keeps the last, other parsers the first.
        let duplicate = completed_doc("N-2").to_string();
        let duplicate = format!(
            "{}, \"state\": \"STARTED\"}}",
            duplicate.strip_suffix('}').context("an object")?
        );
        let requests = vec![
            raw("r1", not_utf8),
            raw("r2", duplicate),
            raw("r3", completed_doc("N-\u{e9}3").to_string()),
            raw("r4", completed_doc("N-4").to_string()),
        ];

        let mut grpc = tonic::client::Grpc::new(as_admin(stack.raw_channel()));
        grpc.ready().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut responses = tokio::time::timeout(
            WAIT,
            grpc.streaming(
                tonic::Request::new(tokio_stream::iter(requests)),
                PathAndQuery::from_static("/pushwire.v1.IngestService/Publish"),
                PushwireCodec::<RawPublishRequest, pb::PublishResponse>::default(),
            ),
        )
        .await
        .context("Publish did not answer")??
        .into_inner();
        let mut by_id = std::collections::HashMap::new();
        // Every request answered, then a clean end (not INTERNAL).
        while let Some(r) = tokio::time::timeout(WAIT, responses.message())
            .await
            .context("no response")??
        {
            by_id.insert(r.request_id.clone(), r);
        }
        let error = |id: &str| by_id.get(id).map(|r| r.error.clone()).unwrap_or_default();
        assert!(
            error("r1").starts_with("participation_json: $: not valid UTF-8 (from byte 2)"),
            "{by_id:?}"
        );
        assert!(
            error("r2").starts_with("participation_json: $.state: duplicate key"),
            "{by_id:?}"
        );
        assert!(
            error("r3").starts_with("participation_json: $.id: must be visible ASCII"),
            "{by_id:?}"
        );
        let r4 = by_id.get("r4").context("r4 answered")?;
        assert_eq!(r4.error, "");
        assert_eq!(r4.deliveries, vec![delivered_once(&crm)]);

        // Only the good one reached the receiver.
        let (participation, _) = webhook_parts(&next(&receiver).await?)?;
        assert_eq!(participation, "N-4");
        assert_eq!(receiver.received_count(), 1);
        stack.stop().await
    })
    .await?
}
