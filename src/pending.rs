//! A table of awaited outcomes: the bookkeeping behind the worker's promise
//! bridge (`edge::promise`), runtime-free so it is tested natively.
//!
//! Each awaited promise gets a slot, numbered so that JavaScript can name it
//! when the promise settles. A slot holds the waker of the task awaiting it
//! until the outcome arrives, then the outcome until the task takes it. A
//! future dropped before its promise settles leaves its slot abandoned, to be
//! freed by the settlement (which will still name it); freed slots are reused.

use std::task::Waker;

enum Slot<T> {
    Waiting(Option<Waker>),
    Settled(T),
    Abandoned,
    Free,
}

pub struct Table<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Table<T> {
    /// A slot for a new awaited outcome.
    pub fn open(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Slot::Waiting(None);
            return i;
        }
        self.slots.push(Slot::Waiting(None));
        u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 awaited promises")
    }

    fn release(&mut self, slot: u32) {
        self.slots[slot as usize] = Slot::Free;
        self.free.push(slot);
    }

    /// The outcome has arrived: kept for its future, whose waker (if it has
    /// been polled) is returned to be woken. A slot that is not waiting (an
    /// abandoned one, or a number this table never gave) takes nothing.
    pub fn settle(&mut self, slot: u32, outcome: T) -> Option<Waker> {
        match self.slots.get_mut(slot as usize)? {
            Slot::Waiting(waker) => {
                let waker = waker.take();
                self.slots[slot as usize] = Slot::Settled(outcome);
                waker
            }
            Slot::Abandoned => {
                self.release(slot);
                None
            }
            Slot::Settled(_) | Slot::Free => None,
        }
    }

    /// The outcome, if it has arrived (the slot is then free); otherwise
    /// keeps `waker` to be woken when it does.
    ///
    /// # Panics
    /// For a slot that is not open: a future polled after it completed.
    pub fn poll(&mut self, slot: u32, waker: &Waker) -> Option<T> {
        match &mut self.slots[slot as usize] {
            Slot::Waiting(kept) => {
                if !kept.as_ref().is_some_and(|k| k.will_wake(waker)) {
                    *kept = Some(waker.clone());
                }
                None
            }
            Slot::Settled(_) => {
                let Slot::Settled(outcome) =
                    std::mem::replace(&mut self.slots[slot as usize], Slot::Free)
                else {
                    unreachable!("matched above")
                };
                self.free.push(slot);
                Some(outcome)
            }
            Slot::Abandoned | Slot::Free => panic!("slot {slot} polled after it completed"),
        }
    }

    /// Its future is gone: a settled slot is freed now, a waiting one when its
    /// outcome arrives.
    pub fn abandon(&mut self, slot: u32) {
        match self.slots[slot as usize] {
            Slot::Settled(_) => self.release(slot),
            Slot::Waiting(_) => self.slots[slot as usize] = Slot::Abandoned,
            Slot::Abandoned | Slot::Free => {}
        }
    }

    /// How many slots are open or abandoned (not free).
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// A waker that counts its wake-ups.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn an_outcome_wakes_the_task_that_polled_and_is_taken_once() {
        let mut t = Table::default();
        let (count, w) = waker();
        let s = t.open();
        assert_eq!(t.poll(s, &w), None);
        let woken = t.settle(s, "yes").expect("the poller's waker");
        woken.wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(t.poll(s, &w), Some("yes"));
        assert_eq!(t.in_use(), 0);
    }

    #[test]
    fn an_outcome_before_any_poll_is_kept_and_wakes_no_one() {
        let mut t = Table::default();
        let (_, w) = waker();
        let s = t.open();
        assert!(t.settle(s, 7).is_none());
        assert_eq!(t.poll(s, &w), Some(7));
    }

    #[test]
    fn the_latest_waker_is_the_one_woken() {
        let mut t = Table::default();
        let (first, w1) = waker();
        let (second, w2) = waker();
        let s = t.open();
        assert_eq!(t.poll(s, &w1), None);
        assert_eq!(t.poll(s, &w2), None);
        t.settle(s, ()).unwrap().wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_abandoned_slot_is_freed_by_its_outcome_not_before() {
        let mut t = Table::default();
        let s = t.open();
        t.abandon(s);
        assert_eq!(t.in_use(), 1, "its promise will still name it");
        assert_ne!(t.open(), s, "not reused while abandoned");
        assert!(t.settle(s, 1).is_none());
        assert_eq!(t.in_use(), 1, "only the other one");
        assert_eq!(t.open(), s, "reused once settled");
    }

    #[test]
    fn abandoning_a_settled_slot_frees_it_and_drops_the_outcome() {
        let mut t = Table::default();
        let s = t.open();
        let outcome = Arc::new(());
        t.settle(s, outcome.clone());
        t.abandon(s);
        assert_eq!(t.in_use(), 0);
        assert_eq!(Arc::strong_count(&outcome), 1, "dropped with the slot");
    }

    #[test]
    fn a_settlement_naming_no_waiting_slot_changes_nothing() {
        let mut t: Table<u8> = Table::default();
        assert!(t.settle(3, 1).is_none(), "never opened");
        let s = t.open();
        t.settle(s, 1);
        assert!(t.settle(s, 2).is_none(), "settled twice");
        let (_, w) = waker();
        assert_eq!(t.poll(s, &w), Some(1), "the first outcome stands");
        assert!(t.settle(s, 3).is_none(), "already free");
        assert_eq!(t.in_use(), 0);
    }

    #[test]
    #[should_panic(expected = "polled after it completed")]
    fn polling_a_completed_slot_is_a_bug() {
        let mut t = Table::default();
        let (_, w) = waker();
        let s = t.open();
        t.settle(s, ());
        t.poll(s, &w);
        t.poll(s, &w);
    }
}
