//! JSON values in Workers KV.
//!
//! KV's own `json` read type parses in JavaScript, and the result is then
//! walked from wasm field by field, each step a crossing of the JS/wasm
//! boundary. Reading the text and parsing it in wasm with `serde_json` costs one
//! crossing, so every JSON read goes through [`get_json`].

use serde::de::DeserializeOwned;
use worker::KvStore;

/// The value under `key` parsed as `T`; `None` when there is none.
pub async fn get_json<T: DeserializeOwned>(kv: &KvStore, key: &str) -> Result<Option<T>, String> {
    match kv.get(key).text().await.map_err(|e| e.to_string())? {
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
        None => Ok(None),
    }
}
