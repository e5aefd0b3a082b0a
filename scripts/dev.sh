#!/bin/bash
# Starts the whole local stack: PostgreSQL (a throwaway cluster under .local/pg,
# migrated and seeded with demo data) and the worker under `wrangler dev`.
# Ctrl-C stops both. Data survives restarts; `make clean-dev` wipes it.
# DEV_PORT and DEV_PG_PORT change the ports, DEV_STATE the directory that
# holds the stack's data (.local).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

PG_PORT=${DEV_PG_PORT:-54329}
WORKER_PORT=${DEV_PORT:-8787}
DB_USER=keenvpn
DB_PASSWORD=keenvpn-dev   # dev-only; matches localConnectionString in wrangler.toml
DB_NAME=keenvpn
STATE=${DEV_STATE:-$ROOT/.local}
PGDIR="$STATE/pg"
DB_URL="postgres://$DB_USER:$DB_PASSWORD@127.0.0.1:$PG_PORT/$DB_NAME"

sh scripts/setup.sh
bindir=$(pg_bindir)

# Run PostgreSQL tools as 'postgres' when we are root (initdb refuses root).
pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

step "PostgreSQL cluster in $PGDIR (port $PG_PORT)"
# As root, the cluster belongs to 'postgres', which must be able to reach its
# directory. Under a checkout it cannot reach (a home directory of mode 0700,
# as root's is), the cluster lives under /var/lib/keenvpn-edge instead, one
# directory per checkout, and $STATE/pg links to it (`make clean-dev` removes
# both).
if [ "$(id -u)" = 0 ]; then
  if [ ! -L "$PGDIR" ]; then
    mkdir -p "$PGDIR"
    chown postgres: "$PGDIR"
    if ! runuser -u postgres -- test -w "$PGDIR"; then
      rmdir "$PGDIR" 2>/dev/null \
        || die "user 'postgres' cannot reach $PGDIR, which holds a cluster; move the checkout, or set DEV_STATE to a directory it can reach"
      mkdir -p /var/lib/keenvpn-edge
      chmod 755 /var/lib/keenvpn-edge
      ln -s "/var/lib/keenvpn-edge/pg-$(printf '%s' "$PGDIR" | sha256sum | cut -c1-16)" "$PGDIR"
    fi
  fi
  if [ -L "$PGDIR" ]; then
    PGDIR=$(readlink "$PGDIR")
    note "in $PGDIR (user 'postgres' cannot reach $STATE)"
  fi
  mkdir -p "$PGDIR"
  chown postgres: "$PGDIR"
else
  mkdir -p "$PGDIR"
fi
if [ ! -f "$PGDIR/data/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s' "$DB_PASSWORD" > "$pwfile"
  chmod 644 "$pwfile"
  # The locale is named: the caller's (a LANG that ssh passed on) may not
  # exist here, or not be UTF-8, and initdb would refuse it.
  pg "$bindir/initdb" -D "$PGDIR/data" -U "$DB_USER" --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 --pwfile="$pwfile" >/dev/null || die "initdb failed"
  rm -f "$pwfile"
  note "initialised"
fi
started_pg=
if pg "$bindir/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
  # Another `make dev` (or an earlier one that was killed) runs it: leave it
  # running when this one stops.
  note "already running (left running on exit)"
else
  started_pg=1
  # Deployed, Hyperdrive pools the worker's connections; `wrangler dev`
  # connects straight to this server, one connection per request that uses
  # it, each closed a moment after. 100 (the default) was too few for the
  # surge tool's 64 concurrent device registrations: hundreds of requests a
  # run were refused "too many clients" (503, retried by the tool). TCP
  # only: a Unix socket's path must fit in 107 bytes, which a deep checkout
  # overruns.
  pg "$bindir/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/postgres.log" -w -t 30 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=400" start >/dev/null \
    || die "PostgreSQL did not start; see $PGDIR/postgres.log (is port $PG_PORT free? set DEV_PG_PORT)"
  note "started"
fi
ticker=
stop_pg() {
  [ -z "$ticker" ] || kill "$ticker" 2>/dev/null || true
  [ -n "$started_pg" ] || return 0
  step "stopping PostgreSQL"
  pg "$bindir/pg_ctl" -D "$PGDIR/data" -m fast stop >/dev/null 2>&1 || true
}
trap stop_pg EXIT
# A shell killed by a signal it has no trap for may skip its EXIT trap, and
# did for SIGTERM (what supervisors and `kill` send): the worker stopped and
# PostgreSQL stayed up. Trapped, the shell exits normally once the worker
# has gone, and the EXIT trap stops PostgreSQL. (Ctrl-C already did.) A stop
# asked for with SIGTERM that completes is a success, as for a server, so the
# exit status is 0 and `make` reports no error.
trap 'exit 0' TERM
trap 'exit 129' HUP

export PGPASSWORD="$DB_PASSWORD"
if ! "$bindir/psql" -X -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
     "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
  "$bindir/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" "$DB_NAME"
fi
unset PGPASSWORD

step "migrations and demo seed"
cargo run --quiet --locked --bin migrate -- --database-url "$DB_URL" --seed

step "building the worker"
sh scripts/build-worker.sh

cat <<INFO

  KeenVPN Edge is starting at http://127.0.0.1:$WORKER_PORT
    curl -s http://127.0.0.1:$WORKER_PORT/healthz
    curl -s http://127.0.0.1:$WORKER_PORT/readyz
  PostgreSQL: $DB_URL
    psql '$DB_URL'

  Demo account: demo@keenvpn.test / keenvpn-demo-2026 (Plus plan)
    curl -s -X POST http://127.0.0.1:$WORKER_PORT/v1/auth/login \\
      -H 'content-type: application/json' \\
      -d '{"email":"demo@keenvpn.test","password":"keenvpn-demo-2026"}'
    then: curl -s http://127.0.0.1:$WORKER_PORT/v1/me -H "authorization: Bearer <access_token>"

  Ctrl-C stops the worker and the database.

INFO

export CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_HYPERDRIVE="$DB_URL"
export WRANGLER_SEND_METRICS=false
# `wrangler dev` runs no cron trigger by itself: tick the schedule once a
# minute, as a deployment's trigger does (the catalogue's publish, regions
# whose monitor went silent, retention), while this shell lives.
# Quiet, and holding none of this shell's output open: a pipe reading it
# (`make dev | tee`) ends when the shell does.
(
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  while kill -0 $$ 2>/dev/null; do
    sleep 60 &
    nap=$!
    wait "$nap"
    curl -fs -o /dev/null "http://127.0.0.1:$WORKER_PORT/__scheduled?cron=*+*+*+*+*" || true
  done
) </dev/null >/dev/null 2>&1 &
ticker=$!
step "wrangler dev"
wrangler dev --ip 127.0.0.1 --port "$WORKER_PORT" --persist-to "$STATE/wrangler" --test-scheduled "$@"
