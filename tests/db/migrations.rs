//! Migrations and the dev seed against a real PostgreSQL: each test gets a fresh database.

use crate::support::Postgres;
use futures::future::BoxFuture;
use keenvpn_edge::domain::device;
use keenvpn_edge::{db, sql};
use libtest_mimic::Failed;

/// The same files as the library embeds, for applying only some of them.
mod embedded {
    refinery::embed_migrations!("migrations");
}

type Test = fn(&Postgres) -> BoxFuture<'_, Result<(), Failed>>;

pub const TESTS: &[(&str, Test)] = &[
    ("migrations::apply_cleanly_to_an_empty_database", |pg| {
        Box::pin(apply_cleanly(pg))
    }),
    ("migrations::applying_twice_is_a_no_op", |pg| {
        Box::pin(applying_twice_is_a_no_op(pg))
    }),
    (
        "migrations::the_dev_seed_is_idempotent_and_complete",
        |pg| Box::pin(dev_seed(pg)),
    ),
    ("migrations::constraints_reject_malformed_rows", |pg| {
        Box::pin(constraints(pg))
    }),
    (
        "migrations::existing_subscriptions_order_their_status_from_their_last_event",
        |pg| Box::pin(status_order_backfill(pg)),
    ),
    (
        "migrations::a_user_may_hold_several_subscriptions_each_once",
        |pg| Box::pin(several_subscriptions(pg)),
    ),
    (
        "migrations::a_regions_health_is_the_worse_of_its_report_and_its_operators",
        |pg| Box::pin(operator_and_reported_health(pg)),
    ),
    (
        "migrations::a_regions_gates_change_is_noted_when_it_starts_or_stops_admitting_or_its_rate_moves",
        |pg| Box::pin(gates_changed_at(pg)),
    ),
    (
        "migrations::event_partitions_are_utc_months_made_once_or_skipped_with_a_reason",
        |pg| Box::pin(event_partitions(pg)),
    ),
    (
        "store::a_servers_endpoint_reads_as_the_catalogue_writes_it",
        |pg| Box::pin(server_endpoint(pg)),
    ),
    (
        "store::a_failed_sign_ups_undo_keeps_a_device_committed_meanwhile",
        |pg| Box::pin(undo_keeps_a_device_committed_meanwhile(pg)),
    ),
    ("store::only_a_device_added_draws_a_tunnel_address", |pg| {
        Box::pin(only_an_added_device_draws_an_address(pg))
    }),
    (
        "store::a_registration_for_a_deleted_account_or_a_key_being_added_draws_no_address",
        |pg| Box::pin(no_address_for_a_gone_user_or_a_key_in_flight(pg)),
    ),
    (
        "store::a_deleted_devices_tunnel_address_is_given_again_after_its_quarantine",
        |pg| Box::pin(a_deleted_devices_address_is_given_again(pg)),
    ),
    (
        "migrations::the_tunnel_addresses_deletes_used_up_are_freed",
        |pg| Box::pin(the_migration_frees_what_deletes_used_up(pg)),
    ),
    (
        "migrations::a_subscription_past_due_before_v13_is_past_due_since_its_last_change",
        |pg| Box::pin(past_due_backfill(pg)),
    ),
    (
        "store::a_connection_event_delivered_again_or_twice_in_a_batch_is_written_once",
        |pg| Box::pin(events_written_once(pg)),
    ),
    (
        "migrations::stored_emails_are_put_in_nfc_unless_another_account_holds_that_spelling",
        |pg| Box::pin(emails_in_nfc(pg)),
    ),
    (
        "migrations::retention_drops_past_months_in_turn_with_inserts_and_old_billing_events_in_batches",
        |pg| Box::pin(retention(pg)),
    ),
];

async fn fresh(pg: &Postgres) -> Result<tokio_postgres::Client, Failed> {
    let name = pg.create_database("mig");
    Ok(db::connect(&pg.url(&name)).await?)
}

/// The first two columns of every row `sql` returns.
async fn pairs<A, B>(client: &tokio_postgres::Client, sql: &str) -> Result<Vec<(A, B)>, Failed>
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let rows = client.query(sql, &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A fresh database with the migrations up to `version` applied.
async fn fresh_at(pg: &Postgres, version: i32) -> Result<tokio_postgres::Client, Failed> {
    let mut client = fresh(pg).await?;
    embedded::migrations::runner()
        .set_target(refinery::Target::Version(version))
        .run_async(&mut client)
        .await?;
    Ok(client)
}

async fn apply_cleanly(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    let applied = db::migrate(&mut client).await?;
    assert_eq!(applied.len(), db::migration_count());
    assert!(db::migration_count() >= 2);
    let tables: Vec<String> = client
        .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in [
        "devices",
        "plans",
        "regions",
        "servers",
        "subscriptions",
        "users",
    ] {
        assert!(
            tables.iter().any(|x| x == t),
            "table {t} missing from {tables:?}"
        );
    }
    let plans: Vec<(String, i32)> = pairs(
        &client,
        "SELECT id, max_devices FROM plans ORDER BY max_devices",
    )
    .await?;
    assert_eq!(
        plans,
        [
            ("free".into(), 1),
            ("plus".into(), 5),
            ("family".into(), 10)
        ]
    );
    Ok(())
}

async fn applying_twice_is_a_no_op(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    db::migrate(&mut client).await?;
    let again = db::migrate(&mut client).await?;
    assert!(again.is_empty(), "second run applied {again:?}");
    let n: i64 = client
        .query_one("SELECT count(*) FROM plans", &[])
        .await?
        .get(0);
    assert_eq!(n, 3, "reference data not duplicated");
    Ok(())
}

async fn dev_seed(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    db::migrate(&mut client).await?;
    db::seed_dev(&mut client).await?;
    db::seed_dev(&mut client).await?;
    let regions: i64 = client
        .query_one("SELECT count(*) FROM regions", &[])
        .await?
        .get(0);
    assert!(regions >= 6, "{regions} regions");
    // Several continents: the seed spans both hemispheres and both sides of Greenwich.
    let spread = client
        .query_one(
            "SELECT count(*) FILTER (WHERE latitude < 0), count(*) FILTER (WHERE longitude < -30),
                    count(*) FILTER (WHERE longitude > 60), count(DISTINCT country) FROM regions",
            &[],
        )
        .await?;
    let (south, americas, asia, countries): (i64, i64, i64, i64) =
        (spread.get(0), spread.get(1), spread.get(2), spread.get(3));
    assert!(
        south >= 1 && americas >= 1 && asia >= 1 && countries >= 6,
        "{south} {americas} {asia} {countries}"
    );
    let thin: i64 = client
        .query_one(
            "SELECT count(*) FROM regions r WHERE (SELECT count(*) FROM servers s WHERE s.region_id = r.id) < 2",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(thin, 0, "every region has at least two servers");
    // Every server key passes the check a device's key must pass: 32 bytes,
    // canonical base64, a canonical Curve25519 key.
    for row in client
        .query("SELECT id, public_key FROM servers", &[])
        .await?
    {
        let (id, key): (String, String) = (row.get(0), row.get(1));
        if let Err(e) = keenvpn_edge::domain::device::PublicKey::parse(&key) {
            panic!("server {id}: key {key} {}", e.reason);
        }
    }
    Ok(())
}

async fn constraints(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    db::migrate(&mut client).await?;
    db::seed_dev(&mut client)
        .await
        .map_err(|e| format!("{e:?}"))?;
    // Each with the error it must meet: a check violation (23514), or the
    // generated column's refusal of a value (428C9); not just any error (a
    // typo in the statement would pass as one).
    let bad = [
        (
            "INSERT INTO users (email, password_hash) VALUES ('Mixed@Example.com', '$argon2id$x')",
            "23514",
        ),
        (
            "INSERT INTO users (email, password_hash) VALUES ('a@example.com', 'plaintext')",
            "23514",
        ),
        (
            "INSERT INTO regions (id, name, country, latitude, longitude, tier) VALUES ('xx-1', 'X', 'XX', 91, 0, 'free')",
            "23514",
        ),
        (
            "INSERT INTO regions (id, name, country, latitude, longitude, tier, reported_health) VALUES ('xx-2', 'X', 'XX', 0, 0, 'free', 'sideways')",
            "23514",
        ),
        (
            "INSERT INTO regions (id, name, country, latitude, longitude, tier, operator_health) VALUES ('xx-3', 'X', 'XX', 0, 0, 'free', 'up')",
            "23514",
        ),
        (
            "UPDATE regions SET health = 'down' WHERE id = 'eu-central'",
            "428C9",
        ),
        (
            "INSERT INTO servers (id, region_id, hostname, port, public_key, capacity) VALUES ('s-x', 'eu-central', 'h', 70000, 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=', 1)",
            "23514",
        ),
        (
            "INSERT INTO servers (id, region_id, hostname, port, public_key, capacity) VALUES ('s-y', 'eu-central', 'h', 51820, 'not-a-key', 1)",
            "23514",
        ),
    ];
    for (sql, code) in bad {
        let refused = client.batch_execute(sql).await.err();
        let got = refused.as_ref().and_then(|e| e.code()).map(|c| c.code());
        assert_eq!(got, Some(code), "{sql}: {refused:?}");
    }
    Ok(())
}

/// V5 splits the ordering of a subscription's status from that of its other
/// fields: rows written before it get the status time of their last event.
async fn status_order_backfill(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh_at(pg, 4).await?;
    client
        .batch_execute(
            "INSERT INTO users (id, email, password_hash) VALUES
                 ('00000000-0000-4000-8000-000000000001', 'a@example.test', '$argon2id$x'),
                 ('00000000-0000-4000-8000-000000000002', 'b@example.test', '$argon2id$x');
             INSERT INTO subscriptions (user_id, plan_id, status, current_period_end,
                                        provider_subscription_id, provider_event_at) VALUES
                 ('00000000-0000-4000-8000-000000000001', 'plus', 'active', now(), 'sub_1',
                  '2026-01-02T03:04:05Z'),
                 ('00000000-0000-4000-8000-000000000002', 'plus', 'active', now(), NULL, NULL);",
        )
        .await?;
    let applied = db::migrate(&mut client).await?;
    assert!(applied.contains(&5), "applied {applied:?}");
    let rows: Vec<(Option<String>, Option<i64>)> = pairs(
        &client,
        "SELECT provider_subscription_id, extract(epoch FROM status_event_at)::bigint
         FROM subscriptions ORDER BY user_id",
    )
    .await?;
    assert_eq!(
        rows,
        [(Some("sub_1".into()), Some(1_767_323_045)), (None, None)]
    );
    Ok(())
}

/// V8 lets a user hold several subscriptions, a row for each: a row from
/// before stays, a second subscription of the same user is accepted, and the
/// same provider subscription twice is not.
async fn several_subscriptions(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh_at(pg, 7).await?;
    let insert = |sub: &str| {
        format!(
            "INSERT INTO subscriptions (user_id, plan_id, status, current_period_end, provider_subscription_id)
             VALUES ('00000000-0000-4000-8000-000000000001', 'plus', 'active', now(), '{sub}')"
        )
    };
    client
        .batch_execute(&format!(
            "INSERT INTO users (id, email, password_hash) VALUES
                 ('00000000-0000-4000-8000-000000000001', 'a@example.test', '$argon2id$x');
             {};",
            insert("sub_1")
        ))
        .await?;
    assert!(
        client.batch_execute(&insert("sub_2")).await.is_err(),
        "before V8 a user has one row"
    );
    let applied = db::migrate(&mut client).await?;
    assert!(applied.contains(&8), "applied {applied:?}");
    client.batch_execute(&insert("sub_2")).await?;
    assert!(
        client.batch_execute(&insert("sub_2")).await.is_err(),
        "the same provider subscription twice"
    );
    let subs: Vec<String> = client
        .query(
            "SELECT provider_subscription_id FROM subscriptions
             WHERE user_id = '00000000-0000-4000-8000-000000000001' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(subs, ["sub_1", "sub_2"]);
    Ok(())
}

/// The next two months' partition names (UTC), and the SQL that drops them.
async fn next_months(client: &tokio_postgres::Client) -> Result<(String, String, String), Failed> {
    let (m1, m2): (String, String) = pairs(
        client,
        "SELECT to_char(m + interval '1 month', 'YYYY_MM'), to_char(m + interval '2 months', 'YYYY_MM')
         FROM date_trunc('month', now() AT TIME ZONE 'UTC') m",
    )
    .await?
    .remove(0);
    let drop = format!(
        "DROP TABLE IF EXISTS connection_events_{m1}; DROP TABLE IF EXISTS connection_events_{m2}"
    );
    Ok((m1, m2, drop))
}

/// The bounds of a partition, printed in UTC.
async fn bounds(client: &tokio_postgres::Client, part: &str) -> Result<String, Failed> {
    client.batch_execute("SET TimeZone = 'UTC'").await?;
    let row = client
        .query_one(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = $1",
            &[&part],
        )
        .await?;
    Ok(row.get(0))
}

/// V9: partitions are bounded by UTC months whatever the session's time zone,
/// a month that an older partition overlaps is skipped with a reason (its rows
/// go to the default partition) rather than failing the run, and concurrent
/// runs do not fail each other.
async fn event_partitions(pg: &Postgres) -> Result<(), Failed> {
    let name = pg.create_database("mig");
    let mut client = db::connect(&pg.url(&name)).await?;
    db::migrate(&mut client).await?;
    let (m1, m2, drop) = next_months(&client).await?;
    let ensure = "SELECT * FROM ensure_connection_event_partitions(2)";

    // Next month made as V4 made it from a session in New York: its bounds
    // run to 04:00 or 05:00 UTC of the month after. A run from a session in
    // UTC (as V4's would have failed) skips that month.
    client
        .batch_execute(&format!(
            "{drop}; SET TimeZone = 'America/New_York';
             CREATE TABLE connection_events_{m1} PARTITION OF connection_events
                 FOR VALUES FROM ('{}-01') TO ('{}-01');
             SET TimeZone = 'UTC'",
            m1.replace('_', "-"),
            m2.replace('_', "-")
        ))
        .await?;
    let skipped: Vec<String> = client
        .query(ensure, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0].starts_with(&format!("connection_events_{m2} not created: "))
            && skipped[0].contains("overlap"),
        "{skipped:?}"
    );

    // Without it, both months are made, bounded at UTC midnights although
    // the session is in New York.
    client
        .batch_execute(&format!("{drop}; SET TimeZone = 'America/New_York'"))
        .await?;
    assert!(client.query(ensure, &[]).await?.is_empty());
    let (y, m) = m1.split_once('_').unwrap();
    let expected = format!(
        "FOR VALUES FROM ('{y}-{m}-01 00:00:00+00') TO ('{}-01 00:00:00+00')",
        m2.replace('_', "-")
    );
    assert_eq!(
        bounds(&client, &format!("connection_events_{m1}")).await?,
        expected
    );

    // Runs racing to make the same months all succeed, each month made once.
    let other = db::connect(&pg.url(&name)).await?;
    for _ in 0..10 {
        client.batch_execute(&drop).await?;
        let (a, b) = futures::join!(client.query(ensure, &[]), other.query(ensure, &[]));
        assert!(a?.is_empty() && b?.is_empty());
    }
    let made: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'connection_events'::regclass AND c.relname = ANY($1)",
            &[&vec![
                format!("connection_events_{m1}"),
                format!("connection_events_{m2}"),
            ]],
        )
        .await?
        .get(0);
    assert_eq!(made, 2);
    Ok(())
}

/// The test regions' `id: reported operator -> health` (`-`: no operator's).
async fn region_health(client: &tokio_postgres::Client) -> Result<Vec<String>, Failed> {
    let rows = client
        .query(
            "SELECT format('%s: %s %s -> %s', id, reported_health, coalesce(operator_health, '-'), health)
             FROM regions WHERE id LIKE 'r-%' ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// V10 keeps a monitor's report and an operator's decision apart, and derives
/// `health` as the worse of the two. Existing health is kept: as the report
/// for a region a monitor has reported on, as the operator's otherwise.
async fn operator_and_reported_health(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh_at(pg, 9).await?;
    client
        .batch_execute(
            "INSERT INTO regions (id, name, country, latitude, longitude, tier, health, health_reported_at) VALUES
                 ('r-operator', 'A', 'DE', 0, 0, 'free', 'down', NULL),
                 ('r-reported', 'B', 'DE', 0, 0, 'free', 'draining', now()),
                 ('r-up', 'C', 'DE', 0, 0, 'free', 'up', NULL)",
        )
        .await?;
    let applied = db::migrate(&mut client).await?;
    assert!(applied.contains(&10), "applied {applied:?}");
    assert_eq!(
        region_health(&client).await?,
        [
            "r-operator: up down -> down",
            "r-reported: draining - -> draining",
            "r-up: up - -> up"
        ]
    );
    // A report of `up` does not lift an operator's `down`, nor an operator's
    // lifting a report of `down`; the worse of the two holds.
    client
        .batch_execute(
            "UPDATE regions SET reported_health = 'up' WHERE id = 'r-operator';
             UPDATE regions SET reported_health = 'down', operator_health = 'draining' WHERE id = 'r-reported';
             UPDATE regions SET operator_health = 'draining' WHERE id = 'r-up'",
        )
        .await?;
    assert_eq!(
        region_health(&client).await?,
        [
            "r-operator: up down -> down",
            "r-reported: down draining -> down",
            "r-up: up draining -> draining"
        ]
    );
    Ok(())
}

/// V19 notes when a region's gates are told something new: it starts or
/// stops admitting anyone (its health, or a rate of 0), or its rate moves.
/// A report that changes nothing for the gates (a load, `down` after
/// `draining`) leaves the time alone.
async fn gates_changed_at(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    db::migrate(&mut client).await?;
    client
        .batch_execute(
            "INSERT INTO regions (id, name, country, latitude, longitude, tier) VALUES
                 ('r-1', 'A', 'DE', 0, 0, 'free')",
        )
        .await?;
    // Whether each update (on a region whose time is cleared first) notes
    // a change.
    let cases = [
        ("SET health_reported_at = now()", false),
        ("SET reported_health = 'draining'", true),
        ("SET reported_health = 'down'", false),
        ("SET operator_health = 'draining'", false),
        ("SET reported_health = 'up'", false),
        ("SET operator_health = NULL", true),
        ("SET admission_rate = 400", true),
        ("SET admission_rate = 0", true),
        ("SET reported_health = 'down'", false),
        ("SET admission_rate = 0, updated_at = now()", false),
    ];
    for (update, noted) in cases {
        client
            .batch_execute("UPDATE regions SET gates_changed_at = NULL WHERE id = 'r-1'")
            .await?;
        client
            .batch_execute(&format!("UPDATE regions {update} WHERE id = 'r-1'"))
            .await?;
        let got: bool = client
            .query_one(
                "SELECT gates_changed_at IS NOT NULL FROM regions WHERE id = 'r-1'",
                &[],
            )
            .await?
            .get(0);
        assert_eq!(got, noted, "{update}");
    }
    // The highest rate in the 5 minutes before a change is kept, for the
    // shards isolates with an older catalogue still ask.
    let rate_before = |update: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute(&format!("UPDATE regions {update} WHERE id = 'r-1'"))
                .await?;
            let row = client
                .query_one(
                    "SELECT gates_rate_before FROM regions WHERE id = 'r-1'",
                    &[],
                )
                .await?;
            Ok::<Option<i32>, Failed>(row.get(0))
        }
    };
    rate_before("SET admission_rate = 200").await?;
    assert_eq!(rate_before("SET admission_rate = 800").await?, Some(200));
    assert_eq!(rate_before("SET admission_rate = 100").await?, Some(800));
    assert_eq!(rate_before("SET admission_rate = 0").await?, Some(800));
    // A change more than 5 minutes after the last starts afresh.
    rate_before("SET gates_changed_at = now() - interval '6 minutes'").await?;
    assert_eq!(rate_before("SET admission_rate = 300").await?, Some(0));
    Ok(())
}

/// A sign-up that could not open its session removes the user it made
/// (`sql::delete_new_user`) unless something was attached to it by then. A
/// device registration committing while that removal runs must survive it:
/// here the registration holds the user's row (as `insert_device` does) and
/// has inserted its device when the removal starts, and commits while the
/// removal waits for the row. The removal then keeps the user, and the device.
/// (Checked in one statement, the removal read a snapshot from before the
/// commit, deleted the user once the row was free, and the cascade took the
/// device that had been answered 201.)
async fn undo_keeps_a_device_committed_meanwhile(pg: &Postgres) -> Result<(), Failed> {
    let mut registration = fresh(pg).await?;
    db::migrate(&mut registration).await?;
    let url = pg.url(&current_database(&registration).await?);
    let user: String = registration
        .query_one(
            "INSERT INTO users (email, password_hash) VALUES ('undo@example.test', '$argon2id$x')
             RETURNING id::text",
            &[],
        )
        .await?
        .get(0);
    let key = format!("{}=", "A".repeat(43));
    registration
        .batch_execute(&format!(
            "BEGIN;
             SELECT 1 FROM users WHERE id = '{user}' FOR UPDATE;
             INSERT INTO devices (user_id, name, public_key, ipv4_address, ipv6_address)
             VALUES ('{user}', 'Pixel 8', '{key}', '10.64.0.2', 'fd00:64::2');"
        ))
        .await?;

    let undo = db::connect(&url).await?;
    let statement = sql::delete_new_user(&sql::uuid(&user).expect("a canonical uuid"));
    let removal = tokio::spawn(async move { undo.simple_query(&statement).await });
    // Until the removal waits for the user's row.
    let observer = db::connect(&url).await?;
    one_waits_for_a_lock(&observer, "the removal never waited for the row").await?;
    registration.batch_execute("COMMIT").await?;

    let answer = removal.await??;
    assert_eq!(
        last_row(&answer),
        Some("false"),
        "the user was removed: {answer:?}"
    );
    let devices: i64 = observer
        .query_one(
            "SELECT count(*) FROM devices WHERE user_id = $1::text::uuid",
            &[&user],
        )
        .await?
        .get(0);
    assert_eq!(devices, 1, "the committed device is gone");
    Ok(())
}

/// Waits (up to 10 s, else fails with `never`) until one session of the
/// database `observer` is connected to waits for a lock.
async fn one_waits_for_a_lock(
    observer: &tokio_postgres::Client,
    never: &str,
) -> Result<(), Failed> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await?
            .get(0);
        if waiting == 1 {
            return Ok(());
        }
        assert!(std::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The first column of the last row of a simple query's answer.
fn last_row(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<&str> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .last()
}

/// `sql::insert_device` of a device with the key `key` for the user `user`.
fn registration(user: &str, key: &str, limit: u32) -> String {
    sql::insert_device(
        &sql::uuid(user).expect("a canonical uuid"),
        &sql::literal("Pixel 8").expect("no NUL"),
        &sql::literal(key).expect("no NUL"),
        limit,
    )
}

/// The JSON object of [`registration`].
async fn register(
    client: &tokio_postgres::Client,
    user: &str,
    key: &str,
    limit: u32,
) -> Result<serde_json::Value, Failed> {
    let answer = client.simple_query(&registration(user, key, limit)).await?;
    let text = last_row(&answer).ok_or("the registration returned no row")?;
    Ok(serde_json::from_str(text)?)
}

/// The number `device_address_seq` last gave out.
/// Registers `key` for `user` with the sequence used up and no freed number
/// to give: PostgreSQL refuses, and the transaction is rolled back.
async fn refused_past_the_range(
    client: &tokio_postgres::Client,
    user: &str,
    key: &str,
) -> Result<(), Failed> {
    let past = client
        .simple_query(&registration(user, key, 5))
        .await
        .expect_err("a number past the range");
    let reason = past.as_db_error().map(|e| e.message().to_owned());
    assert!(
        reason
            .as_deref()
            .is_some_and(|m| m.contains("maximum value")),
        "{past:?}"
    );
    client.batch_execute("ROLLBACK").await?;
    Ok(())
}

/// New users with these emails; their ids.
async fn new_users(
    client: &tokio_postgres::Client,
    emails: &[&str],
) -> Result<Vec<String>, Failed> {
    let mut users = Vec::new();
    for email in emails {
        let id: String = client
            .query_one(
                &format!(
                    "INSERT INTO users (email, password_hash) VALUES ('{email}', '$argon2id$x')
                     RETURNING id::text"
                ),
                &[],
            )
            .await?
            .get(0);
        users.push(id);
    }
    Ok(users)
}

async fn last_drawn(client: &tokio_postgres::Client) -> Result<i64, Failed> {
    Ok(client
        .query_one("SELECT last_value FROM device_address_seq", &[])
        .await?
        .get(0))
}

/// Tunnel addresses come from a sequence that never gives a number back, so
/// a registration refused by the limit or by the key, or a retry answered
/// with the device it added, must not draw one: a client repeating such a
/// request could otherwise use up the fleet's range, after which no one can
/// register a device. The addresses PostgreSQL computes are the ones
/// `device::tunnel_addresses` gives for the number, up to the range's last.
async fn only_an_added_device_draws_an_address(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    db::migrate(&mut client).await?;
    let users = new_users(
        &client,
        &["a@example.test", "b@example.test", "c@example.test"],
    )
    .await?;
    let (a, b, c) = (&users[0], &users[1], &users[2]);
    let key = |c: char| format!("{}=", c.to_string().repeat(43));
    let addresses = |device: &serde_json::Value| {
        (
            device["ipv4_address"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            device["ipv6_address"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };

    let added = register(&client, a, &key('A'), 1).await?;
    let drawn = last_drawn(&client).await?;
    assert_eq!(
        Some(addresses(&added["device"])),
        device::tunnel_addresses(drawn as u64),
        "{added}"
    );
    // Another user's key, the limit, and the owner's retry: nothing added,
    // nothing drawn.
    let taken = register(&client, b, &key('A'), 5).await?;
    assert_eq!(
        (taken["device"].is_null(), taken["taken"].as_bool()),
        (true, Some(true)),
        "{taken}"
    );
    let full = register(&client, a, &key('B'), 1).await?;
    assert!(
        full["device"].is_null() && full["existing"].is_null(),
        "{full}"
    );
    assert_eq!(full["taken"], false);
    let retry = register(&client, a, &key('A'), 1).await?;
    assert_eq!(retry["existing"], added["device"], "{retry}");
    assert!(retry["device"].is_null());
    assert_eq!(
        last_drawn(&client).await?,
        drawn,
        "a refused registration drew a number"
    );

    // At the end of the range: refusals there cost nothing either, and the
    // last number is still given out, with the range's last addresses.
    client
        .batch_execute("SELECT setval('device_address_seq', 4194301)")
        .await?;
    for _ in 0..3 {
        let taken = register(&client, b, &key('A'), 5).await?;
        assert_eq!(taken["taken"], true, "{taken}");
    }
    let last = register(&client, c, &key('C'), 5).await?;
    assert_eq!(
        addresses(&last["device"]),
        (
            "10.127.255.254".to_owned(),
            "fd4b:6565:6e00::3f:fffe".to_owned()
        ),
        "{last}"
    );
    assert_eq!(
        Some(addresses(&last["device"])),
        device::tunnel_addresses(4_194_302)
    );
    // Past it, PostgreSQL refuses the registration and adds nothing.
    refused_past_the_range(&client, c, &key('D')).await?;
    let devices: i64 = client
        .query_one("SELECT count(*) FROM devices", &[])
        .await?
        .get(0);
    assert_eq!(devices, 2);
    Ok(())
}

/// Two more ways a registration could lose a number for good, neither
/// drawing one:
/// - the user's row is gone (the account deleted while one of its access
///   tokens still passes at the edge): nothing is added, and the answer
///   says `gone`;
/// - another user's registration of the same key is in flight: the second
///   waits for the first (both take the key's advisory lock after their
///   user's row), then sees its device and is refused for the key. Without
///   the lock, it drew a number, then met the key's unique constraint.
async fn no_address_for_a_gone_user_or_a_key_in_flight(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    db::migrate(&mut client).await?;
    let url = pg.url(&current_database(&client).await?);
    let users = new_users(&client, &["a@example.test", "b@example.test"]).await?;
    let (a, b) = (&users[0], &users[1]);
    let key = |c: char| format!("{}=", c.to_string().repeat(43));
    let added = register(&client, a, &key('A'), 5).await?;
    assert!(added["device"].is_object(), "{added}");
    let drawn = last_drawn(&client).await?;

    let gone = register(
        &client,
        "00000000-0000-4000-8000-000000000001",
        &key('B'),
        5,
    )
    .await?;
    assert_eq!(
        (gone["gone"].as_bool(), gone["device"].is_null()),
        (Some(true), true),
        "{gone}"
    );
    assert_eq!(added["gone"], false, "{added}");
    assert_eq!(
        last_drawn(&client).await?,
        drawn,
        "a gone user drew a number"
    );

    // The first registration, held open with its device inserted.
    let first = db::connect(&url).await?;
    first
        .batch_execute(&format!(
            "BEGIN;
             SELECT 1 FROM users WHERE id = '{a}' FOR UPDATE;
             {lock}
             INSERT INTO devices (user_id, name, public_key, ipv4_address, ipv6_address)
             VALUES ('{a}', 'Laptop', '{k}', '10.64.0.200', 'fd00:64::200');",
            lock = sql::lock_device_key(&format!("'{}'", key('C'))),
            k = key('C'),
        ))
        .await?;
    let second = db::connect(&url).await?;
    let statement = registration(b, &key('C'), 5);
    let racing = tokio::spawn(async move { second.simple_query(&statement).await });
    one_waits_for_a_lock(&client, "the second registration never waited").await?;
    first.batch_execute("COMMIT").await?;
    let answer = racing
        .await?
        .map_err(|e| format!("the second registration failed: {e}"))?;
    let text = last_row(&answer).ok_or("the registration returned no row")?;
    let refused: serde_json::Value = serde_json::from_str(text)?;
    assert_eq!(
        (refused["taken"].as_bool(), refused["device"].is_null()),
        (Some(true), true),
        "{refused}"
    );
    assert_eq!(
        last_drawn(&client).await?,
        drawn,
        "the registration refused for its key drew a number"
    );
    Ok(())
}

async fn current_database(client: &tokio_postgres::Client) -> Result<String, Failed> {
    Ok(client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0))
}

/// The admin API's server endpoints (`sql::SERVER_ENDPOINT`) read as the
/// connect answer's (`Server::endpoint`, whose unit test has the same cases):
/// an IPv6 address in brackets.
async fn server_endpoint(pg: &Postgres) -> Result<(), Failed> {
    let client = fresh(pg).await?;
    let q = format!(
        "SELECT {} FROM (SELECT $1::text AS hostname, 51820 AS port) s",
        sql::SERVER_ENDPOINT
    );
    for (hostname, expected) in [
        ("fra-1.vpn.example", "fra-1.vpn.example:51820"),
        ("192.0.2.7", "192.0.2.7:51820"),
        ("2001:db8::1", "[2001:db8::1]:51820"),
    ] {
        let endpoint: String = client.query_one(&q, &[&hostname]).await?.get(0);
        assert_eq!(endpoint, expected);
    }
    Ok(())
}

/// The numbers in quarantine or waiting, oldest first.
async fn freed(client: &tokio_postgres::Client) -> Result<Vec<i64>, Failed> {
    Ok(client
        .query(
            "SELECT n FROM freed_tunnel_addresses ORDER BY freed_at, n",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Ends the quarantine of every freed number.
async fn age_freed(client: &tokio_postgres::Client) -> Result<(), Failed> {
    client
        .batch_execute(&format!(
            "UPDATE freed_tunnel_addresses SET freed_at = now() - interval '{}' - interval '1 second'",
            sql::ADDRESS_QUARANTINE
        ))
        .await?;
    Ok(())
}

/// The number behind a registration's device: its IPv4 address's offset.
fn number(added: &serde_json::Value) -> i64 {
    let ip: std::net::Ipv4Addr = added["device"]["ipv4_address"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no device added: {added}"));
    i64::from(u32::from(ip) - u32::from(device::tunnel_bases().0))
}

/// A deleted device's number goes back to the pool, and is given again once
/// its quarantine has passed, before the sequence draws a new one: otherwise
/// every register-and-delete (a reinstall, a replaced phone, a closed
/// account) uses up one of the fleet's addresses for good, and once the
/// sequence runs out no one can register a device.
async fn a_deleted_devices_address_is_given_again(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh(pg).await?;
    db::migrate(&mut client).await?;
    let users = new_users(&client, &["a@example.test", "b@example.test"]).await?;
    let (a, b) = (&users[0], &users[1]);
    let key = |c: char| format!("{}=", c.to_string().repeat(43));

    let first = number(&register(&client, a, &key('A'), 5).await?);
    client
        .batch_execute(&format!(
            "DELETE FROM devices WHERE public_key = '{}'",
            key('A')
        ))
        .await?;
    assert_eq!(freed(&client).await?, [first]);

    // In quarantine: a new number is drawn, and the freed one waits.
    let second = number(&register(&client, a, &key('B'), 5).await?);
    assert_eq!(second, first + 1);
    assert_eq!(freed(&client).await?, [first]);

    // Past it: given again, with the addresses the number maps to, and the
    // sequence does not move. A refused registration takes nothing.
    age_freed(&client).await?;
    let full = register(&client, a, &key('C'), 1).await?;
    assert!(full["device"].is_null(), "{full}");
    assert_eq!(freed(&client).await?, [first]);
    let again = register(&client, b, &key('C'), 5).await?;
    assert_eq!(number(&again), first);
    assert_eq!(
        device::tunnel_addresses(first as u64),
        Some((
            again["device"]["ipv4_address"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            again["device"]["ipv6_address"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        ))
    );
    assert_eq!(last_drawn(&client).await?, second);
    assert!(freed(&client).await?.is_empty());

    // A freed number that a device holds (the migration frees the number of
    // a registration in flight) is passed over, not a unique violation.
    let held = number(&register(&client, a, &key('F'), 5).await?);
    client
        .batch_execute(&format!(
            "INSERT INTO freed_tunnel_addresses (n, freed_at) VALUES ({held}, now() - interval '2 days')"
        ))
        .await?;
    let fresh = number(&register(&client, a, &key('G'), 5).await?);
    assert_eq!(fresh, held + 1, "a new number, the held one passed over");
    assert_eq!(freed(&client).await?, [held]);
    // Its device deleted, the number's quarantine starts from then, not from
    // the older row's time.
    client
        .batch_execute(&format!(
            "DELETE FROM devices WHERE public_key = '{}'",
            key('F')
        ))
        .await?;
    let next = number(&register(&client, a, &key('H'), 5).await?);
    assert_eq!(next, fresh + 1, "given again within its quarantine");
    client
        .batch_execute(&format!(
            "DELETE FROM devices WHERE public_key IN ('{}', '{}'); DELETE FROM freed_tunnel_addresses",
            key('G'),
            key('H')
        ))
        .await?;

    // A deleted account frees its devices' numbers too (the cascade).
    client
        .batch_execute(&format!("DELETE FROM users WHERE id = '{b}'"))
        .await?;
    assert_eq!(freed(&client).await?, [first]);

    // With the sequence at its end, a freed number still registers a device;
    // with none left, PostgreSQL refuses.
    client
        .batch_execute("SELECT setval('device_address_seq', 4194302)")
        .await?;
    age_freed(&client).await?;
    assert_eq!(number(&register(&client, a, &key('D'), 5).await?), first);
    refused_past_the_range(&client, a, &key('E')).await?;
    Ok(())
}

/// The migration gives back the numbers that devices deleted before it used
/// up: every number drawn that no device holds, in quarantine from then.
async fn the_migration_frees_what_deletes_used_up(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh_at(pg, 11).await?;
    let user: String = client
        .query_one(
            "INSERT INTO users (email, password_hash) VALUES ('a@example.test', '$argon2id$x')
             RETURNING id::text",
            &[],
        )
        .await?
        .get(0);
    for c in ['A', 'B', 'C', 'D'] {
        let key = format!("{}=", c.to_string().repeat(43));
        client
            .batch_execute(&format!(
                "INSERT INTO devices (user_id, name, public_key, ipv4_address, ipv6_address)
                 SELECT '{user}', 'phone', '{key}', '10.64.0.0'::inet + n, 'fd4b:6565:6e00::'::inet + n
                 FROM (SELECT nextval('device_address_seq') AS n) s"
            ))
            .await?;
    }
    client
        .batch_execute("DELETE FROM devices WHERE ipv4_address IN ('10.64.0.2', '10.64.0.4')")
        .await?;
    db::migrate(&mut client).await?;
    assert_eq!(freed(&client).await?, [2, 4]);
    let fresh: bool = client
        .query_one(
            &format!(
                "SELECT bool_and(freed_at > now() - interval '{}') FROM freed_tunnel_addresses",
                sql::ADDRESS_QUARANTINE
            ),
            &[],
        )
        .await?
        .get(0);
    assert!(
        fresh,
        "the numbers freed by the migration skip the quarantine"
    );
    Ok(())
}

/// V13 gives a subscription already past due the time its status was set,
/// else the time its row last changed; the trigger it adds must not put its
/// own (the migration's time) in place of that.
async fn past_due_backfill(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh_at(pg, 12).await?;
    client
        .batch_execute(
            "INSERT INTO users (id, email, password_hash)
             VALUES ('00000000-0000-4000-8000-000000000001', 'a@example.test', '$argon2id$x'),
                    ('00000000-0000-4000-8000-000000000002', 'b@example.test', '$argon2id$x');
             INSERT INTO subscriptions (user_id, plan_id, status, current_period_end, status_event_at, updated_at)
             VALUES ('00000000-0000-4000-8000-000000000001', 'plus', 'past_due', now() + interval '20 days',
                     NULL, '2020-01-01T00:00:00Z'),
                    ('00000000-0000-4000-8000-000000000002', 'plus', 'past_due', now() + interval '20 days',
                     '2021-06-01T00:00:00Z', '2022-01-01T00:00:00Z');",
        )
        .await?;
    db::migrate(&mut client).await?;
    let since: Vec<(String, i64)> = pairs(
        &client,
        "SELECT u.email::text, extract(epoch FROM s.past_due_since)::bigint
         FROM subscriptions s JOIN users u ON u.id = s.user_id ORDER BY u.email",
    )
    .await?;
    assert_eq!(
        since,
        [
            ("a@example.test".to_owned(), 1_577_836_800),
            ("b@example.test".to_owned(), 1_622_505_600)
        ]
    );
    Ok(())
}

/// V18 puts stored emails in NFC: an address alone in its spelling takes the
/// NFC one; of several spellings of one address, the NFC one keeps it, else
/// the oldest account takes it, and the others stay as they were. Afterwards
/// the table refuses a new address that is not in NFC.
async fn emails_in_nfc(pg: &Postgres) -> Result<(), Failed> {
    let mut client = fresh_at(pg, 17).await?;
    let rows = [
        // (id, email, created) ; an e and a combining acute, alone.
        ("01", "rene\u{301}@example.test", "2024-01-01"),
        // The NFC spelling exists, made later: it keeps the address.
        ("02", "zoe\u{308}@example.test", "2024-01-01"),
        ("03", "zo\u{eb}@example.test", "2024-02-01"),
        // Two spellings (marks in either order), neither in NFC: the older
        // one takes the NFC spelling.
        ("04", "a\u{301}\u{323}@example.test", "2024-03-01"),
        ("05", "a\u{323}\u{301}@example.test", "2024-02-01"),
        ("06", "plain@example.test", "2024-01-01"),
    ];
    for (id, email, created) in rows {
        client
            .execute(
                "INSERT INTO users (id, email, password_hash, created_at)
                 VALUES (('00000000-0000-4000-8000-0000000000' || $1)::uuid, $2, '$argon2id$x', $3::text::timestamptz)",
                &[&id, &email, &created],
            )
            .await?;
    }
    db::migrate(&mut client).await?;
    let emails: Vec<(String, String)> = pairs(
        &client,
        "SELECT right(id::text, 2), email FROM users ORDER BY id",
    )
    .await?;
    let expected = [
        ("01", "ren\u{e9}@example.test"),
        ("02", "zoe\u{308}@example.test"),
        ("03", "zo\u{eb}@example.test"),
        ("04", "a\u{301}\u{323}@example.test"),
        ("05", "\u{1ea1}\u{301}@example.test"),
        ("06", "plain@example.test"),
    ]
    .map(|(id, email)| (id.to_owned(), email.to_owned()));
    assert_eq!(emails, expected);
    // The two left as they were, which `migrate` warns of.
    assert_eq!(db::emails_not_in_nfc(&client).await?, 2);
    let refused = client
        .execute(
            "INSERT INTO users (email, password_hash) VALUES ($1, '$argon2id$x')",
            &[&"new\u{301}@example.test"],
        )
        .await;
    assert!(
        refused
            .as_ref()
            .err()
            .and_then(|e| e.as_db_error())
            .map(|e| e.constraint())
            == Some(Some("users_email_nfc")),
        "{refused:?}"
    );
    client
        .execute(
            "INSERT INTO users (email, password_hash) VALUES ($1, '$argon2id$x')",
            &[&"new\u{e9}@example.test"],
        )
        .await?;
    Ok(())
}

/// The rows a retention function answered: `level: message`.
async fn expired(client: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>, Failed> {
    let rows = client.query(sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| format!("{}: {}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Events in `table` (a partition, or `connection_events` for all).
async fn events_in(client: &tokio_postgres::Client, table: &str) -> Result<i64, Failed> {
    Ok(client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0))
}

/// The ids of the billing events recorded as processed.
async fn webhook_ids(client: &tokio_postgres::Client) -> Result<Vec<String>, Failed> {
    let ids: Vec<(String, String)> =
        pairs(client, "SELECT id, type FROM webhook_events ORDER BY id").await?;
    Ok(ids.into_iter().map(|(id, _)| id).collect())
}

/// V15: a month's partition is dropped once all of it is past the
/// retention, one a run, oldest first, and not while the queue consumer's
/// inserts hold the table (it waits 2 s, says so, and the next run drops
/// it); the default partition's old rows and old billing-event records go a
/// batch at a time; neither function takes a retention shorter than its
/// floor.
async fn retention(pg: &Postgres) -> Result<(), Failed> {
    let name = pg.create_database("mig");
    let mut client = db::connect(&pg.url(&name)).await?;
    db::migrate(&mut client).await?;
    let other = db::connect(&pg.url(&name)).await?;
    // Three past months (UTC), made as the cron makes them: two that ended
    // more than 90 days ago, one that ends within the last 90 days.
    let months: Vec<(String, String)> = pairs(
        &client,
        "SELECT to_char(m, 'YYYY_MM'), m::text
           FROM (VALUES (date_trunc('month', now() - interval '300 days', 'UTC')),
                        (date_trunc('month', now() - interval '200 days', 'UTC')),
                        (date_trunc('month', now() - interval '80 days', 'UTC'))) v(m)",
    )
    .await?;
    let [
        (older, older_start),
        (old, old_start),
        (recent, recent_start),
    ] = <[_; 3]>::try_from(months).unwrap();
    assert!(older != old && old != recent);
    let event = |at: &str| {
        format!(
            "INSERT INTO connection_events (event_id, occurred_at, user_id, device_id, region_id, outcome)
             VALUES (gen_random_uuid(), {at}, gen_random_uuid(), gen_random_uuid(), 'eu-central', 'admitted');"
        )
    };
    let mut setup = String::new();
    for (month, start) in [
        (&older, &older_start),
        (&old, &old_start),
        (&recent, &recent_start),
    ] {
        setup += &format!(
            "CREATE TABLE connection_events_{month} PARTITION OF connection_events
                 FOR VALUES FROM ('{start}') TO (timestamptz '{start}' + interval '1 month');"
        );
        setup += &event(&format!("timestamptz '{start}' + interval '1 day'"));
    }
    // The default partition: three events of a month with no partition
    // before the older one, one far ahead.
    for _ in 0..3 {
        setup += &event(&format!("timestamptz '{older_start}' - interval '1 year'"));
    }
    setup += &event("now() + interval '5 years'");
    client.batch_execute(&setup).await?;
    assert_eq!(events_in(&client, "connection_events_default").await?, 4);

    // The consumer is writing this month's events: the drop waits for it no
    // more than 2 s, and says so. The default partition's oldest rows go
    // first, two a run here.
    other
        .batch_execute(&format!("BEGIN; {}", event("now()")))
        .await?;
    let expire = "SELECT * FROM expire_connection_events(interval '90 days', 2)";
    let dropped = |month: &str| {
        format!(
            "info: connection_events_{month} dropped: its events are all older than the retention of 90 days"
        )
    };
    let from_default = |n: u32| {
        format!(
            "info: {n} events older than the retention of 90 days deleted from connection_events_default"
        )
    };
    let started = std::time::Instant::now();
    let lines = expired(&client, expire).await?;
    let waited = started.elapsed();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], from_default(2));
    assert!(
        lines[1].starts_with(&format!(
            "warn: connection_events_{older} is past the retention of 90 days but was not dropped"
        )) && lines[1].contains("lock timeout"),
        "{lines:?}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(2) && waited < std::time::Duration::from_secs(5),
        "waited {waited:?}"
    );
    let exists = |part: String| {
        let client = &client;
        async move {
            client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&part])
                .await
                .map(|r| r.get::<_, bool>(0))
        }
    };
    assert!(exists(format!("connection_events_{older}")).await?);

    // Once the insert commits, each run drops one month past the retention,
    // the oldest first; the default partition's last old row goes with the
    // first. The recent month, this month's event and the one far ahead
    // stay.
    other.batch_execute("COMMIT").await?;
    assert_eq!(
        expired(&client, expire).await?,
        [from_default(1), dropped(&older)]
    );
    assert!(!exists(format!("connection_events_{older}")).await?);
    assert!(exists(format!("connection_events_{old}")).await?);
    assert_eq!(expired(&client, expire).await?, [dropped(&old)]);
    assert!(!exists(format!("connection_events_{old}")).await?);
    assert!(exists(format!("connection_events_{recent}")).await?);
    assert_eq!(
        events_in(&client, &format!("connection_events_{recent}")).await?,
        1
    );
    assert_eq!(events_in(&client, "connection_events_default").await?, 1);
    assert_eq!(events_in(&client, "connection_events").await?, 3);
    assert!(expired(&client, expire).await?.is_empty());

    // Billing-event records: three received 100 days ago, one 10 days ago;
    // two go a run, oldest first.
    client
        .batch_execute(
            "INSERT INTO webhook_events (id, type, event_created_at, received_at) VALUES
                 ('evt_a', 'invoice.paid', now(), now() - interval '102 days'),
                 ('evt_b', 'invoice.paid', now(), now() - interval '101 days'),
                 ('evt_c', 'invoice.paid', now(), now() - interval '100 days'),
                 ('evt_d', 'invoice.paid', now(), now() - interval '10 days')",
        )
        .await?;
    let expire = "SELECT * FROM expire_webhook_events(interval '90 days', 2)";
    let deleted = |n: u32| {
        vec![format!(
            "info: {n} processed billing events older than the retention of 90 days deleted"
        )]
    };
    assert_eq!(expired(&client, expire).await?, deleted(2));
    assert_eq!(webhook_ids(&client).await?, ["evt_c", "evt_d"]);
    assert_eq!(expired(&client, expire).await?, deleted(1));
    assert!(expired(&client, expire).await?.is_empty());
    assert_eq!(webhook_ids(&client).await?, ["evt_d"]);

    // Below the floors, each refuses and deletes nothing.
    for (sql, floor) in [
        (
            "SELECT * FROM expire_webhook_events(interval '29 days', 10)",
            "under the 30 days",
        ),
        (
            "SELECT * FROM expire_connection_events(interval '1 hour', 10)",
            "under a day",
        ),
    ] {
        let err = client.query(sql, &[]).await.expect_err(sql);
        assert!(
            err.as_db_error()
                .is_some_and(|e| e.message().contains(floor)),
            "{sql}: {err}"
        );
    }
    assert_eq!(webhook_ids(&client).await?, ["evt_d"]);
    Ok(())
}

/// The consumer's insert: a message the queue delivers again (the batch's
/// acknowledgement lost), or twice within one batch, writes its events once;
/// the other events of the batch are written.
async fn events_written_once(pg: &Postgres) -> Result<(), Failed> {
    use keenvpn_edge::domain::connection_event::{self, ConnectionEvent};
    let name = pg.create_database("mig");
    let mut client = db::connect(&pg.url(&name)).await?;
    db::migrate(&mut client).await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let event = |n: u8| ConnectionEvent {
        event_id: format!("00000000-0000-4000-8000-0000000000{n:02}"),
        occurred_at_ms: now_ms - u64::from(n),
        user_id: "00000000-0000-4000-8000-000000000101".into(),
        device_id: "00000000-0000-4000-8000-000000000201".into(),
        region_id: "eu-central".into(),
        server_id: Some("eu-central-1".into()),
        outcome: "admitted".into(),
    };
    let row = |n: u8| event(n).values_row(now_ms).expect("a storable event");
    // One batch with the first event twice, then the batch again with one
    // more event.
    client
        .simple_query(&connection_event::insert_sql(&[row(1), row(1), row(2)]))
        .await?;
    client
        .simple_query(&connection_event::insert_sql(&[row(1), row(2), row(3)]))
        .await?;
    let ids: Vec<(String, i64)> = pairs(
        &client,
        "SELECT event_id::text, count(*) FROM connection_events GROUP BY 1 ORDER BY 1",
    )
    .await?;
    assert_eq!(
        ids,
        (1..=3).map(|n| (event(n).event_id, 1)).collect::<Vec<_>>()
    );
    Ok(())
}
