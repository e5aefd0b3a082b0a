# Shared helpers for the project scripts (sourced, not run).
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
PATH="$ROOT/node_modules/.bin:$CARGO_BIN:$PATH"
export ROOT PATH

if [ -t 1 ]; then BOLD='\033[1;34m' RED='\033[1;31m' OFF='\033[0m'; else BOLD='' RED='' OFF=''; fi
step() { printf "${BOLD}==>${OFF} %s\n" "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf "${RED}error:${OFF} %s\n" "$*" >&2; exit 1; }

# The version of a package in Cargo.lock.
locked_version() {
  awk -v name="$1" '$0 == "name = \"" name "\"" { getline; gsub(/version = |"/, ""); print; exit }' "$ROOT/Cargo.lock"
}

# The Cargo registry's source directory (dependencies' sources, and so their
# panic locations); empty when its path has a space, which the space-separated
# rustflags that map it away cannot carry (scripts/build-worker.sh).
cargo_registry() {
  dir="${CARGO_HOME:-$HOME/.cargo}/registry/src"
  case "$dir" in *[[:space:]]*) ;; *) echo "$dir" ;; esac
}

# Newest PostgreSQL server bin directory, or empty.
pg_bindir() {
  if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ]; then echo "$PG_BINDIR"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | while read -r d; do
    [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && echo "$d"
  done | sort -t/ -k5 -n | tail -n 1
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root to run: $* (install it yourself, or rerun as root)"
  fi
}
