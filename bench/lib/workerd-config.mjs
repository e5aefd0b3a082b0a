// Writes a `workerd serve` config (Cap'n Proto text) for one stack and scenario.
//
// usage: node workerd-config.mjs --stack ours|hono --data DIR --port PORT --out FILE
//          [--variant full|load|empty] [--build DIR] [--v8-flags FLAG,FLAG]
// (the harness overrides the port at start with --socket-addr=http=127.0.0.1:PORT)
//
// The variants time what loading a worker costs (bench.mjs, the cold start in
// parts): `full` is the stack itself; `load` imports the stack's modules (so
// workerd compiles them and runs their top level, which instantiates our wasm)
// but answers every request from a stub; `empty` is the stub alone, with the
// same bindings and Durable Object classes that do nothing.
//
// --build takes our worker from another directory than build/ (one holding
// entry.mjs, index.js and index_bg.wasm), to compare two builds; --v8-flags
// passes flags to V8 (compile-trace.mjs traces wasm compilation with it).
//
// Both stacks get the same surroundings: the in-memory KV service seeded with the
// scenario's kv.json (bound as KV), a queue sink (bound as CONNECTION_EVENTS), the
// worker's text bindings (vars.json), and their Durable Object classes with
// in-memory storage. Hyperdrive is not bound: the hot path never touches it.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { parseFlags } from "./tools.mjs";

const args = parseFlags();
const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
const data = resolve(args.data);
const vars = JSON.parse(readFileSync(join(data, "vars.json"), "utf8"));
const str = (s) => JSON.stringify(s);
// embed paths are relative to the config file.
const outDir = dirname(resolve(args.out));
const file = (p) => str(relative(outDir, p));
const compatibilityDate = readFileSync(join(root, "wrangler.toml"), "utf8").match(/^compatibility_date\s*=\s*"([^"]+)"/m)[1];

const build = resolve(args.build ?? join(root, "build"));
const v8Flags = args["v8-flags"] ? `\n  v8Flags = [${args["v8-flags"].split(",").map(str).join(", ")}],` : "";

const stacks = {
  ours: {
    modules: [
      `(name = "entry.mjs", esModule = embed ${file(join(build, "entry.mjs"))})`,
      `(name = "index.js", esModule = embed ${file(join(build, "index.js"))})`,
      `(name = "index_bg.wasm", wasm = embed ${file(join(build, "index_bg.wasm"))})`,
    ],
    entry: "entry.mjs",
    bindings: Object.entries(vars).map(([k, v]) => `(name = ${str(k)}, text = ${str(v)})`),
    objects: { USER_SESSIONS: "UserSession", REGION_GATES: "RegionGate", LOGIN_THROTTLES: "LoginThrottle" },
  },
  hono: {
    modules: [`(name = "index.js", esModule = embed ${file(join(bench, "peers/hono/dist/index.js"))})`],
    entry: "index.js",
    bindings: ["ENVIRONMENT", "JWT_SIGNING_KEYS"].map((k) => `(name = ${str(k)}, text = ${str(vars[k])})`),
    objects: { REGION_GATES: "RegionGate" },
  },
};
const s = stacks[args.stack];
if (!s) throw new Error(`unknown stack ${args.stack}`);
const stub = 'export default { fetch() { return new Response("stub"); } };';
const variant = args.variant ?? "full";
if (variant === "load") {
  // The stack's modules (and its Durable Object classes) come in as they
  // are; its handlers are never called.
  const main = `export * from "./${s.entry}"; ${stub}`;
  s.modules = [`(name = "load.mjs", esModule = ${str(main)})`, ...s.modules];
} else if (variant === "empty") {
  const main = `${Object.values(s.objects)
    .map((cls) => `export class ${cls} {}`)
    .join(" ")} ${stub}`;
  s.modules = [`(name = "empty.mjs", esModule = ${str(main)})`];
} else if (variant !== "full") throw new Error(`unknown variant ${variant}`);

const config = `using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (${v8Flags}
  services = [
    (name = "main", worker = .main),
    (name = "kv", worker = .kv),
    (name = "queue", worker = .queue),
  ],
  sockets = [(name = "http", address = ${str(`127.0.0.1:${args.port}`)}, http = (), service = "main")],
);

const main :Workerd.Worker = (
  modules = [
    ${s.modules.join(",\n    ")}
  ],
  compatibilityDate = ${str(compatibilityDate)},
  bindings = [
    ${[
      ...s.bindings,
      `(name = "KV", kvNamespace = "kv")`,
      `(name = "CONNECTION_EVENTS", queue = "queue")`,
      ...Object.entries(s.objects).map(([b, cls]) => `(name = ${str(b)}, durableObjectNamespace = ${str(cls)})`),
    ].join(",\n    ")}
  ],
  durableObjectNamespaces = [
    ${Object.values(s.objects)
      .map((cls) => `(className = ${str(cls)}, uniqueKey = ${str(`bench-${cls}`)}, enableSql = true)`)
      .join(",\n    ")}
  ],
  durableObjectStorage = (inMemory = void),
);

const kv :Workerd.Worker = (
  modules = [
    (name = "kv.js", esModule = embed ${file(join(bench, "lib/kv-service.js"))}),
    (name = "seed.json", json = embed ${file(join(data, "kv.json"))}),
  ],
  compatibilityDate = ${str(compatibilityDate)},
);

const queue :Workerd.Worker = (
  modules = [(name = "queue.js", esModule = embed ${file(join(bench, "lib/queue-service.js"))})],
  compatibilityDate = ${str(compatibilityDate)},
);
`;
writeFileSync(args.out, config);
