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
//! like the set itself). The Worker has no second implementation: Ed25519 is
//! part of the platform's WebCrypto, and carrying the domain's in the module
//! for the day it is not would cost every isolate about 50 KB of wasm. Should
//! the platform refuse the keys, or a call fail, the request gets a 503
//! (`service_unavailable`) and the refusal is logged; an import that failed is
//! tried again by the next request. The routes that write before they sign
//! (sign-up, sign-in, refresh) call [`ready`] before their first write, so
//! such a refusal leaves nothing behind.

use std::cell::RefCell;
use std::rc::Rc;

use super::Fail;
use super::durable::js_error;
use crate::api::Jwks;
use crate::domain::token::{AccessClaims, KeySet, SIGNATURE_LEN, TokenError, Unsigned};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use js_sys::{Array, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{CryptoKey, SubtleCrypto, WorkerGlobalScope};
use worker::wasm_bindgen_futures::JsFuture;

const ALGORITHM: &str = "Ed25519";

struct Imported {
    /// In the order of [`KeySet::pkcs8_keys`] (and of [`KeySet::verifying_keys`]).
    verify: Vec<CryptoKey>,
    /// The public halves, in the same order, as the runtime derived them.
    public: Vec<[u8; 32]>,
    sign: CryptoKey,
    /// `{name: "Ed25519"}`, made once: passed as a string, the name would
    /// cross the boundary (and be decoded from UTF-8) on every sign and verify.
    algorithm: Object,
}

thread_local! {
    /// `None` until an import succeeds.
    static KEYS: RefCell<Option<Rc<Imported>>> = const { RefCell::new(None) };
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
    let mut public = Vec::with_capacity(set.pkcs8_keys().len());
    for der in set.pkcs8_keys() {
        let private: CryptoKey = call(import("pkcs8", &der, true, "sign"))
            .await?
            .unchecked_into();
        let jwk = call(subtle.export_key("jwk", &private)).await?;
        let x = Reflect::get(&jwk, &JsValue::from_str("x"))?
            .as_string()
            .and_then(|x| URL_SAFE_NO_PAD.decode(x).ok())
            .and_then(|x| <[u8; 32]>::try_from(x).ok())
            .ok_or_else(|| JsValue::from_str("the exported Ed25519 key has no 32-byte x"))?;
        verify.push(
            call(import("raw", &x, false, "verify"))
                .await?
                .unchecked_into(),
        );
        public.push(x);
    }
    // Signing uses a key of its own that cannot be exported.
    let sign = call(import("pkcs8", &set.signing_key_pkcs8(), false, "sign"))
        .await?
        .unchecked_into();
    let algorithm = Object::new();
    Reflect::set(
        &algorithm,
        &JsValue::from_str("name"),
        &JsValue::from_str(ALGORITHM),
    )?;
    Ok(Imported {
        verify,
        public,
        sign,
        algorithm,
    })
}

/// The imported keys, importing them on first use.
async fn keys(set: &KeySet) -> Result<Rc<Imported>, Fail> {
    if let Some(cached) = KEYS.with(|k| k.borrow().clone()) {
        return Ok(cached);
    }
    // Concurrent first requests may both import; the keys are equal, and the
    // last one stored wins.
    match import(set).await {
        Ok(keys) => {
            let keys = Rc::new(keys);
            KEYS.with(|k| *k.borrow_mut() = Some(keys.clone()));
            Ok(keys)
        }
        // The request's error line logs the cause, with its request id.
        Err(e) => Err(Fail::unavailable(format!("{REFUSED}: {}", js_error(&e)))),
    }
}

/// How the cause of the 503 begins when the runtime refuses the keys (the
/// end-to-end run fails if any worker logged it).
const REFUSED: &str = "WebCrypto refused the Ed25519 keys";

/// Whether the keys are imported (importing them now if need be): the check
/// a route makes before writes that a signature must follow.
pub async fn ready(set: &KeySet) -> Result<(), Fail> {
    keys(set).await.map(drop)
}

/// [`KeySet::verify`], with the signature checked by WebCrypto. The outer
/// error is the platform's (a 503), the inner one the token's verdict.
pub async fn verify(
    set: &KeySet,
    token: &str,
    now: i64,
) -> Result<Result<AccessClaims, TokenError>, Fail> {
    let unverified = match set.check(token) {
        Ok(unverified) => unverified,
        Err(e) => return Ok(Err(e)),
    };
    let keys = keys(set).await?;
    // `check` found the key by its id, so the index is in range.
    let key = keys
        .verify
        .get(unverified.key_index())
        .ok_or_else(|| Fail::internal("a checked token's key is not imported".into()))?;
    let verdict = call(subtle().and_then(|s| {
        s.verify_with_object_and_u8_array_and_u8_array(
            &keys.algorithm,
            key,
            unverified.signature(),
            unverified.signed_input(),
        )
    }))
    .await
    .map_err(|e| Fail::unavailable(format!("WebCrypto verify: {}", js_error(&e))))?;
    let valid = verdict
        .as_bool()
        .ok_or_else(|| Fail::unavailable("WebCrypto verify answered no boolean".into()))?;
    Ok(unverified.claims(valid, now))
}

/// [`KeySet::sign`], with the signature made by WebCrypto.
pub async fn sign(set: &KeySet, unsigned: Unsigned) -> Result<(String, i64), Fail> {
    let keys = keys(set).await?;
    let signature = call(subtle().and_then(|s| {
        s.sign_with_object_and_u8_array(&keys.algorithm, &keys.sign, unsigned.signing_input())
    }))
    .await
    .map_err(|e| Fail::unavailable(format!("WebCrypto sign: {}", js_error(&e))))?;
    let bytes = Uint8Array::new(&signature);
    let mut out = [0_u8; SIGNATURE_LEN];
    if bytes.length() as usize != SIGNATURE_LEN {
        return Err(Fail::unavailable(format!(
            "WebCrypto signed {} bytes",
            bytes.length()
        )));
    }
    bytes.copy_to(&mut out);
    Ok(unsigned.signed(&out))
}

/// The key set as a JWKS document, with the public halves the runtime
/// derived.
pub async fn jwks(set: &KeySet) -> Result<Jwks, Fail> {
    Ok(set.jwks_from(&keys(set).await?.public))
}
