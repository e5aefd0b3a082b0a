//! The admin API, for operators and health monitors, authenticated by a service
//! token (the `ADMIN_TOKEN` secret), never by a user token.
//!
//! - `PUT /v1/admin/regions/{id}` `{health?, admission_rate?}`: an operator's
//!   decision (e.g. drain a region, or throttle its reconnects); `up` lifts
//!   the operator's restriction;
//! - `POST /v1/admin/regions/{id}/health-report` `{health, servers?}`: a
//!   monitor's report, with the load of the region's servers it lists; a
//!   region whose monitor stops reporting for 3 minutes is marked down by the
//!   cron;
//! - `GET /v1/admin/servers`: the fleet;
//! - `PUT /v1/admin/servers/{id}` `{enabled}`: take a server out of placement,
//!   or put it back.
//!
//! The operator's decision and the reports are kept apart (migration V10): a
//! region's health is the worse of the two, so a monitor's `up` never ends a
//! drain. A change republishes the catalogue snapshot to KV at once, within
//! [`PUBLISH_LIMIT_MS`]; one of a region's health or rate also tells its
//! `RegionGate` shards at once whether it admits anyone ([`tell_gates`]).

use super::auth::json_body;
use super::incoming::Incoming;
use super::log::{self, Level};
use super::{Fail, bindings, catalogue, cron, durable, fault, publisher, store, time};
use crate::api::{
    HealthReport, MAX_REPORTED_SERVERS, RegionState, ServerList, ServerLoad, ServerState,
    SetRegion, SetServer, is_server_id, unit_load,
};
use crate::domain::catalogue::Health;
use crate::domain::geo::{self, Point};
use crate::domain::problem::ProblemCode;
use crate::http::{ApiError, Reply};
use crate::sql;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde_json::json;
use sha2::{Digest, Sha256};
use worker::Env;

pub const TOKEN_SECRET: &str = "ADMIN_TOKEN";
/// The shortest admin token the API accepts being configured with.
const MIN_TOKEN_LEN: usize = 16;
/// How long a change waits for its catalogue publish: normally a second or
/// two, and a few more when it waits for a publish under way and KV's
/// second (`publisher`, which gives a publish stuck on KV or PostgreSQL up
/// after 4 s). One that takes longer is answered as a failed one, 503: the
/// change is committed, an operator's retry publishes it (a monitor's
/// report, which its retry finds unchanged, waits for the cron), and so
/// does the cron within a minute.
const PUBLISH_LIMIT_MS: u64 = 10_000;

/// Checks the bearer service token. Digests are compared, so the comparison
/// takes the same time wherever the presented token differs.
fn authorize(req: &Incoming, env: &Env) -> Result<(), Fail> {
    let not_configured = |cause: String| {
        Fail::new(
            ApiError::new(
                ProblemCode::NotConfigured,
                "The admin API is not configured; it has been logged.",
            ),
            cause,
        )
    };
    let expected = env
        .secret(TOKEN_SECRET)
        .map(|s| s.to_string())
        .map_err(|_| not_configured(format!("secret {TOKEN_SECRET} is not set")))?;
    if expected.len() < MIN_TOKEN_LEN {
        // As good as unset: a guessable token would be worse than none.
        return Err(not_configured(format!(
            "secret {TOKEN_SECRET} is shorter than {MIN_TOKEN_LEN} characters"
        )));
    }
    let header = req.header("authorization").unwrap_or_default();
    // The scheme's name is case-insensitive (RFC 9110, 11.1).
    let presented = match header.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
        _ => "",
    };
    if Sha256::digest(presented.as_bytes()) != Sha256::digest(expected.as_bytes()) {
        return Err(ApiError::new(
            ProblemCode::AdminUnauthorized,
            "Send the admin service token as a Bearer token.",
        )
        .into());
    }
    Ok(())
}

fn health_str(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Draining => "draining",
        Health::Down => "down",
    }
}

/// The operator's restriction as SQL: none for `up`.
fn operator_health_sql(h: Health) -> String {
    match h {
        Health::Up => "NULL".to_owned(),
        restricted => format!("'{}'", health_str(restricted)),
    }
}

/// When an update republishes the catalogue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Republish {
    /// Always: an operator's change (also one that changes nothing, so that
    /// repeating a change whose publish failed publishes it).
    Always,
    /// Only when the region's health or rate changed, or one of its enabled
    /// servers became full or had room again: a monitor's report,
    /// which arrives every few seconds per region and mostly confirms what
    /// the catalogue says; reading the whole catalogue for each would load
    /// the database in proportion to the fleet for nothing. (A report whose
    /// publish failed is published by the cron within a minute.)
    IfChanged,
}

/// Updates a region, and the load of those of the servers in `loads` (each
/// named once) that are the region's, in one statement; the answer lists the
/// others in `unknown_servers`.
async fn update_region(
    env: &Env,
    (request_id, id): (&str, &str),
    assignments: &str,
    loads: &[(&str, f32)],
    republish: Republish,
    fault: Option<String>,
) -> Result<Reply, Fail> {
    let not_found = || {
        Fail::from(ApiError::new(
            ProblemCode::RegionNotFound,
            "No region with this id.",
        ))
    };
    let db = store::connect(env).await?;
    let id = sql::literal(id).map_err(|_| not_found())?;
    let mut values = Vec::with_capacity(loads.len());
    for (server, load) in loads {
        // Checked to be of a server id's shape, so never refused.
        let server = sql::literal(server).unwrap_or_default();
        values.push(format!("({server}, {load}::real)"));
    }
    let loads = if values.is_empty() {
        "SELECT NULL::text, NULL::real WHERE false".to_owned()
    } else {
        format!("VALUES {}", values.join(", "))
    };
    // A server becomes full at FULL_LOAD and has room again below
    // ROOM_LOAD; a fullness that no report has confirmed for 3 minutes has
    // lapsed (migrations V16 and V17, `currently_full`). Its fullness changing
    // changes placement: publish at once, as for the region's health. Other
    // load changes reach the catalogue with the cron's publish, within a
    // minute. The region's row is locked first (`known` and `region` both
    // read `locked`; a row another part of the statement had updated first
    // would be invisible to its lock), then its servers in id order, so that
    // two writers cannot lock them in opposite orders.
    let q = format!(
        "WITH loads (id, load) AS ({loads}),
              locked AS (SELECT id, health, admission_rate FROM regions WHERE id = {id} FOR UPDATE),
              known AS (SELECT s.id, currently_full(s) AS was_full FROM servers s JOIN loads l USING (id)
                         WHERE s.region_id = (SELECT id FROM locked) ORDER BY s.id FOR UPDATE OF s),
              loaded AS (UPDATE servers s
                            SET load = l.load, load_reported_at = now(), updated_at = now(),
                                is_full = CASE WHEN l.load >= {full}::real THEN true
                                               WHEN l.load < {room}::real THEN false
                                               ELSE k.was_full END
                           FROM loads l JOIN known k USING (id)
                          WHERE s.id = l.id
                      RETURNING s.enabled AND s.is_full <> k.was_full AS flipped),
              region AS (UPDATE regions r SET {assignments}, updated_at = now()
                           FROM locked before
                          WHERE r.id = before.id
                      RETURNING json_build_object('id', r.id, 'health', r.health, 'admission_rate', r.admission_rate,
                                                  'reported_health', r.reported_health, 'operator_health', r.operator_health,
                                                  'health_reported_at', extract(epoch FROM r.health_reported_at)::bigint) AS state,
                                (before.health, before.admission_rate) IS DISTINCT FROM (r.health, r.admission_rate) AS changed,
                                CASE WHEN r.gates_changed_at > now() - interval '5 minutes'
                                     THEN greatest(before.admission_rate, r.gates_rate_before)
                                     ELSE before.admission_rate END AS previous_rate,
                                gate_word_version() AS version,
                                r.latitude, r.longitude)
         SELECT json_build_object(
             'region', (SELECT state FROM region),
             'region_changed', coalesce((SELECT changed FROM region), false),
             'previous_rate', (SELECT previous_rate FROM region),
             'version', (SELECT version FROM region),
             'latitude', (SELECT latitude FROM region),
             'longitude', (SELECT longitude FROM region),
             'unknown', (SELECT coalesce(json_agg(l.id ORDER BY l.id), '[]') FROM loads l
                          WHERE NOT EXISTS (SELECT 1 FROM known k WHERE k.id = l.id)),
             'flipped', EXISTS (SELECT 1 FROM loaded WHERE flipped))::text",
        full = crate::domain::placement::FULL_LOAD,
        room = crate::domain::placement::ROOM_LOAD,
    );
    #[derive(serde::Deserialize)]
    struct Updated {
        region: Option<RegionState>,
        unknown: Vec<String>,
        /// The region's health or rate changed.
        region_changed: bool,
        /// One of its enabled servers became full or had room again.
        flipped: bool,
        /// These two are null, as `region` is, for a region that does not
        /// exist.
        previous_rate: Option<u32>,
        version: Option<i64>,
        /// Where the region is: where its gates belong.
        latitude: Option<f64>,
        longitude: Option<f64>,
    }
    let row: Option<Updated> = store::json_value(&db, &q).await?;
    let Some(Updated {
        region: Some(mut region),
        unknown,
        region_changed,
        flipped,
        previous_rate: Some(previous_rate),
        version: Some(version),
        latitude,
        longitude,
    }) = row
    else {
        return Err(not_found());
    };
    region.unknown_servers = unknown;
    drop(db);
    let always = republish == Republish::Always;
    // Boxed as trait objects, so that neither is inlined into this
    // function's own state machine (each is compiled on its own).
    let gates: LocalBoxFuture<'_, ()> = async {
        if always || region_changed {
            let fault = fault.as_deref().filter(|f| *f == fault::GATE_UNFENCED);
            let closed = region.health != Health::Up || region.admission_rate == 0;
            let rates = (region.admission_rate, previous_rate);
            let at = latitude
                .zip(longitude)
                .and_then(|(lat, lon)| Point::new(lat, lon));
            let (id, told) = (region.id.as_str(), (version, closed));
            tell_gates(env, Some(request_id), (id, at, rates), told, fault).await;
        }
    }
    .boxed_local();
    let publish: LocalBoxFuture<'_, Result<(), Fail>> = async {
        if always || region_changed || flipped {
            publish_now(env, request_id, fault.as_deref()).await?;
        }
        Ok(())
    }
    .boxed_local();
    futures::future::join(gates, publish).await.1?;
    Ok(Reply::json(200, &region))
}

/// Tells the region's `RegionGate` shards at once whether it admits anyone
/// (`durable::fence`), as of its change `version`: the catalogue takes up to
/// a minute to reach every isolate (KV's propagation), and until then their
/// copies would send new clients to a region that is down or draining, or
/// whose rate is 0. The shards of both the rate before the change and the
/// rate after are told, as isolates still ask at the old one; the rate
/// before is the highest the region had in the 5 minutes before the change
/// (`regions.gates_rate_before`, migration V19), as the cron's tellings
/// take it, since copies that old may still ask at it. Logged either
/// way (with the number of shards that took the word: one no newer than a
/// shard's last is not), for the request `request_id` if there is one; a
/// shard not reached is told again by the cron's runs of the next 5
/// minutes, else learns of it from the catalogue: the change stands and is
/// published either way. One told a region is closed refuses everyone for
/// `admission::FENCE_MS` at most, unless told it admits again. The cron
/// tells the shards of the regions it marks down too, and, for 5 minutes
/// after a region's change, tells them again on each run. A shard that did not
/// exist is made by the telling: near the region `at`
/// (`geo::location_hint`), not near the operator or the cron.
pub(super) async fn tell_gates(
    env: &Env,
    request_id: Option<&str>,
    (region, at, rates): (&str, Option<Point>, (u32, u32)),
    (version, closed): (i64, bool),
    fault: Option<&str>,
) {
    let shards = crate::domain::admission::shard_count(rates.0.max(rates.1));
    let hint = at.map(geo::location_hint);
    let told = durable::fence(env, (region, shards, hint), (version, closed), fault).await;
    let mut fields =
        json!({"region": region, "closed": closed, "shards": shards, "location_hint": hint});
    match told {
        Ok(taken) => {
            fields["taken"] = taken.into();
            log::event(Level::Info, request_id, "region gates told", fields);
        }
        Err(e) => {
            let what = if closed {
                "region gates not told it is closed"
            } else {
                "region gates not told it admits again"
            };
            fields["error"] = e.into();
            log::event(Level::Error, request_id, what, fields);
        }
    }
}

/// Publishes the catalogue at once, through the [`publisher`] object, which
/// publishes changes made together together; 503 if that has not ended
/// within [`PUBLISH_LIMIT_MS`] (the change is committed: an operator's
/// repeating it, or the cron within a minute, publishes it). The publish is
/// made for the request `request_id`, named in the object's log line.
///
/// When the call fails with an error the runtime marks as one to try again
/// (`retryable`, and not `overloaded`: the object was reset meanwhile, say),
/// it is made once more; when that fails so too, the change is published
/// from here, as it was before the object existed, rather than left to the
/// cron: a monitor's report whose publish failed is not published by its
/// retry, which finds nothing to change. The object
/// may have published it already; a second publish of the same catalogue
/// only costs the work. An overloaded object, a publish the object made and
/// that failed (424), and any other failure are a 503, not a publish from
/// every caller at once.
///
/// `fault`: the development-only fault points `kv.hang` (the publish never
/// ends), `kv.refused` (KV refuses its first write), `catalogue.unstored`
/// (the object's publish fails), `publisher.reset` (the first call fails as
/// at an object's reset) and `publisher.down` (every call fails so).
async fn publish_now(env: &Env, request_id: &str, fault: Option<&str>) -> Result<(), Fail> {
    let publish = async {
        if fault == Some(fault::KV_HANG) {
            futures::future::pending::<()>().await;
        }
        let asked = publisher::PublishReq {
            fault: fault
                .filter(|f| [fault::KV_REFUSED, fault::CATALOGUE_UNSTORED].contains(f))
                .map(str::to_owned),
        };
        let object = (bindings::CATALOGUE_PUBLISHER, publisher::NAME, "/publish");
        let asked = &asked;
        let call = |attempt: u32| async move {
            match fault {
                // As the runtime throws it when the object is reset meanwhile.
                Some(p @ fault::PUBLISHER_DOWN) => Err((fault::unavailable(p), true)),
                Some(p @ fault::PUBLISHER_RESET) if attempt == 0 => {
                    Err((fault::unavailable(p), true))
                }
                _ => durable::call_marked(env, request_id, object, asked).await,
            }
        };
        // A call that fails as at the object's reset is made once more, on
        // a new stub: the callers a reset turned away meet again in the new
        // instance and are published together, rather than each here.
        let called = match call(0).await {
            Err((_, true)) => call(1).await,
            first => first,
        };
        match called {
            Ok((200, answer)) if answer["etag"].is_string() => {
                catalogue::published(answer["etag"].as_str().unwrap_or_default());
                Ok(())
            }
            Ok((status, answer)) => Err(Fail::unavailable(format!(
                "catalogue publish: status {status}: {answer}"
            ))),
            Err((fail, false)) => Err(fail),
            Err((reset, true)) => {
                let why = reset.cause.unwrap_or_default();
                log::error(
                    request_id,
                    "catalogue publisher failed to answer; publishing here",
                    &why,
                );
                let kv_fault = asked.fault.as_deref();
                let (snapshot, _) = cron::publish(env, bindings::DB, cron::Write::Always, kv_fault)
                    .await
                    .map_err(|e| Fail::unavailable(format!("catalogue publish: {e}")))?;
                catalogue::install(snapshot);
                Ok(())
            }
        }
    };
    time::timeout(PUBLISH_LIMIT_MS, publish)
        .await
        .unwrap_or_else(|| {
            let why = format!("catalogue publish: no end within {PUBLISH_LIMIT_MS} ms");
            Err(Fail::unavailable(why))
        })
}

pub async fn set_region(mut req: Incoming, env: &Env, id: &str) -> Result<Reply, Fail> {
    authorize(&req, env)?;
    let b: SetRegion = json_body(&mut req).await?;
    let mut sets = Vec::new();
    if let Some(h) = b.health {
        sets.push(format!("operator_health = {}", operator_health_sql(h)));
    }
    if let Some(rate) = &b.admission_rate {
        let Some(rate) = crate::api::whole_rate(rate) else {
            return Err(
                crate::http::body::invalid(&[crate::domain::account::Invalid {
                    field: "admission_rate",
                    reason: "must be a whole number from 0 to 1000000",
                }])
                .into(),
            );
        };
        sets.push(format!("admission_rate = {rate}"));
    }
    if sets.is_empty() {
        return Err(
            crate::http::body::invalid(&[crate::domain::account::Invalid {
                field: "health",
                reason: "or admission_rate must be given",
            }])
            .into(),
        );
    }
    // The development-only fault points of the publish (`publish_now`) and
    // of telling the gates (`gate.unfenced`).
    let fault = fault::armed(env, req.header(fault::HEADER));
    let ids = (req.request_id(), id);
    update_region(env, ids, &sets.join(", "), &[], Republish::Always, fault).await
}

pub async fn health_report(mut req: Incoming, env: &Env, id: &str) -> Result<Reply, Fail> {
    authorize(&req, env)?;
    let b: HealthReport = json_body(&mut req).await?;
    let loads = server_loads(&b.servers)?;
    update_region(
        env,
        (req.request_id(), id),
        &format!(
            "reported_health = '{}', health_reported_at = now()",
            health_str(b.health)
        ),
        &loads,
        Republish::IfChanged,
        fault::armed(env, req.header(fault::HEADER)).filter(|f| f == fault::KV_HANG),
    )
    .await
}

/// A report's server loads, checked: at most [`MAX_REPORTED_SERVERS`], ids of
/// a server id's shape, loads from 0 to 1 (422 otherwise, naming the field).
/// A server named twice takes its last entry.
fn server_loads(servers: &[ServerLoad]) -> Result<Vec<(&str, f32)>, Fail> {
    let invalid = |reason| -> Fail {
        crate::http::body::invalid(&[crate::domain::account::Invalid {
            field: "servers",
            reason,
        }])
        .into()
    };
    if servers.len() > MAX_REPORTED_SERVERS {
        return Err(invalid("lists more than 100 servers"));
    }
    let mut loads: Vec<(&str, f32)> = Vec::with_capacity(servers.len());
    for s in servers {
        if !is_server_id(&s.id) {
            return Err(invalid("has an id that is not a server id"));
        }
        let Some(load) = unit_load(&s.load) else {
            return Err(invalid("has a load that is not a number from 0 to 1"));
        };
        match loads.iter_mut().find(|(id, _)| *id == s.id) {
            Some(earlier) => earlier.1 = load,
            None => loads.push((s.id.as_str(), load)),
        }
    }
    Ok(loads)
}

/// A row `s` of `servers` as the admin API shows it (`ServerState`).
fn server_json() -> String {
    format!(
        "json_build_object(
             'id', s.id, 'region_id', s.region_id, 'endpoint', {endpoint},
             'public_key', s.public_key, 'capacity', s.capacity, 'enabled', s.enabled, 'load', s.load,
             'full', currently_full(s))",
        endpoint = crate::sql::SERVER_ENDPOINT
    )
}

pub async fn servers(req: Incoming, env: &Env) -> Result<Reply, Fail> {
    authorize(&req, env)?;
    let db = store::connect(env).await?;
    let q = format!(
        "SELECT coalesce(json_agg({server} ORDER BY s.region_id, s.id), '[]'::json)::text FROM servers s",
        server = server_json()
    );
    let servers: Option<Vec<ServerState>> = store::json_value(&db, &q).await?;
    Ok(Reply::json(
        200,
        &ServerList {
            servers: servers.unwrap_or_default(),
        },
    ))
}

/// Takes a server out of placement (`enabled: false`) or puts it back, and
/// republishes the catalogue at once, even when the server already had that
/// value: a retry after a publish that failed (503, the change committed)
/// finds nothing to change, and must still publish. Servers have no
/// health of their own, so this is how an operator takes out a broken one
/// while its region's monitor still reports the region up.
pub async fn set_server(mut req: Incoming, env: &Env, id: &str) -> Result<Reply, Fail> {
    authorize(&req, env)?;
    let b: SetServer = json_body(&mut req).await?;
    let not_found = || {
        Fail::from(ApiError::new(
            ProblemCode::ServerNotFound,
            "No server with this id.",
        ))
    };
    if !is_server_id(id) {
        return Err(not_found());
    }
    let db = store::connect(env).await?;
    // The id has a server id's shape, so it is never refused.
    let id = sql::literal(id).map_err(|_| not_found())?;
    let q = format!(
        "UPDATE servers s SET enabled = {enabled}, updated_at = now() WHERE s.id = {id}
         RETURNING ({server})::text",
        enabled = b.enabled,
        server = server_json()
    );
    // Read as a JSON value, not a struct: the server is passed on as
    // PostgreSQL built it (`ServerState`), and a deserializer of its own
    // would be some 4 KB more of the module.
    let Some(server) = store::json_value::<serde_json::Value>(&db, &q).await? else {
        return Err(not_found());
    };
    drop(db);
    let fault = fault::armed(env, req.header(fault::HEADER));
    publish_now(env, req.request_id(), fault.as_deref()).await?;
    Ok(Reply::json(200, &server))
}
