//! Logging to stderr, and — when `[server] otlp_endpoint` is set — the same spans (every RPC,
//! every gateway call, each carrying the request id its log lines and audit records carry)
//! exported as OpenTelemetry traces over OTLP/HTTP (JSON) to `{otlp_endpoint}/v1/traces`.
//! Logging starts before the config is read; the exporter is plugged in once it is.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, reload};

use crate::server::LogFormat;

type TraceLayer = Option<Box<dyn Layer<Registry> + Send + Sync>>;

/// Where the exporter is plugged in, and the provider to flush at exit.
static TRACES: OnceLock<reload::Handle<TraceLayer, Registry>> = OnceLock::new();
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Sets up logging to stderr. `RUST_LOG` refines the level (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (traces, handle) = reload::Layer::new(TraceLayer::None);
    let _ = TRACES.set(handle);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Human => Box::new(fmt),
        LogFormat::Json => Box::new(fmt.json().flatten_event(true).with_current_span(true)),
    };
    let _ = Registry::default()
        .with(traces)
        .with(fmt)
        .with(filter)
        .try_init();
}

/// Starts exporting spans to `endpoint` (`http://HOST:PORT`). The batch processor's timing
/// follows the standard `OTEL_BSP_*` variables.
pub fn export_traces(endpoint: &str) -> Result<(), String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .map_err(|error| error.to_string())?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("valetd")
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("valetd"));
    let handle = TRACES
        .get()
        .ok_or_else(|| "logging was not set up".to_string())?;
    handle
        .reload(Some(
            Box::new(layer) as Box<dyn Layer<Registry> + Send + Sync>
        ))
        .map_err(|error| error.to_string())?;
    let _ = PROVIDER.set(provider);
    Ok(())
}

/// Exports the spans still buffered (at exit).
pub fn flush_traces() {
    if let Some(provider) = PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        tracing::warn!(%error, "the last spans could not be exported");
    }
}
