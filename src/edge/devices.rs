//! WireGuard devices: `/v1/devices`.
//!
//! Registering, deleting and rotating a key honour `Idempotency-Key`: the
//! user's object keeps the records (`domain::idempotency`).
//!
//! Creating, deleting and rotating go through the user's `UserSession` object,
//! which owns the device limit and the connect path's copy of the devices (see
//! `user_session.rs`); listing and reading one go straight to PostgreSQL. Every query is
//! scoped to the token's user, so another user's device id behaves exactly
//! like one that does not exist.

use super::auth::{self, authenticate, idempotency_key, keyed, read_body, refusal};
use super::durable::call;
use super::incoming::Incoming;
use super::user_session::{self, CreateDeviceReq, DeleteDeviceReq, RotateKeyReq};
use super::{Fail, bindings, fault, kv, store};
use crate::api::{CreateDevice, Device, DeviceList, RotateKey};
use crate::domain::account::Invalid;
use crate::domain::device::{self, DeviceName, PublicKey};
use crate::domain::entitlement::Entitlement;
use crate::domain::problem::ProblemCode;
use crate::http::body::{self, MAX_JSON_BODY};
use crate::http::{ApiError, Reply};
use worker::Env;

/// A device as the user's object answered it.
fn device_of(json: serde_json::Value) -> Result<Device, Fail> {
    serde_json::from_value(json).map_err(|e| Fail::internal(format!("device answer: {e}")))
}

fn not_found() -> Fail {
    ApiError::new(ProblemCode::DeviceNotFound, "No such device.").into()
}

fn check(errors: Vec<Invalid>) -> Result<(), Fail> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(body::invalid(&errors).into())
    }
}

pub async fn create(mut req: Incoming, env: &Env) -> Result<Reply, Fail> {
    let claims = authenticate(&req, env).await?;
    let idempotency_key = idempotency_key(&req)?;
    let (content_type, bytes) = read_body(&mut req, MAX_JSON_BODY).await?;
    let b: CreateDevice = body::parse_json(content_type.as_deref(), &bytes, MAX_JSON_BODY)?;
    let (name, key) = (DeviceName::parse(&b.name), PublicKey::parse(&b.public_key));
    check(
        [name.as_ref().err(), key.as_ref().err()]
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
    )?;
    let fingerprint = keyed(
        idempotency_key,
        "POST",
        "/v1/devices",
        &(&b.name, &b.public_key),
    )?;
    let r = CreateDeviceReq {
        user_id: claims.sub.clone(),
        name: b.name,
        public_key: b.public_key,
        token_max_devices: claims.ent.max_devices,
        idempotency: fingerprint,
        fault: req.header(fault::HEADER),
    };
    let (status, json) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        &claims.sub,
        "/devices/create",
        &r,
    )
    .await?;
    if status == 200 {
        // The caller already has this device (a retried registration).
        return Ok(Reply::json(200, &device_of(json)?));
    }
    if status != 201 {
        let mut fail = refusal(status, &json);
        if fail.api.code == ProblemCode::DeviceLimitReached {
            // The limit the object enforced, which follows billing at once.
            let limit = json["max_devices"]
                .as_u64()
                .unwrap_or(u64::from(claims.ent.max_devices));
            fail.api = ApiError::new(
                ProblemCode::DeviceLimitReached,
                format!("Your plan allows {limit} device(s); remove one to add another."),
            )
            .with("max_devices", serde_json::json!(limit));
        }
        return Err(fail);
    }
    let device = device_of(json)?;
    let location = format!("/v1/devices/{}", device.id);
    let mut reply = Reply::json(201, &device);
    reply.headers.push(("location", location));
    Ok(reply)
}

pub async fn list(req: Incoming, env: &Env) -> Result<Reply, Fail> {
    let claims = authenticate(&req, env).await?;
    let db = store::connect(env).await?;
    let devices = store::list_devices(&db, &claims.sub).await?;
    drop(db);
    // The limit shown is informational: the KV copy of the entitlement (which
    // follows billing changes within seconds), else the token's snapshot. The
    // limit itself is enforced by the user's object, not from this.
    let cached = kv::get_json::<Entitlement>(env, &user_session::entitlement_key(&claims.sub))
        .await
        .ok()
        .flatten();
    let max_devices = cached.map_or(claims.ent.max_devices, |e| e.max_devices);
    Ok(Reply::json(
        200,
        &DeviceList {
            devices,
            max_devices,
        },
    ))
}

/// One of the user's devices, from PostgreSQL (where a registration's
/// `Location` points).
pub async fn get(req: Incoming, env: &Env, id: &str) -> Result<Reply, Fail> {
    let claims = authenticate(&req, env).await?;
    let Some(id) = device::device_id(id) else {
        return Err(not_found());
    };
    let db = store::connect(env).await?;
    let devices = store::list_devices(&db, &claims.sub).await?;
    drop(db);
    let device = devices
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(not_found)?;
    Ok(Reply::json(200, &device))
}

pub async fn delete(req: Incoming, env: &Env, id: &str) -> Result<Reply, Fail> {
    let claims = authenticate(&req, env).await?;
    let idempotency_key = idempotency_key(&req)?;
    let Some(id) = device::device_id(id) else {
        return Err(not_found());
    };
    let r = DeleteDeviceReq {
        user_id: claims.sub.clone(),
        idempotency: keyed(idempotency_key, "DELETE", &format!("/v1/devices/{id}"), &())?,
        device_id: id,
        fault: req.header(fault::HEADER),
    };
    let (status, json) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        &claims.sub,
        "/devices/delete",
        &r,
    )
    .await?;
    if status != 200 {
        return Err(refusal(status, &json));
    }
    if json["deleted"] == true {
        Ok(Reply::no_content())
    } else {
        Err(not_found())
    }
}

pub async fn rotate_key(mut req: Incoming, env: &Env, id: &str) -> Result<Reply, Fail> {
    let claims = authenticate(&req, env).await?;
    let idempotency_key = idempotency_key(&req)?;
    // Parse the body before deciding on the id, so a bad body is a 4xx whatever the id.
    let b: RotateKey = auth::json_body(&mut req).await?;
    PublicKey::parse(&b.public_key).map_err(|e| Fail::from(body::invalid(&[e])))?;
    let Some(id) = device::device_id(id) else {
        return Err(not_found());
    };
    // Through the user's object, which keeps the connect path's copy of the
    // device (and its key) current.
    let r = RotateKeyReq {
        user_id: claims.sub.clone(),
        idempotency: keyed(
            idempotency_key,
            "PUT",
            &format!("/v1/devices/{id}/public_key"),
            &b.public_key,
        )?,
        device_id: id,
        public_key: b.public_key,
        fault: req.header(fault::HEADER),
    };
    let (status, json) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        &claims.sub,
        "/devices/rotate",
        &r,
    )
    .await?;
    match status {
        200 => {}
        // Exactly the answer an unknown id gets.
        404 => return Err(not_found()),
        _ => return Err(refusal(status, &json)),
    }
    Ok(Reply::json(200, &device_of(json)?))
}
