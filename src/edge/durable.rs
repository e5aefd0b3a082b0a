//! The Durable Object classes, as thin shims.
//!
//! - `UserSession`: one object per user. The authority for that user's sessions,
//!   refresh-token families, device-limit reservations and login throttle: it is
//!   single-threaded, so check-and-set on them is race-free by construction.
//! - `RegionGate`: admission control for reconnects into a VPN region, sharded
//!   so that no one object serves more than a few hundred requests per second.
//!
//! Both answer the internal `GET /ping`, which writes and reads back their
//! transactional storage: `/readyz` uses it to prove Durable Objects work end to end.
//! Their state machines live in `domain` as they grow; these stay shims.

use worker::{DurableObject, Env, Request, Response, Result, State, durable_object};

/// The storage key `ping` writes; never used for anything else.
const PING_KEY: &str = "__ping";

async fn ping(state: &State, req: &Request) -> Result<Response> {
    let nonce = req.headers().get("x-ping-nonce")?.unwrap_or_default();
    let storage = state.storage();
    storage.put(PING_KEY, &nonce).await?;
    let read: Option<String> = storage.get(PING_KEY).await?;
    Response::from_json(&serde_json::json!({ "nonce": read }))
}

async fn dispatch(state: &State, req: Request) -> Result<Response> {
    match (req.method(), req.path().as_str()) {
        (worker::Method::Get, "/ping") => ping(state, &req).await,
        _ => Response::error("unknown durable object route", 404),
    }
}

#[durable_object]
pub struct UserSession {
    state: State,
}

impl DurableObject for UserSession {
    fn new(state: State, _env: Env) -> Self {
        UserSession { state }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        dispatch(&self.state, req).await
    }
}

#[durable_object]
pub struct RegionGate {
    state: State,
}

impl DurableObject for RegionGate {
    fn new(state: State, _env: Env) -> Self {
        RegionGate { state }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        dispatch(&self.state, req).await
    }
}
