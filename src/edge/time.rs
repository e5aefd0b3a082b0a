//! Time in the shell. `std::time::Instant` panics on wasm32; workerd's `Date.now()`
//! is the clock. It does not advance during pure computation (a Spectre
//! mitigation) but does across I/O, which is what probe latencies measure.

use std::future::Future;
use std::time::Duration;

use futures::future::{Either, select};
use worker::Delay;

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
