//! The tamper-evident audit trail of the real app, checked with the real `audit verify` command, and the
//! audit sink's failure handling (readiness, error counter).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use http::Request;

/// `mcp-tenant-proxy audit verify [extra] FILE`: exit code and stdout.
fn verify(file: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-tenant-proxy"))
        .args(["audit", "verify"])
        .args(extra)
        .arg(file)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().expect("exited"), format!("{stdout}{stderr}"))
}

/// A path, the request's headers and the status it gets.
type Case = (&'static str, &'static [(&'static str, &'static str)], u16);

/// Allowed and refused requests, one after the other (so their audit lines are in this order).
async fn requests(harness: &Harness, n: usize) {
    let cases: [Case; 5] = [
        ("/mcp/github", &[("authorization", "Bearer alice-key-0001")], 200),
        ("/mcp/github", &[("authorization", "Bearer ent-key-0001"), ("x-alloy-userid", "bob")], 200),
        ("/mcp/github", &[("authorization", "Bearer wrong-key")], 401),
        ("/mcp/github", &[("authorization", "Bearer alice-key-0001"), ("x-alloy-userid", "bob")], 403),
        ("/nowhere", &[("authorization", "Bearer alice-key-0001")], 404),
    ];
    for (path, headers, status) in cases.iter().cycle().take(n) {
        let response = harness.send(mcp_post(&harness.url(path), headers)).await;
        assert_eq!(response.status(), *status, "{path} {headers:?}");
    }
}

fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(file: &Path, lines: &[String]) {
    std::fs::write(file, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn sha256_hex(line: &str) -> String {
    hex::encode(mcp_tenant_proxy::secret::sha256(line.as_bytes()))
}

#[tokio::test]
async fn audit_verify_accepts_the_real_trail_and_reports_the_first_broken_line() {
    let (upstream, _) = recording_upstream().await;
    let mut harness = Harness::start(&base_config(upstream, "")).await;
    requests(&harness, 5).await;
    let records = harness.shutdown_and_read_audit().await;
    let file = harness.audit.clone();
    let original = lines(&file);

    assert_eq!(records.len(), 5);
    assert_eq!(records[0]["prev"], "0".repeat(64));
    for i in 1..5 {
        assert_eq!(records[i]["prev"], sha256_hex(&original[i - 1]), "line {}", i + 1);
        assert!(original[i].starts_with("{\"prev\":\""), "prev comes first: {}", original[i]);
    }
    assert_eq!(records[2]["status"], 401);
    assert_eq!(verify(&file, &[]), (0, "ok: 5 lines, chain intact\n".into()));

    // One byte of the third line (its status, 401 -> 201): the fourth line no longer chains to it.
    let mut edited = original.clone();
    edited[2] = edited[2].replacen("\"status\":401", "\"status\":201", 1);
    assert_ne!(edited[2], original[2]);
    write_lines(&file, &edited);
    let (code, out) = verify(&file, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("broken at line 4: "), "{out}");

    // The third line deleted: the (new) third line does not chain to the second.
    let mut deleted = original.clone();
    deleted.remove(2);
    write_lines(&file, &deleted);
    let (code, out) = verify(&file, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("broken at line 3: "), "{out}");

    // Two lines swapped.
    let mut reordered = original.clone();
    reordered.swap(1, 2);
    write_lines(&file, &reordered);
    let (code, out) = verify(&file, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("broken at line 2: "), "{out}");

    // The first line gone: only acceptable as a continued (rotated) file.
    let rotated = original[1..].to_vec();
    write_lines(&file, &rotated);
    let (code, out) = verify(&file, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("broken at line 1: "), "{out}");
    assert_eq!(verify(&file, &["--allow-continuation"]), (0, "ok: 4 lines, chain intact\n".into()));

    // Unreadable: exit 2 with the error.
    let (code, out) = verify(&file.with_file_name("missing.log"), &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("missing.log"), "{out}");
}

#[tokio::test]
async fn a_restarted_proxy_continues_the_chain_of_its_audit_file() {
    let (upstream, _) = recording_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.log");
    let mut first = Harness::start_with_audit(&base_config(upstream, ""), &file).await;
    requests(&first, 3).await;
    first.shutdown_and_read_audit().await;
    let mut second = Harness::start_with_audit(&base_config(upstream, ""), &file).await;
    requests(&second, 2).await;
    second.shutdown_and_read_audit().await;

    let all = lines(&file);
    assert_eq!(all.len(), 5);
    let fourth: serde_json::Value = serde_json::from_str(&all[3]).unwrap();
    assert_eq!(fourth["prev"], sha256_hex(&all[2]), "the second run chains from the first run's last line");
    assert_eq!(verify(&file, &[]), (0, "ok: 5 lines, chain intact\n".into()));
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_unwritable_audit_sink_fails_readiness_and_counts_write_errors() {
    let (upstream, _) = recording_upstream().await;
    let config = base_config(upstream, "").replacen("[server]\n", "[server]\nshutdown_grace = \"200ms\"\n", 1);
    // Every write to /dev/full fails with ENOSPC.
    let mut harness = Harness::start_with_audit(&config, Path::new("/dev/full")).await;
    let admin = |path: &str| Request::get(format!("http://{}{path}", harness.admin)).body(body("")).unwrap();
    assert_eq!(harness.send(admin("/readyz")).await.status(), 200, "nothing written, nothing failed yet");

    requests(&harness, 1).await;
    let audit = harness.app.as_ref().unwrap().audit_health().clone();
    // At least two failed attempts: the line is kept and retried, not dropped after one failure. (The
    // timeout only keeps a broken build from hanging the suite.)
    tokio::time::timeout(Duration::from_secs(10), audit.wait_until(|h| h.write_errors() >= 2))
        .await
        .expect("the audit writer reports its failed writes");
    assert!(!audit.is_healthy());

    let response = harness.send(admin("/readyz")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(json(response).await, serde_json::json!({"status": "not ready", "reason": "audit sink failing"}));
    assert_eq!(harness.send(admin("/healthz")).await.status(), 200, "the process itself is alive");

    // Shutdown is bounded even though the line can never be written (the writer logs it as lost).
    let app = harness.app.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), app.shutdown()).await.expect("shutdown ends");
}
