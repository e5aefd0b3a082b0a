//! An isolate's outbox for refusal events: many refusals, one queue message.
//!
//! In a surge a region refuses clients far faster than it admits them, and
//! each refusal is a connection event. Sent one message each, refusals alone
//! would exceed a queue's throughput (Cloudflare Queues: 5,000 messages a
//! second per queue) on exactly the day the events matter, and cost every
//! refused connect a queue send. So an isolate collects them: the first
//! event in an empty outbox schedules a flush [`FLUSH_AFTER_MS`] later, and
//! an outbox that reaches [`MAX_BATCH`] events is flushed at once. An
//! isolate then sends at most one message per [`FLUSH_AFTER_MS`] plus one
//! per [`MAX_BATCH`] events. Admissions are not collected: they come at most
//! at the regions' admission rates, and each is still sent on its own.
//!
//! Events whose sends all failed (the queue is down) are not dropped: the
//! outbox [`Outbox::hold`]s them, up to [`MAX_HELD`], for the next flush.
//! Any later event schedules one, an admission included: while events are
//! held and no flush is scheduled ([`Outbox::waiting`]), an admission joins
//! them instead of going on its own. So a queue outage loses the events of
//! an isolate that serves through it only beyond [`MAX_HELD`], or when the
//! isolate itself goes (its memory with it).
//!
//! The caller does the waiting and the sending (the scheduled flush runs in
//! the `waitUntil` of the request that scheduled it, which keeps the isolate
//! alive until it is sent); this type only decides.

/// How long the first event in an empty outbox waits for others.
pub const FLUSH_AFTER_MS: u64 = 1_000;

/// The most events in one message (well under a queue message's 128 KB: an
/// event is about 250 bytes of JSON).
pub const MAX_BATCH: usize = 100;

/// The most events an outbox keeps, held ones included: about 250 KB.
pub const MAX_HELD: usize = 1_000;

/// How long the runtime lets work go on after a response (`waitUntil`)
/// before it cancels it; a flush runs in that time.
pub const AFTER_RESPONSE_MS: u64 = 30_000;

/// How long a scheduled flush is waited for before the next event schedules
/// another: one that has not taken its events by then never will.
pub const SCHEDULED_FOR_MS: u64 = FLUSH_AFTER_MS + AFTER_RESPONSE_MS;

/// Whether a flush that began `elapsed_ms` ago may start sending another
/// message whose sends can take up to `worst_send_ms`: only if they would
/// end a second before the runtime cancels the flush. Events of a message
/// the runtime cancels part way are gone without a word; those a flush does
/// not start on are held instead ([`Outbox::hold`]) and logged so, for the
/// isolate's next flush.
pub fn may_start_send(elapsed_ms: u64, worst_send_ms: u64) -> bool {
    elapsed_ms
        .saturating_add(worst_send_ms)
        .saturating_add(1_000)
        <= AFTER_RESPONSE_MS
}

/// What the caller of [`Outbox::push`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Wait [`FLUSH_AFTER_MS`], then send [`Outbox::take_scheduled`].
    Schedule,
    /// Send [`Outbox::take_full`] now.
    SendNow,
    /// Nothing: a flush is already scheduled.
    Queued,
    /// Nothing: the flushes under way hold [`MAX_HELD`] events, and this
    /// one is dropped (counted for [`Outbox::take_dropped`]).
    Dropped,
}

/// The events collected and not yet taken, and how many taken ones are
/// still being sent.
#[derive(Debug)]
pub struct Outbox<T> {
    pending: Vec<T>,
    /// When the flush that is scheduled was (unix ms). A flush the runtime
    /// never runs to its take (its isolate's request cancelled during the
    /// wait) would otherwise leave it scheduled for good, and the outbox
    /// would send nothing until a full batch: it counts for
    /// [`SCHEDULED_FOR_MS`] at most.
    scheduled: Option<u64>,
    /// Events taken for flushes whose sends have not ended, by when each
    /// was taken: against a queue that takes sends and never answers they
    /// stay in memory for up to a flush's time, and a surge of refusals
    /// would take ever more of them. A flush the runtime cancels never says
    /// it ended, so a take counts for [`AFTER_RESPONSE_MS`] at most.
    in_flight: std::collections::VecDeque<(u64, usize)>,
    /// The time (unix ms) of the last [`Outbox::at`].
    now_ms: u64,
    /// Events dropped since [`Outbox::take_dropped`] last asked.
    dropped: usize,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Outbox {
            pending: Vec::new(),
            scheduled: None,
            in_flight: std::collections::VecDeque::new(),
            now_ms: 0,
            dropped: 0,
        }
    }
}

impl<T> Outbox<T> {
    /// Collects `event`; see [`Push`]. The events of the flushes under way
    /// are [`MAX_HELD`] at most, as are those the outbox holds.
    pub fn push(&mut self, event: T) -> Push {
        if self.under_way() >= MAX_HELD {
            self.dropped += 1;
            return Push::Dropped;
        }
        self.pending.push(event);
        if self.pending.len() >= MAX_BATCH {
            Push::SendNow
        } else if !self.is_scheduled() {
            self.scheduled = Some(self.now_ms);
            Push::Schedule
        } else {
            Push::Queued
        }
    }

    /// After [`Push::SendNow`]: the full batch (more than [`MAX_BATCH`]
    /// events when held ones are among them: sent [`MAX_BATCH`] at a time). A flush scheduled before
    /// stays scheduled, for the events that come after.
    pub fn take_full(&mut self) -> Vec<T> {
        self.taking();
        std::mem::take(&mut self.pending)
    }

    /// At a scheduled flush: everything collected (possibly nothing, after a
    /// full batch was sent meanwhile). The next event schedules a new flush.
    pub fn take_scheduled(&mut self) -> Vec<T> {
        self.scheduled = None;
        self.taking();
        std::mem::take(&mut self.pending)
    }

    /// A flush is done with `n` of the events it took (sent, or about to be
    /// [`Outbox::hold`]): they no longer count as under way.
    pub fn sent(&mut self, mut n: usize) {
        // The counts are alike: the oldest takes go first.
        while n > 0 {
            let Some((_, left)) = self.in_flight.front_mut() else {
                return;
            };
            let k = n.min(*left);
            *left -= k;
            n -= k;
            if *left == 0 {
                self.in_flight.pop_front();
            }
        }
    }

    /// The time is `now_ms` (unix ms): takes older than
    /// [`AFTER_RESPONSE_MS`] count no more (their flush ended, or the
    /// runtime cancelled it), and new takes are stamped with it.
    pub fn at(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        // A take stamped after `now_ms` (the clock stepped back) counts no
        // more either: it could otherwise count until the clock caught up.
        self.in_flight
            .retain(|&(taken, _)| taken <= now_ms && now_ms - taken < AFTER_RESPONSE_MS);
    }

    /// The events taken for flushes that have not ended.
    fn under_way(&self) -> usize {
        self.in_flight.iter().map(|(_, n)| n).sum()
    }

    /// Counts the pending events as taken, now.
    fn taking(&mut self) {
        if !self.pending.is_empty() {
            self.in_flight.push_back((self.now_ms, self.pending.len()));
        }
    }

    /// How many events were dropped since the last call (see
    /// [`Push::Dropped`]), for the caller to report.
    pub fn take_dropped(&mut self) -> usize {
        std::mem::take(&mut self.dropped)
    }

    /// Takes back `events` whose sends all failed, to go with the next
    /// flush, ahead of the events collected while they were tried (which are
    /// newer). The outbox keeps at most [`MAX_HELD`] events: what of `events`
    /// does not fit is dropped (its last ones), and the count returned.
    pub fn hold(&mut self, mut events: Vec<T>) -> usize {
        let room = MAX_HELD.saturating_sub(self.pending.len());
        let dropped = events.len().saturating_sub(room);
        events.truncate(room);
        events.append(&mut self.pending);
        self.pending = events;
        dropped
    }

    /// Whether events wait with no flush scheduled for them: held ones,
    /// which the next event (of any kind) is to carry.
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty() && !self.is_scheduled()
    }

    /// Whether a flush is scheduled, and recently enough to come.
    fn is_scheduled(&self) -> bool {
        // As with takes, one stamped after a clock step back counts no more.
        self.scheduled
            .is_some_and(|at| at <= self.now_ms && self.now_ms - at < SCHEDULED_FOR_MS)
    }

    /// How many events wait.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_schedules_a_flush_and_the_rest_wait_for_it() {
        let mut o = Outbox::default();
        assert_eq!(o.push(1), Push::Schedule);
        for i in 2..=10 {
            assert_eq!(o.push(i), Push::Queued);
        }
        assert_eq!(o.take_scheduled(), (1..=10).collect::<Vec<_>>());
        assert!(o.is_empty());
        // Taken: the next event schedules again.
        assert_eq!(o.push(11), Push::Schedule);
    }

    #[test]
    fn a_full_outbox_is_sent_at_once_and_the_schedule_carries_on() {
        let mut o = Outbox::default();
        let mut sent = Vec::new();
        let mut schedules = 0;
        for i in 0..(2 * MAX_BATCH + 5) {
            match o.push(i) {
                Push::Schedule => schedules += 1,
                Push::SendNow => {
                    let batch = o.take_full();
                    assert_eq!(batch.len(), MAX_BATCH);
                    o.sent(batch.len());
                    sent.extend(batch);
                }
                Push::Queued => {}
                Push::Dropped => panic!("event {i} dropped"),
            }
        }
        // One flush scheduled in all: full batches leave it in place.
        assert_eq!(schedules, 1);
        assert_eq!(o.len(), 5);
        sent.extend(o.take_scheduled());
        // Every event exactly once, in order.
        assert_eq!(sent, (0..(2 * MAX_BATCH + 5)).collect::<Vec<_>>());
        // A scheduled flush that finds nothing is harmless.
        assert!(o.take_scheduled().is_empty());
        assert_eq!(o.push(0), Push::Schedule);
    }

    #[test]
    fn held_events_wait_for_the_next_event_and_go_before_it() {
        let mut o = Outbox::default();
        assert!(!o.waiting());
        assert_eq!(o.hold(vec![1, 2]), 0);
        assert!(o.waiting(), "held, and no flush scheduled for them");
        assert_eq!(o.push(3), Push::Schedule);
        assert!(!o.waiting());
        assert_eq!(o.take_scheduled(), [1, 2, 3]);
        assert!(!o.waiting());
    }

    #[test]
    fn events_held_during_a_scheduled_flush_go_with_it_oldest_first() {
        let mut o = Outbox::default();
        assert_eq!(o.push(10), Push::Schedule);
        assert_eq!(o.hold(vec![1, 2]), 0);
        assert!(!o.waiting(), "the scheduled flush carries them");
        assert_eq!(o.push(11), Push::Queued);
        assert_eq!(o.take_scheduled(), [1, 2, 10, 11]);
    }

    #[test]
    fn an_outbox_holds_at_most_max_held_events_and_drops_what_does_not_fit() {
        let mut o = Outbox::default();
        assert_eq!(o.hold((0..MAX_HELD as i64 - 1).collect()), 0);
        // One place left: the first of the three failed events takes it.
        assert_eq!(o.hold(vec![-1, -2, -3]), 2);
        assert_eq!(o.len(), MAX_HELD);
        assert_eq!(o.hold(vec![-4]), 1, "a full outbox takes nothing back");
        // Every event pushed now sends at once, with all those held.
        assert_eq!(o.push(-5), Push::SendNow);
        let all = o.take_full();
        assert_eq!(all.len(), MAX_HELD + 1);
        assert_eq!(all[0], -1);
        assert_eq!(
            all[1..MAX_HELD],
            (0..MAX_HELD as i64 - 1).collect::<Vec<_>>()
        );
        assert_eq!(all[MAX_HELD], -5);
        assert!(o.is_empty());
    }

    #[test]
    fn a_flush_starts_a_send_only_if_it_can_end_before_the_runtime_cancels_it() {
        // 16.25 s: three sends of 5 s and two pauses.
        assert!(may_start_send(0, 16_250));
        assert!(may_start_send(FLUSH_AFTER_MS, 16_250));
        assert!(may_start_send(12_750, 16_250));
        assert!(!may_start_send(12_751, 16_250));
        assert!(!may_start_send(u64::MAX, 16_250));
    }

    #[test]
    fn events_being_sent_count_against_the_cap_until_sent_or_held() {
        let mut o = Outbox::default();
        let mut taken = Vec::new();
        for i in 0..MAX_HELD {
            if o.push(i) == Push::SendNow {
                taken.push(o.take_full());
            }
        }
        // Ten flushes of a hundred under way, none answered: no room.
        assert_eq!(taken.len(), MAX_HELD / MAX_BATCH);
        assert_eq!(o.push(MAX_HELD), Push::Dropped);
        assert_eq!(o.push(MAX_HELD + 1), Push::Dropped);
        assert_eq!(o.take_dropped(), 2);
        assert_eq!(o.take_dropped(), 0);
        // One flush sent: a hundred more fit.
        o.sent(taken.pop().unwrap().len());
        for i in 0..MAX_BATCH - 1 {
            assert_ne!(o.push(i), Push::Dropped);
        }
        assert_eq!(o.push(0), Push::SendNow);
        taken.push(o.take_full());
        assert_eq!(o.push(0), Push::Dropped);
        // A failed flush comes back as held, and no longer counts as under
        // way: the next event carries it.
        let failed = taken.pop().unwrap();
        o.sent(failed.len());
        assert_eq!(o.hold(failed), 0);
        assert_eq!(o.len(), MAX_BATCH);
        assert_eq!(o.push(0), Push::SendNow);
    }

    #[test]
    fn a_flush_the_runtime_cancelled_stops_counting_after_its_time() {
        let mut o = Outbox::default();
        o.at(1_000);
        for i in 0..MAX_HELD {
            if o.push(i) == Push::SendNow {
                // Taken, and never heard of again.
                drop(o.take_full());
            }
        }
        o.at(1_000 + AFTER_RESPONSE_MS - 1);
        assert_eq!(o.push(0), Push::Dropped);
        // Taken again (the first event's flush is still scheduled).
        o.at(1_000 + AFTER_RESPONSE_MS);
        assert_eq!(o.push(0), Push::Queued);
    }

    #[test]
    fn a_scheduled_flush_that_never_took_its_events_is_scheduled_again() {
        let mut o = Outbox::default();
        o.at(1_000);
        assert_eq!(o.push(1), Push::Schedule);
        // Its request was cancelled during the wait: nothing takes them.
        o.at(1_000 + SCHEDULED_FOR_MS - 1);
        assert_eq!(o.push(2), Push::Queued);
        assert!(!o.waiting());
        o.at(1_000 + SCHEDULED_FOR_MS);
        assert!(o.waiting(), "events wait with no flush to come");
        assert_eq!(o.push(3), Push::Schedule);
        assert_eq!(o.take_scheduled(), vec![1, 2, 3]);
    }

    #[test]
    fn takes_stamped_after_a_clock_step_back_count_no_more() {
        let mut o = Outbox::default();
        o.at(50_000);
        for i in 0..MAX_HELD {
            if o.push(i) == Push::SendNow {
                drop(o.take_full());
            }
        }
        assert_eq!(o.push(0), Push::Dropped);
        o.at(10_000);
        assert_ne!(o.push(0), Push::Dropped);
    }

    #[test]
    fn a_schedule_stamped_after_a_clock_step_back_counts_no_more() {
        let mut o = Outbox::default();
        o.at(50_000);
        assert_eq!(o.push(1), Push::Schedule);
        o.at(10_000);
        assert_eq!(o.push(2), Push::Schedule);
    }
}
