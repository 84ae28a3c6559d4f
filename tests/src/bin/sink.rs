//! `sink`: a loopback webhook receiver for people checking their Pushwire set-up. Prints each
//! delivery (headers, signature verdicts, body) and answers with a chosen status and delay.
//! Serving and TLS come from `pushwire_tests::receiver`; signature checks from
//! `pushwire_common::webhook::signing`. It never listens beyond loopback.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use pushwire_common::domain::Secret;
use pushwire_common::webhook::signing::{verify_qualifio, verify_standard_webhooks};
use pushwire_tests::receiver::{Received, Reply, TlsIdentity, serve};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How far `webhook-timestamp` may be from this clock before we warn: the tolerance Standard
/// Webhooks receivers apply against replays.
const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// Headers about the transport rather than the webhook: not worth a line each.
const TRANSPORT_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "connection",
    "accept",
    "accept-encoding",
    "transfer-encoding",
];

#[derive(Parser, Debug)]
#[command(
    name = "sink",
    version,
    about = "A webhook receiver on loopback for testing a Pushwire set-up: prints every delivery \
             with its signature verdicts and answers with the status you choose."
)]
struct Args {
    /// Address to listen on; loopback only (127.0.0.0/8 or ::1). Port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:9000", value_parser = parse_loopback)]
    listen: SocketAddr,

    /// Serve HTTPS with a freshly generated certificate for localhost and 127.0.0.1.
    #[arg(long)]
    tls: bool,

    /// With --tls: where to write the CA certificate that clients must trust.
    #[arg(long, value_name = "FILE", default_value = "./sink-ca.pem")]
    ca_out: PathBuf,

    /// Signing secret of the integration; verifies X-Qualifio-Signature and the Standard
    /// Webhooks webhook-signature. Give it twice to accept either of two secrets, as a
    /// receiver does while the integration's secret is rotated.
    #[arg(long, env = "SINK_SECRET", hide_env_values = true)]
    secret: Vec<String>,

    /// Status to answer with.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=599))]
    status: u16,

    /// Wait this long before answering (e.g. 500ms, 20s).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,

    /// Answer 500 to the first N requests, then --status.
    #[arg(long, value_name = "N", default_value_t = 0)]
    fail_first: u64,

    /// Print one JSON object per delivery on stdout instead of the human format.
    #[arg(long)]
    json: bool,
}

fn parse_loopback(value: &str) -> Result<SocketAddr, String> {
    let addr = match value.strip_prefix("localhost:") {
        Some(port) => {
            let port = port
                .parse::<u16>()
                .map_err(|e| format!("bad port in {value}: {e}"))?;
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        }
        None => value
            .parse::<SocketAddr>()
            .map_err(|e| format!("{value} is not an IP:PORT address ({e}), e.g. 127.0.0.1:9000"))?,
    };
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: sink only listens on 127.0.0.0/8 or [::1], so that \
             nothing outside this machine can reach it",
            addr.ip()
        ));
    }
    Ok(addr)
}

/// Outcome of checking one signature scheme on one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    Mismatch,
    Absent,
    /// The header is there but no secret was given.
    Unchecked,
}

impl Verdict {
    fn human(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Mismatch => "MISMATCH",
            Verdict::Absent => "absent",
            Verdict::Unchecked => "present, not checked (no --secret)",
        }
    }

    fn json(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Mismatch => "mismatch",
            Verdict::Absent => "absent",
            Verdict::Unchecked => "unchecked",
        }
    }
}

/// What the sink makes of one delivery.
#[derive(Debug)]
struct Report {
    seq: u64,
    time: SystemTime,
    status: u16,
    qualifio: Verdict,
    standard: Verdict,
    warnings: Vec<String>,
}

fn unix_now(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The verdicts of `received`'s signatures against any of `secrets` (none: unchecked).
fn check(
    received: &Received,
    secrets: &[Secret],
    now: SystemTime,
) -> (Verdict, Verdict, Vec<String>) {
    let mut warnings = Vec::new();
    let qualifio = match received.header("x-qualifio-signature") {
        None => Verdict::Absent,
        Some(_) if secrets.is_empty() => Verdict::Unchecked,
        Some(sig)
            if secrets
                .iter()
                .any(|s| verify_qualifio(s, &received.body, sig)) =>
        {
            Verdict::Ok
        }
        Some(_) => Verdict::Mismatch,
    };

    let timestamp = received
        .header("webhook-timestamp")
        .map(|t| t.trim().parse::<i64>());
    match timestamp {
        Some(Ok(ts)) => {
            let skew = unix_now(now).saturating_sub(ts);
            if skew.abs() > TIMESTAMP_TOLERANCE_SECS {
                let when = if skew > 0 {
                    "in the past"
                } else {
                    "in the future"
                };
                warnings.push(format!(
                    "webhook-timestamp is {} s {when}: more than 5 minutes off this clock, so \
                     Standard Webhooks receivers will refuse it",
                    skew.unsigned_abs()
                ));
            }
        }
        Some(Err(_)) => warnings.push("webhook-timestamp is not unix seconds".to_owned()),
        None => {}
    }

    let standard = match received.header("webhook-signature") {
        None => Verdict::Absent,
        Some(_) if secrets.is_empty() => Verdict::Unchecked,
        Some(sig) => {
            let id = received.header("webhook-id");
            if id.is_none() {
                warnings.push("webhook-signature without webhook-id".to_owned());
            }
            match (id, timestamp) {
                (Some(id), Some(Ok(ts)))
                    if secrets
                        .iter()
                        .any(|s| verify_standard_webhooks(s, id, ts, &received.body, sig)) =>
                {
                    Verdict::Ok
                }
                _ => Verdict::Mismatch,
            }
        }
    };
    (qualifio, standard, warnings)
}

/// Whether a header carries a credential, so only a hint of it is printed. The integration's
/// auth header name is free-form: match the usual ones.
fn is_credential(name: &str) -> bool {
    name == "authorization"
        || name == "proxy-authorization"
        || ["auth", "token", "api-key", "apikey", "secret", "password"]
            .iter()
            .any(|w| name.contains(w))
}

fn masked(value: &str) -> String {
    // Never more than half of a short value, so a 4-character token is not shown whole.
    let shown = 4.min(value.chars().count() / 2);
    let mut out: String = value.chars().take(shown).collect();
    out.push('…');
    out
}

fn shown_headers(received: &Received) -> impl Iterator<Item = (&str, String)> {
    received
        .headers
        .iter()
        .filter(|(n, _)| !TRANSPORT_HEADERS.contains(&n.as_str()))
        .map(|(n, v)| {
            let v = if is_credential(n) {
                masked(v)
            } else {
                v.clone()
            };
            (n.as_str(), v)
        })
}

fn human(received: &Received, report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "── #{} {} {} {} → {}",
        report.seq,
        humantime::format_rfc3339_millis(report.time),
        received.method,
        received.path,
        report.status
    );
    for (name, value) in shown_headers(received) {
        let _ = writeln!(out, "  {name}: {value}");
    }
    let _ = writeln!(
        out,
        "  qualifio signature:          {}",
        report.qualifio.human()
    );
    let _ = writeln!(
        out,
        "  standard webhooks signature: {}",
        report.standard.human()
    );
    for warning in &report.warnings {
        let _ = writeln!(out, "  WARNING: {warning}");
    }
    let body = match received.json() {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_default(),
        Err(_) if received.body.is_empty() => "(empty body)".to_owned(),
        Err(_) => received.body_text().into_owned(),
    };
    for line in body.lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

fn json_line(received: &Received, report: &Report) -> String {
    let mut headers = serde_json::Map::new();
    for (name, value) in shown_headers(received) {
        // Repeated headers are rare in webhooks; join them as HTTP would.
        let joined = match headers.remove(name) {
            Some(serde_json::Value::String(prev)) => format!("{prev}, {value}"),
            _ => value,
        };
        headers.insert(name.to_owned(), joined.into());
    }
    let body = received
        .json()
        .unwrap_or_else(|_| received.body_text().into_owned().into());
    json!({
        "seq": report.seq,
        "time": humantime::format_rfc3339_millis(report.time).to_string(),
        "method": received.method,
        "path": received.path,
        "status": report.status,
        "headers": headers,
        "verdicts": {
            "qualifio": report.qualifio.json(),
            "standard_webhooks": report.standard.json(),
        },
        "warnings": report.warnings,
        "body": body,
    })
    .to_string()
}

/// Shared by every request the sink answers.
#[derive(Debug)]
struct Sink {
    args: Args,
    secrets: Vec<Secret>,
    seen: AtomicU64,
}

impl Sink {
    fn on_request(&self, received: Received) -> Reply {
        let seq = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        let status = if seq <= self.args.fail_first {
            500
        } else {
            self.args.status
        };
        let time = SystemTime::now();
        let (qualifio, standard, warnings) = check(&received, &self.secrets, time);
        let report = Report {
            seq,
            time,
            status,
            qualifio,
            standard,
            warnings,
        };
        let text = if self.args.json {
            json_line(&received, &report)
        } else {
            human(&received, &report)
        };
        // One write per delivery so concurrent ones do not interleave; a closed stdout (e.g. a
        // finished `| head`) must not stop the answers.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", text.trim_end()).and_then(|()| stdout.flush());
        Reply::status(status).after(self.args.delay)
    }
}

async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let tls = if args.tls {
        let identity = TlsIdentity::generate()?;
        identity
            .write_ca_pem(&args.ca_out)
            .with_context(|| format!("writing the CA certificate to {}", args.ca_out.display()))?;
        Some(identity)
    } else {
        None
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("sink listening on {scheme}://{addr}/ (any path)");
    if tls.is_some() {
        eprintln!(
            "  TLS certificate for localhost and 127.0.0.1; its CA is in {} \
             (worker --extra-ca-file, curl --cacert)",
            args.ca_out.display()
        );
    }
    let delay = humantime::format_duration(args.delay);
    match args.fail_first {
        0 => eprintln!("  answering {} after {delay}", args.status),
        n => eprintln!(
            "  answering 500 to the first {n} request(s), then {}, after {delay}",
            args.status
        ),
    }
    let secrets: Vec<Secret> = args
        .secret
        .iter()
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect();
    eprintln!(
        "  signatures: {}",
        match secrets.len() {
            0 => "not checked (no --secret or SINK_SECRET)",
            1 => "checked with the given secret",
            _ => "checked: any of the given secrets verifies",
        }
    );

    let sink = Arc::new(Sink {
        args,
        secrets,
        seen: AtomicU64::new(0),
    });
    let handler = move |received| std::future::ready(sink.on_request(received));
    serve(
        listener,
        tls.as_ref().map(TlsIdentity::acceptor),
        handler,
        shutdown,
    )
    .await;
    eprintln!("sink stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        pushwire_common::server::shutdown::signal().await;
        on_signal.cancel();
    });
    run(args, shutdown).await
}
