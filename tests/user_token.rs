//! Proven identity over real HTTP: JWT user tokens (`[identity.user_token]`) signed by keys made in the
//! test, their key set served on loopback (fetched, rotated, unreachable) or read from a file.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use http::Response;
use mcp_tenant_proxy::store::crypto::MasterKey;
use ring::rand::SystemRandom;
use ring::signature::{self, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "mcp-tenant-proxy";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key of the issuer, with its public JWK.
enum Signer {
    Ed(Ed25519KeyPair),
    Ec(EcdsaKeyPair),
    Rsa(ring::rsa::KeyPair),
}

struct IssuerKey {
    kid: &'static str,
    signer: Signer,
}

impl IssuerKey {
    fn ed(kid: &'static str) -> IssuerKey {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        IssuerKey { kid, signer: Signer::Ed(Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()) }
    }

    fn ec(kid: &'static str) -> IssuerKey {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap();
        IssuerKey { kid, signer: Signer::Ec(pair) }
    }

    /// RSA 2048, made by openssl (ring signs with RSA keys but does not make them).
    fn rsa(kid: &'static str) -> IssuerKey {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-outform", "DER"])
            .output()
            .expect("openssl is installed");
        assert!(out.status.success());
        IssuerKey { kid, signer: Signer::Rsa(ring::rsa::KeyPair::from_der(&out.stdout).unwrap()) }
    }

    fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Ed(_) => "EdDSA",
            Signer::Ec(_) => "ES256",
            Signer::Rsa(_) => "RS256",
        }
    }

    fn jwk(&self) -> Value {
        match &self.signer {
            Signer::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "x": b64(k.public_key().as_ref())})
            }
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "x": b64(&p[1..33]), "y": b64(&p[33..])})
            }
            Signer::Rsa(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "n": b64(&c.n), "e": b64(&c.e)})
            }
        }
    }

    fn sign_with_header(&self, header: Value, claims: Value) -> String {
        let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig = match &self.signer {
            Signer::Ed(k) => k.sign(signed.as_bytes()).as_ref().to_vec(),
            Signer::Ec(k) => k.sign(&SystemRandom::new(), signed.as_bytes()).unwrap().as_ref().to_vec(),
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), signed.as_bytes(), &mut sig).unwrap();
                sig
            }
        };
        format!("{signed}.{}", b64(&sig))
    }

    fn sign(&self, claims: Value) -> String {
        self.sign_with_header(json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}), claims)
    }

    /// A token for `user`, valid for ten minutes.
    fn token(&self, user: &str) -> String {
        self.sign(claims(user, 600))
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn claims(user: &str, expires_in: i64) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() + expires_in, "iat": now(), "userId": user})
}

fn set_of(keys: &[&IssuerKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// `keys` written as a key file in `dir`, and the config line that names it.
fn key_file(dir: &std::path::Path, keys: &[&IssuerKey]) -> String {
    let file = dir.join("jwks.json");
    std::fs::write(&file, set_of(keys)).unwrap();
    format!("jwks_file = \"{}\"", file.display())
}

/// The issuer's key-set endpoint: serves whatever `set` holds and counts the fetches.
struct KeyServer {
    addr: std::net::SocketAddr,
    set: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

async fn key_server(initial: String) -> KeyServer {
    let (set, fetches) = (Arc::new(Mutex::new(initial)), Arc::new(AtomicUsize::new(0)));
    let (serve, count) = (set.clone(), fetches.clone());
    let addr = spawn_http(move |_req| {
        let body = serve.lock().unwrap().clone();
        count.fetch_add(1, Ordering::SeqCst);
        async move { Response::new(common::body(body)) }
    })
    .await;
    KeyServer { addr, set, fetches }
}

/// The shared config plus `[identity.user_token]` with `keys_line` (jwks_url or jwks_file) and a
/// required-token enterprise key and an ignoring one.
fn config(upstream: std::net::SocketAddr, keys_line: &str) -> String {
    format!(
        r#"{base}
[[keys]]
id = "portal"
kind = "enterprise"
secret = "portal-key-0001"
user = "acme-service"
act_as = ["*"]
user_token = "required"

[[keys]]
id = "batch"
kind = "enterprise"
secret = "batch-key-0001"
user = "acme-service"
act_as = ["*"]
user_token = "ignored"

[identity.user_token]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
{keys_line}
"#,
        base = base_config(upstream, ""),
    )
}

const PORTAL_KEY: &str = "portal-key-0001";
const BATCH_KEY: &str = "batch-key-0001";

/// Sends a `tools/call` with the key, the user token (when given) and other headers.
async fn call(h: &Harness, key: &str, token: Option<&str>, extra: &[(&str, &str)]) -> (u16, Value) {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend(token.map(|t| ("x-alloy-user-token", t)));
    headers.extend_from_slice(extra);
    let response = h.send(mcp_post(&h.url("/mcp/github"), &headers)).await;
    let status = response.status().as_u16();
    (status, json(response).await)
}

/// A refusal: its name, the API key, the user token, other headers, and the status and code it gets.
type Row<'a> = (&'a str, &'a str, Option<&'a str>, Vec<(&'a str, &'a str)>, u16, &'a str);

fn code(body: &Value) -> &str {
    body["error"]["data"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_user_token_proves_the_user_and_every_bad_token_is_refused_before_the_upstream() {
    let (upstream, seen) = recording_upstream().await;
    let (rsa, ed) = (IssuerKey::rsa("rsa-1"), IssuerKey::ed("ed-1"));
    let keys = key_server(set_of(&[&rsa, &ed])).await;
    let mut h = Harness::start(&config(upstream, &format!("jwks_url = \"http://{}/jwks\"", keys.addr))).await;
    let credential = |i: usize| seen.lock().unwrap()[i].headers["authorization"].to_str().unwrap().to_owned();

    // Proven: the token's user acts, with that user's credential, and the token does not reach the upstream.
    let (status, body) = call(&h, ENTERPRISE_KEY, Some(&rsa.token("alice")), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(credential(0), "Bearer cred-alice");
    assert!(!seen.lock().unwrap()[0].headers.contains_key("x-alloy-user-token"));
    // EdDSA too; the user header may repeat the token's user.
    let (status, _) = call(&h, PORTAL_KEY, Some(&ed.token("bob")), &[("x-alloy-userid", "bob")]).await;
    assert_eq!((status, credential(1)), (200, "Bearer cred-bob".to_owned()));
    // Only the configured claim names the user: a token whose `sub` names one is not read by it.
    let sub = rsa.sign(json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() + 60, "sub": "carol"}));
    // One fetch of the key set served all of them.
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1);

    let public_key = b64(match &ed.signer {
        Signer::Ed(k) => k.public_key().as_ref(),
        _ => unreachable!(),
    });
    let hmac_with_public_key = {
        let header = json!({"alg": "HS256", "kid": "ed-1"});
        let signed =
            format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims("alice", 60).to_string().as_bytes()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public_key.as_bytes());
        format!("{signed}.{}", b64(ring::hmac::sign(&key, signed.as_bytes()).as_ref()))
    };
    let unsigned = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(claims("alice", 60).to_string().as_bytes()));
    let expired = rsa.sign(claims("alice", -120));
    let not_yet =
        rsa.sign(json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() + 900, "nbf": now() + 600, "userId": "alice"}));
    let exp_as_string =
        rsa.sign(json!({"iss": ISSUER, "aud": AUDIENCE, "exp": (now() - 10).to_string(), "userId": "alice"}));
    let other_audience = rsa.sign(json!({"iss": ISSUER, "aud": "another-api", "exp": now() + 60, "userId": "alice"}));
    let other_issuer =
        rsa.sign(json!({"iss": "https://evil.test", "aud": AUDIENCE, "exp": now() + 60, "userId": "alice"}));
    let bad_user = rsa.token("alice\nbob");
    let forged = {
        let mut parts: Vec<String> = rsa.token("alice").split('.').map(str::to_owned).collect();
        parts[1] = b64(claims("bob", 60).to_string().as_bytes());
        parts.join(".")
    };
    let (ed_alice, rsa_bob, rsa_alice) = (ed.token("alice"), rsa.token("bob"), rsa.token("alice"));
    let rows: Vec<Row> = vec![
        ("required token missing", PORTAL_KEY, None, vec![("x-alloy-userid", "alice")], 401, "user_token_required"),
        (
            "header and token disagree",
            ENTERPRISE_KEY,
            Some(&ed_alice),
            vec![("x-alloy-userid", "bob")],
            400,
            "user_token_mismatch",
        ),
        (
            "HMAC keyed with the public key",
            ENTERPRISE_KEY,
            Some(&hmac_with_public_key),
            vec![],
            401,
            "invalid_user_token",
        ),
        ("alg none", PORTAL_KEY, Some(&unsigned), vec![], 401, "invalid_user_token"),
        ("expired", ENTERPRISE_KEY, Some(&expired), vec![], 401, "invalid_user_token"),
        ("not valid yet", ENTERPRISE_KEY, Some(&not_yet), vec![], 401, "invalid_user_token"),
        ("exp of the wrong type", ENTERPRISE_KEY, Some(&exp_as_string), vec![], 401, "invalid_user_token"),
        ("another audience", ENTERPRISE_KEY, Some(&other_audience), vec![], 401, "invalid_user_token"),
        ("another issuer", ENTERPRISE_KEY, Some(&other_issuer), vec![], 401, "invalid_user_token"),
        ("payload changed", ENTERPRISE_KEY, Some(&forged), vec![], 401, "invalid_user_token"),
        ("malformed user id in the claim", ENTERPRISE_KEY, Some(&bad_user), vec![], 400, "invalid_user_id"),
        ("sub, not the configured claim", ENTERPRISE_KEY, Some(&sub), vec![], 401, "invalid_user_token"),
        ("not a JWT", ENTERPRISE_KEY, Some("opaque-session-token"), vec![], 401, "invalid_user_token"),
        // The key's reach still applies to a proven user.
        ("outside act_as", TENANT_KEY, Some(&rsa_bob), vec![], 403, "user_not_permitted"),
        ("standard key, another user", BOB_KEY, Some(&rsa_alice), vec![], 403, "user_override_forbidden"),
    ];
    for (name, key, token, extra, status, want) in &rows {
        let (got, body) = call(&h, key, *token, extra).await;
        assert_eq!((got, code(&body)), (*status, *want), "{name}: {body}");
        assert_eq!(body["id"], "call-1", "{name}");
    }
    assert_eq!(seen.lock().unwrap().len(), 2, "no refused request reached the upstream");
    // A key that ignores tokens acts by the header alone, even with a bad token, and strips it.
    let (status, _) = call(&h, BATCH_KEY, Some("garbage"), &[("x-alloy-userid", "bob")]).await;
    assert_eq!((status, credential(2)), (200, "Bearer cred-bob".to_owned()));
    assert!(!seen.lock().unwrap()[2].headers.contains_key("x-alloy-user-token"));
    // A standard key with a token for its own user is served.
    let (status, _) = call(&h, BOB_KEY, Some(&ed.token("bob")), &[]).await;
    assert_eq!(status, 200);

    let audit = h.shutdown_and_read_audit().await;
    let proven: Vec<&Value> = audit.iter().filter(|l| l["user_proof"] == "token").collect();
    assert_eq!(proven[0]["acting_user"], "alice");
    assert_eq!(proven[0]["token_issuer"], ISSUER);
    assert_eq!(proven[0]["decision"], "allow");
    let batch = audit.iter().find(|l| l["key_id"] == "batch").unwrap();
    assert_eq!(batch["user_proof"], Value::Null, "an ignored token proves nothing");
    let outside = audit.iter().find(|l| l["reason"] == "user_not_permitted").unwrap();
    assert_eq!((&outside["user_proof"], &outside["requested_user"]), (&json!("token"), &json!("bob")));
    let text = serde_json::to_string(&audit).unwrap();
    assert!(!text.contains(&rsa.token("alice")[..40]), "no token in the audit trail");
}

#[tokio::test]
async fn a_rotated_key_set_is_fetched_once_for_many_concurrent_tokens_and_withdrawn_keys_stop_working() {
    let (upstream, _seen) = recording_upstream().await;
    let (old, new) = (IssuerKey::ec("2026-11"), IssuerKey::ed("2026-12"));
    let keys = key_server(set_of(&[&old])).await;
    // No least time between fetches for unknown keys here: the rotation comes right after the first fetch.
    let url = format!("jwks_url = \"http://{}/jwks\"\njwks_min_refetch = \"0s\"", keys.addr);
    let h = Harness::start(&config(upstream, &url)).await;
    assert_eq!(call(&h, PORTAL_KEY, Some(&old.token("alice")), &[]).await.0, 200);
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1);

    // The issuer rotates: a token of the new key makes the proxy fetch the set again, once, even with
    // many such requests at the same time.
    *keys.set.lock().unwrap() = set_of(&[&new]);
    let token = new.token("bob");
    let answers = futures_util::future::join_all((0..20).map(|_| call(&h, PORTAL_KEY, Some(&token), &[]))).await;
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 2);
    // The withdrawn key's tokens no longer verify.
    let (status, body) = call(&h, PORTAL_KEY, Some(&old.token("alice")), &[]).await;
    assert_eq!((status, code(&body)), (401, "invalid_user_token"));

    assert_eq!(keys.fetches.load(Ordering::SeqCst), 3, "an unknown key fetches again");
}

#[tokio::test]
async fn tokens_with_made_up_keys_fetch_the_key_set_at_most_once_per_interval() {
    let (upstream, _seen) = recording_upstream().await;
    let real = IssuerKey::ed("real");
    let keys = key_server(set_of(&[&real])).await;
    // The default jwks_min_refetch, 10 s.
    let h = Harness::start(&config(upstream, &format!("jwks_url = \"http://{}/jwks\"", keys.addr))).await;
    assert_eq!(call(&h, PORTAL_KEY, Some(&real.token("alice")), &[]).await.0, 200);
    for n in 0..10 {
        let stranger = IssuerKey::ed(["made-up-1", "made-up-2"][n % 2]);
        let (status, body) = call(&h, PORTAL_KEY, Some(&stranger.token("alice")), &[]).await;
        assert_eq!((status, code(&body)), (401, "invalid_user_token"));
    }
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1, "no fetch within 10 s of the last one");
}

#[tokio::test]
async fn an_unreachable_key_set_is_a_clear_503_and_a_key_file_needs_no_network() {
    let (upstream, seen) = recording_upstream().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let ec = IssuerKey::ec("file-key");
    let h = Harness::start(&config(upstream, &format!("jwks_url = \"http://{closed}/jwks\""))).await;
    let (status, body) = call(&h, PORTAL_KEY, Some(&ec.token("alice")), &[]).await;
    assert_eq!((status, code(&body)), (503, "user_token_keys_unavailable"), "{body}");
    assert!(seen.lock().unwrap().is_empty());

    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&config(upstream, &key_file(dir.path(), &[&ec]))).await;
    let (status, _) = call(&h, PORTAL_KEY, Some(&ec.token("alice")), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen.lock().unwrap()[0].headers["authorization"], "Bearer cred-alice");
}

#[test]
fn bad_user_token_settings_are_refused_with_their_path() {
    let problems = |section: &str| {
        let text = format!("{}\n{section}", base_config("127.0.0.1:9".parse().unwrap(), ""));
        match mcp_tenant_proxy::config::Config::from_toml(&text, std::path::Path::new(".")) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let both = "[identity.user_token]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"http://x/j\"\njwks_file = \"j\"";
    assert!(problems(both).contains("exactly one of jwks_url and jwks_file"), "{}", problems(both));
    let mode = "[identity.user_token]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"http://x/j\"\nmode = \"maybe\"";
    assert!(problems(mode).contains("identity.user_token.mode"), "{}", problems(mode));
    let no_aud = "[identity.user_token]\nissuer = \"i\"\njwks_url = \"http://x/j\"";
    assert!(problems(no_aud).contains("audience"), "{}", problems(no_aud));
    let same = "[identity.user_token]\nheader = \"x-alloy-userid\"\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"http://x/j\"";
    assert!(problems(same).contains("must differ from identity.user_header"), "{}", problems(same));
    let ftp = "[identity.user_token]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"ftp://x/j\"";
    assert!(problems(ftp).contains("jwks_url"), "{}", problems(ftp));
    // Whoever can change the keys can forge any user: plain http only on loopback.
    let plain = "[identity.user_token]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"http://idp.example/j\"";
    assert!(problems(plain).contains("must be an https:// URL"), "{}", problems(plain));
    for loopback in ["http://127.0.0.1:9/j", "http://[::1]:9/j", "http://localhost/j"] {
        let ok = format!("[identity.user_token]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"{loopback}\"");
        assert_eq!(problems(&ok), "", "{loopback}");
    }
    // A key's mode with no section to read tokens by would let the user header decide: refused.
    let orphan = "[[keys]]\nid = \"k\"\nkind = \"standard\"\nsecret = \"k-0000000001\"\nuser = \"alice\"\nuser_token = \"required\"";
    assert!(
        problems(orphan).contains("keys[4].user_token: needs an [identity.user_token] section"),
        "{}",
        problems(orphan)
    );
    let key_mode = "[identity.user_token]\nissuer = \"i\"\naudience = \"a\"\njwks_url = \"https://x/j\"\n[[keys]]\nid = \"k\"\nkind = \"standard\"\nsecret = \"k-0000000001\"\nuser = \"alice\"\nuser_token = \"sometimes\"";
    assert!(problems(key_mode).contains("keys[4].user_token"), "{}", problems(key_mode));
}

#[tokio::test]
async fn old_keys_are_fetched_again_behind_the_requests_so_a_hung_issuer_holds_none_up() {
    let (upstream, _seen) = recording_upstream().await;
    let key = IssuerKey::ed("k");
    let set = set_of(&[&key]);
    // The first fetch is answered; every later one hangs until `release`.
    let (fetches, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::Notify::new()));
    let (count, gate) = (fetches.clone(), release.clone());
    let addr = spawn_http(move |_req| {
        let (set, gate) = (set.clone(), gate.clone());
        let n = count.fetch_add(1, Ordering::SeqCst);
        async move {
            if n > 0 {
                gate.notified().await;
            }
            Response::new(common::body(set))
        }
    })
    .await;
    // Every set is old at once: each request would fetch, if requests waited for fetches of old keys.
    let url = format!("jwks_url = \"http://{addr}/jwks\"\njwks_max_age = \"0s\"");
    let h = Harness::start(&config(upstream, &url)).await;
    assert_eq!(call(&h, PORTAL_KEY, Some(&key.token("alice")), &[]).await.0, 200);
    let bob = key.token("bob");
    for _ in 0..5 {
        // A hang guard, not a measurement: a request that waited on the hung fetch would take its 5 s.
        let answer = tokio::time::timeout(std::time::Duration::from_secs(3), call(&h, PORTAL_KEY, Some(&bob), &[]));
        assert_eq!(answer.await.expect("the request waited for the issuer").0, 200);
    }
    // The fetch behind them reaches the issuer (it took the one place to fetch before the first of them
    // answered, so no other request started one).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fetches.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "no fetch behind the requests");
        tokio::task::yield_now().await;
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "one fetch behind the requests, not one each");
    release.notify_waiters();
}

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// The app on `config_text` plus a store in `dir` under `master`, with the admin API on [`ADMIN_TOKEN`].
async fn start_with_store(
    dir: &std::path::Path,
    master: &mcp_tenant_proxy::secret::Secret,
    config_text: &str,
) -> mcp_tenant_proxy::app::App {
    std::fs::write(dir.join("master.key"), format!("{}\n", master.expose())).unwrap();
    std::fs::write(dir.join("admin.token"), ADMIN_TOKEN).unwrap();
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"";
    assert!(config_text.contains(admin), "base_config's [admin] table moved");
    let text = config_text.replacen(admin, &format!("{admin}\ntoken_file = \"admin.token\""), 1);
    let text = format!(
        "[store]\npath = \"store.db\"\nmaster_key_file = \"master.key\"\n[audit]\npath = \"audit.log\"\n{text}"
    );
    std::fs::write(dir.join("proxy.toml"), text).unwrap();
    let config = mcp_tenant_proxy::config::Config::load(&dir.join("proxy.toml"), None).unwrap();
    mcp_tenant_proxy::app::App::start(config).await.unwrap()
}

/// An admin API call on `admin` with `token`: the status and the JSON answer.
async fn admin(
    admin: std::net::SocketAddr,
    token: &str,
    method: http::Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(common::body(body.to_string()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    (status, json(response).await)
}

#[tokio::test]
async fn a_key_made_through_the_admin_api_carries_its_user_token_mode() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ec = IssuerKey::ec("store-test");
    let keys_line = key_file(dir.path(), &[&ec]);
    let master = MasterKey::generate();
    let app = start_with_store(dir.path(), &master, &config(upstream, &keys_line)).await;
    let a = app.admin_addr.unwrap();

    use http::Method;
    assert_eq!(admin(a, ADMIN_TOKEN, Method::POST, "/admin/v1/users", json!({"id": "erin"})).await.0, 201);
    let cred = json!({"secret": "cred-erin"});
    assert_eq!(
        admin(a, ADMIN_TOKEN, Method::PUT, "/admin/v1/users/erin/credentials/github/default", cred).await.0 / 100,
        2
    );
    let bad = json!({"user": "erin", "kind": "standard", "user_token": "sometimes"});
    let (status, body) = admin(a, ADMIN_TOKEN, Method::POST, "/admin/v1/keys", bad).await;
    assert_eq!((status, &body["error"]["field"]), (400, &json!("user_token")));
    let new = json!({"user": "erin", "kind": "standard", "user_token": "required"});
    let (status, key) = admin(a, ADMIN_TOKEN, Method::POST, "/admin/v1/keys", new).await;
    assert_eq!((status, &key["user_token"]), (201, &json!("required")), "{key}");
    let erin_key = key["key"].as_str().unwrap().to_owned();
    let (_, listed) = admin(a, ADMIN_TOKEN, Method::GET, "/admin/v1/keys?user=erin", Value::Null).await;
    assert_eq!(listed["keys"][0]["user_token"], "required");

    let url = format!("http://{}/mcp/github", app.proxy_addr);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let auth = format!("Bearer {erin_key}");
    let response = client.request(mcp_post(&url, &[("authorization", &auth)])).await.unwrap();
    let (status, body) = (response.status().as_u16(), json(response).await);
    assert_eq!((status, code(&body)), (401, "user_token_required"), "{body}");
    let token = ec.token("erin");
    let headers = [("authorization", auth.as_str()), ("x-alloy-user-token", token.as_str())];
    let response = client.request(mcp_post(&url, &headers)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(seen.lock().unwrap()[0].headers["authorization"], "Bearer cred-erin");
    app.shutdown().await;
}

#[tokio::test]
async fn a_proven_user_the_proxy_does_not_know_is_refused_even_with_unknown_user_default() {
    let (upstream, seen) = recording_upstream().await;
    let key = IssuerKey::ed("k");
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[identity]\nunknown_user = \"default\"\n{}", config(upstream, &key_file(dir.path(), &[&key])));
    let h = Harness::start(&text).await;
    // Named in the header, an unknown user falls back to the key's own user, as configured...
    let (status, _) = call(&h, ENTERPRISE_KEY, None, &[("x-alloy-userid", "mallory")]).await;
    assert_eq!(status, 200);
    assert_eq!(seen.lock().unwrap()[0].headers["authorization"], "Bearer cred-acme");
    // ...but a token proves a user, and any account of the issuer must not become the key's identity.
    let (status, body) = call(&h, ENTERPRISE_KEY, Some(&key.token("mallory")), &[]).await;
    assert_eq!((status, code(&body)), (403, "unknown_user"));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_store_key_that_requires_tokens_fails_closed_when_the_config_reads_none() {
    let (upstream, seen) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKey::generate();
    // Made while the config had [identity.user_token]; the section is gone now.
    let store = mcp_tenant_proxy::store::SqliteStore::open(&dir.path().join("store.db"), Some(&master)).unwrap();
    use mcp_tenant_proxy::store::Store;
    store.create_user("svc", mcp_tenant_proxy::store::model::UserLimit::Default).unwrap();
    let key = store
        .create_key(mcp_tenant_proxy::store::model::NewKey {
            id: None,
            kind: mcp_tenant_proxy::store::KeyKind::Enterprise,
            user: "svc".into(),
            act_as: vec!["*".into()],
            expires_at: None,
            user_token: Some(mcp_tenant_proxy::store::TokenMode::Required),
        })
        .unwrap();
    drop(store);
    let app = start_with_store(dir.path(), &master, &base_config(upstream, "")).await;

    // The user header alone must not decide for a key that requires proof.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let url = format!("http://{}/mcp/github", app.proxy_addr);
    let auth = format!("Bearer {}", key.key.expose());
    let response =
        client.request(mcp_post(&url, &[("authorization", &auth), ("x-alloy-userid", "alice")])).await.unwrap();
    let (status, body) = (response.status().as_u16(), json(response).await);
    assert_eq!((status, code(&body)), (503, "user_tokens_not_configured"), "{body}");
    assert!(seen.lock().unwrap().is_empty());
    // And the admin API does not make such keys while the config cannot check tokens.
    let new = json!({"user": "svc", "kind": "standard", "user_token": "required"});
    let (status, body) = admin(app.admin_addr.unwrap(), ADMIN_TOKEN, http::Method::POST, "/admin/v1/keys", new).await;
    assert_eq!((status, &body["error"]["field"]), (400, &json!("user_token")), "{body}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_key_that_sends_invalid_tokens_in_a_burst_gets_429_before_any_more_are_checked() {
    let (upstream, seen) = recording_upstream().await;
    let key = IssuerKey::ed("k");
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&config(upstream, &key_file(dir.path(), &[&key]))).await;
    let forged = IssuerKey::ed("k").token("alice"); // the right kid, another key: a bad signature
    // A client of the same key whose token verified before the burst.
    let valid = key.token("alice");
    assert_eq!(call(&h, PORTAL_KEY, Some(&valid), &[]).await.0, 200);
    // At most 50 failed checks per key and second: the first 429 comes after at least 50 of them (a
    // slow machine only moves it later), and within a few hundred at the speed of any machine.
    let mut failures = 0;
    let refused = loop {
        let (status, body) = call(&h, PORTAL_KEY, Some(&forged), &[]).await;
        match (status, code(&body)) {
            (401, "invalid_user_token") => failures += 1,
            (429, "too_many_invalid_user_tokens") => break body,
            other => panic!("{other:?}: {body}"),
        }
        assert!(failures < 500, "no 429 after {failures} invalid tokens");
    };
    assert!(failures >= 50, "429 after only {failures} failures");
    assert_eq!(refused["id"], "call-1");
    // Held up by nobody else's forgeries: a token that verified before is still checked, and passes.
    let (status, body) = call(&h, PORTAL_KEY, Some(&valid), &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(&h, PORTAL_KEY, Some(&forged), &[]).await;
    assert_eq!(status, 429, "the forger is still capped");
    // Another key's users are not held up by it.
    let (status, _) = call(&h, ENTERPRISE_KEY, Some(&key.token("bob")), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen.lock().unwrap().len(), 3);
}
