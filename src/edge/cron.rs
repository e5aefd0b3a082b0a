//! The cron trigger, every minute:
//! - marks down the regions whose monitors stopped reporting (a report older
//!   than 3 minutes; regions never reported by a monitor are left alone),
//!   unless its own runs had a gap in the last 3 minutes (the database was
//!   down then: it needs it too, and refused the reports), or every one of
//!   several monitored regions went silent (the monitoring failed); and
//!   tells their `RegionGate` shards as soon as it has marked them, while
//!   the other steps and the publish run (`admin::tell_gates`), with the
//!   shards of every region whose gates' word changed in the last 5 minutes
//!   (migration V19): told again each run, a shard that missed the word
//!   (or was restarted since) has it within a minute, and a closed region
//!   stays closed at its gates until every copy of the catalogue says so;
//! - makes sure the monthly partitions of `connection_events` exist ahead;
//! - expires connection events and processed billing events past their
//!   retention (`domain::retention`);
//! - republishes the region catalogue snapshot to KV.
//!
//! It writes, so it uses the uncached Hyperdrive binding. It writes the
//! snapshot and its etag every run, whatever KV's read says ([`Write`]). KV
//! takes one write per key per second, and another publisher (an admin
//! change, a monitor's report) can meet the run's write: a refused write is
//! tried again a second later.

use super::log::{self, Level};
use super::{bindings, kv, pg, time};
use crate::domain::catalogue::{self, Region, Snapshot};
use crate::domain::retention::{self, Setting};
use serde_json::json;
use worker::{Env, ScheduleContext, ScheduledEvent, event};

/// One query builds the whole document as JSON inside PostgreSQL.
const CATALOGUE_SQL: &str = "\
SELECT coalesce(json_agg(json_build_object(
    'id', r.id, 'name', r.name, 'country', r.country,
    'latitude', r.latitude, 'longitude', r.longitude,
    'tier', r.tier, 'health', r.health, 'admission_rate', r.admission_rate,
    'servers', coalesce((
        SELECT json_agg(json_build_object(
            'id', s.id, 'hostname', s.hostname, 'port', s.port,
            'public_key', s.public_key, 'capacity', s.capacity, 'load', s.load, 'full', currently_full(s)) ORDER BY s.id)
        FROM servers s WHERE s.region_id = r.id AND s.enabled), '[]'::json)
) ORDER BY r.id), '[]'::json)::text FROM regions r";

/// The cron's maintenance, each step sent as a query of its own (the
/// marking step must stay first: the run tells the gates of the regions it
/// marked down, and of those changed in the last 5 minutes, as soon as it
/// has answered, `scheduled`): statements
/// sent together run as one transaction, and a failure to create a partition
/// must not undo marking silent regions down. Each is sent after a limit on
/// its run time in the database (`STEP_STATEMENT_LIMIT_MS`). Each line these
/// two answer with is a failure (its first column), except the marking
/// step's lines for the regions whose gates the run tells (their first
/// column null, then the region as [`GateWord`]); the retention steps
/// ([`retention_steps`]) follow them.
const MAINTENANCE_SQL: [(&str, &str); 2] = [
    // A run more than 90 s after the last one (the cron runs every minute)
    // followed a gap: the database was down, so monitors' reports were
    // refused, or the cron stalled. Silence then counts from 3 minutes on
    // (migration V11); so it does after the first run of all. The gap only
    // excuses a monitor heard from within 3 minutes before it began (the
    // last run before it, kept as `gap_started_at`; V14): one silent since
    // earlier is marked down at once, so that runs failing every other
    // minute, each good one after a gap, cannot hold a dead monitor's
    // region up for good.
    //
    // Silence from every monitored region at once, when there are several,
    // is read as the monitoring failing (its token rotated without the
    // monitors', their network cut off), not as the whole fleet down: marking
    // them all down would refuse every connect. None is marked then, and the
    // step answers with a line saying so, logged at error level each run.
    // A single monitored region has no other to be checked against.
    (
        "mark silent regions down",
        "WITH run AS (
             INSERT INTO cron_state (last_run_at, marks_down_from)
             VALUES (now(), now() + interval '3 minutes')
             ON CONFLICT (id) DO UPDATE SET
                 last_run_at = now(),
                 marks_down_from = CASE
                     WHEN cron_state.last_run_at < now() - interval '90 seconds'
                     THEN now() + interval '3 minutes'
                     ELSE cron_state.marks_down_from END,
                 gap_started_at = CASE
                     WHEN cron_state.last_run_at < now() - interval '90 seconds'
                     THEN cron_state.last_run_at
                     ELSE cron_state.gap_started_at END
             RETURNING marks_down_from, gap_started_at),
         monitors AS (
             SELECT count(*) AS monitored,
                    count(*) FILTER (WHERE health_reported_at >= now() - interval '3 minutes') AS heard
               FROM regions WHERE health_reported_at IS NOT NULL),
         marked AS (
             UPDATE regions SET reported_health = 'down', updated_at = now()
              WHERE health_reported_at < now() - interval '3 minutes' AND reported_health <> 'down'
                AND (SELECT now() >= marks_down_from
                            OR health_reported_at < gap_started_at - interval '3 minutes' FROM run)
                AND (SELECT heard > 0 OR monitored < 2 FROM monitors)
             RETURNING id, admission_rate, gate_word_version() AS version,
                       latitude, longitude, greatest(admission_rate, gates_rate_before) AS shard_rate),
         recent AS (
             SELECT id, admission_rate, region_admits(reported_health, operator_health, admission_rate) AS admits,
                    latitude, longitude, greatest(admission_rate, gates_rate_before) AS shard_rate
               FROM regions
              WHERE gates_changed_at > now() - interval '5 minutes' AND id NOT IN (SELECT id FROM marked)
              ORDER BY id FOR SHARE SKIP LOCKED)
         SELECT 'none of the ' || monitored || ' monitored regions reported in 3 minutes: '
                || 'read as the monitoring failing, so none is marked down', NULL, NULL, NULL, NULL, NULL, NULL, NULL
           FROM monitors, run
          WHERE monitored >= 2 AND heard = 0 AND now() >= run.marks_down_from
         UNION ALL
         SELECT NULL, id, admission_rate::text, 'true', version::text, latitude::text, longitude::text,
                shard_rate::text
           FROM marked
         UNION ALL
         SELECT NULL, id, admission_rate::text, (NOT admits)::text,
                gate_word_version()::text, latitude::text, longitude::text,
                shard_rate::text
           FROM recent",
    ),
    (
        "create connection event partitions",
        "SELECT ensure_connection_event_partitions(2)",
    ),
];

/// What a maintenance step's rows are.
#[derive(Clone, Copy)]
enum Lines {
    /// A failure in the first column, logged at error level; or, from the
    /// marking step, a null there and a region whose gates the run tells
    /// ([`GateWord`]) in the next seven.
    Failures,
    /// Two columns: a level (`info`, `warn`, `error`) and what happened.
    Leveled,
}

/// The retention steps: each expires one table's rows past the operator's
/// setting (`domain::retention`), a step of its own so that one failing
/// undoes nothing of the other. A setting that cannot be read is an error
/// for its step, which expires nothing.
fn retention_steps(env: &Env) -> [(&'static str, Result<String, String>); 2] {
    let days = |setting: Setting| setting.days(bindings::setting(env, setting.var).as_deref());
    [
        (
            "expire connection events",
            days(retention::CONNECTION_EVENTS).map(|d| {
                format!(
                    "SELECT * FROM expire_connection_events(make_interval(days => {d}), {})",
                    retention::DEFAULT_PARTITION_ROWS_PER_RUN
                )
            }),
        ),
        (
            "expire billing events",
            days(retention::WEBHOOK_EVENTS).map(|d| {
                format!(
                    "SELECT * FROM expire_webhook_events(make_interval(days => {d}), {})",
                    retention::WEBHOOK_EVENTS_PER_RUN
                )
            }),
        ),
    ]
}

/// How long each of a run's waits on PostgreSQL (the connection, each
/// maintenance step) and its publish may take, and telling the gates of the
/// regions it marked down or that changed in the last 5 minutes. Nothing
/// else bounds a
/// scheduled run: without these, a database that accepted the connection and
/// never answered (or a step waiting on a lock) held every run from then on,
/// one more each minute, and the catalogue was never published. With the
/// retention steps started only early in a run ([`RETENTION_START_LIMIT_MS`])
/// they end within the minute between runs.
const STEP_LIMIT_MS: u64 = 10_000;

/// How far into a run the retention steps may still start. Past it (two of
/// the earlier waits at their limits) they are left to the next run: at
/// most one of them then starts, and the run's waits, the publish's
/// included, end within 40 s.
const RETENTION_START_LIMIT_MS: u64 = 2 * STEP_LIMIT_MS;

/// How long PostgreSQL itself lets a maintenance step run, a second under
/// [`STEP_LIMIT_MS`]. A step the run gives up on would otherwise stay in the
/// database: a backend waiting on a lock does not notice that its client went
/// away (nor, behind a pool, does the pool's connection go away), and it would
/// take the lock, and do the step, whenever the lock came free, while the
/// steps of later runs queued behind it. Set for the step's own implicit
/// transaction only (`SET LOCAL`), so a pooled connection keeps its settings.
const STEP_STATEMENT_LIMIT_MS: u64 = STEP_LIMIT_MS - 1_000;

fn late() -> String {
    format!("no end within {STEP_LIMIT_MS} ms")
}

#[event(scheduled)]
async fn scheduled(_event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    let began = time::now_ms();
    let client = match time::timeout(STEP_LIMIT_MS, pg::connect(&env, bindings::DB)).await {
        Some(Ok(client)) => Some(client),
        Some(Err(e)) => {
            log_step("connect", Level::Error, &e);
            None
        }
        None => {
            log_step("connect", Level::Error, &late());
            None
        }
    };
    let steps: Vec<_> = MAINTENANCE_SQL
        .iter()
        .map(|&(step, sql)| (step, Ok(sql.to_owned()), Lines::Failures))
        .chain(
            retention_steps(&env)
                .into_iter()
                .map(|(step, sql)| (step, sql, Lines::Leveled)),
        )
        .collect();
    // The marking step first, alone. The gates of the regions it marked
    // down, and of those whose gates' word changed in the last 5 minutes
    // (told again), are told as soon as it has answered, all at once, while
    // the other steps and the publish run: the catalogue takes up to a minute to
    // reach every location, the gates a moment. Bounded as a step is.
    let (words, go_on) = match &client {
        Some(client) => maintain(client, began, &steps[..1]).await,
        None => (Vec::new(), false),
    };
    let (env, steps) = (&env, &steps);
    let gates = async {
        // All at once: one region whose shards are slow to answer (2 s a
        // call, twice) holds up no other.
        let done = std::cell::RefCell::new(vec![false; words.len()]);
        let told = futures::future::join_all(words.iter().enumerate().map(|(i, m)| {
            let done = &done;
            async move {
                let region = (m.id.as_str(), m.at, (m.rate, m.shard_rate));
                super::admin::tell_gates(env, None, region, (m.version, m.closed), None).await;
                done.borrow_mut()[i] = true;
            }
        }));
        if time::timeout(STEP_LIMIT_MS, told).await.is_none() {
            let done = done.borrow();
            let untold: Vec<&str> = words
                .iter()
                .zip(done.iter())
                .filter(|(_, told)| !**told)
                .map(|(m, _)| m.id.as_str())
                .collect();
            let step = "tell the gates of regions marked down or changed";
            let why = format!("{}; not told: {}", late(), untold.join(", "));
            log_step(step, Level::Error, &why);
        }
    };
    let rest = async move {
        // The connection goes before the publish, which opens its own.
        if let Some(client) = client.filter(|_| go_on) {
            maintain(&client, began, &steps[1..]).await;
        }
        publish_run(env).await;
    };
    futures::future::join(gates, rest).await;
}

/// A maintenance step: its name, its SQL (or why there is none) and what
/// its rows are.
type Step = (&'static str, Result<String, String>, Lines);

/// Runs `steps` in order, from a run that began at `began`; the regions
/// whose gates the run tells, and whether the connection is free for more steps
/// (not when a step was given up on while it ran).
async fn maintain(
    client: &tokio_postgres::Client,
    began: u64,
    steps: &[Step],
) -> (Vec<GateWord>, bool) {
    let failed = |step: &str, e: &str| log_step(step, Level::Error, e);
    let mut words = Vec::new();
    for (step, sql, lines) in steps {
        let (step, lines) = (*step, *lines);
        // Retention can wait a minute; the publish, after it, should
        // not. A run whose earlier waits took long leaves it to the
        // next, so that the run ends within its minute.
        if matches!(lines, Lines::Leveled)
            && time::now_ms().saturating_sub(began) > RETENTION_START_LIMIT_MS
        {
            log::event(
                Level::Warn,
                None,
                "cron maintenance deferred",
                json!({"step": step, "result": "the run is late; the next one does it"}),
            );
            continue;
        }
        let sql = match sql {
            Ok(sql) => sql,
            Err(e) => {
                failed(step, e);
                continue;
            }
        };
        // One simple query: the setting and the step run in one
        // implicit transaction, which the setting does not outlive.
        let sql = format!("SET LOCAL statement_timeout = {STEP_STATEMENT_LIMIT_MS}; {sql}");
        match time::timeout(STEP_LIMIT_MS, client.simple_query(&sql)).await {
            // The partition step answers with a line per month it
            // had to skip (its rows go to the default partition),
            // the marking step with one when it reads the
            // monitoring as failing and one per region it marked
            // down; the retention steps with what they expired or
            // could not yet.
            Some(Ok(messages)) => words.extend(report(step, lines, &messages)),
            Some(Err(e)) => failed(step, &e.to_string()),
            // The connection is busy with the step: the others would
            // queue behind it.
            None => {
                failed(step, &late());
                return (words, false);
            }
        }
    }
    (words, true)
}

/// The run's publish of the catalogue, after the maintenance.
async fn publish_run(env: &Env) {
    let published = time::timeout(
        STEP_LIMIT_MS,
        publish(env, bindings::DB, Write::Always, None),
    )
    .await
    .unwrap_or_else(|| Err(late()));
    match published {
        // The run always writes (`Write::Always`). Should this isolate's copy
        // be older than what it wrote, it routes by what it wrote from the
        // next request on, as the publisher object's does after an admin
        // change, rather than by the old one for up to its reuse time.
        Ok((snapshot, _)) => {
            log::event(
                Level::Info,
                None,
                "catalogue published",
                json!({"etag": snapshot.etag}),
            );
            super::catalogue::install(snapshot);
        }
        Err(e) => log::event(
            Level::Error,
            None,
            "catalogue publish failed",
            json!({"error": e}),
        ),
    }
}

/// A region whose gates the run tells (see `admin::tell_gates`): one the
/// marking step marked down, or one whose gates' word changed in the last 5
/// minutes (migration V19), told again; whether it is closed, and the
/// word's version.
struct GateWord {
    id: String,
    rate: u32,
    /// The highest rate it had in the 5 minutes before its change, or its
    /// rate: whose shards are told.
    shard_rate: u32,
    closed: bool,
    version: i64,
    /// Where the region is: where its gates belong.
    at: Option<crate::domain::geo::Point>,
}

/// Logs the rows a maintenance step answered with; the regions whose gates
/// the run tells.
fn report(
    step: &str,
    lines: Lines,
    messages: &[tokio_postgres::SimpleQueryMessage],
) -> Vec<GateWord> {
    let mut words = Vec::new();
    for message in messages {
        let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let (level, text) = match lines {
            Lines::Failures => match (row.get(0), row.try_get(1).ok().flatten()) {
                (None, Some(id)) => {
                    let column = |n| row.try_get(n).ok().flatten().unwrap_or_default();
                    match (column(2).parse(), column(4).parse(), column(7).parse()) {
                        (Ok(rate), Ok(version), Ok(shard_rate)) => words.push(GateWord {
                            id: id.to_owned(),
                            rate,
                            shard_rate,
                            closed: column(3) == "true",
                            version,
                            at: crate::domain::geo::Point::parse(column(5), column(6)),
                        }),
                        _ => log_step(step, Level::Error, &format!("{id}: unreadable line")),
                    }
                    continue;
                }
                (failure, _) => (Level::Error, failure),
            },
            Lines::Leveled => {
                let level = match row.get(0) {
                    Some("info") => Level::Info,
                    Some("warn") => Level::Warn,
                    _ => Level::Error,
                };
                (level, row.get(1))
            }
        };
        if let Some(text) = text {
            log_step(step, level, text);
        }
    }
    words
}

/// Logs what the maintenance step `step` did (`info`, `warn`), or why it
/// failed (`error`).
fn log_step(step: &str, level: Level, text: &str) {
    let (msg, field) = match level {
        Level::Error => ("cron maintenance failed", "error"),
        Level::Info | Level::Warn => ("cron maintenance", "result"),
    };
    log::event(level, None, msg, json!({"step": step, field: text}));
}

/// How many times [`publish`] reads the catalogue again after a write that
/// another publisher may have overtaken.
const PUBLISH_ROUNDS: usize = 3;
/// KV's limit: one write per key per second.
pub(super) const KV_WRITE_SPACING_MS: u64 = 1_000;

/// When [`publish`] writes a snapshot that KV seems to hold already.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Always: the caller has just changed the catalogue (an operator's
    /// change, a monitor's report that changed a region), or is the cron,
    /// whose run is the net that brings KV to the catalogue within a minute.
    /// KV's read at this location may be a cached value up to a minute old,
    /// and a snapshot's etag is a hash of its content: a region down, up and
    /// down again within that minute reads as "KV holds it" while KV
    /// everywhere says up. So such a read cannot be trusted to skip a write,
    /// and none is made.
    Always,
    /// Only when KV's read differs: the first copy of an isolate that found
    /// no snapshot in KV (every isolate of a new deployment may do this at
    /// once, and KV takes one write per key per second).
    IfDifferent,
}

/// Reads the catalogue through `binding` and stores it in KV (as `write`
/// says). Returns the snapshot last read and whether this call wrote a
/// snapshot (should a later round's write fail, the one returned may be
/// newer than KV's, which the next run corrects);
/// with [`Write::IfDifferent`], a failed write is logged and the snapshot
/// read is returned all the same (unwritten).
///
/// Two publishers can race (an operator's change and a monitor's report, or
/// either and the cron): one that read the catalogue before the other's change
/// committed may write its older snapshot after the other wrote the newer one.
/// So a publisher that wrote reads the catalogue again, and writes again if it
/// has moved on meanwhile: whichever publisher writes last has then seen the
/// newest catalogue.
pub async fn publish(
    env: &Env,
    binding: &str,
    write: Write,
    fault: Option<&str>,
) -> Result<(Snapshot, bool), String> {
    publish_until(env, binding, (write, fault), &|| true).await
}

/// [`publish`], reading the catalogue again after a write only while
/// `again()` says so: the `CataloguePublisher` object stops once another
/// publish is queued behind this one, which will read and write it anyway.
pub async fn publish_until(
    env: &Env,
    binding: &str,
    (write, fault): (Write, Option<&str>),
    again: &dyn Fn() -> bool,
) -> Result<(Snapshot, bool), String> {
    let client = pg::connect(env, binding).await?;
    let mut snapshot = read_catalogue(&client).await?;
    let mut written = false;
    for round in 1..=PUBLISH_ROUNDS {
        // At the development-only fault point, KV refuses the first write.
        let refuse = round == 1 && fault == Some(super::fault::KV_REFUSED);
        let stored = if fault == Some(super::fault::CATALOGUE_UNSTORED) {
            Err(format!(
                "injected fault at {}",
                super::fault::CATALOGUE_UNSTORED
            ))
        } else {
            store_snapshot(env, &snapshot, write, refuse).await
        };
        match stored {
            Ok(true) => {}
            Ok(false) => break,
            // An isolate's first copy: it routes with what PostgreSQL said
            // rather than answer 503 for a write that other isolates, racing
            // for the same key, are making. The cron stores it within a
            // minute if none of them did.
            Err(e) if write == Write::IfDifferent => {
                log::event(
                    Level::Warn,
                    None,
                    "catalogue read from PostgreSQL; storing it in KV failed",
                    json!({"etag": snapshot.etag, "error": e}),
                );
                break;
            }
            Err(e) => return Err(e),
        }
        written = true;
        // After the last write, a newer catalogue read again would not be
        // stored: return the snapshot stored, which the cron corrects within
        // a minute if it has moved on.
        if round == PUBLISH_ROUNDS || !again() {
            break;
        }
        let again = read_catalogue(&client).await?;
        if again.etag == snapshot.etag {
            break;
        }
        snapshot = again;
        // KV takes one write per key per second.
        time::sleep(KV_WRITE_SPACING_MS).await;
    }
    Ok((snapshot, written))
}

async fn read_catalogue(client: &tokio_postgres::Client) -> Result<Snapshot, String> {
    let rows = client
        .simple_query(CATALOGUE_SQL)
        .await
        .map_err(|e| format!("query: {e}"))?;
    let json = pg::first_column(&rows)
        .next()
        .ok_or("catalogue query returned no row")?;
    let regions: Vec<Region> =
        serde_json::from_str(json).map_err(|e| format!("catalogue rows: {e}"))?;
    Ok(Snapshot::new(regions))
}

/// Stores `snapshot` and its etag in KV, with [`Write::IfDifferent`] unless
/// KV's read holds it already; returns whether the snapshot was written.
async fn store_snapshot(
    env: &Env,
    snapshot: &Snapshot,
    write: Write,
    refuse: bool,
) -> Result<bool, String> {
    // Only the stored snapshot's etag is needed; the rest is skipped unparsed.
    #[derive(serde::Deserialize)]
    struct Stored {
        etag: String,
    }
    let (changed, tag_current) = match write {
        Write::Always => (true, false),
        Write::IfDifferent => {
            let stored: Option<Stored> = kv::get_json(env, catalogue::KV_KEY).await.ok().flatten();
            let changed = stored.is_none_or(|s| s.etag != snapshot.etag);
            // The etag follows the snapshot it names (and is written on its
            // own where a snapshot was stored before this key existed).
            let tag_current = !changed
                && kv::get_text(env, catalogue::ETAG_KV_KEY)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|tag| tag == snapshot.etag);
            (changed, tag_current)
        }
    };
    if changed {
        let text = serde_json::to_string(snapshot).map_err(|e| format!("snapshot: {e}"))?;
        put_retried(env, catalogue::KV_KEY, &text, refuse).await?;
    }
    if !tag_current {
        put_retried(env, catalogue::ETAG_KV_KEY, &snapshot.etag, false).await?;
    }
    Ok(changed)
}

/// Writes `text` under `key`, and once more a second later if KV refused it:
/// KV takes one write per key per second, and publishers meet (the cron's
/// run every minute, an admin change, a monitor's report). `refuse`: the
/// first write fails, at the development-only fault point.
async fn put_retried(env: &Env, key: &str, text: &str, refuse: bool) -> Result<(), String> {
    if !refuse && kv::put(env, key, text, None).await.is_ok() {
        return Ok(());
    }
    time::sleep(KV_WRITE_SPACING_MS).await;
    kv::put(env, key, text, None).await
}
