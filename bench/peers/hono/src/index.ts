// Benchmark peer: POST /v1/connect and GET /v1/regions as an idiomatic Hono
// worker. Same rules as the Rust worker (see ../../shared/core.ts); state the
// same way: the catalogue and the user's session/device mirrors in KV, admission
// in RegionGate Durable Objects (called over RPC, bounded in time), connection
// events to a Queue.
// Ed25519 through WebCrypto.

import { DurableObject } from "cloudflare:workers";
import { Hono } from "hono";
import * as core from "../../shared/core";

interface Env {
  KV: KVNamespace;
  REGION_GATES: DurableObjectNamespace<RegionGate>;
  CONNECTION_EVENTS: Queue<core.ConnectionEvent>;
  JWT_SIGNING_KEYS: string;
  ENVIRONMENT: string;
}

/** One shard of a region's admission control: a token bucket in memory. */
export class RegionGate extends DurableObject<Env> {
  private bucket = new core.Bucket();

  admit(rate: number): core.Verdict {
    return this.bucket.take(rate, Date.now());
  }
}

// Native base64url where the runtime has it (V8's Uint8Array.toBase64/fromBase64).
const native = typeof (Uint8Array.prototype as any).toBase64 === "function";
const codec: core.Codec = native
  ? {
      encode: (b) => (b as any).toBase64({ alphabet: "base64url", omitPadding: true }),
      decode: (s) => (Uint8Array as any).fromBase64(s, { alphabet: "base64url" }),
    }
  : core.jsCodec;

const ED25519 = { name: "Ed25519" };
const utf8 = new TextEncoder();

interface Keys {
  verifiers: Array<[string, CryptoKey]>;
  signer: CryptoKey;
  headerB64: string;
}

// Parsed once per isolate: immutable, like the worker's key set.
let keys: Promise<Keys> | undefined;

async function loadKeys(secret: string): Promise<Keys> {
  const verifiers: Array<[string, CryptoKey]> = [];
  let signer: CryptoKey | undefined;
  for (const e of core.parseKeyEntries(secret)) {
    const priv = await crypto.subtle.importKey("pkcs8", core.ed25519Pkcs8(core.jsCodec.decode(e.seed)), ED25519, true, [
      "sign",
    ]);
    const jwk = (await crypto.subtle.exportKey("jwk", priv)) as JsonWebKey;
    const pub = await crypto.subtle.importKey("jwk", { kty: "OKP", crv: "Ed25519", x: jwk.x }, ED25519, false, [
      "verify",
    ]);
    signer ??= priv;
    verifiers.push([e.kid, pub]);
  }
  return { verifiers, signer: signer!, headerB64: core.headerB64(verifiers[0][0], codec) };
}

function getKeys(env: Env): Promise<Keys> {
  keys ??= loadKeys(env.JWT_SIGNING_KEYS).catch((e) => {
    keys = undefined;
    throw e;
  });
  return keys;
}

/**
 * One request's timer for its bounded waits (its KV reads, its region gate
 * call), as the worker has (`time::Timer`): every wait races one setTimeout,
 * armed for the earliest pending deadline and re-armed for the next when it
 * fires; waits due at once share the promise that rejects then.
 */
class RequestTimer {
  private id: ReturnType<typeof setTimeout> | undefined;
  private at = Infinity;
  private lates = new Map<number, { ms: number; promise: Promise<never>; fail: (e: Error) => void }>();

  race<T>(promise: Promise<T>, ms: number): Promise<T> {
    const due = Date.now() + ms;
    let late = this.lates.get(due);
    if (late === undefined) {
      let fail!: (e: Error) => void;
      const promise = new Promise<never>((_, reject) => { fail = reject; });
      late = { ms, promise, fail };
      this.lates.set(due, late);
      if (due < this.at) this.arm(due);
    }
    return Promise.race([promise, late.promise]);
  }

  private arm(due: number) {
    if (this.id !== undefined) clearTimeout(this.id);
    this.at = due;
    this.id = setTimeout(() => this.fire(), Math.max(0, due - Date.now()));
  }

  private fire() {
    this.id = undefined;
    this.at = Infinity;
    const now = Date.now();
    let next = Infinity;
    for (const [due, late] of this.lates) {
      if (due <= now) {
        this.lates.delete(due);
        late.fail(new Error(`no answer within ${late.ms} ms`));
      } else if (due < next) {
        next = due;
      }
    }
    if (next !== Infinity) this.arm(next);
  }

  stop() {
    if (this.id !== undefined) clearTimeout(this.id);
    this.id = undefined;
    this.at = Infinity;
  }
}

/** A KV read made outside a request's timer (the catalogue's), on a timer of its own. */
async function kvRead<T>(read: Promise<T>): Promise<T> {
  const own = new RequestTimer();
  try {
    return await own.race(read, core.KV_READ_TIMEOUT_MS);
  } finally {
    own.stop();
  }
}

// The catalogue, parsed at most once per isolate every few seconds, and then
// only when its etag changed; while one request checks, the others use the copy.
let catalogue: { snapshot: core.Snapshot; at: number } | undefined;
let revalidating = false;

async function snapshot(env: Env): Promise<core.Snapshot> {
  const now = Date.now();
  if (catalogue && (now - catalogue.at < core.CATALOGUE_TTL_MS || revalidating)) return catalogue.snapshot;
  if (catalogue) {
    revalidating = true;
    try {
      const tag = await kvRead(env.KV.get(core.CATALOGUE_ETAG_KEY, "text"));
      if (tag === catalogue.snapshot.etag) {
        catalogue.at = now;
        return catalogue.snapshot;
      }
    } finally {
      revalidating = false;
    }
  }
  const s = await kvRead(env.KV.get<core.Snapshot>(core.CATALOGUE_KEY, "json"));
  if (!s) throw new core.Problem(503, "service_unavailable", "Service Unavailable", "No catalogue.");
  catalogue = { snapshot: s, at: now };
  return s;
}

/**
 * The region gate's verdict, bounded in time as the worker bounds it: a gate
 * that throws or does not answer within GATE_CALL_TIMEOUT_MS is a 503.
 */
async function admit(env: Env, gate: string, rate: number, timer: RequestTimer): Promise<core.Verdict> {
  try {
    return await timer.race(env.REGION_GATES.getByName(gate).admit(rate), core.GATE_CALL_TIMEOUT_MS);
  } catch (e) {
    console.error(JSON.stringify({ error: String(e), level: "error", msg: "region gate unavailable" }));
    throw new core.Problem(503, "service_unavailable", "Service Unavailable", "A backing service is unavailable; retry shortly.");
  }
}

const randomU32 = () => crypto.getRandomValues(new Uint32Array(1))[0];
const nowSecs = () => Math.floor(Date.now() / 1000);

/** Queues a connection event after the answer; a failure is logged, never fatal. */
function enqueue(c: { env: Env; executionCtx: ExecutionContext }, e: core.ConnectionEvent) {
  c.executionCtx.waitUntil(
    c.env.CONNECTION_EVENTS.send(e).catch((err) =>
      console.error(JSON.stringify({ error: String(err), level: "error", msg: "connection event not enqueued" })),
    ),
  );
}

function event(
  sub: string,
  device: string,
  region: string,
  server: string | null,
  outcome: core.ConnectionEvent["outcome"],
): core.ConnectionEvent {
  return {
    event_id: core.uuidV4(crypto.getRandomValues(new Uint8Array(16))),
    occurred_at_ms: Date.now(),
    user_id: sub,
    device_id: device,
    region_id: region,
    server_id: server,
    outcome,
  };
}

const app = new Hono<{ Bindings: Env; Variables: { requestId: string } }>();

app.use(async (c, next) => {
  const started = Date.now();
  const id = core.requestId(c.req.header("cf-ray"), crypto.getRandomValues(new Uint8Array(16)));
  c.set("requestId", id);
  await next();
  const h = c.res.headers;
  h.set("x-request-id", id);
  if (!h.has("cache-control")) h.set("cache-control", "no-store");
  for (const [k, v] of core.SECURITY_HEADERS) h.set(k, v);
  core.logRequest(id, c.req.method, c.req.path, c.res.status, Date.now() - started);
});

app.onError((err, c) => {
  const p =
    err instanceof core.Problem
      ? err
      : new core.Problem(500, "internal_error", "Internal Server Error", "Something went wrong; it has been logged.");
  if (!(err instanceof core.Problem)) console.error(JSON.stringify({ level: "error", msg: String(err) }));
  return c.body(JSON.stringify(p.body(c.get("requestId"))), p.status as any, {
    "content-type": "application/problem+json",
    ...p.headers(),
  });
});

app.get("/v1/regions", async (c) => {
  const s = await snapshot(c.env);
  const etag = `"${s.etag}"`;
  const cache = "public, max-age=15";
  if (core.notModified(c.req.header("if-none-match"), etag)) {
    return c.body(null, 304, { etag, "cache-control": cache });
  }
  return c.body(core.regionsBody(s), 200, { "content-type": "application/json", etag, "cache-control": cache });
});

async function authenticate(c: { env: Env; req: { header(n: string): string | undefined } }): Promise<core.AccessClaims> {
  const token = core.bearer(c.req.header("authorization"));
  const k = await getKeys(c.env);
  const t = core.preverify(token, k.verifiers, codec);
  if (!(await crypto.subtle.verify(ED25519, t.key, t.signature, t.signed))) throw core.badSignature();
  return core.checkClaims(t.claimsB64, nowSecs(), codec);
}

/** Whether the session is still live; a KV failure does not lock everyone out (the token still bounds the session). */
async function sessionLive(env: Env, claims: core.AccessClaims, timer: RequestTimer): Promise<boolean> {
  const mirror = await timer.race(env.KV.get(`sessions/${claims.sub}`, "json"), core.KV_READ_TIMEOUT_MS).catch(() => null);
  return !core.sessionRevoked(mirror, claims.sid);
}

/** A promise's outcome, so that several can run at once and be checked in order. */
const settled = <T>(p: Promise<T>): Promise<{ ok: true; value: T } | { ok: false; error: unknown }> =>
  p.then(
    (value) => ({ ok: true as const, value }),
    (error) => ({ ok: false as const, error }),
  );
const take = <T>(r: { ok: true; value: T } | { ok: false; error: unknown }): T => {
  if (!r.ok) throw r.error;
  return r.value;
};

async function devicesOf(env: Env, userId: string, timer: RequestTimer): Promise<core.Device[]> {
  const read = env.KV.get<{ devices: core.Device[] }>(`devices/${userId}`, "json");
  const m = await timer.race(read, core.KV_READ_TIMEOUT_MS);
  return m?.devices ?? [];
}

app.post("/v1/connect", async (c) => {
  const timer = new RequestTimer();
  try {
    return await connect(c, timer);
  } finally {
    timer.stop();
  }
});

async function connect(c: any, timer: RequestTimer) {
  const env: Env = c.env;
  const claims = await authenticate(c);
  const location = core.clientLocation(env.ENVIRONMENT === "development", (n) => c.req.header(n), (c.req.raw as any).cf);
  const parsed = await settled(
    c.req.text().then((text: string) => core.parseConnectBody(c.req.header("content-length"), c.req.header("content-type"), text)),
  );
  // The session, the device and the catalogue are independent reads, made at
  // once as the worker makes them; a refusal keeps the order of the checks (a
  // revoked session before a bad body before an unknown device).
  const deviceId = parsed.ok && core.isDeviceId(parsed.value.device_id) ? parsed.value.device_id : null;
  const [live, devices, s] = await Promise.all([
    sessionLive(env, claims, timer),
    deviceId === null ? null : settled(devicesOf(env, claims.sub, timer)),
    settled(snapshot(env)),
  ]);
  if (!live) throw new core.Problem(401, "session_revoked", "Unauthorized", "This session has been signed out.");
  const body = take(parsed);
  if (devices === null) throw core.deviceNotFound();
  const p = core.placeConnect(claims, body, take(devices), take(s), location);
  const region = p.choice.region;

  const verdict = await admit(env, p.gate, p.rate, timer);
  const refused = core.refusal(verdict, p.choice.failover, randomU32());
  if (refused) {
    const outcome = verdict.outcome === "wait" ? "throttled" : "closed";
    enqueue(c, event(claims.sub, p.device.id, region.id, null, outcome));
    throw refused;
  }
  const server = core.chooseServer(region, p.device.id);
  if (!server)
    throw new core.Problem(503, "region_closed", "Service Unavailable", "The region has no server available.", { failover: p.choice.failover }, 5);

  const k = await getKeys(env);
  const input = `${k.headerB64}.${codec.encode(core.ticketClaims(claims.sub, p.device, server, region, nowSecs()))}`;
  const signature = new Uint8Array(await crypto.subtle.sign(ED25519, k.signer, utf8.encode(input)));
  const ticket = `${input}.${codec.encode(signature)}`;

  enqueue(c, event(claims.sub, p.device.id, region.id, server.id, "admitted"));
  return c.body(core.connectBody(region, server, p.device, ticket, p.choice.failover), 200, {
    "content-type": "application/json",
  });
}

app.get("/healthz", (c) => c.json({ status: "ok" }));

export default app;
