//! Property tests (the fuzzing of issue 5) of the configuration conversions workers apply to
//! what `WatchConfig` sends: any `IntegrationConfig` or `PushScope` message is decoded or
//! refused with the field named, never a panic; decoded values round-trip.
//!
//! `cargo test` runs a few hundred cases per property. Run longer by hand:
//! `PROPTEST_CASES=100000 cargo test --release -p pushwire-common --test convert_props`.

use proptest::prelude::*;
use proptest::test_runner::Config;
use pushwire_common::domain::convert::{self, InvalidField};
use pushwire_common::domain::{Integration, PushScope};
use pushwire_common::pb::v1 as pb;

/// `default_cases` per property, unless `PROPTEST_CASES` says otherwise.
fn config(default_cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config
}

/// A refusal names a field of the message (`integration.…`, `push_scope.…`,
/// `signing_secrets[n].…`) and says what is wrong.
fn check_refusal(err: &InvalidField, roots: &[&str]) -> Result<(), TestCaseError> {
    prop_assert!(
        roots.iter().any(|r| err.field.starts_with(r)),
        "field {:?}",
        err.field
    );
    prop_assert!(!err.reason.is_empty());
    prop_assert_eq!(err.to_string(), format!("{}: {}", err.field, err.reason));
    Ok(())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9-]{1,8}", ".{0,16}"]
}

fn resource_name(collection: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => ("[a-z0-9-]{1,8}", "[a-z0-9-]{1,8}")
            .prop_map(move |(a, id)| format!("accounts/{a}/{collection}/{id}")),
        1 => text(),
    ]
}

/// Mostly values of the enum (`0..max`), now and then anything.
fn enum_value(max: i32) -> impl Strategy<Value = i32> {
    prop_oneof![12 => 0..max, 1 => any::<i32>()]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop::option::of(prop_oneof![
        12 => (0..4_000_000_000i64, 0..1_000_000_000i32)
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
        1 => (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    ])
}

fn etag() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (1..1_000_000i64).prop_map(|r| r.to_string()),
        1 => text(),
    ]
}

fn integration_config() -> impl Strategy<Value = pb::IntegrationConfig> {
    let header = prop::option::of((text(), text(), any::<bool>()).prop_map(
        |(name, value, value_set)| pb::AuthHeader {
            name,
            value,
            value_set,
        },
    ));
    let integration = (
        (
            resource_name("integrations"),
            text(),
            text(),
            prop::option::of(any::<bool>()),
        ),
        (
            enum_value(3),
            enum_value(3),
            prop::collection::vec(prop_oneof![12 => 1..3i32, 1 => enum_value(3)], 0..4),
        ),
        (header, text(), timestamp(), timestamp(), etag()),
    )
        .prop_map(
            |(
                (name, display_name, url, enabled),
                (incomplete, variables, schemes),
                (auth_header, disabled_reason, create_time, update_time, etag),
            )| pb::Integration {
                name,
                display_name,
                url,
                enabled,
                incomplete_participations: incomplete,
                payload_variables: variables,
                signature_schemes: schemes,
                auth_header,
                disabled_reason,
                create_time,
                update_time,
                etag,
                ..Default::default()
            },
        );
    let secrets = prop::collection::vec(
        (text(), timestamp()).prop_map(|(secret, expire_time)| pb::SigningSecret {
            secret,
            expire_time,
        }),
        0..4,
    );
    (
        prop_oneof![12 => integration.prop_map(Some), 1 => Just(None)],
        text(),
        secrets,
    )
        .prop_map(
            |(integration, auth_header_value, signing_secrets)| pb::IntegrationConfig {
                integration,
                auth_header_value,
                signing_secrets,
            },
        )
}

fn push_scope() -> impl Strategy<Value = pb::PushScope> {
    (
        (resource_name("pushScopes"), resource_name("integrations")),
        (enum_value(5), enum_value(4), enum_value(3)),
        prop_oneof![
            Just(String::new()),
            "0{0,2}[0-9]{1,6}",
            "[A-Za-z0-9_-]{1,70}",
            text()
        ],
        (timestamp(), timestamp(), etag()),
    )
        .prop_map(
            |((name, integration), (level, audience, action), target_id, (c, u, etag))| {
                pb::PushScope {
                    name,
                    integration,
                    level,
                    target_id,
                    audience,
                    action,
                    create_time: c,
                    update_time: u,
                    etag,
                }
            },
        )
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn integration_configs_decode_or_name_the_field(msg in integration_config()) {
        match Integration::try_from(msg) {
            Err(err) => check_refusal(&err, &["integration", "signing_secrets["])?,
            Ok(decoded) => {
                // What the control plane sends for it decodes to the same integration.
                let again = Integration::try_from(convert::integration_config(&decoded))
                    .map_err(|e| TestCaseError::fail(format!("{e} for {decoded:?}")))?;
                prop_assert_eq!(again, decoded);
            }
        }
    }

    #[test]
    fn push_scopes_decode_or_name_the_field(msg in push_scope()) {
        match PushScope::try_from(msg) {
            Err(err) => check_refusal(&err, &["push_scope."])?,
            Ok(decoded) => {
                let again = PushScope::try_from(pb::PushScope::from(&decoded))
                    .map_err(|e| TestCaseError::fail(format!("{e} for {decoded:?}")))?;
                prop_assert_eq!(again, decoded);
            }
        }
    }

    #[test]
    fn enum_and_target_conversions_never_panic(
        v in any::<i32>(),
        target in ".{0,80}",
        level in prop::sample::select(vec![
            convert::Level::Account,
            convert::Level::Website,
            convert::Level::MasterForm,
            convert::Level::Campaign,
        ]),
    ) {
        for result in [
            convert::incomplete_policy("f", v).map(|_| ()),
            convert::payload_variables("f", v).map(|_| ()),
            convert::level("f", v).map(|_| ()),
            convert::audience("f", v).map(|_| ()),
            convert::action("f", v).map(|_| ()),
            convert::signature_schemes("f", &[v]).map(|_| ()),
            convert::etag("f", &target).map(|_| ()),
        ] {
            if let Err(err) = result {
                prop_assert!(err.field.starts_with('f'), "{err}");
            }
        }
        match convert::scope_target(level, &target) {
            Ok(_) => prop_assert!(
                (level == convert::Level::Account) == target.is_empty(),
                "{level:?} {target:?}"
            ),
            Err(err) => prop_assert_eq!(err.field, "push_scope.target_id"),
        }
    }
}
