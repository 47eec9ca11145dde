//! The store's records as JSON, one shape for the admin API and the CLI's `--json` output.

use serde_json::{Value, json};

use super::connection::Tokens;
use super::model::{CredentialInfo, KeyInfo, TokenInfo, User, UserLimit};

pub fn limit_json(limit: UserLimit) -> Value {
    match limit {
        UserLimit::Default => json!("default"),
        UserLimit::Unlimited => json!("unlimited"),
        UserLimit::Quota(l) => json!({
            "requests": l.requests.get(),
            "per": humantime::format_duration(l.per).to_string(),
            "burst": l.burst.get(),
        }),
    }
}

pub fn user_json(u: &User) -> Value {
    json!({ "id": u.id, "rate_limit": limit_json(u.rate_limit), "created_at": u.created_at })
}

pub fn key_json(k: &KeyInfo) -> Value {
    json!({
        "id": k.id, "kind": k.kind.as_str(), "user": k.user, "act_as": k.act_as, "prefix": k.prefix,
        "created_at": k.created_at, "last_used_at": k.last_used_at, "expires_at": k.expires_at,
        "revoked_at": k.revoked_at, "user_token": k.user_token.map(crate::store::TokenMode::as_str),
    })
}

pub fn cred_json(c: &CredentialInfo) -> Value {
    json!({
        "user": c.user, "upstream": c.upstream, "credential_id": c.credential_id,
        "key_version": c.key_version, "created_at": c.created_at, "updated_at": c.updated_at,
    })
}

pub fn token_json(t: &TokenInfo) -> Value {
    json!({
        "id": t.id, "user": t.user, "upstream": t.upstream, "created_at": t.created_at,
        "expires_at": t.expires_at, "revoked_at": t.revoked_at,
    })
}

/// A user's OAuth connection to `upstream` as the admin API and the CLI list it: never a token.
pub fn connection_json(upstream: &str, t: &Tokens) -> Value {
    json!({
        "upstream": upstream,
        "account": t.account,
        "scope": t.scope,
        "expires_at": t.expires_at,
        "connected_at": t.connected_at,
        "refreshed_at": t.refreshed_at,
        "needs_reconnect": t.needs_reconnect.is_some(),
    })
}
