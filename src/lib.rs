//! mcp-tenant-proxy: a multi-tenant gateway in front of single-user MCP servers.
//! See ARCHITECTURE.md for the map of modules and the request pipeline.

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod error;
pub mod heap;
pub mod json;
pub mod jwt;
pub mod oauth;
pub mod policy;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod store;
pub mod sync;
pub mod telemetry;

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are installed by this call, not on the first poll:
/// call it before the process announces that it listens, or a signal sent in between kills it outright.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
