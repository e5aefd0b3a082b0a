//! Billing webhooks: signatures, idempotency, ordering, and the entitlement
//! change reaching the user's next refresh and device limit.

use crate::common::*;
use crate::harness::{Ctx, Test};
use keenvpn_edge::domain::entitlement::Status;
use keenvpn_edge::domain::stripe::{self, Example};
use libtest_mimic::Failed;
use serde_json::{Value, json};

pub const TESTS: &[(&str, Test)] = &[
    (
        "billing::unsigned_forged_stale_or_reserialised_events_are_refused_and_change_nothing",
        bad_signatures,
    ),
    (
        "billing::ten_concurrent_deliveries_of_one_event_apply_once",
        concurrent_replays,
    ),
    (
        "billing::an_older_event_never_overwrites_newer_state",
        out_of_order,
    ),
    (
        "billing::an_upgrade_reaches_the_next_refresh_and_the_device_limit",
        upgrade_then_downgrade,
    ),
    (
        "billing::events_for_unknown_customers_are_acknowledged",
        unknown_customer,
    ),
];

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn secret() -> String {
    dev_var("STRIPE_WEBHOOK_SECRET")
}

struct Sub {
    event: String,
    created: i64,
    sub: String,
    customer: String,
    user: String,
    plan: &'static str,
    status: Status,
}

fn event(kind: &str, s: &Sub) -> Vec<u8> {
    let ex = Example {
        event_id: &s.event,
        created: s.created,
        subscription_id: &s.sub,
        customer_id: &s.customer,
        user_id: &s.user,
        plan_id: s.plan,
        status: s.status,
        current_period_end: now() + 30 * 86400,
        cancel_at_period_end: false,
    };
    serde_json::to_vec(&stripe::example_event(kind, &ex)).unwrap()
}

async fn deliver(ctx: &Ctx, body: &[u8], signature: Option<String>) -> (u16, Value) {
    let mut req = ctx
        .http
        .post(ctx.url("/v1/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn deliver_signed(ctx: &Ctx, body: &[u8]) -> (u16, Value) {
    deliver(ctx, body, Some(stripe::sign(&secret(), now(), body))).await
}

fn sub_for(user: &User, plan: &'static str) -> Sub {
    Sub {
        event: unique("evt_"),
        created: now() - 60,
        sub: unique("sub_"),
        customer: unique("cus_"),
        user: user.id.clone(),
        plan,
        status: Status::Active,
    }
}

async fn plan_in_db(ctx: &Ctx, user_id: &str) -> Option<(String, String)> {
    let db = db(ctx).await;
    db.query_opt(
        "SELECT plan_id, status FROM subscriptions WHERE user_id = $1::text::uuid",
        &[&user_id],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

async fn events_recorded(ctx: &Ctx, id: &str) -> i64 {
    let db = db(ctx).await;
    db.query_one("SELECT count(*) FROM webhook_events WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

fn bad_signatures(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let user = new_user(ctx).await;
        let s = sub_for(&user, "plus");
        let body = event("customer.subscription.created", &s);
        let reserialised = serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&body)?)?;
        let cases: Vec<(&str, Vec<u8>, Option<String>, &str)> = vec![
            ("no header", body.clone(), None, "signature_missing"),
            (
                "garbage header",
                body.clone(),
                Some("nonsense".into()),
                "signature_malformed",
            ),
            (
                "wrong secret",
                body.clone(),
                Some(stripe::sign("whsec_wrong", now(), &body)),
                "signature_mismatch",
            ),
            (
                "stale timestamp",
                body.clone(),
                Some(stripe::sign(&secret(), now() - 301, &body)),
                "signature_stale",
            ),
            (
                "re-serialised body",
                reserialised,
                Some(stripe::sign(&secret(), now(), &body)),
                "signature_mismatch",
            ),
        ];
        for (what, b, sig, code) in cases {
            let (status, json) = deliver(ctx, &b, sig).await;
            assert_eq!(status, 400, "{what}: {json}");
            assert_eq!(json["code"], code, "{what}");
        }
        assert_eq!(events_recorded(ctx, &s.event).await, 0);
        assert_eq!(plan_in_db(ctx, &user.id).await, None, "nothing applied");
        Ok(())
    })
}

fn concurrent_replays(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let user = new_user(ctx).await;
        let s = sub_for(&user, "plus");
        let body = event("customer.subscription.created", &s);
        let results = futures::future::join_all((0..10).map(|_| deliver_signed(ctx, &body))).await;
        for (status, json) in &results {
            assert_eq!(*status, 200, "{json}");
        }
        let applied = results.iter().filter(|(_, j)| j["applied"] == true).count();
        assert_eq!(
            applied, 1,
            "exactly one delivery had an effect: {results:?}"
        );
        assert_eq!(events_recorded(ctx, &s.event).await, 1);
        assert_eq!(
            plan_in_db(ctx, &user.id).await,
            Some(("plus".into(), "active".into()))
        );
        Ok(())
    })
}

fn out_of_order(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let user = new_user(ctx).await;
        let mut newer = sub_for(&user, "family");
        newer.created = now() - 10;
        let mut older = sub_for(&user, "plus");
        older.created = now() - 100;
        older.sub = newer.sub.clone();
        older.customer = newer.customer.clone();
        // The newer event arrives first...
        assert_eq!(
            deliver_signed(ctx, &event("customer.subscription.updated", &newer))
                .await
                .0,
            200
        );
        // ...the older one is acknowledged but changes nothing.
        let (status, json) =
            deliver_signed(ctx, &event("customer.subscription.updated", &older)).await;
        assert_eq!(status, 200);
        assert_eq!(json["applied"], false, "{json}");
        assert_eq!(
            plan_in_db(ctx, &user.id).await,
            Some(("family".into(), "active".into()))
        );
        Ok(())
    })
}

async fn add_device(ctx: &Ctx, user: &User) -> u16 {
    send(
        ctx,
        "POST",
        "/v1/devices",
        Some(json!({"name": unique("d"), "public_key": wg_key()})),
        Some(&user.access),
    )
    .await
    .status
}

fn upgrade_then_downgrade(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        assert_eq!(add_device(ctx, &user).await, 201);
        assert_eq!(add_device(ctx, &user).await, 403, "free plan: one device");

        // Upgrade to Plus.
        let mut s = sub_for(&user, "plus");
        let (status, json) = deliver_signed(ctx, &event("customer.subscription.created", &s)).await;
        assert_eq!((status, &json["applied"]), (200, &json!(true)), "{json}");
        let c = user.refresh(ctx).await;
        assert_eq!(
            c["ent"]["plan"], "plus",
            "the next refresh carries the new plan"
        );
        assert_eq!(c["ent"]["max_devices"], 5);
        for _ in 0..4 {
            assert_eq!(add_device(ctx, &user).await, 201);
        }
        let list = send(ctx, "GET", "/v1/devices", None, Some(&user.access)).await;
        assert_eq!(list.body["max_devices"], 5);
        assert_eq!(add_device(ctx, &user).await, 403, "plus: five devices");

        // A failed payment keeps the plan through the grace period.
        s.event = unique("evt_");
        s.created = now() - 30;
        assert_eq!(
            deliver_signed(ctx, &event("invoice.payment_failed", &s))
                .await
                .0,
            200
        );
        assert_eq!(
            plan_in_db(ctx, &user.id).await,
            Some(("plus".into(), "past_due".into()))
        );
        assert_eq!(user.refresh(ctx).await["ent"]["plan"], "plus");

        // Cancelled: back to free. Existing devices stay; new ones are refused.
        s.event = unique("evt_");
        s.created = now() - 20;
        assert_eq!(
            deliver_signed(ctx, &event("customer.subscription.deleted", &s))
                .await
                .0,
            200
        );
        let c = user.refresh(ctx).await;
        assert_eq!(c["ent"]["plan"], "free");
        assert_eq!(c["ent"]["max_devices"], 1);
        let list = send(ctx, "GET", "/v1/devices", None, Some(&user.access)).await;
        assert_eq!(
            list.body["devices"].as_array().unwrap().len(),
            5,
            "a downgrade keeps existing devices"
        );
        assert_eq!(
            list.body["max_devices"], 1,
            "the cached entitlement follows the downgrade"
        );
        assert_eq!(add_device(ctx, &user).await, 403, "but blocks new ones");
        Ok(())
    })
}

fn unknown_customer(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let s = Sub {
            event: unique("evt_"),
            created: now(),
            sub: unique("sub_"),
            customer: unique("cus_"),
            user: "6f9619ff-8b86-4d11-b42d-00c04fc964ff".into(),
            plan: "plus",
            status: Status::Active,
        };
        let (status, json) = deliver_signed(ctx, &event("customer.subscription.created", &s)).await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["applied"], false);
        // An event type we do not handle is acknowledged too.
        let (status, _) = deliver_signed(ctx, &event("customer.created", &s)).await;
        assert_eq!(status, 200);
        Ok(())
    })
}
