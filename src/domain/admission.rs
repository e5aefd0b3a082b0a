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
//! The count follows the configured rate; the rate split is the one the
//! region admits at, a share of it while some of its servers are full
//! (`placement::admitting_rate`), and each shard admits at least one a
//! second (so at very small shares the shards together admit up to one a
//! second each, a little more than the share).
//!
//! # The bucket
//!
//! [`Bucket`] holds at most `rate * BURST_SECS` tokens (at least one) and
//! refills at `rate` tokens a second; each admission takes one. Over any
//! window of `T` seconds it admits at most `capacity + rate * T`. It is kept
//! in integer thousandths of a token: at `rate` tokens/s the refill is
//! exactly `rate` thousandths per millisecond, so there is no rounding drift
//! and the wait it reports is exact. A new bucket is full, so a region's
//! first clients are not refused.
//!
//! The rate comes with each call, from the caller's copy of the catalogue,
//! and for a minute or so after it changes (an operator's change, or servers
//! becoming full or having room again), isolates that have
//! seen the change and isolates that have not ask the same shard at
//! different rates. The bucket then admits at most what the highest of
//! those rates allows: it holds tokens, which come only from the refill of
//! each call at that call's rate, and a call at a lower rate than the last
//! cuts what it holds to its own, smaller capacity. (It once stored how far
//! it was below full instead: a call at the lower rate then cut that debt
//! to the lower capacity, and the next call at the higher rate found the
//! difference as fresh tokens. Lowering a shard from 200/s to 20/s, with
//! one call in ten at the new rate, it admitted 9,004 clients in 10 s where
//! 200/s allows 2,400.)
//!
//! # The queue
//!
//! The bucket alone knows only when its next token comes, a few milliseconds
//! away: told that, every client a wave refused would come back within a
//! second or two, all but a handful be refused again, and so on, each wave
//! as large as the first, the longest-waiting clients no likelier to get in
//! than the newest. So each shard also keeps a [`Backlog`]: every refusal
//! joins the back of a queue that drains at the shard's rate, and the client
//! is told to come back when the clients refused before it should have been
//! admitted. A wave is then spread over the time the shard needs to admit
//! it, in the order it was refused, and most clients are admitted on their
//! first retry. Nothing is reserved: a client that comes back takes a token
//! like anyone else (so the bucket's bound below still holds), and one that
//! goes to a failover region instead costs the region nothing. The turn is
//! therefore a forecast: while others arrive faster than the rate, a client
//! that comes back at its turn may find the tokens taken, and queues again
//! (the README's Admission section says what bounds this). The queue
//! holds at most [`QUEUE_SECS`] of the rate: a client refused beyond that
//! is told [`QUEUE_FULL_MS`], which [`busy_retry_after_secs`] turns into a
//! short wait, so that under the documented policy (a failover region after
//! two refusals in a row) it soon moves on to a region with room rather than
//! wait here. (Telling those clients 15-30 s instead kept them from the
//! failover regions: in the surge simulator's outage of 10,000 clients,
//! everyone was back 26% later than with no queue at all.)
//! A [`Gate`] is the two together, and a fence: told that its region admits
//! no one ([`Gate::fence`]), a shard refuses everyone for [`FENCE_MS`] or
//! until told otherwise, as the callers' copies of the catalogue may still
//! say the region is up.
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
/// one each to the lowest shards, so the shards' rates sum to `rate`; but
/// at least 1 while `rate` is not 0, so that no shard of an open region
/// answers closed when the region admits fewer a second than it has shards
/// (its count comes from the configured rate, and the rate it admits at may
/// be a share of that, `placement::admitting_rate`). 0 for a shard that
/// does not exist (`shard >= shards`).
pub fn shard_rate(rate: u32, shards: u32, shard: u32) -> u32 {
    let shards = shards.max(1);
    if shard >= shards {
        return 0;
    }
    (rate / shards + u32::from(shard < rate % shards)).max(u32::from(rate > 0))
}

/// The answer to one admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead.
    Admitted,
    /// Full: come back in `retry_after_ms` (at least 1): from a [`Bucket`],
    /// when its next token comes; from a [`Gate`], when the client's turn in
    /// its queue comes ([`QUEUE_FULL_MS`] with the queue full).
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

/// One shard's token bucket, in its Durable Object's memory. The default is
/// a full bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Thousandths of a token held; `None` until the first admission: a full
    /// bucket at whatever rate it is first asked at.
    held_milli: Option<u64>,
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
    /// Tokens come only from the refill (see the module docs on rates that
    /// differ from call to call).
    pub fn take(&mut self, rate: u32, now_ms: i64) -> Admit {
        if rate == 0 {
            return Admit::Closed;
        }
        let capacity = capacity_milli(rate);
        let per_ms = u64::from(rate);

        let refill = advance(&mut self.updated_ms, now_ms).saturating_mul(per_ms);
        // `min(capacity)`: at a rate lower than the last call's, what the
        // bucket held above the new capacity is gone at once.
        let held = self
            .held_milli
            .map_or(capacity, |held| held.saturating_add(refill).min(capacity));

        if held >= MILLI {
            self.held_milli = Some(held - MILLI);
            Admit::Admitted
        } else {
            self.held_milli = Some(held);
            Admit::Wait {
                retry_after_ms: (MILLI - held).div_ceil(per_ms),
            }
        }
    }
}

/// Moves a clock kept at `*updated_ms` to the reading `now_ms` and returns
/// the milliseconds elapsed: none for a reading behind it, which does not
/// move it back, unless it is more than [`CLOCK_STEP_MS`] behind, which it
/// follows.
fn advance(updated_ms: &mut i64, now_ms: i64) -> u64 {
    if now_ms < updated_ms.saturating_sub(CLOCK_STEP_MS) {
        *updated_ms = now_ms;
    }
    let elapsed = u64::try_from(now_ms.saturating_sub(*updated_ms)).unwrap_or(0);
    *updated_ms = (*updated_ms).max(now_ms);
    elapsed
}

/// How far ahead a shard queues refused clients: this many seconds of its
/// rate (the longest `Retry-After` the API sends).
pub const QUEUE_SECS: u32 = MAX_RETRY_AFTER_SECS;

/// `Wait::retry_after_ms` for a client refused while its shard's queue is
/// full: more than any turn in the queue.
pub const QUEUE_FULL_MS: u64 = QUEUE_SECS as u64 * 1_000 + 1;

/// The queue of a shard's refused clients, as far as the gate can tell (see
/// the module docs): one token's worth per refusal, draining at the rate.
/// In memory with its bucket, so it is soft state too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Thousandths of a token queued.
    queued_milli: u64,
    /// When it last drained (unix ms), kept as the bucket keeps its own.
    updated_ms: i64,
}

impl Backlog {
    /// A refused client joins the back of the queue: how long until its turn
    /// (the queue ahead of it and itself, at `rate` a second), never sooner
    /// than `token_wait_ms`, the bucket's next token. [`QUEUE_FULL_MS`], and
    /// the queue unchanged, when the queue already holds
    /// [`QUEUE_SECS`] of the rate.
    pub fn join(&mut self, rate: u32, now_ms: i64, token_wait_ms: u64) -> u64 {
        let per_ms = u64::from(rate.max(1));
        let drained = advance(&mut self.updated_ms, now_ms).saturating_mul(per_ms);
        self.queued_milli = self.queued_milli.saturating_sub(drained);
        let horizon = per_ms * u64::from(QUEUE_SECS) * MILLI;
        if self.queued_milli + MILLI > horizon {
            return QUEUE_FULL_MS;
        }
        self.queued_milli += MILLI;
        token_wait_ms.max(self.queued_milli.div_ceil(per_ms))
    }
}

/// How long a shard stays closed after it is told its region admits no one
/// ([`Gate::fence`]), unless told it admits again: longer than KV takes to
/// carry the catalogue to every location (up to a minute) plus an isolate's
/// use of its copy (5 s, up to 8 s while it checks). By then every isolate's
/// copy says what the fence said, if the change was published (or the
/// cron's next run published it), and the fence is no longer needed.
pub const FENCE_MS: i64 = 120_000;

/// What a shard was last told of its region: whether it admits no one, and
/// when. Soft state, in memory with the bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Fence {
    /// The version of the last word taken (the time of the region's
    /// change, in microseconds of the database's clock); an older word is
    /// ignored.
    version: i64,
    /// When the shard was closed (its own clock), if it is.
    closed_at_ms: Option<i64>,
}

/// One shard's admission: a [`Bucket`] and the [`Backlog`] of the clients
/// it refused, and whether its region was closed under the callers' copies
/// of the catalogue (a [`Fence`]). The default is a full bucket, an empty
/// queue and no fence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gate {
    bucket: Bucket,
    backlog: Backlog,
    fence: Fence,
}

impl Gate {
    /// Tells the shard whether its region admits anyone, as of the region's
    /// change `version`: `closed`, it answers `Closed` to everyone for
    /// [`FENCE_MS`] from `now_ms` (the callers' copies of the catalogue may
    /// still say the region is up); otherwise it admits by its bucket
    /// again. A word older than, or as old as, the last one taken changes
    /// nothing (two changes' words can arrive out of order); whether it was
    /// taken.
    pub fn fence(&mut self, version: i64, closed: bool, now_ms: i64) -> bool {
        if version <= self.fence.version {
            return false;
        }
        self.fence = Fence {
            version,
            closed_at_ms: closed.then_some(now_ms),
        };
        true
    }

    /// Whether a fence closes the shard at `now_ms`. A clock stepped back by
    /// more than [`CLOCK_STEP_MS`] since the fence lifts it, as its end
    /// could no longer be told.
    fn fenced(&self, now_ms: i64) -> bool {
        self.fence.closed_at_ms.is_some_and(|at| {
            let since = now_ms.saturating_sub(at);
            (-CLOCK_STEP_MS..FENCE_MS).contains(&since)
        })
    }

    /// `Closed` while fenced ([`Gate::fence`]), taking nothing; otherwise
    /// [`Bucket::take`], and a client it refuses joins the queue and is told
    /// when its turn comes.
    pub fn admit(&mut self, rate: u32, now_ms: i64) -> Admit {
        if self.fenced(now_ms) {
            return Admit::Closed;
        }
        match self.bucket.take(rate, now_ms) {
            Admit::Wait { retry_after_ms } => Admit::Wait {
                retry_after_ms: self.backlog.join(rate, now_ms, retry_after_ms),
            },
            verdict => verdict,
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

/// `Retry-After` for a client a [`Gate`] refused: its turn in whole seconds
/// (1 to [`QUEUE_SECS`]), not jittered: the queue spreads a wave already,
/// one second's worth of the rate per second. With the queue full
/// ([`QUEUE_FULL_MS`]), 1 or 2 s, drawn: soon enough for a client to move on
/// to a failover region after its next refusal. `random` is an argument
/// (uniform u32).
pub fn busy_retry_after_secs(wait_ms: u64, random: u32) -> u32 {
    if wait_ms >= QUEUE_FULL_MS {
        return retry_after_secs(1_000, random);
    }
    // At most QUEUE_SECS here, so the cast is exact.
    wait_ms.div_ceil(1000).clamp(1, u64::from(QUEUE_SECS)) as u32
}

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

/// How long an isolate takes a shard's word that its queue is full, or
/// that its region is closed: for this long after hearing it, the isolate
/// refuses that shard's clients itself, as the shard would
/// ([`QUEUE_FULL_MS`], or [`Admit::Closed`]), without asking it. No longer
/// than the shortest wait a full queue hands out (1 s), so a client refused
/// from memory comes back to an answer no staler than the one it would have
/// had.
pub const FULL_MEMO_MS: i64 = 1_000;

/// The most shards one isolate remembers as full or closed at once: room for the
/// shards of a large outage (the busiest regions and their failover
/// neighbours, each split into shards of ~200 admissions/s), at about 40
/// bytes each. Past it, the oldest memory goes, and that shard's next refusal
/// asks it again. (Looked up by a scan: full, about 1 us natively per
/// connect, where a hash map cost the module 4.3 KB gzipped.)
pub const FULL_MEMO_SHARDS: usize = 1_024;

/// What one isolate heard shards say, and when: `(gate, rate, heard_ms,
/// what)`, at most [`FULL_MEMO_SHARDS`]. Each memory lasts a moment
/// (`ttl_ms`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Heard(Vec<(String, u32, i64, Admit)>);

impl Heard {
    /// What `(gate, rate)` was heard to say within the `ttl_ms` before
    /// `now_ms` (never for a `now_ms` before it: a clock stepped back asks
    /// again).
    fn holds(&self, gate: &str, rate: u32, now_ms: i64, ttl_ms: i64) -> Option<Admit> {
        self.0
            .iter()
            .find(|(g, r, heard, _)| {
                g == gate && *r == rate && (0..ttl_ms).contains(&now_ms.saturating_sub(*heard))
            })
            .map(|(_, _, _, what)| *what)
    }

    fn forget(&mut self, gate: &str) {
        self.0.retain(|(g, _, _, _)| g != gate);
    }

    /// Remembers that `(gate, rate)` said `what` at `now_ms`. When
    /// [`FULL_MEMO_SHARDS`] are already remembered, the expired ones go
    /// first, then the oldest.
    fn remember(&mut self, (gate, rate): (&str, u32), now_ms: i64, ttl_ms: i64, what: Admit) {
        self.forget(gate);
        if self.0.len() >= FULL_MEMO_SHARDS {
            self.0
                .retain(|(_, _, heard, _)| (0..ttl_ms).contains(&now_ms.saturating_sub(*heard)));
        }
        if self.0.len() >= FULL_MEMO_SHARDS
            && let Some(oldest) = (0..self.0.len()).min_by_key(|&i| self.0[i].2)
        {
            self.0.swap_remove(oldest);
        }
        self.0.push((gate.to_owned(), rate, now_ms, what));
    }
}

/// The shards one isolate last heard refuse everyone: say their queue was
/// full, or that their region is closed ([`Gate::fence`]); and when.
///
/// In a surge a region's clients are refused far faster than it admits
/// them, and each refusal would otherwise be a call to the one object that
/// is the shard. With the shard's queue full, every answer for the next
/// moment is the same "full", so each isolate asks at most once per
/// [`FULL_MEMO_MS`] per shard and answers the rest itself: the object's
/// load during an outage is bounded by the number of isolates, not of
/// clients. The same holds for a shard told its region is closed: until
/// KV carries the catalogue that says so, copies that still list the
/// region up send it every new client it would have had, and each would be
/// a call. A memory is for one `(gate, rate)`: a change of rate asks
/// again. Soft state like the gate's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefusingShards {
    heard: Heard,
}

impl RefusingShards {
    /// How `gate`, asked at `rate`, refused everyone within the last
    /// [`FULL_MEMO_MS`] before `now_ms`: a full queue's wait
    /// ([`QUEUE_FULL_MS`]) or [`Admit::Closed`]. `None` if it did not, or
    /// only before `now_ms`'s moment (or after it: a clock stepped back
    /// asks again).
    pub fn refusal(&self, gate: &str, rate: u32, now_ms: i64) -> Option<Admit> {
        self.heard.holds(gate, rate, now_ms, FULL_MEMO_MS)
    }

    /// Takes in the gate's `verdict` heard at `now_ms`: a full queue or a
    /// closed region is remembered, any other answer forgets the gate. When
    /// [`FULL_MEMO_SHARDS`] are already remembered, the expired ones go
    /// first, then the oldest.
    pub fn note(&mut self, gate: &str, rate: u32, now_ms: i64, verdict: Admit) {
        let refuses = match verdict {
            Admit::Wait { retry_after_ms } => retry_after_ms >= QUEUE_FULL_MS,
            Admit::Closed => true,
            Admit::Admitted => false,
        };
        if refuses {
            self.heard
                .remember((gate, rate), now_ms, FULL_MEMO_MS, verdict);
        } else {
            self.heard.forget(gate);
        }
    }
}

/// How long an isolate refuses a shard's clients itself (503, with the
/// failover regions) after a call found the shard in trouble: unanswered for
/// the admission call's whole bound (2 s), or refused as overloaded. (A
/// one-off error, such as the reset every deploy of the object brings, is
/// not remembered.)
///
/// An object in trouble (overloaded, or its machine gone) is likeliest on
/// the day a region's clients all come to its neighbours. Asking it again on
/// every connect adds to its load, and holds each client for up to the
/// timeout before the same 503; so each isolate asks a failed shard at most
/// once a second, and answers the rest at once. A second is short enough
/// that a shard back on its feet is used again almost at once.
pub const FAILED_MEMO_MS: i64 = 1_000;

/// The shards a call from this isolate found in trouble within the last
/// [`FAILED_MEMO_MS`]. Any answer from a shard forgets it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedShards {
    heard: Heard,
}

impl FailedShards {
    /// Whether a call to `gate` failed within the last [`FAILED_MEMO_MS`]
    /// before `now_ms` (never for a `now_ms` before it).
    pub fn has_failed(&self, gate: &str, now_ms: i64) -> bool {
        self.heard.holds(gate, 0, now_ms, FAILED_MEMO_MS).is_some()
    }

    /// Takes in how a call to `gate` ended at `now_ms`: `answered` or not.
    pub fn note(&mut self, gate: &str, now_ms: i64, answered: bool) {
        if answered {
            self.heard.forget(gate);
        } else {
            // What a failed call said is nothing; the memory is the failure.
            self.heard
                .remember((gate, 0), now_ms, FAILED_MEMO_MS, Admit::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fenced_gate_is_closed_until_reopened_or_for_the_fence_s_lifetime() {
        let t = 1_700_000_000_000;
        let mut gate = Gate::default();
        assert_eq!(gate.admit(1, t), Admit::Admitted);
        assert!(gate.fence(10, true, t));
        for now in [t, t + 1, t + FENCE_MS - 1] {
            assert_eq!(gate.admit(1_000, now), Admit::Closed, "{now}");
        }
        // The bucket was left alone: it holds what it held at `t` plus the
        // refill, so the fence's end admits at once.
        assert_eq!(gate.admit(1, t + FENCE_MS), Admit::Admitted);

        // Reopened by a newer word, at once.
        assert!(gate.fence(11, true, t));
        assert_eq!(gate.admit(1, t + 1), Admit::Closed);
        assert!(gate.fence(12, false, t + 2));
        assert_eq!(gate.admit(1, t + 3), Admit::Admitted);

        // An older word (or the same) arriving late changes nothing.
        assert!(!gate.fence(11, true, t + 4));
        assert!(!gate.fence(12, true, t + 4));
        assert_ne!(gate.admit(1, t + 5), Admit::Closed);

        // A clock stepped far back lifts the fence; a small step does not.
        assert!(gate.fence(13, true, t + 10_000));
        assert_eq!(gate.admit(1, t + 10_000 - CLOCK_STEP_MS), Admit::Closed);
        assert_ne!(gate.admit(1, t + 10_000 - CLOCK_STEP_MS - 1), Admit::Closed);
    }

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
        // A region admitting fewer a second than its configured rate's shards
        // (a share of that rate): each shard still admits one.
        assert_eq!([0, 1, 2, 3, 4].map(|s| shard_rate(3, 5, s)), [1; 5]);
        assert_eq!([0, 1, 2].map(|s| shard_rate(0, 3, s)), [0; 3]);
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
    fn a_rate_change_applies_to_the_bucket_at_once() {
        let mut b = Bucket::default();
        drain(&mut b, 100, T0);
        // Lowered: empty, it stays empty and refills at the new rate.
        assert_eq!(
            b.take(10, T0),
            Admit::Wait {
                retry_after_ms: 100
            }
        );
        assert_eq!(b.take(10, T0 + 100), Admit::Admitted);
        // Raised: no tokens at once, only a faster refill (a token every
        // 10 ms), up to the bigger capacity.
        let mut b = Bucket::default();
        drain(&mut b, 10, T0);
        assert_eq!(b.take(100, T0), Admit::Wait { retry_after_ms: 10 });
        assert_eq!(drain(&mut b, 100, T0 + 10), 1);
        assert_eq!(drain(&mut b, 100, T0 + 60_000), 200);
    }

    #[test]
    fn calls_at_a_lower_rate_do_not_give_the_higher_rate_more_tokens() {
        // An operator lowered a shard's rate from 200/s to 20/s: for up to a
        // minute, isolates that have not seen the change yet still ask at
        // 200, the others at 20, all of them of the same bucket. One call a
        // millisecond for 10 s, every tenth at the new rate: at most what
        // 200/s allows (2 s of burst and 10 s of refill: 2,400), not more.
        let mut b = Bucket::default();
        let admitted = (0..10_000)
            .filter(|ms| b.take(if ms % 10 == 9 { 20 } else { 200 }, T0 + ms) == Admit::Admitted)
            .count();
        assert!(admitted <= 2_400, "{admitted} admitted");
        // And the stale calls alone would have admitted about as many.
        let mut b = Bucket::default();
        let stale = (0..10_000)
            .filter(|ms| ms % 10 != 9 && b.take(200, T0 + ms) == Admit::Admitted)
            .count();
        assert!(admitted <= stale + 1, "{admitted} against {stale}");
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
    fn a_wave_of_refusals_is_told_to_come_back_in_the_order_refused_over_the_time_it_needs() {
        let mut gate = Gate::default();
        let mut admitted = 0;
        let mut waits = Vec::new();
        for _ in 0..700 {
            match gate.admit(20, T0) {
                Admit::Admitted => admitted += 1,
                Admit::Wait { retry_after_ms } => waits.push(retry_after_ms),
                Admit::Closed => unreachable!(),
            }
        }
        // The burst (two seconds of 20/s), then a queue of 30 s of the rate:
        // the k-th refused client's turn is k / 20 s away.
        assert_eq!(admitted, 40);
        for (k, wait) in waits[..600].iter().enumerate() {
            assert_eq!(*wait, (k as u64 + 1) * 50, "client {k}");
        }
        assert!(waits[600..].iter().all(|w| *w == QUEUE_FULL_MS));
        // In whole seconds: 20 clients for each second from 1 to 30.
        let mut per_second = [0u32; 31];
        for wait in &waits[..600] {
            per_second[busy_retry_after_secs(*wait, 0) as usize] += 1;
        }
        assert_eq!(per_second[0], 0);
        assert!(per_second[1..].iter().all(|n| *n == 20), "{per_second:?}");
        // The queue drains at the rate: five seconds later 100 have had their
        // turn, and the next client is told to wait behind the other 500 and
        // the one its bucket's draining refused.
        assert_eq!(
            gate.admit(20, T0 + 5_000),
            Admit::Admitted,
            "the bucket refilled meanwhile"
        );
        let mut later = gate.clone();
        drain_gate(&mut later, 20, T0 + 5_000);
        assert_eq!(
            later.admit(20, T0 + 5_000),
            Admit::Wait {
                retry_after_ms: 502 * 50
            }
        );
    }

    /// Takes every token `gate` has at `now`; the first refusal joins its queue.
    fn drain_gate(gate: &mut Gate, rate: u32, now: i64) {
        while gate.admit(rate, now) == Admit::Admitted {}
    }

    #[test]
    fn a_refused_client_is_never_told_less_than_the_next_token_nor_queued_when_full() {
        let mut backlog = Backlog::default();
        assert_eq!(backlog.join(20, T0, 700), 700);
        assert_eq!(backlog.join(20, T0, 0), 100);
        let mut full = Backlog::default();
        for _ in 0..600 {
            assert!(full.join(20, T0, 1) <= 30_000);
        }
        let before = full.clone();
        assert_eq!(full.join(20, T0, 1), QUEUE_FULL_MS);
        assert_eq!(full, before, "a refusal beyond the queue does not join it");
        // A clock stepped back far is followed, as by the bucket.
        assert_eq!(full.join(20, T0 - 60_000, 1), QUEUE_FULL_MS);
        assert_eq!(full.join(20, T0 - 60_000 + 50, 1), 30_000);
    }

    #[test]
    fn a_busy_retry_after_is_the_turn_in_whole_seconds_or_short_when_the_queue_is_full() {
        assert_eq!(busy_retry_after_secs(1, 7), 1);
        assert_eq!(busy_retry_after_secs(1_000, 7), 1);
        assert_eq!(busy_retry_after_secs(1_001, 7), 2);
        assert_eq!(busy_retry_after_secs(30_000, 7), 30);
        let mut rng = Rng(5);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1_000 {
            seen.insert(busy_retry_after_secs(QUEUE_FULL_MS, rng.next() as u32));
        }
        assert_eq!(seen, [1, 2].into());
    }

    /// How a crowd of `n` clients arriving within one second fares against
    /// `regions` regions of one shard each at `rate`, all starting with the
    /// first: each follows the documented retry policy, and moves on to the
    /// next region after two refusals in a row (as the surge simulator's
    /// clients do). With the queue (`queue`), or with the bucket alone, as
    /// before it, whose refusals said when the next token came (jittered to
    /// 1-2 s). Returns each client's retries, when it got in (ms after the
    /// first arrival; `None`: it gave up) and when it arrived.
    fn crowd(
        n: usize,
        regions: usize,
        rate: u32,
        queue: bool,
        seed: u64,
    ) -> Vec<(u32, Option<i64>, i64)> {
        use crate::domain::backoff::{RECOMMENDED, delay_ms};
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut rng = Rng(seed);
        let mut gates = vec![Gate::default(); regions];
        let mut buckets = vec![Bucket::default(); regions];
        let arrivals: Vec<i64> = (0..n).map(|_| rng.below(1_000) as i64).collect();
        let mut clients: Vec<(u32, Option<i64>, i64)> =
            arrivals.iter().map(|at| (0, None, *at)).collect();
        // Each client's region, and its refusals in a row there.
        let mut at_region = vec![(0usize, 0u32); n];
        let mut due: BinaryHeap<Reverse<(i64, usize)>> = arrivals
            .iter()
            .enumerate()
            .map(|(c, at)| Reverse((*at, c)))
            .collect();
        while let Some(Reverse((at, c))) = due.pop() {
            let region = at_region[c].0;
            let verdict = if queue {
                gates[region].admit(rate, T0 + at)
            } else {
                buckets[region].take(rate, T0 + at)
            };
            match verdict {
                Admit::Admitted => clients[c].1 = Some(at),
                Admit::Wait { retry_after_ms } => {
                    let retries = clients[c].0;
                    if retries == RECOMMENDED.max_attempts {
                        continue;
                    }
                    let secs = if queue {
                        busy_retry_after_secs(retry_after_ms, rng.next() as u32)
                    } else {
                        retry_after_secs(retry_after_ms, rng.next() as u32)
                    };
                    at_region[c].1 += 1;
                    if at_region[c].1 == 2 {
                        at_region[c] = ((region + 1) % regions, 0);
                    }
                    let delay = delay_ms(&RECOMMENDED, retries, Some(secs), rng.next());
                    clients[c].0 += 1;
                    due.push(Reverse((at + delay as i64, c)));
                }
                Admit::Closed => unreachable!(),
            }
        }
        clients
    }

    /// The share of pairs of clients where the one that arrived first got in
    /// no more than a second after the other (0.5: no order at all).
    fn order_kept(clients: &[(u32, Option<i64>, i64)]) -> f64 {
        let (mut kept, mut pairs) = (0u64, 0u64);
        for a in clients {
            for b in clients.iter().filter(|b| a.2 < b.2) {
                pairs += 1;
                let (a_in, b_in) = (a.1.unwrap_or(i64::MAX), b.1.unwrap_or(i64::MAX));
                kept += u64::from(a_in <= b_in.saturating_add(1_000));
            }
        }
        kept as f64 / pairs as f64
    }

    #[test]
    fn a_crowd_following_the_policy_gets_in_sooner_with_fewer_retries_and_more_in_order() {
        // 5,000 clients of a dead region, five regions at 20/s to go to.
        for seed in [1, 2, 3] {
            let queued = crowd(5_000, 5, 20, true, seed);
            let alone = crowd(5_000, 5, 20, false, seed);
            let retries = |c: &[(u32, Option<i64>, i64)]| {
                c.iter().map(|(r, _, _)| u64::from(*r)).sum::<u64>()
            };
            let most = |c: &[(u32, Option<i64>, i64)]| c.iter().map(|(r, _, _)| *r).max();
            let last = |c: &[(u32, Option<i64>, i64)]| c.iter().filter_map(|(_, at, _)| *at).max();
            assert!(queued.iter().all(|(_, at, _)| at.is_some()), "seed {seed}");
            // Here: 28,600 retries against 41,800 (at most 10 a client against
            // 12), everyone in by 113-114 s against 135-139 s, and 0.62 of
            // pairs of clients in order of arrival against 0.53.
            let (q, a) = (retries(&queued), retries(&alone));
            assert!(q * 4 <= a * 3, "seed {seed}: {q} retries against {a}");
            assert!(most(&queued) <= most(&alone), "seed {seed}");
            let (q, a) = (last(&queued).unwrap(), last(&alone).unwrap());
            assert!(
                q * 10 <= a * 9,
                "seed {seed}: the last got in at {q} ms against {a}"
            );
            let (q, a) = (order_kept(&queued), order_kept(&alone));
            assert!(
                q >= a + 0.05,
                "seed {seed}: {q} of pairs in order against {a}"
            );
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

    const FULL: Admit = Admit::Wait {
        retry_after_ms: QUEUE_FULL_MS,
    };

    #[test]
    fn a_full_queue_is_remembered_for_its_gate_and_rate_for_a_moment() {
        let mut memo = RefusingShards::default();
        assert_eq!(memo.refusal("eu-west#0", 200, T0), None);
        memo.note("eu-west#0", 200, T0, FULL);
        assert_eq!(memo.refusal("eu-west#0", 200, T0), Some(FULL));
        assert_eq!(
            memo.refusal("eu-west#0", 200, T0 + FULL_MEMO_MS - 1),
            Some(FULL)
        );
        assert_eq!(memo.refusal("eu-west#0", 200, T0 + FULL_MEMO_MS), None);
        // Another shard, another rate, or a clock stepped back: ask.
        assert_eq!(memo.refusal("eu-west#1", 200, T0), None);
        assert_eq!(memo.refusal("eu-west#0", 199, T0), None);
        assert_eq!(memo.refusal("eu-west#0", 200, T0 - 1), None);
    }

    #[test]
    fn a_closed_region_is_remembered_as_closed_for_a_moment() {
        let mut memo = RefusingShards::default();
        memo.note("eu-west#0", 200, T0, Admit::Closed);
        assert_eq!(memo.refusal("eu-west#0", 200, T0), Some(Admit::Closed));
        assert_eq!(
            memo.refusal("eu-west#0", 200, T0 + FULL_MEMO_MS - 1),
            Some(Admit::Closed)
        );
        assert_eq!(memo.refusal("eu-west#0", 200, T0 + FULL_MEMO_MS), None);
        assert_eq!(memo.refusal("eu-west#0", 400, T0), None);
        // The shard's latest word is the one remembered.
        memo.note("eu-west#0", 200, T0 + 10, FULL);
        assert_eq!(memo.refusal("eu-west#0", 200, T0 + 10), Some(FULL));
        memo.note("eu-west#0", 200, T0 + 20, Admit::Closed);
        assert_eq!(memo.refusal("eu-west#0", 200, T0 + 20), Some(Admit::Closed));
        memo.note("eu-west#0", 200, T0 + 30, Admit::Admitted);
        assert_eq!(memo.refusal("eu-west#0", 200, T0 + 30), None);
    }

    #[test]
    fn only_refusing_everyone_is_remembered_and_any_other_answer_forgets_it() {
        let mut memo = RefusingShards::default();
        // A turn in the queue, however long, is not "full".
        for verdict in [
            Admit::Admitted,
            Admit::Wait { retry_after_ms: 1 },
            Admit::Wait {
                retry_after_ms: QUEUE_FULL_MS - 1,
            },
        ] {
            memo.note("eu-west#0", 200, T0, verdict);
            assert_eq!(memo.refusal("eu-west#0", 200, T0), None, "{verdict:?}");
        }
        memo.note("eu-west#0", 200, T0, FULL);
        memo.note("eu-west#0", 200, T0 + 10, Admit::Admitted);
        assert_eq!(memo.refusal("eu-west#0", 200, T0 + 10), None);
        // A full answer again starts a new moment.
        memo.note("eu-west#0", 200, T0 + 20, FULL);
        memo.note("eu-west#0", 200, T0 + 900, FULL);
        assert_eq!(
            memo.refusal("eu-west#0", 200, T0 + 900 + FULL_MEMO_MS - 1),
            Some(FULL)
        );
    }

    #[test]
    fn the_memory_is_bounded_dropping_expired_then_oldest() {
        let mut memo = RefusingShards::default();
        let full =
            |memo: &RefusingShards, gate: &str, now| memo.refusal(gate, 10, now) == Some(FULL);
        // The first heard a moment before the others.
        for i in 0..FULL_MEMO_SHARDS as i64 {
            memo.note(&format!("r{i}#0"), 10, T0 + i.min(1), FULL);
        }
        // Every one of them is remembered (the bound was 64: a large outage
        // has more shards full at once).
        let now = T0 + 2;
        assert!((0..FULL_MEMO_SHARDS as i64).all(|i| full(&memo, &format!("r{i}#0"), now)));
        // Full: the oldest goes.
        memo.note("new#0", 10, now, FULL);
        assert_eq!(memo.heard.0.len(), FULL_MEMO_SHARDS);
        assert!(!full(&memo, "r0#0", now));
        assert!(full(&memo, "r1#0", now));
        assert!(full(&memo, "new#0", now));
        // Later, every old one has expired: they all go at once.
        let later = now + FULL_MEMO_MS - 1;
        memo.note("newer#0", 10, later, FULL);
        assert_eq!(memo.heard.0.len(), 2, "{:?}", memo.heard);
        assert!(full(&memo, "new#0", later));
        assert!(full(&memo, "newer#0", later));
    }

    #[test]
    fn a_failed_shard_is_remembered_for_a_moment_and_forgotten_when_it_answers() {
        let mut memo = FailedShards::default();
        assert!(!memo.has_failed("eu-west#0", T0));
        memo.note("eu-west#0", T0, false);
        assert!(memo.has_failed("eu-west#0", T0));
        assert!(memo.has_failed("eu-west#0", T0 + FAILED_MEMO_MS - 1));
        assert!(!memo.has_failed("eu-west#0", T0 + FAILED_MEMO_MS));
        // Another shard, or a clock stepped back: ask.
        assert!(!memo.has_failed("eu-west#1", T0));
        assert!(!memo.has_failed("eu-west#0", T0 - 1));
        // A failure again starts a new moment; an answer ends it.
        memo.note("eu-west#0", T0 + 900, false);
        assert!(memo.has_failed("eu-west#0", T0 + 900 + FAILED_MEMO_MS - 1));
        memo.note("eu-west#0", T0 + 950, true);
        assert!(!memo.has_failed("eu-west#0", T0 + 950));
        // Bounded like the memory of full queues: the oldest goes.
        for i in 0..=FULL_MEMO_SHARDS as i64 {
            memo.note(&format!("r{i}#0"), T0 + i.min(1), false);
        }
        assert_eq!(memo.heard.0.len(), FULL_MEMO_SHARDS);
        assert!(!memo.has_failed("r0#0", T0 + 1));
        assert!(memo.has_failed("r1#0", T0 + 1));
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

    /// Takes one token per call (`(rate, step)`: the call's rate, and the
    /// milliseconds since the one before) from a new bucket, and checks that
    /// no window held more admissions than `bound_rate` allows, in the
    /// bucket's own time between the steps back it follows.
    fn within_the_bound(
        calls: impl IntoIterator<Item = (u32, i64)>,
        bound_rate: u32,
    ) -> Result<(), TestCaseError> {
        let mut bucket = Bucket::default();
        let (mut now, mut clock) = (T0, i64::MIN);
        let mut admitted_at = Vec::new();
        for (rate, dt) in calls {
            now += dt;
            let stepped_back;
            (clock, stepped_back) = follow(clock, now);
            if stepped_back {
                prop_assert_eq!(over_the_bound(&admitted_at, bound_rate), None);
                admitted_at.clear();
            }
            if bucket.take(rate, now) == Admit::Admitted {
                admitted_at.push(clock);
            }
        }
        prop_assert_eq!(over_the_bound(&admitted_at, bound_rate), None);
        Ok(())
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
            within_the_bound(steps.into_iter().map(|dt| (rate, dt)), rate)?;
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

        /// While isolates disagree on the rate (an operator's change reaches
        /// them over a minute or so), calls at different rates meet the same
        /// bucket: over any window it admits at most what the highest of
        /// those rates allows.
        #[test]
        fn mixed_rates_never_admit_more_than_the_highest_allows(
            rates in prop::collection::vec(1u32..=30, 2..4),
            history in prop::collection::vec((any::<prop::sample::Index>(), step()), 1..400),
        ) {
            let top = *rates.iter().max().unwrap();
            let calls = history.into_iter().map(|(pick, dt)| (rates[pick.index(rates.len())], dt));
            within_the_bound(calls, top)?;
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

        /// The queue never changes who is admitted, only how long a refused
        /// client is told to wait, which is never less than the bucket's own
        /// wait and never more than the queue allows: so every bound the
        /// bucket keeps, the gate keeps.
        #[test]
        fn the_queue_changes_only_the_wait(
            history in prop::collection::vec((1u32..=500, step()), 1..300),
        ) {
            let (mut gate, mut bucket) = (Gate::default(), Bucket::default());
            let mut now = T0;
            for (rate, dt) in history {
                now += dt;
                match (gate.admit(rate, now), bucket.take(rate, now)) {
                    (Admit::Wait { retry_after_ms: g }, Admit::Wait { retry_after_ms: b }) => {
                        prop_assert!(g >= b, "{} < {}", g, b);
                        prop_assert!(g <= QUEUE_FULL_MS);
                    }
                    (g, b) => prop_assert_eq!(g, b),
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

        /// A busy `Retry-After` is 1 to 30 s, and the turn itself (rounded up)
        /// whenever the queue had room.
        #[test]
        fn a_busy_retry_after_is_bounded(ms in 1u64..=QUEUE_FULL_MS + 10, random in any::<u32>()) {
            let secs = busy_retry_after_secs(ms, random);
            prop_assert!((1..=QUEUE_SECS).contains(&secs));
            if ms < QUEUE_FULL_MS {
                prop_assert_eq!(u64::from(secs), ms.div_ceil(1000));
            }
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
