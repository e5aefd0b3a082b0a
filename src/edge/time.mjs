// One request's timer for its bounded waits (see `Timer` in time.rs): every
// wait races one setTimeout, armed for the earliest pending deadline and
// re-armed for the next when it fires. Waits due at the same moment share the
// promise that rejects then. Tested by tests/js/request-timer.test.mjs.
export class RequestTimer {
  constructor() {
    this.id = undefined;
    this.at = Infinity;
    this.lates = new Map();
  }
  race(promise, ms) {
    const due = Date.now() + ms;
    let late = this.lates.get(due);
    if (late === undefined) {
      late = { ms };
      late.promise = new Promise((_, reject) => { late.fail = reject; });
      this.lates.set(due, late);
      if (due < this.at) this.arm(due);
    }
    return Promise.race([promise, late.promise]);
  }
  arm(due) {
    if (this.id !== undefined) clearTimeout(this.id);
    this.at = due;
    this.id = setTimeout(() => this.fire(), Math.max(0, due - Date.now()));
  }
  fire() {
    this.id = undefined;
    this.at = Infinity;
    const now = Date.now();
    let next = Infinity;
    for (const [due, late] of this.lates) {
      if (due <= now) {
        this.lates.delete(due);
        late.fail(new Error(`no answer within ${late.ms} ms`));
      } else if (due < next) {
        next = due;
      }
    }
    if (next !== Infinity) this.arm(next);
  }
  stop() {
    if (this.id !== undefined) clearTimeout(this.id);
    this.id = undefined;
    this.at = Infinity;
  }
}
