//! The `Idempotency-Key` validator: exactly 1 to 255 printable ASCII
//! characters without spaces are accepted, verbatim; everything else is a
//! typed refusal.

#![no_main]

use keenvpn_edge::domain::idempotency::{MAX_KEY_LEN, fingerprint, parse_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let expected =
        (1..=MAX_KEY_LEN).contains(&text.len()) && text.bytes().all(|b| (0x21..=0x7e).contains(&b));
    match parse_key(&text) {
        Ok(key) => {
            assert!(expected, "accepted {text:?}");
            assert_eq!(key, text);
        }
        Err(invalid) => {
            assert!(!expected, "refused {text:?}");
            assert_eq!(invalid.field, "Idempotency-Key");
        }
    }
    // The body half of the request identity: any bytes hash to 64 hex digits.
    let fp = fingerprint("POST", "/v1/devices", data);
    assert_eq!(fp.len(), 64);
    assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
});
