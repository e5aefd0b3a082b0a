//! The pure core of KeenVPN Edge.
//!
//! Nothing in here touches `worker::`, a clock, a random source or the network:
//! time and random bytes come in as arguments and decisions come out as values.
//! That keeps every rule unit-testable with plain `cargo test` on the host, and
//! lets the same logic run unchanged inside workerd.

pub mod account;
pub mod admission;
pub mod backoff;
pub mod catalogue;
pub mod connection_event;
pub mod device;
pub mod entitlement;
pub mod freshness;
pub mod geo;
pub mod idempotency;
pub mod outbox;
pub mod password;
pub mod placement;
pub mod problem;
pub mod readiness;
pub mod request_id;
pub mod retention;
pub mod session;
pub mod stripe;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod throttle;
pub mod token;
