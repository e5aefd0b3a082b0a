//! Accounts, tokens and sessions, end to end.

use crate::common::{Resp, claims, fresh_ip, s, send, send_to, send_with, unique, unique_email};
use crate::harness::{Ctx, Test};
use crate::support::{DB_NAME, Stack, eventually};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use keenvpn_edge::domain::session::MAX_ACTIVE_SESSIONS;
use libtest_mimic::Failed;
use serde_json::{Value, json};
use std::time::Duration;

pub const TESTS: &[(&str, Test)] = &[
    (
        "auth::signup_returns_a_token_pair_and_me_shows_the_account",
        signup_and_me,
    ),
    (
        "auth::signup_twice_with_the_same_email_is_409",
        duplicate_signup,
    ),
    (
        "auth::spellings_of_one_address_and_one_password_are_one_account",
        unicode_spellings,
    ),
    (
        "auth::a_hash_of_the_typed_password_signs_in_and_is_replaced_by_one_of_its_nfkc_form",
        typed_hash_upgraded,
    ),
    (
        "auth::a_signup_whose_session_failed_can_be_retried",
        signup_retried,
    ),
    (
        "auth::a_retried_sign_up_under_its_key_gets_its_first_answer",
        keyed_signup,
    ),
    (
        "auth::password_guesses_through_a_keyed_sign_up_count_against_the_account",
        keyed_signup_guesses,
    ),
    (
        "auth::a_sign_up_cut_off_after_storing_the_account_is_201_when_retried",
        cut_signup_retried,
    ),
    (
        "auth::a_network_locked_for_sign_in_checks_no_password_by_a_keyed_sign_up",
        keyed_signup_from_a_locked_network,
    ),
    (
        "auth::a_retried_sign_in_under_its_key_opens_no_second_session",
        keyed_login,
    ),
    (
        "auth::a_sign_in_during_a_failed_sign_ups_undo_keeps_no_session",
        signin_during_undo,
    ),
    (
        "auth::a_sign_up_whose_keyed_retry_was_answered_is_not_undone",
        retry_answered_before_undo,
    ),
    (
        "auth::a_keyed_retry_while_a_failed_sign_up_is_undone_is_refused_then_signs_up_again",
        retry_during_undo,
    ),
    (
        "auth::a_sign_ups_undo_that_its_object_cannot_hold_keeps_the_account",
        undo_unknown_to_the_object,
    ),
    (
        "auth::refused_signing_keys_leave_no_account_and_count_no_attempt",
        keys_refused,
    ),
    (
        "auth::a_sign_in_failing_once_its_session_was_stored_leaves_the_sessions_as_they_were",
        unsigned_login,
    ),
    (
        "auth::a_keyed_retry_that_could_not_sign_keeps_the_session_the_first_answered",
        unsigned_keyed_retry,
    ),
    (
        "auth::a_missing_secret_answers_not_configured",
        missing_secrets,
    ),
    (
        "auth::the_demo_account_logs_in_with_its_plus_plan",
        demo_login,
    ),
    (
        "auth::unknown_email_and_wrong_password_look_the_same",
        unknown_vs_wrong,
    ),
    ("auth::bad_bodies_are_refused_and_write_nothing", bad_bodies),
    (
        "auth::a_chunked_body_is_refused_once_it_passes_the_limit",
        chunked_body_cut_off,
    ),
    (
        "auth::repeated_failures_are_throttled_and_recover",
        throttling,
    ),
    (
        "auth::guesses_elsewhere_do_not_lock_the_owner_out_from_a_network_it_signed_in_from",
        known_network,
    ),
    (
        "auth::the_client_throttle_counts_an_ipv6_slash_64_as_one_client",
        network_throttle,
    ),
    (
        "auth::sign_ups_are_limited_per_client_network",
        sign_up_throttle,
    ),
    (
        "auth::sign_ups_the_database_refused_are_given_back_to_the_network",
        refused_sign_ups_given_back,
    ),
    (
        "auth::a_locked_network_locks_no_account_it_names",
        locked_network_spares_accounts,
    ),
    (
        "auth::a_sign_in_both_throttles_refuse_is_told_to_wait_out_the_later_lock",
        both_locked,
    ),
    (
        "auth::refresh_rotates_and_a_retry_within_grace_gets_the_same_successor",
        refresh_rotation,
    ),
    (
        "auth::concurrent_refreshes_of_one_token_rotate_exactly_once",
        concurrent_refresh,
    ),
    (
        "auth::an_old_generation_is_reuse_and_kills_only_its_family",
        reuse_two_back,
    ),
    (
        "auth::reuse_after_the_grace_window_kills_only_its_family",
        reuse_after_grace,
    ),
    (
        "auth::logout_ends_one_session_and_logout_all_ends_every_session",
        logout_flows,
    ),
    (
        "auth::a_revoked_session_cannot_end_the_others_when_its_kv_copy_lags",
        logout_all_without_the_copy,
    ),
    (
        "auth::a_stalled_kv_write_holds_no_sign_in_and_lands_in_order",
        stalled_kv,
    ),
    (
        "auth::every_bad_access_token_is_a_401_with_a_stable_code",
        bad_token_corpus,
    ),
    (
        "auth::the_jwks_publishes_the_key_that_signs_access_tokens",
        jwks_matches,
    ),
    (
        "auth::concurrent_requests_for_different_users_never_mix",
        isolation,
    ),
];

async fn send_from(
    ctx: &Ctx,
    method: &str,
    path: &str,
    body: Option<Value>,
    bearer: Option<&str>,
    ip: &str,
) -> Resp {
    send_with(ctx, method, path, body, bearer, &[("cf-connecting-ip", ip)]).await
}

async fn post(ctx: &Ctx, path: &str, body: Value, ip: &str) -> Resp {
    send_from(ctx, "POST", path, Some(body), None, ip).await
}

async fn signup(ctx: &Ctx, email: &str, password: &str) -> Resp {
    post(
        ctx,
        "/v1/auth/signup",
        json!({"email": email, "password": password}),
        &fresh_ip(),
    )
    .await
}

async fn login(ctx: &Ctx, email: &str, password: &str, ip: &str) -> Resp {
    post(
        ctx,
        "/v1/auth/login",
        json!({"email": email, "password": password}),
        ip,
    )
    .await
}

/// A sign-up or sign-in (`path`) of `email`, with the password every test
/// user has, from a fresh client address, with the development-only fault
/// point `fault` armed.
async fn at_fault(ctx: &Ctx, path: &str, email: &str, fault: &str) -> Resp {
    send_with(
        ctx,
        "POST",
        path,
        Some(json!({"email": email, "password": "correct horse battery"})),
        None,
        &[
            ("cf-connecting-ip", &fresh_ip()),
            ("x-keenvpn-fault", fault),
        ],
    )
    .await
}

async fn refresh(ctx: &Ctx, token: &str) -> Resp {
    post(
        ctx,
        "/v1/auth/refresh",
        json!({"refresh_token": token}),
        &fresh_ip(),
    )
    .await
}

async fn me(ctx: &Ctx, access: &str) -> Resp {
    send(ctx, "GET", "/v1/me", None, Some(access)).await
}

fn assert_pair(r: &Resp) {
    assert_eq!(r.body["token_type"], "Bearer", "{}", r.body);
    let access = r.body["access_token"].as_str().expect("access_token");
    assert_eq!(access.split('.').count(), 3);
    let expires_in = r.body["expires_in"].as_i64().expect("expires_in");
    assert!((840..=900).contains(&expires_in), "{expires_in}");
    assert!(
        r.body["refresh_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("v1."))
    );
    assert_eq!(r.headers["cache-control"], "no-store");
}

async fn new_user(ctx: &Ctx) -> (String, Resp) {
    let email = unique_email();
    let r = signup(ctx, &email, "correct horse battery").await;
    assert_eq!(r.status, 201, "{}", r.body);
    (email, r)
}

fn signup_and_me(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        // Not ASCII, so the Worker lower-cases it with the runtime's case
        // mapping; the final sigma (before '-') checks it is the full one.
        let email = format!("åsa-οδος-{}", unique_email());
        assert_eq!(email.to_uppercase().to_lowercase(), email);
        let r = signup(
            ctx,
            &format!("  {}  ", email.to_uppercase()),
            "correct horse battery",
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_pair(&r);
        let c = claims(s(&r.body["access_token"]));
        assert_eq!(c["typ"], "access");
        assert_eq!(c["ent"]["plan"], "free");
        assert_eq!(c["ent"]["max_devices"], 1);
        let m = me(ctx, s(&r.body["access_token"])).await;
        assert_eq!(m.status, 200, "{}", m.body);
        assert_eq!(m.body["email"], email.as_str(), "email is normalised");
        assert_eq!(m.body["id"], c["sub"]);
        assert_eq!(m.body["plan"], "free");
        assert_eq!(m.body["entitlement"]["region_tiers"], json!(["free"]));
        let sessions = m.body["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0]["id"], c["sid"]);
        assert_eq!(sessions[0]["current"], true);
        // Stored as argon2id, never in plain text.
        let db = keenvpn_edge::db::connect(&ctx.stack().pg.url(DB_NAME)).await?;
        let hash: String = db
            .query_one(
                "SELECT password_hash FROM users WHERE email = $1",
                &[&email],
            )
            .await?
            .get(0);
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        Ok(())
    })
}

fn duplicate_signup(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, _) = new_user(ctx).await;
        let again = signup(ctx, &email, "another password").await;
        assert_eq!(again.status, 409);
        assert_eq!(again.body["code"], "email_taken");
        Ok(())
    })
}

/// The Worker normalizes through the runtime (`String.prototype.normalize`):
/// an address is one account in NFC however an accent is spelled, and a
/// password is its NFKC form, so a letter and a combining mark, the
/// precomposed letter and a full-width letter all sign in.
fn unicode_spellings(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let base = unique_email();
        let decomposed = format!("rene\u{301}-{base}");
        let composed = format!("ren\u{e9}-{base}");
        let r = signup(ctx, &decomposed, "pa\u{308}ssword horse").await;
        assert_eq!(r.status, 201, "{}", r.body);
        let m = me(ctx, s(&r.body["access_token"])).await;
        assert_eq!(m.body["email"], composed.as_str(), "stored in NFC");
        let again = signup(ctx, &composed.to_uppercase(), "another password").await;
        assert_eq!(again.status, 409, "{}", again.body);
        assert_eq!(again.body["code"], "email_taken");
        for password in [
            "p\u{e4}ssword horse",
            "pa\u{308}ssword horse",
            "\u{ff50}\u{e4}ssword horse",
        ] {
            let r = login(ctx, &decomposed, password, &fresh_ip()).await;
            assert_eq!(r.status, 200, "{password:?}: {}", r.body);
            let r = login(ctx, &composed, password, &fresh_ip()).await;
            assert_eq!(r.status, 200, "{password:?}: {}", r.body);
        }
        let wrong = login(ctx, &composed, "p\u{e4}ssword horsf", &fresh_ip()).await;
        assert_eq!(wrong.status, 401, "{}", wrong.body);
        assert_eq!(accounts_with(ctx, &composed).await?, 1);
        Ok(())
    })
}

/// An account whose hash was made of the password as typed (before
/// passwords were normalized) signs in with that spelling; the sign-in
/// stores a hash of the NFKC form in its place, after which the other
/// spellings sign in too.
fn typed_hash_upgraded(ctx: &Ctx) -> Result<(), Failed> {
    use keenvpn_edge::domain::password;
    ctx.rt.block_on(async {
        let email = unique_email();
        let typed = "pa\u{308}ssword horse";
        let older = password::hash(typed.as_bytes(), [9; 16]);
        let db = keenvpn_edge::db::connect(&ctx.stack().pg.url(DB_NAME)).await?;
        db.execute(
            "INSERT INTO users (email, password_hash) VALUES ($1, $2)",
            &[&email, &older],
        )
        .await?;
        let stored = async || -> Result<String, Failed> {
            let row = db
                .query_one(
                    "SELECT password_hash FROM users WHERE email = $1",
                    &[&email],
                )
                .await?;
            Ok(row.get(0))
        };
        // Before the sign-in, only the typed spelling matches.
        let other = login(ctx, &email, "p\u{e4}ssword horse", &fresh_ip()).await;
        assert_eq!(other.status, 401, "{}", other.body);
        assert_eq!(stored().await?, older);
        let r = login(ctx, &email, typed, &fresh_ip()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let newer = stored().await?;
        assert_ne!(newer, older);
        assert_eq!(
            password::verify("p\u{e4}ssword horse".as_bytes(), &newer),
            Ok(()),
            "the new hash is of the NFKC form"
        );
        for password in ["p\u{e4}ssword horse", typed] {
            let r = login(ctx, &email, password, &fresh_ip()).await;
            assert_eq!(r.status, 200, "{password:?}: {}", r.body);
        }
        assert_eq!(stored().await?, newer, "a current hash is left alone");
        Ok(())
    })
}

fn demo_login(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let r = login(ctx, "demo@keenvpn.test", "keenvpn-demo-2026", &fresh_ip()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_pair(&r);
        let c = claims(s(&r.body["access_token"]));
        assert_eq!(c["ent"]["plan"], "plus");
        assert_eq!(c["ent"]["max_devices"], 5);
        assert_eq!(c["ent"]["region_tiers"], json!(["free", "premium"]));
        assert!(c["ent"]["until"].as_i64().unwrap() > 4_000_000_000);
        Ok(())
    })
}

fn unknown_vs_wrong(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, _) = new_user(ctx).await;
        let wrong = login(ctx, &email, "not the password", &fresh_ip()).await;
        let unknown = login(ctx, &unique_email(), "not the password", &fresh_ip()).await;
        assert_eq!(wrong.status, 401);
        assert_eq!(unknown.status, 401);
        let strip = |mut v: Value| {
            v.as_object_mut().unwrap().remove("request_id");
            v
        };
        assert_eq!(
            strip(wrong.body),
            strip(unknown.body),
            "same body apart from the request id"
        );
        // RFC 9110 asks a challenge of every 401; no access token was sent, so
        // it names no error.
        assert_eq!(
            wrong.headers["www-authenticate"],
            r#"Bearer realm="keenvpn""#
        );
        Ok(())
    })
}

/// A body sent without `Content-Length` (chunked) is refused with 413 as soon
/// as it passes the limit, while the client is still sending: the worker does
/// not read an unbounded body into memory first (it used to wait for the end).
fn chunked_body_cut_off(ctx: &Ctx) -> Result<(), Failed> {
    // `wrangler dev`'s local proxy, under the full suite's load, has once
    // closed such a connection without passing on the worker's answer (its
    // log showed the 413 going out). One more try tells that apart from a
    // worker that does not answer early; a second empty answer fails.
    let first = chunked_answer(ctx)?;
    let answer = if first.is_empty() {
        eprintln!("chunked body: the connection closed with no answer; trying once more");
        chunked_answer(ctx)?
    } else {
        first
    };
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    Ok(())
}

/// Sends [`chunked_body_cut_off`]'s never-ending chunked body and returns
/// what came back before the connection closed or the answer was whole.
fn chunked_answer(ctx: &Ctx) -> Result<String, Failed> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ctx.rt.block_on(async {
        let base = ctx.stack().wrangler.base_url.clone();
        let authority = base.trim_start_matches("http://").trim_end_matches('/');
        let mut conn = tokio::net::TcpStream::connect(authority).await?;
        let head = format!(
            "POST /v1/auth/signup HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\n\
             cf-connecting-ip: {}\r\ntransfer-encoding: chunked\r\n\r\n",
            fresh_ip()
        );
        conn.write_all(head.as_bytes()).await?;
        let opening = format!("{{\"email\":\"{}\",\"password\":\"", unique_email());
        conn.write_all(format!("{:x}\r\n{opening}\r\n", opening.len()).as_bytes())
            .await?;
        // 64 KB in 4 KB chunks, four times the limit, and never the last chunk.
        let chunk = "x".repeat(4096);
        for _ in 0..16 {
            conn.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
                .await?;
        }
        conn.flush().await?;
        // The head, then the problem body (the connection stays open: the
        // request's body never ended).
        let mut answer = Vec::new();
        let mut buf = vec![0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("\"request_id\"") {
            let n = tokio::time::timeout(Duration::from_secs(15), conn.read(&mut buf))
                .await
                .map_err(|_| {
                    format!(
                        "no (whole) answer while the body was still open: {}",
                        String::from_utf8_lossy(&answer)
                    )
                })??;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })
}

/// How many accounts the database holds with this (normalised) email.
async fn accounts_with(ctx: &Ctx, email: &str) -> Result<i64, Failed> {
    let db = keenvpn_edge::db::connect(&ctx.stack().pg.url(DB_NAME)).await?;
    let row = db
        .query_one("SELECT count(*) FROM users WHERE email = $1", &[&email])
        .await?;
    Ok(row.get(0))
}

/// The user's object throwing after it stored the new session (the
/// development-only fault point `session.create`: the answer is lost) makes
/// the sign-up a 503 with `Retry-After` and leaves no account behind, so the
/// retry signs up (201) rather than meeting 409 `email_taken`, as it did.
fn signup_retried(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let email = unique_email();
        let body = json!({"email": email, "password": "correct horse battery"});
        let failed = at_fault(ctx, "/v1/auth/signup", &email, "session.create").await;
        assert_eq!(failed.status, 503, "{}", failed.body);
        assert!(failed.headers.contains_key("retry-after"));
        assert_eq!(
            accounts_with(ctx, &email).await?,
            0,
            "no account without a session"
        );
        let retried = send(ctx, "POST", "/v1/auth/signup", Some(body), None).await;
        assert_eq!(retried.status, 201, "{}", retried.body);
        Ok(())
    })
}

/// A sign-up or sign-in (`path`) with `body`, from a fresh client address,
/// under the `Idempotency-Key` `key`.
async fn keyed(ctx: &Ctx, path: &str, body: &Value, key: &str) -> Resp {
    send_with(
        ctx,
        "POST",
        path,
        Some(body.clone()),
        None,
        &[("cf-connecting-ip", &fresh_ip()), ("idempotency-key", key)],
    )
    .await
}

/// Waits until `GET /v1/me` lists `expected` sessions for the holder of
/// `access`, for at most 10 s. The list is the user's KV copy, which a
/// failed KV write leaves behind until the object's alarm writes it again
/// (a second later): as under the load of the whole suite, where the local
/// KV once answered a write with a 500. Fails with the last count.
async fn assert_sessions(ctx: &Ctx, access: &str, expected: usize, why: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = me(ctx, access).await;
        assert_eq!(m.status, 200, "{}", m.body);
        let listed = m.body["sessions"].as_array().expect("sessions").len();
        if listed == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{why}: {listed} sessions listed after 10 s, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A sign-up whose answer was lost, retried under its `Idempotency-Key`,
/// gets the first answer (201, the same session and refresh token), not 409
/// `email_taken`, and makes no second account or session. The key does not
/// open the account to anyone else: a wrong password, another label, another
/// key or none is 409 (or 422 for the key with another request), and once the
/// first refresh token was used the key answers 409 too.
fn keyed_signup(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        const PATH: &str = "/v1/auth/signup";
        let email = unique_email();
        let key = unique("signup-key-");
        let body = json!({"email": email, "password": "correct horse battery", "device_label": "Pixel 8"});
        let first = keyed(ctx, PATH, &body, &key).await;
        assert_eq!(first.status, 201, "{}", first.body);
        assert_pair(&first);
        let sid = claims(s(&first.body["access_token"]))["sid"].clone();

        // The email as typed differently is the same request (normalised).
        let spelled = json!({"email": email.to_uppercase(), "password": "correct horse battery", "device_label": "Pixel 8"});
        for retry in [&body, &spelled] {
            let again = keyed(ctx, PATH, retry, &key).await;
            assert_eq!(again.status, 201, "{}", again.body);
            assert_pair(&again);
            assert_eq!(again.body["refresh_token"], first.body["refresh_token"]);
            assert_eq!(claims(s(&again.body["access_token"]))["sid"], sid);
        }
        assert_eq!(accounts_with(ctx, &email).await?, 1);
        assert_sessions(ctx, s(&first.body["access_token"]), 1, "one session").await;

        let wrong = json!({"email": email, "password": "not the password", "device_label": "Pixel 8"});
        let r = keyed(ctx, PATH, &wrong, &key).await;
        assert_eq!((r.status, &r.body["code"]), (409, &json!("email_taken")), "{}", r.body);
        let relabelled = json!({"email": email, "password": "correct horse battery", "device_label": "iPad"});
        let r = keyed(ctx, PATH, &relabelled, &key).await;
        assert_eq!((r.status, &r.body["code"]), (422, &json!("idempotency_key_reused")), "{}", r.body);
        let r = keyed(ctx, PATH, &body, &unique("other-key-")).await;
        assert_eq!((r.status, &r.body["code"]), (409, &json!("email_taken")), "{}", r.body);
        let r = post(ctx, PATH, body.clone(), &fresh_ip()).await;
        assert_eq!((r.status, &r.body["code"]), (409, &json!("email_taken")), "{}", r.body);

        // Once the first refresh token was used, the client had the answer.
        let rotated = refresh(ctx, s(&first.body["refresh_token"])).await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        let r = keyed(ctx, PATH, &body, &key).await;
        assert_eq!((r.status, &r.body["code"]), (409, &json!("email_taken")), "{}", r.body);
        assert_sessions(ctx, s(&rotated.body["access_token"]), 1, "one session").await;

        // A malformed key is refused before anything is made.
        let fresh = unique_email();
        let r = keyed(ctx, PATH, &json!({"email": fresh, "password": "correct horse battery"}), "two words").await;
        assert_eq!((r.status, &r.body["code"]), (422, &json!("validation_failed")), "{}", r.body);
        assert_eq!(accounts_with(ctx, &fresh).await?, 0);
        Ok(())
    })
}

/// A keyed sign-up for an email that has an account checks the password
/// (to answer a lost first answer again), so it counts in the account's
/// throttle as a sign-in does: five wrong guesses, each from another network
/// under another key, lock the account, and then even its owner's sign-in
/// with the right password is 429. A right password clears the count.
fn keyed_signup_guesses(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, _) = new_user(ctx).await;
        // A keyed sign-up of `email` with `password`, under a fresh key.
        let attempt = |password: &str| {
            let body = json!({"email": email, "password": password});
            async move { keyed(ctx, "/v1/auth/signup", &body, &unique("signup-key-")).await }
        };
        let code = |r: &Resp| (r.status, r.body["code"].as_str().map(str::to_owned));
        let taken = (409, Some("email_taken".to_owned()));
        for _ in 0..4 {
            assert_eq!(code(&attempt("a guessed password").await), taken);
        }
        // The right password: still email_taken (no record of the key), and
        // it clears the four failures.
        assert_eq!(code(&attempt("correct horse battery").await), taken);
        for _ in 0..5 {
            assert_eq!(code(&attempt("a guessed password").await), taken);
        }
        let locked = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        assert_eq!(locked.status, 429, "{}", locked.body);
        assert_eq!(locked.body["code"], "too_many_attempts");
        // And the guesses that follow are refused before any password check.
        let refused = (429, Some("too_many_attempts".to_owned()));
        assert_eq!(code(&attempt("a guessed password").await), refused);
        Ok(())
    })
}

/// A sign-up cut off after PostgreSQL stored the account and before its
/// session was opened (the development-only fault point `signup.cut`, as
/// when the runtime cancels a request whose client went away: nothing is
/// undone) is retried under its key: 201 with a working pair, and a replay
/// of that is the same session. It was 409 `email_taken` for good. Without
/// the key, or with another password, it is still 409.
fn cut_signup_retried(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let email = unique_email();
        let key = unique("signup-key-");
        let body = json!({"email": email, "password": "correct horse battery"});
        let signup = |fault: Option<&'static str>, body: Value, key: String| async move {
            let ip = fresh_ip();
            let mut headers = vec![("cf-connecting-ip", ip.as_str()), ("idempotency-key", &key)];
            headers.extend(fault.map(|f| ("x-keenvpn-fault", f)));
            send_with(ctx, "POST", "/v1/auth/signup", Some(body), None, &headers).await
        };
        let cut = signup(Some("signup.cut"), body.clone(), key.clone()).await;
        assert_eq!(cut.status, 503, "{}", cut.body);

        let retried = signup(None, body.clone(), key.clone()).await;
        assert_eq!(retried.status, 201, "{}", retried.body);
        let again = signup(None, body.clone(), key.clone()).await;
        assert_eq!(again.status, 201, "{}", again.body);
        assert_eq!(again.body["refresh_token"], retried.body["refresh_token"]);
        let pair = refresh(ctx, s(&retried.body["refresh_token"])).await;
        assert_eq!(pair.status, 200, "{}", pair.body);

        let unkeyed = send(ctx, "POST", "/v1/auth/signup", Some(body), None).await;
        assert_eq!(unkeyed.body["code"], "email_taken", "{}", unkeyed.body);
        let other = json!({"email": email, "password": "another password"});
        let guessed = signup(None, other, unique("signup-key-")).await;
        assert_eq!(guessed.body["code"], "email_taken", "{}", guessed.body);
        Ok(())
    })
}

/// A keyed sign-up for an email that has an account checks the password,
/// so it counts in the client network's sign-in throttle too: a network
/// locked for sign-in (thirty failures) was refused sign-ins and could go on
/// guessing passwords here, twenty a window. It is now refused before any
/// check, and, as for a refused sign-in, the account counts nothing: after
/// four wrong passwords and the refused guess, the right one still signs in.
fn keyed_signup_from_a_locked_network(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, network) = one_guess_from_a_lock(ctx).await;
        let guess = send_with(
            ctx,
            "POST",
            "/v1/auth/signup",
            Some(json!({"email": email, "password": "a guessed password"})),
            None,
            &[
                ("cf-connecting-ip", &format!("{network}::77")),
                ("idempotency-key", &unique("signup-key-")),
            ],
        )
        .await;
        assert_eq!(guess.status, 429, "{}", guess.body);
        assert_eq!(guess.body["code"], "too_many_attempts");
        assert!(guess.headers.contains_key("retry-after"));
        let ok = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        Ok(())
    })
}

/// A sign-in whose answer was lost, retried under its `Idempotency-Key`,
/// gets the session the first opened (the same refresh token) instead of
/// opening another. A wrong password is still 401, another label under the
/// key 422; once the session's first token was used, or the session ended,
/// the key opens a new session.
fn keyed_login(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        const PATH: &str = "/v1/auth/login";
        let (email, signed_up) = new_user(ctx).await;
        let access = s(&signed_up.body["access_token"]).to_owned();
        let key = unique("login-key-");
        let body =
            json!({"email": email, "password": "correct horse battery", "device_label": "laptop"});
        let first = keyed(ctx, PATH, &body, &key).await;
        assert_eq!(first.status, 200, "{}", first.body);
        let sid = claims(s(&first.body["access_token"]))["sid"].clone();
        let again = keyed(ctx, PATH, &body, &key).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert_pair(&again);
        assert_eq!(again.body["refresh_token"], first.body["refresh_token"]);
        assert_eq!(claims(s(&again.body["access_token"]))["sid"], sid);
        assert_sessions(ctx, &access, 2, "the sign-up's and one more").await;

        let wrong =
            json!({"email": email, "password": "not the password", "device_label": "laptop"});
        let r = keyed(ctx, PATH, &wrong, &key).await;
        assert_eq!(
            (r.status, &r.body["code"]),
            (401, &json!("invalid_credentials")),
            "{}",
            r.body
        );
        let relabelled =
            json!({"email": email, "password": "correct horse battery", "device_label": "phone"});
        let r = keyed(ctx, PATH, &relabelled, &key).await;
        assert_eq!(
            (r.status, &r.body["code"]),
            (422, &json!("idempotency_key_reused")),
            "{}",
            r.body
        );
        let r = keyed(ctx, PATH, &body, "").await;
        assert_eq!(
            (r.status, &r.body["code"]),
            (422, &json!("validation_failed")),
            "{}",
            r.body
        );
        assert_sessions(ctx, &access, 2, "refusals open nothing").await;

        // The client used the first answer: the key opens a new session.
        let rotated = refresh(ctx, s(&first.body["refresh_token"])).await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        let later = keyed(ctx, PATH, &body, &key).await;
        assert_eq!(later.status, 200, "{}", later.body);
        let later_sid = claims(s(&later.body["access_token"]))["sid"].clone();
        assert_ne!(later_sid, sid);
        assert_sessions(ctx, &access, 3, "a new session").await;
        // So does it once that session ended.
        let out = send(
            ctx,
            "POST",
            "/v1/auth/logout",
            None,
            Some(s(&later.body["access_token"])),
        )
        .await;
        assert_eq!(out.status, 204);
        let last = keyed(ctx, PATH, &body, &key).await;
        assert_eq!(last.status, 200, "{}", last.body);
        let last_sid = claims(s(&last.body["access_token"]))["sid"].clone();
        assert!(last_sid != sid && last_sid != later_sid);
        assert_sessions(ctx, &access, 3, "the ended one replaced").await;
        Ok(())
    })
}

/// A sign-in can find a new account while its failed sign-up is being
/// undone: with the dev-only fault point `signup.undo_slow`, the user's
/// object throws after storing the sign-up's session (a 503, as at
/// `session.create`) and the undo starts 5 s late. A sign-in in that window
/// gets its tokens, but the undo ends its session with the account: the
/// refresh token is refused as revoked. A sign-in that found the account in
/// the window but opens its session after the undo (the fault point
/// `login.late`, 10 s) is refused as if it had found no account. The email
/// can then be signed up again.
fn signin_during_undo(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let email = unique_email();
        let failing = at_fault(ctx, "/v1/auth/signup", &email, "signup.undo_slow");
        let signins = async {
            eventually(Duration::from_secs(4), "the account to be made", || async {
                accounts_with(ctx, &email).await.ok().filter(|n| *n == 1)
            })
            .await;
            let ip = fresh_ip();
            let now = login(ctx, &email, "correct horse battery", &ip);
            tokio::join!(now, at_fault(ctx, "/v1/auth/login", &email, "login.late"))
        };
        let (failed, (signed_in, late)) = tokio::join!(failing, signins);
        assert_eq!(
            signed_in.status, 200,
            "sign-in in the window: {}",
            signed_in.body
        );
        assert_eq!(failed.status, 503, "{}", failed.body);
        assert_eq!(
            (late.status, late.body["code"].as_str()),
            (401, Some("invalid_credentials")),
            "a session opened after the undo: {}",
            late.body
        );
        assert_eq!(
            accounts_with(ctx, &email).await?,
            0,
            "the sign-up was undone"
        );

        let r = refresh(ctx, s(&signed_in.body["refresh_token"])).await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (401, Some("refresh_token_revoked")),
            "the sign-in's session outlived the account: {}",
            r.body
        );
        let r = me(ctx, s(&signed_in.body["access_token"])).await;
        assert_eq!(r.status, 401, "{}", r.body);

        let again = signup(ctx, &email, "correct horse battery").await;
        assert_eq!(again.status, 201, "{}", again.body);
        Ok(())
    })
}

/// A new email, a new `Idempotency-Key` and the sign-up body for them.
fn new_keyed_signup() -> (String, String, Value) {
    let email = unique_email();
    let key = unique("signup-key-");
    let body = json!({"email": email, "password": "correct horse battery"});
    (email, key, body)
}

/// `body` signed up under `key` from a fresh client network, with the
/// development-only fault point `fault` armed.
async fn keyed_signup_at_fault(ctx: &Ctx, (body, key): (&Value, &str), fault: &str) -> Resp {
    let ip = fresh_ip();
    let headers = [
        ("cf-connecting-ip", ip.as_str()),
        ("idempotency-key", key),
        ("x-keenvpn-fault", fault),
    ];
    send_with(
        ctx,
        "POST",
        "/v1/auth/signup",
        Some(body.clone()),
        None,
        &headers,
    )
    .await
}

/// A keyed sign-up whose session was stored but whose own answer failed
/// (`signup.undo_slow`: the object throws after storing it, and the undo
/// starts 5 s late) is retried under its key meanwhile, and the retry is
/// answered 201 with that session. The undo then keeps the account (it used
/// to remove it, and the client held tokens of an account gone).
fn retry_answered_before_undo(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, key, body) = new_keyed_signup();
        let first = keyed_signup_at_fault(ctx, (&body, &key), "signup.undo_slow");
        let retry = async {
            eventually(Duration::from_secs(4), "the account to be made", || async {
                accounts_with(ctx, &email).await.ok().filter(|n| *n == 1)
            })
            .await;
            // The first request's object stores the session, then throws.
            tokio::time::sleep(Duration::from_millis(500)).await;
            keyed(ctx, "/v1/auth/signup", &body, &key).await
        };
        let (first, retried) = tokio::join!(first, retry);
        assert_eq!(first.status, 503, "{}", first.body);
        assert_eq!(retried.status, 201, "{}", retried.body);
        assert_eq!(accounts_with(ctx, &email).await?, 1, "the account stays");
        let r = refresh(ctx, s(&retried.body["refresh_token"])).await;
        assert_eq!(r.status, 200, "the retry's session works: {}", r.body);
        Ok(())
    })
}

/// A keyed sign-up whose session was stored but whose own answer failed is
/// undone (`signup.undo_held`: the object throws after storing the session,
/// and the undo removes the account 5 s after it began to hold the user's
/// object). A retry under its key in that window is refused with 503: were
/// it handed the session, the undo would remove the account it was told it
/// has. Once the undo has removed it, the retry signs up again.
fn retry_during_undo(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, key, body) = new_keyed_signup();
        let first = keyed_signup_at_fault(ctx, (&body, &key), "signup.undo_held");
        let retry = async {
            eventually(Duration::from_secs(4), "the account to be made", || async {
                accounts_with(ctx, &email).await.ok().filter(|n| *n == 1)
            })
            .await;
            // The object stores the session and throws; the undo holds it.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let during = keyed(ctx, "/v1/auth/signup", &body, &key).await;
            let still_there = accounts_with(ctx, &email).await;
            (during, still_there)
        };
        let (first, (during, still_there)) = tokio::join!(first, retry);
        assert_eq!(first.status, 503, "{}", first.body);
        assert_eq!(still_there?, 1, "the retry came before the removal");
        assert_eq!(
            (during.status, during.body["code"].as_str()),
            (503, Some("service_unavailable")),
            "a retry during the undo: {}",
            during.body
        );
        assert_eq!(
            accounts_with(ctx, &email).await?,
            0,
            "the sign-up was undone"
        );
        let again = keyed(ctx, "/v1/auth/signup", &body, &key).await;
        assert_eq!(again.status, 201, "{}", again.body);
        let r = refresh(ctx, s(&again.body["refresh_token"])).await;
        assert_eq!(r.status, 200, "the new account's session works: {}", r.body);
        Ok(())
    })
}

/// A user's object of the release before `/undo` (during a deploy) does not
/// know the route (`signup.undo_unknown`), so it cannot hold itself while
/// the account is removed, and might hand a keyed retry the session
/// meanwhile: the undo keeps the account, and says so. The retry under the
/// sign-up's key then opens its session.
fn undo_unknown_to_the_object(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, key, body) = new_keyed_signup();
        let first = keyed_signup_at_fault(ctx, (&body, &key), "signup.undo_unknown").await;
        assert_eq!(first.status, 503, "{}", first.body);
        let id = first.headers["x-request-id"].to_str()?.to_owned();
        let what = "the undo, not made for want of a hold";
        crate::common::logged_with(
            ctx,
            &id,
            "sign-up not undone: the user's object could not hold it",
            what,
        )
        .await;
        assert_eq!(accounts_with(ctx, &email).await?, 1, "the account stays");
        let retried = keyed(ctx, "/v1/auth/signup", &body, &key).await;
        assert_eq!(retried.status, 201, "{}", retried.body);
        Ok(())
    })
}

/// When the runtime refuses the signing keys (a dev-only fault point), the
/// routes that sign answer 503 `service_unavailable` before their first
/// write: a sign-up makes no account, and sign-ins count no attempt in the
/// throttles (more of them than the account's lock allows still leave the
/// right password working); the refresh token still works afterwards.
fn keys_refused(ctx: &Ctx) -> Result<(), Failed> {
    const REFUSED: (&str, &str) = ("x-keenvpn-fault", "keys.refused");
    let unavailable = |r: &Resp, what: &str| {
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (503, Some("service_unavailable")),
            "{what}: {}",
            r.body
        );
        assert!(r.headers.contains_key("retry-after"), "{what}");
    };
    ctx.rt.block_on(async {
        let email = unique_email();
        let credentials = json!({"email": email, "password": "correct horse battery"});
        let ip = fresh_ip();
        let post_refused = |path: &'static str, body: Value| {
            let ip = ip.clone();
            async move {
                send_with(
                    ctx,
                    "POST",
                    path,
                    Some(body),
                    None,
                    &[("cf-connecting-ip", &ip), REFUSED],
                )
                .await
            }
        };

        let r = post_refused("/v1/auth/signup", credentials.clone()).await;
        unavailable(&r, "sign-up");
        assert_eq!(
            accounts_with(ctx, &email).await?,
            0,
            "no account without tokens"
        );
        let made = signup(ctx, &email, "correct horse battery").await;
        assert_eq!(made.status, 201, "{}", made.body);

        // One more than the account's limit of failures.
        for i in 0..6 {
            let r = post_refused("/v1/auth/login", credentials.clone()).await;
            unavailable(&r, &format!("sign-in {i}"));
        }
        let r = login(ctx, &email, "correct horse battery", &ip).await;
        assert_eq!(r.status, 200, "{}", r.body);

        let token = s(&made.body["refresh_token"]).to_owned();
        let r = post_refused("/v1/auth/refresh", json!({"refresh_token": token})).await;
        unavailable(&r, "refresh");
        let rotated = refresh(ctx, &token).await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        assert_pair(&rotated);
        Ok(())
    })
}

/// A sign-in that fails once the user's object stored its session answers
/// 503 and takes back the session it opened: no client holds it, so it is
/// not left among the user's sessions until it goes idle. At the session
/// limit, opening it ended the least recently used session; that one is
/// given back, so that the failed sign-in changes nothing. Two ways, at
/// dev-only fault points: its access token could not be signed
/// (`token.unsigned`), or the object's answer was lost (`session.create`:
/// the object throws after storing the session; before, that session stayed,
/// and the one it evicted was gone).
fn unsigned_login(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, first) = new_user(ctx).await;
        let mut pairs = vec![first];
        while pairs.len() < MAX_ACTIVE_SESSIONS {
            let r = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
            assert_eq!(r.status, 200, "{}", r.body);
            pairs.push(r);
        }
        for fault in ["token.unsigned", "session.create"] {
            let r = at_fault(ctx, "/v1/auth/login", &email, fault).await;
            assert_eq!(
                (r.status, r.body["code"].as_str()),
                (503, Some("service_unavailable")),
                "{fault}: {}",
                r.body
            );
            let listed = me(ctx, s(&pairs[0].body["access_token"])).await;
            assert_eq!(listed.status, 200, "{}", listed.body);
            let sessions = listed.body["sessions"].as_array().unwrap();
            // Ended sessions are not listed: without the one given back, 19.
            assert_eq!(
                sessions.len(),
                MAX_ACTIVE_SESSIONS,
                "{fault}: {}",
                listed.body
            );
            // Every session the user holds still refreshes, the least
            // recently used one included.
            for (n, pair) in pairs.iter_mut().enumerate() {
                let r = refresh(ctx, s(&pair.body["refresh_token"])).await;
                assert_eq!(r.status, 200, "{fault}, session {n}: {}", r.body);
                *pair = r;
            }
        }
        Ok(())
    })
}

/// A sign-in retried under its `Idempotency-Key` finds the session the first
/// request opened; when the retry's tokens cannot be signed (503), that
/// session stays: the first request answered with it, and its tokens go on
/// working. (The retry used to withdraw it, as if it had opened it.)
fn unsigned_keyed_retry(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, _) = new_user(ctx).await;
        let key = unique("login-key-");
        let body = json!({"email": email, "password": "correct horse battery"});
        let first = keyed(ctx, "/v1/auth/login", &body, &key).await;
        assert_eq!(first.status, 200, "{}", first.body);
        let retry = send_with(
            ctx,
            "POST",
            "/v1/auth/login",
            Some(body.clone()),
            None,
            &[
                ("cf-connecting-ip", &fresh_ip()),
                ("idempotency-key", &key),
                ("x-keenvpn-fault", "token.unsigned"),
            ],
        )
        .await;
        assert_eq!(
            (retry.status, retry.body["code"].as_str()),
            (503, Some("service_unavailable")),
            "{}",
            retry.body
        );
        let rotated = refresh(ctx, s(&first.body["refresh_token"])).await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        let sid = claims(s(&first.body["access_token"]))["sid"].clone();
        let listed = me(ctx, s(&rotated.body["access_token"])).await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        let sids: Vec<&Value> = listed.body["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|x| &x["id"])
            .collect();
        assert!(sids.contains(&&sid), "{}", listed.body);
        Ok(())
    })
}

/// A worker deployed without its refresh-token pepper, with a blank webhook
/// secret (which reads as unset: every delivery used to be refused as
/// forged, 400 `signature_mismatch`), and with an admin token shorter than
/// the 16 characters it needs, answers every route that needs one with 500
/// `not_configured` (a refresh used to be relayed as a retryable 503, and the
/// admin API answered 401, as if every caller had sent the wrong token), and
/// the rest as usual.
fn missing_secrets(ctx: &Ctx) -> Result<(), Failed> {
    // A real refresh token, from the shared stack.
    let (_, pair) = ctx.rt.block_on(new_user(ctx));
    let refresh_token = s(&pair.body["refresh_token"]).to_owned();
    let short = "fifteen-chars-x";
    let stack = Stack::start_with(
        &["REFRESH_TOKEN_PEPPER"],
        &[("ADMIN_TOKEN", short), ("STRIPE_WEBHOOK_SECRET", " , ")],
        &[],
    );
    ctx.rt.block_on(async {
        let post = |path: &str, body: Value| {
            let base = stack.wrangler.base_url.clone();
            let path = path.to_owned();
            async move { send_to(ctx, &base, "POST", &path, Some(body), None, &[]).await }
        };
        let credentials = json!({"email": unique_email(), "password": "correct horse battery"});
        for (path, body) in [
            ("/v1/auth/signup", credentials.clone()),
            ("/v1/auth/login", credentials),
            ("/v1/auth/refresh", json!({"refresh_token": refresh_token})),
            ("/v1/webhooks/stripe", json!({"id": "evt_1"})),
        ] {
            let r = post(path, body).await;
            assert_eq!(
                (r.status, r.body["code"].as_str()),
                (500, Some("not_configured")),
                "{path}: {}",
                r.body
            );
        }
        let auth = format!("Bearer {short}");
        let admin = send_to(
            ctx,
            &stack.wrangler.base_url,
            "GET",
            "/v1/admin/servers",
            None,
            None,
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(
            (admin.status, admin.body["code"].as_str()),
            (500, Some("not_configured")),
            "{}",
            admin.body
        );
        let health = send_to(
            ctx,
            &stack.wrangler.base_url,
            "GET",
            "/healthz",
            None,
            None,
            &[],
        )
        .await;
        assert_eq!(health.status, 200);
        // wrangler writes the worker's lines to its log a moment later: let
        // them arrive before the stack stops, for the run's log check.
        let id = health.headers["x-request-id"].to_str()?.to_owned();
        eventually(
            Duration::from_secs(10),
            "the last request logged",
            || async { stack.wrangler.log().contains(&id).then_some(()) },
        )
        .await;
        Ok(())
    })
}

fn bad_bodies(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let db = keenvpn_edge::db::connect(&ctx.stack().pg.url(DB_NAME)).await?;
        let raw = |body: Vec<u8>, ct: &'static str| {
            ctx.http
                .post(ctx.url("/v1/auth/signup"))
                .header("content-type", ct)
                .header("cf-connecting-ip", fresh_ip())
                .body(body)
                .send()
        };
        let email = unique_email();
        let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
            (
                b"{not json".to_vec(),
                "application/json",
                400,
                "malformed_json",
            ),
            (b"".to_vec(), "application/json", 400, "malformed_json"),
            (
                br#"{"email":"a@example.test"}"#.to_vec(),
                "application/json",
                400,
                "malformed_json",
            ),
            (
                br#"{"email":1,"password":"x"}"#.to_vec(),
                "application/json",
                400,
                "malformed_json",
            ),
            (
                br#"{"email":"a@example.test","password":"long enough","admin":true}"#.to_vec(),
                "application/json",
                400,
                "malformed_json",
            ),
            (
                json!({"email": email, "password": "x".repeat(1 << 20)})
                    .to_string()
                    .into_bytes(),
                "application/json",
                413,
                "payload_too_large",
            ),
            (
                json!({"email": email, "password": "nul\u{0}inside!"})
                    .to_string()
                    .into_bytes(),
                "application/json",
                422,
                "validation_failed",
            ),
            (
                json!({"email": "not-an-email", "password": "long enough"})
                    .to_string()
                    .into_bytes(),
                "application/json",
                422,
                "validation_failed",
            ),
            // A zero-width space: an address that looks exactly like another.
            (
                json!({"email": format!("\u{200b}{email}"), "password": "long enough"})
                    .to_string()
                    .into_bytes(),
                "application/json",
                422,
                "validation_failed",
            ),
            (
                json!({"email": email, "password": "short"})
                    .to_string()
                    .into_bytes(),
                "application/json",
                422,
                "validation_failed",
            ),
            (
                json!({"email": email, "password": "long enough"})
                    .to_string()
                    .into_bytes(),
                "text/plain",
                415,
                "unsupported_media_type",
            ),
        ];
        for (body, ct, status, code) in cases {
            let resp = raw(body, ct).await?;
            assert_eq!(resp.status().as_u16(), status, "{code}");
            assert_eq!(resp.headers()["content-type"], "application/problem+json");
            let b: Value = resp.json().await?;
            assert_eq!(b["code"], code, "{b}");
        }
        // The 422 names the field.
        let resp = raw(
            json!({"email": "nope", "password": "short"})
                .to_string()
                .into_bytes(),
            "application/json",
        )
        .await?;
        let b: Value = resp.json().await?;
        let fields: Vec<&str> = b["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| s(&e["field"]))
            .collect();
        assert_eq!(fields, ["email", "password"]);
        // Other tests sign up concurrently, so count only the addresses used here.
        let written: i64 = db
            .query_one(
                "SELECT count(*) FROM users WHERE email = ANY($1)",
                &[&vec![
                    email.clone(),
                    "a@example.test".to_owned(),
                    "nope".to_owned(),
                    "not-an-email".to_owned(),
                    format!("\u{200b}{email}"),
                ]],
            )
            .await?
            .get(0);
        assert_eq!(written, 0, "no bad request created a user");
        Ok(())
    })
}

fn throttling(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, _) = new_user(ctx).await;
        let ip = fresh_ip();
        // Five failed attempts are answered normally...
        for _ in 0..5 {
            assert_eq!(login(ctx, &email, "wrong password", &ip).await.status, 401);
        }
        // ...then the account is locked, even for the right password and from another address.
        let locked = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        assert_eq!(locked.status, 429, "{}", locked.body);
        assert_eq!(locked.body["code"], "too_many_attempts");
        let retry: u64 = locked.headers["retry-after"].to_str()?.parse()?;
        assert!((1..=30).contains(&retry), "{retry}");
        // It recovers once the lock has passed.
        tokio::time::sleep(Duration::from_secs(retry + 1)).await;
        let ok = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        Ok(())
    })
}

/// Anyone who knows an email can lock its account (five wrong guesses) each
/// time the lock ends. The owner, signing in from the network the account
/// signed up (or in) from before, still gets in; the lock set by the guesses stays
/// for everyone else; a wrong password from that network gets the lock's
/// answer; and guesses from there lock it there too.
fn known_network(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let email = unique_email();
        let right = "correct horse battery";
        let home = fresh_ip();
        // Signed up from home: its first known network.
        let made = post(
            ctx,
            "/v1/auth/signup",
            json!({"email": email, "password": right}),
            &home,
        )
        .await;
        assert_eq!(made.status, 201, "{}", made.body);
        for _ in 0..5 {
            assert_eq!(
                login(ctx, &email, "wrong password", &fresh_ip())
                    .await
                    .status,
                401
            );
        }
        let elsewhere = login(ctx, &email, right, &fresh_ip()).await;
        assert_eq!(elsewhere.status, 429, "{}", elsewhere.body);
        let owner = login(ctx, &email, right, &home).await;
        assert_eq!(owner.status, 200, "{}", owner.body);
        // The owner's sign-in lifted no lock the guesses set.
        let elsewhere = login(ctx, &email, right, &fresh_ip()).await;
        assert_eq!(elsewhere.status, 429, "{}", elsewhere.body);
        // A wrong password from home gets the lock's answer, as elsewhere:
        // the lock tells no one whether the account exists. Five of them
        // lock it at home too.
        for _ in 0..5 {
            let guess = login(ctx, &email, "wrong password", &home).await;
            assert_eq!(
                (guess.status, guess.body["code"].as_str()),
                (429, Some("too_many_attempts")),
                "{}",
                guess.body
            );
        }
        let locked = login(ctx, &email, right, &home).await;
        assert_eq!(locked.status, 429, "{}", locked.body);
        Ok(())
    })
}

/// A new account four wrong passwords from its lock, and a locked network
/// (`locked_network`): the next attempt from there would be the account's
/// fifth, were it counted.
async fn one_guess_from_a_lock(ctx: &Ctx) -> (String, String) {
    let (email, _) = new_user(ctx).await;
    for i in 1..=4 {
        let r = login(ctx, &email, "wrong password", &fresh_ip()).await;
        assert_eq!(r.status, 401, "wrong password {i}: {}", r.body);
    }
    (email, locked_network(ctx).await)
}

/// A fresh IPv6 /64, locked by thirty failed sign-ins (for thirty accounts,
/// so no account lock is reached) from thirty of its addresses.
async fn locked_network(ctx: &Ctx) -> String {
    let network = fresh_ip().trim_end_matches("::1").to_owned();
    for i in 1..=30 {
        let r = login(
            ctx,
            &unique_email(),
            "wrong password",
            &format!("{network}::{i:x}"),
        )
        .await;
        assert_eq!(r.status, 401, "attempt {i}: {}", r.body);
    }
    network
}

/// Thirty failed sign-ins from thirty addresses of one IPv6 /64 (for thirty
/// accounts, so no account lock is reached) lock that network, whichever of
/// its addresses comes next; another /64 is not locked.
fn network_throttle(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let network = locked_network(ctx).await;
        let locked = login(
            ctx,
            &unique_email(),
            "wrong password",
            &format!("{network}:ffff::9"),
        )
        .await;
        assert_eq!(locked.status, 429, "{}", locked.body);
        assert_eq!(locked.body["code"], "too_many_attempts");
        let elsewhere = login(ctx, &unique_email(), "wrong password", &fresh_ip()).await;
        assert_eq!(elsewhere.status, 401, "{}", elsewhere.body);
        Ok(())
    })
}

/// Attempts a locked network makes check no password, so they do not count
/// against the accounts they name: each used to count, and five of them
/// locked any account without a guess. Nor does their lock stay: after four
/// wrong passwords, each such attempt is the account's fifth, which locks it
/// before the network's throttle refuses it; giving it back lifts that lock
/// (it used to stay, and the right password then got 429).
fn locked_network_spares_accounts(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, network) = one_guess_from_a_lock(ctx).await;
        for i in 1..=6 {
            let r = login(ctx, &email, "wrong password", &format!("{network}::{i:x}")).await;
            assert_eq!(r.status, 429, "attempt {i}: {}", r.body);
        }
        let ok = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        Ok(())
    })
}

/// An account locked (five wrong passwords: 30 s) and then the network a
/// sign-in comes from (thirty failures: 60 s): both refuse it, and its
/// `Retry-After` is the network's, the later end. It was the account's, and a
/// client that waited as told was refused again.
fn both_locked(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, _) = new_user(ctx).await;
        for i in 1..=5 {
            let r = login(ctx, &email, "wrong password", &fresh_ip()).await;
            assert_eq!(r.status, 401, "wrong password {i}: {}", r.body);
        }
        let account = login(ctx, &email, "wrong password", &fresh_ip()).await;
        assert_eq!(
            account.status, 429,
            "the account is locked: {}",
            account.body
        );
        let network = locked_network(ctx).await;
        let r = login(
            ctx,
            &email,
            "correct horse battery",
            &format!("{network}::99"),
        )
        .await;
        assert_eq!(r.status, 429, "{}", r.body);
        let wait: u64 = r.headers["retry-after"].to_str()?.parse()?;
        assert!(
            wait > 30,
            "told to retry in {wait} s; the network's lock (60 s) outlasts the account's (30 s)"
        );
        Ok(())
    })
}

/// The database connects but refuses the account's row (here a trigger
/// raises for these emails; in life, a query timeout or a failover): each
/// such sign-up answers 503 and is given back, so more of them than the
/// limit leave the network free to sign up. (Only a failed connection was
/// given back; refused rows counted, and the app's retries during a database
/// incident locked the network out.)
fn refused_sign_ups_given_back(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let tag = unique("refused").replace('-', "_");
        let db = keenvpn_edge::db::connect(&ctx.stack().pg.url(DB_NAME)).await?;
        db.batch_execute(&format!(
            "CREATE FUNCTION {tag}() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
             CREATE TRIGGER {tag} BEFORE INSERT ON users FOR EACH ROW
                 WHEN (NEW.email LIKE '{tag}%') EXECUTE FUNCTION {tag}();"
        ))
        .await?;
        let network = fresh_ip().trim_end_matches("::1").to_owned();
        let sign_up = |email: String, ip: String| async move {
            let body = json!({"email": email, "password": "correct horse battery"});
            post(ctx, "/v1/auth/signup", body, &ip).await
        };
        let mut outcome = Ok(());
        for i in 1..=21 {
            let r = sign_up(
                format!("{tag}{i}@example.test"),
                format!("{network}::{i:x}"),
            )
            .await;
            if r.status != 503 || r.body["code"] != "service_unavailable" {
                outcome = Err(format!("refused sign-up {i}: {} {}", r.status, r.body));
                break;
            }
        }
        db.batch_execute(&format!(
            "DROP TRIGGER {tag} ON users; DROP FUNCTION {tag}();"
        ))
        .await?;
        outcome?;
        let r = sign_up(unique_email(), format!("{network}::99")).await;
        assert_eq!(r.status, 201, "{}", r.body);
        Ok(())
    })
}

/// Twenty sign-ups from one IPv6 /64 in 15 minutes, then it is locked (the
/// refused one makes no account); another network is not. Sign-ups used to
/// have no limit, so `email_taken` could test any number of emails.
fn sign_up_throttle(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let network = fresh_ip().trim_end_matches("::1").to_owned();
        let sign_up = |email: String, ip: String| async move {
            let body = json!({"email": email, "password": "correct horse battery"});
            post(ctx, "/v1/auth/signup", body, &ip).await
        };
        for i in 1..=20 {
            let r = sign_up(unique_email(), format!("{network}::{i:x}")).await;
            assert_eq!(r.status, 201, "sign-up {i}: {}", r.body);
        }
        let email = unique_email();
        let locked = sign_up(email.clone(), format!("{network}:ffff::9")).await;
        assert_eq!(locked.status, 429, "{}", locked.body);
        assert_eq!(locked.body["code"], "too_many_attempts");
        assert!(locked.headers.contains_key("retry-after"));
        let db = keenvpn_edge::db::connect(&ctx.stack().pg.url(DB_NAME)).await?;
        let n: i64 = db
            .query_one("SELECT count(*) FROM users WHERE email = $1", &[&email])
            .await?
            .get(0);
        assert_eq!(n, 0, "a refused sign-up makes no account");
        let elsewhere = sign_up(email, fresh_ip()).await;
        assert_eq!(elsewhere.status, 201, "{}", elsewhere.body);
        Ok(())
    })
}

fn refresh_rotation(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (_, r) = new_user(ctx).await;
        let t0 = s(&r.body["refresh_token"]).to_owned();
        let r1 = refresh(ctx, &t0).await;
        assert_eq!(r1.status, 200, "{}", r1.body);
        assert_pair(&r1);
        let t1 = s(&r1.body["refresh_token"]).to_owned();
        assert_ne!(t0, t1);
        // The same session continues.
        assert_eq!(
            claims(s(&r1.body["access_token"]))["sid"],
            claims(s(&r.body["access_token"]))["sid"]
        );
        // A retry of t0 (the response was lost) gets the same successor.
        let retry = refresh(ctx, &t0).await;
        assert_eq!(retry.status, 200, "{}", retry.body);
        assert_eq!(retry.body["refresh_token"], t1.as_str());
        // And t1 keeps working.
        assert_eq!(refresh(ctx, &t1).await.status, 200);
        Ok(())
    })
}

fn concurrent_refresh(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (_, r) = new_user(ctx).await;
        let t0 = s(&r.body["refresh_token"]).to_owned();
        let results = futures::future::join_all((0..8).map(|_| refresh(ctx, &t0))).await;
        let mut successors: Vec<String> = results
            .iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{}", r.body);
                s(&r.body["refresh_token"]).to_owned()
            })
            .collect();
        successors.dedup();
        assert_eq!(
            successors.len(),
            1,
            "one rotation, one successor: {successors:?}"
        );
        // The successor is generation 1: exactly one rotation happened.
        assert_eq!(successors[0].split('.').nth(3), Some("1"));
        Ok(())
    })
}

fn reuse_two_back(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, first) = new_user(ctx).await;
        let other = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        assert_eq!(other.status, 200);
        let t0 = s(&first.body["refresh_token"]).to_owned();
        let t1 = s(&refresh(ctx, &t0).await.body["refresh_token"]).to_owned();
        let t2 = s(&refresh(ctx, &t1).await.body["refresh_token"]).to_owned();
        // t0 is two generations back: a replay, even within the grace window.
        let reused = refresh(ctx, &t0).await;
        assert_eq!(reused.status, 401);
        assert_eq!(reused.body["code"], "refresh_token_reused");
        // A refusal the user's object made carries the challenge too.
        assert_eq!(
            reused.headers["www-authenticate"],
            r#"Bearer realm="keenvpn""#
        );
        // The whole family is dead, including its newest token...
        assert_eq!(
            refresh(ctx, &t2).await.body["code"],
            "refresh_token_revoked"
        );
        // ...but the user's other session is untouched.
        assert_eq!(
            refresh(ctx, s(&other.body["refresh_token"])).await.status,
            200
        );
        Ok(())
    })
}

fn reuse_after_grace(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, first) = new_user(ctx).await;
        let other = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        let t0 = s(&first.body["refresh_token"]).to_owned();
        let r1 = refresh(ctx, &t0).await;
        let t1 = s(&r1.body["refresh_token"]).to_owned();
        // Wait out the grace window (45 s), then replay t0.
        tokio::time::sleep(Duration::from_secs(47)).await;
        let reused = refresh(ctx, &t0).await;
        assert_eq!(reused.status, 401);
        assert_eq!(reused.body["code"], "refresh_token_reused");
        assert_eq!(
            refresh(ctx, &t1).await.body["code"],
            "refresh_token_revoked"
        );
        // The family's access token is refused once the revocation is mirrored.
        let access = s(&r1.body["access_token"]).to_owned();
        crate::support::eventually(
            Duration::from_secs(70),
            "revoked session refused",
            || async { (me(ctx, &access).await.body["code"] == "session_revoked").then_some(()) },
        )
        .await;
        assert_eq!(
            refresh(ctx, s(&other.body["refresh_token"])).await.status,
            200,
            "other family alive"
        );
        Ok(())
    })
}

fn logout_flows(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, a) = new_user(ctx).await;
        let b = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        let c = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        let (a_access, b_access) = (s(&a.body["access_token"]), s(&b.body["access_token"]));
        assert_eq!(
            me(ctx, a_access).await.body["sessions"]
                .as_array()
                .unwrap()
                .len(),
            3
        );

        let out = send(ctx, "POST", "/v1/auth/logout", None, Some(a_access)).await;
        assert_eq!(out.status, 204);
        assert_eq!(
            refresh(ctx, s(&a.body["refresh_token"])).await.body["code"],
            "refresh_token_revoked"
        );
        crate::support::eventually(
            Duration::from_secs(70),
            "logged-out access token refused",
            || async { (me(ctx, a_access).await.body["code"] == "session_revoked").then_some(()) },
        )
        .await;
        // A retried logout (its first answer lost) is answered as the first.
        let again = send(ctx, "POST", "/v1/auth/logout", None, Some(a_access)).await;
        assert_eq!(again.status, 204, "{}", again.body);
        // Ending every session takes a live one.
        let all = send(ctx, "POST", "/v1/auth/logout-all", None, Some(a_access)).await;
        assert_eq!(all.status, 401);
        assert_eq!(all.body["code"], "session_revoked");
        // The other sessions are untouched and no longer list the ended one.
        let m = me(ctx, b_access).await;
        assert_eq!(m.status, 200);
        assert_eq!(m.body["sessions"].as_array().unwrap().len(), 2);

        let all = send(ctx, "POST", "/v1/auth/logout-all", None, Some(b_access)).await;
        assert_eq!(all.status, 204);
        for pair in [&b, &c] {
            assert_eq!(
                refresh(ctx, s(&pair.body["refresh_token"])).await.body["code"],
                "refresh_token_revoked"
            );
        }
        let unauth = send(ctx, "POST", "/v1/auth/logout", None, None).await;
        assert_eq!(unauth.status, 401);
        assert_eq!(unauth.body["code"], "token_missing");
        assert!(
            unauth.headers["www-authenticate"]
                .to_str()?
                .starts_with("Bearer")
        );
        Ok(())
    })
}

/// Ending every session takes a live one, and the user's object decides
/// that, not the KV copy the worker reads first: that copy can lag a
/// revocation, or be unreadable while KV fails. With it gone, the access
/// token of a logged-out session passes the worker's check and still ends
/// nothing.
fn logout_all_without_the_copy(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, a) = new_user(ctx).await;
        let b = login(ctx, &email, "correct horse battery", &fresh_ip()).await;
        let a_access = s(&a.body["access_token"]);
        let out = send(ctx, "POST", "/v1/auth/logout", None, Some(a_access)).await;
        assert_eq!(out.status, 204, "{}", out.body);
        // Once the copy with the logout has landed, it is taken away, as if
        // it had not landed yet.
        crate::support::eventually(
            Duration::from_secs(70),
            "logged-out access token refused",
            || async { (me(ctx, a_access).await.body["code"] == "session_revoked").then_some(()) },
        )
        .await;
        let user = s(&claims(a_access)["sub"]).to_owned();
        ctx.stack().wrangler.kv_delete(&format!("sessions/{user}"));
        let listed = me(ctx, a_access).await;
        assert_eq!(
            listed.status, 200,
            "without its copy, the worker cannot tell the session ended: {}",
            listed.body
        );

        let all = send(ctx, "POST", "/v1/auth/logout-all", None, Some(a_access)).await;
        assert_eq!(all.status, 401, "{}", all.body);
        assert_eq!(all.body["code"], "session_revoked");
        let kept = refresh(ctx, s(&b.body["refresh_token"])).await;
        assert_eq!(kept.status, 200, "the other session lives: {}", kept.body);
        Ok(())
    })
}

/// How late each KV write starts at the fault point `kv.slow`
/// (`fault::KV_SLOW_MS` in the worker).
const KV_SLOW: Duration = Duration::from_millis(5_000);

/// A KV stall (the development-only fault point `kv.slow`: each KV write the
/// user's object makes for the sign-in starts 5 s late) holds neither the
/// sign-in's answer nor the order of the session copies. The answer comes
/// after the object's bounded waits; the copy with the new session lands
/// later; and a logout made meanwhile is the copy that stays, because its
/// write waits for the stalled one instead of going beside it (the stalled
/// one would then land last and bring the session back).
fn stalled_kv(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (email, a) = new_user(ctx).await;
        let a_access = s(&a.body["access_token"]);
        let started = std::time::Instant::now();
        let b = at_fault(ctx, "/v1/auth/login", &email, "kv.slow").await;
        let answered = started.elapsed();
        assert_eq!(b.status, 200, "{}", b.body);
        assert!(
            answered < KV_SLOW,
            "the sign-in waited {answered:?} for a stalled KV write"
        );
        // The object logged the wait it gave up on, with the sign-in's id.
        let request_id = b.headers["x-request-id"].to_str()?.to_owned();
        let logged = format!("\"request_id\":\"{request_id}\"");
        eventually(
            Duration::from_secs(5),
            "the outlasted wait, logged with the sign-in's request id",
            || async {
                ctx.stack()
                    .wrangler
                    .log()
                    .lines()
                    .any(|l| l.contains("outlasted its wait") && l.contains(&logged))
                    .then_some(())
            },
        )
        .await;
        // The copy with the new session has not landed: the stall was real,
        // and the answer did not wait for it.
        let listed = me(ctx, a_access).await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert_eq!(listed.body["sessions"].as_array().unwrap().len(), 1);

        let b_access = s(&b.body["access_token"]);
        let out = send(ctx, "POST", "/v1/auth/logout", None, Some(b_access)).await;
        assert_eq!(out.status, 204, "{}", out.body);
        eventually(
            Duration::from_secs(30),
            "logged-out session refused",
            || async { (me(ctx, b_access).await.body["code"] == "session_revoked").then_some(()) },
        )
        .await;
        // Well past the moment the stalled write went out: the logout's copy
        // is still the one KV holds.
        let past_stall = KV_SLOW + Duration::from_secs(2);
        if let Some(rest) = past_stall.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        assert_eq!(me(ctx, b_access).await.body["code"], "session_revoked");
        let listed = me(ctx, a_access).await;
        assert_eq!(listed.body["sessions"].as_array().unwrap().len(), 1);
        Ok(())
    })
}

/// The development signing key, read from `.dev.vars` (as the worker does).
fn dev_key() -> (String, ed25519_compact::KeyPair) {
    let keys: Value = serde_json::from_str(&crate::common::dev_var("JWT_SIGNING_KEYS")).unwrap();
    let seed = B64.decode(s(&keys[0]["seed"])).unwrap();
    let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::from_slice(&seed).unwrap());
    (s(&keys[0]["kid"]).to_owned(), kp)
}

fn enc(v: &Value) -> String {
    B64.encode(v.to_string())
}

fn sign_ed25519(kp: &ed25519_compact::KeyPair, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", enc(header), enc(claims));
    let sig = kp.sk.sign(input.as_bytes(), None);
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

fn bad_token_corpus(ctx: &Ctx) -> Result<(), Failed> {
    use hmac::{KeyInit, Mac};
    ctx.rt.block_on(async {
        let (_, pair) = new_user(ctx).await;
        let good = s(&pair.body["access_token"]).to_owned();
        let base = claims(&good);
        let (kid, kp) = dev_key();
        let header = json!({"alg": "EdDSA", "kid": kid, "typ": "JWT"});
        let now = base["iat"].as_i64().unwrap();
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            sign_ed25519(&kp, &header, &c)
        };
        let none_token = format!(
            "{}.{}.",
            enc(&json!({"alg": "none", "kid": kid})),
            enc(&base)
        );
        let none_junk_sig = format!(
            "{}.{}.AAAA",
            enc(&json!({"alg": "none", "kid": kid})),
            enc(&base)
        );
        let hs256 = {
            let h = json!({"alg": "HS256", "kid": kid, "typ": "JWT"});
            let input = format!("{}.{}", enc(&h), enc(&base));
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(kp.pk.as_ref()).unwrap();
            mac.update(input.as_bytes());
            format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
        };
        let unknown_kid = sign_ed25519(
            &kp,
            &json!({"alg": "EdDSA", "kid": "retired-key", "typ": "JWT"}),
            &base,
        );
        let flipped = {
            let (rest, sig) = good.rsplit_once('.').unwrap();
            let mut bytes = B64.decode(sig).unwrap();
            bytes[10] ^= 0x01;
            format!("{rest}.{}", B64.encode(bytes))
        };
        let segs: Vec<&str> = good.split('.').collect();
        let corpus: Vec<(&str, String, &str)> = vec![
            ("alg none, unsigned", none_token, "token_malformed"),
            (
                "alg none with a junk signature",
                none_junk_sig,
                "token_algorithm_not_allowed",
            ),
            (
                "HS256 keyed with the public key",
                hs256,
                "token_algorithm_not_allowed",
            ),
            ("unknown kid", unknown_kid, "token_unknown_key"),
            ("flipped signature bit", flipped, "token_bad_signature"),
            (
                "truncated",
                format!("{}.{}", segs[0], segs[1]),
                "token_malformed",
            ),
            ("extra segment", format!("{good}.AAAA"), "token_malformed"),
            (
                "wrong iss",
                with("iss", json!("someone-else")),
                "token_wrong_issuer",
            ),
            (
                "wrong aud",
                with("aud", json!("another-app")),
                "token_wrong_audience",
            ),
            (
                "typ refresh",
                with("typ", json!("refresh")),
                "token_wrong_type",
            ),
            (
                "expired",
                {
                    let mut c = base.clone();
                    c["iat"] = json!(now - 3600);
                    c["exp"] = json!(now - 3000);
                    sign_ed25519(&kp, &header, &c)
                },
                "token_expired",
            ),
            (
                "iat in the future",
                {
                    let mut c = base.clone();
                    c["iat"] = json!(now + 3600);
                    c["exp"] = json!(now + 4200);
                    sign_ed25519(&kp, &header, &c)
                },
                "token_not_yet_valid",
            ),
            (
                "exp absurdly far ahead",
                with("exp", json!(now + 10 * 365 * 86400)),
                "token_lifetime_too_long",
            ),
            (
                "a refresh token as access token",
                s(&pair.body["refresh_token"]).to_owned(),
                "token_malformed",
            ),
            (
                "non-base64 garbage",
                "!!!.@@@.###".to_owned(),
                "token_malformed",
            ),
            (
                "oversized",
                format!("{}.{}.{}", segs[0], "A".repeat(8000), segs[2]),
                "token_too_large",
            ),
        ];
        for (what, token, code) in corpus {
            let r = me(ctx, &token).await;
            assert_eq!(r.status, 401, "{what}: {}", r.body);
            assert_eq!(r.body["code"], code, "{what}");
            let www = r.headers["www-authenticate"].to_str()?;
            assert!(www.contains(r#"error="invalid_token""#), "{what}: {www}");
        }
        // Another scheme, or a bare `Bearer`, sends no access token: the
        // challenge names no error (RFC 6750, section 3.1). So does a large
        // header of another scheme, which carries no token too large.
        let large_basic = format!("Basic {}", "A".repeat(8000));
        for header in ["Basic dXNlcjpwYXNz", "Bearer", "Token abc", &large_basic] {
            let headers = [("authorization", header)];
            let r = send_with(ctx, "GET", "/v1/me", None, None, &headers).await;
            let header = &header[..header.len().min(24)];
            assert_eq!(r.status, 401, "{header}: {}", r.body);
            assert_eq!(r.body["code"], "token_missing", "{header}");
            let www = r.headers["www-authenticate"].to_str()?;
            assert_eq!(www, r#"Bearer realm="keenvpn""#, "{header}");
        }
        // An access token is not a refresh token.
        let r = refresh(ctx, &good).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.body["code"], "refresh_token_malformed");
        // The untouched token still works: the corpus tested the checks, not a broken key.
        assert_eq!(me(ctx, &good).await.status, 200);
        Ok(())
    })
}

fn jwks_matches(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (_, pair) = new_user(ctx).await;
        let r = send(ctx, "GET", "/.well-known/jwks.json", None, None).await;
        assert_eq!(r.status, 200);
        assert!(r.headers["cache-control"].to_str()?.contains("max-age"));
        let header: Value = serde_json::from_slice(
            &B64.decode(s(&pair.body["access_token"]).split('.').next().unwrap())?,
        )?;
        let key = r.body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == header["kid"])
            .expect("signing kid published");
        assert_eq!(
            (s(&key["kty"]), s(&key["crv"]), s(&key["alg"])),
            ("OKP", "Ed25519", "EdDSA")
        );
        let (_, kp) = dev_key();
        assert_eq!(B64.decode(s(&key["x"]))?, kp.pk.as_ref());
        Ok(())
    })
}

fn isolation(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut users = Vec::new();
        for _ in 0..6 {
            let (email, r) = new_user(ctx).await;
            users.push((email, s(&r.body["access_token"]).to_owned()));
        }
        // 6 users x 5 interleaved /v1/me calls, all in flight together.
        let calls = users
            .iter()
            .cycle()
            .take(30)
            .map(|(email, token)| async move { (email.clone(), me(ctx, token).await) });
        for (email, r) in futures::future::join_all(calls).await {
            assert_eq!(r.status, 200);
            assert_eq!(
                r.body["email"],
                email.as_str(),
                "a response carried another user's data"
            );
            let sessions = r.body["sessions"].as_array().unwrap();
            assert_eq!(sessions.len(), 1);
            assert_eq!(sessions[0]["current"], true);
        }
        Ok(())
    })
}
