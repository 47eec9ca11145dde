//! JSON Web Tokens signed with a public key (RS256, ES256, EdDSA), checked against a JSON Web Key Set.
//!
//! Only what a user token needs, with ring (already linked for TLS) doing the cryptography: the
//! `jsonwebtoken` crate would bring a second crypto stack (aws-lc, or RustCrypto's `rsa` with its open
//! timing advisory), and its 9.x line skipped `exp`/`nbf` checks on a claim of the wrong JSON type
//! (CVE-2026-25537). Here every claim that is checked must have its exact type, or the token is refused.
//!
//! The algorithm is bound to the key: a token's `alg` picks only keys of that algorithm's type (an RSA
//! key for RS256, a P-256 key for ES256, an Ed25519 key for EdDSA), so a public key is never used as an
//! HMAC secret, and `none`, `HS*` and every other algorithm are refused outright. Symmetric (`oct`)
//! keys in a key set are ignored.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Longer tokens are refused before any decoding (real user tokens are under 2 KiB).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    fn from_name(name: &str) -> Option<Alg> {
        match name {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            _ => None,
        }
    }
}

/// One verification key of a key set.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: Option<String>,
    alg: Alg,
    material: Material,
}

#[derive(Clone, PartialEq, Eq)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point, `04 || x || y`.
    P256(Vec<u8>),
    Ed25519(Vec<u8>),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

/// The usable keys of a JSON Web Key Set (RFC 7517).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<PublicKey>,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<Value>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl KeySet {
    /// Parses a key set. Keys this module cannot verify with (symmetric keys, encryption keys, other
    /// algorithms or curves, malformed parameters) are skipped, so that a provider's set with extra keys
    /// still works; the caller decides whether a set with no usable key is an error.
    pub fn parse(json: &[u8]) -> Result<KeySet, String> {
        let raw: RawSet = serde_json::from_slice(json).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        let keys = raw.keys.into_iter().filter_map(|k| serde_json::from_value(k).ok()).filter_map(usable).collect();
        Ok(KeySet { keys })
    }
}

fn usable(k: RawKey) -> Option<PublicKey> {
    if k.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let b64 = |v: &Option<String>| v.as_deref().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
    let (alg, material) = match (k.kty.as_str(), k.crv.as_deref()) {
        ("RSA", _) => {
            // Some providers write the integers with a leading zero byte, which ring refuses.
            let unsigned = |v: Vec<u8>| v[v.iter().position(|&b| b != 0).unwrap_or(v.len())..].to_vec();
            let (n, e) = (unsigned(b64(&k.n)?), unsigned(b64(&k.e)?));
            // ring verifies with 2048- to 8192-bit moduli only: a key it cannot use is skipped here, so a
            // token signed with it is an unknown key (and fetches the set again), not a bad signature.
            let bits = (n.len() * 8).saturating_sub(n.first().map_or(0, |b| b.leading_zeros() as usize));
            if !(2048..=8192).contains(&bits) || e.is_empty() {
                return None;
            }
            (Alg::Rs256, Material::Rsa { n, e })
        }
        ("EC", Some("P-256")) => {
            let (x, y) = (b64(&k.x)?, b64(&k.y)?);
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            (Alg::Es256, Material::P256([&[4u8][..], &x, &y].concat()))
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64(&k.x)?;
            if x.len() != 32 {
                return None;
            }
            (Alg::EdDsa, Material::Ed25519(x))
        }
        _ => return None,
    };
    // A key that names its algorithm is used for that one only.
    if k.alg.as_deref().is_some_and(|a| Alg::from_name(a) != Some(alg)) {
        return None;
    }
    Some(PublicKey { kid: k.kid, alg, material })
}

/// Why a token was refused. The `Display` text is safe to show to the client: it never quotes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the user token is not a signed JWT")]
    Malformed,
    #[error("the user token's algorithm is not accepted (RS256, ES256 and EdDSA are)")]
    Algorithm,
    #[error("no key of the key set matches the user token")]
    UnknownKey,
    #[error("the user token's signature is not valid")]
    Signature,
    #[error("the user token has expired")]
    Expired,
    #[error("the user token is not valid yet")]
    NotYetValid,
    #[error("the user token has no exp claim")]
    NoExpiry,
    #[error("the user token was issued by another issuer")]
    Issuer,
    #[error("the user token is for another audience")]
    Audience,
    #[error("the user token's typ header is not the one expected")]
    Type,
    #[error("the user token's {0} claim is missing or not a string")]
    Claim(&'static str),
}

/// What a token must satisfy besides its signature.
pub struct Expect<'a> {
    /// The header's `typ` (lowercase; `application/` may prefix it in the token), when set.
    pub typ: Option<&'a str>,
    pub issuer: &'a str,
    pub audience: &'a str,
    /// Allowed clock difference, in seconds, for `exp` and `nbf`.
    pub leeway: u64,
    /// Unix seconds.
    pub now: u64,
}

/// A token whose signature, issuer, audience and validity period were checked.
#[derive(Debug)]
pub struct Verified {
    claims: Map<String, Value>,
}

impl Verified {
    /// A string claim.
    pub fn claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.claims.contains_key(name)
    }
}

/// Checks a compact JWS token: its algorithm, its signature by a key of `keys`, then `iss`, `aud`,
/// `exp` (required) and `nbf`.
pub fn verify(token: &str, keys: &KeySet, expect: &Expect<'_>) -> Result<Verified, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header64), Some(payload64), Some(signature64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed);
    // An object (RFC 7515 4), read field by field: no other JSON shape passes for one.
    let header: Map<String, Value> = serde_json::from_slice(&decode(header64)?).map_err(|_| TokenError::Malformed)?;
    // Extensions the verifier must understand (4.1.11): none are, so any `crit` refuses the token.
    if header.contains_key("crit") {
        return Err(TokenError::Malformed);
    }
    let text = |name: &str| match header.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(TokenError::Malformed),
    };
    let alg = Alg::from_name(text("alg")?.ok_or(TokenError::Malformed)?).ok_or(TokenError::Algorithm)?;
    let kid = text("kid")?;
    if let Some(want) = expect.typ {
        let typ = text("typ")?.map(str::to_ascii_lowercase);
        let typ = typ.as_deref().map(|t| t.strip_prefix("application/").unwrap_or(t));
        if typ != Some(want) {
            return Err(TokenError::Type);
        }
    }
    let signature = decode(signature64)?;
    let signed = &token.as_bytes()[..header64.len() + 1 + payload64.len()];
    let mut candidates =
        keys.keys.iter().filter(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid)).peekable();
    if candidates.peek().is_none() {
        return Err(TokenError::UnknownKey);
    }
    if !candidates.any(|k| k.verifies(signed, &signature)) {
        return Err(TokenError::Signature);
    }
    let claims: Map<String, Value> = serde_json::from_slice(&decode(payload64)?).map_err(|_| TokenError::Malformed)?;
    check_claims(&claims, expect)?;
    Ok(Verified { claims })
}

impl PublicKey {
    fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => {
                RsaPublicKeyComponents { n, e }.verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig).is_ok()
            }
            Material::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(message, sig).is_ok()
            }
            Material::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x).verify(message, sig).is_ok(),
        }
    }
}

fn check_claims(claims: &Map<String, Value>, expect: &Expect<'_>) -> Result<(), TokenError> {
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == expect.issuer => {}
        Some(Value::String(_)) => return Err(TokenError::Issuer),
        _ => return Err(TokenError::Claim("iss")),
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == expect.audience,
        Some(Value::Array(auds)) if auds.iter().all(Value::is_string) => {
            auds.iter().any(|a| a.as_str() == Some(expect.audience))
        }
        _ => return Err(TokenError::Claim("aud")),
    };
    if !audience_ok {
        return Err(TokenError::Audience);
    }
    // NumericDate: seconds, possibly fractional (RFC 7519 2). A wrong type refuses the token.
    let date = |name: &'static str| match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().filter(|f| f.is_finite()).map(Some).ok_or(TokenError::Claim(name)),
        Some(_) => Err(TokenError::Claim(name)),
    };
    let (now, leeway) = (expect.now as f64, expect.leeway as f64);
    let exp = date("exp")?.ok_or(TokenError::NoExpiry)?;
    if now >= exp + leeway {
        return Err(TokenError::Expired);
    }
    if date("nbf")?.is_some_and(|nbf| now + leeway < nbf) {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8037, A.4: the Ed25519 example, verified with the key of A.2.
    #[test]
    fn the_rfc_8037_ed25519_example_verifies_and_a_changed_byte_does_not() {
        let set = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        let keys = KeySet::parse(set).unwrap();
        let token = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
        let (header, rest) = token.split_once('.').unwrap();
        let (payload, sig) = rest.split_once('.').unwrap();
        let signed = format!("{header}.{payload}");
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        assert!(keys.keys[0].verifies(signed.as_bytes(), &sig));
        let mut bad = sig.clone();
        bad[0] ^= 1;
        assert!(!keys.keys[0].verifies(signed.as_bytes(), &bad));
    }

    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An Ed25519 and a P-256 key, their key set, and a signer of tokens: `sign(header, claims, key)`.
    struct Keys {
        ed: Ed25519KeyPair,
        ec: EcdsaKeyPair,
        rsa: ring::rsa::KeyPair,
        set: KeySet,
    }

    /// A 2048-bit RSA key made by openssl (ring signs with RSA keys but does not make them).
    pub(crate) fn rsa_key() -> ring::rsa::KeyPair {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-outform", "DER"])
            .output()
            .expect("openssl is installed");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // With -outform DER, OpenSSL 3 writes the PKCS#1 RSAPrivateKey.
        ring::rsa::KeyPair::from_der(&out.stdout).unwrap()
    }

    impl Keys {
        fn new() -> Keys {
            let rng = SystemRandom::new();
            let ed = Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
            let ec_doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec_doc.as_ref(), &rng).unwrap();
            let point = ec.public_key().as_ref();
            let rsa = rsa_key();
            let RsaPublicKeyComponents { n, e } = RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
            let set = serde_json::json!({"keys": [
                {"kty": "RSA", "kid": "rsa", "alg": "RS256", "n": b64(&n), "e": b64(&e)},
                {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(ed.public_key().as_ref())},
                {"kty": "EC", "crv": "P-256", "kid": "ec", "x": b64(&point[1..33]), "y": b64(&point[33..])},
            ]});
            Keys { ed, ec, rsa, set: KeySet::parse(set.to_string().as_bytes()).unwrap() }
        }

        fn sign(&self, header: Value, claims: Value, with: &str) -> String {
            let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
            let sig = match with {
                "ed" => self.ed.sign(signed.as_bytes()).as_ref().to_vec(),
                "ec" => self.ec.sign(&SystemRandom::new(), signed.as_bytes()).unwrap().as_ref().to_vec(),
                "rsa" => {
                    let mut sig = vec![0; self.rsa.public().modulus_len()];
                    self.rsa
                        .sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), signed.as_bytes(), &mut sig)
                        .unwrap();
                    sig
                }
                secret => ring::hmac::sign(
                    &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
                    signed.as_bytes(),
                )
                .as_ref()
                .to_vec(),
            };
            format!("{signed}.{}", b64(&sig))
        }
    }

    #[test]
    fn a_token_verifies_only_with_its_algorithm_its_key_and_an_untouched_signature() {
        let keys = Keys::new();
        let expect = Expect { typ: None, issuer: "https://idp", audience: "mcp", leeway: 30, now: 1_000_000 };
        let claims = serde_json::json!({"iss": "https://idp", "aud": "mcp", "exp": 1_000_100, "userId": "alice"});
        let check = |token: &str| verify(token, &keys.set, &expect).map(|v| v.claim("userId").map(str::to_owned));
        let alice = Ok(Some("alice".to_owned()));
        assert_eq!(check(&keys.sign(serde_json::json!({"alg": "EdDSA", "kid": "ed"}), claims.clone(), "ed")), alice);
        assert_eq!(check(&keys.sign(serde_json::json!({"alg": "ES256", "kid": "ec"}), claims.clone(), "ec")), alice);
        assert_eq!(check(&keys.sign(serde_json::json!({"alg": "RS256", "kid": "rsa"}), claims.clone(), "rsa")), alice);
        // No kid: every key of the algorithm is tried.
        assert_eq!(check(&keys.sign(serde_json::json!({"alg": "ES256"}), claims.clone(), "ec")), alice);
        // The header's alg picks the key type: an ES256 signature claimed as EdDSA finds no EdDSA key "ec".
        let crossed = keys.sign(serde_json::json!({"alg": "EdDSA", "kid": "ec"}), claims.clone(), "ec");
        assert_eq!(check(&crossed), Err(TokenError::UnknownKey));
        assert_eq!(
            check(&keys.sign(serde_json::json!({"alg": "EdDSA", "kid": "new"}), claims.clone(), "ed")),
            Err(TokenError::UnknownKey)
        );
        // HMAC with the public key as the secret, and alg none, are refused before any key is looked at.
        let public = URL_SAFE_NO_PAD.encode(keys.ed.public_key().as_ref());
        let hmac = keys.sign(serde_json::json!({"alg": "HS256", "kid": "ed"}), claims.clone(), &public);
        assert_eq!(check(&hmac), Err(TokenError::Algorithm));
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(claims.to_string().as_bytes()));
        assert_eq!(check(&none), Err(TokenError::Algorithm));
        // A changed payload, a critical extension, a fourth part, padding: refused.
        let good = keys.sign(serde_json::json!({"alg": "EdDSA"}), claims.clone(), "ed");
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = b64(serde_json::json!({"iss": "https://idp", "aud": "mcp", "exp": 1_000_100, "userId": "admin"})
            .to_string()
            .as_bytes());
        parts[1] = &other;
        assert_eq!(check(&parts.join(".")), Err(TokenError::Signature));
        let crit = keys.sign(serde_json::json!({"alg": "EdDSA", "crit": ["exp"]}), claims.clone(), "ed");
        assert_eq!(check(&crit), Err(TokenError::Malformed));
        assert_eq!(check(&format!("{good}.x")), Err(TokenError::Malformed));
        assert_eq!(check(&format!("{good}=")), Err(TokenError::Malformed));
        assert_eq!(check(&"a".repeat(MAX_TOKEN_BYTES + 1)), Err(TokenError::Malformed));
        // A valid signature does not excuse the claims.
        let expired = keys.sign(
            serde_json::json!({"alg": "EdDSA"}),
            serde_json::json!({"iss": "https://idp", "aud": "mcp", "exp": 5}),
            "ed",
        );
        assert_eq!(check(&expired).unwrap_err(), TokenError::Expired);
    }

    #[test]
    fn the_header_is_an_object_with_no_crit_and_the_typ_asked_for() {
        let keys = Keys::new();
        let claims = serde_json::json!({"iss": "https://idp", "aud": "mcp", "exp": 1_000_100, "userId": "alice"});
        let mut expect = Expect { typ: None, issuer: "https://idp", audience: "mcp", leeway: 30, now: 1_000_000 };
        let sign = |header: Value| keys.sign(header, claims.clone(), "ed");
        let check = |token: &str, expect: &Expect<'_>| verify(token, &keys.set, expect).map(|_| ());
        // A JSON array in the header's place, a crit of any value, an alg or kid that is not a string.
        for header in [
            serde_json::json!(["EdDSA", null, null]),
            serde_json::json!({"alg": "EdDSA", "crit": null}),
            serde_json::json!({"alg": ["EdDSA"]}),
            serde_json::json!({"alg": "EdDSA", "kid": 1}),
            serde_json::json!({"kid": "ed"}),
        ] {
            assert_eq!(check(&sign(header.clone()), &expect), Err(TokenError::Malformed), "{header}");
        }
        // typ, when asked for: exact (any case), with or without application/.
        expect.typ = Some("at+jwt");
        assert_eq!(check(&sign(serde_json::json!({"alg": "EdDSA", "typ": "at+jwt"})), &expect), Ok(()));
        assert_eq!(check(&sign(serde_json::json!({"alg": "EdDSA", "typ": "application/AT+JWT"})), &expect), Ok(()));
        assert_eq!(check(&sign(serde_json::json!({"alg": "EdDSA", "typ": "JWT"})), &expect), Err(TokenError::Type));
        assert_eq!(check(&sign(serde_json::json!({"alg": "EdDSA"})), &expect), Err(TokenError::Type));
    }

    #[test]
    fn an_rsa_modulus_written_with_a_leading_zero_still_verifies_and_a_short_one_is_skipped() {
        let keys = Keys::new();
        let RsaPublicKeyComponents { n, e } = RsaPublicKeyComponents::<Vec<u8>>::from(keys.rsa.public());
        let padded = [&[0u8][..], &n].concat();
        let set = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "padded", "n": b64(&padded), "e": b64(&[0, 1, 0, 1])},
            {"kty": "RSA", "kid": "short", "n": b64(&n[..128]), "e": b64(&e)},
        ]});
        let set = KeySet::parse(set.to_string().as_bytes()).unwrap();
        assert_eq!(set.keys.iter().map(|k| k.kid.as_deref().unwrap()).collect::<Vec<_>>(), ["padded"]);
        let claims = serde_json::json!({"iss": "https://idp", "aud": "mcp", "exp": 1_000_100});
        let token = keys.sign(serde_json::json!({"alg": "RS256", "kid": "padded"}), claims, "rsa");
        let expect = Expect { typ: None, issuer: "https://idp", audience: "mcp", leeway: 30, now: 1_000_000 };
        assert!(verify(&token, &set, &expect).is_ok());
    }

    #[test]
    fn symmetric_encryption_and_mislabelled_keys_are_skipped() {
        let set = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0"},
            {"kty":"OKP","crv":"Ed25519","use":"enc","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","alg":"HS256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"EC","crv":"P-384","x":"AA","y":"AA"},
            "not a key",
            {"kty":"OKP","crv":"Ed25519","kid":"good","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let keys = KeySet::parse(set).unwrap();
        assert_eq!(keys.keys.len(), 1);
        assert_eq!(keys.keys[0].kid.as_deref(), Some("good"));
        assert!(KeySet::parse(b"[1,2]").is_err());
    }

    #[test]
    fn claims_of_the_wrong_type_refuse_the_token() {
        let expect = Expect { typ: None, issuer: "https://idp", audience: "mcp", leeway: 30, now: 1_000_000 };
        let check = |claims: Value| check_claims(claims.as_object().unwrap(), &expect);
        let ok = serde_json::json!({"iss": "https://idp", "aud": "mcp", "exp": 1_000_100});
        assert_eq!(check(ok.clone()), Ok(()));
        let with = |k: &str, v: Value| {
            let mut c = ok.clone();
            c[k] = v;
            check(c)
        };
        assert_eq!(with("exp", "99999999999".into()), Err(TokenError::Claim("exp")));
        assert_eq!(with("nbf", "99999999999".into()), Err(TokenError::Claim("nbf")));
        assert_eq!(with("nbf", 1_000_031.into()), Err(TokenError::NotYetValid));
        assert_eq!(with("nbf", 1_000_029.into()), Ok(()));
        assert_eq!(with("exp", 999_970.into()), Err(TokenError::Expired));
        assert_eq!(with("exp", 999_971.into()), Ok(()));
        assert_eq!(with("aud", serde_json::json!(["other", "mcp"])), Ok(()));
        assert_eq!(with("aud", serde_json::json!(["other"])), Err(TokenError::Audience));
        assert_eq!(with("aud", serde_json::json!([1])), Err(TokenError::Claim("aud")));
        assert_eq!(with("iss", "https://evil".into()), Err(TokenError::Issuer));
        assert_eq!(with("iss", Value::Null), Err(TokenError::Claim("iss")));
        let mut no_exp = ok.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(check(no_exp), Err(TokenError::NoExpiry));
    }
}
