// A/B of two workerd configurations under the benchmark's connect load, in
// paired rounds: both servers up, each round one run of each back to back,
// the order alternating, and the median of the rounds' ratios (drift between
// rounds moves that far less than it moves either side's own median).
//
// usage: node ab.mjs --data DIR --a A.capnp --b B.capnp [--rounds 16] [--seconds 3]
//                    [--endpoint connect|regions|healthz]
//
// A and B are configuration files in DIR (a scenario the benchmark seeded,
// bench/.work/<scenario>), e.g. its ours.capnp and a copy whose module paths
// point at another build. Prints each round and the median ratio A/B of
// requests/s and of CPU per request (B's over A's, so > 1 favours A too).
import { spawn, spawnSync } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { cpuMicros, freePort, median, parseFlags, untilUp } from "./tools.mjs";

const args = parseFlags();
const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
if (!args.data || !args.a || !args.b) {
  console.error("usage: node ab.mjs --data DIR --a A.capnp --b B.capnp [--rounds 16] [--seconds 3] [--endpoint connect]");
  process.exit(2);
}
const data = resolve(args.data);
const rounds = Number(args.rounds ?? 16);
const seconds = Number(args.seconds ?? 3);
const endpoint = args.endpoint ?? "connect";

const servers = [];
process.on("exit", () => {
  for (const s of servers) {
    try {
      process.kill(-s.child.pid, "SIGKILL");
    } catch {}
  }
});
for (const config of [args.a, args.b]) {
  const port = await freePort();
  const child = spawn(
    "taskset",
    ["-c", "0", join(root, "node_modules/.bin/workerd"), "serve", join(data, config), `--socket-addr=http=127.0.0.1:${port}`],
    { stdio: "ignore", detached: true },
  );
  servers.push({ config, port, child });
}
// taskset execs workerd, so the spawned pid is workerd's.
for (const s of servers) await untilUp(s.port, s.config);

function load(s, secs) {
  const before = cpuMicros(s.child.pid);
  const r = spawnSync(
    "taskset",
    ["-c", "1", "wrk", "-t1", "-c16", `-d${secs}s`, "-s", join(bench, "lib/load.lua"), `http://127.0.0.1:${s.port}`],
    { env: { ...process.env, BENCH_MODE: endpoint, BENCH_REQUESTS: join(data, "requests.txt") }, encoding: "utf8" },
  );
  const cpu = cpuMicros(s.child.pid) - before;
  const j = JSON.parse(r.stdout.split("\n").find((l) => l.startsWith("{")));
  if (j.non2xx || j.socket_errors) throw new Error(`${s.config}: ${j.non2xx} non-2xx answers, ${j.socket_errors} socket errors`);
  return { rps: j.requests / (j.duration_us / 1e6), cpu_us: cpu / j.requests };
}

for (const s of servers) load(s, 3); // warm-up
const rps = [];
const cpu = [];
for (let i = 0; i < rounds; i++) {
  const order = i % 2 ? [1, 0] : [0, 1];
  const m = [];
  for (const k of order) m[k] = load(servers[k], seconds);
  rps.push(m[0].rps / m[1].rps);
  cpu.push(m[1].cpu_us / m[0].cpu_us);
  console.log(
    `round ${i + 1}: A ${m[0].rps.toFixed(0)} req/s (${m[0].cpu_us.toFixed(0)} µs), B ${m[1].rps.toFixed(0)} req/s (${m[1].cpu_us.toFixed(0)} µs), A/B ${rps.at(-1).toFixed(3)}`,
  );
}
console.log(
  `median A/B req/s ${median(rps).toFixed(3)} (A faster in ${rps.filter((x) => x > 1).length} of ${rounds}); median B/A CPU per request ${median(cpu).toFixed(3)}`,
);
process.exit(0);
