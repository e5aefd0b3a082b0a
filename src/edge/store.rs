//! PostgreSQL queries of the auth flows, through the uncached Hyperdrive binding
//! (credentials and entitlements must be fresh).
//!
//! Each function is one round trip: PostgreSQL assembles the answer as a single
//! JSON value, which serde turns into typed data. Values are quoted with
//! [`crate::sql`] because only the simple query protocol is used (see there).

use super::{Fail, bindings, pg, time};
use crate::domain::account::Email;
use crate::domain::entitlement::{Plan, Subscription};
use crate::sql;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_postgres::Client;
use worker::Env;

/// Connecting and each query are bounded so a dead database answers 503 quickly.
const DB_TIMEOUT_MS: u64 = 5_000;

/// What the entitlement is computed from; kept by the user's Durable Object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct EntitlementInputs {
    pub free: Plan,
    pub subscription: Option<Subscription>,
}

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

/// The SQL expression building [`EntitlementInputs`] for the user whose id is `user`.
fn inputs_sql(user: &str) -> String {
    format!(
        "json_build_object(
           'free', (SELECT json_build_object('id', p.id, 'max_devices', p.max_devices, 'region_tiers', p.region_tiers)
                    FROM plans p WHERE p.id = 'free'),
           'subscription', (SELECT json_build_object(
                               'plan', json_build_object('id', p.id, 'max_devices', p.max_devices, 'region_tiers', p.region_tiers),
                               'status', s.status,
                               'current_period_end', extract(epoch FROM s.current_period_end)::bigint,
                               'cancel_at_period_end', s.cancel_at_period_end)
                            FROM subscriptions s JOIN plans p ON p.id = s.plan_id WHERE s.user_id = {user}))"
    )
}

pub async fn connect(env: &Env) -> Result<Client, Fail> {
    match time::timeout(DB_TIMEOUT_MS, pg::connect(env, bindings::DB)).await {
        Some(Ok(c)) => Ok(c),
        Some(Err(e)) => Err(Fail::unavailable(format!("database connect: {e}"))),
        None => Err(Fail::unavailable("database connect: timed out".into())),
    }
}

/// Runs a query whose result is at most one row of one JSON text column.
async fn json_row<T: DeserializeOwned>(client: &Client, query: &str) -> Result<Option<T>, Fail> {
    let messages = match time::timeout(DB_TIMEOUT_MS, client.simple_query(query)).await {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Err(Fail::unavailable(format!("database query: {e}"))),
        None => return Err(Fail::unavailable("database query: timed out".into())),
    };
    let text = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    match text {
        None => Ok(None),
        Some(t) => serde_json::from_str(&t)
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
