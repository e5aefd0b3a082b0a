#!/bin/sh
# Runs every check and test: formatting, clippy (host and wasm32), a dry run of
# the staging and production deploys, unit tests, PostgreSQL adapter tests, and
# end-to-end tests against wrangler dev + PostgreSQL.
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

step "the staging and production configurations (wrangler deploy --dry-run)"
# Bindings and vars are not inherited by environments. When an environment
# lacks one the top level (the local development configuration, which the
# end-to-end tests exercise) has, wrangler only warns, and a deploy would ship
# a worker that fails at run time; so any warning fails here. Each environment
# must also bind exactly the top level's names: one bound only in staging or
# production is one no test has used.
dry_run() {
  WRANGLER_SEND_METRICS=false wrangler deploy "$@" --dry-run --outdir "$ROOT/build/dry-run" 2>&1
}
names() { grep -o '^env\.[A-Za-z0-9_]*' | sort | tr '\n' ' '; }
dev_out=$(dry_run) || { printf '%s\n' "$dev_out"; die "wrangler deploy --dry-run failed"; }
dev_names=$(printf '%s\n' "$dev_out" | names)
[ -n "$dev_names" ] || { printf '%s\n' "$dev_out"; die "wrangler listed no bindings"; }
for env in staging production; do
  out=$(dry_run --env "$env") || { printf '%s\n' "$out"; die "wrangler deploy --env $env --dry-run failed"; }
  if printf '%s\n' "$out" | grep -q 'WARNING\|ERROR'; then
    printf '%s\n' "$out"
    die "wrangler warns about the $env configuration in wrangler.toml"
  fi
  env_names=$(printf '%s\n' "$out" | names)
  [ "$env_names" = "$dev_names" ] \
    || die "$env binds: $env_names; local development binds: $dev_names (wrangler.toml)"
  note "$env: $env_names"
done

step "cargo test (unit, PostgreSQL adapters, end to end)"
cargo test --locked

step "all tests passed in $(( $(date +%s) - started ))s"
