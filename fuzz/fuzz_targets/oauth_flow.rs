//! The OAuth connect flow's parsers: links, flow states, form/query decoding and provider metadata.
//!
//! Input: `data[0] % 5` picks the case, the rest is its bytes:
//! - 0: a link as a browser sends it: it never opens (no input forges the HMAC), and nothing panics;
//! - 1: a flow state as the provider hands it back: it never opens (no input forges AES-GCM);
//! - 2: a query or form: `query_param` and `decode` never panic, and what `decode` reads, `encode`
//!   writes back to the same text;
//! - 3: provider metadata (JSON): checking never panics, and endpoints it accepts are https (or, for a
//!   loopback issuer, http on a loopback address);
//! - 4: a link made here for a fuzzer-chosen user and upstream opens to exactly that link.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_tenant_proxy::oauth::discovery::{check_resource, check_server};
use mcp_tenant_proxy::oauth::link::{Link, open_link, open_state, sign_link};
use mcp_tenant_proxy::oauth::provider::{decode, encode, query_param};

const KEY: [u8; 32] = [9; 32];

fn https(uri: &http::Uri) -> bool {
    uri.scheme_str() == Some("https")
}

fn safe(uri: &http::Uri) -> bool {
    let loopback = uri.host().is_some_and(|h| {
        h == "localhost" || h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    });
    uri.scheme_str() == Some("https") || (uri.scheme_str() == Some("http") && loopback)
}

fuzz_target!(|data: &[u8]| {
    let Some((&case, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match case % 5 {
        0 => assert!(open_link(&KEY, &text, 0).is_err(), "a made-up link opened"),
        1 => assert!(open_state(&KEY, &text, 0).is_err(), "a made-up state opened"),
        2 => {
            let _ = query_param(&text, "link");
            if let Some(plain) = decode(&text) {
                assert_eq!(decode(&encode(&plain)).as_deref(), Some(plain.as_str()));
            }
        }
        3 => {
            let Ok(document) = serde_json::from_slice::<serde_json::Value>(rest) else { return };
            let issuer: http::Uri = "https://auth.example.com".parse().unwrap();
            let _ = check_resource(&document, "https://mcp.example.com/mcp", &issuer);
            if let Ok(found) = check_server(&document, &issuer, "r".into()) {
                assert!(https(&found.authorization) && https(&found.token), "{found:?}");
            }
            let local: http::Uri = "http://127.0.0.1:9".parse().unwrap();
            if let Ok(found) = check_server(&document, &local, "r".into()) {
                assert!(safe(&found.authorization) && safe(&found.token), "{found:?}");
            }
        }
        _ => {
            let (user, upstream) = text.split_once('\0').unwrap_or((&text, "github"));
            let link = Link {
                user: user.to_owned(),
                upstream: upstream.to_owned(),
                expires_at: 100,
                nonce: [1; 32],
                over: (rest.len() % 2 == 0).then(|| "g".to_owned()),
            };
            let token = sign_link(&KEY, &link);
            if token.len() <= 2048 {
                assert_eq!(open_link(&KEY, &token, 100), Ok(link));
            }
        }
    }
});
