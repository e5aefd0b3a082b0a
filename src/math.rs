//! The few transcendental functions the pure core uses (for distances and
//! server scores), without their Rust implementations in the Worker.
//!
//! `f64::sin` and its kin compile to the standard library's own
//! implementations (`libm`): about 7 KB of the Worker's code, with their
//! argument-reduction tables, for a handful of calls per connect. In the
//! Worker (wasm32) they are the runtime's `Math` functions instead (V8's,
//! which like `libm` descend from fdlibm); natively, and so in the unit
//! tests, the standard library's. A result may differ by a unit in the last
//! place between the two, far below what placement can tell apart.

/// Sine of `x` radians.
pub fn sin(x: f64) -> f64 {
    imp::sin(x)
}

/// Cosine of `x` radians.
pub fn cos(x: f64) -> f64 {
    imp::cos(x)
}

/// Arcsine of `x`, in radians (NaN outside [-1, 1]).
pub fn asin(x: f64) -> f64 {
    imp::asin(x)
}

/// Natural logarithm of `x`.
pub fn ln(x: f64) -> f64 {
    imp::ln(x)
}

#[cfg(target_arch = "wasm32")]
mod imp {
    pub use js_sys::Math::{asin, cos, log as ln, sin};
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub fn sin(x: f64) -> f64 {
        x.sin()
    }
    pub fn cos(x: f64) -> f64 {
        x.cos()
    }
    pub fn asin(x: f64) -> f64 {
        x.asin()
    }
    pub fn ln(x: f64) -> f64 {
        x.ln()
    }
}
