// Invokes the NestJS peer's Lambda-style handler (bundle built from
// peers/nest/src/lambda.ts) with API Gateway HTTP API (payload 2.0) events.
//
//   node lambda.cjs cold  HANDLER REQUESTS
//     one connect event in this fresh process; prints {"status":...}
//   node lambda.cjs warm  HANDLER REQUESTS SECONDS MODE
//     after a warm-up, invokes back to back (one event at a time, as one Lambda
//     instance does) for SECONDS; prints the same JSON figures as load.lua
const { readFileSync } = require("node:fs");
const { randomUUID } = require("node:crypto");

const [mode, handlerPath, requestsPath, seconds, endpoint = "connect"] = process.argv.slice(2);
const { handler } = require(handlerPath);
const users = readFileSync(requestsPath, "utf8").trim().split("\n").map((l) => l.split(" "));

function event(i) {
  const regions = endpoint !== "connect"; // a GET without a body: regions or healthz
  const [token, device] = users[i % users.length];
  const path = endpoint === "connect" ? "/v1/connect" : endpoint === "regions" ? "/v1/regions" : "/healthz";
  const method = regions ? "GET" : "POST";
  const headers = regions
    ? { host: "bench.local" }
    : {
        host: "bench.local",
        authorization: `Bearer ${token}`,
        "content-type": "application/json",
        "x-keenvpn-client-location": "50.11,8.68",
      };
  const body = regions ? undefined : JSON.stringify({ device_id: device });
  if (body) headers["content-length"] = String(Buffer.byteLength(body));
  return {
    version: "2.0",
    routeKey: "$default",
    rawPath: path,
    rawQueryString: "",
    headers,
    requestContext: {
      accountId: "000000000000",
      apiId: "bench",
      domainName: "bench.local",
      domainPrefix: "bench",
      http: { method, path, protocol: "HTTP/1.1", sourceIp: "127.0.0.1", userAgent: "bench" },
      requestId: randomUUID(),
      routeKey: "$default",
      stage: "$default",
      time: new Date().toISOString(),
      timeEpoch: Date.now(),
    },
    body,
    isBase64Encoded: false,
  };
}

const context = () => ({
  awsRequestId: randomUUID(),
  functionName: "keenvpn-bench",
  callbackWaitsForEmptyEventLoop: false,
  getRemainingTimeInMillis: () => 30_000,
});

async function main() {
  if (mode === "cold") {
    const r = await handler(event(0), context());
    process.stdout.write(JSON.stringify({ status: r.statusCode }) + "\n");
    process.exit(r.statusCode === 200 ? 0 : 1);
  }
  // The events and contexts are built before the clocks start, as API
  // Gateway and the Lambda runtime build them outside the function: a pool
  // as large as the request file, used in turn. The warm-up is as long as
  // the servers' (2 s).
  const pool = users.map((_, k) => [event(k), context()]);
  let i = 0;
  const next = () => pool[i++ % pool.length];
  const warmUntil = Date.now() + 2000;
  while (Date.now() < warmUntil) await handler(...next());
  const lat = [];
  let non2xx = 0;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const end = t0 + BigInt(Math.round(Number(seconds) * 1e9));
  let now = t0;
  while (now < end) {
    const r = await handler(...next());
    const t = process.hrtime.bigint();
    lat.push(Number(t - now) / 1000);
    if (r.statusCode < 200 || r.statusCode > 399) non2xx++;
    now = t;
  }
  const cpu = process.cpuUsage(cpu0);
  lat.sort((a, b) => a - b);
  const pct = (p) => lat[Math.min(lat.length - 1, Math.floor((p / 100) * lat.length))];
  process.stdout.write(
    JSON.stringify({
      requests: lat.length,
      duration_us: Number(now - t0) / 1000,
      non2xx,
      socket_errors: 0,
      p50_us: pct(50),
      p99_us: pct(99),
      mean_us: lat.reduce((a, b) => a + b, 0) / lat.length,
      cpu_us: cpu.user + cpu.system,
    }) + "\n",
  );
  process.exit(0);
}
main().catch((e) => {
  console.error(e);
  process.exit(1);
});
