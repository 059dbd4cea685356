//! Logging, tracing and trace-context propagation, the same for every
//! Tentacle process.
//!
//! - Logs go to stderr, human-readable or as JSON lines.
//! - Spans are exported over OTLP/gRPC when an endpoint is configured
//!   (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`); otherwise no
//!   exporter exists at all. `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`
//!   and `OTEL_TRACES_SAMPLER`(`_ARG`) are honoured by the SDK.
//! - W3C trace context travels in gRPC metadata (`traceparent`,
//!   `tracestate`): [`server_span`] joins incoming calls to their caller's
//!   trace and [`inject`] adds the current context to outgoing ones.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format `{other}` is not text or json")),
        }
    }
}

/// Flushes and stops span export when dropped.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("could not flush spans: {error}");
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not set up span export to the OTLP endpoint: {0}")]
pub struct TelemetryError(String);

/// The target of every span meant for traces rather than logs. Logs leave
/// it out, so with export off these spans are disabled at their call sites
/// and cost next to nothing.
pub const TRACE_TARGET: &str = "tentacle::trace";

/// Library internals whose spans are noise in a trace.
const QUIET: &str = "h2=off,hyper=off,hyper_util=off,tower=off,tonic=off,rustls=off";

/// Sets up logging and, when an endpoint is configured, span export.
/// `default_filter` applies when `RUST_LOG` is unset.
pub fn init(
    service_name: &str,
    otlp_endpoint: Option<&str>,
    format: LogFormat,
    default_filter: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    // Trace spans are for export only; logs never show them.
    let filter = || {
        let quiet_traces = format!("{TRACE_TARGET}=off")
            .parse()
            .unwrap_or_else(|_| tracing_subscriber::filter::LevelFilter::OFF.into());
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(default_filter))
            .add_directive(quiet_traces)
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let endpoint = otlp_endpoint
        .map(str::to_owned)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        // Export off: one global filter, so every disabled callsite (ours
        // and the libraries') is skipped at its call site, as if the
        // tracing code were not there.
        let logs = tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr);
        match format {
            LogFormat::Text => logs.with_ansi(ansi).init(),
            LogFormat::Json => logs.json().init(),
        }
        return Ok(TelemetryGuard::default());
    };
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("tentacle");
    // Spans of our own code only, at info and above, whatever the log level.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::new(format!("info,{TRACE_TARGET}=info,{QUIET}")));
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Adds the current span's trace context to outgoing headers.
pub fn inject(headers: &mut http::HeaderMap) {
    let current = tracing::Span::current();
    if current.is_disabled() {
        return;
    }
    let context = current.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    }
}

/// The trace context a caller sent, if any.
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// `traceparent` and `tracestate` for `span`, for processes it starts.
pub fn traceparent(span: &tracing::Span) -> Option<(String, String)> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if !span_context.is_valid() {
        return None;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    Some((parent, span_context.trace_state().header()))
}

/// Whether spans are exported (telemetry was set up with an endpoint).
pub fn tracing_on() -> bool {
    tracing::enabled!(target: TRACE_TARGET, tracing::Level::INFO)
}

/// Adds per-call server spans to `builder` when spans are exported; with
/// export off the server gets no per-call hook at all.
pub fn with_server_spans<L>(
    builder: tonic::transport::Server<L>,
    side: &'static str,
) -> tonic::transport::Server<L> {
    if tracing_on() {
        builder.trace_fn(server_span(side))
    } else {
        builder
    }
}

/// The span for one served call, continuing the caller's trace; for
/// tonic's `Server::trace_fn`. `side` prefixes its name ("agent", "hub").
pub fn server_span(
    side: &'static str,
) -> impl Fn(&http::Request<()>) -> tracing::Span + Clone + Send + Sync + 'static {
    move |request| {
        // Field values are only computed when the span is enabled.
        let path = request.uri().path();
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            "rpc",
            otel.name = format!("{side} {}", path.trim_start_matches('/')),
            otel.kind = "server",
            rpc.method = %path,
            peer.thumbprint = %request
                .extensions()
                .get::<crate::incoming::PeerInfo>()
                .map(|p| p.thumbprint.short())
                .unwrap_or_default(),
            // Filled in by handlers that know them.
            ticket = tracing::field::Empty,
            bytes = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let parent = extract(request.headers());
            if parent.span().span_context().is_valid() {
                let _ = span.set_parent(parent);
            }
        }
        span
    }
}

/// The body of a command-line program's `main`: a multi-threaded runtime,
/// telemetry for `program` (flushed when `body` ends), then `body`. Any
/// error is printed as one line, `PROGRAM: error: …`, and exits 1.
pub fn run_program<E>(
    program: &str,
    otlp_endpoint: Option<&str>,
    format: LogFormat,
    default_filter: &str,
    body: impl std::future::Future<Output = Result<std::process::ExitCode, E>>,
) -> std::process::ExitCode
where
    E: std::fmt::Display + From<TelemetryError>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{program}: error: could not start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Dropped at the end of this block, which flushes the spans.
        let _telemetry = init(program, otlp_endpoint, format, default_filter)?;
        body.await
    });
    result.unwrap_or_else(|error| {
        // `{:#}` lets an error that has causes (anyhow's) print them all.
        eprintln!("{program}: error: {error:#}");
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_export_off_trace_spans_are_disabled_but_logs_are_not() {
        let _guard = init("test", None, LogFormat::Text, "info").expect("init");
        assert!(
            !tracing_on(),
            "trace spans must cost nothing when export is off"
        );
        let span = tracing::info_span!(target: TRACE_TARGET, "probe");
        assert!(span.is_disabled());
        assert!(tracing::enabled!(tracing::Level::INFO), "info logs stay on");
    }
}
