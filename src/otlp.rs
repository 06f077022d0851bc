//! OpenTelemetry export of the request spans over OTLP/HTTP (protobuf), built with the `otlp`
//! feature and switched on by `[log] otlp_endpoint`.
//!
//! The exported `request` span carries the request's W3C ids exactly: its trace id is the
//! one in the logs (the client's when it sent a valid `traceparent`), its parent is the
//! client's span, and its own span id is the parent-id graphgate sends to Graph, so the
//! client's, graphgate's and Graph's spans line up in one trace. Spans are batched and sent
//! by a background task on the tokio runtime through hyper; a request never waits for the
//! collector, and when the collector is down or slow the spans are dropped.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::tracecontext::TraceContext;

/// Whether a tracer is installed: without one, requests skip the span bookkeeping.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// How long one export may take before its batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The running export (the tracer provider with its batch processor). Keep it until exit
/// and call [`Exporter::shutdown`] to send what is still queued.
pub struct Exporter {
    provider: SdkTracerProvider,
}

/// Starts the export to `endpoint` (the collector's base URL, e.g. `http://collector:4318`;
/// spans are posted to `<endpoint>/v1/traces`) and returns the `tracing` layer to install.
/// Must be called inside the tokio runtime.
pub fn start<S>(
    endpoint: &str,
    service_name: &str,
) -> Result<(Exporter, impl tracing_subscriber::Layer<S>), String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("log.otlp_endpoint: {e}"))?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_id_generator(RequestIds)
        // A client that sent a trace it does not sample is not second-guessed.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(
            Resource::builder_empty()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("graphgate");
    ENABLED.store(true, Ordering::Relaxed);
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok((Exporter { provider }, layer))
}

impl Exporter {
    /// Sends the spans still queued (bounded by the export timeout) and stops the task.
    pub async fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        let provider = self.provider;
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        let _ = tokio::time::timeout(EXPORT_TIMEOUT + Duration::from_secs(1), flush).await;
    }
}

thread_local! {
    /// The ids the next span started on this thread takes (see [`adopt`]).
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Span ids for the request span from its [`TraceContext`], random ones for any other.
#[derive(Debug)]
struct RequestIds;

impl IdGenerator for RequestIds {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_IDS.with(Cell::get) {
            Some((trace, _)) => trace,
            None => RandomIdGenerator::default().new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match NEXT_IDS.with(Cell::get) {
            Some((_, span)) => span,
            None => RandomIdGenerator::default().new_span_id(),
        }
    }
}

/// Gives the request's `span` (just created, not yet entered) the request's W3C ids: the
/// client's span as its parent when the trace came from the client, graphgate's trace and
/// span ids as its own.
pub fn adopt(span: &tracing::Span, trace: &TraceContext) {
    if !ENABLED.load(Ordering::Relaxed) || span.is_disabled() {
        return;
    }
    let (Ok(trace_id), Ok(span_id)) = (
        TraceId::from_hex(trace.trace_id()),
        SpanId::from_hex(trace.span_id()),
    ) else {
        return;
    };
    if let Some(parent) = trace.parent_id().and_then(|p| SpanId::from_hex(p).ok()) {
        let flags = TraceFlags::new(trace.flags());
        let remote = SpanContext::new(trace_id, parent, flags, true, TraceState::default());
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    // The span starts here, on this thread, taking its ids from the generator.
    NEXT_IDS.with(|n| n.set(Some((trace_id, span_id))));
    let _ = span.context();
    NEXT_IDS.with(|n| n.set(None));
}
