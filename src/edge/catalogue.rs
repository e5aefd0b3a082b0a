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
//! first caller publishes one from PostgreSQL; in steady state the request
//! path never touches PostgreSQL. It reads through the uncached Hyperdrive
//! binding, as every publisher does: a snapshot read from Hyperdrive's cache
//! (up to about a minute old) could be written over a newer one that a
//! location whose KV had not seen it yet missed, and the publisher's second
//! read, from the same cache, would not notice. An
//! isolate without a copy loads one once: requests arriving meanwhile wait
//! for that load (on a timer of their own, checking for the copy: a request
//! may not wait on another's I/O, which workerd cancels as hung) instead of
//! each reading (or publishing) the snapshot too.
//!
//! A copy in hand is kept when KV fails (stale-if-error): a connect routed by
//! a catalogue some seconds or minutes old is better than a 503, and the
//! alternative, each isolate reading PostgreSQL, is the herd the design
//! keeps the database away from. The copy is checked again every [`TTL_MS`].

use super::log::{self, Level};
use super::{Fail, bindings, cron, fault, kv, time};
use crate::domain::catalogue::{self, Snapshot};
use crate::domain::freshness::{self, due};
use crate::domain::placement::Placer;
use std::cell::RefCell;
use std::rc::Rc;
use worker::Env;

/// How long an isolate reuses its parsed snapshot before asking KV whether it
/// changed.
pub const TTL_MS: u64 = 5_000;

/// How long the first load may take to publish from PostgreSQL (when KV holds
/// no snapshot) before the requests waiting for it are answered 503.
const PUBLISH_TIMEOUT_MS: u64 = 5_000;

/// A load that failed: whether a dependency was unavailable (503) or the
/// stored snapshot is broken (500), and why.
#[derive(Clone)]
struct LoadError {
    unavailable: bool,
    cause: String,
}

impl From<LoadError> for Fail {
    fn from(e: LoadError) -> Fail {
        if e.unavailable {
            Fail::unavailable(e.cause)
        } else {
            Fail::internal(e.cause)
        }
    }
}

/// How long a request waits for another's load of the first copy before
/// loading one itself (longer than a load can take: a KV read, then a
/// publish bounded by [`PUBLISH_TIMEOUT_MS`]), and how often it checks.
const LOAD_WAIT_MS: u64 = PUBLISH_TIMEOUT_MS + 3_000;
const LOAD_POLL_MS: u64 = 10;

/// A development-only fault point that makes the catalogue's KV reads fail
/// at once ([`fault::CATALOGUE_KV`]) or never answer ([`fault::KV_HANG`]);
/// either makes a request check its copy at once, so a test need not wait.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KvDown {
    Failing,
    Hanging,
}

/// This isolate's copy and when it was last checked.
struct Cache {
    current: Option<(Rc<Placer>, u64)>,
    /// When a request started loading the first copy; the others wait for
    /// it, for at most [`LOAD_WAIT_MS`] from then.
    loading: Option<u64>,
    /// When a request started asking KV whether the copy is still current;
    /// the others go on with the copy meanwhile instead of asking too, for at
    /// most [`LOAD_WAIT_MS`] from then.
    ///
    /// Both are cleared when the request's work ends, and also when the
    /// request is dropped part-way; but a request whose client went away may
    /// be left pending, never dropped, and its flag would then stand forever
    /// (with `revalidating`, this isolate would never check its copy again).
    /// So a flag older than any load can take is not heeded.
    revalidating: Option<u64>,
    /// Counts [`install`] calls and [`published`] marks: a request that read
    /// KV before one keeps what it read for itself, instead of bringing back
    /// the replaced copy (or passing off its read as the check the mark
    /// asks for).
    generation: u64,
    /// The last load of a first copy that failed (its `loading` mark), and
    /// why: the requests that were waiting for that load answer with its
    /// failure, rather than each loading in turn (a new deployment's
    /// isolates, KV empty and PostgreSQL slow: the last in line waited a
    /// load's time per request ahead of it).
    failed: Option<(u64, LoadError)>,
}

thread_local! {
    static CACHE: RefCell<Cache> = const {
        RefCell::new(Cache {
            current: None,
            loading: None,
            revalidating: None,
            generation: 0,
            failed: None,
        })
    };
}

/// Makes `snapshot`, which this isolate has just published (the
/// `CataloguePublisher` object's publish for admin changes, the Worker's
/// own when two calls to that object failed as at a reset, or a cron run
/// here), its copy, unless the copy is that
/// snapshot already. The next requests route by it at once, and should KV
/// fail before the copy's next check they still have one (stale-if-error);
/// forgetting the copy instead left the next request to read and parse the
/// whole snapshot again, and answer 503 if KV failed meanwhile. A request
/// that read KV before keeps what it read for itself (`generation`).
pub fn install(snapshot: Snapshot) {
    let now = time::now_ms();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let held = c.current.as_ref();
        if held.is_some_and(|(p, _)| p.snapshot().etag == snapshot.etag) {
            return;
        }
        c.current = Some((Rc::new(Placer::new(snapshot)), now));
        c.generation += 1;
    });
}

/// Tells this isolate that a snapshot with `etag` has just been published
/// (by the publisher object, which installs it in its own isolate; this one
/// may be another): a copy with another etag is checked against KV by the
/// next request (or, while another request's check is under way, the first
/// after it), instead of up to [`TTL_MS`] later; a check under way, which
/// may have read KV before the publish, does not count as one.
pub fn published(etag: &str) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((placer, checked)) = c.current.as_mut()
            && placer.snapshot().etag != etag
        {
            *checked = 0;
            c.generation += 1;
        }
    });
}

/// Holds one of the cache's flags (`revalidating`, `loading`) set for as long
/// as it lives, also when the request holding it is cancelled part-way. It
/// clears the flag only if the flag is still its own: one older than any
/// load can take is not heeded, and another request may have set it again
/// meanwhile, whose work a late clear would let a third request repeat.
struct Busy {
    flag: fn(&mut Cache) -> &mut Option<u64>,
    since: u64,
}

impl Busy {
    fn set(c: &mut Cache, flag: fn(&mut Cache) -> &mut Option<u64>, now: u64) -> Busy {
        *flag(c) = Some(now);
        Busy { flag, since: now }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            let flag = (self.flag)(&mut c);
            if *flag == Some(self.since) {
                *flag = None;
            }
        });
    }
}

/// Stores `placer` as the copy checked at `now`, unless the copy was
/// replaced ([`install`]) or marked for a check ([`published`]) since
/// `generation`.
fn keep(placer: &Rc<Placer>, now: u64, generation: u64) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.generation == generation {
            c.current = Some((Rc::clone(placer), now));
        }
    });
}

/// What a request does with the isolate's cache.
enum Step {
    Use(Rc<Placer>),
    Revalidate(Busy, Rc<Placer>, u64),
    /// Another request is loading the first copy.
    Wait,
    /// The load this request waited for failed.
    Failed(LoadError),
    Load(Busy, u64),
}

/// The current snapshot, ready for placement.
///
/// Every [`TTL_MS`] one request reads the small [`catalogue::ETAG_KV_KEY`];
/// the whole snapshot (a megabyte with a thousand regions, and the longest
/// piece of work an isolate does) is read and parsed again only when that
/// etag differs from the copy's. Requests arriving while that read is under
/// way use the copy they have. A failed check is logged with `request_id`, the
/// request that made it. `fault` is the development-only fault header.
pub async fn current(env: &Env, request_id: &str, fault: Option<&str>) -> Result<Rc<Placer>, Fail> {
    if fault == Some(fault::CATALOGUE_UNSTORED) {
        // As an isolate's first load finding KV empty; the copy is not kept.
        return Ok(Rc::new(first_publish(env, fault).await?));
    }
    let kv_down = match fault {
        Some(fault::CATALOGUE_KV) => Some(KvDown::Failing),
        Some(fault::KV_HANG) => Some(KvDown::Hanging),
        _ => None,
    };
    let mut now = time::now_ms();
    // The load this request waits for (its `loading` mark), if any.
    let mut waited_on: Option<u64> = None;
    loop {
        let step = CACHE.with(|c| {
            let mut c = c.borrow_mut();
            let generation = c.generation;
            if c.current.is_none()
                && let (Some(load), Some((failed, e))) = (waited_on, &c.failed)
                && load == *failed
            {
                return Step::Failed(e.clone());
            }
            match &c.current {
                // (The fault point checks at once, so a test need not wait.)
                Some((p, at))
                    if (!due(*at, now, TTL_MS) && kv_down.is_none())
                        || freshness::held(c.revalidating, now, LOAD_WAIT_MS) =>
                {
                    Step::Use(Rc::clone(p))
                }
                Some((p, _)) => {
                    let placer = Rc::clone(p);
                    let busy = Busy::set(&mut c, |c| &mut c.revalidating, now);
                    Step::Revalidate(busy, placer, generation)
                }
                None if freshness::held(c.loading, now, LOAD_WAIT_MS) => {
                    waited_on = c.loading;
                    Step::Wait
                }
                None => Step::Load(Busy::set(&mut c, |c| &mut c.loading, now), generation),
            }
        });
        match step {
            Step::Use(placer) => return Ok(placer),
            Step::Failed(e) => return Err(e.into()),
            Step::Wait => {
                time::sleep(LOAD_POLL_MS).await;
                now = time::now_ms();
            }
            Step::Load(loading, generation) => {
                let placer = match load(env, kv_down).await {
                    Ok(placer) => placer,
                    Err(e) => {
                        CACHE.with(|c| c.borrow_mut().failed = Some((loading.since, e.clone())));
                        return Err(e.into());
                    }
                };
                keep(&placer, now, generation);
                return Ok(placer);
            }
            Step::Revalidate(_revalidating, placer, generation) => {
                let placer = match revalidate(env, &placer, kv_down).await {
                    Ok(Some(newer)) => newer,
                    Ok(None) => placer,
                    Err(e) => {
                        log::event(
                            Level::Error,
                            Some(request_id),
                            "catalogue check failed; the isolate keeps its copy",
                            serde_json::json!({
                                "etag": placer.snapshot().etag,
                                "error": e.cause,
                            }),
                        );
                        placer
                    }
                };
                keep(&placer, now, generation);
                return Ok(placer);
            }
        }
    }
}

/// Reads the catalogue's text from KV (failing at the fault point).
async fn read(env: &Env, key: &str, kv_down: Option<KvDown>) -> Result<Option<String>, LoadError> {
    let unavailable = |cause: String| LoadError {
        unavailable: true,
        cause,
    };
    if kv_down == Some(KvDown::Failing) {
        return Err(unavailable(format!("kv get {key}: injected fault")));
    }
    let how = kv::Reading {
        timer: None,
        hang: kv_down == Some(KvDown::Hanging),
    };
    kv::read(env, key, how)
        .await
        .map_err(|e| unavailable(format!("kv get: {e}")))
}

/// The snapshot stored in KV, parsed; `None` if KV has none.
async fn stored(env: &Env, kv_down: Option<KvDown>) -> Result<Option<Placer>, LoadError> {
    let Some(text) = read(env, catalogue::KV_KEY, kv_down).await? else {
        return Ok(None);
    };
    let snapshot = serde_json::from_str::<Snapshot>(&text).map_err(|e| LoadError {
        unavailable: false,
        cause: format!("catalogue snapshot: {e}"),
    })?;
    Ok(Some(Placer::new(snapshot)))
}

/// The first copy of an isolate: KV's snapshot, or one published from
/// PostgreSQL when KV holds none.
async fn load(env: &Env, kv_down: Option<KvDown>) -> Result<Rc<Placer>, LoadError> {
    if let Some(placer) = stored(env, kv_down).await? {
        return Ok(Rc::new(placer));
    }
    Ok(Rc::new(first_publish(env, None).await?))
}

/// The catalogue read from PostgreSQL and stored in KV, for an isolate that
/// found none there (`fault`: the development-only fault header). A failed
/// KV write still yields the snapshot read.
async fn first_publish(env: &Env, fault: Option<&str>) -> Result<Placer, LoadError> {
    let unavailable = |cause: String| LoadError {
        unavailable: true,
        cause,
    };
    let publish = cron::publish(env, bindings::DB, cron::Write::IfDifferent, fault);
    let published = time::timeout(PUBLISH_TIMEOUT_MS, publish)
        .await
        .ok_or_else(|| unavailable("catalogue publish: timed out".into()))?
        .map_err(|e| unavailable(format!("catalogue publish: {e}")))?;
    Ok(Placer::new(published.0))
}

/// A newer copy than `placer` if KV has one; `None` if it is still current
/// (or KV has no snapshot at all, which a copy in hand outlives).
async fn revalidate(
    env: &Env,
    placer: &Placer,
    kv_down: Option<KvDown>,
) -> Result<Option<Rc<Placer>>, LoadError> {
    let tag = read(env, catalogue::ETAG_KV_KEY, kv_down).await?;
    if tag.as_deref() == Some(placer.snapshot().etag.as_str()) {
        return Ok(None);
    }
    Ok(stored(env, kv_down)
        .await?
        .filter(|newer| newer.snapshot().etag != placer.snapshot().etag)
        .map(Rc::new))
}
