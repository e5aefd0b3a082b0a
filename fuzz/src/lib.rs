//! Fixtures shared by the fuzz targets and the seed generator: fixed keys,
//! secrets and a fixed "now", so a seed minted once stays meaningful.
//!
//! Every key and secret here is a test value that signs nothing real.

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keenvpn_edge::domain::session::{Issued, UserSessions};
use keenvpn_edge::domain::token::KeySet;

/// The clock every target reads (2023-11-14T22:13:20Z).
pub const NOW: i64 = 1_700_000_000;

/// Seed bytes of the signing key `k1` (and of the second, verifying-only, `k3`).
pub const SIGNING_SEED: [u8; 32] = [1; 32];
const SECOND_SEED: [u8; 32] = [3; 32];

/// The access-token keys: `k1` signs, `k1` and `k3` verify.
pub fn keys() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| {
        let json = serde_json::json!([
            { "kid": "k1", "seed": URL_SAFE_NO_PAD.encode(SIGNING_SEED) },
            { "kid": "k3", "seed": URL_SAFE_NO_PAD.encode(SECOND_SEED) },
        ]);
        KeySet::parse(&json.to_string()).expect("the fixture keys are valid")
    })
}

/// `<b64(header)>.<b64(claims)>.<b64(signature)>`, signed with `k1` over
/// whatever bytes are given: a token whose signature is valid, so
/// verification goes on to read the header and claims.
pub fn sign_raw(header: &[u8], claims: &[u8]) -> String {
    let pair = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(SIGNING_SEED));
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = pair.sk.sign(input.as_bytes(), None);
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// The webhook endpoint secrets in force (two, as while one is rolled).
pub const STRIPE_SECRETS: [&str; 2] = ["whsec_fuzz_current_secret", "whsec_fuzz_previous_secret"];

/// The user of the refresh-token fixture.
pub const USER: &str = "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4c";
/// The refresh-token derivation key of the fixture.
pub const PEPPER: &[u8] = b"fuzz pepper, a test value only!!";

/// One user's sessions with a single session started at [`NOW`], and its
/// one valid refresh token.
pub fn sessions() -> (UserSessions, Issued) {
    let mut sessions = UserSessions::default();
    let issued = sessions.create(USER, "fuzz phone", NOW, [7; 16], [9; 32], PEPPER);
    (sessions, issued)
}
