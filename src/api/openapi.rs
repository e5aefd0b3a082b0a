//! The OpenAPI 3.1 document, generated from the wire types in [`crate::api`],
//! the route table and the problem codes.
//!
//! Schemas come from the Rust types (JSON Schema 2020-12, which OpenAPI 3.1
//! uses as is); each operation lists the exact problem codes it can answer,
//! grouped by status, so a client generator (or a contract fuzzer) knows every
//! `code` it may see. `cargo run --bin openapi` rewrites the committed
//! `openapi.json`; a unit test fails when the committed file and this
//! generator disagree.

use super::*;
use crate::domain::backoff;
use crate::domain::problem::ProblemCode;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// An RFC 9457 problem, as every error is answered (`application/problem+json`).
/// Members beyond the standard ones appear only with the codes that use them.
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct Problem {
    /// A URI naming the problem type; stable per `code`.
    #[serde(rename = "type")]
    type_: String,
    /// A short summary of the problem type.
    title: String,
    /// The HTTP status.
    status: u16,
    /// What happened, for a human; never parse it.
    detail: String,
    /// The stable, machine-readable code: branch on this.
    code: String,
    /// The request's id (also in the `X-Request-Id` header); quote it in reports.
    request_id: String,
    /// `validation_failed`: the invalid fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<Vec<FieldError>>,
    /// `region_busy`, `region_closed`, `no_region_available`: regions to try
    /// next, those with room first, each part nearest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    failover: Option<Vec<String>>,
    /// `payload_too_large`: the largest body the route accepts.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_bytes: Option<u64>,
    /// `device_limit_reached`: the plan's device limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_devices: Option<u32>,
    /// `not_ready`: every component's probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    components: Option<Vec<Probe>>,
}

/// One invalid field of a `validation_failed` problem.
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct FieldError {
    field: String,
    reason: String,
}

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq)]
enum Auth {
    Public,
    /// A user's access token.
    User,
    /// A user's access token whose session may have ended already (logout,
    /// whose retry after a lost answer is 204 again): never `session_revoked`.
    UserEndedToo,
    /// The admin service token.
    Admin,
    /// A Stripe-signed delivery.
    Stripe,
}

/// A success response.
struct Answer {
    status: u16,
    description: &'static str,
    /// The JSON body's schema; `None` for an empty body.
    schema: Option<Schema>,
    headers: &'static [&'static str],
}

/// A success response with a JSON body of type `T`.
fn answer<T: JsonSchema>(s: &mut Schemas, status: u16, description: &'static str) -> Answer {
    Answer {
        status,
        description,
        schema: s.response::<T>(),
        headers: &[],
    }
}

/// A success response without a body.
fn empty(status: u16, description: &'static str) -> Answer {
    Answer {
        status,
        description,
        schema: None,
        headers: &[],
    }
}

/// One operation of the API.
struct Op {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
    description: &'static str,
    auth: Auth,
    needs: Needs,
    body: Option<Schema>,
    /// Whether the operation takes an `Idempotency-Key` header.
    idempotent: bool,
    answers: Vec<Answer>,
    /// The problem codes it may answer besides those every operation of its
    /// kind shares (see [`problems_of`]).
    problems: &'static [ProblemCode],
}

/// What an operation reaches besides the request, each of which can fail on
/// its own and has its problem code.
#[derive(Clone, Copy)]
struct Needs {
    /// KV, a Durable Object or PostgreSQL (`service_unavailable`).
    storage: bool,
    /// A deployment secret, such as the signing keys (`not_configured`).
    secret: bool,
}

impl Needs {
    const NOTHING: Needs = Needs {
        storage: false,
        secret: false,
    };
    const STORAGE: Needs = Needs {
        storage: true,
        secret: false,
    };
    const SECRET: Needs = Needs {
        storage: false,
        secret: true,
    };
    const BOTH: Needs = Needs {
        storage: true,
        secret: true,
    };
}

use ProblemCode as P;

/// Every access-token rejection (401).
const TOKEN_PROBLEMS: &[ProblemCode] = &[
    P::TokenMissing,
    P::TokenTooLarge,
    P::TokenMalformed,
    P::TokenAlgorithmNotAllowed,
    P::TokenUnknownKey,
    P::TokenBadSignature,
    P::TokenWrongType,
    P::TokenWrongIssuer,
    P::TokenWrongAudience,
    P::TokenLifetimeTooLong,
    P::TokenNotYetValid,
    P::TokenExpired,
    P::SessionRevoked,
];

/// Every refusal a JSON body can meet before its handler sees it.
const BODY_PROBLEMS: &[ProblemCode] = &[
    P::MalformedJson,
    P::PayloadTooLarge,
    P::UnsupportedMediaType,
    P::ValidationFailed,
];

/// The codes `op` may answer: its own, those of its kind of caller and body,
/// and the service's own failures.
fn problems_of(op: &Op) -> Vec<ProblemCode> {
    let mut codes = op.problems.to_vec();
    match op.auth {
        Auth::UserEndedToo => {
            codes.extend(TOKEN_PROBLEMS.iter().filter(|c| **c != P::SessionRevoked))
        }
        Auth::User => codes.extend_from_slice(TOKEN_PROBLEMS),
        Auth::Admin => codes.push(P::AdminUnauthorized),
        Auth::Public | Auth::Stripe => {}
    }
    if op.needs.storage {
        codes.push(P::ServiceUnavailable);
    }
    if op.needs.secret {
        codes.push(P::NotConfigured);
    }
    if op.body.is_some() {
        codes.extend_from_slice(BODY_PROBLEMS);
    }
    if op.idempotent {
        // A malformed key is refused like a body, whether or not there is one.
        codes.extend_from_slice(&[
            P::IdempotencyKeyInFlight,
            P::IdempotencyKeyReused,
            P::ValidationFailed,
        ]);
    }
    codes.push(P::Internal);
    codes.sort_by_key(|c| (c.status(), c.as_str()));
    codes.dedup();
    codes
}

/// Collects schemas: requests with the deserialising contract, responses with
/// the serialising one (optional members that are skipped when empty are not
/// required), all under `#/components/schemas/`.
struct Schemas {
    requests: SchemaGenerator,
    responses: SchemaGenerator,
}

impl Schemas {
    fn new() -> Self {
        let settings = SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "#/components/schemas/".into();
            s.meta_schema = None;
        });
        Schemas {
            requests: settings.clone().for_deserialize().into_generator(),
            responses: settings.for_serialize().into_generator(),
        }
    }

    fn request<T: JsonSchema>(&mut self) -> Option<Schema> {
        Some(self.requests.subschema_for::<T>())
    }

    fn response<T: JsonSchema>(&mut self) -> Option<Schema> {
        Some(self.responses.subschema_for::<T>())
    }

    fn components(mut self) -> Map<String, Value> {
        let mut all = self.requests.take_definitions(true);
        for (name, schema) in self.responses.take_definitions(true) {
            if let Some(seen) = all.get(&name) {
                assert_eq!(
                    seen, &schema,
                    "schema {name} differs between requests and responses"
                );
            }
            all.insert(name, schema);
        }
        all
    }
}

fn operations(s: &mut Schemas) -> Vec<Op> {
    vec![
        Op {
            method: "get",
            path: "/healthz",
            id: "liveness",
            tag: "service",
            summary: "Liveness",
            description: "Answers without any I/O: the worker runs.",
            auth: Auth::Public,
            needs: Needs::NOTHING,
            body: None,
            idempotent: false,
            answers: vec![answer::<Liveness>(s, 200, "The worker runs.")],
            problems: &[],
        },
        Op {
            method: "get",
            path: "/readyz",
            id: "readiness",
            tag: "service",
            summary: "Readiness",
            description: "Probes KV, each Durable Object class and PostgreSQL concurrently, each within 2 s.",
            auth: Auth::Public,
            needs: Needs::NOTHING,
            body: None,
            idempotent: false,
            answers: vec![answer::<Readiness>(s, 200, "Every component is up.")],
            problems: &[P::NotReady],
        },
        Op {
            method: "get",
            path: "/openapi.json",
            id: "openapi",
            tag: "service",
            summary: "This document",
            description: "The OpenAPI 3.1 document of this API.",
            auth: Auth::Public,
            needs: Needs::NOTHING,
            body: None,
            idempotent: false,
            answers: vec![Answer {
                status: 200,
                description: "The OpenAPI document.",
                schema: Some(Schema::from(true)),
                headers: &[],
            }],
            problems: &[],
        },
        Op {
            method: "get",
            path: "/.well-known/jwks.json",
            id: "jwks",
            tag: "auth",
            summary: "Access-token verification keys",
            description: "The Ed25519 public keys that verify access tokens and connect tickets (RFC 7517). Cache for at most 5 minutes.",
            auth: Auth::Public,
            needs: Needs::SECRET,
            body: None,
            idempotent: false,
            answers: vec![Answer {
                status: 200,
                description: "The key set.",
                schema: s.response::<Jwks>(),
                headers: &["Cache-Control"],
            }],
            // The public halves come from the runtime's WebCrypto.
            problems: &[P::NotConfigured, P::ServiceUnavailable],
        },
        Op {
            method: "post",
            path: "/v1/auth/signup",
            id: "signup",
            tag: "auth",
            summary: "Create an account",
            description: "Creates an account on the free plan and signs it in. Sign-ups are counted per client network (an IPv4 address or an IPv6 /64): 20 in 15 minutes, made or not, lock further ones for 60 s, doubling up to 15 minutes. With an `Idempotency-Key`, a retry after a lost answer (same email, label and password) gets 201 with the session the first opened, while its first refresh token is unused, rather than 409.",
            auth: Auth::Public,
            needs: Needs::BOTH,
            body: s.request::<Credentials>(),
            idempotent: true,
            answers: vec![answer::<TokenPair>(
                s,
                201,
                "The account exists and is signed in.",
            )],
            problems: &[P::EmailTaken, P::TooManyAttempts],
        },
        Op {
            method: "post",
            path: "/v1/auth/login",
            id: "login",
            tag: "auth",
            summary: "Sign in",
            description: "An unknown email and a wrong password get the same answer. Attempts are throttled per account (5 in 15 minutes; a success clears the count) and per client network (30 in 15 minutes, successful ones included: an IPv4 address or an IPv6 /64). With an `Idempotency-Key`, a retry after a lost answer (same email and label, the right password) gets the session the first opened, while its first refresh token is unused, rather than a second session.",
            auth: Auth::Public,
            needs: Needs::BOTH,
            body: s.request::<Credentials>(),
            idempotent: true,
            answers: vec![answer::<TokenPair>(s, 200, "Signed in.")],
            problems: &[P::InvalidCredentials, P::TooManyAttempts],
        },
        Op {
            method: "post",
            path: "/v1/auth/refresh",
            id: "refresh",
            tag: "auth",
            summary: "Rotate the token pair",
            description: "Each refresh token works once; a retry within 45 s gets the same successor, a later reuse ends the session.",
            auth: Auth::Public,
            needs: Needs::BOTH,
            body: s.request::<RefreshRequest>(),
            idempotent: false,
            answers: vec![answer::<TokenPair>(s, 200, "A new token pair.")],
            problems: &[
                P::RefreshTokenMalformed,
                P::RefreshTokenInvalid,
                P::RefreshTokenRevoked,
                P::RefreshTokenExpired,
                P::RefreshTokenReused,
            ],
        },
        Op {
            method: "post",
            path: "/v1/auth/logout",
            id: "logout",
            tag: "auth",
            summary: "End this session",
            description: "Ends the session of the presented access token: its refresh token stops at once, its access tokens once the revocation reaches the edge (about 60 s, at most at their expiry). The token must be valid; its session need not be live, so a retry whose first answer was lost is 204 again.",
            auth: Auth::UserEndedToo,
            needs: Needs::BOTH,
            body: None,
            idempotent: false,
            answers: vec![empty(204, "The session is ended.")],
            problems: &[],
        },
        Op {
            method: "post",
            path: "/v1/auth/logout-all",
            id: "logoutAll",
            tag: "auth",
            summary: "End every session",
            description: "Ends every session of the user. Needs a live session: a revoked session's token is 401 `session_revoked`.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: None,
            idempotent: false,
            answers: vec![empty(204, "Every session is ended.")],
            problems: &[],
        },
        Op {
            method: "get",
            path: "/v1/me",
            id: "me",
            tag: "auth",
            summary: "The account",
            description: "The account, its entitlement and its sessions.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: None,
            idempotent: false,
            answers: vec![answer::<Me>(s, 200, "The account.")],
            problems: &[],
        },
        Op {
            method: "delete",
            path: "/v1/me",
            id: "deleteAccount",
            tag: "auth",
            summary: "Delete the account",
            description: "Deletes the caller's account with its devices (their tunnel addresses rest 24 h before another device gets them) and subscriptions, ends every session, and forgets the devices the connect path knows. Refused with 409 `subscription_active` while a subscription may still charge the account: cancel it first (a trial or an active one set to end with its period does not hold the deletion back). The caller's session must be live. Connection events already recorded are kept until their retention expires them.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: None,
            idempotent: false,
            answers: vec![empty(204, "Deleted.")],
            problems: &[P::SubscriptionActive],
        },
        Op {
            method: "get",
            path: "/v1/devices",
            id: "listDevices",
            tag: "devices",
            summary: "List devices",
            description: "The user's WireGuard devices, oldest first, and the plan's limit.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: None,
            idempotent: false,
            answers: vec![answer::<DeviceList>(s, 200, "The devices.")],
            problems: &[],
        },
        Op {
            method: "post",
            path: "/v1/devices",
            id: "createDevice",
            tag: "devices",
            summary: "Register a device",
            description: "Registers a WireGuard public key and assigns tunnel addresses. Send an `Idempotency-Key` so a retry after a lost answer cannot register twice.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: s.request::<CreateDevice>(),
            idempotent: true,
            answers: vec![
                Answer {
                    status: 201,
                    description: "Registered.",
                    schema: s.response::<Device>(),
                    headers: &["Location"],
                },
                answer::<Device>(
                    s,
                    200,
                    "This device was already registered by this request (a retry).",
                ),
            ],
            problems: &[P::DeviceLimitReached, P::PublicKeyInUse],
        },
        Op {
            method: "get",
            path: "/v1/devices/{id}",
            id: "getDevice",
            tag: "devices",
            summary: "Read a device",
            description: "One of the user's devices: where a registration's `Location` points. The id's hex digits may be in either case.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: None,
            idempotent: false,
            answers: vec![answer::<Device>(s, 200, "The device.")],
            problems: &[P::DeviceNotFound],
        },
        Op {
            method: "delete",
            path: "/v1/devices/{id}",
            id: "deleteDevice",
            tag: "devices",
            summary: "Remove a device",
            description: "Removes one of the user's devices; its slot is free at once. With an `Idempotency-Key`, a retry after a lost answer gets the 204 again rather than 404. The id's hex digits may be in either case.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: None,
            idempotent: true,
            answers: vec![empty(204, "Removed.")],
            problems: &[P::DeviceNotFound],
        },
        Op {
            method: "put",
            path: "/v1/devices/{id}/public_key",
            id: "rotateDeviceKey",
            tag: "devices",
            summary: "Rotate a device's key",
            description: "Replaces the device's WireGuard public key; its addresses stay. With an `Idempotency-Key`, a retry after a lost answer gets the first answer again. The id's hex digits may be in either case.",
            auth: Auth::User,
            needs: Needs::BOTH,
            body: s.request::<RotateKey>(),
            idempotent: true,
            answers: vec![answer::<Device>(s, 200, "The device with its new key.")],
            problems: &[P::DeviceNotFound, P::PublicKeyInUse],
        },
        Op {
            method: "get",
            path: "/v1/regions",
            id: "listRegions",
            tag: "connect",
            summary: "The region catalogue",
            description: "Every VPN region with its health and load, from the edge's copy of the catalogue. Revalidate with `If-None-Match`.",
            auth: Auth::Public,
            needs: Needs::STORAGE,
            body: None,
            idempotent: false,
            answers: vec![
                Answer {
                    status: 200,
                    description: "The catalogue.",
                    schema: s.response::<RegionList>(),
                    headers: &["ETag", "Cache-Control"],
                },
                Answer {
                    status: 304,
                    description: "The catalogue matches `If-None-Match`.",
                    schema: None,
                    headers: &["ETag", "Cache-Control"],
                },
            ],
            problems: &[P::ServiceUnavailable],
        },
        Op {
            method: "post",
            path: "/v1/connect",
            id: "connect",
            tag: "connect",
            summary: "Get a server to connect to",
            description: CONNECT_GUIDANCE,
            auth: Auth::User,
            needs: Needs::BOTH,
            body: s.request::<ConnectRequest>(),
            idempotent: false,
            answers: vec![answer::<Assignment>(
                s,
                200,
                "Connect to this server with this ticket.",
            )],
            problems: &[
                P::DeviceNotFound,
                P::DeviceNotEntitled,
                P::RegionNotFound,
                P::RegionNotAllowed,
                P::RegionBusy,
                P::RegionClosed,
                P::NoRegionAvailable,
            ],
        },
        Op {
            method: "post",
            path: "/v1/webhooks/stripe",
            id: "stripeWebhook",
            tag: "billing",
            summary: "Stripe events",
            description: "Subscription events from Stripe. The `Stripe-Signature` HMAC is checked over the raw body before it is parsed; each event applies once, and only if newer than what is known, except that the end of a subscription is final whenever it is delivered. An event that would give a user a subscription to a plan this deployment does not have is refused with `not_configured` and not recorded, so Stripe retries it.",
            auth: Auth::Stripe,
            needs: Needs::BOTH,
            body: Some(Schema::from(true)),
            idempotent: false,
            answers: vec![answer::<WebhookAck>(s, 200, "Received.")],
            problems: &[
                P::SignatureMissing,
                P::SignatureMalformed,
                P::SignatureMissingV1,
                P::SignatureStale,
                P::SignatureMismatch,
                P::WebhookMalformed,
            ],
        },
        Op {
            method: "put",
            path: "/v1/admin/regions/{id}",
            id: "setRegion",
            tag: "admin",
            summary: "Set a region's health or admission rate",
            description: "Republishes the catalogue at once, and tells the region's admission gates at once whether it admits anyone: a region made `down` or `draining`, or given a rate of 0, refuses new connects before every edge location's copy of the catalogue says so (they are steered to the next region, as from a region listed down), and one put back up admits again. A publish that has not ended within 10 s is 503 `service_unavailable`; the change is committed, and repeating it (or the cron, within a minute) publishes it.",
            auth: Auth::Admin,
            needs: Needs::BOTH,
            body: s.request::<SetRegion>(),
            idempotent: false,
            answers: vec![answer::<RegionState>(s, 200, "The region's new state.")],
            problems: &[P::RegionNotFound],
        },
        Op {
            method: "post",
            path: "/v1/admin/regions/{id}/health-report",
            id: "reportRegionHealth",
            tag: "admin",
            summary: "A monitor's health report",
            description: "Records the health a monitor observed, and the load of the servers it lists; a region whose reports stop is marked down by the cron. A report never lifts an operator's `draining` or `down`: the region's health is the worse of the two. A change of health, or a server becoming full (at a load of 0.95) or having room again (below 0.90), republishes the catalogue at once, and a change of health also tells the region's admission gates at once, as an operator's change does (a publish that has not ended within 10 s is 503 `service_unavailable`, the report committed); other load changes reach it with the cron, within a minute.",
            auth: Auth::Admin,
            needs: Needs::BOTH,
            body: s.request::<HealthReport>(),
            idempotent: false,
            answers: vec![answer::<RegionState>(s, 200, "The region's new state.")],
            problems: &[P::RegionNotFound],
        },
        Op {
            method: "get",
            path: "/v1/admin/servers",
            id: "listServers",
            tag: "admin",
            summary: "List servers",
            description: "Every VPN server of every region.",
            auth: Auth::Admin,
            needs: Needs::BOTH,
            body: None,
            idempotent: false,
            answers: vec![answer::<ServerList>(s, 200, "The servers.")],
            problems: &[],
        },
        Op {
            method: "put",
            path: "/v1/admin/servers/{id}",
            id: "setServer",
            tag: "admin",
            summary: "Take a server out of placement, or put it back",
            description: "A server taken out (`enabled: false`) gets no device from the next connect on; the devices placed on it move to the region's other servers, and back once it is in again. Republishes the catalogue at once, even when the server already had that value, so that repeating a call whose publish failed publishes it (a publish that has not ended within 10 s is 503 `service_unavailable`; the change is committed, and the cron publishes it within a minute).",
            auth: Auth::Admin,
            needs: Needs::BOTH,
            body: s.request::<SetServer>(),
            idempotent: false,
            answers: vec![answer::<ServerState>(s, 200, "The server's new state.")],
            problems: &[P::ServerNotFound],
        },
    ]
}

/// How apps must retry a refused connect (also in the README).
const CONNECT_GUIDANCE: &str = "A server assignment for one of the caller's devices: the requested region if the plan allows it and it is up, otherwise the nearest allowed healthy region with room (a region whose servers all report themselves full is chosen only when no other has room); within a region the same server for the same device while that server is in the catalogue and not full. A region whose admission gate refuses the connect as closed (before this edge location's copy of the catalogue says so) is steered past in the same request, to the region chosen without it, at most twice (and while the gates asked have answered within 2 s): a `region_closed` for such a region means the last region asked refused too, with the failover regions none of them, and `no_region_available` that no other region the plan includes was left. The answer lists failover regions: those with room first, then full ones, each part nearest first.\n\n**Retrying.** A 429 (`region_busy`) or 503 (`region_closed`, `no_region_available`, `service_unavailable`) carries `Retry-After`, and the failover list (empty for `no_region_available`; absent when the failure came before a region was chosen). For `region_busy`, `Retry-After` is the client's turn in the region's queue: the clients it refuses are told to come back in the order refused, as many a second as it admits, up to 30 s ahead; beyond that the queue is full, and `Retry-After` is 1-2 s: move to a failover region. Retry with capped exponential backoff and full jitter: before retry *n* (0-based) sleep a uniformly random time in [0, min(cap, base × 2^n)], and never less than `Retry-After`. Move to the next failover region after a 503 for a region. After a tunnel to the assigned server fails, connect again with its region in `avoid`: the edge may not know yet that the region is down. Never retry immediately or on a fixed schedule: when a region fails, all its clients fail in the same instant, and only jitter spreads them out.";

fn header(name: &str) -> Value {
    let (description, schema) = match name {
        "Retry-After" => (
            "Seconds to wait before retrying, already spread by the server (jittered, or for `region_busy` the client's turn in the region's queue).",
            json!({"type": "integer", "minimum": 0}),
        ),
        "ETag" => ("The catalogue's version.", json!({"type": "string"})),
        "Cache-Control" => (
            "How long the body may be cached.",
            json!({"type": "string"}),
        ),
        "Location" => ("The new device's URL.", json!({"type": "string"})),
        "WWW-Authenticate" => (
            "`Bearer` and the realm (`keenvpn`, or `keenvpn-admin` for the admin token), with the error when an access token was presented and refused.",
            json!({"type": "string"}),
        ),
        other => unreachable!("undocumented header {other}"),
    };
    json!({ "description": description, "schema": schema })
}

fn headers(names: &[&str]) -> Option<Value> {
    (!names.is_empty())
        .then(|| Value::Object(names.iter().map(|n| ((*n).to_owned(), header(n))).collect()))
}

/// What a client can do next with a device it registered.
fn device_links() -> Value {
    json!({
        "connect": {
            "operationId": "connect",
            "requestBody": {"device_id": "$response.body#/id"},
            "description": "Ask for a server for the new device.",
        },
        "read": {
            "operationId": "getDevice",
            "parameters": {"id": "$response.body#/id"},
            "description": "Read the new device again.",
        },
        "rotateKey": {
            "operationId": "rotateDeviceKey",
            "parameters": {"id": "$response.body#/id"},
            "description": "Replace the new device's key.",
        },
        "delete": {
            "operationId": "deleteDevice",
            "parameters": {"id": "$response.body#/id"},
            "description": "Remove the new device.",
        },
    })
}

fn operation(op: &Op) -> Value {
    let mut responses = Map::new();
    for a in &op.answers {
        let mut r = json!({ "description": a.description });
        if let Some(schema) = &a.schema {
            r["content"] = json!({"application/json": {"schema": schema}});
        }
        if let Some(h) = headers(a.headers) {
            r["headers"] = h;
        }
        if op.id == "createDevice" && a.status == 201 {
            r["links"] = device_links();
        }
        responses.insert(a.status.to_string(), r);
    }
    let mut by_status: BTreeMap<u16, Vec<ProblemCode>> = BTreeMap::new();
    for code in problems_of(op) {
        by_status.entry(code.status()).or_default().push(code);
    }
    for (status, codes) in by_status {
        let names: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
        let description = codes
            .iter()
            .map(|c| format!("`{}`: {}", c.as_str(), c.title()))
            .collect::<Vec<_>>()
            .join("; ");
        let mut hs: Vec<&str> = Vec::new();
        if status == 429 || status == 503 {
            hs.push("Retry-After");
        }
        if status == 401 {
            hs.push("WWW-Authenticate");
        }
        let schema = json!({
            "allOf": [
                {"$ref": "#/components/schemas/Problem"},
                {"properties": {"status": {"const": status}, "code": {"enum": names}}}
            ]
        });
        let mut r = json!({
            "description": description,
            "content": {"application/problem+json": {"schema": schema}},
        });
        if let Some(h) = headers(&hs) {
            r["headers"] = h;
        }
        responses.insert(status.to_string(), r);
    }

    let mut parameters = Vec::new();
    if op.path.contains("{id}") {
        parameters.push(json!({
            "name": "id", "in": "path", "required": true,
            "schema": {"type": "string"},
        }));
    }
    if op.idempotent {
        parameters.push(json!({
            "name": "Idempotency-Key", "in": "header", "required": false,
            "description": "1 to 255 visible ASCII characters, unique per intended request (a UUID is ideal). A retry with the same key and body within 24 hours gets the first answer (the user's last 100 keyed requests are remembered); with another body, 422.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
        }));
    }
    if op.path == "/v1/regions" {
        parameters.push(json!({
            "name": "If-None-Match", "in": "header", "required": false,
            "description": "An `ETag` from an earlier answer.",
            "schema": {"type": "string"},
        }));
    }

    let mut o = json!({
        "operationId": op.id,
        "tags": [op.tag],
        "summary": op.summary,
        "description": op.description,
        "responses": responses,
    });
    if !parameters.is_empty() {
        o["parameters"] = Value::Array(parameters);
    }
    if let Some(schema) = &op.body {
        o["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": schema}},
        });
    }
    match op.auth {
        Auth::Public => {}
        Auth::User | Auth::UserEndedToo => o["security"] = json!([{"accessToken": []}]),
        Auth::Admin => o["security"] = json!([{"adminToken": []}]),
        Auth::Stripe => o["security"] = json!([{"stripeSignature": []}]),
    }
    o
}

/// The whole document.
pub fn document() -> Value {
    let mut schemas = Schemas::new();
    let ops = operations(&mut schemas);
    schemas.responses.subschema_for::<Problem>();
    let mut paths = Map::new();
    for op in &ops {
        let item = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        item[op.method] = operation(op);
    }
    let codes: Vec<Value> = ProblemCode::ALL
        .iter()
        .map(|c| json!({"code": c.as_str(), "status": c.status(), "title": c.title()}))
        .collect();
    let p = backoff::RECOMMENDED;
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "KeenVPN Edge API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "The backend of the KeenVPN app: accounts and tokens, devices, billing events, and server assignment.\n\n\
                 Every error is `application/problem+json` (RFC 9457) with a stable `code`; clients branch on `code` only. \
                 Every response carries `X-Request-Id`.\n\n\
                 **Client backoff (required).** On 429 or 503, and on network failures, retry with capped exponential backoff \
                 and full jitter: before retry n (0-based) sleep a uniformly random time in [0, min({cap} ms, {base} ms × 2^n)], \
                 never less than the `Retry-After` the server sent, and give up after {max} retries. \
                 A connect refused for a region moves on to the `failover` regions of the answer.",
                base = p.base_ms, cap = p.cap_ms, max = p.max_attempts,
            ),
            "x-client-backoff": {
                "strategy": "capped-exponential-full-jitter",
                "base_ms": p.base_ms,
                "cap_ms": p.cap_ms,
                "max_attempts": p.max_attempts,
                "honour_retry_after": true,
            },
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "service", "description": "Health and this document."},
            {"name": "auth", "description": "Accounts, sessions and tokens."},
            {"name": "devices", "description": "WireGuard devices."},
            {"name": "connect", "description": "Regions and server assignment: the reconnect hot path."},
            {"name": "billing", "description": "Subscription events."},
            {"name": "admin", "description": "Operators and monitors (service token)."},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas.components(),
            "securitySchemes": {
                "accessToken": {
                    "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                    "description": "An access token from signup, login or refresh (EdDSA, 15 minutes).",
                },
                "adminToken": {
                    "type": "http", "scheme": "bearer",
                    "description": "The admin service token (a deployment secret), not a user's token.",
                },
                "stripeSignature": {
                    "type": "apiKey", "in": "header", "name": "Stripe-Signature",
                    "description": "Stripe's HMAC-SHA256 signature of the raw body.",
                },
            },
        },
        "x-problem-codes": codes,
    })
}

/// The document as committed: pretty JSON with a final newline.
pub fn render() -> String {
    let mut text = serde_json::to_string_pretty(&document()).expect("the document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Route, Routed, route};

    #[test]
    fn committed_document_is_the_generated_one() {
        // When this fails, run `cargo run --bin openapi` and commit openapi.json.
        assert!(
            OPENAPI_JSON == render(),
            "openapi.json is stale: run `cargo run --bin openapi` and commit it"
        );
    }

    #[test]
    fn the_served_document_is_the_committed_one_without_indentation() {
        let parse = |text| serde_json::from_str::<serde_json::Value>(text).unwrap();
        assert_eq!(parse(crate::api::OPENAPI_SERVED), parse(OPENAPI_JSON));
        assert!(!crate::api::OPENAPI_SERVED.contains('\n'));
        assert!(crate::api::OPENAPI_SERVED.len() < OPENAPI_JSON.len() / 2);
    }

    fn example_path(path: &str) -> String {
        path.replace("{id}", "00000000-0000-4000-8000-000000000001")
    }

    #[test]
    fn every_documented_operation_is_routed() {
        let mut s = Schemas::new();
        for op in operations(&mut s) {
            let method = op.method.to_uppercase();
            assert!(
                matches!(route(&method, &example_path(op.path)), Routed::Found(_)),
                "{method} {} is documented but not routed",
                op.path
            );
        }
    }

    #[test]
    fn every_route_is_documented() {
        let mut s = Schemas::new();
        let ops = operations(&mut s);
        let documented: Vec<Route> = ops
            .iter()
            .filter_map(
                |op| match route(&op.method.to_uppercase(), &example_path(op.path)) {
                    Routed::Found(r) => Some(r),
                    _ => None,
                },
            )
            .collect();
        // Exhaustive: a new route variant fails to compile here until it is listed.
        let id = || "00000000-0000-4000-8000-000000000001".to_owned();
        for r in [
            Route::Healthz,
            Route::Readyz,
            Route::OpenApi,
            Route::Jwks,
            Route::Signup,
            Route::Login,
            Route::Refresh,
            Route::Logout,
            Route::LogoutAll,
            Route::Me,
            Route::DeleteAccount,
            Route::ListDevices,
            Route::CreateDevice,
            Route::GetDevice(id()),
            Route::DeleteDevice(id()),
            Route::RotateDeviceKey(id()),
            Route::StripeWebhook,
            Route::Regions,
            Route::Connect,
            Route::AdminSetRegion(id()),
            Route::AdminHealthReport(id()),
            Route::AdminServers,
            Route::AdminSetServer(id()),
        ] {
            match &r {
                Route::Healthz
                | Route::Readyz
                | Route::OpenApi
                | Route::Jwks
                | Route::Signup
                | Route::Login
                | Route::Refresh
                | Route::Logout
                | Route::LogoutAll
                | Route::Me
                | Route::DeleteAccount
                | Route::ListDevices
                | Route::CreateDevice
                | Route::GetDevice(_)
                | Route::DeleteDevice(_)
                | Route::RotateDeviceKey(_)
                | Route::StripeWebhook
                | Route::Regions
                | Route::Connect
                | Route::AdminSetRegion(_)
                | Route::AdminHealthReport(_)
                | Route::AdminServers
                | Route::AdminSetServer(_) => {}
            }
            assert!(
                documented.contains(&r),
                "{r:?} is routed but not documented"
            );
        }
    }

    #[test]
    fn every_problem_code_is_reachable_from_some_operation_or_the_router() {
        let mut s = Schemas::new();
        let mut seen: Vec<ProblemCode> = operations(&mut s).iter().flat_map(problems_of).collect();
        // The router's own answers, for any path.
        seen.extend([P::NotFound, P::MethodNotAllowed]);
        for code in ProblemCode::ALL {
            assert!(seen.contains(&code), "{} is in no operation", code.as_str());
        }
    }

    #[test]
    fn schemas_are_closed_for_requests_and_name_required_members() {
        let doc = document();
        let connect = &doc["components"]["schemas"]["ConnectRequest"];
        assert_eq!(connect["additionalProperties"], false);
        assert_eq!(connect["required"], json!(["device_id"]));
        let problem = &doc["components"]["schemas"]["Problem"];
        let required: Vec<&str> = problem["required"]
            .as_array()
            .expect("required list")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            required,
            ["type", "title", "status", "detail", "code", "request_id"]
        );
    }

    #[test]
    fn problem_bodies_match_the_documented_problem_schema() {
        // The members ApiError writes are exactly the documented ones.
        let doc = document();
        let props = doc["components"]["schemas"]["Problem"]["properties"]
            .as_object()
            .expect("properties")
            .clone();
        let err =
            crate::http::ApiError::new(P::RegionBusy, "busy").with("failover", json!(["eu-west"]));
        let body = err.to_body("req-1");
        for key in body.as_object().expect("object").keys() {
            assert!(
                props.contains_key(key),
                "problem member {key} is undocumented"
            );
        }
    }

    #[test]
    fn logout_alone_of_the_bearer_routes_never_answers_session_revoked() {
        let doc = document();
        let codes = |path: &str| doc["paths"][path]["post"]["responses"]["401"].to_string();
        assert!(!codes("/v1/auth/logout").contains("session_revoked"));
        assert!(codes("/v1/auth/logout").contains("token_expired"));
        assert!(codes("/v1/auth/logout-all").contains("session_revoked"));
    }

    #[test]
    fn the_document_states_the_client_backoff() {
        let doc = document();
        let b = &doc["info"]["x-client-backoff"];
        assert_eq!(b["base_ms"], backoff::RECOMMENDED.base_ms);
        assert_eq!(b["cap_ms"], backoff::RECOMMENDED.cap_ms);
        assert_eq!(b["max_attempts"], backoff::RECOMMENDED.max_attempts);
        let connect = doc["paths"]["/v1/connect"]["post"]["description"]
            .as_str()
            .expect("description");
        assert!(connect.contains("full jitter") && connect.contains("Retry-After"));
    }
}
