//! Unicode lower-casing without Rust's case tables in the Worker.
//!
//! `str::to_lowercase` brings the standard library's case-mapping tables and
//! code into the module: about 11 KB of the gzipped Worker, shipped to and
//! compiled by every isolate, for the rare address that is not ASCII. In the
//! Worker (wasm32) a non-ASCII string is lower-cased by the runtime instead,
//! with `String.prototype.toLowerCase` (V8's: the same Unicode default case
//! mapping, final sigma included); natively, and for ASCII everywhere, the
//! standard library does it. The end-to-end tests check the Worker's answer
//! against the standard library's.

/// `text` lower-cased by Unicode's default (full) case mapping.
pub fn to_lowercase(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    unicode_lowercase(text)
}

#[cfg(target_arch = "wasm32")]
fn unicode_lowercase(text: &str) -> String {
    js_sys::JsString::from(text).to_lower_case().into()
}

#[cfg(not(target_arch = "wasm32"))]
fn unicode_lowercase(text: &str) -> String {
    text.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_and_unicode_are_lower_cased_in_full() {
        assert_eq!(to_lowercase("Alice@Example.COM"), "alice@example.com");
        assert_eq!(to_lowercase("ÅSA-ΟΔΟΣ@X.TEST"), "åsa-οδος@x.test");
        // Full mapping: one character may become two.
        assert_eq!(to_lowercase("İ"), "i\u{307}");
    }
}
