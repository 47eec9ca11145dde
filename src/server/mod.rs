//! Inbound connections: the accept loop ([`listener`]), each connection's idle timer and graceful close
//! ([`conn`]), event streams ended at shutdown ([`drain`]) and TLS ([`tls`]).

pub mod conn;
pub mod drain;
pub mod listener;
pub mod tls;
