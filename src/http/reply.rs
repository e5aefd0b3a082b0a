//! `Reply`: a response as plain data, converted to a `worker::Response` by the
//! shell. [`finish`] adds what every response carries.

use super::ApiError;
use serde::Serialize;

pub const JSON: &str = "application/json";
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A response before it meets the runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// 204: done, nothing to say.
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            headers: vec![],
            body: vec![],
        }
    }

    /// A JSON body with the given status.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply {
                status,
                headers: vec![("content-type", JSON.into())],
                body,
            },
            // Our own types always serialise; if one ever does not, say so plainly.
            Err(_) => Reply::problem(&ApiError::internal(), ""),
        }
    }

    /// A problem+json body for `err`, with its `Retry-After` and `Allow` headers.
    pub fn problem(err: &ApiError, request_id: &str) -> Reply {
        let body = serde_json::to_vec(&err.to_body(request_id)).unwrap_or_default();
        let mut headers = vec![("content-type", PROBLEM_JSON.to_owned())];
        if let Some(secs) = err.retry_after {
            headers.push(("retry-after", secs.to_string()));
        }
        if let Some(allow) = err.allow {
            headers.push(("allow", allow.to_owned()));
        }
        if let Some(challenge) = err.code.challenge() {
            headers.push(("www-authenticate", challenge));
        }
        Reply {
            status: err.code.status(),
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Adds the headers every response carries: the request id, defaults that keep
/// API responses out of shared caches, and headers that stop a browser from
/// rendering, framing or sniffing them.
///
/// CORS is deliberately absent: the API serves the VPN apps, not web pages, so
/// no `Access-Control-Allow-*` header is ever sent and browsers refuse
/// cross-origin calls (a preflight `OPTIONS` gets 405).
pub fn finish(mut reply: Reply, request_id: &str) -> Reply {
    reply.headers.push(("x-request-id", request_id.to_owned()));
    if reply.header("cache-control").is_none() {
        reply.headers.push(("cache-control", "no-store".into()));
    }
    let security = [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
        ("referrer-policy", "no-referrer"),
        (
            "strict-transport-security",
            "max-age=31536000; includeSubDomains",
        ),
    ];
    reply
        .headers
        .extend(security.map(|(k, v)| (k, v.to_owned())));
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::problem::ProblemCode;
    use serde_json::Value;

    fn body(reply: &Reply) -> Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[test]
    fn a_problem_has_the_rfc_9457_members_and_our_code() {
        let r = Reply::problem(&ApiError::not_found(), "req-1");
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some(PROBLEM_JSON));
        let b = body(&r);
        assert_eq!(b["type"], "urn:keenvpn:problem:not_found");
        assert_eq!(b["title"], "Not found");
        assert_eq!(b["status"], 404);
        assert_eq!(b["code"], "not_found");
        assert_eq!(b["request_id"], "req-1");
        assert!(b["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }

    #[test]
    fn a_503_carries_retry_after_and_a_405_carries_allow() {
        let r = Reply::problem(&ApiError::new(ProblemCode::NotReady, "x"), "r");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("5"));
        let r = Reply::problem(&ApiError::method_not_allowed("GET"), "r");
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET"));
        assert_eq!(r.header("retry-after"), None);
    }

    #[test]
    fn a_default_retry_after_is_spread_and_a_chosen_one_kept() {
        let mut seen = std::collections::BTreeSet::new();
        for random in 0..12 {
            let mut e = ApiError::new(ProblemCode::ServiceUnavailable, "x");
            e.spread_retry_after(random);
            seen.insert(e.retry_after.unwrap());
            // Spread once only.
            let again = e.retry_after;
            e.spread_retry_after(random + 1);
            assert_eq!(e.retry_after, again);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [5, 6, 7, 8, 9, 10]);
        let mut e = ApiError::new(ProblemCode::TooManyAttempts, "x").with_retry_after(42);
        e.spread_retry_after(3);
        assert_eq!(e.retry_after, Some(42));
        let mut e = ApiError::not_found();
        e.spread_retry_after(3);
        assert_eq!(e.retry_after, None);
    }

    #[test]
    fn every_401_carries_www_authenticate_naming_the_error_of_a_refused_access_token() {
        let r = Reply::problem(&ApiError::new(ProblemCode::TokenExpired, "x"), "r");
        assert_eq!(r.status, 401);
        let h = r.header("www-authenticate").unwrap();
        assert!(
            h.starts_with("Bearer ") && h.contains(r#"error="invalid_token""#),
            "{h}"
        );
        let r = Reply::problem(&ApiError::new(ProblemCode::TokenMissing, "x"), "r");
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="keenvpn""#)
        );
        let r = Reply::problem(&ApiError::new(ProblemCode::InvalidCredentials, "x"), "r");
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="keenvpn""#)
        );
        let r = Reply::problem(&ApiError::new(ProblemCode::AdminUnauthorized, "x"), "r");
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="keenvpn-admin""#)
        );
        let r = Reply::problem(&ApiError::new(ProblemCode::TooManyAttempts, "x"), "r");
        assert_eq!(r.header("www-authenticate"), None);
    }

    #[test]
    fn extensions_are_added_but_never_override_standard_members() {
        let e = ApiError::not_found()
            .with("status", Value::from(200))
            .with("components", serde_json::json!([1]));
        let b = body(&Reply::problem(&e, "r"));
        assert_eq!(b["status"], 404);
        assert_eq!(b["components"], serde_json::json!([1]));
    }

    #[test]
    fn every_finished_reply_has_a_request_id_and_no_store() {
        let r = finish(Reply::json(200, &serde_json::json!({"ok": true})), "abc");
        assert_eq!(r.header("x-request-id"), Some("abc"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
        assert!(
            r.header("content-security-policy")
                .is_some_and(|v| v.contains("default-src 'none'"))
        );
        assert!(r.header("strict-transport-security").is_some());
        assert!(
            r.headers
                .iter()
                .all(|(k, _)| !k.starts_with("access-control-")),
            "no CORS"
        );
        assert_eq!(r.header("content-type"), Some(JSON));
    }

    #[test]
    fn finish_keeps_a_handler_chosen_cache_control() {
        let mut r = Reply::json(200, &1);
        r.headers
            .push(("cache-control", "public, max-age=30".into()));
        let r = finish(r, "abc");
        assert_eq!(r.header("cache-control"), Some("public, max-age=30"));
    }
}
