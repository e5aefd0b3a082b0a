//! Placement: which region, and which server in it, a connecting client gets.
//!
//! When a VPN region dies, every client in it reconnects within the same
//! minute, so these decisions run hundreds of thousands of times a minute on
//! `POST /v1/connect`. They are pure functions of the catalogue snapshot (read
//! from KV), the entitlement (carried in the access token) and the request:
//! no I/O, no clock, no randomness. A [`Placer`] works out once per snapshot
//! what placement needs of each region (eligibility apart from the plan, tier,
//! position as a unit vector); a choice is then two linear passes over those
//! compact records with no trigonometry, a haversine for each of the handful of
//! regions that can make the list, and one pass over a region's servers.
//!
//! # Regions
//!
//! A region is *eligible* for a client when the entitlement allows its tier,
//! its health is `Up`, and it has at least one server with capacity, and the
//! caller has not excluded it (because its admission gate just refused the
//! client). It *has room* when one of those servers is not full (see
//! Servers below). [`choose`] picks, among the eligible regions with room (or,
//! when none has room, among all eligible ones):
//!
//! 1. the requested region, if the client asked for one and it is eligible.
//!    An unknown id or a tier outside the plan is an error, since the client
//!    asked for something it cannot have; a region that is down, empty or
//!    excluded is *not* an error: during an outage clients keep asking for
//!    their favourite region, and failing them would only make them retry.
//!    They are steered like clients that asked for nothing. A requested
//!    region without room is still given: the client chose it by name;
//! 2. otherwise the eligible region nearest the client, by great-circle
//!    distance from its coordinates or, failing those, its country's centroid
//!    ([`geo::country_centroid`]); equal distances go to the smaller region id
//!    so the answer never depends on the snapshot's order;
//! 3. with no position at all: an eligible region in the client's country
//!    (smallest id), else [`DEFAULT_REGION`], else the eligible region with the
//!    smallest id.
//!
//! Alongside it comes a failover list: up to [`MAX_FAILOVER`] other eligible
//! regions, those with room first, each part nearest the client first
//! (nearest the chosen region when the client's position is unknown), so a
//! client whose tunnel fails can move on without another round trip.
//!
//! Room is what spreads a regional outage: the dropped region's clients all
//! go to the nearest region, each region's admission gate paces them, and
//! once that region's servers report themselves full, the next clients go to
//! the region after it instead of piling onto full servers.
//!
//! # Servers
//!
//! [`choose_server`] uses weighted rendezvous hashing (highest random weight):
//! every (device, server) pair gets a pseudo-random score from a stable hash,
//! scaled by the server's capacity, and the device takes the highest. So a
//! device lands on the same server on every reconnect while that server
//! stays (whatever the server holds for it stays useful, and a surge does not
//! reshuffle everyone); removing a server moves only the devices that were on
//! it, and adding one takes only the devices that now score highest on it.
//! With the score `-capacity / ln(u)` for `u` uniform in (0, 1), each server
//! wins with probability exactly proportional to its capacity: `-ln(u) /
//! capacity` is an exponential clock ticking at rate `capacity`, and the
//! device goes to the clock that rings first.
//!
//! A server is *full* from a reported load of [`FULL_LOAD`] until its load
//! falls below [`ROOM_LOAD`] (the catalogue carries the flag, worked out as
//! the reports arrive; two marks, so that a load hovering around one does
//! not turn the server full and back at every report). A full server takes
//! no new devices while another server of the region has room: the hashing
//! runs over the servers with room, so only the devices whose server filled
//! up move. When every server is full, it runs over all of them.
//!
//! The hash is [`stable_hash`]: FNV-1a 64 followed by MurmurHash3's `fmix64`
//! finalizer. Both are fixed, public algorithms on bytes, so every platform and
//! every release computes the same assignment (std's `DefaultHasher` promises
//! neither). The finalizer matters: plain FNV-1a of inputs differing only in
//! their last byte (`eu-central-1`, `eu-central-2`, ...) differ only slightly
//! in their high bits, which would make the servers' scores correlated and
//! the distribution lopsided.
//!
//! Every connect hashes the device against every server of its region, so
//! that pass is the part of a connect that grows with the fleet. It hashes
//! each server once, but takes the logarithm (the costly step in wasm) only
//! for a server that leads its capacity so far: about ln(n) of n servers in
//! random order. The choice is the one scoring every server would make
//! (see `highest`).

use super::catalogue::{Health, Region, Server, Snapshot, Tier};
use super::entitlement::Entitlement;
use super::geo::{self, Point};
use std::cmp::Ordering;
use std::fmt;

/// The region used when nothing better is known about the client (if it is
/// eligible; otherwise the eligible region with the smallest id).
pub const DEFAULT_REGION: &str = "eu-central";

/// The longest failover list [`choose`] returns.
pub const MAX_FAILOVER: usize = 5;

/// How many regions whose admission gates refuse it as closed a connect
/// steers past, each to the next region placement chooses without them: a
/// connect asks at most one gate more than this, and answers `region_closed`
/// if that one refuses too (`no_region_available` if no region is left).
/// The Worker also stops once its gates have taken 2 s. (On the outage day
/// such gates answer from the isolate's memory of their refusal, without a
/// call, for all but one connect a second.)
pub const MAX_CLOSED_STEPS: usize = 2;

/// The reported load (a server's share of its capacity in use, 0 to 1) at
/// which a server becomes full: it takes no new devices while another
/// server has room, and a region whose servers are all full is left out of
/// automatic choices while another region has room.
pub const FULL_LOAD: f32 = 0.95;

/// The reported load below which a full server has room again.
pub const ROOM_LOAD: f32 = 0.90;

/// Whether a server takes new devices before any full one: it has capacity
/// and is not full.
fn has_room(server: &Server) -> bool {
    server.capacity > 0 && !server.full
}

/// How many regions a client may ask placement to avoid, and the longest id
/// it may name, in characters (`POST /v1/connect`'s `avoid`).
pub const MAX_AVOID: usize = 8;
pub const MAX_AVOID_ID_CHARS: usize = 64;

/// Checks a connect's `avoid` list: at most [`MAX_AVOID`] ids of 1 to
/// [`MAX_AVOID_ID_CHARS`] characters (as the contract's `maxLength` counts
/// them, not bytes). Ids not in the catalogue are not an error (a
/// region can leave it between an app's attempts).
pub fn check_avoid(avoid: &[String]) -> Result<(), super::account::Invalid> {
    let bad = |reason| super::account::Invalid {
        field: "avoid",
        reason,
    };
    if avoid.len() > MAX_AVOID {
        return Err(bad("lists more than 8 regions"));
    }
    if avoid
        .iter()
        .any(|id| id.is_empty() || id.chars().count() > MAX_AVOID_ID_CHARS)
    {
        return Err(bad("has an id that is empty or longer than 64 characters"));
    }
    Ok(())
}

/// Where the client is, best evidence first.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientLocation {
    /// Coordinates (from the request's geolocation).
    Coordinates(Point),
    /// Only a country (ISO 3166-1 alpha-2).
    Country(String),
    /// Nothing at all.
    Unknown,
}

/// A placement: the region, then where to go if it fails.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice<'a> {
    pub region: &'a Region,
    /// The rate the region admits new clients at ([`admitting_rate`]),
    /// worked out once per catalogue.
    pub admitting_rate: u32,
    /// Other eligible region ids, at most [`MAX_FAILOVER`]: those with room
    /// first, then full ones, each part nearest first.
    pub failover: Vec<&'a str>,
}

/// Why no region could be chosen. Each maps to a stable machine-readable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementError {
    /// No region is eligible (all down, empty, excluded or outside the plan;
    /// a region without room is eligible).
    NoEligibleRegion,
    /// The requested region exists but the plan does not include its tier.
    RegionNotAllowed,
    /// The requested region id is not in the catalogue.
    UnknownRegion,
}

impl PlacementError {
    pub fn code(&self) -> &'static str {
        match self {
            PlacementError::NoEligibleRegion => "no_region_available",
            PlacementError::RegionNotAllowed => "region_not_allowed",
            PlacementError::UnknownRegion => "region_not_found",
        }
    }
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for PlacementError {}

/// A snapshot together with what placement needs of each region, worked out
/// once: whether it could take anyone at all, whether it has room, its tier,
/// and its position as a unit vector. With a thousand regions, [`choose`] spent most of a connect's
/// own work reading whole `Region`s and computing a haversine for each; a
/// `Placer` answers the same questions from 32 bytes per region and computes
/// a haversine only for the handful of regions that can make the list.
///
/// Build one per snapshot (the Worker keeps it with its cached snapshot).
#[derive(Debug)]
pub struct Placer {
    snapshot: Snapshot,
    sites: Vec<Site>,
    closed: Vec<usize>,
}

/// A region as [`Placer`] sees it.
#[derive(Debug, Clone, Copy)]
struct Site {
    /// Health `Up` and at least one server with capacity.
    usable: bool,
    /// A server with room ([`has_room`]).
    room: bool,
    /// [`admitting_rate`].
    admitting_rate: u32,
    tier: Tier,
    /// [`geo::unit_vector`] of its position; `None` when the catalogue's
    /// coordinates are invalid.
    unit: Option<[f64; 3]>,
}

impl Site {
    fn of(region: &Region) -> Site {
        Site {
            usable: region.health == Health::Up && has_capacity(region),
            room: region.servers.iter().any(has_room),
            admitting_rate: admitting_rate(region),
            tier: region.tier,
            unit: position(region).map(geo::unit_vector),
        }
    }
}

impl Placer {
    pub fn new(snapshot: Snapshot) -> Placer {
        let sites = snapshot.regions.iter().map(Site::of).collect();
        let closed = (0..snapshot.regions.len())
            .filter(|&i| snapshot.regions[i].admission_rate == 0)
            .collect();
        Placer {
            snapshot,
            sites,
            closed,
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The ids of the regions whose admission rate is 0: they admit no one.
    pub fn closed(&self) -> impl Iterator<Item = &str> {
        self.closed
            .iter()
            .map(|&i| self.snapshot.regions[i].id.as_str())
    }

    /// [`Placer::choose`] leaving out the regions that admit no one
    /// ([`Placer::closed`]) and those the client asks to `avoid` (it could not
    /// reach them a moment ago: in an outage, before the edge's copy of the
    /// catalogue says so). Should that leave no eligible region, the avoided
    /// ones are let back in: a region the client failed to reach is still
    /// better than none, though a full one it can reach comes first.
    ///
    /// `refused` are regions whose admission gates have just refused the
    /// client as closed (the edge's copy of the catalogue still lists them
    /// up): left out like the closed ones, and never let back in.
    pub fn choose_avoiding(
        &self,
        ent: &Entitlement,
        location: &ClientLocation,
        requested: Option<&str>,
        avoid: &[String],
        refused: &[&str],
    ) -> Result<Choice<'_>, PlacementError> {
        let mut exclude: Vec<&str> = self.closed().collect();
        exclude.extend_from_slice(refused);
        let closed = exclude.len();
        exclude.extend(avoid.iter().map(String::as_str));
        match self.choose(ent, location, requested, &exclude) {
            Err(PlacementError::NoEligibleRegion) if exclude.len() > closed => {
                self.choose(ent, location, requested, &exclude[..closed])
            }
            chosen => chosen,
        }
    }

    /// [`choose`], from the precomputed sites.
    pub fn choose(
        &self,
        ent: &Entitlement,
        location: &ClientLocation,
        requested: Option<&str>,
        exclude: &[&str],
    ) -> Result<Choice<'_>, PlacementError> {
        choose_from(
            &self.snapshot,
            &self.sites,
            ent,
            location,
            requested,
            exclude,
        )
    }
}

/// Chooses the region for a client (see the module docs for the rules).
///
/// Eligible = allowed by the entitlement's tiers, health `Up`, at least one
/// server with capacity > 0, and not in `exclude`; of those, the ones with
/// room are chosen from while there are any. `exclude` lets the caller drop
/// regions whose admission gate just refused the client and ask again.
///
/// This works out what placement needs of each region for the one call; to place many
/// clients in the same snapshot, use a [`Placer`].
pub fn choose<'a>(
    snapshot: &'a Snapshot,
    ent: &Entitlement,
    location: &ClientLocation,
    requested: Option<&str>,
    exclude: &[&str],
) -> Result<Choice<'a>, PlacementError> {
    let sites: Vec<Site> = snapshot.regions.iter().map(Site::of).collect();
    choose_from(snapshot, &sites, ent, location, requested, exclude)
}

fn choose_from<'a>(
    snapshot: &'a Snapshot,
    sites: &[Site],
    ent: &Entitlement,
    location: &ClientLocation,
    requested: Option<&str>,
    exclude: &[&str],
) -> Result<Choice<'a>, PlacementError> {
    let regions = &snapshot.regions;
    let allowed = |i: usize| {
        let site = &sites[i];
        site.usable
            && ent.allows_tier(site.tier)
            && (exclude.is_empty() || !exclude.contains(&regions[i].id.as_str()))
    };
    // Regions with room, unless none has: then all of them. (In a healthy
    // fleet the first region or so has room, so this is a short look.)
    let full_ok = !(0..sites.len()).any(|i| sites[i].room && allowed(i));
    let eligible = |i: usize| (full_ok || sites[i].room) && allowed(i);
    let client = match location {
        ClientLocation::Coordinates(p) => Some(*p),
        ClientLocation::Country(code) => geo::country_centroid(code),
        ClientLocation::Unknown => None,
    };

    let requested = match requested {
        None => None,
        Some(id) => {
            let i = regions
                .iter()
                .position(|r| r.id == id)
                .ok_or(PlacementError::UnknownRegion)?;
            if !ent.allows_tier(regions[i].tier) {
                return Err(PlacementError::RegionNotAllowed);
            }
            // Allowed but down, empty or excluded: steer, don't fail. Full
            // is no reason to steer: the client chose this region.
            Some(i).filter(|&i| allowed(i))
        }
    };

    let near = |from: Option<Point>, skip: Option<usize>, count: usize| {
        nearest(regions, sites, &eligible, from, skip, count)
    };
    let (region, mut failover, from) = match (requested, client) {
        (None, Some(at)) => {
            // The nearest eligible region, and the ones after it.
            let mut ranked = near(Some(at), None, MAX_FAILOVER + 1).into_iter();
            let region = ranked.next().ok_or(PlacementError::NoEligibleRegion)?;
            (region, ranked.collect::<Vec<_>>(), Some(at))
        }
        (requested, _) => {
            let region = match requested {
                Some(i) => i,
                None => {
                    let country = match location {
                        ClientLocation::Country(code) => Some(code.as_str()),
                        _ => None,
                    };
                    without_position(regions, country, &eligible)
                        .ok_or(PlacementError::NoEligibleRegion)?
                }
            };
            // Without the client's position, the chosen region is the best
            // guess of where the client is (or at least of where its traffic
            // goes).
            let from = client.or_else(|| position(&regions[region]));
            (region, near(from, Some(region), MAX_FAILOVER), from)
        }
    };
    // Fewer regions with room than the list holds: the full ones follow,
    // nearest first. A client refused or cut off still has somewhere to go.
    if !full_ok && failover.len() < MAX_FAILOVER {
        let full = |i: usize| !sites[i].room && allowed(i);
        let more = MAX_FAILOVER - failover.len();
        failover.extend(nearest(regions, sites, &full, from, Some(region), more));
    }
    Ok(Choice {
        region: &regions[region],
        admitting_rate: sites[region].admitting_rate,
        failover: failover
            .into_iter()
            .map(|i| regions[i].id.as_str())
            .collect(),
    })
}

/// A region's position, if its catalogue coordinates are valid.
fn position(region: &Region) -> Option<Point> {
    Point::new(region.latitude, region.longitude)
}

/// How far apart (in [`geo::chord2`]) two regions' chords may be and still
/// be ranked either way by the haversine. The two measures of one pair
/// differ by at most about 1e-14 (a unit test in `geo` checks it); this
/// margin is five orders of magnitude wider, and corresponds to a few
/// centimetres on the ground.
const CHORD_MARGIN: f64 = 1e-9;

/// The `count` eligible regions nearest `from` (other than `skip`), nearest
/// first, equal distances by id, regions without a valid position (or all,
/// when `from` is `None`) last: the order of (haversine distance, id).
///
/// The haversine itself is computed only for the regions that can be in
/// the answer. A first pass computes each eligible region's chord and finds
/// the `count`-th smallest; any region whose chord exceeds it by more than
/// [`CHORD_MARGIN`] is farther, by the haversine too, than `count` others,
/// so the second pass ranks only the rest (usually exactly `count`) by the
/// haversine. The answer is the same, bit for bit, as ranking every region.
fn nearest(
    regions: &[Region],
    sites: &[Site],
    eligible: &impl Fn(usize) -> bool,
    from: Option<Point>,
    skip: Option<usize>,
    count: usize,
) -> Vec<usize> {
    let from_unit = from.map(geo::unit_vector);
    let mut chords: Vec<(f64, usize)> = Vec::with_capacity(sites.len());
    let mut shortest: Vec<f64> = Vec::with_capacity(count + 1);
    for (i, site) in sites.iter().enumerate() {
        if Some(i) == skip || !eligible(i) {
            continue;
        }
        let chord = match (&from_unit, &site.unit) {
            (Some(a), Some(b)) => geo::chord2(a, b),
            _ => f64::INFINITY,
        };
        chords.push((chord, i));
        keep_least(&mut shortest, chord, count, f64::total_cmp);
    }
    let bound = match count.checked_sub(1).and_then(|k| shortest.get(k)) {
        Some(&chord) => chord + CHORD_MARGIN,
        None => f64::INFINITY,
    };

    let origin = from.map(geo::Origin::new);
    let mut ranked: Vec<(f64, usize)> = Vec::with_capacity(count + 1);
    for &(_, i) in chords.iter().filter(|&&(chord, _)| chord <= bound) {
        let d = match (&origin, position(&regions[i])) {
            (Some(o), Some(p)) => o.distance_km(p),
            _ => f64::INFINITY,
        };
        keep_least(&mut ranked, (d, i), count, |a, b| {
            a.0.total_cmp(&b.0)
                .then_with(|| regions[a.1].id.cmp(&regions[b.1].id))
        });
    }
    ranked.into_iter().map(|(_, i)| i).collect()
}

/// Inserts `item` into `least`, which holds the (at most `count`) least
/// items seen so far in `order`, in that order: a bounded insertion sort,
/// O(n x count) over n items at worst and one comparison for most items,
/// with no allocation beyond `count` + 1. Of equal items, either may be kept.
fn keep_least<T>(least: &mut Vec<T>, item: T, count: usize, order: impl Fn(&T, &T) -> Ordering) {
    // Most items lose to the last one kept: one comparison, no search.
    if least.len() >= count
        && least
            .last()
            .is_none_or(|last| order(&item, last) != Ordering::Less)
    {
        return;
    }
    let at = least.partition_point(|x| order(x, &item) == Ordering::Less);
    if at < count {
        least.insert(at, item);
        least.truncate(count);
    }
}

/// Rule 3 of the module docs: the client's country, the default, the
/// smallest id; each only among eligible regions.
fn without_position(
    regions: &[Region],
    country: Option<&str>,
    eligible: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let by_id = |a: &usize, b: &usize| regions[*a].id.cmp(&regions[*b].id);
    let candidates = || (0..regions.len()).filter(|&i| eligible(i));
    country
        .and_then(|c| {
            candidates()
                .filter(|&i| regions[i].country.eq_ignore_ascii_case(c))
                .min_by(by_id)
        })
        .or_else(|| candidates().find(|&i| regions[i].id == DEFAULT_REGION))
        .or_else(|| candidates().min_by(by_id))
}

/// The server in `region` for a device: weighted rendezvous hashing over the
/// servers with room, or, when none has room, over the servers with any
/// capacity (see the module docs). `None` when no server has capacity.
/// Deterministic: equal scores (vanishingly rare) go to the smaller server
/// id.
pub fn choose_server<'a>(region: &'a Region, device_id: &str) -> Option<&'a Server> {
    highest(positions(device_id, &region.servers).filter(|(_, s)| has_room(s)))
        .or_else(|| highest(positions(device_id, &region.servers)))
}

/// Each server with capacity, with its position for `device_id` (the top 52
/// bits of their hash, see [`unit_interval`]).
fn positions<'a>(
    device_id: &str,
    servers: &'a [Server],
) -> impl Iterator<Item = (u64, &'a Server)> + 'a {
    // The device's part of every server's hash is the same: hash it once.
    let device = HashPrefix::new(device_id);
    servers
        .iter()
        .filter(|s| s.capacity > 0)
        .map(move |s| (device.hash(&s.id) >> UNIT_SHIFT, s))
}

/// The server with the highest [`score`] (equal scores: the smaller id),
/// given each server's position `k` (its hash's top 52 bits).
///
/// Among servers of one capacity the score grows with `k`, so a server whose
/// `k` is below the largest seen so far for its capacity cannot win, and its
/// logarithm is not worked out: over n servers in random order about ln(n)
/// records are scored instead of n (7 of 1,000). The margin keeps this exact
/// in floating point: a server more than [`MARGIN`] below its capacity's best
/// has a `u` more than 2^-30 smaller, so its true score is smaller by a
/// relative 2^-35 or more (as `-ln u` is at most 37 here), far beyond the
/// few ulps of error in `ln` and the division; servers within the margin are
/// scored and compared as before. The result is the same as scoring every
/// server (`highest_by_scoring_all` in the tests says so).
fn highest<'a>(servers: impl Iterator<Item = (u64, &'a Server)>) -> Option<&'a Server> {
    const MARGIN: u64 = 1 << 22;
    // The largest `k` per capacity, for the first few capacities seen (a
    // catalogue has a handful); servers of any other capacity are scored.
    let mut best = [(0u32, 0u64); 8];
    let mut tracked = 0;
    let mut winner: Option<(f64, &Server)> = None;
    for (k, server) in servers {
        let slot = best[..tracked]
            .iter()
            .position(|(capacity, _)| *capacity == server.capacity);
        match slot {
            Some(i) if k.saturating_add(MARGIN) < best[i].1 => continue,
            Some(i) => best[i].1 = best[i].1.max(k),
            None if tracked < best.len() => {
                best[tracked] = (server.capacity, k);
                tracked += 1;
            }
            None => {}
        }
        let score = score(k, server.capacity);
        let wins = winner.is_none_or(|(top, leader)| {
            score
                .total_cmp(&top)
                .then_with(|| leader.id.cmp(&server.id))
                .is_ge()
        });
        if wins {
            winner = Some((score, server));
        }
    }
    winner.map(|(_, s)| s)
}

/// A server's top 52 hash bits: its position in (0, 1), see [`unit_interval`].
const UNIT_SHIFT: u32 = 12;

/// `-capacity / ln(u)` with `u` in (0, 1) from the server's position `k`:
/// positive, and larger for larger capacity. (`ln` is the one step that is
/// not bit-exact everywhere: libms may differ in the last bit. That could
/// only flip a choice between two scores equal to within one ulp, which no
/// realistic pair of hashes produces.)
fn score(k: u64, capacity: u32) -> f64 {
    -f64::from(capacity) / crate::math::ln(unit_interval(k))
}

/// Maps a position `k` (below 2^52) to (0, 1), both ends excluded (ln(0) is
/// -inf, ln(1) is 0): `k` plus one half, over 2^52. Every step is exact in f64.
fn unit_interval(k: u64) -> f64 {
    const SCALE: f64 = (1u64 << 52) as f64;
    (k as f64 + 0.5) / SCALE
}

/// The stable 64-bit hash behind every per-device decision (server choice
/// here, admission shard in `admission`): FNV-1a 64 over the bytes of `key`,
/// a 0xFF separator (never part of UTF-8, so `("ab", "c")` and `("a", "bc")`
/// differ) and the bytes of `salt`, then MurmurHash3's `fmix64` finalizer so
/// every input bit affects every output bit. Fixed forever: changing it
/// would move every device to another server.
pub fn stable_hash(key: &str, salt: &str) -> u64 {
    HashPrefix::new(key).hash(salt)
}

/// [`stable_hash`] with its `key` already hashed: FNV-1a's state after the
/// key and the separator, so one key can be hashed with many salts (a device
/// against every server of a region) without rehashing the key each time.
#[derive(Clone, Copy)]
struct HashPrefix(u64);

impl HashPrefix {
    fn new(key: &str) -> HashPrefix {
        HashPrefix(fnv1a64_from(FNV_OFFSET_BASIS, key.bytes().chain([0xff])))
    }

    fn hash(self, salt: &str) -> u64 {
        fmix64(fnv1a64_from(self.0, salt.bytes()))
    }
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

#[cfg(test)]
fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    fnv1a64_from(FNV_OFFSET_BASIS, bytes)
}

/// FNV-1a from state `h` over `bytes`.
fn fnv1a64_from(h: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .into_iter()
        .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// MurmurHash3's 64-bit finalizer (a bijection with full avalanche).
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// A region's health as `GET /v1/regions` lists it: its state for new
/// connections. One that is up but takes no one new (its admission rate is
/// 0, or none of its servers has capacity) is listed `draining`: it keeps its
/// tunnels and is not offered, as placement treats it.
pub fn listed_health(region: &Region) -> Health {
    match region.health {
        Health::Up if region.admission_rate == 0 || !has_capacity(region) => Health::Draining,
        health => health,
    }
}

fn has_capacity(region: &Region) -> bool {
    region.servers.iter().any(|s| s.capacity > 0)
}

/// The rate a region admits new clients at: its `admission_rate` times the
/// share of its capacity on servers with room, rounded up (so at least 1
/// while any server has room and the rate is not 0).
///
/// The rate is what the region's servers can take of new clients a second
/// (handshakes, key installs), and a full server takes none: with most of a
/// region's servers full, the few with room would otherwise get every client
/// the whole rate lets in, until a monitor reported them full too. With no
/// server full, or every one (the region is then used only when nothing
/// better is left, and its servers take devices regardless), it is the
/// configured rate.
pub fn admitting_rate(region: &Region) -> u32 {
    let (room, total) =
        region
            .servers
            .iter()
            .filter(|s| s.capacity > 0)
            .fold((0u64, 0u64), |(room, total), s| {
                let capacity = u64::from(s.capacity);
                (
                    room + if has_room(s) { capacity } else { 0 },
                    total + capacity,
                )
            });
    if room == 0 || room == total {
        return region.admission_rate;
    }
    // At most `admission_rate` (room < total), so it fits a u32.
    (u64::from(region.admission_rate) * room).div_ceil(total) as u32
}

/// A region's load for the catalogue API: the capacity-weighted mean of its
/// servers' load (a big server at 50% counts more than a small one at 90%).
/// 0.0 when there is no capacity to weigh by (no servers, or all at 0).
pub fn region_load(region: &Region) -> f32 {
    let (weighted, capacity) = region.servers.iter().fold((0.0, 0.0), |(w, c), s| {
        let cap = f64::from(s.capacity);
        (w + cap * f64::from(s.load), c + cap)
    });
    if capacity > 0.0 {
        (weighted / capacity) as f32
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalogue::Tier;

    use crate::domain::test_rng::Rng;

    fn server(id: &str, capacity: u32) -> Server {
        Server {
            id: id.into(),
            hostname: format!("{id}.vpn.example"),
            port: 51820,
            public_key: "k".into(),
            capacity,
            load: 0.0,
            full: false,
        }
    }

    fn region(id: &str, country: &str, lat: f64, lon: f64, tier: Tier) -> Region {
        Region {
            id: id.into(),
            name: id.into(),
            country: country.into(),
            latitude: lat,
            longitude: lon,
            tier,
            health: Health::Up,
            admission_rate: 200,
            servers: (1..=3).map(|n| server(&format!("{id}-{n}"), 100)).collect(),
        }
    }

    /// The seed catalogue (seeds/dev.sql), all up.
    fn seeds() -> Snapshot {
        Snapshot::new(vec![
            region("eu-central", "DE", 50.1109, 8.6821, Tier::Free),
            region("eu-west", "GB", 51.5074, -0.1278, Tier::Premium),
            region("us-east", "US", 39.0438, -77.4874, Tier::Free),
            region("us-west", "US", 37.3382, -121.8863, Tier::Premium),
            region("sa-east", "BR", -23.5505, -46.6333, Tier::Premium),
            region("ap-northeast", "JP", 35.6762, 139.6503, Tier::Premium),
            region("ap-southeast", "SG", 1.3521, 103.8198, Tier::Premium),
            region("af-south", "ZA", -26.2041, 28.0473, Tier::Premium),
        ])
    }

    fn set(snapshot: &mut Snapshot, id: &str, change: impl FnOnce(&mut Region)) {
        change(snapshot.regions.iter_mut().find(|r| r.id == id).unwrap());
    }

    fn entitlement(tiers: &[Tier]) -> Entitlement {
        Entitlement {
            plan: "test".into(),
            max_devices: 5,
            region_tiers: tiers.to_vec(),
            until: None,
        }
    }

    fn free() -> Entitlement {
        entitlement(&[Tier::Free])
    }

    fn plus() -> Entitlement {
        entitlement(&[Tier::Free, Tier::Premium])
    }

    fn at(lat: f64, lon: f64) -> ClientLocation {
        ClientLocation::Coordinates(Point::new(lat, lon).unwrap())
    }

    fn country(code: &str) -> ClientLocation {
        ClientLocation::Country(code.into())
    }

    const LONDON: (f64, f64) = (51.5074, -0.1278);
    const PARIS: (f64, f64) = (48.8566, 2.3522);
    const TOKYO: (f64, f64) = (35.6762, 139.6503);
    const SAO_PAULO: (f64, f64) = (-23.5505, -46.6333);
    const SEATTLE: (f64, f64) = (47.6062, -122.3321);

    fn near(city: (f64, f64)) -> ClientLocation {
        at(city.0, city.1)
    }

    /// The chosen region id, for tests that only care about that.
    fn chosen(
        s: &Snapshot,
        ent: &Entitlement,
        location: &ClientLocation,
        requested: Option<&str>,
        exclude: &[&str],
    ) -> Result<String, PlacementError> {
        choose(s, ent, location, requested, exclude).map(|c| c.region.id.clone())
    }

    #[test]
    fn the_nearest_region_is_chosen() {
        let s = seeds();
        let cases = [
            (LONDON, "eu-west"),
            (PARIS, "eu-west"),
            (TOKYO, "ap-northeast"),
            (SAO_PAULO, "sa-east"),
            (SEATTLE, "us-west"),
        ];
        for (city, expected) in cases {
            assert_eq!(
                chosen(&s, &plus(), &near(city), None, &[]).unwrap(),
                expected
            );
        }
    }

    #[test]
    fn full_regions_are_passed_over_while_another_has_room() {
        let full = |r: &mut Region| r.servers.iter_mut().for_each(|srv| srv.full = true);
        let mut s = seeds();
        // London's nearest is eu-west: full, its clients go to eu-central,
        // and eu-west is not offered as a failover either.
        set(&mut s, "eu-west", full);
        let choice = choose(&s, &plus(), &near(LONDON), None, &[]).unwrap();
        assert_eq!(choice.region.id, "eu-central");
        // eu-west, full, comes after every region with room.
        assert_eq!(choice.failover.len(), MAX_FAILOVER);
        assert!(!choice.failover.contains(&"eu-west"));
        let mut all_but_one = seeds();
        all_but_one
            .regions
            .iter_mut()
            .filter(|r| r.id != "eu-central")
            .for_each(full);
        let choice = choose(&all_but_one, &plus(), &near(LONDON), None, &[]).unwrap();
        assert_eq!(choice.region.id, "eu-central");
        assert_eq!(choice.failover.first(), Some(&"eu-west"));
        assert_eq!(choice.failover.len(), MAX_FAILOVER);
        // One server with room is room enough.
        set(&mut s, "eu-west", |r| r.servers[1].full = false);
        assert_eq!(
            chosen(&s, &plus(), &near(LONDON), None, &[]).unwrap(),
            "eu-west"
        );
        // Asked for by name, a full region is still given.
        set(&mut s, "eu-west", full);
        assert_eq!(
            chosen(&s, &plus(), &near(LONDON), Some("eu-west"), &[]).unwrap(),
            "eu-west"
        );
        // With every region full, the nearest is chosen as if none were,
        // and the failover list names the full ones.
        let mut s = seeds();
        s.regions.iter_mut().for_each(full);
        let choice = choose(&s, &plus(), &near(LONDON), None, &[]).unwrap();
        let unloaded = seeds();
        let expected = choose(&unloaded, &plus(), &near(LONDON), None, &[]).unwrap();
        assert_eq!(choice.region.id, expected.region.id);
        assert_eq!(choice.failover, expected.failover);
        // A full region the client can reach comes before one it avoids.
        let mut s = seeds();
        s.regions
            .iter_mut()
            .filter(|r| r.id != "eu-west")
            .for_each(full);
        let placer = Placer::new(s);
        let avoid = ["eu-west".to_owned()];
        let choice = placer
            .choose_avoiding(&plus(), &near(LONDON), None, &avoid, &[])
            .unwrap();
        assert_eq!(choice.region.id, "eu-central");
    }

    #[test]
    fn premium_regions_are_never_chosen_for_a_free_entitlement() {
        let s = seeds();
        for city in [LONDON, PARIS, TOKYO, SAO_PAULO, SEATTLE] {
            let choice = choose(&s, &free(), &near(city), None, &[]).unwrap();
            assert_eq!(choice.region.tier, Tier::Free);
            assert_eq!(choice.failover.len(), 1);
        }
        assert_eq!(
            chosen(&s, &free(), &near(LONDON), None, &[]).unwrap(),
            "eu-central"
        );
        assert_eq!(
            chosen(&s, &free(), &near(SEATTLE), None, &[]).unwrap(),
            "us-east"
        );
    }

    #[test]
    fn down_draining_and_empty_regions_are_never_chosen() {
        let mut s = seeds();
        set(&mut s, "eu-west", |r| r.health = Health::Down);
        assert_eq!(
            chosen(&s, &plus(), &near(LONDON), None, &[]).unwrap(),
            "eu-central"
        );
        set(&mut s, "eu-central", |r| r.health = Health::Draining);
        let choice = choose(&s, &plus(), &near(LONDON), None, &[]).unwrap();
        assert_eq!(choice.region.id, "us-east");
        assert!(!choice.failover.contains(&"eu-west") && !choice.failover.contains(&"eu-central"));

        // Up, but no server that can take anyone.
        let mut s = seeds();
        set(&mut s, "eu-west", |r| r.servers.clear());
        set(&mut s, "eu-central", |r| {
            r.servers.iter_mut().for_each(|srv| srv.capacity = 0)
        });
        assert_eq!(
            chosen(&s, &plus(), &near(LONDON), None, &[]).unwrap(),
            "us-east"
        );
    }

    #[test]
    fn a_requested_region_is_honoured_when_allowed_and_up() {
        let s = seeds();
        let choice = choose(&s, &plus(), &near(LONDON), Some("ap-northeast"), &[]).unwrap();
        assert_eq!(choice.region.id, "ap-northeast");
        // Failover still means "nearest the client": a Londoner whose Tokyo
        // tunnel fails is better served from London than from Singapore.
        assert_eq!(choice.failover[..2], ["eu-west", "eu-central"]);
        assert!(!choice.failover.contains(&"ap-northeast"));
        assert_eq!(
            chosen(&s, &free(), &near(TOKYO), Some("us-east"), &[]).unwrap(),
            "us-east"
        );
    }

    #[test]
    fn a_requested_region_that_is_down_steers_to_the_nearest_eligible() {
        let mut s = seeds();
        set(&mut s, "ap-northeast", |r| r.health = Health::Down);
        let choice = choose(&s, &plus(), &near(LONDON), Some("ap-northeast"), &[]).unwrap();
        assert_eq!(choice.region.id, "eu-west");
        assert!(!choice.failover.contains(&"ap-northeast"));
        // Empty counts as down.
        set(&mut s, "us-east", |r| r.servers.clear());
        assert_eq!(
            chosen(&s, &free(), &near(SEATTLE), Some("us-east"), &[]).unwrap(),
            "eu-central"
        );
    }

    #[test]
    fn a_requested_region_outside_the_plan_is_refused_even_when_down() {
        let mut s = seeds();
        let err = choose(&s, &free(), &near(LONDON), Some("eu-west"), &[]).unwrap_err();
        assert_eq!(err, PlacementError::RegionNotAllowed);
        set(&mut s, "eu-west", |r| r.health = Health::Down);
        let err = choose(&s, &free(), &near(LONDON), Some("eu-west"), &[]).unwrap_err();
        assert_eq!(err, PlacementError::RegionNotAllowed);
    }

    #[test]
    fn an_unknown_requested_region_is_refused() {
        let s = seeds();
        for id in ["mars-north", "", "EU-CENTRAL"] {
            let err = choose(&s, &plus(), &near(LONDON), Some(id), &[]).unwrap_err();
            assert_eq!(err, PlacementError::UnknownRegion, "{id:?}");
        }
    }

    #[test]
    fn excluded_regions_are_skipped_and_left_out_of_the_failover_list() {
        let s = seeds();
        let choice = choose(&s, &plus(), &near(LONDON), None, &["eu-west"]).unwrap();
        assert_eq!(choice.region.id, "eu-central");
        assert!(!choice.failover.contains(&"eu-west"));
        // Asking for a region that was just found full steers like a dead one.
        let choice = choose(&s, &plus(), &near(LONDON), Some("eu-west"), &["eu-west"]).unwrap();
        assert_eq!(choice.region.id, "eu-central");
        // Excluding everything eligible leaves nothing.
        let err = choose(&s, &free(), &near(LONDON), None, &["eu-central", "us-east"]);
        assert_eq!(err.unwrap_err(), PlacementError::NoEligibleRegion);
    }

    #[test]
    fn the_failover_list_is_nearest_first_eligible_and_at_most_five() {
        let mut s = seeds();
        let choice = choose(&s, &plus(), &near(LONDON), None, &[]).unwrap();
        assert_eq!(choice.region.id, "eu-west");
        // From London: 638, 5,920, 8,630, 9,070, 9,500 km; ap-northeast
        // (9,560) and ap-southeast (10,850) do not make the list.
        assert_eq!(
            choice.failover,
            ["eu-central", "us-east", "us-west", "af-south", "sa-east"]
        );
        set(&mut s, "us-east", |r| r.health = Health::Draining);
        let choice = choose(&s, &plus(), &near(LONDON), None, &["af-south"]).unwrap();
        assert_eq!(
            choice.failover,
            [
                "eu-central",
                "us-west",
                "sa-east",
                "ap-northeast",
                "ap-southeast"
            ]
        );
        // Fewer eligible regions than the limit: all of them.
        let choice = choose(&s, &free(), &near(LONDON), None, &[]).unwrap();
        assert_eq!(choice.failover, Vec::<&str>::new());
    }

    #[test]
    fn equal_distances_are_broken_by_region_id() {
        let s = Snapshot::new(vec![
            region("b", "DE", 50.0, 8.0, Tier::Free),
            region("c", "DE", 50.0, 8.0, Tier::Free),
            region("a", "DE", 50.0, 8.0, Tier::Free),
        ]);
        let mut reversed = s.clone();
        reversed.regions.reverse();
        for snap in [&s, &reversed] {
            let choice = choose(snap, &free(), &at(10.0, 10.0), None, &[]).unwrap();
            assert_eq!(choice.region.id, "a");
            assert_eq!(choice.failover, ["b", "c"]);
        }
    }

    #[test]
    fn a_country_without_coordinates_is_placed_from_its_centroid() {
        let s = seeds();
        assert_eq!(
            chosen(&s, &plus(), &country("JP"), None, &[]).unwrap(),
            "ap-northeast"
        );
        assert_eq!(
            chosen(&s, &plus(), &country("AU"), None, &[]).unwrap(),
            "ap-southeast"
        );
        assert_eq!(
            chosen(&s, &plus(), &country("br"), None, &[]).unwrap(),
            "sa-east"
        );
        assert_eq!(
            chosen(&s, &free(), &country("JP"), None, &[]).unwrap(),
            "eu-central"
        );
        let choice = choose(&s, &plus(), &country("GB"), None, &[]).unwrap();
        assert_eq!(choice.region.id, "eu-west");
        assert_eq!(choice.failover[0], "eu-central");
    }

    #[test]
    fn a_country_without_a_centroid_uses_an_eligible_region_in_that_country() {
        // Luxembourg is not in the centroid table.
        assert_eq!(geo::country_centroid("LU"), None);
        let mut s = seeds();
        s.regions
            .push(region("eu-lux-b", "LU", 49.6, 6.1, Tier::Free));
        s.regions
            .push(region("eu-lux-a", "LU", 49.6, 6.1, Tier::Premium));
        let choice = choose(&s, &plus(), &country("LU"), None, &[]).unwrap();
        assert_eq!(choice.region.id, "eu-lux-a");
        // Without a client position, failover is ordered from the chosen region.
        assert_eq!(choice.failover[..3], ["eu-lux-b", "eu-central", "eu-west"]);
        assert_eq!(
            chosen(&s, &free(), &country("lu"), None, &[]).unwrap(),
            "eu-lux-b"
        );
        // None of that country's regions eligible: the default.
        set(&mut s, "eu-lux-b", |r| r.health = Health::Down);
        assert_eq!(
            chosen(&s, &free(), &country("LU"), None, &[]).unwrap(),
            "eu-central"
        );
    }

    #[test]
    fn an_unknown_location_gets_the_default_region_else_the_first_eligible_by_id() {
        let mut s = seeds();
        for location in [ClientLocation::Unknown, country("XX"), country("")] {
            assert_eq!(
                chosen(&s, &plus(), &location, None, &[]).unwrap(),
                DEFAULT_REGION
            );
            assert_eq!(
                chosen(&s, &free(), &location, None, &[]).unwrap(),
                DEFAULT_REGION
            );
        }
        let choice = choose(&s, &plus(), &ClientLocation::Unknown, None, &[]).unwrap();
        assert_eq!(choice.failover[0], "eu-west");

        set(&mut s, DEFAULT_REGION, |r| r.health = Health::Down);
        let unknown = ClientLocation::Unknown;
        assert_eq!(
            chosen(&s, &plus(), &unknown, None, &[]).unwrap(),
            "af-south"
        );
        assert_eq!(chosen(&s, &free(), &unknown, None, &[]).unwrap(), "us-east");
        assert_eq!(
            chosen(&s, &plus(), &unknown, None, &["af-south"]).unwrap(),
            "ap-northeast"
        );
    }

    #[test]
    fn everything_down_is_no_eligible_region() {
        let mut s = seeds();
        for r in &mut s.regions {
            r.health = Health::Down;
        }
        for location in [near(LONDON), country("DE"), ClientLocation::Unknown] {
            for requested in [None, Some("eu-central")] {
                let err = choose(&s, &plus(), &location, requested, &[]).unwrap_err();
                assert_eq!(err, PlacementError::NoEligibleRegion);
            }
        }
        let empty = Snapshot::new(vec![]);
        let err = choose(&empty, &plus(), &near(LONDON), None, &[]).unwrap_err();
        assert_eq!(err, PlacementError::NoEligibleRegion);
    }

    #[test]
    fn a_region_with_invalid_coordinates_is_still_usable_but_ranked_last() {
        let mut s = seeds();
        set(&mut s, "eu-west", |r| r.latitude = 123.0);
        let choice = choose(&s, &plus(), &near(LONDON), None, &[]).unwrap();
        assert_eq!(choice.region.id, "eu-central");
        let mut s = Snapshot::new(vec![region("x", "DE", 0.0, 0.0, Tier::Free)]);
        s.regions[0].longitude = 999.0;
        assert_eq!(chosen(&s, &free(), &near(LONDON), None, &[]).unwrap(), "x");
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(
            PlacementError::NoEligibleRegion.code(),
            "no_region_available"
        );
        assert_eq!(
            PlacementError::RegionNotAllowed.code(),
            "region_not_allowed"
        );
        assert_eq!(PlacementError::UnknownRegion.code(), "region_not_found");
        assert_eq!(
            PlacementError::UnknownRegion.to_string(),
            "region_not_found"
        );
    }

    /// A random catalogue: up to 20 regions, some sharing a position (ties),
    /// random tiers, health and servers (some empty or at capacity 0).
    fn random_snapshot(rng: &mut Rng) -> Snapshot {
        let n = rng.below(21);
        let regions = (0..n)
            .map(|i| {
                let (lat, lon) = if rng.below(4) == 0 {
                    // A coarse grid, so equal distances happen.
                    (rng.below(3) as f64 * 30.0, rng.below(3) as f64 * 60.0)
                } else {
                    (rng.between(-90.0, 90.0), rng.between(-180.0, 180.0))
                };
                let tier = if rng.below(2) == 0 {
                    Tier::Free
                } else {
                    Tier::Premium
                };
                let mut r = region(&format!("r{i:02}"), "DE", lat, lon, tier);
                r.health = match rng.below(8) {
                    0 => Health::Down,
                    1 => Health::Draining,
                    _ => Health::Up,
                };
                r.servers = (0..rng.below(4))
                    .map(|k| server(&format!("r{i:02}-{k}"), rng.below(3) as u32))
                    .collect();
                r
            })
            .collect();
        Snapshot::new(regions)
    }

    #[test]
    fn whenever_a_region_is_eligible_choose_returns_the_nearest_eligible_one() {
        let mut rng = Rng(0x5eed);
        for case in 0..5_000 {
            let s = random_snapshot(&mut rng);
            let ent = if rng.below(2) == 0 { free() } else { plus() };
            let client = Point::new(rng.between(-90.0, 90.0), rng.between(-180.0, 180.0)).unwrap();
            let exclude: Vec<&str> = s
                .regions
                .iter()
                .filter(|_| rng.below(6) == 0)
                .map(|r| r.id.as_str())
                .collect();
            let requested = match rng.below(16) {
                0..=3 if !s.regions.is_empty() => Some(
                    s.regions[rng.below(s.regions.len() as u64) as usize]
                        .id
                        .as_str(),
                ),
                4 => Some("nowhere"),
                _ => None,
            };

            // Eligibility, restated independently of the implementation.
            let eligible: Vec<&Region> = s
                .regions
                .iter()
                .filter(|r| {
                    ent.region_tiers.contains(&r.tier)
                        && r.health == Health::Up
                        && r.servers.iter().map(|s| s.capacity).sum::<u32>() > 0
                        && !exclude.contains(&r.id.as_str())
                })
                .collect();
            let key = |r: &Region| {
                let p = Point::new(r.latitude, r.longitude).unwrap();
                (geo::distance_km(client, p), r.id.clone())
            };
            let is_eligible = |id: &str| eligible.iter().any(|r| r.id == id);

            let result = choose(
                &s,
                &ent,
                &ClientLocation::Coordinates(client),
                requested,
                &exclude,
            );
            let requested_region = requested.and_then(|id| s.regions.iter().find(|r| r.id == id));
            match (requested, requested_region) {
                (Some(_), None) => {
                    assert_eq!(result.unwrap_err(), PlacementError::UnknownRegion);
                    continue;
                }
                (Some(_), Some(r)) if !ent.allows_tier(r.tier) => {
                    assert_eq!(result.unwrap_err(), PlacementError::RegionNotAllowed);
                    continue;
                }
                _ => {}
            }
            let Ok(choice) = result else {
                assert_eq!(result.unwrap_err(), PlacementError::NoEligibleRegion);
                assert!(
                    eligible.is_empty(),
                    "case {case}: refused with {eligible:?}"
                );
                continue;
            };

            assert!(is_eligible(&choice.region.id), "case {case}");
            match requested {
                Some(id) if is_eligible(id) => assert_eq!(choice.region.id, id),
                _ => {
                    let best = eligible
                        .iter()
                        .map(|r| key(r))
                        .min_by(|a, b| a.partial_cmp(b).unwrap())
                        .unwrap();
                    assert_eq!(key(choice.region), best, "case {case}");
                }
            }

            let f = &choice.failover;
            assert_eq!(
                f.len(),
                (eligible.len() - 1).min(MAX_FAILOVER),
                "case {case}"
            );
            assert!(
                f.iter()
                    .all(|id| is_eligible(id) && *id != choice.region.id)
            );
            let keys: Vec<_> = f
                .iter()
                .map(|id| key(s.regions.iter().find(|r| r.id == *id).unwrap()))
                .collect();
            assert!(
                keys.windows(2).all(|w| w[0] < w[1]),
                "case {case}: {keys:?}"
            );
            // Nothing left out is nearer than the farthest one listed.
            if let Some(last) = keys.last() {
                for r in &eligible {
                    if r.id != choice.region.id && !f.contains(&r.id.as_str()) {
                        assert!(key(r) > *last, "case {case}");
                    }
                }
            }
        }
    }

    /// A thousand regions, most of them within centimetres (down to a few
    /// ulps) of one another, of the client or of its antipode, where the
    /// chord and the haversine disagree on the order: a [`Placer`] answers exactly what ranking every
    /// eligible region by (haversine distance, id) answers.
    #[test]
    fn a_placer_ranks_exactly_like_the_haversine_over_every_region() {
        let mut rng = Rng(0x91ace);
        for case in 0..40 {
            let client = Point::new(rng.between(-80.0, 80.0), rng.between(-170.0, 170.0)).unwrap();
            let antipode = (-client.lat, client.lon - client.lon.signum() * 180.0);
            let far = (rng.between(-80.0, 80.0), rng.between(-170.0, 170.0));
            let regions = (0..1_000)
                .map(|i| {
                    // From centimetres down to a few ulps of a coordinate,
                    // where rounding decides both measures.
                    let scale = [1e-7, 1e-11, 1e-13, 3e-14][case % 4];
                    let jitter = |rng: &mut Rng| rng.between(-scale, scale);
                    let (lat, lon) = match i % 5 {
                        0 => (client.lat + jitter(&mut rng), client.lon + jitter(&mut rng)),
                        1 => (antipode.0 + jitter(&mut rng), antipode.1 + jitter(&mut rng)),
                        2 => (far.0 + jitter(&mut rng), far.1 + jitter(&mut rng)),
                        3 => (far.0, far.1),
                        _ => (rng.between(-90.0, 90.0), rng.between(-180.0, 180.0)),
                    };
                    let tier = if rng.below(3) == 0 {
                        Tier::Premium
                    } else {
                        Tier::Free
                    };
                    let mut r = region(&format!("r{i:04}"), "DE", lat, lon, tier);
                    if rng.below(5) == 0 {
                        r.health = Health::Down;
                    }
                    r
                })
                .collect();
            let placer = Placer::new(Snapshot::new(regions));
            let s = placer.snapshot();
            for ent in [free(), plus()] {
                // Only the client's cluster, then without it: the far one decides.
                for exclude_near in [false, true] {
                    let exclude: Vec<&str> = s
                        .regions
                        .iter()
                        .filter(|r| exclude_near && (r.latitude - client.lat).abs() < 1e-6)
                        .map(|r| r.id.as_str())
                        .collect();
                    let mut all: Vec<(f64, &str)> = s
                        .regions
                        .iter()
                        .filter(|r| is_eligible_for_test(r, &ent, &exclude))
                        .map(|r| {
                            (
                                geo::distance_km(client, position(r).unwrap()),
                                r.id.as_str(),
                            )
                        })
                        .collect();
                    all.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
                    let expected: Vec<&str> =
                        all.iter().take(MAX_FAILOVER + 1).map(|x| x.1).collect();
                    let choice = placer
                        .choose(&ent, &ClientLocation::Coordinates(client), None, &exclude)
                        .unwrap();
                    let mut got = vec![choice.region.id.as_str()];
                    got.extend(choice.failover.iter().copied());
                    assert_eq!(got, expected, "case {case}");
                    assert_eq!(
                        choose(
                            s,
                            &ent,
                            &ClientLocation::Coordinates(client),
                            None,
                            &exclude
                        ),
                        Ok(choice),
                        "case {case}"
                    );
                }
            }
        }
    }

    fn is_eligible_for_test(r: &Region, ent: &Entitlement, exclude: &[&str]) -> bool {
        r.health == Health::Up
            && ent.region_tiers.contains(&r.tier)
            && r.servers.iter().any(|s| s.capacity > 0)
            && !exclude.contains(&r.id.as_str())
    }

    #[test]
    fn a_placer_lists_the_regions_that_admit_no_one() {
        let mut s = seeds();
        set(&mut s, "us-east", |r| r.admission_rate = 0);
        set(&mut s, "ap-northeast", |r| r.admission_rate = 0);
        let placer = Placer::new(s);
        assert_eq!(
            placer.closed().collect::<Vec<_>>(),
            ["ap-northeast", "us-east"]
        );
        assert_eq!(Placer::new(seeds()).closed().count(), 0);
    }

    #[test]
    fn regions_the_client_avoids_are_left_out_unless_nothing_else_is_up() {
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut s = seeds();
        set(&mut s, "us-east", |r| r.admission_rate = 0);
        let placer = Placer::new(s);
        let place = |ent: &Entitlement, requested, avoid: &[&str]| {
            placer
                .choose_avoiding(ent, &near(LONDON), requested, &ids(avoid), &[])
                .map(|c| {
                    let failover: Vec<String> = c.failover.iter().map(|f| f.to_string()).collect();
                    (c.region.id.clone(), failover)
                })
        };
        // The region lost, and one not in the catalogue: the next nearest,
        // and neither in the failover list (nor the closed us-east).
        let (region, failover) = place(&plus(), None, &["eu-west", "gone-region"]).unwrap();
        assert_eq!(region, "eu-central");
        assert!(!failover.iter().any(|f| f == "eu-west" || f == "us-east"));
        // Asked for by name and avoided: steered, as a region that is down.
        assert_eq!(
            place(&plus(), Some("eu-west"), &["eu-west"]).unwrap().0,
            "eu-central"
        );
        // A free plan has eu-central and us-east, and us-east admits no one:
        // avoiding eu-central leaves nothing, so it is let back in; the closed
        // region never is.
        let (region, failover) = place(&free(), None, &["eu-central"]).unwrap();
        assert_eq!(region, "eu-central");
        assert!(failover.is_empty());
        assert_eq!(place(&free(), None, &[]).unwrap().0, "eu-central");
        // An unknown or disallowed requested region is refused as before.
        assert_eq!(
            place(&free(), Some("eu-west"), &["eu-central"]),
            Err(PlacementError::RegionNotAllowed)
        );
    }

    #[test]
    fn regions_whose_gates_refused_are_left_out_and_never_let_back_in() {
        let placer = Placer::new(seeds());
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let place = |ent: &Entitlement, requested, avoid: &[&str], refused: &[&str]| {
            placer
                .choose_avoiding(ent, &near(LONDON), requested, &ids(avoid), refused)
                .map(|c| {
                    let failover: Vec<&str> = c.failover.clone();
                    (c.region.id.as_str(), failover)
                })
        };
        let (first, first_failover) = place(&plus(), None, &[], &[]).unwrap();
        assert_eq!(first, "eu-west");
        // Refused: the next region in the failover list, and no longer in it.
        let (region, failover) = place(&plus(), None, &[], &["eu-west"]).unwrap();
        assert_eq!(region, first_failover[0]);
        assert!(!failover.contains(&"eu-west"), "{failover:?}");
        // The rest of the list as before, one more region at its end.
        assert_eq!(failover[..first_failover.len() - 1], first_failover[1..]);
        assert_eq!(failover.len(), MAX_FAILOVER);
        // Requested by name: steered as a region that is down.
        assert_eq!(
            place(&plus(), Some("eu-west"), &[], &["eu-west"])
                .unwrap()
                .0,
            region
        );
        // A free plan has eu-central and us-east. Avoiding one and refused
        // by the other: the avoided one is let back in, the refused one not.
        assert_eq!(
            place(&free(), None, &["us-east"], &["eu-central"])
                .unwrap()
                .0,
            "us-east"
        );
        // Both refused: nowhere left.
        assert_eq!(
            place(&free(), None, &[], &["eu-central", "us-east"]),
            Err(PlacementError::NoEligibleRegion)
        );
        assert_eq!(
            place(&free(), None, &["eu-central"], &["us-east"])
                .unwrap()
                .0,
            "eu-central"
        );
    }

    #[test]
    fn an_avoid_list_is_bounded() {
        let list = |n: usize, id: &str| vec![id.to_string(); n];
        assert!(check_avoid(&[]).is_ok());
        assert!(check_avoid(&list(MAX_AVOID, &"r".repeat(MAX_AVOID_ID_CHARS))).is_ok());
        // Characters, not bytes: 64 four-byte characters are 64.
        assert!(check_avoid(&list(1, &"𝐓".repeat(MAX_AVOID_ID_CHARS))).is_ok());
        let err = check_avoid(&list(MAX_AVOID + 1, "eu-west")).unwrap_err();
        assert_eq!(
            (err.field, err.reason),
            ("avoid", "lists more than 8 regions")
        );
        assert!(check_avoid(&list(1, "")).is_err());
        assert!(check_avoid(&list(1, &"r".repeat(MAX_AVOID_ID_CHARS + 1))).is_err());
    }

    fn servers_region(servers: Vec<Server>) -> Region {
        let mut r = region("eu-central", "DE", 50.1, 8.7, Tier::Free);
        r.servers = servers;
        r
    }

    fn device(i: u32) -> String {
        format!("device-{i}")
    }

    #[test]
    fn the_hash_is_fnv1a_then_fmix64_and_never_changes() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(*b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fmix64(0), 0);
        // Pinned: a change here moves every device to another server.
        assert_eq!(stable_hash("", ""), fmix64(fnv1a64([0xff])));
        assert_eq!(stable_hash("device-1", "eu-central-1"), PINNED_1);
        assert_eq!(stable_hash("device-1", "eu-central-2"), PINNED_2);
        assert_ne!(stable_hash("ab", "c"), stable_hash("a", "bc"));
    }

    // Cross-checked against an independent implementation (Python).
    const PINNED_1: u64 = 0xe4a3_3bd6_53ff_38c8;
    const PINNED_2: u64 = 0x5ecf_6db3_a7d6_9073;

    #[test]
    fn unit_interval_never_reaches_zero_or_one() {
        for h in [0, 1, u64::MAX, u64::MAX - 1, 1 << 63] {
            let u = unit_interval(h >> UNIT_SHIFT);
            assert!(u > 0.0 && u < 1.0 && u.ln() < 0.0, "{h}: {u}");
        }
    }

    #[test]
    fn a_device_always_gets_the_same_server() {
        let r = servers_region(vec![server("a", 1), server("b", 2), server("c", 3)]);
        let mut reordered = r.clone();
        reordered.servers.reverse();
        for i in 0..1_000 {
            let first = choose_server(&r, &device(i)).unwrap();
            assert_eq!(choose_server(&r, &device(i)).unwrap().id, first.id);
            assert_eq!(choose_server(&reordered, &device(i)).unwrap().id, first.id);
        }
    }

    #[test]
    fn devices_spread_in_proportion_to_capacity() {
        let capacities = [100, 200, 300, 400, 1000];
        let servers = capacities
            .iter()
            .enumerate()
            .map(|(i, c)| server(&format!("eu-central-{}", i + 1), *c))
            .collect();
        let r = servers_region(servers);
        let devices = 100_000;
        let mut counts = [0u32; 5];
        for i in 0..devices {
            let s = choose_server(&r, &device(i)).unwrap();
            counts[r.servers.iter().position(|x| x.id == s.id).unwrap()] += 1;
        }
        let total: u32 = capacities.iter().sum();
        for (count, capacity) in counts.iter().zip(capacities) {
            let expected = f64::from(devices) * f64::from(capacity) / f64::from(total);
            let off = (f64::from(*count) - expected).abs() / expected;
            assert!(off < 0.03, "{counts:?}: {count} vs {expected}");
        }
    }

    #[test]
    fn removing_a_server_moves_only_its_devices_and_adding_one_only_takes_devices() {
        let all: Vec<Server> = (1..=5).map(|n| server(&format!("s-{n}"), 10 * n)).collect();
        let before = servers_region(all.clone());
        let after = servers_region(all.iter().filter(|s| s.id != "s-3").cloned().collect());
        let mut moved = 0;
        for i in 0..20_000 {
            let was = choose_server(&before, &device(i)).unwrap();
            let now = choose_server(&after, &device(i)).unwrap();
            if was.id == "s-3" {
                moved += 1;
            } else {
                assert_eq!(was.id, now.id, "device {i} moved off a server that stayed");
            }
        }
        assert!(moved > 0);
        // Adding it back is the same comparison the other way round: devices
        // move only onto the new server.
        for i in 0..20_000 {
            let was = choose_server(&after, &device(i)).unwrap();
            let now = choose_server(&before, &device(i)).unwrap();
            assert!(now.id == was.id || now.id == "s-3");
        }
    }

    #[test]
    fn a_full_server_takes_no_new_devices_and_only_its_devices_move() {
        let all: Vec<Server> = (1..=5).map(|n| server(&format!("s-{n}"), 10 * n)).collect();
        let before = servers_region(all.clone());
        let mut after = before.clone();
        after.servers[2].full = true;
        let mut moved = 0;
        for i in 0..20_000 {
            let was = choose_server(&before, &device(i)).unwrap();
            let now = choose_server(&after, &device(i)).unwrap();
            assert_ne!(now.id, "s-3", "device {i} sent to a full server");
            if was.id == "s-3" {
                moved += 1;
            } else {
                assert_eq!(was.id, now.id, "device {i} moved off a server with room");
            }
        }
        assert!(moved > 0);
        // Every server full: the same choice as with none full.
        let mut full = before.clone();
        full.servers.iter_mut().for_each(|s| s.full = true);
        for i in 0..1_000 {
            assert_eq!(
                choose_server(&full, &device(i)).unwrap().id,
                choose_server(&before, &device(i)).unwrap().id
            );
        }
    }

    #[test]
    fn servers_without_capacity_are_never_chosen() {
        let r = servers_region(vec![server("a", 0), server("b", 5), server("c", 0)]);
        for i in 0..2_000 {
            assert_eq!(choose_server(&r, &device(i)).unwrap().id, "b");
        }
        let r = servers_region(vec![server("a", 0)]);
        assert_eq!(choose_server(&r, "d"), None);
        assert_eq!(choose_server(&servers_region(vec![]), "d"), None);
    }

    /// The rule as the module docs state it: every server scored, the
    /// highest score taking it, equal scores going to the smaller id.
    pub(super) fn highest_by_scoring_all<'a>(servers: &[(u64, &'a Server)]) -> Option<&'a Server> {
        servers
            .iter()
            .map(|(k, s)| (score(*k, s.capacity), *s))
            .max_by(|(sa, a), (sb, b)| sa.total_cmp(sb).then_with(|| b.id.cmp(&a.id)))
            .map(|(_, s)| s)
    }

    /// The server ids [`highest`] and [`highest_by_scoring_all`] choose.
    pub(super) fn both_choices<'a>(
        servers: &[(u64, &'a Server)],
    ) -> (Option<&'a str>, Option<&'a str>) {
        (
            highest(servers.iter().copied()).map(|s| s.id.as_str()),
            highest_by_scoring_all(servers).map(|s| s.id.as_str()),
        )
    }

    /// [`positions`](super::positions), collected.
    pub(super) fn positions<'a>(device: &str, servers: &'a [Server]) -> Vec<(u64, &'a Server)> {
        super::positions(device, servers).collect()
    }

    #[test]
    fn scoring_only_the_records_chooses_what_scoring_all_would() {
        // A thousand servers of one capacity (the benchmark's fleet), then
        // mixed capacities, then more capacities than are tracked.
        let fleets: [Vec<Server>; 3] = [
            (1..=1000)
                .map(|n| server(&format!("eu-central-{n:04}"), 100))
                .collect(),
            (1..=300)
                .map(|n| server(&format!("s-{n}"), [50, 100, 400][n as usize % 3]))
                .collect(),
            (1..=300)
                .map(|n| server(&format!("s-{n}"), 1 + n % 20))
                .collect(),
        ];
        for servers in &fleets {
            for i in 0..300 {
                let (fast, all) = both_choices(&positions(&device(i), servers));
                assert_eq!(fast, all, "device {i}");
            }
        }
    }

    #[test]
    fn positions_within_the_margin_are_still_compared_by_score_and_id() {
        // Equal positions tie on score and go to the smaller id; adjacent
        // ones, at both ends of (0, 1) and inside the margin, are compared
        // as scoring all would; in any order.
        let (a, b, c) = (server("a", 7), server("b", 7), server("c", 9));
        let top = (1u64 << 52) - 1;
        let cases: [&[(u64, &Server)]; 6] = [
            &[(5, &b), (5, &a)],
            &[(top, &b), (top - 1, &a)],
            &[(0, &b), (1, &a), (0, &c)],
            &[(1 << 40, &a), ((1 << 40) - (1 << 21), &b)],
            &[(1 << 51, &b), ((1 << 51) + 1, &a), (1 << 50, &c)],
            &[(top - (1 << 22), &c), (top, &b), (top - (1 << 23), &a)],
        ];
        for case in cases {
            let mut servers = case.to_vec();
            for _ in 0..servers.len() {
                servers.rotate_left(1);
                let (fast, all) = both_choices(&servers);
                assert_eq!(fast, all, "{servers:?}");
            }
        }
    }

    #[test]
    fn a_region_admits_the_share_of_its_rate_its_servers_with_room_hold() {
        let full = |id, capacity| Server {
            full: true,
            ..server(id, capacity)
        };
        let rate_of = |servers: Vec<Server>, rate| {
            let mut r = servers_region(servers);
            r.admission_rate = rate;
            admitting_rate(&r)
        };
        // None full, or all: the configured rate.
        assert_eq!(rate_of(vec![server("a", 100), server("b", 50)], 200), 200);
        assert_eq!(rate_of(vec![full("a", 100), full("b", 50)], 200), 200);
        assert_eq!(rate_of(vec![], 200), 200);
        // Weighed by capacity, rounded up.
        assert_eq!(rate_of(vec![full("a", 100), server("b", 50)], 200), 67);
        assert_eq!(rate_of(vec![server("a", 100), full("b", 50)], 200), 134);
        assert_eq!(
            rate_of(vec![full("a", 100), full("b", 100), server("c", 50)], 10),
            2
        );
        // A server without capacity counts for nothing either way.
        assert_eq!(
            rate_of(vec![full("a", 100), server("z", 0), server("b", 100)], 100),
            50
        );
        // At least 1 while a server has room; a closed region stays closed.
        assert_eq!(rate_of(vec![full("a", 10_000), server("b", 1)], 3), 1);
        assert_eq!(rate_of(vec![full("a", 100), server("b", 50)], 0), 0);
        assert_eq!(
            rate_of(vec![full("a", u32::MAX), server("b", u32::MAX)], u32::MAX),
            u32::MAX.div_ceil(2)
        );
    }

    #[test]
    fn region_load_is_the_capacity_weighted_mean() {
        let mut big = server("a", 300);
        big.load = 0.5;
        let mut small = server("b", 100);
        small.load = 0.9;
        assert!((region_load(&servers_region(vec![big, small.clone()])) - 0.6).abs() < 1e-6);
        assert_eq!(region_load(&servers_region(vec![small.clone()])), 0.9);
        assert_eq!(region_load(&servers_region(vec![])), 0.0);
        small.capacity = 0;
        assert_eq!(region_load(&servers_region(vec![small])), 0.0);
    }

    #[test]
    fn a_region_listed_up_takes_new_clients() {
        let up = servers_region(vec![server("a", 100)]);
        assert_eq!(listed_health(&up), Health::Up);
        // Up, but closed or without capacity: listed draining, as placement
        // offers it to no one.
        let mut closed = up.clone();
        closed.admission_rate = 0;
        assert_eq!(listed_health(&closed), Health::Draining);
        assert_eq!(
            listed_health(&servers_region(vec![server("a", 0)])),
            Health::Draining
        );
        assert_eq!(listed_health(&servers_region(vec![])), Health::Draining);
        // The operator's or the monitor's state otherwise.
        for health in [Health::Draining, Health::Down] {
            let mut r = closed.clone();
            r.health = health;
            assert_eq!(listed_health(&r), health);
            r.admission_rate = 10;
            assert_eq!(listed_health(&r), health);
        }
    }
}

/// Properties over generated catalogues (shrinking to a minimal one).
/// Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::tests::{both_choices, positions};
    use super::*;
    use crate::domain::catalogue::Tier;
    use proptest::prelude::*;

    const COUNTRIES: [&str; 5] = ["DE", "US", "JP", "GB", "LU"];

    fn tier() -> impl Strategy<Value = Tier> {
        prop_oneof![Just(Tier::Free), Just(Tier::Premium)]
    }

    fn health() -> impl Strategy<Value = Health> {
        prop_oneof![4 => Just(Health::Up), 1 => Just(Health::Draining), 1 => Just(Health::Down)]
    }

    /// Valid coordinates, a coarse grid (so distances tie), or coordinates
    /// no map has (bad catalogue data).
    fn coordinates() -> impl Strategy<Value = (f64, f64)> {
        prop_oneof![
            4 => (-90.0f64..=90.0, -180.0f64..=180.0),
            2 => (0u8..3, 0u8..3).prop_map(|(a, b)| (f64::from(a) * 30.0, f64::from(b) * 60.0)),
            1 => Just((123.0, 0.0)),
            1 => Just((0.0, f64::NAN)),
        ]
    }

    /// Whether a server is full: now and then.
    fn full() -> impl Strategy<Value = bool> {
        prop::bool::weighted(0.3)
    }

    fn region(i: usize) -> impl Strategy<Value = Region> {
        (
            tier(),
            health(),
            coordinates(),
            prop::sample::select(&COUNTRIES[..]),
            prop::collection::vec((0u32..3, full()), 0..4),
        )
            .prop_map(move |(tier, health, (lat, lon), country, servers)| {
                let id = format!("r{i:02}");
                Region {
                    name: id.clone(),
                    servers: servers
                        .iter()
                        .enumerate()
                        .map(|(k, &(capacity, full))| Server {
                            id: format!("{id}-{k}"),
                            hostname: format!("{id}-{k}.vpn.example"),
                            port: 51820,
                            public_key: "k".into(),
                            capacity,
                            load: if full { 1.0 } else { 0.0 },
                            full,
                        })
                        .collect(),
                    id,
                    country: country.into(),
                    latitude: lat,
                    longitude: lon,
                    tier,
                    health,
                    admission_rate: 100,
                }
            })
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (0usize..12, any::<bool>())
            .prop_flat_map(|(n, default_first)| {
                let regions: Vec<_> = (0..n).map(region).collect();
                (regions, Just(default_first))
            })
            .prop_map(|(mut regions, default_first)| {
                // Sometimes one region is the default one, so rule 3's
                // fallback is exercised both ways.
                if default_first && let Some(first) = regions.first_mut() {
                    first.id = DEFAULT_REGION.into();
                }
                Snapshot::new(regions)
            })
    }

    fn entitlement() -> impl Strategy<Value = Entitlement> {
        prop::sample::subsequence(vec![Tier::Free, Tier::Premium], 0..=2).prop_map(|tiers| {
            Entitlement {
                plan: "test".into(),
                max_devices: 5,
                region_tiers: tiers,
                until: None,
            }
        })
    }

    fn location() -> impl Strategy<Value = ClientLocation> {
        prop_oneof![
            (-90.0f64..=90.0, -180.0f64..=180.0)
                .prop_map(|(lat, lon)| ClientLocation::Coordinates(Point::new(lat, lon).unwrap())),
            prop::sample::select(vec!["DE", "us", "JP", "LU", "XX", ""])
                .prop_map(|c| ClientLocation::Country(c.into())),
            Just(ClientLocation::Unknown),
        ]
    }

    /// A case: a catalogue, an entitlement, where the client is, what it
    /// asks for (an index into the catalogue, or an unknown id) and which
    /// regions the caller excludes (indices).
    type Case = (
        Snapshot,
        Entitlement,
        ClientLocation,
        Option<Option<usize>>,
        Vec<usize>,
    );

    fn case() -> impl Strategy<Value = Case> {
        (
            snapshot(),
            entitlement(),
            location(),
            prop::option::of(prop::option::of(0usize..12)),
            prop::collection::vec(0usize..12, 0..4),
        )
    }

    /// Eligibility restated from the rules, independently of `is_eligible`.
    fn eligible_by_rule(r: &Region, ent: &Entitlement, exclude: &[&str]) -> bool {
        ent.region_tiers.contains(&r.tier)
            && r.health == Health::Up
            && r.servers.iter().map(|s| s.capacity).sum::<u32>() > 0
            && !exclude.contains(&r.id.as_str())
    }

    /// Room restated from the rules: a server with capacity, not full.
    fn room_by_rule(r: &Region) -> bool {
        r.servers.iter().any(|s| s.capacity > 0 && !s.full)
    }

    /// The regions placement chooses from: the eligible ones with room, or
    /// all the eligible ones when none has room.
    fn pool_by_rule<'a>(s: &'a Snapshot, ent: &Entitlement, exclude: &[&str]) -> Vec<&'a Region> {
        let eligible: Vec<&Region> = s
            .regions
            .iter()
            .filter(|r| eligible_by_rule(r, ent, exclude))
            .collect();
        let roomy: Vec<&Region> = eligible
            .iter()
            .copied()
            .filter(|r| room_by_rule(r))
            .collect();
        if roomy.is_empty() { eligible } else { roomy }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whenever a region is allowed, healthy, has capacity and is not
        /// excluded, a region is chosen, and it is one of those; the failover
        /// list holds only such regions too. With none, the answer is
        /// `NoEligibleRegion` (or the requested region's own error).
        #[test]
        fn the_choice_is_always_an_allowed_healthy_region_when_one_exists(
            (s, ent, location, requested, excluded) in case(),
        ) {
            let requested: Option<&str> = requested.map(|r| match r {
                Some(i) if i < s.regions.len() => s.regions[i].id.as_str(),
                _ => "nowhere",
            });
            let exclude: Vec<&str> = excluded
                .iter()
                .filter_map(|i| s.regions.get(*i).map(|r| r.id.as_str()))
                .collect();
            let eligible: Vec<&Region> = s
                .regions
                .iter()
                .filter(|r| eligible_by_rule(r, &ent, &exclude))
                .collect();
            let pool = pool_by_rule(&s, &ent, &exclude);
            let result = choose(&s, &ent, &location, requested, &exclude);

            if let Some(id) = requested {
                match s.regions.iter().find(|r| r.id == id) {
                    None => {
                        prop_assert_eq!(result, Err(PlacementError::UnknownRegion));
                        return Ok(());
                    }
                    Some(r) if !ent.region_tiers.contains(&r.tier) => {
                        prop_assert_eq!(result, Err(PlacementError::RegionNotAllowed));
                        return Ok(());
                    }
                    Some(_) => {}
                }
            }
            if eligible.is_empty() {
                prop_assert_eq!(result, Err(PlacementError::NoEligibleRegion));
                return Ok(());
            }
            let choice = match result {
                Ok(choice) => choice,
                Err(e) => return Err(TestCaseError::fail(format!("refused with {e} though {} eligible", eligible.len()))),
            };
            let is_eligible = |id: &str| eligible.iter().any(|r| r.id == id);
            let in_pool = |id: &str| pool.iter().any(|r| r.id == id);
            // A region asked for by name is given while eligible, full or
            // not; any other choice has room if any eligible region has.
            match requested.filter(|id| is_eligible(id)) {
                Some(id) => prop_assert_eq!(&choice.region.id, id),
                None => prop_assert!(in_pool(&choice.region.id), "chose {}", choice.region.id),
            }

            // The failover list: other eligible regions, those with room
            // first.
            let f = &choice.failover;
            prop_assert_eq!(f.len(), (eligible.len() - 1).min(MAX_FAILOVER));
            prop_assert!(f.iter().all(|id| is_eligible(id) && *id != choice.region.id));
            let roomy = |id: &str| s.regions.iter().any(|r| r.id == id && room_by_rule(r));
            if let Some(first_full) = f.iter().position(|id| !roomy(id)) {
                prop_assert!(f[first_full..].iter().all(|id| !roomy(id)), "{f:?}");
                let listed_roomy = f[..first_full].len();
                let other_roomy = eligible
                    .iter()
                    .filter(|r| r.id != choice.region.id && room_by_rule(r))
                    .count();
                prop_assert_eq!(listed_roomy, other_roomy, "a region with room left out of {:?}", f);
            }
            let distinct: std::collections::BTreeSet<_> = f.iter().collect();
            prop_assert_eq!(distinct.len(), f.len());
        }

        /// With coordinates and nothing requested, the choice is the nearest
        /// eligible region (ties by id; regions without a valid position
        /// last), and the failover list goes on in that order.
        #[test]
        fn with_coordinates_the_nearest_eligible_region_wins(
            s in snapshot(),
            ent in entitlement(),
            (lat, lon) in (-90.0f64..=90.0, -180.0f64..=180.0),
        ) {
            let client = Point::new(lat, lon).unwrap();
            let rank = |regions: Vec<&Region>| {
                let mut ranked: Vec<(f64, &str)> = regions
                    .into_iter()
                    .map(|r| {
                        let d = Point::new(r.latitude, r.longitude)
                            .map_or(f64::INFINITY, |p| geo::distance_km(client, p));
                        (d, r.id.as_str())
                    })
                    .collect();
                ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
                ranked.into_iter().map(|(_, id)| id.to_owned()).collect::<Vec<String>>()
            };
            let pool = pool_by_rule(&s, &ent, &[]);
            let pool_ids: Vec<&str> = pool.iter().map(|r| r.id.as_str()).collect();
            // After the pool's regions (those with room, if any), the full
            // ones, nearest first.
            let full: Vec<&Region> = s
                .regions
                .iter()
                .filter(|r| eligible_by_rule(r, &ent, &[]) && !pool_ids.contains(&r.id.as_str()))
                .collect();
            let ranked = rank(pool);
            let result = choose(&s, &ent, &ClientLocation::Coordinates(client), None, &[]);
            match ranked.split_first() {
                None => prop_assert_eq!(result, Err(PlacementError::NoEligibleRegion)),
                Some((first, rest)) => {
                    let choice = result.unwrap();
                    prop_assert_eq!(&choice.region.id, first);
                    let expected: Vec<String> =
                        rest.iter().cloned().chain(rank(full)).take(MAX_FAILOVER).collect();
                    let got: Vec<String> = choice.failover.iter().map(|id| (*id).to_owned()).collect();
                    prop_assert_eq!(got, expected);
                }
            }
        }

        /// With no position at all, the default region wins when it is
        /// eligible, otherwise the eligible region with the smallest id.
        #[test]
        fn without_a_position_the_default_or_the_smallest_id_wins(
            s in snapshot(),
            ent in entitlement(),
        ) {
            let mut eligible: Vec<&str> = pool_by_rule(&s, &ent, &[])
                .into_iter()
                .map(|r| r.id.as_str())
                .collect();
            eligible.sort();
            let expected = if eligible.contains(&DEFAULT_REGION) {
                Some(DEFAULT_REGION)
            } else {
                eligible.first().copied()
            };
            let got = choose(&s, &ent, &ClientLocation::Unknown, None, &[]).ok().map(|c| c.region.id.as_str());
            prop_assert_eq!(got, expected);
        }

        /// Scoring only each capacity's records chooses what scoring every
        /// server would, for any fleet and device.
        #[test]
        fn the_server_chosen_is_the_highest_scored(
            capacities in prop::collection::vec(prop_oneof![0u32..3, 1u32..4, 1u32..30], 0..200),
            device in "[a-f0-9-]{0,36}",
        ) {
            let servers: Vec<Server> = capacities
                .iter()
                .enumerate()
                .map(|(n, c)| Server {
                    id: format!("s-{n}"),
                    hostname: String::new(),
                    port: 51820,
                    public_key: String::new(),
                    capacity: *c,
                    load: 0.0,
                    full: false,
                })
                .collect();
            let (fast, all) = both_choices(&positions(&device, &servers));
            prop_assert_eq!(fast, all);
        }

        /// The server chosen has capacity, and room if any server has,
        /// exists whenever one with capacity does, and does not depend on
        /// the order the servers are listed in.
        #[test]
        fn the_server_chosen_has_capacity_and_ignores_order(
            r in region(0),
            device in "[a-f0-9-]{0,36}",
        ) {
            let chosen = choose_server(&r, &device);
            prop_assert_eq!(chosen.is_some(), r.servers.iter().any(|s| s.capacity > 0));
            if let Some(server) = chosen {
                prop_assert!(server.capacity > 0);
                prop_assert!(!server.full || !room_by_rule(&r), "{} is full", server.id);
                let mut reversed = r.clone();
                reversed.servers.reverse();
                prop_assert_eq!(&choose_server(&reversed, &device).unwrap().id, &server.id);
            }
        }
    }
}
