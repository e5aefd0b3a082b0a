//! Request bodies: size and media type are checked before a byte is parsed, then
//! JSON is parsed into a typed request. Unknown fields are refused, so a typo in
//! a client is an error and not a silently ignored setting.

use super::ApiError;
use crate::domain::account::Invalid;
use crate::domain::problem::ProblemCode;
use serde::de::DeserializeOwned;
use serde_json::json;

/// The largest JSON body any route accepts.
pub const MAX_JSON_BODY: usize = 16 * 1024;

/// Refuses a declared `Content-Length` over `max` before the body is read.
pub fn check_declared_length(content_length: Option<&str>, max: usize) -> Result<(), ApiError> {
    match content_length.map(|v| v.trim().parse::<u64>()) {
        Some(Ok(n)) if n > max as u64 => Err(too_large(max)),
        Some(Err(_)) => Err(ApiError::new(
            ProblemCode::MalformedJson,
            "Content-Length is not a number.",
        )),
        _ => Ok(()),
    }
}

/// The refusal of a body longer than `max` bytes (413).
pub fn too_large(max: usize) -> ApiError {
    ApiError::new(
        ProblemCode::PayloadTooLarge,
        format!("The body is larger than {max} bytes."),
    )
    .with("max_bytes", json!(max))
}

/// Parses a JSON body of at most `max` bytes into `T`.
pub fn parse_json<T: DeserializeOwned>(
    content_type: Option<&str>,
    body: &[u8],
    max: usize,
) -> Result<T, ApiError> {
    if body.len() > max {
        return Err(too_large(max));
    }
    let media_type = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some("application/json") {
        return Err(ApiError::new(
            ProblemCode::UnsupportedMediaType,
            "Send the body as application/json.",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        // serde's message names the field and position; a type mismatch
        // also quotes the value sent. It goes back only to the client that
        // sent it, and is not logged.
        let detail = match e.classify() {
            serde_json::error::Category::Data => {
                format!("The JSON does not have the expected shape: {e}.")
            }
            _ => "The body is not valid JSON.".to_owned(),
        };
        ApiError::new(ProblemCode::MalformedJson, detail)
    })
}

/// A 422 naming the invalid field(s).
pub fn invalid(errors: &[Invalid]) -> ApiError {
    let list: Vec<_> = errors
        .iter()
        .map(|e| json!({"field": e.field, "reason": e.reason}))
        .collect();
    let detail = errors
        .iter()
        .map(|e| format!("{} {}", e.field, e.reason))
        .collect::<Vec<_>>()
        .join("; ");
    ApiError::new(
        ProblemCode::ValidationFailed,
        format!("Invalid input: {detail}."),
    )
    .with("errors", json!(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Login {
        #[allow(dead_code)]
        email: String,
    }

    fn code(r: Result<Login, ApiError>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    #[test]
    fn a_valid_json_body_parses() {
        let ok: Login = parse_json(
            Some("application/json; charset=utf-8"),
            br#"{"email":"a"}"#,
            100,
        )
        .unwrap();
        assert_eq!(ok.email, "a");
    }

    #[test]
    fn size_is_checked_before_parsing() {
        assert_eq!(
            code(parse_json(Some("application/json"), &[b'x'; 101], 100)),
            "payload_too_large"
        );
        assert_eq!(
            check_declared_length(Some("101"), 100)
                .unwrap_err()
                .code
                .as_str(),
            "payload_too_large"
        );
        assert!(check_declared_length(Some("100"), 100).is_ok());
        assert!(check_declared_length(None, 100).is_ok());
        assert_eq!(
            check_declared_length(Some("lots"), 100)
                .unwrap_err()
                .code
                .as_str(),
            "malformed_json"
        );
    }

    #[test]
    fn wrong_media_types_are_415() {
        for ct in [
            None,
            Some("text/plain"),
            Some("application/jsonx"),
            Some(""),
        ] {
            assert_eq!(
                code(parse_json(ct, br#"{"email":"a"}"#, 100)),
                "unsupported_media_type",
                "{ct:?}"
            );
        }
    }

    #[test]
    fn malformed_or_mis_shaped_json_is_400() {
        for body in [
            &b"{"[..],
            b"",
            b"null",
            b"[]",
            br#"{"email":1}"#,
            br#"{}"#,
            br#"{"email":"a","x":1}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(
                code(parse_json(Some("application/json"), body, 100)),
                "malformed_json",
                "{body:?}"
            );
        }
    }

    #[test]
    fn invalid_fields_are_listed_in_a_422() {
        let e = invalid(&[Invalid {
            field: "email",
            reason: "has no @",
        }]);
        assert_eq!(e.code.status(), 422);
        assert_eq!(e.extensions["errors"][0]["field"], "email");
    }
}
