//! Users, keys and credentials from the store (the embedded SQLite file, and PostgreSQL through
//! `[store] url`) serve requests next to the config file's.

mod common;

use common::*;
use mcp_tenant_proxy::app::App;
use mcp_tenant_proxy::config::Config;
use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::store::model::{NewKey, UserLimit};
use mcp_tenant_proxy::store::postgres::PgStore;
use mcp_tenant_proxy::store::sqlite::Clock;
use mcp_tenant_proxy::store::{KeyKind, SqliteStore, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Setup {
    dir: tempfile::TempDir,
    config_path: std::path::PathBuf,
    db: Option<common::pg::TestDb>,
}

impl Setup {
    fn open(&self, master: &Secret, clock: Option<Clock>) -> Box<dyn Store> {
        let clock = clock.unwrap_or_else(mcp_tenant_proxy::store::sqlite::system_clock);
        match &self.db {
            None => {
                Box::new(SqliteStore::open_with_clock(&self.dir.path().join("store.db"), Some(master), clock).unwrap())
            }
            Some(db) => Box::new(PgStore::open_with_clock(&db.config, Some(master), clock).unwrap()),
        }
    }
}

/// A store with user dana (her own credential and a standard key), an enterprise key that may act as
/// dana, and a key that has expired; and a config file that serves it next to `base_config`.
fn setup(
    backend: Backend,
    upstream: std::net::SocketAddr,
    extra_store_user: Option<&str>,
) -> (Setup, String, String, String, Tokens) {
    let dir = tempfile::tempdir().unwrap();
    let master = mcp_tenant_proxy::store::crypto::MasterKey::generate();
    std::fs::write(dir.path().join("master.key"), format!("{}\n", master.expose())).unwrap();
    let db = (backend == Backend::Postgres).then(common::pg::TestDb::create);
    let store_config = match &db {
        None => "path = \"store.db\"".to_owned(),
        Some(db) => {
            // The URL without its password; the password from a file, as a deployment would.
            let (url, password) = db.url_and_password();
            std::fs::write(dir.path().join("pg.password"), format!("{}\n", password.expose())).unwrap();
            format!("url = \"{url}\"\npassword_file = \"pg.password\"")
        }
    };
    let setup = Setup { dir, config_path: Default::default(), db };
    let store = setup.open(&master, None);
    store.create_user("dana", UserLimit::Default).unwrap();
    if let Some(user) = extra_store_user {
        store.create_user(user, UserLimit::Default).unwrap();
    }
    store.put_credential("dana", "github", "default", &Secret::new("cred-dana")).unwrap();
    let new_key = |kind, act_as: Vec<String>, expires_at| NewKey {
        id: None,
        kind,
        user: "dana".into(),
        act_as,
        expires_at,
        user_token: None,
    };
    let own = store.create_key(new_key(KeyKind::Standard, vec![], None)).unwrap().key.expose().to_owned();
    let ent =
        store.create_key(new_key(KeyKind::Enterprise, vec!["dana".into()], None)).unwrap().key.expose().to_owned();
    let github = store.create_token("dana", "github", 30).unwrap().token.expose().to_owned();
    let other = store.create_token("dana", "gitlab", 30).unwrap().token.expose().to_owned();
    drop(store);
    // A key made in 2001 that expired a day later.
    let past = setup.open(&master, Some(std::sync::Arc::new(|| 1_000_000_000)));
    let expired =
        past.create_key(new_key(KeyKind::Standard, vec![], Some(1_000_086_400))).unwrap().key.expose().to_owned();
    let expired_token = past.create_token("dana", "github", 1).unwrap().token.expose().to_owned();
    drop(past);
    let config = format!(
        "[store]\n{store_config}\nmaster_key_file = \"master.key\"\n[audit]\npath = \"audit.log\"\n{}",
        base_config(upstream, "")
    );
    let config_path = setup.dir.path().join("proxy.toml");
    std::fs::write(&config_path, config).unwrap();
    let setup = Setup { config_path, ..setup };
    (setup, own, ent, expired, Tokens { github, other, expired: expired_token })
}

struct Tokens {
    github: String,
    other: String,
    expired: String,
}

#[tokio::test]
async fn store_users_keys_and_credentials_serve_requests() {
    serve_from_the_store(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_store_users_keys_and_credentials_serve_requests() {
    serve_from_the_store(Backend::Postgres).await;
}

async fn serve_from_the_store(backend: Backend) {
    let (upstream, seen) = recording_upstream().await;
    let (setup, own, ent, expired, tokens) = setup(backend, upstream, None);
    let config = Config::load(&setup.config_path, None).unwrap();
    let app = App::start(config).await.unwrap();
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<TestBody>();
    let url = format!("http://{}/mcp/github", app.proxy_addr);
    let call = |key: &str, user: Option<&str>| {
        let mut headers = vec![("authorization", format!("Bearer {key}"))];
        if let Some(user) = user {
            headers.push(("x-alloy-userid", user.to_owned()));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        client.request(mcp_post(&url, &headers))
    };
    assert_eq!(call(&own, None).await.unwrap().status(), 200);
    assert_eq!(seen.lock().unwrap().last().unwrap().headers["authorization"], "Bearer cred-dana");
    assert_eq!(call(&ent, Some("dana")).await.unwrap().status(), 200);
    assert_eq!(call(&ent, Some("alice")).await.unwrap().status(), 403, "act_as from the store holds");
    assert_eq!(call(&expired, None).await.unwrap().status(), 401, "an expired key is refused");
    // The config file's users and keys keep working, and may act as store users.
    assert_eq!(call(ENTERPRISE_KEY, Some("dana")).await.unwrap().status(), 200);
    assert_eq!(call(ALICE_KEY, None).await.unwrap().status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 4);

    // Token URLs: no header at all, the token's user on the token's upstream only.
    let by_url = |token: &str, rest: &str| {
        let url = format!("http://{}/mcp/github/t/{token}{rest}?q=1", app.proxy_addr);
        client.request(mcp_post(&url, &[]))
    };
    assert_eq!(by_url(&tokens.github, "").await.unwrap().status(), 200);
    let forwarded = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(forwarded.headers["authorization"], "Bearer cred-dana");
    assert_eq!(forwarded.uri.to_string(), "/mcp?q=1", "the token never reaches the upstream");
    assert_eq!(by_url(&tokens.github, "/sub").await.unwrap().status(), 200);
    assert_eq!(seen.lock().unwrap().last().unwrap().uri.path(), "/mcp/sub");
    for (token, why) in
        [(&tokens.other, "another upstream's"), (&tokens.expired, "expired"), (&"mtpt_guess".to_owned(), "unknown")]
    {
        let response = by_url(token, "").await.unwrap();
        assert_eq!(response.status(), 401, "{why} token");
    }
    // A token URL acts as its user only.
    let mut named = mcp_post(&format!("http://{}/mcp/github/t/{}", app.proxy_addr, tokens.github), &[]);
    named.headers_mut().insert("x-alloy-userid", "alice".parse().unwrap());
    assert_eq!(client.request(named).await.unwrap().status(), 403);
    assert_eq!(seen.lock().unwrap().len(), 6);
    app.shutdown().await;

    // Usage was counted in memory and written to the store at shutdown; keys record their last use.
    let master = Secret::new(std::fs::read_to_string(setup.dir.path().join("master.key")).unwrap().trim());
    let store = setup.open(&master, None);
    let usage = store.usage(None).unwrap();
    let row =
        |user: &str| usage.iter().find(|u| u.user == user && u.upstream == "github").map(|u| (u.requests, u.denials));
    assert_eq!(row("dana"), Some((5, 0)), "{usage:?}");
    assert_eq!(row("alice"), Some((1, 0)), "config users have usage too");
    let keys = store.list_keys(Some("dana")).unwrap();
    assert_eq!(keys.iter().filter(|k| k.last_used_at.is_some()).count(), 2, "the two store keys that were used");

    let audit = std::fs::read_to_string(setup.dir.path().join("audit.log")).unwrap();
    for token in [&tokens.github, &tokens.other, &tokens.expired] {
        assert!(!audit.contains(token.as_str()), "a token URL's token reached the audit trail");
    }
    assert!(audit.contains("\"path\":\"/mcp/github/t/***\""), "{audit}");
}

#[test]
fn a_user_declared_in_both_the_file_and_the_store_is_a_conflict() {
    let (setup, ..) = setup(Backend::Sqlite, "127.0.0.1:1".parse().unwrap(), Some("alice"));
    let err = Config::load(&setup.config_path, None).err().expect("a conflict").to_string();
    assert!(err.contains("store.users.alice: also declared in the config file"), "{err}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
        .args(["check-config", "--config"])
        .arg(&setup.config_path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("store.users.alice"));
    let _ = setup.dir.path();
}

/// On a shared store another replica (with another config file) may make such a user: this replica
/// still starts, serving the file's user and skipping the store's.
#[test]
fn on_postgres_the_same_conflict_is_skipped_so_the_replica_still_starts() {
    let (setup, ..) = setup(Backend::Postgres, "127.0.0.1:1".parse().unwrap(), Some("alice"));
    let config = Config::load(&setup.config_path, None).expect("starts");
    assert!(config.directory.user("alice").is_some(), "the file's alice");
    assert!(config.live.user("alice").is_none() && config.live.user("dana").is_some());
}

#[test]
fn a_reload_that_changes_the_store_is_refused() {
    let (setup, ..) = setup(Backend::Sqlite, "127.0.0.1:1".parse().unwrap(), None);
    let running = Config::load(&setup.config_path, None).unwrap();
    let text = std::fs::read_to_string(&setup.config_path).unwrap();
    std::fs::write(&setup.config_path, text.replace("path = \"store.db\"", "path = \"other.db\"")).unwrap();
    let err = Config::load(&setup.config_path, Some(&running)).err().expect("refused").to_string();
    assert!(err.contains("store: changing [store]") && err.contains("needs a restart"), "{err}");
    assert!(!setup.dir.path().join("other.db").exists(), "the other store was never opened");
    std::fs::write(&setup.config_path, text).unwrap();
    Config::load(&setup.config_path, Some(&running)).expect("the same store reloads");
}
