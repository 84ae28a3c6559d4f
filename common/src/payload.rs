//! Body transformations an integration can ask for (DESIGN §3). Today one: adding the
//! `variables` object (mapping variable name → value) that Qualifio's Webhook 2.0 promises
//! receivers, built from the `variable` of each form field, opt-in and question. Pure text in,
//! text out: the published document is never re-serialised; the object is spliced in as its
//! last member so every other byte stays as published. Signing is not done here.

use std::collections::HashSet;

use serde_json::Value;

/// The top-level member this module adds.
const VARIABLES: &str = "variables";

/// A document with its `variables` object added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WithVariables {
    /// The document as published with `"variables":{…}` inserted as its last top-level member.
    pub body: String,
    /// Names set by more than one form field, opt-in or question (the first one's value is
    /// sent), each once, in the order their second occurrence was met.
    pub duplicates: Vec<String>,
}

/// The mapping variables of a participation document: form fields' first, then opt-ins', then
/// questions', each in array order; the first of several with one name is kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Variables {
    /// Name → value, without repeated names.
    pub entries: Vec<(String, Value)>,
    /// Names met more than once, each once.
    pub duplicates: Vec<String>,
}

impl Variables {
    /// The compact JSON object (`{"name":value,…}`), members in [`Variables::entries`] order.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (name, value)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Serialising a string or a `Value` cannot fail.
            out.push_str(&serde_json::to_string(name).unwrap_or_default());
            out.push(':');
            out.push_str(&serde_json::to_string(value).unwrap_or_default());
        }
        out.push('}');
        out
    }
}

/// Collects the mapping variables of `doc`:
/// - a form field's value is its response's `value`, or its `path` for a file upload (a
///   response with a non-empty `path` string); with several responses, the array of them; with
///   none, `null`;
/// - an opt-in's value is its `response` (`"1"` checked, `"0"` unchecked, `""` unanswered;
///   `null` when absent);
/// - a question's value is its response's `value`, with the same rules as form fields.
///
/// Entries without a `variable` string, or with an empty one, are left out. Members of the
/// wrong type are skipped (`participation::parse` refuses such documents before they get here).
pub fn collect(doc: &Value) -> Variables {
    let mut vars = Variables::default();
    // Sets, not scans of the lists: a 1 MiB document can hold tens of thousands of entries.
    let mut seen = HashSet::new();
    let mut repeated = HashSet::new();
    let mut add = |name: &str, value: Value| {
        if seen.insert(name.to_owned()) {
            vars.entries.push((name.to_owned(), value));
        } else if repeated.insert(name.to_owned()) {
            vars.duplicates.push(name.to_owned());
        }
    };
    for field in items(doc, "form") {
        if let Some(name) = variable(field) {
            add(name, responses(field));
        }
    }
    for optin in items(doc, "optins") {
        if let Some(name) = variable(optin) {
            add(name, optin.get("response").cloned().unwrap_or(Value::Null));
        }
    }
    for question in items(doc, "questionnaire") {
        if let Some(name) = variable(question) {
            add(name, responses(question));
        }
    }
    vars
}

/// `raw` (the document as published, parsed as `doc`) with a `variables` object added as its
/// last top-level member, or `None` when it is to be sent as published:
/// - it already has a top-level `variables` member, whatever its value (`null` included: a
///   second member of that name would be a duplicate key receivers read differently);
/// - no form field, opt-in or question has a `variable`: nothing is added, not even `{}`;
/// - `raw` is not a JSON object.
///
/// The object is inserted right after the last member's value, before the whitespace and the
/// closing `}` that end the document (with no leading comma in an empty object), so every
/// other byte of `raw` is unchanged.
pub fn add_variables(raw: &str, doc: &Value) -> Option<WithVariables> {
    let root = doc.as_object()?;
    if root.contains_key(VARIABLES) {
        return None;
    }
    let vars = collect(doc);
    if vars.entries.is_empty() {
        return None;
    }
    let body = insert_last_member(raw, VARIABLES, &vars.to_json())?;
    Some(WithVariables {
        body,
        duplicates: vars.duplicates,
    })
}

/// `raw` with `"key":value` added as the last member of its top-level object; `None` when
/// `raw` does not end with an object. `raw` must be valid JSON.
fn insert_last_member(raw: &str, key: &str, value: &str) -> Option<String> {
    // JSON's whitespace, exactly: other characters (a no-break space, say) are not allowed
    // around tokens, so they cannot be there in a document serde_json accepted.
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let bytes = raw.as_bytes();
    let close = bytes.iter().rposition(|b| !is_ws(b))?;
    if bytes[close] != b'}' {
        return None;
    }
    // The last token before the closing brace: the opening brace of an empty object, or the
    // end of the last member's value (`"`, a digit, `e`, `l`, `]` or `}`) otherwise.
    let last = bytes[..close].iter().rposition(|b| !is_ws(b))?;
    let at = last + 1; // after an ASCII byte: a character boundary
    let key = serde_json::to_string(key).ok()?;
    let mut out = String::with_capacity(raw.len() + key.len() + value.len() + 2);
    out.push_str(&raw[..at]);
    if bytes[last] != b'{' {
        out.push(',');
    }
    out.push_str(&key);
    out.push(':');
    out.push_str(value);
    out.push_str(&raw[at..]);
    Some(out)
}

/// The objects of the array `doc[key]`; nothing when it is absent or not an array.
fn items<'a>(doc: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    doc.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.is_object())
}

/// The non-empty `variable` of a form field, opt-in or question.
fn variable(item: &Value) -> Option<&str> {
    item.get("variable")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
}

/// The value of a form field's or question's `responses`: `null` for none, the one value, or
/// the array of values.
fn responses(item: &Value) -> Value {
    let values: Vec<Value> = item
        .get("responses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(response_value)
        .collect();
    match <[Value; 1]>::try_from(values) {
        Ok([one]) => one,
        Err(values) if values.is_empty() => Value::Null,
        Err(values) => Value::Array(values),
    }
}

/// One response's value: a file upload's `path` (a non-empty string), else its `value` (`null`
/// when absent). A bare value (not an object) is taken as it is.
fn response_value(response: &Value) -> Value {
    let Some(r) = response.as_object() else {
        return response.clone();
    };
    match r
        .get("path")
        .filter(|p| p.as_str().is_some_and(|p| !p.is_empty()))
    {
        Some(path) => path.clone(),
        None => r.get("value").cloned().unwrap_or(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPLETED: &str = include_str!("../tests/data/participation-v2-completed.json");
    const INCOMPLETE: &str = include_str!("../tests/data/participation-v2-incomplete.json");

    /// The output for `raw`, checked to parse as JSON and to be `raw` plus the inserted text.
    fn add(raw: &str) -> Option<WithVariables> {
        let doc: Value = serde_json::from_str(raw).expect("test document is JSON");
        let out = add_variables(raw, &doc)?;
        let reparsed: Value = serde_json::from_str(&out.body).expect("output is JSON");
        assert_eq!(
            reparsed.as_object().unwrap().len(),
            doc.as_object().unwrap().len() + 1
        );
        Some(out)
    }

    #[test]
    fn every_response_shape() {
        // (description, document, exact output body or None for "as published", duplicates)
        let rows: &[(&str, &str, Option<&str>, &[&str])] = &[
            (
                "single value",
                r#"{"id":"P","form":[{"variable":"email","responses":[{"value":"jo@example.org"}]}]}"#,
                Some(
                    r#"{"id":"P","form":[{"variable":"email","responses":[{"value":"jo@example.org"}]}],"variables":{"email":"jo@example.org"}}"#,
                ),
                &[],
            ),
            (
                "labelled value: the value, not the label",
                r#"{"form":[{"variable":"gender","responses":[{"label":"Female","value":"F"}]}]}"#,
                Some(
                    r#"{"form":[{"variable":"gender","responses":[{"label":"Female","value":"F"}]}],"variables":{"gender":"F"}}"#,
                ),
                &[],
            ),
            (
                "several values: an array",
                r#"{"form":[{"variable":"hobbies","responses":[{"label":"Ski","value":"SKI"},{"label":"Golf","value":"GOLF"}]}]}"#,
                Some(
                    r#"{"form":[{"variable":"hobbies","responses":[{"label":"Ski","value":"SKI"},{"label":"Golf","value":"GOLF"}]}],"variables":{"hobbies":["SKI","GOLF"]}}"#,
                ),
                &[],
            ),
            (
                "file upload: its path",
                r#"{"form":[{"type":"FILE","variable":"photo","responses":[{"value":"me.jpg","path":"https://files.example.org/u/me.jpg"}]}]}"#,
                Some(
                    r#"{"form":[{"type":"FILE","variable":"photo","responses":[{"value":"me.jpg","path":"https://files.example.org/u/me.jpg"}]}],"variables":{"photo":"https://files.example.org/u/me.jpg"}}"#,
                ),
                &[],
            ),
            (
                "file upload without value",
                r#"{"form":[{"variable":"cv","responses":[{"path":"https://files.example.org/cv.pdf"}]}]}"#,
                Some(
                    r#"{"form":[{"variable":"cv","responses":[{"path":"https://files.example.org/cv.pdf"}]}],"variables":{"cv":"https://files.example.org/cv.pdf"}}"#,
                ),
                &[],
            ),
            (
                "empty or null path: the value",
                r#"{"form":[{"variable":"a","responses":[{"value":"x","path":""}]},{"variable":"b","responses":[{"value":"y","path":null}]}]}"#,
                Some(
                    r#"{"form":[{"variable":"a","responses":[{"value":"x","path":""}]},{"variable":"b","responses":[{"value":"y","path":null}]}],"variables":{"a":"x","b":"y"}}"#,
                ),
                &[],
            ),
            (
                "numbers and non-ASCII values are serialised by serde_json",
                r#"{"form":[{"variable":"age","responses":[{"value":42}]},{"variable":"city","responses":[{"value":"Liège \"centre\""}]}]}"#,
                Some(
                    r#"{"form":[{"variable":"age","responses":[{"value":42}]},{"variable":"city","responses":[{"value":"Liège \"centre\""}]}],"variables":{"age":42,"city":"Liège \"centre\""}}"#,
                ),
                &[],
            ),
            (
                "field without responses: null",
                r#"{"form":[{"variable":"phone","responses":[]},{"variable":"zip"}]}"#,
                Some(
                    r#"{"form":[{"variable":"phone","responses":[]},{"variable":"zip"}],"variables":{"phone":null,"zip":null}}"#,
                ),
                &[],
            ),
            (
                "opt-ins checked, unchecked, unanswered, absent",
                r#"{"optins":[{"variable":"news","response":"1"},{"variable":"partners","response":"0"},{"variable":"sms","response":""},{"variable":"mail"}]}"#,
                Some(
                    r#"{"optins":[{"variable":"news","response":"1"},{"variable":"partners","response":"0"},{"variable":"sms","response":""},{"variable":"mail"}],"variables":{"news":"1","partners":"0","sms":"","mail":null}}"#,
                ),
                &[],
            ),
            (
                "question with one answer and with several",
                r#"{"questionnaire":[{"variable":"q1","responses":[{"value":"December","score":10,"isCorrect":true}]},{"variable":"q2","responses":[{"value":"Red"},{"value":"Blue"}]}]}"#,
                Some(
                    r#"{"questionnaire":[{"variable":"q1","responses":[{"value":"December","score":10,"isCorrect":true}]},{"variable":"q2","responses":[{"value":"Red"},{"value":"Blue"}]}],"variables":{"q1":"December","q2":["Red","Blue"]}}"#,
                ),
                &[],
            ),
            (
                "missing, empty and null variable: left out",
                r#"{"form":[{"id":1,"responses":[{"value":"a"}]},{"variable":"","responses":[{"value":"b"}]},{"variable":null,"responses":[{"value":"c"}]},{"variable":"d","responses":[{"value":"d"}]}]}"#,
                Some(
                    r#"{"form":[{"id":1,"responses":[{"value":"a"}]},{"variable":"","responses":[{"value":"b"}]},{"variable":null,"responses":[{"value":"c"}]},{"variable":"d","responses":[{"value":"d"}]}],"variables":{"d":"d"}}"#,
                ),
                &[],
            ),
            (
                "no variable at all: as published, no empty object",
                r#"{"id":"P","form":[{"id":1,"responses":[{"value":"a"}]}],"optins":[],"questionnaire":[]}"#,
                None,
                &[],
            ),
            (
                "duplicates: first wins, in form, opt-in, question order",
                r#"{"questionnaire":[{"variable":"email","responses":[{"value":"q"}]}],"optins":[{"variable":"email","response":"1"},{"variable":"news","response":"0"},{"variable":"news","response":"1"}],"form":[{"variable":"email","responses":[{"value":"form@example.org"}]}]}"#,
                Some(
                    r#"{"questionnaire":[{"variable":"email","responses":[{"value":"q"}]}],"optins":[{"variable":"email","response":"1"},{"variable":"news","response":"0"},{"variable":"news","response":"1"}],"form":[{"variable":"email","responses":[{"value":"form@example.org"}]}],"variables":{"email":"form@example.org","news":"0"}}"#,
                ),
                &["email", "news"],
            ),
            (
                "existing variables: as published",
                r#"{"form":[{"variable":"email","responses":[{"value":"a"}]}],"variables":{"email":"theirs"}}"#,
                None,
                &[],
            ),
            (
                "existing null variables: as published (no duplicate key)",
                r#"{"variables":null,"form":[{"variable":"email","responses":[{"value":"a"}]}]}"#,
                None,
                &[],
            ),
            (
                "names are escaped",
                r#"{"optins":[{"variable":"a\"b\\c","response":"1"}]}"#,
                Some(
                    r#"{"optins":[{"variable":"a\"b\\c","response":"1"}],"variables":{"a\"b\\c":"1"}}"#,
                ),
                &[],
            ),
        ];
        for (what, raw, want, duplicates) in rows {
            let got = add(raw);
            assert_eq!(got.as_ref().map(|g| g.body.as_str()), *want, "{what}");
            let got_dups = got.map(|g| g.duplicates).unwrap_or_default();
            assert_eq!(got_dups, *duplicates, "{what}");
        }
    }

    #[test]
    fn insertion_keeps_every_other_byte() {
        // (description, document, exact output)
        let rows: &[(&str, &str, &str)] = &[
            (
                "pretty, with a trailing newline",
                "{\n  \"optins\": [ {\"variable\": \"n\", \"response\": \"1\"} ]\n}\n",
                "{\n  \"optins\": [ {\"variable\": \"n\", \"response\": \"1\"} ],\"variables\":{\"n\":\"1\"}\n}\n",
            ),
            (
                "CRLF, tabs and trailing spaces",
                "{\r\n\t\"optins\" : [{\"variable\":\"n\",\"response\":\"0\"}] \r\n} \t\r\n",
                "{\r\n\t\"optins\" : [{\"variable\":\"n\",\"response\":\"0\"}],\"variables\":{\"n\":\"0\"} \r\n} \t\r\n",
            ),
            (
                "last member a nested object",
                r#"{"optins":[{"variable":"n","response":"1"}],"campaign":{"id":1,"channel":{}}}"#,
                r#"{"optins":[{"variable":"n","response":"1"}],"campaign":{"id":1,"channel":{}},"variables":{"n":"1"}}"#,
            ),
            (
                "last member a number, literal or string with braces",
                r#"{"optins":[{"variable":"n","response":"1"}],"s":"}{","t":true,"n":12e3}"#,
                r#"{"optins":[{"variable":"n","response":"1"}],"s":"}{","t":true,"n":12e3,"variables":{"n":"1"}}"#,
            ),
            (
                "escaped unicode left as written",
                r#"{"optins":[{"variable":"n","response":"\u0031"}],"x":"\u00e9"}"#,
                r#"{"optins":[{"variable":"n","response":"\u0031"}],"x":"\u00e9","variables":{"n":"1"}}"#,
            ),
        ];
        for (what, raw, want) in rows {
            assert_eq!(add(raw).expect(what).body, *want, "{what}");
        }
    }

    #[test]
    fn empty_objects_get_no_leading_comma() {
        for (raw, want) in [("{}", r#"{"k":1}"#), (" { \n } \n", " {\"k\":1 \n } \n")] {
            assert_eq!(insert_last_member(raw, "k", "1").as_deref(), Some(want));
        }
        assert_eq!(insert_last_member("[1]", "k", "1"), None);
        assert_eq!(insert_last_member("  ", "k", "1"), None);
        // An empty document has no variable: nothing to add.
        assert_eq!(add_variables("{}", &serde_json::json!({})), None);
        // Not an object at all.
        assert_eq!(add_variables("[]", &serde_json::json!([])), None);
    }

    #[test]
    fn many_entries() {
        // About a megabyte of opt-ins: half distinct names, half repeating one name.
        let optins: Vec<Value> = (0..40_000)
            .map(|i| {
                let name = if i % 2 == 0 {
                    format!("v{i}")
                } else {
                    "same".to_owned()
                };
                serde_json::json!({ "variable": name, "response": "1" })
            })
            .collect();
        let doc = serde_json::json!({ "optins": optins });
        let vars = collect(&doc);
        assert_eq!(vars.entries.len(), 20_001);
        assert_eq!(vars.duplicates, ["same"]);
    }

    #[test]
    fn fixtures() {
        let out = add(COMPLETED).unwrap();
        let want_tail = concat!(
            r#"      "responses": [{ "value": "December", "score": 10, "isCorrect": true }] }"#,
            "\n  ]",
            r#","variables":{"email":"jo.peeters@example.org","gender":"F","newsletter":"1","q_shortest_day":"December"}"#,
            "\n}\n",
        );
        assert!(out.body.ends_with(want_tail), "{}", out.body);
        let at = COMPLETED.len() - "\n}\n".len();
        assert_eq!(&out.body[..at], &COMPLETED[..at]);
        assert!(out.duplicates.is_empty());

        let out = add(INCOMPLETE).unwrap();
        assert!(
            out.body.ends_with(
                "\n  \"questionnaire\": [],\"variables\":{\"email\":\"jo.peeters@example.org\"}\n}"
            ),
            "{}",
            out.body
        );
    }
}
