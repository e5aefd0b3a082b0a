//! Secrets, parsed once per isolate.
//!
//! Signing keys and the refresh-token pepper come from Worker secrets (in local
//! development, `.dev.vars`). They are immutable for the life of an isolate, so
//! parsing them once is safe and keeps key parsing off every request; this is the
//! kind of per-isolate static the design allows. A deployment without them
//! refuses every request that needs them with `not_configured` instead of
//! running with a default.

use super::Fail;
use crate::domain::problem::ProblemCode;
use crate::domain::token::KeySet;
use crate::http::ApiError;
use base64::Engine as _;
use std::sync::OnceLock;
use worker::Env;

pub const SIGNING_KEYS: &str = "JWT_SIGNING_KEYS";
pub const REFRESH_PEPPER: &str = "REFRESH_TOKEN_PEPPER";
/// The pepper must carry at least 256 bits.
const MIN_PEPPER_BYTES: usize = 32;

static KEYS: OnceLock<Result<KeySet, String>> = OnceLock::new();
static PEPPER: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();

fn not_configured(what: &str) -> ApiError {
    ApiError::new(
        ProblemCode::NotConfigured,
        format!("The service is missing its {what}; it has been logged."),
    )
}

fn secret(env: &Env, name: &str) -> Result<String, String> {
    env.secret(name)
        .map(|s| s.to_string())
        .map_err(|_| format!("secret {name} is not set"))
}

/// The access-token key set, or `not_configured`.
pub fn keys(env: &Env) -> Result<&'static KeySet, Fail> {
    let parsed = KEYS.get_or_init(|| {
        secret(env, SIGNING_KEYS)
            .and_then(|s| KeySet::parse(&s).map_err(|e| format!("{SIGNING_KEYS}: {e}")))
    });
    parsed
        .as_ref()
        .map_err(|e| Fail::new(not_configured("signing keys"), e.clone()))
}

/// The refresh-token pepper, or `not_configured`.
pub fn pepper(env: &Env) -> Result<&'static [u8], String> {
    let parsed = PEPPER.get_or_init(|| {
        let raw = secret(env, REFRESH_PEPPER)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw.trim().trim_end_matches('='))
            .map_err(|_| format!("{REFRESH_PEPPER} is not base64url"))?;
        if bytes.len() < MIN_PEPPER_BYTES {
            return Err(format!(
                "{REFRESH_PEPPER} is shorter than {MIN_PEPPER_BYTES} bytes"
            ));
        }
        Ok(bytes)
    });
    parsed.as_ref().map(Vec::as_slice).map_err(Clone::clone)
}

pub fn pepper_or_fail(env: &Env) -> Result<&'static [u8], Fail> {
    pepper(env).map_err(|e| Fail::new(not_configured("refresh-token key"), e))
}
