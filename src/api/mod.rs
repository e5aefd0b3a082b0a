//! The API's wire types: every JSON body a client sends and every JSON body the
//! worker answers, in one place.
//!
//! The handlers in `edge` parse requests into these types and serialise
//! responses from them, and [`openapi`] (native only) derives the OpenAPI
//! document's schemas from the same definitions, so the contract cannot say one
//! thing while the worker does another. The schema derivations are compiled
//! only natively: the worker carries the finished document as text
//! ([`OPENAPI_SERVED`], the compact copy of `openapi.json` that `build.rs`
//! writes), not the machinery that wrote it.

use crate::domain::catalogue::{Health, Tier};
use crate::domain::readiness::Probe;
use serde::{Deserialize, Serialize};

#[cfg(not(target_arch = "wasm32"))]
pub mod openapi;

/// The OpenAPI document as committed (`openapi.json`).
/// A test regenerates it from these types and fails when the two differ.
#[cfg(not(target_arch = "wasm32"))]
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

/// The same document without its indentation (written by `build.rs`), served
/// at `/openapi.json`: about 86 KB less of the Worker's memory.
pub const OPENAPI_SERVED: &str = include_str!(concat!(env!("OUT_DIR"), "/openapi.compact.json"));

/// Derives the JSON Schema of a wire type, natively only.
macro_rules! wire {
    ($($item:item)*) => {$(
        #[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
        $item
    )*};
}

wire! {
    // ---- Requests --------------------------------------------------------

    /// `POST /v1/auth/signup` and `POST /v1/auth/login`.
    // No `Debug`: it holds a password, and nothing may print it.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Credentials {
        /// The account's email address (at most 254 bytes), matched trimmed,
        /// lower-cased and in Unicode NFC.
        #[cfg_attr(not(target_arch = "wasm32"), schemars(email, length(max = 254)))]
        pub email: String,
        /// 8 to 128 characters, no NUL; checked in its Unicode NFKC form.
        #[cfg_attr(not(target_arch = "wasm32"), schemars(length(min = 8, max = 128), regex(pattern = r"^[^\x00]*$")))]
        pub password: String,
        /// A label for the session, e.g. the device's name (control and hidden
        /// characters removed, cut to 64 characters).
        #[serde(default)]
        pub device_label: Option<String>,
    }

    /// `POST /v1/auth/refresh`.
    // No `Debug`: it holds a refresh token.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RefreshRequest {
        /// The refresh token of the last token pair (`v1.<user>.<session>.<generation>.<secret>`).
        pub refresh_token: String,
    }

    /// `POST /v1/devices`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CreateDevice {
        /// 1 to 64 characters, no control characters, no hidden ones (the soft
        /// hyphen, bidirectional controls, zero-width spaces, invisible operators,
        /// the byte-order mark), not only white space and zero-width joiners
        /// (stored trimmed).
        #[cfg_attr(not(target_arch = "wasm32"), schemars(length(min = 1, max = 64), regex(pattern = r"^[^\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]*[^\s\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\u200c\u200d][^\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]*$")))]
        pub name: String,
        /// The device's WireGuard public key: 32 bytes in canonical standard
        /// base64 (44 characters), a canonical Curve25519 key (below 2^255 - 19,
        /// so the last byte's top bit clear), not zero nor another point of
        /// small order.
        #[cfg_attr(not(target_arch = "wasm32"), schemars(regex(pattern = r"^(?!A{43}=)[A-Za-z0-9+/]{41}[A-HQ-Xg-nw-z0-3][AEIMQUYcgkosw048]=$")))]
        pub public_key: String,
    }

    /// `PUT /v1/devices/{id}/public_key`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RotateKey {
        /// The new WireGuard public key, as for registration.
        #[cfg_attr(not(target_arch = "wasm32"), schemars(regex(pattern = r"^(?!A{43}=)[A-Za-z0-9+/]{41}[A-HQ-Xg-nw-z0-3][AEIMQUYcgkosw048]=$")))]
        pub public_key: String,
    }

    /// `POST /v1/connect`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ConnectRequest {
        /// One of the caller's devices.
        pub device_id: String,
        /// A region id from `/v1/regions`; omitted: the nearest allowed healthy region.
        #[serde(default)]
        pub region: Option<String>,
        /// Regions the app could not reach just now (a tunnel to a server there
        /// failed, or its answer named a region that has since gone down):
        /// placement leaves them out, the requested one too, unless no other
        /// region the plan allows is up. At most 8; ids not in the catalogue
        /// are ignored. An app that lost its tunnel sends the region it was in,
        /// so that it is steered away at once, whatever the edge's copy of the
        /// catalogue says yet.
        #[cfg_attr(not(target_arch = "wasm32"), schemars(length(max = 8), inner(length(min = 1, max = 64))))]
        #[serde(default)]
        pub avoid: Vec<String>,
    }

    /// `PUT /v1/admin/regions/{id}`: at least one member that is not null.
    #[derive(Debug, Deserialize)]
    #[cfg_attr(not(target_arch = "wasm32"), schemars(extend("anyOf" = [
        {"required": ["health"], "properties": {"health": {"not": {"type": "null"}}}},
        {"required": ["admission_rate"], "properties": {"admission_rate": {"not": {"type": "null"}}}}
    ])))]
    #[serde(deny_unknown_fields)]
    pub struct SetRegion {
        /// The operator's decision: `draining` or `down` holds the region out
        /// whatever its monitors report, until an operator sets `up`, which
        /// lifts the restriction (a monitor's `down` still holds).
        #[serde(default)]
        pub health: Option<Health>,
        /// Reconnects per second the region admits (0 to 1,000,000; 0 admits no one),
        /// with all its servers having room; while some are full, the share of it
        /// that those with room hold of the region's capacity.
        // Read as any JSON number, so that one out of range (negative, a
        // fraction, too large) is refused by name (`whole_rate`, 422), not as
        // malformed JSON.
        #[cfg_attr(not(target_arch = "wasm32"), schemars(with = "Option<u32>", range(max = 1_000_000)))]
        #[serde(default)]
        pub admission_rate: Option<serde_json::Number>,
    }

    /// `PUT /v1/admin/servers/{id}`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SetServer {
        /// `false` takes the server out of placement: no device is placed on
        /// it from the next connect on (those placed there move to the
        /// region's other servers), until it is `true` again.
        pub enabled: bool,
    }

    /// `POST /v1/admin/regions/{id}/health-report`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthReport {
        pub health: Health,
        /// The load the monitor measured on the region's servers. A server
        /// becomes full at 0.95 and has room again below 0.90 (a fullness
        /// no report confirms for 3 minutes lapses): while full,
        /// it takes no new devices while another server of the region has
        /// room, and a region whose servers are
        /// all full is chosen only when asked for by name or when no other
        /// region has room. Servers left out keep their last load; one
        /// named twice takes its last entry. Ids that are not servers of
        /// this region are ignored and listed in the answer's
        /// `unknown_servers`, so that a monitor whose list is out of date
        /// still reports the region's health. At most 100 (a larger fleet
        /// is reported in parts).
        #[cfg_attr(not(target_arch = "wasm32"), schemars(length(max = 100)))]
        #[serde(default)]
        pub servers: Vec<ServerLoad>,
    }

    /// One server's load in a health report.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ServerLoad {
        /// A server id: a lower-case letter, then 1 to 63 lower-case
        /// letters, digits or hyphens.
        #[cfg_attr(not(target_arch = "wasm32"), schemars(regex(pattern = r"^[a-z][a-z0-9-]{1,63}$")))]
        pub id: String,
        /// The share of the server's capacity in use, 0 to 1.
        // Read as any JSON number, so that one out of range is refused by
        // name (`unit_load`, 422), not as malformed JSON (a number no double
        // holds, 1e400, still is).
        #[cfg_attr(not(target_arch = "wasm32"), schemars(with = "f64", range(min = 0.0, max = 1.0)))]
        pub load: serde_json::Number,
    }

    // ---- Responses -------------------------------------------------------

    /// `GET /healthz`.
    #[derive(Debug, Serialize)]
    pub struct Liveness {
        /// Always `ok`.
        pub status: &'static str,
    }

    /// `GET /readyz` when every component is up.
    #[derive(Debug, Serialize)]
    pub struct Readiness {
        /// Always `ready`.
        pub status: &'static str,
        pub components: Vec<Probe>,
    }

    /// `GET /.well-known/jwks.json`: the keys that verify access tokens (RFC 7517).
    #[derive(Debug, Serialize)]
    pub struct Jwks {
        pub keys: Vec<Jwk>,
    }

    /// An Ed25519 public key (RFC 8037).
    #[derive(Debug, Serialize)]
    pub struct Jwk {
        /// `OKP`.
        pub kty: &'static str,
        /// `Ed25519`.
        pub crv: &'static str,
        /// The public key, base64url without padding.
        pub x: String,
        pub kid: String,
        /// `EdDSA`.
        pub alg: &'static str,
        /// `sig`.
        #[serde(rename = "use")]
        pub use_: &'static str,
    }

    /// A token pair: signup (201), login and refresh (200).
    // No `Debug`: it holds the tokens.
    #[derive(Serialize)]
    pub struct TokenPair {
        /// An EdDSA-signed JWT; send it as `Authorization: Bearer ...`.
        pub access_token: String,
        /// Always `Bearer`.
        pub token_type: &'static str,
        /// Seconds until the access token expires.
        pub expires_in: i64,
        /// Single use: each refresh answers a new pair.
        pub refresh_token: String,
    }

    /// `GET /v1/me`.
    #[derive(Debug, Serialize)]
    pub struct Me {
        pub id: String,
        pub email: String,
        /// Unix seconds.
        pub created_at: i64,
        /// The plan id the entitlement comes from (`free`, `plus`, ...).
        pub plan: String,
        pub entitlement: EntitlementView,
        /// The user's signed-in sessions.
        pub sessions: Vec<SessionSummary>,
    }

    /// What the user's plan allows right now.
    #[derive(Debug, Serialize)]
    pub struct EntitlementView {
        pub max_devices: u32,
        pub region_tiers: Vec<Tier>,
        /// When a paid entitlement lapses (unix seconds); null for the free plan.
        pub until: Option<i64>,
    }

    /// A signed-in session.
    #[derive(Debug, Serialize)]
    pub struct SessionSummary {
        pub id: String,
        pub label: String,
        /// Unix seconds.
        pub created_at: i64,
        /// Unix seconds.
        pub last_refresh_at: i64,
        /// Whether this is the session of the token that asked.
        pub current: bool,
    }

    /// A registered WireGuard device.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Device {
        pub id: String,
        pub name: String,
        pub public_key: String,
        /// The device's tunnel IPv4 address.
        pub ipv4_address: String,
        /// The device's tunnel IPv6 address.
        pub ipv6_address: String,
        /// Unix seconds.
        pub created_at: i64,
    }

    /// `GET /v1/devices`.
    #[derive(Debug, Serialize)]
    pub struct DeviceList {
        pub devices: Vec<Device>,
        /// How many devices the current plan allows.
        pub max_devices: u32,
    }

    /// `GET /v1/regions`.
    #[derive(Debug, Serialize)]
    pub struct RegionList {
        pub regions: Vec<RegionSummary>,
    }

    /// A VPN region as clients see it.
    #[derive(Debug, Serialize)]
    pub struct RegionSummary {
        pub id: String,
        pub name: String,
        /// ISO 3166-1 alpha-2.
        pub country: String,
        pub latitude: f64,
        pub longitude: f64,
        pub tier: Tier,
        /// For new connections: `up` takes them; `draining` keeps its tunnels
        /// and takes no new ones (the operator's choice, or a region whose
        /// admission rate is 0 or whose servers have no capacity); `down`.
        pub health: Health,
        /// Reported load of the region's servers, weighted by capacity (0 to 1).
        pub load: f32,
    }

    /// `POST /v1/connect`: where to connect.
    #[derive(Debug, Serialize)]
    pub struct Assignment {
        /// The region chosen.
        pub region: String,
        pub server: AssignedServer,
        /// The device's tunnel IPv4 address.
        pub ipv4_address: String,
        /// The device's tunnel IPv6 address.
        pub ipv6_address: String,
        /// A short-lived EdDSA-signed JWT the VPN server verifies offline.
        pub ticket: String,
        /// Seconds the ticket stays valid.
        pub ticket_expires_in: i64,
        /// Regions to try next: those with room first, then full ones, each
        /// part nearest first.
        pub failover: Vec<String>,
    }

    /// The server a client is assigned.
    #[derive(Debug, Serialize)]
    pub struct AssignedServer {
        pub id: String,
        /// `host:port` of the WireGuard endpoint.
        pub endpoint: String,
        /// The server's WireGuard public key.
        pub public_key: String,
    }

    /// `POST /v1/webhooks/stripe`: the delivery was received.
    #[derive(Debug, Serialize)]
    pub struct WebhookAck {
        /// Always true.
        pub received: bool,
        /// Whether the event changed a subscription.
        pub applied: bool,
        /// Whether this event had been received before.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub duplicate: Option<bool>,
    }

    /// A region's operational state after an admin change.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct RegionState {
        pub id: String,
        /// What clients are steered by: the worse of `reported_health` and
        /// `operator_health`.
        pub health: Health,
        /// The last monitor's report (`down` once reports stop for 3 minutes);
        /// `up` if never reported.
        pub reported_health: Health,
        /// The operator's restriction (`draining` or `down`); null if none.
        pub operator_health: Option<Health>,
        pub admission_rate: u32,
        /// When a monitor last reported (unix seconds); null if never.
        pub health_reported_at: Option<i64>,
        /// The ids in a health report's `servers` that are not servers of
        /// this region (left out of the answer when there are none): their
        /// loads were ignored, the rest of the report recorded.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub unknown_servers: Vec<String>,
    }

    /// `GET /v1/admin/servers`.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct ServerList {
        pub servers: Vec<ServerState>,
    }

    /// A VPN server as operators see it.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct ServerState {
        pub id: String,
        pub region_id: String,
        /// `host:port`.
        pub endpoint: String,
        pub public_key: String,
        pub capacity: u32,
        pub enabled: bool,
        /// Reported load (0 to 1).
        pub load: f64,
        /// Full: no new devices while another server of the region has
        /// room. From a reported load of 0.95 until one below 0.90, or until
        /// no report has confirmed it for 3 minutes.
        pub full: bool,
    }
}

/// The most servers one health report may give the load of.
pub const MAX_REPORTED_SERVERS: usize = 100;

/// Whether `id` has the shape of a server id (the `servers` table's check):
/// a lower-case ASCII letter, then 1 to 63 lower-case letters, digits or
/// hyphens.
pub fn is_server_id(id: &str) -> bool {
    is_catalogue_id(id, 64)
}

/// Whether `id` has the shape of a catalogue id of at most `max` bytes (the
/// `regions` and `servers` tables' checks): a lower-case ASCII letter, then
/// lower-case letters, digits or hyphens, 2 bytes at least.
pub fn is_catalogue_id(id: &str, max: usize) -> bool {
    let b = id.as_bytes();
    (2..=max).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A server's load from a JSON number: 0 to 1; `None` for anything else.
pub fn unit_load(n: &serde_json::Number) -> Option<f32> {
    n.as_f64()
        .filter(|l| (0.0..=1.0).contains(l))
        .map(|l| l as f32)
}

/// The most reconnects per second a region may be set to admit.
pub const MAX_ADMISSION_RATE: u32 = 1_000_000;

/// An admission rate from a JSON number: a whole number from 0 to
/// [`MAX_ADMISSION_RATE`], which JSON may spell with a fraction (`5.0`), as
/// JSON Schema's `integer` admits; `None` for anything else.
pub fn whole_rate(n: &serde_json::Number) -> Option<u32> {
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX))
                .map(|f| f as u64)
        })
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v <= MAX_ADMISSION_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body's rate: `Err` if it is not JSON of the type, `Ok(Some(None))`
    /// if it is a number but no rate.
    fn rate(json: &str) -> Result<Option<Option<u32>>, String> {
        serde_json::from_str::<SetRegion>(json)
            .map(|b| b.admission_rate.as_ref().map(whole_rate))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn admission_rate_takes_whole_numbers_in_either_spelling_up_to_the_maximum() {
        assert_eq!(rate(r#"{"admission_rate": 20}"#), Ok(Some(Some(20))));
        assert_eq!(
            rate(r#"{"admission_rate": 362880.0}"#),
            Ok(Some(Some(362_880)))
        );
        assert_eq!(
            rate(r#"{"admission_rate": 1000000}"#),
            Ok(Some(Some(MAX_ADMISSION_RATE)))
        );
        assert_eq!(rate(r#"{"admission_rate": null}"#), Ok(None));
        assert_eq!(rate(r#"{}"#), Ok(None));
        // Numbers, but no rate: refused by name (422), not as malformed JSON.
        for bad in ["20.5", "-1", "-1.0", "1000001", "4294967296", "1e300"] {
            assert_eq!(
                rate(&format!(r#"{{"admission_rate": {bad}}}"#)),
                Ok(Some(None)),
                "{bad}"
            );
        }
        // Not a number at all: malformed.
        assert!(rate(r#"{"admission_rate": "20"}"#).is_err());
    }

    #[test]
    fn a_reported_load_is_a_number_from_0_to_1_and_ids_have_the_server_shape() {
        let load = |json: &str| {
            serde_json::from_str::<ServerLoad>(&format!(r#"{{"id": "s1", "load": {json}}}"#))
                .map(|s| unit_load(&s.load))
                .map_err(|e| e.to_string())
        };
        assert_eq!(load("0"), Ok(Some(0.0)));
        assert_eq!(load("0.95"), Ok(Some(0.95)));
        assert_eq!(load("1.0"), Ok(Some(1.0)));
        for bad in ["-0.01", "1.0000001", "2", "1e300"] {
            assert_eq!(load(bad), Ok(None), "{bad}");
        }
        assert!(load(r#""0.5""#).is_err());
        for good in ["eu-west-1", "ab", &format!("a{}", "b".repeat(63))] {
            assert!(is_server_id(good), "{good}");
        }
        for bad in [
            "",
            "a",
            "1a",
            "-a",
            "Eu-west-1",
            "eu_west",
            "eu-wést",
            &format!("a{}", "b".repeat(64)),
        ] {
            assert!(!is_server_id(bad), "{bad}");
        }
    }
}
