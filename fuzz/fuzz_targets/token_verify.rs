//! The access-token verification path: an untrusted `Authorization: Bearer`
//! value either verifies or is refused with a typed error, never a panic.
//!
//! Input: the first byte picks the mode, the rest is its data.
//! - even: the rest is the token, as a client would send it (forged: the
//!   fuzzer cannot sign, so this exercises size, shape, base64, header,
//!   algorithm, key and signature checks);
//! - odd: the rest is `<header JSON>\n<claims JSON>`, signed with the real
//!   key, so the claims parser and the type, issuer, audience and time
//!   checks see arbitrary content too.

#![no_main]

use keenvpn_edge::domain::token::{ACCESS_TTL_SECS, LEEWAY_SECS, TokenError};
use keenvpn_edge_fuzz::{NOW, keys, sign_raw};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let (header, claims) = match rest.iter().position(|b| *b == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &b""[..]),
        };
        sign_raw(header, claims)
    };
    // The time comes from the caller; the extremes must not overflow. Checks
    // before the claims do not read the clock, so only a token that got that
    // far is tried at the other times (signature checks are the cost here).
    for now in [NOW, NOW + ACCESS_TTL_SECS, i64::MIN, i64::MAX] {
        match keys().verify(&token, now) {
            Ok(claims) => {
                // Whatever was accepted obeys the documented bounds.
                let lifetime = claims.exp - claims.iat;
                assert!(
                    lifetime > 0 && lifetime <= ACCESS_TTL_SECS,
                    "lifetime {lifetime}"
                );
                assert!(
                    claims.iat <= now.saturating_add(LEEWAY_SECS),
                    "issued in the future"
                );
                assert!(now < claims.exp.saturating_add(LEEWAY_SECS), "expired");
            }
            Err(
                TokenError::TooLarge
                | TokenError::Malformed
                | TokenError::AlgorithmNotAllowed
                | TokenError::UnknownKey
                | TokenError::BadSignature,
            ) => return,
            Err(_) => {}
        }
    }
});
