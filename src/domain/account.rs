//! Account input, parsed rather than validated: an [`Email`] or a [`Password`]
//! value is correct by construction, so nothing downstream re-checks it.

use std::fmt;

/// The longest address SMTP allows (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;
pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 128;

/// Why an input was refused; `field` and `reason` go into a 422 problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: &'static str,
}

/// A normalised email address: trimmed, lower-cased, in Unicode NFC (so the
/// spellings of one accented address that a keyboard or a system may send,
/// one character or a letter and a combining mark, are one account), with
/// one `@` and a dotted domain.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, Invalid> {
        let bad = |reason| Invalid {
            field: "email",
            reason,
        };
        let email = crate::text::nfc(crate::text::to_lowercase(raw.trim()));
        if email.is_empty() {
            return Err(bad("is empty"));
        }
        if email.len() > MAX_EMAIL_LEN {
            return Err(bad("is longer than 254 bytes"));
        }
        if email.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("contains spaces or control characters"));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(bad("has no @"));
        };
        if local.is_empty() || local.len() > 64 || domain.contains('@') {
            return Err(bad("is not a valid address"));
        }
        let labels_ok = domain
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-'));
        if !domain.contains('.') || !labels_ok {
            return Err(bad("has an invalid domain"));
        }
        Ok(Email(email))
    }

    /// [`Email::parse`] for an account about to be made: also refuses
    /// hidden characters (`crate::text::is_hidden`), which would let a new
    /// address look exactly like another's. Only sign-up refuses them: an
    /// account made before the rule still signs in.
    pub fn parse_new(raw: &str) -> Result<Email, Invalid> {
        let email = Email::parse(raw)?;
        if email.0.chars().any(crate::text::is_hidden) {
            return Err(Invalid {
                field: "email",
                reason: "contains hidden characters",
            });
        }
        Ok(email)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Email {
    // Addresses are personal data: keep them out of debug output and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Email(..)")
    }
}

/// A password that meets the length rules. Never printed.
///
/// What is hashed and verified is its NFKC form ([`Password::expose`]), as
/// NIST SP 800-63B asks: one password typed on two keyboards, an accented
/// letter as one character or as a letter and a combining mark, a
/// full-width letter from an East Asian input method, is one password.
/// Hashes made before that rule hold the password as it was typed, so
/// [`Password::as_typed`] keeps that form when it differs, for
/// `password::verify_password` to fall back to.
#[derive(Clone)]
pub struct Password {
    normalized: String,
    /// The password as sent, when NFKC changed it.
    typed: Option<String>,
}

impl Password {
    /// 8..=128 characters as typed; NUL is refused (it truncates in many
    /// C-based tools).
    pub fn parse(raw: &str) -> Result<Password, Invalid> {
        let bad = |reason| Invalid {
            field: "password",
            reason,
        };
        if raw.contains('\0') {
            return Err(bad("contains a NUL character"));
        }
        let n = raw.chars().count();
        if n < MIN_PASSWORD_CHARS {
            return Err(bad("is shorter than 8 characters"));
        }
        if n > MAX_PASSWORD_CHARS {
            return Err(bad("is longer than 128 characters"));
        }
        Ok(match crate::text::nfkc(raw) {
            std::borrow::Cow::Borrowed(same) => Password {
                normalized: same.to_owned(),
                typed: None,
            },
            std::borrow::Cow::Owned(normalized) if normalized == raw => Password {
                normalized,
                typed: None,
            },
            std::borrow::Cow::Owned(normalized) => Password {
                normalized,
                typed: Some(raw.to_owned()),
            },
        })
    }

    /// The password to hash and verify: its NFKC form.
    pub fn expose(&self) -> &[u8] {
        self.normalized.as_bytes()
    }

    /// The password as typed, when it is not what [`Password::expose`]
    /// gives: what a hash made before normalization was made of.
    pub fn as_typed(&self) -> Option<&[u8]> {
        self.typed.as_deref().map(str::as_bytes)
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            Email::parse("  Alice@Example.COM ").unwrap().as_str(),
            "alice@example.com"
        );
    }

    #[test]
    fn canonically_equivalent_spellings_are_one_address() {
        // "é" as one character, as `e` and a combining acute, and upper-case.
        let composed = Email::parse("ren\u{e9}@example.com").unwrap();
        for raw in [
            "rene\u{301}@example.com",
            "RENE\u{301}@EXAMPLE.COM",
            "REN\u{c9}@example.com",
        ] {
            assert_eq!(Email::parse(raw).unwrap(), composed, "{raw:?}");
        }
        assert_eq!(composed.as_str(), "ren\u{e9}@example.com");
        // Compatibility forms are other addresses: NFC, not NFKC.
        assert_ne!(
            Email::parse("\u{ff41}@example.com").unwrap(),
            Email::parse("a@example.com").unwrap()
        );
    }

    #[test]
    fn a_password_is_its_nfkc_form_and_keeps_what_was_typed_if_that_differs() {
        let ascii = Password::parse("correct horse").unwrap();
        assert_eq!(ascii.expose(), b"correct horse");
        assert_eq!(ascii.as_typed(), None);
        let composed = Password::parse("p\u{e4}ssw\u{f6}rd").unwrap();
        assert_eq!(composed.as_typed(), None);
        for typed in ["pa\u{308}sswo\u{308}rd", "\u{ff50}\u{e4}ssw\u{f6}rd"] {
            let p = Password::parse(typed).unwrap();
            assert_eq!(p.expose(), composed.expose(), "{typed:?}");
            assert_eq!(p.as_typed(), Some(typed.as_bytes()));
        }
        // The length rules count what was typed: four letters with a
        // combining mark are eight characters (four once composed), and
        // NFKC may also lengthen a password (U+FDFA is 18 characters).
        assert!(Password::parse("a\u{308}a\u{308}a\u{308}a\u{308}").is_ok());
        assert!(Password::parse("\u{fdfa}1234567").is_ok());
    }

    #[test]
    fn malformed_emails_are_refused_with_a_reason() {
        for raw in [
            "",
            "   ",
            "alice",
            "@example.com",
            "alice@",
            "alice@localhost",
            "a@b@c.com",
            "al ice@example.com",
            "alice@exa..mple.com",
            "alice@-example.com",
            "a\0b@example.com",
        ] {
            let err = Email::parse(raw).unwrap_err();
            assert_eq!(err.field, "email", "{raw:?}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn a_new_address_may_not_hide_characters_but_an_existing_one_still_parses() {
        for raw in [
            "demo\u{200b}@example.com",
            "\u{202e}demo@example.com",
            "de\u{ad}mo@example.com",
        ] {
            let err = Email::parse_new(raw).unwrap_err();
            assert_eq!(
                (err.field, err.reason),
                ("email", "contains hidden characters")
            );
            // Signing in to an account made before the rule.
            assert!(Email::parse(raw).is_ok(), "{raw:?}");
        }
        // Joiners stay: some scripts need them (a Persian local part, say).
        assert!(Email::parse_new("\u{645}\u{200c}\u{627}@example.com").is_ok());
        assert!(Email::parse_new("Alice@Example.COM").is_ok());
    }

    #[test]
    fn passwords_must_be_8_to_128_characters_without_nul() {
        assert!(Password::parse("1234567").is_err());
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse(&"x".repeat(128)).is_ok());
        assert!(Password::parse(&"x".repeat(129)).is_err());
        assert!(Password::parse("abcd\0efgh").is_err());
        // Characters, not bytes: 8 multi-byte characters are enough.
        assert!(Password::parse("éééééééé").is_ok());
    }

    #[test]
    fn debug_output_hides_personal_data_and_secrets() {
        let e = Email::parse("alice@example.com").unwrap();
        let p = Password::parse("correct horse").unwrap();
        assert!(!format!("{e:?}{p:?}").contains("alice") && !format!("{p:?}").contains("horse"));
    }
}
