//! The Worker shell: the only module that speaks `worker::`.
//!
//! A request flows: request id → [`crate::http::route`] → handler → `Reply` →
//! `worker::Response`. Handlers get every request-scoped value (request id,
//! bindings) as arguments; nothing request-scoped is ever stored in a static.

mod cron;
mod durable;
mod log;
mod pg;
mod readyz;
mod time;

use crate::domain::request_id;
use crate::http::{self, ApiError, Reply, Route, Routed};
use worker::{Context, Env, Headers, Request, Response, event};

/// Binding names, as declared in `wrangler.toml`.
pub mod bindings {
    /// Hyperdrive with query caching off: writes and reads that must be fresh.
    pub const DB: &str = "HYPERDRIVE";
    /// Hyperdrive with caching on: catalogue reads that tolerate ~60 s staleness.
    pub const DB_CACHED: &str = "HYPERDRIVE_CACHED";
    pub const KV: &str = "KV";
    pub const USER_SESSIONS: &str = "USER_SESSIONS";
    pub const REGION_GATES: &str = "REGION_GATES";
}

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let started = time::now_ms();
    let request_id = request_id::choose(
        req.headers().get("cf-ray").ok().flatten().as_deref(),
        random16(),
    );
    let method = req.method().to_string();
    let path = req.path();

    let reply = match http::route(&method, &path) {
        Routed::Found(Route::Healthz) => Reply::json(200, &serde_json::json!({"status": "ok"})),
        Routed::Found(Route::Readyz) => readyz::handle(&env, &request_id).await,
        Routed::MethodNotAllowed { allow } => {
            Reply::problem(&ApiError::method_not_allowed(allow), &request_id)
        }
        Routed::NotFound => Reply::problem(&ApiError::not_found(), &request_id),
    };
    let reply = http::finish(reply, &request_id);
    log::request(
        &request_id,
        &method,
        &path,
        reply.status,
        time::now_ms() - started,
    );
    into_response(reply)
}

fn into_response(reply: Reply) -> worker::Result<Response> {
    let headers = Headers::new();
    for (name, value) in &reply.headers {
        headers.append(name, value)?;
    }
    Ok(Response::from_bytes(reply.body)?
        .with_status(reply.status)
        .with_headers(headers))
}

/// 16 bytes from the platform CSPRNG (`crypto.getRandomValues`).
fn random16() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    // getrandom on wasm32 calls WebCrypto, which does not fail for 16 bytes.
    getrandom::fill(&mut bytes).expect("crypto.getRandomValues is available in workerd");
    bytes
}
