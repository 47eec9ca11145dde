use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mcp_tenant_proxy::app::App;
use mcp_tenant_proxy::config::runtime::{LogFormat, StoreBackend};
use mcp_tenant_proxy::config::watch::FileWatch;
use mcp_tenant_proxy::config::{Config, ConfigError};
use mcp_tenant_proxy::policy::ratelimit::LimitClock;
use mcp_tenant_proxy::store::postgres;

mod cli;

/// musl's allocator is slow; the static binary of the container image gets jemalloc instead, whose
/// background thread returns freed pages after `dirty_decay_ms` (glibc builds trim, see `heap`).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start: a background thread purges (otherwise only a thread that
/// allocates does, and an idle proxy keeps a burst's pages), after 5 s rather than 10.
#[cfg(target_env = "musl")]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &u8 =
    &b"background_thread:true,max_background_threads:1,dirty_decay_ms:5000,muzzy_decay_ms:0\0"[0];

#[derive(Parser)]
#[command(version, about = "Multi-tenant gateway for single-user MCP servers")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Operational log format on stderr: text or json (else MCP_PROXY_LOG_FORMAT, else the config's
    /// [log] format, else text).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default command).
    Run {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Validate a config file and report every problem with its field path.
    CheckConfig {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Print a new random API key and the sha256 to put in the config.
    Keygen,
    /// Run a built-in single-user MCP server behind the proxy, with users alice and bob.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Where the demo writes its audit trail (default: audit.jsonl in a new directory of its own in
        /// the system's temporary directory); an existing file's chain is continued.
        #[arg(long)]
        audit_file: Option<PathBuf>,
    },
    /// Work with an audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    // Offline management of the store file: users, keys, creds, tokens, usage, store (src/cli/store.rs).
    #[command(flatten)]
    Store(cli::store::StoreCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit file and report the first line where an edit, a deletion or a
    /// reordering breaks it. Exit status: 0 intact, 1 broken, 2 unreadable.
    Verify {
        /// The audit file ("-" reads stdin).
        file: PathBuf,
        /// Accept any `prev` on the first line: the file continues a chain started elsewhere (rotated or
        /// truncated).
        #[arg(long)]
        allow_continuation: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run { config: "proxy.toml".into() });
    let from_env = std::env::var("MCP_PROXY_LOG_FORMAT").ok().filter(|v| !v.is_empty());
    let format = match cli.log_format.or(from_env) {
        Some(name) => match LogFormat::parse(&name) {
            Some(format) => format,
            None => {
                eprintln!("MCP_PROXY_LOG_FORMAT: {name:?} is not \"text\" or \"json\"");
                return ExitCode::from(2);
            }
        },
        None => match &command {
            Command::Run { config } | Command::CheckConfig { config } => LogFormat::of_file(config).unwrap_or_default(),
            _ => LogFormat::default(),
        },
    };
    mcp_tenant_proxy::telemetry::init_logging(format, matches!(command, Command::Demo { .. }));
    // On one core (a sidecar with a one-CPU limit, or a pinned process), a single-threaded runtime does
    // the same work without a worker thread handing tasks over to the thread that waits in `block_on`.
    // That thread then serves every request, so the process's own blocking work (file stats, config
    // parses and reloads, store calls, limiter sweeps, heap trims) goes to the blocking pool.
    let one_core = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let runtime = match one_core {
        true => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        false => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    }
    .expect("tokio runtime");
    match command {
        Command::Run { config } => {
            let code = runtime.block_on(run(config));
            // A reload cut short by SIGTERM may still be reading the store on a blocking thread: the
            // process does not wait for it (the running config was never replaced).
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Keygen => {
            let (key, hash) = keygen();
            println!("key:    {key}\nsha256: {hash}");
            println!("\nGive the key to its owner once; put only the sha256 in the config:\n  sha256 = \"{hash}\"");
            ExitCode::SUCCESS
        }
        Command::Audit { command: AuditCommand::Verify { file, allow_continuation } } => {
            verify_audit(&file, allow_continuation)
        }
        Command::Store(command) => cli::store::run(command),
        Command::Demo { listen, admin_listen, audit_file } => {
            let audit = match audit_file.map_or_else(demo_audit_file, Ok) {
                Ok(path) if path.to_str().is_some() => path,
                Ok(path) => {
                    eprintln!("demo: --audit-file {}: the path must be UTF-8", path.display());
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("demo: cannot make a directory for the audit trail: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(mcp_tenant_proxy::demo::run(listen, admin_listen, &audit)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A new directory of this run's own (mode 0700, so on a shared /tmp no one else reads or pre-creates
/// the trail), holding `audit.jsonl`.
fn demo_audit_file() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let tag: [u8; 6] = rand::random();
    let dir = std::env::temp_dir().join(format!("mcp-tenant-proxy-demo-{}", hex::encode(tag)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir.join("audit.jsonl"))
}

async fn run(path: PathBuf) -> ExitCode {
    let config = match Config::from_file(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {}", path.display(), indent(&e));
            return ExitCode::FAILURE;
        }
    };
    // A shared store: listen for changes before its snapshot is read, so that no change falls between
    // the two (and the snapshot is read once, not again when the listener connects).
    let listening = match config.store.as_ref().map(|s| &s.backend) {
        Some(StoreBackend::Postgres { config: pg }) => match postgres::Listening::connect(pg).await {
            Ok(listening) => Some(listening),
            Err(e) => {
                eprintln!("{}: store: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    // The config file and every file it names are watched from before the store is read: a file changed
    // during a long load is a change the first poll reports.
    let mut files = FileWatch::new(watched(&path, &config.files));
    let config = match config.with_store() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {}", path.display(), indent(&e));
            return ExitCode::FAILURE;
        }
    };
    // Signal handlers first: the default action of SIGTERM and SIGHUP is to end the process, and the
    // app announces that it listens as soon as it does.
    let shutdown = mcp_tenant_proxy::shutdown_signal();
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(e) => {
            eprintln!("cannot handle SIGHUP: {e}");
            return ExitCode::FAILURE;
        }
    };
    let app = match App::start_with(config, LimitClock::default(), listening).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::pin!(shutdown);
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ticked = tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => false,
            _ = every.tick() => true,
        };
        // Every stat and parse below goes to the blocking pool, raced with SIGTERM: a hung mount may
        // hold the watcher, never the shutdown.
        let cause = match ticked {
            false => "SIGHUP",
            true => {
                let polled = off_runtime(shutdown.as_mut(), move || {
                    let changed = files.poll();
                    (files, changed)
                });
                let Some((polled, changed)) = polled.await else { break };
                files = polled;
                if !changed {
                    continue;
                }
                "a watched file changed"
            }
        };
        // What the file names now is stamped before the reload reads it (a Secret may be updated
        // again while the reload runs). A reload may wait on the store for long; SIGTERM does not.
        let path_now = path.clone();
        let stamped = off_runtime(shutdown.as_mut(), move || {
            files.add(watched(&path_now, &Config::files_named_by(&path_now)));
            files
        });
        let Some(stamped) = stamped.await else { break };
        files = stamped;
        let reloaded = tokio::select! {
            reloaded = app.reload_from_file(&path, cause) => reloaded,
            _ = &mut shutdown => break,
        };
        // Watch what is in force, and after a failure also what the refused file names: a Secret
        // that the new config needs may arrive after it, and its arrival must reload. (Paths watched
        // already keep the stamps taken before the reload.)
        let mut names = app.config().files.clone();
        let path_now = path.clone();
        let watching = off_runtime(shutdown.as_mut(), move || {
            if !reloaded {
                names.extend(Config::files_named_by(&path_now));
            }
            files.watch(watched(&path_now, &names));
            files
        });
        let Some(watching) = watching.await else { break };
        files = watching;
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    app.shutdown().await;
    ExitCode::SUCCESS
}

/// Runs `work` on the blocking pool (a stat or a config parse may wait on a slow filesystem, and the
/// runtime's threads are the request threads); `None` when `shutdown` comes first.
async fn off_runtime<T: Send + 'static>(
    shutdown: impl Future<Output = ()> + Unpin,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    tokio::select! {
        done = tokio::task::spawn_blocking(work) => {
            Some(done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
        }
        () = shutdown => None,
    }
}

/// The config file and the files it names.
fn watched(config: &Path, files: &[PathBuf]) -> Vec<PathBuf> {
    [vec![config.to_owned()], files.to_vec()].concat()
}

/// How often the watched files are looked at; a change is taken one period after the last write.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path, None) {
        Ok(config) => {
            println!(
                "{}: ok ({} users, {} upstreams)",
                path.display(),
                config.directory.user_count() + config.live.user_count(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {}", path.display(), indent(&e));
            ExitCode::FAILURE
        }
    }
}

fn verify_audit(path: &Path, allow_continuation: bool) -> ExitCode {
    use mcp_tenant_proxy::telemetry::audit::{VerifyError, verify};
    let result = if path == Path::new("-") {
        verify(std::io::stdin().lock(), allow_continuation)
    } else {
        match std::fs::File::open(path) {
            Ok(file) => verify(std::io::BufReader::new(file), allow_continuation),
            Err(e) => Err(VerifyError::Io(e)),
        }
    };
    match result {
        Ok(lines) => {
            println!("ok: {lines} lines, chain intact");
            ExitCode::SUCCESS
        }
        Err(broken @ VerifyError::Broken { .. }) => {
            println!("{broken}");
            ExitCode::from(1)
        }
        Err(VerifyError::Io(e)) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

fn indent(e: &ConfigError) -> String {
    match e {
        ConfigError::Invalid(problems) => format!("{} problem(s)\n{e}", problems.len())
            .lines()
            .enumerate()
            .map(|(i, l)| if i == 0 { l.to_owned() } else { format!("  {l}") })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => e.to_string(),
    }
}

fn keygen() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let key = format!("mtp_{}", hex::encode(bytes));
    let hash = hex::encode(mcp_tenant_proxy::secret::sha256(key.as_bytes()));
    (key, hash)
}
