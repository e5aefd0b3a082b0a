//! A user's WireGuard devices: parsed input ([`PublicKey`], [`DeviceName`],
//! [`device_id`]), tunnel addresses ([`tunnel_addresses`]) and the
//! device-limit [`Ledger`] kept in the user's Durable Object.
//!
//! # Why a ledger
//!
//! PostgreSQL holds the devices; the plan's device limit has to hold however
//! many "add device" requests race. The user's Durable Object runs them one at
//! a time, but only between awaits: while one request awaits its `INSERT`,
//! another can run. Counting rows before inserting would let two requests both
//! see "one slot left" and both insert. So the object keeps a [`Ledger`] and a
//! request takes its slot *synchronously*, before the first await:
//!
//! 1. [`Ledger::reserve`] succeeds only while confirmed devices plus live
//!    reservations are below the limit, and counts the new reservation at once;
//! 2. the shell inserts the row;
//! 3. [`Ledger::confirm`] (the insert committed) turns the reservation into a
//!    device, [`Ledger::release`] (it failed) gives the slot back.
//!
//! Reservation ids come from caller-supplied random bytes rather than a
//! counter: a late `confirm`/`release` from a request whose reservation has
//! already expired can then never hit a newer request's reservation.
//!
//! # Crashes and convergence
//!
//! A request that dies between steps leaves a reservation behind; it stops
//! counting [`RESERVATION_TTL_SECS`] after it was made, so the shell should
//! bound the insert well below that. If the insert committed but the confirm
//! never ran, the device is missing from the ledger; if a confirm arrives after
//! expiry, the device is recorded anyway (the row exists). Either way the
//! ledger converges on PostgreSQL's truth: after every insert or delete the
//! shell reads the user's device ids and hands them to [`Ledger::sync_since`]
//! (or [`Ledger::sync`]).
//!
//! # Syncing against a moving target
//!
//! The id query is itself an await. If another request's insert commits after
//! the query's snapshot and is confirmed before the answer arrives, a plain
//! [`Ledger::sync`] would replace the device set with a list that lacks that
//! device, under-count by one and let one device too many through. So the
//! shell takes a [`SyncMark`] with [`Ledger::mark`] *before* querying and
//! passes it to [`Ledger::sync_since`], which keeps devices confirmed after the
//! mark even when the list lacks them. Answers can also arrive out of order,
//! so a list read under an older mark than the last one applied is ignored:
//! the newer sync already covered everything the older one could. The error
//! is then always an over-count, which only lasts until the next sync.
//!
//! A delete is the mirror image: a list read before the delete committed
//! still shows the device. So the delete's own answer calls
//! [`Ledger::forget`], which drops the device at once (its own list may be
//! the stale one, ignored) and keeps it dropped against every list read
//! under an older mark. (Without it, a delete answered after a newer sync
//! whose list predated the delete left the device counted, and nothing
//! re-read the list: at the limit, every later registration was refused.)
//!
//! # Downgrades
//!
//! The limit is an argument, not state: a plan downgrade below the current
//! count keeps every existing device (nothing here deletes) but refuses new
//! ones until enough are removed.

use crate::domain::account::Invalid;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The longest device name, in characters (after trimming).
pub const MAX_NAME_CHARS: usize = 64;

/// A reservation that was neither confirmed nor released stops counting after
/// this long, so a crashed request frees its slot by itself.
pub const RESERVATION_TTL_SECS: i64 = 30;

/// Length of a 32-byte key in padded standard base64.
const KEY_B64_LEN: usize = 44;
const KEY_LEN: usize = 32;

/// `10.64.0.0/10`: the tunnel IPv4 range.
const IPV4_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
/// Host numbers 1..=IPV4_HOSTS: the /10 without its network and broadcast
/// addresses.
const IPV4_HOSTS: u64 = (1 << 22) - 2;
/// `fd4b:6565:6e00::/48`: the tunnel IPv6 range (a ULA prefix).
const IPV6_BASE: u128 = 0xfd4b_6565_6e00_u128 << 80;

/// The first address of each tunnel range (host number 0), which
/// [`tunnel_addresses`] counts up from. PostgreSQL adds its sequence number
/// to them the same way when it registers a device (`sql::insert_device`).
pub fn tunnel_bases() -> (Ipv4Addr, Ipv6Addr) {
    (Ipv4Addr::from(IPV4_BASE), Ipv6Addr::from(IPV6_BASE))
}

/// A WireGuard (Curve25519) public key: standard base64 with padding of exactly
/// 32 bytes, so 44 characters.
///
/// Only the canonical spelling is accepted (re-encoding gives the same string:
/// no stray bits in the last character, no URL-safe alphabet, no whitespace),
/// so one key has one spelling and a uniqueness constraint on the stored text
/// is a uniqueness constraint on the key. That takes the key's canonical
/// encoding too: X25519 ignores the top bit of the last byte, and reads a
/// number from 2^255 - 19 up as that much smaller one, so such a key is a
/// second spelling of another; WireGuard never makes one. Refused as well:
/// the all-zero key (what an unset key looks like) and the other points of
/// small order, with which every handshake fails (WireGuard refuses the
/// all-zero shared secret they give).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicKey(String);

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, Invalid> {
        let bad = |reason| Invalid {
            field: "public_key",
            reason,
        };
        if s.len() != KEY_B64_LEN {
            return Err(bad("must be 44 characters of base64"));
        }
        // `STANDARD` requires canonical padding and refuses non-zero trailing
        // bits, which is what makes the spelling unique.
        let bytes = STANDARD
            .decode(s)
            .map_err(|_| bad("is not canonical standard base64"))?;
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad("must encode 32 bytes"))?;
        // The definition of canonical, checked directly so that a change of
        // engine configuration cannot quietly admit a second spelling.
        if STANDARD.encode(key) != s {
            return Err(bad("is not canonical standard base64"));
        }
        if key == [0; KEY_LEN] {
            return Err(bad("is the all-zero key"));
        }
        if key[KEY_LEN - 1] & 0x80 != 0 || is_at_least_p(&key) {
            return Err(bad("is not a canonical Curve25519 key"));
        }
        if SMALL_ORDER.contains(&key) {
            return Err(bad("is a point of small order, which no handshake can use"));
        }
        Ok(PublicKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The Curve25519 points of small order below 2^255 - 19, as little-endian
/// u-coordinates (0 is refused on its own): 1, the two of order 8, and
/// p - 1.
const SMALL_ORDER: [[u8; KEY_LEN]; 4] = {
    let mut one = [0; KEY_LEN];
    one[0] = 1;
    let mut p_minus_1 = [0xff; KEY_LEN];
    p_minus_1[0] = 0xec;
    p_minus_1[KEY_LEN - 1] = 0x7f;
    [
        one,
        [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ],
        [
            0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83,
            0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd,
            0xd0, 0x9f, 0x11, 0x57,
        ],
        p_minus_1,
    ]
};

/// Whether a key with its top bit clear reads as a number of at least
/// p = 2^255 - 19: the top byte 0x7f, the 30 below it 0xff, the lowest at
/// least 0xed.
fn is_at_least_p(key: &[u8; KEY_LEN]) -> bool {
    key[KEY_LEN - 1] == 0x7f && key[1..KEY_LEN - 1].iter().all(|b| *b == 0xff) && key[0] >= 0xed
}

/// A device's display name: at most 64 characters, no control characters
/// (they would break the lists and logs the name appears in) nor hidden ones
/// (`crate::text::is_hidden`: a direction override or a zero-width space
/// makes one name look like another), not only white space and joiners;
/// stored trimmed. The checks are on the name as sent, as
/// `openapi.json` states them, so a name the contract refuses is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceName(String);

impl DeviceName {
    pub fn parse(s: &str) -> Result<DeviceName, Invalid> {
        let bad = |reason| Invalid {
            field: "name",
            reason,
        };
        if s.chars()
            .any(|c| c.is_control() || crate::text::is_hidden(c))
        {
            return Err(bad("contains control or hidden characters"));
        }
        if s.chars().count() > MAX_NAME_CHARS {
            return Err(bad("is longer than 64 characters"));
        }
        // White space as the contract's `\s` (ECMAScript's) knows it, which
        // also counts the byte-order mark.
        let name = s.trim_matches(char::is_whitespace);
        if name
            .chars()
            .all(|c| c.is_whitespace() || crate::text::is_joiner(c))
        {
            return Err(bad("is empty"));
        }
        Ok(DeviceName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A device id as the service writes it: a hyphenated UUID, lower-cased
/// (how PostgreSQL prints `uuid`). A UUID's hex digits are case-insensitive,
/// and some platforms print them in upper case (Swift's `uuidString`), so
/// either case names the device. Anything else cannot name a device
/// (`None`): the shell answers 404 without a query, and never hands
/// PostgreSQL a string it would reject as a uuid.
pub fn device_id(s: &str) -> Option<String> {
    let valid = s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    valid.then(|| s.to_ascii_lowercase())
}

/// The tunnel addresses for fleet-wide sequence number `n` (a PostgreSQL
/// sequence makes `n` unique, so the addresses are too): IPv4 `10.64.0.0 + n`
/// and IPv6 `fd4b:6565:6e00:: + n`, without prefix lengths.
///
/// Valid for `n` in `1..=4_194_302`, the `/10` minus its network and broadcast
/// addresses; `None` otherwise. Host octets `.0` and `.255` are ordinary
/// addresses inside a `/10` and are used. IPv6 is printed in the canonical
/// compressed form (RFC 5952), e.g. `fd4b:6565:6e00::1:0` for `n = 65536`.
pub fn tunnel_addresses(n: u64) -> Option<(String, String)> {
    if !(1..=IPV4_HOSTS).contains(&n) {
        return None;
    }
    // In range, so `n < 2^22` and neither addition can overflow.
    let ipv4 = Ipv4Addr::from(IPV4_BASE + n as u32);
    let ipv6 = Ipv6Addr::from(IPV6_BASE + u128::from(n));
    Some((ipv4.to_string(), ipv6.to_string()))
}

/// Why a slot could not be reserved: the answer for a 403/409 problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// `in_use` counts confirmed devices and live reservations; it may exceed
    /// `limit` after a downgrade.
    LimitReached { limit: u32, in_use: u32 },
}

/// Taken by [`Ledger::mark`] before querying PostgreSQL for the user's device
/// ids, handed back to [`Ledger::sync_since`] with the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncMark(u64);

/// The device-limit ledger of one user, stored as JSON in their Durable
/// Object. See the module docs for the protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Device ids counted against the limit.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    devices: BTreeSet<String>,
    /// Reservation id -> when it was made (unix seconds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    reservations: BTreeMap<String, i64>,
    /// Devices recorded by `confirm` -> the `seq` of that confirm; kept until a
    /// sync whose query started after it, which is bound to list the device
    /// if it still exists.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    confirms: BTreeMap<String, u64>,
    /// Devices a committed delete dropped -> the `seq` of that
    /// [`Ledger::forget`]; kept out of any list read under an older mark,
    /// which may predate the delete, and from a late [`Ledger::confirm`]:
    /// so an entry is kept while any reservation is outstanding, whose
    /// insert may be the device's and its answer still on its way.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    forgotten: BTreeMap<String, u64>,
    /// Counts confirms and forgets; the clock that [`SyncMark`]s read.
    #[serde(default, skip_serializing_if = "is_zero")]
    seq: u64,
    /// The mark of the last sync applied; older ones are stale.
    #[serde(default, skip_serializing_if = "is_zero")]
    synced: u64,
}

impl Ledger {
    /// Reserves one slot if confirmed devices plus live (unexpired)
    /// reservations are below `limit`, and returns the reservation id: the
    /// caller's random `id` bytes in hex. Expired reservations are dropped on
    /// the way, which keeps the state bounded.
    pub fn reserve(&mut self, limit: u32, now: i64, id: [u8; 8]) -> Result<String, LimitError> {
        self.reservations.retain(|_, &mut at| is_live(at, now));
        let in_use = self.in_use(now);
        if in_use >= limit {
            return Err(LimitError::LimitReached { limit, in_use });
        }
        let base = format!("{:016x}", u64::from_be_bytes(id));
        // Two live reservations must never share an id (one entry would then
        // count for two slots), however unlikely a repeat of 64 random bits.
        let mut reservation = base.clone();
        let mut suffix = 1u32;
        while self.reservations.contains_key(&reservation) {
            reservation = format!("{base}-{suffix}");
            suffix += 1;
        }
        self.reservations.insert(reservation.clone(), now);
        Ok(reservation)
    }

    /// The insert committed: drops the reservation and records the device.
    /// The device is recorded even if the reservation is unknown or expired,
    /// because the row exists either way; the next sync corrects any excess.
    /// But not a device already forgotten: a delete of it committed while
    /// its insert's answer was on its way (the client saw the row in its
    /// list and deleted it), and recording it would count, and mirror, a
    /// device that no longer exists.
    pub fn confirm(&mut self, reservation: &str, device_id: &str) {
        self.reservations.remove(reservation);
        if self.forgotten.contains_key(device_id) {
            return;
        }
        self.seq += 1;
        self.devices.insert(device_id.to_owned());
        self.confirms.insert(device_id.to_owned(), self.seq);
    }

    /// The delete committed: the device stops counting now, and no list read
    /// before this call (under an older mark) brings it back.
    pub fn forget(&mut self, device_id: &str) {
        self.seq += 1;
        self.devices.remove(device_id);
        self.confirms.remove(device_id);
        self.forgotten.insert(device_id.to_owned(), self.seq);
    }

    /// A change to a counted device's row committed (its key rotated): like
    /// a confirm, it is remembered until a sync whose query started after
    /// it, so that the shell keeps its own record of the device over a list
    /// read before the change ([`Ledger::written_after`]).
    pub fn touch(&mut self, device_id: &str) {
        if self.devices.contains(device_id) {
            self.seq += 1;
            self.confirms.insert(device_id.to_owned(), self.seq);
        }
    }

    /// Whether `device_id` was confirmed or touched after `mark`: a list read
    /// under that mark may show its row as it was before.
    pub fn written_after(&self, mark: SyncMark, device_id: &str) -> bool {
        self.confirms
            .get(device_id)
            .is_some_and(|&seq| seq > mark.0)
    }

    /// The insert failed: drops the reservation, freeing its slot. Unknown
    /// reservations are ignored.
    pub fn release(&mut self, reservation: &str) {
        self.reservations.remove(reservation);
    }

    /// Where the ledger stands before the shell queries the device ids; see
    /// [`Ledger::sync_since`].
    pub fn mark(&self) -> SyncMark {
        SyncMark(self.seq)
    }

    /// Replaces the device set with PostgreSQL's `device_ids`, read by a query
    /// started after `mark` was taken, but keeps the devices confirmed after
    /// the mark: the query may have missed their rows, and dropping them would
    /// under-count (see the module docs), and leaves out the devices
    /// forgotten after the mark, which the list may still show. A list read
    /// under an older mark than the last sync's is stale and ignored.
    /// Reservations are untouched; one whose row the list already shows
    /// counts twice until its confirm, which errs on the safe side.
    ///
    /// Returns whether the list was applied (false: it was stale).
    pub fn sync_since(&mut self, mark: SyncMark, device_ids: Vec<String>) -> bool {
        // A confirm is forgotten only by a sync whose query started after it.
        // Applying marks in order means every later sync's query started
        // after it too, so lists its row if the row still exists.
        if mark.0 < self.synced {
            return false;
        }
        self.synced = mark.0;
        self.confirms.retain(|_, &mut seq| seq > mark.0);
        let awaited = !self.reservations.is_empty();
        self.forgotten.retain(|_, &mut seq| seq > mark.0 || awaited);
        self.devices.clear();
        self.devices.extend(
            device_ids
                .into_iter()
                .filter(|id| !self.forgotten.contains_key(id)),
        );
        self.devices.extend(self.confirms.keys().cloned());
        true
    }

    /// Replaces the device set with `device_ids` outright. Exact only when no
    /// confirm ran while the list was being read; prefer
    /// [`Ledger::sync_since`] when reads can interleave with other requests.
    pub fn sync(&mut self, device_ids: Vec<String>) {
        self.synced = self.seq;
        self.confirms.clear();
        self.forgotten.clear();
        self.devices.clear();
        self.devices.extend(device_ids);
    }

    /// Confirmed devices plus live reservations.
    pub fn in_use(&self, now: i64) -> u32 {
        let live = self
            .reservations
            .values()
            .filter(|&&at| is_live(at, now))
            .count();
        u32::try_from(self.devices.len() + live).unwrap_or(u32::MAX)
    }

    /// Devices counted against the limit, reservations aside.
    pub fn confirmed(&self) -> usize {
        self.devices.len()
    }

    /// Whether `device_id` is counted against the limit.
    pub fn counts(&self, device_id: &str) -> bool {
        self.devices.contains(device_id)
    }

    /// Drops every reservation for which `alive` is false: the shell knows
    /// which requests are still running, and a reservation whose request
    /// died (threw, or its object restarted) can never be confirmed or
    /// released by it, so waiting for its expiry would only hold a slot.
    pub fn release_unless(&mut self, alive: impl Fn(&str) -> bool) {
        self.reservations.retain(|id, _| alive(id));
    }
}

/// A reservation made at `at` counts until exactly `RESERVATION_TTL_SECS`
/// later.
fn is_live(at: i64, now: i64) -> bool {
    now < at.saturating_add(RESERVATION_TTL_SECS)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_000_000;

    fn key_of(bytes: [u8; 32]) -> String {
        STANDARD.encode(bytes)
    }

    fn reason(r: Result<impl std::fmt::Debug, Invalid>) -> &'static str {
        r.expect_err("should be refused").reason
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("device-{i}")).collect()
    }

    /// Random-looking reservation bytes, distinct per `i`.
    fn rid(i: u8) -> [u8; 8] {
        [i, 0xa5, 0x5a, i, 1, 2, 3, i]
    }

    // --- public keys -------------------------------------------------------

    #[test]
    fn canonical_keys_are_accepted_verbatim() {
        let mut highest = [0xff; 32];
        highest[0] = 0xec - 1; // p - 2: the largest canonical key but p - 1
        highest[31] = 0x7f;
        for bytes in [[1u8; 32], highest, core::array::from_fn(|i| i as u8)] {
            let s = key_of(bytes);
            assert_eq!(s.len(), 44);
            assert_eq!(PublicKey::parse(&s).unwrap().as_str(), s);
        }
        // A key as `wg pubkey` prints it.
        let wg = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        assert_eq!(PublicKey::parse(wg).unwrap().as_str(), wg);
    }

    #[test]
    fn keys_of_the_wrong_length_are_refused() {
        let good = key_of([7; 32]);
        assert_eq!(
            reason(PublicKey::parse(&good[..43])),
            "must be 44 characters of base64"
        );
        assert_eq!(
            reason(PublicKey::parse(&format!("{good}="))),
            "must be 44 characters of base64"
        );
        assert_eq!(
            reason(PublicKey::parse("")),
            "must be 44 characters of base64"
        );
        // 44 characters that encode 31 or 33 bytes.
        assert_eq!(
            reason(PublicKey::parse(&STANDARD.encode([7u8; 31]))),
            "must encode 32 bytes"
        );
        assert_eq!(
            reason(PublicKey::parse(&STANDARD.encode([7u8; 33]))),
            "must encode 32 bytes"
        );
    }

    #[test]
    fn keys_that_are_not_canonical_standard_base64_are_refused() {
        let good = key_of([0xfb; 32]);
        // URL-safe alphabet: the same bytes spelled with '-' and '_'.
        let url_safe = base64::engine::general_purpose::URL_SAFE.encode([0xfb; 32]);
        assert_ne!(url_safe, good);
        // Not base64 at all.
        let garbage = format!("{}!", &good[..43]);
        // Non-zero padding bits: the character before '=' in a 32-byte key
        // carries 2 unused bits, so "E=" (000100) has a twin "F=" (000101)
        // that decodes to the same bytes in a lenient decoder.
        let canonical = key_of([1; 32]);
        assert_eq!(&canonical[42..], "E=");
        let stray_bits = format!("{}F=", &canonical[..42]);
        let stray_bits_too = format!("{}H=", &canonical[..42]);
        for bad in [url_safe, garbage, stray_bits, stray_bits_too] {
            assert_eq!(
                reason(PublicKey::parse(&bad)),
                "is not canonical standard base64",
                "{bad}"
            );
        }
    }

    #[test]
    fn whitespace_around_or_inside_a_key_is_refused() {
        let good = key_of([9; 32]);
        for bad in [
            format!(" {good}"),
            format!("{good}\n"),
            format!("{} {}", &good[..20], &good[21..]),
            format!("{}\t{}", &good[..20], &good[21..]),
        ] {
            assert!(PublicKey::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn second_spellings_of_a_key_are_refused() {
        // X25519 ignores the top bit: this is the key below, spelled again.
        let key: [u8; 32] = core::array::from_fn(|i| i as u8 * 3 + 1);
        assert!(PublicKey::parse(&key_of(key)).is_ok());
        let mut top = key;
        top[31] |= 0x80;
        // And reads p + k as k: p itself is 0, p + 1 is 1, up to 2^255 - 1.
        let mut p = [0xff; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        let mut p_plus_18 = p;
        p_plus_18[0] = 0xff;
        for bad in [top, p, p_plus_18, [0xff; 32]] {
            assert_eq!(
                reason(PublicKey::parse(&key_of(bad))),
                "is not a canonical Curve25519 key",
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn points_of_small_order_are_refused() {
        for point in SMALL_ORDER {
            assert_eq!(
                reason(PublicKey::parse(&key_of(point))),
                "is a point of small order, which no handshake can use",
                "{point:x?}"
            );
        }
        // Their neighbours are ordinary keys.
        let mut two = [0; 32];
        two[0] = 2;
        assert!(PublicKey::parse(&key_of(two)).is_ok());
    }

    #[test]
    fn the_all_zero_key_is_refused() {
        let zeros = key_of([0; 32]);
        assert_eq!(reason(PublicKey::parse(&zeros)), "is the all-zero key");
        let err = PublicKey::parse(&zeros).unwrap_err();
        assert_eq!(err.field, "public_key");
    }

    // --- names and ids -----------------------------------------------------

    #[test]
    fn names_are_trimmed_and_kept_otherwise_as_given() {
        assert_eq!(DeviceName::parse("  Pixel 8 ").unwrap().as_str(), "Pixel 8");
        assert_eq!(
            DeviceName::parse("Ноутбук — Анны 💻").unwrap().as_str(),
            "Ноутбук — Анны 💻"
        );
        assert_eq!(DeviceName::parse("\u{2003}x\u{a0}").unwrap().as_str(), "x");
    }

    #[test]
    fn names_are_limited_to_64_characters_not_bytes() {
        let max = "é".repeat(MAX_NAME_CHARS);
        assert_eq!(DeviceName::parse(&max).unwrap().as_str(), max);
        assert_eq!(
            reason(DeviceName::parse(&format!("{max}é"))),
            "is longer than 64 characters"
        );
        // Surrounding spaces count, as in the contract's `maxLength`.
        assert_eq!(
            reason(DeviceName::parse(&format!(" {max}"))),
            "is longer than 64 characters"
        );
    }

    #[test]
    fn empty_and_control_character_names_are_refused() {
        assert_eq!(reason(DeviceName::parse("")), "is empty");
        assert_eq!(reason(DeviceName::parse(" \u{2003}\u{a0} ")), "is empty");
        assert_eq!(reason(DeviceName::parse(" \u{200d} ")), "is empty");
        assert_eq!(reason(DeviceName::parse("\u{200d} \u{200c}")), "is empty");
        // Joiners between characters are part of the name (an emoji sequence).
        assert_eq!(
            DeviceName::parse("👩\u{200d}💻 laptop").unwrap().as_str(),
            "👩\u{200d}💻 laptop"
        );
        // Also where trimming would have removed them.
        for bad in [
            "a\tb",
            "a\u{0}b",
            "a\u{1b}[31mb",
            "a\u{7f}",
            "a\u{85}b",
            "x\n",
            "\t\n",
            "\u{202e}enohp",
            "phone\u{200b}",
            "\u{feff}phone",
            "pho\u{ad}ne",
            "\u{2066}x\u{2069}",
        ] {
            assert_eq!(
                reason(DeviceName::parse(bad)),
                "contains control or hidden characters",
                "{bad:?}"
            );
        }
        assert_eq!(DeviceName::parse("").unwrap_err().field, "name");
    }

    #[test]
    fn hyphenated_uuids_of_either_case_are_device_ids_in_lower_case() {
        let id = "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4c";
        assert_eq!(device_id(id).as_deref(), Some(id));
        assert_eq!(
            device_id("0B6F3C2E-8F1A-4D2B-9C3E-5A7B9D1F2E4C").as_deref(),
            Some(id)
        );
        assert_eq!(
            device_id("0b6F3c2E-8f1a-4D2b-9c3e-5a7b9d1f2e4C").as_deref(),
            Some(id)
        );
        let zero = "00000000-0000-0000-0000-000000000000";
        assert_eq!(device_id(zero).as_deref(), Some(zero));
        for bad in [
            "",
            "0b6f3c2e8f1a4d2b9c3e5a7b9d1f2e4c",
            "{0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4c}",
            "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4",
            "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4c0",
            "0b6f3c2e-8f1a-4d2b-9c3e_5a7b9d1f2e4c",
            "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4g",
            "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2é",
            "0B6F3C2E-8F1A-4D2B-9C3E-5A7B9D1F2E4G",
            "../../etc/passwd",
        ] {
            assert_eq!(device_id(bad), None, "{bad}");
        }
    }

    // --- tunnel addresses --------------------------------------------------

    fn addrs(v4: &str, v6: &str) -> Option<(String, String)> {
        Some((v4.to_owned(), v6.to_owned()))
    }

    #[test]
    fn tunnel_addresses_count_up_from_the_start_of_both_ranges() {
        let at = tunnel_addresses;
        assert_eq!(at(1), addrs("10.64.0.1", "fd4b:6565:6e00::1"));
        assert_eq!(at(255), addrs("10.64.0.255", "fd4b:6565:6e00::ff"));
        assert_eq!(at(256), addrs("10.64.1.0", "fd4b:6565:6e00::100"));
        assert_eq!(at(65536), addrs("10.65.0.0", "fd4b:6565:6e00::1:0"));
    }

    #[test]
    fn tunnel_addresses_end_before_the_ipv4_broadcast_address() {
        assert_eq!(
            tunnel_addresses(4_194_302),
            addrs("10.127.255.254", "fd4b:6565:6e00::3f:fffe")
        );
        assert_eq!(tunnel_addresses(4_194_303), None);
        assert_eq!(tunnel_addresses(0), None);
        assert_eq!(tunnel_addresses(u64::MAX), None);
    }

    // --- the ledger --------------------------------------------------------

    #[test]
    fn n_reservations_fit_a_limit_of_n_and_the_next_is_refused() {
        for limit in 0..5u32 {
            let mut ledger = Ledger::default();
            for i in 0..limit {
                assert!(ledger.reserve(limit, T0, rid(i as u8)).is_ok());
            }
            assert_eq!(
                ledger.reserve(limit, T0, rid(99)),
                Err(LimitError::LimitReached {
                    limit,
                    in_use: limit
                })
            );
            assert_eq!(ledger.in_use(T0), limit);
            assert_eq!(ledger.confirmed(), 0);
        }
    }

    #[test]
    fn reservation_ids_are_the_random_bytes_in_hex_and_never_repeat() {
        let mut ledger = Ledger::default();
        let bytes = [0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x0f];
        assert_eq!(ledger.reserve(5, T0, bytes).unwrap(), "deadbeef0001020f");
        // The same random bytes twice (should never happen) still yield two
        // distinct reservations, each holding one slot.
        assert_eq!(ledger.reserve(5, T0, bytes).unwrap(), "deadbeef0001020f-1");
        assert_eq!(ledger.reserve(5, T0, bytes).unwrap(), "deadbeef0001020f-2");
        assert_eq!(ledger.in_use(T0), 3);
        ledger.release("deadbeef0001020f-1");
        assert_eq!(ledger.in_use(T0), 2);
    }

    /// One "add device" request: reserve, then confirm or release.
    #[derive(Clone, Copy, PartialEq)]
    enum Step {
        Reserve,
        Finish,
    }

    /// Runs every interleaving of `requests` two-step requests (each either
    /// confirming or releasing, per `outcomes` bit i) against `limit`, starting
    /// from `existing` synced devices, and checks each reserve against the
    /// exact expectation: it succeeds iff devices plus open reservations are
    /// below the limit.
    fn check_all_interleavings(limit: u32, existing: usize, requests: usize, outcomes: u32) {
        fn go(
            ledger: &Ledger,
            limit: u32,
            outcomes: u32,
            pending: &mut Vec<Vec<Step>>,
            held: &mut Vec<Option<String>>,
            trace: &mut Vec<usize>,
        ) {
            if pending.iter().all(Vec::is_empty) {
                return;
            }
            for r in 0..pending.len() {
                let Some(&step) = pending[r].first() else {
                    continue;
                };
                let mut ledger = ledger.clone();
                let before = held.clone();
                let open = held.iter().filter(|h| h.is_some()).count();
                match step {
                    Step::Reserve => {
                        let expected_ok = ledger.confirmed() + open < limit as usize;
                        let got = ledger.reserve(limit, T0, rid(r as u8));
                        assert_eq!(got.is_ok(), expected_ok, "trace {trace:?} then {r}");
                        held[r] = got.ok();
                    }
                    Step::Finish => {
                        if let Some(reservation) = held[r].take() {
                            if outcomes & (1 << r) != 0 {
                                ledger.confirm(&reservation, &format!("new-{r}"));
                            } else {
                                ledger.release(&reservation);
                            }
                        }
                    }
                }
                // The invariant behind the limit: devices plus open
                // reservations never exceed it (nothing pre-existed above it).
                assert!(ledger.in_use(T0) <= limit.max(ledger.confirmed() as u32));
                assert_eq!(
                    ledger.in_use(T0) as usize,
                    ledger.confirmed() + held.iter().filter(|h| h.is_some()).count()
                );
                let removed = pending[r].remove(0);
                trace.push(r);
                go(&ledger, limit, outcomes, pending, held, trace);
                trace.pop();
                pending[r].insert(0, removed);
                *held = before;
            }
        }

        let mut ledger = Ledger::default();
        ledger.sync(ids(existing));
        let mut pending = vec![vec![Step::Reserve, Step::Finish]; requests];
        let mut held = vec![None; requests];
        go(
            &ledger,
            limit,
            outcomes,
            &mut pending,
            &mut held,
            &mut Vec::new(),
        );
    }

    #[test]
    fn every_interleaving_of_reserve_confirm_and_release_respects_the_limit() {
        for limit in 1..=3u32 {
            for existing in 0..limit as usize {
                let requests = (limit as usize - existing) + 1;
                for outcomes in 0..(1u32 << requests) {
                    check_all_interleavings(limit, existing, requests, outcomes);
                }
            }
        }
    }

    #[test]
    fn a_released_slot_can_be_taken_again() {
        let mut ledger = Ledger::default();
        let a = ledger.reserve(1, T0, rid(1)).unwrap();
        assert!(ledger.reserve(1, T0, rid(2)).is_err());
        ledger.release(&a);
        let b = ledger.reserve(1, T0, rid(2)).unwrap();
        ledger.confirm(&b, "dev-b");
        assert!(ledger.reserve(1, T0, rid(3)).is_err());
        assert_eq!(ledger.confirmed(), 1);
    }

    #[test]
    fn an_abandoned_reservation_frees_its_slot_exactly_at_the_ttl() {
        let mut ledger = Ledger::default();
        ledger.reserve(1, T0, rid(1)).unwrap();
        let just_before = T0 + RESERVATION_TTL_SECS - 1;
        assert_eq!(ledger.in_use(just_before), 1);
        assert!(ledger.reserve(1, just_before, rid(2)).is_err());
        let at_ttl = T0 + RESERVATION_TTL_SECS;
        assert_eq!(ledger.in_use(at_ttl), 0);
        assert!(ledger.reserve(1, at_ttl, rid(2)).is_ok());
        // The expired reservation was dropped from the state, not just ignored.
        assert_eq!(ledger.reservations.len(), 1);
    }

    #[test]
    fn a_late_confirm_still_records_the_device_until_a_sync_says_otherwise() {
        let mut ledger = Ledger::default();
        let slow = ledger.reserve(1, T0, rid(1)).unwrap();
        // The slow request's reservation expires and another takes the slot.
        let later = T0 + RESERVATION_TTL_SECS;
        let fast = ledger.reserve(1, later, rid(2)).unwrap();
        ledger.confirm(&fast, "fast");
        // The slow insert committed after all: the row exists, so it counts,
        // even though that is over the limit.
        ledger.confirm(&slow, "slow");
        assert_eq!(ledger.confirmed(), 2);
        assert_eq!(ledger.in_use(later), 2);
        // A confirm with a reservation the ledger never saw counts too.
        ledger.confirm("0123456789abcdef", "unknown");
        assert_eq!(ledger.confirmed(), 3);
        // PostgreSQL's answer is the truth (the shell may have deleted rows
        // over the limit, or the slow insert was in fact rolled back).
        let mark = ledger.mark();
        ledger.sync_since(mark, vec!["fast".into()]);
        assert_eq!(ledger.confirmed(), 1);
        assert_eq!(ledger.in_use(later), 1);
    }

    #[test]
    fn a_confirm_after_the_mark_survives_a_sync_that_missed_its_row() {
        // Request A has inserted and is reading the device ids; meanwhile B's
        // insert commits after A's snapshot and B confirms.
        let mut ledger = Ledger::default();
        let a = ledger.reserve(2, T0, rid(1)).unwrap();
        ledger.confirm(&a, "a");
        let mark = ledger.mark();
        let b = ledger.reserve(2, T0, rid(2)).unwrap();
        ledger.confirm(&b, "b");
        ledger.sync_since(mark, vec!["a".into()]);
        // B's device still counts, so a third request is refused.
        assert_eq!(ledger.confirmed(), 2);
        assert!(ledger.reserve(2, T0, rid(3)).is_err());
        // A later sync whose query started after B's confirm is exact: had
        // B's device been deleted meanwhile, it is gone now.
        let mark = ledger.mark();
        ledger.sync_since(mark, vec!["a".into()]);
        assert_eq!(ledger.confirmed(), 1);
        assert!(ledger.confirms.is_empty());
    }

    #[test]
    fn a_device_deleted_before_its_insert_is_confirmed_is_not_counted() {
        // A registration's insert commits; before its answer reaches the
        // object, the client sees the row in its list and deletes it (the
        // delete syncs under the mark it took before deleting), and only
        // then does the registration confirm and sync with the list its
        // insert returned.
        let mut ledger = Ledger::default();
        let r = ledger.reserve(1, T0, rid(1)).unwrap();
        let insert_mark = ledger.mark();
        let delete_mark = ledger.mark();
        ledger.forget("x");
        ledger.sync_since(delete_mark, vec![]);
        ledger.confirm(&r, "x");
        ledger.sync_since(insert_mark, vec!["x".into()]);
        assert!(!ledger.counts("x"), "{ledger:?}");
        assert_eq!(ledger.in_use(T0), 0);
        assert!(ledger.reserve(1, T0, rid(2)).is_ok());

        // Also when a sync read after the delete comes in between: the
        // device is remembered as deleted while the insert is outstanding.
        let mut ledger = Ledger::default();
        let r = ledger.reserve(1, T0, rid(1)).unwrap();
        let delete_mark = ledger.mark();
        ledger.forget("x");
        ledger.sync_since(delete_mark, vec![]);
        let later = ledger.mark();
        ledger.sync_since(later, vec![]);
        ledger.confirm(&r, "x");
        assert!(!ledger.counts("x"), "{ledger:?}");
        // With nothing outstanding, the next sync lets the entry go.
        let last = ledger.mark();
        ledger.sync_since(last, vec![]);
        assert!(ledger.forgotten.is_empty(), "{ledger:?}");
    }

    #[test]
    fn a_touched_device_is_written_after_any_older_mark_until_a_newer_sync() {
        let mut ledger = Ledger::default();
        let r = ledger.reserve(2, T0, rid(1)).unwrap();
        ledger.confirm(&r, "d");
        let settled = ledger.mark();
        ledger.sync_since(settled, vec!["d".into()]);
        assert!(!ledger.written_after(settled, "d"));
        // A registration takes its mark; the key of d is rotated meanwhile.
        let before = ledger.mark();
        ledger.touch("d");
        assert!(ledger.written_after(before, "d"));
        // The rotation's own list, and the registration's, both read under
        // the older mark: d stays written after it.
        ledger.sync_since(before, vec!["d".into()]);
        assert!(ledger.written_after(before, "d"));
        assert_eq!(ledger.confirmed(), 1);
        // A list read after the rotation lets it go.
        let after = ledger.mark();
        ledger.sync_since(after, vec!["d".into()]);
        assert!(!ledger.written_after(after, "d"));
        // An uncounted device is not touched.
        ledger.touch("gone");
        assert!(!ledger.written_after(after, "gone"));
        assert_eq!(ledger.confirmed(), 1);
    }

    #[test]
    fn a_list_read_before_the_last_applied_sync_is_ignored() {
        let mut ledger = Ledger::default();
        let a = ledger.reserve(2, T0, rid(1)).unwrap();
        ledger.confirm(&a, "a");
        // A starts reading; B's insert commits and confirms; B reads and
        // syncs first; A's older answer arrives last.
        let mark_a = ledger.mark();
        let b = ledger.reserve(2, T0, rid(2)).unwrap();
        ledger.confirm(&b, "b");
        let mark_b = ledger.mark();
        ledger.sync_since(mark_b, vec!["a".into(), "b".into()]);
        ledger.sync_since(mark_a, vec!["a".into()]);
        assert_eq!(ledger.confirmed(), 2);
        assert!(ledger.reserve(2, T0, rid(3)).is_err());
        // Syncs under the same mark (deletes, with no confirm between) apply.
        ledger.sync_since(mark_b, vec!["b".into()]);
        assert_eq!(ledger.confirmed(), 1);
    }

    #[test]
    fn a_plain_sync_with_a_stale_list_under_counts_which_is_why_sync_since_exists() {
        let mut ledger = Ledger::default();
        let a = ledger.reserve(2, T0, rid(1)).unwrap();
        ledger.confirm(&a, "a");
        let b = ledger.reserve(2, T0, rid(2)).unwrap();
        ledger.confirm(&b, "b");
        ledger.sync(vec!["a".into()]);
        assert_eq!(ledger.confirmed(), 1);
        assert!(ledger.reserve(2, T0, rid(3)).is_ok());
    }

    /// Steps of one "add device" request in the database model.
    #[derive(Clone, Copy, Debug)]
    enum DbStep {
        Reserve,
        /// The `INSERT` commits (if the reserve succeeded).
        Commit,
        Confirm,
        /// Takes the mark and reads the committed ids (a snapshot).
        Query,
        Sync,
    }

    #[derive(Clone, Default)]
    struct Request {
        reservation: Option<String>,
        refused: bool,
        snapshot: Option<(SyncMark, Vec<String>)>,
    }

    #[test]
    fn with_sync_since_no_interleaving_of_inserts_and_syncs_exceeds_the_limit() {
        use DbStep::*;
        const LIMIT: u32 = 2;

        fn go(
            ledger: &Ledger,
            db: &BTreeSet<String>,
            reqs: &[Request],
            steps: &[Vec<DbStep>],
            runs: &mut u64,
        ) {
            if steps.iter().all(Vec::is_empty) {
                *runs += 1;
                // Once everyone has finished and synced, the ledger is exact.
                let mut ledger = ledger.clone();
                let mark = ledger.mark();
                ledger.sync_since(mark, db.iter().cloned().collect());
                assert_eq!(ledger.confirmed(), db.len());
                return;
            }
            for r in 0..steps.len() {
                let Some((&step, rest)) = steps[r].split_first() else {
                    continue;
                };
                let (mut ledger, mut db, mut reqs) = (ledger.clone(), db.clone(), reqs.to_vec());
                let device = format!("dev-{r}");
                let req = &mut reqs[r];
                match step {
                    Reserve => match ledger.reserve(LIMIT, T0, rid(r as u8)) {
                        Ok(id) => req.reservation = Some(id),
                        Err(_) => req.refused = true,
                    },
                    Commit if !req.refused => {
                        db.insert(device);
                    }
                    Confirm if !req.refused => {
                        ledger.confirm(req.reservation.as_deref().unwrap(), &device)
                    }
                    Query => req.snapshot = Some((ledger.mark(), db.iter().cloned().collect())),
                    Sync => {
                        let (mark, list) = req.snapshot.take().unwrap();
                        ledger.sync_since(mark, list);
                    }
                    _ => {}
                }
                // The point of it all: the ledger never counts fewer slots
                // than requests hold (rows committed or about to be), so
                // PostgreSQL never holds more devices than the limit.
                let held = reqs.iter().filter(|q| q.reservation.is_some()).count();
                assert!(ledger.in_use(T0) as usize >= held);
                assert!(db.len() <= LIMIT as usize);
                let mut steps = steps.to_vec();
                steps[r] = rest.to_vec();
                go(&ledger, &db, &reqs, &steps, runs);
            }
        }

        let full = vec![Reserve, Commit, Confirm, Query, Sync];
        let steps = vec![full.clone(), full, vec![Reserve, Commit, Confirm]];
        let mut runs = 0;
        go(
            &Ledger::default(),
            &BTreeSet::new(),
            &vec![Request::default(); 3],
            &steps,
            &mut runs,
        );
        // 13! / (5! 5! 3!) interleavings.
        assert_eq!(runs, 72_072);
    }

    #[test]
    fn sync_replaces_the_device_set_and_keeps_reservations() {
        let mut ledger = Ledger::default();
        ledger.sync(ids(3));
        let r = ledger.reserve(5, T0, rid(1)).unwrap();
        ledger.sync(vec!["x".into(), "y".into(), "x".into()]);
        assert_eq!(ledger.confirmed(), 2);
        assert_eq!(ledger.in_use(T0), 3);
        ledger.sync(Vec::new());
        assert_eq!(ledger.confirmed(), 0);
        ledger.confirm(&r, "z");
        assert_eq!(ledger.in_use(T0), 1);
        // Confirming the same device twice counts it once.
        ledger.confirm(&r, "z");
        assert_eq!(ledger.confirmed(), 1);
    }

    #[test]
    fn a_downgrade_keeps_existing_devices_but_refuses_new_ones() {
        let mut ledger = Ledger::default();
        ledger.sync(ids(5));
        assert_eq!(
            ledger.reserve(3, T0, rid(1)),
            Err(LimitError::LimitReached {
                limit: 3,
                in_use: 5
            })
        );
        assert_eq!(ledger.confirmed(), 5);
        // Removing devices down to the limit is not enough; below it is.
        ledger.sync(ids(3));
        assert!(ledger.reserve(3, T0, rid(1)).is_err());
        ledger.sync(ids(2));
        assert!(ledger.reserve(3, T0, rid(1)).is_ok());
        // An upgrade takes effect at once.
        assert!(ledger.reserve(10, T0, rid(2)).is_ok());
    }

    #[test]
    fn reservations_of_dead_requests_are_released_at_once() {
        let mut ledger = Ledger::default();
        let dead = ledger.reserve(2, T0, rid(1)).unwrap();
        let running = ledger.reserve(2, T0, rid(2)).unwrap();
        assert!(ledger.reserve(2, T0, rid(3)).is_err(), "both slots taken");
        ledger.release_unless(|id| id == running);
        assert_eq!(ledger.in_use(T0), 1, "only the running one still counts");
        let again = ledger.reserve(2, T0, rid(3)).unwrap();
        assert_ne!(again, dead);
        // Confirmed devices are not reservations: nothing releases them.
        ledger.confirm(&running, "d1");
        ledger.release_unless(|_| false);
        assert_eq!(ledger.in_use(T0), 1);
        assert!(ledger.counts("d1") && !ledger.counts("d2"));
    }

    #[test]
    fn sync_since_says_whether_it_applied_the_list() {
        let mut ledger = Ledger::default();
        let old = ledger.mark();
        let r = ledger.reserve(5, T0, rid(1)).unwrap();
        ledger.confirm(&r, "a");
        let new = ledger.mark();
        assert!(ledger.sync_since(new, vec!["a".into()]));
        assert!(!ledger.sync_since(old, vec![]), "an older list is stale");
        assert!(ledger.counts("a"));
    }

    #[test]
    fn the_ledger_round_trips_through_compact_json() {
        let mut ledger = Ledger::default();
        assert_eq!(serde_json::to_string(&ledger).unwrap(), "{}");
        assert_eq!(
            serde_json::from_str::<Ledger>("{}").unwrap(),
            Ledger::default()
        );
        ledger.sync(vec!["a".into()]);
        let r = ledger.reserve(5, T0, [0, 0, 0, 0, 0, 0, 0, 1]).unwrap();
        let json = serde_json::to_string(&ledger).unwrap();
        assert_eq!(
            json,
            r#"{"devices":["a"],"reservations":{"0000000000000001":1000000}}"#
        );
        ledger.confirm(&r, "b");
        let json = serde_json::to_string(&ledger).unwrap();
        let back: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ledger);
        assert_eq!(back.mark(), ledger.mark());
    }
}

/// Properties over generated inputs and histories (shrinking to a minimal
/// one). Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// One step of the registration protocol, as the user's object and
    /// PostgreSQL see it. Indices pick among what is pending at the time.
    #[derive(Debug, Clone)]
    enum Step {
        /// A request reserves a slot.
        Reserve,
        /// A pending insert commits (only while its reservation is live:
        /// the shell bounds inserts well below the TTL). Its answer reaches
        /// the object later, at a [`Step::Confirm`]: meanwhile the device
        /// is in PostgreSQL, and a delete can remove it.
        Commit(prop::sample::Index),
        /// A committed insert's answer reaches the object, which confirms.
        Confirm(prop::sample::Index),
        /// A pending insert fails and releases its slot.
        Fail(prop::sample::Index),
        /// A request dies between reserving and confirming (it threw, or
        /// its object restarted): nothing confirms or releases its slot.
        Die(prop::sample::Index),
        /// The shell releases the reservations of requests no longer running.
        Reap,
        /// A device is deleted.
        Delete(prop::sample::Index),
        /// The shell takes a mark and queries the device ids.
        SyncStart,
        /// One of the queries in flight answers (in any order).
        SyncDeliver(prop::sample::Index),
        /// Time passes.
        Advance(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Reserve),
            3 => any::<prop::sample::Index>().prop_map(Step::Commit),
            3 => any::<prop::sample::Index>().prop_map(Step::Confirm),
            1 => any::<prop::sample::Index>().prop_map(Step::Fail),
            1 => any::<prop::sample::Index>().prop_map(Step::Die),
            1 => Just(Step::Reap),
            1 => any::<prop::sample::Index>().prop_map(Step::Delete),
            2 => Just(Step::SyncStart),
            2 => any::<prop::sample::Index>().prop_map(Step::SyncDeliver),
            2 => (0i64..=RESERVATION_TTL_SECS).prop_map(Step::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// However requests, commits, failures, deaths, reaps, deletions,
        /// time and out-of-order syncs interleave, the committed devices plus the
        /// inserts still in flight never exceed the limit, and the ledger
        /// never counts fewer than exist.
        ///
        /// Reservation ids are distinct here, as 64 bits from a CSPRNG are:
        /// the guarantee rests on that. (With ids forced to repeat, a late
        /// release of an expired reservation can free a newer one that drew
        /// the same bytes; shrunk, that takes a repeat of all 64 bits.)
        #[test]
        fn the_ledger_never_lets_the_devices_exceed_the_limit(
            limit in 0u32..6,
            steps in prop::collection::vec(step(), 0..120),
        ) {
            let mut ledger = Ledger::default();
            let mut now = 1_000_000_i64;
            let mut db: BTreeSet<String> = BTreeSet::new();
            let mut pending: Vec<(String, i64)> = Vec::new();
            // Inserts committed whose answers are on their way: reservation
            // and device.
            let mut committed: Vec<(String, String)> = Vec::new();
            // A device-id query's answer: its mark, the ids, and the device
            // the request deleted, if it was a delete.
            let mut queries: Vec<(SyncMark, Vec<String>, Option<String>)> = Vec::new();
            // The shell applies an answer: the list, then its own delete.
            let deliver = |ledger: &mut Ledger, (mark, ids, deleted): (SyncMark, Vec<String>, Option<String>)| {
                ledger.sync_since(mark, ids);
                if let Some(device) = deleted {
                    ledger.forget(&device);
                }
            };
            let mut next_device = 0u32;
            let mut next_id = 0u64;
            for step in steps {
                match step {
                    Step::Reserve => {
                        let before = ledger.in_use(now);
                        next_id += 1;
                        match ledger.reserve(limit, now, next_id.to_be_bytes()) {
                            Ok(reservation) => {
                                prop_assert!(before < limit);
                                pending.push((reservation, now));
                            }
                            Err(LimitError::LimitReached { in_use, .. }) => {
                                prop_assert!(before >= limit);
                                prop_assert_eq!(in_use, before);
                            }
                        }
                    }
                    Step::Commit(i) if !pending.is_empty() => {
                        let (reservation, at) = pending.remove(i.index(pending.len()));
                        if is_live(at, now) {
                            next_device += 1;
                            let device = format!("device-{next_device}");
                            db.insert(device.clone());
                            committed.push((reservation, device));
                        }
                    }
                    Step::Confirm(i) if !committed.is_empty() => {
                        let (reservation, device) = committed.remove(i.index(committed.len()));
                        ledger.confirm(&reservation, &device);
                    }
                    Step::Fail(i) if !pending.is_empty() => {
                        let (reservation, _) = pending.remove(i.index(pending.len()));
                        ledger.release(&reservation);
                    }
                    Step::Die(i) if !pending.is_empty() => {
                        pending.remove(i.index(pending.len()));
                    }
                    Step::Reap => {
                        ledger.release_unless(|id| {
                            pending.iter().any(|(r, _)| r == id)
                                || committed.iter().any(|(r, _)| r == id)
                        });
                    }
                    // The delete request: a mark, the DELETE, then the list;
                    // its answer is delivered like any sync's, with the
                    // device it deleted.
                    Step::Delete(i) if !db.is_empty() => {
                        let mark = ledger.mark();
                        let device = db.iter().nth(i.index(db.len())).cloned().unwrap();
                        db.remove(&device);
                        queries.push((mark, db.iter().cloned().collect(), Some(device)));
                    }
                    Step::SyncStart => queries.push((ledger.mark(), db.iter().cloned().collect(), None)),
                    Step::SyncDeliver(i) if !queries.is_empty() => {
                        deliver(&mut ledger, queries.remove(i.index(queries.len())));
                    }
                    // An insert's answer comes within milliseconds, far
                    // inside the reservation's TTL: before time moves on.
                    Step::Advance(secs) => {
                        for (reservation, device) in committed.drain(..) {
                            ledger.confirm(&reservation, &device);
                        }
                        now += secs;
                    }
                    _ => {}
                }
                let live_pending = pending.iter().filter(|(_, at)| is_live(*at, now)).count();
                let exist = db.len() + live_pending;
                prop_assert!(exist <= limit as usize, "{} devices and inserts, limit {}", exist, limit);
                prop_assert!(ledger.in_use(now) as usize >= exist, "the ledger under-counts");
            }
            // Once every request has finished and every answer has arrived
            // (in order), the ledger counts exactly the devices that exist:
            // any over-count was temporary.
            for (reservation, _) in pending.drain(..) {
                ledger.release(&reservation);
            }
            for (reservation, device) in committed.drain(..) {
                ledger.confirm(&reservation, &device);
            }
            for answer in queries.drain(..) {
                deliver(&mut ledger, answer);
            }
            let counted: BTreeSet<&String> = ledger.devices.iter().collect();
            prop_assert_eq!(counted, db.iter().collect::<BTreeSet<_>>());
        }

        /// After a downgrade below the current count, every reservation is
        /// refused and nothing is taken away.
        #[test]
        fn a_downgrade_refuses_new_devices_and_keeps_the_old(
            devices in prop::collection::btree_set("[a-f0-9]{8}", 1..10),
            lower_by in 0u32..10,
            id in any::<[u8; 8]>(),
        ) {
            let mut ledger = Ledger::default();
            ledger.sync(devices.iter().cloned().collect());
            let limit = (devices.len() as u32).saturating_sub(lower_by);
            let before = ledger.clone();
            prop_assert!(ledger.reserve(limit, 0, id).is_err());
            prop_assert_eq!(ledger.confirmed(), devices.len());
            prop_assert_eq!(ledger, before);
        }

        /// Exactly the canonical Curve25519 keys (below p) other than the
        /// points of small order parse, from their canonical spelling, and
        /// keep it; the URL-safe alphabet, missing padding or surrounding
        /// space never parse.
        #[test]
        fn public_keys_parse_exactly_in_their_canonical_spelling(key in any::<[u8; 32]>()) {
            let canonical = STANDARD.encode(key);
            // A number below p (top bit clear), neither zero nor of small order.
            let usable = key[31] & 0x80 == 0
                && !is_at_least_p(&key)
                && key != [0; 32]
                && !SMALL_ORDER.contains(&key);
            match PublicKey::parse(&canonical) {
                Ok(parsed) => {
                    prop_assert!(usable, "{:x?}", key);
                    prop_assert_eq!(parsed.as_str(), canonical.as_str());
                }
                Err(_) => prop_assert!(!usable, "{:x?}", key),
            }
            let url_safe = canonical.replace('+', "-").replace('/', "_");
            if url_safe != canonical {
                prop_assert!(PublicKey::parse(&url_safe).is_err());
            }
            prop_assert!(PublicKey::parse(canonical.trim_end_matches('=')).is_err());
            let spaced = format!(" {canonical}");
            prop_assert!(PublicKey::parse(&spaced).is_err());
        }

        /// Whatever text is offered, a key that parses is 44 characters that
        /// decode to 32 non-zero bytes, the top bit clear, and re-encode to
        /// the same text.
        #[test]
        fn whatever_parses_as_a_key_is_canonical(s in "[A-Za-z0-9+/=_-]{42,46}") {
            if let Ok(key) = PublicKey::parse(&s) {
                let bytes = STANDARD.decode(key.as_str()).unwrap();
                prop_assert_eq!(bytes.len(), 32);
                prop_assert!(bytes.iter().any(|b| *b != 0));
                prop_assert_eq!(bytes[31] & 0x80, 0);
                prop_assert_eq!(STANDARD.encode(&bytes), s);
            }
        }

        /// Tunnel addresses are distinct for distinct sequence numbers and
        /// stay inside the fleet's ranges.
        #[test]
        fn tunnel_addresses_are_unique_and_in_range(a in 1u64..=IPV4_HOSTS, b in 1u64..=IPV4_HOSTS) {
            let (v4a, v6a) = tunnel_addresses(a).unwrap();
            let (v4b, v6b) = tunnel_addresses(b).unwrap();
            prop_assert_eq!(a == b, v4a == v4b);
            prop_assert_eq!(a == b, v6a == v6b);
            let v4: Ipv4Addr = v4a.parse().unwrap();
            prop_assert_eq!(u32::from(v4) >> 22, IPV4_BASE >> 22);
            let v6: Ipv6Addr = v6a.parse().unwrap();
            prop_assert_eq!(u128::from(v6) >> 80, IPV6_BASE >> 80);
        }
    }
}
