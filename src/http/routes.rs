//! The route table. Paths are matched exactly (no trailing-slash guessing), and a
//! path that exists under another method yields 405 with an `Allow` header.

/// A matched endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`: liveness, no I/O.
    Healthz,
    /// `GET /readyz`: proves KV, a Durable Object and PostgreSQL.
    Readyz,
}

/// What the router decided for a method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    Found(Route),
    /// The path exists; `allow` lists the methods it takes.
    MethodNotAllowed {
        allow: &'static str,
    },
    NotFound,
}

/// Matches a request line to a route.
pub fn route(method: &str, path: &str) -> Routed {
    let (allow, found) = match path {
        "/healthz" => ("GET", Route::Healthz),
        "/readyz" => ("GET", Route::Readyz),
        _ => return Routed::NotFound,
    };
    if allow.split(", ").any(|m| m == method) {
        Routed::Found(found)
    } else {
        Routed::MethodNotAllowed { allow }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_paths_route_by_method() {
        assert_eq!(route("GET", "/healthz"), Routed::Found(Route::Healthz));
        assert_eq!(route("GET", "/readyz"), Routed::Found(Route::Readyz));
    }

    #[test]
    fn a_known_path_with_another_method_is_405_with_allow() {
        assert_eq!(
            route("POST", "/healthz"),
            Routed::MethodNotAllowed { allow: "GET" }
        );
        assert_eq!(
            route("DELETE", "/readyz"),
            Routed::MethodNotAllowed { allow: "GET" }
        );
    }

    #[test]
    fn unknown_and_near_miss_paths_are_404() {
        for path in ["/", "/healthz/", "/HEALTHZ", "/readyz/x", "", "/v1"] {
            assert_eq!(route("GET", path), Routed::NotFound, "{path:?}");
        }
    }
}
