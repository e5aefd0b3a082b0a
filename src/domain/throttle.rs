//! Login throttling: a pure failure counter with escalating lockouts.
//!
//! The shell keeps one [`Throttle`] per account, in a Durable Object keyed by
//! the normalised email (so an unknown email is throttled exactly like a known
//! one and the answers reveal nothing about which accounts exist), and one per
//! client IP with the looser [`CLIENT_IP`] policy.
//!
//! # Counting in advance
//!
//! Verifying a password (argon2id) takes a while, and a Durable Object may
//! interleave other requests while the shell awaits. If attempts were counted
//! only after verification fails, a burst of concurrent guesses would all pass
//! the check before any failure was recorded. So [`Throttle::attempt`] counts
//! every admitted attempt as a failure *before* the verification, and
//! [`Throttle::succeeded`] takes it back when the password turns out right:
//! at most `max_failures` guesses get through per window, however they race.
//! An attempt that never reached the verification (the other throttle refused
//! it, or the database could not be asked) is given back with
//! [`Throttle::refund`]: it guessed nothing, and counting it would let a
//! locked client network lock accounts it never guessed at, or an outage's
//! retries lock users out. That holds for a lock too: the attempts that set
//! one are remembered while it lasts, and a refund of any of them lifts it
//! (the lock needed every one), leaving the others counted.
//!
//! # Windows and locks
//!
//! Failures are counted over a sliding window (their timestamps are kept, at
//! most `max_failures` of them), so old failures drop out individually and
//! there is no window boundary to burst across. Reaching `max_failures` locks
//! the throttle for `min(base_lock_secs * 2^lockouts, max_lock_secs)`, where
//! `lockouts` is how many locks came before; the failures are then cleared so
//! the window after the lock starts fresh. Attempts refused while locked change
//! nothing (they neither count nor extend the lock), so hammering a locked
//! account gains and costs nothing. Each full window that passes with no
//! attempt and no lock takes one off `lockouts`, so an account that was
//! attacked once returns to short locks after a quiet while.
//!
//! Nothing here reads a clock: `now` (unix seconds) is an argument.

use serde::{Deserialize, Serialize};

/// How hard to throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failures within `window_secs` that trigger a lock (at least 1).
    pub max_failures: u32,
    /// The length of the sliding window, and of the quiet period that takes
    /// one lockout off the escalation.
    pub window_secs: i64,
    /// The first lock's duration; each further lock doubles it...
    pub base_lock_secs: i64,
    /// ...up to this.
    pub max_lock_secs: i64,
}

/// Per account (normalised email): a handful of guesses, then locks from 30 s
/// doubling to 15 min.
pub const ACCOUNT: Policy = Policy {
    max_failures: 5,
    window_secs: 900,
    base_lock_secs: 30,
    max_lock_secs: 900,
};

/// Sign-ups per client network: every sign-up counts, made or not. An
/// account made costs an argon2 hash, and `email_taken` says whether an
/// email has an account, which sign-in takes care never to reveal; this
/// bounds both for one client, while leaving room for a household or a
/// shared address.
pub const SIGN_UP: Policy = Policy {
    max_failures: 20,
    window_secs: 900,
    base_lock_secs: 60,
    max_lock_secs: 900,
};

/// Per client IP: looser, since many users may share an address (NAT, CGNAT),
/// but it bounds one client spraying guesses across many accounts.
pub const CLIENT_IP: Policy = Policy {
    max_failures: 30,
    window_secs: 900,
    base_lock_secs: 60,
    max_lock_secs: 900,
};

/// The longest window of the policies above: a throttle object, which does
/// not know which policy its attempts come under, measures idleness by it.
pub const LONGEST_WINDOW_SECS: i64 = {
    let mut w = ACCOUNT.window_secs;
    if SIGN_UP.window_secs > w {
        w = SIGN_UP.window_secs;
    }
    if CLIENT_IP.window_secs > w {
        w = CLIENT_IP.window_secs;
    }
    w
};

/// The throttle state, stored as JSON in its Durable Object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    /// When each failure still in the window was counted, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    failures: Vec<i64>,
    /// Locked while `now < locked_until`; kept after the lock ends, as the
    /// start of the quiet period that decays `lockouts`. 0 = never locked.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    locked_until: i64,
    /// How many locks the next lock's duration escalates over.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    lockouts: u32,
    /// The last admitted attempt (0 = none), the other end of quiet periods.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    last_attempt_at: i64,
    /// What set the current lock, until the next admitted attempt: a refund
    /// of one of its attempts undoes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lock: Option<LockCause>,
}

/// The attempts that set a lock, and whether it added to `lockouts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LockCause {
    failures: Vec<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    escalated: bool,
}

impl Throttle {
    /// Atomically: if locked, `Err(seconds until the lock ends)` (at least 1)
    /// and nothing changes. Otherwise counts this attempt as a failure in
    /// advance (see the module docs) and returns `Ok`; if that makes
    /// `max_failures` within the window, the throttle locks for
    /// `min(base_lock_secs * 2^lockouts, max_lock_secs)`. The attempt that
    /// reaches the limit is itself admitted: the limit is on guesses verified.
    pub fn attempt(&mut self, policy: &Policy, now: i64) -> Result<(), u64> {
        if let Some(wait) = self.retry_after(now) {
            return Err(wait);
        }
        // Guard against a misconfigured zero window (division, and a window
        // that could never hold a failure).
        let window = policy.window_secs.max(1);

        if self.lockouts > 0 {
            let quiet_since = self.last_attempt_at.max(self.locked_until);
            let quiet_windows = now.saturating_sub(quiet_since) / window;
            let decay = u32::try_from(quiet_windows.max(0)).unwrap_or(u32::MAX);
            self.lockouts = self.lockouts.saturating_sub(decay);
        }

        // Any earlier lock is over: its attempts can no longer lift it.
        self.lock = None;
        self.failures.retain(|&at| now.saturating_sub(at) < window);
        self.failures.push(now);
        self.last_attempt_at = now;

        if self.failures.len() >= policy.max_failures as usize {
            let duration = lock_duration(policy, self.lockouts);
            self.locked_until = now.saturating_add(duration);
            // Stop escalating once the cap is reached, so the quiet time
            // needed to decay back down stays bounded too.
            let escalated = duration < policy.max_lock_secs;
            if escalated {
                self.lockouts += 1;
            }
            self.lock = Some(LockCause {
                failures: std::mem::take(&mut self.failures),
                escalated,
            });
        }
        Ok(())
    }

    /// The attempt turned out to be a success: forget the failures, including
    /// the one counted in advance, and lift the current lock if there is one.
    /// Attempts are refused while locked, so such a lock was set by the last
    /// admitted attempt, whose verification may still have been in flight;
    /// the password is now proven, so the lock protects nothing. The lockout
    /// count stays, so a later lock still escalates.
    ///
    /// For the per-IP throttle the shell may prefer not to call this: one
    /// valid account would otherwise let a client reset its IP's budget.
    pub fn succeeded(&mut self) {
        self.failures.clear();
        self.lock = None;
        self.lift();
    }

    /// Ends the current lock now: at the last admitted attempt, which set it
    /// (attempts are refused while locked), so a quiet period is measured
    /// from where it would have been without the lock.
    fn lift(&mut self) {
        self.locked_until = self.locked_until.min(self.last_attempt_at);
    }

    /// Gives back the failure counted in advance by the attempt admitted at
    /// `at` (the time [`Throttle::attempt`] was called with), which never
    /// reached a password check. If that attempt was one of those that set
    /// the current lock, the lock is lifted and its escalation undone: it
    /// needed every one of them. The others count again, as failures in the
    /// window, so the next attempt can lock as it would have.
    pub fn refund(&mut self, at: i64) {
        if let Some(i) = self.failures.iter().rposition(|&t| t == at) {
            self.failures.remove(i);
            return;
        }
        let Some(mut cause) = self.lock.take_if(|c| c.failures.contains(&at)) else {
            return;
        };
        if let Some(i) = cause.failures.iter().rposition(|&t| t == at) {
            cause.failures.remove(i);
        }
        if cause.escalated {
            self.lockouts = self.lockouts.saturating_sub(1);
        }
        self.failures = cause.failures;
        self.lift();
    }

    /// From when (unix seconds) this throttle, if no attempt comes before,
    /// has nothing left to remember under a policy whose window is
    /// `window_secs`: its failures out of the window, its lock over, and its
    /// lockouts decayed (each quiet window takes one off). From then on it
    /// answers every attempt as a new throttle would, so its object can
    /// forget it rather than keep it forever (sign-ins name any email, and
    /// each email is an object of its own).
    pub fn idle_from(&self, window_secs: i64) -> i64 {
        let window = window_secs.max(1);
        let quiet_since = self.last_attempt_at.max(self.locked_until);
        // The failures need one window (they are no later than the last
        // attempt); the lockouts one each.
        let windows = i64::from(self.lockouts.max(1));
        quiet_since.saturating_add(window.saturating_mul(windows))
    }

    /// Seconds until the lock ends (at least 1), or `None` if not locked.
    pub fn retry_after(&self, now: i64) -> Option<u64> {
        let wait = self.locked_until.saturating_sub(now);
        (wait > 0).then(|| u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

/// How many networks an account remembers it was signed in from.
pub const KNOWN_NETWORKS: usize = 10;

/// How long an account remembers a network after its last sign-in there.
pub const KNOWN_FOR_SECS: i64 = 90 * 24 * 3600;

/// The networks an account was signed in from (each a digest the shell
/// makes of the client's network, with when it last signed in there), and
/// the attempts from them while the account is locked.
///
/// The account's lock stops guessing at its password, but anyone who knows
/// the email can set it again each time it ends, and keep the owner from
/// signing in on a new phone for good. So while it is locked, a sign-in
/// from a network the account signed in from before is counted here
/// instead, under the same policy: the owner at home is not locked out by
/// guesses made elsewhere, and guesses from that network (a shared one,
/// say) still lock it, here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownNetworks {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    networks: Vec<(String, i64)>,
    #[serde(default, skip_serializing_if = "is_default")]
    throttle: Throttle,
}

fn is_default(t: &Throttle) -> bool {
    *t == Throttle::default()
}

/// Which throttle counted an account's attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountedIn {
    /// The account's own.
    Account,
    /// The known networks' ([`KnownNetworks`]): the account was locked.
    KnownNetwork,
}

/// Whether the stored digest `stored` is the network `network`'s: the same,
/// or a whole HMAC-SHA-256 (64 hex digits, as stored before the shell kept
/// only its first bytes) that `network` begins, so that the networks owners
/// signed in from before are not forgotten.
fn same_network(stored: &str, network: &str) -> bool {
    const WHOLE_DIGEST: usize = 64;
    stored == network
        || (stored.len() == WHOLE_DIGEST && !network.is_empty() && stored.starts_with(network))
}

impl KnownNetworks {
    /// Whether the account signed in from `network` within
    /// [`KNOWN_FOR_SECS`] before `now`.
    pub fn knows(&self, network: &str, now: i64) -> bool {
        self.networks
            .iter()
            .any(|(n, at)| same_network(n, network) && now.saturating_sub(*at) < KNOWN_FOR_SECS)
    }

    /// The account signed in from `network` at `now`: remembered, as the
    /// most recent; beyond [`KNOWN_NETWORKS`] the least recent goes, as do
    /// those not signed in from for [`KNOWN_FOR_SECS`].
    pub fn remember(&mut self, network: &str, now: i64) {
        self.networks.retain(|(n, at)| {
            !same_network(n, network) && now.saturating_sub(*at) < KNOWN_FOR_SECS
        });
        self.networks.push((network.to_owned(), now));
        if self.networks.len() > KNOWN_NETWORKS {
            self.networks.remove(0);
        }
    }

    /// From when there is nothing left to remember (see
    /// [`Throttle::idle_from`]).
    pub fn idle_from(&self, window_secs: i64) -> i64 {
        let networks = self
            .networks
            .iter()
            .map(|(_, at)| at.saturating_add(KNOWN_FOR_SECS));
        networks.fold(self.throttle.idle_from(window_secs), i64::max)
    }

    /// Counts an attempt on the account from `network` (its digest, when
    /// the shell has one): in `account`, unless that is locked and the
    /// network is known, then here. `Err(seconds)` as
    /// [`Throttle::attempt`] refuses.
    pub fn attempt(
        &mut self,
        account: &mut Throttle,
        network: Option<&str>,
        policy: &Policy,
        now: i64,
    ) -> Result<CountedIn, u64> {
        match account.attempt(policy, now) {
            Ok(()) => Ok(CountedIn::Account),
            Err(_) if network.is_some_and(|n| self.knows(n, now)) => {
                self.throttle.attempt(policy, now)?;
                Ok(CountedIn::KnownNetwork)
            }
            Err(wait) => Err(wait),
        }
    }

    /// Gives back the attempt admitted at `at` ([`Throttle::refund`]), in
    /// the throttle that counted it (`in_known`: this one).
    pub fn refund(&mut self, account: &mut Throttle, at: i64, in_known: bool) {
        if in_known {
            self.throttle.refund(at);
        } else {
            account.refund(at);
        }
    }

    /// The password of an attempt was right ([`Throttle::succeeded`]), from
    /// `network`, which is remembered. An attempt this counted (`in_known`:
    /// the account was locked) lifts no lock of the
    /// account's: others' guesses set that one, and lifting it would hand
    /// them five more at once.
    pub fn succeeded(
        &mut self,
        account: &mut Throttle,
        in_known: bool,
        network: Option<&str>,
        now: i64,
    ) {
        if !in_known {
            account.succeeded();
        }
        self.throttle.succeeded();
        if let Some(network) = network {
            self.remember(network, now);
        }
    }
}

/// `min(base * 2^lockouts, max)` without overflow.
fn lock_duration(policy: &Policy, lockouts: u32) -> i64 {
    let factor = 1i64.checked_shl(lockouts).filter(|f| *f > 0);
    factor
        .and_then(|f| policy.base_lock_secs.checked_mul(f))
        .map_or(policy.max_lock_secs, |d| d.min(policy.max_lock_secs))
        .max(1)
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// The network a client address is throttled as: an IPv4 address on its own,
/// an IPv6 address by its /64 (one subscriber's usual allocation, so a client
/// cannot evade the limit by taking a fresh address from it for each attempt),
/// an IPv4-mapped IPv6 address as the IPv4 address it maps. Anything else
/// (which Cloudflare never sends) is one network of its own, `invalid`.
pub fn client_network(ip: &str) -> String {
    use std::net::{IpAddr, Ipv6Addr};
    match ip.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
        Err(_) => "invalid".to_owned(),
    }
}

/// The name of the object that keeps the throttle `name` of a client
/// network (`ip:<network>`, `signup:<network>`): an HMAC of it under `key`
/// (the refresh-token key), so that no client's address is an object's
/// name, and one that even a list of every IPv4 address does not reverse
/// without the key. (An account's throttle is named by its email's digest,
/// and keeps that name: its object holds the networks it knows for 90 days.)
pub fn network_object(key: &[u8], name: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    // HMAC takes a key of any length; the refresh-token key is 32 bytes.
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"throttle-object\0");
    mac.update(name.as_bytes());
    format!("net:{}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_throttled_by_ipv4_address_and_ipv6_slash_64() {
        assert_eq!(client_network("203.0.113.7"), "203.0.113.7");
        assert_eq!(
            client_network("2001:db8:1:2:aaaa:bbbb:cccc:dddd"),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            client_network("2001:db8:1:2::1"),
            client_network("2001:db8:1:2:ffff::9"),
            "one /64, one throttle"
        );
        assert_ne!(
            client_network("2001:db8:1:2::1"),
            client_network("2001:db8:1:3::1")
        );
        assert_eq!(client_network("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(client_network("not an address"), "invalid");
        assert_eq!(client_network(""), "invalid");
    }

    const T0: i64 = 1_000_000;

    /// Fails `n` admitted attempts at `now`, asserting each is admitted.
    fn fail(t: &mut Throttle, policy: &Policy, n: u32, now: i64) {
        for i in 0..n {
            assert_eq!(t.attempt(policy, now), Ok(()), "attempt {i} at {now}");
        }
    }

    /// Triggers one lock at `now`; returns its duration.
    fn lock(t: &mut Throttle, policy: &Policy, now: i64) -> u64 {
        fail(t, policy, policy.max_failures, now);
        t.retry_after(now).expect("locked")
    }

    #[test]
    fn fewer_failures_than_the_limit_do_not_lock() {
        for policy in [ACCOUNT, CLIENT_IP] {
            let mut t = Throttle::default();
            fail(&mut t, &policy, policy.max_failures - 1, T0);
            assert_eq!(t.retry_after(T0), None);
            assert_eq!(t.attempt(&policy, T0 + 1), Ok(()));
        }
    }

    #[test]
    fn the_attempt_reaching_the_limit_is_admitted_and_locks() {
        let mut t = Throttle::default();
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, T0);
        assert_eq!(t.attempt(&ACCOUNT, T0 + 10), Ok(()));
        assert_eq!(t.retry_after(T0 + 10), Some(30));
        assert_eq!(t.attempt(&ACCOUNT, T0 + 10), Err(30));
        assert_eq!(t.attempt(&ACCOUNT, T0 + 39), Err(1));
    }

    #[test]
    fn refused_attempts_do_not_extend_the_lock_or_change_anything() {
        let mut t = Throttle::default();
        lock(&mut t, &ACCOUNT, T0);
        let before = t.clone();
        for now in T0..T0 + 30 {
            assert_eq!(t.attempt(&ACCOUNT, now), Err((T0 + 30 - now) as u64));
        }
        assert_eq!(t, before);
    }

    #[test]
    fn the_lock_ends_exactly_on_time_and_the_next_window_starts_fresh() {
        let mut t = Throttle::default();
        lock(&mut t, &ACCOUNT, T0);
        assert_eq!(t.retry_after(T0 + 29), Some(1));
        assert_eq!(t.retry_after(T0 + 30), None);
        // The failures before the lock are gone: a full budget again.
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, T0 + 30);
        assert_eq!(t.retry_after(T0 + 30), None);
    }

    #[test]
    fn lock_durations_escalate_and_are_capped() {
        let mut t = Throttle::default();
        let mut now = T0;
        let mut durations = Vec::new();
        for _ in 0..8 {
            let d = lock(&mut t, &ACCOUNT, now);
            durations.push(d);
            now += d as i64;
        }
        assert_eq!(durations, [30, 60, 120, 240, 480, 900, 900, 900]);

        let mut t = Throttle::default();
        let mut now = T0;
        let mut durations = Vec::new();
        for _ in 0..6 {
            let d = lock(&mut t, &CLIENT_IP, now);
            durations.push(d);
            now += d as i64;
        }
        assert_eq!(durations, [60, 120, 240, 480, 900, 900]);
    }

    #[test]
    fn lockouts_decay_one_per_quiet_window() {
        let mut t = Throttle::default();
        let mut now = T0;
        for _ in 0..3 {
            now += lock(&mut t, &ACCOUNT, now) as i64;
        }
        // The next lock would be 240 s; one quiet window after the last lock
        // ended brings it back to 120 s, two more to the base.
        now += ACCOUNT.window_secs;
        assert_eq!(lock(&mut t, &ACCOUNT, now), 120);
        now += 120 + 3 * ACCOUNT.window_secs;
        assert_eq!(lock(&mut t, &ACCOUNT, now), 30);
        // A window that is not quiet (an attempt in it) does not decay.
        now += 30 + ACCOUNT.window_secs - 1;
        fail(&mut t, &ACCOUNT, 1, now);
        now += ACCOUNT.window_secs - 1;
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, now);
        assert_eq!(t.retry_after(now), Some(60));
    }

    #[test]
    fn a_refunded_attempt_no_longer_counts() {
        let mut t = Throttle::default();
        // Three failures, then attempts refunded one after another: the
        // count stays at three, never a lock.
        fail(&mut t, &ACCOUNT, 3, 1_000);
        for i in 0..10 {
            let at = 1_001 + i;
            assert_eq!(t.attempt(&ACCOUNT, at), Ok(()));
            t.refund(at);
        }
        assert_eq!(t.retry_after(1_100), None);
        // The fourth and fifth real failures lock, as they would have.
        assert_eq!(t.attempt(&ACCOUNT, 1_100), Ok(()));
        assert_eq!(t.retry_after(1_100), None);
        assert_eq!(t.attempt(&ACCOUNT, 1_100), Ok(()));
        assert!(t.retry_after(1_100).is_some());
        // A refund of an attempt that is not counted changes nothing.
        let before = t.clone();
        t.refund(5);
        assert_eq!(t, before);
    }

    #[test]
    fn an_outage_that_set_a_lock_lifts_it_as_its_attempts_are_refunded() {
        // Five sign-ins in flight at once through a database outage: the
        // fifth locks the account, and none reaches a password check.
        let mut t = Throttle::default();
        let ats: Vec<i64> = (0..5).map(|i| T0 + i).collect();
        for &at in &ats {
            assert_eq!(t.attempt(&ACCOUNT, at), Ok(()));
        }
        assert_eq!(t.retry_after(T0 + 4), Some(30));
        // The first refund lifts the lock; the other four count until their
        // own refunds come.
        t.refund(ats[0]);
        assert_eq!(t.retry_after(T0 + 4), None);
        for &at in &ats[1..] {
            t.refund(at);
        }
        // A full budget again, and the next lock is a first lock (30 s).
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, T0 + 5);
        assert_eq!(t.retry_after(T0 + 5), None);
        assert_eq!(t.attempt(&ACCOUNT, T0 + 5), Ok(()));
        assert_eq!(t.retry_after(T0 + 5), Some(30));
    }

    #[test]
    fn a_refunded_locking_attempt_leaves_the_real_failures_counted() {
        // Four wrong passwords, then an attempt the other throttle refused
        // (the shell refunds it): it set the lock, so the lock goes...
        let mut t = Throttle::default();
        lock(&mut t, &ACCOUNT, T0 - 100);
        let escalated = lock(&mut t, &ACCOUNT, T0);
        assert_eq!(escalated, 60);
        t.refund(T0);
        assert_eq!(t.retry_after(T0), None);
        // ...but the four failures before it still count, and the lock it
        // would have been is the one the next attempt sets, at 60 s again:
        // the refunded lock's escalation was undone.
        assert_eq!(t.attempt(&ACCOUNT, T0 + 1), Ok(()));
        assert_eq!(t.retry_after(T0 + 1), Some(60));
    }

    #[test]
    fn a_lock_that_ended_or_was_lifted_by_a_success_is_not_touched_by_refunds() {
        // The lock ran out and an attempt was admitted after it.
        let mut t = Throttle::default();
        lock(&mut t, &ACCOUNT, T0);
        assert_eq!(t.attempt(&ACCOUNT, T0 + 30), Ok(()));
        let before = t.clone();
        t.refund(T0);
        assert_eq!(t, before);
        // The locking attempt's password was right.
        let mut t = Throttle::default();
        lock(&mut t, &ACCOUNT, T0);
        t.succeeded();
        let before = t.clone();
        t.refund(T0);
        assert_eq!(t, before);
        // Refused attempts are not refundable: a locked throttle stays locked.
        let mut t = Throttle::default();
        lock(&mut t, &ACCOUNT, T0);
        assert_eq!(t.attempt(&ACCOUNT, T0 + 1), Err(29));
        t.refund(T0 + 1);
        assert_eq!(t.retry_after(T0 + 1), Some(29));
    }

    #[test]
    fn success_forgets_the_failures_and_lifts_the_current_lock() {
        let mut t = Throttle::default();
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, T0);
        t.succeeded();
        // A full budget again: the failures (and the success's own advance
        // count) are forgotten.
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, T0 + 1);
        assert_eq!(t.retry_after(T0 + 1), None);

        // The attempt that reached the limit turned out to be right.
        let mut t = Throttle::default();
        lock(&mut t, &ACCOUNT, T0);
        t.succeeded();
        assert_eq!(t.retry_after(T0), None);
        assert_eq!(t.attempt(&ACCOUNT, T0), Ok(()));
        t.succeeded();
        // The lock history stays: the next lock escalates.
        assert_eq!(lock(&mut t, &ACCOUNT, T0 + 1), 60);
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut t = Throttle::default();
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, T0);
        // At exactly one window later those have dropped out.
        fail(
            &mut t,
            &ACCOUNT,
            ACCOUNT.max_failures - 1,
            T0 + ACCOUNT.window_secs,
        );
        assert_eq!(t.retry_after(T0 + ACCOUNT.window_secs), None);
        // The window slides: one second before it ends, they still count.
        let mut t = Throttle::default();
        fail(&mut t, &ACCOUNT, ACCOUNT.max_failures - 1, T0);
        let now = T0 + ACCOUNT.window_secs - 1;
        fail(&mut t, &ACCOUNT, 1, now);
        assert_eq!(t.retry_after(now), Some(30));
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let mut t = Throttle::default();
        assert_eq!(serde_json::to_string(&t).unwrap(), "{}");
        lock(&mut t, &ACCOUNT, T0);
        fail(&mut t, &ACCOUNT, 2, T0 + 30);
        let json = serde_json::to_string(&t).unwrap();
        let back: Throttle = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        // A lock, with what set it (the failures above have left the window).
        lock(&mut t, &ACCOUNT, T0 + 30 + ACCOUNT.window_secs);
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains("\"lock\""), "{json}");
        assert_eq!(serde_json::from_str::<Throttle>(&json).unwrap(), t);
        assert_eq!(
            serde_json::from_str::<Throttle>("{}").unwrap(),
            Throttle::default()
        );
    }

    /// A throttle at its `idle_from` answers every sequence of attempts as a
    /// new one does, whatever it went through: failures, locks escalated to
    /// the cap, refunds, successes.
    #[test]
    fn an_idle_throttle_answers_as_a_new_one() {
        let p = &ACCOUNT;
        let mut histories: Vec<Throttle> = Vec::new();
        let mut t = Throttle::default();
        fail(&mut t, p, 3, T0);
        histories.push(t.clone());
        let mut t = Throttle::default();
        let mut now = T0;
        for _ in 0..8 {
            now += lock(&mut t, p, now) as i64;
        }
        histories.push(t.clone());
        assert_eq!(t.lockouts, 5, "escalated to the cap");
        let mut t = Throttle::default();
        fail(&mut t, p, p.max_failures, T0);
        t.refund(T0);
        histories.push(t.clone());
        let mut t = Throttle::default();
        fail(&mut t, p, 4, T0);
        t.succeeded();
        histories.push(t);
        for seen in histories {
            let from = seen.idle_from(LONGEST_WINDOW_SECS);
            assert!(from > T0);
            let (mut old, mut new) = (seen.clone(), Throttle::default());
            // Twenty attempts over two windows, some at the same second.
            for i in 0..20 {
                let at = from + i * 90 - (i % 3);
                assert_eq!(
                    old.attempt(p, at),
                    new.attempt(p, at),
                    "{seen:?}, attempt {i}"
                );
            }
            // One second earlier, a throttle that was locked still remembers.
            if seen.lockouts > 0 {
                let mut early = seen.clone();
                let at = from - 1;
                let mut fresh = Throttle::default();
                let differ =
                    (0..12).any(|i| early.attempt(p, at + i * 30) != fresh.attempt(p, at + i * 30));
                assert!(differ, "{seen:?} forgotten too early");
            }
        }
        assert_eq!(Throttle::default().idle_from(900), 900);
        assert_eq!(LONGEST_WINDOW_SECS, 900);
    }

    #[test]
    fn extreme_policies_and_times_do_not_overflow() {
        let policy = Policy {
            max_failures: 1,
            window_secs: 0,
            base_lock_secs: i64::MAX / 2,
            max_lock_secs: i64::MAX,
        };
        let mut t = Throttle::default();
        for _ in 0..70 {
            assert_eq!(t.attempt(&policy, 0), Ok(()));
            assert!(
                t.retry_after(0)
                    .is_some_and(|wait| wait >= (i64::MAX / 2) as u64)
            );
            t.locked_until = 0;
        }
        assert_eq!(lock_duration(&policy, 200), i64::MAX);
        assert_eq!(lock_duration(&ACCOUNT, 63), 900);
        assert_eq!(t.attempt(&ACCOUNT, i64::MAX), Ok(()));
    }

    #[test]
    fn a_locked_account_still_takes_its_owners_sign_in_from_a_known_network() {
        let (mut account, mut known) = (Throttle::default(), KnownNetworks::default());
        let t = 1_000_000;
        // The owner signs in from home.
        assert_eq!(
            known.attempt(&mut account, Some("home"), &ACCOUNT, t),
            Ok(CountedIn::Account)
        );
        known.succeeded(&mut account, false, Some("home"), t);
        // Someone elsewhere locks the account.
        for i in 0..ACCOUNT.max_failures {
            assert!(
                known
                    .attempt(&mut account, Some("away"), &ACCOUNT, t + 10 + i64::from(i))
                    .is_ok()
            );
        }
        let locked = t + 20;
        assert!(
            known
                .attempt(&mut account, Some("away"), &ACCOUNT, locked)
                .is_err()
        );
        assert!(known.attempt(&mut account, None, &ACCOUNT, locked).is_err());
        // From home the owner gets through, counted apart.
        assert_eq!(
            known.attempt(&mut account, Some("home"), &ACCOUNT, locked),
            Ok(CountedIn::KnownNetwork)
        );
        // Its success lifts no lock set by others' guesses.
        known.succeeded(&mut account, true, Some("home"), locked);
        assert!(
            known
                .attempt(&mut account, Some("away"), &ACCOUNT, locked + 1)
                .is_err()
        );
        // A refund finds the count where it was made.
        assert_eq!(
            known.attempt(&mut account, Some("home"), &ACCOUNT, locked),
            Ok(CountedIn::KnownNetwork)
        );
        known.refund(&mut account, locked, true);
        assert!(known.throttle.failures.is_empty(), "the count given back");
        // Guesses from home lock it too, there.
        for i in 0..ACCOUNT.max_failures {
            assert!(
                known
                    .attempt(
                        &mut account,
                        Some("home"),
                        &ACCOUNT,
                        locked + 1 + i64::from(i)
                    )
                    .is_ok()
            );
        }
        assert!(
            known
                .attempt(&mut account, Some("home"), &ACCOUNT, locked + 10)
                .is_err()
        );
    }

    #[test]
    fn an_account_remembers_its_last_ten_networks_for_ninety_days() {
        let mut known = KnownNetworks::default();
        for i in 0..=KNOWN_NETWORKS {
            known.remember(&format!("n{i}"), i as i64);
        }
        assert!(!known.knows("n0", 20), "the least recent went");
        assert!(known.knows("n1", 20) && known.knows(&format!("n{KNOWN_NETWORKS}"), 20));
        // Signed in again: the most recent, kept once.
        known.remember("n1", 30);
        assert_eq!(known.networks.len(), KNOWN_NETWORKS);
        assert!(known.knows("n1", 30 + KNOWN_FOR_SECS - 1));
        assert!(!known.knows("n1", 30 + KNOWN_FOR_SECS));
        assert!(!known.knows("n2", 2 + KNOWN_FOR_SECS));
        assert_eq!(known.idle_from(900), 30 + KNOWN_FOR_SECS);
        // Stored and loaded.
        let back: KnownNetworks =
            serde_json::from_str(&serde_json::to_string(&known).unwrap()).unwrap();
        assert_eq!(back, known);
        assert_eq!(
            serde_json::to_string(&KnownNetworks::default()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn a_network_remembered_by_its_whole_digest_is_known_by_its_first_bytes() {
        let whole = "a1b2c3".to_owned() + &"0".repeat(58);
        let mut known = KnownNetworks::default();
        known.remember(&whole, 10);
        assert!(known.knows("a1b2c3", 20));
        assert!(!known.knows("a1b2c4", 20));
        // Remembered again by its first bytes: kept once, in that form.
        known.remember("a1b2c3", 30);
        assert_eq!(known.networks, vec![("a1b2c3".to_owned(), 30)]);
    }

    #[test]
    fn a_network_throttle_is_named_by_a_keyed_digest_not_by_the_address() {
        let key = [7u8; 32];
        let name = format!("ip:{}", client_network("203.0.113.7"));
        let object = network_object(&key, &name);
        assert!(
            object.starts_with("net:") && object.len() == 4 + 64,
            "{object}"
        );
        assert!(!object.contains("203.0.113"), "{object}");
        assert_eq!(object, network_object(&key, &name), "one name, one object");
        assert_ne!(object, network_object(&[8u8; 32], &name), "the key decides");
        assert_ne!(object, network_object(&key, "signup:203.0.113.7"));
        assert_ne!(object, network_object(&key, "ip:203.0.113.8"));
    }
}
