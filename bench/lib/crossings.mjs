// Counts our worker's calls from wasm into JavaScript per request, by import.
//
// usage: node crossings.mjs [--data DIR] [--endpoint connect|regions|healthz] [--requests 10]
//
// Copies build/ (scripts/build-worker.sh's output) into DIR/crossings/, wraps
// every function the glue hands the wasm instance as an import in a counter,
// and adds a `GET /__crossings` answer to the copy of the entry module that
// returns the counts and resets them. Then serves the copy with the
// scenario's configuration (DIR/ours.capnp, as DIR/crossings.capnp), sends
// the requests once to warm up, resets the counts, sends them again and
// prints the calls per request. The shipped build is not touched. DIR is a
// scenario directory the benchmark seeded (bench/.work/<scenario>).
import { spawn } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { freePort, parseFlags, untilUp } from "./tools.mjs";

const args = parseFlags();
const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
const data = resolve(args.data ?? join(bench, ".work/regions-10-keys-1"));
const endpoint = args.endpoint ?? "connect";
const n = Number(args.requests ?? 10);

const out = join(data, "crossings");
mkdirSync(out, { recursive: true });
for (const f of ["entry.mjs", "index_bg.wasm"]) copyFileSync(join(root, "build", f), join(out, f));

// The glue instantiates the module as `new WebAssembly.Instance(module, imports())`.
const glue = readFileSync(join(root, "build/index.js"), "utf8");
const instantiate = /new WebAssembly\.Instance\((\w+),\s*(\w+)\(\)\)/g;
if (!instantiate.test(glue)) throw new Error("build/index.js: no `new WebAssembly.Instance(m, imports())` found");
const counter = `globalThis.__crossings ??= {};
function __counted(imports) {
  const wrapped = {};
  for (const [name, module] of Object.entries(imports)) {
    wrapped[name] = {};
    for (const [key, f] of Object.entries(module)) {
      wrapped[name][key] = typeof f !== "function" ? f : function (...a) {
        globalThis.__crossings[key] = (globalThis.__crossings[key] ?? 0) + 1;
        return f.apply(this, a);
      };
    }
  }
  return wrapped;
}
`;
writeFileSync(join(out, "index.js"), counter + glue.replace(instantiate, "new WebAssembly.Instance($1, __counted($2()))"));

const entry = readFileSync(join(out, "entry.mjs"), "utf8");
const hook = "  entrypoint[name] = function (arg, env, ctx) {\n";
if (!entry.includes(hook)) throw new Error("build/entry.mjs: the entrypoint loop has changed; update crossings.mjs");
writeFileSync(
  join(out, "entry.mjs"),
  entry.replace(
    hook,
    hook +
      `    if (name === "fetch" && new URL(arg.url).pathname === "/__crossings") {
      const counts = globalThis.__crossings;
      globalThis.__crossings = {};
      return Response.json(counts);
    }
`,
  ),
);
// Next to the scenario's own, whose other paths are relative to it.
const config = join(data, "crossings.capnp");
writeFileSync(config, readFileSync(join(data, "ours.capnp"), "utf8").replaceAll("../../../build/", "crossings/"));

const port = await freePort();
const child = spawn(join(root, "node_modules/.bin/workerd"), ["serve", config, `--socket-addr=http=127.0.0.1:${port}`], {
  stdio: "ignore",
  detached: true,
});
process.on("exit", () => {
  try {
    process.kill(-child.pid, "SIGKILL");
  } catch {}
});
const url = (path) => `http://127.0.0.1:${port}${path}`;
await untilUp(port);

const users = readFileSync(join(data, "requests.txt"), "utf8").trim().split("\n");
async function send(i) {
  let r;
  if (endpoint === "connect") {
    const [token, device] = users[i % users.length].split(" ");
    r = await fetch(url("/v1/connect"), {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json", "x-keenvpn-client-location": "50.11,8.68" },
      body: JSON.stringify({ device_id: device }),
    });
  } else {
    r = await fetch(url(endpoint === "regions" ? "/v1/regions" : "/healthz"));
  }
  await r.arrayBuffer();
  if (r.status !== 200) throw new Error(`${endpoint}: status ${r.status}`);
}
// Warm-up: the instance, the keys, the catalogue and the first use of each user.
for (let i = 0; i < n; i++) await send(i);
await (await fetch(url("/__crossings"))).json();
for (let i = 0; i < n; i++) await send(i);
// Let the work each request left running (the queued event) finish.
await new Promise((r) => setTimeout(r, 200));
const counts = Object.entries(await (await fetch(url("/__crossings"))).json()).sort((a, b) => b[1] - a[1]);
const total = counts.reduce((s, [, c]) => s + c, 0);
console.log(`${endpoint}: ${(total / n).toFixed(1)} calls from wasm into JavaScript per request (${n} requests)`);
for (const [name, c] of counts) console.log(`${(c / n).toFixed(1).padStart(6)}  ${name}`);
process.exit(0);
