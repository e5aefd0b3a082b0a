// Where each full benchmark run stood against the targets: one row per version
// of bench/results.json in the repository's history (quick runs left out),
// plus the working tree's when it holds a run not yet committed. Writes
// bench/HISTORY.md; `--stdout` prints the table instead.
//
// usage: node history.mjs [--stdout]
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";

const bench = resolve(dirname(new URL(import.meta.url).pathname), "..");
const root = resolve(bench, "..");
const git = (...args) => execFileSync("git", args, { cwd: root, encoding: "utf8", maxBuffer: 1 << 28 });

// The targets, in the order bench.mjs reports them; a run is read by these
// prefixes, so a figure whose description changed (paired rounds came later)
// still lands in its column. The last field says whether the figure is now
// taken from paired rounds.
const COLUMNS = [
  ["cold start: NestJS serverless-express first invocation / ours", "NestJS / ours cold (≥ 10)", true],
  ["cold start: ours / Hono", "ours / Hono cold (≤ 1.2)", true],
  ["warm /v1/connect req/s: ours / Hono", "connect ours / Hono (≥ 1.0)", true],
  ["warm /v1/connect req/s: ours / NestJS", "connect ours / NestJS (≥ 3)", false],
  ["wasm gzipped, KB", "wasm KB gz (≤ 400)", false],
  ["connect CPU per request: 1,000 regions / 10 regions", "1,000 / 10 regions (≤ 1.2)", true],
];

// In how many of the paired connect rounds ours served more requests/s.
function faster(main) {
  const h2h = main?.connect_vs_hono;
  if (h2h?.ours_faster_rounds === undefined || !h2h.rounds) return "";
  const n = Array.isArray(h2h.rounds) ? h2h.rounds.length : h2h.rounds;
  return ` (${h2h.ours_faster_rounds}/${n})`;
}

// "abc1234 with uncommitted changes" is written `abc1234`+.
function measured(commit) {
  if (!commit) return "–";
  const [hash, ...rest] = commit.split(" ");
  return `\`${hash}\`${rest.length ? "+" : ""}`;
}

function row({ results, source, label }) {
  const targets = results.targets ?? [];
  const figure = ([prefix, , pairedNow]) => {
    const t = targets.find((t) => t.name.startsWith(prefix));
    if (!t) return "–";
    const unpaired = pairedNow && !/paired/.test(t.name) ? "*" : "";
    return t.met ? `**${t.value}**${unpaired}` : `${t.value}${unpaired}`;
  };
  const main = (results.scenarios ?? []).find((s) => s.main) ?? results.scenarios?.[0];
  const floor = (stack) => main?.warm?.healthz?.[stack]?.median?.cpu_us_per_req ?? "–";
  const stub = main?.cold_start_split_ms?.ours?.median?.empty_ms ?? "–";
  return [
    label,
    results.generated_at?.slice(0, 16).replace("T", " ") ?? "–",
    measured(results.versions?.measured_commit),
    source,
    results.noisy ? "yes" : "",
    `${floor("ours")} / ${floor("hono")}`,
    stub,
    ...COLUMNS.map((column, i) => (i === 2 ? `${figure(column)}${faster(main)}` : figure(column))),
  ];
}

const runs = [];
// "run N" in a commit's subject is the number the README and the notes use.
let log;
try {
  log = git("log", "--reverse", "--format=%h %s", "--", "bench/results.json").split("\n").filter(Boolean);
} catch (e) {
  console.error(`history.mjs: no git history to read (${e.message.split("\n")[0]}); bench/HISTORY.md left as it is`);
  process.exit(0);
}
for (const line of log) {
  const commit = line.split(" ")[0];
  const results = JSON.parse(git("show", `${commit}:bench/results.json`));
  const label = /\brun (\d+)\b/.exec(line)?.[1] ?? "";
  if (!results.quick) runs.push({ results, source: `\`${commit}\``, label });
}
const tree = JSON.parse(readFileSync(join(bench, "results.json"), "utf8"));
const last = runs.at(-1)?.results;
if (!tree.quick && tree.generated_at !== last?.generated_at) runs.push({ results: tree, source: "not yet committed", label: "" });

const header = ["run", "at (UTC)", "measured", "recorded in", "noisy", "`/healthz` CPU µs ours / Hono", "stub cold start ms", ...COLUMNS.map(([, h]) => h)];
const lines = [
  `| ${header.join(" | ")} |`,
  `|${"---|".repeat(header.length)}`,
  ...runs.map((run) => `| ${row(run).join(" | ")} |`),
];
const table = lines.join("\n");

if (process.argv.includes("--stdout")) {
  console.log(table);
} else {
  const text = `# Benchmark history

Every full run of \`bash bench/run.sh\` recorded in this repository, oldest first,
against the targets of the performance issue (the goal in each heading). Written by
\`node bench/lib/history.mjs\` from the versions of [\`results.json\`](results.json)
in git, which \`run.sh\` calls after each run; the last run's whole report is
[\`RESULTS.md\`](RESULTS.md).

- A figure in bold met its target.
- After the paired connect figure: in how many of its rounds ours was the faster.
- \`+\` after the measured commit: the tree had changes not yet committed.
- \`*\`: the figure is a ratio of each stack's median, from the runs before the
  benchmark paired its rounds (each round measures both stacks back to back, so
  one phase of the machine); a paired figure moves far less with the machine's drift.
- \`/healthz\` CPU is the cost of a request that does no I/O in the 10-region
  scenario: the floor of each stack on the machine of that day, and so the best
  single sign of how fast the machine was during the run. Compare ratios within a
  row, not absolute figures across rows.
- The stub cold start is the same sign for cold starts: process exec to the
  first answer of a worker that does nothing, with our bindings (measured from
  the runs that timed a cold start in parts).
- Runs flagged noisy had other work on the machine (load average or CPU share
  of other processes; see \`bench/README.md\`).

${table}
`;
  writeFileSync(join(bench, "HISTORY.md"), text);
  console.log(`bench/HISTORY.md: ${runs.length} runs`);
}
