#!/bin/sh
# Installs everything a fresh machine lacks to build, run and test KeenVPN Edge.
# Idempotent: each step checks first and is skipped when already satisfied.
set -eu
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
started=$(date +%s)

command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup first"

# Installs Debian packages (as root, through sudo when not root).
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || die "node and npm not found: install Node.js (>= 20) first"

step "C toolchain and OpenSSL headers (native links; worker-build's HTTPS client)"
# rustup brings no linker of its own, and worker-build fetches over native TLS
# (openssl-sys, found through pkg-config). Slim images and CI runners often
# lack all three; a cargo install then fails minutes in.
if command -v cc >/dev/null 2>&1 && command -v pkg-config >/dev/null 2>&1 \
   && pkg-config --exists openssl 2>/dev/null; then
  note "present"
elif command -v apt-get >/dev/null 2>&1; then
  note "installing build-essential, pkg-config and libssl-dev"
  apt_install build-essential pkg-config libssl-dev || die "apt-get install of the C toolchain failed"
else
  die "need a C compiler (cc), pkg-config and the OpenSSL headers: install them with your package manager"
fi

step "Rust target wasm32-unknown-unknown"
if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  note "present"
else
  rustup target add wasm32-unknown-unknown || die "could not add the wasm32-unknown-unknown target"
fi

step "wasm-bindgen-cli (must equal wasm-bindgen in Cargo.lock)"
want=$(locked_version wasm-bindgen)
[ -n "$want" ] || die "wasm-bindgen not found in Cargo.lock"
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" = "$want" ]; then
  note "wasm-bindgen $have"
else
  note "installing wasm-bindgen-cli $want (have: ${have:-none}); this compiles for a few minutes, once"
  # --locked first; if a locked dependency is not on the registry, resolve afresh.
  cargo install --locked wasm-bindgen-cli --version "=$want" \
    || cargo install wasm-bindgen-cli --version "=$want" \
    || die "could not install wasm-bindgen-cli $want"
fi

step "worker-build (must equal worker in Cargo.lock)"
want=$(locked_version worker)
have=$(worker-build --version 2>/dev/null | awk '{print $NF}' || true)
if [ "$have" = "$want" ]; then
  note "worker-build $have"
else
  note "installing worker-build $want (have: ${have:-none})"
  cargo install --locked worker-build --version "=$want" \
    || cargo install worker-build --version "=$want" \
    || die "could not install worker-build $want"
fi

step "npm packages (wrangler, workerd, Node 22, binaryen, esbuild)"
if [ -f node_modules/.package-lock.json ] && [ ! package-lock.json -nt node_modules/.package-lock.json ] \
   && [ -x node_modules/.bin/wrangler ]; then
  note "node_modules up to date"
else
  npm ci --no-audit --no-fund || die "npm ci failed"
fi
node_version=$(node_modules/.bin/node --version 2>/dev/null || true)
case "$node_version" in
  v22.*) note "node $node_version (wrangler runs on it)" ;;
  *) die "node_modules/.bin/node is not Node 22 (got '${node_version:-nothing}'); delete node_modules and rerun" ;;
esac

step "PostgreSQL server binaries"
bindir=$(pg_bindir)
if [ -n "$bindir" ]; then
  note "$bindir"
else
  note "installing postgresql from the Debian packages"
  apt_install postgresql || die "apt-get install postgresql failed"
  bindir=$(pg_bindir)
  [ -n "$bindir" ] || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
  note "$bindir"
fi
step "curl and ps (the make dev check in scripts/test.sh, and make dev's cron ticker)"
if command -v curl >/dev/null 2>&1 && command -v ps >/dev/null 2>&1; then
  note "present"
else
  note "installing curl and procps from the Debian packages"
  apt_install curl procps || die "apt-get install curl procps failed"
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  # PostgreSQL refuses to run as root; the scripts and tests run it as 'postgres'.
  useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres || die "could not create the postgres user"
fi

step "Schemathesis (the OpenAPI contract fuzzer the tests run), in .venv/"
# Pinned, with Hypothesis, which generates its cases: the contract tests use
# a fixed seed, which reproduces only with the same versions of both.
SCHEMATHESIS_VERSION=4.32.5
HYPOTHESIS_VERSION=6.170.17
have=$(.venv/bin/schemathesis --version 2>/dev/null | awk '{print $NF}' || true)
have_hypothesis=$(.venv/bin/python -c 'import hypothesis; print(hypothesis.__version__)' 2>/dev/null || true)
if [ "$have" = "$SCHEMATHESIS_VERSION" ] && [ "$have_hypothesis" = "$HYPOTHESIS_VERSION" ]; then
  note "schemathesis $have, hypothesis $have_hypothesis"
else
  if ! command -v python3 >/dev/null 2>&1; then
    note "installing python3 from the Debian packages"
    apt_install python3 python3-venv \
      || die "python3 not found, and apt-get could not install it: install Python (>= 3.10) with venv"
  fi
  note "installing schemathesis $SCHEMATHESIS_VERSION and hypothesis $HYPOTHESIS_VERSION from PyPI (have: ${have:-none}, ${have_hypothesis:-none})"
  if [ ! -x .venv/bin/pip ] && ! python3 -m venv .venv; then
    # Debian and Ubuntu ship the venv module apart from python3.
    rm -rf .venv
    note "installing python3-venv from the Debian packages"
    apt_install python3-venv || die "could not create .venv, and apt-get could not install python3-venv"
    python3 -m venv .venv || die "could not create .venv"
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION" "hypothesis==$HYPOTHESIS_VERSION" \
    || die "could not install schemathesis $SCHEMATHESIS_VERSION with hypothesis $HYPOTHESIS_VERSION"
fi

step "development secrets (.dev.vars)"
if [ -f .dev.vars ]; then
  # Add any secret the example gained since .dev.vars was made.
  for name in $(sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' .dev.vars.example); do
    if ! grep -q "^$name=" .dev.vars; then
      grep "^$name=" .dev.vars.example >> .dev.vars
      note "added $name from .dev.vars.example"
    fi
  done
  note "present"
else
  cp .dev.vars.example .dev.vars
  note "created from .dev.vars.example (development-only keys)"
fi

step "setup done in $(( $(date +%s) - started ))s"
