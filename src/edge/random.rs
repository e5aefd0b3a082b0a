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
