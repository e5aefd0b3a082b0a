// The worker's entry module: the module worker-build generates (index.js),
// re-exported with two changes. scripts/build-worker.sh copies this file next
// to index.js, as build/entry.mjs.
//
// 1. RegionGate is declared a DurableObject. workerd accepts RPC calls
//    (`stub.admit(rate)`, src/edge/durable.rs) only on classes that extend
//    DurableObject, and the classes worker-build emits do not.
//
// 2. The default export calls the generated handlers directly. worker-build
//    exports the entrypoint class wrapped in a Proxy which, on every request,
//    builds a proxy of the instance and another of its `fetch`, so that after
//    a wasm trap (a panic: `panic = "abort"`) the next call can rebuild the
//    wasm instance first. That costs about 20 µs of every request (measured
//    with bench/lib/profile.mjs --measure). Here the check is one flag: the
//    panic hook of the `worker` crate sets `criticalError` in the state object
//    the generated module shares on globalThis, and while it is set (or if
//    that object is missing) requests go through the generated Proxy, which
//    rebuilds the instance and clears the flag. tests/e2e/faults.rs checks
//    that a panic is followed by a fresh instance.
import { DurableObject } from "cloudflare:workers";
import Generated, * as worker from "./index.js";

Object.setPrototypeOf(worker.RegionGate.prototype, DurableObject.prototype);
Object.setPrototypeOf(worker.RegionGate, DurableObject);

// The Proxy traps construction only: its prototype is the generated class's,
// whose methods are the handlers themselves.
const handlers = Generated.prototype;
const state = globalThis.__worker_init_state;

// A plain object, not a WorkerEntrypoint class: workerd constructs a class
// for every request (about 30 us in the profile); an object it only calls.
const entrypoint = {};
for (const name of ["fetch", "queue", "scheduled"]) {
  const handler = handlers[name];
  if (typeof handler !== "function") continue;
  entrypoint[name] = function (arg, env, ctx) {
    if (state?.criticalError !== false) return new Generated(ctx, env)[name](arg);
    try {
      // The generated handlers read `this.env` and `this.ctx`.
      return handler.call({ env, ctx }, arg);
    } catch (e) {
      if (e instanceof WebAssembly.RuntimeError) state.criticalError = true;
      throw e;
    }
  };
}

export * from "./index.js";
export default entrypoint;
