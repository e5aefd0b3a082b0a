//! How this worker's futures are woken.
//!
//! wasm-bindgen's executor runs woken tasks in a microtask. It schedules that
//! microtask with the global `queueMicrotask` when there is one, and with a
//! resolved promise's `then` otherwise: both are microtasks, run in the same
//! order. Under workerd the first is the expensive one: on `POST /v1/connect`,
//! with about a dozen wake-ups per request, the calls to `queueMicrotask` took
//! about a tenth of the request's CPU in the V8 profiler
//! (`node bench/lib/profile.mjs`, see bench/README.md), and a resolved
//! promise's `then` is an ordinary V8 reaction job.
//!
//! The executor looks for `queueMicrotask` once, when it is first used. So
//! [`prefer_promise_jobs`], run at instance start before any request, hides the
//! global for exactly that moment and puts it back.

use wasm_bindgen::JsValue;
use worker::js_sys::{Reflect, global};

pub fn prefer_promise_jobs() {
    let global = global();
    let key = JsValue::from_str("queueMicrotask");
    let Ok(saved) = Reflect::get(&global, &key) else {
        return;
    };
    if !matches!(Reflect::set(&global, &key, &JsValue::UNDEFINED), Ok(true)) {
        // Not writable here: the executor keeps `queueMicrotask`, which works.
        return;
    }
    // The first use of the executor makes its queue, which reads the global now.
    worker::wasm_bindgen_futures::spawn_local(async {});
    let _ = Reflect::set(&global, &key, &saved);
}
