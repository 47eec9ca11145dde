//! Operational logs (tracing, to stderr), the audit trail ([`audit`]) and the Prometheus metrics ([`metrics`]).

pub mod audit;
pub mod metrics;
pub mod usage;

/// Logs go to stderr so stdout stays free for the audit trail; `RUST_LOG` filters (default `info`).
/// A closed stderr loses log lines but never stops the proxy (tracing's own error report would panic).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rmcp=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
        .log_internal_errors(false)
        .try_init();
}
