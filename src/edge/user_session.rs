//! The `UserSession` Durable Object: the authority on one user's sessions.
//!
//! It holds the user's refresh-token families (`domain::session`) and the inputs
//! their entitlement is computed from, in one storage value written before any
//! answer is sent, so an acknowledged change is never lost. Because the object
//! is single-threaded, a refresh, a reuse check or a logout is atomic by
//! construction: two concurrent refreshes of one token rotate it exactly once.
//!
//! Storage semantics this relies on (workerd): each `put` is atomic, and a
//! response waits until the writes before it are durable (the output gate);
//! but a request that throws does not roll back what it already wrote. So
//! every step of an operation is one write of the whole state, and a
//! multi-step operation (a device registration) is written so that a crash
//! between steps leaves an earlier step whole (see `create_device`).
//!
//! After every change it mirrors the session list to KV (`sessions/<user id>`) so
//! any edge can list sessions and see revocations without calling it, and the
//! device records (`devices/<user id>`) for the connect path; those copies are
//! eventually consistent (about a minute) and are never used for decisions
//! this object makes. They are written one at a time, each from the state as
//! it is when its turn comes, so an older copy never lands after a newer one.
//! A copy that fails to be written (KV allows one write per key per second) is
//! written again by the object's alarm, with backoff, until it goes through;
//! and a revocation or a device change arms that alarm before the state is
//! written, so that a crash or an eviction before the copy is written (or,
//! for a device, before PostgreSQL's answer is applied) is repaired too: the
//! alarm of an instance that did not see its device changes through reads
//! the user's devices from PostgreSQL again.

use super::durable::{self, body, ping, refuse};
use super::log::{self, Level};
use super::store::{self, EntitlementInputs};
use super::{Fail, fault, kv, random, secrets, storage, time};
use crate::domain::device::{DeviceName, Ledger, LimitError, PublicKey, SyncMark};
use crate::domain::entitlement::Entitlement;
use crate::domain::idempotency::{Begin, Records, StoredResponse};
use crate::domain::session::{
    Issued, RefreshError, RefreshToken, Reopen, RevokeReason, SessionView, UserSessions,
};
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use wasm_bindgen::{JsCast, JsValue};
use worker::worker_sys::DurableObjectState;
use worker::{DurableObject, Env, Method, Request, Response, Result, State, durable_object};

const KEY: &str = "state";

/// How long a KV copy of the sessions or the devices lives after its last
/// write: a dormant user's copies (device names, keys, addresses, session
/// labels) leave KV within 30 days. An unchanged copy is skipped only when
/// this instance wrote it less than half that ago; and the connect path,
/// which falls back to the object when the copy lacks the device, has the
/// object write it again. An expired sessions copy revokes nothing that
/// matters: every revocation writes the copy, and the access tokens it
/// refuses live 15 minutes.
pub const MIRROR_TTL_SECS: u32 = 30 * 24 * 3600;

/// How recently this instance must have written the devices copy for a
/// connect that found none not to have it written again (see
/// `list_devices`): a location that read the key missing keeps answering so
/// for up to a minute (KV caches a miss), and each of its connects would
/// otherwise write the copy again.
const REWRITE_AFTER_SECS: i64 = 61;

/// How long after a revocation or a device change the alarm checks that the
/// KV copies were written: the backstop for a crash or an eviction between
/// the state's write and the copy's.
const MIRROR_CHECK_MS: u64 = 30_000;

/// How long a registration that would be answered from unsettled records
/// waits for the other device operations under way to end, so that the
/// records can be read again first; and how often it looks. Well within the
/// Worker's bound on an object call.
const SETTLE_WAIT_MS: u64 = 3_000;
const SETTLE_POLL_MS: u64 = 25;
/// The first retry of a copy that failed to be written; doubled after each
/// further failure, up to [`MIRROR_RETRY_MAX_MS`].
const MIRROR_RETRY_MS: u64 = 1_000;
const MIRROR_RETRY_MAX_MS: u64 = 300_000;
/// How long an answer waits for each of the object's KV writes (its copies,
/// the entitlement cache) before it goes out without them; a write that takes
/// longer goes on after the answer (see [`UserSession::within_wait`]). A KV
/// write takes tens of milliseconds; this bounds a stalled one.
const KV_WAIT_MS: u64 = 1_000;

/// The KV copies an object keeps (an index into [`Mirrors`]' arrays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mirrored {
    Sessions = 0,
    Devices = 1,
}

/// The steps the alarm retries, each with its own backoff.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Writing a copy to KV.
    Write,
    /// Reading the user's devices from PostgreSQL.
    Resync,
}

/// What this instance knows of its KV copies, by [`Mirrored`].
#[derive(Default)]
struct Mirrors {
    /// The text this instance last wrote under each key, and when (unix
    /// seconds): a copy whose text has not changed is not written again
    /// until half its [`MIRROR_TTL_SECS`] has passed.
    written: [Option<(String, i64)>; 2],
    /// Failed copy writes in a row, for the retry's backoff.
    write_failures: u32,
    /// Failed reads of the device list (in the alarm) in a row, likewise.
    resync_failures: u32,
    /// A request is writing the copies: another that changes them meanwhile
    /// marks them `due` and leaves them to it, rather than wait for it (a
    /// request must not wait on another's I/O) or write alongside it (the
    /// older copy could land last).
    writing: bool,
    due: [bool; 2],
}

impl Mirrors {
    /// Takes the copies marked due, sessions first.
    fn take_due(&mut self) -> Vec<Mirrored> {
        [Mirrored::Sessions, Mirrored::Devices]
            .into_iter()
            .filter(|&c| std::mem::take(&mut self.due[c as usize]))
            .collect()
    }
}

/// Marks the copies' writer gone when the writing request ends, however it
/// ends.
struct Writing<'a>(&'a RefCell<Mirrors>);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.borrow_mut().writing = false;
    }
}

/// The KV key of a user's session mirror.
pub fn mirror_key(user_id: &str) -> String {
    format!("sessions/{user_id}")
}

/// What is stored in KV for a user: their sessions as of the last change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mirror {
    pub sessions: Vec<SessionView>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    user_id: Option<String>,
    sessions: UserSessions,
    inputs: Option<EntitlementInputs>,
    /// Confirmed devices and in-flight reservations: the device limit's authority.
    #[serde(default)]
    devices: Ledger,
    /// `Idempotency-Key` records of this user's mutating requests.
    #[serde(default)]
    idempotency: Records,
    /// The user's devices as PostgreSQL last reported them, oldest first: what
    /// the connect path needs (mirrored to KV), so it never queries PostgreSQL.
    #[serde(default)]
    device_records: Vec<store::Device>,
    /// Set by `/close` when a sign-up was undone, and when the owner's
    /// deletion ends (`finish_deletion`): the object then opens
    /// no session again, so a sign-in that read the account before it went
    /// cannot leave one behind. (A removed account's id is never reused.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    closed: bool,
    /// Set while the account's deletion, asked by its owner, is under way
    /// (`/delete-account`): no session is refreshed or opened meanwhile, and
    /// should the object go before it ends, its alarm ends it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleting: bool,
    /// Until when (unix seconds) a failed sign-up's undo holds the object
    /// (`/undo`): no session is opened or handed out again meanwhile, so the
    /// undo cannot remove an account whose session a retry was just given.
    /// It ends with the undo (`/close`, or `/undo` with `keep`), or by
    /// itself ([`UNDO_HOLD_SECS`]), should the undo's request go first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    undoing_until: Option<i64>,
}

/// The KV key of a user's device mirror.
pub fn devices_key(user_id: &str) -> String {
    format!("devices/{user_id}")
}

/// What is stored in KV for a user's devices.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceMirror {
    pub devices: Vec<store::Device>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RotateKeyReq {
    pub user_id: String,
    pub device_id: String,
    pub public_key: String,
    /// `(key, fingerprint)` when the request carried an `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<(String, String)>,
    /// A fault point to stop at (development only; see `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// What a device change under [`UserSession::keyed`] answers.
enum Answer {
    /// It took effect: this status and JSON body, kept for the request's
    /// `Idempotency-Key`.
    Changed(u16, String),
    /// Anything else (no such device, a refusal): sent as it is, and the key
    /// is given back, so a retry runs again.
    Other(Response),
}

impl Answer {
    fn changed(status: u16, value: &impl Serialize) -> Result<Answer> {
        let body =
            serde_json::to_string(value).map_err(|e| worker::Error::RustError(e.to_string()))?;
        Ok(Answer::Changed(status, body))
    }

    fn into_response(self) -> Result<Response> {
        match self {
            Answer::Changed(status, body) => Ok(Response::ok(body)?.with_status(status)),
            Answer::Other(response) => Ok(response),
        }
    }
}

impl Stored {
    /// Binds this object to `user_id` on first use; false if it belongs to
    /// another user (a routing bug: an object's name is its user's id).
    fn claim(&mut self, user_id: &str) -> bool {
        match &self.user_id {
            Some(owner) => owner == user_id,
            None => {
                self.user_id = Some(user_id.to_owned());
                true
            }
        }
    }
}

/// The KV key of a user's cached entitlement (short TTL; for reads that need no
/// strong consistency).
pub fn entitlement_key(user_id: &str) -> String {
    format!("entitlement/{user_id}")
}
const ENTITLEMENT_CACHE_TTL_SECS: u32 = 300;
/// How many times [`UserSession::cache_entitlement`] writes at most.
const CACHE_ROUNDS: usize = 3;

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateDeviceReq {
    pub user_id: String,
    pub name: String,
    pub public_key: String,
    /// The limit in the caller's access token, used only if this object has
    /// never been told the user's entitlement inputs.
    pub token_max_devices: u32,
    /// `(key, fingerprint)` when the request carried an `Idempotency-Key`.
    pub idempotency: Option<(String, String)>,
    /// A fault point to throw at (development only; see `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeleteDeviceReq {
    pub user_id: String,
    pub device_id: String,
    /// `(key, fingerprint)` when the request carried an `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<(String, String)>,
    /// A fault point to fail at (development only; see `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InputsReq {
    pub user_id: String,
    pub inputs: EntitlementInputs,
}

/// What a request hands down to the steps it runs in the object: the id of
/// the Worker's request it is made for (sent as
/// [`durable::REQUEST_ID_HEADER`]), which the lines they log carry, and the
/// development-only fault point armed for it. The alarm runs with neither.
#[derive(Clone, Default)]
struct Origin {
    request_id: Option<String>,
    fault: Option<String>,
}

impl Origin {
    fn of(req: &Request) -> Origin {
        Origin {
            request_id: req.headers().get(durable::REQUEST_ID_HEADER).ok().flatten(),
            fault: None,
        }
    }

    /// The same request, with the fault point `fault` armed.
    fn with_fault(self, fault: Option<String>) -> Origin {
        Origin { fault, ..self }
    }

    /// The same request, with no fault point armed.
    fn unfaulted(&self) -> Origin {
        Origin {
            request_id: self.request_id.clone(),
            fault: None,
        }
    }

    fn fault(&self) -> Option<&str> {
        self.fault.as_deref()
    }

    fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

/// Relays a shell failure (its problem code and status) as an object answer.
fn refuse_fail(fail: &Fail, origin: &Origin) -> Result<Response> {
    if let Some(cause) = &fail.cause {
        log::event(
            Level::Error,
            origin.request_id(),
            "user session",
            serde_json::json!({"error": cause}),
        );
    }
    refuse(
        fail.api.code.status(),
        fail.api.code.as_str(),
        // A default one is left to the worker, which spreads it.
        fail.api
            .retry_after
            .filter(|_| !fail.api.default_retry_after)
            .map(u64::from),
    )
}

/// The refusal of a registration at the device limit, with the limit the
/// object enforced (it follows billing at once; the caller's token may be
/// up to one refresh behind).
fn limit_reached(limit: u32) -> Result<Response> {
    Ok(Response::from_json(
        &serde_json::json!({ "code": "device_limit_reached", "max_devices": limit }),
    )?
    .with_status(403))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateReq {
    pub user_id: String,
    pub label: String,
    pub inputs: EntitlementInputs,
    /// `(key, fingerprint)` when the sign-in or sign-up carried an
    /// `Idempotency-Key`: see [`UserSessions::reopen`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<(String, String)>,
    /// Open no session, only answer again with the one the key's first
    /// request opened: a retried sign-up, whose account exists already.
    /// Without one to answer with, the object answers 409 `email_taken`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub again_only: bool,
    /// The new session's id (32 hex digits, random), chosen by the Worker so
    /// that it can take back (`/withdraw`) a session whose answer it never
    /// got; without one, or with one in use, the object draws it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// A fault point to throw at (development only; see `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// No `Debug`: it holds a refresh token.
#[derive(Serialize, Deserialize)]
pub struct RefreshReq {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevokeReq {
    pub sid: String,
}

/// `/close`: the account `user_id` was removed.
#[derive(Debug, Serialize, Deserialize)]
pub struct CloseReq {
    pub user_id: String,
}

/// `/undo`: a failed sign-up's undo begins (and learns whether a retry was
/// given the session), or, with `keep`, ends with the account kept.
#[derive(Debug, Serialize, Deserialize)]
pub struct UndoReq {
    pub user_id: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
}

/// How long a sign-up's undo holds the object at most: longer than its
/// removal of the account in PostgreSQL can take (its query is bounded by
/// 5 s in the Worker, and by less in the database,
/// `sql::UNDO_STATEMENT_LIMIT_MS`).
const UNDO_HOLD_SECS: i64 = 15;

/// `/delete-account`: the owner's session asks.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeleteAccountReq {
    pub user_id: String,
    pub sid: String,
    /// A fault point to throw at (development only; see `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// How soon the alarm takes up a deletion the object did not see through:
/// longer than the request's own deletion takes, so that the two seldom
/// meet (they may: the second finds the account gone, and closes again).
const DELETION_RETRY_MS: u64 = 5_000;

/// How often the alarm tries a deletion again while PostgreSQL fails it,
/// after the first retry ([`DELETION_RETRY_MS`]).
const DELETION_RETRY_AGAIN_MS: u64 = 30_000;

/// Which sessions a revocation ends (see `UserSession::revoke`).
#[derive(Clone, Copy)]
enum Ending {
    One,
    All,
    Close,
    /// `/withdraw`: a session whose sign-in could not be answered, taken back
    /// with what its opening evicted (`UserSessions::withdraw`).
    Withdrawn,
}

/// A new or rotated session: what the worker needs to answer with a token
/// pair. No `Debug`: it holds the refresh token.
#[derive(Serialize, Deserialize)]
pub struct IssuedResp {
    pub sid: String,
    pub refresh_token: String,
    pub entitlement: Entitlement,
    /// The session an earlier request under the same `Idempotency-Key`
    /// opened (and may have answered): not this request's to withdraw.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reopened: bool,
}

/// The fields live behind `Rc`s so that a copy of the object (`clone`, which
/// shares them) can finish a KV write after the request that started it has
/// answered (see [`UserSession::within_wait`]).
#[durable_object(alarm)]
pub struct UserSession {
    state: State,
    env: Env,
    /// The device registrations running in this instance right now.
    running: Rc<RefCell<Running>>,
    /// The KV copies and their writer (see the module docs).
    mirrors: Rc<RefCell<Mirrors>>,
    /// Device operations started in this instance and not seen through.
    device_ops: Rc<Cell<u32>>,
    /// Device operations ever started in this instance: the alarm applies a
    /// device list only if none started while it read the list.
    device_generation: Rc<Cell<u64>>,
    /// Whether this instance has seen every device operation it started
    /// through to the records (false in a fresh instance: an operation of an
    /// earlier one may have been cut short).
    devices_settled: Rc<Cell<bool>>,
}

impl Clone for UserSession {
    /// The same instance: the same storage, bindings and in-memory state.
    fn clone(&self) -> Self {
        UserSession {
            // (workers-rs's `State` is not `Clone`; its JavaScript object is.)
            state: State::from(
                AsRef::<JsValue>::as_ref(self.state.as_raw())
                    .clone()
                    .unchecked_into::<DurableObjectState>(),
            ),
            env: self.env.clone(),
            running: Rc::clone(&self.running),
            mirrors: Rc::clone(&self.mirrors),
            device_ops: Rc::clone(&self.device_ops),
            device_generation: Rc::clone(&self.device_generation),
            devices_settled: Rc::clone(&self.devices_settled),
        }
    }
}

/// What [`UserSession::settle_devices`] came to.
enum Settle {
    /// The records hold PostgreSQL's list (or were known to already).
    Settled,
    /// A device operation is under way, or started while the list was read:
    /// its own outcome will settle the records, or the alarm look again.
    Busy,
    /// PostgreSQL could not be read (the cause).
    Failed(String),
}

/// A device operation under way: arms the alarm before it changes anything,
/// and leaves the records unsettled unless it is seen through ([`DeviceOp::done`]).
struct DeviceOp<'a> {
    object: &'a UserSession,
    done: bool,
}

impl DeviceOp<'_> {
    /// The operation's outcome has been applied to the records.
    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for DeviceOp<'_> {
    fn drop(&mut self) {
        let o = self.object;
        o.device_ops.set(o.device_ops.get() - 1);
        if !self.done {
            o.devices_settled.set(false);
        }
    }
}

/// Idempotency keys and reservation ids owned by requests that are still
/// running in this instance. An object runs as one instance at a time, so a
/// stored in-flight record or reservation missing from here belongs to a
/// request that died (it threw, or the object restarted since): nothing will
/// ever complete or release it, and it is cleaned up at once instead of
/// holding its key or slot until it expires.
#[derive(Default)]
struct Running {
    /// Key -> how many running requests hold it (a request whose record
    /// expired while it still ran, and the retry that took the key over).
    keys: BTreeMap<String, u32>,
    reservations: BTreeSet<String>,
}

/// The device a request changed, as PostgreSQL answered it: applied to the
/// device records whether or not the list that came with it is stale.
enum Own<'a> {
    Nothing,
    Wrote(&'a store::Device),
    Deleted(&'a str),
}

/// Removes what a request registered in [`Running`] when the request ends,
/// however it ends (an answer, an error, or its future being dropped).
struct Owned<'a> {
    running: &'a RefCell<Running>,
    key: Option<String>,
    reservation: Option<String>,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        let mut running = self.running.borrow_mut();
        if let Some(k) = &self.key
            && let Some(n) = running.keys.get_mut(k)
        {
            *n -= 1;
            if *n == 0 {
                running.keys.remove(k);
            }
        }
        if let Some(r) = &self.reservation {
            running.reservations.remove(r);
        }
    }
}

impl UserSession {
    async fn load(&self) -> Result<Stored> {
        Ok(storage::get(&self.state, KEY).await?.unwrap_or_default())
    }

    /// Persists the state only (no KV mirror): device and idempotency changes.
    async fn persist(&self, stored: &mut Stored, now: i64) -> Result<()> {
        stored.idempotency.prune(now);
        storage::put(&self.state, KEY, &*stored).await
    }

    /// Persists the state, then mirrors the session list to KV. A revocation
    /// (`revokes`) arms the alarm first, so that its copy is written even if
    /// the object goes away before it writes it.
    async fn save(
        &self,
        stored: &mut Stored,
        now: i64,
        revokes: bool,
        origin: &Origin,
    ) -> Result<()> {
        stored.sessions.prune(now);
        if revokes {
            self.arm(MIRROR_CHECK_MS, origin).await;
        }
        self.persist(stored, now).await?;
        self.mirror(&[Mirrored::Sessions], origin).await;
        Ok(())
    }

    /// Starts a device operation (see [`DeviceOp`]).
    async fn device_op(&self, origin: &Origin) -> DeviceOp<'_> {
        self.device_ops.set(self.device_ops.get() + 1);
        self.device_generation
            .set(self.device_generation.get().wrapping_add(1));
        let op = DeviceOp {
            object: self,
            done: false,
        };
        self.arm(MIRROR_CHECK_MS, origin).await;
        op
    }

    /// Makes sure the alarm fires within `in_ms` (an earlier one stays).
    async fn arm(&self, in_ms: u64, origin: &Origin) {
        self.arm_unless((in_ms, false), origin).await;
    }

    /// Makes sure a pending deletion's alarm is set (should an earlier one
    /// have failed to be set), without bringing one that is set sooner: a
    /// deletion PostgreSQL keeps failing is tried every 30 s
    /// ([`DELETION_RETRY_AGAIN_MS`]), however often its client asks.
    async fn arm_deletion(&self, origin: &Origin) {
        self.arm_unless((DELETION_RETRY_MS, true), origin).await;
    }

    /// The answer to a request that would open, refresh or add something
    /// while the account's deletion is under way: 503, ask again in 5 s (the
    /// account may be gone then, or kept), with the deletion's alarm made
    /// sure of.
    async fn refuse_while_deleting(&self, origin: &Origin) -> Result<Response> {
        self.arm_deletion(origin).await;
        refuse(503, "service_unavailable", Some(5))
    }

    /// Arms the alarm `in_ms` from now unless one is set sooner, or, with
    /// `any`, unless one is set at all.
    async fn arm_unless(&self, (in_ms, any): (u64, bool), origin: &Origin) {
        let storage = self.state.storage();
        let due = time::now_ms() + in_ms;
        if let Ok(Some(at)) = storage.get_alarm().await
            && (any || u64::try_from(at).is_ok_and(|at| at <= due))
        {
            return;
        }
        if let Err(e) = storage.set_alarm(in_ms as i64).await {
            log::event(
                Level::Error,
                origin.request_id(),
                "alarm not set",
                serde_json::json!({"error": e.to_string()}),
            );
        }
    }

    /// Runs `work` (KV writes) to its end, and waits for it at most
    /// [`KV_WAIT_MS`]: a KV stall must not hold the answer (a sign-in's
    /// caller would give up and retry, and each retry store another session).
    /// Work that takes longer goes on after the answer, kept alive by
    /// `waitUntil`. It is not dropped part-way: a put already sent lands
    /// anyway, and a writer started beside it could then see its newer copy
    /// overwritten by the older one. The alarm is armed too, in case the
    /// object goes away before the work ends.
    async fn within_wait(&self, work: LocalBoxFuture<'static, ()>, origin: &Origin) {
        let (done, finished) = futures::channel::oneshot::channel::<()>();
        self.state.wait_until(async move {
            work.await;
            let _ = done.send(());
        });
        if time::timeout(KV_WAIT_MS, finished).await.is_none() {
            log::event(
                Level::Warn,
                origin.request_id(),
                "KV write outlasted its wait; it goes on after the answer",
                serde_json::json!({"waited_ms": KV_WAIT_MS}),
            );
            self.arm(MIRROR_CHECK_MS, origin).await;
        }
    }

    /// Brings `copies` in KV up to date: writes them if no other request is
    /// writing, and then whatever other requests marked due meanwhile, each
    /// from the state as it is when its turn comes; otherwise leaves them to
    /// that writer. The caller waits for the writer within
    /// [`UserSession::within_wait`]'s bound. A failure is logged and retried
    /// by the alarm, with backoff, under the id of the request that started
    /// the writer (whose copies it may be writing alongside others'). The
    /// development-only fault point in `origin`: at `mirror.kv` every write
    /// fails, at `kv.slow` each is late.
    async fn mirror(&self, copies: &[Mirrored], origin: &Origin) {
        {
            let mut m = self.mirrors.borrow_mut();
            for &copy in copies {
                m.due[copy as usize] = true;
            }
            if m.writing {
                return;
            }
            m.writing = true;
        }
        let this = self.clone();
        let writer = origin.clone();
        self.within_wait(
            Box::pin(async move { this.write_due(&writer).await }),
            origin,
        )
        .await;
    }

    /// The writer [`UserSession::mirror`] starts: writes the copies marked
    /// due until none is, then marks itself gone.
    async fn write_due(&self, origin: &Origin) {
        let _writing = Writing(&self.mirrors);
        loop {
            let due = self.mirrors.borrow_mut().take_due();
            if due.is_empty() {
                self.mirrors.borrow_mut().write_failures = 0;
                return;
            }
            if let Err(e) = self.write_copies(&due, origin.fault()).await {
                return self.retry_later(Retry::Write, e.0, &e.1, origin).await;
            }
        }
    }

    /// Writes `copies` from the state as it is now, skipping a copy this
    /// instance already wrote with the same text.
    async fn write_copies(
        &self,
        copies: &[Mirrored],
        fault: Option<&str>,
    ) -> std::result::Result<(), (&'static str, String)> {
        let stored = self
            .load()
            .await
            .map_err(|e| ("state read", e.to_string()))?;
        let Some(user_id) = &stored.user_id else {
            return Ok(());
        };
        let now = time::now_secs();
        for &copy in copies {
            let (key, text) = match copy {
                Mirrored::Sessions => (
                    mirror_key(user_id),
                    serde_json::to_string(&Mirror {
                        sessions: stored.sessions.mirror(now),
                    }),
                ),
                Mirrored::Devices => (
                    devices_key(user_id),
                    serde_json::to_string(&DeviceMirror {
                        devices: stored.device_records.clone(),
                    }),
                ),
            };
            let Ok(text) = text else {
                continue;
            };
            let fresh = |(last, at): &(String, i64)| {
                *last == text && now - at < i64::from(MIRROR_TTL_SECS / 2)
            };
            if self.mirrors.borrow().written[copy as usize]
                .as_ref()
                .is_some_and(fresh)
            {
                continue;
            }
            fault::kv_delay(fault).await;
            let written = if fault == Some(fault::MIRROR_KV) {
                Err(format!("{key}: injected fault at {}", fault::MIRROR_KV))
            } else {
                kv::put(&self.env, &key, &text, Some(MIRROR_TTL_SECS)).await
            };
            match written {
                Ok(()) => self.mirrors.borrow_mut().written[copy as usize] = Some((text, now)),
                Err(e) => {
                    // Whatever the store holds now is unknown.
                    self.mirrors.borrow_mut().written[copy as usize] = None;
                    return Err(("mirror write", e));
                }
            }
        }
        Ok(())
    }

    /// Logs a failed step of keeping the copies (`what`) and arms the alarm to
    /// try again, with backoff (each kind of step counts its own failures).
    async fn retry_later(&self, kind: Retry, what: &str, error: &str, origin: &Origin) {
        let failures = {
            let mut m = self.mirrors.borrow_mut();
            let n = match kind {
                Retry::Write => &mut m.write_failures,
                Retry::Resync => &mut m.resync_failures,
            };
            *n = n.saturating_add(1);
            *n
        };
        let retry_ms = MIRROR_RETRY_MS
            .saturating_mul(1 << (failures - 1).min(20))
            .min(MIRROR_RETRY_MAX_MS);
        log::event(
            Level::Error,
            origin.request_id(),
            &format!("{what} failed; the alarm tries again"),
            serde_json::json!({"retry_in_ms": retry_ms, "error": error}),
        );
        self.arm(retry_ms, origin).await;
    }

    /// The alarm: brings the KV copies up to date; first, if this instance
    /// did not see every device operation through (it is fresh, or one failed
    /// part-way), the device records from PostgreSQL. A list read while a
    /// device operation started is not applied (it may predate that
    /// operation's change); the alarm looks again later instead, as it does
    /// while an operation is under way.
    async fn check(&self) -> Result<()> {
        let origin = Origin::default();
        let stored = self.load().await?;
        if stored.user_id.is_none() {
            return Ok(());
        }
        if stored.deleting {
            // A deletion the object did not see through (it went, or
            // PostgreSQL failed): its answer went to no one, or was a 503.
            self.finish_deletion(&origin).await?;
        }
        let now_stored = self.load().await?;
        if now_stored.closed {
            // Nothing left to settle: write the (empty) copies and stop.
            self.mirror(&[Mirrored::Sessions, Mirrored::Devices], &origin)
                .await;
            return Ok(());
        }
        // A deletion that failed again has armed its own retry (every 30 s);
        // the device list, which the deletion makes moot, is not read
        // meanwhile (its retries, from 1 s, would bring the deletion's
        // sooner, against the same failing database).
        if !now_stored.deleting {
            match self.settle_devices(&origin).await? {
                Settle::Settled => self.mirrors.borrow_mut().resync_failures = 0,
                Settle::Busy => self.arm(MIRROR_CHECK_MS, &origin).await,
                Settle::Failed(cause) => {
                    self.retry_later(Retry::Resync, "device list", &cause, &origin)
                        .await;
                }
            }
        }
        // A writer already under way takes the copies over (`mirror`). It
        // lives in this instance's memory only: should the instance go away
        // before it ends (its KV write stalled), no alarm would be left to
        // write them. So the alarm comes back, as it does while a device
        // operation runs.
        if self.mirrors.borrow().writing {
            self.arm(MIRROR_CHECK_MS, &origin).await;
        }
        self.mirror(&[Mirrored::Sessions, Mirrored::Devices], &origin)
            .await;
        Ok(())
    }

    /// Brings the device records up to date with PostgreSQL's list, unless
    /// this instance has seen every device operation through (then they are).
    /// A list read while a device operation started is not applied: it may
    /// predate that operation's change.
    async fn settle_devices(&self, origin: &Origin) -> Result<Settle> {
        if self.device_ops.get() > 0 {
            return Ok(Settle::Busy);
        }
        if self.devices_settled.get() {
            return Ok(Settle::Settled);
        }
        let stored = self.load().await?;
        let Some(user_id) = stored.user_id else {
            return Ok(Settle::Settled);
        };
        let generation = self.device_generation.get();
        let mark = stored.devices.mark();
        let listed = match store::connect(&self.env).await {
            Ok(db) => store::list_devices(&db, &user_id).await,
            Err(fail) => Err(fail),
        };
        let unchanged = || self.device_generation.get() == generation;
        match listed {
            // No await but storage ones between this check and the list's
            // application, so no operation can start in between.
            Ok(devices) if unchanged() => {
                self.apply_devices(mark, devices, Own::Nothing, None, origin)
                    .await?;
                if !unchanged() {
                    return Ok(Settle::Busy);
                }
                self.devices_settled.set(true);
                Ok(Settle::Settled)
            }
            Ok(_) => Ok(Settle::Busy),
            Err(fail) => Ok(Settle::Failed(fail.cause.unwrap_or_default())),
        }
    }

    /// Records PostgreSQL's list of the user's devices: syncs the ledger (from
    /// `mark`, see `Ledger::sync_since`), keeps the records, persists, and
    /// mirrors them to KV for the connect path. `answered`: the request's
    /// idempotency key and its answer, recorded in the same write as the
    /// change, so that no reset of the object between two writes leaves the
    /// change made and its key's record in flight (a retry would then run
    /// it again, and find nothing to do: a removal's retry answered 404).
    async fn apply_devices(
        &self,
        mark: SyncMark,
        devices: Vec<store::Device>,
        own: Own<'_>,
        answered: Option<(&str, &Answer)>,
        origin: &Origin,
    ) -> Result<()> {
        let now = time::now_secs();
        let mut stored = self.load().await?;
        Self::sync_devices(&mut stored, mark, devices, own);
        if let Some((key, Answer::Changed(status, body))) = answered {
            let response = StoredResponse {
                status: *status,
                body: body.clone(),
            };
            stored.idempotency.complete(key, response, now);
        }
        self.persist(&mut stored, now).await?;
        self.mirror(&[Mirrored::Devices], origin).await;
        Ok(())
    }

    /// Applies PostgreSQL's list of the user's devices, read under `mark`, to
    /// the ledger and to the records the connect path reads, keeping the two
    /// in step: a list can be stale (read before another request's confirm),
    /// and the records must then keep the devices the ledger keeps rather
    /// than follow the list. What this request itself changed wins either
    /// way (see [`Own`]). Returns whether the records changed.
    fn sync_devices(
        stored: &mut Stored,
        mark: SyncMark,
        list: Vec<store::Device>,
        own: Own<'_>,
    ) -> bool {
        if stored.closed {
            // The account went, its devices with it: no list read, nor a
            // registration committed before the delete, brings one back.
            stored.device_records.clear();
            return false;
        }
        let (own, removed) = match own {
            Own::Nothing => (None, None),
            Own::Wrote(d) => (Some(d), None),
            Own::Deleted(id) => (None, Some(id)),
        };
        // A list read under an older mark than this write may show the row
        // as it was before: the ledger remembers the write past the mark.
        if let Some(d) = own {
            stored.devices.touch(&d.id);
        }
        let applied = stored
            .devices
            .sync_since(mark, list.iter().map(|d| d.id.clone()).collect());
        if let Some(id) = removed {
            stored.devices.forget(id);
        }
        let old = std::mem::take(&mut stored.device_records);
        // The newer of the two is the base; the other only adds devices the
        // ledger counts that the base lacks.
        let (base, other) = if applied {
            (list, old.clone())
        } else {
            (old.clone(), list)
        };
        let mut records: Vec<store::Device> = base
            .into_iter()
            .filter(|d| stored.devices.counts(&d.id))
            .collect();
        for d in other.into_iter().chain(own.cloned()) {
            if !stored.devices.counts(&d.id) {
                continue;
            }
            // The request's own write wins; so does the record of a device
            // written (added, or its key rotated) after the list's mark,
            // which may show the row as it was before: a registration whose
            // answer comes after a rotation committed must not put the old
            // key back.
            let newer = own.is_some_and(|o| o.id == d.id)
                || (applied && stored.devices.written_after(mark, &d.id));
            match records.iter_mut().find(|r| r.id == d.id) {
                Some(r) if newer => *r = d,
                Some(_) => {}
                None => records.push(d),
            }
        }
        if let Some(id) = removed {
            records.retain(|r| r.id != id);
        }
        // Oldest first, by the second each was made (as `created_at` says);
        // within one second, in the order merged above, which is
        // PostgreSQL's (by the microsecond) for a list just read and the
        // newest last for one just made. By id
        // instead, two devices made in one second could rank otherwise than
        // in the device list, and after a downgrade the connect would let
        // in another device than the one the list shows first. (An unstable
        // sort of a unique key: the module carries no stable sort.)
        let mut ranked: Vec<(usize, store::Device)> = records.into_iter().enumerate().collect();
        ranked.sort_unstable_by_key(|(i, d)| (d.created_at, *i));
        let records: Vec<store::Device> = ranked.into_iter().map(|(_, d)| d).collect();
        let changed = records != old;
        stored.device_records = records;
        changed
    }

    /// Writes the entitlement of the inputs the object holds now to its KV
    /// copy (best effort: it serves only reads that need no strong
    /// consistency). Other requests may store newer inputs while the write is under
    /// way, and their own writes may land first; so after writing it reads
    /// the state again and writes again if the inputs moved on meanwhile
    /// (at most [`CACHE_ROUNDS`] times): the last write is then of the
    /// newest inputs, and an older copy never stays for the cache's TTL.
    /// The caller waits for it within [`UserSession::within_wait`]'s bound.
    async fn cache_entitlement(&self, user_id: &str, now: i64, origin: &Origin) {
        let this = self.clone();
        let (user_id, writer) = (user_id.to_owned(), origin.clone());
        self.within_wait(
            Box::pin(async move {
                if let Err(e) = this.write_entitlement(&user_id, now, writer.fault()).await {
                    log::event(
                        Level::Error,
                        writer.request_id(),
                        "entitlement cache write failed",
                        serde_json::json!({"error": e}),
                    );
                }
            }),
            origin,
        )
        .await;
    }

    /// The rounds of [`UserSession::cache_entitlement`].
    async fn write_entitlement(
        &self,
        user_id: &str,
        now: i64,
        fault: Option<&str>,
    ) -> std::result::Result<(), String> {
        let mut version = None;
        for _ in 0..CACHE_ROUNDS {
            let stored = self.load().await.map_err(|e| e.to_string())?;
            let (Some(inputs), Some(ent)) = (&stored.inputs, Self::entitlement(&stored, now))
            else {
                return Ok(());
            };
            if version == Some(inputs.version) {
                break;
            }
            version = Some(inputs.version);
            fault::kv_delay(fault).await;
            kv::put_json(
                &self.env,
                &entitlement_key(user_id),
                &ent,
                Some(ENTITLEMENT_CACHE_TTL_SECS),
            )
            .await?;
        }
        Ok(())
    }

    fn entitlement(stored: &Stored, now: i64) -> Option<Entitlement> {
        Some(stored.inputs.as_ref()?.at(now))
    }

    fn issued(issued: Issued, ent: Entitlement, reopened: bool) -> Result<Response> {
        Response::from_json(&IssuedResp {
            sid: issued.sid,
            refresh_token: issued.refresh_token,
            entitlement: ent,
            reopened,
        })
    }

    async fn create(&self, mut req: Request, origin: Origin) -> Result<Response> {
        let r: CreateReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let Ok(pepper) = secrets::pepper(&self.env) else {
            return refuse(500, "not_configured", None);
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        // Never used: no session was ever opened for the account. A keyed
        // sign-up retried (`again_only`) then finds a first attempt that
        // stored the account and stopped before it got here, and opens the
        // session that one did not.
        let unused = stored.user_id.is_none();
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        if stored.closed {
            // The account is gone: as a sign-in would have found, had it
            // read the database a moment later.
            return refuse(401, "invalid_credentials", None);
        }
        if stored.deleting {
            return self.refuse_while_deleting(&origin).await;
        }
        if stored.undoing_until.is_some_and(|until| now < until) {
            // A failed sign-up is being undone: the account may be gone in
            // a moment (then a retry signs up again) or kept.
            return refuse(503, "service_unavailable", Some(2));
        }
        if let Some((key, fingerprint)) = &r.idempotency {
            let reopen =
                stored
                    .sessions
                    .reopen(&mut stored.idempotency, key, fingerprint, now, pepper);
            match reopen {
                // The record and the session stand; the session is marked
                // as handed out again, which no withdrawal undoes, and that
                // is stored before the answer goes.
                Reopen::Again(issued) => {
                    self.persist(&mut stored, now).await?;
                    let ent = Self::entitlement(&stored, now)
                        .expect("a session was opened, so inputs are set");
                    return Self::issued(issued, ent, true);
                }
                Reopen::Open if r.again_only && !unused => {
                    return refuse(409, "email_taken", None);
                }
                Reopen::Open => {}
                Reopen::InFlight => return refuse(409, "idempotency_key_in_flight", None),
                Reopen::Mismatch => return refuse(422, "idempotency_key_reused", None),
            }
        } else if r.again_only {
            return refuse(409, "email_taken", None);
        }
        if r.inputs.supersedes(stored.inputs.as_ref()) {
            stored.inputs = Some(r.inputs);
        }
        // At the session limit, a new session ends the oldest: a revocation.
        let evicts = stored.sessions.is_full(now);
        let sid = r
            .sid
            .as_deref()
            .and_then(|s| <[u8; 16]>::try_from(hex::decode(s).ok()?).ok())
            .filter(|sid| !stored.sessions.knows(&hex::encode(sid)));
        let issued = stored.sessions.create(
            &r.user_id,
            &r.label,
            now,
            sid.unwrap_or_else(random::bytes),
            random::bytes(),
            pepper,
        );
        if let Some((key, _)) = &r.idempotency {
            UserSessions::opened(&mut stored.idempotency, key, &issued.sid, now);
        }
        if r.again_only {
            // A sign-up's retry opening the session its first attempt did
            // not: that attempt may still undo the sign-up, and must not
            // remove the account this answers for.
            stored.sessions.mark_handed_out(&issued.sid);
        }
        let origin = origin.with_fault(fault::armed(&self.env, r.fault.clone()));
        self.save(&mut stored, now, evicts, &origin).await?;
        fault::at(&origin.fault, fault::SESSION_CREATE)?;
        self.cache_entitlement(&r.user_id, now, &origin).await;
        // Read again: saving waited on KV, and a billing change may have
        // stored newer inputs meanwhile, which the token must carry.
        let stored = self.load().await?;
        let ent = Self::entitlement(&stored, now).expect("inputs are set (these or newer ones)");
        Self::issued(issued, ent, false)
    }

    async fn refresh(&self, mut req: Request, origin: Origin) -> Result<Response> {
        let r: RefreshReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let Ok(pepper) = secrets::pepper(&self.env) else {
            return refuse(500, "not_configured", None);
        };
        let token = match RefreshToken::parse(&r.refresh_token) {
            Ok(t) => t,
            Err(e) => return refuse(401, e.code(), None),
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if stored.user_id.as_deref() != Some(token.user_id()) {
            return refuse(401, "refresh_token_invalid", None);
        }
        if stored.deleting {
            // The account may be gone in a moment, or kept (a subscription
            // holds it): ask again then. The alarm is made sure of, should
            // an earlier one have failed to be set.
            return self.refuse_while_deleting(&origin).await;
        }
        let outcome = stored.sessions.refresh(&token, now, pepper);
        // A rotation, a detected reuse and an expiry all change state (the last two
        // revoke the family); only a token that matched nothing leaves it as it was.
        if !matches!(outcome, Err(RefreshError::Invalid)) {
            self.save(&mut stored, now, outcome.is_err(), &origin)
                .await?;
        }
        // Saving waited on KV (the session copy): newer inputs a billing
        // change stored meanwhile are the ones the token must carry.
        if outcome.is_ok() {
            stored = self.load().await?;
        }
        match outcome {
            Ok(issued) => match Self::entitlement(&stored, now) {
                Some(ent) => Self::issued(issued, ent, false),
                None => refuse(401, "refresh_token_invalid", None),
            },
            Err(e) => refuse(401, e.code(), None),
        }
    }

    /// Ends one session (`/revoke`), every session (`/revoke-all`, asked by
    /// the session `sid`, which must be active: the KV copy the worker
    /// checked may lag a revocation), or every session for good (`/close`:
    /// a sign-up undone; the object then opens no session again), or takes
    /// one back (`/withdraw`). Their KV copy is
    /// written as for any revocation: the connect path checks it.
    async fn revoke(&self, mut req: Request, ending: Ending, origin: Origin) -> Result<Response> {
        let (sid, owner) = match ending {
            Ending::One | Ending::All | Ending::Withdrawn => {
                match body::<RevokeReq>(&mut req).await {
                    Ok(r) => (Some(r.sid), None),
                    Err(resp) => return Ok(resp),
                }
            }
            Ending::Close => match body::<CloseReq>(&mut req).await {
                Ok(r) => (None, Some(r.user_id)),
                Err(resp) => return Ok(resp),
            },
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if let Some(owner) = &owner {
            if !stored.claim(owner) {
                return refuse(400, "wrong_object", None);
            }
            stored.closed = true;
            stored.undoing_until = None;
        }
        let revoked = match (&sid, ending) {
            (Some(sid), Ending::All) => {
                if !stored.sessions.is_active(sid, now) {
                    return refuse(401, "session_revoked", None);
                }
                stored.sessions.revoke_all(now, RevokeReason::LogoutAll)
            }
            (Some(sid), Ending::Withdrawn) => usize::from(stored.sessions.withdraw(sid, now)),
            (Some(sid), _) => usize::from(stored.sessions.revoke(sid, now, RevokeReason::Logout)),
            (None, _) => stored
                .sessions
                .revoke_all(now, RevokeReason::AccountRemoved),
        };
        self.save(&mut stored, now, true, &origin).await?;
        Response::from_json(&serde_json::json!({ "revoked": revoked }))
    }
}

impl UserSession {
    /// Registers a device under the plan's limit.
    ///
    /// The limit is decided here, atomically: a slot is reserved and persisted
    /// before PostgreSQL is awaited (other requests to this object can run while
    /// it is), then confirmed or released. The state is re-read after every
    /// non-storage await, never reused across one. PostgreSQL re-checks the limit
    /// under a row lock as a backstop, and its list of the user's devices is fed
    /// back into the ledger so the two always converge.
    ///
    /// Each step's state is one storage write, so a crash (an exception, an
    /// object restart) between steps leaves a whole earlier step: at worst a
    /// reservation and an in-flight idempotency record whose request is gone,
    /// which the next registration drops (see [`Running`]), and possibly a row
    /// PostgreSQL committed that the object never confirmed, which the retry
    /// finds by its key and answers with (see `store::insert_device`).
    async fn create_device(&self, mut req: Request, origin: Origin) -> Result<Response> {
        let r: CreateDeviceReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let origin = origin.with_fault(match r.fault.clone() {
            None => None,
            asked => fault::armed(&self.env, asked),
        });
        let (Ok(name), Ok(key)) = (DeviceName::parse(&r.name), PublicKey::parse(&r.public_key))
        else {
            return refuse(400, "validation_failed", None);
        };
        let mut now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        // The account went, or is going: its access tokens still pass at the
        // edge for a moment (until the session mirror says otherwise), but
        // no device is added to it. (PostgreSQL refuses one too, drawing no
        // tunnel address, should the deletion begin meanwhile.)
        if stored.closed {
            return refuse(401, "session_revoked", None);
        }
        if stored.deleting {
            return self.refuse_while_deleting(&origin).await;
        }
        // Records this instance has not seen settled (it is fresh, or a device
        // operation failed part-way: a delete or a key rotation PostgreSQL
        // committed and the records missed) may still hold a device PostgreSQL
        // no longer has. Before they answer this key as already registered, or
        // refuse it for the limit, they are read again from PostgreSQL. Only
        // then: most registrations are answered from PostgreSQL anyway. Should
        // the read fail, they answer as they are.
        if !self.devices_settled.get() {
            let limit =
                Self::entitlement(&stored, now).map_or(r.token_max_devices, |e| e.max_devices);
            let known = stored
                .device_records
                .iter()
                .any(|d| d.public_key == key.as_str());
            if known || stored.devices.in_use(now) >= limit {
                drop(stored);
                // While another device operation runs, its list may predate
                // its own change, so the records are not read again then
                // (`Settle::Busy`): wait for it (they take a PostgreSQL round
                // trip), for a while, rather than answer from records that
                // may hold a deleted device.
                let started = time::now_ms();
                let mut settled = self.settle_devices(&origin).await?;
                while matches!(settled, Settle::Busy) && time::now_ms() < started + SETTLE_WAIT_MS {
                    time::sleep(SETTLE_POLL_MS).await;
                    settled = self.settle_devices(&origin).await?;
                }
                let cause = match settled {
                    Settle::Settled => None,
                    Settle::Busy => Some("other device operations still under way".to_owned()),
                    Settle::Failed(cause) => Some(cause),
                };
                if let Some(cause) = cause {
                    log::event(
                        Level::Warn,
                        origin.request_id(),
                        "device records not settled before a registration",
                        serde_json::json!({ "error": cause }),
                    );
                }
                now = time::now_secs();
                stored = self.load().await?;
                if !stored.claim(&r.user_id) {
                    return refuse(400, "wrong_object", None);
                }
            }
        }
        let mut owned = Owned {
            running: &self.running,
            key: None,
            reservation: None,
        };
        if let Some(answer) = self
            .begin_key(
                &mut stored,
                r.idempotency.as_ref(),
                now,
                &mut owned,
                &origin,
            )
            .await
        {
            return answer;
        }
        // The same key registered again by its owner (a retry whose answer was
        // lost): answer with the device, not a conflict. Keys are unique, so this
        // is exactly the device the first attempt created.
        if let Some(existing) = stored
            .device_records
            .iter()
            .find(|d| d.public_key == key.as_str())
        {
            let body = serde_json::to_string(existing)
                .map_err(|e| worker::Error::RustError(e.to_string()))?;
            // Kept like any answer to the key, so that the key cannot be used
            // again with another body.
            if let Some((k, _)) = &r.idempotency {
                stored.idempotency.complete(
                    k,
                    StoredResponse {
                        status: 200,
                        body: body.clone(),
                    },
                    now,
                );
            }
            self.persist(&mut stored, now).await?;
            return Ok(Response::ok(body)?.with_status(200));
        }
        let limit = Self::entitlement(&stored, now).map_or(r.token_max_devices, |e| e.max_devices);
        let reservation = match stored.devices.reserve(limit, now, random::bytes()) {
            Ok(id) => id,
            Err(LimitError::LimitReached { .. }) => {
                if let Some((k, _)) = &r.idempotency {
                    stored.idempotency.abandon(k);
                }
                self.persist(&mut stored, now).await?;
                return limit_reached(limit);
            }
        };
        self.running
            .borrow_mut()
            .reservations
            .insert(reservation.clone());
        owned.reservation = Some(reservation.clone());
        // Device lists read from PostgreSQL after this point may arrive out of
        // order with other requests' confirmations: the mark lets the ledger
        // apply only what is newer (see `Ledger::sync_since`).
        let mark = stored.devices.mark();
        // From here PostgreSQL may be written; the alarm is armed first (a
        // storage operation, which lets no other request in).
        let op = self.device_op(&origin).await;
        // The reservation (and the in-flight idempotency record) must be durable
        // before the first await that lets other requests in.
        self.persist(&mut stored, now).await?;
        drop(stored);
        fault::at(&origin.fault, "device.after_reserve")?;

        let outcome = self.insert_device(&r.user_id, &name, &key, limit).await;
        if outcome.is_ok() {
            fault::at(&origin.fault, "device.after_insert")?;
        }

        let now = time::now_secs();
        let mut stored = self.load().await?;
        let abandon = |stored: &mut Stored| {
            if let Some((k, _)) = &r.idempotency {
                stored.idempotency.abandon(k);
            }
        };
        let (status, body, changed) = match outcome {
            Ok(store::Inserted {
                device: Some(device),
                devices,
                ..
            }) => {
                stored.devices.confirm(&reservation, &device.id);
                let changed = Self::sync_devices(&mut stored, mark, devices, Own::Wrote(&device));
                let body = serde_json::to_string(&device)
                    .map_err(|e| worker::Error::RustError(e.to_string()))?;
                (201, Some(body), changed)
            }
            Ok(store::Inserted {
                existing: Some(device),
                devices,
                ..
            }) => {
                // An earlier attempt committed this device and its answer was
                // lost: this is the retry, answered like any repeat of a key.
                stored.devices.release(&reservation);
                let changed = Self::sync_devices(&mut stored, mark, devices, Own::Wrote(&device));
                let body = serde_json::to_string(&device)
                    .map_err(|e| worker::Error::RustError(e.to_string()))?;
                (200, Some(body), changed)
            }
            Ok(store::Inserted { devices, .. }) => {
                stored.devices.release(&reservation);
                let changed = Self::sync_devices(&mut stored, mark, devices, Own::Nothing);
                abandon(&mut stored);
                self.persist(&mut stored, now).await?;
                op.done();
                if changed {
                    self.mirror(&[Mirrored::Devices], &origin).await;
                }
                return limit_reached(limit);
            }
            Err(fail) => {
                stored.devices.release(&reservation);
                abandon(&mut stored);
                self.persist(&mut stored, now).await?;
                return refuse_fail(&fail, &origin);
            }
        };
        let body = body.unwrap_or_default();
        if let Some((k, _)) = &r.idempotency {
            stored.idempotency.complete(
                k,
                StoredResponse {
                    status,
                    body: body.clone(),
                },
                now,
            );
        }
        self.persist(&mut stored, now).await?;
        fault::at(&origin.fault, "device.after_confirm")?;
        op.done();
        if changed {
            self.mirror(&[Mirrored::Devices], &origin).await;
        }
        drop(owned);
        Ok(Response::ok(body)?.with_status(status))
    }

    async fn insert_device(
        &self,
        user_id: &str,
        name: &DeviceName,
        key: &PublicKey,
        limit: u32,
    ) -> std::result::Result<store::Inserted, Fail> {
        let db = store::connect(&self.env).await?;
        store::insert_device(&db, user_id, name, key, limit).await
    }

    /// Starts a request's use of its idempotency key, if it has one, after
    /// clearing what requests that died left behind (their in-flight keys and
    /// device reservations). `None`: go on, the key now held through `owned`.
    /// Otherwise the answer: the first request's, replayed, after writing the
    /// device copy again (the first answer may never have reached it: a crash
    /// right after the state was written); 409 while the first still runs; 422
    /// for another request under the key.
    async fn begin_key(
        &self,
        stored: &mut Stored,
        idempotency: Option<&(String, String)>,
        now: i64,
        owned: &mut Owned<'_>,
        origin: &Origin,
    ) -> Option<Result<Response>> {
        {
            let running = self.running.borrow();
            stored
                .devices
                .release_unless(|id| running.reservations.contains(id));
            stored
                .idempotency
                .abandon_unless(|k| running.keys.contains_key(k));
        }
        let (key, fingerprint) = idempotency?;
        match stored.idempotency.begin(key, fingerprint, now) {
            Begin::Proceed => {
                *self
                    .running
                    .borrow_mut()
                    .keys
                    .entry(key.clone())
                    .or_default() += 1;
                owned.key = Some(key.clone());
                None
            }
            Begin::Replay(resp) => {
                self.mirror(&[Mirrored::Devices], &origin.unfaulted()).await;
                Some(Response::ok(resp.body).map(|r| r.with_status(resp.status)))
            }
            Begin::InFlight => Some(refuse(409, "idempotency_key_in_flight", None)),
            Begin::Mismatch => Some(refuse(422, "idempotency_key_reused", None)),
        }
    }

    /// Runs `change` under the request's `Idempotency-Key` (`idempotency`:
    /// the key and the request's fingerprint), as [`Self::create_device`]
    /// runs a registration: the key is recorded in flight (and durable) before
    /// the change starts, then completed with the change's answer if it took
    /// effect, or given back if not. A retry then gets the first answer; one
    /// that arrives while the first still runs, 409 (a removal or rotation
    /// completes its key in the write that applies it, `apply_devices`, so a
    /// retry after that gets the answer); the key with another request, 422.
    /// Without a key, `change` just runs.
    async fn keyed(
        &self,
        user_id: &str,
        idempotency: Option<&(String, String)>,
        origin: &Origin,
        // Boxed: one copy of this function serves every change.
        change: LocalBoxFuture<'_, Result<Answer>>,
    ) -> Result<Response> {
        let Some((key, _)) = idempotency else {
            return change.await?.into_response();
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(user_id) {
            return refuse(400, "wrong_object", None);
        }
        let mut owned = Owned {
            running: &self.running,
            key: None,
            reservation: None,
        };
        if let Some(answer) = self
            .begin_key(&mut stored, idempotency, now, &mut owned, origin)
            .await
        {
            return answer;
        }
        self.persist(&mut stored, now).await?;
        drop(stored);

        let answer = change.await;

        let now = time::now_secs();
        let mut stored = self.load().await?;
        match &answer {
            Ok(Answer::Changed(status, body)) => stored.idempotency.complete(
                key,
                StoredResponse {
                    status: *status,
                    body: body.clone(),
                },
                now,
            ),
            _ => stored.idempotency.abandon(key),
        }
        self.persist(&mut stored, now).await?;
        drop(owned);
        answer?.into_response()
    }

    async fn delete_device(&self, mut req: Request, origin: Origin) -> Result<Response> {
        let r: DeleteDeviceReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let origin = origin.with_fault(fault::armed(&self.env, r.fault.clone()));
        let change = async {
            let op = self.device_op(&origin).await;
            let (mark, counted) = {
                let stored = self.load().await?;
                (stored.devices.mark(), stored.devices.counts(&r.device_id))
            };
            let outcome = match store::connect(&self.env).await {
                Ok(db) => store::delete_device(&db, &r.user_id, &r.device_id).await,
                Err(fail) => Err(fail),
            };
            match outcome {
                Ok(deleted) => {
                    if deleted.deleted {
                        fault::at(&origin.fault, "device.after_delete")?;
                    }
                    // A device the records count and PostgreSQL no longer has
                    // for this user was deleted by an earlier attempt whose
                    // answer (and the records' update) was lost: this is its
                    // retry, answered as the first would have been. Until the
                    // alarm settles the records (30 s); a retry after that
                    // finds nothing to go by, and is a 404.
                    let gone = deleted.deleted || counted;
                    let own = if gone {
                        Own::Deleted(&r.device_id)
                    } else {
                        Own::Nothing
                    };
                    let answer = serde_json::json!({ "deleted": gone });
                    let answer = if gone {
                        Answer::changed(200, &answer)?
                    } else {
                        Answer::Other(Response::from_json(&answer)?)
                    };
                    let key = r.idempotency.as_ref().map(|(k, _)| k.as_str());
                    let answered = key.map(|k| (k, &answer));
                    self.apply_devices(mark, deleted.devices, own, answered, &origin)
                        .await?;
                    fault::at(&origin.fault, fault::DEVICE_AFTER_APPLY)?;
                    op.done();
                    Ok(answer)
                }
                Err(fail) => Ok(Answer::Other(refuse_fail(&fail, &origin)?)),
            }
        };
        self.keyed(
            &r.user_id,
            r.idempotency.as_ref(),
            &origin,
            change.boxed_local(),
        )
        .await
    }

    async fn rotate_key(&self, mut req: Request, origin: Origin) -> Result<Response> {
        let r: RotateKeyReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let Ok(key) = PublicKey::parse(&r.public_key) else {
            return refuse(400, "validation_failed", None);
        };
        let origin = origin.with_fault(fault::armed(&self.env, r.fault.clone()));
        let change = async {
            let op = self.device_op(&origin).await;
            let generation = self.device_generation.get();
            let mark = self.load().await?.devices.mark();
            let outcome = match store::connect(&self.env).await {
                Ok(db) => store::rotate_key(&db, &r.user_id, &r.device_id, &key).await,
                Err(fail) => Err(fail),
            };
            if origin.fault() == Some(fault::DEVICE_LATE) {
                time::sleep(fault::DEVICE_LATE_MS).await;
            }
            match outcome {
                Ok(rotated) => {
                    let own = rotated.device.as_ref().map_or(Own::Nothing, Own::Wrote);
                    let answer = match &rotated.device {
                        Some(d) => Answer::changed(200, d)?,
                        None => Answer::Other(refuse(404, "device_not_found", None)?),
                    };
                    let key = r.idempotency.as_ref().map(|(k, _)| k.as_str());
                    let answered = key.map(|k| (k, &answer));
                    self.apply_devices(mark, rotated.devices, own, answered, &origin)
                        .await?;
                    // This rotation's own row wins in the records, as every
                    // operation's does. But another operation that started
                    // meanwhile may have rotated the same device's key after
                    // this one committed, and had its answer applied first:
                    // the records would then keep this older key. So the
                    // records are read again from PostgreSQL, now if no
                    // other operation is still under way, else by the alarm
                    // once none is.
                    let overlapped = self.device_generation.get() != generation;
                    if overlapped {
                        self.devices_settled.set(false);
                    }
                    op.done();
                    if overlapped
                        && let Settle::Failed(cause) = self.settle_devices(&origin).await?
                    {
                        log::event(
                            Level::Warn,
                            origin.request_id(),
                            "device list not read again after overlapping operations; the alarm tries again",
                            serde_json::json!({"error": cause}),
                        );
                    }
                    Ok(answer)
                }
                Err(fail) => Ok(Answer::Other(refuse_fail(&fail, &origin)?)),
            }
        };
        self.keyed(
            &r.user_id,
            r.idempotency.as_ref(),
            &origin,
            change.boxed_local(),
        )
        .await
    }

    /// Deletes the account at its owner's request, asked by the session
    /// `sid`, which must be active as this object knows it (the KV copy the
    /// Worker checked may lag a sign-out). The deletion is marked first, so
    /// that no session is refreshed or opened while PostgreSQL deletes the
    /// account, and so that the alarm sees it through should the object go
    /// before it ends ([`Self::finish_deletion`]).
    async fn delete_account(&self, mut req: Request, origin: Origin) -> Result<Response> {
        let r: DeleteAccountReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        if !stored.deleting && !stored.sessions.is_active(&r.sid, now) {
            return refuse(401, "session_revoked", None);
        }
        let origin = origin.with_fault(fault::armed(&self.env, r.fault.clone()));
        stored.deleting = true;
        self.arm(DELETION_RETRY_MS, &origin).await;
        self.persist(&mut stored, now).await?;
        fault::at(&origin.fault, fault::ACCOUNT_MARKED)?;
        self.finish_deletion(&origin).await
    }

    /// Deletes the marked account in PostgreSQL (`store::delete_account`),
    /// then ends every session for good and forgets the devices, their KV
    /// copies with them. A subscription that may still charge the account
    /// lifts the mark (409 `subscription_active`); a failure keeps it, and
    /// the alarm tries again.
    async fn finish_deletion(&self, origin: &Origin) -> Result<Response> {
        let Some(user_id) = self.load().await?.user_id else {
            return refuse(400, "wrong_object", None);
        };
        let outcome = match store::connect(&self.env).await {
            Ok(db) => store::delete_account(&db, &user_id).await,
            Err(fail) => Err(fail),
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        match outcome {
            Ok(store::Deletion::Billing) => {
                stored.deleting = false;
                self.persist(&mut stored, now).await?;
                refuse(409, "subscription_active", None)
            }
            Ok(_) => {
                stored.deleting = false;
                stored.closed = true;
                // Emptied, and kept so by `sync_devices` from now on.
                stored.device_records.clear();
                stored
                    .sessions
                    .revoke_all(now, RevokeReason::AccountRemoved);
                self.save(&mut stored, now, true, origin).await?;
                self.mirror(&[Mirrored::Devices], origin).await;
                Response::from_json(&serde_json::json!({ "deleted": true }))
            }
            Err(fail) => {
                self.arm(DELETION_RETRY_AGAIN_MS, origin).await;
                refuse_fail(&fail, origin)
            }
        }
    }

    /// What the Workers of the release before `/undo` ask: whether a retry
    /// was handed a session (no hold).
    async fn handed_out(&self) -> Result<Response> {
        let stored = self.load().await?;
        let handed_out = stored.sessions.handed_out_again(time::now_secs());
        Response::from_json(&serde_json::json!({ "handed_out": handed_out }))
    }

    /// A failed sign-up's undo begins: whether a session of the user's was
    /// handed out again to a retry (the undo then keeps the account: a
    /// client may hold it), and if not, the object is held
    /// (`undoing_until`) until the undo ends, in the same step, so that no
    /// retry is handed one before the account is removed. With `keep`, the
    /// undo ends with the account kept.
    async fn undo(&self, mut req: Request) -> Result<Response> {
        let r: UndoReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        let handed_out = !r.keep && stored.sessions.handed_out_again(now);
        stored.undoing_until = (!r.keep && !handed_out).then_some(now + UNDO_HOLD_SECS);
        self.persist(&mut stored, now).await?;
        Response::from_json(&serde_json::json!({ "handed_out": handed_out }))
    }

    /// The user's devices as this object knows them (no PostgreSQL): the
    /// connect path's fallback when the KV copy lacks the device. When the
    /// connect found no copy at all (`absent`: it expired, or has not reached
    /// that location yet), the copy is written again after the answer (a
    /// connect waits for this), unchanged or not, unless this instance wrote
    /// it within [`REWRITE_AFTER_SECS`]. A copy that is there but lacks the
    /// device (an unknown id, a registration not propagated yet), or a KV
    /// read that failed, writes nothing: a client cannot turn its connects
    /// into KV writes.
    async fn list_devices(&self, mut req: Request, origin: Origin) -> Result<Response> {
        #[derive(Deserialize)]
        struct ListReq {
            #[serde(default)]
            absent: bool,
        }
        let r: ListReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let stored = self.load().await?;
        let now = time::now_secs();
        let rewrite = r.absent && {
            let mut m = self.mirrors.borrow_mut();
            let slot = &mut m.written[Mirrored::Devices as usize];
            let recent = slot
                .as_ref()
                .is_some_and(|(_, at)| now - at < REWRITE_AFTER_SECS);
            if !recent {
                *slot = None;
            }
            !recent
        };
        if rewrite {
            let this = self.clone();
            self.state.wait_until(async move {
                this.mirror(&[Mirrored::Devices], &origin).await;
            });
        }
        Response::from_json(&DeviceMirror {
            devices: stored.device_records,
        })
    }

    /// The user's billing changed: store the new inputs so the next refresh (and
    /// the device limit) follow them, and refresh the KV entitlement cache.
    async fn set_inputs(&self, mut req: Request, origin: Origin) -> Result<Response> {
        let r: InputsReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        if r.inputs.supersedes(stored.inputs.as_ref()) {
            stored.inputs = Some(r.inputs);
        }
        self.persist(&mut stored, now).await?;
        let ent = Self::entitlement(&stored, now).expect("inputs are set (these or newer ones)");
        self.cache_entitlement(&r.user_id, now, &origin).await;
        Response::from_json(&serde_json::json!({ "entitlement": ent }))
    }
}

impl DurableObject for UserSession {
    fn new(state: State, env: Env) -> Self {
        UserSession {
            state,
            env,
            running: Rc::default(),
            mirrors: Rc::default(),
            device_ops: Rc::default(),
            device_generation: Rc::default(),
            devices_settled: Rc::default(),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let origin = Origin::of(&req);
        // Each route's future is boxed, as the Worker's are (`edge::fetch`):
        // its state machine is then a wasm function of its own, compiled
        // lazily on its first call. Unboxed, every route was inlined into one
        // 62 KB function that an isolate's first request of any kind (a
        // refresh, say) compiled whole.
        let route: LocalBoxFuture<'_, Result<Response>> = match (req.method(), req.path().as_str())
        {
            (Method::Get, "/ping") => async move { ping(&self.state, &req).await }.boxed_local(),
            (Method::Post, "/create") => self.create(req, origin).boxed_local(),
            (Method::Post, "/refresh") => self.refresh(req, origin).boxed_local(),
            (Method::Post, "/revoke") => self.revoke(req, Ending::One, origin).boxed_local(),
            (Method::Post, "/revoke-all") => self.revoke(req, Ending::All, origin).boxed_local(),
            (Method::Post, "/close") => self.revoke(req, Ending::Close, origin).boxed_local(),
            (Method::Post, "/withdraw") => {
                self.revoke(req, Ending::Withdrawn, origin).boxed_local()
            }
            (Method::Post, "/devices/create") => self.create_device(req, origin).boxed_local(),
            (Method::Post, "/devices/delete") => self.delete_device(req, origin).boxed_local(),
            (Method::Post, "/devices/rotate") => self.rotate_key(req, origin).boxed_local(),
            (Method::Post, "/devices/list") => self.list_devices(req, origin).boxed_local(),
            (Method::Post, "/undo") => self.undo(req).boxed_local(),
            // What the Workers of the release before `/undo` ask, during a
            // deploy: whether a retry was handed a session (no hold).
            (Method::Post, "/handed-out") => self.handed_out().boxed_local(),
            (Method::Post, "/delete-account") => self.delete_account(req, origin).boxed_local(),
            (Method::Post, "/inputs") => self.set_inputs(req, origin).boxed_local(),
            _ => return Response::error("unknown durable object route", 404),
        };
        route.await
    }

    async fn alarm(&self) -> Result<Response> {
        self.check().await?;
        Response::empty()
    }
}
