//! The WireGuard public-key parser (and the other device inputs read from
//! the same request: the name and the device id in the path).
//!
//! Input: any bytes, read as the text a client sent; 32 bytes are also
//! taken as a raw key to round-trip through its canonical spelling.

#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keenvpn_edge::domain::device::{DeviceName, MAX_NAME_CHARS, PublicKey, is_device_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    if let Ok(key) = PublicKey::parse(&text) {
        // One key, one spelling: 44 characters of canonical base64 of 32
        // bytes that are not all zero.
        assert_eq!(key.as_str(), text);
        let bytes = STANDARD.decode(key.as_str()).expect("a parsed key decodes");
        assert_eq!(bytes.len(), 32);
        assert!(bytes.iter().any(|b| *b != 0), "the zero key parsed");
        assert_eq!(STANDARD.encode(&bytes), text);
    }
    if let Ok(raw) = <[u8; 32]>::try_from(data) {
        let parsed = PublicKey::parse(&STANDARD.encode(raw));
        assert_eq!(parsed.is_ok(), raw != [0; 32]);
    }

    if let Ok(name) = DeviceName::parse(&text) {
        let name = name.as_str();
        assert!(!name.is_empty() && name.chars().count() <= MAX_NAME_CHARS);
        assert_eq!(name, name.trim());
        assert!(!name.chars().any(char::is_control));
    }

    if is_device_id(&text) {
        assert_eq!(text.len(), 36);
        assert!(
            text.bytes()
                .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
});
