//! Structured logs: one JSON object per line, always with the request id, never
//! with credentials, tokens or key material.

use serde::Serialize;
use serde_json::json;

/// The line every request logs. A struct rather than a `json!` map: it is
/// written once per request, and serialises without building a tree first.
#[derive(Serialize)]
struct RequestLine<'a> {
    level: &'static str,
    method: &'a str,
    ms: u64,
    msg: &'static str,
    path: &'a str,
    request_id: &'a str,
    status: u16,
}

pub fn request(request_id: &str, method: &str, path: &str, status: u16, ms: u64) {
    let line = RequestLine {
        level: "info",
        method,
        ms,
        msg: "request",
        path,
        request_id,
        status,
    };
    if let Ok(line) = serde_json::to_string(&line) {
        // Straight to `console.log`: `console_log!` would format a copy first.
        worker::web_sys::console::log_1(&line.as_str().into());
    }
}

pub fn error(request_id: &str, what: &str, err: &dyn std::fmt::Display) {
    worker::console_error!(
        "{}",
        json!({"level": "error", "msg": what, "request_id": request_id, "error": err.to_string()})
    );
}
