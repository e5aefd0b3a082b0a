//! The `LoginThrottle` Durable Object: counts sign-in attempts for one account
//! (named by a hash of the normalised email, so unknown and known emails behave
//! identically) or one client IP. The counting rules are `domain::throttle`.
//!
//! Any email can be named, and each is an object of its own, so an object
//! does not keep its state forever: every counted attempt sets its alarm for
//! when the state will have nothing left to remember
//! ([`Throttle::idle_from`]), and the alarm then deletes it.

use super::durable::{body, ping, refuse};
use super::{storage, time};
use crate::domain::throttle::{self, KnownNetworks, Throttle};
use serde::{Deserialize, Serialize};
use worker::{DurableObject, Env, Method, Request, Response, Result, State, durable_object};

const KEY: &str = "throttle";
/// An account's [`KnownNetworks`], apart from its throttle.
const KNOWN_KEY: &str = "known";

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Account,
    ClientIp,
    SignUp,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AttemptReq {
    pub scope: Scope,
    /// For an account's attempt: the digest of the client's network, which
    /// lets the owner through a lock from a network the account signed in
    /// from before ([`KnownNetworks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// The attempt `admitted` had the right password, from the network of
/// this digest.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SucceededReq {
    #[serde(default)]
    pub locked_for: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// An admitted attempt: when it was counted, to name it in a refund.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Admitted {
    pub at: i64,
    /// Set when the account was locked and the attempt was let through from
    /// a network it signed in from before ([`KnownNetworks`]): the lock's
    /// seconds left. A wrong password is then answered as the lock would
    /// answer, so that the lock tells no one else whether the account
    /// exists; a refund or a success names the throttle that counted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_for: Option<u64>,
}

#[durable_object(alarm)]
pub struct LoginThrottle {
    state: State,
}

impl DurableObject for LoginThrottle {
    fn new(state: State, _env: Env) -> Self {
        LoginThrottle { state }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        match (req.method(), req.path().as_str()) {
            (Method::Get, "/ping") => ping(&self.state, &req).await,
            (Method::Post, "/attempt") => {
                let r: AttemptReq = match body(&mut req).await {
                    Ok(r) => r,
                    Err(resp) => return Ok(resp),
                };
                let policy = match r.scope {
                    Scope::Account => &throttle::ACCOUNT,
                    Scope::ClientIp => &throttle::CLIENT_IP,
                    Scope::SignUp => &throttle::SIGN_UP,
                };
                let mut t: Throttle = storage::get(&self.state, KEY).await?.unwrap_or_default();
                let at = time::now_secs();
                // Only an account's object knows networks.
                let mut known = match r.scope {
                    Scope::Account => self.known().await?,
                    _ => KnownNetworks::default(),
                };
                let outcome = match r.scope {
                    Scope::Account => {
                        let counted = known.attempt(&mut t, r.network.as_deref(), policy, at);
                        if counted == Ok(throttle::CountedIn::KnownNetwork) {
                            storage::put(&self.state, KNOWN_KEY, &known).await?;
                        }
                        counted.map(|c| {
                            (c == throttle::CountedIn::KnownNetwork)
                                .then(|| t.retry_after(at).unwrap_or(1))
                        })
                    }
                    _ => t.attempt(policy, at).map(|()| None),
                };
                // Persist before answering: a counted attempt must survive a restart.
                storage::put(&self.state, KEY, &t).await?;
                if outcome.is_ok() {
                    self.forget_at(&t, &known).await?;
                }
                match outcome {
                    Ok(locked_for) => Response::from_json(&Admitted { at, locked_for }),
                    Err(retry_after) => refuse(429, "too_many_attempts", Some(retry_after)),
                }
            }
            (Method::Post, "/refund") => {
                let r: Admitted = match body(&mut req).await {
                    Ok(r) => r,
                    Err(resp) => return Ok(resp),
                };
                let mut t: Throttle = storage::get(&self.state, KEY).await?.unwrap_or_default();
                let mut known = self.known().await?;
                let in_known = r.locked_for.is_some();
                known.refund(&mut t, r.at, in_known);
                if in_known {
                    storage::put(&self.state, KNOWN_KEY, &known).await?;
                } else {
                    storage::put(&self.state, KEY, &t).await?;
                }
                Response::from_json(&serde_json::json!({}))
            }
            (Method::Post, "/succeeded") => {
                let r: SucceededReq = match body(&mut req).await {
                    Ok(r) => r,
                    Err(resp) => return Ok(resp),
                };
                let mut t: Throttle = storage::get(&self.state, KEY).await?.unwrap_or_default();
                let mut known = self.known().await?;
                let in_known = r.locked_for.is_some();
                known.succeeded(&mut t, in_known, r.network.as_deref(), time::now_secs());
                storage::put(&self.state, KEY, &t).await?;
                storage::put(&self.state, KNOWN_KEY, &known).await?;
                // The networks are kept past the throttle's own idleness.
                self.forget_at(&t, &known).await?;
                Response::from_json(&serde_json::json!({}))
            }
            _ => Response::error("unknown durable object route", 404),
        }
    }

    /// Deletes the state once it has nothing left to remember; an attempt
    /// since the alarm was set has set it again, for later.
    async fn alarm(&self) -> Result<Response> {
        let t: Throttle = storage::get(&self.state, KEY).await?.unwrap_or_default();
        let known = self.known().await?;
        if time::now_secs() < idle_from(&t, &known) {
            self.forget_at(&t, &known).await?;
        } else {
            self.state.storage().delete_all().await?;
        }
        Response::empty()
    }
}

impl LoginThrottle {
    async fn known(&self) -> Result<KnownNetworks> {
        Ok(storage::get(&self.state, KNOWN_KEY)
            .await?
            .unwrap_or_default())
    }

    /// Sets the alarm for when the object, holding `t` and `known`, will be
    /// idle. Refunds only bring that moment earlier, so the alarm set by the
    /// last counted attempt or success is never early.
    async fn forget_at(&self, t: &Throttle, known: &KnownNetworks) -> Result<()> {
        let at_ms = idle_from(t, known).saturating_mul(1_000);
        let in_ms = at_ms.saturating_sub(time::now_ms() as i64).max(0);
        self.state.storage().set_alarm(in_ms).await
    }
}

/// From when an object holding `t` and `known` has nothing left to
/// remember: its throttle idle, and (for an account) the networks it signed
/// in from forgotten.
fn idle_from(t: &Throttle, known: &KnownNetworks) -> i64 {
    let window = throttle::LONGEST_WINDOW_SECS;
    t.idle_from(window).max(known.idle_from(window))
}
