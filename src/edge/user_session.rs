//! The `UserSession` Durable Object: the authority on one user's sessions.
//!
//! It holds the user's refresh-token families (`domain::session`) and the inputs
//! their entitlement is computed from, in one storage value written before any
//! answer is sent, so an acknowledged change is never lost. Because the object
//! is single-threaded, a refresh, a reuse check or a logout is atomic by
//! construction: two concurrent refreshes of one token rotate it exactly once.
//!
//! After every change it mirrors the session list to KV (`sessions/<user id>`) so
//! any edge can list sessions and see revocations without calling it; that copy
//! is eventually consistent (about a minute) and is never used for decisions
//! this object makes.

use super::durable::{body, ping, refuse};
use super::store::EntitlementInputs;
use super::{bindings, random, secrets, time};
use crate::domain::entitlement::{self, Entitlement};
use crate::domain::session::{
    Issued, RefreshError, RefreshToken, RevokeReason, SessionView, UserSessions,
};
use serde::{Deserialize, Serialize};
use worker::{DurableObject, Env, Method, Request, Response, Result, State, durable_object};

const KEY: &str = "state";

/// The KV key of a user's session mirror.
pub fn mirror_key(user_id: &str) -> String {
    format!("sessions/{user_id}")
}

/// What is stored in KV for a user: their sessions as of the last change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mirror {
    pub sessions: Vec<SessionView>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    user_id: Option<String>,
    sessions: UserSessions,
    inputs: Option<EntitlementInputs>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateReq {
    pub user_id: String,
    pub label: String,
    pub inputs: EntitlementInputs,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RefreshReq {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevokeReq {
    pub sid: String,
}

/// A new or rotated session: what the worker needs to answer with a token pair.
#[derive(Debug, Serialize, Deserialize)]
pub struct IssuedResp {
    pub sid: String,
    pub refresh_token: String,
    pub entitlement: Entitlement,
}

#[durable_object]
pub struct UserSession {
    state: State,
    env: Env,
}

impl UserSession {
    async fn load(&self) -> Result<Stored> {
        Ok(self.state.storage().get(KEY).await?.unwrap_or_default())
    }

    /// Persists the state, then mirrors the session list to KV.
    async fn save(&self, stored: &mut Stored, now: i64) -> Result<()> {
        stored.sessions.prune(now);
        self.state.storage().put(KEY, &*stored).await?;
        if let Some(user_id) = &stored.user_id {
            let mirror = Mirror {
                sessions: stored.sessions.mirror(now),
            };
            let written = match self.env.kv(bindings::KV) {
                Ok(kv) => match kv.put(&mirror_key(user_id), &mirror) {
                    Ok(put) => put.execute().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            // The mirror is a convenience copy; the state above is the authority.
            if let Err(e) = written {
                worker::console_error!(
                    "{}",
                    serde_json::json!({"level": "error", "msg": "session mirror write failed", "error": e})
                );
            }
        }
        Ok(())
    }

    fn entitlement(stored: &Stored, now: i64) -> Option<Entitlement> {
        let inputs = stored.inputs.as_ref()?;
        Some(entitlement::entitlement(
            &inputs.free,
            inputs.subscription.as_ref(),
            now,
        ))
    }

    fn issued(issued: Issued, ent: Entitlement) -> Result<Response> {
        Response::from_json(&IssuedResp {
            sid: issued.sid,
            refresh_token: issued.refresh_token,
            entitlement: ent,
        })
    }

    async fn create(&self, mut req: Request) -> Result<Response> {
        let r: CreateReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let Ok(pepper) = secrets::pepper(&self.env) else {
            return refuse(500, "not_configured", None);
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if stored.user_id.as_deref().is_some_and(|u| u != r.user_id) {
            return refuse(400, "wrong_object", None);
        }
        stored.user_id = Some(r.user_id.clone());
        stored.inputs = Some(r.inputs);
        let issued = stored.sessions.create(
            &r.user_id,
            &r.label,
            now,
            random::bytes(),
            random::bytes(),
            pepper,
        );
        self.save(&mut stored, now).await?;
        let ent = Self::entitlement(&stored, now).expect("inputs were just set");
        Self::issued(issued, ent)
    }

    async fn refresh(&self, mut req: Request) -> Result<Response> {
        let r: RefreshReq = match body(&mut req).await {
            Ok(r) => r,
            Err(resp) => return Ok(resp),
        };
        let Ok(pepper) = secrets::pepper(&self.env) else {
            return refuse(500, "not_configured", None);
        };
        let token = match RefreshToken::parse(&r.refresh_token) {
            Ok(t) => t,
            Err(e) => return refuse(401, e.code(), None),
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        if stored.user_id.as_deref() != Some(token.user_id()) {
            return refuse(401, "refresh_token_invalid", None);
        }
        let outcome = stored.sessions.refresh(&token, now, pepper);
        // A rotation, a detected reuse and an expiry all change state (the last two
        // revoke the family); only a token that matched nothing leaves it as it was.
        if !matches!(outcome, Err(RefreshError::Invalid)) {
            self.save(&mut stored, now).await?;
        }
        match outcome {
            Ok(issued) => match Self::entitlement(&stored, now) {
                Some(ent) => Self::issued(issued, ent),
                None => refuse(401, "refresh_token_invalid", None),
            },
            Err(e) => refuse(401, e.code(), None),
        }
    }

    async fn revoke(&self, mut req: Request, all: bool) -> Result<Response> {
        let sid = if all {
            None
        } else {
            match body::<RevokeReq>(&mut req).await {
                Ok(r) => Some(r.sid),
                Err(resp) => return Ok(resp),
            }
        };
        let now = time::now_secs();
        let mut stored = self.load().await?;
        let revoked = match &sid {
            Some(sid) => usize::from(stored.sessions.revoke(sid, now, RevokeReason::Logout)),
            None => stored.sessions.revoke_all(now, RevokeReason::LogoutAll),
        };
        self.save(&mut stored, now).await?;
        Response::from_json(&serde_json::json!({ "revoked": revoked }))
    }
}

impl DurableObject for UserSession {
    fn new(state: State, env: Env) -> Self {
        UserSession { state, env }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match (req.method(), req.path().as_str()) {
            (Method::Get, "/ping") => ping(&self.state, &req).await,
            (Method::Post, "/create") => self.create(req).await,
            (Method::Post, "/refresh") => self.refresh(req).await,
            (Method::Post, "/revoke") => self.revoke(req, false).await,
            (Method::Post, "/revoke-all") => self.revoke(req, true).await,
            _ => Response::error("unknown durable object route", 404),
        }
    }
}
