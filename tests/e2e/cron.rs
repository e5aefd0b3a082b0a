//! The cron trigger: it republishes the region catalogue from PostgreSQL to
//! KV, marks silent regions down, and expires rows past their retention.

use crate::harness::{Ctx, Test};
use crate::support::{DB_NAME, Stack, eventually};
use libtest_mimic::Failed;
use serde_json::Value;
use std::time::Duration;

pub const TESTS: &[(&str, Test)] = &[
    (
        "cron::the_cron_publishes_the_catalogue_to_kv_and_follows_changes",
        publishes_catalogue,
    ),
    (
        "cron::a_region_whose_monitor_went_silent_is_marked_down_and_no_report_ends_a_drain",
        stale_monitor,
    ),
    (
        "cron::after_a_gap_in_its_runs_the_cron_reads_no_silence_for_three_minutes",
        gap_in_runs,
    ),
    (
        "cron::runs_failing_every_other_minute_do_not_hold_a_dead_monitors_region_up",
        gaps_every_other_run,
    ),
    (
        "cron::every_monitored_region_silent_at_once_is_the_monitoring_failing",
        silent_monitoring,
    ),
    (
        "cron::a_maintenance_step_that_never_ends_holds_neither_the_run_nor_the_publish",
        stuck_step,
    ),
    (
        "cron::events_and_billing_records_past_their_retention_are_expired_and_the_rest_kept",
        retention,
    ),
    (
        "cron::a_retention_setting_out_of_bounds_expires_nothing_and_says_so",
        retention_misconfigured,
    ),
];

/// The cron has run every minute for a while: silence counts.
const STEADY: &str = "INSERT INTO cron_state (last_run_at, marks_down_from)
                      VALUES (now(), now() - interval '1 minute')
                      ON CONFLICT (id) DO UPDATE
                      SET last_run_at = now(), marks_down_from = now() - interval '1 minute',
                          gap_started_at = NULL";

/// `{health}` to an admin route of sa-east (`path` after the region's): a
/// monitor's report (`POST /health-report`), or an operator's decision
/// (`PUT`, no path).
async fn to_sa_east(
    ctx: &Ctx,
    method: reqwest::Method,
    path: &str,
    health: &str,
) -> reqwest::Result<reqwest::Response> {
    ctx.http
        .request(method, ctx.url(&format!("/v1/admin/regions/sa-east{path}")))
        .bearer_auth(crate::common::dev_var("ADMIN_TOKEN"))
        .json(&serde_json::json!({ "health": health }))
        .send()
        .await
}

/// What the monitors last reported of `region`, as PostgreSQL holds it.
async fn reported(db: &tokio_postgres::Client, region: &str) -> String {
    db.query_one(
        "SELECT reported_health FROM regions WHERE id = $1",
        &[&region],
    )
    .await
    .expect("region")
    .get(0)
}

pub(crate) async fn trigger(ctx: &Ctx) -> Result<(), Failed> {
    trigger_at(ctx, &ctx.stack().wrangler.base_url).await
}

/// Runs the cron of the worker at `base`.
async fn trigger_at(ctx: &Ctx, base: &str) -> Result<(), Failed> {
    let resp = ctx
        .http
        .get(format!("{base}/__scheduled?cron=*+*+*+*+*"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200, "scheduled handler ran");
    Ok(())
}

fn snapshot(ctx: &Ctx) -> Value {
    let raw = ctx
        .stack()
        .wrangler
        .kv_get("catalogue/v1")
        .expect("catalogue/v1 in KV");
    serde_json::from_str(&raw).expect("snapshot is JSON")
}

fn publishes_catalogue(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        // Changes region health: no test that depends on it may run meanwhile.
        let _write = ctx.regions.write().await;
        let db = keenvpn_edge::db::connect(&db_url).await?;
        trigger(ctx).await?;
        let snap = snapshot(ctx);
        let regions = snap["regions"].as_array().expect("regions");
        let in_db: i64 = db
            .query_one("SELECT count(*) FROM regions", &[])
            .await?
            .get(0);
        assert_eq!(regions.len() as i64, in_db);
        let ids: Vec<&str> = regions.iter().map(|r| r["id"].as_str().unwrap()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "regions sorted by id");
        for r in regions {
            assert!(r["servers"].as_array().unwrap().len() >= 2, "{r}");
            assert!(r["latitude"].is_f64() && r["longitude"].is_f64());
        }
        let etag = snap["etag"].as_str().unwrap().to_owned();
        assert_eq!(etag.len(), 16);
        // Readers check the small etag key before reading the snapshot again.
        let wrangler = &ctx.stack().wrangler;
        assert_eq!(
            wrangler.kv_get("catalogue/v1/etag").as_deref(),
            Some(etag.as_str())
        );
        // A snapshot stored without its etag key (as before the key existed)
        // gets the key at the next run, though the snapshot is unchanged.
        wrangler.kv_delete("catalogue/v1/etag");
        assert_eq!(wrangler.kv_get("catalogue/v1/etag"), None);
        trigger(ctx).await?;
        assert_eq!(
            wrangler.kv_get("catalogue/v1/etag").as_deref(),
            Some(etag.as_str())
        );

        // The run writes the snapshot even when KV seems to hold it: a
        // location's KV read may be a cached value up to a minute old, and
        // the etag is a hash of the content, so a region down, up and down
        // again reads as current while KV everywhere says up. Here KV holds
        // other content under the current etag, which such a read would not
        // tell apart from the right one either.
        let mut other = snap.clone();
        for r in other["regions"].as_array_mut().expect("regions") {
            if r["id"] == "eu-west" {
                r["health"] = "down".into();
            }
        }
        assert_ne!(other, snap, "eu-west was down already");
        wrangler.kv_put("catalogue/v1", &other.to_string());
        trigger(ctx).await?;
        assert_eq!(
            snapshot(ctx),
            snap,
            "the run wrote the catalogue's snapshot"
        );

        // A change in PostgreSQL reaches KV at the next run. (Locally Hyperdrive
        // does not cache, so the next run sees it at once; deployed, the cached
        // binding may lag by up to its cache TTL.)
        db.execute(
            "UPDATE regions SET operator_health = 'draining' WHERE id = 'eu-west'",
            &[],
        )
        .await?;
        trigger(ctx).await?;
        let changed = snapshot(ctx);
        let changed_tag = wrangler.kv_get("catalogue/v1/etag");
        db.execute(
            "UPDATE regions SET operator_health = NULL WHERE id = 'eu-west'",
            &[],
        )
        .await?;
        // Publish the restored state, as the next minute's run would.
        trigger(ctx).await?;
        assert_ne!(changed["etag"], etag.as_str());
        assert_eq!(changed_tag.as_deref(), changed["etag"].as_str());
        assert_eq!(
            wrangler.kv_get("catalogue/v1/etag").as_deref(),
            Some(etag.as_str()),
            "the etag key follows the restored snapshot"
        );
        let eu_west = changed["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "eu-west")
            .unwrap();
        assert_eq!(eu_west["health"], "draining");
        Ok(())
    })
}

fn stale_monitor(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        let _write = ctx.regions.write().await;
        let send = |method, path, health| to_sa_east(ctx, method, path, health);
        let report = |health| send(reqwest::Method::POST, "/health-report", health);
        assert_eq!(report("up").await?.status(), 200);
        let db = keenvpn_edge::db::connect(&db_url).await?;
        let health = || async {
            let r: Value = ctx.http.get(ctx.url("/v1/regions")).send().await.unwrap().json().await.unwrap();
            r["regions"].as_array().unwrap().iter().find(|r| r["id"] == "sa-east").unwrap()["health"].clone()
        };
        // A fresh report keeps the region up through a cron run...
        db.execute(STEADY, &[]).await?;
        trigger(ctx).await?;
        assert_eq!(reported(&db, "sa-east").await, "up");
        // ...a report older than three minutes marks it down, and the run
        // tells the region's gates it is closed. Its rate was 400 a moment
        // ago (two shards; isolates may still ask at it) and is 100 now
        // (one): both shards take the word, and would be placed in South
        // America were they made by it.
        db.batch_execute(
            "UPDATE regions SET admission_rate = 400 WHERE id = 'sa-east';
             UPDATE regions SET admission_rate = 100 WHERE id = 'sa-east';",
        )
        .await?;
        let closed_told = || {
            let log = ctx.stack().wrangler.log();
            log.lines()
                .filter(|l| {
                    l.contains(r#""msg":"region gates told""#)
                        && l.contains(r#""region":"sa-east""#)
                        && l.contains(r#""closed":true"#)
                        && l.contains(r#""shards":2"#)
                        && l.contains(r#""taken":2"#)
                        && l.contains(r#""location_hint":"sam""#)
                })
                .count()
        };
        let told_before = closed_told();
        db.execute("UPDATE regions SET health_reported_at = now() - interval '4 minutes' WHERE id = 'sa-east'", &[])
            .await?;
        trigger(ctx).await?;
        assert_eq!(reported(&db, "sa-east").await, "down");
        let within = std::time::Duration::from_secs(10);
        crate::support::eventually(within, "the run telling sa-east's gates", || async {
            (closed_told() > told_before).then_some(())
        })
        .await;
        // The next run tells them again (a newer word, which the shard
        // takes): the region changed within 5 minutes. One whose change is
        // older is left to its gates' memory and the catalogue.
        let told_once = closed_told();
        trigger(ctx).await?;
        crate::support::eventually(within, "the next run telling sa-east's gates again", || async {
            (closed_told() > told_once).then_some(())
        })
        .await;
        db.execute("UPDATE regions SET gates_changed_at = now() - interval '6 minutes' WHERE id = 'sa-east'", &[])
            .await?;
        let told_twice = closed_told();
        trigger(ctx).await?;
        // The run ended before its trigger was answered; a request after it
        // logs after every line of the run.
        let after = ctx.http.get(ctx.url("/healthz")).send().await?;
        let id = after.headers()["x-request-id"].to_str()?.to_owned();
        crate::support::eventually(within, "a request after the run, logged", || async {
            ctx.stack().wrangler.log().contains(&id).then_some(())
        })
        .await;
        assert_eq!(closed_told(), told_twice, "a change 6 minutes old told again");
        // Isolates reuse a parsed catalogue for up to 5 s.
        let within = std::time::Duration::from_secs(15);
        crate::support::eventually(within, "sa-east down", || async { (health().await == "down").then_some(()) }).await;
        // The monitor reporting again brings it back.
        assert_eq!(report("up").await?.status(), 200);
        crate::support::eventually(within, "sa-east up", || async { (health().await == "up").then_some(()) }).await;

        // An operator drains it: the monitor's next report of `up` does not
        // end the drain, and its `down` outranks the drain. Only the
        // operator's `up` lifts the drain.
        let operator = |health| send(reqwest::Method::PUT, "", health);
        let state = |r: Value| (r["health"].clone(), r["reported_health"].clone(), r["operator_health"].clone());
        let drained: Value = operator("draining").await?.json().await?;
        assert_eq!(state(drained), ("draining".into(), "up".into(), "draining".into()));
        let reported: Value = report("up").await?.json().await?;
        assert_eq!(state(reported), ("draining".into(), "up".into(), "draining".into()));
        crate::support::eventually(within, "sa-east draining", || async { (health().await == "draining").then_some(()) }).await;
        let reported: Value = report("down").await?.json().await?;
        assert_eq!(state(reported), ("down".into(), "down".into(), "draining".into()));
        let lifted: Value = operator("up").await?.json().await?;
        assert_eq!(state(lifted), ("down".into(), "down".into(), Value::Null));
        let reported: Value = report("up").await?.json().await?;
        assert_eq!(state(reported), ("up".into(), "up".into(), Value::Null));
        crate::support::eventually(within, "sa-east up again", || async { (health().await == "up").then_some(()) }).await;
        // Forget the monitor.
        db.execute("UPDATE regions SET health_reported_at = NULL WHERE id = 'sa-east'", &[]).await?;
        Ok(())
    })
}

/// PostgreSQL was down for five minutes: the monitors' reports were refused
/// (503), and the cron, which needs the database too, did not run. Its first
/// run after the outage finds every monitored region silent for over three
/// minutes, and used to mark them all down: every connect then got 503
/// `no_region_available`. Now the gap in its own runs holds the marking off
/// for three minutes, long enough for the monitors to report again; after
/// that, silence counts again.
fn gap_in_runs(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        let _write = ctx.regions.write().await;
        let report = |health| to_sa_east(ctx, reqwest::Method::POST, "/health-report", health);
        assert_eq!(report("up").await?.status(), 200);
        let db = keenvpn_edge::db::connect(&db_url).await?;
        // The outage: the last run five minutes ago, the last report four.
        db.batch_execute(&format!(
            "{STEADY};
             UPDATE cron_state SET last_run_at = now() - interval '5 minutes';
             UPDATE regions SET health_reported_at = now() - interval '4 minutes' WHERE id = 'sa-east';"
        ))
        .await?;
        trigger(ctx).await?;
        assert_eq!(reported(&db, "sa-east").await, "up", "silence during the outage is not read");
        let held: bool = db
            .query_one(
                "SELECT marks_down_from > now() + interval '170 seconds' FROM cron_state",
                &[],
            )
            .await?
            .get(0);
        assert!(held, "marking waits three minutes from the first run after the gap");
        // The next minute's run (no gap now) still waits.
        trigger(ctx).await?;
        assert_eq!(reported(&db, "sa-east").await, "up");
        // Three minutes on, a monitor still silent is marked down.
        db.execute("UPDATE cron_state SET marks_down_from = now() - interval '1 second'", &[])
            .await?;
        trigger(ctx).await?;
        assert_eq!(reported(&db, "sa-east").await, "down");

        assert_eq!(report("up").await?.status(), 200);
        assert_eq!(reported(&db, "sa-east").await, "up");
        // Forget the monitor.
        db.execute("UPDATE regions SET health_reported_at = NULL WHERE id = 'sa-east'", &[]).await?;
        Ok(())
    })
}

/// A gap excuses only the monitors heard from shortly before it (see
/// `gap_in_runs` for one that is). With the cron's runs failing every other
/// minute, each good run follows a gap; the 3 minutes of grace began again
/// at each, and a region whose monitor had died (last heard 10 minutes ago,
/// long before any of the gaps) was never marked down, while another
/// monitor's reports went on arriving.
fn gaps_every_other_run(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        let _write = ctx.regions.write().await;
        let report = |health| to_sa_east(ctx, reqwest::Method::POST, "/health-report", health);
        assert_eq!(report("up").await?.status(), 200);
        assert_eq!(monitor_report(ctx, "af-south", "up").await?, 200);
        let db = keenvpn_edge::db::connect(&db_url).await?;
        db.batch_execute(&format!(
            "{STEADY};
             UPDATE regions SET health_reported_at = now() - interval '10 minutes' WHERE id = 'sa-east';
             UPDATE regions SET health_reported_at = now() - interval '1 minute' WHERE id = 'af-south';"
        ))
        .await?;
        for _ in 0..3 {
            // The run before this one failed: the last good one was two
            // minutes ago.
            db.execute(
                "UPDATE cron_state SET last_run_at = now() - interval '2 minutes'",
                &[],
            )
            .await?;
            trigger(ctx).await?;
        }
        assert_eq!(reported(&db, "sa-east").await, "down", "a dead monitor held up");
        assert_eq!(reported(&db, "af-south").await, "up");

        assert_eq!(report("up").await?.status(), 200);
        assert_eq!(monitor_report(ctx, "af-south", "up").await?, 200);
        db.execute(
            "UPDATE regions SET health_reported_at = NULL WHERE id IN ('sa-east', 'af-south')",
            &[],
        )
        .await?;
        db.batch_execute(STEADY).await?;
        Ok(())
    })
}

/// A monitor's report of `health` for `region`.
async fn monitor_report(ctx: &Ctx, region: &str, health: &str) -> reqwest::Result<u16> {
    let resp = ctx
        .http
        .post(ctx.url(&format!("/v1/admin/regions/{region}/health-report")))
        .bearer_auth(crate::common::dev_var("ADMIN_TOKEN"))
        .json(&serde_json::json!({ "health": health }))
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

/// Every monitored region silent at once (two here, their last reports four
/// minutes old) is read as the monitoring failing: its token rotated without
/// the monitors', or their network cut off. The cron used to mark them all
/// down, and every connect got 503 `no_region_available`. Now it marks none
/// and logs why; once one monitor is heard again, the other's silence counts.
fn silent_monitoring(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        let _write = ctx.regions.write().await;
        let monitored = ["sa-east", "af-south"];
        for region in monitored {
            assert_eq!(monitor_report(ctx, region, "up").await?, 200);
        }
        let db = keenvpn_edge::db::connect(&db_url).await?;
        db.batch_execute(&format!(
            "{STEADY};
             UPDATE regions SET health_reported_at = now() - interval '4 minutes'
              WHERE id IN ('sa-east', 'af-south');"
        ))
        .await?;
        trigger(ctx).await?;
        for region in monitored {
            assert_eq!(reported(&db, region).await, "up", "{region} marked down");
        }
        crate::support::eventually(
            std::time::Duration::from_secs(10),
            "the run's line about the monitoring",
            || async {
                let log = ctx.stack().wrangler.log();
                log.contains("none of the 2 monitored regions reported in 3 minutes")
                    .then_some(())
            },
        )
        .await;
        // One monitor is heard again: the other's silence is the region's.
        assert_eq!(monitor_report(ctx, "sa-east", "up").await?, 200);
        trigger(ctx).await?;
        assert_eq!(reported(&db, "af-south").await, "down");
        assert_eq!(reported(&db, "sa-east").await, "up");

        assert_eq!(monitor_report(ctx, "af-south", "up").await?, 200);
        // Forget the monitors.
        db.execute(
            "UPDATE regions SET health_reported_at = NULL WHERE id IN ('sa-east', 'af-south')",
            &[],
        )
        .await?;
        Ok(())
    })
}

/// A maintenance step that never ends (here the first one, waiting on a lock
/// of `cron_state` a test transaction holds) is given up after 10 s: the run
/// still publishes the catalogue and ends, and the step does not stay waiting
/// in the database either. Nothing bounded the run before: it waited for as
/// long as the lock was held, and published nothing.
fn stuck_step(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        let _write = ctx.regions.write().await;
        let db = keenvpn_edge::db::connect(&db_url).await?;
        let holder = keenvpn_edge::db::connect(&db_url).await?;
        db.execute(
            "UPDATE regions SET operator_health = 'draining' WHERE id = 'eu-west'",
            &[],
        )
        .await?;
        holder
            .batch_execute("BEGIN; LOCK TABLE cron_state IN ACCESS EXCLUSIVE MODE")
            .await?;
        let started = std::time::Instant::now();
        let run = tokio::time::timeout(std::time::Duration::from_secs(25), trigger(ctx)).await;
        let took = started.elapsed();
        // Once the run has ended, nothing of it may still wait in the
        // database for the lock: it would take it (and do the step) whenever
        // the holder let go.
        let still_waiting: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'cron_state'::regclass",
                &[],
            )
            .await?
            .get(0);
        holder.batch_execute("ROLLBACK").await?;
        let published = snapshot(ctx);
        db.execute(
            "UPDATE regions SET operator_health = NULL WHERE id = 'eu-west'",
            &[],
        )
        .await?;
        // Publish the restored state, as the next minute's run would.
        trigger(ctx).await?;
        run.map_err(|_| "the run was still waiting after 25 s")??;
        assert!(took.as_secs() >= 9, "the step was given up after {took:?}");
        assert_eq!(still_waiting, 0, "the given-up step still waits on the lock");
        let eu_west = published["regions"]
            .as_array()
            .expect("regions")
            .iter()
            .find(|r| r["id"] == "eu-west")
            .expect("eu-west");
        assert_eq!(eu_west["health"], "draining", "the change was published");
        Ok(())
    })
}

/// A month of connection events long past (January 2001, made as the cron
/// makes partitions, one event in it), and two billing-event records under
/// `tag`: `evt_old_{tag}` received 91 days ago, `evt_kept_{tag}` 89.
const PAST_RETENTION: &str = "
    CREATE TABLE connection_events_2001_01 PARTITION OF connection_events
        FOR VALUES FROM ('2001-01-01 00:00:00+00') TO ('2001-02-01 00:00:00+00');
    INSERT INTO connection_events (event_id, occurred_at, user_id, device_id, region_id, outcome)
        VALUES (gen_random_uuid(), '2001-01-15 12:00:00+00', gen_random_uuid(), gen_random_uuid(),
                'eu-central', 'admitted');
    INSERT INTO webhook_events (id, type, event_created_at, received_at) VALUES
        ('evt_old_{tag}', 'invoice.paid', now() - interval '91 days', now() - interval '91 days'),
        ('evt_kept_{tag}', 'invoice.paid', now() - interval '89 days', now() - interval '89 days')";

/// Whether the month of [`PAST_RETENTION`] is still there, and which of its
/// billing-event records are.
async fn past_retention_left(
    db: &tokio_postgres::Client,
    tag: &str,
) -> Result<(bool, Vec<String>), Failed> {
    let month = db
        .query_one(
            "SELECT to_regclass('connection_events_2001_01') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let records = db
        .query(
            "SELECT id FROM webhook_events WHERE id LIKE '%' || $1 ORDER BY id",
            &[&tag],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((month, records))
}

/// With the default retention (90 days for both), a run drops the month
/// long past and deletes the record received 91 days ago; the one of 89
/// days stays. The queue consumer's inserts can hold a drop off for a run
/// (it waits 2 s for them), so the cron runs until the month is gone.
fn retention(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        // Runs the shared worker's cron: no test that sets up its state may
        // run meanwhile.
        let _write = ctx.regions.write().await;
        let db = keenvpn_edge::db::connect(&db_url).await?;
        let tag = crate::common::unique("retention");
        db.batch_execute(&PAST_RETENTION.replace("{tag}", &tag))
            .await?;
        assert!(past_retention_left(&db, &tag).await?.0);
        let mut left = (true, vec![]);
        for _ in 0..5 {
            trigger(ctx).await?;
            left = past_retention_left(&db, &tag).await?;
            if !left.0 {
                break;
            }
        }
        assert_eq!(left, (false, vec![format!("evt_kept_{tag}")]));
        eventually(Duration::from_secs(10), "the drop logged", || async {
            let log = ctx.stack().wrangler.log();
            log.lines()
                .any(|l| {
                    l.contains("\"expire connection events\"")
                        && l.contains("connection_events_2001_01 dropped")
                })
                .then_some(())
        })
        .await;
        Ok(())
    })
}

/// A worker whose retention settings are out of bounds (connection events
/// kept 0 days; billing-event records 29, under the 30 in which Stripe can
/// resend an event) expires nothing, logs why at error level on each run,
/// and does the rest of its run. The first is text (`.dev.vars`), the second
/// a number in `wrangler.toml`'s `[vars]`, as an operator may write it: read
/// as unset, it would expire the 91-day-old record.
fn retention_misconfigured(ctx: &Ctx) -> Result<(), Failed> {
    let stack = Stack::start_with(
        &[],
        &[("CONNECTION_EVENTS_RETENTION_DAYS", "0")],
        &[("WEBHOOK_EVENTS_RETENTION_DAYS", "29")],
    );
    ctx.rt.block_on(async {
        let db = keenvpn_edge::db::connect(&stack.pg.url(DB_NAME)).await?;
        let tag = crate::common::unique("retention");
        db.batch_execute(&PAST_RETENTION.replace("{tag}", &tag))
            .await?;
        trigger_at(ctx, &stack.wrangler.base_url).await?;
        assert_eq!(
            past_retention_left(&db, &tag).await?,
            (true, vec![format!("evt_kept_{tag}"), format!("evt_old_{tag}")])
        );
        let expected = [
            "CONNECTION_EVENTS_RETENTION_DAYS must be a whole number of days from 1 to 3650, not \\\"0\\\"",
            "WEBHOOK_EVENTS_RETENTION_DAYS must be a whole number of days from 30 to 3650, not \\\"29\\\"",
            "catalogue published",
        ];
        eventually(
            Duration::from_secs(10),
            "the settings' errors and the publish logged",
            || async {
                let log = stack.wrangler.log();
                expected
                    .iter()
                    .all(|text| {
                        log.lines().any(|l| {
                            l.contains(text)
                                && (text.starts_with("catalogue") || l.contains("\"level\":\"error\""))
                        })
                    })
                    .then_some(())
            },
        )
        .await;
        Ok(())
    })
}
