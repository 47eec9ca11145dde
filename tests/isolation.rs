//! Tenant isolation as a property: random sequences of requests (keys, user headers, credential ids,
//! sessions, JSON-RPC bodies) go through the real proxy to a recording upstream, and whatever the mix:
//!
//! 1. a forwarded request carries its acting user's credential and no one else's: the credential's owner
//!    equals the `forward_user_header` value, which equals the user a small model of the identity rules
//!    expects (a standard key: its own user; an enterprise key: the named user, within `act_as`);
//! 2. a refused request (any non-2xx answer) never reached the upstream, and an allowed one reached it
//!    exactly once (matched by a unique `x-test-seq` header, which the proxy forwards as it is);
//! 3. every request writes exactly one audit line, and the chain verifies;
//! 4. no client API key reaches the upstream, in any header.
//!
//! Sessions are real: the upstream hands out a session id on every answer, the proxy binds it to the
//! acting user, and later requests replay (or tamper with) ids handed out to whichever user.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError};

const WRONG_KEY: &str = "wrong-key-0001";
const ALL_KEYS: [&str; 5] = [ALICE_KEY, BOB_KEY, ENTERPRISE_KEY, TENANT_KEY, WRONG_KEY];
const USER_HEADER: &str = "x-alloy-userid";
const ACTING_HEADER: &str = "x-acting-user";
const SEQ_HEADER: &str = "x-test-seq";

const FIELDS: &str =
    "forward_user_header = \"x-acting-user\"\n[upstreams.github.restrictions]\ntools = { block = [\"delete_*\"] }";

/// The users that exist in `base_config` (key users included).
const USERS: [&str; 7] = ["alice", "bob", "carol", "tenant-a-dave", "tenant-b-erin", "acme-service", "tenant-a-admin"];

/// Who owns each credential secret of `base_config`.
fn credential_owner(secret: &str) -> Option<&'static str> {
    Some(match secret {
        "cred-alice" => "alice",
        "cred-bob" => "bob",
        "cred-acme" => "acme-service",
        "cred-dave" => "tenant-a-dave",
        "cred-tenant-admin" => "tenant-a-admin",
        "cred-carol-work" | "cred-carol-home" => "carol",
        _ => return None,
    })
}

/// `(credential id, secret)` of each user's credentials for `github` in `base_config`.
fn credentials_of(user: &str) -> &'static [(&'static str, &'static str)] {
    match user {
        "alice" => &[("default", "cred-alice")],
        "bob" => &[("default", "cred-bob")],
        "acme-service" => &[("default", "cred-acme")],
        "tenant-a-dave" => &[("default", "cred-dave")],
        "tenant-a-admin" => &[("default", "cred-tenant-admin")],
        "carol" => &[("work", "cred-carol-work"), ("home", "cred-carol-home")],
        _ => &[], // tenant-b-erin has none
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    None,
    Wrong,
    Alice,
    Bob,
    Acme,
    Tenant,
}

impl Key {
    fn secret(self) -> Option<&'static str> {
        match self {
            Key::None => None,
            Key::Wrong => Some(WRONG_KEY),
            Key::Alice => Some(ALICE_KEY),
            Key::Bob => Some(BOB_KEY),
            Key::Acme => Some(ENTERPRISE_KEY),
            Key::Tenant => Some(TENANT_KEY),
        }
    }
}

/// A JSON-RPC id, as written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RpcId(&'static str);

impl RpcId {
    fn text(self) -> &'static str {
        self.0
    }
    /// A string, a number a JSON reader can hold, or `null`.
    fn valid(self) -> bool {
        !matches!(self.0, "true" | "{\"a\":1}" | "[1]" | "1e400")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Call(RpcId, &'static str),
    CallWithoutName(RpcId),
    List(RpcId),
    Ping(RpcId),
    Notification,
    /// A client's answer to a server request.
    Answer(RpcId),
}

impl Msg {
    fn json(&self) -> String {
        match self {
            Msg::Call(id, tool) => format!(
                r#"{{"jsonrpc":"2.0","id":{},"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#,
                id.text()
            ),
            Msg::CallWithoutName(id) => {
                format!(r#"{{"jsonrpc":"2.0","id":{},"method":"tools/call","params":{{}}}}"#, id.text())
            }
            Msg::List(id) => format!(r#"{{"jsonrpc":"2.0","id":{},"method":"tools/list"}}"#, id.text()),
            Msg::Ping(id) => format!(r#"{{"jsonrpc":"2.0","id":{},"method":"ping"}}"#, id.text()),
            Msg::Notification => r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_owned(),
            Msg::Answer(id) => format!(r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#, id.text()),
        }
    }
    fn valid(&self) -> bool {
        match self {
            Msg::Call(id, _) | Msg::List(id) | Msg::Ping(id) => id.valid(),
            Msg::CallWithoutName(_) => false,
            Msg::Notification => true,
            // `"id": null` is no id, and an answer needs one.
            Msg::Answer(id) => id.valid() && id.text() != "null",
        }
    }
    fn blocked(&self) -> bool {
        matches!(self, Msg::Call(_, tool) if tool.starts_with("delete_"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RpcBody {
    Single(Msg),
    Batch(Vec<Msg>),
    /// Not JSON, or not JSON-RPC.
    Bad(&'static str),
}

impl RpcBody {
    fn text(&self) -> String {
        match self {
            RpcBody::Single(m) => m.json(),
            RpcBody::Batch(ms) => format!("[{}]", ms.iter().map(Msg::json).collect::<Vec<_>>().join(",")),
            RpcBody::Bad(t) => (*t).to_owned(),
        }
    }
    fn acceptable(&self) -> bool {
        match self {
            RpcBody::Single(m) => m.valid() && !m.blocked(),
            RpcBody::Batch(ms) => ms.iter().all(|m| m.valid() && !m.blocked()),
            RpcBody::Bad(_) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Session {
    None,
    /// An id the proxy never handed out.
    Bogus(String),
    /// The id handed out to an earlier allowed request of this case (index modulo their number).
    Replay(usize),
    /// The same, with the last character of its tag changed.
    Tampered(usize),
}

#[derive(Debug, Clone)]
struct Req {
    key: Key,
    /// Values of the user header (none, one, or a duplicate).
    users: Vec<String>,
    /// Values of `x-credential-id`.
    credential_ids: Vec<&'static str>,
    /// A client copy of the `forward_user_header`, which the proxy must replace.
    forged_acting_user: Option<&'static str>,
    session: Session,
    content_type: Option<&'static str>,
    body: RpcBody,
}

/// A session id the proxy handed out: to whom (the acting user), as the client saw it, as the upstream made it.
#[derive(Debug, Clone)]
struct Handed {
    owner: String,
    bound: String,
    upstream_id: String,
}

/// What the model says about a request: refused, or forwarded as `user` with the credential `secret`,
/// presenting the upstream's own session id `session`.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Refused(&'static str),
    Forwarded { user: String, secret: &'static str, session: Option<String> },
}

fn valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b':' | b'-'))
}

fn glob(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The identity rules: who a request acts as, if anyone.
fn acting_user(key: Key, users: &[String]) -> Result<String, &'static str> {
    let (own, act_as): (&str, Option<&[&str]>) = match key {
        Key::None | Key::Wrong => return Err("no valid key"),
        Key::Alice => ("alice", None),
        Key::Bob => ("bob", None),
        Key::Acme => ("acme-service", Some(&["*"])),
        Key::Tenant => ("tenant-a-admin", Some(&["tenant-a-*", "carol"])),
    };
    let name = match users {
        [] => return Ok(own.to_owned()),
        [one] => one,
        _ => return Err("duplicate user header"),
    };
    if !valid_user_id(name) {
        return Err("malformed user header");
    }
    if name == own {
        return Ok(own.to_owned());
    }
    let Some(patterns) = act_as else { return Err("standard key names another user") };
    if !patterns.iter().any(|p| glob(p, name)) {
        return Err("outside act_as");
    }
    if !USERS.contains(&name.as_str()) {
        return Err("unknown user");
    }
    Ok(name.clone())
}

fn expect(req: &Req, handed: &[Handed]) -> Expect {
    let user = match acting_user(req.key, &req.users) {
        Ok(user) => user,
        Err(why) => return Expect::Refused(why),
    };
    let session = match &req.session {
        Session::None => None,
        Session::Bogus(_) => return Expect::Refused("bogus session"),
        Session::Tampered(_) if !handed.is_empty() => return Expect::Refused("tampered session"),
        Session::Replay(i) if !handed.is_empty() => {
            let h = &handed[i % handed.len()];
            if h.owner != user {
                return Expect::Refused("another user's session");
            }
            Some(h.upstream_id.clone())
        }
        Session::Replay(_) | Session::Tampered(_) => None, // nothing handed out yet: sent without one
    };
    if !req.body.acceptable() {
        return Expect::Refused("body not JSON-RPC or tool blocked");
    }
    let credentials = credentials_of(&user);
    let secret = match req.credential_ids.as_slice() {
        _ if credentials.is_empty() => return Expect::Refused("no credential"),
        [] => match credentials {
            [(_, only)] => *only,
            _ => match credentials.iter().find(|(id, _)| *id == "default") {
                Some((_, secret)) => *secret,
                None => return Expect::Refused("ambiguous credential"),
            },
        },
        [id] => match credentials.iter().find(|(cid, _)| cid == id) {
            Some((_, secret)) => *secret,
            None => return Expect::Refused("unknown or malformed credential id"),
        },
        _ => return Expect::Refused("duplicate credential id"),
    };
    Expect::Forwarded { user, secret, session }
}

// ---- strategies ----

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![
        1 => Just(Key::None),
        1 => Just(Key::Wrong),
        3 => Just(Key::Alice),
        3 => Just(Key::Bob),
        4 => Just(Key::Acme),
        4 => Just(Key::Tenant),
    ]
}

fn user_value() -> impl Strategy<Value = String> {
    let existing = proptest::sample::select(USERS.to_vec()).prop_map(str::to_owned);
    let unknown = proptest::sample::select(vec!["tenant-a-zed", "mallory", "Alice", "tenant-a-DAVE", "carol2"])
        .prop_map(str::to_owned);
    let malformed = prop_oneof![
        Just("alice bob".to_owned()),
        Just("alice,bob".to_owned()),
        Just("tenant-a-dave/../carol".to_owned()),
        Just("carol;x".to_owned()),
        Just("ca\trol".to_owned()),
        Just("caf\u{e9}".to_owned()),
        Just("\"carol\"".to_owned()),
        Just("tenant-a-*".to_owned()),
        Just("a".repeat(129)),
        Just(format!("tenant-a-{}", "d".repeat(1000))),
    ];
    prop_oneof![8 => existing, 1 => unknown, 2 => malformed, 1 => Just("u".repeat(128))]
}

fn users() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        8 => Just(Vec::new()),
        6 => user_value().prop_map(|u| vec![u]),
        1 => prop_oneof![
            (user_value(), user_value()).prop_map(|(a, b)| vec![a, b]),
            user_value().prop_map(|u| vec![u.clone(), u]),
        ],
    ]
}

fn credential_ids() -> impl Strategy<Value = Vec<&'static str>> {
    let odd = proptest::sample::select(vec!["default", "bogus", "bad id", "work,home", "Work"]);
    let one = prop_oneof![2 => Just("work"), 2 => Just("home"), 1 => odd];
    prop_oneof![
        8 => Just(Vec::new()),
        4 => one.prop_map(|c| vec![c]),
        1 => prop_oneof![Just(vec!["work", "work"]), Just(vec!["work", "home"])],
    ]
}

fn rpc_id() -> impl Strategy<Value = RpcId> {
    let valid = proptest::sample::select(vec![
        "1",
        "-7",
        "0",
        "1.5",
        "1e3",
        "123456789012345678901234567890",
        "\"abc\"",
        "\"\"",
        "\"\\u00e9\\n\"",
        "null",
    ]);
    let invalid = proptest::sample::select(vec!["true", "{\"a\":1}", "[1]", "1e400"]);
    prop_oneof![19 => valid, 1 => invalid].prop_map(RpcId)
}

fn msg() -> impl Strategy<Value = Msg> {
    let tool = prop_oneof![
        3 => Just("whoami"),
        2 => Just("search"),
        1 => Just("undelete_repo"),
        1 => Just("delete_repo"),
        1 => Just("delete_"),
    ];
    prop_oneof![
        6 => (rpc_id(), tool).prop_map(|(id, t)| Msg::Call(id, t)),
        1 => rpc_id().prop_map(Msg::CallWithoutName),
        2 => rpc_id().prop_map(Msg::List),
        2 => rpc_id().prop_map(Msg::Ping),
        1 => Just(Msg::Notification),
        1 => rpc_id().prop_map(Msg::Answer),
    ]
}

fn rpc_body() -> impl Strategy<Value = RpcBody> {
    let bad = proptest::sample::select(vec![
        "",
        "{not json",
        "[1,",
        "[]",
        "[1]",
        "\"ping\"",
        r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
        r#"{"id":1,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
    ]);
    prop_oneof![
        12 => msg().prop_map(RpcBody::Single),
        2 => prop::collection::vec(msg(), 1..4).prop_map(RpcBody::Batch),
        1 => bad.prop_map(RpcBody::Bad),
    ]
}

fn session() -> impl Strategy<Value = Session> {
    let bogus = proptest::sample::select(vec!["up-0", "up-0.0000000000000000", "nope", "up-1.zz", "."]);
    prop_oneof![
        8 => Just(Session::None),
        1 => bogus.prop_map(|s| Session::Bogus(s.to_owned())),
        4 => any::<usize>().prop_map(Session::Replay),
        1 => any::<usize>().prop_map(Session::Tampered),
    ]
}

fn req() -> impl Strategy<Value = Req> {
    let content_type = proptest::sample::select(vec![Some("application/json"), Some("text/plain"), None]);
    let forged = proptest::option::weighted(0.3, proptest::sample::select(vec!["alice", "acme-service", "carol"]));
    (key(), users(), credential_ids(), forged, session(), content_type, rpc_body()).prop_map(
        |(key, users, credential_ids, forged_acting_user, session, content_type, body)| Req {
            key,
            users,
            credential_ids,
            forged_acting_user,
            session,
            content_type,
            body,
        },
    )
}

// ---- the upstream ----

/// Records every request and hands out a session id `up-<x-test-seq>` on every answer.
async fn session_upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    recording_upstream_answering(|seen| {
        let seq = seen.headers.get(SEQ_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("none");
        let mut response = Response::new(common::body(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#));
        response.headers_mut().insert("mcp-session-id", HeaderValue::from_str(&format!("up-{seq}")).unwrap());
        response
    })
    .await
}

// ---- one case ----

fn request(url: &str, seq: usize, req: &Req, handed: &[Handed]) -> Request<TestBody> {
    let mut builder = Request::post(url).header("accept", "application/json, text/event-stream");
    builder = builder.header(SEQ_HEADER, seq.to_string());
    if let Some(ct) = req.content_type {
        builder = builder.header("content-type", ct);
    }
    if let Some(secret) = req.key.secret() {
        builder = builder.header("authorization", format!("Bearer {secret}"));
    }
    for user in &req.users {
        builder = builder.header(USER_HEADER, HeaderValue::from_bytes(user.as_bytes()).unwrap());
    }
    for id in &req.credential_ids {
        builder = builder.header("x-credential-id", *id);
    }
    if let Some(forged) = req.forged_acting_user {
        builder = builder.header(ACTING_HEADER, forged);
    }
    let session = match &req.session {
        Session::None => None,
        Session::Bogus(s) => Some(s.clone()),
        Session::Replay(i) if !handed.is_empty() => Some(handed[i % handed.len()].bound.clone()),
        Session::Tampered(i) if !handed.is_empty() => {
            let mut s = handed[i % handed.len()].bound.clone();
            let last = s.pop().unwrap();
            s.push(if last == '0' { '1' } else { '0' });
            Some(s)
        }
        Session::Replay(_) | Session::Tampered(_) => None,
    };
    if let Some(session) = session {
        builder = builder.header("mcp-session-id", session);
    }
    builder.body(common::body(req.body.text())).unwrap()
}

fn header_str<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.headers.get_all(name).iter().map(|v| v.to_str().unwrap_or("<not ASCII>")).collect()
}

/// Counts across cases, for the report at the end.
static TOTALS: Mutex<(usize, usize, usize)> = Mutex::new((0, 0, 0)); // (cases, requests, forwarded)

async fn run_case(reqs: &[Req]) -> Result<(), String> {
    let (upstream, seen) = session_upstream().await;
    let mut harness = Harness::start(&base_config(upstream, FIELDS)).await;
    let url = harness.url("/mcp/github");
    let mut handed: Vec<Handed> = Vec::new();
    let mut expected: Vec<Expect> = Vec::new();
    let mut failures: Vec<String> = Vec::new();

    for (seq, req) in reqs.iter().enumerate() {
        let want = expect(req, &handed);
        let sent = request(&url, seq, req, &handed);
        let response = tokio::time::timeout(Duration::from_secs(20), harness.send(sent))
            .await
            .map_err(|_| format!("#{seq} got no answer in 20 s: {req:?}"))?;
        let status = response.status();
        let bound = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let _ = response.into_body().collect().await;
        match (&want, status.is_success()) {
            (Expect::Forwarded { user, .. }, true) => match bound {
                Some(bound) => handed.push(Handed { owner: user.clone(), bound, upstream_id: format!("up-{seq}") }),
                None => failures.push(format!("#{seq}: the upstream's session id was not handed out")),
            },
            (Expect::Refused(_), false) => {}
            _ => failures.push(format!("#{seq}: model says {want:?}, proxy answered {status}: {req:?}")),
        }
        expected.push(want);
    }

    let lines = harness.shutdown_and_read_audit().await;
    let seen = seen.lock().unwrap().clone();

    // Property 1 (without the model): the credential's owner is the user the proxy says it acts as.
    // Property 4: no API key in any header the upstream saw; nor the user header or credential id.
    for (i, s) in seen.iter().enumerate() {
        let auth = header_str(s, "authorization");
        let acting = header_str(s, ACTING_HEADER);
        let owner = match auth.as_slice() {
            [one] => one.strip_prefix("Bearer ").and_then(credential_owner),
            _ => None,
        };
        if owner.is_none() || acting.len() != 1 || owner != Some(acting[0]) {
            failures
                .push(format!("upstream record {i}: authorization {auth:?} (owner {owner:?}) but acting {acting:?}"));
        }
        for (name, value) in &s.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            if let Some(key) = ALL_KEYS.iter().find(|k| value.contains(*k)) {
                failures.push(format!("upstream record {i}: API key {key} in header {name}"));
            }
        }
        for name in [USER_HEADER, "x-credential-id"] {
            if s.headers.contains_key(name) {
                failures.push(format!("upstream record {i}: client header {name} reached the upstream"));
            }
        }
    }

    // Properties 1 and 2, request by request: allowed ones reached the upstream exactly once, as the model's
    // user, with that user's expected credential and session; refused ones never did.
    let mut forwarded = 0;
    for (seq, want) in expected.iter().enumerate() {
        let records: Vec<&Seen> =
            seen.iter().filter(|s| header_str(s, SEQ_HEADER) == [seq.to_string().as_str()]).collect();
        match want {
            Expect::Refused(why) if !records.is_empty() => failures.push(format!(
                "#{seq}: refused by the model ({why}) but reached the upstream {} time(s)",
                records.len()
            )),
            Expect::Refused(_) => {}
            Expect::Forwarded { user, secret, session } => {
                forwarded += 1;
                let [record] = records.as_slice() else {
                    failures.push(format!("#{seq}: allowed, reached the upstream {} times", records.len()));
                    continue;
                };
                let auth = header_str(record, "authorization");
                let acting = header_str(record, ACTING_HEADER);
                let sessions = header_str(record, "mcp-session-id");
                let want_auth = format!("Bearer {secret}");
                if auth != [want_auth.as_str()] || acting != [user.as_str()] {
                    failures
                        .push(format!("#{seq}: expected {user} with {secret}, upstream saw {auth:?} as {acting:?}"));
                }
                if sessions != session.iter().map(String::as_str).collect::<Vec<_>>() {
                    failures.push(format!("#{seq}: expected upstream session {session:?}, upstream saw {sessions:?}"));
                }
            }
        }
    }
    if seen.len() != forwarded {
        failures.push(format!("{} upstream records for {forwarded} allowed requests", seen.len()));
    }

    // Property 3: one audit line per request, allowed ones as allowed, and the chain verifies.
    if lines.len() != reqs.len() {
        failures.push(format!("{} audit lines for {} requests", lines.len(), reqs.len()));
    }
    if lines.iter().any(|l| l["request_id"].as_str().is_none()) {
        failures.push("an audit line without request_id".to_owned());
    }
    let allowed = lines.iter().filter(|l| l["decision"] == "allow").count();
    if allowed != forwarded {
        failures.push(format!("{allowed} audit lines say allow, {forwarded} requests were allowed"));
    }
    let bytes = std::fs::read(&harness.audit).unwrap();
    match mcp_tenant_proxy::telemetry::audit::verify(&bytes[..], false) {
        Ok(n) if n == reqs.len() => {}
        other => failures.push(format!("audit verify: {other:?} for {} requests", reqs.len())),
    }

    {
        let mut totals = TOTALS.lock().unwrap();
        totals.0 += 1;
        totals.1 += reqs.len();
        totals.2 += forwarded;
    }
    if failures.is_empty() {
        return Ok(());
    }
    let listing: String = reqs.iter().enumerate().map(|(i, r)| format!("  #{i}: {r:?}\n")).collect();
    Err(format!("{}\nrequests:\n{listing}", failures.join("\n")))
}

#[test]
fn no_request_acts_as_anyone_but_its_acting_user() {
    let config = ProptestConfig {
        // PROPTEST_CASES=1000 for a longer search.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let started = Instant::now();
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&prop::collection::vec(req(), 1..40), |reqs| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run_case(&reqs)).map_err(TestCaseError::fail)
    });
    let (cases, requests, forwarded) = *TOTALS.lock().unwrap();
    eprintln!("{cases} cases, {requests} requests, {forwarded} forwarded, in {:?}", started.elapsed());
    if let Err(error) = result {
        panic!("{error}");
    }
}
