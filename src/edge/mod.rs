//! The Worker shell: the only module that speaks `worker::`.
//!
//! A request flows: request id → [`crate::http::route`] → handler → `Reply` →
//! `worker::Response`. Handlers get every request-scoped value (request id,
//! client address, bindings) as arguments; nothing request-scoped is ever stored
//! in a static. Statics hold only per-isolate immutable config (`secrets`).

mod admin;
mod auth;
mod catalogue;
mod connect;
mod cron;
mod devices;
mod durable;
mod events;
mod fault;
mod incoming;
mod kv;
mod log;
mod login_throttle;
mod microtask;
mod pg;
mod publisher;
mod random;
mod readyz;
mod secrets;
mod storage;
mod store;
mod time;
mod user_session;
mod webcrypto;
mod webhooks;

use crate::domain::problem::ProblemCode;
use crate::http::{self, ApiError, Reply, Route, Routed};
use futures::FutureExt as _;
use futures::future::LocalBoxFuture;
use incoming::Incoming;
use worker::worker_sys::web_sys;
use worker::{Context, Env, event};

/// Binding names, as declared in `wrangler.toml`.
pub mod bindings {
    /// Hyperdrive with query caching off: every read must be fresh.
    pub const DB: &str = "HYPERDRIVE";
    pub const KV: &str = "KV";
    pub const USER_SESSIONS: &str = "USER_SESSIONS";
    pub const REGION_GATES: &str = "REGION_GATES";
    pub const LOGIN_THROTTLES: &str = "LOGIN_THROTTLES";
    /// The one object through which the admin API publishes the catalogue.
    pub const CATALOGUE_PUBLISHER: &str = "CATALOGUE_PUBLISHER";
    /// Queue of connection events, written to PostgreSQL in batches.
    pub const CONNECTION_EVENTS: &str = "CONNECTION_EVENTS";

    use wasm_bindgen::{JsCast, JsValue};

    thread_local! {
        /// Binding names as JavaScript strings, made once per instance: each
        /// `JsValue::from_str` decodes the name across the boundary.
        static NAMES: std::cell::RefCell<Vec<(&'static str, JsValue)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    fn get(env: &worker::Env, name: &'static str) -> Option<JsValue> {
        let key = NAMES.with(|names| {
            let mut names = names.borrow_mut();
            if let Some((_, key)) = names.iter().find(|(n, _)| *n == name) {
                return key.clone();
            }
            let key = JsValue::from_str(name);
            names.push((name, key.clone()));
            key
        });
        worker::js_sys::Reflect::get(env, &key).ok()
    }

    /// The binding `name` as the JavaScript object the runtime hands over, for
    /// calling its methods directly: one property read, where workers-rs's
    /// typed accessors also check the binding's class on every call.
    pub fn object<T: JsCast>(env: &worker::Env, name: &'static str) -> Result<T, String> {
        get(env, name)
            .filter(|b| b.is_object())
            .map(JsCast::unchecked_into)
            .ok_or_else(|| format!("no binding {name}"))
    }

    /// A text var (`[vars]` in wrangler.toml, or a secret); `None` when unset.
    pub fn text(env: &worker::Env, name: &'static str) -> Option<String> {
        get(env, name)?.as_string()
    }

    /// An operator's setting as text, however wrangler.toml wrote it: a TOML
    /// number (`30`) reaches the Worker as a number, not as the text `"30"`,
    /// and must not read as unset. Any other kind of value (a boolean, a
    /// table) is returned as the runtime prints it, for the setting's own
    /// check to refuse by name. `None` only when unset.
    pub fn setting(env: &worker::Env, name: &'static str) -> Option<String> {
        let value = get(env, name).filter(|v| !v.is_undefined())?;
        if let Some(text) = value.as_string() {
            return Some(text);
        }
        Some(match value.as_f64() {
            // Exact for every whole number a setting can hold.
            Some(n) if n.fract() == 0.0 && n.abs() < 1e15 => (n as i64).to_string(),
            Some(n) => n.to_string(),
            None => format!("{value:?}"),
        })
    }
}

/// A handler's failure: what the client is told, and (for the log only) why.
#[derive(Debug)]
pub struct Fail {
    pub api: ApiError,
    pub cause: Option<String>,
}

impl Fail {
    pub fn new(api: ApiError, cause: String) -> Fail {
        Fail {
            api,
            cause: Some(cause),
        }
    }

    /// A dependency failed or timed out: 503 with `Retry-After`.
    pub fn unavailable(cause: String) -> Fail {
        Fail::new(
            ApiError::new(
                ProblemCode::ServiceUnavailable,
                "A backing service is unavailable; retry shortly.",
            ),
            cause,
        )
    }

    /// A bug or an impossible state: 500, details only in the log.
    pub fn internal(cause: String) -> Fail {
        Fail::new(ApiError::internal(), cause)
    }
}

impl From<ApiError> for Fail {
    fn from(api: ApiError) -> Fail {
        Fail { api, cause: None }
    }
}

/// Runs once per wasm instance, before its first request (and again when the
/// instance is rebuilt after a panic).
#[event(start)]
fn start() {
    microtask::prefer_promise_jobs();
}

#[event(fetch)]
async fn fetch(req: web_sys::Request, env: Env, ctx: Context) -> worker::Result<web_sys::Response> {
    let req = Incoming::new(req);
    let started = time::now_ms();
    let request_id = req.request_id().to_owned();
    let method = req.method();
    let path = req.path();

    // Each route's future is boxed: its state machine then compiles to a wasm
    // function of its own, instead of every route being inlined into this
    // one. A fresh isolate compiles functions on first call, so a request
    // compiles only its own route's code (and the optimising tier recompiles
    // only what is hot) rather than one function as large as the whole API.
    let handler: LocalBoxFuture<'_, Result<Reply, Fail>> = match http::route(&method, &path) {
        Routed::Found(Route::Healthz) => {
            ready(Ok(Reply::json(200, &crate::api::Liveness { status: "ok" })))
        }
        Routed::Found(Route::Readyz) => {
            // The end-to-end tests' way to make the Worker panic (a wasm trap)
            // and check that the next request gets a fresh instance.
            if fault::requested(&env, &req, fault::PANIC) {
                panic!("injected panic ({} = {})", fault::HEADER, fault::PANIC);
            }
            async { Ok(readyz::handle(&env, &request_id).await) }.boxed_local()
        }
        Routed::Found(Route::OpenApi) => ready(Ok(Reply {
            status: 200,
            headers: vec![("content-type", "application/json".into())],
            body: crate::api::OPENAPI_SERVED.as_bytes().to_vec(),
        })),
        Routed::Found(Route::Jwks) => auth::jwks(&env).boxed_local(),
        Routed::Found(Route::Signup) => {
            let client_ip = client_ip(&req);
            async move { auth::signup(req, &env, &client_ip).await }.boxed_local()
        }
        Routed::Found(Route::Login) => {
            let client_ip = client_ip(&req);
            async move { auth::login(req, &env, &client_ip).await }.boxed_local()
        }
        Routed::Found(Route::Refresh) => auth::refresh(req, &env).boxed_local(),
        Routed::Found(Route::Logout) => auth::logout(req, &env, false).boxed_local(),
        Routed::Found(Route::LogoutAll) => auth::logout(req, &env, true).boxed_local(),
        Routed::Found(Route::Me) => auth::me(req, &env).boxed_local(),
        Routed::Found(Route::DeleteAccount) => auth::delete_account(req, &env).boxed_local(),
        Routed::Found(Route::ListDevices) => devices::list(req, &env).boxed_local(),
        Routed::Found(Route::CreateDevice) => devices::create(req, &env).boxed_local(),
        Routed::Found(Route::GetDevice(id)) => {
            async move { devices::get(req, &env, &id).await }.boxed_local()
        }
        Routed::Found(Route::DeleteDevice(id)) => {
            async move { devices::delete(req, &env, &id).await }.boxed_local()
        }
        Routed::Found(Route::RotateDeviceKey(id)) => {
            async move { devices::rotate_key(req, &env, &id).await }.boxed_local()
        }
        Routed::Found(Route::StripeWebhook) => webhooks::stripe(req, &env).boxed_local(),
        Routed::Found(Route::Regions) => async { connect::regions(&req, &env).await }.boxed_local(),
        Routed::Found(Route::Connect) => connect::connect(req, &env, &ctx).boxed_local(),
        Routed::Found(Route::AdminSetRegion(id)) => {
            async move { admin::set_region(req, &env, &id).await }.boxed_local()
        }
        Routed::Found(Route::AdminHealthReport(id)) => {
            async move { admin::health_report(req, &env, &id).await }.boxed_local()
        }
        Routed::Found(Route::AdminServers) => admin::servers(req, &env).boxed_local(),
        Routed::Found(Route::AdminSetServer(id)) => {
            async move { admin::set_server(req, &env, &id).await }.boxed_local()
        }
        Routed::MethodNotAllowed { allow } => {
            ready(Err(ApiError::method_not_allowed(allow).into()))
        }
        Routed::NotFound => ready(Err(ApiError::not_found().into())),
    };
    let result = handler.await;
    let reply = match result {
        Ok(reply) => reply,
        Err(mut fail) => {
            if let Some(cause) = &fail.cause {
                log::error(&request_id, fail.api.code.as_str(), cause);
            }
            fail.api.spread_retry_after(random::u32());
            Reply::problem(&fail.api, &request_id)
        }
    };
    let mut reply = http::finish(reply, &request_id);
    if method == "HEAD" {
        // The GET's status and headers, without its body (RFC 9110, 9.3.2),
        // and the length the GET's body would have (9.3.2 and 8.6: a
        // monitor may read the size from it). Not for a status whose GET
        // has no body (1xx, 204, 304): there it would say 0, where 8.6 has
        // a 304 send the full answer's length or none.
        if !(reply.status < 200 || reply.status == 204 || reply.status == 304) {
            reply
                .headers
                .push(("content-length", reply.body.len().to_string()));
        }
        reply.body.clear();
    }
    log::request(
        &request_id,
        &method,
        &path,
        reply.status,
        time::now_ms() - started,
    );
    incoming::respond(&reply)
}

/// A route answered without waiting, as a (boxed) future like the others.
fn ready<'a>(result: Result<Reply, Fail>) -> LocalBoxFuture<'a, Result<Reply, Fail>> {
    futures::future::ready(result).boxed_local()
}

/// The client's address, set by Cloudflare's edge (and by wrangler dev
/// locally); never trusted for anything but rate limiting. Only sign-up and
/// sign-in read it.
fn client_ip(req: &Incoming) -> String {
    req.header("cf-connecting-ip")
        .unwrap_or_else(|| "unknown".into())
}
