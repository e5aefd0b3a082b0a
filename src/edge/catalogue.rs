//! The region catalogue as the request path sees it: the KV snapshot the cron
//! (and every admin change) publishes, parsed at most once per isolate every few
//! seconds, and kept as a [`Placer`] (the snapshot with what placement needs of
//! each region worked out once).
//!
//! Parsing the snapshot is the only per-request cost that grows with the size
//! of the fleet, so it is kept off the hot path: an isolate reuses its parsed
//! copy for [`TTL_MS`], then checks the snapshot's etag (a separate, small KV
//! value) and parses again only when it changed. That copy is shared,
//! immutable data (like the verifying keys), never request-scoped. Together
//! with KV's own propagation (~60 s between locations) this bounds how stale a
//! routing decision can be.
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

/// How long an isolate reuses its parsed snapshot before asking KV whether it
/// changed.
pub const TTL_MS: u64 = 5_000;

/// This isolate's copy and when it was last known current.
struct Cache {
    current: Option<(Rc<Placer>, u64)>,
    /// A request is asking KV whether the copy is still current; the others
    /// go on with the copy meanwhile instead of asking too.
    revalidating: bool,
    /// Counts [`invalidate`] calls: a request that read KV before one keeps
    /// what it read for itself, instead of bringing back the forgotten copy.
    generation: u64,
}

thread_local! {
    static CACHE: RefCell<Cache> = const {
        RefCell::new(Cache {
            current: None,
            revalidating: false,
            generation: 0,
        })
    };
}

/// Forgets this isolate's copy (after an admin change made here).
pub fn invalidate() {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.current = None;
        c.generation += 1;
    });
}

/// Marks a revalidation under way for as long as it lives, also when the
/// request doing it is cancelled part-way.
struct Revalidating;

impl Revalidating {
    fn start() -> Revalidating {
        CACHE.with(|c| c.borrow_mut().revalidating = true);
        Revalidating
    }
}

impl Drop for Revalidating {
    fn drop(&mut self) {
        CACHE.with(|c| c.borrow_mut().revalidating = false);
    }
}

/// Stores `placer` as the copy current at `now`, unless the copy was
/// invalidated since `generation`.
fn keep(placer: &Rc<Placer>, now: u64, generation: u64) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.generation == generation {
            c.current = Some((Rc::clone(placer), now));
        }
    });
}

/// The current snapshot, ready for placement.
///
/// Every [`TTL_MS`] one request reads the small [`catalogue::ETAG_KV_KEY`];
/// the whole snapshot (a megabyte with a thousand regions, and the longest
/// piece of work an isolate does) is read and parsed again only when that
/// etag differs from the copy's. Requests arriving while that read is under
/// way use the copy they have.
pub async fn current(env: &Env) -> Result<Rc<Placer>, Fail> {
    let now = time::now_ms();
    let (cached, fresh, busy, generation) = CACHE.with(|c| {
        let c = c.borrow();
        let (cached, fresh, busy) = match &c.current {
            Some((p, at)) => (
                Some(Rc::clone(p)),
                now.saturating_sub(*at) < TTL_MS,
                c.revalidating,
            ),
            None => (None, false, false),
        };
        (cached, fresh, busy, c.generation)
    });
    let _revalidating = match cached {
        Some(placer) if fresh || busy => return Ok(placer),
        Some(placer) => {
            let guard = Revalidating::start();
            let tag = kv::get_text(env, catalogue::ETAG_KV_KEY).await;
            if matches!(&tag, Ok(Some(tag)) if *tag == placer.snapshot().etag) {
                keep(&placer, now, generation);
                return Ok(placer);
            }
            Some(guard)
        }
        None => None,
    };
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
    keep(&placer, now, generation);
    Ok(placer)
}
