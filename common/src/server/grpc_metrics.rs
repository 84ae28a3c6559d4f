//! Prometheus metrics of gRPC calls, as a tower layer for both servers: calls by method and
//! status code, and call duration by method. The code is read where gRPC puts it: in the
//! response headers for a trailers-only answer (most errors), else in the trailers at the end
//! of the body; a body dropped before its trailers (the client went away) counts as
//! `CANCELLED`. Health checks and reflection are not counted.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tonic::codegen::{Service, http};

/// Labels of [`GrpcMetrics`] calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: &'static str,
}

/// Label of [`GrpcMetrics`] durations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

/// The metrics and the layer that records them; cheap to clone.
#[derive(Clone, Debug)]
pub struct GrpcMetrics {
    calls: Family<CallLabels, Counter>,
    duration: Family<MethodLabel, Histogram>,
    /// 1 while the token file the server authenticates with is in force, 0 while it is not
    /// (kept by the server stack's [`crate::auth::Authenticator`]).
    token_file_applied: Gauge,
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
            }),
            token_file_applied: Gauge::default(),
        }
    }
}

impl GrpcMetrics {
    /// The gauge of whether the token file is in force, for the authenticator to keep.
    pub fn token_file_applied(&self) -> Gauge {
        self.token_file_applied.clone()
    }

    /// Registers `grpc_calls_total`, `grpc_call_duration_seconds` and `token_file_applied` in
    /// `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "token_file_applied",
            "1 when the token file as it is now is in force (or there is none); 0 when it cannot \
             be read or is invalid and the previous tokens stay in use",
            self.token_file_applied.clone(),
        );
        registry.register(
            "grpc_calls",
            "gRPC calls by method and status code",
            self.calls.clone(),
        );
        registry.register_with_unit(
            "grpc_call_duration",
            "gRPC call duration, to the end of the response (whole stream for streams)",
            Unit::Seconds,
            self.duration.clone(),
        );
    }

    fn record(&self, method: &str, code: &'static str, started: Instant) {
        self.calls
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code,
            })
            .inc();
        self.duration
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetrics {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: self.clone(),
        }
    }
}

/// A service whose calls are counted.
#[derive(Clone, Debug)]
pub struct Metered<S> {
    inner: S,
    metrics: GrpcMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Metered<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let method = (!path.starts_with("/grpc.")).then(|| path.trim_start_matches('/').to_owned());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            let mut tally = method.map(|method| Tally {
                metrics,
                method,
                started,
                // The call's server span (`telemetry::grpc_server_span`), entered around this
                // call: it gets the status code too.
                span: tracing::Span::current(),
            });
            // Trailers-only answer: the status is in the headers and the body is empty.
            if let Some(code) = code_of(response.headers())
                && let Some(t) = tally.take()
            {
                t.finish(code);
            }
            Ok(response.map(|inner| MeteredBody {
                inner: Box::pin(inner),
                tally,
            }))
        })
    }
}

/// What is recorded once the call's status is known.
struct Tally {
    metrics: GrpcMetrics,
    method: String,
    started: Instant,
    span: tracing::Span,
}

impl Tally {
    fn finish(self, code: tonic::Code) {
        self.metrics.record(&self.method, name(code), self.started);
        super::telemetry::record_grpc_status(&self.span, code);
    }
}

/// A response body that records the call when its trailers go by (or it is dropped first).
pub struct MeteredBody<B> {
    inner: Pin<Box<B>>,
    tally: Option<Tally>,
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody").finish_non_exhaustive()
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame.trailers_ref().and_then(code_of)
            && let Some(t) = self.tally.take()
        {
            t.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(t) = self.tally.take() {
            t.finish(tonic::Code::Cancelled);
        }
    }
}

/// The status code of a `grpc-status` header, if present.
fn code_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(tonic::Code::from_bytes(value.as_bytes()))
}

fn name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
