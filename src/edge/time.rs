//! Time in the shell. `std::time::Instant` panics on wasm32; workerd's `Date.now()`
//! is the clock. It does not advance during pure computation (a Spectre
//! mitigation) but does across I/O, which is what probe latencies measure.

use std::future::Future;
use std::time::Duration;

use futures::future::{Either, select};
use wasm_bindgen::JsValue;
use worker::Delay;
use worker::js_sys::Promise;
use worker::wasm_bindgen_futures::JsFuture;

/// Unix milliseconds. `Date.now()` itself: `worker::Date::now()` allocates a
/// `Date` object to read it, several times per request.
pub fn now_ms() -> u64 {
    worker::js_sys::Date::now() as u64
}

/// Unix seconds, the unit of every domain timestamp.
pub fn now_secs() -> i64 {
    (now_ms() / 1000) as i64
}

/// Runs `fut` for at most `ms` milliseconds; `None` on timeout.
pub async fn timeout<T>(ms: u64, fut: impl Future<Output = T>) -> Option<T> {
    let fut = Box::pin(fut);
    let delay = Box::pin(Delay::from(Duration::from_millis(ms)));
    match select(fut, delay).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(_) => None,
    }
}

/// Waits `ms` milliseconds on a timer of the calling request's own.
pub async fn sleep(ms: u64) {
    Delay::from(Duration::from_millis(ms)).await;
}

#[wasm_bindgen::prelude::wasm_bindgen(module = "/src/edge/time.mjs")]
extern "C" {
    type RequestTimer;
    #[wasm_bindgen(constructor)]
    fn new() -> RequestTimer;
    #[wasm_bindgen(method)]
    fn race(this: &RequestTimer, promise: &Promise, ms: u32) -> Promise;
    #[wasm_bindgen(method)]
    fn stop(this: &RequestTimer);
}

/// One request's timer for its bounded waits on JavaScript promises (its
/// KV reads, its `RegionGate` call): every wait races the same `setTimeout`,
/// armed for the earliest deadline pending and re-armed, when it fires, for
/// the next. Waits with the same deadline (the KV reads a connect makes at
/// once: the runtime's clock does not move between them) share the promise
/// that rejects at it; a wait that has settled needs no removal, since
/// rejecting the promise it raced against changes nothing for it. The class
/// is `RequestTimer` in `time.mjs`, unit-tested under Node
/// (`tests/js/request-timer.test.mjs`).
///
/// A connect makes three such waits (and one more for each region whose
/// closed gate it is steered past, unless the isolate answers for that gate
/// from memory); with a timer each, it armed and cleared
/// three, and `setTimeout` and `clearTimeout` took 60 µs of the 1,351 µs its
/// isolate was busy per connect in a sampling profile
/// (`bench/lib/profile.mjs`); on one timer, armed once and cleared once when
/// the `Timer` is dropped, 27 µs of 1,554 (as with the one timer a connect
/// had before its KV reads were bounded). A waiting request is never woken by
/// another request's timer (workerd forbids waiting on another request's
/// I/O), so a `Timer` lives and dies within its request: at the latest with
/// the work the request leaves running after its answer (a connect's event
/// send, which holds it until the send ends).
pub struct Timer(RequestTimer);

impl Timer {
    pub fn new() -> Timer {
        Timer(RequestTimer::new())
    }

    /// `promise`, rejected if it has not settled within `ms` milliseconds.
    pub fn race(&self, promise: &Promise, ms: u32) -> Promise {
        self.0.race(promise, ms)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A promise that never settles: what the fault points that make a call
/// hang (`gate.hang`, `events.hang`) wait on instead of the call.
pub fn never() -> Promise {
    Promise::new(&mut |_, _| {})
}

/// Waits for `promise` at most `ms` milliseconds, on `timer` if the request
/// has one, else on a timer of its own; the rejection on timeout says so.
pub async fn bounded(
    promise: &Promise,
    ms: u32,
    timer: Option<&Timer>,
) -> Result<JsValue, JsValue> {
    match timer {
        Some(timer) => JsFuture::from(timer.0.race(promise, ms)).await,
        None => {
            let own = Timer::new();
            JsFuture::from(own.0.race(promise, ms)).await
        }
    }
}
