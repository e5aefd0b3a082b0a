// The benchmark's measurements, run by bench/run.sh after it has built everything.
// Writes bench/results.json and bench/RESULTS.md. See bench/README.md.
//
// Environment: QUICK=1 (short runs for checking the harness), SCENARIOS (a
// comma-separated subset of the scenario names), RUNS, SECONDS,
// CONNECTIONS, COLD_RUNS, H2H_ROUNDS override the defaults; BENCH_COMMAND is recorded as the
// command that produced the results.
import { spawn, spawnSync, execFileSync } from "node:child_process";
import { createPublicKey, createPrivateKey, verify } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync, openSync } from "node:fs";
import { request } from "node:http";
import { cpus, totalmem } from "node:os";
import { dirname, join, resolve } from "node:path";
import { gzipSync } from "node:zlib";
import { CLK_TCK, cpuMicros, freePort, median } from "./tools.mjs";

const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
const work = join(bench, ".work");
const bin = join(root, "node_modules/.bin");
const NODE = join(bin, "node");
const WORKERD = join(bin, "workerd");
const quick = process.env.QUICK === "1";
const RUNS = Number(process.env.RUNS ?? (quick ? 1 : 3));
const SECONDS = Number(process.env.SECONDS ?? (quick ? 1 : 4));
const CONNECTIONS = Number(process.env.CONNECTIONS ?? 16);
const COLD_RUNS = Number(process.env.COLD_RUNS ?? (quick ? 2 : 10));
const WARMUP = quick ? 1 : 2;
// The connect head-to-head against Hono (see headToHead): rounds and seconds per run.
const H2H_ROUNDS = Number(process.env.H2H_ROUNDS ?? (quick ? 2 : 10));
const H2H_SECONDS = quick ? 1 : 3;
const SERVER_CPU = "0";
const CLIENT_CPU = "1";

const STACKS = {
  ours: "ours (Rust/wasm, workerd)",
  hono: "Hono (TypeScript, workerd)",
  nest: "NestJS (Express server)",
  lambda: "NestJS (serverless-express handler, in-process)",
};
const TITLES = {
  connect: "POST /v1/connect",
  regions: "GET /v1/regions",
  healthz: "GET /healthz (no I/O: each stack's floor)",
};
const SERVERS = ["ours", "hono", "nest"];

// The main scenario gets every measurement; the others vary one thing.
const SCENARIOS = [
  { name: "regions-10-keys-1", regions: 10, keys: 1, main: true },
  { name: "regions-1-keys-1", regions: 1, keys: 1 },
  { name: "regions-100-keys-1", regions: 100, keys: 1 },
  { name: "regions-1000-keys-1", regions: 1000, keys: 1 },
  { name: "regions-10-keys-5", regions: 10, keys: 5 },
];

const log = (...a) => console.error(`[bench ${new Date().toISOString().slice(11, 19)}]`, ...a);
const loadavg1 = () => Number(readFileSync("/proc/loadavg", "utf8").split(" ")[0]);
const round = (x, d = 1) => (x === null || x === undefined ? null : Math.round(x * 10 ** d) / 10 ** d);
const sh = (cmd, args) => {
  try {
    return execFileSync(cmd, args, { stdio: ["ignore", "pipe", "pipe"] }).toString().trim();
  } catch (e) {
    return (e.stdout?.toString() || e.stderr?.toString() || "").trim() || null;
  }
};

// ------------------------------------------------------------------ machine

function machine() {
  const os = readFileSync("/etc/os-release", "utf8").match(/^PRETTY_NAME="?([^"\n]*)/m)?.[1];
  return {
    cpu: cpus()[0]?.model,
    cores: cpus().length,
    memory_gib: round(totalmem() / 2 ** 30, 1),
    os,
    kernel: sh("uname", ["-r"]),
    loadavg_start: readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).map(Number),
  };
}

function pkgVersion(dir, name) {
  try {
    return JSON.parse(readFileSync(join(dir, "node_modules", name, "package.json"), "utf8")).version;
  } catch {
    return null;
  }
}

/** The commit measured, and whether the worker's sources differ from it. */
function source() {
  const head = sh("git", ["-C", root, "rev-parse", "--short", "HEAD"]);
  let dirty = "";
  try {
    dirty = execFileSync("git", ["-C", root, "status", "--porcelain", "--", "src", "patches", "Cargo.toml", "Cargo.lock", "bench/peers"]).toString().trim();
  } catch {}
  return head ? `${head}${dirty ? " with uncommitted changes" : ""}` : null;
}

function versions() {
  const lock = readFileSync(join(root, "Cargo.lock"), "utf8");
  const crate = (n) => lock.match(new RegExp(`name = "${n}"\\nversion = "([^"]+)"`))?.[1] ?? null;
  return {
    measured_commit: source(),
    workerd: (sh(WORKERD, ["--version"]) ?? "").replace(/^workerd /, ""),
    node: sh(NODE, ["--version"]),
    rustc: (sh("rustc", ["--version"]) ?? "").replace(/^rustc /, ""),
    worker_crate: crate("worker"),
    wasm_bindgen: crate("wasm-bindgen"),
    wrk: (sh("wrk", ["-v"]) ?? "").match(/wrk (\S+)/)?.[1] ?? null,
    hono: pkgVersion(join(bench, "peers/hono"), "hono"),
    nestjs_core: pkgVersion(join(bench, "peers/nest"), "@nestjs/core"),
    express: pkgVersion(join(bench, "peers/nest"), "express"),
    serverless_express: pkgVersion(join(bench, "peers/nest"), "@vendia/serverless-express"),
    esbuild: sh(join(bin, "esbuild"), ["--version"]),
  };
}

// --------------------------------------------------------------------- size

function sizes() {
  const f = (p) => {
    const buf = readFileSync(p);
    return { bytes: buf.length, gzip_bytes: gzipSync(buf, { level: 9 }).length };
  };
  // The JavaScript is the generated glue and the entry module that wraps
  // it (the main module deployed), as the peers' figures are whole bundles.
  const js = [join(root, "build/index.js"), join(root, "build/entry.mjs")].map(f);
  const ours = { wasm: f(join(root, "build/index_bg.wasm")), js: { bytes: js[0].bytes + js[1].bytes, gzip_bytes: js[0].gzip_bytes + js[1].gzip_bytes } };
  return {
    ours: { ...ours, total: { bytes: ours.wasm.bytes + ours.js.bytes, gzip_bytes: ours.wasm.gzip_bytes + ours.js.gzip_bytes } },
    hono: { total: f(join(bench, "peers/hono/dist/index.js")) },
    nest: { total: f(join(bench, "peers/nest/dist/lambda.js")) },
  };
}

// ---------------------------------------------------------------- processes

function nestEnv(dir) {
  const vars = JSON.parse(readFileSync(join(dir, "vars.json"), "utf8"));
  return { ...process.env, ...vars, BENCH_KV_FILE: join(dir, "kv.json"), NODE_ENV: "production" };
}

function serverCommand(stack, dir, port) {
  switch (stack) {
    case "ours":
    case "hono":
    case "ours-empty":
    case "ours-load":
    case "hono-empty":
    case "hono-load":
      return { cmd: ["taskset", "-c", SERVER_CPU, WORKERD, "serve", join(dir, `${stack}.capnp`), `--socket-addr=http=127.0.0.1:${port}`] };
    case "nest":
      return { cmd: ["taskset", "-c", SERVER_CPU, NODE, join(bench, "peers/nest/dist/main.js")], env: { ...nestEnv(dir), PORT: String(port) } };
  }
}

const children = new Set();
process.on("exit", () => {
  for (const c of children) {
    try {
      process.kill(-c.pid, "SIGKILL");
    } catch {}
  }
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

async function startServer(stack, dir) {
  const port = await freePort();
  const { cmd, env } = serverCommand(stack, dir, port);
  // Truncated at each start: a stack starts once per scenario and run, and
  // its log (a line per request) would otherwise grow by hundreds of MB a run.
  const out = openSync(join(dir, `${stack}.log`), "w");
  const child = spawn(cmd[0], cmd.slice(1), { stdio: ["ignore", out, out], detached: true, env: env ?? process.env });
  children.add(child);
  return { stack, port, child, pid: child.pid };
}

function stopServer(s) {
  try {
    process.kill(-s.child.pid, "SIGKILL");
  } catch {}
  children.delete(s.child);
}

function http(port, method, path, headers = {}, body) {
  return new Promise((resolve) => {
    const req = request({ host: "127.0.0.1", port, method, path, headers }, (res) => {
      let data = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (data += d));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
    });
    req.on("error", () => resolve({ status: 0 }));
    req.end(body);
  });
}

function connectRequest(dir, line = 0) {
  const [token, device] = readFileSync(join(dir, "requests.txt"), "utf8").split("\n")[line].split(" ");
  const body = JSON.stringify({ device_id: device });
  return {
    headers: {
      authorization: `Bearer ${token}`,
      "content-type": "application/json",
      "content-length": Buffer.byteLength(body),
      "x-keenvpn-client-location": "50.11,8.68",
    },
    body,
  };
}

async function waitReady(s, dir) {
  const { headers, body } = connectRequest(dir);
  const until = Date.now() + 30_000;
  while (Date.now() < until) {
    const r = await http(s.port, "POST", "/v1/connect", headers, body);
    if (r.status === 200) return;
    if (r.status !== 0) throw new Error(`${s.stack} answered ${r.status}: ${r.body}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${s.stack} did not start; see ${join(dir, `${s.stack}.log`)}`);
}

// -------------------------------------------------------------- equivalence

/**
 * Every stack answers the same requests with the same JSON (tickets: same
 * claims, valid signature), and refuses the same wrong ones the same way.
 */
/** JSON text with object keys sorted at every level: member order carries no meaning in JSON. */
function canonical(v) {
  const sort = (x) =>
    Array.isArray(x)
      ? x.map(sort)
      : x && typeof x === "object"
        ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, sort(x[k])]))
        : x;
  return JSON.stringify(sort(v));
}

async function equivalence(servers, dir) {
  const keys = JSON.parse(readFileSync(join(dir, "keys.json"), "utf8"));
  const signer = createPublicKey(
    createPrivateKey({
      key: Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), Buffer.from(keys[0].seed, "base64url")]),
      format: "der",
      type: "pkcs8",
    }),
  );
  const norm = (r) => {
    if (r.status !== 200) return { status: r.status, body: r.body };
    const j = JSON.parse(r.body);
    if (j.ticket) {
      const [h, c, sig] = j.ticket.split(".");
      const valid = verify(null, Buffer.from(`${h}.${c}`), signer, Buffer.from(sig, "base64url"));
      const claims = JSON.parse(Buffer.from(c, "base64url").toString());
      if (claims.exp - claims.iat !== 120) claims.lifetime_wrong = true;
      delete claims.iat;
      delete claims.exp;
      j.ticket = { header: JSON.parse(Buffer.from(h, "base64url").toString()), claims, valid };
    }
    return { status: 200, body: j, etag: r.headers.etag ?? null, type: r.headers["content-type"]?.split(";")[0] };
  };
  const problems = [];
  for (let line = 1; line <= 12; line++) {
    const { headers, body } = connectRequest(dir, line);
    const answers = {};
    for (const s of servers) answers[s.stack] = norm(await http(s.port, "POST", "/v1/connect", headers, body));
    const ref = canonical(answers.ours);
    if (answers.ours.body?.ticket?.valid !== true) problems.push("ours: ticket signature does not verify");
    for (const [k, v] of Object.entries(answers)) if (canonical(v) !== ref) problems.push(`connect: ${k} differs from ours: ${JSON.stringify(v).slice(0, 300)} vs ${ref.slice(0, 300)}`);
  }
  // Refusals: the same status, problem code and WWW-Authenticate for hostile or wrong requests.
  const { headers: good, body: goodBody } = connectRequest(dir, 1);
  const device = JSON.parse(goodBody).device_id;
  const token = good.authorization.slice(7);
  const json = (b) => ({ "content-type": "application/json", "content-length": Buffer.byteLength(b) });
  const cases = {
    "no token": [{ ...json(goodBody) }, goodBody],
    "bad signature": [{ ...good, authorization: `Bearer ${token.slice(0, -6)}AAAAAA` }, goodBody],
    "malformed token": [{ ...good, authorization: "Bearer abc.def" }, goodBody],
    "Basic scheme": [{ ...good, authorization: `Basic ${token}` }, goodBody],
    "text/plain body": [{ ...good, "content-type": "text/plain" }, goodBody],
    "unknown field": [{ ...good, ...json(`{"device_id":"${device}","x":1}`) }, `{"device_id":"${device}","x":1}`],
    "unknown device": [{ ...good, ...json('{"device_id":"00000000-0000-4000-8000-000000000000"}') }, '{"device_id":"00000000-0000-4000-8000-000000000000"}'],
    "unknown region": [{ ...good, ...json(`{"device_id":"${device}","region":"mars"}`) }, `{"device_id":"${device}","region":"mars"}`],
    "country only": [{ ...good, "x-keenvpn-client-location": undefined, "x-keenvpn-client-country": "JP" }, goodBody],
  };
  for (const [name, [headers, body]] of Object.entries(cases)) {
    for (const k of Object.keys(headers)) if (headers[k] === undefined) delete headers[k];
    const answers = {};
    for (const s of servers) {
      const r = await http(s.port, "POST", "/v1/connect", headers, body);
      let code = null;
      try {
        const j = JSON.parse(r.body);
        code = j.code ?? j.region;
      } catch {}
      answers[s.stack] = { status: r.status, code, bearer: !!r.headers?.["www-authenticate"] };
    }
    const ref = canonical(answers.ours);
    for (const [k, v] of Object.entries(answers)) if (canonical(v) !== ref) problems.push(`${name}: ${k} answers ${JSON.stringify(v)}, ours ${ref}`);
  }

  const regions = {};
  for (const s of servers) regions[s.stack] = norm(await http(s.port, "GET", "/v1/regions"));
  const ref = canonical(regions.ours);
  for (const [k, v] of Object.entries(regions)) if (canonical(v) !== ref) problems.push(`regions: ${k} differs from ours`);
  return { same: problems.length === 0, problems };
}

// -------------------------------------------------------------------- load

/** CPU 0's busy and total jiffies: to see how much of the server's core other processes took. */
function cpu0() {
  const f = readFileSync("/proc/stat", "utf8").match(new RegExp(`^cpu${SERVER_CPU} (.*)$`, "m"))[1].trim().split(/\s+/).map(Number);
  const [user, nice, system, idle, iowait, irq, softirq, steal] = f;
  return { busy: user + nice + system + irq + softirq + steal, total: f.slice(0, 8).reduce((a, b) => a + b, 0) };
}

function wrk(s, endpoint, dir, seconds) {
  const core0 = cpu0();
  const before = cpuMicros(s.pid);
  const r = spawnSync(
    "taskset",
    ["-c", CLIENT_CPU, "wrk", "-t1", `-c${CONNECTIONS}`, `-d${seconds}s`, "-s", join(bench, "lib/load.lua"), `http://127.0.0.1:${s.port}`],
    { env: { ...process.env, BENCH_MODE: endpoint, BENCH_REQUESTS: join(dir, "requests.txt") }, encoding: "utf8" },
  );
  const after = cpuMicros(s.pid);
  const core1 = cpu0();
  const line = r.stdout.split("\n").find((l) => l.startsWith("{"));
  if (!line) throw new Error(`wrk failed: ${r.stderr} ${r.stdout}`);
  const j = JSON.parse(line);
  // A stack answering errors fast would look faster: no figure from a run
  // with any (the head-to-head and scaling runs keep only req/s or CPU).
  if (j.non2xx || j.socket_errors)
    throw new Error(`${s.stack} ${endpoint}: ${j.non2xx} non-2xx answers, ${j.socket_errors} socket errors in ${seconds} s`);
  const cpuUs = after - before;
  // The core's busy ticks that were not the server's.
  const foreign = Math.max(0, core1.busy - core0.busy - (cpuUs * CLK_TCK) / 1e6) / Math.max(1, core1.total - core0.total);
  return { ...figures(j, cpuUs), foreign_cpu_share: round(foreign, 3) };
}

function figures(j, cpuUs) {
  return {
    rps: round(j.requests / (j.duration_us / 1e6), 0),
    p50_ms: round(j.p50_us / 1000, 3),
    p99_ms: round(j.p99_us / 1000, 3),
    cpu_us_per_req: round(cpuUs / j.requests, 1),
    requests: j.requests,
    non2xx: j.non2xx,
    socket_errors: j.socket_errors,
  };
}

function lambdaWarm(dir, endpoint, seconds) {
  const r = spawnSync(
    "taskset",
    ["-c", SERVER_CPU, NODE, join(bench, "lib/lambda.cjs"), "warm", join(bench, "peers/nest/dist/lambda.js"), join(dir, "requests.txt"), String(seconds), endpoint],
    { env: nestEnv(dir), encoding: "utf8", maxBuffer: 1 << 30 },
  );
  const line = r.stdout.split("\n").reverse().find((l) => l.startsWith('{"requests"'));
  if (!line) throw new Error(`lambda bench failed: ${r.stderr.slice(-500)}`);
  const j = JSON.parse(line);
  return figures(j, j.cpu_us);
}

// One cold start of `stack`: {ms} from exec to the first 200 on connect, or,
// with `split` (workerd stacks only), {ready_ms, first_connect_ms,
// second_connect_ms} (see coldstart.mjs). `stack` may also name a workerd
// stack's `-empty` or `-load` configuration, whose stub answers the connect.
async function coldStart(stack, dir, split = false) {
  const requests = join(dir, "requests.txt");
  let args;
  let env = process.env;
  if (stack === "lambda") {
    args = ["exit", requests, "--", "taskset", "-c", SERVER_CPU, NODE, join(bench, "lib/lambda.cjs"), "cold", join(bench, "peers/nest/dist/lambda.js"), requests];
    env = nestEnv(dir);
  } else {
    const port = await freePort();
    const { cmd, env: e } = serverCommand(stack, dir, port);
    args = [split ? "split" : "http", String(port), requests, "--", ...cmd];
    env = e ?? env;
  }
  const r = spawnSync("taskset", ["-c", CLIENT_CPU, NODE, join(bench, "lib/coldstart.mjs"), ...args], { env, encoding: "utf8" });
  const line = r.stdout.split("\n").find((l) => l.startsWith("{"));
  if (!line) throw new Error(`cold start of ${stack} failed: ${r.stderr}`);
  return split ? JSON.parse(line) : JSON.parse(line).ms;
}

// ----------------------------------------------------------------- scenario

function seed(sc) {
  const dir = join(work, sc.name);
  mkdirSync(dir, { recursive: true });
  execFileSync(NODE, [join(bench, "lib/seed.mjs"), "--out", dir, "--regions", String(sc.regions), "--keys", String(sc.keys)]);
  for (const stack of ["ours", "hono"])
    for (const variant of ["full", "load", "empty"])
      execFileSync(NODE, [
        join(bench, "lib/workerd-config.mjs"),
        ...["--stack", stack, "--variant", variant, "--data", dir, "--port", "8080"],
        ...["--out", join(dir, variant === "full" ? `${stack}.capnp` : `${stack}-${variant}.capnp`)],
      ]);
  return dir;
}

async function scenario(sc) {
  log(`scenario ${sc.name}: seeding`);
  let dir = seed(sc);
  const result = { name: sc.name, regions: sc.regions, servers_in_client_region: sc.regions, keys: sc.keys, main: !!sc.main };

  const coldRuns = sc.main ? COLD_RUNS : Math.max(1, Math.ceil(COLD_RUNS / 2));
  log(`scenario ${sc.name}: cold starts (${coldRuns} per stack)`);
  result.cold_start_ms = {};
  for (const stack of ["ours", "hono", "lambda"]) result.cold_start_ms[stack] = { runs: [] };
  // The order turns round by round, so that no stack always starts right
  // after the same other one (whose teardown may still be running).
  for (let i = 0; i < coldRuns; i++)
    for (const stack of turned(["ours", "hono", "lambda"], i)) result.cold_start_ms[stack].runs.push(round(await coldStart(stack, dir), 1));
  for (const v of Object.values(result.cold_start_ms)) v.median = round(median(v.runs), 1);
  // Each round cold-starts the three stacks back to back, so a round's ratio
  // sees one phase of the machine; the median of those ratios moves less with
  // drift than the ratio of the medians does (the same reason as headToHead).
  const paired = (a, b) => round(median(result.cold_start_ms[a].runs.map((v, i) => v / result.cold_start_ms[b].runs[i])), 2);
  result.cold_start_paired = { ours_over_hono: paired("ours", "hono"), lambda_over_ours: paired("lambda", "ours") };
  if (sc.main) {
    // Where a workerd cold start goes: the runtime and modules up, then the
    // first connect, timed apart (interleaved, as above).
    log(`scenario ${sc.name}: cold starts in parts (${coldRuns} per workerd stack)`);
    // Two more configurations per stack time the loading alone: `empty` (a
    // stub worker with the stack's bindings: the runtime's floor) and `load`
    // (the stub importing the stack's modules; see workerd-config.mjs).
    const split = { ours: [], hono: [] };
    for (let i = 0; i < coldRuns; i++)
      for (const stack of turned(Object.keys(split), i)) {
        const run = await coldStart(stack, dir, true);
        run.empty_ms = await coldStart(`${stack}-empty`, dir);
        run.loaded_ms = await coldStart(`${stack}-load`, dir);
        split[stack].push(run);
      }
    result.cold_start_split_ms = {};
    for (const [stack, runs] of Object.entries(split)) {
      const m = {};
      for (const k of ["empty_ms", "loaded_ms", "ready_ms", "first_connect_ms", "second_connect_ms"]) m[k] = round(median(runs.map((x) => x[k])), 1);
      result.cold_start_split_ms[stack] = { runs: runs.map((x) => Object.fromEntries(Object.entries(x).map(([k, v]) => [k, round(v, 1)]))), median: m };
    }
  }

  // Fresh tokens for the load (they live 15 minutes).
  dir = seed(sc);
  log(`scenario ${sc.name}: starting servers`);
  const servers = [];
  for (const s of SERVERS) servers.push(await startServer(s, dir));
  try {
    for (const s of servers) await waitReady(s, dir);
    result.equivalence = await equivalence(servers, dir);
    if (!result.equivalence.same) log(`WARNING: answers differ: ${result.equivalence.problems.join("; ")}`);

    // /healthz (no I/O) gives each stack's floor, in the main scenario only.
    const endpoints = sc.main ? ["connect", "regions", "healthz"] : ["connect", "regions"];
    result.warm = {};
    for (const endpoint of endpoints) result.warm[endpoint] = {};
    for (const endpoint of endpoints)
      for (const stack of [...SERVERS, "lambda"]) result.warm[endpoint][stack] = { runs: [] };
    log(`scenario ${sc.name}: warm-up`);
    for (const s of servers) for (const endpoint of endpoints) wrk(s, endpoint, dir, WARMUP);
    for (let run = 0; run < RUNS; run++) {
      log(`scenario ${sc.name}: run ${run + 1}/${RUNS}`);
      // Each run measures every stack back to back, in an order that turns
      // run by run; the tables' ratios are the medians of each run's ratio.
      for (const endpoint of endpoints)
        for (const stack of turned([...servers.map((s) => s.stack), "lambda"], run))
          result.warm[endpoint][stack].runs.push(
            stack === "lambda" ? lambdaWarm(dir, endpoint, SECONDS) : wrk(servers.find((s) => s.stack === stack), endpoint, dir, SECONDS),
          );
    }
    if (sc.main) result.connect_vs_hono = headToHead(servers.find((s) => s.stack === "ours"), servers.find((s) => s.stack === "hono"), dir);
  } finally {
    for (const s of servers) stopServer(s);
  }
  result.foreign_cpu_share = median(
    Object.values(result.warm).flatMap((e) => Object.values(e).flatMap((v) => v.runs.map((r) => r.foreign_cpu_share).filter((x) => x !== undefined))),
  );
  for (const endpoint of Object.values(result.warm))
    for (const v of Object.values(endpoint)) {
      v.median = {};
      // With an even number of runs the median is a mean of two: round it as the runs are.
      for (const [k, d] of [["rps", 0], ["p50_ms", 3], ["p99_ms", 3], ["cpu_us_per_req", 1]]) v.median[k] = round(median(v.runs.map((r) => r[k])), d);
      v.non2xx = v.runs.reduce((a, r) => a + r.non2xx + r.socket_errors, 0);
    }
  return result;
}

// Paired measures. The machine's speed drifts by 15-30% within a minute,
// which moves each side's median of a few runs more than the sides differ.
// So the two run back to back, many short times, the order alternating round
// by round (neither always runs first); each round gives a ratio of two runs
// seconds apart, and the figure is the median of those ratios.
// `alternating` returns each side's figures, round by round.
function alternating(rounds, measureA, measureB) {
  const runs = [[], []];
  const measure = [measureA, measureB];
  for (let i = 0; i < rounds; i++) for (const k of i % 2 ? [1, 0] : [0, 1]) runs[k].push(measure[k]());
  return runs;
}

// `list` turned left by `n`: round n's order.
function turned(list, n) {
  const k = n % list.length;
  return [...list.slice(k), ...list.slice(0, k)];
}

// The median of the ratios of `a`'s to `b`'s requests/s run by run (each run
// measured the stacks back to back, so its ratio sees one phase of the
// machine).
function runRatio(a, b) {
  return median(a.runs.map((r, i) => r.rps / b.runs[i].rps));
}

// The median of the rounds' ratios, and their range.
function pairedRatio(ratios) {
  return { ratio: round(median(ratios), 2), min: Math.min(...ratios), max: Math.max(...ratios) };
}

// Warm connect, ours against Hono, paired.
function headToHead(ours, hono, dir) {
  log(`connect head-to-head, ours vs Hono: ${H2H_ROUNDS} rounds`);
  const rps = (s) => () => wrk(s, "connect", dir, H2H_SECONDS).rps;
  const [o, h] = alternating(H2H_ROUNDS, rps(ours), rps(hono));
  const rounds = o.map((x, i) => ({ first: i % 2 ? "hono" : "ours", ours: x, hono: h[i], ratio: round(x / h[i], 3) }));
  const ratios = rounds.map((r) => r.ratio);
  return { seconds: H2H_SECONDS, rounds, ...pairedRatio(ratios), ours_faster_rounds: ratios.filter((x) => x > 1).length };
}

// The scaling target compares two scenarios. Measured minutes apart, their
// ratio carries the machine's drift, so the target is taken from our worker
// on both catalogues side by side, paired: the median of the rounds' CPU
// ratios.
async function scalingPair(small, large) {
  log(`scaling: ours with ${small.regions} and ${large.regions} regions, ${H2H_ROUNDS} paired rounds`);
  const dirs = [seed(small), seed(large)];
  const servers = [];
  try {
    for (const dir of dirs) servers.push(await startServer("ours", dir));
    for (const [i, s] of servers.entries()) await waitReady(s, dirs[i]);
    for (const [i, s] of servers.entries()) wrk(s, "connect", dirs[i], WARMUP);
    const cpu = (i) => () => wrk(servers[i], "connect", dirs[i], H2H_SECONDS).cpu_us_per_req;
    const runs = alternating(H2H_ROUNDS, cpu(0), cpu(1));
    const ratios = runs[1].map((b, i) => round(b / runs[0][i], 3));
    const [a, b] = runs.map((r) => round(median(r), 1));
    return {
      small: small.regions,
      large: large.regions,
      seconds: H2H_SECONDS,
      cpu_us_per_req: { small: a, large: b },
      runs,
      ratios,
      ...pairedRatio(ratios),
    };
  } finally {
    for (const s of servers) stopServer(s);
  }
}

// ------------------------------------------------------------------ targets

function targets(r) {
  const main = r.scenarios.find((s) => s.main);
  if (!main) return [];
  const cold = main.cold_start_ms;
  const c = main.warm.connect;
  const cost = (n) => r.scenarios.find((s) => s.regions === n && s.keys === 1)?.warm.connect.ours.median.cpu_us_per_req;
  const t = [];
  // A target is met only where every stack gave the same answers.
  const same = main.equivalence?.same === true;
  const add = (name, value, goal, met) => t.push({ name, value: round(value, 2), goal, met: met && same });
  const pairs = main.cold_start_paired;
  const rounds = cold.ours.runs.length;
  add(`cold start: NestJS serverless-express first invocation / ours (median of ${rounds} paired rounds)`, pairs.lambda_over_ours, ">= 10", pairs.lambda_over_ours >= 10);
  add(`cold start: ours / Hono (median of ${rounds} paired rounds)`, pairs.ours_over_hono, "<= 1.2", pairs.ours_over_hono <= 1.2);
  const h = main.connect_vs_hono;
  add(`warm /v1/connect req/s: ours / Hono (median of ${h.rounds.length} paired rounds)`, h.ratio, ">= 1.0", h.ratio >= 1.0);
  const overNest = runRatio(c.ours, c.nest);
  add(`warm /v1/connect req/s: ours / NestJS (Express server; median of ${c.ours.runs.length} runs' ratios)`, overNest, ">= 3", overNest >= 3);
  add("wasm gzipped, KB (1 KB = 1000 bytes)", r.sizes.ours.wasm.gzip_bytes / 1000, "<= 400", r.sizes.ours.wasm.gzip_bytes <= 400_000);
  if (r.scaling)
    add("connect CPU per request: 1,000 regions / 10 regions (ours, median of paired rounds)", r.scaling.ratio, "<= 1.2", r.scaling.ratio <= 1.2);
  else if (cost(10) && cost(1000))
    add("connect CPU per request: 1,000 regions / 10 regions (ours)", cost(1000) / cost(10), "<= 1.2", cost(1000) / cost(10) <= 1.2);
  return t;
}

// ------------------------------------------------------------------ report

function markdown(r) {
  const kb = (b) => (b / 1000).toFixed(1);
  const x = (a, b) => (a && b ? (a / b).toFixed(2) : "–");
  const L = [];
  L.push("# Benchmark results: ours vs the Hono and NestJS peers", "");
  if (r.quick)
    L.push(
      "> **QUICK MODE**: short runs (a harness check, not a measurement). Re-run `bash bench/run.sh` without `QUICK=1` for figures.",
      "",
    );
  if (r.noisy)
    L.push(
      `> **Noisy machine**: the 1-minute load average was ${r.machine.loadavg_start[0]} before the benchmark started (${r.machine.cores} cores), and other processes took ${Math.round(r.foreign_cpu_share * 100)}% of the server's CPU during the load runs (median); absolute figures are low and ratios less reliable.`,
      "",
    );
  L.push(`Generated ${r.generated_at} by \`${r.command}\` (${r.runs} run(s) of ${r.seconds} s per figure, medians; ${r.connections} connections; cold starts: medians of ${r.cold_runs}).`, "");
  L.push(`Other processes' share of the server's CPU during the load runs (median): ${Math.round(r.foreign_cpu_share * 100)}%.`, "");
  L.push(`Machine: ${r.machine.cpu}, ${r.machine.cores} cores, ${r.machine.memory_gib} GiB, ${r.machine.os}, Linux ${r.machine.kernel}. Server pinned to CPU ${SERVER_CPU}, load generator (wrk) to CPU ${CLIENT_CPU}.`, "");
  L.push(
    "Versions: " +
      Object.entries(r.versions)
        .map(([k, v]) => `${k} ${v ?? "?"}`)
        .join(", ") +
      ".",
    "",
  );

  L.push("## Targets", "", "| target | value | goal | met |", "|---|---|---|---|");
  for (const t of r.targets) L.push(`| ${t.name} | ${t.value} | ${t.goal} | ${t.met ? "yes" : "**no**"} |`);
  L.push("");

  const s = r.sizes;
  L.push("## Size", "", "| artefact | raw KB | gzipped KB |", "|---|---|---|");
  L.push(`| ours: \`build/index_bg.wasm\` | ${kb(s.ours.wasm.bytes)} | ${kb(s.ours.wasm.gzip_bytes)} |`);
  L.push(`| ours: \`build/index.js\` + \`build/entry.mjs\` (glue, entry module) | ${kb(s.ours.js.bytes)} | ${kb(s.ours.js.gzip_bytes)} |`);
  L.push(`| ours: total | ${kb(s.ours.total.bytes)} | ${kb(s.ours.total.gzip_bytes)} |`);
  L.push(`| Hono peer bundle | ${kb(s.hono.total.bytes)} | ${kb(s.hono.total.gzip_bytes)} |`);
  L.push(`| NestJS peer Lambda bundle | ${kb(s.nest.total.bytes)} | ${kb(s.nest.total.gzip_bytes)} |`, "");

  L.push("## Cold start (process exec to first 200 on POST /v1/connect), ms", "");
  L.push(
    "Medians of each stack's cold starts, then two ratios: of those medians, and the median of the rounds' ratios (each round",
    "starts the three stacks back to back, so its ratio sees one phase of the machine; the targets use these).",
    "",
  );
  L.push(
    "| scenario | ours | Hono | NestJS serverless-express | ours / Hono | NestJS / ours | ours / Hono, paired | NestJS / ours, paired |",
    "|---|---|---|---|---|---|---|---|",
  );
  for (const sc of r.scenarios) {
    const c = sc.cold_start_ms;
    const p = sc.cold_start_paired;
    L.push(
      `| ${sc.name} | ${c.ours.median} | ${c.hono.median} | ${c.lambda.median} | ${x(c.ours.median, c.hono.median)} | ${x(c.lambda.median, c.ours.median)} | ${p.ours_over_hono.toFixed(2)} | ${p.lambda_over_ours.toFixed(2)} |`,
    );
  }
  L.push("");
  for (const sc of r.scenarios.filter((s) => s.cold_start_split_ms)) {
    const { ours, hono } = sc.cold_start_split_ms;
    const row = (label, k) => `| ${label} | ${ours.median[k]} | ${hono.median[k]} | ${round(ours.median[k] - hono.median[k], 1)} |`;
    L.push(`### Where a workerd cold start goes (${sc.name}), ms`, "");
    L.push(
      "Separate cold starts, timed in parts: medians of each part. The first two rows are other configurations of the same",
      "workerd: a stub worker with the stack's bindings, and the stub importing the stack's modules without calling them.",
      "",
    );
    L.push("| part | ours | Hono | ours − Hono |", "|---|---|---|---|");
    L.push(row("exec to the first 200 of a stub worker with the stack's bindings (the runtime's floor)", "empty_ms"));
    L.push(row("exec to the first 200 of the stub, the stack's modules imported (compiled, top level run)", "loaded_ms"));
    L.push(row("exec to the first 200 on `GET /healthz` (runtime and modules loaded)", "ready_ms"));
    L.push(row("then the first `POST /v1/connect` (lazy compilation, first use of bindings)", "first_connect_ms"));
    L.push(row("then a second `POST /v1/connect`", "second_connect_ms"), "");
  }

  for (const sc of r.scenarios.filter((s) => s.main)) {
    L.push(`## Warm hot path (${sc.regions} regions, ${sc.keys} signing key(s))`, "");
    for (const endpoint of Object.keys(sc.warm)) {
      const w = sc.warm[endpoint];
      L.push(`### ${TITLES[endpoint]}`, "");
      L.push("| stack | req/s | p50 ms | p99 ms | CPU µs/req | ours/stack req/s | stack/ours CPU | errors |", "|---|---|---|---|---|---|---|---|");
      // The ratios: medians of each run's ratio (the runs measured every
      // stack back to back), not ratios of the medians.
      const cpuRatio = (v) => median(v.runs.map((r, i) => r.cpu_us_per_req / w.ours.runs[i].cpu_us_per_req));
      for (const [k, v] of Object.entries(w))
        L.push(
          `| ${STACKS[k]} | ${v.median.rps} | ${v.median.p50_ms} | ${v.median.p99_ms} | ${v.median.cpu_us_per_req} | ${runRatio(w.ours, v).toFixed(2)} | ${cpuRatio(v).toFixed(2)} | ${v.non2xx} |`,
        );
      L.push("");
    }
    if (sc.warm.healthz) {
      L.push("### Where the CPU goes: each route's cost above the stack's floor", "");
      L.push("| stack | floor: /healthz µs | /v1/connect µs | connect above floor | /v1/regions µs | regions above floor |", "|---|---|---|---|---|---|");
      for (const k of Object.keys(sc.warm.healthz)) {
        const cpu = (e) => sc.warm[e][k].median.cpu_us_per_req;
        L.push(`| ${STACKS[k]} | ${cpu("healthz")} | ${cpu("connect")} | ${round(cpu("connect") - cpu("healthz"), 1)} | ${cpu("regions")} | ${round(cpu("regions") - cpu("healthz"), 1)} |`);
      }
      L.push("");
    }
    const h = sc.connect_vs_hono;
    L.push("### POST /v1/connect head to head: ours vs Hono", "");
    L.push(
      `Both servers up, ${h.rounds.length} rounds of two ${h.seconds}-s runs back to back, the order alternating; the target uses the median of the rounds' ratios: drift between rounds moves it far less than it moves each stack's median in the table above. Median ${h.ratio} (rounds from ${h.min} to ${h.max}; ours faster in ${h.ours_faster_rounds} of ${h.rounds.length}).`,
      "",
    );
    L.push("| round | first | ours req/s | Hono req/s | ours / Hono |", "|---|---|---|---|---|");
    h.rounds.forEach((r, i) => L.push(`| ${i + 1} | ${STACKS[r.first].split(" ")[0]} | ${r.ours} | ${r.hono} | ${r.ratio} |`));
    L.push("");
  }

  L.push("## Scaling: catalogue size and live signing keys", "");
  L.push(
    "Each scenario: N regions in the catalogue, the client's region (`eu-central`) holding N servers, every other region 4; tokens spread over the live keys.",
    "",
  );
  for (const endpoint of ["connect", "regions"]) {
    L.push(`### ${TITLES[endpoint]}: req/s (CPU µs/req)`, "");
    L.push("| scenario | ours | Hono | NestJS server | NestJS handler | ours/Hono req/s | ours/NestJS req/s |", "|---|---|---|---|---|---|---|");
    for (const sc of r.scenarios) {
      const w = sc.warm[endpoint];
      const cell = (v) => `${v.median.rps} (${v.median.cpu_us_per_req})`;
      L.push(`| ${sc.name} | ${cell(w.ours)} | ${cell(w.hono)} | ${cell(w.nest)} | ${cell(w.lambda)} | ${round(runRatio(w.ours, w.hono), 2)}x | ${round(runRatio(w.ours, w.nest), 2)}x |`);
    }
    L.push("");
  }

  if (r.scaling) {
    const g = r.scaling;
    L.push(
      `The scaling target is measured apart from the table above: our worker on the ${g.small}- and ${g.large}-region catalogues at once, ${g.ratios.length} rounds of two ${g.seconds}-s connect runs back to back with the order alternating, so that each round's ratio sees one machine. Connect CPU per request (medians): ${g.cpu_us_per_req.small} µs with ${g.small} regions, ${g.cpu_us_per_req.large} µs with ${g.large}. Median of the rounds' ratios: ${g.ratio} (rounds from ${g.min} to ${g.max}).`,
      "",
    );
  }

  L.push("## Equivalence check", "");
  for (const sc of r.scenarios)
    L.push(`- ${sc.name}: ${sc.equivalence.same ? "all stacks gave the same answers" : `**answers differ**: ${sc.equivalence.problems.join("; ")}`}`);
  L.push("");
  L.push("How to read these figures, and what differs between the stacks: [README.md](README.md).", "");
  return L.join("\n");
}

// -------------------------------------------------------------------- main

// run.sh has just built everything, which keeps the 1-minute load average up
// for a while: let it settle (up to 90 s) so that the noisy flag below reports
// other work on the machine, not our own build.
for (let waited = 0; waited < 90 && loadavg1() > 1.0; waited += 5) {
  if (waited === 0) log(`waiting for the load average (${loadavg1()}) to settle below 1.0`);
  await new Promise((r) => setTimeout(r, 5000));
}
const started = Date.now();
const result = {
  generated_at: new Date().toISOString(),
  command: process.env.BENCH_COMMAND ?? "bash bench/run.sh",
  quick,
  runs: RUNS,
  seconds: SECONDS,
  connections: CONNECTIONS,
  cold_runs: COLD_RUNS,
  machine: machine(),
  versions: versions(),
  sizes: sizes(),
  scenarios: [],
};
// SCENARIOS=name,name runs a subset (for checking the harness; the report then lacks the rest).
const only = process.env.SCENARIOS?.split(",");
for (const sc of SCENARIOS.filter((s) => !only || only.includes(s.name))) result.scenarios.push(await scenario(sc));
if (!only) {
  const by = (n) => SCENARIOS.find((s) => s.regions === n && s.keys === 1);
  result.scaling = await scalingPair(by(10), by(1000));
}
result.machine.loadavg_end = readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).map(Number);
// Other work on the machine: the load before we started (our own load raises the
// end figure), and the share of the server's CPU other processes took during the runs.
result.foreign_cpu_share = median(result.scenarios.map((s) => s.foreign_cpu_share));
result.noisy = result.machine.loadavg_start[0] > 1.0 || result.foreign_cpu_share > 0.05;
result.elapsed_s = round((Date.now() - started) / 1000, 0);
result.targets = targets(result);
writeFileSync(join(bench, "results.json"), JSON.stringify(result, null, 2) + "\n");
writeFileSync(join(bench, "RESULTS.md"), markdown(result));
log(`done in ${result.elapsed_s} s: bench/results.json, bench/RESULTS.md`);
for (const t of result.targets) log(`${t.met ? "met   " : "MISSED"} ${t.name}: ${t.value} (goal ${t.goal})`);
