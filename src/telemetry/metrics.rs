//! Prometheus metrics, served as OpenMetrics text at `/metrics` on the admin listener.
//!
//! Recording is cheap: label sets are `&'static str`, integers and `Arc<str>` upstream names (a reference
//! count bump), counters are atomics, and no lock is held across an await. No series carries a user or a
//! key: per-user usage would make the number of series grow with the number of users.
//!
//! | series | labels |
//! | --- | --- |
//! | `mcp_proxy_requests_total` | `upstream`, `status`, `code` (`ok` or the error code) |
//! | `mcp_proxy_denials_total` | `reason` (the error code of a policy refusal) |
//! | `mcp_proxy_rate_limited_total` | `level` (`key`, `user`, `user_upstream`, `tool`) |
//! | `mcp_proxy_tool_calls_total` | `upstream`, `tool` (allowed, forwarded calls; at most [`MAX_TOOLS_PER_UPSTREAM`] names) |
//! | `mcp_proxy_upstream_latency_seconds` | `upstream` (histogram: time to the upstream's response head) |
//! | `mcp_proxy_open_streams` | (gauge: forwarded response bodies still being sent to clients) |
//! | `mcp_proxy_connections` | `listener` (`proxy`, `admin`; gauge: open client connections) |
//! | `mcp_proxy_rate_limit_backend_up` | (gauge: 1 while the rate-limit backend answers; 0 while Redis does not and `on_error` decides) |
//! | `mcp_proxy_audit_write_errors_total` | (failed audit writes, from [`AuditHealth`]) |

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::policy::mcp::Rpc;
use crate::policy::ratelimit::Level;
use crate::telemetry::audit::AuditHealth;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Distinct `tool` label values kept per upstream. Tool names come from clients, so beyond this many
/// (and for names longer than [`MAX_TOOL_NAME_BYTES`]) calls are counted under `tool="_other"`.
pub const MAX_TOOLS_PER_UPSTREAM: usize = 256;
/// MCP tool names are at most 128 characters; anything longer is counted as `_other`.
pub const MAX_TOOL_NAME_BYTES: usize = 128;
/// The `tool` label of calls beyond the cap.
pub const OTHER_TOOL: &str = "_other";

/// Upper bounds (seconds) of the upstream latency buckets: 1 ms to 30 s.
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    upstream: Arc<str>,
    status: u16,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabels {
    level: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolLabels {
    upstream: Arc<str>,
    tool: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    upstream: Arc<str>,
    result: &'static str,
}

/// One upstream's tool calls counters, by tool name.
type ToolCounters = HashMap<Box<str>, Counter>;

/// What [`Metrics::record`] needs to know about one finished request (see `Proxy::handle`).
pub struct Outcome<'a> {
    /// The routed upstream; `None` when the path matched none (labelled `upstream=""`).
    pub upstream: Option<&'a Arc<str>>,
    pub status: u16,
    /// `allow`, `deny` or `error`, as in the audit line.
    pub decision: &'static str,
    /// `ok`, or the error code.
    pub reason: &'static str,
    /// The rate-limit level that refused the request.
    pub rate_limited: Option<Level>,
    /// The request's JSON-RPC messages: the tool calls among them are counted when the request was allowed.
    pub rpc: Option<&'a Rpc>,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    denials: Family<ReasonLabels, Counter>,
    rate_limited: Family<LevelLabels, Counter>,
    tool_calls: Family<ToolLabels, Counter>,
    /// Per upstream, the counter of each tool name seen so far (at most [`MAX_TOOLS_PER_UPSTREAM`]), so
    /// that a known tool costs a read lock and two hash lookups by `&str`, without allocating.
    tools: RwLock<HashMap<Arc<str>, ToolCounters>>,
    latency: Family<UpstreamLabels, Histogram>,
    open_streams: Gauge,
    connections: Family<ListenerLabels, Gauge>,
    rate_limit_backend_up: Gauge,
    reloads: Family<ResultLabels, Counter>,
    last_reload_ok: Gauge,
    oauth_refreshes: Family<RefreshLabels, Counter>,
    /// The label of requests that matched no upstream.
    no_upstream: Arc<str>,
}

impl Metrics {
    /// `audit` is read at every scrape for `mcp_proxy_audit_write_errors_total`.
    pub fn new(audit: Arc<AuditHealth>) -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        registry.register(
            "mcp_proxy_requests",
            "Requests by upstream, HTTP status and error code (ok when allowed)",
            requests.clone(),
        );
        let denials = Family::default();
        registry.register("mcp_proxy_denials", "Requests refused by policy, by error code", denials.clone());
        let rate_limited = Family::default();
        registry.register("mcp_proxy_rate_limited", "Requests refused by a rate limit, by level", rate_limited.clone());
        let tool_calls = Family::default();
        registry.register(
            "mcp_proxy_tool_calls",
            "Allowed and forwarded MCP tool calls, by upstream and tool (_other beyond 256 tools per upstream)",
            tool_calls.clone(),
        );
        let latency = Family::<UpstreamLabels, Histogram>::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register_with_unit(
            "mcp_proxy_upstream_latency",
            "Time from sending a request upstream to receiving its response head",
            Unit::Seconds,
            latency.clone(),
        );
        let open_streams = Gauge::default();
        registry.register(
            "mcp_proxy_open_streams",
            "Forwarded responses whose body is still being sent to the client",
            open_streams.clone(),
        );
        let connections = Family::default();
        registry.register("mcp_proxy_connections", "Open client connections, by listener", connections.clone());
        // The local limiter is always up; the Redis limiter sets it from its connection state.
        let rate_limit_backend_up = Gauge::default();
        rate_limit_backend_up.set(1);
        registry.register(
            "mcp_proxy_rate_limit_backend_up",
            "1 while the rate-limit backend answers in time; 0 while Redis does not (on_error decides meanwhile)",
            rate_limit_backend_up.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "mcp_proxy_config_reloads",
            "Config reloads (SIGHUP, a changed config or referenced file, an admin write), by result",
            reloads.clone(),
        );
        let last_reload_ok = Gauge::default();
        last_reload_ok.set(1);
        registry.register(
            "mcp_proxy_config_last_reload_ok",
            "0 while the last reload failed (the config in force is the one before it; the log says why)",
            last_reload_ok.clone(),
        );
        let oauth_refreshes = Family::default();
        registry.register(
            "mcp_proxy_oauth_refreshes",
            "OAuth token refreshes this replica ran or waited on, by upstream and result (ok, refused: the user \
             must connect again, unavailable: the provider or the store failed)",
            oauth_refreshes.clone(),
        );
        registry.register_collector(Box::new(AuditErrors(audit)));
        Metrics {
            registry,
            requests,
            denials,
            rate_limited,
            tool_calls,
            tools: RwLock::default(),
            latency,
            open_streams,
            connections,
            rate_limit_backend_up,
            reloads,
            last_reload_ok,
            oauth_refreshes,
            no_upstream: Arc::from(""),
        }
    }

    /// Counts one finished request, allowed or refused.
    pub fn record(&self, outcome: &Outcome<'_>) {
        let upstream = outcome.upstream.unwrap_or(&self.no_upstream);
        let labels = RequestLabels { upstream: upstream.clone(), status: outcome.status, code: outcome.reason };
        self.requests.get_or_create(&labels).inc();
        if outcome.decision == "deny" {
            self.denials.get_or_create(&ReasonLabels { reason: outcome.reason }).inc();
        }
        if let Some(level) = outcome.rate_limited {
            self.rate_limited.get_or_create(&LevelLabels { level: level.as_str() }).inc();
        }
        if outcome.decision == "allow"
            && let Some(rpc) = outcome.rpc
        {
            for tool in rpc.tool_calls() {
                self.tool_call(upstream, tool);
            }
        }
    }

    /// Counts one forwarded call of `tool` on `upstream`.
    fn tool_call(&self, upstream: &Arc<str>, tool: &str) {
        let tool = if tool.len() > MAX_TOOL_NAME_BYTES { OTHER_TOOL } else { tool };
        {
            let tools = self.tools.read().unwrap_or_else(|e| e.into_inner());
            if let Some(known) = tools.get(&**upstream) {
                if let Some(counter) = known.get(tool) {
                    counter.inc();
                    return;
                }
                if is_full(known)
                    && let Some(other) = known.get(OTHER_TOOL)
                {
                    other.inc();
                    return;
                }
            }
        }
        // A tool not seen before on this upstream: the only path that allocates and takes the write lock.
        let mut tools = self.tools.write().unwrap_or_else(|e| e.into_inner());
        let known = tools.entry(upstream.clone()).or_default();
        // Another request may have added it meanwhile; a client naming a tool `_other` takes no place.
        let name = if known.contains_key(tool) || tool == OTHER_TOOL || !is_full(known) { tool } else { OTHER_TOOL };
        let counter = known.entry(name.into()).or_insert_with(|| {
            self.tool_calls.get_or_create_owned(&ToolLabels { upstream: upstream.clone(), tool: Arc::from(name) })
        });
        counter.inc();
    }

    /// Records the time `upstream` took to send its response head.
    pub fn observe_upstream_latency(&self, upstream: &Arc<str>, elapsed: Duration) {
        self.latency.get_or_create(&UpstreamLabels { upstream: upstream.clone() }).observe(elapsed.as_secs_f64());
    }

    /// Counts a response body as open until the returned guard is dropped.
    pub fn stream_opened(&self) -> OpenStream {
        self.open_streams.inc();
        OpenStream(self.open_streams.clone())
    }

    /// How many response bodies are open now (`mcp_proxy_open_streams`).
    pub fn open_streams(&self) -> i64 {
        self.open_streams.get()
    }

    /// The open connections gauge of `listener` (`proxy` or `admin`), for its accept loop to set.
    pub fn connections(&self, listener: &'static str) -> Gauge {
        self.connections.get_or_create_owned(&ListenerLabels { listener })
    }

    /// The `mcp_proxy_rate_limit_backend_up` gauge, for the shared limiter to set.
    pub fn rate_limit_backend_up(&self) -> Gauge {
        self.rate_limit_backend_up.clone()
    }

    /// Counts an OAuth refresh of a connection to `upstream`: `ok`, `refused` or `unavailable`.
    pub fn oauth_refreshed(&self, upstream: &Arc<str>, result: &'static str) {
        self.oauth_refreshes.get_or_create(&RefreshLabels { upstream: upstream.clone(), result }).inc();
    }

    /// Counts a config reload and whether it took.
    pub fn reloaded(&self, ok: bool) {
        self.reloads.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" } }).inc();
        self.last_reload_ok.set(i64::from(ok));
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]) of every series.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Whether an upstream has its [`MAX_TOOLS_PER_UPSTREAM`] named tools (`_other` does not take a place).
fn is_full(known: &ToolCounters) -> bool {
    known.len() - usize::from(known.contains_key(OTHER_TOOL)) >= MAX_TOOLS_PER_UPSTREAM
}

/// One open response body in `mcp_proxy_open_streams`; dropping it closes it.
#[must_use]
pub struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `mcp_proxy_audit_write_errors_total`, read from the audit writer's own count at every scrape.
#[derive(Debug)]
struct AuditErrors(Arc<AuditHealth>);

impl Collector for AuditErrors {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(self.0.write_errors());
        let metric = encoder.encode_descriptor(
            "mcp_proxy_audit_write_errors",
            "Failed audit trail writes (each failed retry counts).",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::mcp;

    fn metrics() -> (Metrics, Arc<AuditHealth>) {
        let audit = Arc::new(AuditHealth::default());
        (Metrics::new(audit.clone()), audit)
    }

    /// The value of one series in the exposition, if present.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn outcomes_land_in_their_series() {
        let (metrics, _) = metrics();
        let github: Arc<str> = Arc::from("github");
        let call =
            mcp::inspect(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}"#).unwrap();
        let allowed = Outcome {
            upstream: Some(&github),
            status: 200,
            decision: "allow",
            reason: "ok",
            rate_limited: None,
            rpc: Some(&call),
        };
        metrics.record(&allowed);
        metrics.record(&allowed);
        metrics.record(&Outcome {
            status: 429,
            decision: "deny",
            reason: "rate_limited",
            rate_limited: Some(Level::UserUpstream),
            ..allowed
        });
        metrics.record(&Outcome {
            upstream: None,
            status: 404,
            decision: "deny",
            reason: "route_not_found",
            rate_limited: None,
            rpc: None,
        });
        metrics.record(&Outcome { status: 502, decision: "error", reason: "upstream_unavailable", ..allowed });
        let text = metrics.encode();
        assert_eq!(value(&text, r#"mcp_proxy_requests_total{upstream="github",status="200",code="ok"}"#), Some(2.0));
        assert_eq!(
            value(&text, r#"mcp_proxy_requests_total{upstream="github",status="429",code="rate_limited"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"mcp_proxy_requests_total{upstream="",status="404",code="route_not_found"}"#),
            Some(1.0)
        );
        assert_eq!(value(&text, r#"mcp_proxy_denials_total{reason="rate_limited"}"#), Some(1.0));
        assert_eq!(value(&text, r#"mcp_proxy_denials_total{reason="route_not_found"}"#), Some(1.0));
        assert_eq!(
            value(&text, r#"mcp_proxy_denials_total{reason="upstream_unavailable"}"#),
            None,
            "an upstream failure is no denial"
        );
        assert_eq!(value(&text, r#"mcp_proxy_rate_limited_total{level="user_upstream"}"#), Some(1.0));
        // Only the two allowed calls: the refused and failed ones are not counted as tool calls.
        assert_eq!(value(&text, r#"mcp_proxy_tool_calls_total{upstream="github",tool="search"}"#), Some(2.0));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn tool_labels_are_capped_per_upstream() {
        let (metrics, _) = metrics();
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        for i in 0..MAX_TOOLS_PER_UPSTREAM + 10 {
            metrics.tool_call(&a, &format!("tool{i}"));
        }
        // Known names keep their own series once the cap is reached; new ones go to `_other`.
        metrics.tool_call(&a, "tool0");
        metrics.tool_call(&a, &"x".repeat(MAX_TOOL_NAME_BYTES + 1));
        // A client naming a tool `_other` joins the overflow series rather than taking a place.
        metrics.tool_call(&a, OTHER_TOOL);
        // The cap is per upstream.
        metrics.tool_call(&b, "tool999");
        let text = metrics.encode();
        let series = |upstream: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("mcp_proxy_tool_calls_total{{upstream=\"{upstream}\",")))
                .count()
        };
        assert_eq!(series("a"), MAX_TOOLS_PER_UPSTREAM + 1);
        assert_eq!(value(&text, r#"mcp_proxy_tool_calls_total{upstream="a",tool="tool0"}"#), Some(2.0));
        assert_eq!(value(&text, r#"mcp_proxy_tool_calls_total{upstream="a",tool="tool255"}"#), Some(1.0));
        assert_eq!(value(&text, r#"mcp_proxy_tool_calls_total{upstream="a",tool="tool256"}"#), None);
        assert_eq!(value(&text, r#"mcp_proxy_tool_calls_total{upstream="a",tool="_other"}"#), Some(12.0));
        assert_eq!(value(&text, r#"mcp_proxy_tool_calls_total{upstream="b",tool="tool999"}"#), Some(1.0));
    }

    #[test]
    fn open_streams_latency_and_audit_errors() {
        let (metrics, audit) = metrics();
        let github: Arc<str> = Arc::from("github");
        let one = metrics.stream_opened();
        let two = metrics.stream_opened();
        assert_eq!(value(&metrics.encode(), "mcp_proxy_open_streams"), Some(2.0));
        drop(one);
        drop(two);
        assert_eq!(value(&metrics.encode(), "mcp_proxy_open_streams"), Some(0.0));

        metrics.observe_upstream_latency(&github, Duration::from_millis(3));
        let text = metrics.encode();
        assert_eq!(
            value(&text, r#"mcp_proxy_upstream_latency_seconds_bucket{le="0.0025",upstream="github"}"#),
            Some(0.0)
        );
        assert_eq!(
            value(&text, r#"mcp_proxy_upstream_latency_seconds_bucket{le="0.005",upstream="github"}"#),
            Some(1.0)
        );
        assert_eq!(value(&text, r#"mcp_proxy_upstream_latency_seconds_count{upstream="github"}"#), Some(1.0));

        assert_eq!(value(&text, "mcp_proxy_audit_write_errors_total"), Some(0.0));
        audit.failed();
        audit.failed();
        assert_eq!(value(&metrics.encode(), "mcp_proxy_audit_write_errors_total"), Some(2.0));
    }
}
