//! Configuration loading and the CLI around it.

use std::process::Command;

use mcp_tenant_proxy::config::{Config, ConfigError};

fn problems(toml: &str) -> Vec<String> {
    match Config::from_toml(toml, std::path::Path::new(".")) {
        Err(ConfigError::Invalid(problems)) => {
            problems.into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect()
        }
        Err(e) => vec![e.to_string()],
        Ok(_) => vec![],
    }
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let found = problems(
        r#"
[server]
listen = "nowhere"
shutdown_grace = "soon"
[identity]
unknown_user = "guess"
[[keys]]
id = "k1"
kind = "admin"
user = "bad user"
[[keys]]
id = "k2"
kind = "standard"
user = "alice"
secret = "s"
act_as = ["bob"]
[[keys]]
id = "k3"
kind = "enterprise"
user = "carol"
secret = "t"
sha256 = "00"
[upstreams.gh]
url = "ftp://x"
inject = { header = "authorization", value = "Bearer" }
[[credentials]]
user = "nobody"
upstream = "nowhere"
secret = "x"
[[credentials]]
user = "alice"
upstream = "gh"
"#,
    );
    let expected = [
        "server.listen:",
        "server.shutdown_grace:",
        "identity.unknown_user:",
        "keys[0].kind:",
        "keys[0].user:",
        "keys[0]: set exactly one of sha256, secret, secret_env or secret_file",
        "keys[1].act_as:",
        "keys[2]: set exactly one of",
        "keys[2].sha256: must be 64 hex digits",
        "upstreams.gh.url:",
        "upstreams.gh.inject.value:",
        "credentials[0].user:",
        "credentials[0].upstream:",
        "credentials[1]: set exactly one of secret, secret_env or secret_file",
    ];
    for prefix in expected {
        assert!(found.iter().any(|p| p.starts_with(prefix)), "missing {prefix:?} in {found:#?}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

#[test]
fn unknown_fields_are_named() {
    let found = problems("[server]\nlisten = \"127.0.0.1:1\"\nmax_body = 5\n");
    assert_eq!(found.len(), 1);
    assert!(found[0].contains("unknown field `max_body`"), "{found:?}");
}

#[test]
fn connection_settings_have_defaults_and_are_validated() {
    let config = Config::from_toml("", std::path::Path::new(".")).unwrap();
    assert_eq!(config.server.idle_timeout, std::time::Duration::from_secs(60));
    assert_eq!(config.server.listen_backlog, 4096);
    assert_eq!(config.server.max_connections_per_ip, 0, "off by default: sidecars see one ingress address");
    let found = problems("[server]\nidle_timeout = \"0s\"\nheader_read_timeout = \"0s\"\nlisten_backlog = 0\n");
    assert_eq!(
        found,
        [
            "server.header_read_timeout: must be greater than 0",
            "server.idle_timeout: must be greater than 0",
            "server.listen_backlog: must be between 1 and 65535"
        ],
        "{found:#?}"
    );
    assert_eq!(problems("[server]\nidle_timeout = \"later\"\n").len(), 1);
}

#[test]
fn secrets_come_from_env_and_files_and_never_show_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "file-token\n").unwrap();
    // SAFETY: the variable name is unique to this test.
    unsafe { std::env::set_var("MTP_TEST_CONFIG_KEY", "env-key") };
    let toml = r#"
[[keys]]
id = "k"
kind = "standard"
user = "alice"
secret_env = "MTP_TEST_CONFIG_KEY"
[upstreams.gh]
url = "http://127.0.0.1:1/mcp"
inject = { header = "x-token", value = "{secret}" }
[[credentials]]
user = "alice"
upstream = "gh"
secret_file = "token"
"#;
    let config = Config::from_toml(toml, dir.path()).unwrap();
    let key = config.directory.key_by_hash(&mcp_tenant_proxy::secret::sha256(b"env-key")).unwrap();
    let creds = config.credentials(&key.user, &config.upstreams[0]).unwrap();
    assert_eq!(creds[0].header_value, "file-token", "trailing newline of the file is dropped");
    assert!(!format!("{creds:?}").contains("file-token"));

    let bad = toml.replace("secret_file = \"token\"", "secret = \"bad\\nvalue-with-newline\"");
    let err = Config::from_toml(&bad, dir.path()).err().unwrap().to_string();
    assert!(err.contains("credentials[0]") && !err.contains("value-with-newline"), "{err}");
}

#[test]
fn check_config_cli_accepts_the_example_and_rejects_a_broken_file() {
    let exe = env!("CARGO_BIN_EXE_mcp-tenant-proxy");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml.example");
    let ok = Command::new(exe)
        .args(["check-config", "--config", example])
        .env("ALICE_API_KEY", "k")
        .env("MCP_PROXY_SESSION_KEY", "0123456789abcdef0123456789abcdef")
        .env("ALICE_GITHUB_TOKEN", "a")
        .env("BOB_GITHUB_TOKEN", "b")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok (3 users, 1 upstreams)"));

    let missing_env =
        Command::new(exe).args(["check-config", "--config", example]).env_remove("ALICE_API_KEY").output().unwrap();
    assert_eq!(missing_env.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing_env.stderr);
    assert!(stderr.contains("keys[1].secret_env: environment variable ALICE_API_KEY is not set"), "{stderr}");
}

#[test]
fn keygen_prints_a_key_and_its_sha256() {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy")).arg("keygen").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_owned();
    let key = field("key:");
    let hash = field("sha256:");
    assert!(key.starts_with("mtp_") && key.len() == 68);
    assert_eq!(hash, hex::encode(mcp_tenant_proxy::secret::sha256(key.as_bytes())));
}

#[test]
fn rate_limits_are_validated() {
    let found = problems(
        r#"
rate_limit = { requests = 0, per = "1m" }
[[users]]
id = "alice"
rate_limit = { requests = 5, per = "forever" }
[[users]]
id = "bob"
rate_limit = { requests = 5, per = "0s" }
[upstreams.gh]
url = "http://127.0.0.1:1/"
inject = { header = "x", value = "{secret}" }
rate_limit = { requests = 5, per = "1m", burst = 0 }
"#,
    );
    let expected =
        ["rate_limit.requests:", "users[0].rate_limit.per:", "users[1].rate_limit:", "upstreams.gh.rate_limit.burst:"];
    for prefix in expected {
        assert!(found.iter().any(|p| p.starts_with(prefix)), "missing {prefix:?} in {found:#?}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");

    let typo = problems("rate_limit = \"sometimes\"\n");
    assert!(typo[0].contains("\"unlimited\" or a table"), "{typo:?}");
    let field = problems("rate_limit = { requests = 5, per = \"1m\", burts = 2 }\n");
    assert!(field[0].contains("unknown field `burts`"), "{field:?}");
    assert!(problems("rate_limit = \"unlimited\"\n").is_empty());
}

#[test]
fn syntax_errors_give_the_position_but_never_quote_the_line() {
    for text in [
        "[[keys]]\nid = \"k\"\nkind = \"standard\"\nuser = \"alice\"\nsecert = \"ghp_TOPSECRET\"\n",
        "[[credentials]]\nuser = \"alice\"\nsecret = \"ghp_TOPSECRET\n",
    ] {
        let err = Config::from_toml(text, std::path::Path::new(".")).err().unwrap().to_string();
        assert!(!err.contains("ghp_TOPSECRET"), "{err}");
        assert!(err.starts_with("line "), "{err}");
    }
    let err = problems("[[keys]]\nid = \"k\"\nkind = \"standard\"\nuser = \"alice\"\nsecert = \"x\"\n");
    assert!(err[0].starts_with("line 5, column 1: unknown field `secert`"), "{err:?}");
}

#[test]
fn the_store_is_a_file_or_a_postgres_url_and_its_password_never_shows() {
    use mcp_tenant_proxy::config::runtime::StoreBackend;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pg.password"), "hunter2-from-file\n").unwrap();
    let load = |store: &str| Config::from_toml(&format!("[store]\n{store}\n"), dir.path());
    let problems_of = |store: &str| match load(store) {
        Err(ConfigError::Invalid(p)) => p.into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect::<Vec<_>>(),
        Err(e) => vec![e.to_string()],
        Ok(_) => vec![],
    };
    let one_of = "store: set exactly one of path (SQLite) and url (PostgreSQL)";
    assert_eq!(problems_of("path = \"s.db\"\nurl = \"postgres://u@h/db\""), [one_of]);
    assert_eq!(
        problems_of("master_key_env = \"X_UNSET_\""),
        ["store.secret_env: environment variable X_UNSET_ is not set", one_of]
    );
    assert_eq!(
        problems_of("path = \"s.db\"\npassword_file = \"pg.password\""),
        ["store: password_env and password_file go with url, not path"]
    );
    assert_eq!(problems_of("url = \"postgres://u@h/db\"\npassword_file = \"missing\"").len(), 1);
    assert!(
        problems_of("url = \"postgres://u@h/db\"\npassword_file = \"missing\"")[0]
            .starts_with("store.password.secret_file")
    );
    // A password in a refused URL is never repeated.
    for url in
        ["mysql://u:hunter2-inline@h/db", "postgres://u:hunter2-inline@h:port/db", "postgres://:hunter2-inline@/db"]
    {
        let found = problems_of(&format!("url = \"{url}\""));
        assert_eq!(found.len(), 1, "{url}: {found:?}");
        assert!(found[0].starts_with("store.url: ") && !found[0].contains("hunter2"), "{found:?}");
    }

    let config = load("url = \"postgres://mcp@db.internal:6543/proxy\"\npassword_file = \"pg.password\"").unwrap();
    let store = config.store.as_ref().unwrap();
    let StoreBackend::Postgres { config: pg } = &store.backend else { panic!("a PostgreSQL store") };
    assert!(pg.has_password());
    assert_eq!(pg.tokio_config().get_password(), Some(&b"hunter2-from-file"[..]), "trimmed, from the file");
    assert_eq!(
        format!("{:?}", store.backend),
        "Postgres { config: PgConfig(postgres://mcp@db.internal:6543/proxy, password: ***) }"
    );
    // Inline in the URL works too (not recommended), and is hidden the same way.
    let config = load("url = \"postgres://mcp:hunter2-inline@db.internal/proxy\"").unwrap();
    let backend = &config.store.as_ref().unwrap().backend;
    assert!(!format!("{backend:?}").contains("hunter2"));
    assert!(matches!(load("path = \"s.db\"").unwrap().store.unwrap().backend, StoreBackend::Sqlite { .. }));
}
