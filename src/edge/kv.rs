//! Reading and writing Workers KV.
//!
//! Reads go to the binding's `get(key, "text")`, bounded by
//! [`READ_TIMEOUT_MS`] on the request's timer (`time::bounded`); writes to its
//! `put(key, text, options)`: one call across the JS/wasm boundary each.
//! workers-rs's `KvStore` looks up five methods of the binding each time one
//! is made and builds every read's options object
//! through serde, which on the reconnect hot path (two reads per connect) was
//! a measurable share of the request. JSON values are read as text and parsed
//! in wasm with `serde_json`: KV's own `json` type parses in JavaScript, and the
//! result would then be walked from wasm field by field, a crossing per step.
//! Values are written as the same JSON text: `KvStore::put` would first build
//! them as JavaScript objects through `serde-wasm-bindgen` and then
//! `JSON.stringify` them.

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasm_bindgen::JsValue;
use worker::Env;
use worker::js_sys::Promise;
use worker::wasm_bindgen_futures::JsFuture;

use super::bindings;
use super::durable::js_error;
use super::time::{self, Timer};

/// How long a read may take before it counts as failed. KV answers a read
/// its location has cached in milliseconds, and one it has to fetch from
/// the central store in tens to hundreds; past this, KV is in trouble, and
/// every reader goes on as when a read fails (the connect path: a session
/// copy unread, as described in `auth`; the user's object for the devices;
/// the isolate's catalogue copy) rather than waiting without end, which
/// nothing else bounds. (The runtime cancels a request only when its client
/// goes.)
pub const READ_TIMEOUT_MS: u32 = 2_000;

/// How a request makes its reads: on its timer, if it has one (see
/// `time::Timer`), and, at the development-only fault point `kv.hang`, as if
/// KV never answered, so that the time limit is what ends them.
#[derive(Clone, Copy, Default)]
pub struct Reading<'a> {
    pub timer: Option<&'a Timer>,
    pub hang: bool,
}

#[wasm_bindgen::prelude::wasm_bindgen]
extern "C" {
    /// A KV namespace binding, as far as this module uses it.
    type KvNamespace;
    #[wasm_bindgen(method, catch, js_name = get)]
    fn get_as(this: &KvNamespace, key: &str, kind: &str) -> Result<Promise, JsValue>;
    #[wasm_bindgen(method, catch)]
    fn put(
        this: &KvNamespace,
        key: &str,
        value: &str,
        options: &JsValue,
    ) -> Result<Promise, JsValue>;
}

/// The text under `key` in the `KV` namespace; `None` when there is none;
/// an error if KV fails or takes longer than [`READ_TIMEOUT_MS`].
pub async fn get_text(env: &Env, key: &str) -> Result<Option<String>, String> {
    read(env, key, Reading::default()).await
}

/// [`get_text`], made as `how` says.
pub async fn read(env: &Env, key: &str, how: Reading<'_>) -> Result<Option<String>, String> {
    let failed = |e: JsValue| format!("{key}: {}", js_error(&e));
    let promise = if how.hang {
        Promise::new(&mut |_, _| {})
    } else {
        let ns: KvNamespace = bindings::object(env, bindings::KV)?;
        ns.get_as(key, "text").map_err(failed)?
    };
    let value = time::bounded(&promise, READ_TIMEOUT_MS, how.timer)
        .await
        .map_err(failed)?;
    Ok(value.as_string())
}

/// The value under `key` parsed as `T`; `None` when there is none.
pub async fn get_json<T: DeserializeOwned>(env: &Env, key: &str) -> Result<Option<T>, String> {
    read_json(env, key, Reading::default()).await
}

/// [`get_json`], made as `how` says.
pub async fn read_json<T: DeserializeOwned>(
    env: &Env,
    key: &str,
    how: Reading<'_>,
) -> Result<Option<T>, String> {
    match read(env, key, how).await? {
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
        None => Ok(None),
    }
}

/// Stores `text` under `key`; with `ttl_secs`, KV drops it that many seconds
/// later (KV's floor is 60).
pub async fn put(env: &Env, key: &str, text: &str, ttl_secs: Option<u32>) -> Result<(), String> {
    let failed = |e: JsValue| format!("{key}: {}", js_error(&e));
    let ns: KvNamespace = bindings::object(env, bindings::KV)?;
    let options = JsValue::from(js_sys::Object::new());
    if let Some(ttl) = ttl_secs {
        js_sys::Reflect::set(&options, &"expirationTtl".into(), &ttl.into()).map_err(failed)?;
    }
    let promise = ns.put(key, text, &options).map_err(failed)?;
    JsFuture::from(promise).await.map_err(failed)?;
    Ok(())
}

/// Stores `value` as JSON text under `key` (see [`put`]).
pub async fn put_json<T: Serialize + ?Sized>(
    env: &Env,
    key: &str,
    value: &T,
    ttl_secs: Option<u32>,
) -> Result<(), String> {
    let text = serde_json::to_string(value).map_err(|e| format!("{key}: {e}"))?;
    put(env, key, &text, ttl_secs).await
}
