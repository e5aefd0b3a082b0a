// What a cold start pays to load our wasm module, by section: the code
// (function bodies) or the data (the segments copied into memory at start).
//
// usage: node module-load.mjs [--data DIR] [--wasm build/index_bg.wasm] [--rounds 12]
//
// Writes two variants of the module next to DIR's configurations: one whose
// data segments are empty, one whose function bodies are each a single
// `unreachable`. Neither could serve a request, and none has to: each is added,
// unused, to the stub worker of the scenario (`ours-empty.capnp`, which the
// benchmark writes), and the tool times process exec to the first 200 of
// the stub alone, the stub with the whole module, and the stub with each
// variant, in interleaved rounds. The stub with a module minus the stub alone
// is what registering that module costs workerd, before any of it runs.
import { spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { freePort, median, parseFlags } from "./tools.mjs";

const args = parseFlags();
const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
const data = resolve(args.data ?? join(bench, ".work/regions-10-keys-1"));
const wasmPath = resolve(root, args.wasm ?? "build/index_bg.wasm");
const rounds = Number(args.rounds ?? 12);

// --- the module's sections (https://webassembly.github.io/spec/core/binary/) ---

function readU32(bytes, at) {
  let value = 0;
  let shift = 0;
  for (;;) {
    const b = bytes[at++];
    value += (b & 0x7f) * 2 ** shift;
    shift += 7;
    if (b < 0x80) return [value, at];
  }
}

function u32(value) {
  const out = [];
  do {
    let b = value & 0x7f;
    value = Math.floor(value / 128);
    if (value > 0) b |= 0x80;
    out.push(b);
  } while (value > 0);
  return out;
}

function sections(bytes) {
  const out = [];
  let at = 8;
  while (at < bytes.length) {
    const id = bytes[at];
    const [size, start] = readU32(bytes, at + 1);
    out.push({ id, body: bytes.subarray(start, start + size) });
    at = start + size;
  }
  return out;
}

function assemble(header, parts) {
  const chunks = [header];
  for (const { id, body } of parts) chunks.push(Uint8Array.from([id, ...u32(body.length)]), body);
  return Buffer.concat(chunks);
}

const CODE = 10;
const DATA = 11;

/** The code section with every body replaced by `unreachable`, locals dropped. */
function stubCode(body) {
  let [count, at] = readU32(body, 0);
  const out = [...u32(count)];
  for (let i = 0; i < count; i++) {
    const [size, start] = readU32(body, at);
    at = start + size;
    out.push(3, 0x00, 0x00, 0x0b); // size 3: no locals, unreachable, end
  }
  return Uint8Array.from(out);
}

/** The data section with each active segment's bytes dropped (offsets kept). */
function emptyData(body) {
  let [count, at] = readU32(body, 0);
  const out = [...u32(count)];
  for (let i = 0; i < count; i++) {
    const [flags, afterFlags] = readU32(body, at);
    if (flags !== 0) throw new Error(`data segment ${i}: flags ${flags}; only active segments of memory 0 are handled`);
    let end = afterFlags;
    while (body[end] !== 0x0b) end++; // the offset: one constant instruction, then `end`
    const [size, bytesAt] = readU32(body, end + 1);
    out.push(...body.subarray(at, end + 1), 0);
    at = bytesAt + size;
  }
  return Uint8Array.from(out);
}

const original = readFileSync(wasmPath);
const parts = sections(original);
const header = original.subarray(0, 8);
const sizeOf = (id) => parts.find((p) => p.id === id)?.body.length ?? 0;
const variants = {
  whole: original,
  "code only": assemble(header, parts.map((p) => (p.id === DATA ? { id: DATA, body: emptyData(p.body) } : p))),
  "data only": assemble(header, parts.map((p) => (p.id === CODE ? { id: CODE, body: stubCode(p.body) } : p))),
};

// --- one configuration per module, and the stub alone ---

const stub = readFileSync(join(data, "ours-empty.capnp"), "utf8");
const marker = /(\(name = "empty\.mjs", esModule = .*\))\n/;
if (!marker.test(stub)) throw new Error(`${data}/ours-empty.capnp: no stub module found; run the benchmark once`);
const dir = join(data, "module-load");
mkdirSync(dir, { recursive: true });
const configs = { "stub alone": join(data, "ours-empty.capnp") };
for (const [name, bytes] of Object.entries(variants)) {
  const file = `${name.replace(" ", "-")}.wasm`;
  writeFileSync(join(dir, file), bytes);
  const config = join(data, `module-load-${name.replace(" ", "-")}.capnp`);
  const module = `(name = "unused.wasm", wasm = embed "${relative(data, join(dir, file))}")`;
  writeFileSync(config, stub.replace(marker, `$1,\n    ${module}\n`));
  configs[`stub + ${name}`] = config;
}

// --- interleaved cold starts ---

const requests = join(data, "requests.txt");
const times = Object.fromEntries(Object.keys(configs).map((k) => [k, []]));
for (let round = 0; round < rounds; round++) {
  for (const [name, config] of Object.entries(configs)) {
    const port = await freePort();
    const r = spawnSync(
      process.execPath,
      [join(bench, "lib/coldstart.mjs"), "http", String(port), requests, "--",
        "taskset", "-c", "0", join(root, "node_modules/.bin/workerd"), "serve", config, `--socket-addr=http=127.0.0.1:${port}`],
      { encoding: "utf8" },
    );
    if (r.status !== 0) throw new Error(`${name}: ${r.stderr}`);
    times[name].push(JSON.parse(r.stdout).ms);
  }
}

const floor = median(times["stub alone"]);
const kb = (n) => (n / 1000).toFixed(1);
console.log(`${relative(root, wasmPath)}: ${kb(original.length)} KB; code section ${kb(sizeOf(CODE))} KB, data section ${kb(sizeOf(DATA))} KB`);
console.log(`exec to the first 200 of the stub worker, medians of ${rounds} interleaved cold starts:`);
for (const [name, xs] of Object.entries(times)) {
  const m = median(xs);
  const extra = name === "stub alone" ? "" : `  (+${(m - floor).toFixed(1)} ms, module ${kb(variants[name.slice(7)].length)} KB)`;
  console.log(`  ${name.padEnd(18)} ${m.toFixed(1)} ms${extra}`);
}
