//! Random bytes from the platform CSPRNG (`crypto.getRandomValues` in workerd).

/// `N` random bytes. WebCrypto does not fail for small requests; if it ever
/// did, continuing without randomness would be worse than failing the request.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("crypto.getRandomValues is available in workerd");
    out
}

pub fn u32() -> u32 {
    u32::from_le_bytes(bytes())
}

/// A random (version 4) UUID in canonical lowercase form.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
