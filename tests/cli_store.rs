//! The offline store CLI (`users`, `keys`, `creds`, `tokens`, `usage`, `store`), run as the real binary
//! against a temporary store file; the library opens the same file to check what the CLI wrote.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mcp_tenant_proxy::secret::{Secret, sha256};
use mcp_tenant_proxy::store::model::UsageDelta;
use mcp_tenant_proxy::store::{SqliteStore, Store};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tenant-proxy");

struct Cli {
    _dir: tempfile::TempDir,
    store: PathBuf,
    /// The master key, passed through `MTP_TEST_MASTER_KEY` when a test asks for it.
    key: String,
}

impl Cli {
    fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store.db");
        let key = run_raw(&["store", "init-master-key"], &[], None).stdout_text().trim().to_owned();
        Cli { _dir: dir, store, key }
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Runs `args --store <file>`, with the master key in the environment when `with_key`.
    fn run(&self, args: &[&str], with_key: bool, stdin: Option<&str>) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--store", self.store.to_str().unwrap()]);
        if with_key {
            all.extend(["--master-key-env", "MTP_TEST_MASTER_KEY"]);
        }
        run_raw(&all, &[("MTP_TEST_MASTER_KEY", &self.key)], stdin)
    }

    /// Like `run`, and asserts success.
    fn ok(&self, args: &[&str], with_key: bool) -> String {
        let out = self.run(args, with_key, None);
        assert!(out.status.success(), "{args:?} failed: {}", out.stderr_text());
        out.stdout_text()
    }

    fn json(&self, args: &[&str], with_key: bool) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all, with_key)).unwrap()
    }

    fn library(&self) -> SqliteStore {
        SqliteStore::open(&self.store, Some(&Secret::new(self.key.clone()))).unwrap()
    }
}

fn run_raw(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).env("RUST_LOG", "off").stdout(Stdio::piped()).stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = command.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

trait Text {
    fn stdout_text(&self) -> String;
    fn stderr_text(&self) -> String;
}

impl Text for Output {
    fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).unwrap()
    }
    fn stderr_text(&self) -> String {
        String::from_utf8(self.stderr.clone()).unwrap()
    }
}

fn ids(list: &Value, field: &str) -> Vec<String> {
    list.as_array().unwrap().iter().map(|v| v[field].as_str().unwrap().to_owned()).collect()
}

#[test]
fn users_keys_creds_tokens_and_usage_round_trip() {
    let cli = Cli::new();
    assert!(cli.ok(&["users", "add", "alice"], false).contains("user alice added (rate limit: default)"));
    assert!(
        cli.ok(&["users", "add", "bob", "--requests", "10", "--per", "1m", "--burst", "20"], false)
            .contains("10 per 1m, burst 20")
    );
    cli.ok(&["users", "add", "carol", "--unlimited"], false);
    let dup = cli.run(&["users", "add", "alice"], false, None);
    assert_eq!(dup.status.code(), Some(1));
    assert!(dup.stderr_text().contains("user \"alice\" already exists"), "{}", dup.stderr_text());

    let text = cli.ok(&["users", "list"], false);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID     RATE LIMIT"), "{text}");
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[3].starts_with("carol  unlimited"), "{text}");
    let users = cli.json(&["users", "list"], false);
    assert_eq!(ids(&users, "id"), ["alice", "bob", "carol"]);
    assert_eq!(users[1]["rate_limit"]["requests"], 10);
    assert_eq!(users[1]["rate_limit"]["burst"], 20);
    assert_eq!(users[2]["rate_limit"], "unlimited");
    assert_eq!(ids(&cli.json(&["users", "list", "--after", "alice", "--limit", "1"], false), "id"), ["bob"]);

    // Keys.
    let created = cli.json(&["keys", "create", "--user", "alice", "--kind", "standard"], false);
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    let svc = cli.json(
        &[
            "keys",
            "create",
            "--user",
            "bob",
            "--kind",
            "enterprise",
            "--act-as",
            "tenant-*",
            "--act-as",
            "carol",
            "--id",
            "svc",
            "--expires-days",
            "30",
            "--user-token",
            "required",
        ],
        false,
    );
    assert_eq!(svc["id"], "svc");
    assert_eq!(
        (&svc["user_token"], &created["user_token"]),
        (&serde_json::json!("required"), &serde_json::Value::Null)
    );
    assert_eq!(svc["act_as"], serde_json::json!(["tenant-*", "carol"]));
    assert!(svc["expires_at"].as_i64().unwrap() > svc["created_at"].as_i64().unwrap() + 29 * 86_400);
    let listed = cli.ok(&["keys", "list"], false);
    assert!(listed.lines().next().unwrap().starts_with("ID"), "{listed}");
    assert!(listed.contains("svc") && listed.contains("enterprise") && listed.contains("tenant-*,carol"));
    assert!(listed.lines().any(|l| l.starts_with("svc") && l.contains("required")), "{listed}");
    assert!(!listed.contains(&key), "keys list printed a key");
    assert_eq!(ids(&cli.json(&["keys", "list", "--user", "bob"], false), "id"), ["svc"]);
    assert!(cli.ok(&["keys", "revoke", "svc"], false).contains("key svc revoked at"));
    let bob_keys = cli.json(&["keys", "list", "--user", "bob"], false);
    assert!(bob_keys[0]["revoked_at"].is_i64());
    let missing = cli.run(&["keys", "revoke", "nope"], false, None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stderr_text().contains("not found"), "{}", missing.stderr_text());

    // Credentials.
    let out = cli.run(&["creds", "set", "--user", "alice", "--upstream", "github"], true, Some("ghp_round_trip\n"));
    assert!(out.status.success(), "{}", out.stderr_text());
    assert!(out.stdout_text().contains("credential alice/github/default created"));
    let out = cli.run(&["creds", "set", "--user", "alice", "--upstream", "github", "--id", "work"], true, Some("x"));
    assert!(out.status.success(), "{}", out.stderr_text());
    let creds = cli.json(&["creds", "list"], false);
    assert_eq!(ids(&creds, "credential_id"), ["default", "work"]);
    assert_eq!(creds[0]["key_version"], 1);
    assert_eq!(ids(&cli.json(&["creds", "list", "--user", "bob"], false), "credential_id"), Vec::<String>::new());
    cli.ok(&["creds", "rm", "--user", "alice", "--upstream", "github", "--id", "work"], false);
    assert_eq!(ids(&cli.json(&["creds", "list", "--user", "alice"], false), "credential_id"), ["default"]);

    // Token URLs.
    let token = cli.json(&["tokens", "create", "--user", "alice", "--upstream", "github", "--days", "7"], false);
    let secret_token = token["token"].as_str().unwrap().to_owned();
    assert_eq!(token["path"], format!("/mcp/github/t/{secret_token}"));
    let token_id = token["id"].as_str().unwrap().to_owned();
    let listed = cli.ok(&["tokens", "list", "--user", "alice"], false);
    assert!(listed.contains(&token_id) && !listed.contains(&secret_token), "{listed}");
    let bad = cli.run(&["tokens", "create", "--user", "alice", "--upstream", "github", "--days", "400"], false, None);
    assert_eq!(bad.status.code(), Some(1));
    assert!(bad.stderr_text().contains("days: must be 1 to 365"), "{}", bad.stderr_text());
    cli.ok(&["tokens", "revoke", &token_id], false);
    assert!(cli.json(&["tokens", "list"], false)[0]["revoked_at"].is_i64());

    // Usage, as the proxy would flush it.
    assert_eq!(cli.json(&["usage"], false), serde_json::json!([]));
    cli.library()
        .add_usage(&[
            UsageDelta {
                user: "alice".into(),
                upstream: "github".into(),
                requests: 5,
                denials: 1,
                last_seen: 1_700_000_000,
            },
            UsageDelta {
                user: "bob".into(),
                upstream: "github".into(),
                requests: 2,
                denials: 0,
                last_seen: 1_700_000_100,
            },
        ])
        .unwrap();
    let usage = cli.json(&["usage", "--user", "alice"], false);
    assert_eq!(
        usage,
        serde_json::json!([{"user": "alice", "upstream": "github", "requests": 5, "denials": 1, "last_seen": 1_700_000_000}])
    );
    let text = cli.ok(&["usage"], false);
    assert!(text.contains("alice  github    5         1        2023-11-14T22:13:20Z"), "{text}");

    // Deleting a user takes its keys, credentials, tokens and usage along.
    cli.ok(&["users", "rm", "alice"], false);
    assert_eq!(ids(&cli.json(&["users", "list"], false), "id"), ["bob", "carol"]);
    assert_eq!(ids(&cli.json(&["keys", "list"], false), "id"), ["svc"]);
    assert_eq!(cli.json(&["creds", "list"], false), serde_json::json!([]));
    assert_eq!(cli.json(&["tokens", "list"], false), serde_json::json!([]));
    assert_eq!(ids(&cli.json(&["usage"], false), "user"), ["bob"]);
    assert_eq!(cli.run(&["users", "rm", "alice"], false, None).status.code(), Some(1));
}

#[test]
fn creds_set_reads_stdin_or_a_file_and_never_prints_the_secret() {
    let cli = Cli::new();
    cli.ok(&["users", "add", "alice"], false);
    let from_stdin = "ghp_from_stdin_7f3a9c";
    let from_file = "xoxb-from-file-2b8e41";
    let file = cli.dir().join("secret.txt");
    std::fs::write(&file, format!("{from_file}\r\n")).unwrap();

    let mut outputs = vec![
        cli.run(&["creds", "set", "--user", "alice", "--upstream", "github"], true, Some(&format!("{from_stdin}\n"))),
        cli.run(
            &["creds", "set", "--user", "alice", "--upstream", "slack", "--secret-file", file.to_str().unwrap()],
            true,
            None,
        ),
    ];
    for out in &outputs {
        assert!(out.status.success(), "{}", out.stderr_text());
    }
    for args in [&["creds", "list"][..], &["creds", "list", "--json"], &["creds", "list", "--user", "alice"]] {
        outputs.push(cli.run(args, true, None));
        outputs.push(cli.run(args, false, None));
    }
    outputs.push(cli.run(
        &["creds", "set", "--user", "alice", "--upstream", "github", "--json"],
        true,
        Some(from_stdin),
    ));
    outputs.push(cli.run(&["creds", "rm", "--user", "alice", "--upstream", "nope"], true, None));
    let listed = outputs[2].stdout_text();
    assert!(listed.contains("alice  github    default"), "{listed}");
    assert!(listed.contains("alice  slack     default"), "{listed}");
    for out in &outputs {
        for secret in [from_stdin, from_file] {
            assert!(!out.stdout_text().contains(secret), "secret in stdout: {}", out.stdout_text());
            assert!(!out.stderr_text().contains(secret), "secret in stderr: {}", out.stderr_text());
        }
    }

    // Stored as given, with the trailing newline trimmed.
    let mut secrets: Vec<(String, String)> = cli
        .library()
        .credential_secrets(Some("alice"))
        .unwrap()
        .into_iter()
        .map(|c| (c.upstream, c.secret.expose().to_owned()))
        .collect();
    secrets.sort();
    assert_eq!(secrets, [("github".to_owned(), from_stdin.to_owned()), ("slack".to_owned(), from_file.to_owned())]);

    // There is no argv option for a secret; clap refuses it as a usage error.
    let argv = cli.run(&["creds", "set", "--user", "alice", "--upstream", "github", "--secret", "x"], true, None);
    assert_eq!(argv.status.code(), Some(2));
    // An empty secret is refused.
    let empty = cli.run(&["creds", "set", "--user", "alice", "--upstream", "github"], true, Some("\n"));
    assert_eq!(empty.status.code(), Some(1));
    assert!(empty.stderr_text().contains("empty"), "{}", empty.stderr_text());
}

#[test]
fn creds_set_without_a_master_key_is_a_clear_error() {
    let cli = Cli::new();
    cli.ok(&["users", "add", "alice"], false);
    let out = cli.run(&["creds", "set", "--user", "alice", "--upstream", "github"], false, Some("ghp_nokey"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = out.stderr_text();
    assert!(stderr.contains("no master key configured"), "{stderr}");
    assert!(stderr.contains("--master-key-env"), "{stderr}");
    assert!(!stderr.contains("ghp_nokey") && !out.stdout_text().contains("ghp_nokey"));

    // A named variable that is not set is an error too, not "no key".
    let out = run_raw(
        &[
            "creds",
            "set",
            "--user",
            "alice",
            "--upstream",
            "github",
            "--store",
            cli.store.to_str().unwrap(),
            "--master-key-env",
            "MTP_UNSET_VARIABLE",
        ],
        &[],
        Some("ghp_nokey"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr_text().contains("MTP_UNSET_VARIABLE is not set"), "{}", out.stderr_text());
    assert!(cli.library().list_credentials("alice").unwrap().is_empty());

    // Usage errors are clap's: exit status 2.
    assert_eq!(run_raw(&["users", "list"], &[], None).status.code(), Some(2));
    assert_eq!(cli.run(&["keys", "create", "--user", "alice", "--kind", "admin"], false, None).status.code(), Some(2));
    assert_eq!(cli.run(&["users", "add", "x", "--requests", "5"], false, None).status.code(), Some(2));
}

#[test]
fn a_created_key_has_the_sha256_the_store_keeps() {
    let cli = Cli::new();
    cli.ok(&["users", "add", "alice"], true);
    let text = cli.ok(&["keys", "create", "--user", "alice", "--kind", "standard", "--id", "laptop"], true);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .to_owned()
    };
    let key = field("key");
    assert_eq!(field("id"), "laptop");
    assert!(key.starts_with(&field("prefix")));

    let snapshot = cli.library().load_snapshot().unwrap();
    let stored = snapshot.keys.iter().find(|k| k.id == "laptop").expect("key in the snapshot");
    assert_eq!(stored.sha256, sha256(key.as_bytes()));
    assert_eq!(stored.user, "alice");
}

#[test]
fn rotating_the_master_key_retires_the_old_one() {
    let cli = Cli::new();
    cli.ok(&["users", "add", "alice"], false);
    let out = cli.run(&["creds", "set", "--user", "alice", "--upstream", "github"], true, Some("ghp_rotate_me"));
    assert!(out.status.success(), "{}", out.stderr_text());

    let new_key = run_raw(&["store", "init-master-key", "--json"], &[], None).stdout_text();
    let new_key: Value = serde_json::from_str(&new_key).unwrap();
    let new_key = new_key["master_key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, cli.key);
    let new_file = cli.dir().join("new.key");
    std::fs::write(&new_file, format!("{new_key}\n")).unwrap();

    let out = cli.run(&["store", "rotate-master-key", "--new-key-file", new_file.to_str().unwrap()], true, None);
    assert!(out.status.success(), "{}", out.stderr_text());
    assert!(out.stdout_text().contains("key version 2"), "{}", out.stdout_text());
    assert!(!out.stdout_text().contains(&new_key) && !out.stderr_text().contains(&new_key));

    let store = cli.store.to_str().unwrap();
    let with_new = run_raw(
        &["creds", "list", "--json", "--store", store, "--master-key-file", new_file.to_str().unwrap()],
        &[],
        None,
    );
    assert!(with_new.status.success(), "{}", with_new.stderr_text());
    let listed: Value = serde_json::from_str(&with_new.stdout_text()).unwrap();
    assert_eq!(listed[0]["key_version"], 2);

    let with_old = cli.run(&["creds", "list"], true, None);
    assert_eq!(with_old.status.code(), Some(1));
    assert!(with_old.stderr_text().contains("rotated out"), "{}", with_old.stderr_text());
    let again = cli.run(&["store", "rotate-master-key", "--new-key-file", new_file.to_str().unwrap()], true, None);
    assert_eq!(again.status.code(), Some(1));

    let store = SqliteStore::open(&cli.store, Some(&Secret::new(new_key))).unwrap();
    assert_eq!(store.credential_secrets(None).unwrap()[0].secret.expose(), "ghp_rotate_me");
}

#[path = "common/pg.rs"]
mod pg_db;

#[test]
fn store_migrate_copies_everything_into_an_empty_postgres_database_and_verifies_it() {
    use mcp_tenant_proxy::store::crypto::MasterKey;
    use mcp_tenant_proxy::store::model::{NewKey, UserLimit};
    use mcp_tenant_proxy::store::postgres::PgStore;

    let mut cli = Cli::new();
    let lib = cli.library();
    for i in 0..30 {
        let user = format!("user-{i:02}");
        let limit = if i % 3 == 0 {
            UserLimit::Quota(
                mcp_tenant_proxy::policy::ratelimit::Limit::new(
                    std::num::NonZeroU32::new(10 + i).unwrap(),
                    std::time::Duration::from_secs(60),
                    None,
                )
                .unwrap(),
            )
        } else {
            UserLimit::Default
        };
        lib.create_user(&user, limit).unwrap();
        let key = lib
            .create_key(NewKey {
                id: None,
                kind: mcp_tenant_proxy::store::KeyKind::Standard,
                user: user.clone(),
                act_as: vec![],
                expires_at: None,
                user_token: (i % 2 == 1).then_some(mcp_tenant_proxy::store::TokenMode::Required),
            })
            .unwrap();
        if i % 4 == 0 {
            lib.revoke_key(&key.info.id).unwrap();
        }
        lib.put_credential(&user, "github", "default", &Secret::new(format!("ghp_{user}"))).unwrap();
        if i % 5 == 0 {
            lib.create_token(&user, "github", 7).unwrap();
        }
    }
    lib.touch_keys(&[(lib.list_keys(Some("user-01")).unwrap()[0].id.clone(), 1_800_000_000)]).unwrap();
    lib.add_usage(&[UsageDelta {
        user: "user-01".into(),
        upstream: "github".into(),
        requests: 7,
        denials: 2,
        last_seen: 5,
    }])
    .unwrap();
    // Credentials under key version 2: versions and check values come along.
    let new_key = MasterKey::generate();
    lib.rotate_master_key(&Secret::new(cli.key.clone()), &new_key).unwrap();
    let old_key = std::mem::replace(&mut cli.key, new_key.expose().to_owned());
    let source = lib.export_rows().unwrap();
    drop(lib);

    let db = pg_db::TestDb::create();
    let (url, password) = db.url_and_password();
    let password_file = cli.dir().join("pg.password");
    std::fs::write(&password_file, format!("{}\n", password.expose())).unwrap();
    let migrate = |key: &str, extra: &[&str]| {
        let mut args = vec![
            "store",
            "migrate",
            "--from",
            cli.store.to_str().unwrap(),
            "--to",
            &url,
            "--to-password-file",
            password_file.to_str().unwrap(),
            "--master-key-env",
            "MTP_TEST_MASTER_KEY",
        ];
        args.extend(extra);
        let out = run_raw(&args, &[("MTP_TEST_MASTER_KEY", key)], None);
        let all = format!("{}{}", out.stdout_text(), out.stderr_text());
        assert!(!all.contains(password.expose()), "the password was printed: {all}");
        out
    };
    // The retired key is refused before anything is written.
    let out = migrate(&old_key, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr_text().contains("rotated out"), "{}", out.stderr_text());

    let out = migrate(&cli.key, &["--json"]);
    assert!(out.status.success(), "{}", out.stderr_text());
    let report: Value = serde_json::from_str(&out.stdout_text()).unwrap();
    assert_eq!(report["rows"]["users"], 30);
    assert_eq!(report["rows"]["api_keys"], 30);
    assert_eq!(report["rows"]["credentials"], 30);
    assert_eq!(report["rows"]["token_urls"], 6);
    assert_eq!(report["rows"]["usage"], 1);
    assert_eq!(report["rows"]["master_keys"], 2);
    assert_eq!(report["credentials_decrypted_and_compared"], 30, "{report}");
    assert_eq!(report["to"], url.as_str());

    // Every row, as stored, is in PostgreSQL; the new key opens it, and its credentials decrypt.
    let pg = PgStore::open(&db.config, Some(&Secret::new(cli.key.clone()))).unwrap();
    assert_eq!(pg.key_version(), Some(2));
    assert_eq!(pg.export_rows().unwrap(), source);
    let snapshot = pg.load_snapshot().unwrap();
    assert_eq!(snapshot.credentials.len(), 30);
    assert!(snapshot.credentials.iter().all(|c| c.secret.expose() == format!("ghp_{}", c.user)));
    assert_eq!(snapshot.keys.len(), 30 - 8, "revoked keys stay revoked");
    let required = snapshot.keys.iter().filter(|k| k.user_token == Some(mcp_tenant_proxy::store::TokenMode::Required));
    assert_eq!(required.count(), 15, "each key's user_token mode comes along (odd users; the revoked are even)");
    assert_eq!(pg.usage(None).unwrap()[0].requests, 7);
    drop(pg);
    assert!(matches!(
        PgStore::open(&db.config, Some(&Secret::new(old_key))),
        Err(mcp_tenant_proxy::store::StoreError::RetiredMasterKey { version: 1 })
    ));

    // A second copy into the same (now full) database is refused, and changes nothing.
    let out = migrate(&cli.key, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr_text().contains("not empty"), "{}", out.stderr_text());
    let pg = PgStore::open(&db.config, None).unwrap();
    assert_eq!(pg.export_rows().unwrap(), source);
    // The text report names the tables.
    let db2 = pg_db::TestDb::create();
    let (url2, _) = db2.url_and_password();
    let out = run_raw(
        &[
            "store",
            "migrate",
            "--from",
            cli.store.to_str().unwrap(),
            "--to",
            &url2,
            "--to-password-file",
            password_file.to_str().unwrap(),
            "--master-key-env",
            "MTP_TEST_MASTER_KEY",
        ],
        &[("MTP_TEST_MASTER_KEY", &cli.key)],
        None,
    );
    assert!(out.status.success(), "{}", out.stderr_text());
    assert!(
        out.stdout_text().contains("credentials") && out.stdout_text().contains("verified: "),
        "{}",
        out.stdout_text()
    );
}

#[test]
fn store_import_creates_users_with_keys_and_credentials_and_writes_each_key_once() {
    use mcp_tenant_proxy::store::postgres::PgStore;
    let cli = Cli::new();
    let lines = [
        r#"{"id": "alice", "rate_limit": {"requests": 100, "per": "1m", "burst": 20}, "keys": [{"kind": "standard"}], "credentials": [{"upstream": "github", "secret": "ghp_alice"}]}"#,
        r#"{"id": "ops", "rate_limit": "unlimited", "keys": [{"kind": "enterprise", "id": "ops-1", "act_as": ["tenant-*"]}]}"#,
        "",
        r#"{"id": "bob", "credentials": [{"upstream": "slack", "id": "work", "secret": "xoxb-bob"}]}"#,
    ];
    let mut text = lines.join("\n");
    for i in 0..25 {
        text += &format!(
            "\n{{\"id\": \"bulk-{i:02}\", \"keys\": [{{\"kind\": \"standard\"}}], \"credentials\": [{{\"upstream\": \"github\", \"secret\": \"ghp_bulk_{i}\"}}]}}"
        );
    }
    let input = cli.dir().join("users.jsonl");
    std::fs::write(&input, &text).unwrap();
    let keys_out = cli.dir().join("keys.jsonl");
    let import = |target: &[&str], keys_out: &Path| {
        let mut args =
            vec!["store", "import", input.to_str().unwrap(), "--keys-out", keys_out.to_str().unwrap(), "--batch", "7"];
        args.extend(target);
        args.extend(["--master-key-env", "MTP_TEST_MASTER_KEY", "--json"]);
        run_raw(&args, &[("MTP_TEST_MASTER_KEY", &cli.key), ("MTP_TEST_PG_PASSWORD", "unused")], None)
    };
    let check = |store: &dyn Store, keys_out: &Path| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(keys_out).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let keys: Vec<Value> =
            std::fs::read_to_string(keys_out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(keys.len(), 27);
        let snap = store.load_snapshot().unwrap();
        assert_eq!(snap.users.len(), 28);
        for k in &keys {
            let found = snap.keys.iter().find(|s| s.id == k["id"].as_str().unwrap()).unwrap();
            assert_eq!(found.sha256, sha256(k["key"].as_str().unwrap().as_bytes()));
            assert_eq!(found.user, k["user"].as_str().unwrap());
        }
        assert_eq!(snap.keys.iter().find(|k| k.id == "ops-1").unwrap().act_as, ["tenant-*"]);
        let secret =
            |user: &str| snap.credentials.iter().find(|c| c.user == user).map(|c| c.secret.expose().to_owned());
        assert_eq!(secret("bob").as_deref(), Some("xoxb-bob"));
        assert_eq!(secret("bulk-24").as_deref(), Some("ghp_bulk_24"));
        assert_eq!(snap.credentials.len(), 27);
        assert_eq!(
            snap.users.iter().find(|u| u.id == "alice").unwrap().rate_limit,
            store.get_user("alice").unwrap().rate_limit
        );
        assert!(matches!(
            store.get_user("ops").unwrap().rate_limit,
            mcp_tenant_proxy::store::model::UserLimit::Unlimited
        ));
    };

    // Into the SQLite file.
    let store_arg = cli.store.to_str().unwrap().to_owned();
    let out = import(&["--store", &store_arg], &keys_out);
    assert!(out.status.success(), "{}", out.stderr_text());
    let report: Value = serde_json::from_str(&out.stdout_text()).unwrap();
    assert_eq!(
        (report["users"].as_u64(), report["keys"].as_u64(), report["credentials"].as_u64()),
        (Some(28), Some(27), Some(27))
    );
    check(&cli.library(), &keys_out);
    // The keys file is never overwritten; importing the same users again is refused.
    let again = import(&["--store", &store_arg], &keys_out);
    assert_eq!(again.status.code(), Some(1));
    let other_out = cli.dir().join("keys2.jsonl");
    let again = import(&["--store", &store_arg], &other_out);
    assert_eq!(again.status.code(), Some(1));
    assert!(again.stderr_text().contains("already exists"), "{}", again.stderr_text());

    // Into PostgreSQL, the password from a file.
    let db = pg_db::TestDb::create();
    let (url, password) = db.url_and_password();
    let password_file = cli.dir().join("pg.password");
    std::fs::write(&password_file, password.expose()).unwrap();
    let pg_keys = cli.dir().join("pg-keys.jsonl");
    let out = import(&["--url", &url, "--password-file", password_file.to_str().unwrap()], &pg_keys);
    assert!(out.status.success(), "{}", out.stderr_text());
    assert!(!out.stdout_text().contains(password.expose()) && !out.stderr_text().contains(password.expose()));
    check(&PgStore::open(&db.config, Some(&Secret::new(cli.key.clone()))).unwrap(), &pg_keys);

    // A bad line: its number, never its values; the batches before it stay imported.
    let bad = cli.dir().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"ok-1\"}\n{\"id\": \"ok-2\"}\n{\"id\": \"x\", \"credentials\": [{\"upstream\": \"github\", \"secret\": 4242424242, \"leak\": \"ghp_LEAKED\"}]}\n",
    )
    .unwrap();
    let out = run_raw(
        &[
            "store",
            "import",
            bad.to_str().unwrap(),
            "--keys-out",
            cli.dir().join("k3").to_str().unwrap(),
            "--batch",
            "1",
            "--store",
            &store_arg,
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = out.stderr_text();
    assert!(err.contains("line 3") && !err.contains("ghp_LEAKED") && !err.contains("4242424242"), "{err}");
    assert!(err.contains("the 2 users before it are imported"), "{err}");
}

#[test]
fn connections_are_listed_without_tokens_and_disconnected_and_their_id_is_reserved() {
    use mcp_tenant_proxy::store::connection::Tokens;
    let cli = Cli::new();
    cli.ok(&["users", "add", "alice"], false);
    let tokens = Tokens {
        access_token: "gho_access_5d1c".into(),
        refresh_token: Some("ghr_refresh_93ab".into()),
        expires_at: Some(2_000_000_000),
        scope: "repo".into(),
        account: "alice-gh".into(),
        connected_at: 1_700_000_000,
        refreshed_at: None,
        needs_reconnect: None,
        grant: "g1".into(),
    };
    cli.library().put_credential("alice", "github", "oauth", &tokens.to_secret()).unwrap();
    cli.library().put_credential("alice", "slack", "default", &Secret::new("xoxb-static")).unwrap();

    let listed = cli.json(&["connections", "list", "--user", "alice"], true);
    assert_eq!(listed.as_array().unwrap().len(), 1, "static credentials are not connections: {listed}");
    assert_eq!((&listed[0]["upstream"], &listed[0]["account"]), (&"github".into(), &"alice-gh".into()));
    let text = cli.ok(&["connections", "list", "--user", "alice"], true);
    assert!(text.contains("github") && text.contains("alice-gh") && text.contains("connected"), "{text}");
    for out in [listed.to_string(), text] {
        assert!(!out.contains("gho_access") && !out.contains("ghr_refresh"), "a token was printed: {out}");
    }
    assert_eq!(
        cli.run(&["connections", "list", "--user", "alice"], false, None).status.code(),
        Some(1),
        "needs the key"
    );
    assert_eq!(cli.run(&["connections", "list", "--user", "bob"], true, None).status.code(), Some(1));

    // A static credential may not take the id connections live under.
    let reserved =
        cli.run(&["creds", "set", "--user", "alice", "--upstream", "github", "--id", "oauth"], true, Some("x"));
    assert_eq!(reserved.status.code(), Some(1));
    assert!(reserved.stderr_text().contains("reserved"), "{}", reserved.stderr_text());

    let as_credential =
        cli.run(&["creds", "rm", "--user", "alice", "--upstream", "github", "--id", "oauth"], false, None);
    assert_eq!(as_credential.status.code(), Some(1), "a connection is not removed as a credential");
    assert!(as_credential.stderr_text().contains("connections rm"), "{}", as_credential.stderr_text());
    let keyless = cli.run(&["connections", "rm", "--user", "alice", "--upstream", "github"], false, None);
    assert_eq!(keyless.status.code(), Some(1), "a disconnect writes a marker: it needs the key");
    cli.ok(&["connections", "rm", "--user", "alice", "--upstream", "github"], true);
    assert_eq!(cli.json(&["connections", "list", "--user", "alice"], true), serde_json::json!([]));
    let again = cli.run(&["connections", "rm", "--user", "alice", "--upstream", "github"], true, None);
    assert_eq!(again.status.code(), Some(1), "nothing left to disconnect");
    let left = cli.library().credential_secrets(Some("alice")).unwrap();
    let marker = left.iter().find(|c| c.upstream == "github").map(|c| Tokens::parse(&c.secret).unwrap()).unwrap();
    assert!(marker.is_disconnected() && marker.access_token.is_empty() && marker.refresh_token.is_none());
    assert_ne!(marker.grant, "g1", "a new grant: links made for the old one no longer match");
    assert!(left.iter().any(|c| c.upstream == "slack"), "the static credential stays");
}

#[test]
fn connections_link_makes_a_link_the_proxy_opens_for_that_user_and_upstream() {
    use mcp_tenant_proxy::oauth::link::{LINK_LABEL, open_link};
    use mcp_tenant_proxy::store::crypto::MasterKey;
    let cli = Cli::new();
    cli.ok(&["users", "add", "alice"], false);
    std::fs::write(cli.dir().join("client.secret"), "s3cret").unwrap();
    let config = cli.dir().join("proxy.toml");
    let write_config = |oauth: &str| {
        let text = format!(
            "[store]\npath = \"{}\"\nmaster_key_env = \"MTP_TEST_MASTER_KEY\"\n{oauth}\n\
             [upstreams.github]\nurl = \"http://127.0.0.1:9/mcp\"\n\
             inject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n\
             [upstreams.github.oauth]\nauthorization_endpoint = \"https://a.example/auth\"\n\
             token_endpoint = \"https://a.example/token\"\nclient_id = \"c\"\nclient_secret_file = \"client.secret\"\n\
             [upstreams.plain]\nurl = \"http://127.0.0.1:9/mcp\"\n\
             inject = {{ header = \"authorization\", value = \"Bearer {{secret}}\" }}\n",
            cli.store.display()
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config("[oauth]\npublic_url = \"https://mcp.example.com\"\nlink_ttl = \"10m\"");
    let link = |user: &str, upstream: &str| {
        run_raw(
            &[
                "connections",
                "link",
                "--user",
                user,
                "--upstream",
                upstream,
                "--config",
                config.to_str().unwrap(),
                "--json",
            ],
            &[("MTP_TEST_MASTER_KEY", &cli.key)],
            None,
        )
    };
    let out = link("alice", "github");
    assert!(out.status.success(), "{}", out.stderr_text());
    let answer: Value = serde_json::from_str(&out.stdout_text()).unwrap();
    assert_eq!(answer["expires_in"], 600);
    let url = answer["connect_url"].as_str().unwrap();
    let token = url.strip_prefix("https://mcp.example.com/oauth/connect?link=").expect(url);
    // Signed with the key the proxy derives from the same master key: it opens there, for alice on github.
    let key = MasterKey::parse(&Secret::new(cli.key.clone())).unwrap().derive(LINK_LABEL);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let opened = open_link(&key, token, now).unwrap();
    assert_eq!((opened.user.as_str(), opened.upstream.as_str(), opened.over), ("alice", "github", None));

    assert_eq!(link("bob", "github").status.code(), Some(1), "no such user");
    let plain = link("alice", "plain");
    assert_eq!(plain.status.code(), Some(1));
    assert!(plain.stderr_text().contains("does not use OAuth"), "{}", plain.stderr_text());
}
