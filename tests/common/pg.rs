//! A fresh PostgreSQL database per test on the server `scripts/test` starts (`MCP_TEST_POSTGRES_URL`, a
//! role that may CREATE DATABASE). Without the variable the test fails, naming `scripts/test`.
#![allow(dead_code)]

use mcp_tenant_proxy::secret::Secret;
use mcp_tenant_proxy::store::postgres::PgConfig;

/// The URL of the test server, or a failure that says how to get one.
pub fn postgres_url() -> String {
    std::env::var("MCP_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "MCP_TEST_POSTGRES_URL is not set: run the tests with scripts/test (it starts PostgreSQL and Redis), \
             or eval \"$(scripts/services start)\" first"
        )
    })
}

/// A database of its own, dropped (with its connections) when this is dropped.
pub struct TestDb {
    /// The server's `postgres` database (CREATE / DROP DATABASE, pg_terminate_backend).
    pub admin: PgConfig,
    pub name: String,
    /// This database, with the password.
    pub config: PgConfig,
}

impl TestDb {
    /// Works inside a Tokio runtime too (the admin connection runs on a helper thread).
    pub fn create() -> TestDb {
        off_thread(TestDb::create_here)
    }

    /// As [`TestDb::create`], on the server of `url` (a test's private server).
    pub fn create_on(url: &str) -> TestDb {
        let url = url.to_owned();
        off_thread(move || TestDb::create_at(&url))
    }

    fn create_here() -> TestDb {
        TestDb::create_at(&postgres_url())
    }

    fn create_at(url: &str) -> TestDb {
        let admin = PgConfig::parse(url).expect("a postgres:// URL");
        let name = format!("mtp_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        connect(&admin).batch_execute(&format!("CREATE DATABASE {name}")).expect("CREATE DATABASE");
        let config = admin.clone().with_dbname(&name);
        TestDb { admin, name, config }
    }

    /// This database's URL without the password (`{}` of [`PgConfig`]) and the password, for a config
    /// file that takes it from `password_file`.
    pub fn url_and_password(&self) -> (String, Secret) {
        let password = self.config.tokio_config().get_password().expect("the test URL has a password");
        (self.config.to_string(), Secret::new(String::from_utf8(password.to_vec()).unwrap()))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin = &self.admin;
        off_thread(|| {
            let _ = connect(admin).batch_execute(&sql);
        });
    }
}

/// Runs `f` on a thread of its own: the sync client panics when driven from an async thread.
pub fn off_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("helper thread"))
}

/// A plain connection outside the store (raw SQL in tests). Use it outside async code (or in
/// `spawn_blocking` / [`off_thread`]).
pub fn connect(config: &PgConfig) -> postgres::Client {
    postgres::Config::from(config.tokio_config().clone()).connect(postgres::NoTls).expect("connect to the test server")
}
