//! The reconnect backoff the apps follow, as documented for client teams and
//! as replayed by the surge simulator.
//!
//! Capped exponential backoff with *full jitter*: before retry `attempt`
//! (0 for the first retry) a client sleeps a uniformly random time in
//! `[0, min(cap, base * 2^attempt)]`. Jitter over the whole range, not a
//! little around a fixed delay, is what spreads a crowd: when a region dies,
//! its clients all fail at the same instant, and with plain exponential
//! backoff they would all come back at the same instants too, each wave as
//! sharp as the first. With full jitter the k-th wave is smeared over the
//! whole k-th window, so the load the gates see is roughly the crowd divided
//! by the window, and the windows grow until the gates can absorb it.
//!
//! A server that refuses a client (admission full) sends `Retry-After`; the
//! client never comes back sooner than that, whatever its own schedule says,
//! because the server knows when it will have room and has already spread
//! the value (see `admission::busy_retry_after_secs`: a refused client's
//! turn in the region's queue). After `max_attempts`
//! retries a client stops and reports the failure to its user.
//!
//! Nothing here is random: the uniform random value is an argument.

/// A backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The upper bound of the first retry's delay.
    pub base_ms: u64,
    /// No delay drawn from the schedule exceeds this (`Retry-After` may).
    pub cap_ms: u64,
    /// Retries before giving up (attempts `0..max_attempts`).
    pub max_attempts: u32,
}

/// What the apps use: the first retry within half a second, the window
/// reaching the 30 s cap at the seventh retry, giving up after 20 (at most
/// about 7.5 minutes of waiting in all, under 4 on average).
pub const RECOMMENDED: Policy = Policy {
    base_ms: 500,
    cap_ms: 30_000,
    max_attempts: 20,
};

/// The delay before retry `attempt` (0-based): uniform in `[0, min(cap,
/// base * 2^attempt)]` from `random` (a uniform u64), and never less than the
/// server's `Retry-After` (seconds) when it sent one. No overflow for any
/// input: the window saturates.
pub fn delay_ms(policy: &Policy, attempt: u32, retry_after_secs: Option<u32>, random: u64) -> u64 {
    let window = window_ms(policy, attempt);
    // `random % (window + 1)`: inclusive of both ends. The modulo bias is at
    // most window / 2^64, far below anything a client could notice.
    let jittered = match window.checked_add(1) {
        Some(span) => random % span,
        None => random,
    };
    let floor = retry_after_secs.map_or(0, |secs| u64::from(secs) * 1000);
    jittered.max(floor)
}

/// `min(cap, base * 2^attempt)` without overflow.
fn window_ms(policy: &Policy, attempt: u32) -> u64 {
    2u64.checked_pow(attempt)
        .and_then(|factor| policy.base_ms.checked_mul(factor))
        .map_or(policy.cap_ms, |ms| ms.min(policy.cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::domain::test_rng::Rng;

    #[test]
    fn the_window_doubles_from_the_base_up_to_the_cap() {
        let windows: Vec<u64> = (0..8).map(|a| window_ms(&RECOMMENDED, a)).collect();
        assert_eq!(
            windows,
            [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
        );
        for attempt in [8, 19, 63, 64, 65, u32::MAX] {
            assert_eq!(window_ms(&RECOMMENDED, attempt), 30_000, "{attempt}");
        }
    }

    #[test]
    fn every_delay_is_within_its_window() {
        let mut rng = Rng(1);
        for attempt in 0..RECOMMENDED.max_attempts + 5 {
            let window = window_ms(&RECOMMENDED, attempt);
            for _ in 0..1_000 {
                let d = delay_ms(&RECOMMENDED, attempt, None, rng.next());
                assert!(d <= window && d <= RECOMMENDED.cap_ms, "{attempt}: {d}");
            }
        }
        // The extremes of the random input stay in range too.
        for random in [0, 1, u64::MAX] {
            for attempt in [0, 5, 100] {
                assert!(delay_ms(&RECOMMENDED, attempt, None, random) <= 30_000);
            }
        }
    }

    #[test]
    fn full_jitter_spans_the_whole_window() {
        let mut rng = Rng(2);
        for attempt in [0, 3, 10] {
            let window = window_ms(&RECOMMENDED, attempt);
            let draws: Vec<u64> = (0..20_000)
                .map(|_| delay_ms(&RECOMMENDED, attempt, None, rng.next()))
                .collect();
            let (min, max) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
            assert!(
                *min <= window / 100 && *max >= window - window / 100,
                "{attempt}"
            );
            // Uniform: about half below the middle, each tenth about a tenth.
            let mut tenths = [0u32; 10];
            for d in &draws {
                tenths[((d * 10) / (window + 1)) as usize] += 1;
            }
            for count in tenths {
                assert!((1_800..=2_200).contains(&count), "{attempt}: {tenths:?}");
            }
        }
        assert_eq!(delay_ms(&RECOMMENDED, 0, None, 0), 0);
        assert_eq!(delay_ms(&RECOMMENDED, 0, None, 500), 500);
        assert_eq!(delay_ms(&RECOMMENDED, 0, None, 501), 0);
    }

    #[test]
    fn retry_after_is_a_floor_even_above_the_cap() {
        let mut rng = Rng(3);
        for attempt in 0..RECOMMENDED.max_attempts {
            for secs in [1, 5, 30, 120] {
                let d = delay_ms(&RECOMMENDED, attempt, Some(secs), rng.next());
                let window = window_ms(&RECOMMENDED, attempt);
                assert!(d >= u64::from(secs) * 1000, "{attempt} {secs}: {d}");
                assert!(
                    d <= window.max(u64::from(secs) * 1000),
                    "{attempt} {secs}: {d}"
                );
            }
        }
        assert_eq!(delay_ms(&RECOMMENDED, 0, Some(0), 123), 123);
        assert_eq!(
            delay_ms(&RECOMMENDED, 0, Some(u32::MAX), 0),
            u64::from(u32::MAX) * 1000
        );
    }

    #[test]
    fn extreme_policies_do_not_overflow() {
        let huge = Policy {
            base_ms: u64::MAX / 3,
            cap_ms: u64::MAX,
            max_attempts: u32::MAX,
        };
        assert_eq!(window_ms(&huge, 0), u64::MAX / 3);
        assert_eq!(window_ms(&huge, 2), u64::MAX);
        assert_eq!(delay_ms(&huge, 2, None, u64::MAX), u64::MAX);
        let zero = Policy {
            base_ms: 0,
            cap_ms: 0,
            max_attempts: 0,
        };
        assert_eq!(delay_ms(&zero, 7, None, u64::MAX), 0);
        assert_eq!(delay_ms(&zero, 7, Some(2), u64::MAX), 2_000);
    }

    #[test]
    fn the_recommended_policy_gives_up_after_minutes_not_seconds_or_hours() {
        let worst: u64 = (0..RECOMMENDED.max_attempts)
            .map(|a| window_ms(&RECOMMENDED, a))
            .sum();
        assert!((5 * 60_000..10 * 60_000).contains(&worst), "{worst}");
    }
}
