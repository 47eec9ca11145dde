//! The offline CLI over the store file: `users`, `keys`, `creds`, `connections`, `tokens`, `usage` and
//! `store`.
//!
//! Every command opens the SQLite file named by `--store` directly (no running proxy needed; SQLite's
//! locking makes it safe next to one), except `connections link`, which reads the proxy's config and
//! its store. The master key comes from `--master-key-env NAME` or `--master-key-file PATH`; only
//! `creds set`, `connections list|rm` and `store rotate-master-key` need it, and when it is given to
//! any other command it is checked against the file. Secrets never come from argv: `creds set`
//! reads stdin or `--secret-file`. Nothing prints a secret except the key and token that `keys create`
//! and `tokens create` make (this once) and `store init-master-key`.
//!
//! Output is aligned text, or JSON with `--json` (times as Unix seconds). Store errors go to stderr with
//! exit status 1; clap reports usage errors with exit status 2.

use std::io::{IsTerminal, Read, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::policy::ratelimit::Limit;
use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::store::connection::{CONNECTION_ID, Tokens};
use mcp_tenant_proxy::store::crypto::MasterKey;
use mcp_tenant_proxy::store::json::{connection_json, cred_json, key_json, token_json, user_json};
use mcp_tenant_proxy::store::model::{MAX_PAGE, NewKey, PutOutcome, UnixTime, User, UserLimit};
use mcp_tenant_proxy::store::{KeyKind, SqliteStore, Store, StoreError, TokenMode};
use serde_json::{Value, json};

/// The options every store command takes; `global`, so they may come before or after the subcommand.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Store options")]
pub struct StoreOpts {
    /// The store file (created on first use).
    #[arg(long, global = true, value_name = "PATH")]
    store: Option<PathBuf>,
    /// Read the master key (base64 of 32 bytes) from this environment variable.
    #[arg(long, global = true, value_name = "NAME", conflicts_with = "master_key_file")]
    master_key_env: Option<String>,
    /// Read the master key from this file (a trailing newline is ignored).
    #[arg(long, global = true, value_name = "PATH")]
    master_key_file: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
}

/// The store subcommands, flattened into the binary's top-level command enum.
#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Users in the store file.
    Users {
        #[command(flatten)]
        opts: StoreOpts,
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// API keys in the store file (only their SHA-256 is kept).
    Keys {
        #[command(flatten)]
        opts: StoreOpts,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Upstream credentials, encrypted under the master key; write-only.
    Creds {
        #[command(flatten)]
        opts: StoreOpts,
        #[command(subcommand)]
        command: CredsCommand,
    },
    /// Users' OAuth connections to upstreams (made by the users themselves, through connect links).
    Connections {
        #[command(flatten)]
        opts: StoreOpts,
        #[command(subcommand)]
        command: ConnectionsCommand,
    },
    /// Token URLs (`/mcp/<upstream>/t/<token>`).
    Tokens {
        #[command(flatten)]
        opts: StoreOpts,
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Request and denial counts per user and upstream.
    Usage {
        #[command(flatten)]
        opts: StoreOpts,
        /// Only this user's counters.
        #[arg(long)]
        user: Option<String>,
    },
    /// The master key: make one, or re-encrypt every credential under a new one; or copy the store into
    /// PostgreSQL (`store migrate`).
    Store {
        #[command(flatten)]
        opts: StoreOpts,
        #[command(subcommand)]
        command: MasterKeyCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Add a user, with the default rate limit, its own (`--requests N --per DURATION`) or none.
    Add {
        /// The user id: ASCII letters, digits and `._@:-`.
        id: String,
        /// Requests allowed per `--per`.
        #[arg(long, requires = "per", conflicts_with = "unlimited")]
        requests: Option<NonZeroU32>,
        /// The period of `--requests` ("1m", "1h", "500ms").
        #[arg(long, requires = "requests", value_parser = humantime::parse_duration)]
        per: Option<Duration>,
        /// Burst size (default: `--requests`).
        #[arg(long, requires = "requests")]
        burst: Option<NonZeroU32>,
        /// No per-user rate limit at all.
        #[arg(long)]
        unlimited: bool,
    },
    /// List users by id.
    List {
        /// Start after this user id (paging).
        #[arg(long)]
        after: Option<String>,
        /// At most this many users.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PAGE)))]
        limit: u32,
    },
    /// Delete a user with its keys, token URLs, credentials and usage counters.
    Rm {
        /// The user id.
        id: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    Standard,
    Enterprise,
}

/// Whether a key's requests prove their user with a user token ([identity.user_token]).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum UserTokenMode {
    Required,
    Allowed,
    Ignored,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an API key and print it, this once.
    Create {
        /// The key's own user.
        #[arg(long)]
        user: String,
        /// `standard` acts as its own user only; `enterprise` as the users `--act-as` allows.
        #[arg(long, value_enum)]
        kind: Kind,
        /// Enterprise keys: a user the key may act as (`*`, an id, or a prefix ending in `*`); repeatable.
        #[arg(long = "act-as", value_name = "PATTERN")]
        act_as: Vec<String>,
        /// The key's id (default: a random `k_...`).
        #[arg(long)]
        id: Option<String>,
        /// Expire the key after this many days.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        expires_days: Option<u32>,
        /// Whether its requests must prove their user with a user token (default: `[identity.user_token] mode`).
        #[arg(long, value_enum)]
        user_token: Option<UserTokenMode>,
    },
    /// List keys (never the keys themselves).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a key by id.
    Revoke {
        /// The key id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CredsCommand {
    /// Store a credential, read from stdin (a trailing newline is trimmed) or `--secret-file`.
    Set {
        /// The user.
        #[arg(long)]
        user: String,
        /// The upstream name, as in the config.
        #[arg(long)]
        upstream: String,
        /// The credential id.
        #[arg(long = "id", default_value = "default")]
        credential_id: String,
        /// Read the secret from this file instead of stdin.
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
    },
    /// Delete a credential.
    Rm {
        /// The user.
        #[arg(long)]
        user: String,
        /// The upstream name, as in the config.
        #[arg(long)]
        upstream: String,
        /// The credential id.
        #[arg(long = "id", default_value = "default")]
        credential_id: String,
    },
    /// List credentials: ids and times only.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConnectionsCommand {
    /// List a user's connections: upstream, account, scopes, expiry (never a token). Needs the master
    /// key (the tokens are stored encrypted, with what is listed).
    List {
        /// The user.
        #[arg(long)]
        user: String,
    },
    /// Make a connect link for the user to open (as the admin API does; it may replace the connection
    /// there is now, and no later one). Reads the proxy's config for `[oauth]`, the upstream and the
    /// store (SQLite or PostgreSQL) with its master key; `--store` and the key options are not used.
    Link {
        /// The user.
        #[arg(long)]
        user: String,
        /// The upstream name, as in the config.
        #[arg(long)]
        upstream: String,
        /// The proxy's config file.
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Disconnect: delete the user's tokens for the upstream (the provider's grant is not revoked) and
    /// void every connect link made before; needs the master key (a marker is stored in their place). A
    /// running proxy serves the change once it reloads the user (any write through its admin API for
    /// that user, or a restart).
    Rm {
        /// The user.
        #[arg(long)]
        user: String,
        /// The upstream name, as in the config.
        #[arg(long)]
        upstream: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Create a token URL for (user, upstream) and print it, this once.
    Create {
        /// The user.
        #[arg(long)]
        user: String,
        /// The upstream name, as in the config.
        #[arg(long)]
        upstream: String,
        /// Lifetime in days (1 to 365).
        #[arg(long)]
        days: u32,
    },
    /// List token URLs (never the tokens themselves).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token URL by its id (`t_...`).
    Revoke {
        /// The token URL's id (`t_...`), not the token.
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum MasterKeyCommand {
    /// Print a new random master key (base64 of 32 bytes).
    InitMasterKey,
    /// Re-encrypt every credential under a new master key; the current one is retired.
    #[command(group(clap::ArgGroup::new("new_key").required(true).args(["new_key_env", "new_key_file"])))]
    RotateMasterKey {
        /// Read the new key from this environment variable.
        #[arg(long, value_name = "NAME")]
        new_key_env: Option<String>,
        /// Read the new key from this file.
        #[arg(long, value_name = "PATH")]
        new_key_file: Option<PathBuf>,
    },
    /// Copy a SQLite store (`--from`) into an empty PostgreSQL database (`--to`) in one transaction,
    /// then verify the copy (rows per table; a sample of users, credentials decrypted, on both sides).
    Migrate(super::migrate::MigrateArgs),
    /// Create many users (JSON lines: id, rate_limit, keys, credentials) in one transaction per batch,
    /// into `--store` or a PostgreSQL `--url`; the generated keys go to `--keys-out`.
    Import(super::import::ImportArgs),
}

/// Why a command failed: a store error, or something around it (a key or secret that cannot be read).
enum Failure {
    Store(StoreError),
    Other(String),
    /// A problem with the arguments clap cannot see (exit status 2).
    Usage(String),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Store(e)
    }
}

type CmdResult = Result<(), Failure>;

/// Runs one store subcommand.
pub fn run(command: StoreCommand) -> ExitCode {
    match dispatch(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Store(e)) => {
            eprintln!("error: {e}");
            if matches!(e, StoreError::NoMasterKey) {
                eprintln!("  (pass --master-key-env NAME or --master-key-file PATH)");
            }
            ExitCode::from(1)
        }
        Err(Failure::Other(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}\n\nFor more information, try '--help'.");
            ExitCode::from(2)
        }
    }
}

fn dispatch(command: StoreCommand) -> CmdResult {
    match command {
        StoreCommand::Users { opts, command } => users(&opts, command),
        StoreCommand::Keys { opts, command } => keys(&opts, command),
        StoreCommand::Creds { opts, command } => creds(&opts, command),
        StoreCommand::Connections { opts, command } => connections(&opts, command),
        StoreCommand::Tokens { opts, command } => tokens(&opts, command),
        StoreCommand::Usage { opts, user } => usage(&opts, user.as_deref()),
        StoreCommand::Store { opts, command: MasterKeyCommand::InitMasterKey } => {
            let key = MasterKey::generate();
            if opts.json {
                print_json(&json!({ "master_key": key.expose() }));
            } else {
                println!("{}", key.expose());
            }
            eprintln!("Keep it in a file readable only by the proxy (or a secret manager); it is not stored anywhere.");
            Ok(())
        }
        StoreCommand::Store { opts, command: MasterKeyCommand::Migrate(args) } => {
            super::migrate::run(&args, master_key(&opts)?, opts.json).map_err(|e| match e {
                super::migrate::MigrateError::Store(e) => Failure::Store(e),
                super::migrate::MigrateError::Other(message) => Failure::Other(message),
            })
        }
        StoreCommand::Store { opts, command: MasterKeyCommand::Import(args) } => {
            super::import::run(&args, opts.store.as_deref(), master_key(&opts)?, opts.json).map_err(|e| match e {
                super::import::ImportError::Store(e) => Failure::Store(e),
                super::import::ImportError::Other(message) => Failure::Other(message),
            })
        }
        StoreCommand::Store { opts, command: MasterKeyCommand::RotateMasterKey { new_key_env, new_key_file } } => {
            let old = master_key(&opts)?.ok_or(StoreError::NoMasterKey)?;
            let new = read_key(new_key_env.as_deref(), new_key_file.as_deref())?
                .ok_or_else(|| Failure::Usage("--new-key-env or --new-key-file is required".into()))?;
            let store = SqliteStore::open(store_path(&opts)?, Some(&old))?;
            let version = store.rotate_master_key(&old, &new)?;
            if opts.json {
                print_json(&json!({ "key_version": version }));
            } else {
                println!("master key rotated: credentials re-encrypted under key version {version}");
                eprintln!("Use the new key from now on; the old one no longer opens this store.");
            }
            Ok(())
        }
    }
}

fn store_path(opts: &StoreOpts) -> Result<&Path, Failure> {
    opts.store
        .as_deref()
        .ok_or_else(|| Failure::Usage("the following required argument was not provided: --store <PATH>".into()))
}

/// Reads a base64 master key from an environment variable or a file; `None` when neither is named.
fn read_key(env: Option<&str>, file: Option<&Path>) -> Result<Option<Secret>, Failure> {
    if let Some(name) = env {
        return match std::env::var(name) {
            Ok(value) if !value.trim().is_empty() => Ok(Some(Secret::new(value.trim()))),
            Ok(_) => Err(Failure::Other(format!("environment variable {name} is empty"))),
            Err(_) => Err(Failure::Other(format!("environment variable {name} is not set (or not UTF-8)"))),
        };
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Other(format!("cannot read the key file {}: {e}", path.display())))?;
        return Ok(Some(Secret::new(text.trim())));
    }
    Ok(None)
}

fn master_key(opts: &StoreOpts) -> Result<Option<Secret>, Failure> {
    read_key(opts.master_key_env.as_deref(), opts.master_key_file.as_deref())
}

/// Opens the store, with the master key when one is given (which then must be the file's current key).
fn open(opts: &StoreOpts) -> Result<SqliteStore, Failure> {
    let path = store_path(opts)?;
    let key = master_key(opts)?;
    Ok(SqliteStore::open(path, key.as_ref())?)
}

fn users(opts: &StoreOpts, command: UsersCommand) -> CmdResult {
    let store = open(opts)?;
    match command {
        UsersCommand::Add { id, requests, per, burst, unlimited } => {
            let limit = match (requests, per) {
                (Some(requests), Some(per)) => UserLimit::Quota(
                    Limit::new(requests, per, burst)
                        .map_err(|why| Failure::Usage(format!("--requests/--per: {why}")))?,
                ),
                _ if unlimited => UserLimit::Unlimited,
                _ => UserLimit::Default,
            };
            let user = store.create_user(&id, limit)?;
            if opts.json {
                print_json(&user_json(&user));
            } else {
                println!("user {} added (rate limit: {})", user.id, limit_text(user.rate_limit));
            }
        }
        UsersCommand::List { after, limit } => {
            let users = store.list_users(after.as_deref(), limit)?;
            if opts.json {
                print_json(&Value::Array(users.iter().map(user_json).collect()));
            } else {
                table(
                    &["ID", "RATE LIMIT", "CREATED"],
                    users.iter().map(|u| vec![u.id.clone(), limit_text(u.rate_limit), time(u.created_at)]),
                );
            }
        }
        UsersCommand::Rm { id } => {
            store.delete_user(&id)?;
            if opts.json {
                print_json(&json!({ "deleted": id }));
            } else {
                println!("user {id} deleted, with its keys, token URLs, credentials and usage counters");
            }
        }
    }
    Ok(())
}

fn keys(opts: &StoreOpts, command: KeysCommand) -> CmdResult {
    let store = open(opts)?;
    match command {
        KeysCommand::Create { user, kind, act_as, id, expires_days, user_token } => {
            let kind = match kind {
                Kind::Standard => KeyKind::Standard,
                Kind::Enterprise => KeyKind::Enterprise,
            };
            let expires_at = expires_days.map(|days| now() + i64::from(days) * 86_400);
            let user_token = user_token.map(|mode| match mode {
                UserTokenMode::Required => TokenMode::Required,
                UserTokenMode::Allowed => TokenMode::Allowed,
                UserTokenMode::Ignored => TokenMode::Ignored,
            });
            let created = store.create_key(NewKey { id, kind, user, act_as, expires_at, user_token })?;
            if opts.json {
                let mut value = key_json(&created.info);
                value["key"] = Value::String(created.key.expose().to_owned());
                print_json(&value);
            } else {
                println!("key:     {}", created.key.expose());
                println!("id:      {}", created.info.id);
                println!("prefix:  {}", created.info.prefix);
                println!("user:    {} ({})", created.info.user, created.info.kind.as_str());
                if let Some(expires) = created.info.expires_at {
                    println!("expires: {}", time(expires));
                }
                if let Some(mode) = created.info.user_token {
                    println!("user token: {}", mode.as_str());
                }
                eprintln!("Give the key to its owner now: it is not shown again.");
            }
        }
        KeysCommand::List { user } => {
            let keys = store.list_keys(user.as_deref())?;
            if opts.json {
                print_json(&Value::Array(keys.iter().map(key_json).collect()));
            } else {
                table(
                    &[
                        "ID",
                        "KIND",
                        "USER",
                        "PREFIX",
                        "CREATED",
                        "LAST USED",
                        "EXPIRES",
                        "REVOKED",
                        "USER TOKEN",
                        "ACT AS",
                    ],
                    keys.iter().map(|k| {
                        vec![
                            k.id.clone(),
                            k.kind.as_str().to_owned(),
                            k.user.clone(),
                            k.prefix.clone(),
                            time(k.created_at),
                            opt_time(k.last_used_at),
                            opt_time(k.expires_at),
                            opt_time(k.revoked_at),
                            k.user_token.map_or("-", TokenMode::as_str).to_owned(),
                            if k.act_as.is_empty() { "-".to_owned() } else { k.act_as.join(",") },
                        ]
                    }),
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let info = store.revoke_key(&id)?;
            if opts.json {
                print_json(&key_json(&info));
            } else {
                println!("key {} revoked at {}", info.id, opt_time(info.revoked_at));
            }
        }
    }
    Ok(())
}

fn creds(opts: &StoreOpts, command: CredsCommand) -> CmdResult {
    match command {
        CredsCommand::Set { user, upstream, credential_id, secret_file } => {
            if credential_id == CONNECTION_ID {
                let reason = "\"oauth\" is reserved for OAuth connections".into();
                return Err(StoreError::Invalid { field: "credential_id", reason }.into());
            }
            // Refuse before reading a secret that could not be stored anyway.
            let key = master_key(opts)?.ok_or(StoreError::NoMasterKey)?;
            let store = SqliteStore::open(store_path(opts)?, Some(&key))?;
            let secret = read_secret(secret_file.as_deref())?;
            let outcome = store.put_credential(&user, &upstream, &credential_id, &secret)?;
            let outcome = match outcome {
                PutOutcome::Created => "created",
                PutOutcome::Updated => "updated",
            };
            if opts.json {
                print_json(&json!({
                    "user": user, "upstream": upstream, "credential_id": credential_id, "outcome": outcome,
                }));
            } else {
                println!("credential {user}/{upstream}/{credential_id} {outcome}");
            }
        }
        CredsCommand::Rm { user, upstream, credential_id } => {
            if credential_id == CONNECTION_ID {
                // A deleted connection would let links made before it connect again.
                let reason = "\"oauth\" is an OAuth connection: use `connections rm`".into();
                return Err(StoreError::Invalid { field: "credential_id", reason }.into());
            }
            open(opts)?.delete_credential(&user, &upstream, &credential_id)?;
            if opts.json {
                print_json(
                    &json!({ "deleted": { "user": user, "upstream": upstream, "credential_id": credential_id } }),
                );
            } else {
                println!("credential {user}/{upstream}/{credential_id} deleted");
            }
        }
        CredsCommand::List { user } => {
            let store = open(opts)?;
            let creds = match user {
                Some(user) => store.list_credentials(&user)?,
                None => {
                    let mut all = Vec::new();
                    for user in all_users(&store)? {
                        all.extend(store.list_credentials(&user.id)?);
                    }
                    all
                }
            };
            if opts.json {
                print_json(&Value::Array(creds.iter().map(cred_json).collect()));
            } else {
                table(
                    &["USER", "UPSTREAM", "ID", "KEY VERSION", "CREATED", "UPDATED"],
                    creds.iter().map(|c| {
                        vec![
                            c.user.clone(),
                            c.upstream.clone(),
                            c.credential_id.clone(),
                            c.key_version.to_string(),
                            time(c.created_at),
                            time(c.updated_at),
                        ]
                    }),
                );
            }
        }
    }
    Ok(())
}

fn connections(opts: &StoreOpts, command: ConnectionsCommand) -> CmdResult {
    match command {
        ConnectionsCommand::List { user } => {
            let key = master_key(opts)?.ok_or(StoreError::NoMasterKey)?;
            let store = SqliteStore::open(store_path(opts)?, Some(&key))?;
            store.get_user(&user)?;
            let secrets = store.credential_secrets(Some(&user))?;
            let connections: Vec<(String, Tokens)> = secrets
                .into_iter()
                .filter(|c| c.credential_id == CONNECTION_ID)
                .filter_map(|c| Some((c.upstream, Tokens::parse(&c.secret)?)))
                .filter(|(_, t)| !t.is_disconnected())
                .collect();
            if opts.json {
                print_json(&Value::Array(connections.iter().map(|(u, t)| connection_json(u, t)).collect()));
            } else {
                table(
                    &["UPSTREAM", "ACCOUNT", "SCOPE", "EXPIRES", "CONNECTED", "STATE"],
                    connections.iter().map(|(upstream, t)| {
                        vec![
                            upstream.clone(),
                            t.account.clone(),
                            t.scope.clone(),
                            t.expires_at.map_or_else(|| "-".into(), time),
                            time(t.connected_at),
                            if t.needs_reconnect.is_some() { "needs reconnect" } else { "connected" }.into(),
                        ]
                    }),
                );
            }
        }
        ConnectionsCommand::Link { user, upstream, config } => {
            let config =
                Config::load(&config, None).map_err(|e| Failure::Other(format!("{}: {e}", config.display())))?;
            let (Some(settings), Some(store)) = (&config.oauth, &config.store) else {
                return Err(Failure::Other("the config has no [oauth] section or no [store]".into()));
            };
            if !config.upstreams.iter().any(|u| *u.name == *upstream && u.oauth.is_some()) {
                return Err(Failure::Other(format!("upstream {upstream:?} does not use OAuth in this config")));
            }
            let store = store.open()?;
            store.get_user(&user)?;
            let over = mcp_tenant_proxy::oauth::stored_connection(&*store, &user, &upstream)?.map(|(t, _)| t.grant);
            let broker = mcp_tenant_proxy::oauth::Broker::new(store)?;
            let url = broker.connect_url(settings, &user, &upstream, over.as_deref());
            if opts.json {
                let ttl = settings.link_ttl.as_secs();
                print_json(&json!({ "user": user, "upstream": upstream, "connect_url": url, "expires_in": ttl }));
            } else {
                println!("{url}");
                eprintln!(
                    "Valid for {}, once; it connects {user}'s own account.",
                    humantime::format_duration(settings.link_ttl)
                );
            }
        }
        ConnectionsCommand::Rm { user, upstream } => {
            let key = master_key(opts)?.ok_or(StoreError::NoMasterKey)?;
            let store = SqliteStore::open(store_path(opts)?, Some(&key))?;
            mcp_tenant_proxy::oauth::disconnect(&store, &user, &upstream)?;
            if opts.json {
                print_json(&json!({ "deleted": { "user": user, "upstream": upstream } }));
            } else {
                println!("connection {user}/{upstream} deleted");
            }
        }
    }
    Ok(())
}

fn tokens(opts: &StoreOpts, command: TokensCommand) -> CmdResult {
    let store = open(opts)?;
    match command {
        TokensCommand::Create { user, upstream, days } => {
            let created = store.create_token(&user, &upstream, days)?;
            let path = format!("/mcp/{}/t/{}", created.info.upstream, created.token.expose());
            if opts.json {
                let mut value = token_json(&created.info);
                value["token"] = Value::String(created.token.expose().to_owned());
                value["path"] = Value::String(path);
                print_json(&value);
            } else {
                println!("token:   {}", created.token.expose());
                println!("path:    {path}");
                println!("id:      {}", created.info.id);
                println!("expires: {}", time(created.info.expires_at));
                eprintln!("Give the URL to its owner now: the token is not shown again.");
            }
        }
        TokensCommand::List { user } => {
            let tokens = store.list_tokens(user.as_deref())?;
            if opts.json {
                print_json(&Value::Array(tokens.iter().map(token_json).collect()));
            } else {
                table(
                    &["ID", "USER", "UPSTREAM", "CREATED", "EXPIRES", "REVOKED"],
                    tokens.iter().map(|t| {
                        vec![
                            t.id.clone(),
                            t.user.clone(),
                            t.upstream.clone(),
                            time(t.created_at),
                            time(t.expires_at),
                            opt_time(t.revoked_at),
                        ]
                    }),
                );
            }
        }
        TokensCommand::Revoke { token_id } => {
            let info = store.revoke_token(&token_id)?;
            if opts.json {
                print_json(&token_json(&info));
            } else {
                println!("token {} revoked at {}", info.id, opt_time(info.revoked_at));
            }
        }
    }
    Ok(())
}

fn usage(opts: &StoreOpts, user: Option<&str>) -> CmdResult {
    let rows = open(opts)?.usage(user)?;
    if opts.json {
        let rows = rows
            .iter()
            .map(|u| {
                json!({
                    "user": u.user, "upstream": u.upstream, "requests": u.requests,
                    "denials": u.denials, "last_seen": u.last_seen,
                })
            })
            .collect();
        print_json(&Value::Array(rows));
    } else {
        table(
            &["USER", "UPSTREAM", "REQUESTS", "DENIALS", "LAST SEEN"],
            rows.iter().map(|u| {
                vec![
                    u.user.clone(),
                    u.upstream.clone(),
                    u.requests.to_string(),
                    u.denials.to_string(),
                    time(u.last_seen),
                ]
            }),
        );
    }
    Ok(())
}

fn all_users(store: &SqliteStore) -> Result<Vec<User>, StoreError> {
    let mut all = Vec::new();
    loop {
        let page = store.list_users(all.last().map(|u: &User| u.id.as_str()), MAX_PAGE)?;
        let done = page.len() < MAX_PAGE as usize;
        all.extend(page);
        if done {
            return Ok(all);
        }
    }
}

/// The secret of `creds set`: a file or stdin, one trailing newline (`\n` or `\r\n`) trimmed.
fn read_secret(file: Option<&Path>) -> Result<Secret, Failure> {
    let mut text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Failure::Other(format!("cannot read the secret file {}: {e}", path.display())))?,
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("secret (end with Enter and Ctrl-D): ");
                let _ = std::io::stderr().flush();
            }
            let mut text = String::new();
            stdin
                .lock()
                .read_to_string(&mut text)
                .map_err(|e| Failure::Other(format!("cannot read the secret from stdin: {e}")))?;
            text
        }
    };
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(Failure::Other("the secret is empty (give it on stdin or with --secret-file)".into()));
    }
    Ok(Secret::new(text))
}

fn now() -> UnixTime {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// RFC 3339 in UTC, to the second.
fn time(t: UnixTime) -> String {
    match u64::try_from(t) {
        Ok(secs) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string(),
        Err(_) => t.to_string(),
    }
}

fn opt_time(t: Option<UnixTime>) -> String {
    t.map_or_else(|| "-".to_owned(), time)
}

fn limit_text(limit: UserLimit) -> String {
    match limit {
        UserLimit::Default => "default".to_owned(),
        UserLimit::Unlimited => "unlimited".to_owned(),
        UserLimit::Quota(l) => {
            format!("{} per {}, burst {}", l.requests, humantime::format_duration(l.per), l.burst)
        }
    }
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values serialize"));
}

/// Left-aligned columns, two spaces apart, headers first.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
