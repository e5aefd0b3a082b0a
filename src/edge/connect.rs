//! `GET /v1/regions` and `POST /v1/connect`: the reconnect hot path.
//!
//! Nothing here queries PostgreSQL. A connect needs, in order:
//! 1. the access token (signature and claims, pure CPU; the signature through
//!    WebCrypto), then, at the same time:
//!    - the session's revocation state (KV mirror, `auth::check_not_revoked`);
//!    - the device: the user's KV device mirror (fallback: the user's object,
//!      which holds the same list; still no database);
//!    - the region catalogue (KV, parsed once per isolate every few seconds);
//! 2. a region and a server: pure placement rules (`domain::placement`);
//! 3. admission: one RPC call to the region's `RegionGate` shard, unless
//!    the shard said a moment ago that its queue is full or its region closed
//!    (`admission::RefusingShards`: the isolate then refuses as the shard
//!    would). A region closed at its gate is steered past, to the next
//!    region placement chooses, at most `placement::MAX_CLOSED_STEPS` times
//!    and within 2 s of gates;
//! 4. a signed connect ticket (WebCrypto); the connection event is queued after
//!    the answer (a refusal's with the isolate's other refusals:
//!    `domain::outbox`).

use super::auth::{check_not_revoked_as, json_body, verify_bearer};
use super::durable::{self, call};
use super::events::{self, ConnectionEvent};
use super::incoming::Incoming;
use super::time::{self, Timer};
use super::user_session::{DeviceMirror, devices_key};
use super::{Fail, bindings, catalogue, fault, kv, random, secrets, store, webcrypto};
use crate::api::{AssignedServer, Assignment, ConnectRequest, RegionList, RegionSummary};
use crate::domain::admission::{self, Admit, FailedShards, RefusingShards};
use crate::domain::catalogue::Snapshot;
use crate::domain::geo::Point;
use crate::domain::placement::{self, ClientLocation, PlacementError};
use crate::domain::problem::ProblemCode;
use crate::domain::token::Ticket;
use crate::http::{ApiError, Reply};
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use worker::{Context, Env};

fn etag(snapshot: &Snapshot) -> String {
    format!("\"{}\"", snapshot.etag)
}

/// Whether an `If-None-Match` header matches `etag` (weak comparison).
fn not_modified(if_none_match: Option<&str>, etag: &str) -> bool {
    if_none_match.is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag)
    })
}

thread_local! {
    /// The `GET /v1/regions` answer and the etag of the snapshot it was made
    /// from. It depends on the snapshot alone (which is what its `ETag`
    /// promises), so it is serialised once per snapshot rather than once per
    /// request: with a thousand regions that serialisation was most of the
    /// request's CPU.
    static REGIONS_REPLY: RefCell<Option<(String, Reply)>> = const { RefCell::new(None) };

    /// The gate shards this isolate last heard say their queue was full, or
    /// their region closed.
    static REFUSING_SHARDS: RefCell<RefusingShards> = RefCell::new(RefusingShards::default());

    /// The gate shards whose last call from this isolate failed.
    static FAILED_SHARDS: RefCell<FailedShards> = RefCell::new(FailedShards::default());
}

/// Asks the gate `gate` for one admission at `rate`, or answers as it did a
/// moment ago if it said its queue was full or its region closed
/// (`RefusingShards`) or a call to it
/// found it in trouble (`FailedShards`: a 503, as that failure was).
///
/// A failure caused by a development fault point is remembered apart from
/// the shard's real ones (under the fault's name too), so that it refuses
/// only requests that arm the same fault.
///
/// `asked_at` is set to when the first of a request's calls began (its clock
/// is read once per call anyway).
async fn admit(
    env: &Env,
    (gate, rate): (&str, u32),
    fault: Option<&str>,
    timer: &Timer,
    asked_at: &mut Option<i64>,
) -> Result<Admit, Fail> {
    let now = time::now_ms() as i64;
    asked_at.get_or_insert(now);
    let failed_as = match fault {
        Some(f) => std::borrow::Cow::Owned(format!("{gate}!{f}")),
        None => std::borrow::Cow::Borrowed(gate),
    };
    if let Some(refusal) = REFUSING_SHARDS.with(|m| m.borrow().refusal(gate, rate, now)) {
        return Ok(refusal);
    }
    if FAILED_SHARDS.with(|m| m.borrow().has_failed(&failed_as, now)) {
        return Err(Fail::unavailable(format!(
            "durable object {}.admit: a call to {gate} failed within the last {} ms",
            super::bindings::REGION_GATES,
            admission::FAILED_MEMO_MS
        )));
    }
    let verdict = durable::admit(env, (gate, rate), fault, Some(timer)).await;
    let asked = now;
    let now = time::now_ms() as i64;
    // An object in trouble: its call went unanswered for the whole bound, or
    // it said it is overloaded. A one-off error (the object reset, as every
    // deploy of it brings, or a connection lost) is not remembered: it would
    // refuse the shard's next second of clients for one failed call.
    let in_trouble = verdict.as_ref().err().map(|fail| {
        now - asked >= i64::from(durable::ADMIT_TIMEOUT_MS)
            || fail
                .cause
                .as_deref()
                .is_some_and(|c| c.to_ascii_lowercase().contains("overloaded"))
    });
    match in_trouble {
        None => FAILED_SHARDS.with(|m| m.borrow_mut().note(&failed_as, now, true)),
        Some(true) => FAILED_SHARDS.with(|m| m.borrow_mut().note(&failed_as, now, false)),
        Some(false) => {}
    }
    let verdict = verdict?;
    REFUSING_SHARDS.with(|m| m.borrow_mut().note(gate, rate, now, verdict));
    Ok(verdict)
}

fn regions_reply(snapshot: &Snapshot) -> Reply {
    let cached = REGIONS_REPLY.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(etag, _)| *etag == snapshot.etag)
            .map(|(_, reply)| reply.clone())
    });
    if let Some(reply) = cached {
        return reply;
    }
    let regions: Vec<_> = snapshot
        .regions
        .iter()
        .map(|r| RegionSummary {
            id: r.id.clone(),
            name: r.name.clone(),
            country: r.country.clone(),
            latitude: r.latitude,
            longitude: r.longitude,
            tier: r.tier,
            health: placement::listed_health(r),
            load: placement::region_load(r),
        })
        .collect();
    let reply = Reply::json(200, &RegionList { regions });
    REGIONS_REPLY.with(|c| *c.borrow_mut() = Some((snapshot.etag.clone(), reply.clone())));
    reply
}

pub async fn regions(req: &Incoming, env: &Env) -> Result<Reply, Fail> {
    let fault = fault::armed(env, req.header(fault::HEADER));
    let placer = catalogue::current(env, req.request_id(), fault.as_deref()).await?;
    let snapshot = placer.snapshot();
    let tag = etag(snapshot);
    let cache = ("cache-control", "public, max-age=15".to_owned());
    if not_modified(req.header("if-none-match").as_deref(), &tag) {
        return Ok(Reply {
            status: 304,
            headers: vec![("etag", tag), cache],
            body: vec![],
        });
    }
    let mut reply = regions_reply(snapshot);
    reply.headers.push(("etag", tag));
    reply.headers.push(cache);
    Ok(reply)
}

/// Where the client is: Cloudflare's geolocation of the request. In local
/// development (where there is none) the `x-keenvpn-client-location: lat,lon`
/// or `x-keenvpn-client-country: CC` headers stand in for it; they are ignored
/// in any other environment.
fn client_location(req: &Incoming, env: &Env) -> ClientLocation {
    let dev = bindings::text(env, "ENVIRONMENT").is_some_and(|v| v == "development");
    let header = |name: &str| req.header(name);
    if dev {
        if let Some(point) = header("x-keenvpn-client-location").and_then(|v| {
            let (lat, lon) = v.split_once(',')?;
            Point::parse(lat, lon)
        }) {
            return ClientLocation::Coordinates(point);
        }
        if let Some(country) = header("x-keenvpn-client-country") {
            return ClientLocation::Country(country);
        }
    }
    let Some(cf) = req.cf() else {
        return ClientLocation::Unknown;
    };
    let text = |read: Result<Option<String>, wasm_bindgen::JsValue>| read.ok().flatten();
    if let Some(point) = text(cf.latitude())
        .zip(text(cf.longitude()))
        .and_then(|(lat, lon)| Point::parse(&lat, &lon))
    {
        return ClientLocation::Coordinates(point);
    }
    text(cf.country()).map_or(ClientLocation::Unknown, ClientLocation::Country)
}

/// The user's devices: the KV mirror (read as `how` says), else (no copy, an
/// old one, or KV failing or too slow) the user's object (no database).
async fn devices(
    env: &Env,
    request_id: &str,
    (user_id, device_id): (&str, &str),
    how: kv::Reading<'_>,
) -> Result<Vec<store::Device>, Fail> {
    let copy = kv::read_json::<DeviceMirror>(env, &devices_key(user_id), how).await;
    // No copy at all (it expired, say): the object writes it again.
    let absent = matches!(copy, Ok(None));
    if let Ok(Some(m)) = copy
        && m.devices.iter().any(|d| d.id == device_id)
    {
        return Ok(m.devices);
    }
    let (status, body) = call(
        env,
        request_id,
        bindings::USER_SESSIONS,
        user_id,
        "/devices/list",
        &json!({ "absent": absent }),
    )
    .await?;
    if status != 200 {
        return Err(Fail::unavailable(format!("device list: status {status}")));
    }
    let m: DeviceMirror =
        serde_json::from_value(body).map_err(|e| Fail::internal(format!("device list: {e}")))?;
    Ok(m.devices)
}

/// `fail` (a 503 once a region is chosen) with the chosen region's
/// failover list.
fn with_failover(mut fail: Fail, failover: &[&str]) -> Fail {
    fail.api = fail.api.with("failover", json!(failover));
    fail
}

/// A connect's answer when a placement rule refuses it.
fn placement_failure(e: PlacementError) -> Fail {
    let (code, detail) = match e {
        PlacementError::RegionNotAllowed => (
            ProblemCode::RegionNotAllowed,
            "Your plan does not include this region.",
        ),
        PlacementError::UnknownRegion => (ProblemCode::RegionNotFound, "No region with this id."),
        PlacementError::NoEligibleRegion => {
            // Nothing to fail over to; the default `Retry-After`, spread by
            // the shell, says when to ask again.
            return refused(
                ProblemCode::NoRegionAvailable,
                "No region your plan includes is up right now.",
                &[],
                None,
            );
        }
    };
    Fail::from(ApiError::new(code, detail))
}

/// A connect's answer when its region's gate refuses it as closed.
fn refused_closed(failover: &[&str]) -> Fail {
    refused(
        ProblemCode::RegionClosed,
        "The region is not accepting connections; use a failover region.",
        failover,
        Some(admission::retry_after_secs(1_000, random::u32())),
    )
}

fn refused(code: ProblemCode, detail: &str, failover: &[&str], retry_after: Option<u32>) -> Fail {
    let err = ApiError::new(code, detail).with("failover", json!(failover));
    match retry_after {
        Some(secs) => err.with_retry_after(secs).into(),
        None => err.into(),
    }
}

pub async fn connect(mut req: Incoming, env: &Env, ctx: &Context) -> Result<Reply, Fail> {
    let claims = verify_bearer(&req, env).await?;
    let location = client_location(&req, env);
    let body: Result<ConnectRequest, Fail> = json_body(&mut req).await;
    let keys = secrets::keys(env)?;
    let fault = fault::armed(env, req.header(fault::HEADER));

    let not_found = || {
        Fail::from(ApiError::new(
            ProblemCode::DeviceNotFound,
            "No such device.",
        ))
    };
    // The session's revocation, the device and the catalogue are independent
    // reads: make them at once. A refusal keeps the order of the checks (a
    // revoked session before a bad body before an unknown device).
    let device_id = body
        .as_ref()
        .ok()
        .and_then(|b| crate::domain::device::device_id(&b.device_id));
    // One timer bounds every wait of the request (see `time::Timer`).
    // Shared with the event's send after the answer, which it bounds too.
    let timer = Rc::new(Timer::new());
    let reading = kv::Reading {
        timer: Some(&timer),
        hang: fault.as_deref() == Some(fault::KV_HANG),
    };
    let (not_revoked, devices, placer) = futures::join!(
        check_not_revoked_as(env, &claims, reading),
        async {
            match &device_id {
                Some(id) => {
                    let owner = (claims.sub.as_str(), id.as_str());
                    Some(devices(env, req.request_id(), owner, reading).await)
                }
                None => None,
            }
        },
        catalogue::current(env, req.request_id(), fault.as_deref())
    );
    not_revoked?;
    let b = body?;
    placement::check_avoid(&b.avoid).map_err(|e| Fail::from(crate::http::body::invalid(&[e])))?;
    let (Some(devices), Some(device_id)) = (devices, device_id) else {
        return Err(not_found());
    };
    let (devices, placer) = (devices?, placer?);
    // Devices are ranked oldest first; after a downgrade only the first
    // `max_devices` of them may connect.
    let Some(rank) = devices.iter().position(|d| d.id == device_id) else {
        return Err(not_found());
    };
    if rank >= claims.ent.max_devices as usize {
        return Err(ApiError::new(
            ProblemCode::DeviceNotEntitled,
            format!(
                "Your plan covers {} device(s); this one is beyond them.",
                claims.ent.max_devices
            ),
        )
        .into());
    }
    let device = &devices[rank];

    // Regions that admit no one are not offered at all, nor (if anything
    // else is up) those the app could not reach. A region whose gate refuses
    // as closed (the catalogue's copy here still lists it up) is steered
    // past, to the region placement chooses without it, as many as
    // `MAX_CLOSED_STEPS` times, and while the gates asked have taken less
    // than a gate call's bound: a connect waits for gates 4 s at most.
    let mut closed_here: Vec<&str> = Vec::new();
    let mut asking_since = None;
    let (choice, verdict) = loop {
        let chosen = placer.choose_avoiding(
            &claims.ent,
            &location,
            b.region.as_deref(),
            &b.avoid,
            &closed_here,
        );
        // After a closed gate, no other eligible region is
        // `no_region_available`, as a catalogue listing it closed would
        // have it.
        let choice = chosen.map_err(placement_failure)?;
        let region = choice.region;
        // Shards by the configured rate, so a device keeps its shard while
        // servers fill up; each admits its share of the rate the servers
        // with room can take.
        let shards = admission::shard_count(region.admission_rate);
        let shard = admission::shard_for(&device.id, shards);
        let rate = admission::shard_rate(choice.admitting_rate, shards, shard);
        let gate = format!("{}#{}", region.id, shard);
        // A 503 from here on (a region is chosen) names the failover
        // regions: as the README and the contract say, and another region's
        // gate is another object.
        let verdict = admit(
            env,
            (&gate, rate),
            fault.as_deref(),
            &timer,
            &mut asking_since,
        )
        .await
        .map_err(|fail| with_failover(fail, &choice.failover))?;
        if verdict != Admit::Closed {
            break (choice, verdict);
        }
        events::collect(
            env,
            ctx,
            ConnectionEvent::new(&claims.sub, &device.id, &region.id, None, "closed"),
        );
        // `admit` set when the first call began.
        let in_time =
            |since: i64| time::now_ms() as i64 - since < i64::from(durable::ADMIT_TIMEOUT_MS);
        if closed_here.len() == placement::MAX_CLOSED_STEPS || !asking_since.is_some_and(in_time) {
            break (choice, verdict);
        }
        closed_here.push(&region.id);
    };
    let region = choice.region;
    let failover = &choice.failover;
    match verdict {
        Admit::Admitted => {}
        Admit::Wait { retry_after_ms } => {
            events::collect(
                env,
                ctx,
                ConnectionEvent::new(&claims.sub, &device.id, &region.id, None, "throttled"),
            );
            return Err(refused(
                ProblemCode::RegionBusy,
                "The region is admitting clients as fast as it can; retry after the delay or use a failover region.",
                failover,
                Some(admission::busy_retry_after_secs(
                    retry_after_ms,
                    random::u32(),
                )),
            ));
        }
        Admit::Closed => return Err(refused_closed(failover)),
    }
    let fail_over = |fail: Fail| with_failover(fail, failover);
    let Some(server) = placement::choose_server(region, &device.id) else {
        // Admitted by the gate but refused all the same: a decision too.
        events::collect(
            env,
            ctx,
            ConnectionEvent::new(&claims.sub, &device.id, &region.id, None, "closed"),
        );
        return Err(refused(
            ProblemCode::RegionClosed,
            "The region has no server available.",
            failover,
            Some(admission::retry_after_secs(5_000, random::u32())),
        ));
    };
    let now = time::now_secs();
    let unsigned = keys.ticket(
        &Ticket {
            user_id: &claims.sub,
            device_id: &device.id,
            device_public_key: &device.public_key,
            ipv4_address: &device.ipv4_address,
            ipv6_address: &device.ipv6_address,
            server_id: &server.id,
            region_id: &region.id,
        },
        now,
    );
    let signed = if fault.as_deref() == Some(fault::TOKEN_UNSIGNED) {
        Err(fault::unavailable(fault::TOKEN_UNSIGNED))
    } else {
        webcrypto::sign(keys, unsigned).await
    };
    let (ticket, ticket_expires_in) = signed.map_err(fail_over)?;
    events::enqueue(
        env,
        ctx,
        req.request_id(),
        ConnectionEvent::new(
            &claims.sub,
            &device.id,
            &region.id,
            Some(&server.id),
            "admitted",
        ),
        fault,
        Rc::clone(&timer),
    );
    Ok(Reply::json(
        200,
        &Assignment {
            region: region.id.clone(),
            server: AssignedServer {
                id: server.id.clone(),
                endpoint: server.endpoint(),
                public_key: server.public_key.clone(),
            },
            ipv4_address: device.ipv4_address.clone(),
            ipv6_address: device.ipv6_address.clone(),
            ticket,
            ticket_expires_in,
            failover: failover.iter().map(|r| (*r).to_owned()).collect(),
        },
    ))
}
