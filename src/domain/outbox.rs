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
//! The caller does the waiting and the sending (the scheduled flush runs in
//! the `waitUntil` of the request that scheduled it, which keeps the isolate
//! alive until it is sent); this type only decides.

/// How long the first event in an empty outbox waits for others.
pub const FLUSH_AFTER_MS: u64 = 1_000;

/// The most events in one message (well under a queue message's 128 KB: an
/// event is about 250 bytes of JSON).
pub const MAX_BATCH: usize = 100;

/// What the caller of [`Outbox::push`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Wait [`FLUSH_AFTER_MS`], then send [`Outbox::take_scheduled`].
    Schedule,
    /// Send [`Outbox::take_full`] now.
    SendNow,
    /// Nothing: a flush is already scheduled.
    Queued,
}

/// The events collected and not yet taken.
#[derive(Debug)]
pub struct Outbox<T> {
    pending: Vec<T>,
    scheduled: bool,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Outbox {
            pending: Vec::new(),
            scheduled: false,
        }
    }
}

impl<T> Outbox<T> {
    /// Collects `event`; see [`Push`].
    pub fn push(&mut self, event: T) -> Push {
        self.pending.push(event);
        if self.pending.len() >= MAX_BATCH {
            Push::SendNow
        } else if !self.scheduled {
            self.scheduled = true;
            Push::Schedule
        } else {
            Push::Queued
        }
    }

    /// After [`Push::SendNow`]: the full batch. A flush scheduled before
    /// stays scheduled, for the events that come after.
    pub fn take_full(&mut self) -> Vec<T> {
        std::mem::take(&mut self.pending)
    }

    /// At a scheduled flush: everything collected (possibly nothing, after a
    /// full batch was sent meanwhile). The next event schedules a new flush.
    pub fn take_scheduled(&mut self) -> Vec<T> {
        self.scheduled = false;
        std::mem::take(&mut self.pending)
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
                    sent.extend(batch);
                }
                Push::Queued => {}
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
}
