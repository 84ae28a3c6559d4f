//! Unit tests of the participation rules: each rule, its refusal message and JSON path.

use serde_json::json;

use super::*;

const COMPLETED: &str = include_str!("../../tests/data/participation-v2-completed.json");
const INCOMPLETE: &str = include_str!("../../tests/data/participation-v2-incomplete.json");

#[test]
fn completed_fixture() {
    let p = parse(COMPLETED, DEFAULT_MAX_BYTES).unwrap();
    assert_eq!(p.id, "9C2F61A0-3B7E-4D15-A8C2-5E0B7D41F3A9");
    assert_eq!(p.state, "COMPLETED");
    assert!(p.is_complete());
    assert_eq!(p.campaign_id, "418207");
    assert_eq!(p.website_id.as_deref(), Some("5120"));
    assert!(p.has_form_responses);
    assert_eq!(p.document["campaign"]["name"], "Winter quiz 2026");
}

#[test]
fn incomplete_fixture() {
    let p = parse(INCOMPLETE, DEFAULT_MAX_BYTES).unwrap();
    assert_eq!(p.id, "E47B0D3C-5A21-4C8F-B6D9-0A1B2C3D4E5F");
    assert_eq!(p.state, "STARTED");
    assert!(!p.is_complete());
    assert_eq!(p.campaign_id, "418207");
    assert_eq!(p.website_id.as_deref(), Some("5120"));
    assert!(p.has_form_responses);
}

fn fixture() -> Value {
    serde_json::from_str(COMPLETED).unwrap()
}

fn parse_value(v: &Value) -> Result<Participation, InvalidParticipation> {
    parse(&v.to_string(), DEFAULT_MAX_BYTES)
}

#[test]
fn identification_is_inferred_from_form_responses() {
    // (description, form, expected has_form_responses)
    let rows: Vec<(&str, Option<Value>, bool)> = vec![
        ("no form", None, false),
        ("null form", Some(Value::Null), false),
        ("empty form", Some(json!([])), false),
        (
            "fields without responses",
            Some(json!([{ "id": 1 }, { "id": 2 }])),
            false,
        ),
        (
            "fields with empty responses",
            Some(json!([{ "id": 1, "responses": [] }])),
            false,
        ),
        (
            "one field answered",
            Some(json!([{ "id": 1, "responses": [] }, { "id": 2, "responses": [{}] }])),
            true,
        ),
    ];
    for (what, form, expected) in rows {
        let mut doc = fixture();
        match form {
            Some(f) => doc["form"] = f,
            None => {
                doc.as_object_mut().unwrap().remove("form");
            }
        }
        assert_eq!(
            parse_value(&doc).unwrap().has_form_responses,
            expected,
            "{what}"
        );
    }
}

#[test]
fn optional_members_may_be_absent_null_or_empty() {
    type Mutation = fn(&mut Value);
    // (description, mutation of the completed fixture)
    let rows: Vec<(&str, Mutation)> = vec![
        ("null variables", |d| {
            d["form"][0]["variable"] = Value::Null;
            d["optins"][0]["variable"] = Value::Null;
            d["questionnaire"][0]["variable"] = Value::Null;
        }),
        ("empty variable", |d| d["form"][0]["variable"] = json!("")),
        ("no variable", |d| {
            d["optins"][0].as_object_mut().unwrap().remove("variable");
        }),
        ("null responses", |d| {
            d["form"][0]["responses"] = Value::Null;
            d["questionnaire"][0]["responses"] = Value::Null;
        }),
        ("empty sections", |d| {
            d["form"] = json!([]);
            d["optins"] = json!([]);
            d["questionnaire"] = json!([]);
        }),
        ("null sections", |d| {
            d["optins"] = Value::Null;
            d["questionnaire"] = Value::Null;
        }),
        ("an existing variables object", |d| {
            d["variables"] = json!({ "email": "x" })
        }),
        ("opt-in response of another type", |d| {
            d["optins"][0]["response"] = json!(1)
        }),
    ];
    for (what, mutate) in rows {
        let mut doc = fixture();
        mutate(&mut doc);
        if let Err(e) = parse_value(&doc) {
            panic!("{what}: {e}");
        }
    }
    // Answered questions do not make a participant identified; form responses do.
    let mut doc = fixture();
    doc["form"] = json!([]);
    assert!(!parse_value(&doc).unwrap().has_form_responses);
}

#[test]
fn ids_are_normalised() {
    // (campaign.id, website, expected campaign_id, expected website_id)
    let rows: Vec<(Value, Option<Value>, &str, Option<&str>)> = vec![
        (
            json!(418207),
            Some(json!({ "id": 5120 })),
            "418207",
            Some("5120"),
        ),
        (
            json!("418207"),
            Some(json!({ "id": "5120" })),
            "418207",
            Some("5120"),
        ),
        (
            json!("00418207"),
            Some(json!({ "id": "0" })),
            "418207",
            Some("0"),
        ),
        (json!(0), None, "0", None),
        (json!(7), Some(Value::Null), "7", None),
    ];
    for (campaign_id, website, want_campaign, want_website) in rows {
        let mut doc = fixture();
        doc["campaign"]["id"] = campaign_id.clone();
        match website {
            Some(w) => doc["campaign"]["channel"]["website"] = w,
            None => {
                doc["campaign"]["channel"]
                    .as_object_mut()
                    .unwrap()
                    .remove("website");
            }
        }
        let p = parse_value(&doc).unwrap();
        assert_eq!(p.campaign_id, want_campaign, "{campaign_id}");
        assert_eq!(p.website_id.as_deref(), want_website, "{campaign_id}");
    }

    let mut doc = fixture();
    doc["campaign"].as_object_mut().unwrap().remove("channel");
    assert_eq!(parse_value(&doc).unwrap().website_id, None, "no channel");
}

#[test]
fn bad_documents_are_refused_with_their_path() {
    type Mutation = Box<dyn Fn(&mut Value)>;
    let set = |pointer: &'static str, v: Value| -> Mutation {
        Box::new(move |doc: &mut Value| *doc.pointer_mut(pointer).unwrap() = v.clone())
    };
    let remove = |parent: &'static str, key: &'static str| -> Mutation {
        Box::new(move |doc: &mut Value| {
            doc.pointer_mut(parent)
                .unwrap()
                .as_object_mut()
                .unwrap()
                .remove(key);
        })
    };
    // (description, mutation of the completed fixture, expected path)
    let rows: Vec<(&str, Mutation, &str)> = vec![
        ("missing id", remove("", "id"), "$.id"),
        ("null id", set("/id", Value::Null), "$.id"),
        ("numeric id", set("/id", json!(42)), "$.id"),
        ("empty id", set("/id", json!("")), "$.id"),
        ("id with '.'", set("/id", json!("abc.def")), "$.id"),
        ("id too long", set("/id", json!("a".repeat(201))), "$.id"),
        (
            "id with a newline",
            set("/id", json!("abc\r\nX-Evil: 1")),
            "$.id",
        ),
        (
            "id with non-ASCII",
            set("/id", json!("caf\u{e9}-1")),
            "$.id",
        ),
        ("id with a space", set("/id", json!("abc def")), "$.id"),
        ("id with DEL", set("/id", json!("abc\u{7f}")), "$.id"),
        ("missing state", remove("", "state"), "$.state"),
        ("empty state", set("/state", json!("")), "$.state"),
        ("state not a string", set("/state", json!(true)), "$.state"),
        ("campaign missing", remove("", "campaign"), "$.campaign"),
        (
            "campaign not an object",
            set("/campaign", json!([1])),
            "$.campaign",
        ),
        (
            "campaign.id missing",
            remove("/campaign", "id"),
            "$.campaign.id",
        ),
        (
            "campaign.id float",
            set("/campaign/id", json!(12.5)),
            "$.campaign.id",
        ),
        (
            "campaign.id integral float",
            set("/campaign/id", json!(12.0)),
            "$.campaign.id",
        ),
        (
            "campaign.id negative",
            set("/campaign/id", json!(-1)),
            "$.campaign.id",
        ),
        (
            "campaign.id \"12a\"",
            set("/campaign/id", json!("12a")),
            "$.campaign.id",
        ),
        (
            "campaign.id \"\"",
            set("/campaign/id", json!("")),
            "$.campaign.id",
        ),
        (
            "campaign.id \"-1\"",
            set("/campaign/id", json!("-1")),
            "$.campaign.id",
        ),
        (
            "campaign.id object",
            set("/campaign/id", json!({ "id": 1 })),
            "$.campaign.id",
        ),
        (
            "campaign.id beyond u64",
            set("/campaign/id", json!("99999999999999999999999")),
            "$.campaign.id",
        ),
        (
            "channel not an object",
            set("/campaign/channel", json!("web")),
            "$.campaign.channel",
        ),
        (
            "website not an object",
            set("/campaign/channel/website", json!(5120)),
            "$.campaign.channel.website",
        ),
        (
            "website id boolean",
            set("/campaign/channel/website/id", json!(true)),
            "$.campaign.channel.website.id",
        ),
        (
            "website id \"x1\"",
            set("/campaign/channel/website/id", json!("x1")),
            "$.campaign.channel.website.id",
        ),
        (
            "website without id",
            remove("/campaign/channel/website", "id"),
            "$.campaign.channel.website.id",
        ),
        (
            "form not an array",
            set("/form", json!({ "email": "x" })),
            "$.form",
        ),
        (
            "form field not an object",
            set("/form/1", json!("F")),
            "$.form[1]",
        ),
        (
            "form responses not an array",
            set("/form/0/responses", json!("x")),
            "$.form[0].responses",
        ),
        (
            "form response not an object",
            set("/form/1/responses/0", json!("F")),
            "$.form[1].responses[0]",
        ),
        (
            "form variable not a string",
            set("/form/0/variable", json!(7)),
            "$.form[0].variable",
        ),
        ("optins not an array", set("/optins", json!({})), "$.optins"),
        (
            "opt-in not an object",
            set("/optins/0", json!("1")),
            "$.optins[0]",
        ),
        (
            "opt-in variable not a string",
            set("/optins/0/variable", json!(["newsletter"])),
            "$.optins[0].variable",
        ),
        (
            "questionnaire not an array",
            set("/questionnaire", json!("q")),
            "$.questionnaire",
        ),
        (
            "question not an object",
            set("/questionnaire/0", json!(55501)),
            "$.questionnaire[0]",
        ),
        (
            "question responses not an array",
            set("/questionnaire/0/responses", json!({ "value": "December" })),
            "$.questionnaire[0].responses",
        ),
        (
            "question response not an object",
            set("/questionnaire/0/responses/0", json!("December")),
            "$.questionnaire[0].responses[0]",
        ),
        (
            "question variable not a string",
            set("/questionnaire/0/variable", json!(true)),
            "$.questionnaire[0].variable",
        ),
    ];
    for (what, mutate, path) in rows {
        let mut doc = fixture();
        mutate(&mut doc);
        let err = parse_value(&doc).expect_err(what);
        assert_eq!(err.path, path, "{what}: {err}");
        assert!(err.to_string().len() < 300, "{what}: {err}");
    }
}

#[test]
fn bad_json_is_refused_at_the_root() {
    // (description, document, expected path, text the reason must contain)
    let rows: Vec<(&str, &str, &str, &str)> = vec![
        (
            "not JSON",
            "{\"id\": \"a\",\n  oops}",
            "$",
            "line 2 column 3",
        ),
        ("empty", "", "$", "line 1 column 0"),
        ("trailing data", "{} {}", "$", "trailing characters"),
        ("array root", "[{\"id\": \"a\"}]", "$", "found an array"),
        ("string root", "\"id\"", "$", "found a string"),
    ];
    for (what, doc, path, reason) in rows {
        let err = parse(doc, DEFAULT_MAX_BYTES).expect_err(what);
        assert_eq!(err.path, path, "{what}: {err}");
        assert!(err.reason.contains(reason), "{what}: {err}");
    }
}

#[test]
fn oversize_is_refused_before_parsing() {
    let err = parse(COMPLETED, 100).unwrap_err();
    assert_eq!(err.path, "$");
    assert!(err.reason.contains(&COMPLETED.len().to_string()), "{err}");
    assert!(err.reason.contains("100"), "{err}");
    // Not even parsed: invalid JSON over the limit reports the size, not the syntax.
    let err = parse(&"x".repeat(101), 100).unwrap_err();
    assert!(err.reason.contains("101 bytes"), "{err}");
    // Exactly at the limit is fine.
    assert!(parse(COMPLETED, COMPLETED.len()).is_ok());
}

/// The completed fixture with `"extra": <nested>` added as its last member.
fn with_extra(nested: &str) -> String {
    let doc = COMPLETED.trim_end();
    let body = doc.strip_suffix('}').unwrap();
    format!("{body}, \"extra\": {nested}}}")
}

#[test]
fn nesting_depth_is_limited_with_the_path_named() {
    // The root object is level 1, so `extra` may hold 63 levels.
    let arrays = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    assert!(parse(&with_extra(&arrays(MAX_DEPTH - 1)), DEFAULT_MAX_BYTES).is_ok());
    let err = parse(&with_extra(&arrays(MAX_DEPTH)), DEFAULT_MAX_BYTES).unwrap_err();
    assert_eq!(err.path, format!("$.extra{}", "[0]".repeat(MAX_DEPTH - 1)));
    assert_eq!(
        err.reason,
        "nested deeper than 64 levels of arrays and objects"
    );

    // Objects, with the keys and indexes met on the way.
    let objects = format!(
        "[1, \"]\", {{\"k\": 2, \"a\": {}0{}}}]",
        "{\"a\": ".repeat(70),
        "}".repeat(70)
    );
    let err = parse(&with_extra(&objects), DEFAULT_MAX_BYTES).unwrap_err();
    assert!(err.path.starts_with("$.extra[2].a.a.a.a"), "{}", err.path);
    assert_eq!(
        err.path.matches(".a").count(),
        MAX_DEPTH - 2,
        "{}",
        err.path
    );

    // Far beyond serde_json's own recursion limit: the same clear error, a short path.
    let err = parse(&with_extra(&arrays(100_000)), DEFAULT_MAX_BYTES).unwrap_err();
    assert!(err.path.starts_with("$.extra[0][0]"), "{}", err.path);
    assert!(
        err.path.chars().count() <= MAX_PATH_CHARS + 1,
        "{}",
        err.path
    );
    assert!(err.to_string().len() < 300, "{err}");
    let err = parse(&"[".repeat(100_000), DEFAULT_MAX_BYTES).unwrap_err();
    assert!(err.reason.contains("nested deeper than 64"), "{err}");

    // Brackets inside strings (escaped quotes too) are text, not nesting.
    let text = serde_json::to_string(&"[{\"[".repeat(1000)).unwrap();
    assert!(parse(&with_extra(&text), DEFAULT_MAX_BYTES).is_ok());
    let key = format!("{{{text}: {}}}", arrays(MAX_DEPTH - 2));
    assert!(parse(&with_extra(&key), DEFAULT_MAX_BYTES).is_ok());
    let key = format!("{{{text}: {}}}", arrays(MAX_DEPTH - 1));
    let err = parse(&with_extra(&key), DEFAULT_MAX_BYTES).unwrap_err();
    assert!(err.path.starts_with("$.extra.[{"), "{}", err.path);
}

#[test]
fn errors_do_not_echo_huge_input() {
    for id in ["a.".repeat(5000), "b".repeat(10_000)] {
        let mut doc = fixture();
        doc["id"] = json!(id);
        let err = parse_value(&doc).unwrap_err();
        assert!(err.reason.chars().count() < 250, "{}", err.reason.len());
    }
    let mut doc = fixture();
    doc["campaign"]["id"] = json!("9".repeat(10_000) + "x");
    let err = parse_value(&doc).unwrap_err();
    assert!(err.reason.chars().count() < 200, "{}", err.reason.len());
}

#[test]
fn duplicate_keys_are_refused_with_their_path() {
    let ok = r#"{"id": "p1", "state": "COMPLETED", "campaign": {"id": 1}}"#;
    assert!(parse(ok, DEFAULT_MAX_BYTES).is_ok());
    for (doc, path) in [
        (
            r#"{"id": "p1", "state": "STARTED", "campaign": {"id": 1}, "state": "COMPLETED"}"#,
            "$.state",
        ),
        // The same key written with an escape is the same key.
        (
            r#"{"id": "p1", "state": "STARTED", "campaign": {"id": 1}, "st\u0061te": "COMPLETED"}"#,
            "$.st\\u0061te",
        ),
        (
            r#"{"id": "p1", "state": "S", "campaign": {"id": 1, "name": "a", "id": 2}}"#,
            "$.campaign.id",
        ),
        (
            r#"{"id": "p1", "state": "S", "campaign": {"id": 1}, "form": [{}, {"variable": "a", "variable": "b"}]}"#,
            "$.form[1].variable",
        ),
    ] {
        let err = parse(doc, DEFAULT_MAX_BYTES).unwrap_err();
        assert_eq!(err.path, path, "{doc}");
        assert!(err.reason.starts_with("duplicate key"), "{err}");
    }
    // The same key in different objects, or as a value, is fine.
    let ok = r#"{"id": "id", "state": "S", "campaign": {"id": 1, "channel": {"id": 2, "website": {"id": 3}}}, "x": {"state": "state"}}"#;
    assert!(parse(ok, DEFAULT_MAX_BYTES).is_ok());
    // Malformed JSON is reported as such, not as a duplicate.
    let err = parse(r#"{"id": "p1", "id""#, DEFAULT_MAX_BYTES).unwrap_err();
    assert!(err.reason.starts_with("not valid JSON"), "{err}");
}

#[test]
fn a_document_that_was_not_utf8_is_refused() {
    let err = parse(&format!("{NOT_UTF8}12"), DEFAULT_MAX_BYTES).unwrap_err();
    assert_eq!(err.path, "$");
    assert!(
        err.reason.contains("not valid UTF-8 (from byte 12)"),
        "{err}"
    );
}
