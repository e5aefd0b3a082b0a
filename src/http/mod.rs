//! The HTTP layer: routing, responses and errors, independent of the runtime.
//!
//! The Worker shell (`edge`) turns the runtime's request into a method and a
//! path, asks [`route`] what to do, runs the handler, and turns the [`Reply`]
//! it gets back into the runtime's `Response`. Keeping this layer free of
//! `worker::` types means routing and the problem+json format are tested
//! natively.

pub mod body;
mod error;
mod reply;
mod routes;

pub use error::ApiError;
pub use reply::{Reply, finish};
pub use routes::{Route, Routed, path_of_url, route};
