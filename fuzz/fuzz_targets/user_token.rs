//! User tokens: `jwt::verify` and `jwt::KeySet::parse`.
//!
//! Input: `data[0] % 3` picks the case, the rest is its bytes:
//! - 0: a token as a client sends it, checked against a fixed Ed25519 key set: it never verifies (no
//!   input forges a signature), and nothing panics;
//! - 1: a key set from any bytes: parsing never panics;
//! - 2: the claims of a token signed here with the real key: it verifies exactly when an independent
//!   reading of the claims says it should (a JSON object with `iss` and `aud` as expected, a numeric
//!   `exp` in the future, no numeric `nbf` in the future, and no claim of the wrong type among those).

#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use mcp_tenant_proxy::jwt::{Expect, KeySet, verify};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::Value;

const NOW: u64 = 1_800_000_000;
const LEEWAY: u64 = 60;

static KEY: std::sync::LazyLock<(Ed25519KeyPair, KeySet)> = std::sync::LazyLock::new(|| {
    let pair = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap();
    let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let set = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k","x":"{x}"}}]}}"#);
    let keys = KeySet::parse(set.as_bytes()).unwrap();
    (pair, keys)
});

fn expect() -> Expect<'static> {
    Expect { typ: None, issuer: "https://idp", audience: "mcp", leeway: LEEWAY, now: NOW }
}

/// What RFC 7519 and the proxy's rules say about these claims, read independently of `jwt`.
fn should_verify(claims: &[u8]) -> bool {
    let Ok(Value::Object(c)) = serde_json::from_slice::<Value>(claims) else { return false };
    let iss_ok = c.get("iss") == Some(&Value::String("https://idp".into()));
    let aud_ok = match c.get("aud") {
        Some(Value::String(a)) => a == "mcp",
        Some(Value::Array(list)) => list.iter().all(Value::is_string) && list.iter().any(|a| a == "mcp"),
        _ => false,
    };
    let number = |v: Option<&Value>| v.map(|v| v.as_f64().filter(|f| f.is_finite() && v.is_number()));
    let exp_ok = matches!(number(c.get("exp")), Some(Some(exp)) if (NOW as f64) < exp + LEEWAY as f64);
    let nbf_ok = match number(c.get("nbf")) {
        None => true,
        Some(Some(nbf)) => (NOW + LEEWAY) as f64 >= nbf,
        Some(None) => false,
    };
    iss_ok && aud_ok && exp_ok && nbf_ok
}

fuzz_target!(|data: &[u8]| {
    let Some((&case, rest)) = data.split_first() else { return };
    let (pair, keys) = &*KEY;
    match case % 3 {
        0 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                assert!(verify(token, keys, &expect()).is_err(), "a token made by the fuzzer verified");
            }
        }
        1 => {
            let _ = KeySet::parse(rest);
        }
        _ => {
            let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","kid":"k"}"#);
            let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(rest));
            let sig = URL_SAFE_NO_PAD.encode(pair.sign(signed.as_bytes()).as_ref());
            let got = verify(&format!("{signed}.{sig}"), keys, &expect()).is_ok();
            assert_eq!(got, should_verify(rest), "claims {:?}", String::from_utf8_lossy(rest));
        }
    }
});
