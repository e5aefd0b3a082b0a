//! Structured logs: one JSON object per line, with the request id wherever a
//! request is at hand, never with credentials, tokens or key material.

use serde::Serialize;
use serde_json::{Map, Value, json};
use wasm_bindgen::JsValue;
use worker::web_sys::console;

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
        console::log_1(&line.as_str().into());
    }
}

/// Why a request failed (a failure's cause, which its answer does not show).
pub fn error(request_id: &str, what: &str, err: &dyn std::fmt::Display) {
    event(
        Level::Error,
        Some(request_id),
        what,
        json!({"error": err.to_string()}),
    );
}

#[derive(Clone, Copy)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// A line about one step, beyond a request's own line: its level, `msg`, the
/// id of the request it belongs to, and the members of `fields`, an object.
/// The id is `None` where no one request is at hand: the cron trigger, the
/// queue consumer, a batch of several requests' events, and a Durable
/// Object's alarm, and the catalogue publisher's publish, which may serve
/// several requests and lists their ids in `requests`. (Other objects' work
/// for a request has the id the Worker's call sent it.)
pub fn event(level: Level, request_id: Option<&str>, msg: &str, fields: Value) {
    let mut line = Map::new();
    let name = match level {
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    };
    line.insert("level".into(), name.into());
    line.insert("msg".into(), msg.into());
    if let Some(id) = request_id {
        line.insert("request_id".into(), id.into());
    }
    match fields {
        Value::Object(members) => line.extend(members),
        other => {
            line.insert("detail".into(), other);
        }
    }
    let text = JsValue::from_str(&Value::Object(line).to_string());
    match level {
        Level::Info => console::log_1(&text),
        Level::Warn => console::warn_1(&text),
        Level::Error => console::error_1(&text),
    }
}
