//! Property tests (the fuzzing of issue 5) of the participation parser and of the `variables`
//! payload built from its documents: whatever the input, `parse` returns (never panics) and a
//! refusal names a `$` JSON path; valid documents round-trip.
//!
//! `cargo test` runs a few hundred cases per property, in about a second. Run longer by hand:
//! `PROPTEST_CASES=100000 cargo test --release -p pushwire-common --test participation_props`.

use proptest::prelude::*;
use proptest::test_runner::Config;
use pushwire_common::participation::{self, DEFAULT_MAX_BYTES, InvalidParticipation, MAX_DEPTH};
use pushwire_common::payload;
use serde_json::{Map, Value, json};

const COMPLETED: &str = include_str!("data/participation-v2-completed.json");

/// `default_cases` per property, unless `PROPTEST_CASES` says otherwise.
fn config(default_cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config
}

/// Members of the document the parser reads; every error path starts with one of them.
const CHECKED: &[&str] = &["id", "state", "campaign", "form", "optins", "questionnaire"];

/// What every refusal must look like: a `$` path into the document, a short reason.
fn check_refusal(err: &InvalidParticipation) -> Result<(), TestCaseError> {
    prop_assert!(err.path.starts_with('$'), "path {:?}", err.path);
    prop_assert!(!err.reason.is_empty());
    prop_assert!(
        err.to_string().chars().count() < 600,
        "{} chars: {err}",
        err.to_string().len()
    );
    Ok(())
}

/// Checks the outcome of parsing `raw` against the document rules.
fn check_outcome(raw: &str) -> Result<(), TestCaseError> {
    let doc = serde_json::from_str::<Value>(raw).ok();
    let doc = doc.as_ref();
    match participation::parse(raw, DEFAULT_MAX_BYTES) {
        Err(err) => {
            check_refusal(&err)?;
            if err.path != "$" {
                let member = err.path[2..]
                    .split(['.', '['])
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                prop_assert!(
                    CHECKED.contains(&member.as_str()) || err.reason.contains("nested deeper"),
                    "{err}"
                );
            }
        }
        Ok(p) => {
            let doc = doc.expect("a parsed document is JSON");
            prop_assert_eq!(&p.document, doc);
            prop_assert_eq!(Some(p.id.as_str()), doc["id"].as_str());
            prop_assert!(!p.id.is_empty() && p.id.chars().count() <= 200 && !p.id.contains('.'));
            prop_assert!(!p.id.chars().any(char::is_control));
            prop_assert_eq!(Some(p.state.as_str()), doc["state"].as_str());
            prop_assert_eq!(p.is_complete(), p.state == "COMPLETED");
            for id in std::iter::once(&p.campaign_id).chain(&p.website_id) {
                prop_assert!(
                    id == "0" || (!id.starts_with('0') && id.bytes().all(|b| b.is_ascii_digit())),
                    "{id}"
                );
                prop_assert!(id.parse::<u64>().is_ok(), "{id}");
            }
        }
    }
    Ok(())
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Floats that print and parse back exactly (arbitrary number text is in the text
        // properties).
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 4.0)),
        "[0-9]{1,25}".prop_map(Value::String),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![Just("COMPLETED"), Just("STARTED"), Just(""), Just("a.b")]
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Object keys, mostly those the parser and the payload read.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "id", "state", "campaign", "channel", "website", "form", "optins",
            "questionnaire", "responses", "variable", "value", "path", "response", "variables",
        ])
        .prop_map(str::to_owned),
        1 => ".{0,8}",
    ]
}

/// A document shaped like a participation, each part right or wrong.
fn participation_like() -> impl Strategy<Value = Value> {
    let id = prop_oneof!["[A-Za-z0-9-]{1,40}".prop_map(Value::String), json_value(),];
    let numeric_id = prop_oneof![
        any::<u64>().prop_map(Value::from),
        "0{0,3}[0-9]{1,19}".prop_map(Value::String),
        json_value(),
    ];
    let website = prop_oneof![
        Just(None),
        numeric_id.clone().prop_map(|id| Some(json!({ "id": id }))),
        json_value().prop_map(Some),
    ];
    let section = prop_oneof![
        Just(None),
        json_value().prop_map(Some),
        items().prop_map(Some)
    ];
    (
        id,
        prop_oneof![
            Just(Value::from("COMPLETED")),
            Just(Value::from("STARTED")),
            json_value()
        ],
        numeric_id,
        website,
        section.clone(),
        section.clone(),
        section,
    )
        .prop_map(
            |(id, state, campaign_id, website, form, optins, questions)| {
                let mut channel = Map::new();
                if let Some(w) = website {
                    channel.insert("website".into(), w);
                }
                let mut doc = json!({
                    "id": id,
                    "state": state,
                    "campaign": { "id": campaign_id, "channel": channel },
                });
                for (key, section) in [
                    ("form", form),
                    ("optins", optins),
                    ("questionnaire", questions),
                ] {
                    if let Some(s) = section {
                        doc[key] = s;
                    }
                }
                doc
            },
        )
}

/// An array of form fields, opt-ins or questions: objects with a `variable` and `responses`,
/// now and then of the wrong type.
fn items() -> impl Strategy<Value = Value> {
    let variable = prop_oneof![
        4 => "[a-z_]{0,6}".prop_map(Value::String),
        1 => json_value(),
    ];
    let response = prop_oneof![
        4 => (json_value(), prop::option::of(".{0,6}")).prop_map(|(v, path)| {
            let mut r = json!({ "value": v });
            if let Some(p) = path {
                r["path"] = Value::String(p);
            }
            r
        }),
        1 => json_value(),
    ];
    let responses = prop_oneof![
        4 => prop::collection::vec(response, 0..3).prop_map(Value::Array),
        1 => json_value(),
    ];
    let item = (
        prop::option::of(variable),
        prop::option::of(responses),
        prop::option::of(json_value()),
    )
        .prop_map(|(variable, responses, answer)| {
            let mut item = Map::new();
            if let Some(v) = variable {
                item.insert("variable".into(), v);
            }
            if let Some(r) = responses {
                item.insert("responses".into(), r);
            }
            if let Some(a) = answer {
                item.insert("response".into(), a);
            }
            Value::Object(item)
        });
    prop::collection::vec(prop_oneof![6 => item, 1 => json_value()], 0..4).prop_map(Value::Array)
}

/// A valid participation from its parts, and what `parse` must make of it.
#[derive(Clone, Debug)]
struct Valid {
    doc: Value,
    id: String,
    state: String,
    campaign_id: u64,
    website_id: Option<u64>,
}

fn valid_participation() -> impl Strategy<Value = Valid> {
    // Numeric ids come as numbers or as digit strings with leading zeros.
    let numeric = (any::<u64>(), 0..3usize, any::<bool>()).prop_map(|(n, zeros, as_string)| {
        let v = if as_string {
            Value::String(format!("{}{n}", "0".repeat(zeros)))
        } else {
            Value::from(n)
        };
        (n, v)
    });
    (
        "[A-Za-z0-9_-]{1,200}",
        "[A-Z_]{1,20}",
        numeric.clone(),
        prop::option::of(numeric),
        prop::option::of(valid_items(true)),
        prop::option::of(valid_items(false)),
        prop::option::of(valid_items(true)),
    )
        .prop_map(
            |(id, state, (campaign_id, c), website, form, optins, questions)| {
                let mut doc =
                    json!({ "id": id, "state": state, "campaign": { "id": c, "name": "x" } });
                if let Some((_, w)) = &website {
                    doc["campaign"]["channel"] = json!({ "website": { "id": w } });
                }
                for (key, section) in [
                    ("form", form),
                    ("optins", optins),
                    ("questionnaire", questions),
                ] {
                    if let Some(s) = section {
                        doc[key] = s;
                    }
                }
                Valid {
                    doc,
                    id,
                    state,
                    campaign_id,
                    website_id: website.map(|(n, _)| n),
                }
            },
        )
}

/// Well-formed form fields or questions (`responses` arrays of objects), or opt-ins.
fn valid_items(with_responses: bool) -> impl Strategy<Value = Value> {
    let item = (
        prop::option::of("[a-z_]{0,6}"),
        prop::collection::vec((json_value(), prop::option::of("[a-z/.]{0,8}")), 0..3),
        prop_oneof![Just("1"), Just("0"), Just("")],
    )
        .prop_map(move |(variable, responses, answer)| {
            let mut item = json!({ "id": 1 });
            if let Some(v) = variable {
                item["variable"] = Value::String(v);
            }
            if with_responses {
                item["responses"] = responses
                    .into_iter()
                    .map(|(value, path)| match path {
                        Some(p) => json!({ "value": value, "path": p }),
                        None => json!({ "value": value }),
                    })
                    .collect();
            } else {
                item["response"] = Value::from(answer);
            }
            item
        });
    prop::collection::vec(item, 0..4).prop_map(Value::Array)
}

/// Every JSON pointer into `v` (the root included).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                pointers(
                    child,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_text_is_parsed_or_refused_with_a_path(raw in ".{0,300}") {
        check_outcome(&raw)?;
    }

    #[test]
    fn json_like_text_is_parsed_or_refused_with_a_path(
        raw in r#"[\[\]{}",:0-9a-z \\.-]{0,300}"#,
    ) {
        check_outcome(&raw)?;
    }

    #[test]
    fn any_json_is_parsed_or_refused_with_a_path(doc in json_value()) {
        check_outcome(&doc.to_string())?;
    }

    #[test]
    fn participation_like_documents_are_parsed_or_refused_with_a_path(
        doc in participation_like(),
        pretty in any::<bool>(),
    ) {
        let raw = if pretty {
            serde_json::to_string_pretty(&doc).unwrap()
        } else {
            doc.to_string()
        };
        check_outcome(&raw)?;
    }

    #[test]
    fn any_change_to_the_fixture_is_parsed_or_refused_with_a_path(
        pick in any::<prop::sample::Index>(),
        replacement in json_value(),
    ) {
        let mut doc: Value = serde_json::from_str(COMPLETED).unwrap();
        let mut all = Vec::new();
        pointers(&doc, String::new(), &mut all);
        let pointer = pick.get(&all).clone();
        *doc.pointer_mut(&pointer).unwrap() = replacement;
        check_outcome(&doc.to_string())?;
    }

    #[test]
    fn any_cut_of_the_fixture_is_refused_with_a_path(cut in 0..COMPLETED.trim_end().len()) {
        // Anything short of the closing brace is not a JSON document.
        let Some(raw) = COMPLETED.get(..cut) else { return Ok(()) };
        let err = participation::parse(raw, DEFAULT_MAX_BYTES).unwrap_err();
        check_refusal(&err)?;
    }

    #[test]
    fn valid_documents_round_trip(v in valid_participation(), pretty in any::<bool>()) {
        let raw = if pretty {
            serde_json::to_string_pretty(&v.doc).unwrap()
        } else {
            v.doc.to_string()
        };
        let p = participation::parse(&raw, DEFAULT_MAX_BYTES)
            .map_err(|e| TestCaseError::fail(format!("{e} in {raw}")))?;
        prop_assert_eq!(&p.id, &v.id);
        prop_assert_eq!(&p.state, &v.state);
        prop_assert_eq!(&p.campaign_id, &v.campaign_id.to_string());
        prop_assert_eq!(&p.website_id, &v.website_id.map(|n| n.to_string()));
        prop_assert_eq!(&p.document, &v.doc);
        // Parsing the parsed document again gives the same participation.
        let again = participation::parse(&p.document.to_string(), DEFAULT_MAX_BYTES).unwrap();
        prop_assert_eq!(
            (&again.id, &again.state, &again.campaign_id, &again.website_id, again.has_form_responses),
            (&p.id, &p.state, &p.campaign_id, &p.website_id, p.has_form_responses)
        );
    }

    /// The `variables` object is spliced in without touching any other byte, and the body is
    /// the document plus exactly that member.
    #[test]
    fn variables_are_added_without_changing_the_rest(
        v in valid_participation(),
        pretty in any::<bool>(),
    ) {
        let raw = if pretty {
            serde_json::to_string_pretty(&v.doc).unwrap()
        } else {
            v.doc.to_string()
        };
        let p = participation::parse(&raw, DEFAULT_MAX_BYTES).unwrap();
        let vars = payload::collect(&p.document);
        match payload::add_variables(&raw, &p.document) {
            None => prop_assert!(vars.entries.is_empty()),
            Some(added) => {
                let body: Value = serde_json::from_str(&added.body)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {}", added.body)))?;
                let mut expected = p.document.clone();
                expected["variables"] = serde_json::from_str(&vars.to_json()).unwrap();
                prop_assert_eq!(body, expected);
                // The body is `raw` with one insertion.
                let at = raw
                    .bytes()
                    .zip(added.body.bytes())
                    .position(|(a, b)| a != b)
                    .unwrap_or(raw.len());
                let inserted = added.body.len() - raw.len();
                prop_assert_eq!(&added.body[..at], &raw[..at]);
                prop_assert_eq!(&added.body[at + inserted..], &raw[at..]);
                prop_assert_eq!(added.duplicates, vars.duplicates);
            }
        }
    }

    /// Nesting: accepted up to [`MAX_DEPTH`] levels, refused beyond with the path of the first
    /// container too deep.
    #[test]
    fn nesting_is_refused_beyond_the_limit_with_its_path(
        kinds in prop::collection::vec(any::<bool>(), 1..(2 * MAX_DEPTH)),
    ) {
        // `kinds[i]`: level i + 2 is an object (member "k") or an array (one element).
        let mut nested = String::from("0");
        for &object in kinds.iter().rev() {
            nested = if object { format!("{{\"k\":{nested}}}") } else { format!("[{nested}]") };
        }
        let mut doc: Value = serde_json::from_str(COMPLETED).unwrap();
        doc["extra"] = Value::Null;
        let raw = doc.to_string().replace("\"extra\":null", &format!("\"extra\":{nested}"));
        let depth = kinds.len() + 1;
        match participation::parse(&raw, DEFAULT_MAX_BYTES) {
            Ok(_) => prop_assert!(depth <= MAX_DEPTH, "depth {depth} accepted"),
            Err(err) => {
                prop_assert!(depth > MAX_DEPTH, "depth {depth} refused: {err}");
                let mut path = String::from("$.extra");
                for &object in &kinds[..MAX_DEPTH - 1] {
                    path.push_str(if object { ".k" } else { "[0]" });
                }
                prop_assert_eq!(err.path, path);
            }
        }
    }
}
