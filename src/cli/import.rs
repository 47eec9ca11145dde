//! `store import <file.jsonl> --keys-out <file>`: creates many users at once, with their limits,
//! generated keys and credentials, in one transaction per batch ([`Store::import_users`]).
//!
//! One JSON object per line:
//! `{"id": "alice", "rate_limit": {"requests": 100, "per": "1m", "burst": 20}, "keys": [{"kind": "standard"}],
//!   "credentials": [{"upstream": "github", "id": "default", "secret": "ghp_..."}]}`
//! (`rate_limit` may be `"unlimited"`, or left out for the config's default; `keys` entries take `id`,
//! `act_as` and `expires_at` as `keys create` does; `id` of a credential defaults to `default`).
//!
//! The generated keys go to `--keys-out` (created, mode 0600, never overwritten), one JSON line per key
//! (`{"user", "id", "key"}`), written after the batch that made them commits. A batch that fails leaves
//! the batches before it imported; the error names its lines.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::migrate::read_password;
use mcp_tenant_proxy::policy::ratelimit::Limit;
use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::store::import::{ImportCredential, ImportKey, ImportUser};
use mcp_tenant_proxy::store::model::{Store, StoreError, UnixTime, UserLimit};
use mcp_tenant_proxy::store::postgres::{PgConfig, PgStore};
use mcp_tenant_proxy::store::{KeyKind, SqliteStore, TokenMode};
use serde::Deserialize;
use serde_json::json;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The JSON-lines file of users (`-` for stdin).
    file: PathBuf,
    /// Where the generated keys go (created; an existing file is refused).
    #[arg(long, value_name = "PATH")]
    keys_out: PathBuf,
    /// Import into this PostgreSQL database (`postgres://USER@HOST:PORT/DB`) instead of `--store`.
    #[arg(long, value_name = "URL", conflicts_with = "store")]
    url: Option<String>,
    /// Read the PostgreSQL password from this environment variable.
    #[arg(long, value_name = "NAME", requires = "url", conflicts_with = "password_file")]
    password_env: Option<String>,
    /// Read the PostgreSQL password from this file.
    #[arg(long, value_name = "PATH", requires = "url")]
    password_file: Option<PathBuf>,
    /// Users per transaction.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    batch: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    #[serde(default)]
    rate_limit: Option<LineLimit>,
    #[serde(default)]
    keys: Vec<LineKey>,
    #[serde(default)]
    credentials: Vec<LineCredential>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LineLimit {
    Word(String),
    Quota { requests: std::num::NonZeroU32, per: String, burst: Option<std::num::NonZeroU32> },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineKey {
    kind: String,
    id: Option<String>,
    #[serde(default)]
    act_as: Vec<String>,
    expires_at: Option<UnixTime>,
    user_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineCredential {
    upstream: String,
    #[serde(default = "default_id")]
    id: String,
    secret: Secret,
}

fn default_id() -> String {
    "default".into()
}

pub enum ImportError {
    Store(StoreError),
    Other(String),
}

impl From<StoreError> for ImportError {
    fn from(e: StoreError) -> Self {
        ImportError::Store(e)
    }
}

/// Parses one line. Errors name the problem and column, never a value (a line may hold a secret).
fn parse(text: &str) -> Result<ImportUser, String> {
    let line: Line = serde_json::from_str(text).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "is not JSON",
            _ => "is not a user record (fields: id, rate_limit, keys, credentials)",
        };
        format!("{what} (column {})", e.column())
    })?;
    let rate_limit = match line.rate_limit {
        None => UserLimit::Default,
        Some(LineLimit::Word(w)) if w == "unlimited" => UserLimit::Unlimited,
        Some(LineLimit::Word(w)) if w == "default" => UserLimit::Default,
        Some(LineLimit::Word(_)) => return Err("rate_limit: use \"unlimited\", \"default\" or {requests, per}".into()),
        Some(LineLimit::Quota { requests, per, burst }) => {
            let per = humantime::parse_duration(&per).map_err(|_| "rate_limit.per: a duration such as 1m")?;
            UserLimit::Quota(Limit::new(requests, per, burst).map_err(|why| format!("rate_limit: {why}"))?)
        }
    };
    let keys = line
        .keys
        .into_iter()
        .map(|k| {
            let kind = match k.kind.as_str() {
                "standard" => KeyKind::Standard,
                "enterprise" => KeyKind::Enterprise,
                _ => return Err("keys[].kind: standard or enterprise".to_owned()),
            };
            let user_token = k.user_token.as_deref().map(TokenMode::parse).transpose();
            let user_token = user_token.map_err(|why| format!("keys[].user_token: {why}"))?;
            Ok(ImportKey { id: k.id, kind, act_as: k.act_as, expires_at: k.expires_at, user_token })
        })
        .collect::<Result<_, String>>()?;
    let credentials = line
        .credentials
        .into_iter()
        .map(|c| ImportCredential { upstream: c.upstream, credential_id: c.id, secret: c.secret })
        .collect();
    Ok(ImportUser { id: line.id, rate_limit, keys, credentials })
}

pub fn run(
    args: &ImportArgs,
    store_path: Option<&Path>,
    master_key: Option<Secret>,
    json_out: bool,
) -> Result<(), ImportError> {
    let store: Arc<dyn Store> = match (&args.url, store_path) {
        (Some(url), _) => {
            let mut config = PgConfig::parse(url).map_err(|why| ImportError::Other(format!("--url {why}")))?;
            if let Some(password) = read_password(args.password_env.as_deref(), args.password_file.as_deref())
                .map_err(ImportError::Other)?
            {
                config = config.with_password(&password);
            }
            Arc::new(PgStore::open(&config, master_key.as_ref())?)
        }
        (None, Some(path)) => Arc::new(SqliteStore::open(path, master_key.as_ref())?),
        (None, None) => return Err(ImportError::Other("--store <PATH> or --url <URL> is required".into())),
    };
    let input: Box<dyn BufRead + Send> = if args.file.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&args.file)
            .map_err(|e| ImportError::Other(format!("cannot read {}: {e}", args.file.display())))?;
        Box::new(BufReader::with_capacity(1 << 20, file))
    };
    let keys_out = create_private(&args.keys_out)
        .map_err(|e| ImportError::Other(format!("cannot create {}: {e}", args.keys_out.display())))?;
    let mut keys_out = BufWriter::with_capacity(1 << 20, keys_out);

    // A reader thread parses the next batch while this one imports the current one.
    let batch = args.batch as usize;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<ImportUser>), String>>(2);
    let reader = std::thread::spawn(move || {
        let mut users = Vec::with_capacity(batch);
        let mut first = 1;
        for (n, text) in input.lines().enumerate() {
            let n = n + 1;
            let text = match text {
                Ok(text) => text,
                Err(e) => return drop(tx.send(Err(format!("line {n}: cannot read: {e}")))),
            };
            if text.trim().is_empty() {
                continue;
            }
            match parse(&text) {
                Ok(user) => users.push(user),
                Err(why) => return drop(tx.send(Err(format!("line {n}: {why}")))),
            }
            if users.len() == batch {
                if tx.send(Ok((first, std::mem::replace(&mut users, Vec::with_capacity(batch))))).is_err() {
                    return;
                }
                first = n + 1;
            }
        }
        if !users.is_empty() {
            let _ = tx.send(Ok((first, users)));
        }
    });
    let started = Instant::now();
    let (mut users, mut keys, mut credentials) = (0usize, 0usize, 0usize);
    let mut failure = None;
    for message in rx {
        let (first, batch) = match message {
            Ok(batch) => batch,
            Err(why) => {
                failure = Some(ImportError::Other(why));
                break;
            }
        };
        let created = match store.import_users(&batch) {
            Ok(created) => created,
            Err(e) => {
                failure = Some(ImportError::Other(format!("the batch from line {first}: {e}")));
                break;
            }
        };
        for k in &created {
            let line = json!({ "user": k.info.user, "id": k.info.id, "key": k.key.expose() });
            writeln!(keys_out, "{line}").map_err(|e| ImportError::Other(format!("cannot write the keys: {e}")))?;
        }
        keys_out.flush().map_err(|e| ImportError::Other(format!("cannot write the keys: {e}")))?;
        users += batch.len();
        keys += created.len();
        credentials += batch.iter().map(|u| u.credentials.len()).sum::<usize>();
    }
    drop(reader);
    keys_out
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(|e| ImportError::Other(format!("cannot write the keys: {e}")))?;
    let took = started.elapsed();
    report(users, keys, credentials, took, &args.keys_out, json_out);
    match failure {
        None => Ok(()),
        Some(ImportError::Other(why)) => {
            Err(ImportError::Other(format!("{why} (the {users} users before it are imported)")))
        }
        Some(e) => Err(e),
    }
}

fn report(users: usize, keys: usize, credentials: usize, took: Duration, keys_out: &Path, json_out: bool) {
    let rate = users as f64 / took.as_secs_f64().max(1e-9);
    if json_out {
        println!(
            "{}",
            json!({
                "users": users, "keys": keys, "credentials": credentials,
                "seconds": took.as_secs_f64(), "keys_out": keys_out.display().to_string(),
            })
        );
    } else {
        println!(
            "imported {users} users, {keys} keys, {credentials} credentials in {:.1} s ({rate:.0} users/s); keys in {}",
            took.as_secs_f64(),
            keys_out.display()
        );
    }
}

/// Creates `path` for the keys: new (never overwrites), readable by its owner only.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}
