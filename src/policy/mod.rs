//! The decisions of the request path: who is calling ([`auth`]), as whom ([`identity`], proven by a
//! [`user_token`] where the key requires one), and with which
//! upstream credential ([`credential`]), and how often ([`ratelimit`]; shared by replicas through
//! [`ratelimit_redis`]).

pub mod auth;
pub mod credential;
pub mod identity;
pub mod mcp;
pub mod ratelimit;
pub mod ratelimit_redis;
pub mod session;
pub mod user_token;
