//! Logs and traces: the global `tracing` subscriber (human-readable or JSON
//! logs on stderr, filtered by `RUST_LOG`) and, when an OTLP endpoint is
//! configured, an OpenTelemetry layer exporting spans over OTLP/gRPC.
//!
//! W3C trace context crosses process boundaries as a `traceparent` string:
//! in gRPC metadata, in the `trace` field of JSON commands and in activation
//! frames. When tracing is off nothing is exported and the helpers here
//! return at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Default filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,libp2p_swarm=warn,libp2p_kad=warn,libp2p_quic=warn,libp2p_tcp=warn,libp2p_rendezvous=warn,h2=warn,tower=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn";

/// The standard environment variable naming an OTLP endpoint.
pub const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

static TRACING_ON: AtomicBool = AtomicBool::new(false);

/// Who is exporting spans.
#[derive(Debug, Clone, Default)]
pub struct TraceSettings {
    /// OTLP/gRPC endpoint (`http://host:4317`); empty: `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// if set, else traces are off.
    pub otlp_endpoint: String,
    /// `service.name` of the spans (`llama-worker`, `llama-coordinator`).
    pub service: String,
    /// `service.instance.id` (a worker's peer id).
    pub instance: String,
}

impl TraceSettings {
    /// The endpoint in use, if traces are on.
    pub fn endpoint(&self) -> Option<String> {
        if !self.otlp_endpoint.is_empty() {
            return Some(self.otlp_endpoint.clone());
        }
        std::env::var(OTEL_ENDPOINT_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
    }
}

/// Keeps the span exporter alive; dropping it flushes and stops it.
#[must_use = "dropping the guard stops the span exporter"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still buffered.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber: logs, and spans exported over OTLP when
/// an endpoint is configured. Must run inside a Tokio runtime when traces
/// are on. A second call installs nothing.
pub fn init(format: LogFormat, traces: &TraceSettings) -> anyhow::Result<Telemetry> {
    install(format, traces.endpoint(), traces)
}

/// Installs the global subscriber with logs only (command-line tools).
pub fn init_logs(format: LogFormat) {
    let _ = install(format, None, &TraceSettings::default());
}

fn install(
    format: LogFormat,
    endpoint: Option<String>,
    traces: &TraceSettings,
) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(ansi)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_target(false)
    });
    let mut provider = None;
    let otel = match endpoint.clone() {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| anyhow::anyhow!("OTLP exporter for {endpoint}: {e}"))?;
            let mut resource = Resource::builder().with_service_name(traces.service.clone());
            if !traces.instance.is_empty() {
                resource = resource.with_attribute(KeyValue::new(
                    "service.instance.id",
                    traces.instance.clone(),
                ));
            }
            resource = resource
                .with_attribute(KeyValue::new("service.version", crate::VERSION.to_string()));
            let p = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            let tracer = p.tracer("llama-cluster");
            provider = Some(p);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        TRACING_ON.store(true, Ordering::Relaxed);
        if let Some(e) = endpoint {
            tracing::info!("[STATUS] exporting traces over OTLP to {e}");
        }
    }
    Ok(Telemetry { provider })
}

/// Whether spans are being exported by this process.
pub fn tracing_on() -> bool {
    TRACING_ON.load(Ordering::Relaxed)
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct TraceparentCarrier<'a>(&'a str);

impl Extractor for TraceparentCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The W3C `traceparent` of `span` (empty when tracing is off).
pub fn traceparent(span: &Span) -> String {
    if !tracing_on() {
        return String::new();
    }
    let cx = span.context();
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(&mut map));
    map.remove("traceparent").unwrap_or_default()
}

/// The W3C `traceparent` of the current span (empty when tracing is off).
pub fn current_traceparent() -> String {
    traceparent(&Span::current())
}

/// Makes `span` a child of the remote span named by `traceparent`. Call it
/// before the span is first entered; an empty or malformed value is ignored.
pub fn set_parent(span: &Span, traceparent: &str) {
    if !tracing_on() || traceparent.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&TraceparentCarrier(traceparent));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` part of `parent`'s trace but not sampled: neither it nor its
/// descendants (in this process or, through the propagated context, in
/// others) are exported. Used for decode steps that are not traced in detail.
pub fn set_unsampled_parent(span: &Span, parent: &Span) {
    if !tracing_on() {
        return;
    }
    let pcx = parent.context();
    let sc = pcx.span().span_context().clone();
    if !sc.is_valid() {
        return;
    }
    let unsampled = SpanContext::new(
        sc.trace_id(),
        sc.span_id(),
        TraceFlags::default(),
        true,
        sc.trace_state().clone(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(unsampled));
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the trace context in HTTP/gRPC request headers.
pub fn set_parent_from_headers(span: &Span, headers: &http::HeaderMap) {
    if !tracing_on() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderCarrier(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// A span for one inbound gRPC request (for `tonic`'s `Server::trace_fn`),
/// child of the caller's trace context when it sent one. Health checks and
/// reflection get no span.
pub fn grpc_server_span(req: &http::Request<()>) -> Span {
    let path = req.uri().path();
    if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
        return Span::none();
    }
    let span = tracing::info_span!("grpc.server", rpc.path = %path, otel.kind = "server");
    set_parent_from_headers(&span, req.headers());
    span
}

/// A `tonic` interceptor that puts the current span's trace context in the
/// request metadata.
pub fn inject_grpc(
    mut req: tonic::Request<()>,
) -> std::result::Result<tonic::Request<()>, tonic::Status> {
    let tp = current_traceparent();
    if !tp.is_empty()
        && let Ok(v) = tp.parse()
    {
        req.metadata_mut().insert("traceparent", v);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_helpers_are_inert() {
        let span = tracing::info_span!("x");
        assert_eq!(traceparent(&span), "");
        set_parent(
            &span,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        set_parent(&span, "garbage");
        let req = inject_grpc(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("traceparent").is_none());
    }

    #[test]
    fn endpoint_from_settings_first() {
        let s = TraceSettings {
            otlp_endpoint: "http://127.0.0.1:4317".into(),
            ..Default::default()
        };
        assert_eq!(s.endpoint().as_deref(), Some("http://127.0.0.1:4317"));
    }
}
