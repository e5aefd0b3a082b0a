//! Every JSON request body: the same bytes go through `parse_json::<T>`
//! (the size check, then serde with unknown fields refused) for each request
//! type, and what parses through the checks its handler applies next. Any
//! input gets a typed value or a `malformed_json` / `payload_too_large`
//! problem, never a panic. (The webhook body has a target of its own,
//! `stripe_event`, since it is verified before it is parsed.)

#![no_main]

use keenvpn_edge::api::{
    ConnectRequest, CreateDevice, Credentials, HealthReport, RefreshRequest, RotateKey, SetRegion,
};
use keenvpn_edge::domain::account::{Email, Password};
use keenvpn_edge::domain::device::{DeviceName, PublicKey, is_device_id};
use keenvpn_edge::domain::session::RefreshToken;
use keenvpn_edge::http::ApiError;
use keenvpn_edge::http::body::{MAX_JSON_BODY, parse_json};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

/// Parses `data` as a `T` body; a refusal must be one of the two problems
/// a body can cause, and the right one.
fn parse<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    match parse_json::<T>(Some("application/json"), data, MAX_JSON_BODY) {
        Ok(body) => {
            assert!(data.len() <= MAX_JSON_BODY);
            // serde_json accepts nothing that is not JSON.
            assert!(serde_json::from_slice::<serde_json::Value>(data).is_ok());
            Some(body)
        }
        Err(ApiError { code, .. }) => {
            let expected = if data.len() > MAX_JSON_BODY {
                "payload_too_large"
            } else {
                "malformed_json"
            };
            assert_eq!(code.as_str(), expected);
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(b) = parse::<Credentials>(data) {
        let _ = (Email::parse(&b.email), Password::parse(&b.password));
    }
    if let Some(b) = parse::<RefreshRequest>(data)
        && let Ok(token) = RefreshToken::parse(&b.refresh_token)
    {
        assert_eq!(token.to_wire(), b.refresh_token);
    }
    if let Some(b) = parse::<CreateDevice>(data) {
        let _ = (DeviceName::parse(&b.name), PublicKey::parse(&b.public_key));
    }
    if let Some(b) = parse::<RotateKey>(data) {
        let _ = PublicKey::parse(&b.public_key);
    }
    if let Some(b) = parse::<ConnectRequest>(data) {
        let _ = is_device_id(&b.device_id);
    }
    let _ = parse::<SetRegion>(data);
    let _ = parse::<HealthReport>(data);
});
