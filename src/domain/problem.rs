//! Stable, machine-readable problem codes.
//!
//! Clients branch on `code`, never on `title` or `detail`, so a code is never
//! renamed once shipped. Each code fixes its HTTP status here, in one place.

/// Every failure the API can report, with the HTTP status it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemCode {
    // --- request shape ---
    /// 400: the body is not valid JSON or not the expected shape.
    MalformedJson,
    /// 413: the body is larger than the route accepts.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: the body parsed but a field is invalid (`errors` names which).
    ValidationFailed,
    /// 404: no route matches the path.
    NotFound,
    /// 405: the path exists but not for this method.
    MethodNotAllowed,
    // --- accounts ---
    /// 409: an account with this email already exists.
    EmailTaken,
    /// 401: unknown email or wrong password (deliberately indistinguishable).
    InvalidCredentials,
    /// 429: too many failed sign-ins for this account or client.
    TooManyAttempts,
    /// 409: the account cannot be deleted while a subscription may still
    /// charge it; nothing was deleted.
    SubscriptionActive,
    // --- devices ---
    /// 403: the plan's device limit is reached; nothing was created.
    DeviceLimitReached,
    /// 404: no device with this id belongs to the caller.
    DeviceNotFound,
    /// 409: another device already uses this WireGuard public key.
    PublicKeyInUse,
    /// 409: a request with this `Idempotency-Key` is still being processed.
    IdempotencyKeyInFlight,
    /// 422: this `Idempotency-Key` was used with a different request.
    IdempotencyKeyReused,
    /// 403: the device exists but is beyond the plan's device count (after a downgrade).
    DeviceNotEntitled,
    // --- regions and connect ---
    /// 403: the plan does not include the requested region's tier.
    RegionNotAllowed,
    /// 404: no region with this id.
    RegionNotFound,
    /// 404: no server with this id (admin API).
    ServerNotFound,
    /// 429: the region is admitting clients as fast as it can; retry or fail over.
    RegionBusy,
    /// 503: the region is taking no one right now; fail over.
    RegionClosed,
    /// 503: no region the plan allows is up.
    NoRegionAvailable,
    /// 401: the admin API needs the service token.
    AdminUnauthorized,
    // --- billing webhooks (400: the provider shows them to the operator) ---
    SignatureMissing,
    SignatureMalformed,
    SignatureMissingV1,
    SignatureStale,
    SignatureMismatch,
    WebhookMalformed,
    // --- access tokens (all 401, with `WWW-Authenticate: Bearer`) ---
    TokenMissing,
    TokenTooLarge,
    TokenMalformed,
    TokenAlgorithmNotAllowed,
    TokenUnknownKey,
    TokenBadSignature,
    TokenWrongType,
    TokenWrongIssuer,
    TokenWrongAudience,
    TokenLifetimeTooLong,
    TokenNotYetValid,
    TokenExpired,
    /// 401: the token's session was logged out or revoked.
    SessionRevoked,
    // --- refresh tokens (all 401) ---
    RefreshTokenMalformed,
    RefreshTokenInvalid,
    RefreshTokenRevoked,
    RefreshTokenExpired,
    RefreshTokenReused,
    // --- the service ---
    /// 503: a dependency the service needs (KV, Durable Objects, PostgreSQL) is down.
    NotReady,
    /// 503: a dependency failed or timed out while serving the request.
    ServiceUnavailable,
    /// 500: the deployment lacks a required secret (e.g. signing keys).
    NotConfigured,
    /// 500: a bug or an unexpected condition; details go to the log only.
    Internal,
}

impl ProblemCode {
    /// All codes, for documentation and exhaustive tests.
    pub const ALL: [ProblemCode; 51] = [
        ProblemCode::MalformedJson,
        ProblemCode::PayloadTooLarge,
        ProblemCode::UnsupportedMediaType,
        ProblemCode::ValidationFailed,
        ProblemCode::NotFound,
        ProblemCode::MethodNotAllowed,
        ProblemCode::EmailTaken,
        ProblemCode::InvalidCredentials,
        ProblemCode::TooManyAttempts,
        ProblemCode::SubscriptionActive,
        ProblemCode::DeviceLimitReached,
        ProblemCode::DeviceNotFound,
        ProblemCode::PublicKeyInUse,
        ProblemCode::IdempotencyKeyInFlight,
        ProblemCode::IdempotencyKeyReused,
        ProblemCode::DeviceNotEntitled,
        ProblemCode::RegionNotAllowed,
        ProblemCode::RegionNotFound,
        ProblemCode::ServerNotFound,
        ProblemCode::RegionBusy,
        ProblemCode::RegionClosed,
        ProblemCode::NoRegionAvailable,
        ProblemCode::AdminUnauthorized,
        ProblemCode::SignatureMissing,
        ProblemCode::SignatureMalformed,
        ProblemCode::SignatureMissingV1,
        ProblemCode::SignatureStale,
        ProblemCode::SignatureMismatch,
        ProblemCode::WebhookMalformed,
        ProblemCode::TokenMissing,
        ProblemCode::TokenTooLarge,
        ProblemCode::TokenMalformed,
        ProblemCode::TokenAlgorithmNotAllowed,
        ProblemCode::TokenUnknownKey,
        ProblemCode::TokenBadSignature,
        ProblemCode::TokenWrongType,
        ProblemCode::TokenWrongIssuer,
        ProblemCode::TokenWrongAudience,
        ProblemCode::TokenLifetimeTooLong,
        ProblemCode::TokenNotYetValid,
        ProblemCode::TokenExpired,
        ProblemCode::SessionRevoked,
        ProblemCode::RefreshTokenMalformed,
        ProblemCode::RefreshTokenInvalid,
        ProblemCode::RefreshTokenRevoked,
        ProblemCode::RefreshTokenExpired,
        ProblemCode::RefreshTokenReused,
        ProblemCode::NotReady,
        ProblemCode::ServiceUnavailable,
        ProblemCode::NotConfigured,
        ProblemCode::Internal,
    ];

    /// The stable snake_case code sent as the `code` member.
    pub const fn as_str(self) -> &'static str {
        use ProblemCode::*;
        match self {
            MalformedJson => "malformed_json",
            PayloadTooLarge => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            ValidationFailed => "validation_failed",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            EmailTaken => "email_taken",
            SubscriptionActive => "subscription_active",
            InvalidCredentials => "invalid_credentials",
            TooManyAttempts => "too_many_attempts",
            DeviceLimitReached => "device_limit_reached",
            DeviceNotFound => "device_not_found",
            PublicKeyInUse => "public_key_in_use",
            IdempotencyKeyInFlight => "idempotency_key_in_flight",
            IdempotencyKeyReused => "idempotency_key_reused",
            DeviceNotEntitled => "device_not_entitled",
            RegionNotAllowed => "region_not_allowed",
            RegionNotFound => "region_not_found",
            ServerNotFound => "server_not_found",
            RegionBusy => "region_busy",
            RegionClosed => "region_closed",
            NoRegionAvailable => "no_region_available",
            AdminUnauthorized => "admin_unauthorized",
            SignatureMissing => "signature_missing",
            SignatureMalformed => "signature_malformed",
            SignatureMissingV1 => "signature_missing_v1",
            SignatureStale => "signature_stale",
            SignatureMismatch => "signature_mismatch",
            WebhookMalformed => "webhook_malformed",
            TokenMissing => "token_missing",
            TokenTooLarge => "token_too_large",
            TokenMalformed => "token_malformed",
            TokenAlgorithmNotAllowed => "token_algorithm_not_allowed",
            TokenUnknownKey => "token_unknown_key",
            TokenBadSignature => "token_bad_signature",
            TokenWrongType => "token_wrong_type",
            TokenWrongIssuer => "token_wrong_issuer",
            TokenWrongAudience => "token_wrong_audience",
            TokenLifetimeTooLong => "token_lifetime_too_long",
            TokenNotYetValid => "token_not_yet_valid",
            TokenExpired => "token_expired",
            SessionRevoked => "session_revoked",
            RefreshTokenMalformed => "refresh_token_malformed",
            RefreshTokenInvalid => "refresh_token_invalid",
            RefreshTokenRevoked => "refresh_token_revoked",
            RefreshTokenExpired => "refresh_token_expired",
            RefreshTokenReused => "refresh_token_reused",
            NotReady => "not_ready",
            ServiceUnavailable => "service_unavailable",
            NotConfigured => "not_configured",
            Internal => "internal_error",
        }
    }

    /// Looks a code up by its wire name (used to map the token and session
    /// modules' own codes onto this enum).
    pub fn from_code(code: &str) -> Option<ProblemCode> {
        ProblemCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The HTTP status this code is always sent with.
    pub const fn status(self) -> u16 {
        use ProblemCode::*;
        match self {
            MalformedJson | SignatureMissing | SignatureMalformed | SignatureMissingV1
            | SignatureStale | SignatureMismatch | WebhookMalformed => 400,
            DeviceLimitReached | DeviceNotEntitled | RegionNotAllowed => 403,
            DeviceNotFound | RegionNotFound | ServerNotFound => 404,
            RegionBusy => 429,
            RegionClosed | NoRegionAvailable => 503,
            AdminUnauthorized => 401,
            PublicKeyInUse | IdempotencyKeyInFlight => 409,
            IdempotencyKeyReused => 422,
            InvalidCredentials
            | TokenMissing
            | TokenTooLarge
            | TokenMalformed
            | TokenAlgorithmNotAllowed
            | TokenUnknownKey
            | TokenBadSignature
            | TokenWrongType
            | TokenWrongIssuer
            | TokenWrongAudience
            | TokenLifetimeTooLong
            | TokenNotYetValid
            | TokenExpired
            | SessionRevoked
            | RefreshTokenMalformed
            | RefreshTokenInvalid
            | RefreshTokenRevoked
            | RefreshTokenExpired
            | RefreshTokenReused => 401,
            NotFound => 404,
            MethodNotAllowed => 405,
            EmailTaken | SubscriptionActive => 409,
            PayloadTooLarge => 413,
            UnsupportedMediaType => 415,
            ValidationFailed => 422,
            TooManyAttempts => 429,
            NotConfigured | Internal => 500,
            NotReady | ServiceUnavailable => 503,
        }
    }

    /// The `WWW-Authenticate` challenge a 401 with this code carries (RFC 9110
    /// asks one of every 401), `None` for every other status. An access-token
    /// failure names the error (RFC 6750, section 3), except when no token was
    /// sent at all; the 401s about other credentials (a password, a refresh
    /// token in the body, the admin token) only say which scheme and realm a
    /// request needs. `realm="keenvpn-admin"` tells the operator's token from a
    /// user's.
    pub fn challenge(self) -> Option<String> {
        const USER: &str = r#"Bearer realm="keenvpn""#;
        match self {
            ProblemCode::TokenMissing => Some(USER.to_owned()),
            code if code.is_bearer_failure() => Some(format!(
                r#"{USER}, error="invalid_token", error_description="{}""#,
                code.as_str()
            )),
            ProblemCode::AdminUnauthorized => Some(r#"Bearer realm="keenvpn-admin""#.to_owned()),
            code if code.status() == 401 => Some(USER.to_owned()),
            _ => None,
        }
    }

    /// Whether this is an access-token failure (its challenge names the error).
    pub const fn is_bearer_failure(self) -> bool {
        use ProblemCode::*;
        matches!(
            self,
            TokenMissing
                | TokenTooLarge
                | TokenMalformed
                | TokenAlgorithmNotAllowed
                | TokenUnknownKey
                | TokenBadSignature
                | TokenWrongType
                | TokenWrongIssuer
                | TokenWrongAudience
                | TokenLifetimeTooLong
                | TokenNotYetValid
                | TokenExpired
                | SessionRevoked
        )
    }

    /// A short human summary; constant per code, as RFC 9457 asks of `title`.
    pub const fn title(self) -> &'static str {
        use ProblemCode::*;
        match self {
            MalformedJson => "Malformed JSON body",
            PayloadTooLarge => "Request body too large",
            UnsupportedMediaType => "Unsupported media type",
            ValidationFailed => "Validation failed",
            NotFound => "Not found",
            MethodNotAllowed => "Method not allowed",
            EmailTaken => "Email already registered",
            SubscriptionActive => "Subscription still active",
            InvalidCredentials => "Invalid email or password",
            TooManyAttempts => "Too many attempts",
            DeviceLimitReached => "Device limit reached",
            DeviceNotFound => "Device not found",
            PublicKeyInUse => "Public key already in use",
            IdempotencyKeyInFlight => "Request already in progress",
            IdempotencyKeyReused => "Idempotency key reused",
            DeviceNotEntitled => "Device not covered by the plan",
            RegionNotAllowed => "Region not included in the plan",
            RegionNotFound => "Region not found",
            ServerNotFound => "Server not found",
            RegionBusy => "Region busy",
            RegionClosed => "Region not accepting connections",
            NoRegionAvailable => "No region available",
            AdminUnauthorized => "Admin token required",
            SignatureMissing | SignatureMalformed | SignatureMissingV1 | SignatureStale
            | SignatureMismatch => "Invalid webhook signature",
            WebhookMalformed => "Malformed webhook event",
            TokenMissing => "Access token missing",
            TokenTooLarge
            | TokenMalformed
            | TokenAlgorithmNotAllowed
            | TokenUnknownKey
            | TokenBadSignature
            | TokenWrongType
            | TokenWrongIssuer
            | TokenWrongAudience
            | TokenLifetimeTooLong
            | TokenNotYetValid => "Invalid access token",
            TokenExpired => "Access token expired",
            SessionRevoked => "Session revoked",
            RefreshTokenMalformed | RefreshTokenInvalid => "Invalid refresh token",
            RefreshTokenRevoked => "Refresh token revoked",
            RefreshTokenExpired => "Refresh token expired",
            RefreshTokenReused => "Refresh token reused",
            NotReady => "Service not ready",
            ServiceUnavailable => "Service temporarily unavailable",
            NotConfigured => "Service not configured",
            Internal => "Internal error",
        }
    }

    /// The problem `type` URI: stable and unique per code.
    pub fn type_uri(self) -> String {
        format!("urn:keenvpn:problem:{}", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_snake_case_and_map_to_error_statuses() {
        let mut seen = HashSet::new();
        for code in ProblemCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "duplicate code {s}");
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{s} is not snake_case"
            );
            assert!((400..600).contains(&code.status()), "{s}");
            assert!(!code.title().is_empty());
            assert_eq!(code.type_uri(), format!("urn:keenvpn:problem:{s}"));
            assert_eq!(ProblemCode::from_code(s), Some(code));
        }
        assert_eq!(ProblemCode::from_code("no_such_code"), None);
    }

    #[test]
    fn bearer_failures_are_exactly_the_401s_about_access_tokens() {
        for code in ProblemCode::ALL {
            if code.is_bearer_failure() {
                assert_eq!(code.status(), 401, "{code:?}");
                assert!(code.as_str().starts_with("token_") || code == ProblemCode::SessionRevoked);
            }
        }
    }

    #[test]
    fn every_401_and_only_a_401_carries_a_challenge() {
        let mut unauthorized = 0;
        for code in ProblemCode::ALL {
            let challenge = code.challenge();
            if code.status() != 401 {
                assert_eq!(challenge, None, "{code:?}");
                continue;
            }
            unauthorized += 1;
            let challenge = challenge.unwrap_or_else(|| panic!("{code:?} has no challenge"));
            let realm = if code == ProblemCode::AdminUnauthorized {
                r#"Bearer realm="keenvpn-admin""#
            } else {
                r#"Bearer realm="keenvpn""#
            };
            assert!(challenge.starts_with(realm), "{code:?}: {challenge}");
            // The error is named exactly when an access token was sent and refused.
            let named = code.is_bearer_failure() && code != ProblemCode::TokenMissing;
            assert_eq!(
                challenge.contains(r#"error="invalid_token""#),
                named,
                "{code:?}: {challenge}"
            );
            if named {
                assert!(challenge.ends_with(&format!(r#"error_description="{}""#, code.as_str())));
            }
        }
        // The access-token codes, the refresh-token codes, the password and the admin token.
        assert!(unauthorized >= 20, "{unauthorized}");
    }
}
