// How much of our wasm a fresh isolate compiles for each of its first
// requests, and how long that takes: workerd compiles wasm lazily, function
// by function on first call, in V8's baseline compiler (Liftoff), and that
// compilation runs on the request that first calls the function.
//
// usage: node compile-trace.mjs [--data DIR] [--runs 5] [--build DIR] [--compare DIR] [--top N]
//
// Each run starts `workerd serve` with V8's --trace-wasm-compilation-times on
// the scenario's config (see workerd-config.mjs), then sends, one at a time:
// GET /healthz, POST /v1/connect (the first user of the scenario's
// requests.txt), POST /v1/auth/logout (the same token: the isolate's first
// call into its UserSession object). It prints, for each request, the median
// over the runs of the functions compiled, the bytes of their bodies and the
// compile time V8 reports (V8 reports a few functions twice; they count
// twice, as their compile time was spent twice). --build measures another build than build/ (a
// directory with entry.mjs, index.js and index_bg.wasm); --compare DIR
// measures that build too, the runs interleaved. --top N lists the N largest
// functions each request compiled (named when the build kept its name
// section: KEEP_WASM_NAMES=1 sh scripts/build-worker.sh).
// DIR is a scenario directory the benchmark seeded (bench/.work/<scenario>);
// re-seed it (bench/README.md) when its tokens have expired.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { freePort, median, parseFlags, untilUp } from "./tools.mjs";

const args = parseFlags();
const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
const data = resolve(args.data ?? join(bench, ".work/regions-10-keys-1"));
const runs = Number(args.runs ?? 5);
const builds = [resolve(args.build ?? join(root, "build")), ...(args.compare ? [resolve(args.compare)] : [])];
const [token, device] = readFileSync(join(data, "requests.txt"), "utf8").split("\n")[0].split(" ");
const work = mkdtempSync(join(tmpdir(), "compile-trace-"));
process.on("exit", () => rmSync(work, { recursive: true, force: true }));

const steps = [
  ["GET /healthz", null],
  [
    "POST /v1/connect",
    (port) =>
      fetch(`http://127.0.0.1:${port}/v1/connect`, {
        method: "POST",
        headers: {
          authorization: `Bearer ${token}`,
          "content-type": "application/json",
          "x-keenvpn-client-location": "50.11,8.68",
        },
        body: JSON.stringify({ device_id: device }),
      }),
  ],
  [
    "POST /v1/auth/logout",
    (port) => fetch(`http://127.0.0.1:${port}/v1/auth/logout`, { method: "POST", headers: { authorization: `Bearer ${token}` } }),
  ],
];

// "Compiled function 0x..#1234 using Liftoff, took 71 μs and 21136 bytes; bodysize 494 codesize 2072"
const TRACE = /Compiled function \S+#(\d+) using (\w+), took (\d+) μs and \d+ bytes; bodysize (\d+)/;
const top = Number(args.top ?? 0);

/** Function index -> name, from the module's "name" section (empty without one). */
function functionNames(wasm) {
  const names = new Map();
  const [section] = WebAssembly.Module.customSections(new WebAssembly.Module(wasm), "name");
  if (!section) return names;
  const b = new Uint8Array(section);
  let at = 0;
  const leb = () => {
    let n = 0;
    for (let shift = 0; ; shift += 7) {
      const byte = b[at++];
      n += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return n;
    }
  };
  while (at < b.length) {
    const [id, size] = [b[at++], leb()];
    const end = at + size;
    if (id === 1) {
      for (let count = leb(); count > 0; count--) {
        const index = leb();
        const len = leb();
        names.set(index, new TextDecoder().decode(b.subarray(at, at + len)));
        at += len;
      }
    }
    at = end;
  }
  return names;
}

async function once(build, i) {
  const config = join(work, `ours-${i}.capnp`);
  const port = await freePort();
  const made = spawnSync(process.execPath, [join(bench, "lib/workerd-config.mjs"), "--stack", "ours", "--data", data,
    "--port", String(port), "--out", config, "--build", build, "--v8-flags", "--trace-wasm-compilation-times"]);
  if (made.status !== 0) throw new Error(`workerd-config.mjs: ${made.stderr}`);
  const child = spawn(join(root, "node_modules/.bin/workerd"), ["serve", config, `--socket-addr=http=127.0.0.1:${port}`], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let lines = [];
  const take = (chunk) => lines.push(...chunk.toString().split("\n").filter((l) => TRACE.test(l)));
  child.stdout.on("data", take);
  child.stderr.on("data", take);
  const settle = () => new Promise((r) => setTimeout(r, 300));
  const out = [];
  try {
    for (const [name, send] of steps) {
      if (send) {
        const res = await send(port);
        await res.arrayBuffer();
        if (!res.ok) throw new Error(`${name}: ${res.status} (re-seed the scenario if its tokens expired)`);
      } else await untilUp(port);
      await settle();
      const compiled = lines.map((l) => l.match(TRACE)).map(([, index, tier, took, body]) => ({
        index: Number(index),
        tier,
        took: Number(took),
        body: Number(body),
      }));
      out.push({
        name,
        functions: compiled.length,
        bytes: compiled.reduce((sum, c) => sum + c.body, 0),
        micros: compiled.reduce((sum, c) => sum + c.took, 0),
        tiers: [...new Set(compiled.map((c) => c.tier))].join("+"),
        largest: compiled.sort((x, y) => y.body - x.body).slice(0, top),
      });
      lines = [];
    }
  } finally {
    child.kill("SIGKILL");
  }
  return out;
}

const results = builds.map(() => []);
for (let i = 0; i < runs; i++) for (const [b, build] of builds.entries()) results[b].push(await once(build, `${b}-${i}`));

for (const [b, build] of builds.entries()) {
  const names = top ? functionNames(readFileSync(join(build, "index_bg.wasm"))) : new Map();
  console.log(`${build} (median of ${runs} fresh isolates)`);
  for (const [s, [name]] of steps.entries()) {
    const at = (k) => median(results[b].map((r) => r[s][k]));
    console.log(
      `  ${name.padEnd(22)} ${String(at("functions")).padStart(4)} functions, ${(at("bytes") / 1000).toFixed(1).padStart(6)} KB of code, ` +
        `${(at("micros") / 1000).toFixed(1).padStart(5)} ms compiling (${results[b][0][s].tiers || "none"})`,
    );
    // The largest functions of the first run (the same functions in every run).
    for (const c of results[b][0][s].largest)
      console.log(`      ${String(c.body).padStart(6)} B  #${c.index} ${names.get(c.index) ?? ""}`.trimEnd());
  }
}
