//! Stripe webhooks: proving a delivery came from Stripe, then reading the few
//! events that change what a user is entitled to.
//!
//! The work is split in two steps, and the first one must finish before the
//! second one starts:
//!
//! 1. **[`verify`] checks the `Stripe-Signature` header against the raw body
//!    bytes.** Stripe signs `"{t}.{body}"` with HMAC-SHA-256, keyed with the
//!    endpoint's whole `whsec_...` secret, and sends
//!    `t=<unix secs>,v1=<hex>[,v1=<hex>...][,v0=...]`. Nothing reads the JSON
//!    before this passes, so a forger can make us do no more than parse one
//!    bounded header and compute one HMAC per configured secret. The checks
//!    run in a fixed order, cheapest and least trusting first: presence, size
//!    (refused before any parsing), shape, a `v1` value, the signature, and
//!    the age last. The age comes after the signature as in Stripe's own
//!    libraries, so [`SignatureError::Stale`] always means "Stripe really sent
//!    this, but too long ago (or our clock is off)", which is worth a
//!    different alert than a forgery.
//! 2. **[`parse_event`] turns a verified body into a typed [`Event`].** Only
//!    the five event types that move a subscription matter; every other type
//!    becomes [`Event::Ignored`], so Stripe gets its 2xx and stops retrying.
//!    Only the fields we keep are read, each checked and bounded, so an odd
//!    value becomes an [`EventError`] instead of a surprise further in.
//!
//! **Rotation.** [`verify`] takes several secrets and several `v1` values:
//! while an endpoint's secret is being rolled Stripe signs each delivery with
//! both the old and the new secret, and we accept a match of any value with
//! any secret. Comparisons use `hmac`'s constant-time `verify_slice`. Empty
//! secrets are skipped, so an unset variable cannot turn into "the key is the
//! empty string", which anyone could sign with.
//!
//! **API versions.** Stripe renders an event in the API version of the
//! endpoint, and fields move between versions. Since `2025-03-31.basil` a
//! subscription's billing period lives on its items
//! (`items.data[].current_period_end`) and an invoice names its subscription
//! under `parent.subscription_details.subscription`; older versions keep both
//! at the top level. We read the new place first and fall back to the old one,
//! so an endpoint upgrade needs no deploy. Ids that Stripe may "expand" into
//! whole objects (`customer`, `subscription`) are accepted in both forms.
//!
//! **Ordering is not ours to fix here.** Stripe does not deliver events in
//! order and may deliver one more than once. [`Envelope::created`] and
//! [`Envelope::id`] are kept so the caller can drop duplicates and never let
//! an older event overwrite newer state.
//!
//! [`sign`] and [`example_event`] build what Stripe would send; the tests and
//! the `stripe-sign` developer tool use them to replay realistic deliveries.
//!
//! Like the rest of `domain`, nothing here reads a clock: `now` (unix seconds)
//! is an argument.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::domain::entitlement::Status;

type HmacSha256 = Hmac<Sha256>;

/// How far the signed timestamp may be from `now`, either way (Stripe's
/// libraries default to five minutes too). Past: bounds how long a captured
/// delivery can be replayed. Future: a timestamp from the future is as
/// suspicious as an old one, and a clock that far off needs fixing anyway.
pub const TOLERANCE_SECS: i64 = 300;

/// The longest `Stripe-Signature` header we look at; longer ones are refused
/// before parsing. A real header is about 150 bytes, or about 220 while a
/// secret is being rolled.
pub const MAX_HEADER_LEN: usize = 4096;

/// The longest id (event, subscription, customer, plan) we keep. Stripe's ids
/// are far shorter; this matches what the database columns expect.
pub const MAX_ID_LEN: usize = 255;

/// The latest timestamp we accept anywhere in an event: 9999-12-31T23:59:59Z.
/// Anything later is a bug or an attack, not a billing period.
pub const MAX_TIMESTAMP: i64 = 253_402_300_799;

/// The event types that change a subscription, as Stripe names them.
pub const SUBSCRIPTION_CREATED: &str = "customer.subscription.created";
pub const SUBSCRIPTION_UPDATED: &str = "customer.subscription.updated";
pub const SUBSCRIPTION_DELETED: &str = "customer.subscription.deleted";
pub const INVOICE_PAID: &str = "invoice.paid";
pub const INVOICE_PAYMENT_FAILED: &str = "invoice.payment_failed";

/// Every event type [`parse_event`] reads; all others are [`Event::Ignored`].
pub const RELEVANT_KINDS: [&str; 5] = [
    SUBSCRIPTION_CREATED,
    SUBSCRIPTION_UPDATED,
    SUBSCRIPTION_DELETED,
    INVOICE_PAID,
    INVOICE_PAYMENT_FAILED,
];

// ---------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------

/// Why a delivery's signature was refused. [`verify`] checks in the order
/// missing, malformed, no `v1`, mismatch, stale (see the module docs for why
/// the age comes last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or an empty one.
    Missing,
    /// Too long, or not `t=<digits>` plus `scheme=value` pairs: no timestamp,
    /// two timestamps, a non-numeric timestamp, a `v1` that is not 64 hex
    /// digits, an element without `=`.
    Malformed,
    /// Well formed, but no `v1` signature (only unknown schemes such as `v0`).
    NoV1,
    /// Correctly signed, but the timestamp is more than [`TOLERANCE_SECS`]
    /// away from now.
    Stale,
    /// No `v1` value matches the body under any configured secret.
    Mismatch,
}

impl SignatureError {
    /// A stable machine-readable code for logs and problem responses.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::NoV1 => "signature_missing_v1",
            SignatureError::Stale => "signature_stale",
            SignatureError::Mismatch => "signature_mismatch",
        }
    }
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for SignatureError {}

/// Checks that `body` (the raw request bytes, exactly as received) was signed
/// by Stripe with one of `secrets`, at a time within [`TOLERANCE_SECS`] of
/// `now`. Never panics, whatever the header holds.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[&str],
    now: i64,
) -> Result<(), SignatureError> {
    let raw = header.ok_or(SignatureError::Missing)?;
    // The size check comes before even trimming, so an oversized header costs
    // us one length comparison.
    if raw.len() > MAX_HEADER_LEN {
        return Err(SignatureError::Malformed);
    }
    let header = raw.trim();
    if header.is_empty() {
        return Err(SignatureError::Missing);
    }
    let parsed = parse_header(header)?;

    let matched = secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .any(|secret| {
            // The body is hashed once per secret; each candidate is then
            // checked against a clone of that state, so extra `v1` values
            // cost a finalisation each, not another pass over the body.
            let mac = signed_payload_mac(secret, parsed.timestamp, body);
            parsed
                .candidates
                .iter()
                .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
        });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if now.abs_diff(parsed.timestamp) > TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// The `Stripe-Signature` value Stripe would send for `body` signed with
/// `secret` at `timestamp`: `t=<timestamp>,v1=<hex>`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = signed_payload_mac(secret, timestamp, body)
        .finalize()
        .into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// The HMAC state over Stripe's signed payload, `"{t}.{body}"`, ready to be
/// finalised or verified. The key is the secret string's bytes, `whsec_`
/// prefix included, as Stripe computes it.
fn signed_payload_mac(secret: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

struct ParsedHeader {
    timestamp: i64,
    candidates: Vec<[u8; 32]>,
}

fn parse_header(header: &str) -> Result<ParsedHeader, SignatureError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for element in header.split(',') {
        // Stripe sends no spaces, but some of its libraries accept ", " and a
        // proxy may add them; tolerating them costs nothing.
        let Some((scheme, value)) = element.trim().split_once('=') else {
            return Err(SignatureError::Malformed);
        };
        match scheme {
            "t" => {
                // One timestamp only: with two, which one was signed would be
                // our guess, and guessing is how verifiers get fooled.
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                timestamp = Some(parse_timestamp(value).ok_or(SignatureError::Malformed)?);
            }
            "v1" => candidates.push(decode_hex_32(value).ok_or(SignatureError::Malformed)?),
            "" => return Err(SignatureError::Malformed),
            // `v0` (Stripe's test-mode scheme) and any future scheme: not ours
            // to check, and not a reason to refuse a delivery.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::NoV1);
    }
    Ok(ParsedHeader {
        timestamp,
        candidates,
    })
}

/// Unsigned decimal digits only: `str::parse` would also take a leading `+`.
fn parse_timestamp(value: &str) -> Option<i64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn decode_hex_32(value: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out).ok()?;
    Some(out)
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// What every event carries, whatever its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The event id (`evt_...`): the key for dropping redeliveries.
    pub id: String,
    /// The event type, e.g. `customer.subscription.updated`.
    pub kind: String,
    /// When Stripe created the event (unix seconds): the order in which
    /// changes to one subscription are applied.
    pub created: i64,
}

/// What a relevant event says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// created/updated/deleted: the subscription's state as of this event
    Subscription(SubscriptionState),
    /// invoice.paid / invoice.payment_failed for a subscription
    Invoice {
        subscription_id: String,
        customer_id: String,
        paid: bool,
    },
}

/// A subscription as a `customer.subscription.*` event describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionState {
    pub subscription_id: String,
    pub customer_id: String,
    /// Stripe's status; [`Status::Canceled`] for a `.deleted` event whatever
    /// the object says.
    pub status: Status,
    /// End of the paid period (unix seconds): `items.data[0]` first (API
    /// versions since 2025-03-31), else the subscription's own field.
    pub current_period_end: i64,
    /// True if the subscription ends when the current period does: Stripe's
    /// `cancel_at_period_end`, or a `cancel_at` no later than the period end
    /// (newer dashboards schedule end-of-period cancellations that way).
    pub cancel_at_period_end: bool,
    /// The plan ids the subscription names, in precedence order (each once,
    /// odd values dropped): the price's `lookup_key`, the price's
    /// `metadata.plan_id`, the plan a key shaped `<plan>_<currency>_<year>`
    /// names (`plus_eur_2026`: `plus`; never `free`), then the subscription's
    /// `metadata.plan_id`. The first that names one of our plans is the
    /// subscription's plan. What the price says comes first: it changes with
    /// the price when the customer moves to another plan, where the
    /// subscription's metadata is set once at checkout and stays.
    pub plan_ids: Vec<String>,
    /// `metadata.user_id`, set by our checkout; `None` unless it is a
    /// lowercase hyphenated UUID.
    pub user_id: Option<String>,
    /// When the subscription was created (unix seconds), if the object says;
    /// recorded with the subscription's row.
    pub created_at: Option<i64>,
}

/// A verified, parsed webhook event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Relevant {
        envelope: Envelope,
        change: Change,
    },
    /// A type we do not act on (or an invoice that belongs to no
    /// subscription): acknowledge it and move on.
    Ignored {
        id: String,
        kind: String,
    },
}

impl Event {
    /// The event id, whichever variant.
    pub fn id(&self) -> &str {
        match self {
            Event::Relevant { envelope, .. } => &envelope.id,
            Event::Ignored { id, .. } => id,
        }
    }

    /// The event type, whichever variant.
    pub fn kind(&self) -> &str {
        match self {
            Event::Relevant { envelope, .. } => &envelope.kind,
            Event::Ignored { kind, .. } => kind,
        }
    }
}

/// Why a verified body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// Not JSON, or a relevant event without a field we need (or with one out
    /// of bounds). The text names the field, never echoes its value.
    Malformed(String),
}

impl EventError {
    /// A stable machine-readable code for logs and problem responses.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::Malformed(_) => "webhook_malformed",
        }
    }
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::Malformed(why) => write!(f, "{}: {why}", self.code()),
        }
    }
}

impl std::error::Error for EventError {}

fn malformed(why: &str) -> EventError {
    EventError::Malformed(why.to_owned())
}

/// A required field that is absent, of the wrong type or out of bounds.
fn invalid(field: &str) -> EventError {
    EventError::Malformed(format!("missing or invalid {field}"))
}

/// Reads a body that [`verify`] has accepted.
pub fn parse_event(body: &[u8]) -> Result<Event, EventError> {
    let event: Value =
        serde_json::from_slice(body).map_err(|_| malformed("the body is not JSON"))?;
    if !event.is_object() {
        return Err(malformed("the body is not a JSON object"));
    }
    let id = bounded_id(event.get("id")).ok_or_else(|| invalid("id"))?;
    let kind = bounded_id(event.get("type")).ok_or_else(|| invalid("type"))?;
    if !RELEVANT_KINDS.contains(&kind.as_str()) {
        return Ok(Event::Ignored { id, kind });
    }

    let created = timestamp(event.get("created")).ok_or_else(|| invalid("created"))?;
    let object = event
        .pointer("/data/object")
        .filter(|o| o.is_object())
        .ok_or_else(|| invalid("data.object"))?;
    let change = match kind.as_str() {
        INVOICE_PAID | INVOICE_PAYMENT_FAILED => {
            match invoice_change(object, kind == INVOICE_PAID)? {
                Some(change) => change,
                // A one-off invoice: nothing to do with entitlements.
                None => return Ok(Event::Ignored { id, kind }),
            }
        }
        _ => Change::Subscription(subscription_state(
            object,
            kind == SUBSCRIPTION_DELETED,
            created,
        )?),
    };
    Ok(Event::Relevant {
        envelope: Envelope { id, kind, created },
        change,
    })
}

fn subscription_state(
    sub: &Value,
    deleted: bool,
    created: i64,
) -> Result<SubscriptionState, EventError> {
    expect_object_type(sub, "subscription")?;
    let subscription_id = bounded_id(sub.get("id")).ok_or_else(|| invalid("data.object.id"))?;
    let customer_id =
        expandable_id(sub.get("customer")).ok_or_else(|| invalid("data.object.customer"))?;

    let status = if deleted {
        // A deleted subscription is over, whatever status the object was
        // rendered with (older API versions and test clocks vary).
        Status::Canceled
    } else {
        sub.get("status")
            .and_then(Value::as_str)
            .and_then(Status::parse)
            .ok_or_else(|| invalid("data.object.status"))?
    };

    let period_end = match field_timestamp(
        sub.pointer("/items/data/0/current_period_end"),
        "data.object.items.data[0].current_period_end",
    )? {
        Some(end) => Some(end),
        None => field_timestamp(
            sub.get("current_period_end"),
            "data.object.current_period_end",
        )?,
    };
    let current_period_end = match period_end {
        Some(end) => end,
        // A deletion must never be refused for want of a period: it is the
        // event that ends the entitlement, and the status alone does that.
        None if deleted => [sub.get("ended_at"), sub.get("canceled_at")]
            .into_iter()
            .find_map(timestamp)
            .unwrap_or(created),
        None => return Err(invalid("data.object.current_period_end")),
    };

    let cancel_flag = match sub.get("cancel_at_period_end") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => return Err(invalid("data.object.cancel_at_period_end")),
    };
    let cancel_at = field_timestamp(sub.get("cancel_at"), "data.object.cancel_at")?;
    let cancel_at_period_end = cancel_flag || cancel_at.is_some_and(|at| at <= current_period_end);

    let lookup_key = bounded_id(sub.pointer("/items/data/0/price/lookup_key"));
    let key_prefix = lookup_key.as_deref().and_then(plan_of_priced_key);
    let mut plan_ids = Vec::with_capacity(4);
    for candidate in [
        lookup_key,
        bounded_id(sub.pointer("/items/data/0/price/metadata/plan_id")),
        key_prefix,
        bounded_id(sub.pointer("/metadata/plan_id")),
    ]
    .into_iter()
    .flatten()
    {
        if !plan_ids.contains(&candidate) {
            plan_ids.push(candidate);
        }
    }
    let user_id = sub
        .pointer("/metadata/user_id")
        .and_then(Value::as_str)
        .filter(|id| is_uuid(id))
        .map(str::to_owned);

    Ok(SubscriptionState {
        subscription_id,
        customer_id,
        status,
        current_period_end,
        cancel_at_period_end,
        plan_ids,
        user_id,
        created_at: timestamp(sub.get("created")),
    })
}

/// `Ok(None)` for an invoice that belongs to no subscription.
fn invoice_change(invoice: &Value, paid: bool) -> Result<Option<Change>, EventError> {
    expect_object_type(invoice, "invoice")?;
    // Newer API versions name the subscription under `parent`, older ones at
    // the top level; either may be a bare id or an expanded object.
    let subscription = [
        invoice.pointer("/parent/subscription_details/subscription"),
        invoice.get("subscription"),
    ]
    .into_iter()
    .flatten()
    .find(|v| !v.is_null());
    let Some(subscription) = subscription else {
        return Ok(None);
    };
    let subscription_id =
        expandable_id(Some(subscription)).ok_or_else(|| invalid("data.object subscription"))?;
    let customer_id =
        expandable_id(invoice.get("customer")).ok_or_else(|| invalid("data.object.customer"))?;
    Ok(Some(Change::Invoice {
        subscription_id,
        customer_id,
        paid,
    }))
}

/// `data.object.object`, when present, must name the type the event implies.
fn expect_object_type(object: &Value, expected: &str) -> Result<(), EventError> {
    match object.get("object") {
        None => Ok(()),
        Some(Value::String(s)) if s == expected => Ok(()),
        Some(_) => Err(invalid("data.object.object")),
    }
}

/// The plan a lookup key of the shape `<plan>_<currency>_<year>` names
/// (`plus_eur_2026`: `plus`), where the currency is three lowercase
/// letters and the year four digits; `None` for any other key (an add-on's
/// `plus_extra_seat`, a promotion's `free_trial_eur`) and for the free plan,
/// which no paid price is.
fn plan_of_priced_key(key: &str) -> Option<String> {
    let mut parts = key.rsplitn(3, '_');
    let (year, currency, plan) = (parts.next()?, parts.next()?, parts.next()?);
    let shaped = year.len() == 4
        && year.bytes().all(|b| b.is_ascii_digit())
        && currency.len() == 3
        && currency.bytes().all(|b| b.is_ascii_lowercase());
    (shaped && !plan.is_empty() && plan != "free").then(|| plan.to_owned())
}

/// A non-empty string of at most [`MAX_ID_LEN`] visible ASCII characters:
/// Stripe's ids and lookup keys fit, control characters and spaces do not.
fn bounded_id(value: Option<&Value>) -> Option<String> {
    let s = value?.as_str()?;
    let ok = !s.is_empty() && s.len() <= MAX_ID_LEN && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| s.to_owned())
}

/// An id Stripe may have expanded into the whole object: `"cus_1"` or
/// `{"id": "cus_1", ...}`.
fn expandable_id(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Object(object) => bounded_id(object.get("id")),
        other => bounded_id(Some(other)),
    }
}

/// A positive unix timestamp no later than [`MAX_TIMESTAMP`].
fn timestamp(value: Option<&Value>) -> Option<i64> {
    value?.as_i64().filter(|t| (1..=MAX_TIMESTAMP).contains(t))
}

/// An optional timestamp field: `None` when absent or null, an error naming
/// `field` when present but not a valid timestamp.
fn field_timestamp(value: Option<&Value>, field: &str) -> Result<Option<i64>, EventError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(_) => timestamp(value).map(Some).ok_or_else(|| invalid(field)),
    }
}

/// A lowercase hyphenated UUID: 8-4-4-4-12 lowercase hex digits, the only
/// form our user ids take.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

// ---------------------------------------------------------------------------
// Examples
// ---------------------------------------------------------------------------

/// What [`example_event`] needs to build an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example<'a> {
    pub event_id: &'a str,
    /// The event's `created` (unix seconds).
    pub created: i64,
    pub subscription_id: &'a str,
    pub customer_id: &'a str,
    /// Goes into the subscription's `metadata.user_id`, as our checkout sets it.
    pub user_id: &'a str,
    /// The price's `lookup_key` and `metadata.plan_id`.
    pub plan_id: &'a str,
    /// The subscription's status (`.deleted` events always say `canceled`).
    pub status: Status,
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
}

/// The length of the example billing period: thirty days.
const EXAMPLE_PERIOD_SECS: i64 = 30 * 24 * 3600;

/// A realistic event of type `kind`, shaped as Stripe renders it for API
/// version `2025-03-31.basil` (period on the items, invoice parent), so local
/// replays exercise the same paths as production. For a `kind` that is not
/// one of [`RELEVANT_KINDS`] the data object is the subscription, which
/// [`parse_event`] reports as [`Event::Ignored`].
pub fn example_event(kind: &str, ex: &Example<'_>) -> Value {
    let object = match kind {
        INVOICE_PAID | INVOICE_PAYMENT_FAILED => example_invoice(ex, kind == INVOICE_PAID),
        _ => example_subscription(ex, kind == SUBSCRIPTION_DELETED),
    };
    json!({
        "id": ex.event_id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": ex.created,
        "data": { "object": object },
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": kind,
    })
}

/// The suffix of a Stripe id (`sub_ABC` -> `ABC`), to derive related ids that
/// stay the same across events of one subscription.
fn id_suffix(id: &str) -> &str {
    id.split_once('_').map_or(id, |(_, rest)| rest)
}

/// Illustrative monthly prices in cents; only the shape matters.
fn example_amount(plan_id: &str) -> i64 {
    match plan_id {
        "family" => 1499,
        _ => 999,
    }
}

fn example_subscription(ex: &Example<'_>, deleted: bool) -> Value {
    let suffix = id_suffix(ex.subscription_id);
    let period_start = ex.current_period_end.saturating_sub(EXAMPLE_PERIOD_SECS);
    let status = if deleted { Status::Canceled } else { ex.status };
    let ended = deleted.then_some(ex.created);
    json!({
        "id": ex.subscription_id,
        "object": "subscription",
        "application": null,
        "billing_cycle_anchor": period_start,
        "billing_mode": { "type": "classic" },
        "cancel_at": null,
        "cancel_at_period_end": ex.cancel_at_period_end,
        "canceled_at": ended,
        "collection_method": "charge_automatically",
        "created": period_start,
        "currency": "eur",
        "customer": ex.customer_id,
        "default_payment_method": format!("pm_{suffix}"),
        "ended_at": ended,
        "items": {
            "object": "list",
            "data": [{
                "id": format!("si_{suffix}"),
                "object": "subscription_item",
                "created": period_start,
                "current_period_end": ex.current_period_end,
                "current_period_start": period_start,
                "metadata": {},
                "price": {
                    "id": format!("price_{}", ex.plan_id),
                    "object": "price",
                    "active": true,
                    "billing_scheme": "per_unit",
                    "currency": "eur",
                    "livemode": false,
                    "lookup_key": ex.plan_id,
                    "metadata": {},
                    "product": format!("prod_{}", ex.plan_id),
                    "recurring": {
                        "interval": "month",
                        "interval_count": 1,
                        "usage_type": "licensed"
                    },
                    "type": "recurring",
                    "unit_amount": example_amount(ex.plan_id)
                },
                "quantity": 1,
                "subscription": ex.subscription_id
            }],
            "has_more": false,
            "total_count": 1,
            "url": format!("/v1/subscription_items?subscription={}", ex.subscription_id)
        },
        "latest_invoice": format!("in_{suffix}"),
        "livemode": false,
        "metadata": { "user_id": ex.user_id, "plan_id": ex.plan_id },
        "start_date": period_start,
        "status": status,
        "trial_end": null,
        "trial_start": null
    })
}

fn example_invoice(ex: &Example<'_>, paid: bool) -> Value {
    let suffix = id_suffix(ex.subscription_id);
    let period_start = ex.current_period_end.saturating_sub(EXAMPLE_PERIOD_SECS);
    let amount = example_amount(ex.plan_id);
    json!({
        "id": format!("in_{suffix}"),
        "object": "invoice",
        "amount_due": amount,
        "amount_paid": if paid { amount } else { 0 },
        "amount_remaining": if paid { 0 } else { amount },
        "attempt_count": 1,
        "attempted": true,
        "billing_reason": "subscription_cycle",
        "collection_method": "charge_automatically",
        "created": ex.created,
        "currency": "eur",
        "customer": ex.customer_id,
        "lines": {
            "object": "list",
            "data": [{
                "id": format!("il_{suffix}"),
                "object": "line_item",
                "amount": amount,
                "currency": "eur",
                "parent": {
                    "type": "subscription_item_details",
                    "subscription_item_details": {
                        "invoice_item": null,
                        "proration": false,
                        "subscription": ex.subscription_id,
                        "subscription_item": format!("si_{suffix}")
                    }
                },
                "period": { "start": period_start, "end": ex.current_period_end },
                "pricing": {
                    "type": "price_details",
                    "price_details": {
                        "price": format!("price_{}", ex.plan_id),
                        "product": format!("prod_{}", ex.plan_id)
                    },
                    "unit_amount_decimal": amount.to_string()
                },
                "quantity": 1
            }],
            "has_more": false,
            "total_count": 1,
            "url": format!("/v1/invoices/in_{suffix}/lines")
        },
        "livemode": false,
        "metadata": {},
        "next_payment_attempt": if paid { None } else { Some(ex.created.saturating_add(3 * 24 * 3600)) },
        "parent": {
            "type": "subscription_details",
            "quote_details": null,
            "subscription_details": {
                "metadata": { "user_id": ex.user_id, "plan_id": ex.plan_id },
                "subscription": ex.subscription_id
            }
        },
        // An invoice's own period is the one that just ended (its usage
        // window); the period it pays for is on the lines.
        "period_end": period_start,
        "period_start": period_start.saturating_sub(EXAMPLE_PERIOD_SECS),
        "status": if paid { "paid" } else { "open" },
        "total": amount
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const OLD_SECRET: &str = "whsec_old_secret";
    const NOW: i64 = 1_700_000_000;
    const USER: &str = "0b0e7a4e-2f3c-4d5e-8f90-123456789abc";

    fn header_for(body: &[u8]) -> String {
        sign(SECRET, NOW, body)
    }

    fn check(header: &str, body: &[u8]) -> Result<(), SignatureError> {
        verify(Some(header), body, &[SECRET], NOW)
    }

    /// The hex of the `v1` in a header produced by [`sign`].
    fn v1_of(header: &str) -> &str {
        header.split_once(",v1=").unwrap().1
    }

    // -- signatures ---------------------------------------------------------

    #[test]
    fn a_signed_body_verifies() {
        let body = br#"{"id":"evt_1","type":"invoice.paid"}"#;
        assert_eq!(check(&header_for(body), body), Ok(()));
    }

    #[test]
    fn sign_matches_an_independently_computed_stripe_signature() {
        // Computed with Python's hmac module: key "whsec_test_secret",
        // message "1700000000.{\"id\":\"evt_1\"}".
        assert_eq!(
            sign(SECRET, NOW, br#"{"id":"evt_1"}"#),
            "t=1700000000,v1=248a374f50f943a28b0f6ab50faf9a7e7e29b710fa26df9fb1618b9bf8ea9c9a"
        );
    }

    #[test]
    fn a_missing_or_empty_header_is_missing() {
        let body = b"{}";
        assert_eq!(
            verify(None, body, &[SECRET], NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(check("", body), Err(SignatureError::Missing));
        assert_eq!(check("  \t ", body), Err(SignatureError::Missing));
    }

    #[test]
    fn headers_without_exactly_one_numeric_timestamp_are_malformed() {
        let body = b"{}";
        let v1 = v1_of(&header_for(body)).to_owned();
        let cases = [
            format!("v1={v1}"),
            format!("t={NOW},t={NOW},v1={v1}"),
            format!("t=abc,v1={v1}"),
            format!("t=-{NOW},v1={v1}"),
            format!("t=+{NOW},v1={v1}"),
            format!("t=,v1={v1}"),
            format!("t=1{NOW}0000000000000000,v1={v1}"),
            format!("t={NOW}.5,v1={v1}"),
        ];
        for header in cases {
            assert_eq!(
                check(&header, body),
                Err(SignatureError::Malformed),
                "{header}"
            );
        }
    }

    #[test]
    fn garbage_and_badly_shaped_elements_are_malformed() {
        let body = b"{}";
        let v1 = v1_of(&header_for(body)).to_owned();
        let cases = [
            "garbage".to_owned(),
            "t".to_owned(),
            format!("t={NOW};v1={v1}"),
            format!("t={NOW},v1={v1},"),
            format!("t={NOW},,v1={v1}"),
            format!("t={NOW},={v1}"),
            format!("t={NOW},v1=abc"),
            format!("t={NOW},v1={v1}00"),
            format!("t={NOW},v1={}", "zz".repeat(32)),
            format!("t={NOW},v1={}", "é".repeat(32)),
        ];
        for header in cases {
            assert_eq!(
                check(&header, body),
                Err(SignatureError::Malformed),
                "{header}"
            );
        }
    }

    #[test]
    fn a_header_longer_than_the_cap_is_refused_even_if_correctly_signed() {
        let body = b"{}";
        let valid = header_for(body);
        // Padding in an ignored scheme keeps the header otherwise valid, so the
        // length alone decides.
        let pad = |len: usize| format!("{valid},v0={}", "0".repeat(len - valid.len() - 4));
        let at_cap = pad(MAX_HEADER_LEN);
        assert_eq!(at_cap.len(), MAX_HEADER_LEN);
        assert_eq!(check(&at_cap, body), Ok(()));
        let over = pad(MAX_HEADER_LEN + 1);
        assert_eq!(check(&over, body), Err(SignatureError::Malformed));
        assert_eq!(
            check(&"t=1,".repeat(100_000), body),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn a_header_with_only_unknown_schemes_has_no_v1() {
        let body = b"{}";
        let v1 = v1_of(&header_for(body)).to_owned();
        assert_eq!(
            check(&format!("t={NOW},v0={v1}"), body),
            Err(SignatureError::NoV1)
        );
        assert_eq!(check(&format!("t={NOW}"), body), Err(SignatureError::NoV1));
        assert_eq!(
            check(&format!("t={NOW},v2=xyz,scheme=1"), body),
            Err(SignatureError::NoV1)
        );
    }

    #[test]
    fn unknown_schemes_and_spaces_after_commas_are_tolerated() {
        let body = b"{}";
        let v1 = v1_of(&header_for(body)).to_owned();
        let header = format!(" t={NOW}, v0=whatever, v1={v1} ,v9=future ");
        assert_eq!(check(&header, body), Ok(()));
        let upper = format!("t={NOW},v1={}", v1.to_ascii_uppercase());
        assert_eq!(check(&upper, body), Ok(()));
    }

    #[test]
    fn a_timestamp_is_accepted_up_to_exactly_the_tolerance_in_the_past() {
        let body = b"{}";
        let signed_at = NOW - TOLERANCE_SECS;
        let header = sign(SECRET, signed_at, body);
        assert_eq!(verify(Some(&header), body, &[SECRET], NOW), Ok(()));
        let header = sign(SECRET, signed_at - 1, body);
        assert_eq!(
            verify(Some(&header), body, &[SECRET], NOW),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn a_timestamp_is_accepted_up_to_exactly_the_tolerance_in_the_future() {
        let body = b"{}";
        let header = sign(SECRET, NOW + TOLERANCE_SECS, body);
        assert_eq!(verify(Some(&header), body, &[SECRET], NOW), Ok(()));
        let header = sign(SECRET, NOW + TOLERANCE_SECS + 1, body);
        assert_eq!(
            verify(Some(&header), body, &[SECRET], NOW),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn extreme_clocks_and_timestamps_are_stale_not_a_panic() {
        let body = b"{}";
        let header = sign(SECRET, 0, body);
        assert_eq!(
            verify(Some(&header), body, &[SECRET], i64::MAX),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(Some(&header), body, &[SECRET], i64::MIN),
            Err(SignatureError::Stale)
        );
        let header = sign(SECRET, i64::MAX, body);
        assert_eq!(
            verify(Some(&header), body, &[SECRET], i64::MIN),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn a_stale_forgery_is_reported_as_a_mismatch() {
        // The signature is checked before the age, so "stale" always means
        // "authentic but late".
        let body = b"{}";
        let header = sign("whsec_forger", NOW - 10 * TOLERANCE_SECS, body);
        assert_eq!(check(&header, body), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_wrong_secret_or_a_tampered_body_is_a_mismatch() {
        let body = br#"{"id":"evt_1","amount":999}"#;
        let forged = sign("whsec_guess", NOW, body);
        assert_eq!(check(&forged, body), Err(SignatureError::Mismatch));
        let header = header_for(body);
        let tampered = br#"{"id":"evt_1","amount":1}"#;
        assert_eq!(check(&header, tampered), Err(SignatureError::Mismatch));
        let other_time = header.replacen(&NOW.to_string(), &(NOW + 1).to_string(), 1);
        assert_eq!(check(&other_time, body), Err(SignatureError::Mismatch));
    }

    #[test]
    fn any_of_several_v1_values_may_match() {
        let body = b"{}";
        let good = v1_of(&header_for(body)).to_owned();
        let other = v1_of(&sign(OLD_SECRET, NOW, body)).to_owned();
        let header = format!("t={NOW},v1={other},v1={good},v0={other}");
        assert_eq!(check(&header, body), Ok(()));
        let none = format!("t={NOW},v1={other},v1={other}");
        assert_eq!(check(&none, body), Err(SignatureError::Mismatch));
    }

    #[test]
    fn any_of_several_secrets_may_match_during_rotation() {
        let body = b"{}";
        let header = header_for(body);
        assert_eq!(
            verify(Some(&header), body, &[OLD_SECRET, SECRET], NOW),
            Ok(())
        );
        assert_eq!(
            verify(Some(&header), body, &[OLD_SECRET], NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&header), body, &[], NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn an_empty_secret_never_verifies_anything() {
        let body = b"{}";
        let header = sign("", NOW, body);
        assert_eq!(
            verify(Some(&header), body, &["", OLD_SECRET], NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_reserialised_body_with_the_same_json_does_not_verify() {
        let body = br#"{"id":"evt_1","type":"invoice.paid","created":1700000000}"#;
        let header = header_for(body);
        let spaced = br#"{ "id": "evt_1", "type": "invoice.paid", "created": 1700000000 }"#;
        let reordered = br#"{"type":"invoice.paid","id":"evt_1","created":1700000000}"#;
        let same: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(spaced).unwrap(), same);
        assert_eq!(serde_json::from_slice::<Value>(reordered).unwrap(), same);
        assert_eq!(check(&header, spaced), Err(SignatureError::Mismatch));
        assert_eq!(check(&header, reordered), Err(SignatureError::Mismatch));
    }

    #[test]
    fn signature_error_codes_are_stable() {
        let codes = [
            (SignatureError::Missing, "signature_missing"),
            (SignatureError::Malformed, "signature_malformed"),
            (SignatureError::NoV1, "signature_missing_v1"),
            (SignatureError::Stale, "signature_stale"),
            (SignatureError::Mismatch, "signature_mismatch"),
        ];
        for (error, code) in codes {
            assert_eq!(error.code(), code);
            assert_eq!(error.to_string(), code);
        }
        assert_eq!(
            EventError::Malformed("x".into()).code(),
            "webhook_malformed"
        );
    }

    /// xorshift64*: deterministic, good enough to shuffle header pieces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn thousands_of_pseudo_random_headers_never_panic_and_never_verify() {
        let body = b"{}";
        // Only a wrong-secret signature is among the pieces, so no random
        // header can verify: anything but an error would be a bug.
        let v1 = v1_of(&sign(OLD_SECRET, NOW, body)).to_owned();
        let now = NOW.to_string();
        let pieces: Vec<&str> = vec![
            "t",
            "t=",
            "v1",
            "v1=",
            "v0=",
            "=",
            ",",
            ", ",
            " ",
            "\t",
            &now,
            "0",
            "-1",
            "+1",
            "99999999999999999999",
            &v1,
            &v1[..63],
            "abc",
            "é",
            "€",
            "\u{0}",
            "\r\n",
            "ff",
            "v1=v1=",
            "t==",
            ",,",
            "🦀",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        let mut seen = std::collections::BTreeMap::new();
        for round in 0..5000 {
            let count = if round % 500 == 0 {
                2000
            } else {
                rng.below(24)
            };
            // A third start well formed, so the random tail also reaches
            // the HMAC and age checks rather than failing on the first byte.
            let mut header = if round % 3 == 0 {
                format!("t={NOW},v1={v1},")
            } else {
                String::new()
            };
            for _ in 0..count {
                header.push_str(pieces[rng.below(pieces.len())]);
            }
            let now = match rng.below(3) {
                0 => NOW,
                1 => rng.next() as i64,
                _ => i64::MIN,
            };
            match verify(Some(&header), body, &[SECRET, ""], now) {
                Ok(()) => accepted += 1,
                Err(error) => *seen.entry(error.code()).or_insert(0) += 1,
            }
        }
        assert_eq!(accepted, 0);
        for code in [
            "signature_malformed",
            "signature_missing_v1",
            "signature_mismatch",
        ] {
            assert!(seen.contains_key(code), "never reached {code}: {seen:?}");
        }
    }

    // -- events -------------------------------------------------------------

    /// A `customer.subscription.created` as API version 2024-06-20 renders it:
    /// the period at the top level, none on the items.
    const LEGACY_SUBSCRIPTION_CREATED: &str = r#"{
      "id": "evt_1PqLegacyCreated0001",
      "object": "event",
      "api_version": "2024-06-20",
      "created": 1700000100,
      "data": {
        "object": {
          "id": "sub_1PqLegacy",
          "object": "subscription",
          "billing_cycle_anchor": 1700000000,
          "cancel_at": null,
          "cancel_at_period_end": false,
          "canceled_at": null,
          "collection_method": "charge_automatically",
          "created": 1700000000,
          "currency": "eur",
          "current_period_end": 1702592000,
          "current_period_start": 1700000000,
          "customer": "cus_PqLegacy",
          "ended_at": null,
          "items": {
            "object": "list",
            "data": [
              {
                "id": "si_PqLegacy",
                "object": "subscription_item",
                "created": 1700000000,
                "metadata": {},
                "price": {
                  "id": "price_1PqPlus",
                  "object": "price",
                  "active": true,
                  "currency": "eur",
                  "lookup_key": "plus",
                  "product": "prod_PqPlus",
                  "recurring": {"interval": "month", "interval_count": 1},
                  "type": "recurring",
                  "unit_amount": 999
                },
                "quantity": 1,
                "subscription": "sub_1PqLegacy"
              }
            ],
            "has_more": false,
            "total_count": 1,
            "url": "/v1/subscription_items?subscription=sub_1PqLegacy"
          },
          "latest_invoice": "in_1PqLegacy",
          "livemode": false,
          "metadata": {"user_id": "0b0e7a4e-2f3c-4d5e-8f90-123456789abc"},
          "start_date": 1700000000,
          "status": "active",
          "trial_end": null
        }
      },
      "livemode": false,
      "pending_webhooks": 1,
      "request": {"id": "req_abc123", "idempotency_key": "5f1c9a2e"},
      "type": "customer.subscription.created"
    }"#;

    /// A `customer.subscription.updated` as 2025-03-31.basil renders it: the
    /// period on the items only, with `previous_attributes`.
    const BASIL_SUBSCRIPTION_UPDATED: &str = r#"{
      "id": "evt_1RbBasilUpdated0002",
      "object": "event",
      "api_version": "2025-03-31.basil",
      "created": 1702592100,
      "data": {
        "object": {
          "id": "sub_1RbBasil",
          "object": "subscription",
          "billing_mode": {"type": "classic"},
          "cancel_at": null,
          "cancel_at_period_end": true,
          "canceled_at": 1702592050,
          "customer": "cus_RbBasil",
          "items": {
            "object": "list",
            "data": [
              {
                "id": "si_RbBasil",
                "object": "subscription_item",
                "current_period_end": 1705184000,
                "current_period_start": 1702592000,
                "price": {
                  "id": "price_1RbFamily",
                  "object": "price",
                  "lookup_key": "family",
                  "product": "prod_RbFamily",
                  "recurring": {"interval": "month", "interval_count": 1},
                  "type": "recurring",
                  "unit_amount": 1499
                },
                "quantity": 1,
                "subscription": "sub_1RbBasil"
              }
            ],
            "has_more": false,
            "total_count": 1
          },
          "livemode": false,
          "metadata": {"user_id": "0b0e7a4e-2f3c-4d5e-8f90-123456789abc", "plan_id": "plus"},
          "status": "past_due"
        },
        "previous_attributes": {"cancel_at_period_end": false, "status": "active"}
      },
      "livemode": false,
      "pending_webhooks": 1,
      "request": {"id": null, "idempotency_key": null},
      "type": "customer.subscription.updated"
    }"#;

    /// `invoice.paid` as 2024-06-20 renders it: `subscription` at the top.
    const LEGACY_INVOICE_PAID: &str = r#"{
      "id": "evt_1PqInvoicePaid0003",
      "object": "event",
      "api_version": "2024-06-20",
      "created": 1702592200,
      "data": {
        "object": {
          "id": "in_1PqLegacy",
          "object": "invoice",
          "amount_due": 999,
          "amount_paid": 999,
          "amount_remaining": 0,
          "billing_reason": "subscription_cycle",
          "customer": "cus_PqLegacy",
          "paid": true,
          "status": "paid",
          "subscription": "sub_1PqLegacy",
          "lines": {"object": "list", "data": [], "has_more": false}
        }
      },
      "livemode": false,
      "pending_webhooks": 1,
      "request": {"id": null, "idempotency_key": null},
      "type": "invoice.paid"
    }"#;

    /// `invoice.payment_failed` as 2025-03-31.basil renders it: the
    /// subscription under `parent`, the customer expanded.
    const BASIL_INVOICE_PAYMENT_FAILED: &str = r#"{
      "id": "evt_1RbInvoiceFailed0004",
      "object": "event",
      "api_version": "2025-03-31.basil",
      "created": 1705184100,
      "data": {
        "object": {
          "id": "in_1RbBasil",
          "object": "invoice",
          "amount_due": 1499,
          "amount_paid": 0,
          "attempt_count": 1,
          "attempted": true,
          "billing_reason": "subscription_cycle",
          "customer": {"id": "cus_RbBasil", "object": "customer", "email": "a@example.com"},
          "next_payment_attempt": 1705443300,
          "parent": {
            "type": "subscription_details",
            "quote_details": null,
            "subscription_details": {
              "metadata": {"user_id": "0b0e7a4e-2f3c-4d5e-8f90-123456789abc"},
              "subscription": "sub_1RbBasil"
            }
          },
          "status": "open"
        }
      },
      "livemode": false,
      "pending_webhooks": 2,
      "request": {"id": null, "idempotency_key": null},
      "type": "invoice.payment_failed"
    }"#;

    fn parse(body: &str) -> Event {
        parse_event(body.as_bytes()).unwrap()
    }

    fn parse_value(value: &Value) -> Result<Event, EventError> {
        parse_event(value.to_string().as_bytes())
    }

    /// A fixture as a mutable JSON value, to derive variants from.
    fn fixture(body: &str) -> Value {
        serde_json::from_str(body).unwrap()
    }

    fn subscription_of(event: &Event) -> &SubscriptionState {
        match event {
            Event::Relevant {
                change: Change::Subscription(state),
                ..
            } => state,
            other => panic!("not a subscription change: {other:?}"),
        }
    }

    #[test]
    fn a_legacy_subscription_created_event_reads_the_top_level_period() {
        let event = parse(LEGACY_SUBSCRIPTION_CREATED);
        assert_eq!(
            event,
            Event::Relevant {
                envelope: Envelope {
                    id: "evt_1PqLegacyCreated0001".into(),
                    kind: SUBSCRIPTION_CREATED.into(),
                    created: 1_700_000_100,
                },
                change: Change::Subscription(SubscriptionState {
                    subscription_id: "sub_1PqLegacy".into(),
                    customer_id: "cus_PqLegacy".into(),
                    status: Status::Active,
                    current_period_end: 1_702_592_000,
                    cancel_at_period_end: false,
                    plan_ids: vec!["plus".into()],
                    user_id: Some(USER.into()),
                    created_at: Some(1_700_000_000),
                }),
            }
        );
    }

    #[test]
    fn a_basil_subscription_updated_event_reads_the_period_from_its_items() {
        let event = parse(BASIL_SUBSCRIPTION_UPDATED);
        assert_eq!(event.id(), "evt_1RbBasilUpdated0002");
        assert_eq!(event.kind(), SUBSCRIPTION_UPDATED);
        let state = subscription_of(&event);
        assert_eq!(state.status, Status::PastDue);
        assert_eq!(state.current_period_end, 1_705_184_000);
        assert!(state.cancel_at_period_end);
        // The price's lookup key comes before the metadata.
        assert_eq!(state.plan_ids, ["family", "plus"]);
    }

    #[test]
    fn the_items_period_wins_over_a_stale_top_level_one() {
        let mut body = fixture(LEGACY_SUBSCRIPTION_CREATED);
        body["data"]["object"]["items"]["data"][0]["current_period_end"] = json!(1_705_184_000);
        let state = subscription_of(&parse_value(&body).unwrap()).clone();
        assert_eq!(state.current_period_end, 1_705_184_000);
    }

    #[test]
    fn a_subscription_without_any_period_end_is_malformed() {
        let mut body = fixture(LEGACY_SUBSCRIPTION_CREATED);
        body["data"]["object"]["current_period_end"] = Value::Null;
        assert!(matches!(
            parse_value(&body),
            Err(EventError::Malformed(why)) if why.contains("current_period_end")
        ));
    }

    #[test]
    fn a_deleted_subscription_is_canceled_whatever_its_object_says() {
        let mut body = fixture(BASIL_SUBSCRIPTION_UPDATED);
        body["type"] = json!(SUBSCRIPTION_DELETED);
        body["data"]["object"]["status"] = json!("active");
        let event = parse_value(&body).unwrap();
        assert_eq!(event.kind(), SUBSCRIPTION_DELETED);
        let state = subscription_of(&event);
        assert_eq!(state.status, Status::Canceled);
        assert_eq!(state.current_period_end, 1_705_184_000);

        // Even an unknown or missing status, or a missing period, cannot stop
        // a deletion from ending the subscription.
        body["data"]["object"]["status"] = json!("something_new");
        body["data"]["object"]["items"]["data"][0]
            .as_object_mut()
            .unwrap()
            .remove("current_period_end");
        let state = subscription_of(&parse_value(&body).unwrap()).clone();
        assert_eq!(state.status, Status::Canceled);
        assert_eq!(state.current_period_end, 1_702_592_050, "canceled_at");
    }

    #[test]
    fn a_cancel_at_within_the_period_counts_as_cancelling_at_period_end() {
        let mut body = fixture(LEGACY_SUBSCRIPTION_CREATED);
        body["data"]["object"]["cancel_at"] = json!(1_702_592_000);
        assert!(subscription_of(&parse_value(&body).unwrap()).cancel_at_period_end);
        // A cancellation scheduled beyond this period does not end this one.
        body["data"]["object"]["cancel_at"] = json!(1_702_592_001);
        assert!(!subscription_of(&parse_value(&body).unwrap()).cancel_at_period_end);
    }

    #[test]
    fn the_plan_candidates_are_listed_once_each_and_odd_values_are_dropped() {
        let mut body = fixture(BASIL_SUBSCRIPTION_UPDATED);
        let plans = |body: &Value| {
            subscription_of(&parse_value(body).unwrap())
                .plan_ids
                .clone()
        };
        body["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = json!("plus");
        assert_eq!(plans(&body), ["plus"], "the same id twice is one candidate");

        body["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = Value::Null;
        assert_eq!(plans(&body), ["plus"]);

        body["data"]["object"]["metadata"]["plan_id"] = json!("a plan with spaces");
        assert!(plans(&body).is_empty());

        body["data"]["object"]["items"]["data"][0]["price"]["lookup_key"] = json!("plus_eur_2026");
        assert_eq!(plans(&body), ["plus_eur_2026", "plus"]);
        for (key, named) in [
            ("_eur_2026", None),
            ("family_usd_2027", Some("family")),
            ("e2e_plan_x_eur_2026", Some("e2e_plan_x")),
            ("plus_extra_seat", None),
            ("plus_EUR_2026", None),
            ("plus_eur_26", None),
            ("free_eur_2026", None),
            ("free_trial_eur", None),
        ] {
            assert_eq!(plan_of_priced_key(key).as_deref(), named, "{key}");
        }
    }

    /// A customer who bought Family at checkout (the subscription's metadata
    /// says `family`, and keeps saying it) moves to a Plus price: the price
    /// decides, by its lookup key (its plan, or a `<plan>_<currency>_<year>`
    /// key's plan) or its own metadata.
    #[test]
    fn a_change_of_price_is_not_overruled_by_the_checkouts_metadata() {
        let mut body = fixture(BASIL_SUBSCRIPTION_UPDATED);
        let plans = |body: &Value| {
            subscription_of(&parse_value(body).unwrap())
                .plan_ids
                .clone()
        };
        let price = "/data/object/items/data/0/price";
        body["data"]["object"]["metadata"]["plan_id"] = json!("family");
        *body.pointer_mut(&format!("{price}/lookup_key")).unwrap() = json!("plus_eur_2026");
        assert_eq!(plans(&body), ["plus_eur_2026", "plus", "family"]);
        *body.pointer_mut(&format!("{price}/lookup_key")).unwrap() = json!("vpn_monthly");
        body.pointer_mut(price).unwrap()["metadata"] = json!({"plan_id": "plus"});
        assert_eq!(plans(&body), ["vpn_monthly", "plus", "family"]);
        // A key of another shape names no plan: the metadata decides.
        body.pointer_mut(price).unwrap()["metadata"] = json!({});
        *body.pointer_mut(&format!("{price}/lookup_key")).unwrap() = json!("free_trial_eur");
        body["data"]["object"]["metadata"]["plan_id"] = json!("plus");
        assert_eq!(plans(&body), ["free_trial_eur", "plus"]);
    }

    #[test]
    fn a_user_id_that_is_not_a_lowercase_hyphenated_uuid_is_dropped() {
        let mut body = fixture(LEGACY_SUBSCRIPTION_CREATED);
        for bad in [
            json!(USER.to_ascii_uppercase()),
            json!(USER.replace('-', "")),
            json!(format!("{USER} ")),
            json!("'; DROP TABLE users; --"),
            json!(42),
            Value::Null,
        ] {
            body["data"]["object"]["metadata"]["user_id"] = bad.clone();
            let state = subscription_of(&parse_value(&body).unwrap()).clone();
            assert_eq!(state.user_id, None, "{bad}");
        }
        body["data"]["object"]
            .as_object_mut()
            .unwrap()
            .remove("metadata");
        let state = subscription_of(&parse_value(&body).unwrap()).clone();
        assert_eq!(
            (state.user_id, state.plan_ids.as_slice()),
            (None, ["plus".to_owned()].as_slice())
        );
    }

    #[test]
    fn a_legacy_invoice_paid_event_names_its_subscription_at_the_top_level() {
        assert_eq!(
            parse(LEGACY_INVOICE_PAID),
            Event::Relevant {
                envelope: Envelope {
                    id: "evt_1PqInvoicePaid0003".into(),
                    kind: INVOICE_PAID.into(),
                    created: 1_702_592_200,
                },
                change: Change::Invoice {
                    subscription_id: "sub_1PqLegacy".into(),
                    customer_id: "cus_PqLegacy".into(),
                    paid: true,
                },
            }
        );
    }

    #[test]
    fn a_basil_payment_failed_event_names_its_subscription_under_parent() {
        assert_eq!(
            parse(BASIL_INVOICE_PAYMENT_FAILED),
            Event::Relevant {
                envelope: Envelope {
                    id: "evt_1RbInvoiceFailed0004".into(),
                    kind: INVOICE_PAYMENT_FAILED.into(),
                    created: 1_705_184_100,
                },
                change: Change::Invoice {
                    subscription_id: "sub_1RbBasil".into(),
                    customer_id: "cus_RbBasil".into(),
                    paid: false,
                },
            }
        );
    }

    #[test]
    fn an_expanded_subscription_on_an_invoice_is_read_by_its_id() {
        let mut body = fixture(LEGACY_INVOICE_PAID);
        body["data"]["object"]["subscription"] =
            json!({"id": "sub_1PqLegacy", "object": "subscription", "status": "active"});
        match parse_value(&body).unwrap() {
            Event::Relevant {
                change: Change::Invoice {
                    subscription_id, ..
                },
                ..
            } => assert_eq!(subscription_id, "sub_1PqLegacy"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invoice_for_no_subscription_is_ignored() {
        let mut body = fixture(BASIL_INVOICE_PAYMENT_FAILED);
        body["data"]["object"]["parent"] = Value::Null;
        assert_eq!(
            parse_value(&body).unwrap(),
            Event::Ignored {
                id: "evt_1RbInvoiceFailed0004".into(),
                kind: INVOICE_PAYMENT_FAILED.into(),
            }
        );
    }

    #[test]
    fn an_unknown_event_type_is_ignored_without_reading_its_object() {
        let body = r#"{
          "id": "evt_3PqCharge0005",
          "object": "event",
          "api_version": "2024-06-20",
          "created": 1700000000,
          "data": {"object": {"id": "ch_3Pq", "object": "charge", "amount": 999}},
          "type": "charge.succeeded"
        }"#;
        assert_eq!(
            parse(body),
            Event::Ignored {
                id: "evt_3PqCharge0005".into(),
                kind: "charge.succeeded".into(),
            }
        );
        // Even without `created` or `data`: there is nothing we need from it.
        let bare = r#"{"id":"evt_1","type":"customer.created"}"#;
        assert_eq!(parse(bare).kind(), "customer.created");
    }

    #[test]
    fn bodies_that_are_not_events_are_malformed() {
        for body in [
            &b""[..],
            b"not json",
            b"[]",
            b"\"evt_1\"",
            b"{\"id\":\"evt_1\"}",
            b"{\"type\":\"invoice.paid\"}",
            b"{\"id\":7,\"type\":\"invoice.paid\"}",
            b"{\"id\":\"evt_1\",\"type\":\"invoice.paid\",\"created\":1700000000}",
            b"{\"id\":\"evt_1\",\"type\":\"invoice.paid\",\"created\":1700000000,\"data\":{\"object\":[]}}",
            b"\xff\xfe{}",
        ] {
            let result = parse_event(body);
            assert!(
                matches!(result, Err(EventError::Malformed(_))),
                "{:?} -> {result:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn relevant_events_with_missing_or_absurd_fields_are_malformed() {
        // What is changed, and how.
        type Mutation = (&'static str, fn(&mut Value));
        let mutations: Vec<Mutation> = vec![
            ("no customer", |v| {
                v["data"]["object"]
                    .as_object_mut()
                    .unwrap()
                    .remove("customer");
            }),
            ("unknown status", |v| {
                v["data"]["object"]["status"] = json!("on_holiday")
            }),
            ("no status", |v| v["data"]["object"]["status"] = Value::Null),
            ("period as string", |v| {
                v["data"]["object"]["current_period_end"] = json!("1702592000")
            }),
            ("period in milliseconds of year 50000", |v| {
                v["data"]["object"]["current_period_end"] = json!(1_702_592_000_000_000_i64)
            }),
            ("negative period", |v| {
                v["data"]["object"]["current_period_end"] = json!(-1)
            }),
            ("negative created", |v| v["created"] = json!(-5)),
            ("created as float", |v| v["created"] = json!(1.7e9)),
            ("id too long", |v| {
                v["data"]["object"]["id"] = json!("s".repeat(MAX_ID_LEN + 1))
            }),
            ("empty id", |v| v["data"]["object"]["id"] = json!("")),
            ("id with a newline", |v| {
                v["data"]["object"]["id"] = json!("sub_1\nX")
            }),
            ("event id too long", |v| {
                v["id"] = json!("e".repeat(MAX_ID_LEN + 1))
            }),
            ("cancel flag as string", |v| {
                v["data"]["object"]["cancel_at_period_end"] = json!("true")
            }),
            ("cancel_at as string", |v| {
                v["data"]["object"]["cancel_at"] = json!("soon")
            }),
            ("not a subscription", |v| {
                v["data"]["object"]["object"] = json!("invoice")
            }),
        ];
        for (what, mutate) in mutations {
            let mut body = fixture(LEGACY_SUBSCRIPTION_CREATED);
            mutate(&mut body);
            assert!(
                matches!(parse_value(&body), Err(EventError::Malformed(_))),
                "{what}"
            );
        }
        // The bound itself is accepted.
        let mut body = fixture(LEGACY_SUBSCRIPTION_CREATED);
        body["data"]["object"]["id"] = json!("s".repeat(MAX_ID_LEN));
        assert!(parse_value(&body).is_ok());

        let mut invoice = fixture(BASIL_INVOICE_PAYMENT_FAILED);
        invoice["data"]["object"]["customer"] = json!({"object": "customer"});
        assert!(matches!(
            parse_value(&invoice),
            Err(EventError::Malformed(_))
        ));
        let mut invoice = fixture(LEGACY_INVOICE_PAID);
        invoice["data"]["object"]["subscription"] = json!(12);
        assert!(matches!(
            parse_value(&invoice),
            Err(EventError::Malformed(_))
        ));
    }

    #[test]
    fn mutated_bodies_never_panic() {
        let original = LEGACY_SUBSCRIPTION_CREATED.as_bytes();
        let mut rng = Rng(0x1234_5678_9abc_def0);
        for _ in 0..2000 {
            let mut body = original.to_vec();
            for _ in 0..=rng.below(4) {
                let at = rng.below(body.len());
                let alphabet = b"{}[]\",:0123456789-.enult \x00\xff";
                body[at] = alphabet[rng.below(alphabet.len())];
            }
            let _ = parse_event(&body);
        }
    }

    // -- examples -----------------------------------------------------------

    fn example() -> Example<'static> {
        Example {
            event_id: "evt_local_1",
            created: NOW,
            subscription_id: "sub_local_cus1",
            customer_id: "cus_1",
            user_id: USER,
            plan_id: "plus",
            status: Status::Active,
            current_period_end: NOW + EXAMPLE_PERIOD_SECS,
            cancel_at_period_end: false,
        }
    }

    #[test]
    fn parse_event_reads_back_every_example_subscription_event() {
        let ex = example();
        for kind in [
            SUBSCRIPTION_CREATED,
            SUBSCRIPTION_UPDATED,
            SUBSCRIPTION_DELETED,
        ] {
            let event = parse_value(&example_event(kind, &ex)).unwrap();
            assert_eq!(
                event,
                Event::Relevant {
                    envelope: Envelope {
                        id: ex.event_id.into(),
                        kind: kind.into(),
                        created: ex.created,
                    },
                    change: Change::Subscription(SubscriptionState {
                        subscription_id: ex.subscription_id.into(),
                        customer_id: ex.customer_id.into(),
                        status: if kind == SUBSCRIPTION_DELETED {
                            Status::Canceled
                        } else {
                            Status::Active
                        },
                        current_period_end: ex.current_period_end,
                        cancel_at_period_end: false,
                        plan_ids: vec!["plus".into()],
                        user_id: Some(USER.into()),
                        created_at: Some(ex.current_period_end - EXAMPLE_PERIOD_SECS),
                    }),
                },
                "{kind}"
            );
        }
    }

    #[test]
    fn example_subscriptions_carry_the_requested_status_and_cancellation() {
        let ex = Example {
            status: Status::Trialing,
            cancel_at_period_end: true,
            ..example()
        };
        let event = parse_value(&example_event(SUBSCRIPTION_UPDATED, &ex)).unwrap();
        let state = subscription_of(&event);
        assert_eq!(state.status, Status::Trialing);
        assert!(state.cancel_at_period_end);
    }

    #[test]
    fn parse_event_reads_back_every_example_invoice_event() {
        let ex = example();
        for (kind, paid) in [(INVOICE_PAID, true), (INVOICE_PAYMENT_FAILED, false)] {
            let event = parse_value(&example_event(kind, &ex)).unwrap();
            assert_eq!(
                event,
                Event::Relevant {
                    envelope: Envelope {
                        id: ex.event_id.into(),
                        kind: kind.into(),
                        created: ex.created,
                    },
                    change: Change::Invoice {
                        subscription_id: ex.subscription_id.into(),
                        customer_id: ex.customer_id.into(),
                        paid,
                    },
                },
                "{kind}"
            );
        }
    }

    #[test]
    fn an_example_of_another_kind_is_ignored() {
        let event = parse_value(&example_event("customer.updated", &example())).unwrap();
        assert_eq!(
            event,
            Event::Ignored {
                id: "evt_local_1".into(),
                kind: "customer.updated".into(),
            }
        );
    }

    #[test]
    fn a_signed_example_verifies_and_parses_end_to_end() {
        let body = example_event(INVOICE_PAID, &example()).to_string();
        let header = sign(SECRET, NOW, body.as_bytes());
        assert_eq!(
            verify(
                Some(&header),
                body.as_bytes(),
                &[OLD_SECRET, SECRET],
                NOW + 1
            ),
            Ok(())
        );
        assert_eq!(parse_event(body.as_bytes()).unwrap().kind(), INVOICE_PAID);
    }
}

/// Properties over generated deliveries (shrinking to a minimal one).
/// Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_700_000_000;

    fn secret() -> impl Strategy<Value = String> {
        "whsec_[A-Za-z0-9]{1,40}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// What Stripe signs verifies, with any body, either secret of a
        /// rotation, extra `v1`/`v0` values and spaces, within the tolerance
        /// either way; and is stale just outside it.
        #[test]
        fn a_signed_delivery_verifies_within_the_tolerance(
            body in prop::collection::vec(any::<u8>(), 0..300),
            (current, previous) in (secret(), secret()),
            signed_with_previous in any::<bool>(),
            skew in -TOLERANCE_SECS..=TOLERANCE_SECS,
            decoy in any::<[u8; 32]>(),
            spaced in any::<bool>(),
        ) {
            let secret = if signed_with_previous { &previous } else { &current };
            let signed = sign(secret, NOW, &body);
            let sep = if spaced { ", " } else { "," };
            let header = format!("{signed}{sep}v1={}{sep}v0={}", hex::encode(decoy), hex::encode(decoy));
            let secrets = [current.as_str(), previous.as_str()];
            prop_assert_eq!(verify(Some(&header), &body, &secrets, NOW + skew), Ok(()));
            prop_assert_eq!(
                verify(Some(&header), &body, &secrets, NOW + TOLERANCE_SECS + 1),
                Err(SignatureError::Stale)
            );
            prop_assert_eq!(
                verify(Some(&header), &body, &secrets, NOW - TOLERANCE_SECS - 1),
                Err(SignatureError::Stale)
            );
        }

        /// A different body, timestamp or secret never verifies, and empty
        /// secrets match nothing, not even a signature made with the empty
        /// key.
        #[test]
        fn anything_else_is_a_mismatch(
            body in prop::collection::vec(any::<u8>(), 1..300),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            (secret, other) in (secret(), secret()),
            shift in 1i64..=TOLERANCE_SECS,
        ) {
            prop_assume!(secret != other);
            let header = sign(&secret, NOW, &body);
            let mut changed = body.clone();
            changed[flip.index(body.len())] ^= 1 << bit;
            prop_assert_eq!(verify(Some(&header), &changed, &[&secret], NOW), Err(SignatureError::Mismatch));
            prop_assert_eq!(verify(Some(&header), &body, &[&other], NOW), Err(SignatureError::Mismatch));
            let moved = header.replacen(&format!("t={NOW}"), &format!("t={}", NOW + shift), 1);
            prop_assert_eq!(verify(Some(&moved), &body, &[&secret], NOW), Err(SignatureError::Mismatch));
            let unkeyed = sign("", NOW, &body);
            prop_assert_eq!(verify(Some(&unkeyed), &body, &["", ""], NOW), Err(SignatureError::Mismatch));
            prop_assert_eq!(verify(Some(&unkeyed), &body, &[], NOW), Err(SignatureError::Mismatch));
        }

        /// Any header, however odd, gets an answer and never a panic; only
        /// one carrying a matching signature is accepted.
        #[test]
        fn arbitrary_headers_are_refused(
            header in prop_oneof![
                ".{0,200}",
                "(t=[0-9+-]{0,12}|v1=[0-9a-fA-F]{0,66}|v0=[a-z]{0,3}|[a-z0-9]{0,3}=?[a-z0-9]{0,3}| )(,(t=[0-9+-]{0,12}|v1=[0-9a-f]{0,66}|v0=x| ?)){0,4}",
            ],
            now in any::<i64>(),
        ) {
            let refused = verify(Some(&header), br#"{"id":"evt_1"}"#, &["whsec_test"], now).is_err();
            prop_assert!(refused);
        }
    }
}
