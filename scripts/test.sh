#!/bin/sh
# Runs every check and test: formatting, clippy (host and wasm32), unit tests,
# PostgreSQL adapter tests, and end-to-end tests against wrangler dev + PostgreSQL.
set -eu
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
started=$(date +%s)

sh scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check || die "code is not formatted: run 'make fmt'"

step "cargo clippy (host)"
cargo clippy --all-targets --locked -- -D warnings

step "cargo clippy (wasm32)"
cargo clippy --all-targets --locked --target wasm32-unknown-unknown -- -D warnings

step "build the worker (wasm)"
sh scripts/build-worker.sh

step "the worker names no path of this machine"
registry=$(cargo_registry) # empty when left unmapped: see build-worker.sh
for dir in "$ROOT" ${registry:+"$registry"}; do
  if grep -qaF "$dir/" build/index_bg.wasm; then
    die "build/index_bg.wasm names paths under $dir/ (panic locations): see the remap in scripts/build-worker.sh"
  fi
done

step "cargo test (unit, PostgreSQL adapters, end to end)"
cargo test --locked

step "all tests passed in $(( $(date +%s) - started ))s"
