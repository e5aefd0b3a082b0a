// Cold start: process exec to the first 200 answer to POST /v1/connect.
//
//   node coldstart.mjs http PORT REQUESTS -- COMMAND...
//     spawns COMMAND (a server listening on PORT), sends the connect request
//     every millisecond until one answers 200, prints {"ms": ...}, stops it
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
const requests = opts[mode === "http" ? 1 : 0];
const [token, device] = readFileSync(requests, "utf8").split("\n")[0].split(" ");
const body = JSON.stringify({ device_id: device });

function once(port) {
  return new Promise((resolve) => {
    const req = request(
      {
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
    req.end(body);
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

if (mode === "http") {
  const port = Number(opts[0]);
  child.stdout.resume();
  child.on("exit", (code) => fail(`server exited (${code}): ${stderr.slice(-500)}`));
  for (;;) {
    const status = await once(port);
    if (status === 200) break;
    if (status !== 0) {
      stop();
      fail(`answered ${status}`);
    }
    await new Promise((r) => setTimeout(r, 1));
  }
  const ms = performance.now() - t0;
  child.removeAllListeners("exit");
  stop();
  process.stdout.write(JSON.stringify({ ms }) + "\n");
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
