//! When a copy of something read from elsewhere (the catalogue, a readiness
//! report) must be checked again, and how long a request waits for another's.

/// Whether a copy last checked at `checked_ms` is due for another check at
/// `now_ms`: once `ttl_ms` have passed, or at once if the clock has gone back
/// (a copy is never trusted for longer because of a clock step).
pub fn due(checked_ms: u64, now_ms: u64, ttl_ms: u64) -> bool {
    now_ms
        .checked_sub(checked_ms)
        .is_none_or(|age| age >= ttl_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_due_after_its_ttl_or_when_the_clock_goes_back() {
        assert!(!due(10_000, 10_000, 5_000));
        assert!(!due(10_000, 14_999, 5_000));
        assert!(due(10_000, 15_000, 5_000));
        assert!(due(10_000, 9_999, 5_000), "a clock step back");
    }
}
