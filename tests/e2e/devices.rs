//! WireGuard devices and the device limit, end to end.

use crate::common::*;
use crate::harness::{Ctx, Test};
use crate::support::eventually;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libtest_mimic::Failed;
use serde_json::{Value, json};

pub const TESTS: &[(&str, Test)] = &[
    ("devices::create_list_rotate_and_delete_a_device", lifecycle),
    (
        "devices::bad_keys_and_names_are_422_and_a_key_in_use_is_409",
        bad_and_taken_keys,
    ),
    (
        "devices::the_free_plan_allows_one_device_and_nothing_changes_at_the_limit",
        free_limit,
    ),
    (
        "devices::concurrent_registrations_never_exceed_the_limit",
        concurrent_limit,
    ),
    (
        "devices::another_users_device_ids_behave_like_unknown_ones",
        cross_user,
    ),
    (
        "devices::idempotency_keys_replay_refuse_mismatch_and_in_flight",
        idempotency,
    ),
    (
        "devices::deletes_and_key_rotations_replay_their_first_answer_under_a_key",
        idempotent_changes,
    ),
    (
        "devices::a_deleted_device_stops_connecting_when_its_kv_copy_failed_to_be_written",
        mirror_retried,
    ),
    (
        "devices::a_registration_answered_after_a_key_rotation_keeps_the_rotated_key",
        late_registration_keeps_rotation,
    ),
    (
        "devices::of_two_rotations_of_one_key_the_one_committed_last_is_kept",
        overlapping_rotations,
    ),
    (
        "devices::an_account_deleted_by_its_owner_takes_its_devices_and_sessions_with_it",
        account_deleted,
    ),
];

async fn create(ctx: &Ctx, user: &User, name: &str, key: &str) -> Resp {
    send(
        ctx,
        "POST",
        "/v1/devices",
        Some(json!({"name": name, "public_key": key})),
        Some(&user.access),
    )
    .await
}

async fn device_count(ctx: &Ctx, user_id: &str) -> i64 {
    let db = db(ctx).await;
    db.query_one(
        "SELECT count(*) FROM devices WHERE user_id = $1::text::uuid",
        &[&user_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Gives the user a Plus subscription in PostgreSQL, then signs in again so the
/// user's session object learns the new entitlement inputs.
pub async fn make_plus(ctx: &Ctx, user: &mut User) {
    make_plus_at(ctx, &ctx.url(""), &db(ctx).await, user).await;
}

/// [`make_plus`] against the worker at `base` and its database `db` (a stack
/// of a test's own).
pub async fn make_plus_at(ctx: &Ctx, base: &str, db: &tokio_postgres::Client, user: &mut User) {
    db.execute(
        "INSERT INTO subscriptions (user_id, plan_id, status, current_period_end)
         VALUES ($1::text::uuid, 'plus', 'active', now() + interval '30 days')",
        &[&user.id],
    )
    .await
    .unwrap();
    let r = send_to(
        ctx,
        base,
        "POST",
        "/v1/auth/login",
        Some(json!({"email": user.email, "password": PASSWORD})),
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    user.access = s(&r.body["access_token"]).to_owned();
    user.refresh = s(&r.body["refresh_token"]).to_owned();
    assert_eq!(claims(&user.access)["ent"]["max_devices"], 5);
}

fn lifecycle(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let user = new_user(ctx).await;
        let key = wg_key();
        let r = create(ctx, &user, "  Laptop  ", &key).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let d = r.body.clone();
        let id = s(&d["id"]).to_owned();
        assert_eq!(r.headers["location"], format!("/v1/devices/{id}").as_str());
        assert_eq!(d["name"], "Laptop");
        assert_eq!(d["public_key"], key.as_str());
        assert!(s(&d["ipv4_address"]).starts_with("10."), "{d}");
        assert!(s(&d["ipv6_address"]).starts_with("fd4b:6565:6e00::"), "{d}");
        assert!(d["created_at"].is_i64());

        let list = send(ctx, "GET", "/v1/devices", None, Some(&user.access)).await;
        assert_eq!(list.status, 200);
        assert_eq!(list.body["devices"], json!([d]));
        assert_eq!(list.body["max_devices"], 1);
        // The `Location` reads the device back, its id in either case.
        for path in [id.clone(), id.to_ascii_uppercase()] {
            let read = send(
                ctx,
                "GET",
                &format!("/v1/devices/{path}"),
                None,
                Some(&user.access),
            )
            .await;
            assert_eq!(read.status, 200, "{}", read.body);
            assert_eq!(read.body, d);
        }

        let new_key = wg_key();
        let rotated = send(
            ctx,
            "PUT",
            &format!("/v1/devices/{id}/public_key"),
            Some(json!({"public_key": new_key})),
            Some(&user.access),
        )
        .await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        assert_eq!(rotated.body["public_key"], new_key.as_str());
        assert_eq!(
            rotated.body["ipv4_address"], d["ipv4_address"],
            "addresses survive a key rotation"
        );

        let del = send(
            ctx,
            "DELETE",
            &format!("/v1/devices/{id}"),
            None,
            Some(&user.access),
        )
        .await;
        assert_eq!(del.status, 204);
        assert_eq!(
            send(ctx, "GET", "/v1/devices", None, Some(&user.access))
                .await
                .body["devices"],
            json!([])
        );
        for method in ["DELETE", "GET"] {
            let gone = send(
                ctx,
                method,
                &format!("/v1/devices/{id}"),
                None,
                Some(&user.access),
            )
            .await;
            assert_eq!(gone.status, 404, "{method}");
            assert_eq!(gone.body["code"], "device_not_found", "{method}");
        }
        // The freed slot can be used again (the free plan allows one device).
        assert_eq!(create(ctx, &user, "Phone", &wg_key()).await.status, 201);
        Ok(())
    })
}

fn bad_and_taken_keys(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (a, b) = (new_user(ctx).await, new_user(ctx).await);
        for bad in [
            "",
            "not base64!",
            "AAAA",
            &"A".repeat(43),
            &format!("{}=", "A".repeat(43)),
            &wg_key().replace('=', ""),
        ] {
            let r = create(ctx, &a, "x", bad).await;
            assert_eq!(r.status, 422, "{bad:?}: {}", r.body);
            assert_eq!(r.body["errors"][0]["field"], "public_key");
        }
        // Names the contract refuses, also where trimming would hide it.
        for bad in [
            "n".repeat(65),
            format!(" {} ", "n".repeat(63)),
            "Laptop\n".into(),
            " \u{a0} ".into(),
        ] {
            let r = create(ctx, &a, &bad, &wg_key()).await;
            assert_eq!(r.status, 422, "{bad:?}: {}", r.body);
            assert_eq!(r.body["errors"][0]["field"], "name");
        }
        assert_eq!(device_count(ctx, &a.id).await, 0);
        let key = wg_key();
        let mine = create(ctx, &a, "mine", &key).await;
        assert_eq!(mine.status, 201);
        // The owner registering the same key again (a retry whose answer was
        // lost) gets the device back, not a conflict, and nothing is added.
        let again = create(ctx, &a, "mine", &key).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.body, mine.body);
        assert_eq!(device_count(ctx, &a.id).await, 1);
        let taken = create(ctx, &b, "theirs", &key).await;
        assert_eq!(taken.status, 409, "{}", taken.body);
        assert_eq!(taken.body["code"], "public_key_in_use");
        // The same key spelled again: with the top bit X25519 ignores set
        // (it was taken as another key, 201), and a point of small order.
        let mut alias = STANDARD.decode(&key).unwrap();
        alias[31] |= 0x80;
        for bad in [
            STANDARD.encode(alias),
            "7P///////////////////////////////////////38=".into(),
        ] {
            let r = create(ctx, &b, "theirs", &bad).await;
            assert_eq!(r.status, 422, "{bad}: {}", r.body);
            assert_eq!(r.body["errors"][0]["field"], "public_key");
        }
        assert_eq!(
            device_count(ctx, &b.id).await,
            0,
            "the refused device was not written"
        );
        // b's slot was released: b can still register a device.
        assert_eq!(create(ctx, &b, "theirs", &wg_key()).await.status, 201);
        Ok(())
    })
}

fn free_limit(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let user = new_user(ctx).await;
        assert_eq!(create(ctx, &user, "one", &wg_key()).await.status, 201);
        let r = create(ctx, &user, "two", &wg_key()).await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.body["code"], "device_limit_reached");
        assert_eq!(r.body["max_devices"], 1);
        assert_eq!(device_count(ctx, &user.id).await, 1);
        Ok(())
    })
}

fn concurrent_limit(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        make_plus(ctx, &mut user).await;
        for round in 0..5 {
            // Limit 5, six registrations at once.
            let names: Vec<String> = (0..6).map(|i| format!("r{round}-d{i}")).collect();
            let results = futures::future::join_all(names.iter().map(|n| async {
                let r = create(ctx, &user, n, &wg_key()).await;
                (r.status, r.body)
            }))
            .await;
            let created: Vec<&Value> = results
                .iter()
                .filter(|r| r.0 == 201)
                .map(|r| &r.1)
                .collect();
            let refused = results.iter().filter(|r| r.0 == 403).count();
            assert_eq!(
                (created.len(), refused),
                (5, 1),
                "round {round}: {results:?}"
            );
            assert_eq!(
                device_count(ctx, &user.id).await,
                5,
                "round {round}: the database agrees"
            );
            // The object agrees with the database: one more is refused...
            assert_eq!(create(ctx, &user, "extra", &wg_key()).await.status, 403);
            // ...and every slot freed is usable again.
            for d in created {
                let del = send(
                    ctx,
                    "DELETE",
                    &format!("/v1/devices/{}", s(&d["id"])),
                    None,
                    Some(&user.access),
                )
                .await;
                assert_eq!(del.status, 204);
            }
            assert_eq!(device_count(ctx, &user.id).await, 0);
        }
        Ok(())
    })
}

fn cross_user(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let (a, b) = (new_user(ctx).await, new_user(ctx).await);
        let d = create(ctx, &a, "a's", &wg_key()).await.body;
        let id = s(&d["id"]).to_owned();
        let unknown = "6f9619ff-8b86-4d11-b42d-00c04fc964ff";
        for target in [id.as_str(), unknown, "not-a-uuid"] {
            let del = send(
                ctx,
                "DELETE",
                &format!("/v1/devices/{target}"),
                None,
                Some(&b.access),
            )
            .await;
            let put = send(
                ctx,
                "PUT",
                &format!("/v1/devices/{target}/public_key"),
                Some(json!({"public_key": wg_key()})),
                Some(&b.access),
            )
            .await;
            let get = send(
                ctx,
                "GET",
                &format!("/v1/devices/{target}"),
                None,
                Some(&b.access),
            )
            .await;
            for r in [&del, &put, &get] {
                assert_eq!(r.status, 404, "{target}: {}", r.body);
                assert_eq!(r.body["code"], "device_not_found");
                assert_eq!(
                    r.body["detail"], "No such device.",
                    "no hint that the id exists"
                );
            }
        }
        assert_eq!(
            send(ctx, "GET", "/v1/devices", None, Some(&b.access))
                .await
                .body["devices"],
            json!([])
        );
        let mine = send(ctx, "GET", "/v1/devices", None, Some(&a.access)).await;
        assert_eq!(mine.body["devices"], json!([d]), "a's device untouched");
        Ok(())
    })
}

fn idempotency(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        make_plus(ctx, &mut user).await;
        let key = wg_key();
        let body = json!({"name": "tablet", "public_key": key});
        let post = |k: &'static str, b: Value| {
            let access = user.access.clone();
            async move {
                send_with(
                    ctx,
                    "POST",
                    "/v1/devices",
                    Some(b),
                    Some(&access),
                    &[("idempotency-key", k)],
                )
                .await
            }
        };
        let first = post("create-tablet-1", body.clone()).await;
        assert_eq!(first.status, 201, "{}", first.body);
        let replay = post("create-tablet-1", body.clone()).await;
        assert_eq!(replay.status, 201);
        assert_eq!(replay.body, first.body, "same key and body: same response");
        // The same body with its members in another order and spaced
        // otherwise (another app build's encoder) is the same request.
        let reordered = ctx
            .http
            .post(ctx.url("/v1/devices"))
            .header("content-type", "application/json")
            .header("cf-connecting-ip", fresh_ip())
            .header("idempotency-key", "create-tablet-1")
            .bearer_auth(&user.access)
            .body(format!(r#"{{ "public_key" : "{key}",  "name":"tablet" }}"#))
            .send()
            .await?;
        assert_eq!(reordered.status().as_u16(), 201);
        assert_eq!(reordered.json::<Value>().await?, first.body);
        assert_eq!(device_count(ctx, &user.id).await, 1);
        let other = post(
            "create-tablet-1",
            json!({"name": "other", "public_key": wg_key()}),
        )
        .await;
        assert_eq!(other.status, 422);
        assert_eq!(other.body["code"], "idempotency_key_reused");
        // Two at once with a new key: one runs, the other is told it is in flight
        // (or, if the first already finished, gets its replay).
        let b2 = json!({"name": "watch", "public_key": wg_key()});
        let (x, y) = futures::join!(
            post("create-watch", b2.clone()),
            post("create-watch", b2.clone())
        );
        let mut statuses = [x.status, y.status];
        statuses.sort();
        assert!(
            statuses == [201, 201] || statuses == [201, 409],
            "{statuses:?}"
        );
        if statuses == [201, 201] {
            assert_eq!(x.body, y.body);
        } else {
            let busy = if x.status == 409 { &x } else { &y };
            assert_eq!(busy.body["code"], "idempotency_key_in_flight");
        }
        assert_eq!(
            device_count(ctx, &user.id).await,
            2,
            "tablet + watch, each once"
        );
        // A key whose first answer was the existing device (200) is bound
        // to that body like any other.
        let again = post("tablet-again", body.clone()).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.body["id"], first.body["id"]);
        let reused = post(
            "tablet-again",
            json!({"name": "phone", "public_key": wg_key()}),
        )
        .await;
        assert_eq!(reused.status, 422, "{}", reused.body);
        assert_eq!(reused.body["code"], "idempotency_key_reused");
        assert_eq!(device_count(ctx, &user.id).await, 2);
        let bad = send_with(
            ctx,
            "POST",
            "/v1/devices",
            Some(body),
            Some(&user.access),
            &[("idempotency-key", "")],
        )
        .await;
        assert_eq!(bad.status, 422);
        Ok(())
    })
}

/// `DELETE` and `PUT .../public_key` honour `Idempotency-Key` as `POST` does:
/// a retry whose first answer was lost gets that answer, not a 404 for the
/// device it deleted or a second rotation; the key with another request is
/// 422; an attempt without effect (404) is not recorded.
fn idempotent_changes(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        make_plus(ctx, &mut user).await;
        let mut ids = Vec::new();
        for name in ["laptop", "phone", "tablet"] {
            let r = create(ctx, &user, name, &wg_key()).await;
            assert_eq!(r.status, 201, "{}", r.body);
            ids.push(s(&r.body["id"]).to_owned());
        }
        let keyed = |method: &'static str, path: String, body: Option<Value>, key: &'static str| {
            let access = user.access.clone();
            async move {
                send_with(
                    ctx,
                    method,
                    &path,
                    body,
                    Some(&access),
                    &[("idempotency-key", key)],
                )
                .await
            }
        };
        let device = |id: &str| format!("/v1/devices/{id}");
        let rotate = |id: &str| format!("/v1/devices/{id}/public_key");

        // Delete, and its retry.
        let first = keyed("DELETE", device(&ids[0]), None, "delete-laptop").await;
        assert_eq!(first.status, 204, "{}", first.body);
        let retry = keyed("DELETE", device(&ids[0]), None, "delete-laptop").await;
        assert_eq!(retry.status, 204, "the first answer again: {}", retry.body);
        let unkeyed = send(ctx, "DELETE", &device(&ids[0]), None, Some(&user.access)).await;
        assert_eq!(unkeyed.status, 404, "without the key, the device is gone");
        let other = keyed("DELETE", device(&ids[1]), None, "delete-laptop").await;
        assert_eq!(other.status, 422);
        assert_eq!(other.body["code"], "idempotency_key_reused");
        assert_eq!(device_count(ctx, &user.id).await, 2);
        // A delete that found nothing is not recorded: the key is free.
        let missing = keyed("DELETE", device(&ids[0]), None, "delete-again").await;
        assert_eq!(missing.status, 404);
        let freed = keyed("DELETE", device(&ids[2]), None, "delete-again").await;
        assert_eq!(freed.status, 204, "{}", freed.body);
        assert_eq!(device_count(ctx, &user.id).await, 1);

        // Rotate, and its retry after another rotation: the first answer,
        // and no second effect.
        let (k1, k2) = (wg_key(), wg_key());
        let first = keyed(
            "PUT",
            rotate(&ids[1]),
            Some(json!({"public_key": k1})),
            "rotate-1",
        )
        .await;
        assert_eq!(first.status, 200, "{}", first.body);
        assert_eq!(first.body["public_key"], k1);
        let later = send(
            ctx,
            "PUT",
            &rotate(&ids[1]),
            Some(json!({"public_key": k2})),
            Some(&user.access),
        )
        .await;
        assert_eq!(later.status, 200, "{}", later.body);
        let retry = keyed(
            "PUT",
            rotate(&ids[1]),
            Some(json!({"public_key": k1})),
            "rotate-1",
        )
        .await;
        assert_eq!(retry.status, 200);
        assert_eq!(retry.body, first.body, "the first answer, replayed");
        let list = send(ctx, "GET", "/v1/devices", None, Some(&user.access)).await;
        assert_eq!(
            list.body["devices"][0]["public_key"], k2,
            "the replay rotated nothing back"
        );
        let mismatch = keyed(
            "PUT",
            rotate(&ids[1]),
            Some(json!({"public_key": wg_key()})),
            "rotate-1",
        )
        .await;
        assert_eq!(mismatch.status, 422);
        assert_eq!(mismatch.body["code"], "idempotency_key_reused");

        // A malformed key is refused before anything runs.
        let bad = keyed("DELETE", device(&ids[1]), None, "two words").await;
        assert_eq!(bad.status, 422);
        assert_eq!(bad.body["code"], "validation_failed");
        assert_eq!(device_count(ctx, &user.id).await, 1);
        Ok(())
    })
}

/// The user's object failing to write its KV copy of the devices after a
/// delete (the development-only fault point `mirror.kv`; KV's limit of one
/// write per key per second in production) logs it, with the delete's request
/// id, and writes the copy again
/// from its alarm: the deleted device stops connecting. Before, the copy kept
/// the device until the user's next device change, and it kept connecting.
fn mirror_retried(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let user = new_user(ctx).await;
        let r = create(ctx, &user, "Laptop", &wg_key()).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let id = s(&r.body["id"]).to_owned();
        let connect = || {
            send_with(
                ctx,
                "POST",
                "/v1/connect",
                Some(json!({"device_id": id})),
                Some(&user.access),
                &[("x-keenvpn-client-location", "51.5,-0.13")],
            )
        };
        let first = connect().await;
        assert_eq!(first.status, 200, "{}", first.body);

        let del = send_with(
            ctx,
            "DELETE",
            &format!("/v1/devices/{id}"),
            None,
            Some(&user.access),
            &[("x-keenvpn-fault", "mirror.kv")],
        )
        .await;
        assert_eq!(del.status, 204, "{}", del.body);
        // Logged by the object, with the id of the request it failed for.
        let request_id = del.headers["x-request-id"].to_str()?.to_owned();
        eventually(
            std::time::Duration::from_secs(10),
            "the failed copy, logged with the delete's request id",
            || async {
                ctx.stack()
                    .wrangler
                    .log()
                    .lines()
                    .any(|l| {
                        l.contains("mirror write failed")
                            && l.contains(&user.id)
                            && l.contains(&format!("\"request_id\":\"{request_id}\""))
                    })
                    .then_some(())
            },
        )
        .await;
        eventually(
            std::time::Duration::from_secs(15),
            "the deleted device refused",
            || async {
                let r = connect().await;
                (r.status == 404 && r.body["code"] == "device_not_found").then_some(())
            },
        )
        .await;
        Ok(())
    })
}

/// A registration whose insert waits in PostgreSQL (here on another user's
/// uncommitted row with the same key: its statement, and the device list it
/// answers with, already read) while a key rotation of the user's other
/// device commits and is applied. The registration's late answer carries
/// the list from before the rotation; the user's object used to take it as
/// the newer, and put the old key back in the records and the KV copy the
/// connect reads: tickets then named the old key (a leaked one, say) until
/// the user's next device change.
fn late_registration_keeps_rotation(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        make_plus(ctx, &mut user).await;
        let phone = create(ctx, &user, "Phone", &wg_key()).await;
        assert_eq!(phone.status, 201, "{}", phone.body);
        let phone_id = s(&phone.body["id"]).to_owned();

        let other = new_user(ctx).await;
        let key = wg_key();
        let mut blocker = db(ctx).await;
        let tx = blocker.transaction().await?;
        tx.execute(
            "INSERT INTO devices (user_id, name, public_key, ipv4_address, ipv6_address)
             VALUES ($1::text::uuid, 'Blocker', $2, '10.127.255.250', 'fd4b:6565:6e00::3f:fffa')",
            &[&other.id, &key],
        )
        .await?;
        let new_key = wg_key();
        let rotate_then_release = async {
            // The registration's statement is under way and waiting.
            tokio::time::sleep(std::time::Duration::from_millis(700)).await;
            let rotated = send(
                ctx,
                "PUT",
                &format!("/v1/devices/{phone_id}/public_key"),
                Some(json!({"public_key": new_key})),
                Some(&user.access),
            )
            .await;
            tx.rollback().await.expect("rollback");
            rotated
        };
        let (laptop, rotated) =
            tokio::join!(create(ctx, &user, "Laptop", &key), rotate_then_release);
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        assert_eq!(laptop.status, 201, "{}", laptop.body);
        let laptop_id = s(&laptop.body["id"]).to_owned();

        // The KV copy once it holds the laptop (written after the
        // registration's answer was applied): the phone with its new key.
        let copy: Vec<Value> = eventually(
            std::time::Duration::from_secs(15),
            "the KV copy with the new device",
            || async {
                let copy = kv_devices(ctx, &user.id)?;
                copy.iter()
                    .any(|d| d["id"] == laptop_id.as_str())
                    .then_some(copy)
            },
        )
        .await;
        let phone_copy = copy
            .iter()
            .find(|d| d["id"] == phone_id.as_str())
            .cloned()
            .unwrap_or_default();
        assert_eq!(phone_copy["public_key"], new_key.as_str(), "{copy:?}");
        Ok(())
    })
}

/// Two rotations of one device's key: the first commits first, but its
/// answer reaches the user's object 2 s late (the fault point
/// `device.late`), after the second's was applied. The object used to keep
/// the answer applied last, so the records and the KV copy the connect reads
/// held the first key, which PostgreSQL no longer has, until the user's next
/// device change. It now reads the list again after overlapping operations.
fn overlapping_rotations(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let user = new_user(ctx).await;
        let phone = create(ctx, &user, "Phone", &wg_key()).await;
        assert_eq!(phone.status, 201, "{}", phone.body);
        let phone_id = s(&phone.body["id"]).to_owned();
        let path = format!("/v1/devices/{phone_id}/public_key");
        let (first_key, second_key) = (wg_key(), wg_key());
        let first = send_with(
            ctx,
            "PUT",
            &path,
            Some(json!({"public_key": first_key})),
            Some(&user.access),
            &[("x-keenvpn-fault", "device.late")],
        );
        let key_in_db = || async {
            db(ctx)
                .await
                .query_one(
                    "SELECT public_key FROM devices WHERE id = $1::text::uuid",
                    &[&phone_id],
                )
                .await
                .map(|r| r.get::<_, String>(0))
                .expect("the phone's row")
        };
        let second = async {
            // The first has committed and waits to be applied.
            eventually(
                std::time::Duration::from_secs(10),
                "the first rotation committed",
                || async { (key_in_db().await == first_key).then_some(()) },
            )
            .await;
            send(
                ctx,
                "PUT",
                &path,
                Some(json!({"public_key": second_key})),
                Some(&user.access),
            )
            .await
        };
        let (first, second) = tokio::join!(first, second);
        assert_eq!(first.status, 200, "{}", first.body);
        assert_eq!(second.status, 200, "{}", second.body);
        assert_eq!(first.body["public_key"], first_key.as_str());
        assert_eq!(key_in_db().await, second_key, "the second committed last");
        eventually(
            std::time::Duration::from_secs(10),
            "the KV copy with the key committed last",
            || async {
                kv_devices(ctx, &user.id)?
                    .iter()
                    .any(|d| d["id"] == phone_id.as_str() && d["public_key"] == second_key.as_str())
                    .then_some(())
            },
        )
        .await;
        Ok(())
    })
}

/// The devices of the KV copy the connect path reads for `user_id`, if any.
fn kv_devices(ctx: &Ctx, user_id: &str) -> Option<Vec<Value>> {
    let raw = ctx.stack().wrangler.kv_get(&format!("devices/{user_id}"))?;
    let copy: Value = serde_json::from_str(&raw).ok()?;
    copy["devices"].as_array().cloned()
}

/// `DELETE /v1/me`: the account goes, with its devices (their addresses to
/// quarantine) and every session; the connect path's copy of the devices is
/// emptied; the password no longer signs in. An account whose subscription
/// may still charge it is kept (409), and so is one asked by a signed-out
/// session's token. A deletion whose object went part-way (the
/// development-only fault point `account.marked`, after the deletion was
/// marked and before PostgreSQL deleted the account) is seen through by the
/// object's alarm, and the account's refresh token stops working.
fn account_deleted(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let db = db(ctx).await;
        let delete = |access: String| async move {
            send(ctx, "DELETE", "/v1/me", None, Some(&access)).await
        };
        let login = |email: String| async move {
            let body = json!({"email": email, "password": PASSWORD});
            send(ctx, "POST", "/v1/auth/login", Some(body), None).await
        };

        // A subscription that renews holds the deletion back.
        let mut plus = new_user(ctx).await;
        make_plus(ctx, &mut plus).await;
        let refused = delete(plus.access.clone()).await;
        assert_eq!(refused.status, 409, "{}", refused.body);
        assert_eq!(refused.body["code"], "subscription_active");
        assert_eq!(
            send(ctx, "GET", "/v1/me", None, Some(&plus.access))
                .await
                .status,
            200
        );
        // The deletion's mark is lifted: the session refreshes.
        let body = json!({"refresh_token": plus.refresh});
        let r = send(ctx, "POST", "/v1/auth/refresh", Some(body), None).await;
        assert_eq!(r.status, 200, "{}", r.body);

        let user = new_user(ctx).await;
        let made = create(ctx, &user, "laptop", &wg_key()).await;
        assert_eq!(made.status, 201, "{}", made.body);
        let address = s(&made.body["ipv4_address"]).to_owned();
        assert_eq!(kv_devices(ctx, &user.id).map(|d| d.len()), Some(1));

        // A second session, signed out: its token deletes nothing.
        let other = login(user.email.clone()).await;
        assert_eq!(other.status, 200, "{}", other.body);
        let other_access = s(&other.body["access_token"]).to_owned();
        let out = send(ctx, "POST", "/v1/auth/logout", None, Some(&other_access)).await;
        assert_eq!(out.status, 204, "{}", out.body);
        let r = delete(other_access).await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(device_count(ctx, &user.id).await, 1);

        let sessions_key = format!("sessions/{}", user.id);
        let live_copy = ctx.stack().wrangler.kv_get(&sessions_key);
        let deleted_at = std::time::Instant::now();
        let r = delete(user.access.clone()).await;
        assert_eq!(r.status, 204, "{}", r.body);
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM users WHERE id = $1::text::uuid",
                &[&user.id],
            )
            .await?
            .get(0);
        assert_eq!(left, 0, "the account is gone");
        assert_eq!(device_count(ctx, &user.id).await, 0);
        let quarantined: bool = db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM freed_tunnel_addresses
                                WHERE n = $1::text::inet - '10.64.0.0'::inet)",
                &[&address],
            )
            .await?
            .get(0);
        assert!(quarantined, "{address} rests before another device gets it");
        assert_eq!(kv_devices(ctx, &user.id), Some(vec![]));

        let again = login(user.email.clone()).await;
        assert_eq!(again.status, 401, "{}", again.body);
        let refresh = send(
            ctx,
            "POST",
            "/v1/auth/refresh",
            Some(json!({"refresh_token": user.refresh})),
            None,
        )
        .await;
        assert_eq!(refresh.status, 401, "{}", refresh.body);
        for (method, path) in [
            ("GET", "/v1/me"),
            ("GET", "/v1/devices"),
            ("DELETE", "/v1/me"),
        ] {
            let r = send(ctx, method, path, None, Some(&user.access)).await;
            assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        }
        // Where the session copy is still the one from before the deletion
        // (KV carries the change to other locations within a minute), the
        // token passes at the edge, and its registration is refused by the
        // user's object, before PostgreSQL (where it would draw a tunnel
        // address; `store::a_registration_for_a_deleted_account_...` checks
        // that PostgreSQL draws none for a deleted user either).
        // After the alarm the deletion armed (5 s) has written the revoked
        // copy again, so that it cannot overwrite the stale one meanwhile.
        let alarm = std::time::Duration::from_secs(6);
        tokio::time::sleep(alarm.saturating_sub(deleted_at.elapsed())).await;
        let revoked_copy = ctx.stack().wrangler.kv_get(&sessions_key);
        let live_copy = live_copy.expect("a session copy before the deletion");
        ctx.stack().wrangler.kv_put(&sessions_key, &live_copy);
        let late = create(ctx, &user, "tablet", &wg_key()).await;
        match &revoked_copy {
            Some(copy) => ctx.stack().wrangler.kv_put(&sessions_key, copy),
            None => ctx.stack().wrangler.kv_delete(&sessions_key),
        }
        assert_eq!(late.status, 401, "{}", late.body);
        assert_eq!(late.body["code"], "session_revoked", "{}", late.body);
        // Refused by the user's object, past the edge's check of the copy
        // (which says the session "has been signed out").
        assert_ne!(
            late.body["detail"], "This session has been signed out.",
            "refused at the edge, not by the object"
        );

        let cut = new_user(ctx).await;
        let fault = [("x-keenvpn-fault", "account.marked")];
        let r = send_with(ctx, "DELETE", "/v1/me", None, Some(&cut.access), &fault).await;
        assert_eq!(r.status, 503, "{}", r.body);
        eventually(
            std::time::Duration::from_secs(15),
            "the alarm deleted the account",
            || {
                let db = &db;
                let id = cut.id.clone();
                async move {
                    let left: i64 = db
                        .query_one(
                            "SELECT count(*) FROM users WHERE id = $1::text::uuid",
                            &[&id],
                        )
                        .await
                        .ok()?
                        .get(0);
                    (left == 0).then_some(())
                }
            },
        )
        .await;
        // The object saves its end of the deletion just after PostgreSQL's
        // commit: until then, a refresh is 503.
        eventually(
            std::time::Duration::from_secs(5),
            "the refresh refused",
            || {
                let body = json!({"refresh_token": cut.refresh});
                async move {
                    let r = send(ctx, "POST", "/v1/auth/refresh", Some(body), None).await;
                    (r.status == 401).then_some(())
                }
            },
        )
        .await;
        Ok(())
    })
}
