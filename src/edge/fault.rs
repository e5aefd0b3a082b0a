//! Fault injection for the end-to-end tests: makes a Durable Object operation
//! throw at a named point, as a crash there would, so the tests can check what
//! state such a crash leaves behind; or makes the Worker panic.
//!
//! Off unless the Worker runs with `ENVIRONMENT = "development"` *and* the var
//! `FAULT_INJECTION = "enabled"` (only the test harness sets it); a request
//! then names the point in the `x-keenvpn-fault` header. Anywhere else the
//! header is ignored, and the only cost is reading it.

use super::Fail;
use super::incoming::Incoming;
use worker::{Env, Error, Result};

/// The request header naming the point at which to throw.
pub const HEADER: &str = "x-keenvpn-fault";
/// The point, on `GET /readyz`, at which the Worker panics: the wasm
/// instance traps, and the next request must get a fresh one (`src/entry.mjs`).
pub const PANIC: &str = "worker.panic";
/// The point, on `POST /v1/connect`, at which the region's `RegionGate`
/// throws from its `admit` call (a crashed or overloaded object).
pub const GATE_ADMIT: &str = "gate.admit";
/// The point, on `POST /v1/connect`, at which the call to the region's
/// `RegionGate` never answers (the Worker waits on a promise that never
/// settles instead of calling it), as an overloaded object's might not.
pub const GATE_HANG: &str = "gate.hang";
/// The point, on `POST /v1/connect` and `GET /v1/regions`, at which the
/// catalogue's KV reads fail, as they would in a KV outage.
pub const CATALOGUE_KV: &str = "catalogue.kv";
/// The point, on `POST /v1/connect`, at which the request loads the
/// catalogue as an isolate without a copy does when KV holds no snapshot
/// (from PostgreSQL), and KV refuses the load's writes of it, as its limit
/// of one write per key per second refuses isolates racing to store it. On
/// `PUT /v1/admin/regions/{id}` and `PUT /v1/admin/servers/{id}`, the
/// point at which the `CataloguePublisher` object's publish of the change
/// fails to store it: a 503, the change committed, and not published again
/// by the Worker.
pub const CATALOGUE_UNSTORED: &str = "catalogue.unstored";
/// The point, on `DELETE /v1/devices/{id}` (and a registration), at which the
/// user's `UserSession` fails to write its KV copy of the devices, as KV's
/// limit of one write per key per second would make it.
pub const MIRROR_KV: &str = "mirror.kv";
/// The point, on `POST /v1/auth/login` and `POST /v1/auth/signup`, at which
/// each KV write the user's `UserSession` makes for the request (its copy of
/// the sessions, then any copy the same writer takes on from other requests,
/// and the entitlement cache) starts [`KV_SLOW_MS`] late, as in a KV stall.
pub const KV_SLOW: &str = "kv.slow";
pub const KV_SLOW_MS: u64 = 5_000;
/// The point, on `POST /v1/auth/signup` and `/login`, at which the user's
/// `UserSession` throws after storing the new session (the answer is lost).
pub const SESSION_CREATE: &str = "session.create";
/// The point, on `POST /v1/auth/signup`, `/login` and `/refresh`, at which
/// the Worker finds its signing keys refused by the runtime's WebCrypto.
pub const KEYS_REFUSED: &str = "keys.refused";
/// The point, on `POST /v1/auth/login`, at which signing the new session's
/// access token fails, after the user's object has stored the session; and
/// on `POST /v1/connect`, at which signing the ticket fails, after the
/// client was admitted.
pub const TOKEN_UNSIGNED: &str = "token.unsigned";
/// The point, on `POST /v1/auth/signup`, at which the new user's
/// `UserSession` throws after storing the session (as at [`SESSION_CREATE`])
/// and the sign-up's undo then starts [`KV_SLOW_MS`] late, as behind a slow
/// database: a window in which the new account can be signed in to.
pub const UNDO_SLOW: &str = "signup.undo_slow";
/// The point, on `POST /v1/auth/signup`, at which the new user's
/// `UserSession` throws after storing the session (as at [`SESSION_CREATE`])
/// and the sign-up's undo, once it holds the user's object, removes the
/// account [`KV_SLOW_MS`] late: a window in which a keyed retry meets the
/// hold.
pub const UNDO_HELD: &str = "signup.undo_held";
/// The point, on `POST /v1/auth/signup`, at which the new user's
/// `UserSession` throws after storing the session (as at [`SESSION_CREATE`])
/// and the sign-up's undo asks the object a route it does not know, as an
/// object of the release before `/undo` would answer during a deploy.
pub const UNDO_UNKNOWN: &str = "signup.undo_unknown";
/// The point, on `POST /v1/auth/signup`, at which the sign-up stops right
/// after PostgreSQL has stored the account, before its session is opened,
/// and undoes nothing: as when the runtime cancels a request whose client
/// went away.
pub const SIGNUP_CUT: &str = "signup.cut";
/// The point, on `POST /v1/auth/login`, at which the sign-in opens its
/// session [`LOGIN_LATE_MS`] after finding the account and checking the
/// password: late enough to meet an account that [`UNDO_SLOW`] removed.
pub const LOGIN_LATE: &str = "login.late";
pub const LOGIN_LATE_MS: u64 = 2 * KV_SLOW_MS;
/// The point, on `PUT /v1/devices/{id}/public_key`, at which the user's
/// object applies PostgreSQL's answer to the rotation [`DEVICE_LATE_MS`]
/// after it came: as when another rotation's answer overtakes it.
pub const DEVICE_LATE: &str = "device.late";
pub const DEVICE_LATE_MS: u64 = 2_000;
/// The point, on `DELETE /v1/me`, at which the user's object throws once it
/// has marked the account's deletion, before PostgreSQL deletes it: as when
/// the object goes part-way (its alarm must see the deletion through).
pub const ACCOUNT_MARKED: &str = "account.marked";
/// The point, on `DELETE /v1/devices/{id}`, at which the user's object
/// throws once it has recorded the removal (and its answer, under the
/// request's idempotency key): as when the object resets before answering.
pub const DEVICE_AFTER_APPLY: &str = "device.after_apply";
/// The point, on `POST /v1/connect`, at which the first attempt to send the
/// admitted connection's event to the queue fails, as a queue that refused
/// it would.
pub const EVENTS_SEND: &str = "events.send";
/// The point, on `POST /v1/connect`, at which the first attempt to send the
/// admitted connection's event never settles, as with a queue that takes the
/// send and never answers.
pub const EVENTS_HANG: &str = "events.hang";
/// The point, on `POST /v1/connect`, at which every attempt to send the
/// admitted connection's event fails, as with a queue that is down.
pub const EVENTS_DOWN: &str = "events.down";
/// The point, on `POST /v1/connect`, at which its KV reads (the session and
/// device copies, and the catalogue's check) never answer, as in a KV stall:
/// each fails after `kv::READ_TIMEOUT_MS`. On the admin region routes and
/// `PUT /v1/admin/servers/{id}`, the change's catalogue publish never
/// finishes, as its KV writes would not in a stall (the change never reaches
/// the `CataloguePublisher` object): it is given up on after
/// `admin::PUBLISH_LIMIT_MS`.
pub const KV_HANG: &str = "kv.hang";
/// The point, on `PUT /v1/admin/regions/{id}` and `PUT
/// /v1/admin/servers/{id}`, at which KV refuses the
/// change's first write of the catalogue snapshot, as its limit of one write
/// per key per second refuses a write that meets another publisher's. The
/// `CataloguePublisher` object gives such a change a publish of its own, not
/// shared with changes made meanwhile.
pub const KV_REFUSED: &str = "kv.refused";
/// The point, on `PUT /v1/admin/regions/{id}` and `PUT
/// /v1/admin/servers/{id}`, at which the call to the `CataloguePublisher`
/// object fails as the runtime fails it when the object is reset meanwhile
/// (an error marked `retryable`), every time: the Worker calls it once more,
/// then publishes the change itself.
pub const PUBLISHER_DOWN: &str = "publisher.down";
/// As [`PUBLISHER_DOWN`], for the first call only: the second reaches the
/// object, which publishes the change.
pub const PUBLISHER_RESET: &str = "publisher.reset";
/// The point, on `PUT /v1/admin/regions/{id}`, at which every call telling
/// the region's `RegionGate` shards whether it admits anyone fails, as calls
/// to objects in trouble would.
pub const GATE_UNFENCED: &str = "gate.unfenced";
const VAR: &str = "FAULT_INJECTION";

/// The point `asked` for, if fault injection is enabled in this environment.
pub fn armed(env: &Env, asked: Option<String>) -> Option<String> {
    let var = |name| super::bindings::text(env, name);
    asked.filter(|_| {
        var("ENVIRONMENT").as_deref() == Some("development")
            && var(VAR).as_deref() == Some("enabled")
    })
}

/// Whether `req` asks for the point `point` in its header, and fault
/// injection is enabled in this environment.
pub fn requested(env: &Env, req: &Incoming, point: &str) -> bool {
    armed(env, req.header(HEADER)).as_deref() == Some(point)
}

/// The 503 a route answers at the point `point`: the backing service it
/// stands for failing there.
pub fn unavailable(point: &str) -> Fail {
    Fail::unavailable(format!("injected fault at {point}"))
}

/// Waits [`KV_SLOW_MS`] when `armed` names [`KV_SLOW`] (a KV write about to
/// be made).
pub async fn kv_delay(armed: Option<&str>) {
    if armed == Some(KV_SLOW) {
        super::time::sleep(KV_SLOW_MS).await;
    }
}

/// The error attempt `n` (from 0) to send a request's event fails with:
/// the first at [`EVENTS_SEND`], every one at [`EVENTS_DOWN`].
pub fn send_refused(armed: &Option<String>, n: usize) -> Option<String> {
    match armed.as_deref() {
        Some(p @ EVENTS_SEND) if n == 0 => Some(format!("injected fault at {p}")),
        Some(p @ EVENTS_DOWN) => Some(format!("injected fault at {p}")),
        _ => None,
    }
}

/// Whether attempt `n` (from 0) to send a request's event never settles: the
/// first at [`EVENTS_HANG`].
pub fn send_hangs(armed: &Option<String>, n: usize) -> bool {
    n == 0 && armed.as_deref() == Some(EVENTS_HANG)
}

/// Throws (returns the error a crash would surface as) when `armed` names
/// `point`, or [`UNDO_SLOW`], [`UNDO_HELD`] or [`UNDO_UNKNOWN`], which
/// include [`SESSION_CREATE`].
pub fn at(armed: &Option<String>, point: &str) -> Result<()> {
    match armed.as_deref() {
        Some(p)
            if p == point
                || ([UNDO_SLOW, UNDO_HELD, UNDO_UNKNOWN].contains(&p)
                    && point == SESSION_CREATE) =>
        {
            Err(Error::RustError(format!("injected fault at {p}")))
        }
        _ => Ok(()),
    }
}
