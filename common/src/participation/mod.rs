//! Parsing and validation of participation documents (DESIGN §3): a Qualifio "Webhook 2.0"
//! participation as published, checked once and reduced to what routing needs. It owns the
//! document rules only; it must not re-serialise the body sent to receivers (that stays the
//! exact bytes received, or gets the one addition of [`crate::payload`]) nor decide routing
//! (see [`crate::domain::matching`]).

use std::borrow::Cow;
use std::collections::HashSet;

use serde_json::{Map, Value};

/// Default maximum size of a document, 1 MiB.
pub const DEFAULT_MAX_BYTES: usize = 1 << 20;

/// Deepest nesting of arrays and objects in a document (the root object is level 1). Real
/// participations nest about 5 levels; the limit keeps recursive work on a document (parsing,
/// dropping, serialising) far from the stack's end, below serde_json's own limit of 128.
pub const MAX_DEPTH: usize = 64;

/// Longest JSON path an error names; deeper paths are cut with `…`.
const MAX_PATH_CHARS: usize = 200;

/// Longest accepted participation id, in characters: it is copied into every `webhook-id`
/// header and delivery record.
const MAX_ID_CHARS: usize = 200;

/// How much of the input an error message may quote, so a huge document does not come back
/// in logs and responses.
const MAX_ECHO_CHARS: usize = 64;

/// A validated participation: what routing needs, plus the parsed document for later use.
#[derive(Clone, Debug)]
pub struct Participation {
    /// The participation id (`$.id`): non-empty, at most 200 characters, visible ASCII
    /// characters only (it is the `webhook-id` header), no `.`.
    pub id: String,
    /// The participation state (`$.state`), e.g. `COMPLETED` or `STARTED`.
    pub state: String,
    /// The campaign id (`$.campaign.id`) as a decimal string without leading zeros.
    pub campaign_id: String,
    /// The website id (`$.campaign.channel.website.id`) as a decimal string, when the document
    /// has a website.
    pub website_id: Option<String>,
    /// identified inferred from the document: `form` holds at least one field with a
    /// non-empty `responses` array
    pub has_form_responses: bool,
    /// The whole parsed document.
    pub document: Value,
}

impl Participation {
    /// Whether the participation is completed (`state` is `COMPLETED`).
    pub fn is_complete(&self) -> bool {
        self.state == "COMPLETED"
    }
}

/// Why a document was refused; `path` is a JSON path like `$.campaign.id`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct InvalidParticipation {
    /// Where in the document the problem is (`$` for the document itself).
    pub path: String,
    /// What is wrong, without quoting more than a short prefix of the input.
    pub reason: String,
}

impl InvalidParticipation {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Parses and validates a participation document of at most `max_bytes` bytes.
pub fn parse(json: &str, max_bytes: usize) -> Result<Participation, InvalidParticipation> {
    // Checked before parsing so an oversized document costs nothing but its length.
    if json.len() > max_bytes {
        return Err(InvalidParticipation::new(
            "$",
            format!(
                "document is {} bytes, over the limit of {max_bytes} bytes",
                json.len()
            ),
        ));
    }
    if let Some(at) = json.strip_prefix(NOT_UTF8) {
        return Err(InvalidParticipation::new(
            "$",
            format!("not valid UTF-8 (from byte {at}); a document is UTF-8 JSON"),
        ));
    }
    // Checked before parsing, by a scan of the text, so that the error names where the
    // document is too deep whatever the depth (serde_json stops at 128 levels with a bare
    // "recursion limit exceeded").
    let scan = scan(json);
    if let Some(path) = scan.too_deep {
        return Err(InvalidParticipation::new(
            path,
            format!("nested deeper than {MAX_DEPTH} levels of arrays and objects"),
        ));
    }
    let document: Value = serde_json::from_str(json).map_err(|e| {
        // serde_json's message carries the line and column and does not quote the input, but
        // it is shortened anyway in case a future version starts to.
        InvalidParticipation::new(
            "$",
            format!("not valid JSON: {}", truncate(&e.to_string(), 200)),
        )
    })?;
    // Reported only for a document that parses: on malformed JSON the scan may misread keys.
    // serde_json keeps the last value of a duplicated key, other parsers the first: routing
    // would see another document than some receivers.
    if let Some(path) = scan.duplicate_key {
        return Err(InvalidParticipation::new(
            path,
            "duplicate key: an object may hold each key once (parsers disagree on which value \
             counts)",
        ));
    }
    let root = document.as_object().ok_or_else(|| {
        InvalidParticipation::new(
            "$",
            format!("expected a JSON object, found {}", kind(&document)),
        )
    })?;

    let id = participation_id(root)?;
    let state = non_empty_string(root, "state", "$.state")?.to_owned();

    let campaign = required(root, "campaign", "$.campaign")?;
    let campaign = campaign
        .as_object()
        .ok_or_else(|| expected("$.campaign", "an object", campaign))?;
    let campaign_id = numeric_id(required(campaign, "id", "$.campaign.id")?, "$.campaign.id")?;
    let website_id = website_id(campaign)?;

    let has_form_responses = check_sections(root)?;

    Ok(Participation {
        id,
        state,
        campaign_id,
        website_id,
        has_form_responses,
        document,
    })
}

fn participation_id(root: &Map<String, Value>) -> Result<String, InvalidParticipation> {
    const PATH: &str = "$.id";
    let id = non_empty_string(root, "id", PATH)?;
    if id.chars().count() > MAX_ID_CHARS {
        return Err(InvalidParticipation::new(
            PATH,
            format!(
                "longer than {MAX_ID_CHARS} characters: {:?}",
                truncate(id, MAX_ECHO_CHARS)
            ),
        ));
    }
    if id.contains('.') {
        // The Standard Webhooks signature covers `id.timestamp.body`; a dot in the id would
        // make that content ambiguous (another id/timestamp split could sign the same bytes).
        return Err(InvalidParticipation::new(
            PATH,
            format!(
                "must not contain '.': the id becomes the Standard Webhooks webhook-id, whose \
                 signed content is id.timestamp.body, found {:?}",
                truncate(id, MAX_ECHO_CHARS)
            ),
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        // The id is sent as the webhook-id header: a header carries ASCII (other bytes are
        // read differently by each receiver), and CR/LF would split it. Refused rather than
        // encoded, so the header and the document's id stay the same string.
        return Err(InvalidParticipation::new(
            PATH,
            format!(
                "must be visible ASCII characters, without spaces (it is sent as the \
                 webhook-id header), found {:?}",
                truncate(id, MAX_ECHO_CHARS)
            ),
        ));
    }
    Ok(id.to_owned())
}

/// `$.campaign.channel.website.id`: `None` when the channel or the website is absent, an error
/// when any of them has the wrong type or the website has no valid id.
fn website_id(campaign: &Map<String, Value>) -> Result<Option<String>, InvalidParticipation> {
    let Some(channel) = optional(campaign, "channel") else {
        return Ok(None);
    };
    let channel = channel
        .as_object()
        .ok_or_else(|| expected("$.campaign.channel", "an object", channel))?;
    let Some(website) = optional(channel, "website") else {
        return Ok(None);
    };
    let website = website
        .as_object()
        .ok_or_else(|| expected("$.campaign.channel.website", "an object", website))?;
    const PATH: &str = "$.campaign.channel.website.id";
    numeric_id(required(website, "id", PATH)?, PATH).map(Some)
}

/// The arrays of answers and what [`check_sections`] checks in their items: whether they have
/// a `responses` array.
const SECTIONS: [(&str, bool); 3] = [("form", true), ("optins", false), ("questionnaire", true)];

/// Checks `$.form`, `$.optins` and `$.questionnaire` (each optional): arrays of objects, each
/// with an optional `variable` string (the mapping variable a `variables` object is built from)
/// and, for form fields and questions, an optional `responses` array of objects. Tells whether
/// any form field holds a response.
fn check_sections(root: &Map<String, Value>) -> Result<bool, InvalidParticipation> {
    let mut has_form_responses = false;
    for (key, with_responses) in SECTIONS {
        let Some(section) = optional(root, key) else {
            continue;
        };
        let items = section
            .as_array()
            .ok_or_else(|| expected(&format!("$.{key}"), "an array", section))?;
        for (i, item) in items.iter().enumerate() {
            let item = item
                .as_object()
                .ok_or_else(|| expected(&format!("$.{key}[{i}]"), "an object", item))?;
            if let Some(variable) = optional(item, "variable")
                && !variable.is_string()
            {
                return Err(expected(
                    &format!("$.{key}[{i}].variable"),
                    "a string",
                    variable,
                ));
            }
            if !with_responses {
                continue;
            }
            let Some(responses) = optional(item, "responses") else {
                continue;
            };
            let responses = responses.as_array().ok_or_else(|| {
                expected(&format!("$.{key}[{i}].responses"), "an array", responses)
            })?;
            if let Some((j, r)) = responses.iter().enumerate().find(|(_, r)| !r.is_object()) {
                return Err(expected(
                    &format!("$.{key}[{i}].responses[{j}]"),
                    "an object",
                    r,
                ));
            }
            has_form_responses |= key == "form" && !responses.is_empty();
        }
    }
    Ok(has_form_responses)
}

/// A campaign or website id: a non-negative integer, or a string of digits (some publishers
/// quote ids). Both become the same decimal string, so `"0418207"`, `"418207"` and `418207`
/// route alike; going through `u64` also bounds the length.
fn numeric_id(v: &Value, path: &str) -> Result<String, InvalidParticipation> {
    const WANTED: &str = "a non-negative integer or a non-empty string of digits";
    match v {
        Value::Number(n) => n.as_u64().map(|n| n.to_string()).ok_or_else(|| {
            InvalidParticipation::new(
                path,
                format!(
                    "expected {WANTED}, found the number {}",
                    truncate(&n.to_string(), 32)
                ),
            )
        }),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().map(|n| n.to_string()).map_err(|_| {
                InvalidParticipation::new(
                    path,
                    format!("too large for an id: {:?}", truncate(s, MAX_ECHO_CHARS)),
                )
            })
        }
        Value::String(s) => Err(InvalidParticipation::new(
            path,
            format!("expected {WANTED}, found {:?}", truncate(s, MAX_ECHO_CHARS)),
        )),
        other => Err(expected(path, WANTED, other)),
    }
}

/// A `participation_json` that is not UTF-8 reaches [`parse`] as this prefix followed by the
/// offset of the first invalid byte: protobuf `string` fields must be UTF-8, so the gRPC codec
/// (`crate::pb::codec`) puts it there instead of failing the whole stream, and the document is
/// refused like any malformed one. A document cannot start so (it is not JSON).
pub const NOT_UTF8: &str = "\u{0}pushwire:not-utf-8:";

/// What [`scan`] found.
struct Scan {
    /// The JSON path of the first array or object that opens at a depth over [`MAX_DEPTH`].
    too_deep: Option<String>,
    /// The JSON path of the first key met a second time in the same object.
    duplicate_key: Option<String>,
}

/// One linear scan of the text that only follows strings (to skip the brackets inside them),
/// brackets, `,` and object keys: it finds the first array or object nested deeper than
/// [`MAX_DEPTH`] (and stops there) and the first duplicated key (keys compared once
/// unescaped). On malformed JSON it may point anywhere, but the parse that follows refuses
/// such documents anyway.
fn scan(json: &str) -> Scan {
    enum Frame<'a> {
        /// An object; the byte range of the key of the member being read, once met, and the
        /// keys met so far.
        Object {
            key: Option<(usize, usize)>,
            expect_key: bool,
            seen: HashSet<Cow<'a, str>>,
        },
        /// An array; the index of the element being read.
        Array { index: usize },
    }
    let step = |f: &Frame<'_>| match f {
        Frame::Object { key, .. } => Err(*key),
        Frame::Array { index } => Ok(*index),
    };
    let mut found = Scan {
        too_deep: None,
        duplicate_key: None,
    };
    let bytes = json.as_bytes();
    let mut stack: Vec<Frame<'_>> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                let mut escaped = false;
                while i < bytes.len() && bytes[i] != b'"' {
                    escaped |= bytes[i] == b'\\';
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                let end = i.min(bytes.len());
                if let Some(Frame::Object {
                    key,
                    expect_key,
                    seen,
                }) = stack.last_mut()
                    && *expect_key
                {
                    *key = Some((start, end));
                    *expect_key = false;
                    if found.duplicate_key.is_none() {
                        let raw = json.get(start..end).unwrap_or_default();
                        let name = if escaped {
                            // `"\u0073tate"` is the key `state`.
                            json.get(start - 1..end + 1)
                                .and_then(|quoted| serde_json::from_str::<String>(quoted).ok())
                                .map_or(Cow::Borrowed(raw), Cow::Owned)
                        } else {
                            Cow::Borrowed(raw)
                        };
                        if !seen.insert(name) {
                            found.duplicate_key = Some(json_path(json, &stack, step));
                        }
                    }
                }
            }
            b'{' | b'[' => {
                if stack.len() == MAX_DEPTH {
                    found.too_deep = Some(json_path(json, &stack, step));
                    return found;
                }
                stack.push(if bytes[i] == b'{' {
                    Frame::Object {
                        key: None,
                        expect_key: true,
                        seen: HashSet::new(),
                    }
                } else {
                    Frame::Array { index: 0 }
                });
            }
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { expect_key, .. }) => *expect_key = true,
                None => {}
            },
            _ => {}
        }
        i += 1;
    }
    found
}

/// `$` followed by `.key` or `[index]` for each frame (`step` gives an array's index as `Ok`,
/// an object's key range in `json` as `Err`), at most [`MAX_PATH_CHARS`] characters.
fn json_path<F>(
    json: &str,
    stack: &[F],
    step: impl Fn(&F) -> Result<usize, Option<(usize, usize)>>,
) -> String {
    let mut path = String::from("$");
    for frame in stack {
        match step(frame) {
            Ok(index) => path.push_str(&format!("[{index}]")),
            Err(Some((start, end))) => {
                path.push('.');
                // Raw key text (escapes as written): `start`/`end` sit next to ASCII quotes,
                // so they are character boundaries.
                path.push_str(&truncate(json.get(start..end).unwrap_or("?"), 32));
            }
            Err(None) => path.push_str(".?"),
        }
        if path.chars().count() > MAX_PATH_CHARS {
            return truncate(&path, MAX_PATH_CHARS);
        }
    }
    path
}

/// A member that may be absent; `null` counts as absent, as publishers write either.
fn optional<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn required<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Value, InvalidParticipation> {
    optional(obj, key).ok_or_else(|| InvalidParticipation::new(path, "missing"))
}

fn non_empty_string<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, InvalidParticipation> {
    let v = required(obj, key, path)?;
    match v.as_str() {
        Some("") => Err(InvalidParticipation::new(path, "must not be empty")),
        Some(s) => Ok(s),
        None => Err(expected(path, "a non-empty string", v)),
    }
}

/// A type mismatch; names the JSON type found rather than quoting the value.
fn expected(path: &str, wanted: &str, found: &Value) -> InvalidParticipation {
    InvalidParticipation::new(path, format!("expected {wanted}, found {}", kind(found)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most `max` characters of `s`, with `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;
