//! The `Stripe-Signature` header parser and verifier: any header and body
//! get `Ok` or a typed refusal, never a panic, and only a real signature by
//! a configured, non-empty secret is accepted.
//!
//! Input: the header up to the first newline, then the raw body.

#![no_main]

use keenvpn_edge::domain::stripe::{self, SignatureError, TOLERANCE_SECS};
use keenvpn_edge_fuzz::{NOW, STRIPE_SECRETS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    let header = String::from_utf8_lossy(header);
    let verdict = stripe::verify(Some(&header), body, &STRIPE_SECRETS, NOW);
    if verdict.is_ok() {
        // Accepted under the rotation pair: then under the one secret that
        // signed it too, in either order, and never without a secret.
        let one = STRIPE_SECRETS
            .iter()
            .filter(|&&secret| stripe::verify(Some(&header), body, &[secret], NOW).is_ok())
            .count();
        assert!(one >= 1, "accepted, but by no single secret");
        let reversed = [STRIPE_SECRETS[1], STRIPE_SECRETS[0]];
        assert_eq!(stripe::verify(Some(&header), body, &reversed, NOW), Ok(()));
    }
    // Empty secrets are skipped: nothing is accepted without a real one.
    assert!(stripe::verify(Some(&header), body, &["", ""], NOW).is_err());
    assert!(stripe::verify(Some(&header), body, &[], NOW).is_err());
    // The age is checked last: far from the signed time, a delivery that
    // verified now is stale, never anything else.
    let later = stripe::verify(
        Some(&header),
        body,
        &STRIPE_SECRETS,
        NOW + 10 * TOLERANCE_SECS,
    );
    if verdict.is_ok() {
        assert_eq!(later, Err(SignatureError::Stale));
    }
    assert_eq!(
        stripe::verify(None, body, &STRIPE_SECRETS, NOW),
        Err(SignatureError::Missing)
    );
});
