//! Configuration: [`raw`] is the file as written, [`runtime`] the validated form the proxy runs on.

pub mod oauth;
pub mod raw;
pub mod runtime;
pub mod watch;

pub use runtime::{Config, ConfigError, Problem, UnknownUserPolicy, Upstream, is_loopback};
