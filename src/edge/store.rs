//! PostgreSQL queries of the auth flows, through the uncached Hyperdrive binding
//! (credentials and entitlements must be fresh).
//!
//! Each function is one round trip: PostgreSQL assembles the answer as a single
//! JSON value, which serde turns into typed data. Values are quoted with
//! [`crate::sql`] because only the simple query protocol is used (see there).

use super::{Fail, bindings, pg, time};
use crate::domain::account::Email;
use crate::domain::device::{DeviceName, PublicKey};
pub use crate::domain::entitlement::EntitlementInputs;
use crate::domain::entitlement::{ENDED, PAID_FOR, REVIVED_BY_PAYMENT, Status};
use crate::domain::problem::ProblemCode;
use crate::domain::stripe::{Change, Envelope};
use crate::http::ApiError;
use crate::sql::{self, DEVICE_JSON};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_postgres::Client;
use worker::Env;

/// Connecting and each query are bounded so a dead database answers 503 quickly.
const DB_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Deserialize)]
pub struct LoginRow {
    pub user_id: String,
    pub password_hash: String,
    pub inputs: EntitlementInputs,
}

#[derive(Debug, Deserialize)]
pub struct SignupRow {
    pub user_id: String,
    pub inputs: EntitlementInputs,
}

#[derive(Debug, Deserialize)]
pub struct AccountRow {
    pub id: String,
    pub email: String,
    pub created_at: i64,
    pub inputs: EntitlementInputs,
}

/// The SQL expression building [`EntitlementInputs`] for the user whose id is
/// `user`: the subscriptions being paid for (the others grant nothing), and
/// the sum of all the user's rows' versions, which every change raises.
fn inputs_sql(user: &str) -> String {
    format!(
        "json_build_object(
           'free', (SELECT json_build_object('id', p.id, 'max_devices', p.max_devices, 'region_tiers', p.region_tiers)
                    FROM plans p WHERE p.id = 'free'),
           'subscriptions', coalesce((SELECT json_agg(json_build_object(
                               'plan', json_build_object('id', p.id, 'max_devices', p.max_devices, 'region_tiers', p.region_tiers),
                               'status', s.status,
                               'current_period_end', extract(epoch FROM s.current_period_end)::bigint,
                               'cancel_at_period_end', s.cancel_at_period_end,
                               'past_due_since', extract(epoch FROM s.past_due_since)::bigint) ORDER BY s.id)
                            FROM subscriptions s JOIN plans p ON p.id = s.plan_id
                            WHERE s.user_id = {user} AND s.status IN ({paid})), '[]'::json),
           'version', coalesce((SELECT sum(s.version) FROM subscriptions s WHERE s.user_id = {user}), 0)::bigint)",
        paid = status_list(&PAID_FOR)
    )
}

/// Statuses as an SQL list of string literals.
fn status_list(statuses: &[Status]) -> String {
    statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn connect(env: &Env) -> Result<Client, Fail> {
    match time::timeout(DB_TIMEOUT_MS, pg::connect(env, bindings::DB)).await {
        Some(Ok(c)) => Ok(c),
        Some(Err(e)) => Err(Fail::unavailable(format!("database connect: {e}"))),
        None => Err(Fail::unavailable("database connect: timed out".into())),
    }
}

/// [`json_row`] for other modules of the shell.
pub async fn json_value<T: DeserializeOwned>(
    client: &Client,
    query: &str,
) -> Result<Option<T>, Fail> {
    json_row(client, query).await
}

/// Runs `query` (one or more statements); the answer is the first column of
/// the last row it returns, a JSON text value.
async fn json_row<T: DeserializeOwned>(client: &Client, query: &str) -> Result<Option<T>, Fail> {
    json_row_or(client, query, |_| None).await
}

/// Like [`json_row`], but `classify` may turn a database error into a client
/// answer (e.g. a unique violation into 409) instead of a 503.
async fn json_row_or<T: DeserializeOwned>(
    client: &Client,
    query: &str,
    classify: impl Fn(&tokio_postgres::error::DbError) -> Option<Fail>,
) -> Result<Option<T>, Fail> {
    let messages = match time::timeout(DB_TIMEOUT_MS, client.simple_query(query)).await {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            if let Some(fail) = e.as_db_error().and_then(&classify) {
                return Err(fail);
            }
            return Err(Fail::unavailable(format!("database query: {e}")));
        }
        None => return Err(Fail::unavailable("database query: timed out".into())),
    };
    match pg::first_column(&messages).next_back() {
        None => Ok(None),
        Some(t) => serde_json::from_str(t)
            .map(Some)
            .map_err(|e| Fail::internal(format!("database row: {e}"))),
    }
}

fn quoted(value: &str) -> Result<String, Fail> {
    // Inputs are validated before they get here; NUL is refused by parsing.
    sql::literal(value).map_err(|_| Fail::internal("NUL in a validated value".into()))
}

/// Credentials and entitlement inputs for a login, or `None` for an unknown email.
pub async fn find_for_login(client: &Client, email: &Email) -> Result<Option<LoginRow>, Fail> {
    let q = format!(
        "SELECT json_build_object('user_id', u.id, 'password_hash', u.password_hash, 'inputs', {})::text
         FROM users u WHERE u.email = {}",
        inputs_sql("u.id"),
        quoted(email.as_str())?
    );
    json_row(client, &q).await
}

/// Puts `new` in place of a user's password hash `old` (one made of the
/// password as typed, before passwords were normalized), unless the hash
/// changed meanwhile: `true` when it was replaced.
pub async fn upgrade_password_hash(
    client: &Client,
    user_id: &str,
    (old, new): (&str, &str),
) -> Result<bool, Fail> {
    let q = format!(
        "WITH u AS (UPDATE users SET password_hash = {}, updated_at = now()
                    WHERE id = {} AND password_hash = {} RETURNING 1)
         SELECT (count(*) = 1)::text FROM u",
        quoted(new)?,
        user_literal(user_id)?,
        quoted(old)?
    );
    Ok(json_row::<bool>(client, &q).await? == Some(true))
}

/// Creates the user; `None` when the email is already registered.
pub async fn create_user(
    client: &Client,
    email: &Email,
    password_hash: &str,
) -> Result<Option<SignupRow>, Fail> {
    let q = format!(
        "WITH u AS (INSERT INTO users (email, password_hash) VALUES ({}, {})
                    ON CONFLICT (email) DO NOTHING RETURNING id)
         SELECT json_build_object('user_id', u.id, 'inputs', {})::text FROM u",
        quoted(email.as_str())?,
        quoted(password_hash)?,
        inputs_sql("u.id")
    );
    json_row(client, &q).await
}

/// Removes a user created by a sign-up that could not open its session, if
/// nothing has been attached to it since (a device or a subscription).
/// `false`: the row stays (something was attached, or it was gone already).
pub async fn delete_new_user(client: &Client, user_id: &str) -> Result<bool, Fail> {
    let q = crate::sql::delete_new_user(&user_literal(user_id)?);
    Ok(json_row::<bool>(client, &q).await? == Some(true))
}

/// What deleting an account found (`sql::delete_account`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deletion {
    Deleted,
    /// A subscription may still charge it: nothing was deleted.
    Billing,
    /// No such account (deleted already).
    Absent,
}

/// Deletes the account `user_id` at its owner's request (`sql::delete_account`).
pub async fn delete_account(client: &Client, user_id: &str) -> Result<Deletion, Fail> {
    let q = crate::sql::delete_account(&user_literal(user_id)?);
    json_row::<Deletion>(client, &q)
        .await?
        .ok_or_else(|| Fail::internal("account deletion returned no row".into()))
}

/// The account behind a verified access token.
pub async fn account(client: &Client, user_id: &str) -> Result<Option<AccountRow>, Fail> {
    let id = sql::uuid(user_id)
        .ok_or_else(|| Fail::internal(format!("non-canonical user id {user_id:?}")))?;
    let q = format!(
        "SELECT json_build_object('id', u.id, 'email', u.email,
                                  'created_at', extract(epoch FROM u.created_at)::bigint, 'inputs', {})::text
         FROM users u WHERE u.id = {id}",
        inputs_sql("u.id")
    );
    json_row(client, &q).await
}

/// A device as the API shows it (the database builds it with [`DEVICE_JSON`]).
pub use crate::api::Device;

fn key_in_use() -> Fail {
    ApiError::new(
        ProblemCode::PublicKeyInUse,
        "Another device already uses this public key.",
    )
    .into()
}

/// A unique violation on a device's key: another user registered it
/// meanwhile (a key rotation, or two users adding one key at once).
fn key_taken_meanwhile(e: &tokio_postgres::error::DbError) -> Option<Fail> {
    let unique = e.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION;
    (unique && e.constraint().is_some_and(|c| c.contains("public_key"))).then(key_in_use)
}

fn user_literal(user_id: &str) -> Result<String, Fail> {
    sql::uuid(user_id).ok_or_else(|| Fail::internal(format!("non-canonical user id {user_id:?}")))
}

#[derive(Debug, Deserialize)]
pub struct Inserted {
    /// `None` when the database's own limit check refused the insert, or the
    /// user already has a device with this key.
    pub device: Option<Device>,
    /// The user's device with this key, if it existed before the statement:
    /// an earlier attempt committed but its answer was lost (the database
    /// died after the commit, or the object did).
    #[serde(default)]
    pub existing: Option<Device>,
    /// Whether another user's device has this key.
    #[serde(default)]
    pub taken: bool,
    /// Whether the user's row is gone (the account was deleted).
    #[serde(default)]
    pub gone: bool,
    /// The user's devices after the statement, oldest first.
    pub devices: Vec<Device>,
}

/// Inserts a device in one transaction that locks the user's row and re-checks
/// the limit ([`sql::insert_device`]): the Durable Object's ledger decides
/// first, this is the backstop that keeps PostgreSQL right even if the ledger
/// ever drifts. A key the user already registered inserts nothing and comes
/// back as `existing`; another user's key is 409, and a deleted user 401
/// `session_revoked`.
pub async fn insert_device(
    client: &Client,
    user_id: &str,
    name: &DeviceName,
    key: &PublicKey,
    limit: u32,
) -> Result<Inserted, Fail> {
    let q = sql::insert_device(
        &user_literal(user_id)?,
        &quoted(name.as_str())?,
        &quoted(key.as_str())?,
        limit,
    );
    let inserted: Inserted = json_row_or(client, &q, key_taken_meanwhile)
        .await?
        .ok_or_else(|| Fail::internal("insert returned no row".into()))?;
    if inserted.gone {
        return Err(ApiError::new(
            ProblemCode::SessionRevoked,
            "This account no longer exists.",
        )
        .into());
    }
    if inserted.taken && inserted.device.is_none() && inserted.existing.is_none() {
        return Err(key_in_use());
    }
    Ok(inserted)
}

#[derive(Debug, Deserialize)]
pub struct Deleted {
    pub deleted: bool,
    /// The user's devices after the statement, oldest first.
    pub devices: Vec<Device>,
}

/// Deletes the caller's device; another user's id deletes nothing.
pub async fn delete_device(
    client: &Client,
    user_id: &str,
    device_id: &str,
) -> Result<Deleted, Fail> {
    let u = user_literal(user_id)?;
    let d = sql::uuid(device_id).ok_or_else(|| Fail::internal("non-canonical device id".into()))?;
    let q = format!(
        "WITH del AS (DELETE FROM devices WHERE id = {d} AND user_id = {u} RETURNING id)
         SELECT json_build_object('deleted', EXISTS (SELECT 1 FROM del),
             'devices', (SELECT coalesce(json_agg({DEVICE_JSON} ORDER BY d.created_at, d.id), '[]'::json)
                         FROM devices d WHERE d.user_id = {u} AND d.id NOT IN (SELECT id FROM del)))::text"
    );
    json_row(client, &q)
        .await?
        .ok_or_else(|| Fail::internal("delete returned no row".into()))
}

pub async fn list_devices(client: &Client, user_id: &str) -> Result<Vec<Device>, Fail> {
    let u = user_literal(user_id)?;
    let q = format!(
        "SELECT coalesce(json_agg({DEVICE_JSON} ORDER BY d.created_at, d.id), '[]'::json)::text
         FROM devices d WHERE d.user_id = {u}"
    );
    Ok(json_row(client, &q).await?.unwrap_or_default())
}

#[derive(Debug, Deserialize)]
pub struct Rotated {
    /// `None` if the device is not the caller's.
    pub device: Option<Device>,
    /// The user's devices after the statement, oldest first.
    pub devices: Vec<Device>,
}

/// Replaces a device's public key.
pub async fn rotate_key(
    client: &Client,
    user_id: &str,
    device_id: &str,
    key: &PublicKey,
) -> Result<Rotated, Fail> {
    let u = user_literal(user_id)?;
    let d = sql::uuid(device_id).ok_or_else(|| Fail::internal("non-canonical device id".into()))?;
    // Under the key's lock, as a registration takes it (`sql::insert_device`):
    // a registration of the same key by another user then waits for this
    // one and is refused for the key, drawing no address, rather than meet
    // the unique constraint after drawing one.
    let k = quoted(key.as_str())?;
    let q = format!(
        "BEGIN;
         {lock}
         WITH upd AS (UPDATE devices SET public_key = {k}, updated_at = now()
                      WHERE id = {d} AND user_id = {u} RETURNING *)
         SELECT json_build_object(
             'device', (SELECT {DEVICE_JSON} FROM upd d),
             'devices', (SELECT coalesce(json_agg({DEVICE_JSON} ORDER BY d.created_at, d.id), '[]'::json) FROM
                            (SELECT * FROM devices WHERE user_id = {u} AND id NOT IN (SELECT id FROM upd)
                             UNION ALL SELECT * FROM upd) d))::text;
         COMMIT;",
        lock = sql::lock_device_key(&k),
    );
    json_row_or(client, &q, key_taken_meanwhile)
        .await?
        .ok_or_else(|| Fail::internal("rotation returned no row".into()))
}

/// The entitlement inputs of one user (after a billing change).
pub async fn inputs_for(client: &Client, user_id: &str) -> Result<Option<EntitlementInputs>, Fail> {
    let u = user_literal(user_id)?;
    let q = format!(
        "SELECT {}::text FROM users u WHERE u.id = {u}",
        inputs_sql("u.id")
    );
    json_row(client, &q).await
}

/// What applying a billing event did.
#[derive(Debug, Deserialize)]
pub struct Applied {
    /// false: the event id was processed before; nothing changed.
    pub new_event: bool,
    /// The user the event concerns, if we know them.
    pub user_id: Option<String>,
    /// Whether a subscription row changed (false for stale or unknown events).
    pub changed: bool,
    /// A subscription event none of whose plan ids names one of our plans (a
    /// known subscription keeps its plan).
    #[serde(default)]
    pub unknown_plan: bool,
    /// ... and the subscription, one of our users', has no row yet: nothing
    /// was written, and the event id was not recorded.
    #[serde(default)]
    pub unresolved_plan: bool,
}

/// When the row's status was last set: `status_event_at`, or
/// `provider_event_at` for a row last written before that column existed (a
/// subscription event then set the status too). Written by this module,
/// `status_event_at` is never older than `provider_event_at`.
const STATUS_SET_AT: &str =
    "greatest(subscriptions.status_event_at, subscriptions.provider_event_at)";

/// Applies a verified billing event in one statement (one transaction): records
/// the event id (a replay or a concurrent duplicate then changes nothing) and
/// updates the subscription's row unless a newer event already did.
///
/// Each subscription of the provider has a row of its own, changed only by
/// its own events; the user's entitlement is the best that any of them
/// grants (`domain::entitlement`). Subscription events and invoice events are
/// ordered apart, because invoice events carry only a status:
/// `provider_event_at` is the creation time of the newest subscription event
/// applied, and only those advance it; they set the plan, period end,
/// cancellation and ids when at least as new as it. `status_event_at` is that
/// of the newest event of either kind that set the status; each sets the
/// status only when at least as new as that. So a renewal delivered after its
/// invoice still brings the new period, and keeps the invoice's status.
///
/// Two exceptions, for what the order of creation times cannot tell:
/// - an end ([`ENDED`]) is final: a subscription event that ends the
///   subscription sets the status whatever set it last (the final invoice,
///   paid a second after the cancellation, may be delivered first), and
///   nothing sets it again;
/// - an event created in the same second as the one that set the status sets
///   it too (the later delivery wins), except `incomplete`, which only a
///   checkout's first event carries: its retry after the payment's events of
///   the same second does not undo them.
pub async fn apply_billing_event(
    client: &Client,
    env: &Envelope,
    change: &Change,
) -> Result<Applied, Fail> {
    let created = env.created;
    // Records the event id, when `condition` holds.
    let record = |condition: &str| -> Result<String, Fail> {
        Ok(format!(
            "ev AS (INSERT INTO webhook_events (id, type, event_created_at)
                    SELECT {}, {}, to_timestamp({created}) WHERE {condition}
                    ON CONFLICT (id) DO NOTHING RETURNING id)",
            quoted(&env.id)?,
            quoted(&env.kind)?
        ))
    };
    let q = match change {
        Change::Subscription(s) => {
            let by_metadata = match s.user_id.as_deref().and_then(sql::uuid) {
                Some(u) => format!("SELECT id FROM users WHERE id = {u}"),
                // Named as the branch above is: a union's columns take the
                // first branch's names, and the query reads `id`.
                None => "SELECT NULL::uuid AS id WHERE false".to_owned(),
            };
            let status = s.status.as_str();
            // The plan is the first candidate that names one of ours, else
            // (for a subscription we know) the row's plan.
            let mut plans = String::new();
            for id in &s.plan_ids {
                plans.push_str(&format!(
                    "(SELECT id FROM plans WHERE id = {}), ",
                    quoted(id)?
                ));
            }
            // The status only from an event at least as new as the one that
            // set it (`incomplete` only from a newer one), or one that ends
            // the subscription; never once it has ended.
            let ended = status_list(&ENDED);
            let sets_status = format!(
                "(subscriptions.status NOT IN ({ended})
                  AND (EXCLUDED.status IN ({ended}) OR {STATUS_SET_AT} IS NULL
                       OR {STATUS_SET_AT} < EXCLUDED.status_event_at
                       OR ({STATUS_SET_AT} = EXCLUDED.status_event_at
                           AND EXCLUDED.status <> '{incomplete}')))",
                incomplete = Status::Incomplete.as_str()
            );
            // An event that would give one of our users a subscription with
            // no plan is not recorded, so that the provider's retries (or a
            // re-send) apply it once the plan exists.
            let unresolved = "(SELECT id FROM plan) IS NULL AND EXISTS (SELECT 1 FROM target)";
            format!(
                "WITH target AS (SELECT id AS user_id FROM ({by_metadata}
                                UNION ALL SELECT user_id FROM subscriptions
                                          WHERE provider = 'stripe' AND provider_customer_id = {cus}) t LIMIT 1),
                 named AS (SELECT coalesce({plans}NULL::text) AS id),
                 plan AS (SELECT coalesce((SELECT id FROM named),
                                          (SELECT plan_id FROM subscriptions
                                           WHERE provider = 'stripe' AND provider_subscription_id = {sub})) AS id),
                 {record},
                 up AS (
                     INSERT INTO subscriptions (user_id, plan_id, status, current_period_end, cancel_at_period_end,
                                                provider_customer_id, provider_subscription_id,
                                                provider_event_at, status_event_at, provider_created_at)
                     SELECT t.user_id, (SELECT id FROM plan),
                            {status}, to_timestamp({end}), {cancel}, {cus}, {sub},
                            to_timestamp({created}), to_timestamp({created}), {sub_created}
                     FROM target t
                     WHERE EXISTS (SELECT 1 FROM ev) AND (SELECT id FROM plan) IS NOT NULL
                     ON CONFLICT (provider_subscription_id) DO UPDATE SET
                         plan_id = EXCLUDED.plan_id,
                         current_period_end = EXCLUDED.current_period_end,
                         cancel_at_period_end = EXCLUDED.cancel_at_period_end,
                         provider_customer_id = EXCLUDED.provider_customer_id,
                         provider_event_at = EXCLUDED.provider_event_at,
                         provider_created_at = coalesce(EXCLUDED.provider_created_at, subscriptions.provider_created_at),
                         status = CASE WHEN {sets_status} THEN EXCLUDED.status ELSE subscriptions.status END,
                         status_event_at = CASE WHEN {sets_status}
                                                THEN greatest(subscriptions.status_event_at, EXCLUDED.status_event_at)
                                                ELSE subscriptions.status_event_at END,
                         updated_at = now(), version = subscriptions.version + 1
                     WHERE subscriptions.provider_event_at IS NULL
                        OR subscriptions.provider_event_at <= EXCLUDED.provider_event_at
                     RETURNING user_id)
                 SELECT json_build_object('new_event', EXISTS (SELECT 1 FROM ev),
                                          'user_id', coalesce((SELECT user_id FROM up), (SELECT user_id FROM target)),
                                          'changed', EXISTS (SELECT 1 FROM up),
                                          'unknown_plan', (SELECT id FROM named) IS NULL,
                                          'unresolved_plan', {unresolved})::text",
                record = record(&format!("NOT ({unresolved})"))?,
                cus = quoted(&s.customer_id)?,
                sub = quoted(&s.subscription_id)?,
                status = quoted(status)?,
                end = s.current_period_end,
                cancel = s.cancel_at_period_end,
                sub_created = s
                    .created_at
                    .map_or_else(|| "NULL".to_owned(), |at| format!("to_timestamp({at})")),
            )
        }
        Change::Invoice {
            subscription_id,
            paid,
            ..
        } => {
            // A paid invoice makes a lapsed subscription active again, but never
            // resurrects one that has ended; a failed one makes it past due.
            // Only the status changes, so only its time advances.
            let (new_status, allowed) = if *paid {
                (Status::Active, status_list(&REVIVED_BY_PAYMENT))
            } else {
                (Status::PastDue, status_list(&PAID_FOR))
            };
            let new_status = format!("'{}'", new_status.as_str());
            format!(
                "WITH {record},
                 target AS (SELECT user_id FROM subscriptions WHERE provider = 'stripe' AND provider_subscription_id = {sub}),
                 up AS (UPDATE subscriptions SET status = {new_status}, status_event_at = to_timestamp({created}), updated_at = now(),
                                                version = version + 1
                        WHERE provider = 'stripe' AND provider_subscription_id = {sub} AND status IN ({allowed})
                          AND EXISTS (SELECT 1 FROM ev)
                          AND ({STATUS_SET_AT} IS NULL OR {STATUS_SET_AT} <= to_timestamp({created}))
                        RETURNING user_id)
                 SELECT json_build_object('new_event', EXISTS (SELECT 1 FROM ev),
                                          'user_id', (SELECT user_id FROM target),
                                          'changed', EXISTS (SELECT 1 FROM up))::text",
                record = record("true")?,
                sub = quoted(subscription_id)?,
            )
        }
    };
    json_row(client, &q)
        .await?
        .ok_or_else(|| Fail::internal("billing event returned no row".into()))
}
