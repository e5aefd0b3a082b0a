// The request timer behind the Worker's bounded waits (src/edge/time.mjs), on
// Node's mocked clock: `node --test tests/js/*.test.mjs` (scripts/test.sh runs it).
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";
import { RequestTimer } from "../../src/edge/time.mjs";

/** The (mocked) clearTimeout, spied on: how often the timer really cleared. */
let cleared;
beforeEach(() => {
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  cleared = mock.method(globalThis, "clearTimeout");
});
afterEach(() => {
  mock.restoreAll();
  mock.timers.reset();
});

/** A promise that never settles: a KV read or an object call that hangs. */
const hung = () => new Promise(() => {});

/** Whether `promise` has settled: `{ value }`, `{ error }`, or null while pending. */
function watch(promise) {
  const seen = { state: null };
  promise.then(
    (value) => (seen.state = { value }),
    (error) => (seen.state = { error }),
  );
  return seen;
}

/** Lets the promise callbacks queued so far run. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

/** A timer that counts how often it arms its setTimeout and how often that fires. */
class Counted extends RequestTimer {
  arms = 0;
  fires = 0;
  arm(due) {
    this.arms++;
    super.arm(due);
  }
  fire() {
    this.fires++;
    super.fire();
  }
  get clears() {
    return cleared.mock.callCount();
  }
}

test("a wait that never answers is rejected at its deadline, not before", async () => {
  const timer = new RequestTimer();
  const wait = watch(timer.race(hung(), 2000));
  mock.timers.tick(1999);
  await settle();
  assert.equal(wait.state, null);
  mock.timers.tick(1);
  await settle();
  assert.match(wait.state.error.message, /^no answer within 2000 ms$/);
});

test("a wait that answers in time gets its answer, and the timer is armed and cleared once", async () => {
  const timer = new Counted();
  const waits = [watch(timer.race(Promise.resolve("session"), 2000)), watch(timer.race(Promise.resolve("devices"), 2000))];
  await settle();
  assert.deepEqual(waits.map((w) => w.state), [{ value: "session" }, { value: "devices" }]);
  assert.equal(timer.lates.size, 1, "waits due at once share one deadline");
  timer.stop();
  assert.deepEqual([timer.arms, timer.clears], [1, 1]);
  // Stopped: the deadline passes and nothing fires.
  mock.timers.tick(5000);
  await settle();
  assert.equal(timer.fires, 0);
});

test("after the first deadline fires, the timer is armed again for the next", async () => {
  const timer = new Counted();
  const first = watch(timer.race(hung(), 1000));
  const second = watch(timer.race(hung(), 3000));
  assert.equal(timer.arms, 1, "a later deadline does not re-arm");
  mock.timers.tick(1000);
  await settle();
  assert.match(first.state.error.message, /within 1000 ms/);
  assert.equal(second.state, null);
  assert.equal(timer.arms, 2);
  mock.timers.tick(1999);
  await settle();
  assert.equal(second.state, null);
  mock.timers.tick(1);
  await settle();
  assert.match(second.state.error.message, /within 3000 ms/);
});

test("an earlier deadline than the armed one re-arms the timer sooner", async () => {
  const timer = new Counted();
  const slow = watch(timer.race(hung(), 3000));
  const quick = watch(timer.race(hung(), 500));
  assert.deepEqual([timer.arms, timer.clears], [2, 1]);
  mock.timers.tick(500);
  await settle();
  assert.match(quick.state.error.message, /within 500 ms/);
  assert.equal(slow.state, null);
  mock.timers.tick(2500);
  await settle();
  assert.match(slow.state.error.message, /within 3000 ms/);
});

test("a wait that settled before its deadline keeps its answer when the deadline passes", async () => {
  const timer = new RequestTimer();
  let answer;
  const read = new Promise((resolve) => (answer = resolve));
  const wait = watch(timer.race(read, 2000));
  mock.timers.tick(1500);
  answer("late but in time");
  await settle();
  mock.timers.tick(500);
  await settle();
  assert.deepEqual(wait.state, { value: "late but in time" });
});
