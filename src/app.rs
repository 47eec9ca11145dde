//! Wires the listeners, the proxy state and the audit writer together, and shuts them down in order.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::admin::api::AdminApi;
use crate::admin::{self, Health};
use crate::config::runtime::RateLimiterBackend;
use crate::config::runtime::StoreBackend;
use crate::config::{Config, ConfigError};
use crate::heap;
use crate::policy::ratelimit::{LimitClock, RateLimits};
use crate::policy::ratelimit_redis::RedisLimiter;
use crate::proxy::Proxy;
use crate::server::listener::{self, ListenerSettings};
use crate::store::follow::{CurrentSide, follow};
use crate::store::health::StoreHealth;
use crate::store::live::FileSide;
use crate::store::{Store, postgres};
use crate::telemetry::audit::{AuditHealth, AuditSink, AuditWriter};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::usage::UsageCounters;

/// How often the open connections are looked at for a burst that ended ([`heap::Trimmer`]).
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often idle users' rate-limiter state is dropped.
const LIMITER_EVICTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How often usage counters are written to the store.
const USAGE_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes the usage counted so far to the store; on failure the counts go back, to be written next time.
async fn flush_usage(usage: &Arc<UsageCounters>, store: &Arc<dyn Store>) {
    let flush = usage.take();
    if flush.usage.is_empty() && flush.keys.is_empty() {
        return;
    }
    let (usage, store) = (usage.clone(), store.clone());
    let _ = tokio::task::spawn_blocking(move || {
        let written = store.add_usage(&flush.usage).and_then(|()| store.touch_keys(&flush.keys));
        if let Err(e) = written {
            tracing::warn!(error = %e, "usage not written to the store; kept for the next flush");
            usage.restore(flush);
        }
    })
    .await;
}

pub struct App {
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    health: Arc<Health>,
    /// Each listener stops when its guard is dropped (also when the app is dropped without a shutdown).
    /// The proxy listener drains first, while the admin listener still answers probes (`/readyz` 503).
    proxy_listener: (JoinHandle<()>, DropGuard),
    admin_listener: Option<(JoinHandle<()>, DropGuard)>,
    evictor: JoinHandle<()>,
    trimmer: JoinHandle<()>,
    /// With a shared store: the task that listens for its changes and the one that applies them.
    follower: Option<(JoinHandle<()>, JoinHandle<()>)>,
    /// Flushes usage to the store, when there is one.
    usage: Option<(JoinHandle<()>, Arc<dyn Store>)>,
    limits: Arc<RateLimits>,
    proxy: Arc<Proxy>,
    audit_health: Arc<AuditHealth>,
    audit_writer: AuditWriter,
    reload_lock: Arc<tokio::sync::Mutex<()>>,
    /// The proxy listener's TLS config, swapped on reload (new handshakes take the new certificate).
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    metrics: Arc<Metrics>,
}

impl App {
    /// Binds every listener (so a bad address fails here, not later) and starts serving.
    pub async fn start(config: Config) -> io::Result<App> {
        Self::start_with_clock(config, LimitClock::default()).await
    }

    /// As [`App::start`], with the clock the rate limiters read (tests pass a fake one).
    pub async fn start_with_clock(config: Config, clock: LimitClock) -> io::Result<App> {
        Self::start_with(config, clock, None).await
    }

    /// As [`App::start`]; with a shared store, `listening` is the change listener that was connected
    /// before `config` read its snapshot (see [`postgres::watch`]): without one, the app connects its
    /// own and reloads every user once it listens.
    pub async fn start_with(
        config: Config,
        clock: LimitClock,
        listening: Option<postgres::Listening>,
    ) -> io::Result<App> {
        let config = Arc::new(config);
        let reload_lock = Arc::new(tokio::sync::Mutex::new(()));
        let backlog = config.server.listen_backlog;
        let proxy_listener = listener::bind(config.server.listen, backlog)?;
        let admin_listener = config.admin_listen.map(|addr| listener::bind(addr, backlog)).transpose()?;
        let (audit, audit_health, audit_writer) = AuditSink::open(&config.audit_path).await?;
        let proxy_addr = proxy_listener.local_addr()?;
        let admin_addr = admin_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        // `/readyz` also answers 503 while the audit sink cannot be written.
        let health = Arc::new(Health::new(audit_health.clone()));
        let server = &config.server;

        let limits = Arc::new(RateLimits::with_clock(clock));
        // `mcp_proxy_audit_write_errors_total` reads the audit writer's own count at each scrape.
        let metrics = Arc::new(Metrics::new(audit_health.clone()));
        // With Redis, limits are shared by every replica; the local limiter stays as its fallback.
        let shared_limits = match &config.rate_limiter {
            RateLimiterBackend::Local => None,
            RateLimiterBackend::Redis(settings) => Some(
                RedisLimiter::start(settings, limits.clone(), metrics.rate_limit_backend_up())
                    .await
                    .map_err(io::Error::other)?,
            ),
        };
        let proxy =
            Arc::new(Proxy::new(config.clone(), limits.clone(), shared_limits, audit, metrics.clone(), proxy_addr));
        // Idle users' limiter state is dropped on a schedule so memory stays bounded.
        let evictor_limits = limits.clone();
        let evictor = tokio::spawn(async move {
            let mut every = tokio::time::interval(LIMITER_EVICTION_INTERVAL);
            every.tick().await;
            loop {
                every.tick().await;
                // O(users) and it locks map shards briefly: off the request threads.
                let limits = evictor_limits.clone();
                let _ = tokio::task::spawn_blocking(move || limits.evict()).await;
            }
        });
        // Memory that a burst (connections or streams that closed) freed goes back to the system shortly
        // after. Streams count too: 8,000 of them may share a few HTTP/2 connections. Connections count
        // once they speak (`ListenerSettings::speaking`).
        let speaking = Gauge::default();
        let (speaking_now, trim_metrics) = (speaking.clone(), metrics.clone());
        let trimmer = tokio::spawn(async move {
            let mut every = tokio::time::interval(TRIM_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut trimmer = heap::Trimmer::default();
            loop {
                every.tick().await;
                let open = speaking_now.get() + trim_metrics.open_streams();
                if trimmer.burst_ended(open, std::time::Instant::now()) {
                    let _ = tokio::task::spawn_blocking(heap::release_freed).await;
                }
            }
        });
        // One store handle, shared by the usage flusher and the admin API (SqliteStore serializes its
        // connection behind a mutex). Usage is written on a schedule, never per request.
        let usage_store = match &config.store {
            Some(st) => Some(st.open().map_err(|e| io::Error::other(e.to_string()))?),
            None => None,
        };
        // Upstream OAuth keeps connections in the store and signs links with a key derived from its
        // master key (config validation saw to both being there).
        if let (Some(store), Some(_)) = (&usage_store, &config.oauth) {
            let broker = crate::oauth::Broker::new(store.clone()).map_err(|e| io::Error::other(e.to_string()))?;
            proxy.attach_oauth(Arc::new(broker.counting_in(metrics.clone())));
        }
        // A shared store tells this replica about every write: changes are applied as they arrive, and
        // `/readyz` and the admin API say when it cannot be reached.
        let store_health = Arc::new(StoreHealth::default());
        let follower = match (&usage_store, config.store.as_ref().map(|st| &st.backend)) {
            (Some(store), Some(StoreBackend::Postgres { config: pg })) => {
                let (changes, received) = tokio::sync::mpsc::unbounded_channel();
                let watcher = tokio::spawn(postgres::watch(pg.clone(), changes, store_health.clone(), listening));
                let current = proxy.clone();
                let side: CurrentSide = Arc::new(move || current.config() as Arc<dyn FileSide + Send + Sync>);
                let applier = tokio::spawn(follow(received, store.clone(), config.live.clone(), side));
                Some((watcher, applier))
            }
            _ => None,
        };
        health.set_store(store_health.clone(), follower.is_some());
        let flusher = usage_store.clone().map(|store| {
            let usage = proxy.usage().clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(USAGE_FLUSH_INTERVAL);
                every.tick().await;
                loop {
                    every.tick().await;
                    flush_usage(&usage, &store).await;
                }
            })
        });
        let tls = server.tls.clone().map(|tls| Arc::new(ArcSwap::new(tls)));
        let settings = ListenerSettings {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            max_header_bytes: server.max_header_bytes,
            tls: tls.clone(),
            shutdown_grace: server.shutdown_grace,
            max_connections: server.max_connections,
            max_connections_per_ip: server.max_connections_per_ip,
            connections: metrics.connections("proxy"),
            speaking,
        };
        let serving = proxy.clone();
        let handler = move |request, peer| {
            let proxy = serving.clone();
            async move { proxy.handle(request, peer).await }
        };
        let shutdown = CancellationToken::new();
        let proxy_listener =
            (tokio::spawn(listener::serve(proxy_listener, settings, handler, shutdown.clone())), shutdown.drop_guard());

        let admin_listener = admin_listener.map(|admin_listener| {
            // Probes and scrapes come from one or two addresses: no per-address cap here.
            let settings = ListenerSettings {
                header_read_timeout: server.header_read_timeout,
                idle_timeout: server.idle_timeout,
                max_header_bytes: server.max_header_bytes,
                tls: None,
                shutdown_grace: server.shutdown_grace,
                max_connections: 256,
                max_connections_per_ip: 0,
                connections: metrics.connections("admin"),
                speaking: Gauge::default(),
            };
            let api = usage_store.as_ref().map(|store| Arc::new(AdminApi::new(store.clone(), proxy.clone())));
            let (health, metrics) = (health.clone(), metrics.clone());
            let handler = move |request, _peer| admin::handle(health.clone(), metrics.clone(), api.clone(), request);
            let shutdown = CancellationToken::new();
            (tokio::spawn(listener::serve(admin_listener, settings, handler, shutdown.clone())), shutdown.drop_guard())
        });
        health.set_ready(true);
        tracing::info!(%proxy_addr, ?admin_addr, tls = server.tls.is_some(), upstreams = config.upstreams.len(), "listening");
        Ok(App {
            proxy_addr,
            admin_addr,
            health,
            proxy_listener,
            admin_listener,
            evictor,
            trimmer,
            follower,
            usage: flusher.zip(usage_store),
            limits,
            proxy,
            audit_health,
            audit_writer,
            reload_lock,
            tls,
            metrics,
        })
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.proxy.config()
    }

    /// Applies a new config to the running proxy (see [`Config::reload_from_file`]). Listener and audit
    /// settings need a restart: they are named in the returned list and keep their old values.
    pub fn reload(&self, config: Config) -> Vec<&'static str> {
        apply(&self.proxy, self.tls.as_deref(), config)
    }

    /// Re-reads the config file at `path` (with the files it names and the store) and applies it; a
    /// config with problems is refused and the running one stays, said in the log and in
    /// `mcp_proxy_config_last_reload_ok`. `cause` says in the log what asked for it. True when it took.
    pub async fn reload_from_file(&self, path: &Path, cause: &'static str) -> bool {
        // Not while another reload is being built (an older snapshot must not replace a newer one).
        let serialized = self.reload_lock.clone().lock_owned().await;
        tracing::info!(cause, "reloading the config");
        let (path, running) = (path.to_owned(), self.config());
        // Loading reads files and the store, and applying builds the limiter plan and lets the old config
        // go: both on the blocking pool, not on the threads that serve requests. Apart, so that a load
        // that hangs (a store that does not answer) holds no part of the proxy: a shutdown drops it all.
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path, Some(&running))).await;
        let applied = match loaded {
            Ok(Ok(config)) => {
                let (proxy, tls) = (self.proxy.clone(), self.tls.clone());
                let users = config.directory.user_count() + config.live.user_count();
                tokio::task::spawn_blocking(move || {
                    // Held until the config is in, even when the caller stops waiting for it.
                    let _serialized = serialized;
                    Ok::<_, ConfigError>((users, apply(&proxy, tls.as_deref(), config)))
                })
                .await
            }
            Ok(Err(e)) => Ok(Err(e)),
            Err(e) => Err(e),
        };
        let ok = match applied {
            Ok(Ok((users, restart))) => {
                tracing::info!(users, cause, "config reloaded");
                if !restart.is_empty() {
                    tracing::warn!(settings = ?restart, "changed settings take effect only after a restart");
                }
                true
            }
            Ok(Err(e)) => {
                tracing::error!(problems = %e, cause, "config not reloaded; the running config stays in force");
                false
            }
            Err(_) => {
                tracing::error!(
                    cause,
                    "config not reloaded: loading or applying it panicked; the running config stays in force"
                );
                false
            }
        };
        self.metrics.reloaded(ok);
        ok
    }

    /// Held while a new config is built from the file and the store and swapped in (SIGHUP), so a
    /// rebuild never replaces a newer one with an older snapshot.
    pub fn reload_lock(&self) -> &Arc<tokio::sync::Mutex<()>> {
        &self.reload_lock
    }

    /// Request-body bytes the proxy holds in memory right now (tests watch the body budget with it).
    pub fn buffered_body_bytes(&self) -> u64 {
        self.proxy.buffered_body_bytes()
    }

    /// The rate limiters' state (tests and benchmarks inspect and evict it).
    pub fn rate_limits(&self) -> &Arc<RateLimits> {
        &self.limits
    }

    /// Whether the audit sink can be written, and how many writes failed.
    pub fn audit_health(&self) -> &Arc<AuditHealth> {
        &self.audit_health
    }

    /// Turns `/readyz` to 503, stops accepting proxy connections, ends GET event streams and lets in-flight
    /// requests finish within `shutdown_grace`; only then closes the admin listener (so probes see 503,
    /// not a refused connection, during the drain) and writes out the audit trail. A sink that still fails
    /// gets another `shutdown_grace`; then the lines it could not take are logged as lost and the app
    /// stops anyway.
    pub async fn shutdown(self) {
        let grace = self.proxy.config().server.shutdown_grace;
        let usage = self.proxy.usage().clone();
        drop(self.proxy);
        self.health.set_ready(false);
        let (proxy_listener, stop) = self.proxy_listener;
        drop(stop);
        let _ = proxy_listener.await;
        if let Some((admin_listener, stop)) = self.admin_listener {
            drop(stop);
            let _ = admin_listener.await;
        }
        self.evictor.abort();
        self.trimmer.abort();
        if let Some((watcher, applier)) = self.follower {
            watcher.abort();
            applier.abort();
        }
        // The last requests' usage is written before the process goes.
        if let Some((flusher, store)) = self.usage {
            flusher.abort();
            flush_usage(&usage, &store).await;
        }
        // The listeners held the last references to the audit sink: the writer now drains and ends.
        self.audit_writer.finish(grace).await;
    }
}

/// Swaps `config` in, then its certificate (for new handshakes: last, so a config that fails to go in
/// leaves the running certificate too); returns the changed settings that need a restart, which keep
/// their old values.
fn apply(proxy: &Proxy, tls: Option<&ArcSwap<rustls::ServerConfig>>, config: Config) -> Vec<&'static str> {
    let restart = proxy.config().needs_restart(&config);
    let certificate = config.server.tls.clone();
    proxy.reload(Arc::new(config));
    if let (Some(running), Some(next)) = (tls, certificate) {
        running.store(next);
    }
    restart
}
