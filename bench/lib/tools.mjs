// Helpers shared by the measuring tools next to this file (profile.mjs,
// crossings.mjs, ab.mjs, module-load.mjs, and the benchmark itself): flags,
// ports, readiness, a process's CPU time and medians.
import { spawnSync } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { createServer } from "node:net";

/** `--name value` pairs of the command line, as an object. */
export function parseFlags(argv = process.argv.slice(2)) {
  return Object.fromEntries(argv.reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
}

// A port picked by binding port 0 comes from the kernel's ephemeral range,
// where any outgoing connection (the load generator's, a health check's) can
// take it before the server binds it; workerd then fails to listen. So ports
// come from below that range, each at most once per process, from a start that
// differs between processes, and only if a bind to them succeeds now (the same
// rule as the test harness's `free_port`).
const LOWEST_PORT = 10000;
let portsHanded = 0;

function ephemeralStart() {
  try {
    const first = Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
    return Number.isInteger(first) ? first : 32768;
  } catch {
    return 32768;
  }
}

async function bindable(port) {
  const s = createServer();
  s.listen(port, "127.0.0.1");
  try {
    await once(s, "listening");
  } catch {
    return null;
  }
  const { port: bound } = s.address();
  await new Promise((r) => s.close(r));
  return bound;
}

/** A TCP port on 127.0.0.1, below the ephemeral range, free a moment ago. */
export async function freePort() {
  const span = ephemeralStart() - LOWEST_PORT;
  // An unusual kernel setting: leave the choice to the kernel.
  if (span < 1000) return bindable(0);
  const start = process.pid * 7919;
  while (portsHanded < span) {
    const port = LOWEST_PORT + ((start + portsHanded++) % span);
    if ((await bindable(port)) !== null) return port;
  }
  throw new Error(`no free port left below ${LOWEST_PORT + span}`);
}

/** Resolves once `GET /healthz` on `port` gets any answer; throws after about 10 s. */
export async function untilUp(port, what = "workerd") {
  for (let i = 0; ; i++) {
    try {
      await fetch(`http://127.0.0.1:${port}/healthz`);
      return;
    } catch {
      if (i > 500) throw new Error(`${what} did not start`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** The median of a list of numbers; null for an empty one. */
export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n === 0 ? null : n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

/** Clock ticks per second: the unit of the CPU times in /proc. */
export const CLK_TCK = Number(spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).stdout.trim());

/** The CPU time (user + system) process `pid` has used so far, in µs. */
export function cpuMicros(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) / CLK_TCK) * 1e6;
}
