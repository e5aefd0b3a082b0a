//! The region catalogue as the request path sees it: the KV snapshot the cron
//! (and every admin change) publishes, parsed at most once per isolate every few
//! seconds, and kept as a [`Placer`] (the snapshot with what placement needs of
//! each region worked out once).
//!
//! Parsing the snapshot is the only per-request cost that grows with the size
//! of the fleet, so it is kept off the hot path: an isolate reuses its parsed
//! copy for [`TTL_MS`]. That copy is shared, immutable data (like the verifying
//! keys), never request-scoped. Together with KV's own propagation (~60 s
//! between locations) this bounds how stale a routing decision can be.
//!
//! If KV holds no snapshot at all (the first minute of a new deployment) the
//! first caller publishes one from PostgreSQL through the cached Hyperdrive
//! binding; in steady state the request path never touches PostgreSQL.

use super::{Fail, bindings, cron, kv, time};
use crate::domain::catalogue::{self, Snapshot};
use crate::domain::placement::Placer;
use std::cell::RefCell;
use std::rc::Rc;
use worker::Env;

/// How long an isolate reuses its parsed snapshot.
pub const TTL_MS: u64 = 5_000;

thread_local! {
    static CACHE: RefCell<Option<(Rc<Placer>, u64)>> = const { RefCell::new(None) };
}

/// Forgets this isolate's copy (after an admin change made here).
pub fn invalidate() {
    CACHE.with(|c| *c.borrow_mut() = None);
}

/// The current snapshot, ready for placement.
pub async fn current(env: &Env) -> Result<Rc<Placer>, Fail> {
    let now = time::now_ms();
    if let Some(s) = CACHE.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(_, at)| now.saturating_sub(*at) < TTL_MS)
            .map(|(s, _)| Rc::clone(s))
    }) {
        return Ok(s);
    }
    let stored = kv::get_text(env, catalogue::KV_KEY)
        .await
        .map_err(|e| Fail::unavailable(format!("kv get: {e}")))?;
    let snapshot = match stored {
        Some(text) => serde_json::from_str::<Snapshot>(&text)
            .map_err(|e| Fail::internal(format!("catalogue snapshot: {e}")))?,
        None => {
            cron::publish(env, bindings::DB_CACHED)
                .await
                .map_err(|e| Fail::unavailable(format!("catalogue publish: {e}")))?
                .0
        }
    };
    let placer = Rc::new(Placer::new(snapshot));
    CACHE.with(|c| *c.borrow_mut() = Some((Rc::clone(&placer), now)));
    Ok(placer)
}
