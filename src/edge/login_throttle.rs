//! The `LoginThrottle` Durable Object: counts sign-in attempts for one account
//! (named by a hash of the normalised email, so unknown and known emails behave
//! identically) or one client IP. The counting rules are `domain::throttle`.

use super::durable::{body, ping, refuse};
use super::{storage, time};
use crate::domain::throttle::{self, Throttle};
use serde::{Deserialize, Serialize};
use worker::{DurableObject, Env, Method, Request, Response, Result, State, durable_object};

const KEY: &str = "throttle";

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
}

/// An admitted attempt: when it was counted, to name it in a refund.
#[derive(Debug, Serialize, Deserialize)]
pub struct Admitted {
    pub at: i64,
}

#[durable_object(fetch)]
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
                let outcome = t.attempt(policy, at);
                // Persist before answering: a counted attempt must survive a restart.
                storage::put(&self.state, KEY, &t).await?;
                match outcome {
                    Ok(()) => Response::from_json(&Admitted { at }),
                    Err(retry_after) => refuse(429, "too_many_attempts", Some(retry_after)),
                }
            }
            (Method::Post, "/refund") => {
                let r: Admitted = match body(&mut req).await {
                    Ok(r) => r,
                    Err(resp) => return Ok(resp),
                };
                let mut t: Throttle = storage::get(&self.state, KEY).await?.unwrap_or_default();
                t.refund(r.at);
                storage::put(&self.state, KEY, &t).await?;
                Response::from_json(&serde_json::json!({}))
            }
            (Method::Post, "/succeeded") => {
                let mut t: Throttle = storage::get(&self.state, KEY).await?.unwrap_or_default();
                t.succeeded();
                storage::put(&self.state, KEY, &t).await?;
                Response::from_json(&serde_json::json!({}))
            }
            _ => Response::error("unknown durable object route", 404),
        }
    }
}
