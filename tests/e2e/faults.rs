//! Faults: PostgreSQL stopped or killed under load, and a `UserSession`
//! Durable Object throwing part way through a device registration. Each checks
//! that every acknowledged write is durable and visible, that nothing is
//! applied twice, that the device limit holds, that the object's view agrees
//! with the database, and that retrying what failed completes it.
//!
//! Tests that break PostgreSQL, or make the Worker panic, start a stack of their own. The object faults
//! are injected through the development-only `x-keenvpn-fault` header (see
//! `src/edge/fault.rs`) on the shared stack.

use crate::common::*;
use crate::devices::make_plus_at;
use crate::harness::{Ctx, Test};
use crate::support::{DB_NAME, Stack, eventually};
use futures::StreamExt as _;
use keenvpn_edge::domain::entitlement::Status;
use keenvpn_edge::domain::stripe::{self, Example};
use libtest_mimic::Failed;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const TESTS: &[(&str, Test)] = &[
    (
        "faults::postgres_stopped_signup_and_registration_answer_503_fast_and_recover",
        postgres_stopped,
    ),
    (
        "faults::postgres_killed_mid_registrations_loses_nothing_and_keeps_the_limit",
        postgres_killed_mid_registrations,
    ),
    (
        "faults::postgres_killed_mid_webhooks_loses_nothing_and_applies_once",
        postgres_killed_mid_webhooks,
    ),
    (
        "faults::an_object_throwing_mid_registration_leaves_no_half_state",
        object_throws_mid_registration,
    ),
    (
        "faults::a_registration_cut_short_reaches_the_connect_path_without_a_retry",
        registration_cut_short_is_repaired,
    ),
    (
        "faults::after_a_delete_cut_short_a_registration_is_not_answered_from_stale_records",
        delete_cut_short_then_register,
    ),
    (
        "faults::after_a_delete_cut_short_a_registration_waits_for_other_device_operations_to_read_its_records_again",
        delete_cut_short_then_register_while_busy,
    ),
    (
        "faults::a_delete_retried_after_a_cut_short_first_attempt_is_204",
        delete_cut_short_then_retried,
    ),
    (
        "faults::a_panic_is_followed_by_a_fresh_wasm_instance",
        a_panic_is_followed_by_a_fresh_instance,
    ),
];

/// A request that must not hang while PostgreSQL is down answers within this.
const BOUNDED: Duration = Duration::from_secs(15);

async fn pg(stack: &Stack) -> tokio_postgres::Client {
    keenvpn_edge::db::connect(&stack.pg.url(DB_NAME))
        .await
        .expect("database")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// One device registration: its user, `Idempotency-Key` and body.
struct Reg {
    user: usize,
    key: String,
    body: Value,
}

async fn register(ctx: &Ctx, base: &str, access: &str, reg: &Reg, fault: Option<&str>) -> Resp {
    let mut headers = vec![("idempotency-key", reg.key.as_str())];
    if let Some(f) = fault {
        headers.push(("x-keenvpn-fault", f));
    }
    send_to(
        ctx,
        base,
        "POST",
        "/v1/devices",
        Some(reg.body.clone()),
        Some(access),
        &headers,
    )
    .await
}

/// Retries `reg` (same key, same body) until it gets a final answer, as a
/// client would: 503 (the database or the object) and 409 in flight are
/// retried, at most for `within`.
async fn retry_until_final(
    ctx: &Ctx,
    base: &str,
    access: &str,
    reg: &Reg,
    within: Duration,
) -> Resp {
    let deadline = Instant::now() + within;
    loop {
        let r = register(ctx, base, access, reg, None).await;
        let transient =
            r.status == 503 || (r.status == 409 && r.body["code"] == "idempotency_key_in_flight");
        if !transient || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The user's devices in PostgreSQL: id -> public key.
async fn devices_in_db(db: &tokio_postgres::Client, user_id: &str) -> BTreeMap<String, String> {
    db.query(
        "SELECT id::text, public_key FROM devices WHERE user_id = $1::text::uuid",
        &[&user_id],
    )
    .await
    .expect("devices query")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The user's devices in the object's KV mirror (what the connect path reads).
fn devices_in_mirror(stack: &Stack, user_id: &str) -> BTreeMap<String, String> {
    let Some(text) = stack.wrangler.kv_get(&format!("devices/{user_id}")) else {
        return BTreeMap::new();
    };
    let mirror: Value = serde_json::from_str(&text).expect("mirror is JSON");
    mirror["devices"]
        .as_array()
        .expect("mirror devices")
        .iter()
        .map(|d| (s(&d["id"]).to_owned(), s(&d["public_key"]).to_owned()))
        .collect()
}

/// [`devices_in_mirror`] for several users at once (each read runs the
/// wrangler CLI, which takes seconds).
fn mirrors(stack: &Stack, user_ids: &[String]) -> Vec<BTreeMap<String, String>> {
    std::thread::scope(|scope| {
        let reads: Vec<_> = user_ids
            .iter()
            .map(|u| scope.spawn(move || devices_in_mirror(stack, u)))
            .collect();
        reads
            .into_iter()
            .map(|r| r.join().expect("mirror read"))
            .collect()
    })
}

/// The user's devices as the API lists them: id -> public key.
async fn devices_in_api(ctx: &Ctx, base: &str, access: &str) -> BTreeMap<String, String> {
    let r = send_to(ctx, base, "GET", "/v1/devices", None, Some(access), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (s(&d["id"]).to_owned(), s(&d["public_key"]).to_owned()))
        .collect()
}

/// How many backends wait on a lock: requests parked inside PostgreSQL.
async fn lock_waiters(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// How the kill landed.
struct Kill {
    /// Requests acknowledged (2xx) before PostgreSQL was killed.
    acked_before: usize,
    /// Requests started and not yet answered when it was.
    in_flight: usize,
}

/// Runs requests `0..n` in three waves and SIGKILLs PostgreSQL in the middle
/// of them: wave 0 first; wave 1 (whose rows the caller has locked, so they
/// park inside PostgreSQL mid-transaction) once `min_acked` of wave 0 are
/// acknowledged; wave 2 once `min_parked` backends wait on a lock; the kill
/// right after wave 2's first answer. Each step has a deadline, short enough
/// that parked statements are killed before they would time out (5 s) on
/// their own. Returns every answer and how the kill landed.
async fn kill_mid_flight<T, Fut>(
    stack: &mut Stack,
    observer: &tokio_postgres::Client,
    waves: &[u8],
    min_acked: usize,
    min_parked: i64,
    start: impl Fn(usize) -> Fut,
    acked: impl Fn(&T) -> bool,
) -> (Vec<T>, Kill)
where
    Fut: std::future::Future<Output = (usize, T)>,
{
    let mut pending = futures::stream::FuturesUnordered::new();
    let launch = |wave: u8, pending: &mut futures::stream::FuturesUnordered<Fut>| {
        for i in (0..waves.len()).filter(|&i| waves[i] == wave) {
            pending.push(start(i));
        }
        Instant::now()
    };
    let mut answers: Vec<Option<T>> = (0..waves.len()).map(|_| None).collect();
    let began = launch(0, &mut pending);
    let (mut parked_at, mut last_at) = (None, None);
    let mut kill: Option<Kill> = None;
    loop {
        if kill.is_none() {
            let answered = |wave: u8| {
                (0..waves.len())
                    .filter(|&i| waves[i] == wave && answers[i].is_some())
                    .count()
            };
            let acked_now = answers.iter().flatten().filter(|a| acked(a)).count();
            if parked_at.is_none()
                && (acked_now >= min_acked || began.elapsed() > Duration::from_secs(20))
            {
                parked_at = Some(launch(1, &mut pending));
            }
            if let Some(at) = parked_at
                && last_at.is_none()
                && (lock_waiters(observer).await >= min_parked
                    || at.elapsed() > Duration::from_secs(2))
            {
                last_at = Some(launch(2, &mut pending));
            }
            if let Some(at) = last_at
                && (answered(2) >= 1 || at.elapsed() > Duration::from_secs(1))
            {
                stack.pg.kill_server();
                kill = Some(Kill {
                    acked_before: acked_now,
                    // Every wave has been started by now.
                    in_flight: answers.iter().filter(|a| a.is_none()).count(),
                });
            }
        }
        match tokio::time::timeout(Duration::from_millis(20), pending.next()).await {
            Ok(Some((i, a))) => answers[i] = Some(a),
            Ok(None) if kill.is_some() => break,
            _ => {}
        }
    }
    let answers = answers.into_iter().map(|a| a.expect("answered")).collect();
    (answers, kill.expect("killed"))
}

// --- PostgreSQL stopped -----------------------------------------------------

fn postgres_stopped(ctx: &Ctx) -> Result<(), Failed> {
    let mut stack = Stack::start();
    let base = stack.wrangler.base_url.clone();
    let user = ctx.rt.block_on(new_user_at(ctx, &base));
    let reg = Reg {
        user: 0,
        key: unique("stopped-"),
        body: json!({"name": "laptop", "public_key": wg_key()}),
    };
    let email = unique_email();
    // The first catalogue read publishes the region catalogue to KV.
    let r = ctx
        .rt
        .block_on(send_to(ctx, &base, "GET", "/v1/regions", None, None, &[]));
    assert_eq!(r.status, 200);

    stack.pg.stop_server();
    ctx.rt.block_on(async {
        let bounded = |r: &Resp, started: Instant, what: &str| {
            assert_eq!(r.status, 503, "{what}: {}", r.body);
            assert_eq!(r.body["code"], "service_unavailable", "{what}");
            let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
            // The default, spread so refused clients do not return together.
            assert!((5..=10).contains(&retry), "{what}: Retry-After {retry}");
            assert!(
                started.elapsed() < BOUNDED,
                "{what} answered after {:?}",
                started.elapsed()
            );
        };
        let signup = json!({"email": email, "password": PASSWORD});
        let started = Instant::now();
        let r = send_to(
            ctx,
            &base,
            "POST",
            "/v1/auth/signup",
            Some(signup.clone()),
            None,
            &[],
        )
        .await;
        bounded(&r, started, "signup");
        let started = Instant::now();
        let r = register(ctx, &base, &user.access, &reg, None).await;
        bounded(&r, started, "device registration");
        // Several at once: none hangs, none is half done. (The free plan has
        // one slot: while one of them holds its reservation, the others may
        // be refused at the limit without reaching the database.)
        let started = Instant::now();
        let many = futures::future::join_all((0..4).map(|_| async {
            let other = Reg {
                user: 0,
                key: unique("stopped-"),
                body: json!({"name": "phone", "public_key": wg_key()}),
            };
            register(ctx, &base, &user.access, &other, None).await
        }))
        .await;
        let mut unavailable = 0;
        for r in &many {
            if r.status == 403 {
                assert_eq!(r.body["code"], "device_limit_reached");
            } else {
                bounded(r, started, "concurrent registration");
                unavailable += 1;
            }
        }
        assert!(unavailable >= 1, "at least one reached the database");
        assert!(started.elapsed() < BOUNDED);
        // What needs no database still works.
        let r = send_to(ctx, &base, "GET", "/v1/regions", None, None, &[]).await;
        assert_eq!(r.status, 200, "the catalogue comes from KV");
    });

    // Back up, same worker: everything recovers, and nothing the failed
    // requests started is left behind.
    stack.pg.start_server();
    ctx.rt.block_on(async {
        let r = eventually(Duration::from_secs(30), "signup after restart", || async {
            let r = send_to(
                ctx,
                &base,
                "POST",
                "/v1/auth/signup",
                Some(json!({"email": email, "password": PASSWORD})),
                None,
                &[],
            )
            .await;
            (r.status != 503).then_some(r)
        })
        .await;
        assert_eq!(
            r.status, 201,
            "the failed signup created nothing: {}",
            r.body
        );
        let login = json!({"email": user.email, "password": PASSWORD});
        let r = send_to(ctx, &base, "POST", "/v1/auth/login", Some(login), None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        // The free plan allows one device: the failed attempts left no
        // reservation and no in-flight key behind, so the retry succeeds at once.
        let r = register(ctx, &base, &user.access, &reg, None).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let db = pg(&stack).await;
        let in_db = devices_in_db(&db, &user.id).await;
        assert_eq!(in_db.len(), 1, "one device: {in_db:?}");
        assert_eq!(
            in_db.get(s(&r.body["id"])),
            reg.body["public_key"].as_str().map(str::to_owned).as_ref()
        );
        let replay = register(ctx, &base, &user.access, &reg, None).await;
        assert_eq!((replay.status, &replay.body), (201, &r.body));
        assert_eq!(devices_in_mirror(&stack, &user.id), in_db);
        let r = send_to(ctx, &base, "GET", "/readyz", None, None, &[]).await;
        assert_eq!(r.status, 200);
    });
    Ok(())
}

// --- PostgreSQL killed mid-registrations -------------------------------------

/// Four Plus users (limit 5) each register 8 devices at once, every request
/// with its own `Idempotency-Key`, in the waves of [`kill_mid_flight`]: the
/// first user's; then the second and third users', whose rows the test has
/// locked so their inserts park inside PostgreSQL mid-transaction; then the
/// fourth user's, and PostgreSQL is killed at its first answer, with the
/// parked inserts and most of the last wave's in flight.
fn postgres_killed_mid_registrations(ctx: &Ctx) -> Result<(), Failed> {
    const USERS: usize = 4;
    const PER_USER: usize = 8;
    const LIMIT: usize = 5;
    let mut stack = Stack::start();
    let base = stack.wrangler.base_url.clone();
    let (users, regs) = ctx.rt.block_on(async {
        let db = pg(&stack).await;
        let mut users = Vec::new();
        for _ in 0..USERS {
            let mut u = new_user_at(ctx, &base).await;
            make_plus_at(ctx, &base, &db, &mut u).await;
            users.push(u);
        }
        let regs: Vec<Reg> = (0..USERS * PER_USER)
            .map(|i| Reg {
                user: i % USERS,
                key: unique("kill-"),
                body: json!({"name": format!("dev-{i}"), "public_key": wg_key()}),
            })
            .collect();
        (users, regs)
    });

    let (answers, kill) = ctx.rt.block_on(async {
        let observer = pg(&stack).await;
        let mut locker = pg(&stack).await;
        let tx = locker.transaction().await.unwrap();
        let parked: Vec<&str> = users[1..3].iter().map(|u| u.id.as_str()).collect();
        tx.execute(
            "SELECT 1 FROM users WHERE id = ANY($1::text[]::uuid[]) FOR UPDATE",
            &[&parked],
        )
        .await
        .unwrap();
        // Wave 0: the first user; 1: the two locked users; 2: the last.
        let waves: Vec<u8> = regs
            .iter()
            .map(|r| match r.user {
                0 => 0,
                1 | 2 => 1,
                _ => 2,
            })
            .collect();
        let base = &base;
        let (users, regs) = (&users, &regs);
        let start = |i: usize| async move {
            let reg = &regs[i];
            (
                i,
                register(ctx, base, &users[reg.user].access, reg, None).await,
            )
        };
        let acked = |r: &Resp| (200..300).contains(&r.status);
        let out = kill_mid_flight(&mut stack, &observer, &waves, 2, 4, start, acked).await;
        drop(tx);
        out
    });

    let count = |f: &dyn Fn(&Resp) -> bool| answers.iter().filter(|r| f(r)).count();
    let ok = count(&|r| matches!(r.status, 200 | 201));
    let failed = count(&|r| r.status >= 500);
    let refused = count(&|r| r.status == 403);
    eprintln!(
        "registrations under the kill: {} sent, {} in flight at the kill, {ok} acknowledged ({} before the kill), {refused} refused at the limit, {failed} failed",
        answers.len(),
        kill.in_flight,
        kill.acked_before
    );
    for r in &answers {
        assert!(
            matches!(r.status, 200 | 201 | 403 | 503),
            "only success, the limit or 503: {} {}",
            r.status,
            r.body
        );
    }
    assert!(
        kill.acked_before >= 2,
        "registrations were acknowledged before the kill"
    );
    assert!(
        kill.in_flight >= 4 && failed >= 4,
        "the kill landed while registrations were in flight (at least the parked ones)"
    );

    stack.pg.start_server();
    ctx.rt.block_on(async {
        let db = pg(&stack).await;
        // Every acknowledged registration is durable, with the key it was sent.
        for (reg, r) in regs.iter().zip(&answers) {
            if matches!(r.status, 200 | 201) {
                let in_db = devices_in_db(&db, &users[reg.user].id).await;
                assert_eq!(
                    in_db.get(s(&r.body["id"])).map(String::as_str),
                    reg.body["public_key"].as_str(),
                    "acknowledged device {} is in PostgreSQL",
                    r.body["id"]
                );
            }
        }
        for u in &users {
            let n = devices_in_db(&db, &u.id).await.len();
            assert!(n <= LIMIT, "the limit held through the crash: {n}");
        }

        // Retries of everything that failed, as the client would; replays of
        // everything that succeeded.
        let mut finals: Vec<Resp> = Vec::new();
        for (reg, r) in regs.iter().zip(&answers) {
            let access = &users[reg.user].access;
            let again = retry_until_final(ctx, &base, access, reg, Duration::from_secs(30)).await;
            match r.status {
                200 | 201 => assert_eq!(
                    (again.status, &again.body),
                    (r.status, &r.body),
                    "a replay answers what the first attempt answered"
                ),
                // A refusal is not remembered (the key was abandoned): sent
                // again it runs again, and a slot that a failed request held
                // when it was refused may be free now.
                _ => assert!(
                    matches!(again.status, 200 | 201 | 403),
                    "a retry after the restart completes: {} {}",
                    again.status,
                    again.body
                ),
            }
            finals.push(again);
        }

        let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
        let mirrored = mirrors(&stack, &ids);
        for (n, u) in users.iter().enumerate() {
            let in_db = devices_in_db(&db, &u.id).await;
            let mine: Vec<(&Reg, &Resp)> = regs
                .iter()
                .zip(&finals)
                .filter(|(reg, _)| reg.user == n)
                .collect();
            let succeeded: BTreeMap<String, String> = mine
                .iter()
                .filter(|(_, r)| matches!(r.status, 200 | 201))
                .map(|(reg, r)| {
                    (
                        s(&r.body["id"]).to_owned(),
                        s(&reg.body["public_key"]).to_owned(),
                    )
                })
                .collect();
            let refused = mine.iter().filter(|(_, r)| r.status == 403).count();
            // Exactly the limit: every request either has its device, once,
            // or was refused because the other five exist.
            assert_eq!(in_db.len(), LIMIT, "user {n}: {in_db:?}");
            assert_eq!(
                succeeded, in_db,
                "user {n}: one device per successful request, no other"
            );
            assert_eq!(refused, PER_USER - LIMIT, "user {n}");
            // The object's view agrees with the database...
            assert_eq!(mirrored[n], in_db, "user {n}: the KV mirror");
            assert_eq!(
                devices_in_api(ctx, &base, &u.access).await,
                in_db,
                "user {n}: the API"
            );
            // ...and so does its ledger: full now, one slot after a delete.
            let extra = Reg {
                user: n,
                key: unique("extra-"),
                body: json!({"name": "extra", "public_key": wg_key()}),
            };
            assert_eq!(
                register(ctx, &base, &u.access, &extra, None).await.status,
                403,
                "user {n}"
            );
            let victim = in_db.keys().next().unwrap();
            let del = send_to(
                ctx,
                &base,
                "DELETE",
                &format!("/v1/devices/{victim}"),
                None,
                Some(&u.access),
                &[],
            )
            .await;
            assert_eq!(del.status, 204);
            let extra = Reg {
                user: n,
                key: unique("extra-"),
                body: json!({"name": "extra", "public_key": wg_key()}),
            };
            assert_eq!(
                register(ctx, &base, &u.access, &extra, None).await.status,
                201,
                "user {n}: the freed slot"
            );
        }
    });
    Ok(())
}

// --- PostgreSQL killed mid-webhooks ------------------------------------------

struct Billing {
    user: User,
    event: String,
    created: i64,
    body: Vec<u8>,
}

async fn deliver(ctx: &Ctx, base: &str, body: &[u8]) -> (u16, Value) {
    let secret = dev_var("STRIPE_WEBHOOK_SECRET");
    let resp = ctx
        .http
        .post(format!("{base}/v1/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("stripe-signature", stripe::sign(&secret, now(), body))
        .body(body.to_vec())
        .send()
        .await;
    match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({"transport": e.to_string()})),
    }
}

/// Eight users each get a Plus subscription by webhook, every event delivered
/// three times at once, in the waves of [`kill_mid_flight`]: three users'
/// events; then three whose existing (incomplete) subscription rows the test
/// has locked, so they park inside PostgreSQL; then two more, and PostgreSQL
/// is killed at their first answer. Then every event that got no 2xx is
/// redelivered, as Stripe does, and every event once more (a provider may
/// redeliver anything).
fn postgres_killed_mid_webhooks(ctx: &Ctx) -> Result<(), Failed> {
    const USERS: usize = 8;
    // Waves (see `kill_mid_flight`): users 0..3, then the parked 3..6, then 6..8.
    let wave = |n: usize| match n {
        0..3 => 0u8,
        3..6 => 1,
        _ => 2,
    };
    const COPIES: usize = 3;
    let mut stack = Stack::start();
    let base = stack.wrangler.base_url.clone();
    let billing: Vec<Billing> = ctx.rt.block_on(async {
        let db = pg(&stack).await;
        let mut out = Vec::new();
        for n in 0..USERS {
            let user = new_user_at(ctx, &base).await;
            let (sub, customer, event) = (unique("sub_"), unique("cus_"), unique("evt_"));
            if wave(n) == 1 {
                db.execute(
                    "INSERT INTO subscriptions (user_id, plan_id, status, current_period_end,
                         provider_customer_id, provider_subscription_id, provider_event_at)
                     VALUES ($1::text::uuid, 'plus', 'incomplete', now() + interval '30 days',
                             $2, $3, now() - interval '1 hour')",
                    &[&user.id, &customer, &sub],
                )
                .await
                .unwrap();
            }
            let created = now() - 60;
            let ex = Example {
                event_id: &event,
                created,
                subscription_id: &sub,
                customer_id: &customer,
                user_id: &user.id,
                plan_id: "plus",
                status: Status::Active,
                current_period_end: now() + 30 * 86400,
                cancel_at_period_end: false,
            };
            let kind = if wave(n) == 1 {
                "customer.subscription.updated"
            } else {
                "customer.subscription.created"
            };
            let body = serde_json::to_vec(&stripe::example_event(kind, &ex)).unwrap();
            out.push(Billing {
                user,
                event,
                created,
                body,
            });
        }
        out
    });

    let (answers, kill) = ctx.rt.block_on(async {
        let observer = pg(&stack).await;
        let mut locker = pg(&stack).await;
        let tx = locker.transaction().await.unwrap();
        let parked: Vec<&str> = (0..USERS)
            .filter(|&n| wave(n) == 1)
            .map(|n| billing[n].user.id.as_str())
            .collect();
        tx.execute(
            "SELECT 1 FROM subscriptions WHERE user_id = ANY($1::text[]::uuid[]) FOR UPDATE",
            &[&parked],
        )
        .await
        .unwrap();
        let deliveries: Vec<usize> = (0..COPIES).flat_map(|_| 0..USERS).collect();
        let waves: Vec<u8> = deliveries.iter().map(|&b| wave(b)).collect();
        let (base, billing, deliveries) = (&base, &billing, &deliveries);
        let start = |i: usize| async move {
            let b = deliveries[i];
            let (status, body) = deliver(ctx, base, &billing[b].body).await;
            (i, (b, status, body))
        };
        let acked = |a: &(usize, u16, Value)| a.1 == 200;
        let out = kill_mid_flight(&mut stack, &observer, &waves, 3, 3, start, acked).await;
        drop(tx);
        out
    });
    let ok = answers.iter().filter(|(_, st, _)| *st == 200).count();
    let failed = answers.iter().filter(|(_, st, _)| *st != 200).count();
    eprintln!(
        "webhook deliveries under the kill: {} sent, {} in flight at the kill, {ok} acknowledged ({} before the kill), {failed} failed",
        answers.len(),
        kill.in_flight,
        kill.acked_before
    );
    assert!(
        kill.acked_before >= 3,
        "deliveries were acknowledged before the kill"
    );
    assert!(
        kill.in_flight >= 3 && failed >= 3,
        "the kill landed while deliveries were in flight (at least the parked ones)"
    );
    for (_, status, body) in &answers {
        assert!(
            matches!(status, 200 | 503),
            "only 200 or 503: {status} {body}"
        );
    }

    stack.pg.start_server();
    ctx.rt.block_on(async {
        let db = pg(&stack).await;
        // Acknowledged deliveries are durable.
        for (b, status, _) in &answers {
            if *status == 200 {
                let n: i64 = db
                    .query_one(
                        "SELECT count(*) FROM webhook_events WHERE id = $1",
                        &[&billing[*b].event],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, 1, "acknowledged event {} is recorded", billing[*b].event);
            }
        }
        // The provider redelivers whatever did not get a 2xx; then once more
        // everything (a provider may redeliver anything).
        let mut all = answers.clone();
        for (n, b) in billing.iter().enumerate() {
            if !answers.iter().any(|(i, st, _)| *i == n && *st == 200) {
                let (status, body) =
                    eventually(Duration::from_secs(30), "redelivery accepted", || async {
                        let (st, body) = deliver(ctx, &base, &b.body).await;
                        (st == 200).then_some((st, body))
                    })
                    .await;
                all.push((n, status, body));
            }
        }
        for (n, b) in billing.iter().enumerate() {
            let (status, body) = deliver(ctx, &base, &b.body).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body["duplicate"], true,
                "an applied event is a duplicate now: {body}"
            );
            assert_eq!(body["applied"], false, "{body}");
            all.push((n, status, body));
        }
        for (n, b) in billing.iter().enumerate() {
            let applied = all
                .iter()
                .filter(|(i, _, body)| *i == n && body["applied"] == true)
                .count();
            assert!(applied <= 1, "event {} applied {applied} times", b.event);
            let row = db
                .query_one(
                    "SELECT (SELECT count(*) FROM webhook_events WHERE id = $1),
                            s.plan_id, s.status, extract(epoch FROM s.provider_event_at)::bigint
                     FROM subscriptions s WHERE s.user_id = $2::text::uuid",
                    &[&b.event, &b.user.id],
                )
                .await
                .unwrap();
            let (recorded, plan, status, at): (i64, String, String, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert_eq!(recorded, 1, "event {} recorded once", b.event);
            assert_eq!(
                (plan.as_str(), status.as_str(), at),
                ("plus", "active", b.created),
                "user {n}"
            );
            // The user's object got the change: the next refresh carries Plus,
            // and the entitlement cache it writes says five devices.
            let mut user = User {
                id: b.user.id.clone(),
                email: b.user.email.clone(),
                access: b.user.access.clone(),
                refresh: b.user.refresh.clone(),
            };
            let c = user.refresh_at(ctx, &base).await;
            assert_eq!(
                (c["ent"]["plan"].as_str(), c["ent"]["max_devices"].as_u64()),
                (Some("plus"), Some(5)),
                "user {n}"
            );
            let list = send_to(
                ctx,
                &base,
                "GET",
                "/v1/devices",
                None,
                Some(&user.access),
                &[],
            )
            .await;
            assert_eq!(list.body["max_devices"], 5, "user {n}: {}", list.body);
        }
    });
    Ok(())
}

// --- a Durable Object throwing mid-operation ---------------------------------

/// A Plus user (five devices) per case registers with a fault at one point of
/// the object's registration, then retries as a client would. The cases run
/// at once, on the shared stack. (Plus, not free: with a free slot left the
/// retry's insert reaches the key's uniqueness, which is where a committed
/// but unacknowledged row used to turn into a conflict.)
fn object_throws_mid_registration(ctx: &Ctx) -> Result<(), Failed> {
    const CASES: [(&str, bool, bool); 4] = [
        // (fault point, with an Idempotency-Key, the row is committed by then)
        ("device.after_reserve", true, false),
        ("device.after_insert", true, true),
        ("device.after_insert", false, true),
        ("device.after_confirm", true, true),
    ];
    let stack = ctx.stack();
    let base = stack.wrangler.base_url.clone();
    let base = base.as_str();
    ctx.rt.block_on(async {
        let db = keenvpn_edge::db::connect(&stack.pg.url(DB_NAME))
            .await
            .expect("database");
        let db = &db;
        let outcomes = futures::future::join_all(CASES.iter().map(
            |&(point, with_key, committed)| async move {
                let what = format!("{point} (idempotency key: {with_key})");
                let mut user = new_user_at(ctx, base).await;
                make_plus_at(ctx, base, db, &mut user).await;
                let reg = Reg {
                    user: 0,
                    key: unique("crash-"),
                    body: json!({"name": "laptop", "public_key": wg_key()}),
                };
                let send = |fault: Option<&'static str>| {
                    let (access, reg) = (&user.access, &reg);
                    async move {
                        if with_key {
                            return register(ctx, base, access, reg, fault).await;
                        }
                        let headers: Vec<(&str, &str)> = fault
                            .map(|f| vec![("x-keenvpn-fault", f)])
                            .unwrap_or_default();
                        let body = Some(reg.body.clone());
                        send_to(
                            ctx,
                            base,
                            "POST",
                            "/v1/devices",
                            body,
                            Some(access),
                            &headers,
                        )
                        .await
                    }
                };
                let crashed = send(Some(point)).await;
                assert_eq!(crashed.status, 503, "{what}: {}", crashed.body);
                assert!(crashed.headers.contains_key("retry-after"), "{what}");
                let in_db = devices_in_db(db, &user.id).await;
                assert_eq!(in_db.len(), usize::from(committed), "{what}: {in_db:?}");

                // The retry completes at once: no in-flight key, no
                // reservation holding a slot, no conflict with its own
                // committed row.
                let retry = send(None).await;
                let expected = if point == "device.after_insert" {
                    200
                } else {
                    201
                };
                assert_eq!(retry.status, expected, "{what}: {}", retry.body);
                let in_db = devices_in_db(db, &user.id).await;
                assert_eq!(in_db.len(), 1, "{what}: applied once");
                assert_eq!(
                    in_db.get(s(&retry.body["id"])).map(String::as_str),
                    reg.body["public_key"].as_str(),
                    "{what}"
                );
                let again = send(None).await;
                assert_eq!(again.body["id"], retry.body["id"], "{what}: a second retry");
                assert_eq!(
                    devices_in_api(ctx, base, &user.access).await,
                    in_db,
                    "{what}: the API"
                );
                (what, user, in_db)
            },
        ))
        .await;

        // The object's view agrees with the database.
        let ids: Vec<String> = outcomes.iter().map(|(_, u, _)| u.id.clone()).collect();
        for ((what, _, in_db), mirror) in outcomes.iter().zip(mirrors(stack, &ids)) {
            assert_eq!(&mirror, in_db, "{what}: the KV mirror");
        }

        // The ledger counts the device exactly once and holds no other slot:
        // four more fit, a sixth is refused, and a delete frees one.
        futures::future::join_all(outcomes.iter().map(|(what, user, in_db)| async move {
            let extra = || Reg {
                user: 0,
                key: unique("crash-extra-"),
                body: json!({"name": "phone", "public_key": wg_key()}),
            };
            for _ in 0..4 {
                let r = register(ctx, base, &user.access, &extra(), None).await;
                assert_eq!(r.status, 201, "{what}: {}", r.body);
            }
            let r = register(ctx, base, &user.access, &extra(), None).await;
            assert_eq!(r.status, 403, "{what}: {}", r.body);
            let id = in_db.keys().next().unwrap();
            let path = format!("/v1/devices/{id}");
            let del = send_to(ctx, base, "DELETE", &path, None, Some(&user.access), &[]).await;
            assert_eq!(del.status, 204, "{what}");
            let r = register(ctx, base, &user.access, &extra(), None).await;
            assert_eq!(r.status, 201, "{what}: {}", r.body);
        }))
        .await;

        // A point the object does not know changes nothing.
        let user = new_user_at(ctx, base).await;
        let reg = Reg {
            user: 0,
            key: unique("crash-"),
            body: json!({"name": "x", "public_key": wg_key()}),
        };
        let r = register(ctx, base, &user.access, &reg, Some("no.such.point")).await;
        assert_eq!(r.status, 201, "{}", r.body);
    });
    Ok(())
}

/// A registration whose object throws after PostgreSQL committed the device,
/// and that the client never retries: the alarm the operation armed before it
/// wrote anything reads the user's devices from PostgreSQL again (this
/// instance did not see the operation through), and the device reaches the
/// connect path within about 30 s. Before, the object never learnt of it
/// until a retry or the user's next device change.
fn registration_cut_short_is_repaired(ctx: &Ctx) -> Result<(), Failed> {
    let stack = ctx.stack();
    let base = stack.wrangler.base_url.as_str();
    ctx.rt.block_on(async {
        let db = keenvpn_edge::db::connect(&stack.pg.url(DB_NAME)).await?;
        let user = new_user_at(ctx, base).await;
        let body = json!({"name": "laptop", "public_key": wg_key()});
        let fault = [("x-keenvpn-fault", "device.after_insert")];
        let crashed = send_to(
            ctx,
            base,
            "POST",
            "/v1/devices",
            Some(body),
            Some(&user.access),
            &fault,
        )
        .await;
        assert_eq!(crashed.status, 503, "{}", crashed.body);
        let in_db = devices_in_db(&db, &user.id).await;
        assert_eq!(in_db.len(), 1, "committed: {in_db:?}");
        let id = in_db.keys().next().cloned().unwrap_or_default();
        let connect = || {
            let id = id.clone();
            let access = user.access.clone();
            async move {
                let location = [("x-keenvpn-client-location", "51.5,-0.13")];
                let body = Some(json!({"device_id": id}));
                send_to(
                    ctx,
                    base,
                    "POST",
                    "/v1/connect",
                    body,
                    Some(&access),
                    &location,
                )
                .await
            }
        };
        let before = connect().await;
        assert_eq!(
            before.status, 404,
            "not yet known to the object: {}",
            before.body
        );
        eventually(
            Duration::from_secs(60),
            "the committed device reaching the connect path",
            || async { (connect().await.status == 200).then_some(()) },
        )
        .await;
        Ok(())
    })
}

/// A delete whose object throws after PostgreSQL deleted the device (the
/// client gets a 503) leaves the object's records holding it until they are
/// settled again. A registration within that window must not be answered from
/// them. Two free users (one device each), at once:
/// - one registers the deleted device's key again: a new device (201), not
///   the deleted one "already registered" (200), which the connect path would
///   then refuse;
/// - the other registers another key: it fits (201), not refused for a limit
///   that the deleted device no longer takes up.
///
/// Both within seconds of the delete, well before the alarm (30 s) would
/// settle the records.
fn delete_cut_short_then_register(ctx: &Ctx) -> Result<(), Failed> {
    let stack = ctx.stack();
    let base = stack.wrangler.base_url.as_str();
    ctx.rt.block_on(async {
        let db = pg(stack).await;
        let db = &db;
        let same_key = |again: bool| async move {
            let what = if again { "the same key" } else { "another key" };
            let user = new_user_at(ctx, base).await;
            let first = Reg {
                user: 0,
                key: unique("cut-"),
                body: json!({"name": "laptop", "public_key": wg_key()}),
            };
            let made = register(ctx, base, &user.access, &first, None).await;
            assert_eq!(made.status, 201, "{what}: {}", made.body);
            let old_id = s(&made.body["id"]).to_owned();
            let path = format!("/v1/devices/{old_id}");
            let fault = [("x-keenvpn-fault", "device.after_delete")];
            let cut = send_to(ctx, base, "DELETE", &path, None, Some(&user.access), &fault).await;
            assert_eq!(cut.status, 503, "{what}: {}", cut.body);
            assert!(
                devices_in_db(db, &user.id).await.is_empty(),
                "{what}: deleted"
            );

            let key = if again {
                first.body["public_key"].clone()
            } else {
                json!(wg_key())
            };
            let next = Reg {
                user: 0,
                key: unique("cut-"),
                body: json!({"name": "phone", "public_key": key}),
            };
            let r = register(ctx, base, &user.access, &next, None).await;
            assert_eq!(r.status, 201, "{what}: {}", r.body);
            assert_ne!(r.body["id"], old_id.as_str(), "{what}");
            let in_db = devices_in_db(db, &user.id).await;
            assert_eq!(
                in_db.get(s(&r.body["id"])).map(String::as_str),
                key.as_str(),
                "{what}: {in_db:?}"
            );
            assert_eq!(in_db.len(), 1, "{what}: {in_db:?}");
            assert_eq!(
                devices_in_api(ctx, base, &user.access).await,
                in_db,
                "{what}"
            );
        };
        futures::future::join(same_key(true), same_key(false)).await;
        Ok(())
    })
}

/// As above, while another registration of the user's is under way (its
/// insert held in PostgreSQL on another user's uncommitted row with its
/// key). The records are not read again while a device operation runs, and
/// the registration of the deleted device's key was answered from them: 200
/// with the deleted device, kept under its `Idempotency-Key` for a day. It
/// now waits for the other operation to end, reads the records again, and
/// registers a new device (201).
fn delete_cut_short_then_register_while_busy(ctx: &Ctx) -> Result<(), Failed> {
    let stack = ctx.stack();
    let base = stack.wrangler.base_url.as_str();
    ctx.rt.block_on(async {
        let db = pg(stack).await;
        let mut blocker = pg(stack).await;
        let mut user = new_user_at(ctx, base).await;
        make_plus_at(ctx, base, &db, &mut user).await;
        let reg = |name: &str, key: &str| Reg {
            user: 0,
            key: unique("busy-"),
            body: json!({"name": name, "public_key": key}),
        };
        let key = wg_key();
        let made = register(ctx, base, &user.access, &reg("laptop", &key), None).await;
        assert_eq!(made.status, 201, "{}", made.body);
        let old_id = s(&made.body["id"]).to_owned();
        let fault = [("x-keenvpn-fault", "device.after_delete")];
        let path = format!("/v1/devices/{old_id}");
        let cut = send_to(ctx, base, "DELETE", &path, None, Some(&user.access), &fault).await;
        assert_eq!(cut.status, 503, "{}", cut.body);

        let other = new_user_at(ctx, base).await;
        let held = wg_key();
        let tx = blocker.transaction().await?;
        tx.execute(
            "INSERT INTO devices (user_id, name, public_key, ipv4_address, ipv6_address)
             VALUES ($1::text::uuid, 'Blocker', $2, '10.127.255.249', 'fd4b:6565:6e00::3f:fff9')",
            &[&other.id, &held],
        )
        .await?;
        let (tablet_reg, laptop_reg) = (reg("tablet", &held), reg("laptop", &key));
        let tablet = register(ctx, base, &user.access, &tablet_reg, None);
        let again = async {
            // The tablet's insert is under way, waiting on the row above.
            tokio::time::sleep(Duration::from_millis(700)).await;
            let release = async {
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                tx.rollback().await.expect("rollback");
            };
            let (r, ()) = tokio::join!(
                register(ctx, base, &user.access, &laptop_reg, None),
                release
            );
            r
        };
        let (tablet, again) = tokio::join!(tablet, again);
        assert_eq!(tablet.status, 201, "{}", tablet.body);
        assert_eq!(again.status, 201, "{}", again.body);
        assert_ne!(again.body["id"], old_id.as_str());
        let in_db = devices_in_db(&db, &user.id).await;
        assert_eq!(in_db.len(), 2, "{in_db:?}");
        Ok(())
    })
}

/// A keyed delete whose first attempt deleted the device and then failed
/// (the user's object threw after PostgreSQL's delete: the answer was lost,
/// and no answer was recorded under the key) is retried under its key: it is
/// 204, as the README promises a retried delete is, and so is a replay of
/// that. It was 404: the retry's delete found nothing. So is one whose
/// object threw once it had recorded the removal. A device the user never
/// had is still 404.
fn delete_cut_short_then_retried(ctx: &Ctx) -> Result<(), Failed> {
    let stack = ctx.stack();
    let base = stack.wrangler.base_url.as_str();
    ctx.rt.block_on(async {
        let db = pg(stack).await;
        let user = new_user_at(ctx, base).await;
        // Cut after PostgreSQL's delete, before the object's records learn of
        // it; then cut later: the object recorded the removal, then threw (as
        // when it resets before answering). The removal and its key's answer
        // are recorded in one write, so the retry replays 204; recorded apart,
        // the key was left in flight, the retry ran again and found nothing
        // (404).
        for fault in ["device.after_delete", "device.after_apply"] {
            let reg = Reg {
                user: 0,
                key: unique("retried-"),
                body: json!({"name": "laptop", "public_key": wg_key()}),
            };
            let made = register(ctx, base, &user.access, &reg, None).await;
            assert_eq!(made.status, 201, "{fault}: {}", made.body);
            let path = format!("/v1/devices/{}", s(&made.body["id"]));
            let key = unique("delete-");
            let keyed = [("idempotency-key", key.as_str())];
            let cut = send_to(
                ctx,
                base,
                "DELETE",
                &path,
                None,
                Some(&user.access),
                &[keyed[0], ("x-keenvpn-fault", fault)],
            )
            .await;
            assert_eq!(cut.status, 503, "{fault}: {}", cut.body);
            assert!(
                devices_in_db(&db, &user.id).await.is_empty(),
                "{fault}: deleted"
            );
            for attempt in ["the retry", "its replay"] {
                let r = send_to(ctx, base, "DELETE", &path, None, Some(&user.access), &keyed).await;
                assert_eq!(r.status, 204, "{fault}, {attempt}: {}", r.body);
            }
        }
        let unknown = "/v1/devices/00000000-0000-4000-8000-000000000000";
        let r = send_to(ctx, base, "DELETE", unknown, None, Some(&user.access), &[]).await;
        assert_eq!(r.status, 404, "{}", r.body);
        Ok(())
    })
}

/// A panic aborts the wasm instance (`panic = "abort"`: the instance traps and
/// cannot run again). The request that panicked fails; every later request,
/// whatever its route, must be answered by a fresh instance, with the state
/// that outlives an instance (KV, Durable Objects, PostgreSQL) intact. The
/// entry module (`src/entry.mjs`) calls the generated handlers directly and
/// hands the first request after a trap to worker-build's recovery path.
fn a_panic_is_followed_by_a_fresh_instance(ctx: &Ctx) -> Result<(), Failed> {
    const RECOVERED: &str = "Reinitializing Wasm application";
    let stack = Stack::start();
    let base = stack.wrangler.base_url.clone();
    let base = base.as_str();
    ctx.rt.block_on(async {
        let mut user = new_user_at(ctx, base).await;
        let me = |access: String| async move {
            send_to(ctx, base, "GET", "/v1/me", None, Some(&access), &[]).await
        };
        assert_eq!(me(user.access.clone()).await.status, 200);
        assert!(!stack.wrangler.log().contains(RECOVERED));

        for round in 0..2 {
            let fault = [("x-keenvpn-fault", "worker.panic")];
            let panicked = send_to(ctx, base, "GET", "/readyz", None, None, &fault).await;
            assert!(
                panicked.status >= 500,
                "round {round}: the panicking request answered {}",
                panicked.status
            );
            // The next requests: the readiness probe, an authenticated read
            // (the session and entitlement from before the panic), and a
            // refresh (a write through the UserSession object).
            let ready = send_to(ctx, base, "GET", "/readyz", None, None, &[]).await;
            assert_eq!(ready.status, 200, "round {round}: {}", ready.body);
            let r = me(user.access.clone()).await;
            assert_eq!(r.status, 200, "round {round}: {}", r.body);
            assert_eq!(r.body["email"], user.email.as_str());
        }
        user.refresh_at(ctx, base).await;
    });
    let log = stack.wrangler.log();
    assert!(
        log.matches(RECOVERED).count() >= 2,
        "each panic is followed by a fresh instance: the log shows {} of 2",
        log.matches(RECOVERED).count()
    );
    Ok(())
}
