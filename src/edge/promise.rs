//! Awaiting the runtime's promises with one boundary crossing each.
//!
//! wasm-bindgen's `JsFuture` makes two closures for every promise it awaits
//! (one to resolve, one to reject): each is a JavaScript function built for
//! the call and registered with a `FinalizationRegistry`, and each is
//! unregistered and dropped when the promise settles: four calls across the
//! boundary besides `then` itself. A connect awaits seven promises.
//!
//! Here one closure, made once per instance ([`init`]), receives every
//! settlement as `(slot, ok, value)`; [`settled`] hands a promise to
//! JavaScript with the number of a slot ([`crate::pending`]) that holds the
//! awaiting task's waker.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::pending::Table;

use js_sys::Promise;
use wasm_bindgen::prelude::*;

#[wasm_bindgen(inline_js = r#"
let settle = null;
let generation = 0;
export function install(f) {
  settle = f;
  generation += 1;
}
export function watch(promise, slot) {
  // A promise watched by an instance that has since been replaced (after a
  // trap) settles into nothing: its slot numbers mean nothing to the new one.
  const g = generation;
  promise.then(
    (v) => { if (g === generation) settle(slot, true, v); },
    (e) => { if (g === generation) settle(slot, false, e); },
  );
}
"#)]
extern "C" {
    fn install(f: &Closure<dyn FnMut(u32, bool, JsValue)>);
    fn watch(promise: &Promise, slot: u32);
}

thread_local! {
    static SLOTS: RefCell<Table<Result<JsValue, JsValue>>> = RefCell::new(Table::default());
}

/// Makes the one closure every settlement goes through. Runs at instance
/// start (`#[event(start)]`), before any promise is awaited.
pub fn init() {
    let settle =
        Closure::<dyn FnMut(u32, bool, JsValue)>::new(|slot: u32, ok: bool, value: JsValue| {
            let outcome = if ok { Ok(value) } else { Err(value) };
            // Woken after the table is released: the wake may poll at once.
            let waker = SLOTS.with(|t| t.borrow_mut().settle(slot, outcome));
            if let Some(waker) = waker {
                waker.wake();
            }
        });
    install(&settle);
    // It lives as long as the instance.
    settle.forget();
}

/// A promise's outcome: `Ok` with its value, `Err` with its rejection.
pub struct Settled {
    /// `None` once the outcome has been taken.
    slot: Option<u32>,
}

pub fn settled(promise: &Promise) -> Settled {
    let slot = SLOTS.with(|t| t.borrow_mut().open());
    watch(promise, slot);
    Settled { slot: Some(slot) }
}

impl Future for Settled {
    type Output = Result<JsValue, JsValue>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slot = self
            .slot
            .expect("a Settled future polled after it completed");
        match SLOTS.with(|t| t.borrow_mut().poll(slot, cx.waker())) {
            Some(outcome) => {
                self.slot = None;
                Poll::Ready(outcome)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Settled {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            SLOTS.with(|t| t.borrow_mut().abandon(slot));
        }
    }
}
