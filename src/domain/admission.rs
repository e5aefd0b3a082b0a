//! Admission control for reconnects: a token bucket per region, sharded.
//!
//! When a region dies its clients all reconnect elsewhere within a minute.
//! Each region publishes an `admission_rate` (clients per second it can take
//! on: WireGuard handshakes, key installs and tunnel setup cost the servers
//! far more than a steady tunnel does), and `POST /v1/connect` asks the
//! region's `RegionGate` Durable Object for a token before handing out a
//! server. A refused client gets `Retry-After` and, with the failover list,
//! may try the next region instead of hammering this one.
//!
//! # Shards
//!
//! One Durable Object is single-threaded and should not serve more than a few
//! hundred requests a second, so a region's gate is split into
//! [`shard_count`] objects, each handing out at most [`MAX_SHARD_RATE`]
//! admissions a second. A device always uses the same shard ([`shard_for`],
//! the same stable hash as server placement), and the region's rate is split
//! evenly between them ([`shard_rate`]), so the shards together admit the
//! region's rate while none of them sees more than its share of the traffic.
//!
//! # The bucket
//!
//! [`Bucket`] holds at most `rate * BURST_SECS` tokens (at least one) and
//! refills at `rate` tokens a second; each admission takes one. Over any
//! window of `T` seconds it admits at most `capacity + rate * T`. It is kept
//! in integer thousandths of a token: at `rate` tokens/s the refill is
//! exactly `rate` thousandths per millisecond, so there is no rounding drift
//! and the wait it reports is exact. It stores how far it is *below* full
//! rather than how many tokens it holds, so the derived `Default` (and `{}`
//! in storage) is a full bucket, a region's first clients are not refused,
//! and a change of rate needs no migration.
//!
//! Nothing here reads a clock: `now_ms` (unix milliseconds) is an argument.
//! A `now_ms` a little earlier than the last one (up to [`CLOCK_STEP_MS`])
//! refills nothing and does not rewind the bucket, or the same interval would
//! be refilled twice. One further back is a clock that was stepped back, or
//! one that had jumped ahead and was corrected: the bucket follows it,
//! refilling nothing for the step, rather than refilling nothing until the
//! clock reached its old reading again, refusing a region's clients all that
//! time. The interval stepped over may then be refilled again, at most one
//! bucket's capacity per step.

use super::placement::stable_hash;
use serde::{Deserialize, Serialize};

/// The most admissions per second one shard hands out.
pub const MAX_SHARD_RATE: u32 = 200;

/// Bucket capacity in seconds of refill: `rate * BURST_SECS` tokens (at least
/// one), so a gate that has been idle admits a short burst at once.
pub const BURST_SECS: f64 = 2.0;

/// How far back a reading may be from the bucket's last one before the
/// bucket takes it as a clock stepped back and follows it.
pub const CLOCK_STEP_MS: i64 = 5_000;

/// Thousandths of a token per token.
const MILLI: u64 = 1_000;

/// The salt of [`shard_for`]'s hash, so shard and server choice are
/// independent draws.
const SHARD_SALT: &str = "admission-shard";

/// Number of shards for a region's admission rate: `ceil(rate /
/// MAX_SHARD_RATE)`, at least 1 (a closed region still needs an object to
/// say so).
pub fn shard_count(rate: u32) -> u32 {
    rate.div_ceil(MAX_SHARD_RATE).max(1)
}

/// Which shard a device uses: a stable hash of the device id modulo
/// `shards` (0 is treated as 1). The same device always uses the same shard
/// while the shard count stays, so its retries meet the bucket that refused
/// it.
pub fn shard_for(device_id: &str, shards: u32) -> u32 {
    let shards = u64::from(shards.max(1));
    // The remainder is below `shards`, itself a u32.
    (stable_hash(device_id, SHARD_SALT) % shards) as u32
}

/// A shard's own rate: the region's rate split evenly, the remainder going
/// one each to the lowest shards, so the shards' rates sum to `rate`.
/// 0 for a shard that does not exist (`shard >= shards`).
pub fn shard_rate(rate: u32, shards: u32, shard: u32) -> u32 {
    let shards = shards.max(1);
    if shard >= shards {
        return 0;
    }
    rate / shards + u32::from(shard < rate % shards)
}

/// The answer to one admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead.
    Admitted,
    /// Full: one token will be available in `retry_after_ms` (at least 1).
    Wait { retry_after_ms: u64 },
    /// The rate is 0: the region cannot take anyone, waiting will not help.
    Closed,
}

impl Admit {
    /// The verdict as one number, as the gate answers it over Durable Object
    /// RPC: 0 admitted, -1 closed, otherwise the wait in milliseconds (at
    /// least 1). A number crosses the RPC boundary without any encoding.
    pub fn to_wire(self) -> f64 {
        match self {
            Admit::Admitted => 0.0,
            Admit::Closed => -1.0,
            Admit::Wait { retry_after_ms } => retry_after_ms.max(1) as f64,
        }
    }

    /// Reads [`Admit::to_wire`]'s number; anything else is `None`.
    pub fn from_wire(n: f64) -> Option<Admit> {
        if n == 0.0 {
            Some(Admit::Admitted)
        } else if n == -1.0 {
            Some(Admit::Closed)
        } else if n >= 1.0 && n.fract() == 0.0 && n <= 9_007_199_254_740_991.0 {
            Some(Admit::Wait {
                retry_after_ms: n as u64,
            })
        } else {
            None
        }
    }
}

/// One shard's token bucket, stored as JSON in its Durable Object. The
/// default is a full bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bucket {
    /// Thousandths of a token taken and not yet refilled (0 = full).
    spent_milli: u64,
    /// When the bucket was last refilled (unix ms); moves backwards only
    /// with a clock stepped back by more than [`CLOCK_STEP_MS`].
    updated_ms: i64,
}

impl Bucket {
    /// Refills at `rate` tokens/s since the last call (capped at capacity),
    /// then takes one token if there is one: `Admitted`. Otherwise `Wait`
    /// with the exact time until one token is available, or `Closed` when
    /// `rate` is 0. A new bucket starts full; time going backwards never adds
    /// tokens, and a step back of more than [`CLOCK_STEP_MS`] is followed.
    pub fn take(&mut self, rate: u32, now_ms: i64) -> Admit {
        if rate == 0 {
            return Admit::Closed;
        }
        let capacity = capacity_milli(rate);
        let per_ms = u64::from(rate);

        if now_ms < self.updated_ms.saturating_sub(CLOCK_STEP_MS) {
            self.updated_ms = now_ms;
        }
        let elapsed = u64::try_from(now_ms.saturating_sub(self.updated_ms)).unwrap_or(0);
        let refill = elapsed.saturating_mul(per_ms);
        // `min(capacity)`: after the rate is lowered, the old debt may exceed
        // the new capacity; the bucket is then simply empty.
        self.spent_milli = self.spent_milli.saturating_sub(refill).min(capacity);
        self.updated_ms = self.updated_ms.max(now_ms);

        let available = capacity - self.spent_milli;
        if available >= MILLI {
            self.spent_milli += MILLI;
            Admit::Admitted
        } else {
            Admit::Wait {
                retry_after_ms: (MILLI - available).div_ceil(per_ms),
            }
        }
    }
}

/// `rate * BURST_SECS` tokens, at least one, in thousandths.
fn capacity_milli(rate: u32) -> u64 {
    let milli = (f64::from(rate) * BURST_SECS * MILLI as f64).round();
    // `as` saturates; `rate` is a u32, so this is far below u64::MAX anyway.
    (milli as u64).max(MILLI)
}

/// The most a refused client is told to wait, in seconds.
pub const MAX_RETRY_AFTER_SECS: u32 = 30;

/// `Retry-After` in whole seconds for a refusal, with jitter so refused
/// clients do not all come back in the same second: `base = ceil(ms / 1000)`
/// (at least 1), result `base + random % (base + 1)`, i.e. uniform over
/// `[base, 2 * base]`, capped at [`MAX_RETRY_AFTER_SECS`]. `random` is an
/// argument (uniform u32).
pub fn retry_after_secs(retry_after_ms: u64, random: u32) -> u32 {
    let base = retry_after_ms.div_ceil(1000).max(1);
    if base >= u64::from(MAX_RETRY_AFTER_SECS) {
        return MAX_RETRY_AFTER_SECS;
    }
    // base < 30 here, so neither the cast nor the sum can overflow.
    let base = base as u32;
    (base + random % (base + 1)).min(MAX_RETRY_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn verdicts_cross_the_wire_unchanged_and_nothing_else_is_read() {
        for admit in [
            Admit::Admitted,
            Admit::Closed,
            Admit::Wait { retry_after_ms: 1 },
            Admit::Wait {
                retry_after_ms: 250,
            },
            Admit::Wait {
                retry_after_ms: 9_007_199_254_740_991,
            },
        ] {
            assert_eq!(Admit::from_wire(admit.to_wire()), Some(admit));
        }
        for junk in [f64::NAN, f64::INFINITY, -2.0, 0.5, 1.5, -0.5, 1e300] {
            assert_eq!(Admit::from_wire(junk), None, "{junk}");
        }
    }

    use super::*;

    const T0: i64 = 1_700_000_000_000;

    use crate::domain::test_rng::Rng;

    /// The bucket's own time after a reading at `now`, as [`Bucket::take`]
    /// keeps it: the latest reading, or one more than [`CLOCK_STEP_MS`]
    /// behind it, which it follows. `true`: the clock stepped back that far,
    /// and the windows of [`over_the_bound`] end there.
    pub(super) fn follow(clock: i64, now: i64) -> (i64, bool) {
        if now < clock.saturating_sub(CLOCK_STEP_MS) {
            (now, true)
        } else {
            (clock.max(now), false)
        }
    }

    /// The first admission at which some window of `T` ms held more than
    /// `capacity + rate * T / 1000` admissions (`admitted_at`: their times,
    /// in a clock that never runs back). For admissions i..=j, in
    /// thousandths, with g(k) = 1000 k - rate t_k, the bound is g(j) - g(i)
    /// <= capacity - 1000: one pass with the running minimum of g checks
    /// every window at once.
    pub(super) fn over_the_bound(admitted_at: &[i64], rate: u32) -> Option<usize> {
        let bound = capacity_milli(rate) as i128 - 1000;
        let mut min_g = i128::MAX;
        admitted_at.iter().enumerate().position(|(k, t)| {
            let g = 1000 * k as i128 - i128::from(rate) * i128::from(*t);
            min_g = min_g.min(g);
            g - min_g > bound
        })
    }

    /// Takes until refused; returns how many were admitted.
    fn drain(b: &mut Bucket, rate: u32, now: i64) -> u32 {
        let mut n = 0;
        while b.take(rate, now) == Admit::Admitted {
            n += 1;
            assert!(n <= 1_000_000, "never refused");
        }
        n
    }

    #[test]
    fn shard_counts_follow_the_rate() {
        let cases = [(0, 1), (1, 1), (200, 1), (201, 2), (400, 2), (1000, 5)];
        for (rate, shards) in cases {
            assert_eq!(shard_count(rate), shards, "rate {rate}");
        }
        assert_eq!(shard_count(u32::MAX), u32::MAX.div_ceil(MAX_SHARD_RATE));
    }

    #[test]
    fn shard_rates_split_the_region_rate_evenly_and_sum_to_it() {
        assert_eq!(shard_rate(0, 1, 0), 0);
        assert_eq!(shard_rate(1, 1, 0), 1);
        assert_eq!(shard_rate(200, 1, 0), 200);
        assert_eq!([0, 1].map(|s| shard_rate(201, 2, s)), [101, 100]);
        assert_eq!([0, 1, 2, 3, 4].map(|s| shard_rate(1000, 5, s)), [200; 5]);
        assert_eq!([0, 1, 2].map(|s| shard_rate(1001, 3, s)), [334, 334, 333]);
        for rate in [0, 1, 7, 199, 200, 201, 999, 1000, 1001, 12_345, 100_000] {
            let shards = shard_count(rate);
            let rates: Vec<u32> = (0..shards).map(|s| shard_rate(rate, shards, s)).collect();
            assert_eq!(rates.iter().sum::<u32>(), rate, "rate {rate}");
            assert!(rates.iter().all(|r| *r <= MAX_SHARD_RATE), "rate {rate}");
            // Never a shard that is closed while the region is open.
            assert!(rate == 0 || rates.iter().all(|r| *r > 0), "rate {rate}");
        }
        assert_eq!(shard_rate(1000, 5, 5), 0);
        assert_eq!(shard_rate(10, 0, 0), 10);
    }

    #[test]
    fn a_device_always_uses_the_same_shard() {
        for i in 0..1_000 {
            let id = format!("device-{i}");
            let shard = shard_for(&id, 7);
            assert!(shard < 7);
            assert_eq!(shard_for(&id, 7), shard);
            assert_eq!(shard_for(&id, 1), 0);
            assert_eq!(shard_for(&id, 0), 0);
        }
        // Pinned, like the placement hash: changing it reshuffles every gate.
        assert_eq!(
            shard_for("device-1", 1 << 31),
            (stable_hash("device-1", "admission-shard") % (1 << 31)) as u32
        );
    }

    #[test]
    fn devices_spread_evenly_over_the_shards() {
        let shards = 5;
        let devices = 100_000;
        let mut counts = [0u32; 5];
        for i in 0..devices {
            counts[shard_for(&format!("device-{i}"), shards) as usize] += 1;
        }
        let expected = f64::from(devices) / f64::from(shards);
        for count in counts {
            assert!(
                (f64::from(count) - expected).abs() / expected < 0.02,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn a_new_bucket_starts_full_and_drains_to_its_capacity() {
        for (rate, capacity) in [(1, 2), (3, 6), (100, 200), (200, 400)] {
            let mut b = Bucket::default();
            assert_eq!(drain(&mut b, rate, T0), capacity, "rate {rate}");
        }
        // A bucket read back from empty storage is a new one.
        let mut b: Bucket = serde_json::from_str("{}").unwrap();
        assert_eq!(drain(&mut b, 10, T0), 20);
    }

    #[test]
    fn the_capacity_is_at_least_one_token() {
        assert_eq!(capacity_milli(1), 2_000);
        assert_eq!(capacity_milli(0), 1_000);
    }

    #[test]
    fn an_empty_bucket_refills_at_the_rate() {
        let mut b = Bucket::default();
        drain(&mut b, 200, T0);
        // 200/s: one token every 5 ms.
        assert_eq!(b.take(200, T0), Admit::Wait { retry_after_ms: 5 });
        assert_eq!(b.take(200, T0 + 4), Admit::Wait { retry_after_ms: 1 });
        assert_eq!(b.take(200, T0 + 5), Admit::Admitted);
        assert_eq!(b.take(200, T0 + 5), Admit::Wait { retry_after_ms: 5 });
        // One second refills 200.
        assert_eq!(drain(&mut b, 200, T0 + 1_005), 200);

        // 3/s: a token every 333.3 ms; the wait rounds up.
        let mut b = Bucket::default();
        drain(&mut b, 3, T0);
        assert_eq!(
            b.take(3, T0),
            Admit::Wait {
                retry_after_ms: 334
            }
        );
        assert_eq!(b.take(3, T0 + 333), Admit::Wait { retry_after_ms: 1 });
        assert_eq!(b.take(3, T0 + 334), Admit::Admitted);
    }

    #[test]
    fn waiting_exactly_the_reported_time_is_enough() {
        let mut rng = Rng(7);
        for rate in [1, 2, 3, 7, 13, 99, 150, 200, 333] {
            let mut b = Bucket::default();
            let mut now = T0;
            drain(&mut b, rate, now);
            for _ in 0..50 {
                now += rng.below(50) as i64;
                match b.take(rate, now) {
                    Admit::Admitted => {}
                    Admit::Wait { retry_after_ms } => {
                        assert!(retry_after_ms >= 1);
                        let wait = retry_after_ms as i64;
                        let mut early = b.clone();
                        if wait > 1 {
                            assert_ne!(early.take(rate, now + wait - 1), Admit::Admitted);
                        }
                        now += wait;
                        assert_eq!(b.take(rate, now), Admit::Admitted, "rate {rate}");
                    }
                    Admit::Closed => unreachable!(),
                }
            }
        }
    }

    #[test]
    fn a_bucket_never_holds_more_than_its_capacity() {
        let mut b = Bucket::default();
        assert_eq!(b.take(50, T0), Admit::Admitted);
        // A day idle refills to capacity, not beyond.
        assert_eq!(drain(&mut b, 50, T0 + 86_400_000), 100);
        // Even across the whole range of i64 time.
        let mut b = Bucket::default();
        assert_eq!(drain(&mut b, 50, i64::MIN), 100);
        assert_eq!(drain(&mut b, 50, i64::MAX), 100);
    }

    #[test]
    fn a_rate_of_zero_is_closed_and_changes_nothing() {
        let mut b = Bucket::default();
        b.take(10, T0);
        let before = b.clone();
        assert_eq!(b.take(0, T0 + 1_000), Admit::Closed);
        assert_eq!(b, before);
    }

    #[test]
    fn a_clock_going_backwards_never_adds_tokens() {
        let mut b = Bucket::default();
        drain(&mut b, 10, T0);
        assert_eq!(
            b.take(10, T0 - CLOCK_STEP_MS),
            Admit::Wait {
                retry_after_ms: 100
            }
        );
        // The earlier reading did not rewind the bucket: coming back to T0
        // does not refill the seconds in between a second time.
        assert_eq!(
            b.take(10, T0),
            Admit::Wait {
                retry_after_ms: 100
            }
        );
        assert_eq!(b.take(10, T0 + 100), Admit::Admitted);
        assert_eq!(
            b.take(10, T0 + 50),
            Admit::Wait {
                retry_after_ms: 100
            }
        );
    }

    #[test]
    fn a_clock_that_jumped_ahead_and_came_back_does_not_stall_the_bucket() {
        let mut b = Bucket::default();
        // One reading an hour ahead (it refills a full bucket: nothing more).
        assert_eq!(b.take(10, T0 + 3_600_000), Admit::Admitted);
        drain(&mut b, 10, T0 + 3_600_000);
        // The clock is right again: the bucket follows it at once, refilling
        // nothing for the step back...
        assert_eq!(
            b.take(10, T0),
            Admit::Wait {
                retry_after_ms: 100
            }
        );
        // ...and refills from there, instead of refusing everyone for an hour.
        assert_eq!(b.take(10, T0 + 100), Admit::Admitted);
        assert_eq!(drain(&mut b, 10, T0 + 1_000), 9);
        assert_eq!(b.take(10, T0 + 1_100), Admit::Admitted);
    }

    #[test]
    fn a_rate_change_applies_to_the_stored_bucket() {
        let mut b = Bucket::default();
        drain(&mut b, 100, T0);
        // Lowered: the old debt is more than the new capacity; still empty,
        // and it refills at the new rate.
        assert_eq!(
            b.take(10, T0),
            Admit::Wait {
                retry_after_ms: 100
            }
        );
        assert_eq!(b.take(10, T0 + 100), Admit::Admitted);
        // Raised: the debt is what it was, the room is bigger.
        let mut b = Bucket::default();
        drain(&mut b, 10, T0);
        assert_eq!(drain(&mut b, 100, T0), 180);
    }

    #[test]
    fn the_bucket_round_trips_through_json() {
        let mut b = Bucket::default();
        b.take(7, T0);
        let back: Bucket = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn admissions_in_any_window_never_exceed_capacity_plus_rate_times_its_length() {
        let mut rng = Rng(0xadd);
        for case in 0..500 {
            let rate = [1, 2, 3, 10, 99, 200][rng.below(6) as usize];
            let mut b = Bucket::default();
            // Requests at random times, bunched and sparse, sometimes with a
            // clock that steps backwards. The bound holds in the bucket's own
            // time ([`follow`]) between the steps back it follows.
            let mut now = T0;
            let mut clock = i64::MIN;
            let (mut admitted_at, mut admitted) = (Vec::new(), 0);
            for _ in 0..2_000 {
                now += match rng.below(10) {
                    0 => -(rng.below(500) as i64),
                    1..=3 => 0,
                    4..=8 => rng.below(20) as i64,
                    _ => rng.below(3_000) as i64,
                };
                let stepped_back;
                (clock, stepped_back) = follow(clock, now);
                if stepped_back {
                    assert_eq!(over_the_bound(&admitted_at, rate), None, "case {case}");
                    admitted_at.clear();
                }
                if b.take(rate, now) == Admit::Admitted {
                    admitted_at.push(clock);
                    admitted += 1;
                }
            }
            assert_eq!(
                over_the_bound(&admitted_at, rate),
                None,
                "case {case}: rate {rate}"
            );
            assert!(admitted > 100, "case {case}: the test exercised little");
        }
    }

    #[test]
    fn retry_after_is_between_the_wait_and_twice_it_and_at_most_thirty() {
        assert_eq!(retry_after_secs(0, 0), 1);
        assert_eq!(retry_after_secs(1, 0), 1);
        assert_eq!(retry_after_secs(1, 1), 2);
        assert_eq!(retry_after_secs(1_000, 2), 1);
        assert_eq!(retry_after_secs(1_001, 0), 2);
        assert_eq!(retry_after_secs(29_000, 28), 30);
        assert_eq!(retry_after_secs(31_000, 0), 30);
        assert_eq!(retry_after_secs(u64::MAX, u32::MAX), 30);
        let mut rng = Rng(3);
        for ms in [
            0u32, 1, 5, 999, 1_000, 1_001, 4_500, 14_999, 15_000, 29_999, 60_000,
        ] {
            let base = ms.div_ceil(1000).max(1);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..1_000 {
                let secs = retry_after_secs(u64::from(ms), rng.next() as u32);
                assert!(
                    secs >= base.min(30) && secs <= (2 * base).min(30),
                    "{ms}: {secs}"
                );
                seen.insert(secs);
            }
            // The jitter covers the whole range.
            assert_eq!(
                seen.len() as u32,
                (2 * base).min(30) - base.min(30) + 1,
                "{ms}"
            );
        }
    }
}

/// Properties over generated inputs (shrinking to a minimal counterexample).
/// Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::tests::{follow, over_the_bound};
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_700_000_000_000;

    /// Steps between requests: mostly bunched, some sparse, some with the
    /// clock stepping backwards.
    fn step() -> impl Strategy<Value = i64> {
        prop_oneof![
            3 => Just(0i64),
            4 => 0i64..20,
            2 => 0i64..3_000,
            1 => -500i64..0,
        ]
    }

    /// A stored bucket goes through JSON between requests, as in its object.
    fn stored(b: &Bucket) -> Bucket {
        serde_json::from_str(&serde_json::to_string(b).unwrap()).unwrap()
    }

    proptest! {
        // Enough to find a broken refill within a few cases (checked against
        // deliberately broken buckets), cheap enough for every test run.
        #![proptest_config(ProptestConfig::with_cases(160))]

        /// Over any window of T ms the bucket admits at most
        /// `capacity + rate * T / 1000`, measured in the bucket's own time
        /// (the latest `now` it has seen) between the steps back it follows.
        #[test]
        fn admissions_never_exceed_what_the_bucket_allows(
            rate in prop_oneof![1u32..=10, 1u32..=MAX_SHARD_RATE, 1u32..=1_000_000],
            steps in prop::collection::vec(step(), 1..300),
        ) {
            let mut bucket = Bucket::default();
            let (mut now, mut clock) = (T0, i64::MIN);
            let mut admitted_at = Vec::new();
            for dt in steps {
                now += dt;
                let stepped_back;
                (clock, stepped_back) = follow(clock, now);
                if stepped_back {
                    prop_assert_eq!(over_the_bound(&admitted_at, rate), None);
                    admitted_at.clear();
                }
                bucket = stored(&bucket);
                if bucket.take(rate, now) == Admit::Admitted {
                    admitted_at.push(clock);
                }
            }
            prop_assert_eq!(over_the_bound(&admitted_at, rate), None);
        }

        /// Whatever happened before, including rate changes in both
        /// directions, a burst at one instant admits at most the capacity of
        /// the rate in force.
        #[test]
        fn a_burst_never_exceeds_the_current_capacity(
            history in prop::collection::vec((1u32..=500, step()), 0..100),
            rate in 1u32..=500,
        ) {
            let mut bucket = Bucket::default();
            let mut now = T0;
            for (r, dt) in history {
                now += dt;
                bucket.take(r, now);
            }
            let mut admitted = 0u64;
            while bucket.take(rate, now) == Admit::Admitted {
                admitted += 1;
                prop_assert!(admitted <= capacity_milli(rate) / 1000);
            }
        }

        /// A refusal's wait is exact: one millisecond earlier is still too
        /// early, the reported time is enough.
        #[test]
        fn the_reported_wait_is_exact(
            rate in 1u32..=1_000,
            steps in prop::collection::vec(step(), 1..200),
        ) {
            let mut bucket = Bucket::default();
            let mut now = T0;
            for dt in steps {
                now += dt;
                match bucket.take(rate, now) {
                    Admit::Admitted => {}
                    Admit::Closed => prop_assert!(false, "closed at rate {}", rate),
                    Admit::Wait { retry_after_ms } => {
                        prop_assert!(retry_after_ms >= 1);
                        let wait = retry_after_ms as i64;
                        // Measured from the bucket's own clock, which a
                        // backwards step does not rewind.
                        let base = bucket.updated_ms;
                        if wait > 1 {
                            let mut early = bucket.clone();
                            prop_assert_ne!(early.take(rate, base + wait - 1), Admit::Admitted);
                        }
                        let mut on_time = bucket.clone();
                        prop_assert_eq!(on_time.take(rate, base + wait), Admit::Admitted);
                    }
                }
            }
        }

        /// A closed region (rate 0) admits no one and its bucket is untouched.
        #[test]
        fn a_closed_region_admits_no_one(
            history in prop::collection::vec((1u32..=500, step()), 0..50),
            at in any::<i64>(),
        ) {
            let mut bucket = Bucket::default();
            let mut now = T0;
            for (r, dt) in history {
                now += dt;
                bucket.take(r, now);
            }
            let before = bucket.clone();
            prop_assert_eq!(bucket.take(0, at), Admit::Closed);
            prop_assert_eq!(bucket, before);
        }

        /// The shards' rates sum to the region's, none is above the per-shard
        /// maximum, and none is closed while the region is open.
        #[test]
        fn shard_rates_partition_the_region_rate(rate in prop_oneof![0u32..=2_000, 0u32..=2_000_000]) {
            let shards = shard_count(rate);
            let rates: Vec<u32> = (0..shards).map(|s| shard_rate(rate, shards, s)).collect();
            prop_assert_eq!(rates.iter().map(|r| u64::from(*r)).sum::<u64>(), u64::from(rate));
            prop_assert!(rates.iter().all(|r| *r <= MAX_SHARD_RATE));
            prop_assert!(rate == 0 || rates.iter().all(|r| *r > 0));
            prop_assert_eq!(shard_rate(rate, shards, shards), 0);
        }

        /// A device's shard exists, and does not depend on anything but its id.
        #[test]
        fn a_device_shard_is_in_range_and_stable(device in ".{0,40}", shards in 0u32..=10_000) {
            let shard = shard_for(&device, shards);
            prop_assert!(shard < shards.max(1));
            prop_assert_eq!(shard_for(&device, shards), shard);
        }

        /// `Retry-After` lies in `[base, 2 base]` for `base = ceil(ms / 1000)`
        /// (at least 1), never above 30 s.
        #[test]
        fn retry_after_is_bounded(ms in any::<u64>(), random in any::<u32>()) {
            let secs = retry_after_secs(ms, random);
            let base = ms.div_ceil(1000).max(1).min(u64::from(MAX_RETRY_AFTER_SECS)) as u32;
            prop_assert!(secs >= base, "{} < {}", secs, base);
            prop_assert!(secs <= (2 * base).min(MAX_RETRY_AFTER_SECS));
        }
    }
}
