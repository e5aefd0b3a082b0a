//! Ed25519 through the runtime's WebCrypto.
//!
//! Every connect verifies an access token and signs a ticket. Ed25519 compiled
//! to wasm costs several times what workerd's native implementation does (see
//! the README's performance notes), so the signature steps of
//! [`crate::domain::token`] run here, through `crypto.subtle`, while every other
//! check stays in the domain. WebCrypto's Ed25519 is RFC 8032 like
//! `ed25519-compact`'s: signatures are deterministic and identical, so tokens do
//! not depend on which implementation made them.
//!
//! The keys are imported once per isolate from the parsed [`KeySet`] (a static,
//! like the set itself). Should the platform refuse them, or a call fail, the
//! domain's own implementation does the work instead: slower, never different.

use std::cell::RefCell;
use std::rc::Rc;

use crate::domain::token::{AccessClaims, KeySet, SIGNATURE_LEN, TokenError, Unsigned, Unverified};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use js_sys::{Array, Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{CryptoKey, SubtleCrypto, WorkerGlobalScope};
use worker::wasm_bindgen_futures::JsFuture;

const ALGORITHM: &str = "Ed25519";

struct Imported {
    /// In the order of [`KeySet::pkcs8_keys`] (and of [`KeySet::verifying_keys`]).
    verify: Vec<CryptoKey>,
    sign: CryptoKey,
}

/// `None` until the first import; `Some(None)` once the platform refused.
type Cache = Option<Option<Rc<Imported>>>;

thread_local! {
    static KEYS: RefCell<Cache> = const { RefCell::new(None) };
}

thread_local! {
    /// `crypto.subtle`, looked up once per instance (three calls across the
    /// boundary each time otherwise, and a connect signs and verifies).
    static SUBTLE: Result<SubtleCrypto, JsValue> = {
        let scope: WorkerGlobalScope = js_sys::global().unchecked_into();
        scope.crypto().map(|c| c.subtle())
    };
}

fn subtle() -> Result<SubtleCrypto, JsValue> {
    SUBTLE.with(Clone::clone)
}

async fn call(promise: Result<Promise, JsValue>) -> Result<JsValue, JsValue> {
    JsFuture::from(promise?).await
}

async fn import(set: &KeySet) -> Result<Imported, JsValue> {
    let subtle = subtle()?;
    let import = |format: &str, bytes: &[u8], extractable: bool, usage: &str| {
        let usages = Array::of1(&JsValue::from_str(usage));
        let bytes = Uint8Array::from(bytes);
        subtle.import_key_with_str(format, &bytes, ALGORITHM, extractable, &usages)
    };
    // The public halves: the runtime derives each from its seed (a private
    // key's JWK carries the public `x`), natively. Deriving them in wasm would
    // cost a fresh isolate milliseconds per key in baseline-compiled code.
    let mut verify = Vec::with_capacity(set.pkcs8_keys().len());
    for der in set.pkcs8_keys() {
        let private: CryptoKey = call(import("pkcs8", &der, true, "sign"))
            .await?
            .unchecked_into();
        let jwk = call(subtle.export_key("jwk", &private)).await?;
        let x = Reflect::get(&jwk, &JsValue::from_str("x"))?
            .as_string()
            .and_then(|x| URL_SAFE_NO_PAD.decode(x).ok())
            .filter(|x| x.len() == 32)
            .ok_or_else(|| JsValue::from_str("the exported Ed25519 key has no 32-byte x"))?;
        verify.push(
            call(import("raw", &x, false, "verify"))
                .await?
                .unchecked_into(),
        );
    }
    // Signing uses a key of its own that cannot be exported.
    let sign = call(import("pkcs8", &set.signing_key_pkcs8(), false, "sign"))
        .await?
        .unchecked_into();
    Ok(Imported { verify, sign })
}

/// The imported keys, importing them on first use; `None` if the platform
/// cannot (then the domain's implementation is used).
async fn keys(set: &KeySet) -> Option<Rc<Imported>> {
    if let Some(cached) = KEYS.with(|k| k.borrow().clone()) {
        return cached;
    }
    // Concurrent first requests may both import; the keys are equal, and the
    // last one stored wins.
    let imported = match import(set).await {
        Ok(keys) => Some(Rc::new(keys)),
        Err(e) => {
            worker::console_error!(
                "{}",
                serde_json::json!({"level": "error", "msg": "WebCrypto refused the Ed25519 keys; verifying in wasm", "error": format!("{e:?}")})
            );
            None
        }
    };
    KEYS.with(|k| *k.borrow_mut() = Some(imported.clone()));
    imported
}

/// [`KeySet::verify`], with the signature checked by WebCrypto.
pub async fn verify(set: &KeySet, token: &str, now: i64) -> Result<AccessClaims, TokenError> {
    let unverified = set.check(token)?;
    let valid = match verify_signature(set, &unverified).await {
        Some(valid) => valid,
        None => set.verify_signature(&unverified),
    };
    unverified.claims(valid, now)
}

async fn verify_signature(set: &KeySet, unverified: &Unverified<'_>) -> Option<bool> {
    let keys = keys(set).await?;
    let key = keys.verify.get(unverified.key_index())?;
    let verdict = call(subtle().and_then(|s| {
        s.verify_with_str_and_u8_array_and_u8_array(
            ALGORITHM,
            key,
            unverified.signature(),
            unverified.signed_input(),
        )
    }))
    .await
    .ok()?;
    verdict.as_bool()
}

/// [`KeySet::sign`], with the signature made by WebCrypto.
pub async fn sign(set: &KeySet, unsigned: Unsigned) -> (String, i64) {
    match sign_input(set, &unsigned).await {
        Some(signature) => unsigned.signed(&signature),
        None => set.sign(unsigned),
    }
}

async fn sign_input(set: &KeySet, unsigned: &Unsigned) -> Option<[u8; SIGNATURE_LEN]> {
    let keys = keys(set).await?;
    let signature = call(subtle().and_then(|s| {
        s.sign_with_str_and_u8_array(ALGORITHM, &keys.sign, unsigned.signing_input())
    }))
    .await
    .ok()?;
    let bytes = Uint8Array::new(&signature);
    let mut out = [0_u8; SIGNATURE_LEN];
    if bytes.length() as usize != SIGNATURE_LEN {
        return None;
    }
    bytes.copy_to(&mut out);
    Some(out)
}
