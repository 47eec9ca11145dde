//! `config::Config::from_toml` on arbitrary UTF-8 text.
//!
//! Properties: no panic, and an error message never shows a secret: neither an inline `secret = "..."`
//! value of the input (any key whose name contains `secret`, misspellings `secert`/`sekret` too, at any
//! depth), nor the contents of the secret file and environment variable this target provides. A secret
//! also written elsewhere in the input (as a user id, say) may legitimately be quoted, so those are skipped.
//!
//! To keep runs hermetic and bounded, `*_file` values must be plain names: they resolve inside a scratch
//! directory holding `secret.txt`, `admin.token` and an empty `ca.pem`, and never reach `/dev/zero` & co.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mcp_tenant_proxy::config::Config;

const FILE_SECRET: &str = "SEKRET_FROM_FILE_9f8e7d";
const ENV_SECRET: &str = "SEKRET_FROM_ENV_1a2b3c";
const ENV_NAME: &str = "MTP_FUZZ_SECRET";

static BASE_DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("mtp-fuzz-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret.txt"), format!("{FILE_SECRET}\n")).unwrap();
    std::fs::write(dir.join("admin.token"), format!("{FILE_SECRET}_admin\n")).unwrap();
    std::fs::write(dir.join("ca.pem"), "").unwrap();
    // SAFETY: set once, before any config is parsed, and never changed.
    unsafe { std::env::set_var(ENV_NAME, ENV_SECRET) };
    dir
});

/// `secret = "..."` and misspellings of it; `secret_env` / `secret_file` name a secret, they do not hold one.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let reference = key.ends_with("_env") || key.ends_with("_file");
    !reference && ["secret", "secert", "sekret", "scret"].iter().any(|s| key.contains(s))
}

/// Inline secrets (string values under secret-like keys) and whether every `*_file` value is a plain name.
fn walk(value: &toml::Value, secret_key: bool, secrets: &mut Vec<String>) -> bool {
    match value {
        toml::Value::String(s) if secret_key => {
            secrets.push(s.clone());
            true
        }
        toml::Value::Table(table) => table.iter().all(|(k, v)| {
            if k.ends_with("_file") || k.ends_with("path") {
                let plain = v.as_str().is_some_and(|s| {
                    !s.is_empty() && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                });
                if !plain && k.ends_with("_file") {
                    return false;
                }
            }
            walk(v, secret_key || is_secret_key(k), secrets)
        }),
        toml::Value::Array(items) => items.iter().all(|v| walk(v, secret_key, secrets)),
        _ => true,
    }
}

/// Inline secrets from lines such as `secret = "...` when the text is not TOML (an unclosed quote).
fn textual_secrets(text: &str, secrets: &mut Vec<String>) {
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        if !is_secret_key(key) {
            continue;
        }
        let value = value.trim_start();
        let Some(quote) = value.chars().next().filter(|c| *c == '"' || *c == '\'') else { continue };
        let inner = &value[1..];
        let end = inner.find(quote).unwrap_or(inner.len());
        secrets.push(inner[..end].to_owned());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut secrets = vec![FILE_SECRET.to_owned(), ENV_SECRET.to_owned()];
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => {
            if !walk(&toml::Value::Table(table), false, &mut secrets) {
                return; // a `*_file` that could leave the scratch directory
            }
        }
        Err(_) => textual_secrets(text, &mut secrets),
    }
    let Err(error) = Config::from_toml(text, &BASE_DIR) else { return };
    let message = error.to_string();
    let debug = format!("{error:?}");
    for secret in &secrets {
        // Short secrets ("s", "x") occur in ordinary messages; and a secret the input also has elsewhere
        // may be quoted from there.
        if secret.len() < 6
            || text.matches(secret.as_str()).count() > 1
            || !secret.bytes().any(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            continue;
        }
        if !message.contains(secret.as_str()) && !debug.contains(secret.as_str()) {
            continue;
        }
        // A "secret" may also be spelled like the proxy's own words (`"lumn 3: unclosed table"`): it
        // leaked only if the message changes when the secret does.
        let blanked = text.replace(secret.as_str(), &"Q".repeat(secret.len()));
        let blanked = Config::from_toml(&blanked, &BASE_DIR).err().map(|e| format!("{e} {e:?}")).unwrap_or_default();
        assert!(blanked.contains(secret.as_str()), "the error shows the secret {secret:?}:\n{message}\n{debug}");
    }
});
