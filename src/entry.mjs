// The worker's entry module: the module worker-build generates (index.js),
// re-exported, with the RegionGate class declared a DurableObject. workerd
// accepts RPC calls (`stub.admit(rate)`, src/edge/durable.rs) only on classes
// that extend DurableObject, and the classes worker-build emits do not.
// scripts/build-worker.sh copies this file next to index.js, as build/entry.mjs.
import { DurableObject } from "cloudflare:workers";
import * as worker from "./index.js";

Object.setPrototypeOf(worker.RegionGate.prototype, DurableObject.prototype);
Object.setPrototypeOf(worker.RegionGate, DurableObject);

export * from "./index.js";
export { default } from "./index.js";
