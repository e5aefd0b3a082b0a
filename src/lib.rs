//! KeenVPN Edge: the backend of the KeenVPN app, compiled to WebAssembly and run
//! by Cloudflare Workers at the edge location nearest each VPN client.
//!
//! Layout (a functional core with an imperative shell):
//! - [`domain`]: pure rules. No runtime, clock, randomness or I/O; unit-tested natively.
//! - [`api`]: the wire types (request and response bodies) and, natively, the
//!   OpenAPI document generated from them.
//! - [`http`]: routing, replies and problem+json errors, also runtime-free.
//! - [`sql`]: quoting for PostgreSQL's simple query protocol.
//! - [`text`]: Unicode lower-casing, by the runtime in the Worker.
//! - [`math`]: sine, cosine, arcsine and logarithm, by the runtime in the Worker.
//! - `edge` (wasm32 only): the one place `worker::` appears. Bindings (KV, the
//!   `UserSession` and `RegionGate` Durable Objects, the Hyperdrive binding),
//!   adapters, and the `#[durable_object]` shims.
//! - `db` (native only): migrations and the dev seed, applied by `refinery`
//!   from the `migrate` binary and by the test harnesses.
//!
//! The `#[event]` entry points live in `edge` next to the code they call, so
//! this file stays a map.

pub mod api;
pub mod domain;
pub mod http;
pub mod math;
pub mod sql;
pub mod text;

#[cfg(target_arch = "wasm32")]
mod edge;

#[cfg(not(target_arch = "wasm32"))]
pub mod db;
