//! `Idempotency-Key` on mutating endpoints: a client that retries a request
//! (because it never saw our answer) gets the first answer again instead of a
//! second effect.
//!
//! The records live in the user's Durable Object, so keys are per user and
//! one user's requests are decided one at a time. A request goes through
//! [`Records::begin`] before doing anything:
//!
//! - a key never seen (or forgotten) is recorded as *in flight* and the request
//!   [`Begin::Proceed`]s; when it succeeds the shell stores the response with
//!   [`Records::complete`], when it fails without effect it
//!   [`Records::abandon`]s the key so a retry runs again;
//! - a retry of a completed request gets [`Begin::Replay`] of the stored
//!   response;
//! - a retry that arrives while the first attempt still runs gets
//!   [`Begin::InFlight`] (the shell answers 409 and the client tries later),
//!   rather than running twice;
//! - the same key with a different request is a client bug, not a retry:
//!   [`Begin::Mismatch`] (422), whether the first is in flight or completed.
//!
//! "The same request" means the same [`fingerprint`]: a SHA-256 over method,
//! path and body, so records stay small whatever the body size.
//!
//! # Expiry
//!
//! Nothing here reads a clock; `now` (unix seconds) is an argument. A completed
//! response is replayed for [`RETENTION_SECS`] after completion. An in-flight
//! record stops blocking its key [`IN_FLIGHT_TTL_SECS`] after it began, so a
//! crashed request cannot wedge a key; the shell must finish well within that.
//! Expired records are treated as absent by every method, whether or not
//! [`Records::prune`] has dropped them yet; pruning also caps the count at
//! [`MAX_RECORDS`] so the stored state stays bounded.

use crate::domain::account::Invalid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const MAX_KEY_LEN: usize = 255;
/// A completed response is replayed for a day.
pub const RETENTION_SECS: i64 = 24 * 3600;
/// A crashed request does not block its key for longer than this.
pub const IN_FLIGHT_TTL_SECS: i64 = 60;
/// At most this many records are kept per user; the oldest go first.
pub const MAX_RECORDS: usize = 100;

/// An `Idempotency-Key` header value: 1..=255 printable ASCII characters
/// (0x21..=0x7e; no spaces). Taken verbatim: keys are opaque and compared
/// exactly.
pub fn parse_key(s: &str) -> Result<String, Invalid> {
    let bad = |reason| Invalid {
        field: "Idempotency-Key",
        reason,
    };
    if s.is_empty() {
        return Err(bad("is empty"));
    }
    if s.len() > MAX_KEY_LEN {
        return Err(bad("is longer than 255 characters"));
    }
    if !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(bad("must be printable ASCII without spaces"));
    }
    Ok(s.to_owned())
}

/// Lowercase hex SHA-256 of the request, so that "same key, different request"
/// is detectable. `body` should be the canonical bytes of the body (as the
/// shell re-serialises the parsed input), so that formatting differences do
/// not count as a different request.
///
/// Method and path are length-prefixed (u64 big-endian) so no two different
/// requests hash the same input: `("POST", "/a", "b")` and `("POST", "/ab", "")`
/// would collide under plain concatenation.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    for part in [method.as_bytes(), path.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(body);
    hex::encode(hash.finalize())
}

/// A response to replay: its status and body (the JSON text as sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
}

/// What to do with a request carrying an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// First time: run it (the key is now in flight).
    Proceed,
    /// Already done: answer this instead of running it again.
    Replay(StoredResponse),
    /// The same request is still running: ask the client to retry later.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

/// One key's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    #[serde(rename = "fp")]
    fingerprint: String,
    /// When it began (in flight) or completed (with a response).
    at: i64,
    /// `None` while in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response: Option<StoredResponse>,
}

impl Record {
    fn is_live(&self, now: i64) -> bool {
        let ttl = match self.response {
            Some(_) => RETENTION_SECS,
            None => IN_FLIGHT_TTL_SECS,
        };
        now < self.at.saturating_add(ttl)
    }
}

/// The idempotency records of one user, stored as JSON in their Durable Object
/// (a plain object: key -> record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Records {
    records: BTreeMap<String, Record>,
}

impl Records {
    /// New (or expired) key: records it as in flight and says
    /// [`Begin::Proceed`]. Same key and fingerprint: [`Begin::Replay`] if
    /// completed, [`Begin::InFlight`] if still running. Different fingerprint:
    /// [`Begin::Mismatch`], in flight or completed; the record is untouched.
    pub fn begin(&mut self, key: &str, fingerprint: &str, now: i64) -> Begin {
        match self.records.get(key).filter(|r| r.is_live(now)) {
            Some(r) if r.fingerprint != fingerprint => Begin::Mismatch,
            Some(Record {
                response: Some(response),
                ..
            }) => Begin::Replay(response.clone()),
            Some(_) => Begin::InFlight,
            None => {
                let record = Record {
                    fingerprint: fingerprint.to_owned(),
                    at: now,
                    response: None,
                };
                self.records.insert(key.to_owned(), record);
                Begin::Proceed
            }
        }
    }

    /// Stores the response to replay for the key's retries, for
    /// [`RETENTION_SECS`] from `now`. (The shell stores only successful
    /// responses; a failure with effect is still a success to replay.) A key
    /// with no record (pruned away meanwhile) is ignored: its fingerprint is
    /// gone, so nothing safe could be stored.
    pub fn complete(&mut self, key: &str, response: StoredResponse, now: i64) {
        if let Some(record) = self.records.get_mut(key) {
            record.at = now;
            record.response = Some(response);
        }
    }

    /// The request failed without effect: forgets the key so a retry runs
    /// again. Only an in-flight record is forgotten; a completed one stays,
    /// since a late abandon (from an attempt whose record had expired and
    /// been taken over by a retry that then completed) must not erase it.
    pub fn abandon(&mut self, key: &str) {
        if self.records.get(key).is_some_and(|r| r.response.is_none()) {
            self.records.remove(key);
        }
    }

    /// Forgets the key's record, in flight or completed: its first request's
    /// effect is gone (a session opened under it has ended), so the key
    /// names nothing to replay.
    pub fn forget(&mut self, key: &str) {
        self.records.remove(key);
    }

    /// Forgets every in-flight record for which `alive` is false: the shell
    /// knows which requests are still running, and a key whose request died
    /// (threw, or its object restarted) would otherwise answer
    /// [`Begin::InFlight`] to every retry until [`IN_FLIGHT_TTL_SECS`].
    /// Completed records are kept.
    pub fn abandon_unless(&mut self, alive: impl Fn(&str) -> bool) {
        self.records
            .retain(|key, r| r.response.is_some() || alive(key));
    }

    /// Drops completed records older than [`RETENTION_SECS`] and in-flight
    /// ones older than [`IN_FLIGHT_TTL_SECS`], then the oldest records beyond
    /// [`MAX_RECORDS`], so the stored state stays bounded.
    pub fn prune(&mut self, now: i64) {
        self.records.retain(|_, r| r.is_live(now));
        let excess = self.records.len().saturating_sub(MAX_RECORDS);
        if excess > 0 {
            let mut by_age: Vec<(i64, String)> = self
                .records
                .iter()
                .map(|(key, r)| (r.at, key.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, key) in by_age.into_iter().take(excess) {
                self.records.remove(&key);
            }
        }
    }

    /// How many records are kept (expired ones included until pruned).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_000_000;

    fn fp(body: &str) -> String {
        fingerprint("POST", "/v1/devices", body.as_bytes())
    }

    fn created(body: &str) -> StoredResponse {
        StoredResponse {
            status: 201,
            body: body.to_owned(),
        }
    }

    fn reason(r: Result<String, Invalid>) -> &'static str {
        r.expect_err("should be refused").reason
    }

    // --- keys and fingerprints --------------------------------------------

    #[test]
    fn printable_ascii_keys_up_to_255_characters_are_accepted() {
        for key in [
            "a",
            "3f2b9c1e-7d4a-4e8b-9a6c-1d2e3f4a5b6c",
            "!~\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}",
        ] {
            assert_eq!(parse_key(key).unwrap(), key);
        }
        let longest = "k".repeat(MAX_KEY_LEN);
        assert_eq!(parse_key(&longest).unwrap(), longest);
    }

    #[test]
    fn empty_long_spaced_non_ascii_and_control_keys_are_refused() {
        assert_eq!(reason(parse_key("")), "is empty");
        assert_eq!(
            reason(parse_key(&"k".repeat(MAX_KEY_LEN + 1))),
            "is longer than 255 characters"
        );
        for bad in [
            "a b", " a", "a ", "ключ", "a\u{e9}", "a\tb", "a\nb", "a\0", "a\u{7f}",
        ] {
            assert_eq!(
                reason(parse_key(bad)),
                "must be printable ASCII without spaces",
                "{bad:?}"
            );
        }
        assert_eq!(parse_key("").unwrap_err().field, "Idempotency-Key");
    }

    #[test]
    fn fingerprints_are_stable_lowercase_sha256_hex() {
        let a = fp(r#"{"name":"phone"}"#);
        assert_eq!(a, fp(r#"{"name":"phone"}"#));
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // Pinned (computed independently: SHA-256 of u64be(4) "POST"
        // u64be(11) "/v1/devices" "{}"), so a change of construction, which
        // would turn every stored record into a mismatch on deploy, is a
        // deliberate one.
        assert_eq!(
            fingerprint("POST", "/v1/devices", b"{}"),
            "89401a0c94baf8554bc7091cea5a0189a637db27341744d8f6ee29a92660bae7"
        );
    }

    #[test]
    fn fingerprints_differ_by_method_path_and_body() {
        let base = fingerprint("POST", "/v1/devices", b"{}");
        for other in [
            fingerprint("PUT", "/v1/devices", b"{}"),
            fingerprint("post", "/v1/devices", b"{}"),
            fingerprint("POST", "/v1/devices/x", b"{}"),
            fingerprint("POST", "/v1/devices", b"{ }"),
            fingerprint("POST", "/v1/devices", b""),
        ] {
            assert_ne!(base, other);
        }
        // Moving bytes between the parts changes the fingerprint.
        assert_ne!(
            fingerprint("POST", "/a", b"b"),
            fingerprint("POST", "/ab", b"")
        );
        assert_ne!(
            fingerprint("POST/", "a", b""),
            fingerprint("POST", "/a", b"")
        );
    }

    // --- begin / complete / abandon ----------------------------------------

    #[test]
    fn a_new_key_proceeds_and_is_then_in_flight() {
        let mut records = Records::default();
        assert_eq!(records.begin("k", &fp("a"), T0), Begin::Proceed);
        assert_eq!(records.begin("k", &fp("a"), T0 + 1), Begin::InFlight);
        // Other keys are independent.
        assert_eq!(records.begin("other", &fp("a"), T0 + 1), Begin::Proceed);
    }

    #[test]
    fn a_completed_key_replays_its_response() {
        let mut records = Records::default();
        records.begin("k", &fp("a"), T0);
        records.complete("k", created(r#"{"id":"d1"}"#), T0 + 2);
        for now in [T0 + 2, T0 + 100] {
            assert_eq!(
                records.begin("k", &fp("a"), now),
                Begin::Replay(created(r#"{"id":"d1"}"#))
            );
        }
    }

    #[test]
    fn a_different_request_under_the_same_key_is_a_mismatch() {
        let mut records = Records::default();
        records.begin("k", &fp("a"), T0);
        assert_eq!(records.begin("k", &fp("b"), T0 + 1), Begin::Mismatch);
        records.complete("k", created("{}"), T0 + 2);
        assert_eq!(records.begin("k", &fp("b"), T0 + 3), Begin::Mismatch);
        // The mismatch changed nothing.
        assert_eq!(
            records.begin("k", &fp("a"), T0 + 4),
            Begin::Replay(created("{}"))
        );
    }

    #[test]
    fn an_in_flight_record_stops_blocking_exactly_at_its_ttl() {
        let mut records = Records::default();
        records.begin("k", &fp("a"), T0);
        let edge = T0 + IN_FLIGHT_TTL_SECS;
        assert_eq!(records.begin("k", &fp("a"), edge - 1), Begin::InFlight);
        assert_eq!(records.begin("k", &fp("b"), edge - 1), Begin::Mismatch);
        // At the TTL the key is free, for any request.
        assert_eq!(records.clone().begin("k", &fp("b"), edge), Begin::Proceed);
        assert_eq!(records.begin("k", &fp("a"), edge), Begin::Proceed);
        assert_eq!(records.begin("k", &fp("a"), edge), Begin::InFlight);
    }

    #[test]
    fn a_completed_record_is_replayed_until_exactly_the_retention_ends() {
        let mut records = Records::default();
        records.begin("k", &fp("a"), T0);
        // Retention runs from completion, not from the start.
        let done = T0 + 50;
        records.complete("k", created("{}"), done);
        let edge = done + RETENTION_SECS;
        assert_eq!(
            records.begin("k", &fp("a"), edge - 1),
            Begin::Replay(created("{}"))
        );
        assert_eq!(records.begin("k", &fp("b"), edge - 1), Begin::Mismatch);
        assert_eq!(records.begin("k", &fp("b"), edge), Begin::Proceed);
    }

    #[test]
    fn abandoning_a_key_lets_the_retry_run_again() {
        let mut records = Records::default();
        records.begin("k", &fp("a"), T0);
        records.abandon("k");
        assert!(records.is_empty());
        assert_eq!(records.begin("k", &fp("a"), T0 + 1), Begin::Proceed);
        // Unknown keys are fine.
        records.abandon("never-seen");
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn in_flight_records_of_dead_requests_are_forgotten_completed_ones_kept() {
        let mut records = Records::default();
        records.begin("dead", &fp("a"), T0);
        records.begin("running", &fp("a"), T0);
        records.begin("done", &fp("a"), T0);
        records.complete("done", created("{}"), T0);
        records.abandon_unless(|k| k == "running");
        assert_eq!(records.begin("dead", &fp("a"), T0 + 1), Begin::Proceed);
        assert_eq!(records.begin("running", &fp("a"), T0 + 1), Begin::InFlight);
        assert_eq!(
            records.begin("done", &fp("a"), T0 + 1),
            Begin::Replay(created("{}"))
        );
    }

    #[test]
    fn a_late_abandon_does_not_erase_a_completed_response() {
        let mut records = Records::default();
        records.begin("k", &fp("a"), T0);
        // The first attempt hangs; its record expires and a retry takes over
        // and completes.
        let retry = T0 + IN_FLIGHT_TTL_SECS;
        assert_eq!(records.begin("k", &fp("a"), retry), Begin::Proceed);
        records.complete("k", created("{}"), retry + 1);
        // Then the first attempt fails and abandons.
        records.abandon("k");
        assert_eq!(
            records.begin("k", &fp("a"), retry + 2),
            Begin::Replay(created("{}"))
        );
    }

    #[test]
    fn completing_a_forgotten_key_stores_nothing() {
        let mut records = Records::default();
        records.complete("k", created("{}"), T0);
        assert!(records.is_empty());
    }

    // --- pruning -----------------------------------------------------------

    #[test]
    fn pruning_drops_exactly_the_expired_records() {
        let mut records = Records::default();
        records.begin("running", &fp("a"), T0);
        records.begin("done", &fp("a"), T0);
        records.complete("done", created("{}"), T0);

        records.prune(T0 + IN_FLIGHT_TTL_SECS - 1);
        assert_eq!(records.len(), 2);
        records.prune(T0 + IN_FLIGHT_TTL_SECS);
        assert_eq!(records.len(), 1);
        records.prune(T0 + RETENTION_SECS - 1);
        assert_eq!(records.len(), 1);
        records.prune(T0 + RETENTION_SECS);
        assert!(records.is_empty());
    }

    #[test]
    fn pruning_keeps_at_most_max_records_dropping_the_oldest() {
        let mut records = Records::default();
        let total = MAX_RECORDS + 5;
        for i in 0..total {
            let key = format!("key-{i}");
            let at = T0 + i as i64;
            records.begin(&key, &fp("a"), at);
            records.complete(&key, created("{}"), at);
        }
        let now = T0 + total as i64;
        records.prune(now);
        assert_eq!(records.len(), MAX_RECORDS);
        // The five oldest are gone; the newest survive.
        let mut probe = records.clone();
        for i in 0..5 {
            let key = format!("key-{i}");
            assert_eq!(probe.begin(&key, &fp("b"), now), Begin::Proceed);
        }
        let newest = format!("key-{}", total - 1);
        assert_eq!(
            probe.begin(&newest, &fp("a"), now),
            Begin::Replay(created("{}"))
        );
        // Pruning under the cap removes nothing live.
        let before = records.clone();
        records.prune(now);
        assert!(records == before, "a prune under the cap changed the state");
    }

    #[test]
    fn records_round_trip_through_compact_json() {
        let mut records = Records::default();
        assert_eq!(serde_json::to_string(&records).unwrap(), "{}");
        assert_eq!(
            serde_json::from_str::<Records>("{}").unwrap(),
            Records::default()
        );
        records.begin("k1", "f1", T0);
        records.begin("k2", "f2", T0);
        records.complete("k2", created(r#"{"id":"d1"}"#), T0 + 1);
        let json = serde_json::to_string(&records).unwrap();
        assert_eq!(
            json,
            r#"{"k1":{"fp":"f1","at":1000000},"k2":{"fp":"f2","at":1000001,"response":{"status":201,"body":"{\"id\":\"d1\"}"}}}"#
        );
        let back: Records = serde_json::from_str(&json).unwrap();
        assert_eq!(back, records);
    }
}

/// Properties over generated keys and histories (shrinking to a minimal
/// one). Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Step {
        Begin {
            key: u8,
            request: u8,
        },
        Complete {
            key: u8,
        },
        Abandon {
            key: u8,
        },
        /// The request running under the key dies without completing or
        /// abandoning it.
        Die {
            key: u8,
        },
        /// The shell forgets the in-flight records of requests no longer running.
        Reap,
        Prune,
        Advance(i64),
    }

    /// Keys from a range wider than [`MAX_RECORDS`], so the cap is reached;
    /// three different requests, so mismatches happen.
    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u8..150, 0u8..3).prop_map(|(key, request)| Step::Begin { key, request }),
            3 => (0u8..150).prop_map(|key| Step::Complete { key }),
            1 => (0u8..150).prop_map(|key| Step::Abandon { key }),
            1 => (0u8..150).prop_map(|key| Step::Die { key }),
            1 => Just(Step::Reap),
            1 => Just(Step::Prune),
            1 => prop_oneof![0i64..=IN_FLIGHT_TTL_SECS, 0i64..=RETENTION_SECS].prop_map(Step::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Pruning always leaves at most [`MAX_RECORDS`]; a replay is always
        /// the response stored for that key and that same request; a key
        /// that was just begun is never begun again while it is in flight,
        /// and once the dead requests are reaped none of them blocks its key.
        #[test]
        fn records_stay_bounded_and_replays_are_never_of_another_request(
            steps in prop::collection::vec(step(), 0..400),
        ) {
            let mut records = Records::default();
            let mut now = 1_000_000_i64;
            // What the caller knows: the request each key last began with
            // and the response it stored for it.
            let mut began: BTreeMap<String, String> = BTreeMap::new();
            let mut stored: BTreeMap<String, (String, StoredResponse)> = BTreeMap::new();
            let mut serial = 0u32;
            // Keys whose request is running (begun, not finished or dead).
            let mut running: std::collections::BTreeSet<String> = Default::default();
            for step in steps {
                match step {
                    Step::Begin { key, request } => {
                        let key = format!("key-{key}");
                        let fp = fingerprint("POST", "/v1/devices", &[request]);
                        match records.begin(&key, &fp, now) {
                            Begin::Proceed => {
                                began.insert(key.clone(), fp.clone());
                                running.insert(key.clone());
                                prop_assert_eq!(records.begin(&key, &fp, now), Begin::InFlight);
                            }
                            Begin::Replay(response) => {
                                prop_assert_eq!(stored.get(&key), Some(&(fp, response)));
                            }
                            Begin::InFlight => prop_assert_eq!(began.get(&key), Some(&fp)),
                            Begin::Mismatch => prop_assert!(began.get(&key).is_some_and(|b| *b != fp)),
                        }
                    }
                    Step::Complete { key } => {
                        let key = format!("key-{key}");
                        serial += 1;
                        let response = StoredResponse { status: 201, body: format!("{{\"n\":{serial}}}") };
                        // The shell completes only what it began and still runs.
                        if running.contains(&key)
                            && let Some(fp) = began.get(&key)
                        {
                            running.remove(&key);
                            records.complete(&key, response.clone(), now);
                            stored.insert(key, (fp.clone(), response));
                        }
                    }
                    Step::Abandon { key } => {
                        let key = format!("key-{key}");
                        running.remove(&key);
                        records.abandon(&key);
                    }
                    Step::Die { key } => {
                        running.remove(&format!("key-{key}"));
                    }
                    Step::Reap => {
                        records.abandon_unless(|k| running.contains(k));
                        // No dead request still blocks its key.
                        for (key, fp) in &began {
                            if !running.contains(key) {
                                let mut probe = records.clone();
                                prop_assert_ne!(probe.begin(key, fp, now), Begin::InFlight, "{}", key);
                            }
                        }
                    }
                    Step::Prune => {
                        records.prune(now);
                        prop_assert!(records.len() <= MAX_RECORDS);
                    }
                    Step::Advance(secs) => now += secs,
                }
            }
            records.prune(now);
            prop_assert!(records.len() <= MAX_RECORDS);
        }

        /// The `Idempotency-Key` validator accepts exactly 1 to 255
        /// printable ASCII characters other than space, verbatim.
        #[test]
        fn keys_are_exactly_1_to_255_printable_ascii(s in prop_oneof![
            "[!-~]{0,260}",
            ".{0,20}",
            "[!-~]{250,256}",
        ]) {
            let ok = (1..=MAX_KEY_LEN).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b));
            match parse_key(&s) {
                Ok(key) => {
                    prop_assert!(ok);
                    prop_assert_eq!(key, s);
                }
                Err(_) => prop_assert!(!ok),
            }
        }

        /// Different requests never share a fingerprint, however method,
        /// path and body are split.
        #[test]
        fn fingerprints_separate_method_path_and_body(
            a in ("[A-Z]{0,4}", "[/a-z]{0,4}", prop::collection::vec(any::<u8>(), 0..4)),
            b in ("[A-Z]{0,4}", "[/a-z]{0,4}", prop::collection::vec(any::<u8>(), 0..4)),
        ) {
            let fa = fingerprint(&a.0, &a.1, &a.2);
            let fb = fingerprint(&b.0, &b.1, &b.2);
            prop_assert_eq!(fa.len(), 64);
            prop_assert_eq!(fa == fb, a == b);
        }
    }
}
