//! `GET /readyz`: proves, from inside the worker, every real component it needs.
//!
//! The three probes run concurrently, each bounded by [`PROBE_TIMEOUT_MS`], so a
//! hung dependency costs at most that long. Failures are reported as stable
//! codes; the underlying error is logged with the id of the request that ran
//! the probes.
//!
//! An isolate answers from probes at most [`FRESH_MS`] old: monitors and load
//! balancers poll this endpoint, all the more during an incident, and every
//! set of probes writes to KV and opens a database connection. Requests that
//! arrive while a set runs wait for its report rather than probing too (for
//! up to [`WAIT_MS`], on timers of their own: a request may not wait on
//! another's I/O, which workerd cancels as hung), so a dependency that hangs
//! for the whole probe timeout still costs one set of probes per isolate.

use super::{bindings, durable, kv, log, pg, time};
use crate::api::Readiness;
use crate::domain::freshness::due;
use crate::domain::problem::ProblemCode;
use crate::domain::readiness::{Component, Failure, Probe, Report};
use crate::http::{ApiError, Reply};
use std::cell::RefCell;
use std::rc::Rc;
use worker::{Env, Headers, Method, Request, RequestInit};

/// Time budget of each probe.
pub const PROBE_TIMEOUT_MS: u64 = 2_000;
/// The Durable Object name used only by readiness probes.
const PROBE_OBJECT: &str = "__readyz";
/// KV's minimum TTL; probe keys expire by themselves.
const KV_PROBE_TTL_SECS: u32 = 60;

/// How long an isolate answers from its last probes.
pub const FRESH_MS: u64 = 2_000;
/// How long a request waits for another's probes before running its own
/// (longer than a set of probes can take), and how often it looks.
const WAIT_MS: u64 = PROBE_TIMEOUT_MS + 1_000;
const POLL_MS: u64 = 10;

struct State {
    /// The isolate's last finished probes and when they finished.
    last: Option<(u64, Rc<Report>)>,
    /// When the request running probes started them, if one is. Others
    /// wait for its probes at most [`WAIT_MS`] from then: a request whose
    /// client went away may be left pending by the runtime, never finished
    /// nor dropped. Only the request that set it clears it, so one left
    /// pending (or overtaken) never holds back, or lets through, the requests
    /// of a later round.
    probing: Option<u64>,
}

thread_local! {
    static STATE: RefCell<State> = const {
        RefCell::new(State { last: None, probing: None })
    };
}

/// Marks its request as the one probing while it lives, also when the
/// request is cancelled part-way.
struct Probing(u64);

impl Probing {
    fn start(state: &mut State, now: u64) -> Probing {
        state.probing = Some(now);
        Probing(now)
    }
}

impl Drop for Probing {
    fn drop(&mut self) {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            if s.probing == Some(self.0) {
                s.probing = None;
            }
        });
    }
}

enum Step {
    Use(Rc<Report>),
    Wait,
    Probe(Probing),
}

pub async fn handle(env: &Env, request_id: &str) -> Reply {
    let report = loop {
        let now = time::now_ms();
        let step = STATE.with(|s| {
            let mut s = s.borrow_mut();
            match &s.last {
                Some((at, report)) if !due(*at, now, FRESH_MS) => Step::Use(Rc::clone(report)),
                _ if s.probing.is_some_and(|at| !due(at, now, WAIT_MS)) => Step::Wait,
                _ => Step::Probe(Probing::start(&mut s, now)),
            }
        });
        match step {
            Step::Use(report) => break report,
            Step::Wait => time::sleep(POLL_MS).await,
            Step::Probe(_probing) => {
                let report = Rc::new(run(env, request_id).await);
                // Stamped when the probes finished: a probe that timed out took
                // as long as the freshness window itself.
                STATE.with(|s| s.borrow_mut().last = Some((time::now_ms(), Rc::clone(&report))));
                break report;
            }
        }
    };
    if report.is_ready() {
        return Reply::json(
            200,
            &Readiness {
                status: "ready",
                components: report.components.clone(),
            },
        );
    }
    let down: Vec<&str> = report.down().map(Component::as_str).collect();
    let mut err = ApiError::new(
        ProblemCode::NotReady,
        format!("Unavailable: {}.", down.join(", ")),
    )
    .with(
        "components",
        serde_json::to_value(&report.components).unwrap_or_default(),
    );
    err.spread_retry_after(super::random::u32());
    Reply::problem(&err, request_id)
}

/// Runs the three probes at once.
async fn run(env: &Env, request_id: &str) -> Report {
    let (kv, durable, db) = futures::join!(
        probe(Component::Kv, request_id, kv_probe(env, request_id)),
        probe(
            Component::DurableObject,
            request_id,
            durable_probe(env, request_id)
        ),
        probe(Component::Database, request_id, db_probe(env)),
    );
    Report::new(vec![kv, durable, db])
}

/// Times one probe and maps its outcome, logging the cause of a failure.
async fn probe(
    component: Component,
    request_id: &str,
    fut: impl std::future::Future<Output = Result<(), (Failure, String)>>,
) -> Probe {
    let started = time::now_ms();
    let outcome = time::timeout(PROBE_TIMEOUT_MS, fut).await;
    let latency = time::now_ms().saturating_sub(started);
    match outcome {
        Some(Ok(())) => Probe::up(component, latency),
        Some(Err((failure, cause))) => {
            log::error(
                request_id,
                &format!("readyz: {} down", component.as_str()),
                &cause,
            );
            Probe::down(component, latency, failure)
        }
        None => {
            log::error(
                request_id,
                &format!("readyz: {} timed out", component.as_str()),
                &PROBE_TIMEOUT_MS,
            );
            Probe::down(component, latency, Failure::Timeout)
        }
    }
}

fn err(e: impl std::fmt::Display) -> (Failure, String) {
    (Failure::Error, e.to_string())
}

/// Writes a key unique to this request and reads it back.
async fn kv_probe(env: &Env, request_id: &str) -> Result<(), (Failure, String)> {
    let key = format!("readyz/{request_id}");
    kv::put(env, &key, request_id, Some(KV_PROBE_TTL_SECS))
        .await
        .map_err(err)?;
    match kv::get_text(env, &key).await.map_err(err)? {
        Some(v) if v == request_id => Ok(()),
        other => Err((Failure::WrongAnswer, format!("read back {other:?}"))),
    }
}

/// Calls a probe object of each Durable Object class; each writes and reads
/// back its storage. The `RegionGate` probe is also asked for an admission
/// over RPC, the way every connect asks a gate: that path (which needs the
/// class declared a `DurableObject`, `src/entry.mjs`) can fail while `fetch`
/// works. The probe object is no region's shard, so it admits no one.
async fn durable_probe(env: &Env, request_id: &str) -> Result<(), (Failure, String)> {
    let (a, b, c, d) = futures::join!(
        ping_object(env, bindings::USER_SESSIONS, request_id),
        ping_object(env, bindings::REGION_GATES, request_id),
        ping_object(env, bindings::LOGIN_THROTTLES, request_id),
        durable::admit(env, (PROBE_OBJECT, 1), None, None)
    );
    let d = d.map(drop).map_err(|f| {
        let cause = f.cause.unwrap_or_default();
        (Failure::Error, cause)
    });
    a.and(b).and(c).and(d)
}

async fn ping_object(
    env: &Env,
    namespace: &str,
    request_id: &str,
) -> Result<(), (Failure, String)> {
    let stub = env
        .durable_object(namespace)
        .and_then(|ns| ns.get_by_name(PROBE_OBJECT))
        .map_err(err)?;
    let headers = Headers::new();
    headers.set("x-ping-nonce", request_id).map_err(err)?;
    let req = Request::new_with_init(
        "https://durable-object/ping",
        RequestInit::new()
            .with_method(Method::Get)
            .with_headers(headers),
    )
    .map_err(err)?;
    let mut resp = stub.fetch_with_request(req).await.map_err(err)?;
    if resp.status_code() != 200 {
        return Err((
            Failure::WrongAnswer,
            format!("status {}", resp.status_code()),
        ));
    }
    let body: serde_json::Value = resp.json().await.map_err(err)?;
    if body["nonce"] == request_id {
        Ok(())
    } else {
        Err((
            Failure::WrongAnswer,
            format!("{namespace}: nonce {}", body["nonce"]),
        ))
    }
}

/// `SELECT 1` through the uncached Hyperdrive binding.
async fn db_probe(env: &Env) -> Result<(), (Failure, String)> {
    let client = pg::connect(env, bindings::DB)
        .await
        .map_err(|e| (Failure::Error, e))?;
    let rows = client.simple_query("SELECT 1").await.map_err(err)?;
    match pg::first_column(&rows).next() {
        Some("1") => Ok(()),
        other => Err((Failure::WrongAnswer, format!("SELECT 1 returned {other:?}"))),
    }
}
