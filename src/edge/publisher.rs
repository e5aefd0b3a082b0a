//! The `CataloguePublisher` Durable Object: one object, [`NAME`], through
//! which the admin API publishes the catalogue, so that changes made together
//! are published together.
//!
//! Each publish reads the whole catalogue from PostgreSQL (a megabyte of JSON
//! with a thousand regions) and writes it to KV, which takes one write per key
//! per second. On the day a region drops, its clients fill the servers of the
//! regions near it, and their monitors report servers full within seconds of
//! each other: a publish each would put as many catalogue reads on the
//! database at once, and as many writes on one KV key, which would refuse
//! most of them (answered 503 to the monitors, which then report again).
//! Here:
//! - a call arriving while no publish runs starts one;
//! - a call arriving while one runs waits for the next, which starts once the
//!   running one has ended, at least a second after it (KV's limit), and
//!   serves every call that arrived before it began to read the catalogue;
//! - a publish reads the catalogue again once after its write (another
//!   publisher, the cron, may have read before it and written after), and
//!   not at all when another publish is queued behind it, which will read
//!   and write anyway ([`cron::publish_until`]).
//!
//! A call is answered by a publish that began to read after the call
//! arrived, so after the caller's change had committed: its change is in
//! what was published. However many calls arrive together, at most two
//! publishes run for them, one after the other. (A call arming a
//! development-only fault point gets a publish of its own, outside the
//! queue.)
//!
//! The state is in memory only. An object that restarts has none to lose:
//! a call it was serving fails, the Worker calls again, and publishes the
//! change itself only when that call fails so too (`admin::publish_now`).

use super::log::{self, Level};
use super::{bindings, catalogue, cron, time};
use futures::FutureExt as _;
use futures::future::{LocalBoxFuture, Shared};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::rc::Rc;
use worker::{DurableObject, Env, Method, Request, Response, Result, State, durable_object};

/// The one object every publish goes through.
pub const NAME: &str = "catalogue";

/// How long one publish may take before it is given up as failed (the
/// callers waiting for it are answered 503), so that a publish stuck on KV
/// or PostgreSQL cannot hold the calls after it for good. A publish reads
/// and writes once, or (after a second's wait) twice: normally a second or
/// two. A call that waits for the running publish, KV's second and its own
/// publish is answered within `admin::PUBLISH_LIMIT_MS` (10 s) even when
/// both take this long. A publish given up after its first write has
/// published the change all the same; its callers are told 503, as for
/// any publish whose end they could not see.
const RUN_LIMIT_MS: u64 = 4_000;

/// What a caller sends: a development-only fault point to apply
/// (`kv.refused`, `catalogue.unstored`), which gives the call a publish of
/// its own.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PublishReq {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// What a publish answers: the etag of the snapshot stored, or why it failed.
type Outcome = std::result::Result<String, String>;
type Run = Shared<LocalBoxFuture<'static, Outcome>>;

/// The ids of the requests a publish serves, for its log line.
type Served = Rc<RefCell<Vec<String>>>;

#[derive(Default)]
struct Runs {
    /// The publish that has not begun to read yet (waiting for the running
    /// one, or for KV's second), and the requests it will serve: calls
    /// arriving now join it.
    next: Option<(Run, Served)>,
    /// When the last publish ended, in Unix ms.
    last_end: u64,
    /// The publish last made, for the next one to wait for.
    last: Option<Run>,
}

#[durable_object(fetch)]
pub struct CataloguePublisher {
    env: Env,
    runs: Rc<RefCell<Runs>>,
}

impl DurableObject for CataloguePublisher {
    fn new(_state: State, env: Env) -> Self {
        CataloguePublisher {
            env,
            runs: Rc::default(),
        }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        if (req.method(), req.path().as_str()) != (Method::Post, "/publish") {
            return Response::error("unknown durable object route", 404);
        }
        let id = req
            .headers()
            .get(super::durable::REQUEST_ID_HEADER)?
            .unwrap_or_default();
        let r: PublishReq = match super::durable::body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let outcome = match r.fault {
            // A fault applies to its own request's publish only.
            Some(fault) => {
                let served = Rc::new(RefCell::new(vec![id]));
                publish(&self.env, Some(fault), served, &|| true).await
            }
            None => self.join(id).await,
        };
        match outcome {
            Ok(etag) => Response::from_json(&serde_json::json!({ "etag": etag })),
            // The caller answers it 503, as any answer but 200 with an
            // etag (`admin::publish_now`); its own status names it in the
            // caller's log line.
            Err(error) => Ok(Response::from_json(&serde_json::json!({
                "code": "catalogue_unpublished",
                "error": error,
            }))?
            .with_status(424)),
        }
    }
}

impl CataloguePublisher {
    /// The publish that serves the request `id`: the one that has not begun
    /// to read yet, or a new one, after the last.
    fn join(&self, id: String) -> Run {
        let mut runs = self.runs.borrow_mut();
        if let Some((run, served)) = &runs.next {
            served.borrow_mut().push(id);
            return run.clone();
        }
        let served: Served = Rc::new(RefCell::new(vec![id]));
        let after = runs.last.clone();
        let run = queued(
            Rc::clone(&self.runs),
            self.env.clone(),
            after,
            Rc::clone(&served),
        )
        .boxed_local()
        .shared();
        runs.next = Some((run.clone(), served));
        runs.last = Some(run.clone());
        run
    }
}

/// A publish: once `after` (the one made before it) has ended and KV's
/// second has passed, it stops taking calls and publishes for the requests
/// in `served`.
async fn queued(runs: Rc<RefCell<Runs>>, env: Env, after: Option<Run>, served: Served) -> Outcome {
    if let Some(before) = after {
        let _ = before.await;
    }
    let since = time::now_ms().saturating_sub(runs.borrow().last_end);
    if since < cron::KV_WRITE_SPACING_MS {
        time::sleep(cron::KV_WRITE_SPACING_MS - since).await;
    }
    // Calls from now on wait for the publish after this one.
    runs.borrow_mut().next = None;
    // One more read after the write, to catch a publisher (the cron) that
    // read before this one and wrote after it, unless another publish is
    // queued behind this one, which will read and write anyway. (Monitors'
    // load reports move the catalogue all the time, so a re-read nearly
    // always differs; more rounds would only hold the queue.)
    let reread = std::cell::Cell::new(true);
    let again = || runs.borrow().next.is_none() && reread.replace(false);
    let outcome = publish(&env, None, served, &again).await;
    let mut runs = runs.borrow_mut();
    runs.last_end = time::now_ms();
    if runs.next.is_none() {
        // No publish was made after this one, which is `last`: let it go.
        runs.last = None;
    }
    outcome
}

/// Publishes the catalogue from PostgreSQL ([`cron::publish_until`]) for
/// the requests in `served`, within [`RUN_LIMIT_MS`], and installs it in
/// this isolate; logs the outcome with the requests' ids. It reads the
/// catalogue again after a write only while `again()`.
async fn publish(
    env: &Env,
    fault: Option<String>,
    served: Served,
    again: &dyn Fn() -> bool,
) -> Outcome {
    let write = (cron::Write::Always, fault.as_deref());
    let published = time::timeout(
        RUN_LIMIT_MS,
        cron::publish_until(env, bindings::DB, write, again),
    )
    .await
    .unwrap_or_else(|| Err(format!("no end within {RUN_LIMIT_MS} ms")));
    let requests = served.borrow().clone();
    match published {
        Ok((snapshot, _)) => {
            let etag = snapshot.etag.clone();
            catalogue::install(snapshot);
            log::event(
                Level::Info,
                None,
                "catalogue published",
                serde_json::json!({"etag": etag, "requests": requests}),
            );
            Ok(etag)
        }
        Err(error) => {
            log::event(
                Level::Warn,
                None,
                "catalogue publish failed",
                serde_json::json!({"error": error, "requests": requests}),
            );
            Err(error)
        }
    }
}
