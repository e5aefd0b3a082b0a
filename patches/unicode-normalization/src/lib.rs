//! NFKC and NFC normalization without Unicode tables in the Worker.
//!
//! The users of `unicode-normalization` in this build are `stringprep`'s
//! SASLprep, through which `postgres-protocol` prepares a non-ASCII password
//! for PostgreSQL's SCRAM authentication (NFKC), and the service's own
//! account input (`keenvpn_edge::text`: NFC for email addresses, NFKC for
//! passwords). The crate's composition tables
//! were about 65 KB of the gzipped Worker, shipped to and compiled by every
//! isolate for steps that run only for text that is not ASCII. The
//! runtime already has the same algorithm: in the Worker (wasm32) NFKC is
//! `String.prototype.normalize("NFKC")` (V8's ICU); natively it is ICU4X's
//! `icu_normalizer`.
//!
//! Only what those callers use is provided: `nfkc` and `nfc` on a `char`
//! iterator or a `&str`, with the real crate's names and results. A crate
//! that needs more of the real API fails to compile rather than getting a
//! different answer.

use std::marker::PhantomData;

/// NFKC and NFC (and, in the real crate, the other normalization forms) of a
/// string or a `char` iterator.
pub trait UnicodeNormalization<I: Iterator<Item = char>> {
    /// The compatibility composition (NFKC) of the input.
    fn nfkc(self) -> Recompositions<I>;
    /// The canonical composition (NFC) of the input.
    fn nfc(self) -> Recompositions<I>;
}

impl<I: Iterator<Item = char>> UnicodeNormalization<I> for I {
    fn nfkc(self) -> Recompositions<I> {
        Recompositions::of(&self.collect::<String>(), Form::Nfkc)
    }
    fn nfc(self) -> Recompositions<I> {
        Recompositions::of(&self.collect::<String>(), Form::Nfc)
    }
}

impl<'a> UnicodeNormalization<std::str::Chars<'a>> for &'a str {
    fn nfkc(self) -> Recompositions<std::str::Chars<'a>> {
        Recompositions::of(self, Form::Nfkc)
    }
    fn nfc(self) -> Recompositions<std::str::Chars<'a>> {
        Recompositions::of(self, Form::Nfc)
    }
}

/// The two composed forms provided.
#[derive(Clone, Copy)]
enum Form {
    Nfc,
    Nfkc,
}

/// The normalized text's characters, in order.
pub struct Recompositions<I> {
    chars: std::vec::IntoIter<char>,
    input: PhantomData<I>,
}

impl<I> Recompositions<I> {
    fn of(text: &str, form: Form) -> Self {
        Recompositions {
            chars: normalize(text, form)
                .chars()
                .collect::<Vec<_>>()
                .into_iter(),
            input: PhantomData,
        }
    }
}

impl<I> Iterator for Recompositions<I> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        self.chars.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chars.size_hint()
    }
}

#[cfg(target_arch = "wasm32")]
fn normalize(text: &str, form: Form) -> String {
    let form = match form {
        Form::Nfc => "NFC",
        Form::Nfkc => "NFKC",
    };
    js_sys::JsString::from(text).normalize(form).into()
}

#[cfg(not(target_arch = "wasm32"))]
fn normalize(text: &str, form: Form) -> String {
    use icu_normalizer::ComposingNormalizerBorrowed as Composing;
    let normalizer = match form {
        Form::Nfc => Composing::new_nfc(),
        Form::Nfkc => Composing::new_nfkc(),
    };
    normalizer.normalize(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::UnicodeNormalization;

    fn nfkc(s: &str) -> String {
        s.nfkc().collect()
    }

    #[test]
    fn compatibility_forms_become_their_plain_equivalents() {
        // Full-width letters, a ligature, a Roman numeral, a superscript, the
        // feminine ordinal (RFC 4013's own example), a non-breaking space.
        assert_eq!(nfkc("ｔｅｓｔ"), "test");
        assert_eq!(nfkc("\u{FB01}le"), "file");
        assert_eq!(nfkc("\u{2168}"), "IX");
        assert_eq!(nfkc("x\u{00B2}"), "x2");
        assert_eq!(nfkc("\u{00AA}"), "a");
        assert_eq!(nfkc("a\u{00A0}b"), "a b");
    }

    #[test]
    fn canonical_sequences_compose_and_reorder() {
        // e + combining acute composes; two marks are put in canonical order
        // (dot below, class 220, before acute, class 230) and composed.
        assert_eq!(nfkc("e\u{0301}"), "\u{00E9}");
        assert_eq!(nfkc("a\u{0301}\u{0323}"), "\u{1EA1}\u{0301}");
        // Hangul jamo compose into a syllable.
        assert_eq!(nfkc("\u{1100}\u{1161}"), "\u{AC00}");
    }

    #[test]
    fn text_already_normalized_is_unchanged() {
        for s in ["", "keenvpn", "pässwörd", "パスワード", "密码"] {
            assert_eq!(nfkc(s), s);
        }
    }

    #[test]
    fn nfc_composes_canonical_sequences_and_keeps_compatibility_forms() {
        let nfc = |s: &str| s.nfc().collect::<String>();
        assert_eq!(nfc("e\u{0301}"), "\u{00E9}");
        assert_eq!(nfc("a\u{0301}\u{0323}"), "\u{1EA1}\u{0301}");
        assert_eq!(nfc("\u{1100}\u{1161}"), "\u{AC00}");
        // Unlike NFKC, NFC leaves full-width letters and ligatures alone,
        // but maps a singleton (the Ångström sign) to its canonical letter.
        assert_eq!(nfc("ｔｅｓｔ\u{FB01}"), "ｔｅｓｔ\u{FB01}");
        assert_eq!(nfc("\u{212B}"), "\u{00C5}");
        for s in ["", "keenvpn", "pässwörd", "パスワード", "密码"] {
            assert_eq!(nfc(s), s);
        }
    }

    #[test]
    fn a_char_iterator_is_normalized_as_its_text() {
        let chars = "ｋｅｅｎ\u{FB01}".chars().filter(|&c| c != 'ｅ');
        assert_eq!(chars.nfkc().collect::<String>(), "knfi");
    }
}
