#!/usr/bin/env bash
# The side-by-side benchmark: our worker against the Hono and NestJS peers.
#
#   bash bench/run.sh            full run (about 15 minutes on two cores)
#   QUICK=1 bash bench/run.sh    short runs, to check the harness (a minute or two)
#
# Builds everything in release mode (our worker with scripts/build-worker.sh, the
# peers with esbuild / tsc from their own locked packages), then measures size,
# cold start, the warm hot path and its scaling (bench/lib/bench.mjs) and writes
# bench/results.json and bench/RESULTS.md. RUNS, SECONDS, CONNECTIONS and
# COLD_RUNS override the defaults. Needs two CPUs (server and load generator are
# pinned to one each). See bench/README.md.
set -euo pipefail
# lib.sh finds the checkout from $0, so it is read before any cd.
. "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"
BENCH_COMMAND="${QUICK:+QUICK=$QUICK }bash bench/run.sh"
export BENCH_COMMAND

step "toolchain"
# scripts/setup.sh installs what is missing (Rust target, wasm-bindgen, worker-build,
# the root npm packages); skipped when everything is there already.
if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
  && command -v worker-build >/dev/null 2>&1 && command -v wasm-bindgen >/dev/null 2>&1 \
  && [ -x node_modules/.bin/workerd ] && [ -x node_modules/.bin/node ] && [ -x node_modules/.bin/esbuild ]; then
  note "present"
else
  sh scripts/setup.sh || die "scripts/setup.sh failed"
fi

step "load generator and pinning tools"
if ! command -v wrk >/dev/null 2>&1 || ! command -v taskset >/dev/null 2>&1; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk util-linux >/dev/null \
    || die "apt-get install wrk failed"
fi
note "$(wrk -v 2>&1 | head -n 1)"
[ "$(nproc)" -ge 2 ] || die "the benchmark needs two CPUs (server and load generator pinned apart)"

BIN="$ROOT/node_modules/.bin"

step "our worker (release build)"
sh scripts/build-worker.sh

step "Hono peer (npm ci, esbuild)"
(
  cd bench/peers/hono
  [ node_modules/.package-lock.json -nt package-lock.json ] 2>/dev/null || npm ci --no-audit --no-fund --ignore-scripts
  "$BIN/esbuild" src/index.ts --bundle --format=esm --platform=neutral --target=es2022 --minify \
    --main-fields=module,main --external:cloudflare:workers --outfile=dist/index.js --log-level=warning
)
note "bench/peers/hono/dist/index.js"

step "NestJS peer (npm ci, tsc, esbuild)"
(
  cd bench/peers/nest
  [ node_modules/.package-lock.json -nt package-lock.json ] 2>/dev/null || npm ci --no-audit --no-fund --ignore-scripts
  rm -rf build
  "$BIN/node" node_modules/typescript/bin/tsc -p .
  # Nest's optional integrations stay out of the bundle; Nest loads them only when used.
  for entry in lambda main; do
    "$BIN/esbuild" "build/nest/src/$entry.js" --bundle --platform=node --target=node22 --format=cjs --minify \
      --keep-names --outfile="dist/$entry.js" --log-level=warning \
      --external:@nestjs/microservices --external:@nestjs/websockets --external:class-transformer \
      --external:class-validator --external:@nestjs/microservices/microservices-module \
      --external:@nestjs/websockets/socket-module
  done
)
note "bench/peers/nest/dist/{lambda,main}.js"

step "measuring${QUICK:+ (quick mode)}"
"$BIN/node" bench/lib/bench.mjs
"$BIN/node" bench/lib/history.mjs
