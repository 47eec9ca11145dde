//! mcp-tenant-proxy: a multi-tenant gateway in front of single-user MCP servers.
//! See ARCHITECTURE.md for the map of modules and the request pipeline.

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod error;
pub mod policy;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod store;
pub mod sync;
pub mod telemetry;

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
