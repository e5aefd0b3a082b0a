#!/bin/sh
# Builds the worker (build/index.js + wasm) with worker-build, offline.
#
# worker-build would otherwise download wasm-bindgen, wasm-opt and esbuild; we
# hand it the binaries `scripts/setup.sh` installed. Called by wrangler as the
# [build] command, and by the test harness before it starts wrangler.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PATH="$ROOT/node_modules/.bin:${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export PATH

if [ -f build/index.js ] && [ -z "$(find src Cargo.toml Cargo.lock .cargo migrations openapi.json -newer build/index.js 2>/dev/null | head -n 1)" ]; then
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
exec worker-build --release
