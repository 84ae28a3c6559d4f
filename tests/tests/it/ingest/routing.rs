//! Which integrations a participation reaches: routing as ResolvePushes answers it,
//! incomplete participations, `only_integrations`, and configuration changes.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::{integration, scope};
use pushwire_tests::eventually::within;
use pushwire_tests::receiver::TestReceiver;
use pushwire_tests::worker::{
    COMPLETED, COMPLETED_ID, FIXTURE_CAMPAIGN, INCOMPLETE, INCOMPLETE_ID, Stack, by_integration,
    completed_doc, delivered, delivered_once, participation, request,
};
use serde_json::json;

use super::{ACCOUNT, OTHER_ACCOUNT, TEST_LIMIT, body, header, name, next, webhook_parts};

// ---------------------------------------------------------------------------------------------
// 4. Routing: what the worker delivers is what ResolvePushes answers.

/// One routing case: a participation and the integrations (ids) that must fire.
struct Case {
    id: &'static str,
    campaign: serde_json::Value,
    website: Option<serde_json::Value>,
    /// Whether the form holds responses (inferred identification).
    form_responses: bool,
    /// `identified` of the request, when given.
    identified: Option<bool>,
    master_form: &'static str,
    expected: &'static [&'static str],
}

impl Case {
    fn json(&self) -> String {
        let mut doc = completed_doc(self.id);
        doc["campaign"]["id"] = self.campaign.clone();
        match &self.website {
            Some(w) => doc["campaign"]["channel"]["website"]["id"] = w.clone(),
            None => {
                doc["campaign"]
                    .as_object_mut()
                    .expect("object")
                    .remove("channel");
            }
        }
        if !self.form_responses {
            doc["form"] = json!([]);
        }
        doc.to_string()
    }

    fn resolve_request(&self) -> pb::ResolvePushesRequest {
        let id = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        pb::ResolvePushesRequest {
            account: ACCOUNT.into(),
            website_id: self.website.as_ref().map(id).unwrap_or_default(),
            master_form_id: self.master_form.into(),
            campaign_id: id(&self.campaign),
            identified: Some(self.identified.unwrap_or(self.form_responses)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_matches_resolve_pushes_across_levels_actions_and_audiences() -> anyhow::Result<()>
{
    within("the test body", TEST_LIMIT, async {
        use pb::PushScopeLevel::{Account, Campaign, MasterForm, Website};
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        for id in ["site", "known", "unknown", "quiz", "form", "most"] {
            stack
                .admin()
                .create_integration(ACCOUNT, id, integration(id, &receiver.url(id)))
                .await?;
        }
        let off = pb::Integration {
            enabled: Some(false),
            ..integration("off", &receiver.url("off"))
        };
        stack
            .admin()
            .create_integration(ACCOUNT, "off", off)
            .await?;
        stack
            .admin()
            .create_routed(
                OTHER_ACCOUNT,
                "elsewhere",
                integration("x", &receiver.url("x")),
            )
            .await?;
        let audience = |s: pb::PushScope, a: pb::Audience| pb::PushScope {
            audience: a.into(),
            ..s
        };
        let exclude = |s: pb::PushScope| pb::PushScope {
            action: pb::PushAction::DoNotPush.into(),
            ..s
        };
        let n = |id| name(ACCOUNT, id);
        let scopes = [
            // Every campaign of website 5120 except campaign 99.
            ("site-5120", scope(&n("site"), Website, "5120")),
            ("site-not-99", exclude(scope(&n("site"), Campaign, "99"))),
            // Identified participants only / anonymous ones only.
            (
                "known",
                audience(scope(&n("known"), Account, ""), pb::Audience::Identified),
            ),
            (
                "unknown",
                audience(scope(&n("unknown"), Account, ""), pb::Audience::Anonymous),
            ),
            ("quiz", scope(&n("quiz"), Campaign, FIXTURE_CAMPAIGN)),
            ("form-77", scope(&n("form"), MasterForm, "77")),
            // Everything except website 6000, where campaign 555 is wanted anyway.
            ("most", scope(&n("most"), Account, "")),
            ("most-not-6000", exclude(scope(&n("most"), Website, "6000"))),
            ("most-555", scope(&n("most"), Campaign, "555")),
            ("off", scope(&n("off"), Account, "")),
        ];
        for (id, s) in scopes {
            stack.admin().create_scope(ACCOUNT, id, s).await?;
        }
        stack.sync().await?;

        let cases = [
            Case {
                id: "M1",
                campaign: json!(418207),
                website: Some(json!(5120)),
                form_responses: true,
                identified: None,
                master_form: "",
                expected: &["known", "most", "quiz", "site"],
            },
            Case {
                id: "M2",
                campaign: json!(99),
                website: Some(json!(5120)),
                form_responses: true,
                identified: None,
                master_form: "",
                expected: &["known", "most"],
            },
            Case {
                id: "M3",
                campaign: json!(1234),
                website: Some(json!(6000)),
                form_responses: false,
                identified: None,
                master_form: "",
                expected: &["unknown"],
            },
            Case {
                id: "M4",
                campaign: json!(555),
                website: Some(json!(6000)),
                form_responses: false,
                identified: None,
                master_form: "",
                expected: &["most", "unknown"],
            },
            // The request's `identified` overrides what the form suggests.
            Case {
                id: "M5",
                campaign: json!(1234),
                website: Some(json!(6000)),
                form_responses: false,
                identified: Some(true),
                master_form: "",
                expected: &["known"],
            },
            Case {
                id: "M6",
                campaign: json!(418207),
                website: None,
                form_responses: true,
                identified: Some(false),
                master_form: "",
                expected: &["most", "quiz", "unknown"],
            },
            Case {
                id: "M7",
                campaign: json!(1234),
                website: Some(json!(7000)),
                form_responses: false,
                identified: None,
                master_form: "77",
                expected: &["form", "most", "unknown"],
            },
            // Digit-only ids compare as numbers, wherever they come from.
            Case {
                id: "M8",
                campaign: json!(1234),
                website: Some(json!(7000)),
                form_responses: false,
                identified: None,
                master_form: "077",
                expected: &["form", "most", "unknown"],
            },
            Case {
                id: "M9",
                campaign: json!("0418207"),
                website: Some(json!("05120")),
                form_responses: true,
                identified: None,
                master_form: "",
                expected: &["known", "most", "quiz", "site"],
            },
        ];

        let mut stream = stack.open_stream().await?;
        for case in &cases {
            stream
                .send(pb::PublishRequest {
                    master_form_id: case.master_form.into(),
                    identified: case.identified,
                    request_id: case.id.into(),
                    ..request(ACCOUNT, &case.json())
                })
                .await?;
        }
        let responses = stream.responses(cases.len()).await?;

        let mut total = 0;
        for case in &cases {
            let resp = &responses[case.id];
            assert_eq!(resp.error, "", "{}", case.id);
            assert_eq!(resp.participation_id, case.id);
            let expected: BTreeSet<String> = case.expected.iter().map(|i| n(i)).collect();
            let resolved = stack.admin().resolve(case.resolve_request()).await?;
            assert_eq!(resolved, expected, "ResolvePushes for {}", case.id);
            assert_eq!(delivered(resp), expected, "deliveries of {}", case.id);
            assert_eq!(
                resp.deliveries,
                case.expected
                    .iter()
                    .map(|i| delivered_once(&n(i)))
                    .collect::<Vec<_>>(),
                "{}",
                case.id
            );
            total += expected.len();
        }

        // The receiver saw exactly those webhooks, each with the participation's bytes.
        let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for got in receiver.drain() {
            let (participation, integration) = webhook_parts(&got)?;
            assert_eq!(got.path, format!("/{integration}"));
            let case = cases
                .iter()
                .find(|c| c.id == participation)
                .with_context(|| format!("unexpected participation {participation}"))?;
            assert_eq!(body(&got)?, case.json());
            assert!(seen.entry(participation).or_default().insert(integration));
        }
        assert_eq!(receiver.received_count(), total);
        for case in &cases {
            let expected: BTreeSet<String> = case.expected.iter().map(|i| (*i).into()).collect();
            assert_eq!(
                seen.remove(case.id).unwrap_or_default(),
                expected,
                "{}",
                case.id
            );
        }
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 5. Incomplete participations: SKIP or SEND per integration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_participations_are_skipped_or_sent_per_policy() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let (skip_rx, send_rx) = (TestReceiver::http().await?, TestReceiver::http().await?);
        let skipper = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "skipper",
                integration("Skipper", &skip_rx.url("/")),
            )
            .await?;
        let sender = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "sender",
                pb::Integration {
                    incomplete_participations: pb::IncompleteParticipations::Send.into(),
                    ..integration("Sender", &send_rx.url("/"))
                },
            )
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, INCOMPLETE)).await??;
        assert_eq!(resp.participation_id, INCOMPLETE_ID);
        assert_eq!(resp.error, "");
        let outcomes = by_integration(&resp);
        assert_eq!(outcomes.len(), 2, "{resp:?}");
        let skipped = &outcomes[&skipper];
        assert_eq!(skipped.outcome(), pb::DeliveryOutcome::Skipped);
        assert_eq!((skipped.attempts, skipped.last_status_code), (0, 0));
        assert!(
            skipped.skip_reason.contains("STARTED") && skipped.skip_reason.contains("completed"),
            "{:?}",
            skipped.skip_reason
        );
        assert_eq!(outcomes[&sender], delivered_once(&sender));
        let got = next(&send_rx).await?;
        assert_eq!(body(&got)?, INCOMPLETE);
        assert_eq!(
            header(&got, "webhook-id")?,
            format!("{INCOMPLETE_ID}_sender")
        );
        assert_eq!(
            skip_rx.received_count(),
            0,
            "nothing sent for a SKIPPED delivery"
        );

        // Completed participations go to both.
        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        assert_eq!(
            resp.deliveries,
            vec![delivered_once(&sender), delivered_once(&skipper)]
        );
        assert_eq!(body(&next(&skip_rx).await?)?, COMPLETED);
        assert_eq!(body(&next(&send_rx).await?)?, COMPLETED);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 9. only_integrations.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_integrations_limits_a_republish() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let (first_rx, second_rx) = (TestReceiver::http().await?, TestReceiver::http().await?);
        let first = stack
            .admin()
            .create_routed(ACCOUNT, "first", integration("First", &first_rx.url("/")))
            .await?;
        let second = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "second",
                integration("Second", &second_rx.url("/")),
            )
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        assert_eq!(
            resp.deliveries,
            vec![delivered_once(&first), delivered_once(&second)]
        );
        let original = next(&second_rx).await?;

        let only = |names: Vec<String>| pb::PublishRequest {
            only_integrations: names,
            ..request(ACCOUNT, COMPLETED)
        };
        let resp = stack.publish_one(only(vec![second.clone()])).await??;
        assert_eq!(resp.participation_id, COMPLETED_ID);
        assert_eq!(resp.deliveries, vec![delivered_once(&second)]);
        let again = next(&second_rx).await?;
        assert_eq!(
            header(&again, "webhook-id")?,
            header(&original, "webhook-id")?,
            "the same webhook-id, for receivers to de-duplicate"
        );
        assert_eq!(first_rx.received_count(), 1);
        assert_eq!(second_rx.received_count(), 2);

        // An integration of another account is refused; nothing is sent.
        let resp = stack
            .publish_one(only(vec![name(OTHER_ACCOUNT, "first")]))
            .await??;
        assert_eq!(
            resp.error,
            "only_integrations[0]: not an integration of accounts/42"
        );
        assert_eq!(
            (resp.participation_id.as_str(), resp.deliveries.len()),
            ("", 0)
        );
        let resp = stack
            .publish_one(only(vec![second.clone(), "second".into()]))
            .await??;
        assert!(
            resp.error.starts_with("only_integrations[1]: invalid name"),
            "{}",
            resp.error
        );
        // A name that does not route: nothing to deliver, no error.
        let resp = stack
            .publish_one(only(vec![name(ACCOUNT, "nobody")]))
            .await??;
        assert_eq!((resp.error.as_str(), resp.deliveries.len()), ("", 0));
        assert_eq!(first_rx.received_count() + second_rx.received_count(), 3);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 11. Configuration changes apply to the next participation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_url_applies_to_the_next_participation() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let (old_rx, new_rx) = (TestReceiver::http().await?, TestReceiver::http().await?);
        let moving = stack
            .admin()
            .create_routed(ACCOUNT, "moving", integration("Moving", &old_rx.url("/v1")))
            .await?;
        stack.sync().await?;
        let p1 = participation("URL-1", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &p1)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&moving)]);
        assert_eq!(body(&next(&old_rx).await?)?, p1);

        stack
            .admin()
            .update_integration(
                pb::Integration {
                    name: moving.clone(),
                    url: new_rx.url("/v2"),
                    ..Default::default()
                },
                &["url"],
            )
            .await?;
        stack.sync().await?;
        let p2 = participation("URL-2", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &p2)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&moving)]);
        let got = next(&new_rx).await?;
        assert_eq!((got.path.as_str(), body(&got)?), ("/v2", p2.as_str()));
        assert_eq!(old_rx.received_count(), 1);
        assert_eq!(new_rx.received_count(), 1);
        Ok(())
    })
    .await?
}
