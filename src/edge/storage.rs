//! Durable Object storage, as JSON text.
//!
//! Each value is written as one string, the JSON that `serde_json` makes of
//! it, and read back the same way: one crossing of the JS/wasm boundary per
//! read or write. workers-rs's `Storage::get` and `put` go through
//! `serde-wasm-bindgen`, which builds or walks the value as JavaScript objects
//! field by field (a crossing per step), and carries a copy of that code for
//! every stored type.
//!
//! Values written that way by earlier releases are still read: such a value
//! is not a string, and is turned into JSON text on the JavaScript side.
//! `serde-wasm-bindgen` wrote maps as JavaScript `Map`s, which `JSON.stringify`
//! would write as `{}`, so they become plain objects first. Every other part of
//! such a value (objects, arrays, strings, safe-integer numbers, booleans;
//! `undefined` for an absent `Option`) reads the same as JSON. The value is
//! written back as text at its next change. (A value that was itself a
//! string would be taken for JSON text; the only such key is `ping`'s, which
//! is always written before it is read.)

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;
use worker::{Error, Result, State};

#[wasm_bindgen::prelude::wasm_bindgen(inline_js = r#"
export function storedText(value) {
  if (value === undefined || typeof value === "string") return value;
  return JSON.stringify(value, (_, v) => (v instanceof Map ? Object.fromEntries(v) : v));
}
"#)]
extern "C" {
    /// A stored value as JSON text: itself if it is a string (or `undefined`),
    /// else an earlier release's structured value, written out.
    #[wasm_bindgen(catch, js_name = storedText)]
    fn stored_text(value: &JsValue) -> std::result::Result<Option<String>, JsValue>;
}

/// The value under `key` in the object's storage; `None` when there is none.
pub async fn get<T: DeserializeOwned>(state: &State, key: &str) -> Result<Option<T>> {
    let storage = state.storage();
    let value = JsFuture::from(storage.as_raw().get(key)?).await?;
    match stored_text(&value)? {
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::RustError(format!("stored {key}: {e}"))),
        None => Ok(None),
    }
}

/// Stores `value` under `key`, as JSON text. Like the storage's own `put`,
/// the answer waits until the write is durable.
pub async fn put<T: Serialize + ?Sized>(state: &State, key: &str, value: &T) -> Result<()> {
    let text = serde_json::to_string(value)?;
    let storage = state.storage();
    JsFuture::from(storage.as_raw().put(key, JsValue::from_str(&text))?).await?;
    Ok(())
}
