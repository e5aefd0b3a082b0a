//! `POST /v1/webhooks/stripe`: billing events.
//!
//! The signature is checked over the raw bytes before anything is parsed. An
//! event is applied in one PostgreSQL statement that also records its id, so a
//! replay or a concurrent duplicate has no effect, and an older event never
//! overwrites what a newer one set (see [`store::apply_billing_event`]). Then
//! the user's current entitlement inputs are pushed to their `UserSession`
//! object (their next refresh and their device limit follow) and its KV cache
//! is refreshed. That push happens for duplicates too, so a delivery that
//! failed half way is completed by the provider's retry.

use super::auth::{read_body, refusal};
use super::durable::call;
use super::incoming::Incoming;
use super::log::{self, Level};
use super::user_session::InputsReq;
use super::{Fail, bindings, store, time};
use crate::api::WebhookAck;
use crate::domain::problem::ProblemCode;
use crate::domain::stripe::{self, Change, Event};
use crate::http::{ApiError, Reply};
use serde_json::json;
use worker::Env;

/// Stripe's events are small; this bounds what is read before verification.
const MAX_WEBHOOK_BODY: usize = 256 * 1024;
pub const SECRET: &str = "STRIPE_WEBHOOK_SECRET";

fn problem(code: &str) -> Fail {
    let code = ProblemCode::from_code(code).unwrap_or(ProblemCode::WebhookMalformed);
    ApiError::new(code, code.title()).into()
}

/// The answer to a delivery that changes nothing (ignored type, unknown customer).
const NOT_APPLIED: WebhookAck = WebhookAck {
    received: true,
    applied: false,
    duplicate: None,
};

/// Logs `msg` about the delivery `req`, with the event's `fields`.
fn log(req: &Incoming, level: Level, msg: &str, fields: serde_json::Value) {
    log::event(level, Some(req.request_id()), msg, json!({"event": fields}));
}

pub async fn stripe(mut req: Incoming, env: &Env) -> Result<Reply, Fail> {
    // Comma-separated, so the endpoint secret can be rolled without downtime.
    // Unset and blank are the same: no secret to check a signature with (a
    // blank one, say from an empty `wrangler secret put`, would otherwise
    // refuse every genuine delivery as forged).
    let secrets = env
        .secret(SECRET)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let secrets: Vec<&str> = secrets
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if secrets.is_empty() {
        return Err(Fail::new(
            ApiError::new(
                ProblemCode::NotConfigured,
                "Webhook verification is not configured; it has been logged.",
            ),
            format!("secret {SECRET} is not set, or blank"),
        ));
    }
    let header = req.header("stripe-signature");
    let (_, body) = read_body(&mut req, MAX_WEBHOOK_BODY).await?;
    stripe::verify(header.as_deref(), &body, &secrets, time::now_secs())
        .map_err(|e| problem(e.code()))?;

    let (envelope, change) = match stripe::parse_event(&body).map_err(|e| problem(e.code()))? {
        Event::Ignored { id, kind } => {
            log(
                &req,
                Level::Info,
                "webhook ignored",
                json!({"id": id, "type": kind}),
            );
            return Ok(Reply::json(200, &NOT_APPLIED));
        }
        Event::Relevant { envelope, change } => (envelope, change),
    };
    let db = store::connect(env).await?;
    let applied = store::apply_billing_event(&db, &envelope, &change).await?;
    let fields = json!({"id": envelope.id, "type": envelope.kind, "new": applied.new_event, "changed": applied.changed});
    if let Change::Subscription(s) = &change
        && (applied.unresolved_plan || applied.unknown_plan && applied.new_event)
    {
        // A price whose lookup key and metadata name none of our plans: the
        // plan must be added (or the price fixed). A subscription we know
        // keeps its plan, and the rest of the event applies. A new one cannot
        // be recorded without a plan: its event is refused unrecorded, so the
        // provider retries it (for days) until the plan exists.
        let what = format!(
            "subscription {} names no known plan (candidates {:?})",
            s.subscription_id, s.plan_ids
        );
        if applied.unresolved_plan {
            return Err(Fail::new(
                ApiError::new(
                    ProblemCode::NotConfigured,
                    "The subscription's plan is not configured; it has been logged.",
                ),
                format!("{what}; event {} not recorded", envelope.id),
            ));
        }
        log(
            &req,
            Level::Error,
            &format!("{what}; its plan is unchanged"),
            fields.clone(),
        );
    }
    let Some(user_id) = applied.user_id else {
        // Not ours (or not yet linked): acknowledge, or the provider retries for days.
        log(&req, Level::Info, "webhook for an unknown customer", fields);
        return Ok(Reply::json(200, &NOT_APPLIED));
    };
    let Some(inputs) = store::inputs_for(&db, &user_id).await? else {
        log(&req, Level::Info, "webhook for a deleted user", fields);
        return Ok(Reply::json(200, &NOT_APPLIED));
    };
    drop(db);
    let (status, answer) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        &user_id,
        "/inputs",
        &InputsReq {
            user_id: user_id.clone(),
            inputs,
        },
    )
    .await?;
    if status != 200 {
        return Err(refusal(status, &answer));
    }
    log(&req, Level::Info, "webhook applied", fields);
    Ok(Reply::json(
        200,
        &WebhookAck {
            received: true,
            applied: applied.changed,
            duplicate: Some(!applied.new_event),
        },
    ))
}
