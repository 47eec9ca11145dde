//! Subcommands of the binary that are more than a few lines: [`store`] is the offline CLI over the
//! store file (`users`, `keys`, `creds`, `tokens`, `usage`, `store`).

pub mod import;
pub mod migrate;
pub mod store;
