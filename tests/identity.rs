//! The identity rules of issue #2, one row each, over real HTTP: which user a request acts as, which
//! credential the upstream sees, and what is refused (and audited) before the upstream is ever called.

mod common;

use common::*;

struct Row {
    name: &'static str,
    headers: Vec<(&'static str, String)>,
    /// Expected status, and either the credential the upstream saw or the error code.
    status: u16,
    expect: Expect,
}

enum Expect {
    Credential(&'static str),
    Code(&'static str),
}

fn auth(key: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {key}"))
}

fn user(name: &str) -> (&'static str, String) {
    ("x-alloy-userid", name.to_owned())
}

fn row(name: &'static str, headers: Vec<(&'static str, String)>, status: u16, expect: Expect) -> Row {
    Row { name, headers, status, expect }
}

/// Rows whose answer does not depend on `unknown_user`.
fn common_rows() -> Vec<Row> {
    use Expect::*;
    vec![
        row("no Authorization", vec![], 401, Code("missing_api_key")),
        row(
            "not a Bearer credential",
            vec![("authorization", "Basic YWxpY2U6cHc=".into())],
            401,
            Code("invalid_api_key"),
        ),
        row("Bearer without a token", vec![("authorization", "Bearer ".into())], 401, Code("invalid_api_key")),
        row("unknown key", vec![auth("no-such-key")], 401, Code("invalid_api_key")),
        row("two Authorization headers", vec![auth(ALICE_KEY), auth(BOB_KEY)], 400, Code("duplicate_header")),
        row("standard key, no user header", vec![auth(ALICE_KEY)], 200, Credential("Bearer cred-alice")),
        row("standard key naming itself", vec![auth(ALICE_KEY), user("alice")], 200, Credential("Bearer cred-alice")),
        row(
            "standard key naming another user",
            vec![auth(BOB_KEY), user("alice")],
            403,
            Code("user_override_forbidden"),
        ),
        row(
            "standard key naming an unknown user",
            vec![auth(BOB_KEY), user("mallory")],
            403,
            Code("user_override_forbidden"),
        ),
        row(
            "enterprise key acting as alice",
            vec![auth(ENTERPRISE_KEY), user("alice")],
            200,
            Credential("Bearer cred-alice"),
        ),
        row(
            "enterprise key acting as bob",
            vec![auth(ENTERPRISE_KEY), user("bob")],
            200,
            Credential("Bearer cred-bob"),
        ),
        row("enterprise key, no user header", vec![auth(ENTERPRISE_KEY)], 200, Credential("Bearer cred-acme")),
        row(
            "enterprise key inside its prefix",
            vec![auth(TENANT_KEY), user("tenant-a-dave")],
            200,
            Credential("Bearer cred-dave"),
        ),
        row(
            "enterprise key outside act_as",
            vec![auth(TENANT_KEY), user("tenant-b-erin")],
            403,
            Code("user_not_permitted"),
        ),
        row(
            "enterprise key outside act_as, unknown user",
            vec![auth(TENANT_KEY), user("zed")],
            403,
            Code("user_not_permitted"),
        ),
        row(
            "user with two credentials, none named",
            vec![auth(TENANT_KEY), user("carol")],
            400,
            Code("ambiguous_credential"),
        ),
        row(
            "user with two credentials, x-credential-id picks",
            vec![auth(TENANT_KEY), user("carol"), ("x-credential-id", "home".into())],
            200,
            Credential("Bearer cred-carol-home"),
        ),
        row(
            "x-credential-id naming no credential",
            vec![auth(TENANT_KEY), user("carol"), ("x-credential-id", "other".into())],
            403,
            Code("unknown_credential"),
        ),
        row(
            "user without a credential",
            vec![auth(ENTERPRISE_KEY), user("tenant-b-erin")],
            403,
            Code("missing_credential"),
        ),
        row("user id with a space", vec![auth(ENTERPRISE_KEY), user("alice bob")], 400, Code("invalid_user_id")),
        row("user id with a comma", vec![auth(ENTERPRISE_KEY), user("alice,bob")], 400, Code("invalid_user_id")),
        row("user id with a slash", vec![auth(ENTERPRISE_KEY), user("../alice")], 400, Code("invalid_user_id")),
        row("non-ASCII user id", vec![auth(ENTERPRISE_KEY), user("alïce")], 400, Code("invalid_user_id")),
        row("empty user id", vec![auth(ENTERPRISE_KEY), user("")], 400, Code("invalid_user_id")),
        row("user id over the limit", vec![auth(ENTERPRISE_KEY), user(&"a".repeat(129))], 400, Code("invalid_user_id")),
        row("two user headers", vec![auth(ENTERPRISE_KEY), user("alice"), user("bob")], 400, Code("invalid_user_id")),
        row(
            "two user headers, same value",
            vec![auth(ENTERPRISE_KEY), user("alice"), user("alice")],
            400,
            Code("invalid_user_id"),
        ),
    ]
}

async fn run_rows(unknown_user: &str, rows: Vec<Row>) -> Vec<serde_json::Value> {
    let (upstream, seen) = recording_upstream().await;
    let mut harness =
        Harness::start(&format!("{}\n[identity]\nunknown_user = \"{unknown_user}\"\n", base_config(upstream, "")))
            .await;
    let url = harness.url("/mcp/github");
    for row in &rows {
        let before = seen.lock().unwrap().len();
        let mut request = mcp_post(&url, &[]);
        for (name, value) in &row.headers {
            request.headers_mut().append(*name, http::HeaderValue::from_bytes(value.as_bytes()).unwrap());
        }
        let response = harness.send(request).await;
        assert_eq!(response.status().as_u16(), row.status, "{}", row.name);
        let calls = seen.lock().unwrap().len() - before;
        match row.expect {
            Expect::Credential(credential) => {
                assert_eq!(calls, 1, "{}: the upstream should be called once", row.name);
                let last = seen.lock().unwrap().last().cloned().unwrap();
                assert_eq!(last.headers["authorization"], credential, "{}", row.name);
            }
            Expect::Code(code) => {
                assert_eq!(calls, 0, "{}: a refused request must not reach the upstream", row.name);
                if row.status == 401 {
                    assert_eq!(response.headers()["www-authenticate"], "Bearer", "{}", row.name);
                }
                let body = json(response).await;
                assert_eq!(body["id"], "call-1", "{}: JSON-RPC error carries the request id", row.name);
                assert_eq!(body["error"]["data"]["code"], code, "{}", row.name);
            }
        }
    }
    harness.shutdown_and_read_audit().await
}

#[tokio::test]
async fn identity_rules_with_unknown_users_rejected() {
    let mut rows = common_rows();
    rows.push(row(
        "enterprise key naming an unknown user",
        vec![auth(ENTERPRISE_KEY), user("mallory")],
        403,
        Expect::Code("unknown_user"),
    ));
    rows.push(row(
        "unknown user inside the prefix",
        vec![auth(TENANT_KEY), user("tenant-a-ghost")],
        403,
        Expect::Code("unknown_user"),
    ));
    let count = rows.len();
    let audit = run_rows("reject", rows).await;
    assert_eq!(audit.len(), count, "one audit line per request");

    let line = |key: &str, requested: &str| {
        audit.iter().find(|l| l["key_id"] == key && l["requested_user"] == requested).unwrap()
    };
    assert_eq!(line("acme-backend", "mallory")["reason"], "unknown_user");
    assert_eq!(line("acme-backend", "mallory")["decision"], "deny");
    assert_eq!(line("acme-backend", "mallory")["acting_user"], serde_json::Value::Null);
    assert_eq!(line("tenant-a", "tenant-b-erin")["reason"], "user_not_permitted");
    assert_eq!(line("acme-backend", "tenant-b-erin")["reason"], "missing_credential");
    assert_eq!(line("acme-backend", "tenant-b-erin")["acting_user"], "tenant-b-erin");
    // Denied override attempts are on record with the key that tried.
    let forbidden: Vec<_> = audit.iter().filter(|l| l["reason"] == "user_override_forbidden").collect();
    assert_eq!(forbidden.len(), 2);
    assert!(forbidden.iter().all(|l| l["key_id"] == "bob-laptop" && l["key_kind"] == "standard"));
    assert_eq!(forbidden[0]["requested_user"], "alice");
    // Allowed overrides name both the requested and the acting user.
    let bob = audit.iter().find(|l| l["requested_user"] == "bob" && l["decision"] == "allow").unwrap();
    assert_eq!(bob["acting_user"], "bob");
    assert_eq!(bob["upstream"], "github");
    assert_eq!(bob["status"], 200);
    assert_eq!(bob["mcp_method"], "tools/call");
    // Malformed ids are refused and audited, but never written into the trail.
    let malformed = audit.iter().filter(|l| l["reason"] == "invalid_user_id").count();
    assert_eq!(malformed, 8);
    assert!(audit.iter().filter(|l| l["reason"] == "invalid_user_id").all(|l| l["requested_user"].is_null()));
}

#[tokio::test]
async fn identity_rules_with_unknown_users_falling_back_to_the_key_user() {
    let mut rows = common_rows();
    rows.push(row(
        "enterprise key naming an unknown user",
        vec![auth(ENTERPRISE_KEY), user("mallory")],
        200,
        Expect::Credential("Bearer cred-acme"),
    ));
    rows.push(row(
        "unknown user inside the prefix",
        vec![auth(TENANT_KEY), user("tenant-a-ghost")],
        200,
        Expect::Credential("Bearer cred-tenant-admin"),
    ));
    let audit = run_rows("default", rows).await;
    let fallback = audit.iter().find(|l| l["requested_user"] == "mallory" && l["key_id"] == "acme-backend").unwrap();
    assert_eq!(fallback["fallback"], true);
    assert_eq!(fallback["acting_user"], "acme-service");
    assert_eq!(fallback["decision"], "allow");
    // Malformed ids are never guessed into a user, whatever the policy says.
    assert_eq!(audit.iter().filter(|l| l["reason"] == "invalid_user_id").count(), 8);
    assert_eq!(audit.iter().filter(|l| l["fallback"] == true).count(), 2);
}

#[tokio::test]
async fn audit_and_logs_never_contain_secrets() {
    let audit = run_rows("reject", common_rows()).await;
    let text = serde_json::to_string(&audit).unwrap();
    for secret in [ENTERPRISE_KEY, ALICE_KEY, BOB_KEY, TENANT_KEY, "cred-alice", "cred-bob", "cred-acme", "cred-carol"]
    {
        assert!(!text.contains(secret), "audit trail contains {secret}");
    }
}
