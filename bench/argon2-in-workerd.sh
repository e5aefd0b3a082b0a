#!/bin/bash
# Estimates what argon2id (m=19 MiB, t=2, p=1) costs inside workerd, against a
# running `make dev` stack: the median latency of a successful login (argon2
# verification + one PostgreSQL query + three Durable Object calls) minus that of
# a refresh (one Durable Object call), over N sequential requests each, and the
# same hash natively for comparison. Prints the figures; it is not a test.
#   bash bench/argon2-in-workerd.sh [N]
set -euo pipefail
N=${1:-30}
BASE=${BASE:-http://127.0.0.1:8787}
EMAIL=demo@keenvpn.test PASSWORD=keenvpn-demo-2026

scratch=$(mktemp)
trap 'rm -f "$scratch"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms() { awk '{printf "%.1f\n", $1 * 1000}'; }
login() {
  curl -s -o "$scratch" -w '%{time_total}\n' -X POST "$BASE/v1/auth/login" \
    -H 'content-type: application/json' -H "cf-connecting-ip: 2001:db8::b$1" \
    -d "{\"email\":\"$EMAIL\",\"password\":\"$PASSWORD\"}"
}
curl -sf "$BASE/healthz" >/dev/null || { echo "start the stack first: make dev" >&2; exit 1; }

login 0 >/dev/null   # warm up (compiles the wasm, opens the objects)
logins=$(for i in $(seq 1 "$N"); do login "$((i % 20))"; done | ms | median)
token=$(sed -n 's/.*"refresh_token":"\([^"]*\)".*/\1/p' "$scratch")
refreshes=$(for i in $(seq 1 "$N"); do
  out=$(curl -s -w '\n%{time_total}' -X POST "$BASE/v1/auth/refresh" -H 'content-type: application/json' \
        -d "{\"refresh_token\":\"$token\"}")
  token=$(printf '%s' "$out" | head -n1 | sed -n 's/.*"refresh_token":"\([^"]*\)".*/\1/p')
  printf '%s\n' "$out" | tail -n1
done | ms | median)
echo "login   median ${logins} ms over $N (argon2id verify + 1 query + 3 DO calls)"
echo "refresh median ${refreshes} ms over $N (1 DO call)"
awk -v l="$logins" -v r="$refreshes" 'BEGIN {printf "argon2id in workerd, estimated: ~%.0f ms per verification\n", l - r}'
