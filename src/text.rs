//! Unicode lower-casing and normalization without Rust's Unicode tables in
//! the Worker.
//!
//! `str::to_lowercase` brings the standard library's case-mapping tables and
//! code into the module: about 11 KB of the gzipped Worker, shipped to and
//! compiled by every isolate, for the rare address that is not ASCII. In the
//! Worker (wasm32) a non-ASCII string is lower-cased by the runtime instead,
//! with `String.prototype.toLowerCase` (V8's: the same Unicode default case
//! mapping, final sigma included); natively, and for ASCII everywhere, the
//! standard library does it. The end-to-end tests check the Worker's answer
//! against the standard library's.
//!
//! Normalization ([`nfc`], [`nfkc`]) goes through the `unicode-normalization`
//! API, which `patches/unicode-normalization` provides from the runtime in
//! the Worker and from ICU4X natively, for the same reason.

use unicode_normalization::UnicodeNormalization;

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

/// `text` in Unicode normalization form C (canonical composition): the form
/// in which canonically equivalent spellings are one string, so an `é`
/// typed as one character and one typed as `e` and a combining accent are
/// the same address. ASCII is returned as it is (it is always NFC).
pub fn nfc(text: String) -> String {
    if text.is_ascii() {
        return text;
    }
    text.as_str().nfc().collect()
}

/// `text` in Unicode normalization form KC (compatibility composition), as
/// NIST SP 800-63B asks of passwords before hashing: NFC, and compatibility
/// forms (full-width letters, ligatures, a no-break space) mapped to their
/// plain equivalents, so one password typed on two keyboards is one
/// password. ASCII is borrowed as it is.
pub fn nfkc(text: &str) -> std::borrow::Cow<'_, str> {
    if text.is_ascii() {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(text.nfkc().collect())
}

/// Whether `c` is one of the characters that show nothing yet change how
/// the text around them looks or reads: the soft hyphen, the bidirectional
/// marks, embeddings, overrides and isolates (U+202E turns "abc" into
/// "cba"), zero-width spaces and joiners that join nothing, invisible
/// operators, the byte-order mark and interlinear annotation. A name or an
/// address with one can look like another, or hide what it says. The
/// zero-width joiner and non-joiner are not among them: emoji sequences and
/// several scripts need them.
pub fn is_hidden(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{61c}'
            | '\u{180e}'
            | '\u{200b}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// The zero-width joiner and non-joiner: allowed between characters, but
/// alone they show nothing.
pub fn is_joiner(c: char) -> bool {
    matches!(c, '\u{200c}' | '\u{200d}')
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

    #[test]
    fn hidden_characters_are_told_from_visible_ones_and_joiners() {
        for c in [
            '\u{ad}', '\u{200b}', '\u{200f}', '\u{202e}', '\u{2066}', '\u{feff}',
        ] {
            assert!(is_hidden(c), "{c:?}");
        }
        for c in ['a', ' ', 'é', '\u{200c}', '\u{200d}', '\u{2003}', '👩'] {
            assert!(!is_hidden(c), "{c:?}");
        }
        assert!(is_joiner('\u{200d}') && is_joiner('\u{200c}') && !is_joiner('a'));
    }
}
