//! `store migrate --from <sqlite path> --to <postgres url>`: copies a SQLite store into an empty
//! PostgreSQL database in one transaction, then verifies the copy.
//!
//! Rows are copied as stored: key and token hashes, prefixes and times, credentials' nonces and
//! ciphertexts with their key versions, and the master keys' check values. A ciphertext's associated
//! data is its (user, upstream, credential id), the same in both databases, so it decrypts there under
//! the same master key: nothing is decrypted to copy it. The check afterwards compares the number of
//! rows per table, and for a sample of users (spread over the id range) everything the request path
//! reads ([`Store::load_user`]: limit, active keys' hashes, active tokens, decrypted credentials) on
//! both sides.

use std::path::PathBuf;

use clap::Args;
use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::store::SqliteStore;
use mcp_tenant_proxy::store::model::{RawRows, Store, StoreError, UserSnapshot};
use mcp_tenant_proxy::store::postgres::{PgConfig, PgStore};
use serde_json::json;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The SQLite store file to copy (read only).
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    /// The PostgreSQL database to copy into (`postgres://USER@HOST:PORT/DB`); it must hold no users,
    /// keys, credentials, tokens or usage yet. Prefer --to-password-env / --to-password-file to a
    /// password in the URL (argv is visible to other local users).
    #[arg(long, value_name = "URL")]
    to: String,
    /// Read the PostgreSQL password from this environment variable.
    #[arg(long, value_name = "NAME", conflicts_with = "to_password_file")]
    to_password_env: Option<String>,
    /// Read the PostgreSQL password from this file (a trailing newline is ignored).
    #[arg(long, value_name = "PATH")]
    to_password_file: Option<PathBuf>,
    /// How many users to compare in full after the copy (spread over the id range).
    #[arg(long, default_value_t = 200)]
    sample: usize,
}

/// What went wrong, for the caller's error line.
pub enum MigrateError {
    Store(StoreError),
    Other(String),
}

impl From<StoreError> for MigrateError {
    fn from(e: StoreError) -> Self {
        MigrateError::Store(e)
    }
}

pub fn run(args: &MigrateArgs, master_key: Option<Secret>, json: bool) -> Result<(), MigrateError> {
    let mut target = PgConfig::parse(&args.to).map_err(|why| MigrateError::Other(format!("--to {why}")))?;
    let password = read_password(args.to_password_env.as_deref(), args.to_password_file.as_deref())
        .map_err(MigrateError::Other)?;
    if let Some(password) = &password {
        target = target.with_password(password);
    }
    if !args.from.exists() {
        return Err(MigrateError::Other(format!("--from {}: no such file", args.from.display())));
    }
    // The source with its key: the key must be the file's current one.
    let source = SqliteStore::open(&args.from, master_key.as_ref())?;
    let rows = source.export_rows()?;
    if !rows.credentials.is_empty() && master_key.is_none() {
        return Err(StoreError::NoMasterKey.into());
    }
    // No key at first: the copy brings the source's master key versions along.
    let pg = PgStore::open(&target, None)?;
    pg.import_rows(&rows)?;
    drop(pg);

    // Verify: the copy opens with the same key, and holds the same rows.
    let pg = PgStore::open(&target, master_key.as_ref())?;
    let counted = pg.table_counts()?;
    let expected = expected_counts(&rows);
    let mut mismatches = Vec::new();
    for (table, want) in &expected {
        let got = counted.get(table).copied().unwrap_or(-1);
        if got != *want {
            mismatches.push(format!("{table}: {want} in the source, {got} in the target"));
        }
    }
    if !mismatches.is_empty() {
        return Err(MigrateError::Other(format!("the copy differs: {}", mismatches.join("; "))));
    }
    let sample = sample_users(&rows, args.sample);
    let mut credentials_compared = 0;
    for user in &sample {
        let (a, b) = (source.load_user(user)?, pg.load_user(user)?);
        let (a, b) = (a.as_ref().map(fingerprint), b.as_ref().map(fingerprint));
        if a != b {
            return Err(MigrateError::Other(format!("the copy of user {user:?} differs from the source")));
        }
        credentials_compared += a.map_or(0, |(_, n)| n);
    }
    let target_name = pg.config().to_string();
    if json {
        println!(
            "{}",
            json!({
                "from": args.from.display().to_string(),
                "to": target_name,
                "rows": expected.iter().map(|(t, n)| (t.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "users_compared": sample.len(),
                "credentials_decrypted_and_compared": credentials_compared,
            })
        );
    } else {
        println!("copied {} -> {target_name}", args.from.display());
        for (table, n) in &expected {
            println!("  {table:<12} {n:>10} rows (same count in both)");
        }
        println!(
            "verified: {} users compared in full on both sides ({credentials_compared} credentials decrypted with the \
             master key)",
            sample.len()
        );
    }
    Ok(())
}

fn expected_counts(rows: &RawRows) -> Vec<(&'static str, i64)> {
    vec![
        ("master_keys", rows.master_keys.len() as i64),
        ("users", rows.users.len() as i64),
        ("api_keys", rows.keys.len() as i64),
        ("credentials", rows.credentials.len() as i64),
        ("token_urls", rows.tokens.len() as i64),
        ("usage", rows.usage.len() as i64),
    ]
}

/// Up to `n` user ids spread evenly over the sorted list, first and last included; users with
/// credentials first in line, so the sample decrypts some whenever there are any.
fn sample_users(rows: &RawRows, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let pick = |ids: &[&str], n: usize, out: &mut Vec<String>| {
        if ids.is_empty() || n == 0 {
            return;
        }
        let step = (ids.len() as f64 / n as f64).max(1.0);
        let mut i = 0.0;
        while (i as usize) < ids.len() && out.len() < n {
            out.push(ids[i as usize].to_owned());
            i += step;
        }
        if let Some(last) = ids.last()
            && out.last().map(String::as_str) != Some(*last)
        {
            out.push((*last).to_owned());
        }
    };
    let mut with_creds: Vec<&str> = rows.credentials.iter().map(|c| c.user.as_str()).collect();
    with_creds.dedup();
    pick(&with_creds, n / 2, &mut out);
    let users: Vec<&str> = rows.users.iter().map(|u| u.id.as_str()).collect();
    let mut rest = Vec::new();
    pick(&users, n.saturating_sub(out.len()), &mut rest);
    for user in rest {
        if !out.contains(&user) {
            out.push(user);
        }
    }
    out
}

/// Everything the request path reads of a user, as one comparable value (secrets included: it never
/// leaves this process), and the number of credentials in it.
fn fingerprint(s: &UserSnapshot) -> (String, usize) {
    let mut text = format!("{:?}|{:?}|{}\n", s.user.id, s.user.rate_limit, s.user.created_at);
    for k in &s.keys {
        text += &format!(
            "key {} {} {:?} {:?} {:?} {:?} {:?}\n",
            k.id,
            hex::encode(k.sha256),
            k.kind,
            k.user,
            k.act_as,
            k.expires_at,
            k.user_token
        );
    }
    for t in &s.tokens {
        text += &format!("token {} {} {} {} {}\n", t.id, hex::encode(t.sha256), t.user, t.upstream, t.expires_at);
    }
    for c in &s.credentials {
        text += &format!("cred {} {} {} {}\n", c.user, c.upstream, c.credential_id, hex::encode(c.secret.expose()));
    }
    (text, s.credentials.len())
}

/// A password from an environment variable or a file (trimmed); `None` when neither is named.
pub(super) fn read_password(env: Option<&str>, file: Option<&std::path::Path>) -> Result<Option<Secret>, String> {
    let text = match (env, file) {
        (Some(name), _) => std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?,
        (None, None) => return Ok(None),
    };
    match text.trim() {
        "" => Err("the PostgreSQL password is empty".into()),
        password => Ok(Some(Secret::new(password))),
    }
}
