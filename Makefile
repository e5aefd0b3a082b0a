# KeenVPN Edge. The two commands a newcomer needs:
#   make dev    start the whole local stack (PostgreSQL + worker), installing what is missing
#   make test   run every check and test, installing what is missing
.PHONY: dev test setup build lint fmt clean clean-dev

dev:
	@bash scripts/dev.sh

test:
	@sh scripts/test.sh

# Install the toolchain and packages only.
setup:
	@sh scripts/setup.sh

# Build the worker (build/index.js + wasm) only.
build: setup
	@sh scripts/build-worker.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --target wasm32-unknown-unknown -- -D warnings

fmt:
	cargo fmt --all

clean:
	rm -rf build target/test-stacks

# Wipe the local dev database and KV/Durable Object state: DEV_STATE, or .local
# (and the cluster its pg links to when 'postgres' could not reach it; see dev.sh).
clean-dev:
	@state="$${DEV_STATE:-.local}"; \
	if [ -L "$$state/pg" ]; then echo "rm -rf $$(readlink "$$state/pg")"; rm -rf "$$(readlink "$$state/pg")"; fi; \
	echo "rm -rf $$state"; rm -rf "$$state"
