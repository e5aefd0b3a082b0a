// Cold start: process exec to the first 200 answer to POST /v1/connect.
//
//   node coldstart.mjs http PORT REQUESTS -- COMMAND...
//     spawns COMMAND (a server listening on PORT), sends the connect request
//     every millisecond until one answers 200, prints {"ms": ...}, stops it
//   node coldstart.mjs split PORT REQUESTS -- COMMAND...
//     the same server, timed in parts: exec to the first 200 on GET /healthz
//     (the runtime and the worker's modules loaded), then one connect (the
//     first request of its kind: lazy compilation, first use of the bindings),
//     then a second; prints {"ready_ms", "first_connect_ms", "second_connect_ms"}
//   node coldstart.mjs exit REQUESTS -- COMMAND...
//     spawns COMMAND (a process that answers one event and prints it), prints
//     {"ms": ...} at its first line of output containing "status":200
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { request } from "node:http";

const argv = process.argv.slice(2);
const sep = argv.indexOf("--");
const [mode, ...opts] = argv.slice(0, sep);
const command = argv.slice(sep + 1);
const requests = opts[mode === "exit" ? 0 : 1];
const [token, device] = readFileSync(requests, "utf8").split("\n")[0].split(" ");
const body = JSON.stringify({ device_id: device });

// One connect (or, with `path`, one GET of that path); resolves to the status,
// 0 when the connection failed.
function once(port, path) {
  return new Promise((resolve) => {
    const req = request(
      path
        ? { host: "127.0.0.1", port, method: "GET", path }
        : {
            host: "127.0.0.1",
            port,
            method: "POST",
            path: "/v1/connect",
            headers: {
              authorization: `Bearer ${token}`,
              "content-type": "application/json",
              "content-length": Buffer.byteLength(body),
              "x-keenvpn-client-location": "50.11,8.68",
            },
          },
      (res) => {
        res.resume();
        res.on("end", () => resolve(res.statusCode));
      },
    );
    req.on("error", () => resolve(0));
    req.end(path ? undefined : body);
  });
}

const fail = (why) => {
  process.stderr.write(`coldstart: ${why}\n`);
  process.exit(1);
};

const t0 = performance.now();
const child = spawn(command[0], command.slice(1), { stdio: ["ignore", "pipe", "pipe"], detached: true });
let stderr = "";
child.stderr.on("data", (d) => (stderr += d));
const stop = () => {
  try {
    process.kill(-child.pid, "SIGKILL");
  } catch {}
};
setTimeout(() => {
  stop();
  fail(`no 200 within 30 s: ${stderr.slice(-500)}`);
}, 30_000).unref();

// Sends the request every millisecond until it is answered 200.
async function until200(port, path) {
  for (;;) {
    const status = await once(port, path);
    if (status === 200) return;
    if (status !== 0) {
      stop();
      fail(`${path ?? "connect"} answered ${status}`);
    }
    await new Promise((r) => setTimeout(r, 1));
  }
}

if (mode === "http" || mode === "split") {
  const port = Number(opts[0]);
  child.stdout.resume();
  child.on("exit", (code) => fail(`server exited (${code}): ${stderr.slice(-500)}`));
  let out;
  if (mode === "http") {
    await until200(port);
    out = { ms: performance.now() - t0 };
  } else {
    await until200(port, "/healthz");
    const ready = performance.now();
    const timed = async () => {
      const start = performance.now();
      const status = await once(port);
      if (status !== 200) {
        stop();
        fail(`connect answered ${status}`);
      }
      return performance.now() - start;
    };
    const first = await timed();
    const second = await timed();
    out = { ready_ms: ready - t0, first_connect_ms: first, second_connect_ms: second };
  }
  child.removeAllListeners("exit");
  stop();
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(0);
} else {
  let out = "";
  child.stdout.on("data", (d) => {
    out += d;
    if (out.includes('{"status":200}')) {
      const ms = performance.now() - t0;
      stop();
      process.stdout.write(JSON.stringify({ ms }) + "\n");
      process.exit(0);
    }
  });
  child.on("exit", (code) => fail(`exited (${code}) without a 200: ${stderr.slice(-500)} ${out.slice(-300)}`));
}
