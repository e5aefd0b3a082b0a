//! `ApiError`: every failure a handler can return, rendered as RFC 9457
//! `application/problem+json` with our stable `code`.

use crate::domain::problem::ProblemCode;
use serde_json::{Map, Value};

/// A failure to report to the client. Internal causes are logged by the shell and
/// never put here: `detail` is written for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ProblemCode,
    pub detail: String,
    /// Seconds, sent as `Retry-After` (429 and 503 always carry one).
    pub retry_after: Option<u32>,
    /// `retry_after` is [`DEFAULT_RETRY_AFTER_SECS`] because nothing more
    /// precise was known; the shell spreads it before answering
    /// ([`ApiError::spread_retry_after`]).
    pub default_retry_after: bool,
    /// Methods sent as `Allow` on 405.
    pub allow: Option<&'static str>,
    /// Extra members of the problem object (RFC 9457 extension members).
    pub extensions: Map<String, Value>,
}

/// Seconds a client is told to wait after a 503 when nothing more precise is known.
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 5;

impl ApiError {
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> Self {
        let retry_after =
            (code.status() == 503 || code.status() == 429).then_some(DEFAULT_RETRY_AFTER_SECS);
        ApiError {
            code,
            detail: detail.into(),
            default_retry_after: retry_after.is_some(),
            retry_after,
            allow: None,
            extensions: Map::new(),
        }
    }

    pub fn not_found() -> Self {
        ApiError::new(ProblemCode::NotFound, "No resource at this path.")
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = ApiError::new(
            ProblemCode::MethodNotAllowed,
            format!("This path accepts only: {allow}."),
        );
        e.allow = Some(allow);
        e
    }

    pub fn internal() -> Self {
        ApiError::new(
            ProblemCode::Internal,
            "An unexpected error occurred; it has been logged.",
        )
    }

    /// Sets the `Retry-After` the caller worked out (jittered already, or
    /// exact, such as the end of a lockout).
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self.default_retry_after = false;
        self
    }

    /// Turns a default `Retry-After` into a uniform draw from
    /// [`DEFAULT_RETRY_AFTER_SECS`] to twice that (`random`: a uniform u32),
    /// so that the clients one failure refuses in the same instant do not
    /// all come back in the same second. Others are left as they are.
    pub fn spread_retry_after(&mut self, random: u32) {
        if self.default_retry_after {
            let base_ms = u64::from(DEFAULT_RETRY_AFTER_SECS) * 1_000;
            self.retry_after = Some(crate::domain::admission::retry_after_secs(base_ms, random));
            self.default_retry_after = false;
        }
    }

    /// Adds an extension member to the problem object.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extensions.insert(key.to_owned(), value);
        self
    }

    /// The problem object, including the request id so a report can be traced.
    pub fn to_body(&self, request_id: &str) -> Value {
        let mut obj = Map::new();
        obj.insert("type".into(), Value::String(self.code.type_uri()));
        obj.insert("title".into(), Value::String(self.code.title().into()));
        obj.insert("status".into(), Value::from(self.code.status()));
        obj.insert("detail".into(), Value::String(self.detail.clone()));
        obj.insert("code".into(), Value::String(self.code.as_str().into()));
        obj.insert("request_id".into(), Value::String(request_id.into()));
        for (k, v) in &self.extensions {
            // Extensions never override the standard members.
            obj.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(obj)
    }
}
