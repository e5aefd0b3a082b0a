//! The route table. Paths are matched exactly (no trailing-slash guessing), and a
//! path that exists under another method yields 405 with an `Allow` header.
//! `HEAD` is routed as `GET` wherever `GET` is (RFC 9110, 9.3.2: the shell
//! answers it without the body), and `Allow` lists it there.

/// A matched endpoint. Path parameters are carried as they appeared; handlers
/// parse them (an id that cannot be ours is answered like an unknown one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`: liveness, no I/O.
    Healthz,
    /// `GET /readyz`: proves KV, a Durable Object and PostgreSQL.
    Readyz,
    /// `GET /openapi.json`: the OpenAPI document.
    OpenApi,
    /// `GET /.well-known/jwks.json`: the public keys that verify access tokens.
    Jwks,
    /// `POST /v1/auth/signup`
    Signup,
    /// `POST /v1/auth/login`
    Login,
    /// `POST /v1/auth/refresh`
    Refresh,
    /// `POST /v1/auth/logout`: ends the session of the presented access token.
    Logout,
    /// `POST /v1/auth/logout-all`: ends every session of the user.
    LogoutAll,
    /// `GET /v1/me`
    Me,
    /// `DELETE /v1/me`: the account, at its owner's request.
    DeleteAccount,
    /// `GET /v1/devices`
    ListDevices,
    /// `POST /v1/devices`
    CreateDevice,
    /// `GET /v1/devices/{id}`: the `Location` a registration answers with.
    GetDevice(String),
    /// `DELETE /v1/devices/{id}`
    DeleteDevice(String),
    /// `PUT /v1/devices/{id}/public_key`
    RotateDeviceKey(String),
    /// `POST /v1/webhooks/stripe`
    StripeWebhook,
    /// `GET /v1/regions`: the catalogue, from KV.
    Regions,
    /// `POST /v1/connect`: a server assignment for a device.
    Connect,
    /// `PUT /v1/admin/regions/{id}`: set health and admission rate.
    AdminSetRegion(String),
    /// `POST /v1/admin/regions/{id}/health-report`: a monitor's health report.
    AdminHealthReport(String),
    /// `GET /v1/admin/servers`
    AdminServers,
    /// `PUT /v1/admin/servers/{id}`: take a server out of placement or back.
    AdminSetServer(String),
}

/// What the router decided for a method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    let method = if method == "HEAD" { "GET" } else { method };
    let (allow, found) = match path {
        "/healthz" => (READ_ONLY, Route::Healthz),
        "/readyz" => (READ_ONLY, Route::Readyz),
        "/openapi.json" => (READ_ONLY, Route::OpenApi),
        "/.well-known/jwks.json" => (READ_ONLY, Route::Jwks),
        "/v1/auth/signup" => ("POST", Route::Signup),
        "/v1/auth/login" => ("POST", Route::Login),
        "/v1/auth/refresh" => ("POST", Route::Refresh),
        "/v1/auth/logout" => ("POST", Route::Logout),
        "/v1/auth/logout-all" => ("POST", Route::LogoutAll),
        "/v1/me" => match method {
            "DELETE" => (ACCOUNT, Route::DeleteAccount),
            _ => (ACCOUNT, Route::Me),
        },
        "/v1/devices" => match method {
            "GET" => ("GET, HEAD, POST", Route::ListDevices),
            _ => ("GET, HEAD, POST", Route::CreateDevice),
        },
        "/v1/webhooks/stripe" => ("POST", Route::StripeWebhook),
        "/v1/regions" => (READ_ONLY, Route::Regions),
        "/v1/connect" => ("POST", Route::Connect),
        "/v1/admin/servers" => (READ_ONLY, Route::AdminServers),
        _ if admin_server_path(path).is_some() => {
            let id = admin_server_path(path).unwrap_or_default();
            ("PUT", Route::AdminSetServer(id.to_owned()))
        }
        _ => match (device_path(path), admin_region_path(path)) {
            (Some((id, false)), _) => match method {
                "GET" => (DEVICE, Route::GetDevice(id.to_owned())),
                _ => (DEVICE, Route::DeleteDevice(id.to_owned())),
            },
            (Some((id, true)), _) => ("PUT", Route::RotateDeviceKey(id.to_owned())),
            (_, Some((id, false))) => ("PUT", Route::AdminSetRegion(id.to_owned())),
            (_, Some((id, true))) => ("POST", Route::AdminHealthReport(id.to_owned())),
            (None, None) => return Routed::NotFound,
        },
    };
    if allow.split(", ").any(|m| m == method) {
        Routed::Found(found)
    } else {
        Routed::MethodNotAllowed { allow }
    }
}

/// The `Allow` of a path that only reads.
const READ_ONLY: &str = "GET, HEAD";

/// The `Allow` of the account's path.
const ACCOUNT: &str = "GET, HEAD, DELETE";

/// The `Allow` of a device's path.
const DEVICE: &str = "GET, HEAD, DELETE";

/// `/v1/devices/{id}` → (id, false); `/v1/devices/{id}/public_key` → (id, true).
fn device_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1/devices/")?;
    let (id, key) = match rest.split_once('/') {
        Some((id, "public_key")) => (id, true),
        Some(_) => return None,
        None => (rest, false),
    };
    (!id.is_empty()).then_some((id, key))
}

/// `/v1/admin/servers/{id}` → id.
fn admin_server_path(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/v1/admin/servers/")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// `/v1/admin/regions/{id}` → (id, false); `.../{id}/health-report` → (id, true).
fn admin_region_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1/admin/regions/")?;
    let (id, report) = match rest.split_once('/') {
        Some((id, "health-report")) => (id, true),
        Some(_) => return None,
        None => (rest, false),
    };
    (!id.is_empty()).then_some((id, report))
}

/// The path of an absolute URL as the runtime serialises it (WHATWG), still
/// percent-encoded: from the first `/` after the authority to the query or
/// fragment. The serialiser never leaves `.` segments or backslashes, and
/// always writes a path for http(s) URLs, so slicing gives what a URL parser
/// would; `/` when there is none.
pub fn path_of_url(url: &str) -> &str {
    let rest = url.find("://").map_or(url, |at| &url[at + 3..]);
    let Some(start) = rest.find(['/', '?', '#']) else {
        return "/";
    };
    let path = &rest[start..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    if path.is_empty() { "/" } else { path }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_of_a_serialised_url() {
        for (url, path) in [
            ("https://api.example.com/", "/"),
            ("http://127.0.0.1:8787/v1/connect", "/v1/connect"),
            (
                "https://api.example.com/v1/devices/abc?x=1&y=/z",
                "/v1/devices/abc",
            ),
            ("https://api.example.com/a#/frag?x", "/a"),
            ("https://api.example.com/a%3F%23%2Fb?c", "/a%3F%23%2Fb"),
            (
                "https://user:pw@api.example.com:8443/v1/regions",
                "/v1/regions",
            ),
            ("https://api.example.com?query", "/"),
            ("https://api.example.com#frag", "/"),
            ("https://api.example.com", "/"),
        ] {
            assert_eq!(path_of_url(url), path, "{url}");
        }
    }

    #[test]
    fn known_paths_route_by_method() {
        assert_eq!(route("GET", "/healthz"), Routed::Found(Route::Healthz));
        assert_eq!(route("GET", "/readyz"), Routed::Found(Route::Readyz));
        assert_eq!(
            route("GET", "/.well-known/jwks.json"),
            Routed::Found(Route::Jwks)
        );
        assert_eq!(
            route("POST", "/v1/auth/signup"),
            Routed::Found(Route::Signup)
        );
        assert_eq!(route("POST", "/v1/auth/login"), Routed::Found(Route::Login));
        assert_eq!(
            route("POST", "/v1/auth/refresh"),
            Routed::Found(Route::Refresh)
        );
        assert_eq!(
            route("POST", "/v1/auth/logout"),
            Routed::Found(Route::Logout)
        );
        assert_eq!(
            route("POST", "/v1/auth/logout-all"),
            Routed::Found(Route::LogoutAll)
        );
        assert_eq!(route("GET", "/v1/me"), Routed::Found(Route::Me));
        assert_eq!(
            route("GET", "/v1/auth/login"),
            Routed::MethodNotAllowed { allow: "POST" }
        );
    }

    #[test]
    fn a_known_path_with_another_method_is_405_with_allow() {
        assert_eq!(
            route("POST", "/healthz"),
            Routed::MethodNotAllowed { allow: "GET, HEAD" }
        );
        assert_eq!(
            route("DELETE", "/readyz"),
            Routed::MethodNotAllowed { allow: "GET, HEAD" }
        );
    }

    #[test]
    fn head_is_routed_as_get_and_nowhere_else() {
        for (path, found) in [
            ("/healthz", Route::Healthz),
            ("/v1/regions", Route::Regions),
            ("/v1/devices", Route::ListDevices),
            ("/v1/me", Route::Me),
        ] {
            assert_eq!(route("HEAD", path), Routed::Found(found), "{path}");
        }
        assert_eq!(
            route("HEAD", "/v1/connect"),
            Routed::MethodNotAllowed { allow: "POST" }
        );
        assert_eq!(route("HEAD", "/nowhere"), Routed::NotFound);
    }

    #[test]
    fn a_device_path_is_read_and_deleted_and_nothing_else() {
        let id = || "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4c".to_owned();
        let path = format!("/v1/devices/{}", id());
        assert_eq!(route("GET", &path), Routed::Found(Route::GetDevice(id())));
        assert_eq!(route("HEAD", &path), Routed::Found(Route::GetDevice(id())));
        assert_eq!(
            route("DELETE", &path),
            Routed::Found(Route::DeleteDevice(id()))
        );
        assert_eq!(
            route("POST", &path),
            Routed::MethodNotAllowed {
                allow: "GET, HEAD, DELETE"
            }
        );
    }

    #[test]
    fn a_server_path_is_set_and_nothing_else() {
        let set = Routed::Found(Route::AdminSetServer("eu-west-1".to_owned()));
        assert_eq!(route("PUT", "/v1/admin/servers/eu-west-1"), set);
        assert_eq!(
            route("GET", "/v1/admin/servers/eu-west-1"),
            Routed::MethodNotAllowed { allow: "PUT" }
        );
        for path in ["/v1/admin/servers/", "/v1/admin/servers/eu-west-1/x"] {
            assert_eq!(route("PUT", path), Routed::NotFound, "{path}");
        }
        assert_eq!(
            route("GET", "/v1/admin/servers"),
            Routed::Found(Route::AdminServers)
        );
    }

    #[test]
    fn unknown_and_near_miss_paths_are_404() {
        for path in ["/", "/healthz/", "/HEALTHZ", "/readyz/x", "", "/v1"] {
            assert_eq!(route("GET", path), Routed::NotFound, "{path:?}");
        }
    }
}
