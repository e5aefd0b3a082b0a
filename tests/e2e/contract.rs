//! The OpenAPI contract: the document the worker serves is the committed one,
//! and Schemathesis, fuzzing the live worker from that document, finds no
//! server error, no undocumented status, no body that breaks its schema and no
//! invalid input accepted.

use crate::common::{dev_var, fresh_ip, s, seen_pair, unique_email, wg_key};
use crate::harness::{Ctx, Test};
use crate::support::{Stack, root};
use libtest_mimic::Failed;
use serde_json::{Value, json};
use std::process::Command;
use std::time::Instant;

pub const TESTS: &[(&str, Test)] = &[
    (
        "contract::served_document_is_the_committed_one",
        served_document_is_the_committed_one,
    ),
    (
        "contract::methods_the_runtime_does_not_know_are_405_not_get",
        methods_the_runtime_does_not_know_are_405_not_get,
    ),
    (
        "contract::schemathesis_finds_no_failures",
        schemathesis_finds_no_failures,
    ),
];

fn served_document_is_the_committed_one(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let resp = ctx
            .http
            .get(ctx.url("/openapi.json"))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let served: Value = resp.json().await.expect("JSON");
        let committed: Value =
            serde_json::from_str(&std::fs::read_to_string(root().join("openapi.json")).unwrap())
                .expect("openapi.json is JSON");
        assert!(
            served == committed,
            "the worker serves a different document than openapi.json: rebuild the worker"
        );
        assert_eq!(served["openapi"], "3.1.0");
        Ok(())
    })
}

fn methods_the_runtime_does_not_know_are_405_not_get(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        for (method, path) in [("QUERY", "/healthz"), ("QUERY", "/v1/regions")] {
            let resp = ctx
                .http
                .request(method.parse().unwrap(), ctx.url(path))
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 405, "{method} {path}");
            assert_eq!(resp.headers()["allow"], "GET, HEAD", "{method} {path}");
        }
        Ok(())
    })
}

/// Signs up a user with one device; returns its access token.
async fn user_with_device(http: &reqwest::Client, base: &str) -> String {
    let r = http
        .post(format!("{base}/v1/auth/signup"))
        .header("cf-connecting-ip", fresh_ip())
        .json(&json!({"email": unique_email(), "password": "contract fuzzing 1"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.expect("JSON");
    seen_pair("contract fuzzing 1", &body);
    let token = s(&body["access_token"]).to_owned();
    let r = http
        .post(format!("{base}/v1/devices"))
        .bearer_auth(&token)
        .json(&json!({"name": "laptop", "public_key": wg_key()}))
        .send()
        .await
        .expect("device");
    assert_eq!(r.status(), 201);
    token
}

/// Runs Schemathesis with the committed configuration (`schemathesis.toml`:
/// fixed seed, deterministic generation, bounded examples) plus `args`.
fn schemathesis(stack: &Stack, token: &str, args: &[&str]) -> Result<String, Failed> {
    let dir = tempfile_dir();
    let started = Instant::now();
    let out = Command::new(root().join(".venv/bin/schemathesis"))
        .current_dir(&dir)
        .env("TOKEN", token)
        .env("ADMIN_TOKEN", dev_var("ADMIN_TOKEN"))
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(root().join("schemathesis.toml"))
        .arg("run")
        .arg(stack.url("/openapi.json"))
        .args(["--request-timeout", "30"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run .venv/bin/schemathesis (run `make test`): {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "schemathesis {args:?}: {} in {:.0?}: {}",
        if out.status.success() {
            "passed"
        } else {
            "FAILED"
        },
        started.elapsed(),
        text.lines()
            .filter(|l| l.contains("generated,") || l.contains("passed,"))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim()
    );
    if !out.status.success() {
        return Err(format!("schemathesis failed:\n{text}").into());
    }
    Ok(text)
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "keenvpn-schemathesis-{}-{}",
        std::process::id(),
        crate::common::unique("run")
    ));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// How many test cases a run reports as generated (so a run that tested
/// nothing cannot pass).
fn generated(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.split_once(" generated")
                .and_then(|(n, _)| n.trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
}

fn schemathesis_finds_no_failures(ctx: &Ctx) -> Result<(), Failed> {
    // A stack of its own: the admin operations change regions, and the
    // generated sign-ups and logins would spend other tests' throttles.
    let stack = Stack::start();
    let base = stack.url("");
    let tokens: Vec<String> = ctx.rt.block_on(async {
        let mut tokens = Vec::new();
        for _ in 0..4 {
            tokens.push(user_with_device(&ctx.http, &base).await);
        }
        tokens
    });
    // Everything but the logouts and the account's deletion, which would
    // end the session the rest uses.
    let report = schemathesis(
        &stack,
        &tokens[0],
        &[
            "--exclude-operation-id",
            "logout",
            "--exclude-operation-id",
            "logoutAll",
            "--exclude-operation-id",
            "deleteAccount",
        ],
    )?;
    let n = generated(&report);
    assert!(n >= 300, "only {n} test cases generated:\n{report}");
    // Each logout, and the deletion, with a session of its own (after the
    // first success, the session is over and only 401s remain).
    for (op, token) in [
        ("logout", &tokens[1]),
        ("logoutAll", &tokens[2]),
        ("deleteAccount", &tokens[3]),
    ] {
        let report = schemathesis(
            &stack,
            token,
            // No stateful phase: one operation has no links to follow.
            &[
                "--include-operation-id",
                op,
                "--phases",
                "examples,coverage,fuzzing",
            ],
        )?;
        assert!(generated(&report) > 0, "no {op} case ran:\n{report}");
    }
    Ok(())
}
