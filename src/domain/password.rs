//! Password hashing: argon2id with at least OWASP's minimum cost
//! (m = 19 MiB, t = 2, p = 1), stored as a PHC string.
//!
//! Verification refuses a stored hash whose algorithm or parameters are below
//! that minimum, so a weak hash planted in (or left over in) the database cannot
//! become a cheap way in. The salt is an argument: the shell supplies 16 random
//! bytes, which keeps this module pure.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use super::account::Password;

/// OWASP's minimum for argon2id.
pub const MIN_M_KIB: u32 = 19 * 1024;
pub const MIN_T: u32 = 2;
pub const MIN_P: u32 = 1;

/// A hash computed when the account does not exist, so that an unknown email
/// costs the same as a wrong password (no timing oracle for account existence).
/// Its output bytes are arbitrary, so no password matches it (finding one would
/// be a preimage attack on argon2); its parameters are the standard ones.
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$yEaYd5kbRx0pY1pAzKU4qDNFIS2Hf1PWeK9bsBVI8J8";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The password does not match.
    Mismatch,
    /// The stored hash is not a PHC string we can read.
    Unreadable,
    /// The stored hash is not argon2id with at least the minimum parameters.
    TooWeak,
}

fn hasher(m: u32, t: u32, p: u32) -> Argon2<'static> {
    let params = Params::new(m, t, p, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes `password` with a 16-byte `salt`; returns the PHC string.
pub fn hash(password: &[u8], salt: [u8; 16]) -> String {
    hash_at(password, salt, (MIN_M_KIB, MIN_T, MIN_P))
}

/// [`hash`] for a password replacing the hash `stored`: at `stored`'s cost
/// where that is above the minimum, so replacing a hash never makes it
/// cheaper to attack.
pub fn rehash(password: &[u8], salt: [u8; 16], stored: &str) -> String {
    let (m, t, p) = refused(stored)
        .ok()
        .and_then(|parsed| Params::try_from(&parsed).ok())
        .map_or((MIN_M_KIB, MIN_T, MIN_P), |params| {
            (params.m_cost(), params.t_cost(), params.p_cost())
        });
    hash_at(
        password,
        salt,
        (m.max(MIN_M_KIB), t.max(MIN_T), p.max(MIN_P)),
    )
}

fn hash_at(password: &[u8], salt: [u8; 16], (m, t, p): (u32, u32, u32)) -> String {
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt length");
    hasher(m, t, p)
        .hash_password(password, &salt)
        .expect("argon2 with valid parameters")
        .to_string()
}

/// The shortest stored output accepted: argon2's default, 32 bytes. A
/// shorter one is cheaper to find a match for.
pub const MIN_OUTPUT_LEN: usize = 32;

/// Checks `password` against a stored PHC string, refusing weak parameters
/// (see [`refused`]). A refused hash still costs one verification, against
/// [`DUMMY_HASH`], so that its answer comes no sooner than a wrong
/// password's: an account with a hash left over from elsewhere cannot be
/// told apart by timing.
pub fn verify(password: &[u8], phc: &str) -> Result<(), VerifyError> {
    let parsed = match refused(phc) {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = check(
                password,
                &PasswordHash::new(DUMMY_HASH).expect("DUMMY_HASH parses"),
            );
            return Err(e);
        }
    };
    check(password, &parsed)
}

/// What [`verify_password`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The hash is of the password's NFKC form.
    Current,
    /// The hash is of the password as typed, made before passwords were
    /// normalized: the caller should store a hash of
    /// [`Password::expose`] in its place.
    AsTyped,
}

/// Checks a password against a stored PHC string ([`verify`]): its NFKC
/// form ([`Password::expose`]) and, when that does not match and the
/// password as typed differs, the typed form, which a hash made before
/// normalization holds. It verifies twice whenever the first fails and the
/// typed form differs, against [`DUMMY_HASH`] and a refused hash as against
/// an account's own, so an unknown account costs as many verifications as a
/// wrong password.
pub fn verify_password(password: &Password, phc: &str) -> Result<Verified, VerifyError> {
    let error = match verify(password.expose(), phc) {
        Ok(()) => return Ok(Verified::Current),
        Err(e) => e,
    };
    match password.as_typed().map(|typed| verify(typed, phc)) {
        Some(Ok(())) => Ok(Verified::AsTyped),
        _ => Err(error),
    }
}

/// The stored hash, parsed, unless it is not argon2id version 0x13 with at
/// least the minimum parameters, [`MIN_OUTPUT_LEN`] bytes of output and a
/// salt argon2 takes (8 bytes or more). argon2 refuses a shorter salt before
/// it hashes anything, so such a hash would answer without the verification
/// every other refusal costs.
fn refused(phc: &str) -> Result<PasswordHash<'_>, VerifyError> {
    let parsed = PasswordHash::new(phc).map_err(|_| VerifyError::Unreadable)?;
    let mut salt = [0u8; 64];
    let salt_taken = parsed.salt.is_some_and(|s| {
        s.decode_b64(&mut salt)
            .is_ok_and(|bytes| bytes.len() >= argon2::MIN_SALT_LEN)
    });
    if parsed.algorithm != argon2::ARGON2ID_IDENT
        || parsed.version != Some(Version::V0x13 as u32)
        || parsed.hash.is_none_or(|h| h.len() < MIN_OUTPUT_LEN)
        || !salt_taken
    {
        return Err(VerifyError::TooWeak);
    }
    let params = Params::try_from(&parsed).map_err(|_| VerifyError::Unreadable)?;
    if params.m_cost() < MIN_M_KIB || params.t_cost() < MIN_T || params.p_cost() < MIN_P {
        return Err(VerifyError::TooWeak);
    }
    Ok(parsed)
}

/// Verifies with the stored parameters (they may be stronger than today's
/// minimum).
fn check(password: &[u8], parsed: &PasswordHash<'_>) -> Result<(), VerifyError> {
    Argon2::default()
        .verify_password(password, parsed)
        .map_err(|e| match e {
            argon2::password_hash::Error::Password => VerifyError::Mismatch,
            _ => VerifyError::Unreadable,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_and_nothing_else() {
        let phc = hash(b"correct horse battery", [7; 16]);
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_eq!(verify(b"correct horse battery", &phc), Ok(()));
        assert_eq!(
            verify(b"correct horse batterx", &phc),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn a_password_matches_a_hash_of_its_nfkc_form_or_an_older_one_of_its_typed_form() {
        let typed = "pa\u{308}ssword";
        let password = Password::parse(typed).unwrap();
        let current = hash(password.expose(), [3; 16]);
        let older = hash(typed.as_bytes(), [4; 16]);
        assert_eq!(verify_password(&password, &current), Ok(Verified::Current));
        assert_eq!(verify_password(&password, &older), Ok(Verified::AsTyped));
        // Typed another way (composed), the older hash cannot be matched,
        // the current one can.
        let composed = Password::parse("p\u{e4}ssword").unwrap();
        assert_eq!(verify_password(&composed, &current), Ok(Verified::Current));
        assert_eq!(
            verify_password(&composed, &older),
            Err(VerifyError::Mismatch)
        );
        let wrong = Password::parse("pa\u{308}sswore").unwrap();
        assert_eq!(
            verify_password(&wrong, &current),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_password(&wrong, DUMMY_HASH),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn a_rehash_keeps_a_stronger_cost_and_never_goes_below_the_minimum() {
        let stronger = hash_at(b"password1", [5; 16], (MIN_M_KIB + 1024, MIN_T + 1, MIN_P));
        let again = rehash(b"password2", [6; 16], &stronger);
        assert!(
            again.starts_with("$argon2id$v=19$m=20480,t=3,p=1$"),
            "{again}"
        );
        assert_eq!(verify(b"password2", &again), Ok(()));
        let minimum = rehash(b"password2", [6; 16], &hash(b"password1", [5; 16]));
        assert!(
            minimum.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{minimum}"
        );
        // A hash it could not read gets the minimum.
        assert_eq!(rehash(b"password2", [6; 16], "$md5$x"), minimum);
    }

    #[test]
    fn the_same_password_with_another_salt_hashes_differently() {
        assert_ne!(hash(b"password1", [1; 16]), hash(b"password1", [2; 16]));
    }

    #[test]
    fn hashes_below_the_minimum_cost_are_refused_even_with_the_right_password() {
        let weak = |m, t, p, alg| {
            let params = Params::new(m, t, p, None).unwrap();
            let salt = SaltString::encode_b64(&[3; 16]).unwrap();
            Argon2::new(alg, Version::V0x13, params)
                .hash_password(b"password1", &salt)
                .unwrap()
                .to_string()
        };
        assert_eq!(
            verify(b"password1", &weak(8 * 1024, 2, 1, Algorithm::Argon2id)),
            Err(VerifyError::TooWeak)
        );
        assert_eq!(
            verify(b"password1", &weak(MIN_M_KIB, 1, 1, Algorithm::Argon2id)),
            Err(VerifyError::TooWeak)
        );
        assert_eq!(
            verify(b"password1", &weak(MIN_M_KIB, 2, 1, Algorithm::Argon2i)),
            Err(VerifyError::TooWeak)
        );
        // A salt argon2 refuses (6 bytes): refused as weak, which costs the
        // dummy verification, not as unreadable before any hashing.
        let good = hash(b"password1", [3; 16]);
        let (head, tail) = good.rsplit_once('$').unwrap();
        let (head, _salt) = head.rsplit_once('$').unwrap();
        let short_salt = format!("{head}$c2FsdHNh${tail}");
        assert_eq!(verify(b"password1", &short_salt), Err(VerifyError::TooWeak));
        // Argon2 version 0x10, or an output under 32 bytes.
        let params = Params::new(MIN_M_KIB, 2, 1, None).unwrap();
        let salt = SaltString::encode_b64(&[3; 16]).unwrap();
        let old_version = Argon2::new(Algorithm::Argon2id, Version::V0x10, params.clone())
            .hash_password(b"password1", &salt)
            .unwrap()
            .to_string();
        assert!(old_version.starts_with("$argon2id$v=16$"), "{old_version}");
        assert_eq!(
            verify(b"password1", &old_version),
            Err(VerifyError::TooWeak)
        );
        let short = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(MIN_M_KIB, 2, 1, Some(16)).unwrap(),
        )
        .hash_password(b"password1", &salt)
        .unwrap()
        .to_string();
        assert_eq!(verify(b"password1", &short), Err(VerifyError::TooWeak));
        // Stronger than the minimum is fine.
        assert_eq!(
            verify(
                b"password1",
                &weak(MIN_M_KIB + 1024, 3, 1, Algorithm::Argon2id)
            ),
            Ok(())
        );
    }

    #[test]
    fn unreadable_hashes_are_reported_as_such() {
        for phc in [
            "",
            "plaintext",
            "$argon2id$garbage",
            "$2b$12$abcdefghijklmnopqrstuv",
        ] {
            assert!(verify(b"password1", phc).is_err(), "{phc:?}");
        }
    }

    #[test]
    fn the_demo_account_in_the_dev_seed_has_the_documented_password() {
        let seed = include_str!("../../seeds/dev.sql");
        let phc = seed
            .split('\'')
            .find(|s| s.starts_with("$argon2id$"))
            .expect("demo hash in seed");
        assert_eq!(verify(b"keenvpn-demo-2026", phc), Ok(()));
    }

    #[test]
    fn the_dummy_hash_is_well_formed_with_standard_cost() {
        assert_eq!(
            verify(b"anything at all", DUMMY_HASH),
            Err(VerifyError::Mismatch)
        );
    }
}
