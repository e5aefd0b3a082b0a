// Samples where a stack's worker spends its CPU under load, through workerd's
// inspector (the V8 CPU profiler), and prints the functions with the most
// self time and the most total time.
//
// usage: node profile.mjs --stack ours|hono --data DIR [--endpoint connect|regions|healthz]
//                         [--seconds 5] [--top 40] [--measure RUNS]
//                         [--callers FUNCTION] [--first 1]
// --first 1 profiles the first such request of a fresh isolate instead of a load.
// DIR is a scenario directory the benchmark seeded (bench/.work/<scenario>).
// For function names in our wasm, build it with KEEP_WASM_NAMES=1
// (scripts/build-worker.sh strips them otherwise). See bench/README.md.
import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { cpuMicros, freePort, parseFlags, untilUp } from "./tools.mjs";

const args = parseFlags();
const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
const stack = args.stack ?? "ours";
const data = resolve(args.data ?? join(bench, ".work/regions-10-keys-1"));
const endpoint = args.endpoint ?? "connect";
const seconds = Number(args.seconds ?? 5);
const top = Number(args.top ?? 40);

const [port, inspector] = [await freePort(), await freePort()];
const child = spawn(
  "taskset",
  ["-c", "0", join(root, "node_modules/.bin/workerd"), "serve", join(data, `${stack}.capnp`),
    `--socket-addr=http=127.0.0.1:${port}`, `--inspector-addr=127.0.0.1:${inspector}`],
  { stdio: "ignore", detached: true },
);
process.on("exit", () => {
  try {
    process.kill(-child.pid, "SIGKILL");
  } catch {}
});

const wrk = (secs) =>
  spawnSync(
    "taskset",
    ["-c", "1", "wrk", "-t1", "-c16", `-d${secs}s`, "-s", join(bench, "lib/load.lua"), `http://127.0.0.1:${port}`],
    { env: { ...process.env, BENCH_MODE: endpoint, BENCH_REQUESTS: join(data, "requests.txt") }, encoding: "utf8" },
  );

// Wait for the server, then warm it up.
await untilUp(port);
if (!args.first) wrk(3);

if (args.measure) {
  // No profiler: requests/s and the server's CPU per request, RUNS times.
  for (let i = 0; i < Number(args.measure); i++) {
    const before = cpuMicros(child.pid);
    const r = wrk(seconds);
    const j = JSON.parse(r.stdout.split("\n").find((l) => l.startsWith("{")));
    const cpu = (cpuMicros(child.pid) - before) / j.requests;
    console.log(`${stack} ${endpoint}: ${(j.requests / (j.duration_us / 1e6)).toFixed(0)} req/s, ${cpu.toFixed(0)} µs CPU/req, non-2xx ${j.non2xx}`);
  }
  process.exit(0);
}

const ws = new WebSocket(`ws://127.0.0.1:${inspector}/main`);
await once(ws, "open");
let next = 1;
const pending = new Map();
ws.addEventListener("message", (m) => {
  const j = JSON.parse(m.data);
  if (j.id && pending.has(j.id)) {
    pending.get(j.id)(j);
    pending.delete(j.id);
  }
});
const send = (method, params = {}) =>
  new Promise((res) => {
    const id = next++;
    pending.set(id, res);
    ws.send(JSON.stringify({ id, method, params }));
  });

await send("Profiler.enable");
await send("Profiler.setSamplingInterval", { interval: 50 });
await send("Profiler.start");
let requests;
if (args.first) {
  // The isolate's first request of this kind (after /healthz): what a cold
  // start pays beyond booting.
  const [token, device] = readFileSync(join(data, "requests.txt"), "utf8").split("\n")[0].split(" ");
  const init =
    endpoint === "connect"
      ? {
          method: "POST",
          headers: { authorization: `Bearer ${token}`, "content-type": "application/json", "x-keenvpn-client-location": "50.11,8.68" },
          body: JSON.stringify({ device_id: device }),
        }
      : {};
  const t0 = performance.now();
  const r = await fetch(`http://127.0.0.1:${port}${endpoint === "connect" ? "/v1/connect" : `/${endpoint === "regions" ? "v1/regions" : endpoint}`}`, init);
  await r.text();
  console.log(`first ${endpoint}: status ${r.status} in ${(performance.now() - t0).toFixed(1)} ms (profiler on)`);
  requests = 1;
} else {
  const load = wrk(seconds);
  requests = Number(JSON.parse(load.stdout.split("\n").find((l) => l.startsWith("{"))).requests);
}
const { result } = await send("Profiler.stop");
ws.close();

const { nodes, samples, timeDeltas } = result.profile;
const byId = new Map(nodes.map((n) => [n.id, n]));
const parent = new Map();
for (const n of nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const selfUs = new Map();
samples.forEach((id, i) => selfUs.set(id, (selfUs.get(id) ?? 0) + (timeDeltas[i] ?? 0)));
const name = (n) => {
  const f = n.callFrame;
  const file = f.url ? f.url.split("/").pop() : "";
  return `${f.functionName || "(anonymous)"}${file ? ` [${file}]` : ""}`;
};
const self = new Map();
const total = new Map();
for (const [id, us] of selfUs) {
  const n = byId.get(id);
  self.set(name(n), (self.get(name(n)) ?? 0) + us);
  // Total: every distinct function on the stack gets the sample once.
  const seen = new Set();
  for (let cur = id; cur !== undefined; cur = parent.get(cur)) {
    const k = name(byId.get(cur));
    if (seen.has(k)) continue;
    seen.add(k);
    total.set(k, (total.get(k) ?? 0) + us);
  }
}
const sum = [...selfUs.values()].reduce((a, b) => a + b, 0);
const idle = ["(idle)", "(program)", "(garbage collector)"].map((k) => [k, self.get(k) ?? 0]);
const busy = sum - (self.get("(idle)") ?? 0);
console.log(`${stack} ${endpoint}: ${requests} requests in ${seconds} s; sampled ${(busy / 1000).toFixed(0)} ms busy in the isolate thread, ${(busy / requests).toFixed(1)} µs per request`);
console.log(idle.map(([k, v]) => `${k} ${(v / requests).toFixed(1)} µs/req`).join(", "));
const table = (m, title) => {
  console.log(`\n${title} (µs per request, share of busy)`);
  [...m.entries()]
    .filter(([k]) => k !== "(idle)" && k !== "(root)")
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .forEach(([k, v]) => console.log(`${(v / requests).toFixed(1).padStart(8)} ${((100 * v) / busy).toFixed(1).padStart(5)}%  ${k.slice(0, 140)}`));
};
table(self, "self time");
if (args.callers) {
  // Who calls the function named --callers (self time of it, by caller).
  const by = new Map();
  for (const [id, us] of selfUs) {
    const n = byId.get(id);
    if (!name(n).startsWith(args.callers)) continue;
    const p = parent.get(id);
    const k = p === undefined ? "(none)" : name(byId.get(p));
    by.set(k, (by.get(k) ?? 0) + us);
  }
  table(by, `callers of ${args.callers}`);
}
table(total, "total time");
process.exit(0);
