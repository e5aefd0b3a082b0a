//! Durable Object plumbing shared by the classes, and the `RegionGate` class.
//!
//! The classes are thin shims over pure state machines in `domain`:
//! - `UserSession` (one per user, `user_session.rs`): sessions, refresh-token
//!   families, and (later) device-limit reservations.
//! - `LoginThrottle` (one per account email, and two per client network,
//!   for sign-ins and for sign-ups, named by an HMAC of it;
//!   `login_throttle.rs`): failed sign-in counting.
//! - `RegionGate` (here): admission control for reconnects into a region.
//! - `CataloguePublisher` (one, `publisher.rs`): publishes the catalogue for
//!   the admin API, changes made together together.
//!
//! Every class that clients' requests use answers the internal `GET /ping`,
//! which writes and reads back its transactional storage: `/readyz` uses it
//! to prove Durable Objects end to end. (`CataloguePublisher` stores
//! nothing, serves the admin API only, and is not probed.)
//! Callers talk to objects with JSON over internal `fetch` via [`call`].

use super::{Fail, fault, time};
use crate::domain::admission::{Admit, Gate};
use serde::Serialize;
use wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::{
    DurableObject, Env, Method, Request, Response, Result, State, durable_object, js_sys, web_sys,
    worker_sys,
};

/// The header that carries the id of the request an object call is made for.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The storage key `ping` writes; never used for anything else.
const PING_KEY: &str = "__ping";
/// A Durable Object call that takes longer than this is answered 503. It is
/// longer than the worst case of an object's own work (a PostgreSQL connect and
/// queries, each bounded by 5 s), so an object that will still succeed is not
/// abandoned half way: a 503 then really means "nothing was done, or retry is
/// safe".
pub const CALL_TIMEOUT_MS: u64 = 20_000;
/// A `RegionGate` admission that takes longer than this is answered 503,
/// with the failover list. The gate answers from memory, synchronously, in
/// well under a millisecond, so a call this slow is an object in trouble
/// (overloaded, or being moved): on the day a region's clients all reconnect,
/// each connect would otherwise hold its request for [`CALL_TIMEOUT_MS`],
/// and its client learn of the failover regions 20 s late. An admission the
/// gate granted after the bound is lost; the region admits less, not more.
pub const ADMIT_TIMEOUT_MS: u32 = 2_000;

pub async fn ping(state: &State, req: &Request) -> Result<Response> {
    let nonce = req.headers().get("x-ping-nonce")?.unwrap_or_default();
    super::storage::put(state, PING_KEY, &nonce).await?;
    let read: Option<String> = super::storage::get(state, PING_KEY).await?;
    Response::from_json(&serde_json::json!({ "nonce": read }))
}

/// An error answer from an object: its HTTP status and our problem code.
pub fn refuse(status: u16, code: &str, retry_after: Option<u64>) -> Result<Response> {
    Ok(
        Response::from_json(&serde_json::json!({ "code": code, "retry_after": retry_after }))?
            .with_status(status),
    )
}

/// POSTs `body` as JSON to `path` of the object `name` in `namespace`, on
/// behalf of the request `request_id` (sent as [`REQUEST_ID_HEADER`], so that
/// the object's log lines name it).
/// Returns the status and JSON body; transport failures and timeouts are 503s.
///
/// It is on every sign-in, refresh and device change, and on the connect
/// path for a device the KV copy does not list yet, so it speaks to the platform's `Request` and `Response` directly: one call
/// builds the request, and the answer is read whole with `text()` rather than
/// chunk by chunk through a stream reader.
pub async fn call<B: Serialize>(
    env: &Env,
    request_id: &str,
    namespace: &'static str,
    name: &str,
    path: &str,
    body: &B,
) -> std::result::Result<(u16, serde_json::Value), Fail> {
    call_marked(env, request_id, (namespace, name, path), body)
        .await
        .map_err(|(fail, _)| fail)
}

/// [`call`], whose error also says whether the runtime threw it marked as
/// one to try again (`retryable`, and not `overloaded`): the object was
/// reset, say, while the call was under way, so what it did is unknown.
pub async fn call_marked<B: Serialize>(
    env: &Env,
    request_id: &str,
    (namespace, name, path): (&'static str, &str, &str),
    body: &B,
) -> std::result::Result<(u16, serde_json::Value), (Fail, bool)> {
    let unavailable =
        |e: String| Fail::unavailable(format!("durable object {namespace}{path}: {e}"));
    let stub = stub(env, namespace, name).map_err(|e| (unavailable(e), false))?;
    let payload =
        serde_json::to_string(body).map_err(|e| (Fail::internal(e.to_string()), false))?;
    let fut = async {
        let headers = web_sys::Headers::new()?;
        headers.set("content-type", "application/json")?;
        headers.set(REQUEST_ID_HEADER, request_id)?;
        let init = web_sys::RequestInit::new();
        init.set_method("POST");
        init.set_headers(&headers);
        init.set_body(&JsValue::from_str(&payload));
        let req = web_sys::Request::new_with_str_and_init(
            &format!("https://durable-object{path}"),
            &init,
        )?;
        let resp: web_sys::Response = JsFuture::from(stub.fetch_with_request(&req)?)
            .await?
            .unchecked_into();
        let text = JsFuture::from(resp.text()?).await?.as_string();
        Ok::<_, JsValue>((resp.status(), text.unwrap_or_default()))
    };
    let (status, text) = bounded(fut)
        .await
        .map_err(|(e, retryable)| (unavailable(e), retryable))?;
    let json = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| (unavailable(format!("status {status}: {e}")), false))?;
    if status < 500 {
        Ok((status, json))
    } else {
        Err((unavailable(format!("status {status}: {json}")), false))
    }
}

/// The stub of the object `name` in `namespace`.
fn stub(
    env: &Env,
    namespace: &'static str,
    name: &str,
) -> std::result::Result<worker_sys::DurableObject, String> {
    let ns: worker_sys::DurableObjectNamespace = super::bindings::object(env, namespace)?;
    ns.get_by_name(name).map_err(|e| js_error(&e))
}

/// Waits for a call to an object at most [`CALL_TIMEOUT_MS`]; a throw or the
/// timeout is the error, as text for the log, and whether the runtime marked
/// it as one to try again (`retryable` and not `overloaded`).
async fn bounded<T>(
    fut: impl std::future::Future<Output = std::result::Result<T, JsValue>>,
) -> std::result::Result<T, (String, bool)> {
    let flag = |e: &JsValue, name: &str| {
        js_sys::Reflect::get(e, &JsValue::from_str(name)).is_ok_and(|v| v.is_truthy())
    };
    match time::timeout(CALL_TIMEOUT_MS, fut).await {
        Some(Ok(answer)) => Ok(answer),
        Some(Err(e)) => Err((
            js_error(&e),
            flag(&e, "retryable") && !flag(&e, "overloaded"),
        )),
        None => Err(("timed out".into(), false)),
    }
}

/// A thrown JavaScript value, as text for the log.
pub(super) fn js_error(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.to_string()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Parses a JSON request body inside an object; malformed input is a 400.
pub async fn body<T: serde::de::DeserializeOwned>(
    req: &mut Request,
) -> std::result::Result<T, Response> {
    let parsed = match req.text().await {
        Ok(text) => serde_json::from_str::<T>(&text).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    parsed.map_err(|e| {
        Response::error(format!("bad request to durable object: {e}"), 400)
            .unwrap_or_else(|_| Response::empty().unwrap())
    })
}

/// One shard of a region's admission control: a token bucket and the queue
/// of the clients it refused (`domain::admission::Gate`). Both live in memory
/// only: admission is soft state, a restarted shard simply starts with a full
/// bucket (one burst) and an empty queue, and writing storage at every
/// admission would cost more than it protects.
///
/// Admission is called over Durable Object RPC ([`RegionGate::admit`], through
/// [`admit`]), not `fetch`: it is one call per connect, and an RPC call with a
/// number in and a number out skips building, sending and parsing an HTTP
/// request and response on both sides. `build/entry.mjs` (from
/// `src/entry.mjs`) declares the class a `DurableObject`, which RPC requires.
#[durable_object(fetch)]
pub struct RegionGate {
    state: State,
    env: Env,
    gate: std::cell::RefCell<Gate>,
}

impl DurableObject for RegionGate {
    fn new(state: State, env: Env) -> Self {
        RegionGate {
            state,
            env,
            gate: std::cell::RefCell::new(Gate::default()),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match (req.method(), req.path().as_str()) {
            (Method::Get, "/ping") => ping(&self.state, &req).await,
            _ => Response::error("unknown durable object route", 404),
        }
    }
}

#[wasm_bindgen::prelude::wasm_bindgen]
impl RegionGate {
    /// RPC: takes one admission token at `rate` tokens/s; the verdict as
    /// [`Admit::to_wire`]'s number. Synchronous: the bucket is in memory.
    /// `fault` is the development-only [`fault::GATE_ADMIT`] point (absent
    /// otherwise): the call then throws, as a broken object's would.
    pub fn admit(
        &self,
        rate: u32,
        fault: Option<String>,
    ) -> std::result::Result<f64, wasm_bindgen::JsError> {
        fault::at(&fault::armed(&self.env, fault), fault::GATE_ADMIT)
            .map_err(|e| wasm_bindgen::JsError::new(&e.to_string()))?;
        Ok(self
            .gate
            .borrow_mut()
            .admit(rate, time::now_ms() as i64)
            .to_wire())
    }

    /// RPC: tells the shard whether its region admits anyone, as of the
    /// region's change `version` (`Gate::fence`); whether the word was
    /// taken (an older one is not).
    pub fn fence(&self, version: f64, closed: bool) -> bool {
        let now = time::now_ms() as i64;
        self.gate.borrow_mut().fence(version as i64, closed, now)
    }
}

#[wasm_bindgen::prelude::wasm_bindgen(inline_js = r#"
export function admitCall(stub, rate, fault) {
  return fault === undefined ? stub.admit(rate) : stub.admit(rate, fault);
}
export function fenceCall(stub, version, closed) {
  return stub.fence(version, closed);
}
"#)]
extern "C" {
    /// `stub.admit(rate[, fault])`. It is bounded on the request's timer
    /// (`time::bounded`): one JavaScript timer for every bounded wait of a
    /// connect, instead of a `Delay` (whose closure costs a wasm-bindgen
    /// callback created and destroyed on every connect) or a timer each.
    #[wasm_bindgen(catch, js_name = admitCall)]
    fn admit_call(
        stub: &JsValue,
        rate: u32,
        fault: Option<&str>,
    ) -> std::result::Result<js_sys::Promise, JsValue>;

    /// `stub.fence(version, closed)`.
    #[wasm_bindgen(catch, js_name = fenceCall)]
    fn fence_call(
        stub: &JsValue,
        version: f64,
        closed: bool,
    ) -> std::result::Result<js_sys::Promise, JsValue>;
}

/// The most shards of one region [`fence`] tells: those of an admission
/// rate of 51,200 clients a second, far beyond what a region's servers take
/// on. A region with more has the rest learn of the change from the
/// catalogue, as before, and [`fence`] counts them as not told.
pub const MAX_FENCED_SHARDS: u32 = 256;

/// Tells the first `shards` `RegionGate` shards of `region` (at most
/// [`MAX_FENCED_SHARDS`]) whether it admits anyone, as of its change
/// `version` (`Gate::fence`), all at once; a shard this makes is placed by
/// the `locationHint` `hint` (`geo::location_hint`), if there is one. A call that fails or takes
/// longer than [`ADMIT_TIMEOUT_MS`] is made once more. How many shards took
/// the word (one no newer than a shard's last is not taken); the error
/// counts the shards no call reached and gives the last failure. `fault`: the
/// development-only [`fault::GATE_UNFENCED`] point, where every call fails.
pub async fn fence(
    env: &Env,
    (region, shards, hint): (&str, u32, Option<&str>),
    (version, closed): (i64, bool),
    fault: Option<&str>,
) -> std::result::Result<u32, String> {
    let timer = time::Timer::new();
    let armed =
        fault::at(&fault.map(str::to_owned), fault::GATE_UNFENCED).map_err(|e| e.to_string());
    // A shard that does not exist yet is made by this call, wherever it
    // runs (an operator's change, the cron): placed by the hint, not here.
    let options = js_sys::Object::new();
    if let Some(hint) = hint {
        let _ = js_sys::Reflect::set(&options, &"locationHint".into(), &hint.into());
    }
    let namespace = super::bindings::object::<worker_sys::DurableObjectNamespace>(
        env,
        super::bindings::REGION_GATES,
    );
    let call = |shard: u32| -> js_sys::Promise {
        let called = armed
            .clone()
            .and_then(|()| namespace.clone())
            .and_then(|ns| {
                ns.get_by_name_with_options(&format!("{region}#{shard}"), &options)
                    .map_err(|e| js_error(&e))
            })
            .map_err(|e| JsValue::from_str(&e))
            .and_then(|stub| fence_call(&stub.into(), version as f64, closed));
        match called {
            Ok(promise) => timer.race(&promise, ADMIT_TIMEOUT_MS),
            Err(thrown) => js_sys::Promise::reject(&thrown),
        }
    };
    // One `Promise.allSettled` per round, rather than a Rust future per
    // shard: the calls need nothing of each other's answers.
    let mut untold: Vec<u32> = (0..shards.min(MAX_FENCED_SHARDS)).collect();
    let (mut last, mut taken) = (String::new(), 0);
    for _ in 0..2 {
        if untold.is_empty() {
            break;
        }
        let calls: js_sys::Array = untold.iter().map(|&s| JsValue::from(call(s))).collect();
        let settled = JsFuture::from(js_sys::Promise::all_settled(&calls))
            .await
            .map_err(|e| js_error(&e))?;
        let field = |o: &JsValue, name: &str| js_sys::Reflect::get(o, &JsValue::from_str(name));
        let outcomes = js_sys::Array::from(&settled);
        let mut again = Vec::new();
        for (shard, outcome) in untold.iter().zip(outcomes.iter()) {
            if field(&outcome, "status")
                .ok()
                .and_then(|s| s.as_string())
                .as_deref()
                != Some("fulfilled")
            {
                let reason = field(&outcome, "reason").unwrap_or_default();
                last = format!("{region}#{shard}: {}", js_error(&reason));
                again.push(*shard);
            } else if field(&outcome, "value").is_ok_and(|v| v.is_truthy()) {
                taken += 1;
            }
        }
        untold = again;
    }
    let beyond = shards.saturating_sub(MAX_FENCED_SHARDS);
    match (untold.len(), beyond) {
        (0, 0) => Ok(taken),
        (0, n) => Err(format!("{n} shard(s) beyond the {MAX_FENCED_SHARDS} told")),
        (n, _) => Err(format!("{} shard(s) not told; {last}", n as u32 + beyond)),
    }
}

/// Asks the `RegionGate` named `name` for one admission at `rate` tokens/s
/// (`fault`: an armed fault point, passed on to the object).
/// Transport failures, timeouts, thrown errors and unreadable answers are 503s.
pub async fn admit(
    env: &Env,
    (name, rate): (&str, u32),
    fault: Option<&str>,
    timer: Option<&time::Timer>,
) -> std::result::Result<Admit, Fail> {
    let unavailable = |e: String| {
        Fail::unavailable(format!(
            "durable object {}.admit: {e}",
            super::bindings::REGION_GATES
        ))
    };
    let stub: JsValue = stub(env, super::bindings::REGION_GATES, name)
        .map_err(unavailable)?
        .into();
    let call = if fault == Some(fault::GATE_HANG) {
        // The call that never answers, as an object in trouble's would not.
        Ok(time::never())
    } else {
        admit_call(&stub, rate, fault)
    };
    let answer = match call {
        Ok(promise) => time::bounded(&promise, ADMIT_TIMEOUT_MS, timer).await,
        Err(thrown) => Err(thrown),
    }
    .map_err(|e| unavailable(js_error(&e)))?;
    answer
        .as_f64()
        .and_then(Admit::from_wire)
        .ok_or_else(|| unavailable(format!("unreadable answer {answer:?}")))
}
