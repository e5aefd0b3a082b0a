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

/// Whether a flag set at `since` (a request's work under way, which others
/// wait for or leave to it) still holds at `now_ms`: for `limit_ms`, longer
/// than that work can take. A flag whose request was left pending, never
/// finished nor dropped, then stops holding; as does any flag when the clock
/// has gone back.
pub fn held(since: Option<u64>, now_ms: u64, limit_ms: u64) -> bool {
    since.is_some_and(|since| !due(since, now_ms, limit_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_holds_until_its_limit() {
        assert!(!held(None, 10_000, 8_000));
        assert!(held(Some(10_000), 10_000, 8_000));
        assert!(held(Some(10_000), 17_999, 8_000));
        assert!(!held(Some(10_000), 18_000, 8_000), "left pending");
        assert!(!held(Some(10_000), 9_999, 8_000), "a clock step back");
    }

    #[test]
    fn a_copy_is_due_after_its_ttl_or_when_the_clock_goes_back() {
        assert!(!due(10_000, 10_000, 5_000));
        assert!(!due(10_000, 14_999, 5_000));
        assert!(due(10_000, 15_000, 5_000));
        assert!(due(10_000, 9_999, 5_000), "a clock step back");
    }
}
