//! The filter of ListDeliveries and RedeliverDeliveries: a subset of AIP-160. Comparisons
//! joined with `AND`, each field at most once:
//!
//! - `state = QUEUED` (or `DELIVERED`, `FAILED`, `SKIPPED`; a `DELIVERY_STATE_` prefix is
//!   accepted too);
//! - `campaign_id = "7"`, `website_id = "3"`, `participation_id = "…"` (quoted or bare);
//! - `create_time >= "2026-12-01T00:00:00Z"`, `create_time < "…"` (RFC 3339, UTC).
//!
//! Anything else (`OR`, `NOT`, other fields or operators, a bad value) is refused with a
//! message naming the problem.

use std::time::SystemTime;

use pushwire_common::delivery_store::{DeliveryFilter, DeliveryState};

/// Longest filter accepted.
const MAX_FILTER_LEN: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Op(&'static str),
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated string (a `\"` is missing)".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(escaped) => value.push(escaped),
                        None => return Err("unterminated string (a `\"` is missing)".into()),
                    },
                    Some(other) => value.push(other),
                }
            }
            out.push(Token::Quoted(value));
        } else if "<>=!:".contains(c) {
            chars.next();
            let op = match (c, chars.peek()) {
                ('>', Some('=')) => ">=",
                ('<', Some('=')) => "<=",
                ('!', Some('=')) => "!=",
                ('>', _) => ">",
                ('<', _) => "<",
                ('=', _) => "=",
                (':', _) => ":",
                _ => return Err(format!("unexpected `{c}`")),
            };
            if op.len() == 2 {
                chars.next();
            }
            out.push(Token::Op(op));
        } else if c.is_alphanumeric() || "_-.".contains(c) {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_alphanumeric() || "_-.".contains(c) {
                    word.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(Token::Word(word));
        } else {
            return Err(format!("unexpected `{c}`"));
        }
    }
    Ok(out)
}

fn value_text(token: Option<&Token>, field: &str) -> Result<String, String> {
    match token {
        Some(Token::Word(w)) | Some(Token::Quoted(w)) => Ok(w.clone()),
        _ => Err(format!("a value is missing after `{field}`")),
    }
}

fn state(value: &str) -> Result<DeliveryState, String> {
    let bare = value.strip_prefix("DELIVERY_STATE_").unwrap_or(value);
    Ok(match bare {
        "QUEUED" => DeliveryState::Queued,
        "DELIVERED" => DeliveryState::Delivered,
        "FAILED" => DeliveryState::Failed,
        "SKIPPED" => DeliveryState::Skipped,
        _ => {
            return Err(format!(
                "unknown state {value:?}: expected QUEUED, DELIVERED, FAILED or SKIPPED"
            ));
        }
    })
}

fn time(value: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(value).map_err(|e| {
        format!(
            "create_time {value:?} is not an RFC 3339 UTC time like \"2026-12-01T00:00:00Z\" ({e})"
        )
    })
}

fn set_once<T>(slot: &mut Option<T>, value: T, what: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{what} appears twice; each field at most once"));
    }
    *slot = Some(value);
    Ok(())
}

/// Parses `text` (empty: no condition). The error says what is wrong, for
/// `INVALID_ARGUMENT` on the `filter` field.
pub fn parse(text: &str) -> Result<DeliveryFilter, String> {
    let mut filter = DeliveryFilter::default();
    if text.len() > MAX_FILTER_LEN {
        return Err(format!("longer than {MAX_FILTER_LEN} bytes"));
    }
    let tokens = tokens(text)?;
    let mut at = 0;
    while at < tokens.len() {
        if at > 0 {
            match &tokens[at] {
                Token::Word(w) if w == "AND" => at += 1,
                Token::Word(w) if w == "OR" || w == "NOT" => {
                    return Err(format!("{w} is not supported: join comparisons with AND"));
                }
                other => return Err(format!("expected AND, found {}", describe(other))),
            }
        }
        let field = match tokens.get(at) {
            Some(Token::Word(w)) => w.clone(),
            Some(other) => return Err(format!("expected a field, found {}", describe(other))),
            None => return Err("a comparison is missing after AND".into()),
        };
        if field == "NOT" || field == "OR" {
            return Err(format!(
                "{field} is not supported: join comparisons with AND"
            ));
        }
        let op = match tokens.get(at + 1) {
            Some(Token::Op(op)) => *op,
            _ => return Err(format!("an operator is missing after `{field}`")),
        };
        let value = value_text(tokens.get(at + 2), &format!("{field} {op}"))?;
        at += 3;
        match (field.as_str(), op) {
            ("state", "=") => set_once(&mut filter.state, state(&value)?, "state")?,
            ("campaign_id", "=") => set_once(&mut filter.campaign_id, value, "campaign_id")?,
            ("website_id", "=") => set_once(&mut filter.website_id, value, "website_id")?,
            ("participation_id", "=") => {
                set_once(&mut filter.participation_id, value, "participation_id")?;
            }
            ("create_time", ">=") => {
                set_once(&mut filter.created_from, time(&value)?, "create_time >=")?;
            }
            ("create_time", "<") => {
                set_once(&mut filter.created_before, time(&value)?, "create_time <")?;
            }
            ("create_time", _) => {
                return Err(format!(
                    "create_time takes >= and <, not {op} (e.g. create_time >= \"2026-12-01T00:00:00Z\")"
                ));
            }
            ("state" | "campaign_id" | "website_id" | "participation_id", _) => {
                return Err(format!("{field} takes =, not {op}"));
            }
            _ => {
                return Err(format!(
                    "unknown field {field:?}: expected state, campaign_id, website_id, \
                     participation_id or create_time"
                ));
            }
        }
    }
    Ok(filter)
}

fn describe(token: &Token) -> String {
    match token {
        Token::Word(w) => format!("`{w}`"),
        Token::Quoted(q) => format!("\"{q}\""),
        Token::Op(op) => format!("`{op}`"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_full_filter_is_read() {
        let filter = parse(
            r#"state = QUEUED AND campaign_id = "7" AND website_id=3 AND participation_id = "a\"b"
               AND create_time >= "2026-12-01T00:00:00Z" AND create_time < "2026-12-02T00:00:00Z""#,
        )
        .unwrap();
        let day = 1_796_083_200;
        assert_eq!(
            filter,
            DeliveryFilter {
                state: Some(DeliveryState::Queued),
                campaign_id: Some("7".into()),
                website_id: Some("3".into()),
                participation_id: Some("a\"b".into()),
                created_from: Some(UNIX_EPOCH + Duration::from_secs(day)),
                created_before: Some(UNIX_EPOCH + Duration::from_secs(day + 86_400)),
            }
        );
        assert_eq!(parse("").unwrap(), DeliveryFilter::default());
        assert_eq!(
            parse("state = DELIVERY_STATE_FAILED").unwrap().state,
            Some(DeliveryState::Failed)
        );
    }

    #[test]
    fn malformed_filters_name_the_problem() {
        for (filter, expected) in [
            ("state = LOST", "unknown state"),
            ("state = QUEUED OR state = FAILED", "OR is not supported"),
            ("state = QUEUED state = FAILED", "expected AND"),
            ("state = QUEUED AND", "missing after AND"),
            ("colour = \"red\"", "unknown field \"colour\""),
            ("campaign_id > 7", "campaign_id takes ="),
            (
                "create_time = \"2026-12-01T00:00:00Z\"",
                "create_time takes >= and <",
            ),
            ("create_time >= \"yesterday\"", "not an RFC 3339"),
            ("campaign_id = \"7", "unterminated string"),
            ("campaign_id =", "a value is missing"),
            ("state = QUEUED AND state = FAILED", "state appears twice"),
            ("campaign_id = 7 ; drop", "unexpected `;`"),
            ("NOT state = QUEUED", "NOT is not supported"),
        ] {
            let err = parse(filter).unwrap_err();
            assert!(err.contains(expected), "{filter}: {err}");
        }
    }
}
