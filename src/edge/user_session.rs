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
//! any edge can list sessions and see revocations without calling it; that copy
//! is eventually consistent (about a minute) and is never used for decisions
//! this object makes.

use super::durable::{body, ping, refuse};
use super::store::{self, EntitlementInputs};
use super::{Fail, bindings, fault, random, secrets, time};
use crate::domain::device::{self, DeviceName, Ledger, LimitError, PublicKey, SyncMark};
use crate::domain::entitlement::{self, Entitlement};
use crate::domain::idempotency::{Begin, Records, StoredResponse};
use crate::domain::session::{
    Issued, RefreshError, RefreshToken, RevokeReason, SessionView, UserSessions,
};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use worker::{DurableObject, Env, Method, Request, Response, Result, State, durable_object};

const KEY: &str = "state";

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
const ENTITLEMENT_CACHE_TTL_SECS: u64 = 300;

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
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InputsReq {
    pub user_id: String,
    pub inputs: EntitlementInputs,
}

/// Relays a shell failure (its problem code and status) as an object answer.
fn refuse_fail(fail: &Fail) -> Result<Response> {
    if let Some(cause) = &fail.cause {
        worker::console_error!(
            "{}",
            serde_json::json!({"level": "error", "msg": "user session", "error": cause})
        );
    }
    refuse(
        fail.api.code.status(),
        fail.api.code.as_str(),
        fail.api.retry_after.map(u64::from),
    )
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateReq {
    pub user_id: String,
    pub label: String,
    pub inputs: EntitlementInputs,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RefreshReq {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevokeReq {
    pub sid: String,
}

/// A new or rotated session: what the worker needs to answer with a token pair.
#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedResp {
    pub sid: String,
    pub refresh_token: String,
    pub entitlement: Entitlement,
}

#[durable_object(fetch)]
pub struct UserSession {
    state: State,
    env: Env,
    /// The device registrations running in this instance right now.
    running: RefCell<Running>,
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
        Ok(self.state.storage().get(KEY).await?.unwrap_or_default())
    }

    /// Persists the state only (no KV mirror): device and idempotency changes.
    async fn persist(&self, stored: &mut Stored, now: i64) -> Result<()> {
        stored.idempotency.prune(now);
        self.state.storage().put(KEY, &*stored).await
    }

    /// Persists the state, then mirrors the session list to KV.
    async fn save(&self, stored: &mut Stored, now: i64) -> Result<()> {
        stored.sessions.prune(now);
        self.persist(stored, now).await?;
        if let Some(user_id) = &stored.user_id {
            let mirror = Mirror {
                sessions: stored.sessions.mirror(now),
            };
            let written = match self.env.kv(bindings::KV) {
                Ok(kv) => match kv.put(&mirror_key(user_id), &mirror) {
                    Ok(put) => put.execute().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            // The mirror is a convenience copy; the state above is the authority.
            if let Err(e) = written {
                worker::console_error!(
                    "{}",
                    serde_json::json!({"level": "error", "msg": "session mirror write failed", "error": e})
                );
            }
        }
        Ok(())
    }

    /// Records PostgreSQL's list of the user's devices: syncs the ledger (from
    /// `mark`, see `Ledger::sync_since`), keeps the records, persists, and
    /// mirrors them to KV for the connect path.
    async fn apply_devices(
        &self,
        mark: SyncMark,
        devices: Vec<store::Device>,
        own: Own<'_>,
    ) -> Result<()> {
        let now = time::now_secs();
        let mut stored = self.load().await?;
        Self::sync_devices(&mut stored, mark, devices, own);
        self.persist(&mut stored, now).await?;
        self.mirror_devices(&stored).await;
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
        let (own, removed) = match own {
            Own::Nothing => (None, None),
            Own::Wrote(d) => (Some(d), None),
            Own::Deleted(id) => (None, Some(id)),
        };
        let applied = stored
            .devices
            .sync_since(mark, list.iter().map(|d| d.id.clone()).collect());
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
            match records.iter_mut().find(|r| r.id == d.id) {
                Some(r) if own.is_some_and(|o| o.id == d.id) => *r = d,
                Some(_) => {}
                None => records.push(d),
            }
        }
        if let Some(id) = removed {
            records.retain(|r| r.id != id);
        }
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let changed = records != old;
        stored.device_records = records;
        changed
    }

    async fn mirror_devices(&self, stored: &Stored) {
        let (Some(user_id), Ok(kv)) = (&stored.user_id, self.env.kv(bindings::KV)) else {
            return;
        };
        let mirror = DeviceMirror {
            devices: stored.device_records.clone(),
        };
        let written = match kv.put(&devices_key(user_id), &mirror) {
            Ok(put) => put.execute().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            worker::console_error!(
                "{}",
                serde_json::json!({"level": "error", "msg": "device mirror write failed", "error": e})
            );
        }
    }

    /// Refreshes the KV copy of the user's entitlement (best effort: it serves
    /// only reads that need no strong consistency).
    async fn cache_entitlement(&self, user_id: &str, ent: &Entitlement) {
        let Ok(kv) = self.env.kv(bindings::KV) else {
            return;
        };
        let written = match kv.put(&entitlement_key(user_id), ent) {
            Ok(put) => put
                .expiration_ttl(ENTITLEMENT_CACHE_TTL_SECS)
                .execute()
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            worker::console_error!(
                "{}",
                serde_json::json!({"level": "error", "msg": "entitlement cache write failed", "error": e})
            );
        }
    }

    fn entitlement(stored: &Stored, now: i64) -> Option<Entitlement> {
        let inputs = stored.inputs.as_ref()?;
        Some(entitlement::entitlement(
            &inputs.free,
            inputs.subscription.as_ref(),
            now,
        ))
    }

    fn issued(issued: Issued, ent: Entitlement) -> Result<Response> {
        Response::from_json(&IssuedResp {
            sid: issued.sid,
            refresh_token: issued.refresh_token,
            entitlement: ent,
        })
    }

    async fn create(&self, mut req: Request) -> Result<Response> {
        let r: CreateReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let Ok(pepper) = secrets::pepper(&self.env) else {
            return refuse(500, "not_configured", None);
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        stored.inputs = Some(r.inputs);
        let issued = stored.sessions.create(
            &r.user_id,
            &r.label,
            now,
            random::bytes(),
            random::bytes(),
            pepper,
        );
        self.save(&mut stored, now).await?;
        let ent = Self::entitlement(&stored, now).expect("inputs were just set");
        self.cache_entitlement(&r.user_id, &ent).await;
        Self::issued(issued, ent)
    }

    async fn refresh(&self, mut req: Request) -> Result<Response> {
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
        let outcome = stored.sessions.refresh(&token, now, pepper);
        // A rotation, a detected reuse and an expiry all change state (the last two
        // revoke the family); only a token that matched nothing leaves it as it was.
        if !matches!(outcome, Err(RefreshError::Invalid)) {
            self.save(&mut stored, now).await?;
        }
        match outcome {
            Ok(issued) => match Self::entitlement(&stored, now) {
                Some(ent) => Self::issued(issued, ent),
                None => refuse(401, "refresh_token_invalid", None),
            },
            Err(e) => refuse(401, e.code(), None),
        }
    }

    async fn revoke(&self, mut req: Request, all: bool) -> Result<Response> {
        let sid = if all {
            None
        } else {
            match body::<RevokeReq>(&mut req).await {
                Ok(r) => Some(r.sid),
                Err(resp) => return Ok(resp),
            }
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        let revoked = match &sid {
            Some(sid) => usize::from(stored.sessions.revoke(sid, now, RevokeReason::Logout)),
            None => stored.sessions.revoke_all(now, RevokeReason::LogoutAll),
        };
        self.save(&mut stored, now).await?;
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
    async fn create_device(&self, mut req: Request) -> Result<Response> {
        let r: CreateDeviceReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let fault = match r.fault.clone() {
            None => None,
            asked => fault::armed(&self.env, asked),
        };
        let (Ok(name), Ok(key)) = (DeviceName::parse(&r.name), PublicKey::parse(&r.public_key))
        else {
            return refuse(400, "validation_failed", None);
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        let mut owned = Owned {
            running: &self.running,
            key: None,
            reservation: None,
        };
        {
            let running = self.running.borrow();
            stored
                .devices
                .release_unless(|id| running.reservations.contains(id));
            stored
                .idempotency
                .abandon_unless(|k| running.keys.contains_key(k));
        }
        if let Some((k, fp)) = &r.idempotency {
            match stored.idempotency.begin(k, fp, now) {
                Begin::Proceed => {
                    *self.running.borrow_mut().keys.entry(k.clone()).or_default() += 1;
                    owned.key = Some(k.clone());
                }
                Begin::Replay(resp) => {
                    // The first answer may never have reached the mirror (a
                    // crash right after the state was written): write it again.
                    self.mirror_devices(&stored).await;
                    return Ok(Response::ok(resp.body)?.with_status(resp.status));
                }
                Begin::InFlight => return refuse(409, "idempotency_key_in_flight", None),
                Begin::Mismatch => return refuse(422, "idempotency_key_reused", None),
            }
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
            if let Some((k, _)) = &r.idempotency {
                stored.idempotency.abandon(k);
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
                return refuse(403, "device_limit_reached", None);
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
        // The reservation (and the in-flight idempotency record) must be durable
        // before the first await that lets other requests in.
        self.persist(&mut stored, now).await?;
        drop(stored);
        fault::at(&fault, "device.after_reserve")?;

        let outcome = self.insert_device(&r.user_id, &name, &key, limit).await;
        if outcome.is_ok() {
            fault::at(&fault, "device.after_insert")?;
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
                if changed {
                    self.mirror_devices(&stored).await;
                }
                return refuse(403, "device_limit_reached", None);
            }
            Err(fail) => {
                stored.devices.release(&reservation);
                abandon(&mut stored);
                self.persist(&mut stored, now).await?;
                return refuse_fail(&fail);
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
        fault::at(&fault, "device.after_confirm")?;
        if changed {
            self.mirror_devices(&stored).await;
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
        let n = store::next_address(&db).await?;
        let (v4, v6) = device::tunnel_addresses(n)
            .ok_or_else(|| Fail::internal("tunnel address space exhausted".into()))?;
        store::insert_device(&db, user_id, name, key, (&v4, &v6), limit).await
    }

    async fn delete_device(&self, mut req: Request) -> Result<Response> {
        let r: DeleteDeviceReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let mark = self.load().await?.devices.mark();
        let outcome = match store::connect(&self.env).await {
            Ok(db) => store::delete_device(&db, &r.user_id, &r.device_id).await,
            Err(fail) => Err(fail),
        };
        match outcome {
            Ok(deleted) => {
                let own = if deleted.deleted {
                    Own::Deleted(&r.device_id)
                } else {
                    Own::Nothing
                };
                self.apply_devices(mark, deleted.devices, own).await?;
                Response::from_json(&serde_json::json!({ "deleted": deleted.deleted }))
            }
            Err(fail) => refuse_fail(&fail),
        }
    }

    async fn rotate_key(&self, mut req: Request) -> Result<Response> {
        let r: RotateKeyReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let Ok(key) = PublicKey::parse(&r.public_key) else {
            return refuse(400, "validation_failed", None);
        };
        let mark = self.load().await?.devices.mark();
        let outcome = match store::connect(&self.env).await {
            Ok(db) => store::rotate_key(&db, &r.user_id, &r.device_id, &key).await,
            Err(fail) => Err(fail),
        };
        match outcome {
            Ok(rotated) => {
                let own = rotated.device.as_ref().map_or(Own::Nothing, Own::Wrote);
                self.apply_devices(mark, rotated.devices, own).await?;
                match rotated.device {
                    Some(d) => Response::from_json(&d),
                    None => refuse(404, "device_not_found", None),
                }
            }
            Err(fail) => refuse_fail(&fail),
        }
    }

    /// The user's devices as this object knows them (no PostgreSQL): the
    /// connect path's fallback when the KV mirror has not caught up.
    async fn list_devices(&self) -> Result<Response> {
        let stored = self.load().await?;
        Response::from_json(&DeviceMirror {
            devices: stored.device_records,
        })
    }

    /// The user's billing changed: store the new inputs so the next refresh (and
    /// the device limit) follow them, and refresh the KV entitlement cache.
    async fn set_inputs(&self, mut req: Request) -> Result<Response> {
        let r: InputsReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if !stored.claim(&r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        stored.inputs = Some(r.inputs);
        self.persist(&mut stored, now).await?;
        let ent = Self::entitlement(&stored, now).expect("inputs were just set");
        self.cache_entitlement(&r.user_id, &ent).await;
        Response::from_json(&serde_json::json!({ "entitlement": ent }))
    }
}

impl DurableObject for UserSession {
    fn new(state: State, env: Env) -> Self {
        UserSession {
            state,
            env,
            running: RefCell::default(),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match (req.method(), req.path().as_str()) {
            (Method::Get, "/ping") => ping(&self.state, &req).await,
            (Method::Post, "/create") => self.create(req).await,
            (Method::Post, "/refresh") => self.refresh(req).await,
            (Method::Post, "/revoke") => self.revoke(req, false).await,
            (Method::Post, "/revoke-all") => self.revoke(req, true).await,
            (Method::Post, "/devices/create") => self.create_device(req).await,
            (Method::Post, "/devices/delete") => self.delete_device(req).await,
            (Method::Post, "/devices/rotate") => self.rotate_key(req).await,
            (Method::Post, "/devices/list") => self.list_devices().await,
            (Method::Post, "/inputs") => self.set_inputs(req).await,
            _ => Response::error("unknown durable object route", 404),
        }
    }
}
