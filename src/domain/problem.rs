//! Stable, machine-readable problem codes.
//!
//! Clients branch on `code`, never on `title` or `detail`, so a code is never
//! renamed once shipped. Each code fixes its HTTP status here, in one place.

/// Every failure the API can report, with the HTTP status it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemCode {
    /// 404: no route matches the path.
    NotFound,
    /// 405: the path exists but not for this method.
    MethodNotAllowed,
    /// 503: a dependency the service needs (KV, Durable Objects, PostgreSQL) is down.
    NotReady,
    /// 503: a dependency failed or timed out while serving the request.
    ServiceUnavailable,
    /// 500: a bug or an unexpected condition; details go to the log only.
    Internal,
}

impl ProblemCode {
    /// All codes, for documentation and exhaustive tests.
    pub const ALL: [ProblemCode; 5] = [
        ProblemCode::NotFound,
        ProblemCode::MethodNotAllowed,
        ProblemCode::NotReady,
        ProblemCode::ServiceUnavailable,
        ProblemCode::Internal,
    ];

    /// The stable snake_case code sent as the `code` member.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProblemCode::NotFound => "not_found",
            ProblemCode::MethodNotAllowed => "method_not_allowed",
            ProblemCode::NotReady => "not_ready",
            ProblemCode::ServiceUnavailable => "service_unavailable",
            ProblemCode::Internal => "internal_error",
        }
    }

    /// The HTTP status this code is always sent with.
    pub const fn status(self) -> u16 {
        match self {
            ProblemCode::NotFound => 404,
            ProblemCode::MethodNotAllowed => 405,
            ProblemCode::NotReady | ProblemCode::ServiceUnavailable => 503,
            ProblemCode::Internal => 500,
        }
    }

    /// A short human summary; constant per code, as RFC 9457 asks of `title`.
    pub const fn title(self) -> &'static str {
        match self {
            ProblemCode::NotFound => "Not found",
            ProblemCode::MethodNotAllowed => "Method not allowed",
            ProblemCode::NotReady => "Service not ready",
            ProblemCode::ServiceUnavailable => "Service temporarily unavailable",
            ProblemCode::Internal => "Internal error",
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
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s} is not snake_case"
            );
            assert!((400..600).contains(&code.status()), "{s}");
            assert!(!code.title().is_empty());
            assert_eq!(code.type_uri(), format!("urn:keenvpn:problem:{s}"));
        }
    }
}
