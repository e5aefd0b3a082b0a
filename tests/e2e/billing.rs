//! Billing webhooks: signatures, idempotency, ordering, and the entitlement
//! change reaching the user's next refresh and device limit.

use crate::common::*;
use crate::harness::{Ctx, Test};
use crate::support::eventually;
use keenvpn_edge::domain::entitlement::Status;
use keenvpn_edge::domain::stripe::{self, Example};
use libtest_mimic::Failed;
use serde_json::{Value, json};
use std::time::Duration;

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
        "billing::a_renewal_delivered_after_its_invoice_still_sets_the_period_and_plan",
        renewal_after_invoice,
    ),
    (
        "billing::a_failed_renewal_keeps_the_plan_for_the_grace_from_the_failure_only",
        failed_renewal,
    ),
    (
        "billing::a_trials_free_first_invoice_leaves_it_trialing",
        trial_invoice,
    ),
    (
        "billing::an_invoice_older_than_the_status_changes_nothing",
        stale_invoice,
    ),
    (
        "billing::an_end_delivered_after_the_final_invoice_still_ends_the_subscription_for_good",
        end_after_final_invoice,
    ),
    (
        "billing::a_checkout_s_first_event_retried_after_its_payment_in_the_same_second_undoes_nothing",
        checkout_retried_after_payment,
    ),
    (
        "billing::a_new_subscription_survives_the_end_of_the_one_it_replaced",
        replaced_subscription_ends,
    ),
    (
        "billing::the_end_of_a_second_subscription_leaves_the_first_ones_plan",
        second_subscription_ends,
    ),
    (
        "billing::a_price_names_its_plan_by_its_key_or_its_prefix_before_the_checkouts_metadata",
        unknown_lookup_key,
    ),
    (
        "billing::an_upgrade_reaches_the_next_refresh_and_the_device_limit",
        upgrade_then_downgrade,
    ),
    (
        "billing::after_a_downgrade_the_connect_lets_in_the_devices_the_list_shows_first",
        same_second_devices,
    ),
    (
        "billing::events_for_unknown_customers_are_acknowledged_and_logged_with_their_request_ids",
        unknown_customer,
    ),
    (
        "billing::a_subscription_event_without_our_user_id_is_matched_by_its_customer",
        matched_by_customer,
    ),
    (
        "billing::a_sign_in_with_older_inputs_does_not_undo_a_billing_change",
        stale_sign_in,
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

#[derive(Clone)]
struct Sub {
    event: String,
    created: i64,
    sub: String,
    customer: String,
    user: String,
    plan: &'static str,
    status: Status,
    period_end: i64,
    cancel_at_period_end: bool,
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
        current_period_end: s.period_end,
        cancel_at_period_end: s.cancel_at_period_end,
    };
    serde_json::to_vec(&stripe::example_event(kind, &ex)).unwrap()
}

async fn deliver(ctx: &Ctx, body: &[u8], signature: Option<String>) -> (u16, Value) {
    let (status, json, _) = deliver_with_id(ctx, body, signature).await;
    (status, json)
}

/// [`deliver`], with the answer's request id.
async fn deliver_with_id(
    ctx: &Ctx,
    body: &[u8],
    signature: Option<String>,
) -> (u16, Value, String) {
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
    let id = resp.headers()["x-request-id"]
        .to_str()
        .expect("a request id")
        .to_owned();
    (status, resp.json().await.unwrap_or(Value::Null), id)
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
        period_end: now() + 30 * 86400,
        cancel_at_period_end: false,
    }
}

/// `s` as a later (or earlier) event: a fresh event id, created at `created`.
fn next(s: &Sub, created: i64) -> Sub {
    Sub {
        event: unique("evt_"),
        created,
        ..s.clone()
    }
}

/// The plan and status of `s`'s row.
async fn plan_in_db(ctx: &Ctx, s: &Sub) -> Option<(String, String)> {
    row_in_db(ctx, s)
        .await
        .map(|(plan, status, _)| (plan, status))
}

/// The row of `s`'s subscription: plan, status and period end (unix seconds).
async fn row_in_db(ctx: &Ctx, s: &Sub) -> Option<(String, String, i64)> {
    let db = db(ctx).await;
    db.query_opt(
        "SELECT plan_id, status, extract(epoch FROM current_period_end)::bigint
         FROM subscriptions WHERE provider_subscription_id = $1",
        &[&s.sub],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// A new user with a Plus subscription created at `t`, its first event applied.
async fn plus_subscriber(ctx: &Ctx, t: i64) -> (User, Sub) {
    let user = new_user(ctx).await;
    let mut s = sub_for(&user, "plus");
    s.created = t;
    expect_applied(ctx, "customer.subscription.created", &s, true).await;
    (user, s)
}

/// Delivers `kind` for `s` and checks the answer's `applied`.
async fn expect_applied(ctx: &Ctx, kind: &str, s: &Sub, applied: bool) {
    let (status, json) = deliver_signed(ctx, &event(kind, s)).await;
    assert_eq!(status, 200, "{kind}: {json}");
    assert_eq!(json["applied"], applied, "{kind}: {json}");
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
        assert_eq!(plan_in_db(ctx, &s).await, None, "nothing applied");
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
            plan_in_db(ctx, &s).await,
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
            plan_in_db(ctx, &newer).await,
            Some(("family".into(), "active".into()))
        );
        Ok(())
    })
}

/// At renewal Stripe sends `customer.subscription.updated` (the next period)
/// about an hour before `invoice.paid`. When the first delivery of the update
/// fails and its retry arrives after the invoice, the update still brings the
/// period and plan; the status stays the newer invoice's.
fn renewal_after_invoice(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 3 * 3600;
        let (mut user, s) = plus_subscriber(ctx, t).await;

        let mut renewal = next(&s, t + 3600);
        renewal.plan = "family";
        renewal.period_end = s.period_end + 30 * 86400;
        renewal.status = Status::PastDue;
        // The invoice (an hour later) is delivered first...
        expect_applied(ctx, "invoice.paid", &next(&s, t + 7200), true).await;
        // ...then the retry of the renewal.
        expect_applied(ctx, "customer.subscription.updated", &renewal, true).await;
        assert_eq!(
            row_in_db(ctx, &s).await,
            Some(("family".into(), "active".into(), renewal.period_end))
        );
        let c = user.refresh(ctx).await;
        assert_eq!(c["ent"]["plan"], "family");
        // A replay of the renewal changes nothing.
        let (status, json) =
            deliver_signed(ctx, &event("customer.subscription.updated", &renewal)).await;
        assert_eq!(status, 200);
        assert_eq!(
            (&json["applied"], &json["duplicate"]),
            (&json!(false), &json!(true)),
            "{json}"
        );
        Ok(())
    })
}

/// At a renewal Stripe moves the subscription into the new period, then
/// charges; when the charge fails, `customer.subscription.updated` says
/// `past_due` with the new period's end. That unpaid period grants the plan
/// for the grace (3 days) from the failure only: a failure 4 days ago is the
/// free plan now, one a day ago is Plus until 3 days after it. (It used to be
/// Plus for the whole new period and the grace.) A payment then makes it
/// active again, through the period and its grace.
fn failed_renewal(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let grace = keenvpn_edge::domain::entitlement::GRACE_SECS;
        for (days_ago, plan) in [(4, "free"), (1, "plus")] {
            let failed_at = now() - days_ago * 86400;
            let (mut user, s) = plus_subscriber(ctx, failed_at - 30 * 86400).await;
            let mut failed = next(&s, failed_at);
            failed.status = Status::PastDue;
            failed.period_end = failed_at + 30 * 86400;
            expect_applied(ctx, "customer.subscription.updated", &failed, true).await;
            let c = user.refresh(ctx).await;
            assert_eq!(c["ent"]["plan"], plan, "failed {days_ago} days ago: {c}");
            if plan == "plus" {
                assert_eq!(c["ent"]["until"], failed_at + grace, "{c}");
                // A later event that leaves it past due (a retry's failure)
                // keeps the grace where it started.
                expect_applied(
                    ctx,
                    "invoice.payment_failed",
                    &next(&s, failed_at + 600),
                    true,
                )
                .await;
                let c = user.refresh(ctx).await;
                assert_eq!(c["ent"]["until"], failed_at + grace, "{c}");
            }

            expect_applied(ctx, "invoice.paid", &next(&s, failed_at + 3600), true).await;
            let c = user.refresh(ctx).await;
            assert_eq!(c["ent"]["plan"], "plus", "{c}");
            assert_eq!(c["ent"]["until"], failed.period_end + grace, "{c}");
        }
        Ok(())
    })
}

/// A trial starts: Stripe sends the subscription (trialing) and its first
/// invoice, paid at $0. That payment ends no trial: the subscription stays
/// trialing (it turned active) until Stripe's subscription event at the
/// trial's end says otherwise. A failed first charge then makes it past due.
fn trial_invoice(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 3 * 3600;
        let user = new_user(ctx).await;
        let mut s = sub_for(&user, "plus");
        s.created = t;
        s.status = Status::Trialing;
        expect_applied(ctx, "customer.subscription.created", &s, true).await;
        expect_applied(ctx, "invoice.paid", &next(&s, t + 1), false).await;
        assert_eq!(
            plan_in_db(ctx, &s).await,
            Some(("plus".into(), "trialing".into()))
        );
        expect_applied(ctx, "invoice.payment_failed", &next(&s, t + 60), true).await;
        assert_eq!(
            plan_in_db(ctx, &s).await,
            Some(("plus".into(), "past_due".into()))
        );
        Ok(())
    })
}

/// The renewal's first charge fails, a retry succeeds, and both the renewal
/// and the failure are delivered late: the failure is older than the status
/// the paid invoice set, so it changes nothing, although it is newer than
/// the renewal (the newest subscription event applied).
fn stale_invoice(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 3 * 3600;
        let (_, s) = plus_subscriber(ctx, t).await;

        let mut renewal = next(&s, t + 1800);
        renewal.period_end = s.period_end + 30 * 86400;
        expect_applied(ctx, "invoice.paid", &next(&s, t + 7200), true).await;
        expect_applied(ctx, "customer.subscription.updated", &renewal, true).await;
        let renewed = Some(("plus".into(), "active".into(), renewal.period_end));
        assert_eq!(row_in_db(ctx, &s).await, renewed);

        expect_applied(ctx, "invoice.payment_failed", &next(&s, t + 3600), false).await;
        assert_eq!(row_in_db(ctx, &s).await, renewed);
        // A newer failure still applies.
        expect_applied(ctx, "invoice.payment_failed", &next(&s, t + 9000), true).await;
        assert_eq!(
            plan_in_db(ctx, &s).await,
            Some(("plus".into(), "past_due".into()))
        );
        Ok(())
    })
}

/// The user cancels at once: Stripe sends `customer.subscription.deleted`,
/// and `invoice.paid` for the final invoice a second later. The deletion's
/// first delivery fails, and its retry comes after the invoice: the
/// subscription still ends, although the invoice set the status last and
/// is newer. (It stayed active, granting Plus to the end of the period and
/// its grace.) And once ended, nothing brings it back: not a subscription
/// event of the same second, nor a later invoice.
fn end_after_final_invoice(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 3 * 3600;
        let (mut user, s) = plus_subscriber(ctx, t).await;
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "plus");

        let end = next(&s, t + 600);
        expect_applied(ctx, "invoice.paid", &next(&s, t + 601), true).await;
        expect_applied(ctx, "customer.subscription.deleted", &end, true).await;
        let ended = Some(("plus".into(), "canceled".into()));
        assert_eq!(plan_in_db(ctx, &s).await, ended);
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "free");

        // An update of the same second as the end is applied (its period and
        // plan), but the status stays ended.
        expect_applied(
            ctx,
            "customer.subscription.updated",
            &next(&s, t + 600),
            true,
        )
        .await;
        expect_applied(ctx, "invoice.paid", &next(&s, t + 900), false).await;
        assert_eq!(plan_in_db(ctx, &s).await, ended);
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "free");
        Ok(())
    })
}

/// A checkout: `customer.subscription.created` (incomplete), then, in the
/// same second, the payment's `invoice.paid` and
/// `customer.subscription.updated` (active). The first delivery of the
/// creation fails, and its retry comes last: the subscription stays active.
/// (Events of the same second took the status in the order delivered, and
/// the paying user fell back to the free plan until the next event.)
fn checkout_retried_after_payment(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        let t = now() - 60;
        let mut paid = sub_for(&user, "plus");
        paid.created = t;
        let mut created = next(&paid, t);
        created.status = Status::Incomplete;

        expect_applied(ctx, "invoice.paid", &next(&paid, t), false).await;
        expect_applied(ctx, "customer.subscription.updated", &paid, true).await;
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "plus");
        expect_applied(ctx, "customer.subscription.created", &created, true).await;
        assert_eq!(
            plan_in_db(ctx, &paid).await,
            Some(("plus".into(), "active".into()))
        );
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "plus");

        // A newer `incomplete` would still apply (not that Stripe sends one).
        let mut later = next(&paid, t + 1);
        later.status = Status::Incomplete;
        expect_applied(ctx, "customer.subscription.updated", &later, true).await;
        assert_eq!(
            plan_in_db(ctx, &paid).await,
            Some(("plus".into(), "incomplete".into()))
        );
        Ok(())
    })
}

/// The plan the user's next refresh carries.
async fn plan_after_refresh(ctx: &Ctx, user: &mut User) -> String {
    let c = user.refresh(ctx).await;
    c["ent"]["plan"].as_str().unwrap_or_default().to_owned()
}

/// A Plus subscription set to cancel at period end, then Family bought as a
/// second subscription: each has a row of its own, and the user gets the
/// better plan of the two that are paid for. A checkout stalled before its
/// first payment takes nothing away; the changes and the end of the Plus
/// subscription leave the user on Family, whose invoices still apply.
fn replaced_subscription_ends(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 3 * 3600;
        let (mut user, a) = plus_subscriber(ctx, t).await;
        let mut cancelling = next(&a, t + 60);
        cancelling.cancel_at_period_end = true;
        expect_applied(ctx, "customer.subscription.updated", &cancelling, true).await;

        let mut b = sub_for(&user, "family");
        b.customer = a.customer.clone();
        b.period_end = a.period_end + 10 * 86400;
        // Family's checkout waits for its first payment (incomplete): the
        // paying Plus subscription still decides.
        let mut pending = next(&b, t + 90);
        pending.status = Status::Incomplete;
        expect_applied(ctx, "customer.subscription.created", &pending, true).await;
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "plus");
        // Paid, it does.
        b.created = t + 120;
        expect_applied(ctx, "customer.subscription.updated", &b, true).await;
        let family = Some(("family".into(), "active".into(), b.period_end));
        assert_eq!(row_in_db(ctx, &b).await, family);
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "family");

        // A later change to the older Plus subscription (Stripe renders it
        // active until its period ends) changes its own row only.
        let mut still_cancelling = next(&cancelling, t + 180);
        still_cancelling.cancel_at_period_end = true;
        expect_applied(
            ctx,
            "customer.subscription.updated",
            &still_cancelling,
            true,
        )
        .await;
        assert_eq!(row_in_db(ctx, &b).await, family);
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "family");

        // The Plus subscription ends.
        let ended = next(&a, t + 3600);
        expect_applied(ctx, "customer.subscription.deleted", &ended, true).await;
        assert_eq!(
            plan_in_db(ctx, &a).await,
            Some(("plus".into(), "canceled".into()))
        );
        assert_eq!(row_in_db(ctx, &b).await, family);
        let c = user.refresh(ctx).await;
        assert_eq!(
            (c["ent"]["plan"].as_str(), c["ent"]["max_devices"].as_u64()),
            (Some("family"), Some(10))
        );

        // Family's invoices reach its row.
        expect_applied(ctx, "invoice.payment_failed", &next(&b, t + 7200), true).await;
        assert_eq!(
            plan_in_db(ctx, &b).await,
            Some(("family".into(), "past_due".into()))
        );
        expect_applied(ctx, "invoice.paid", &next(&b, t + 7300), true).await;
        assert_eq!(row_in_db(ctx, &b).await, family);
        Ok(())
    })
}

/// Family bought beside a running Plus subscription, then cancelled at once:
/// the user is back on Plus, which they still pay for, not on the free plan.
/// (With one subscription row per user, Family's end overwrote the row that
/// had followed it, and the user fell to free.)
fn second_subscription_ends(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 3 * 3600;
        let (mut user, plus) = plus_subscriber(ctx, t).await;
        let mut family = sub_for(&user, "family");
        family.customer = plus.customer.clone();
        family.created = t + 60;
        // Bought later, so created later and renewing later.
        family.period_end = plus.period_end + 10 * 86400;
        expect_applied(ctx, "customer.subscription.created", &family, true).await;
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "family");

        let mut cancelled = next(&family, t + 120);
        cancelled.status = Status::Canceled;
        expect_applied(ctx, "customer.subscription.deleted", &cancelled, true).await;
        let c = user.refresh(ctx).await;
        assert_eq!(
            (c["ent"]["plan"].as_str(), c["ent"]["max_devices"].as_u64()),
            (Some("plus"), Some(5))
        );
        assert_eq!(
            plan_in_db(ctx, &plus).await,
            Some(("plus".into(), "active".into()))
        );
        // And a sign-in reads the same from PostgreSQL.
        let login = user.login(ctx).await;
        assert_eq!(login.status, 200, "{}", login.body);
        assert_eq!(
            claims(s(&login.body["access_token"]))["ent"]["plan"],
            "plus"
        );
        Ok(())
    })
}

/// `kind` for `s`, with the price's lookup key and the metadata's plan id
/// set apart.
async fn deliver_priced(
    ctx: &Ctx,
    kind: &str,
    s: &Sub,
    lookup_key: &str,
    plan_id: &str,
) -> (u16, Value) {
    let mut body: Value = serde_json::from_slice(&event(kind, s)).unwrap();
    body["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = json!(lookup_key);
    body["data"]["object"]["metadata"]["plan_id"] = json!(plan_id);
    deliver_signed(ctx, &serde_json::to_vec(&body).unwrap()).await
}

/// Prices are often looked up by keys such as `plus_eur_2026`: a key of
/// that shape (`<plan>_<currency>_<year>`) names the plan, ahead of the plan id our
/// checkout put in the subscription's metadata, which stays when the customer
/// moves to another price. A key that names no plan leaves it to the
/// metadata. An event
/// that names no plan of ours for a new subscription is refused unrecorded,
/// so that the provider's retry applies it once the plan exists; one for a
/// subscription we know still applies, and the plan stays.
fn unknown_lookup_key(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        let s = sub_for(&user, "plus");
        let (status, json) =
            deliver_priced(ctx, "customer.subscription.created", &s, "plus_eur_2026", "plus").await;
        assert_eq!((status, &json["applied"]), (200, &json!(true)), "{json}");
        assert_eq!(plan_after_refresh(ctx, &mut user).await, "plus");

        // Bought as Family at checkout, moved to a Plus price: the
        // metadata still says `family`, the price decides.
        let mut moved = new_user(ctx).await;
        let bought = sub_for(&moved, "family");
        let kind = "customer.subscription.created";
        let (status, json) = deliver_priced(ctx, kind, &bought, "family_eur_2026", "family").await;
        assert_eq!((status, &json["applied"]), (200, &json!(true)), "{json}");
        assert_eq!(plan_after_refresh(ctx, &mut moved).await, "family");
        let switched = next(&bought, bought.created + 60);
        let kind = "customer.subscription.updated";
        let (status, json) = deliver_priced(ctx, kind, &switched, "plus_eur_2026", "family").await;
        assert_eq!((status, &json["applied"]), (200, &json!(true)), "{json}");
        assert_eq!(plan_after_refresh(ctx, &mut moved).await, "plus");

        // A later change whose price names no plan at all: the status applies,
        // the plan stays.
        let mut lapsed = next(&s, s.created + 60);
        lapsed.status = Status::PastDue;
        let (status, json) =
            deliver_priced(ctx, "customer.subscription.updated", &lapsed, "gold_2026", "gold").await;
        assert_eq!((status, &json["applied"]), (200, &json!(true)), "{json}");
        assert_eq!(plan_in_db(ctx, &s).await, Some(("plus".into(), "past_due".into())));

        // A new subscription for a plan this deployment does not have yet.
        let mut other = new_user(ctx).await;
        let plan = unique("e2e_plan_").replace('-', "_");
        let s = sub_for(&other, "plus");
        let kind = "customer.subscription.created";
        let (status, json) = deliver_priced(ctx, kind, &s, &format!("{plan}_eur"), &plan).await;
        assert_eq!((status, json["code"].as_str()), (500, Some("not_configured")), "{json}");
        assert_eq!(events_recorded(ctx, &s.event).await, 0, "not recorded");
        assert_eq!(plan_in_db(ctx, &s).await, None);
        // The plan is added; the provider's retry of the same event applies.
        db(ctx)
            .await
            .execute(
                "INSERT INTO plans (id, name, max_devices, region_tiers) VALUES ($1, 'Test plan', 2, '{free}')",
                &[&plan],
            )
            .await
            .unwrap();
        let (status, json) = deliver_priced(ctx, kind, &s, &format!("{plan}_eur"), &plan).await;
        assert_eq!((status, &json["applied"]), (200, &json!(true)), "{json}");
        assert_eq!(plan_after_refresh(ctx, &mut other).await, plan);
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
            plan_in_db(ctx, &s).await,
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
        // Before the next refresh the token still says Plus; the refusal
        // names the limit enforced, the free plan's.
        let refused = send(
            ctx,
            "POST",
            "/v1/devices",
            Some(json!({"name": unique("d"), "public_key": wg_key()})),
            Some(&user.access),
        )
        .await;
        assert_eq!(refused.status, 403, "{}", refused.body);
        assert_eq!(
            (&refused.body["code"], &refused.body["max_devices"]),
            (&json!("device_limit_reached"), &json!(1)),
            "{}",
            refused.body
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

/// Two devices made within one second, the older with the larger id. After
/// a downgrade to one device, the one the device list shows first (the
/// older, by the microsecond) is the one the connect lets in, and the other
/// is refused as not entitled. (The user's object ranked devices of one
/// second by id, so the connect let in the newer and refused the older.)
fn same_second_devices(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let mut user = new_user(ctx).await;
        let sub = sub_for(&user, "plus");
        let (status, json) = deliver_signed(ctx, &event("customer.subscription.created", &sub)).await;
        assert_eq!((status, &json["applied"]), (200, &json!(true)), "{json}");
        user.refresh(ctx).await;

        // The two devices, written as a registration writes them.
        let db = db(ctx).await;
        let uuids = db
            .query("SELECT gen_random_uuid()::text FROM generate_series(1, 2) ORDER BY 1", &[])
            .await?;
        let (newer, older): (String, String) = (uuids[0].get(0), uuids[1].get(0));
        for (id, micros) in [(&older, 100_000), (&newer, 400_000)] {
            let n: i64 = db
                .query_one("SELECT nextval('device_address_seq')", &[])
                .await?
                .get(0);
            let (v4, v6) = keenvpn_edge::domain::device::tunnel_addresses(n as u64)
                .expect("an address");
            db.execute(
                "INSERT INTO devices (id, user_id, name, public_key, ipv4_address, ipv6_address, created_at)
                 VALUES ($1::text::uuid, $2::text::uuid, $3, $4, $5::text::inet, $6::text::inet,
                         date_trunc('second', now()) - interval '1 minute' + $7::int * interval '1 microsecond')",
                &[id, &user.id, &unique("d"), &wg_key(), &v4, &v6, &micros],
            )
            .await?;
        }
        // A registration through the API: the user's object takes in the
        // list PostgreSQL answers with, and its copy for the connect path.
        assert_eq!(add_device(ctx, &user).await, 201);
        let list = send(ctx, "GET", "/v1/devices", None, Some(&user.access)).await;
        let listed: Vec<&str> = list.body["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| s(&d["id"]))
            .collect();
        assert_eq!(&listed[..2], [older.as_str(), newer.as_str()], "{}", list.body);

        let ended = next(&sub, now() - 10);
        let (status, _) = deliver_signed(ctx, &event("customer.subscription.deleted", &ended)).await;
        assert_eq!(status, 200);
        assert_eq!(user.refresh(ctx).await["ent"]["max_devices"], 1);
        let connect = |device: &str| {
            let body = Some(json!({"device_id": device}));
            let access = user.access.clone();
            async move { send(ctx, "POST", "/v1/connect", body, Some(&access)).await }
        };
        let first = connect(&older).await;
        assert_eq!(first.status, 200, "{}", first.body);
        let second = connect(&newer).await;
        assert_eq!(second.status, 403, "{}", second.body);
        assert_eq!(second.body["code"], "device_not_entitled");
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
            period_end: now() + 30 * 86400,
            cancel_at_period_end: false,
        };
        let signed = |body: Vec<u8>| {
            let signature = stripe::sign(&secret(), now(), &body);
            async move { deliver_with_id(ctx, &body, Some(signature)).await }
        };
        let (status, json, unknown) = signed(event("customer.subscription.created", &s)).await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["applied"], false);
        // An event type we do not handle is acknowledged too.
        let (status, _, ignored) = signed(event("customer.created", &s)).await;
        assert_eq!(status, 200);
        // Each says in the log what became of it, under its request's id.
        for (id, msg) in [
            (unknown, "webhook for an unknown customer"),
            (ignored, "webhook ignored"),
        ] {
            let field = format!("\"request_id\":\"{id}\"");
            let line = eventually(Duration::from_secs(10), msg, || async {
                let log = ctx.stack().wrangler.log();
                log.lines()
                    .find(|l| l.contains(msg) && l.contains(&field))
                    .map(str::to_owned)
            })
            .await;
            assert!(line.contains(&s.event), "{line}");
        }
        Ok(())
    })
}

/// A subscription event whose object carries no `metadata.user_id` (one made
/// in the provider's dashboard, or whose metadata went on the checkout
/// session instead) is matched by its customer id: an upgrade for a known
/// customer applies; one for an unknown customer is acknowledged and changes
/// nothing. Both used to fail in the database (503, retried by the provider
/// for days and never applied).
fn matched_by_customer(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 600;
        let (_user, plus) = plus_subscriber(ctx, t).await;
        let mut family = next(&plus, t + 60);
        family.plan = "family";
        let without_user = |s: &Sub| -> Result<Vec<u8>, Failed> {
            let mut body: Value =
                serde_json::from_slice(&event("customer.subscription.updated", s))?;
            let metadata = body["data"]["object"]["metadata"]
                .as_object_mut()
                .ok_or("the example event has metadata")?;
            metadata
                .remove("user_id")
                .ok_or("the example event names the user")?;
            Ok(serde_json::to_vec(&body)?)
        };
        let (status, json) = deliver_signed(ctx, &without_user(&family)?).await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["applied"], true, "{json}");
        assert_eq!(
            plan_in_db(ctx, &plus).await,
            Some(("family".into(), "active".into()))
        );

        let stranger = Sub {
            event: unique("evt_"),
            sub: unique("sub_"),
            customer: unique("cus_"),
            ..family.clone()
        };
        let (status, json) = deliver_signed(ctx, &without_user(&stranger)?).await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["applied"], false, "{json}");
        assert_eq!(plan_in_db(ctx, &stranger).await, None);
        assert_eq!(events_recorded(ctx, &stranger.event).await, 1);
        Ok(())
    })
}

/// A sign-in reads the entitlement inputs before it checks the password; a
/// billing change pushed to the user's object meanwhile must survive the
/// sign-in's older copy arriving after it. The row is set back to what such a
/// sign-in would have read (the plan and version before the change) to make
/// that copy; before inputs carried a version, the sign-in's copy won.
fn stale_sign_in(ctx: &Ctx) -> Result<(), Failed> {
    ctx.rt.block_on(async {
        let t = now() - 600;
        let (mut user, plus) = plus_subscriber(ctx, t).await;
        let mut family = next(&plus, t + 60);
        family.plan = "family";
        expect_applied(ctx, "customer.subscription.updated", &family, true).await;
        assert_eq!(user.refresh(ctx).await["ent"]["plan"], "family");

        let db = db(ctx).await;
        db.execute(
            "UPDATE subscriptions SET plan_id = 'plus', version = version - 1 WHERE user_id = $1::text::uuid",
            &[&user.id],
        )
        .await?;
        let login = user.login(ctx).await;
        assert_eq!(login.status, 200, "{}", login.body);
        assert_eq!(
            claims(s(&login.body["access_token"]))["ent"]["plan"],
            "family",
            "the object kept the newer inputs"
        );
        assert_eq!(user.refresh(ctx).await["ent"]["plan"], "family");

        // A later change still applies.
        let mut back = next(&plus, t + 120);
        back.plan = "plus";
        expect_applied(ctx, "customer.subscription.updated", &back, true).await;
        assert_eq!(user.refresh(ctx).await["ent"]["plan"], "plus");
        Ok(())
    })
}
