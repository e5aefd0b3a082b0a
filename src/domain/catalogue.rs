//! The region catalogue: every VPN region with its servers, as one snapshot.
//!
//! PostgreSQL is its source of truth; a cron trigger (and, later, every admin
//! change) republishes it to KV, from where every edge reads it without touching
//! the database. The snapshot carries a content hash so readers can serve
//! `ETag`/304 and the publisher can skip writes that would change nothing.

use serde::{Deserialize, Serialize};

/// The KV key the current snapshot is stored under. Versioned so a format
/// change can be rolled out next to the old one.
pub const KV_KEY: &str = "catalogue/v1";

/// The KV key holding the etag of the snapshot under [`KV_KEY`], written
/// after it: a reader can tell whether its copy is current without reading
/// (and parsing) the whole snapshot again. When the two disagree for a
/// moment (KV propagates each key on its own) a reader at worst reads the
/// snapshot once more, or keeps its copy until the new etag arrives.
pub const ETAG_KV_KEY: &str = "catalogue/v1/etag";

#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Free,
    Premium,
}

#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Up,
    Draining,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub hostname: String,
    pub port: u16,
    pub public_key: String,
    pub capacity: u32,
    pub load: f32,
    /// Whether the server is full ([`crate::domain::placement`]): it takes
    /// no new devices while another server of its region has room. Set at
    /// a reported load of [`FULL_LOAD`](crate::domain::placement::FULL_LOAD),
    /// cleared below [`ROOM_LOAD`](crate::domain::placement::ROOM_LOAD), and
    /// lapsed when no report has confirmed it for 3 minutes. (Absent from
    /// snapshots published before it: not full.)
    #[serde(default)]
    pub full: bool,
}

impl Server {
    /// The WireGuard endpoint, `host:port`; an IPv6 address in brackets
    /// (`[2001:db8::1]:51820`), or the port could not be told from it.
    pub fn endpoint(&self) -> String {
        if self.hostname.contains(':') {
            format!("[{}]:{}", self.hostname, self.port)
        } else {
            format!("{}:{}", self.hostname, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub id: String,
    pub name: String,
    pub country: String,
    pub latitude: f64,
    pub longitude: f64,
    pub tier: Tier,
    pub health: Health,
    pub admission_rate: u32,
    pub servers: Vec<Server>,
}

/// A whole catalogue, regions sorted by id, servers by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Content hash of `regions` (hex); stable for equal content.
    pub etag: String,
    pub regions: Vec<Region>,
}

impl Snapshot {
    /// Builds a snapshot, normalising the order so equal content hashes equally.
    pub fn new(mut regions: Vec<Region>) -> Snapshot {
        regions.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        for r in &mut regions {
            r.servers.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        }
        let bytes = serde_json::to_vec(&regions).unwrap_or_default();
        Snapshot {
            etag: format!("{:016x}", fnv1a64(&bytes)),
            regions,
        }
    }
}

/// FNV-1a, 64 bit: a change detector for cache validation, not a security hash.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_ipv6_endpoint_has_its_address_in_brackets() {
        let server = |hostname: &str| super::Server {
            id: "s".into(),
            hostname: hostname.into(),
            port: 51820,
            public_key: String::new(),
            capacity: 1,
            load: 0.0,
            full: false,
        };
        assert_eq!(
            server("fra-1.vpn.example").endpoint(),
            "fra-1.vpn.example:51820"
        );
        assert_eq!(server("192.0.2.7").endpoint(), "192.0.2.7:51820");
        assert_eq!(server("2001:db8::1").endpoint(), "[2001:db8::1]:51820");
    }

    use super::*;

    fn region(id: &str, servers: &[&str]) -> Region {
        Region {
            id: id.into(),
            name: id.into(),
            country: "DE".into(),
            latitude: 50.0,
            longitude: 8.0,
            tier: Tier::Free,
            health: Health::Up,
            admission_rate: 100,
            servers: servers
                .iter()
                .map(|s| Server {
                    id: (*s).into(),
                    hostname: format!("{s}.example"),
                    port: 51820,
                    public_key: "k".into(),
                    capacity: 10,
                    load: 0.0,
                    full: false,
                })
                .collect(),
        }
    }

    #[test]
    fn order_does_not_change_the_etag() {
        let a = Snapshot::new(vec![region("b", &["b-2", "b-1"]), region("a", &["a-1"])]);
        let b = Snapshot::new(vec![region("a", &["a-1"]), region("b", &["b-1", "b-2"])]);
        assert_eq!(a, b);
        assert_eq!(a.regions[0].id, "a");
        assert_eq!(a.regions[1].servers[0].id, "b-1");
    }

    #[test]
    fn any_content_change_changes_the_etag() {
        let base = Snapshot::new(vec![region("a", &["a-1"])]);
        let mut down = region("a", &["a-1"]);
        down.health = Health::Down;
        assert_ne!(base.etag, Snapshot::new(vec![down]).etag);
        assert_ne!(
            base.etag,
            Snapshot::new(vec![region("a", &["a-1", "a-2"])]).etag
        );
        assert_eq!(base.etag.len(), 16);
    }

    #[test]
    fn health_and_tier_use_the_api_spelling() {
        assert_eq!(serde_json::to_value(Health::Draining).unwrap(), "draining");
        assert_eq!(serde_json::to_value(Tier::Premium).unwrap(), "premium");
        assert!(serde_json::from_str::<Health>("\"sideways\"").is_err());
    }
}
