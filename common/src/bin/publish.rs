//! `publish`: publishes participations to Pushwire workers from the command line, through
//! [`pushwire_common::publisher`]: every participation is kept until a worker acknowledges it
//! and sent again on another stream when a stream or a worker fails.
//!
//! ```sh
//! publish --workers http://127.0.0.1:50052 --account accounts/42 participations.ndjson
//! ```
//!
//! Input: NDJSON, one participation document per line (sent byte for byte), or one
//! `PublishRequest` in protobuf JSON (`{"participationJson": "…", "onlyIntegrations": […]}`,
//! as `--retry-file` writes them). Progress on standard error when it is a terminal; a
//! summary line at the end; what did not get through is listed on standard output.
//! Exit status: 0 all delivered or skipped, 1 something failed, was refused or given up, 2
//! usage, input or connection errors. The token comes from `--token-file` or
//! `PUSHWIRE_PUBLISH_TOKEN`; `https://` workers are checked against `--ca-file` (else the
//! system's roots).

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::publisher::{
    Publisher, PublisherOptions, Receipt, ReceiptStatus, Report, Stats, TlsOptions,
};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

/// Publishes participations (NDJSON) to Pushwire workers; each is kept until a worker
/// acknowledges it and re-published elsewhere when a stream or a worker fails.
#[derive(Debug, Parser)]
#[command(name = "publish", version)]
struct Args {
    /// Workers, comma-separated or repeated: `http://host:port`, `host:port` or
    /// `dns:///name:port` (every address of the name gets a stream, e.g. a Kubernetes
    /// headless service).
    #[arg(long, env = "PUSHWIRE_WORKERS", value_delimiter = ',', required = true)]
    workers: Vec<String>,

    /// Account of the participations, `accounts/{id}` (a PublishRequest line may name its
    /// own). Not needed when every line is a PublishRequest naming its account; without it, a
    /// line that names none is listed as a problem and not sent.
    #[arg(long, env = "PUSHWIRE_ACCOUNT")]
    account: Option<String>,

    /// NDJSON file: one participation document per line, or one PublishRequest in protobuf
    /// JSON; `-` for standard input.
    #[arg(default_value = "-", value_name = "FILE|-")]
    input: String,

    /// Participations in flight per stream (at most the workers' --window).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    window: u32,

    /// Participations held at once (read, not yet acknowledged).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_pending: u32,

    /// Time after which a participation not acknowledged is given up (leave room for the
    /// workers' --retry-window).
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    deadline: Duration,

    /// Time to reach a first worker before giving up (exit status 2).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,

    /// Write what to publish again to this file, as NDJSON this command reads: participations
    /// with FAILED deliveries restricted to those integrations (`onlyIntegrations`), given-up
    /// ones whole.
    #[arg(long, value_name = "FILE")]
    retry_file: Option<PathBuf>,

    /// File holding the token to present (a `publisher` token of the account); without it,
    /// the variable PUSHWIRE_PUBLISH_TOKEN (never a flag: command lines are visible to every
    /// local user).
    #[arg(long, env = "PUSHWIRE_PUBLISH_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// PEM CA certificates trusted for https:// workers (else the system's roots).
    #[arg(long, env = "PUSHWIRE_PUBLISH_CA")]
    ca_file: Option<PathBuf>,

    /// PEM client certificate presented to workers that require one (mTLS).
    #[arg(long, env = "PUSHWIRE_TLS_CLIENT_CERT", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,

    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "PUSHWIRE_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,

    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

/// The variable holding the token when no --token-file is given.
const TOKEN_ENV: &str = "PUSHWIRE_PUBLISH_TOKEN";

/// The token: the file's content (trimmed), else the variable; `None` when neither is set.
fn token(args: &Args) -> anyhow::Result<Option<Secret>> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}", path.display()))?,
        None => std::env::var(TOKEN_ENV).unwrap_or_default(),
    };
    let token = token.trim();
    Ok((!token.is_empty()).then(|| Secret::new(token)))
}

fn tls(args: &Args) -> anyhow::Result<TlsOptions> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
    };
    Ok(TlsOptions {
        ca_pem: args
            .ca_file
            .as_ref()
            .map(|p| read("--ca-file", p))
            .transpose()?,
        client_identity: match (&args.tls_client_cert, &args.tls_client_key) {
            (Some(cert), Some(key)) => Some((
                read("--tls-client-cert", cert)?,
                Secret::new(
                    String::from_utf8(read("--tls-client-key", key)?)
                        .context("--tls-client-key: not PEM text")?,
                ),
            )),
            _ => None,
        },
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .try_init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("publish: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("publish: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// What did not get through, by input line.
enum Problem {
    /// The line could not be made a request.
    Unreadable(String),
    /// A receipt that is not done.
    Receipt(Box<Receipt>),
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let input: Box<dyn AsyncBufRead + Unpin + Send> = if args.input == "-" {
        Box::new(BufReader::new(tokio::io::stdin()))
    } else {
        let file = tokio::fs::File::open(&args.input)
            .await
            .with_context(|| format!("opening {}", args.input))?;
        Box::new(BufReader::new(file))
    };
    let mut retry_file = match &args.retry_file {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let opts = PublisherOptions {
        window: args.window as usize,
        max_pending: args.max_pending as usize,
        deadline: args.deadline,
        token: token(&args)?,
        tls: tls(&args)?,
        ..PublisherOptions::default()
    };
    let account = args.account.clone().unwrap_or_default();
    let publisher = Publisher::connect(&args.workers, &account, opts)?;
    if let Err(e) = publisher.wait_connected(args.connect_timeout).await {
        // A refused token is said at once, as such: retrying or another worker won't help.
        if publisher.token_refused().is_some() {
            anyhow::bail!(
                "{e} (give a publisher token of the account with --token-file or {TOKEN_ENV})"
            );
        }
        anyhow::bail!("cannot reach any worker: {e}");
    }

    let started = Instant::now();
    let mut progress = Progress::new(!args.quiet && std::io::stderr().is_terminal());
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Receipt)>();
    let mut lines = input.lines();
    let mut line_no = 0u64;
    let mut outstanding = 0u64;
    let mut input_error = None;
    let mut input_done = false;
    let mut problems: Vec<(u64, Problem)> = Vec::new();
    let mut report = Report::default();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        if input_done && outstanding == 0 {
            break;
        }
        tokio::select! {
            Some((line, receipt)) = rx.recv(), if outstanding > 0 => {
                outstanding -= 1;
                let keep = receipt.status() != ReceiptStatus::Done;
                if keep && let (Some(out), Some(again)) = (retry_file.as_mut(), receipt.republish()) {
                    writeln!(out, "{}", request_json(&again)).context("writing the retry file")?;
                }
                // The report keeps problem receipts; ours are listed by line, so take them back.
                report.add(receipt);
                if keep && let Some(r) = report.problems.pop() {
                    problems.push((line, Problem::Receipt(Box::new(r))));
                }
            }
            // Cancel-safe: a line is consumed only when this branch completes.
            line = lines.next_line(), if !input_done => match line {
                Ok(Some(text)) => {
                    line_no += 1;
                    if text.trim().is_empty() {
                        continue;
                    }
                    match parse_line(&text) {
                        Ok(request) if request.account.is_empty() && account.is_empty() => {
                            problems.push((line_no, Problem::Unreadable(
                                "no account: give --account or name it in the line (a PublishRequest with \"account\")".to_owned(),
                            )));
                        }
                        Ok(request) => {
                            let (tx, line) = (tx.clone(), line_no);
                            publisher
                                .publish_with(request, move |r| {
                                    let _ = tx.send((line, r));
                                })
                                .await;
                            outstanding += 1;
                        }
                        Err(why) => problems.push((line_no, Problem::Unreadable(why))),
                    }
                }
                Ok(None) => input_done = true,
                Err(e) => {
                    input_error = Some(e);
                    input_done = true;
                }
            },
            _ = tick.tick() => progress.draw(&report, problems.len(), &publisher.stats(), started),
        }
    }
    progress.clear();
    let stats = publisher.stats();
    publisher.close().await;
    if let Some(out) = retry_file.as_mut() {
        out.flush().context("writing the retry file")?;
    }

    problems.sort_by_key(|(line, _)| *line);
    let mut stdout = std::io::stdout().lock();
    for (line, problem) in &problems {
        for text in describe(*line, problem) {
            writeln!(stdout, "{text}")?;
        }
    }
    let unreadable = problems
        .iter()
        .filter(|(_, p)| matches!(p, Problem::Unreadable(_)))
        .count();
    eprintln!(
        "{}",
        summary(&report, unreadable, &stats, started.elapsed())
    );
    if let Some(e) = input_error {
        return Err(
            anyhow::Error::new(e).context(format!("reading {} after line {line_no}", args.input))
        );
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A request from one input line: a PublishRequest in protobuf JSON when the object has
/// `participationJson`, else the line itself as the participation document (byte for byte).
fn parse_line(line: &str) -> Result<pb::PublishRequest, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let key = |k: &str| k.replace('_', "").to_ascii_lowercase();
    if !object.keys().any(|k| key(k) == "participationjson") {
        return Ok(pb::PublishRequest {
            participation_json: line.trim_end_matches('\r').to_owned(),
            ..Default::default()
        });
    }
    let string = |k: &str, v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{k}: not a string"))
    };
    let mut request = pb::PublishRequest::default();
    for (k, v) in object {
        match key(k).as_str() {
            "participationjson" => request.participation_json = string(k, v)?,
            "account" => request.account = string(k, v)?,
            "masterformid" => request.master_form_id = string(k, v)?,
            "requestid" => request.request_id = string(k, v)?,
            "identified" => {
                request.identified = Some(v.as_bool().ok_or(format!("{k}: not a boolean"))?);
            }
            "onlyintegrations" => {
                request.only_integrations = v
                    .as_array()
                    .ok_or(format!("{k}: not an array"))?
                    .iter()
                    .map(|i| string(k, i))
                    .collect::<Result<_, _>>()?;
            }
            "tracecontext" => {
                let t = v.as_object().ok_or(format!("{k}: not an object"))?;
                let field = |name: &str| {
                    t.get(name)
                        .map(|v| string(name, v))
                        .transpose()
                        .map(Option::unwrap_or_default)
                };
                request.trace_context = Some(pb::TraceContext {
                    traceparent: field("traceparent")?,
                    tracestate: field("tracestate")?,
                });
            }
            _ => return Err(format!("unknown PublishRequest field {k:?}")),
        }
    }
    Ok(request)
}

/// A request as one line of protobuf JSON, as [`parse_line`] reads it.
fn request_json(r: &pb::PublishRequest) -> String {
    let mut o = Map::new();
    o.insert("account".into(), json!(r.account));
    o.insert("participationJson".into(), json!(r.participation_json));
    if !r.master_form_id.is_empty() {
        o.insert("masterFormId".into(), json!(r.master_form_id));
    }
    if let Some(identified) = r.identified {
        o.insert("identified".into(), json!(identified));
    }
    if !r.only_integrations.is_empty() {
        o.insert("onlyIntegrations".into(), json!(r.only_integrations));
    }
    if !r.request_id.is_empty() {
        o.insert("requestId".into(), json!(r.request_id));
    }
    if let Some(t) = &r.trace_context {
        o.insert(
            "traceContext".into(),
            json!({"traceparent": t.traceparent, "tracestate": t.tracestate}),
        );
    }
    Value::Object(o).to_string()
}

/// The lines listing one problem.
fn describe(line: u64, problem: &Problem) -> Vec<String> {
    let receipt = match problem {
        Problem::Unreadable(why) => return vec![format!("line {line}: NOT PUBLISHED: {why}")],
        Problem::Receipt(r) => r,
    };
    let id = receipt.participation_id();
    let who = if id.is_empty() {
        format!("line {line}")
    } else {
        format!("line {line}: participation {id}")
    };
    match &receipt.outcome {
        Err(gave_up) => vec![format!("{who}: GAVE UP: {gave_up}")],
        Ok(r) if !r.error.is_empty() => vec![format!("{who}: REJECTED: {}", r.error)],
        Ok(_) => receipt
            .failed_deliveries()
            .map(|d| {
                let status = match d.last_status_code {
                    0 => "no answer".to_owned(),
                    s => format!("last status {s}"),
                };
                format!(
                    "{who}: {}: FAILED after {} attempt(s), {status}: {}",
                    d.integration, d.attempts, d.last_error
                )
            })
            .collect(),
    }
}

fn summary(report: &Report, unreadable: usize, stats: &Stats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    format!(
        "publish: {} participations in {:.1}s ({:.0}/s): {} done, {} failed, {} rejected, {} given up, \
         {} unreadable line(s); deliveries: {} delivered, {} queued, {} failed, {} skipped; {} sent again \
         after a stream failure ({} stream failures)",
        report.receipts,
        secs,
        report.receipts as f64 / secs,
        report.done,
        report.failed,
        report.rejected,
        report.gave_up,
        unreadable,
        report.delivered_deliveries,
        report.queued_deliveries,
        report.failed_deliveries,
        report.skipped_deliveries,
        report.resent,
        stats.stream_failures,
    )
}

/// The progress line on standard error (a terminal only).
struct Progress {
    enabled: bool,
    drawn: bool,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            drawn: false,
        }
    }

    fn draw(&mut self, report: &Report, problems: usize, stats: &Stats, started: Instant) {
        if !self.enabled {
            return;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "{} acknowledged ({:.0}/s) · {} done · {} problem(s) · {} in flight · {} queued · {} resent · {} stream(s)",
            report.receipts,
            report.receipts as f64 / secs,
            report.done,
            problems,
            stats.in_flight,
            stats.queued,
            stats.resent,
            stats.open_streams,
        );
        eprint!("\r\x1b[2K{line}");
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_line_is_sent_as_is() {
        let line = r#"{"id": "p1",  "state":"COMPLETED", "campaign": {"id": 7}}"#;
        let r = parse_line(line).unwrap();
        assert_eq!(r.participation_json, line);
        assert!(r.account.is_empty());
    }

    #[test]
    fn a_request_line_round_trips() {
        let r = pb::PublishRequest {
            account: "accounts/42".into(),
            participation_json: r#"{"id":"p1"}"#.into(),
            master_form_id: "77".into(),
            identified: Some(false),
            only_integrations: vec!["accounts/42/integrations/crm".into()],
            request_id: "r1".into(),
            trace_context: Some(pb::TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: String::new(),
            }),
        };
        assert_eq!(parse_line(&request_json(&r)).unwrap(), r);
        let snake = r#"{"participation_json": "{}", "only_integrations": ["a"]}"#;
        assert_eq!(parse_line(snake).unwrap().only_integrations, ["a"]);
    }

    #[test]
    fn bad_lines_say_why() {
        assert!(parse_line("nope").unwrap_err().starts_with("not JSON"));
        assert_eq!(parse_line("[1]").unwrap_err(), "not a JSON object");
        let e = parse_line(r#"{"participationJson": "{}", "colour": "red"}"#).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = parse_line(r#"{"participationJson": 3}"#).unwrap_err();
        assert!(e.contains("not a string"), "{e}");
    }
}
