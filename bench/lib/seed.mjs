// Writes one benchmark scenario's data into a directory:
//   kv.json        what every stack reads from KV (or from memory): the catalogue
//                  snapshot `catalogue/v1` and its etag `catalogue/v1/etag`, and
//                  each user's `sessions/<user>` and `devices/<user>` mirrors, as
//                  the worker stores them
//   keys.json      the JWT_SIGNING_KEYS secret (the development key first)
//   requests.txt   one "<access token> <device id>" line per user, for the load
//   vars.json      the worker's text bindings: wrangler.toml [vars] and the secrets of
//                  .dev.vars.example
//
// usage: node seed.mjs --out DIR --regions N --keys K [--users U]
//
// Catalogue of size N: N regions (the first is `eu-central` at Frankfurt, where
// the benchmark's clients are, so placement always scans all N regions and picks
// it); `eu-central` has N servers (so the rendezvous hash scores N servers), every
// other region 4. Tokens are minted like the worker mints them (EdDSA, the same
// claims) and spread over all K keys, as during a key rotation.
import { createPrivateKey, createHash, sign } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseFlags } from "./tools.mjs";

const args = parseFlags();
const out = args.out;
const regionCount = Number(args.regions ?? 10);
const keyCount = Number(args.keys ?? 1);
const userCount = Number(args.users ?? 1000);
const root = new URL("../..", import.meta.url).pathname;
mkdirSync(out, { recursive: true });

// ---- keys: the development key from .dev.vars.example, then derived extra keys
const example = readFileSync(join(root, ".dev.vars.example"), "utf8");
const devKeys = JSON.parse(example.match(/^JWT_SIGNING_KEYS='(.*)'$/m)[1]);
const keys = [devKeys[0]];
for (let i = 1; i < keyCount; i++) {
  const seed = createHash("sha256").update(`keenvpn-bench-key-${i}`).digest().toString("base64url");
  keys.push({ kid: `bench-${i}`, seed });
}
// wrangler.toml's top-level [vars] (the local development configuration).
const wranglerVars = readFileSync(join(root, "wrangler.toml"), "utf8").split(/^\[vars\]$/m)[1]?.split(/^\[/m)[0] ?? "";
const vars = {
  ...Object.fromEntries([...wranglerVars.matchAll(/^(\w+)\s*=\s*"([^"]*)"/gm)].map((m) => [m[1], m[2]])),
  JWT_SIGNING_KEYS: JSON.stringify(keys),
  REFRESH_TOKEN_PEPPER: example.match(/^REFRESH_TOKEN_PEPPER="(.*)"$/m)[1],
  STRIPE_WEBHOOK_SECRET: example.match(/^STRIPE_WEBHOOK_SECRET="(.*)"$/m)[1],
  ADMIN_TOKEN: example.match(/^ADMIN_TOKEN="(.*)"$/m)[1],
};
writeFileSync(join(out, "vars.json"), JSON.stringify(vars));
writeFileSync(join(out, "keys.json"), vars.JWT_SIGNING_KEYS);

const pkcs8 = (seed) =>
  createPrivateKey({
    key: Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), Buffer.from(seed, "base64url")]),
    format: "der",
    type: "pkcs8",
  });
const signers = keys.map((k) => ({ kid: k.kid, key: pkcs8(k.seed) }));

// ---- a deterministic pseudo-random stream
let state = 0x2545f491;
const rand = () => {
  state ^= state << 13;
  state ^= state >>> 17;
  state ^= state << 5;
  return (state >>> 0) / 4294967296;
};
const hex = (n) => Array.from({ length: n }, () => Math.floor(rand() * 16).toString(16)).join("");
const uuid = () => `${hex(8)}-${hex(4)}-4${hex(3)}-${"89ab"[Math.floor(rand() * 4)]}${hex(3)}-${hex(12)}`;
const wgKey = () => Buffer.from(Array.from({ length: 32 }, () => Math.floor(rand() * 256))).toString("base64");

// ---- the catalogue
// 500 RegionGate shards per region (200 admissions/s each): the 1,000 devices
// spread over them stay far below any shard's rate at what one core serves, so
// the benchmark measures admission, not refusals.
const ADMISSION_RATE = 100_000;
const LOADS = [0.25, 0.5, 0.75]; // exact in binary, so every stack prints the same mean
const server = (region, i) => ({
  id: `${region}-${String(i + 1).padStart(4, "0")}`,
  hostname: `${region}-${i + 1}.vpn.keenvpn.test`,
  port: 51820,
  public_key: wgKey(),
  capacity: 100 + 50 * (i % 4),
  load: 0,
  full: false,
});
const regions = [];
for (let r = 0; r < regionCount; r++) {
  const id = r === 0 ? "eu-central" : `region-${String(r).padStart(4, "0")}`;
  const servers = Array.from({ length: r === 0 ? regionCount : 4 }, (_, i) => server(id, i));
  const load = LOADS[r % 3];
  for (const s of servers) s.load = load;
  // Full servers, so that the answers compared cover placement's room rule:
  // every server of some regions (which the failover lists then name after
  // the others), at a load of 1, and every eighth server of the clients'
  // region. Placement reads the flag; those keep the region's load, so that
  // its mean stays exact in binary.
  servers.forEach((s, i) => {
    if (r !== 0 && r % 5 === 2) Object.assign(s, { load: 1, full: true });
    if (r === 0 && i % 8 === 7) s.full = true;
  });
  regions.push({
    id,
    name: r === 0 ? "Frankfurt" : `Region ${r}`,
    country: r === 0 ? "DE" : ["US", "GB", "JP", "BR", "SG", "ZA", "FR", "IN"][r % 8],
    latitude: r === 0 ? 50.11 : Math.round((rand() * 130 - 60) * 100) / 100,
    longitude: r === 0 ? 8.68 : Math.round((rand() * 360 - 180) * 100) / 100,
    tier: r % 2 === 0 ? "free" : "premium",
    health: r === 0 ? "up" : r % 7 === 3 ? "down" : r % 11 === 5 ? "draining" : "up",
    admission_rate: ADMISSION_RATE,
    servers,
  });
}
regions.sort((a, b) => (a.id < b.id ? -1 : 1));
for (const r of regions) r.servers.sort((a, b) => (a.id < b.id ? -1 : 1));
let h = 0xcbf29ce484222325n;
for (const b of Buffer.from(JSON.stringify(regions))) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
const etag = h.toString(16).padStart(16, "0");
// As the worker's publisher stores it: the snapshot, and its etag on its own.
const kv = { "catalogue/v1": JSON.stringify({ etag, regions }), "catalogue/v1/etag": etag };

// ---- users, their mirrors and tokens
const now = Math.floor(Date.now() / 1000);
const lines = [];
for (let u = 0; u < userCount; u++) {
  const user = uuid();
  const sid = uuid();
  const devices = Array.from({ length: 3 }, (_, i) => ({
    id: uuid(),
    name: `device ${i + 1}`,
    public_key: wgKey(),
    ipv4_address: `10.64.${(u * 3 + i) >> 8 & 255}.${(u * 3 + i) & 255}`,
    ipv6_address: `fd4b:6565:6e00::${(u * 3 + i).toString(16)}`,
    created_at: now - 86400 * (30 - i),
  }));
  kv[`devices/${user}`] = JSON.stringify({ devices });
  kv[`sessions/${user}`] = JSON.stringify({
    sessions: [
      { id: uuid(), label: "old phone", created_at: now - 86400 * 20, last_refresh_at: now - 86400 * 19, revoked: true },
      { id: sid, label: "laptop", created_at: now - 86400, last_refresh_at: now - 600, revoked: false },
    ],
  });
  const s = signers[u % signers.length];
  const header = Buffer.from(JSON.stringify({ alg: "EdDSA", kid: s.kid, typ: "JWT" })).toString("base64url");
  const claims = {
    iss: "keenvpn-edge",
    aud: "keenvpn-app",
    typ: "access",
    sub: user,
    sid,
    iat: now,
    exp: now + 900,
    ent: { plan: "plus", max_devices: 5, region_tiers: ["free", "premium"], until: now + 30 * 86400 },
  };
  const input = `${header}.${Buffer.from(JSON.stringify(claims)).toString("base64url")}`;
  const token = `${input}.${sign(null, Buffer.from(input), s.key).toString("base64url")}`;
  // The second-oldest device connects: within the plan's five.
  lines.push(`${token} ${devices[1].id}`);
}
writeFileSync(join(out, "kv.json"), JSON.stringify(kv));
writeFileSync(join(out, "requests.txt"), lines.join("\n") + "\n");
