//! Request ids: every response carries one so a client report can be matched
//! to our logs.
//!
//! At the edge Cloudflare already names each request with its `cf-ray` header;
//! we reuse it when it is well formed so our id and Cloudflare's agree. Locally
//! (no `cf-ray`) the shell passes 16 random bytes and we hex-encode them.

/// The longest incoming id we accept verbatim; anything longer is replaced.
pub const MAX_LEN: usize = 64;

/// Chooses the request id: a well-formed `cf-ray` if there is one, else the
/// hex encoding of `random()`, which is only called then (on Cloudflare every
/// request has a `cf-ray`, so none pays for randomness it would not use).
pub fn choose(cf_ray: Option<&str>, random: impl FnOnce() -> [u8; 16]) -> String {
    match cf_ray {
        Some(ray) if is_well_formed(ray) => ray.to_owned(),
        _ => hex::encode(random()),
    }
}

fn is_well_formed(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_cf_ray_is_reused() {
        assert_eq!(
            choose(Some("8a1b2c3d4e5f6789-FRA"), || unreachable!(
                "a well-formed ray needs no randomness"
            )),
            "8a1b2c3d4e5f6789-FRA"
        );
    }

    #[test]
    fn without_cf_ray_the_random_bytes_are_hex_encoded() {
        let mut random = [0u8; 16];
        random[0] = 0xab;
        random[15] = 0x01;
        assert_eq!(choose(None, || random), "ab000000000000000000000000000001");
    }

    #[test]
    fn a_malformed_or_oversized_cf_ray_is_replaced() {
        let random = [0x11; 16];
        let fresh = "11".repeat(16);
        assert_eq!(choose(Some(""), || random), fresh);
        assert_eq!(choose(Some("abc\r\nx-evil: 1"), || random), fresh);
        assert_eq!(choose(Some("a b"), || random), fresh);
        assert_eq!(choose(Some(&"a".repeat(MAX_LEN + 1)), || random), fresh);
        assert_eq!(
            choose(Some(&"a".repeat(MAX_LEN)), || random),
            "a".repeat(MAX_LEN)
        );
    }
}
