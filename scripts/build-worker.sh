#!/bin/sh
# Builds the worker (build/entry.mjs, build/index.js + wasm) with worker-build, offline.
#
# worker-build would otherwise download wasm-bindgen, wasm-opt and esbuild; we
# hand it the binaries `scripts/setup.sh` installed. Called by wrangler as the
# [build] command, and by the test harness before it starts wrangler.
set -eu
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

# The kind of build (with or without the wasm name section, below): a build of
# the other kind is not up to date, so that a profiling build is never what a
# later plain build (the benchmark's, a deploy's) ships.
kind=${KEEP_WASM_NAMES:+names}
kind=${kind:-stripped}
if [ -f build/index.js ] && [ -f build/entry.mjs ] && [ "$(cat build/.kind 2>/dev/null)" = "$kind" ] \
  && [ -z "$(find src patches build.rs Cargo.toml Cargo.lock .cargo migrations openapi.json -newer build/index.js 2>/dev/null | head -n 1)" ]; then
  echo "build-worker: build/index.js is up to date"
  exit 0
fi

for tool in worker-build wasm-bindgen wasm-opt esbuild; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build-worker: '$tool' is missing; run 'make setup' (or 'make dev' / 'make test')" >&2
    exit 1
  fi
done

WASM_BINDGEN_BIN=$(command -v wasm-bindgen)
WASM_OPT_BIN="$ROOT/node_modules/.bin/wasm-opt"
ESBUILD_BIN="$ROOT/node_modules/.bin/esbuild"
export WASM_BINDGEN_BIN WASM_OPT_BIN ESBUILD_BIN

# Panic messages name the source file of the code that panicked; for
# dependencies that is a path under this machine's Cargo home. Map each
# registry directory away, so the shipped module says `serde_json-1.0.x/src/..`
# and not where it was built. (rustc applies the last prefix that matches; the
# first one covers a registry directory that a first build has yet to create.)
# Cargo adds these flags to any rustflags the target has in a Cargo
# configuration; it does not replace them. It splits them at spaces, so a
# registry whose path has one is left unmapped (`cargo_registry` is empty
# then).
registry=$(cargo_registry)
if [ -n "$registry" ]; then
  remap=" --remap-path-prefix=$registry/="
  for dir in "$registry"/*/; do
    [ -d "$dir" ] && remap="$remap --remap-path-prefix=$dir="
  done
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="${CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS:-}$remap"
  export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS
fi
# Written again last: a build interrupted from here on is not up to date.
rm -f build/.kind
worker-build --release
# The entry module wrangler and the benchmark load: index.js, re-exported with
# the RegionGate class made a DurableObject (for RPC) and a default export that
# calls the generated handlers without per-request proxies (see src/entry.mjs).
cp src/entry.mjs build/entry.mjs

# worker-build keeps the wasm "name" section (it passes --debuginfo to
# wasm-opt): function names for stack traces, about a sixth of the module and
# a tenth of it gzipped, shipped to and parsed by every isolate. Drop it here.
# (Stripping at link time, `strip = "symbols"`, also drops the target_features
# section that wasm-bindgen reads to choose its glue, so it is not used.)
# Set KEEP_WASM_NAMES=1 to keep the names, e.g. to profile the worker.
if [ -z "${KEEP_WASM_NAMES:-}" ]; then
  # The feature set worker-build enables, so nothing newer is emitted.
  "$WASM_OPT_BIN" build/index_bg.wasm -o build/index_bg.stripped.wasm --strip-debug \
    --enable-mutable-globals --enable-sign-ext --enable-nontrapping-float-to-int \
    --enable-bulk-memory --enable-multivalue --enable-reference-types --enable-exception-handling
  mv build/index_bg.stripped.wasm build/index_bg.wasm
fi
echo "$kind" > build/.kind
