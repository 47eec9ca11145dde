//! The admin listener: `/healthz` (the process is up) and `/readyz` (it is accepting traffic).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::proxy::body::{ProxyBody, full};

#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

pub async fn handle(health: Arc<Health>, request: Request<Incoming>) -> Response<ProxyBody> {
    let (status, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, r#"{"status":"ok"}"#),
        "/readyz" if health.ready.load(Ordering::SeqCst) => (StatusCode::OK, r#"{"status":"ready"}"#),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready"}"#),
        _ => (StatusCode::NOT_FOUND, r#"{"error":{"code":"route_not_found","message":"no route for this path"}}"#),
    };
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}
