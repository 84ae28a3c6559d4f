//! `/metrics` in the format the scraper asks for. The registries encode OpenMetrics 1.0; a
//! scraper that does not ask for it (`Accept` without `application/openmetrics-text`: curl,
//! promtool, an older Prometheus) gets the classic text format 0.0.4, converted here, so that
//! each body is valid for the content type it is served with.
//!
//! The conversion renames the `HELP` and `TYPE` lines of a counter to the name its samples
//! carry (`x_total`; OpenMetrics names the family `x`), drops `UNIT` and `# EOF`, which the
//! classic format does not know, maps `info` to `gauge` and `unknown` to `untyped`, and strips
//! exemplars.

use std::collections::HashMap;

/// The two expositions `/metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The classic Prometheus text format, version 0.0.4.
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

const OPENMETRICS: &str = "application/openmetrics-text";

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics when the client lists it with a
    /// quality at least that of `text/plain` (as Prometheus does), else the classic text.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Text;
        };
        let (mut openmetrics, mut text) = (None::<f32>, None::<f32>);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let slot = match media.as_str() {
                OPENMETRICS => &mut openmetrics,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
        match openmetrics {
            Some(om) if om > 0.0 && om >= text.unwrap_or(0.0) => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// `openmetrics` (what `prometheus_client::encoding::text::encode` writes, one `# EOF` at
    /// the end) in this format.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Self::OpenMetrics => openmetrics,
            Self::Text => to_classic(&openmetrics),
        }
    }
}

/// The classic text format of an OpenMetrics exposition (see the module documentation).
pub fn to_classic(openmetrics: &str) -> String {
    // The family name a sample carries, by family, for the types whose samples add a suffix.
    let renamed: HashMap<&str, (String, &str)> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, kind)| match kind.trim() {
            "counter" => Some((name, (format!("{name}_total"), "counter"))),
            "info" => Some((name, (format!("{name}_info"), "gauge"))),
            "unknown" => Some((name, (name.to_owned(), "untyped"))),
            "stateset" | "gaugehistogram" => Some((name, (name.to_owned(), "gauge"))),
            _ => None,
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = renamed.get(name).map_or(name, |(n, _)| n.as_str());
            // Classic HELP knows the escapes `\\` and `\n` only.
            let help = help.replace("\\\"", "\"");
            out.push_str(&format!("# HELP {name} {help}\n"));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match renamed.get(name) {
                Some((name, kind)) => out.push_str(&format!("# TYPE {name} {kind}\n")),
                None => out.push_str(&format!("# TYPE {name} {}\n", kind.trim())),
            }
        } else if line.starts_with('#') || line.trim().is_empty() {
            // `# UNIT`, `# EOF`: not part of the classic format.
        } else {
            out.push_str(strip_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// A sample line without its exemplar (` # {labels} value`), which follows the value.
fn strip_exemplar(line: &str) -> &str {
    // The labels may contain " # " inside quoted values; the exemplar starts after them.
    let after_labels = match line.find('{') {
        Some(open) => closing_brace(line, open).map_or(0, |close| close + 1),
        None => 0,
    };
    match line[after_labels..].find(" # ") {
        Some(at) => &line[..after_labels + at],
        None => line,
    }
}

/// The index of the `}` that closes the label set opened at `open`, skipping quoted values.
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line.char_indices().skip_while(|&(i, _)| i <= open) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

    #[test]
    fn negotiation_follows_the_accept_header() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::negotiate(Some(PROMETHEUS_ACCEPT)),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0.1, text/plain")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
    }

    #[test]
    fn counters_are_described_under_their_sample_name() {
        let om = "# HELP pushwire_deliveries Deliveries \\\"done\\\".\n\
                  # TYPE pushwire_deliveries counter\n\
                  pushwire_deliveries_total{outcome=\"a # b\"} 3 # {trace_id=\"x\"} 1\n\
                  # HELP pushwire_latency_seconds Latency.\n\
                  # TYPE pushwire_latency_seconds histogram\n\
                  # UNIT pushwire_latency_seconds seconds\n\
                  pushwire_latency_seconds_sum 0.5\n\
                  pushwire_latency_seconds_count 1\n\
                  pushwire_latency_seconds_bucket{le=\"+Inf\"} 1\n\
                  # HELP pushwire_build Build.\n\
                  # TYPE pushwire_build info\n\
                  pushwire_build_info{version=\"1\"} 1\n\
                  # EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP pushwire_deliveries_total Deliveries \"done\".\n\
             # TYPE pushwire_deliveries_total counter\n\
             pushwire_deliveries_total{outcome=\"a # b\"} 3\n\
             # HELP pushwire_latency_seconds Latency.\n\
             # TYPE pushwire_latency_seconds histogram\n\
             pushwire_latency_seconds_sum 0.5\n\
             pushwire_latency_seconds_count 1\n\
             pushwire_latency_seconds_bucket{le=\"+Inf\"} 1\n\
             # HELP pushwire_build_info Build.\n\
             # TYPE pushwire_build_info gauge\n\
             pushwire_build_info{version=\"1\"} 1\n"
        );
    }
}
