//! The admin listener: `/healthz` (the process is up), `/readyz` (it is accepting traffic and can write
//! its audit trail) and `/metrics` (Prometheus, OpenMetrics text); and the admin API under `/admin/v1/`
//! ([`api`]), when it is configured.

pub mod api;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::proxy::body::{ProxyBody, full};
use crate::store::health::StoreHealth;
use crate::telemetry::audit::AuditHealth;
use crate::telemetry::metrics::{self, Metrics};

pub struct Health {
    ready: AtomicBool,
    audit: Arc<AuditHealth>,
    /// A shared store's reachability, once one is configured.
    store: std::sync::OnceLock<Arc<StoreHealth>>,
}

impl Health {
    /// Not ready until [`Health::set_ready`]; never ready while `audit` reports a failing sink.
    pub fn new(audit: Arc<AuditHealth>) -> Self {
        Self { ready: AtomicBool::new(false), audit, store: std::sync::OnceLock::new() }
    }

    /// Reports a shared store's state in the `/readyz` body (`shared`: the store is PostgreSQL; the
    /// embedded one is always there).
    pub fn set_store(&self, store: Arc<StoreHealth>, shared: bool) {
        if shared {
            let _ = self.store.set(store);
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The `/readyz` answer. A failing audit sink makes requests wait (audit lines are never dropped), so
    /// traffic is better sent elsewhere until it recovers. An unreachable shared store does not: requests
    /// are served from the last snapshot (only admin writes fail), so the replica stays ready and says so.
    fn readiness(&self) -> (StatusCode, &'static str) {
        if !self.ready.load(Ordering::SeqCst) {
            (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready"}"#)
        } else if !self.audit.is_healthy() {
            (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready","reason":"audit sink failing"}"#)
        } else {
            match self.store.get().map(|store| store.is_up()) {
                None => (StatusCode::OK, r#"{"status":"ready"}"#),
                Some(true) => (StatusCode::OK, r#"{"status":"ready","store":"ok"}"#),
                Some(false) => (
                    StatusCode::OK,
                    r#"{"status":"ready","store":"unavailable","reason":"serving the last snapshot of the store; admin writes fail until it is back"}"#,
                ),
            }
        }
    }
}

pub async fn handle(
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    api: Option<Arc<api::AdminApi>>,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    if request.uri().path().starts_with(api::PREFIX) {
        return match api {
            Some(api) => api.handle(request).await,
            None => api::off(),
        };
    }
    if request.uri().path() == "/metrics" {
        let mut response = Response::new(full(Bytes::from(metrics.encode())));
        response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(metrics::CONTENT_TYPE));
        return response;
    }
    let (status, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, r#"{"status":"ok"}"#),
        "/readyz" => health.readiness(),
        _ => (StatusCode::NOT_FOUND, r#"{"error":{"code":"route_not_found","message":"no route for this path"}}"#),
    };
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::audit::AuditHealth;

    #[test]
    fn readiness_follows_startup_shutdown_and_the_audit_sink() {
        // The sink's state is driven by the audit writer; its own tests cover the transitions. Here: a sink
        // reported failing makes `/readyz` 503 with the reason, and only then.
        let audit = Arc::new(AuditHealth::default());
        let health = Health::new(audit.clone());
        assert_eq!(health.readiness(), (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready"}"#));
        health.set_ready(true);
        assert_eq!(health.readiness(), (StatusCode::OK, r#"{"status":"ready"}"#));
        audit.failed();
        assert_eq!(
            health.readiness(),
            (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready","reason":"audit sink failing"}"#)
        );
        audit.succeeded();
        assert_eq!(health.readiness(), (StatusCode::OK, r#"{"status":"ready"}"#));
        // A shared store that is down degrades the body, never the status.
        let store = Arc::new(StoreHealth::default());
        health.set_store(store.clone(), true);
        assert_eq!(health.readiness(), (StatusCode::OK, r#"{"status":"ready","store":"ok"}"#));
        store.set(false);
        let (status, body) = health.readiness();
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(r#""store":"unavailable""#), "{body}");
    }
}
