//! The decisions of the request path: who is calling ([`auth`]), as whom ([`identity`]), and with which
//! upstream credential ([`credential`]), and how often ([`ratelimit`]).

pub mod auth;
pub mod credential;
pub mod identity;
pub mod mcp;
pub mod ratelimit;
pub mod session;
