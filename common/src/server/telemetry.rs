//! Telemetry set-up shared by the binaries: `tracing` logs to stderr (human-readable or JSON,
//! filtered by `RUST_LOG`, default `info`) and OpenTelemetry traces, exported over OTLP/gRPC
//! when the standard `OTEL_*` variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SDK_DISABLED=true`
//! or `OTEL_TRACES_EXPORTER=none` turn it off). Spans get W3C trace ids either way, so the
//! `traceparent` sent to receivers is always valid; without an exporter they are just not
//! sent anywhere. Also the W3C Trace Context helpers: a context from a `traceparent`, and the
//! `traceparent` of a span.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}; use text or json")),
        }
    }
}

/// Why telemetry could not be set up.
pub type InitError = Box<dyn std::error::Error + Send + Sync>;

/// What [`init`] sets up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `service.name` (unless `OTEL_SERVICE_NAME` says otherwise), e.g. `pushwire-worker`.
    pub service_name: &'static str,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint to export spans to; none: spans are not exported.
    pub otlp_endpoint: Option<String>,
}

impl Settings {
    /// The settings the standard `OTEL_*` variables describe.
    pub fn from_env(service_name: &'static str, log_format: LogFormat) -> Result<Self, InitError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let otlp_endpoint = if export_configured(var) {
            if let Some(p) = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
                && p != "grpc"
            {
                return Err(format!("OTLP protocol {p:?}: only grpc is supported").into());
            }
            Some(
                var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                    .unwrap_or_else(|| "http://localhost:4317".to_owned()),
            )
        } else {
            None
        };
        Ok(Self {
            service_name,
            log_format,
            otlp_endpoint,
        })
    }
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes the spans not exported yet.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports the spans ended so far.
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }

    /// Flushes and stops the exporter (bounded: the exporter's own timeout).
    pub async fn shutdown(self) {
        // The batch processor's shutdown blocks its caller until the last export is done;
        // the export itself runs on this runtime, so wait off it.
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}

/// Installs logging and tracing as the global subscriber. Call once, from within the Tokio
/// runtime (the exporter's connection lives on it). Errors if a subscriber is installed
/// already or the exporter cannot be built. An exporter whose endpoint is down costs nothing
/// but its failed exports (spans are dropped, deliveries are unaffected).
pub fn init(settings: Settings) -> Result<Telemetry, InitError> {
    let mut provider = SdkTracerProvider::builder().with_resource(resource(settings.service_name));
    if let Some(endpoint) = &settings.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()?;
        let exporter = OnRuntime {
            inner: std::sync::Arc::new(exporter),
            runtime: tokio::runtime::Handle::try_current()?,
        };
        provider = provider.with_span_processor(BatchSpanProcessor::builder(exporter).build());
    }
    let provider = provider.build();
    let tracer = provider.tracer("pushwire");

    // Colours only on a terminal: escape codes in files and collectors are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match settings.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // Spans are traced at INFO and above whatever RUST_LOG says about logs. Without an exporter
    // nobody reads them, yet recording them cost 15 % of a worker's CPU and 2.7 KiB per
    // waiting participation: the OpenTelemetry layer's filter is then OFF (not an absent
    // layer: an absent `Option` layer counts as interested in everything, and the registry
    // would still build every span). The `traceparent` sent to receivers still continues the
    // publisher's trace, see the worker's `trace` module.
    let spans = if settings.otlp_endpoint.is_some() {
        LevelFilter::INFO
    } else {
        LevelFilter::OFF
    };
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        // Not OpenTelemetry attributes: the Rust module (`target`) and the time the span's
        // future spent polled or waiting (`busy_ns`, `idle_ns`).
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(spans);
    // Log lines only: the log layer formatting every span's fields (for the span context of
    // a log line) cost each delivery several allocations; log lines carry their own fields.
    let events = filter.and(filter_fn(|meta| meta.is_event()));
    Registry::default()
        .with(fmt.with_filter(events))
        .with(otel)
        .try_init()?;
    Ok(Telemetry { provider })
}

/// Whether the `OTEL_*` variables (read through `var`) ask for an OTLP exporter.
fn export_configured(var: impl Fn(&str) -> Option<String>) -> bool {
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match var("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => false,
        Some(_) => true,
        None => [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|k| var(k).is_some_and(|v| !v.is_empty())),
    }
}

/// `service.name` (unless `OTEL_SERVICE_NAME` says otherwise), `service.version`,
/// `service.instance.id`, and whatever `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource(service_name: &'static str) -> Resource {
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(service_name);
    }
    let instance: [u8; 16] = rand::random();
    builder
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", hex::encode(instance)),
        ])
        .build()
}

/// Runs the OTLP exporter's calls on the Tokio runtime: the batch processor exports from a
/// thread of its own, where tonic's connection cannot be driven.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: std::sync::Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.export(batch).await })
            .await
            .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called while building the provider, before the exporter is shared.
        if let Some(inner) = std::sync::Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The remote context of a W3C `traceparent`/`tracestate` pair; an empty context when
/// `traceparent` is missing or malformed (the span then starts a new trace).
pub fn remote_context(traceparent: &str, tracestate: &str) -> Context {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if !tracestate.is_empty() {
        carrier.insert("tracestate".to_owned(), tracestate.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` a child of the remote context of `traceparent` when it is valid.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    let cx = remote_context(traceparent, tracestate);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` naming `span`, when tracing is installed (no subscriber, no id).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// A server span for a gRPC call, named after the method (`pushwire.v1.IngestService/Publish`),
/// child of the caller's `traceparent` metadata if any; for
/// `tonic::transport::Server::trace_fn`. Health checks and reflection get none (noise). The
/// gRPC metrics layer records the status code when the call ends ([`record_grpc_status`]).
pub fn grpc_server_span<B>(req: &tonic::codegen::http::Request<B>) -> tracing::Span {
    let path = req.uri().path();
    if path.starts_with("/grpc.") {
        return tracing::Span::none();
    }
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", path));
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    set_remote_parent(&span, header("traceparent"), header("tracestate"));
    span
}

/// Records a gRPC call's status on its server span: `rpc.grpc.status_code` (an integer), and
/// the span status Error for the codes the semantic conventions count as server errors
/// (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); a client's
/// mistake (INVALID_ARGUMENT, NOT_FOUND, …) leaves the server span's status unset.
pub fn record_grpc_status(span: &tracing::Span, code: tonic::Code) {
    use tonic::Code;
    span.record("rpc.grpc.status_code", code as i64);
    if matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.record("otel.status_code", "error");
    }
}

/// Marks `span` failed: the OpenTelemetry span status Error (its `error.type` says why).
pub fn set_error(span: &tracing::Span) {
    span.record("otel.status_code", "error");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporting_follows_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(!export_configured(env(&[])));
        assert!(export_configured(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4317"
        )])));
        assert!(export_configured(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://127.0.0.1:4317"
        )])));
        assert!(export_configured(env(&[("OTEL_TRACES_EXPORTER", "otlp")])));
        assert!(!export_configured(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])));
        assert!(!export_configured(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ])));
    }

    #[test]
    fn remote_context_reads_valid_traceparents_only() {
        let cx = remote_context(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "vendor=1",
        );
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            !remote_context("00-zz-00f067aa0ba902b7-01", "")
                .span()
                .span_context()
                .is_valid()
        );
    }
}
