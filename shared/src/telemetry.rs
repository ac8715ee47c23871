//! Logs and traces, set up the same way by every binary.
//!
//! Logs: `RUST_LOG` filters (the binary's default otherwise), and they go to stderr.
//!
//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g. `http://otel-collector:4318`), the
//! spans llmq makes for tasks and provider calls (target [`TARGET`]) are exported over
//! OTLP/HTTP in protobuf, in batches, to `<endpoint>/v1/traces`; the other `OTEL_*` variables
//! the OpenTelemetry SDK reads apply (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`,
//! ...). Unset, no exporter is built and the spans are disabled at their call sites (they
//! are at `TRACE` level, under the default log filters), so tracing costs nothing.
//!
//! W3C trace context: a producer may put a `traceparent` in a task's envelope; the worker's
//! spans for that task join the producer's trace ([`join_trace`]), and `llmq submit` puts
//! its own ([`traceparent`]).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The target of the spans that are exported; give it to `tracing::trace_span!`.
pub const TARGET: &str = "llmq_trace";

/// The variable that turns export on.
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Flushes the spans not yet exported when dropped; keep it until the binary exits.
#[must_use = "dropping the guard stops exporting traces"]
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("could not export the last traces: {e}");
        }
    }
}

/// Installs logging, and trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; `default`
/// is the log filter when `RUST_LOG` is unset, `service` names the binary in the traces.
pub fn init(default: &str, service: &'static str) -> Guard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let (traces, provider) = match exporter(service) {
        Ok(Some(provider)) => {
            let tracer = provider.tracer(service);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(Targets::new().with_target(TARGET, LevelFilter::TRACE));
            (Some(layer), Some(provider))
        }
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("{service}: traces are off: {e}");
            (None, None)
        }
    };
    let _ = Registry::default().with(logs).with(traces).try_init();
    Guard(provider)
}

/// The tracer provider exporting to `OTEL_EXPORTER_OTLP_ENDPOINT`, if it is set.
fn exporter(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    let endpoint = std::env::var(ENDPOINT).unwrap_or_default();
    if endpoint.trim().is_empty() {
        return Ok(None);
    }
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(format!(
            "{ENDPOINT} is `{}`, but llmq exports OTLP over HTTP; point it at an OpenTelemetry Collector, e.g. http://otel-collector:4318 or https://otel.example.com:4318",
            crate::text::without_credentials(&endpoint)
        ));
    }
    crate::tls::install_crypto_provider();
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| {
            format!(
                "cannot build the OTLP exporter for {ENDPOINT}={}: {e}",
                crate::text::without_credentials(&endpoint)
            )
        })?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build(),
    ))
}

/// Makes `span` a child of the trace `traceparent` names (W3C trace context). A malformed
/// value is ignored, as the W3C recommendation says: the span starts a trace of its own.
pub fn join_trace(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The W3C `traceparent` of `span`, when traces are exported.
#[must_use]
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}
