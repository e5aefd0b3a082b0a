// The hot-path rules of POST /v1/connect and GET /v1/regions, in TypeScript, for
// the benchmark's peers. Each rule follows the worker's Rust (src/domain/token.rs,
// placement.rs, geo.rs, admission.rs, entitlement.rs, src/edge/connect.rs): same
// checks in the same order, same placement and hashing, same JSON. What differs
// between the peers (signature crypto, base64, where KV and the admission gates
// live) is passed in by each peer.

import { CENTROIDS } from "./centroids";

export const ISSUER = "keenvpn-edge";
export const AUDIENCE = "keenvpn-app";
export const TICKET_AUDIENCE = "keenvpn-vpn-server";
export const TICKET_TTL_SECS = 120;
export const ACCESS_TTL_SECS = 900;
export const LEEWAY_SECS = 30;
export const MAX_TOKEN_LEN = 4096;
export const MAX_AUTHORIZATION_LEN = MAX_TOKEN_LEN + 16;
export const MAX_JSON_BODY = 16 * 1024;
export const CATALOGUE_KEY = "catalogue/v1";
/** The etag of the snapshot under CATALOGUE_KEY: checked before reading it again. */
export const CATALOGUE_ETAG_KEY = "catalogue/v1/etag";
export const CATALOGUE_TTL_MS = 5_000;
/** How long a call to a region's admission gate may take (src/edge/durable.rs, ADMIT_TIMEOUT_MS). */
export const GATE_CALL_TIMEOUT_MS = 2_000;
/** A KV read that takes longer has failed (`kv::READ_TIMEOUT_MS`). */
export const KV_READ_TIMEOUT_MS = 2_000;
const ALG = "EdDSA";
const SIGNATURE_B64_LEN = 86;

// ---------------------------------------------------------------- data shapes

export type Tier = "free" | "premium";
export type Health = "up" | "draining" | "down";

export interface Server {
  id: string;
  hostname: string;
  port: number;
  public_key: string;
  capacity: number;
  load: number;
  /** Set by the catalogue from the reported load (0.95 up, below 0.90 down, lapsed after 3 minutes unreported); absent: not full. */
  full?: boolean;
}

export interface Region {
  id: string;
  name: string;
  country: string;
  latitude: number;
  longitude: number;
  tier: Tier;
  health: Health;
  admission_rate: number;
  servers: Server[];
}

export interface Snapshot {
  etag: string;
  regions: Region[];
}

export interface Entitlement {
  plan: string;
  max_devices: number;
  region_tiers: Tier[];
  until: number | null;
}

export interface AccessClaims {
  sub: string;
  sid: string;
  ent: Entitlement;
  iat: number;
  exp: number;
}

export interface Device {
  id: string;
  name: string;
  public_key: string;
  ipv4_address: string;
  ipv6_address: string;
  created_at: number;
}

// ------------------------------------------------------------------- problems

/** An error answer: status, stable code, detail, extra members and headers. */
export class Problem extends Error {
  // An Error, because frameworks (Hono among them) hand only Errors to their error handlers.
  constructor(
    readonly status: number,
    readonly code: string,
    readonly title: string,
    readonly detail: string,
    readonly extra: Record<string, unknown> = {},
    readonly retryAfter?: number,
  ) {
    super(detail);
  }

  body(requestId: string): Record<string, unknown> {
    // Sorted keys, as the worker's serde_json maps are.
    const all: Record<string, unknown> = {
      type: `urn:keenvpn:problem:${this.code}`,
      title: this.title,
      status: this.status,
      detail: this.detail,
      code: this.code,
      request_id: requestId,
      ...this.extra,
    };
    const sorted: Record<string, unknown> = {};
    for (const k of Object.keys(all).sort()) sorted[k] = all[k];
    return sorted;
  }

  headers(): Record<string, string> {
    const h: Record<string, string> = {};
    if (this.retryAfter !== undefined) h["retry-after"] = String(this.retryAfter);
    if (this.status === 401) {
      h["www-authenticate"] =
        this.code === "token_missing"
          ? 'Bearer realm="keenvpn"'
          : `Bearer realm="keenvpn", error="invalid_token", error_description="${this.code}"`;
    }
    return h;
  }
}

const tokenProblem = (code: string, detail: string) => new Problem(401, code, "Unauthorized", detail);

// ------------------------------------------------------- headers, ids, logging

/** What every response carries besides its own headers. */
export const SECURITY_HEADERS: ReadonlyArray<readonly [string, string]> = [
  ["x-content-type-options", "nosniff"],
  ["x-frame-options", "DENY"],
  ["content-security-policy", "default-src 'none'; frame-ancestors 'none'"],
  ["referrer-policy", "no-referrer"],
  ["strict-transport-security", "max-age=31536000; includeSubDomains"],
];

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

export function hex(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += HEX[bytes[i]];
  return s;
}

/** A well-formed cf-ray, else 16 random bytes in hex. */
export function requestId(cfRay: string | null | undefined, random16: Uint8Array): string {
  if (cfRay && cfRay.length <= 64 && /^[A-Za-z0-9-]+$/.test(cfRay)) return cfRay;
  return hex(random16);
}

/** A version 4 UUID from 16 random bytes. */
export function uuidV4(b: Uint8Array): string {
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = hex(b);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function logRequest(requestId: string, method: string, path: string, status: number, ms: number) {
  console.log(
    JSON.stringify({ level: "info", method, ms, msg: "request", path, request_id: requestId, status }),
  );
}

// --------------------------------------------------------------------- base64

export interface Codec {
  /** Unpadded base64url of bytes. */
  encode(bytes: Uint8Array): string;
  /** Bytes of a segment already checked by `isB64url`. */
  decode(segment: string): Uint8Array;
}

const B64_VALUES = new Int8Array(128).fill(-1);
const B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
for (let i = 0; i < 64; i++) B64_VALUES[B64_CHARS.charCodeAt(i)] = i;

/** Non-empty, canonical, unpadded base64url (unused low bits of the last character zero). */
export function isB64url(s: string): boolean {
  const n = s.length;
  if (n === 0 || n % 4 === 1) return false;
  for (let i = 0; i < n; i++) {
    const c = s.charCodeAt(i);
    if (c >= 128 || B64_VALUES[c] < 0) return false;
  }
  const unused = n % 4 === 2 ? 0b1111 : n % 4 === 3 ? 0b11 : 0;
  return (B64_VALUES[s.charCodeAt(n - 1)] & unused) === 0;
}

/** A plain-JS codec for runtimes without a native base64url. */
export const jsCodec: Codec = {
  encode(bytes) {
    let out = "";
    let i = 0;
    for (; i + 2 < bytes.length; i += 3) {
      const v = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
      out += B64_CHARS[v >> 18] + B64_CHARS[(v >> 12) & 63] + B64_CHARS[(v >> 6) & 63] + B64_CHARS[v & 63];
    }
    if (i < bytes.length) {
      const v = (bytes[i] << 16) | ((i + 1 < bytes.length ? bytes[i + 1] : 0) << 8);
      out += B64_CHARS[v >> 18] + B64_CHARS[(v >> 12) & 63];
      if (i + 1 < bytes.length) out += B64_CHARS[(v >> 6) & 63];
    }
    return out;
  },
  decode(s) {
    const out = new Uint8Array(Math.floor((s.length * 3) / 4));
    let o = 0;
    let acc = 0;
    let bits = 0;
    for (let i = 0; i < s.length; i++) {
      acc = (acc << 6) | B64_VALUES[s.charCodeAt(i)];
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        out[o++] = (acc >> bits) & 0xff;
      }
    }
    return out;
  },
};

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

// ---------------------------------------------------------------------- keys

export interface KeyEntry {
  kid: string;
  seed: string;
}

/** Parses JWT_SIGNING_KEYS: `[{kid, seed}]`, non-empty, kids valid and unique. */
export function parseKeyEntries(secret: string): KeyEntry[] {
  const entries = JSON.parse(secret) as KeyEntry[];
  if (!Array.isArray(entries) || entries.length === 0) throw new Error("the key set is empty");
  const seen = new Set<string>();
  entries.forEach((e, i) => {
    if (typeof e.kid !== "string" || !/^[A-Za-z0-9_-]{1,64}$/.test(e.kid)) throw new Error(`entry ${i}: bad kid`);
    if (seen.has(e.kid)) throw new Error(`kid ${e.kid} appears more than once`);
    seen.add(e.kid);
    if (typeof e.seed !== "string" || !isB64url(e.seed) || jsCodec.decode(e.seed).length !== 32)
      throw new Error(`the seed of kid ${e.kid} is not 32 bytes of base64url`);
  });
  return entries;
}

/** PKCS#8 DER of an Ed25519 private key from its 32-byte seed (RFC 8410). */
export function ed25519Pkcs8(seed: Uint8Array): Uint8Array {
  const prefix = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
  const der = new Uint8Array(48);
  der.set(prefix, 0);
  der.set(seed, 16);
  return der;
}

/** The base64url header every token we sign carries (depends only on the kid). */
export function headerB64(kid: string, codec: Codec): string {
  return codec.encode(utf8.encode(JSON.stringify({ alg: ALG, kid, typ: "JWT" })));
}

// ------------------------------------------------------------ access tokens

/** Steps 1-5 of verification before the signature check. */
export interface SignedToken<K> {
  key: K;
  signed: Uint8Array;
  signature: Uint8Array;
  claimsB64: string;
}

function decodeJsonObject(segment: string, codec: Codec): any {
  const text = utf8d.decode(codec.decode(segment));
  if (text.trimStart()[0] !== "{") return undefined;
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/**
 * Size, shape, algorithm and key, in the worker's order; the caller then
 * checks `signature` over `signed` with `key`, and calls `checkClaims`.
 */
export function preverify<K>(token: string, keys: ReadonlyMap<string, K> | Array<[string, K]>, codec: Codec): SignedToken<K> {
  if (token.length > MAX_TOKEN_LEN) throw tokenProblem("token_too_large", "The access token is too large.");
  const parts = token.split(".");
  if (parts.length !== 3 || !isB64url(parts[0]) || !isB64url(parts[1]) || !isB64url(parts[2]))
    throw tokenProblem("token_malformed", "The access token is not a well-formed JWT.");
  const header = decodeJsonObject(parts[0], codec);
  if (header === undefined || header === null)
    throw tokenProblem("token_malformed", "The access token is not a well-formed JWT.");
  if (header.alg !== ALG)
    throw tokenProblem(
      "token_algorithm_not_allowed",
      "The access token is signed with an algorithm that is not accepted.",
    );
  let key: K | undefined;
  for (const [kid, k] of keys) {
    if (kid === header.kid) {
      key = k;
      break;
    }
  }
  if (key === undefined) throw tokenProblem("token_unknown_key", "The access token is signed with an unknown key.");
  if (parts[2].length !== SIGNATURE_B64_LEN)
    throw tokenProblem("token_bad_signature", "The access token's signature is invalid.");
  return {
    key,
    signed: utf8.encode(token.slice(0, parts[0].length + 1 + parts[1].length)),
    signature: codec.decode(parts[2]),
    claimsB64: parts[1],
  };
}

export const badSignature = () => tokenProblem("token_bad_signature", "The access token's signature is invalid.");

const isInt = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v);
const isStr = (v: unknown): v is string => typeof v === "string";

function isEntitlement(e: any): e is Entitlement {
  return (
    e !== null &&
    typeof e === "object" &&
    isStr(e.plan) &&
    isInt(e.max_devices) &&
    e.max_devices >= 0 &&
    Array.isArray(e.region_tiers) &&
    e.region_tiers.every((t: unknown) => t === "free" || t === "premium") &&
    (e.until === null || e.until === undefined || isInt(e.until))
  );
}

/** Steps 6-10: claims shape, typ, iss, aud, lifetime, iat, exp. */
export function checkClaims(claimsB64: string, now: number, codec: Codec): AccessClaims {
  const c = decodeJsonObject(claimsB64, codec);
  if (
    !c ||
    !isStr(c.iss) ||
    !isStr(c.aud) ||
    !isStr(c.typ) ||
    !isStr(c.sub) ||
    !isStr(c.sid) ||
    !isInt(c.iat) ||
    !isInt(c.exp) ||
    !isEntitlement(c.ent)
  )
    throw tokenProblem("token_malformed", "The access token is not a well-formed JWT.");
  if (c.typ !== "access") throw tokenProblem("token_wrong_type", "The token is not an access token.");
  if (c.iss !== ISSUER) throw tokenProblem("token_wrong_issuer", "The access token was not issued by this service.");
  if (c.aud !== AUDIENCE) throw tokenProblem("token_wrong_audience", "The access token is not meant for this app.");
  if (c.exp <= c.iat || c.exp - c.iat > ACCESS_TTL_SECS)
    throw tokenProblem("token_lifetime_too_long", "The access token's lifetime is longer than allowed.");
  if (c.iat > now + LEEWAY_SECS) throw tokenProblem("token_not_yet_valid", "The access token is not valid yet.");
  if (now >= c.exp + LEEWAY_SECS) throw tokenProblem("token_expired", "The access token has expired.");
  return { sub: c.sub, sid: c.sid, ent: c.ent, iat: c.iat, exp: c.exp };
}

/** The bearer token of an Authorization header, or the problem to answer. */
export function bearer(header: string | null | undefined): string {
  if (header === null || header === undefined)
    throw new Problem(401, "token_missing", "Unauthorized", "Send an access token as `Authorization: Bearer <token>`.");
  if (header.length > MAX_AUTHORIZATION_LEN) throw tokenProblem("token_too_large", "The access token is too large.");
  const space = header.indexOf(" ");
  // Another scheme (or none) carries no access token: missing, whose
  // challenge names no error (RFC 6750, section 3.1).
  if (space < 0 || header.slice(0, space).toLowerCase() !== "bearer")
    throw new Problem(
      401,
      "token_missing",
      "Unauthorized",
      "Send an access token as `Authorization: Bearer <token>`; another scheme carries none.",
    );
  return header.slice(space + 1).trim();
}

/** Whether the KV session mirror says this session was revoked. */
export function sessionRevoked(mirror: any, sid: string): boolean {
  return Array.isArray(mirror?.sessions) && mirror.sessions.some((s: any) => s.id === sid && s.revoked);
}

// ------------------------------------------------------------------- bodies

export interface ConnectBody {
  device_id: string;
  region: string | null;
}

/** Size and media type before parsing; then the exact shape, no unknown fields. */
export function parseConnectBody(contentLength: string | null | undefined, contentType: string | null | undefined, text: string): ConnectBody {
  if (contentLength !== null && contentLength !== undefined) {
    const n = Number(contentLength.trim());
    if (!/^\s*\d+\s*$/.test(contentLength)) throw new Problem(400, "malformed_json", "Bad Request", "Content-Length is not a number.");
    if (n > MAX_JSON_BODY) throw new Problem(413, "payload_too_large", "Payload Too Large", `The body is larger than ${MAX_JSON_BODY} bytes.`, { max_bytes: MAX_JSON_BODY });
  }
  if (utf8.encode(text).length > MAX_JSON_BODY)
    throw new Problem(413, "payload_too_large", "Payload Too Large", `The body is larger than ${MAX_JSON_BODY} bytes.`, { max_bytes: MAX_JSON_BODY });
  const media = contentType?.split(";")[0].trim().toLowerCase();
  if (media !== "application/json")
    throw new Problem(415, "unsupported_media_type", "Unsupported Media Type", "Send the body as application/json.");
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new Problem(400, "malformed_json", "Bad Request", "The body is not valid JSON.");
  }
  return connectShape(v);
}

/** For frameworks that parse JSON bodies themselves: media type, then shape. */
export function connectBodyFrom(contentType: string | null | undefined, parsed: unknown): ConnectBody {
  const media = contentType?.split(";")[0].trim().toLowerCase();
  if (media !== "application/json")
    throw new Problem(415, "unsupported_media_type", "Unsupported Media Type", "Send the body as application/json.");
  return connectShape(parsed);
}

function connectShape(v: any): ConnectBody {
  const shape = () => new Problem(400, "malformed_json", "Bad Request", "The JSON does not have the expected shape.");
  if (v === null || v === undefined || typeof v !== "object" || Array.isArray(v)) throw shape();
  for (const k of Object.keys(v)) if (k !== "device_id" && k !== "region") throw shape();
  if (!isStr(v.device_id)) throw shape();
  if (v.region !== undefined && v.region !== null && !isStr(v.region)) throw shape();
  return { device_id: v.device_id, region: v.region ?? null };
}

export function isDeviceId(s: string): boolean {
  return /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(s);
}

// ------------------------------------------------------------------ geography

export interface Point {
  lat: number;
  lon: number;
}

export function point(lat: number, lon: number): Point | null {
  return lat >= -90 && lat <= 90 && lon >= -180 && lon <= 180 ? { lat, lon } : null;
}

const EARTH_RADIUS_KM = 6371.0088;
const RAD = Math.PI / 180;

export function distanceKm(a: Point, b: Point): number {
  const lat1 = a.lat * RAD;
  const lat2 = b.lat * RAD;
  const halfDlat = (lat2 - lat1) / 2;
  const halfDlon = ((b.lon - a.lon) * RAD) / 2;
  const h = Math.sin(halfDlat) ** 2 + Math.cos(lat1) * Math.cos(lat2) * Math.sin(halfDlon) ** 2;
  return 2 * EARTH_RADIUS_KM * Math.asin(Math.min(Math.sqrt(h), 1));
}

export function countryCentroid(code: string): Point | null {
  if (code.length !== 2) return null;
  const key = code.toUpperCase();
  let lo = 0;
  let hi = CENTROIDS.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const c = CENTROIDS[mid][0];
    if (c === key) return { lat: CENTROIDS[mid][1], lon: CENTROIDS[mid][2] };
    if (c < key) lo = mid + 1;
    else hi = mid - 1;
  }
  return null;
}

export type ClientLocation = { kind: "coordinates"; at: Point } | { kind: "country"; code: string } | { kind: "unknown" };

/** The development-only location headers (ENVIRONMENT = development), else the platform's geolocation. */
export function clientLocation(
  dev: boolean,
  header: (name: string) => string | null | undefined,
  cf?: { latitude?: string; longitude?: string; country?: string },
): ClientLocation {
  if (dev) {
    const loc = header("x-keenvpn-client-location");
    if (loc) {
      const comma = loc.indexOf(",");
      if (comma >= 0) {
        const lat = parseRustF64(loc.slice(0, comma).trim());
        const lon = parseRustF64(loc.slice(comma + 1).trim());
        const p = lat === null || lon === null ? null : point(lat, lon);
        if (p) return { kind: "coordinates", at: p };
      }
    }
    const country = header("x-keenvpn-client-country");
    if (country) return { kind: "country", code: country };
  }
  if (!cf) return { kind: "unknown" };
  if (cf.latitude !== undefined && cf.longitude !== undefined) {
    const p = point(Number(cf.latitude), Number(cf.longitude));
    if (p) return { kind: "coordinates", at: p };
  }
  return cf.country ? { kind: "country", code: cf.country } : { kind: "unknown" };
}

function parseRustF64(s: string): number | null {
  return /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(s) ? Number(s) : null;
}

// ------------------------------------------------------------------ placement

export const DEFAULT_REGION = "eu-central";
export const MAX_FAILOVER = 5;

const position = (r: Region) => point(r.latitude, r.longitude);

function distance(from: Point | null, r: Region): number {
  const p = position(r);
  return from && p ? distanceKm(from, p) : Infinity;
}

const cmpId = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

export class PlacementError {
  constructor(readonly code: "no_region_available" | "region_not_allowed" | "region_not_found") {}
}

export interface Choice {
  region: Region;
  failover: string[];
}

type Vec3 = [number, number, number];

/** What placement needs of each region, worked out once per snapshot (the Rust `Placer`). */
interface Prepared {
  usable: boolean[];
  room: boolean[];
  /** Each region's `admittingRate`. */
  admitting: Map<Region, number>;
  units: (Vec3 | null)[];
  closed: string[];
}

const prepared = new WeakMap<Snapshot, Prepared>();

/** A server with capacity that is not full takes new devices first (placement.rs `has_room`). */
const hasRoom = (s: Server) => s.capacity > 0 && !s.full;

function prepare(snapshot: Snapshot): Prepared {
  let p = prepared.get(snapshot);
  if (!p) {
    const rs = snapshot.regions;
    p = {
      usable: rs.map((r) => r.health === "up" && r.servers.some((s) => s.capacity > 0)),
      room: rs.map((r) => r.servers.some(hasRoom)),
      admitting: new Map(rs.map((r) => [r, admittingRate(r)])),
      units: rs.map((r) => {
        const at = position(r);
        return at && unitVector(at);
      }),
      closed: rs.filter((r) => r.admission_rate === 0).map((r) => r.id),
    };
    prepared.set(snapshot, p);
  }
  return p;
}

/** The regions that admit no one (admission rate 0). */
export const closedRegions = (snapshot: Snapshot) => prepare(snapshot).closed;

function unitVector(p: Point): Vec3 {
  const lat = p.lat * RAD;
  const lon = p.lon * RAD;
  const c = Math.cos(lat);
  return [c * Math.cos(lon), c * Math.sin(lon), Math.sin(lat)];
}

function chord2(a: Vec3, b: Vec3): number {
  const dx = a[0] - b[0];
  const dy = a[1] - b[1];
  const dz = a[2] - b[2];
  return dx * dx + dy * dy + dz * dz;
}

const CHORD_MARGIN = 1e-9;

/** Inserts into a list kept sorted by `less`, at most `count` long. */
function keepLeast<T>(least: T[], item: T, count: number, less: (a: T, b: T) => boolean) {
  if (least.length >= count && (count === 0 || !less(item, least[least.length - 1]))) return;
  let at = 0;
  while (at < least.length && less(least[at], item)) at++;
  least.splice(at, 0, item);
  if (least.length > count) least.length = count;
}

/**
 * The `count` eligible regions nearest `from` (other than index `skip`), by
 * (haversine distance, id): ranked by chord first, the haversine only for
 * regions within CHORD_MARGIN of the count-th chord (as the Rust does).
 */
function nearest(
  regions: Region[],
  p: Prepared,
  eligible: (i: number) => boolean,
  from: Point | null,
  skip: number,
  count: number,
): Region[] {
  const fu = from && unitVector(from);
  const chords: number[] = [];
  const index: number[] = [];
  const shortest: number[] = [];
  for (let i = 0; i < regions.length; i++) {
    if (i === skip || !eligible(i)) continue;
    const u = p.units[i];
    const c = fu && u ? chord2(fu, u) : Infinity;
    chords.push(c);
    index.push(i);
    keepLeast(shortest, c, count, (a, b) => a < b);
  }
  const bound = shortest.length >= count && count > 0 ? shortest[count - 1] + CHORD_MARGIN : Infinity;
  const ranked: [number, Region][] = [];
  for (let k = 0; k < chords.length; k++) {
    if (chords[k] > bound) continue;
    const r = regions[index[k]];
    keepLeast<[number, Region]>(ranked, [distance(from, r), r], count, (a, b) => a[0] < b[0] || (a[0] === b[0] && cmpId(a[1].id, b[1].id) < 0));
  }
  return ranked.map(([, r]) => r);
}

/** Region choice: requested if eligible, else nearest eligible, else by country/default/id. */
export function choose(
  snapshot: Snapshot,
  ent: Entitlement,
  location: ClientLocation,
  requested: string | null,
  exclude: readonly string[],
): Choice {
  const regions = snapshot.regions;
  const p = prepare(snapshot);
  const allowed = (i: number) =>
    p.usable[i] && ent.region_tiers.includes(regions[i].tier) && (exclude.length === 0 || !exclude.includes(regions[i].id));
  // Regions with room, unless none has: then all of them.
  let fullOk = true;
  for (let i = 0; i < regions.length && fullOk; i++) if (p.room[i] && allowed(i)) fullOk = false;
  const eligible = (i: number) => (fullOk || p.room[i]) && allowed(i);
  const client =
    location.kind === "coordinates" ? location.at : location.kind === "country" ? countryCentroid(location.code) : null;

  let chosen = -1;
  if (requested !== null) {
    const i = regions.findIndex((x) => x.id === requested);
    if (i < 0) throw new PlacementError("region_not_found");
    if (!ent.region_tiers.includes(regions[i].tier)) throw new PlacementError("region_not_allowed");
    if (allowed(i)) chosen = i; // full or not: asked for by name
  }
  // Fewer regions with room than the list holds: the full ones follow.
  const withFull = (failover: Region[], from: Point | null, region: Region) => {
    if (!fullOk && failover.length < MAX_FAILOVER) {
      const full = (i: number) => !p.room[i] && allowed(i);
      const skip = regions.indexOf(region);
      failover = failover.concat(nearest(regions, p, full, from, skip, MAX_FAILOVER - failover.length));
    }
    return failover.map((r) => r.id);
  };
  if (chosen < 0 && client) {
    const ranked = nearest(regions, p, eligible, client, -1, MAX_FAILOVER + 1);
    if (!ranked.length) throw new PlacementError("no_region_available");
    return { region: ranked[0], failover: withFull(ranked.slice(1), client, ranked[0]) };
  }
  if (chosen < 0) {
    const country = location.kind === "country" ? location.code.toUpperCase() : null;
    const smallest = (f: (r: Region) => boolean) => {
      let m = -1;
      for (let i = 0; i < regions.length; i++)
        if (eligible(i) && f(regions[i]) && (m < 0 || regions[i].id < regions[m].id)) m = i;
      return m;
    };
    chosen = country !== null ? smallest((r) => r.country.toUpperCase() === country) : -1;
    if (chosen < 0) chosen = regions.findIndex((r, i) => eligible(i) && r.id === DEFAULT_REGION);
    if (chosen < 0) chosen = smallest(() => true);
  }
  if (chosen < 0) throw new PlacementError("no_region_available");
  const region = regions[chosen];
  const from = client ?? position(region);
  return { region, failover: withFull(nearest(regions, p, eligible, from, chosen, MAX_FAILOVER), from, region) };
}

// 64-bit unsigned arithmetic on [hi, lo] pairs of uint32, for the stable hash.

function mul64(ahi: number, alo: number, bhi: number, blo: number): [number, number] {
  const a0 = alo & 0xffff, a1 = alo >>> 16, a2 = ahi & 0xffff, a3 = ahi >>> 16;
  const b0 = blo & 0xffff, b1 = blo >>> 16, b2 = bhi & 0xffff, b3 = bhi >>> 16;
  let c0 = a0 * b0;
  let c1 = (c0 >>> 16) + a0 * b1;
  let c2 = c1 >>> 16;
  c1 = (c1 & 0xffff) + a1 * b0;
  c2 += c1 >>> 16;
  c2 += a0 * b2;
  let c3 = c2 >>> 16;
  c2 = (c2 & 0xffff) + a1 * b1;
  c3 += c2 >>> 16;
  c2 = (c2 & 0xffff) + a2 * b0;
  c3 += c2 >>> 16;
  c3 += a0 * b3 + a1 * b2 + a2 * b1 + a3 * b0;
  const lo = ((c1 & 0xffff) << 16) | (c0 & 0xffff);
  const hi = ((c3 & 0xffff) << 16) | (c2 & 0xffff);
  return [hi >>> 0, lo >>> 0];
}

function fmix64(hi: number, lo: number): [number, number] {
  lo = (lo ^ (hi >>> 1)) >>> 0; // h ^= h >> 33
  [hi, lo] = mul64(hi, lo, 0xff51afd7, 0xed558ccd);
  lo = (lo ^ (hi >>> 1)) >>> 0;
  [hi, lo] = mul64(hi, lo, 0xc4ceb9fe, 0x1a85ec53);
  lo = (lo ^ (hi >>> 1)) >>> 0;
  return [hi, lo];
}

/** FNV-1a 64 from the state (hi, lo), in 32-bit halves, over `s`'s UTF-8 bytes, then `last` if given. */
function fnv(hi: number, lo: number, s: string, last?: number): [number, number] {
  const step = (b: number) => {
    lo = (lo ^ b) >>> 0;
    // h * 0x100000001b3 = h * 0x1b3 + (h << 40), modulo 2^64
    const l = lo * 0x1b3;
    const carry = Math.floor(l / 4294967296);
    hi = (Math.imul(hi, 0x1b3) + carry + (lo << 8)) >>> 0;
    lo = l >>> 0;
  };
  let ascii = true;
  for (let i = 0; i < s.length && ascii; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0x80) {
      for (const b of utf8.encode(s.slice(i))) step(b);
      ascii = false;
    } else step(c);
  }
  if (last !== undefined) step(last);
  return [hi, lo];
}

/** FNV-1a 64's state after `key` and the 0xFF separator: hashed once, salted many times. */
const hashPrefix = (key: string) => fnv(0xcbf29ce4, 0x84222325, key, 0xff);

/** FNV-1a 64 of key bytes, 0xFF, salt bytes; then MurmurHash3's fmix64. */
export function stableHash(key: string, salt: string): [number, number] {
  const [hi, lo] = hashPrefix(key);
  return fmix64(...fnv(hi, lo, salt));
}

/** Positions this far below their capacity's best cannot win (see `highest` in placement.rs). */
const MARGIN = 4194304; // 2^22

/**
 * Weighted rendezvous hashing over the servers with room (with capacity, if
 * none has room). The device is
 * hashed once; the score's logarithm is taken only for a server that leads
 * its capacity so far (its position, the hash's top 52 bits, within MARGIN
 * of the best), which chooses what scoring every server would.
 */
export function chooseServer(region: Region, deviceId: string): Server | undefined {
  return highest(region, deviceId, true) ?? highest(region, deviceId, false);
}

/** The highest-scored server with capacity (and room, if `roomOnly`). */
function highest(region: Region, deviceId: string, roomOnly: boolean): Server | undefined {
  const [ph, pl] = hashPrefix(deviceId);
  const lead = new Map<number, number>();
  let best: Server | undefined;
  let bestScore = 0;
  for (const s of region.servers) {
    if (s.capacity <= 0 || (roomOnly && !hasRoom(s))) continue;
    const [hi, lo] = fmix64(...fnv(ph, pl, s.id));
    const k = hi * 1048576 + (lo >>> 12); // top 52 bits, exact in a double
    const top = lead.get(s.capacity);
    if (top !== undefined && k + MARGIN < top) continue;
    if (top === undefined || k > top) lead.set(s.capacity, k);
    const sc = -s.capacity / Math.log((k + 0.5) / 4503599627370496);
    if (!best || sc > bestScore || (sc === bestScore && s.id < best.id)) {
      best = s;
      bestScore = sc;
    }
  }
  return best;
}

/** The health /v1/regions lists: a region up but taking no one new is draining. */
export function listedHealth(r: Region): Health {
  return r.health === "up" && (r.admission_rate === 0 || !r.servers.some((s) => s.capacity > 0))
    ? "draining"
    : r.health;
}

/** Capacity-weighted mean load, as an f32 like the worker's. */
export function regionLoad(r: Region): number {
  let w = 0;
  let c = 0;
  for (const s of r.servers) {
    w += s.capacity * s.load;
    c += s.capacity;
  }
  return c > 0 ? Math.fround(w / c) : 0;
}

// ------------------------------------------------------------------ admission

const MAX_SHARD_RATE = 200;
const MILLI = 1000;

export const shardCount = (rate: number) => Math.max(1, Math.ceil(rate / MAX_SHARD_RATE));

export function shardFor(deviceId: string, shards: number): number {
  const n = Math.max(1, shards);
  const [hi, lo] = stableHash(deviceId, "admission-shard");
  return ((((((hi % n) * 65536) % n) * 65536) % n) + lo) % n;
}

export function shardRate(rate: number, shards: number, shard: number): number {
  shards = Math.max(1, shards);
  if (shard >= shards) return 0;
  return Math.max(Math.floor(rate / shards) + (shard < rate % shards ? 1 : 0), rate > 0 ? 1 : 0);
}

/** The region's rate times the share of its capacity on servers with room, rounded up. */
export function admittingRate(region: Region): number {
  let room = 0;
  let total = 0;
  for (const s of region.servers) {
    if (s.capacity <= 0) continue;
    total += s.capacity;
    if (!s.full) room += s.capacity;
  }
  if (room === 0 || room === total) return region.admission_rate;
  return Math.ceil((region.admission_rate * room) / total);
}

export type Verdict = { outcome: "admitted" } | { outcome: "wait"; retry_after_ms: number } | { outcome: "closed" };

/** One shard's token bucket, in thousandths of a token (0 spent = full). */
export class Bucket {
  spentMilli = 0;
  updatedMs = 0;

  take(rate: number, nowMs: number): Verdict {
    if (rate === 0) return { outcome: "closed" };
    const capacity = Math.max(MILLI, Math.round(rate * 2 * MILLI));
    const elapsed = Math.max(0, nowMs - this.updatedMs);
    this.spentMilli = Math.min(Math.max(0, this.spentMilli - elapsed * rate), capacity);
    this.updatedMs = Math.max(this.updatedMs, nowMs);
    const available = capacity - this.spentMilli;
    if (available >= MILLI) {
      this.spentMilli += MILLI;
      return { outcome: "admitted" };
    }
    return { outcome: "wait", retry_after_ms: Math.ceil((MILLI - available) / rate) };
  }
}

export function retryAfterSecs(retryAfterMs: number, random: number): number {
  const base = Math.max(1, Math.ceil(retryAfterMs / 1000));
  if (base >= 30) return 30;
  return Math.min(base + (random % (base + 1)), 30);
}

// --------------------------------------------------------------- the answers

export interface ConnectionEvent {
  event_id: string;
  occurred_at_ms: number;
  user_id: string;
  device_id: string;
  region_id: string;
  server_id: string | null;
  outcome: "admitted" | "throttled" | "closed";
}

const regionsBodies = new WeakMap<Snapshot, string>();

/**
 * GET /v1/regions body (keys sorted like the worker's), serialised once per
 * snapshot, as the worker does (it depends on the snapshot alone).
 */
export function regionsBody(snapshot: Snapshot): string {
  let body = regionsBodies.get(snapshot);
  if (body === undefined) {
    body = JSON.stringify({
      regions: snapshot.regions.map((r) => ({
        country: r.country,
        health: listedHealth(r),
        id: r.id,
        latitude: r.latitude,
        load: regionLoad(r),
        longitude: r.longitude,
        name: r.name,
        tier: r.tier,
      })),
    });
    regionsBodies.set(snapshot, body);
  }
  return body;
}

/** Whether If-None-Match matches the etag (weak comparison). */
export function notModified(ifNoneMatch: string | null | undefined, etag: string): boolean {
  if (!ifNoneMatch) return false;
  return ifNoneMatch.split(",").some((t) => {
    const v = t.trim().replace(/^(W\/)+/, "");
    return v === "*" || v === etag;
  });
}

/** The connect ticket's claims JSON, fields in the worker's order. */
export function ticketClaims(sub: string, device: Device, server: Server, region: Region, now: number): Uint8Array {
  return utf8.encode(
    JSON.stringify({
      iss: ISSUER,
      aud: TICKET_AUDIENCE,
      typ: "connect",
      sub,
      did: device.id,
      dpk: device.public_key,
      v4: device.ipv4_address,
      v6: device.ipv6_address,
      srv: server.id,
      reg: region.id,
      iat: now,
      exp: now + TICKET_TTL_SECS,
    }),
  );
}

export function connectBody(region: Region, server: Server, device: Device, ticket: string, failover: string[]): string {
  return JSON.stringify({
    failover,
    ipv4_address: device.ipv4_address,
    ipv6_address: device.ipv6_address,
    region: region.id,
    server: { endpoint: `${server.hostname}:${server.port}`, id: server.id, public_key: server.public_key },
    ticket,
    ticket_expires_in: TICKET_TTL_SECS,
  });
}

export const placementProblem = (e: PlacementError) =>
  e.code === "region_not_allowed"
    ? new Problem(403, e.code, "Forbidden", "Your plan does not include this region.")
    : e.code === "region_not_found"
      ? new Problem(404, e.code, "Not Found", "No region with this id.")
      : new Problem(503, e.code, "Service Unavailable", "No region your plan includes is up right now.", {}, 5);

export const deviceNotFound = () => new Problem(404, "device_not_found", "Not Found", "No such device.");

/**
 * Everything of POST /v1/connect between authentication and admission that
 * is pure: the device's rank, the region and failover, the admission gate.
 */
export function placeConnect(
  claims: AccessClaims,
  body: ConnectBody,
  devices: Device[],
  snapshot: Snapshot,
  location: ClientLocation,
): { device: Device; choice: Choice; gate: string; rate: number } {
  const rank = devices.findIndex((d) => d.id === body.device_id);
  if (rank < 0) throw deviceNotFound();
  if (rank >= claims.ent.max_devices)
    throw new Problem(
      403,
      "device_not_entitled",
      "Forbidden",
      `Your plan covers ${claims.ent.max_devices} device(s); this one is beyond them.`,
    );
  const device = devices[rank];
  const closed = closedRegions(snapshot);
  let choice: Choice;
  try {
    choice = choose(snapshot, claims.ent, location, body.region, closed);
  } catch (e) {
    if (e instanceof PlacementError) throw placementProblem(e);
    throw e;
  }
  const shards = shardCount(choice.region.admission_rate);
  const shard = shardFor(device.id, shards);
  return {
    device,
    choice,
    gate: `${choice.region.id}#${shard}`,
    rate: shardRate(prepare(snapshot).admitting.get(choice.region) ?? choice.region.admission_rate, shards, shard),
  };
}

/** The refusal for a gate's verdict, or null when admitted. */
export function refusal(verdict: Verdict, failover: string[], random: number): Problem | null {
  if (verdict.outcome === "admitted") return null;
  if (verdict.outcome === "wait")
    return new Problem(
      429,
      "region_busy",
      "Too Many Requests",
      "The region is admitting clients as fast as it can; retry after the delay or use a failover region.",
      { failover },
      retryAfterSecs(verdict.retry_after_ms ?? 1000, random),
    );
  return new Problem(
    503,
    "region_closed",
    "Service Unavailable",
    "The region is not accepting connections; use a failover region.",
    { failover },
    retryAfterSecs(1000, random),
  );
}
