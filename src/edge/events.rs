//! Connection events: the connect path enqueues one per decision (it never
//! writes to PostgreSQL itself); the queue consumer writes them in batches.
//!
//! A message is one event (`{event_id, ..}`, an admission) or several
//! (`{"events": [..]}`, refusals an isolate collected, and events it held
//! while the queue refused them: `domain::outbox`).
//! Delivery is at least once, so each event carries an id chosen by the
//! producer and the insert ignores ids it has already written.

use super::durable::js_error;
use super::log::{self, Level};
use super::time::{self, Timer};
use super::{bindings, fault, pg, random};
use crate::domain::connection_event;
pub use crate::domain::connection_event::ConnectionEvent;
use crate::domain::outbox::{self, Outbox, Push};
use serde::Serialize;
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::JsValue;
use worker::js_sys::{JSON, Promise};
use worker::{Context, Env, MessageBatch, event};

/// How long the consumer waits for PostgreSQL to take a batch.
const WRITE_TIMEOUT_MS: u64 = 15_000;

impl ConnectionEvent {
    pub fn new(
        user_id: &str,
        device_id: &str,
        region_id: &str,
        server_id: Option<&str>,
        outcome: &str,
    ) -> Self {
        ConnectionEvent {
            event_id: random::uuid_v4(),
            occurred_at_ms: time::now_ms(),
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            region_id: region_id.to_owned(),
            server_id: server_id.map(str::to_owned),
            outcome: outcome.to_owned(),
        }
    }
}

#[wasm_bindgen::prelude::wasm_bindgen]
extern "C" {
    /// A queue producer binding, as far as sending goes.
    type QueueProducer;
    #[wasm_bindgen(method, catch, js_name = send)]
    fn send_with(
        this: &QueueProducer,
        body: &JsValue,
        options: &JsValue,
    ) -> Result<Promise, JsValue>;
}

thread_local! {
    /// `{contentType: "json"}`: messages stay readable by any consumer (an HTTP
    /// pull consumer, say), not only by a Worker. Built once per isolate.
    static JSON_MESSAGE: JsValue = JSON::parse(r#"{"contentType":"json"}"#).unwrap_or_default();

    /// This isolate's events not yet sent: refusals being collected, and
    /// events whose sends all failed (`Outbox::hold`).
    static OUTBOX: RefCell<Outbox<ConnectionEvent>> = RefCell::new(Outbox::default());
}

/// Several events in one message.
#[derive(Serialize)]
struct Many<'a> {
    events: &'a [ConnectionEvent],
}

/// How long one send may take before it counts as failed (and is tried
/// again, or its events held). A send the queue takes and never answers
/// would otherwise hold its events until the runtime cancels the work after
/// the response (30 s), losing them without a word. Three attempts and their
/// pauses take at most 16.25 s.
const SEND_LIMIT_MS: u32 = 5_000;

/// Sends one message, bounded by [`SEND_LIMIT_MS`] on `timer` (the request's,
/// if it has one: no timer of its own to set and clear). workers-rs's
/// `Queue::send` builds the message object field by field across the
/// boundary, and its options object through serde, on every send; here the
/// message crosses once, as JSON text, which the runtime's own `JSON.parse`
/// turns into the object. `hang`: the fault point [`fault::EVENTS_HANG`]
/// stands in a promise that never settles for the send.
async fn send(env: &Env, text: &str, timer: Option<&Timer>, hang: bool) -> Result<(), String> {
    let promise = if hang {
        time::never()
    } else {
        let queue: QueueProducer = bindings::object(env, bindings::CONNECTION_EVENTS)?;
        let body = JSON::parse(text).map_err(|e| js_error(&e))?;
        JSON_MESSAGE
            .with(|options| queue.send_with(&body, options))
            .map_err(|e| js_error(&e))?
    };
    time::bounded(&promise, SEND_LIMIT_MS, timer)
        .await
        .map(drop)
        .map_err(|e| js_error(&e))
}

/// How long to wait before each retry of a failed send: a send is tried
/// three times in all, the pauses adding 1.25 s (a queue that refuses at
/// once is given up within about 1.3 s; one that answers none of them,
/// after [`WORST_SEND_MS`]). A retry of a send that did reach the queue is
/// harmless: the consumer inserts each event id once (`ON CONFLICT DO
/// NOTHING`).
const SEND_RETRY_DELAYS_MS: [u64; 2] = [250, 1_000];

/// The longest one message's attempts and pauses take.
const WORST_SEND_MS: u64 =
    3 * SEND_LIMIT_MS as u64 + SEND_RETRY_DELAYS_MS[0] + SEND_RETRY_DELAYS_MS[1];

/// `message` as JSON text, [`send`] and retried after
/// [`SEND_RETRY_DELAYS_MS`] while it fails; the last error if every attempt
/// did. `fault`: an armed fault point; at [`fault::EVENTS_SEND`] the first
/// attempt fails, as a queue that refused it would.
async fn send_retried(
    env: &Env,
    message: &impl Serialize,
    fault: &Option<String>,
    (timer, request_id): (Option<&Timer>, Option<&str>),
) -> Result<(), String> {
    let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
    retry_send(env, &text, fault, (timer, request_id)).await
}

/// [`send_retried`] once the message is text: one copy for every kind of
/// message. Each failed attempt that is tried again is logged (with the
/// request's id, where there is one), so that a queue refusing sends now and
/// then shows before it refuses them all.
async fn retry_send(
    env: &Env,
    text: &str,
    fault: &Option<String>,
    (timer, request_id): (Option<&Timer>, Option<&str>),
) -> Result<(), String> {
    let attempt = |n: usize| async move {
        match fault::send_refused(fault, n) {
            Some(e) => Err(e),
            None => send(env, text, timer, fault::send_hangs(fault, n)).await,
        }
    };
    let mut outcome = attempt(0).await;
    for (n, delay) in SEND_RETRY_DELAYS_MS.into_iter().enumerate() {
        let Err(e) = &outcome else {
            break;
        };
        log::event(
            Level::Warn,
            request_id,
            "connection event send failed; trying again",
            json!({"attempt": n + 1, "error": e}),
        );
        time::sleep(delay).await;
        outcome = attempt(n + 1).await;
    }
    outcome
}

/// Keeps `events`, whose sends all failed with `error`, in the isolate's
/// outbox for its next flush (see `domain::outbox`), and logs it: a warning
/// for those held, an error for any the full outbox could not take.
fn hold(events: Vec<ConnectionEvent>, error: &str, request_id: Option<&str>) {
    let count = events.len();
    let dropped = OUTBOX.with(|o| o.borrow_mut().hold(events));
    if count > dropped {
        log::event(
            Level::Warn,
            request_id,
            "connection events held for a later send",
            json!({"error": error, "count": count - dropped}),
        );
    }
    if dropped > 0 {
        log::event(
            Level::Error,
            request_id,
            "connection events lost: the isolate holds too many",
            json!({"error": error, "count": dropped, "held": outbox::MAX_HELD}),
        );
    }
}

/// Enqueues an admission's `event` after the response is sent (the hot path
/// does not wait), retrying a failed send (see [`SEND_RETRY_DELAYS_MS`]);
/// held in the outbox if every attempt fails. While the outbox holds events
/// no flush is scheduled for, the event joins them instead, so that they go
/// too. `fault`: an armed fault point of the request. `timer`: the request's,
/// which bounds the sends, and is stopped once they end.
pub fn enqueue(
    env: &Env,
    ctx: &Context,
    request_id: &str,
    event: ConnectionEvent,
    fault: Option<String>,
    timer: Rc<Timer>,
) {
    let waiting = OUTBOX.with(|o| {
        let mut o = o.borrow_mut();
        o.at(time::now_ms());
        o.waiting()
    });
    if waiting {
        return collect(env, ctx, event);
    }
    let env = env.clone();
    let request_id = request_id.to_owned();
    ctx.wait_until(async move {
        if let Err(e) = send_retried(&env, &event, &fault, (Some(&timer), Some(&request_id))).await
        {
            hold(vec![event], &e, Some(&request_id));
        }
    });
}

/// Collects `event` in this isolate's outbox: a refusal (`throttled` or
/// `closed`), or an admission while held events wait ([`enqueue`]). It is
/// sent with the others after the response: within
/// [`outbox::FLUSH_AFTER_MS`] by the request whose event found no flush
/// scheduled, or at once by the one that filled it.
pub fn collect(env: &Env, ctx: &Context, event: ConnectionEvent) {
    let (push, full) = OUTBOX.with(|o| {
        let mut o = o.borrow_mut();
        o.at(time::now_ms());
        let push = o.push(event);
        // A full batch is taken now: later refusals go to the next one.
        let full = if push == Push::SendNow {
            o.take_full()
        } else {
            Vec::new()
        };
        (push, full)
    });
    if matches!(push, Push::Queued | Push::Dropped) {
        return;
    }
    let env = env.clone();
    ctx.wait_until(async move {
        let began = time::now_ms();
        let events = if push == Push::Schedule {
            time::sleep(outbox::FLUSH_AFTER_MS).await;
            OUTBOX.with(|o| {
                let mut o = o.borrow_mut();
                o.at(time::now_ms());
                o.take_scheduled()
            })
        } else {
            full
        };
        send_batches(&env, events, began).await;
    });
}

/// Sends `events`, [`outbox::MAX_BATCH`] to a message, in the flush that
/// began at `began` (unix ms); holds the events of the first message whose
/// sends all fail, and every later one, without trying them (the queue is
/// refusing). A flush of held events can be ten messages, each up to
/// [`WORST_SEND_MS`] against a slow queue: a message whose sends could
/// outlast the runtime's time for the flush is not started, and it and the
/// rest are held (and logged so), rather than lost with the flush.
async fn send_batches(env: &Env, mut events: Vec<ConnectionEvent>, began: u64) {
    let dropped = OUTBOX.with(|o| o.borrow_mut().take_dropped());
    if dropped > 0 {
        log::event(
            Level::Error,
            None,
            "connection events lost: the isolate's sends under way hold too many",
            json!({"count": dropped, "held": outbox::MAX_HELD}),
        );
    }
    // The flush is done with these: sent, or held for the next.
    let done = |n: usize| OUTBOX.with(|o| o.borrow_mut().sent(n));
    let mut sent = 0;
    while sent < events.len() {
        let elapsed = time::now_ms().saturating_sub(began);
        if !outbox::may_start_send(elapsed, WORST_SEND_MS) {
            let e = format!("no time left in this flush after {elapsed} ms");
            done(events.len() - sent);
            return hold(events.split_off(sent), &e, None);
        }
        let end = events.len().min(sent + outbox::MAX_BATCH);
        let batch = Many {
            events: &events[sent..end],
        };
        if let Err(e) = send_retried(env, &batch, &None, (None, None)).await {
            done(events.len() - sent);
            return hold(events.split_off(sent), &e, None);
        }
        done(end - sent);
        sent = end;
    }
}

/// The events in one message body ([`connection_event::read_message`]).
/// The runtime hands the body over as an object; it crosses into wasm once,
/// as the JSON text `JSON.stringify` makes of it, for `serde_json` to read
/// (workers-rs's typed batches walk it field by field through
/// `serde-wasm-bindgen` instead).
fn events_in(body: JsValue) -> Result<Vec<Result<ConnectionEvent, String>>, String> {
    let text = JSON::stringify(&body)
        .map_err(|e| js_error(&e))?
        .as_string()
        .ok_or_else(|| "the body is not JSON".to_owned())?;
    connection_event::read_message(&text)
}

#[event(queue)]
async fn consume(
    batch: MessageBatch<ConnectionEvent>,
    env: Env,
    _ctx: Context,
) -> worker::Result<()> {
    // A body that does not even parse, or an event that does not, or one
    // that cannot be stored, is dropped and logged: failing the batch for it
    // would hold back every other event in it through all its retries, and
    // then send them to the dead-letter queue.
    let now = time::now_ms();
    let mut messages = 0;
    let mut malformed = 0;
    let mut rows = Vec::new();
    for m in batch.raw_iter() {
        messages += 1;
        let events = events_in(m.body()).unwrap_or_else(|e| vec![Err(e)]);
        for event in events {
            match event.and_then(|e| e.values_row(now)) {
                Ok(row) => rows.push(row),
                Err(e) => {
                    malformed += 1;
                    log::event(
                        Level::Error,
                        None,
                        "connection event unreadable, dropped",
                        json!({"error": e}),
                    );
                }
            }
        }
    }
    if rows.is_empty() {
        batch.ack_all();
        return Ok(());
    }
    let insert = connection_event::insert_sql(&rows);
    let written = async {
        let client = pg::connect(&env, bindings::DB).await?;
        client
            .simple_query(&insert)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    // A database that hangs rather than refuses must not hold a consumer
    // (at most five run) until the platform's own limit: the batch comes
    // back later instead.
    let written = time::timeout(WRITE_TIMEOUT_MS, written)
        .await
        .unwrap_or_else(|| Err(format!("timed out after {WRITE_TIMEOUT_MS} ms")));
    match written {
        Ok(()) => {
            log::event(
                Level::Info,
                None,
                "connection events written",
                json!({"messages": messages, "events": rows.len(), "dropped": malformed}),
            );
            batch.ack_all();
        }
        Err(e) => {
            // The whole batch comes back later; ids make the retry idempotent.
            log::event(
                Level::Error,
                None,
                "connection events not written",
                json!({"error": e, "count": rows.len()}),
            );
            batch.retry_all();
        }
    }
    Ok(())
}
