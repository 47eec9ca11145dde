//! Opens the store a config names: the embedded SQLite file or the shared PostgreSQL database.

use std::sync::Arc;

use super::model::{Store, StoreResult};
use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use crate::config::runtime::{StoreBackend, StoreSettings};

/// Opens (creating or migrating it) the store of `settings`, with its master key.
pub fn open(settings: &StoreSettings) -> StoreResult<Arc<dyn Store>> {
    let key = settings.master_key.as_ref();
    Ok(match &settings.backend {
        StoreBackend::Sqlite { path } => Arc::new(SqliteStore::open(path, key)?),
        StoreBackend::Postgres { config } => Arc::new(PgStore::open(config, key)?),
    })
}
