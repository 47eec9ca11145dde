//! Inbound connections: the accept loop ([`listener`]) and TLS ([`tls`]).

pub mod listener;
pub mod tls;
