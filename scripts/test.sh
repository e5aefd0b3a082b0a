#!/bin/sh
# Runs every check and test: formatting, clippy (host and wasm32), a dry run of
# the staging and production deploys, the JavaScript unit tests, unit tests,
# PostgreSQL adapter tests, end-to-end tests against wrangler dev +
# PostgreSQL, and `make dev` itself.
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

step "JavaScript unit tests (the Worker's own modules, on Node's test runner)"
# The runtime's timers are mocked; Node calls that API experimental.
node --disable-warning=ExperimentalWarning --test tests/js/*.test.mjs

step "cargo test (unit, PostgreSQL adapters, end to end)"
cargo test --locked

step "make dev: the local stack starts migrated and seeded, and Ctrl-C stops it"
# The README's first command, on ports and a data directory of its own (so a
# stack the developer is running is left alone).
# Two distinct ports that bind now, from below the kernel's ephemeral range
# (as the test harness picks them): a port the kernel handed out (a bind to 0)
# can be taken by any outgoing connection before the stack binds it, a minute
# later.
free_ports() {
  node -e '
    const net = require("net"), fs = require("fs");
    let top = 32768;
    try { top = +fs.readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").split(/\s+/)[0] || top; } catch {}
    const low = 10000, span = Math.max(top - low, 1000);
    const binds = (p) => new Promise((done) => {
      const s = net.createServer();
      s.once("error", () => done(false));
      s.listen(p, "127.0.0.1", () => s.close(() => done(true)));
    });
    (async () => {
      const got = [];
      for (let i = 0; got.length < 2 && i < 200; i++) {
        const p = low + Math.floor(Math.random() * span);
        if (!got.includes(p) && (await binds(p))) got.push(p);
      }
      if (got.length < 2) process.exit(1);
      console.log(got.join(" "));
    })();'
}
# A directory of mode 0700: as root, dev.sh must then place the cluster where
# 'postgres' (which PostgreSQL runs as) can reach it, as under root's home.
dev_state=$(mktemp -d)
ports=$(free_ports) || die "no two free ports for the make dev check"
dev_port=${ports% *}
dev_pg_port=${ports#* }
# In a process group of its own, so that a signal to the group reaches it as
# Ctrl-C reaches a terminal's; and with SIGINT handled as in a terminal (a job
# started with & from a script ignores it, and so would its children).
DEV_STATE="$dev_state" DEV_PORT=$dev_port DEV_PG_PORT=$dev_pg_port python3 -c '
import os, signal, sys
for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(sig, signal.SIG_DFL)
os.setsid()
os.execvp(sys.argv[1], sys.argv[1:])
' bash scripts/dev.sh > "$dev_state/dev.log" 2>&1 &
dev_pid=$!
# Stops what dev.sh started, if it still runs.
dev_stop() {
  kill -KILL "-$dev_pid" 2>/dev/null || true
  # pg_ctl starts PostgreSQL in a session of its own; SIGQUIT shuts it down at once.
  if [ -f "$dev_state/pg/data/postmaster.pid" ]; then
    kill -QUIT "$(head -n 1 "$dev_state/pg/data/postmaster.pid")" 2>/dev/null || true
  fi
}
# However this script ends from here on (Ctrl-C included), the stack stops
# and its data goes.
dev_wipe() {
  DEV_STATE="$dev_state" make -s clean-dev >/dev/null
}
trap 'dev_stop; dev_wipe' EXIT
trap 'exit 130' INT TERM
dev_fail() {
  dev_stop
  cat "$dev_state/dev.log" >&2
  die "$*"
}
# Whether dev.sh still runs (an exited one stays a zombie until waited for).
dev_alive() {
  dev_stat=$(ps -o stat= -p "$dev_pid" 2>/dev/null) && [ "${dev_stat#Z}" = "$dev_stat" ]
}
dev_url="http://127.0.0.1:$dev_port"
waited=0
until curl -sf -m 2 "$dev_url/readyz" 2>/dev/null | grep -q '"status":"ready"'; do
  dev_alive || dev_fail "make dev exited before the stack was ready"
  [ "$waited" -lt 240 ] || dev_fail "the stack was not ready after 240 s"
  sleep 1
  waited=$((waited + 1))
done
login=$(curl -s -m 10 -X POST "$dev_url/v1/auth/login" -H 'content-type: application/json' \
  -d '{"email":"demo@keenvpn.test","password":"keenvpn-demo-2026"}') \
  || dev_fail "the demo account's sign-in did not answer (curl exit $?)"
printf '%s' "$login" | grep -q '"access_token"' \
  || dev_fail "the demo account's sign-in answered: $login"
note "ready after ${waited} s; the demo account signs in"
if [ "$(id -u)" = 0 ]; then
  [ -L "$dev_state/pg" ] || dev_fail "as root, the cluster should live outside the 0700 state directory"
  note "the cluster in $(readlink "$dev_state/pg"), which 'postgres' can reach"
fi
kill -INT "-$dev_pid"
waited=0
while dev_alive; do
  [ "$waited" -lt 30 ] || dev_fail "make dev still running 30 s after Ctrl-C"
  sleep 1
  waited=$((waited + 1))
done
wait "$dev_pid" || true
if [ -f "$dev_state/pg/data/postmaster.pid" ]; then
  dev_fail "PostgreSQL still running after Ctrl-C (postmaster.pid left)"
fi
curl -s -m 2 "$dev_url/healthz" >/dev/null 2>&1 && dev_fail "the worker still answers after Ctrl-C"
dev_wipe
note "stopped, worker and database"

step "all tests passed in $(( $(date +%s) - started ))s"
