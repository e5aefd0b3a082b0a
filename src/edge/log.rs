//! Structured logs: one JSON object per line, always with the request id, never
//! with credentials, tokens or key material.

use serde_json::json;

pub fn request(request_id: &str, method: &str, path: &str, status: u16, ms: u64) {
    worker::console_log!(
        "{}",
        json!({"level": "info", "msg": "request", "request_id": request_id,
               "method": method, "path": path, "status": status, "ms": ms})
    );
}

pub fn error(request_id: &str, what: &str, err: &dyn std::fmt::Display) {
    worker::console_error!(
        "{}",
        json!({"level": "error", "msg": what, "request_id": request_id, "error": err.to_string()})
    );
}
