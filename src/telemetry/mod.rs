//! Operational logs (tracing, to stderr), the audit trail ([`audit`]) and the Prometheus metrics ([`metrics`]).

pub mod audit;
pub mod metrics;
pub mod trace;
pub mod usage;

use crate::config::runtime::LogFormat;

/// Logs go to stderr so stdout stays free for the audit trail; `RUST_LOG` filters (default `info`).
/// A closed stderr loses log lines but never stops the proxy (tracing's own error report would panic).
/// JSON lines carry the fields of the spans they are in: a request's lines carry its `request_id`
/// and `trace_id` (see `Proxy::handle`).
/// `quiet`: warnings and errors only unless `RUST_LOG` says otherwise (the demo, whose stdout is the story).
pub fn init_logging(format: LogFormat, quiet: bool) {
    let default = if quiet { "warn" } else { "info,rmcp=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
}
