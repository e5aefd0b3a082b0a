//! Access tokens: short-lived JWTs signed with Ed25519 (JOSE `alg` `EdDSA`).
//!
//! An access token carries everything the reconnect hot path needs (who, which
//! session, what they are entitled to), so checking one is pure CPU: no
//! database, no Durable Object, no KV. That makes [`KeySet::verify`] the
//! hottest function in the service, and shapes this module:
//!
//! - **Keys are parsed once.** [`KeySet::parse`] reads the `JWT_SIGNING_KEYS`
//!   secret, derives every key pair from its seed (the only costly step) and
//!   keeps ready-to-use verifying keys, so a verification is a lookup by `kid`
//!   and one signature check.
//! - **Rotation without signing anyone out.** The first key signs; every key
//!   verifies. To rotate, put the new key first and keep the old one behind it
//!   for at least one token lifetime, then drop it.
//! - **One algorithm, pinned by us.** The header's `alg` must be exactly
//!   `EdDSA`; we never let the token pick how it is checked, which closes the
//!   `alg: none` and HS256-with-the-public-key (algorithm confusion) attacks.
//! - **A fixed order of checks, cheapest and least trusting first:** size,
//!   shape, algorithm, key id, signature, and only then the claims. Claims JSON
//!   is never parsed before its signature has been checked, so a forger cannot
//!   make us do more than base64 validation, one small header parse and one
//!   signature check. Every rejection is a [`TokenError`] with a stable code.
//! - **No needless allocation.** Segments are base64-decoded into one stack
//!   buffer and parsed into borrowed views; the only heap allocations of a
//!   successful verification are the owned strings of the returned claims.
//! - **Bounded lifetimes.** Tokens live [`ACCESS_TTL_SECS`] minus a jitter of
//!   up to [`MAX_JITTER_SECS`], so clients that signed in together do not all
//!   refresh in the same second. Verification refuses any token whose own
//!   `exp - iat` exceeds the TTL, so a bug (or a misconfigured issuer sharing
//!   the key) cannot mint a token that is good for years. Nor does a token
//!   outlive its entitlement: one issued shortly before a paid plan lapses
//!   expires when it does (`ent.until`), so the app refreshes then and gets
//!   the plan it has, instead of connecting on the old one for 15 minutes.
//!
//! `ed25519-compact` signs and checks signatures, in plain deterministic
//! RFC 8032 mode, so the same inputs always give the same token. No JWT
//! library sits in between: the format is three base64url segments, and a
//! library's validator would parse the claims *before* checking the signature
//! (we want the opposite order, and the exact error order above).
//!
//! **The signature step can be done elsewhere.** Ed25519 in WebAssembly costs
//! several times what the runtime's native WebCrypto does, and the Worker
//! verifies a token and signs a ticket on every connect. So both halves are
//! also offered in two steps around the signature: [`KeySet::check`] runs the
//! checks up to the signature and [`Unverified::claims`] the ones after it,
//! given the verdict of whoever checked the signature; [`KeySet::access_token`]
//! and [`KeySet::ticket`] build the signing input and [`Unsigned::signed`]
//! attaches the signature. [`KeySet::verify`], [`KeySet::issue`] and
//! [`KeySet::issue_ticket`] do the whole job here, and are the reference the
//! two-step path must agree with.
//!
//! Like the rest of `domain`, nothing here reads a clock or a random source:
//! `now` (unix seconds) and the jitter are arguments.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_compact::{KeyPair, PublicKey, SecretKey, Seed, Signature};
use serde::{Deserialize, Serialize};

use crate::domain::entitlement::Entitlement;

/// `iss` of every token we issue, and the only one we accept.
pub const ISSUER: &str = "keenvpn-edge";
/// `aud` of every token we issue, and the only one we accept.
pub const AUDIENCE: &str = "keenvpn-app";
/// `aud` of connect tickets: the VPN servers.
pub const TICKET_AUDIENCE: &str = "keenvpn-vpn-server";
/// `typ` of connect tickets.
pub const TICKET_TYP: &str = "connect";
/// A ticket only has to survive the handshake that follows the connect call.
pub const TICKET_TTL_SECS: i64 = 120;

/// What a connect ticket grants: this device (with this key and these tunnel
/// addresses) may open a tunnel to this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub device_public_key: &'a str,
    pub ipv4_address: &'a str,
    pub ipv6_address: &'a str,
    pub server_id: &'a str,
    pub region_id: &'a str,
}

#[derive(Serialize)]
struct TicketClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    typ: &'a str,
    sub: &'a str,
    did: &'a str,
    dpk: &'a str,
    v4: &'a str,
    v6: &'a str,
    srv: &'a str,
    reg: &'a str,
    iat: i64,
    exp: i64,
}
/// Longest lifetime of an access token (15 minutes). Short, because an access
/// token cannot be revoked: revocation takes effect at the next refresh.
pub const ACCESS_TTL_SECS: i64 = 900;
/// Lifetimes are spread over `[ACCESS_TTL_SECS - MAX_JITTER_SECS, ACCESS_TTL_SECS]`.
pub const MAX_JITTER_SECS: i64 = 60;
/// Clock skew tolerated between the edge that issued and the one that verifies,
/// on both `exp` and `iat`.
pub const LEEWAY_SECS: i64 = 30;
/// Longer tokens are rejected before any parsing. A real one is well under 1 KiB.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The JOSE name of Ed25519 signatures (RFC 8037).
const ALG: &str = "EdDSA";
/// Header `typ` of what we issue; not checked on input (the claim `typ` is).
const HEADER_TYP: &str = "JWT";
/// Claim `typ` of an access token, so a token of another kind signed with the
/// same keys can never pass for one.
const ACCESS_TYP: &str = "access";
const MAX_KID_LEN: usize = 64;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = Signature::BYTES;
/// Length of a 64-byte signature in unpadded base64url.
const SIGNATURE_B64_LEN: usize = 86;
/// The PKCS #8 (RFC 8410) encoding of an Ed25519 private key is this prefix
/// followed by the 32-byte seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// Room to decode any one segment of a token of at most `MAX_TOKEN_LEN` bytes.
const SEGMENT_BUF_LEN: usize = MAX_TOKEN_LEN / 4 * 3;

/// The keys that sign and verify access tokens.
///
/// `Debug` shows key ids only: this value is held for the life of a Worker
/// isolate and must never end up in a log with its secrets.
#[derive(Clone)]
pub struct KeySet {
    /// Every key, the signing one first. There are only ever a few (the current
    /// key and one or two being retired), so a linear scan by `kid` beats a map.
    verifiers: Vec<Verifier>,
    /// The base64url header of every token we sign: it depends only on the
    /// signing `kid`, so it is encoded once.
    header_b64: String,
}

#[derive(Clone)]
struct Verifier {
    kid: String,
    seed: Seed,
    /// The key pair, derived from `seed` on first use. Deriving is a scalar
    /// multiplication: microseconds in optimised code, but milliseconds in the
    /// baseline code a fresh Worker isolate runs first. The Worker never needs
    /// it on its hot path (WebCrypto derives the public half natively, see
    /// `edge::webcrypto`), so a cold start does not pay for it.
    pair: OnceLock<KeyPair>,
}

impl Verifier {
    fn pair(&self) -> &KeyPair {
        // `parse` refused all-zero seeds, the only ones `from_seed` rejects.
        self.pair.get_or_init(|| KeyPair::from_seed(self.seed))
    }

    fn public_key(&self) -> &PublicKey {
        &self.pair().pk
    }
}

/// Why `JWT_SIGNING_KEYS` was refused. The messages name entries by position
/// or `kid` and never echo the secret's text (not even through `serde_json`'s
/// messages, which quote the offending input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The array is empty: there would be nothing to sign with.
    Empty,
    /// Not a JSON array of `{"kid": "...", "seed": "..."}` objects.
    InvalidJson { line: usize, column: usize },
    /// Entry `index` (from 0) has a `kid` that is not 1..=64 chars of `[A-Za-z0-9_-]`.
    BadKid { index: usize },
    /// Two entries share this `kid`, so a token's key would be ambiguous.
    DuplicateKid { kid: String },
    /// The seed of this `kid` is not unpadded base64url of exactly 32 bytes.
    BadSeed { kid: String },
}

impl fmt::Display for KeyError {
    // No "JWT_SIGNING_KEYS" prefix: the caller knows which secret it read and
    // adds that context itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => f.write_str("the key set is empty"),
            KeyError::InvalidJson { line, column } => write!(
                f,
                "not a JSON array of {{\"kid\", \"seed\"}} objects (line {line}, column {column})"
            ),
            KeyError::BadKid { index } => write!(
                f,
                "entry {index}: kid must be 1 to {MAX_KID_LEN} characters of A-Z, a-z, 0-9, '_' or '-'"
            ),
            KeyError::DuplicateKid { kid } => write!(f, "kid {kid:?} appears more than once"),
            KeyError::BadSeed { kid } => write!(
                f,
                "the seed of kid {kid:?} is not 32 bytes of unpadded base64url"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// Why an access token was refused, in the order [`KeySet::verify`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenError {
    TooLarge,
    Malformed,
    AlgorithmNotAllowed,
    UnknownKey,
    BadSignature,
    WrongType,
    WrongIssuer,
    WrongAudience,
    LifetimeTooLong,
    NotYetValid,
    Expired,
}

impl TokenError {
    /// A stable machine-readable code: clients and dashboards key on these, so
    /// they never change.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TooLarge => "token_too_large",
            TokenError::Malformed => "token_malformed",
            TokenError::AlgorithmNotAllowed => "token_algorithm_not_allowed",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::WrongType => "token_wrong_type",
            TokenError::WrongIssuer => "token_wrong_issuer",
            TokenError::WrongAudience => "token_wrong_audience",
            TokenError::LifetimeTooLong => "token_lifetime_too_long",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::Expired => "token_expired",
        }
    }

    /// A short sentence for humans. It says what is wrong, never how we
    /// checked it, so it gives a forger nothing to work with.
    pub fn detail(&self) -> &'static str {
        match self {
            TokenError::TooLarge => "The access token is too large.",
            TokenError::Malformed => "The access token is not a well-formed JWT.",
            TokenError::AlgorithmNotAllowed => {
                "The access token is signed with an algorithm that is not accepted."
            }
            TokenError::UnknownKey => "The access token is signed with an unknown key.",
            TokenError::BadSignature => "The access token's signature is invalid.",
            TokenError::WrongType => "The token is not an access token.",
            TokenError::WrongIssuer => "The access token was not issued by this service.",
            TokenError::WrongAudience => "The access token is not meant for this app.",
            TokenError::LifetimeTooLong => "The access token's lifetime is longer than allowed.",
            TokenError::NotYetValid => "The access token is not valid yet.",
            TokenError::Expired => "The access token has expired.",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.detail())
    }
}

impl std::error::Error for TokenError {}

/// What a verified access token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessClaims {
    /// The user id.
    pub sub: String,
    /// The session (refresh-token family) the token was issued for.
    pub sid: String,
    pub ent: Entitlement,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds.
    pub exp: i64,
}

/// An access token that passed every check before the signature (size,
/// shape, `alg`, `kid`, and a signature of the right length), made by
/// [`KeySet::check`]. Its claims are out of reach until [`Unverified::claims`]
/// is given the signature's verdict.
#[derive(Debug, Clone)]
pub struct Unverified<'t> {
    /// Position of the token's key in the set (see [`KeySet::verifying_keys`]).
    key: usize,
    /// `header.claims`, exactly as sent: what the signature covers.
    signed: &'t [u8],
    claims_b64: &'t str,
    signature: [u8; SIGNATURE_LEN],
}

impl<'t> Unverified<'t> {
    /// Position of the key that must have signed, in [`KeySet::verifying_keys`].
    pub fn key_index(&self) -> usize {
        self.key
    }

    /// The bytes the signature covers.
    pub fn signed_input(&self) -> &'t [u8] {
        self.signed
    }

    /// The signature, decoded.
    pub fn signature(&self) -> &[u8; SIGNATURE_LEN] {
        &self.signature
    }

    /// The remaining checks, once the signature has been checked (by
    /// [`KeySet::verify_signature`] or an equivalent Ed25519 implementation
    /// with the key at [`Unverified::key_index`]): `signature_valid` false is
    /// `BadSignature`, and only a valid signature lets the claims be parsed.
    pub fn claims(self, signature_valid: bool, now: i64) -> Result<AccessClaims, TokenError> {
        if !signature_valid {
            return Err(TokenError::BadSignature);
        }

        // 6. Only now, with the content authenticated, parse the claims.
        let mut buf = [0_u8; SEGMENT_BUF_LEN];
        let claims: Claims<'_> =
            decode_json(self.claims_b64, &mut buf).ok_or(TokenError::Malformed)?;

        // 7. What kind of token, from whom, for whom.
        if claims.typ != ACCESS_TYP {
            return Err(TokenError::WrongType);
        }
        if claims.iss != ISSUER {
            return Err(TokenError::WrongIssuer);
        }
        if claims.aud != AUDIENCE {
            return Err(TokenError::WrongAudience);
        }

        // 8-10. Time. Saturating arithmetic: these integers come from the token
        // and `now` from the caller, and neither may overflow into a panic (or,
        // in release, wrap into a pass).
        let (iat, exp) = (claims.iat, claims.exp);
        if exp <= iat || exp.saturating_sub(iat) > ACCESS_TTL_SECS {
            return Err(TokenError::LifetimeTooLong);
        }
        if iat > now.saturating_add(LEEWAY_SECS) {
            return Err(TokenError::NotYetValid);
        }
        if now >= exp.saturating_add(LEEWAY_SECS) {
            return Err(TokenError::Expired);
        }

        Ok(AccessClaims {
            sub: claims.sub.into_owned(),
            sid: claims.sid.into_owned(),
            ent: claims.ent.into_owned(),
            iat,
            exp,
        })
    }
}

/// A token (access token or ticket) still to be signed with the set's
/// signing key: made by [`KeySet::access_token`] or [`KeySet::ticket`],
/// finished by [`KeySet::sign`] or, with a signature made elsewhere, by
/// [`Unsigned::signed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsigned {
    /// `header.claims`, with room reserved for the signature.
    token: String,
    expires_in: i64,
}

impl Unsigned {
    /// The bytes to sign.
    pub fn signing_input(&self) -> &[u8] {
        self.token.as_bytes()
    }

    /// The finished token and its lifetime in seconds, given the Ed25519
    /// signature of [`Unsigned::signing_input`] by the set's signing key.
    pub fn signed(mut self, signature: &[u8; SIGNATURE_LEN]) -> (String, i64) {
        self.token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut self.token);
        (self.token, self.expires_in)
    }
}

/// The header as written: field order gives `{"alg","kid","typ"}`.
#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
}

/// The header as read: only what verification looks at. Both fields default
/// to `""`, which is never an allowed `alg` nor a known `kid`, so a missing one
/// fails at its own step rather than as `Malformed`. `Cow` borrows from the
/// decode buffer unless the JSON string has escapes.
#[derive(Deserialize)]
struct HeaderIn<'a> {
    #[serde(borrow, default)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Cow<'a, str>,
}

/// The claims, one shape for writing and reading so the two cannot drift apart.
/// Duplicate keys are refused by serde, so two parsers can never disagree on
/// which `exp` counts.
#[derive(Serialize, Deserialize)]
struct Claims<'a> {
    #[serde(borrow)]
    iss: Cow<'a, str>,
    #[serde(borrow)]
    aud: Cow<'a, str>,
    #[serde(borrow)]
    typ: Cow<'a, str>,
    #[serde(borrow)]
    sub: Cow<'a, str>,
    #[serde(borrow)]
    sid: Cow<'a, str>,
    iat: i64,
    exp: i64,
    ent: Cow<'a, Entitlement>,
}

/// One entry of `JWT_SIGNING_KEYS`.
#[derive(Deserialize)]
struct KeyEntry<'a> {
    #[serde(borrow)]
    kid: Cow<'a, str>,
    #[serde(borrow)]
    seed: Cow<'a, str>,
}

impl KeySet {
    /// From the secret `JWT_SIGNING_KEYS`: a JSON array
    /// `[{"kid": "k2", "seed": "<base64url, no padding, of 32 bytes>"}, ...]`.
    /// The first entry signs; every entry verifies (so keys rotate without
    /// signing anyone out).
    pub fn parse(secret: &str) -> Result<KeySet, KeyError> {
        let entries: Vec<KeyEntry<'_>> =
            serde_json::from_str(secret).map_err(|e| KeyError::InvalidJson {
                // Position only: serde_json's message may quote the secret.
                line: e.line(),
                column: e.column(),
            })?;
        if entries.is_empty() {
            return Err(KeyError::Empty);
        }

        let mut verifiers: Vec<Verifier> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            if !is_valid_kid(&entry.kid) {
                return Err(KeyError::BadKid { index });
            }
            if verifiers.iter().any(|v| v.kid == entry.kid) {
                return Err(KeyError::DuplicateKid {
                    kid: entry.kid.into_owned(),
                });
            }
            let Some(seed) = seed_from_b64(&entry.seed) else {
                return Err(KeyError::BadSeed {
                    kid: entry.kid.into_owned(),
                });
            };
            verifiers.push(Verifier {
                kid: entry.kid.into_owned(),
                seed,
                pair: OnceLock::new(),
            });
        }

        let header = HeaderOut {
            alg: ALG,
            kid: &verifiers[0].kid,
            typ: HEADER_TYP,
        };
        let header_json =
            serde_json::to_vec(&header).expect("a struct of three strings always serializes");
        let header_b64 = URL_SAFE_NO_PAD.encode(header_json);

        Ok(KeySet {
            verifiers,
            header_b64,
        })
    }

    /// The signing key: the secret half of the first key.
    fn signer(&self) -> &SecretKey {
        &self.verifiers[0].pair().sk
    }

    /// The `kid` that new tokens are signed with.
    pub fn signing_kid(&self) -> &str {
        &self.verifiers[0].kid
    }

    /// The public keys as a JWKS document (RFC 7517, OKP keys per RFC 8037),
    /// for anyone who wants to check our tokens themselves.
    pub fn jwks(&self) -> crate::api::Jwks {
        let public: Vec<[u8; 32]> = self.verifying_keys().copied().collect();
        self.jwks_from(&public)
    }

    /// [`KeySet::jwks`] with the public halves given, in the set's order, as
    /// a platform's Ed25519 implementation derived them from
    /// [`KeySet::pkcs8_keys`] (the Worker's, which has no derivation of its own).
    pub fn jwks_from(&self, public: &[[u8; 32]]) -> crate::api::Jwks {
        let keys = self
            .verifiers
            .iter()
            .zip(public)
            .map(|(v, x)| crate::api::Jwk {
                kty: "OKP",
                crv: "Ed25519",
                x: URL_SAFE_NO_PAD.encode(x),
                kid: v.kid.clone(),
                alg: ALG,
                use_: "sig",
            })
            .collect();
        crate::api::Jwks { keys }
    }

    /// The public half of every key, in the set's order (the signing key
    /// first); [`Unverified::key_index`] indexes this list.
    pub fn verifying_keys(&self) -> impl ExactSizeIterator<Item = &[u8; 32]> {
        self.verifiers.iter().map(|v| &**v.public_key())
    }

    /// Every key as PKCS #8 (RFC 8410), in the set's order (the signing key
    /// first): a platform's Ed25519 implementation derives the public halves
    /// from these (WebCrypto `importKey("pkcs8")`, then `exportKey("jwk")`).
    /// Secret material, as [`KeySet::signing_key_pkcs8`].
    pub fn pkcs8_keys(&self) -> impl ExactSizeIterator<Item = [u8; 48]> {
        self.verifiers.iter().map(|v| pkcs8(&v.seed))
    }

    /// The signing key as PKCS #8 (RFC 8410), to hand it to a platform's
    /// Ed25519 implementation (WebCrypto `importKey("pkcs8", ...)`). Secret
    /// material: never log it, never send it anywhere else.
    pub fn signing_key_pkcs8(&self) -> [u8; 48] {
        pkcs8(&self.verifiers[0].seed)
    }

    /// Signs an access token. `exp = now + ACCESS_TTL_SECS - (jitter % (MAX_JITTER_SECS + 1))`,
    /// or `ent.until` when that comes first (at least `now + 1`).
    /// Returns `(token, expires_in_secs)`.
    pub fn issue(
        &self,
        sub: &str,
        sid: &str,
        ent: &Entitlement,
        now: i64,
        jitter: u32,
    ) -> (String, i64) {
        self.sign(self.access_token(sub, sid, ent, now, jitter))
    }

    /// An access token as [`KeySet::issue`] makes it, still to be signed.
    pub fn access_token(
        &self,
        sub: &str,
        sid: &str,
        ent: &Entitlement,
        now: i64,
        jitter: u32,
    ) -> Unsigned {
        let lifetime = ACCESS_TTL_SECS - i64::from(jitter) % (MAX_JITTER_SECS + 1);
        // Saturating: `now` is an argument, and an absurd one must not panic.
        let exp = now.saturating_add(lifetime);
        // Not past the entitlement it carries (and always after `iat`).
        let exp = ent
            .until
            .map_or(exp, |until| exp.min(until.max(now.saturating_add(1))));
        let claims = Claims {
            iss: Cow::Borrowed(ISSUER),
            aud: Cow::Borrowed(AUDIENCE),
            typ: Cow::Borrowed(ACCESS_TYP),
            sub: Cow::Borrowed(sub),
            sid: Cow::Borrowed(sid),
            iat: now,
            exp,
            ent: Cow::Borrowed(ent),
        };
        let claims_json =
            serde_json::to_vec(&claims).expect("strings, integers and enums always serialize");
        self.unsigned(&claims_json, exp - now)
    }

    /// Signs a connect ticket: a short-lived JWT (`typ` = `connect`, `aud` =
    /// [`TICKET_AUDIENCE`]) that tells one VPN server to accept one device's
    /// tunnel. The server verifies it offline against the JWKS, with the same
    /// algorithm and key rules as access tokens. Returns `(ticket, expires_in)`.
    pub fn issue_ticket(&self, ticket: &Ticket<'_>, now: i64) -> (String, i64) {
        self.sign(self.ticket(ticket, now))
    }

    /// A connect ticket as [`KeySet::issue_ticket`] makes it, still to be signed.
    pub fn ticket(&self, ticket: &Ticket<'_>, now: i64) -> Unsigned {
        let exp = now.saturating_add(TICKET_TTL_SECS);
        let claims = TicketClaims {
            iss: ISSUER,
            aud: TICKET_AUDIENCE,
            typ: TICKET_TYP,
            sub: ticket.user_id,
            did: ticket.device_id,
            dpk: ticket.device_public_key,
            v4: ticket.ipv4_address,
            v6: ticket.ipv6_address,
            srv: ticket.server_id,
            reg: ticket.region_id,
            iat: now,
            exp,
        };
        let json = serde_json::to_vec(&claims).expect("strings and integers always serialize");
        self.unsigned(&json, TICKET_TTL_SECS)
    }

    /// `<header>.<claims>` for already-serialised claims.
    fn unsigned(&self, claims_json: &[u8], expires_in: i64) -> Unsigned {
        let mut token = String::with_capacity(
            self.header_b64.len() + 1 + claims_json.len().div_ceil(3) * 4 + 1 + SIGNATURE_B64_LEN,
        );
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims_json, &mut token);
        Unsigned { token, expires_in }
    }

    /// Signs with the signing key. `None`: no noise, i.e. deterministic
    /// RFC 8032 signing (see the module doc).
    pub fn sign(&self, unsigned: Unsigned) -> (String, i64) {
        let signature = self.signer().sign(unsigned.signing_input(), None);
        unsigned.signed(&signature)
    }

    /// Checks an access token and returns its claims, or the first failed
    /// check in this order: size, shape, `alg`, `kid`, signature, claims
    /// shape, `typ`, `iss`, `aud`, lifetime, `iat`, `exp`.
    pub fn verify(&self, token: &str, now: i64) -> Result<AccessClaims, TokenError> {
        let unverified = self.check(token)?;
        let valid = self.verify_signature(&unverified);
        unverified.claims(valid, now)
    }

    /// The checks of [`KeySet::verify`] that come before the signature's:
    /// size, shape, `alg`, `kid`, and the signature's encoding.
    pub fn check<'t>(&self, token: &'t str) -> Result<Unverified<'t>, TokenError> {
        // 1. Size, before touching the content: bounds all the work below.
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }

        // 2. Shape: exactly three non-empty, canonical base64url segments and a
        // JSON header. Claims and signature are only validated here (a scan, no
        // decoding), so that a broken one is `Malformed` whatever else is wrong.
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if !is_b64url(header_b64) || !is_b64url(claims_b64) || !is_b64url(signature_b64) {
            return Err(TokenError::Malformed);
        }
        let mut buf = [0_u8; SEGMENT_BUF_LEN];
        let header: HeaderIn<'_> =
            decode_json(header_b64, &mut buf).ok_or(TokenError::Malformed)?;

        // 3. The algorithm is ours to choose, not the token's.
        if header.alg != ALG {
            return Err(TokenError::AlgorithmNotAllowed);
        }

        // 4. The key, by id. No id, no key: we never try every key in turn.
        let key = self
            .verifiers
            .iter()
            .position(|v| v.kid == header.kid)
            .ok_or(TokenError::UnknownKey)?;

        // 5. The signature (its check is the caller's next step), over the
        // ASCII of `header.claims` exactly as sent.
        let signature = decode_signature(signature_b64).ok_or(TokenError::BadSignature)?;
        Ok(Unverified {
            key,
            signed: &token.as_bytes()[..header_b64.len() + 1 + claims_b64.len()],
            claims_b64,
            signature,
        })
    }

    /// Whether the signature of a checked token is valid, with `ed25519-compact`.
    pub fn verify_signature(&self, unverified: &Unverified<'_>) -> bool {
        self.verifiers.get(unverified.key).is_some_and(|v| {
            v.public_key()
                .verify(unverified.signed, &Signature::new(unverified.signature))
                .is_ok()
        })
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key ids only: `SecretKey`'s own `Debug` would print the secret bytes.
        f.debug_struct("KeySet")
            .field("signing_kid", &self.signing_kid())
            .field(
                "kids",
                &self
                    .verifiers
                    .iter()
                    .map(|v| v.kid.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A `kid` travels in every token header and in the JWKS, so it is kept to a
/// short, URL- and log-safe alphabet.
fn is_valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_LEN).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn seed_from_b64(b64: &str) -> Option<Seed> {
    let mut bytes = [0_u8; Seed::BYTES];
    // A longer input does not fit and errors; a shorter one decodes to fewer bytes.
    match URL_SAFE_NO_PAD.decode_slice(b64, &mut bytes) {
        // `from_seed` panics on an all-zero seed, which a misconfigured secret
        // could well hold; that is a bad seed, not a crash.
        Ok(n) if n == Seed::BYTES && bytes != [0; Seed::BYTES] => Some(Seed::new(bytes)),
        _ => None,
    }
}

/// A seed as a PKCS #8 `PrivateKeyInfo` (RFC 8410).
fn pkcs8(seed: &Seed) -> [u8; 48] {
    let mut der = [0_u8; 48];
    der[..16].copy_from_slice(&PKCS8_ED25519_PREFIX);
    der[16..].copy_from_slice(seed.as_ref());
    der
}

fn decode_signature(b64: &str) -> Option<[u8; SIGNATURE_LEN]> {
    // Anything but 86 characters cannot be 64 bytes: skip the decode.
    if b64.len() != SIGNATURE_B64_LEN {
        return None;
    }
    let mut bytes = [0_u8; SIGNATURE_LEN];
    match URL_SAFE_NO_PAD.decode_slice(b64, &mut bytes) {
        Ok(SIGNATURE_LEN) => Some(bytes),
        _ => None,
    }
}

/// Decodes a base64url segment into `buf` and parses the JSON there, borrowing
/// strings from `buf` where it can.
fn decode_json<'b, T: Deserialize<'b>>(segment: &str, buf: &'b mut [u8]) -> Option<T> {
    let n = URL_SAFE_NO_PAD.decode_slice(segment, &mut *buf).ok()?;
    let buf: &'b [u8] = buf;
    let json = &buf[..n];
    // serde's derived structs also accept a JSON array, filling fields by
    // position. A JOSE header and a claims set are objects (RFC 7515, 7519),
    // and we want no second way to spell either.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Whether `segment` is non-empty, canonical, unpadded base64url: what
/// `URL_SAFE_NO_PAD` would decode, checked without decoding. Canonical means
/// the unused low bits of the last character are zero; accepting others would
/// give one signature several spellings.
fn is_b64url(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let Some(&last) = bytes.last() else {
        return false;
    };
    let unused_bits = match bytes.len() % 4 {
        // One character in the final group cannot encode a whole byte.
        1 => return false,
        2 => 0b1111,
        3 => 0b11,
        _ => 0,
    };
    bytes.iter().all(|&b| b64url_value(b).is_some())
        && b64url_value(last).is_some_and(|v| v & unused_bits == 0)
}

fn b64url_value(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalogue::Tier;
    use hmac::{Hmac, KeyInit, Mac};
    use serde_json::{Value, json};
    use sha2::Sha256;

    const NOW: i64 = 1_700_000_000;

    fn seed_b64(byte: u8) -> String {
        URL_SAFE_NO_PAD.encode([byte; 32])
    }

    /// A key set from `(kid, seed byte)` pairs, the first one signing.
    fn keys(spec: &[(&str, u8)]) -> KeySet {
        let entries: Vec<Value> = spec
            .iter()
            .map(|(kid, byte)| json!({ "kid": kid, "seed": seed_b64(*byte) }))
            .collect();
        KeySet::parse(&Value::Array(entries).to_string()).expect("valid test keys")
    }

    fn ent() -> Entitlement {
        Entitlement {
            plan: "plus".into(),
            max_devices: 5,
            region_tiers: vec![Tier::Free, Tier::Premium],
            until: Some(NOW + 30 * 24 * 3600),
        }
    }

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn header_json(kid: &str) -> String {
        json!({ "alg": "EdDSA", "kid": kid, "typ": "JWT" }).to_string()
    }

    /// Valid claims, issued at `NOW`, to be spoiled one field at a time.
    fn claims_at(iat: i64) -> Value {
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "typ": "access",
            "sub": "user-1", "sid": "session-1",
            "iat": iat, "exp": iat + ACCESS_TTL_SECS,
            "ent": ent(),
        })
    }

    /// Signs arbitrary header and claims text with the set's real signing key,
    /// so the signature is valid and only what we put in can be wrong.
    fn sign_raw(keys: &KeySet, header: &str, claims: &str) -> String {
        let signing_input = format!("{}.{}", b64(header), b64(claims));
        let signature = keys.signer().sign(signing_input.as_bytes(), None);
        format!("{signing_input}.{}", b64(signature.as_ref()))
    }

    fn sign_claims(keys: &KeySet, claims: &Value) -> String {
        sign_raw(keys, &header_json(keys.signing_kid()), &claims.to_string())
    }

    fn segments(token: &str) -> Vec<&str> {
        token.split('.').collect()
    }

    /// A small deterministic generator (xorshift64*), so the fuzz-style test
    /// needs no `rand` and fails the same way every time.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick(&mut self, chars: &[char]) -> char {
            chars[self.below(chars.len())]
        }
    }

    // ---- Issuing and verifying -------------------------------------------

    #[test]
    fn an_issued_token_verifies_back_to_the_same_claims() {
        let keys = keys(&[("k1", 1)]);
        let (token, expires_in) = keys.issue("user-1", "session-1", &ent(), NOW, 0);
        let claims = keys.verify(&token, NOW).expect("fresh token verifies");
        assert_eq!(
            claims,
            AccessClaims {
                sub: "user-1".into(),
                sid: "session-1".into(),
                ent: ent(),
                iat: NOW,
                exp: NOW + ACCESS_TTL_SECS,
            }
        );
        assert_eq!(expires_in, ACCESS_TTL_SECS);
    }

    #[test]
    fn an_issued_token_has_the_documented_header_and_claims() {
        let keys = keys(&[("k1", 1)]);
        let (token, _) = keys.issue("user-1", "session-1", &ent(), NOW, 7);
        let parts = segments(&token);
        assert_eq!(parts.len(), 3);
        let header = URL_SAFE_NO_PAD.decode(parts[0]).unwrap();
        assert_eq!(header, br#"{"alg":"EdDSA","kid":"k1","typ":"JWT"}"#);
        let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap())
            .expect("claims are JSON");
        assert_eq!(
            claims,
            json!({
                "iss": "keenvpn-edge", "aud": "keenvpn-app", "typ": "access",
                "sub": "user-1", "sid": "session-1",
                "iat": NOW, "exp": NOW + ACCESS_TTL_SECS - 7,
                "ent": ent(),
            })
        );
        assert!(
            token.len() < 1024,
            "a real token is far below MAX_TOKEN_LEN"
        );
    }

    #[test]
    fn a_token_expires_when_its_entitlement_lapses_if_that_comes_first() {
        let keys = keys(&[("k1", 1)]);
        let mut lapsing = ent();
        for (until, lifetime) in [
            (NOW + 60, 60),
            (NOW + ACCESS_TTL_SECS, ACCESS_TTL_SECS),
            (NOW + 30 * 86_400, ACCESS_TTL_SECS),
            // An entitlement computed as lapsed could never be issued, but
            // the token would still be well formed, and over at once.
            (NOW - 5, 1),
        ] {
            lapsing.until = Some(until);
            let (token, expires_in) = keys.issue("u", "s", &lapsing, NOW, 0);
            assert_eq!(expires_in, lifetime, "until {until}");
            let claims = keys.verify(&token, NOW).expect("verifies");
            assert_eq!(claims.exp, NOW + lifetime);
        }
        // A free entitlement has no end: the full lifetime.
        lapsing.until = None;
        assert_eq!(keys.issue("u", "s", &lapsing, NOW, 0).1, ACCESS_TTL_SECS);
    }

    #[test]
    fn issuing_is_deterministic() {
        let keys = keys(&[("k1", 1)]);
        let a = keys.issue("user-1", "session-1", &ent(), NOW, 3);
        let b = keys.issue("user-1", "session-1", &ent(), NOW, 3);
        assert_eq!(a, b);
    }

    #[test]
    fn our_algorithm_name_is_the_jose_name_of_ed25519() {
        // RFC 8037 section 3.1: Ed25519 signatures are JWS algorithm "EdDSA".
        assert_eq!(ALG, "EdDSA");
    }

    #[test]
    fn jitter_keeps_lifetimes_within_the_window_and_spreads_expiry() {
        let keys = keys(&[("k1", 1)]);
        let mut expiries = std::collections::BTreeSet::new();
        for jitter in (0..200).chain([u32::MAX - 1, u32::MAX]) {
            let (token, expires_in) = keys.issue("u", "s", &ent(), NOW, jitter);
            let claims = keys.verify(&token, NOW).expect("verifies");
            let lifetime = claims.exp - claims.iat;
            assert!(
                (ACCESS_TTL_SECS - MAX_JITTER_SECS..=ACCESS_TTL_SECS).contains(&lifetime),
                "jitter {jitter} gave lifetime {lifetime}"
            );
            assert_eq!(expires_in, lifetime);
            expiries.insert(claims.exp);
        }
        // Every one of the 61 possible lifetimes is reached.
        assert_eq!(expiries.len(), (MAX_JITTER_SECS + 1) as usize);
        let (_, a) = keys.issue("u", "s", &ent(), NOW, 1);
        let (_, b) = keys.issue("u", "s", &ent(), NOW, 2);
        assert_ne!(a, b);
    }

    // ---- Rotation and JWKS -----------------------------------------------

    #[test]
    fn a_token_signed_by_the_old_key_verifies_after_rotation() {
        let before = keys(&[("k1", 1)]);
        let (token, _) = before.issue("user-1", "session-1", &ent(), NOW, 0);
        let after = keys(&[("k2", 2), ("k1", 1)]);
        assert_eq!(after.verify(&token, NOW).unwrap().sub, "user-1");
    }

    #[test]
    fn a_token_signed_by_a_retired_key_is_an_unknown_key() {
        let before = keys(&[("k1", 1)]);
        let (token, _) = before.issue("user-1", "session-1", &ent(), NOW, 0);
        let retired = keys(&[("k2", 2)]);
        assert_eq!(retired.verify(&token, NOW), Err(TokenError::UnknownKey));
    }

    #[test]
    fn the_rotated_set_signs_with_its_first_key() {
        let after = keys(&[("k2", 2), ("k1", 1)]);
        assert_eq!(after.signing_kid(), "k2");
        let (token, _) = after.issue("user-1", "session-1", &ent(), NOW, 0);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segments(&token)[0]).unwrap()).unwrap();
        assert_eq!(header["kid"], "k2");
        // And the new key's tokens are unknown to a set that only has the old one.
        assert_eq!(
            keys(&[("k1", 1)]).verify(&token, NOW),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn a_kid_naming_a_key_that_did_not_sign_is_a_bad_signature() {
        // Signed by k1's secret but claiming to be k2: found, then refuted.
        let set = keys(&[("k1", 1), ("k2", 2)]);
        let token = sign_raw(&set, &header_json("k2"), &claims_at(NOW).to_string());
        assert_eq!(set.verify(&token, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn jwks_lists_every_key_with_its_public_half() {
        let set = keys(&[("k2", 2), ("k1", 1)]);
        let jwks = serde_json::to_value(set.jwks()).expect("the key set serialises");
        let listed = jwks["keys"].as_array().expect("keys is an array");
        assert_eq!(listed.len(), 2);
        for (jwk, (kid, byte)) in listed.iter().zip([("k2", 2_u8), ("k1", 1)]) {
            let expected = KeyPair::from_seed(Seed::new([byte; 32])).pk;
            let x = URL_SAFE_NO_PAD
                .decode(jwk["x"].as_str().expect("x is a string"))
                .expect("x is base64url");
            assert_eq!(x.len(), 32);
            assert_eq!(x.as_slice(), expected.as_ref());
            assert_eq!(jwk["kid"], kid);
            assert_eq!(jwk["kty"], "OKP");
            assert_eq!(jwk["crv"], "Ed25519");
            assert_eq!(jwk["alg"], "EdDSA");
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk.as_object().unwrap().len(), 6, "no private `d`");
        }
    }

    #[test]
    fn jwks_from_lists_the_given_public_halves_by_the_keys_ids() {
        // The Worker's JWKS: the halves come from the platform, not from here.
        let set = keys(&[("k2", 2), ("k1", 1)]);
        let given = [[7_u8; 32], [8_u8; 32]];
        let jwks = set.jwks_from(&given);
        assert_eq!(jwks.keys.len(), 2);
        for (jwk, (kid, x)) in jwks.keys.iter().zip([("k2", given[0]), ("k1", given[1])]) {
            assert_eq!(jwk.kid, kid);
            assert_eq!(URL_SAFE_NO_PAD.decode(&jwk.x).unwrap(), x);
        }
        // With the halves derived here, it is `jwks` exactly.
        let derived: Vec<[u8; 32]> = set.verifying_keys().copied().collect();
        assert_eq!(
            serde_json::to_value(set.jwks_from(&derived)).unwrap(),
            serde_json::to_value(set.jwks()).unwrap()
        );
    }

    // ---- Parsing the key set ---------------------------------------------

    fn parse_err(secret: &str) -> KeyError {
        KeySet::parse(secret).expect_err("should be refused")
    }

    #[test]
    fn parse_rejects_an_empty_set() {
        assert_eq!(parse_err("[]"), KeyError::Empty);
    }

    #[test]
    fn parse_rejects_invalid_json() {
        for secret in [
            "",
            "not json",
            "{}",
            "null",
            r#"[{"kid":"k1"}]"#,
            r#"[{"kid":1,"seed":"x"}]"#,
        ] {
            assert!(
                matches!(parse_err(secret), KeyError::InvalidJson { .. }),
                "{secret:?}"
            );
        }
    }

    #[test]
    fn parse_rejects_bad_kids() {
        let seed = seed_b64(1);
        for kid in [
            "",
            "k 1",
            "k.1",
            "k/1",
            "ké",
            "k\"1",
            &"k".repeat(MAX_KID_LEN + 1),
        ] {
            let secret = json!([{ "kid": kid, "seed": seed }]).to_string();
            assert_eq!(parse_err(&secret), KeyError::BadKid { index: 0 }, "{kid:?}");
        }
        let secret = json!([{ "kid": "ok", "seed": seed }, { "kid": "", "seed": seed }]);
        assert_eq!(
            parse_err(&secret.to_string()),
            KeyError::BadKid { index: 1 }
        );
    }

    #[test]
    fn parse_accepts_kids_of_the_full_alphabet_and_length() {
        let kid = "aZ09_-".repeat(10) + "abcd";
        assert_eq!(kid.len(), MAX_KID_LEN);
        let secret = json!([{ "kid": kid, "seed": seed_b64(1) }]).to_string();
        assert_eq!(KeySet::parse(&secret).unwrap().signing_kid(), kid);
    }

    #[test]
    fn parse_rejects_a_duplicate_kid() {
        let secret = json!([
            { "kid": "k1", "seed": seed_b64(1) },
            { "kid": "k1", "seed": seed_b64(2) },
        ]);
        assert_eq!(
            parse_err(&secret.to_string()),
            KeyError::DuplicateKid { kid: "k1".into() }
        );
    }

    #[test]
    fn parse_rejects_bad_seeds() {
        let padded = URL_SAFE_NO_PAD.encode([1_u8; 32]) + "=";
        let standard_alphabet =
            base64::engine::general_purpose::STANDARD_NO_PAD.encode([0xfb_u8; 32]);
        assert!(standard_alphabet.contains('+') || standard_alphabet.contains('/'));
        for seed in [
            String::new(),
            "not base64!".into(),
            padded,
            standard_alphabet,
            URL_SAFE_NO_PAD.encode([1_u8; 31]),
            URL_SAFE_NO_PAD.encode([1_u8; 33]),
            URL_SAFE_NO_PAD.encode([1_u8; 64]),
            // ed25519-compact refuses (by panicking, unless asked nicely) an all-zero seed.
            seed_b64(0),
        ] {
            let secret = json!([{ "kid": "k1", "seed": seed }]).to_string();
            assert_eq!(
                parse_err(&secret),
                KeyError::BadSeed { kid: "k1".into() },
                "{seed:?}"
            );
        }
    }

    #[test]
    fn debug_of_a_key_set_shows_kids_but_no_key_material() {
        let set = keys(&[("k2", 2), ("k1", 1)]);
        let debug = format!("{set:?}");
        assert!(debug.contains("k2") && debug.contains("k1"), "{debug}");
        for byte in [1_u8, 2] {
            let pair = KeyPair::from_seed(Seed::new([byte; 32]));
            assert!(!debug.contains(&seed_b64(byte)), "{debug}");
            assert!(!debug.contains(&format!("{:?}", [byte; 32])), "{debug}");
            assert!(!debug.contains(&format!("{:?}", pair.sk)), "{debug}");
        }
    }

    #[test]
    fn key_errors_never_echo_the_secret() {
        let secret = r#""c2VjcmV0LXNlZWQtdGhhdC1tdXN0LW5vdC1sZWFr""#;
        let err = parse_err(secret);
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        assert!(!format!("{err:?}").contains("c2VjcmV0"), "{err:?}");
    }

    // ---- The bad-token corpus --------------------------------------------

    fn verify_now(keys: &KeySet, token: &str) -> Result<AccessClaims, TokenError> {
        keys.verify(token, NOW)
    }

    #[test]
    fn an_unsigned_alg_none_token_is_malformed_because_its_signature_segment_is_empty() {
        let set = keys(&[("k1", 1)]);
        let header = json!({ "alg": "none", "kid": "k1", "typ": "JWT" }).to_string();
        let token = format!("{}.{}.", b64(header), b64(claims_at(NOW).to_string()));
        assert_eq!(verify_now(&set, &token), Err(TokenError::Malformed));
    }

    #[test]
    fn alg_none_with_a_junk_signature_is_not_allowed() {
        let set = keys(&[("k1", 1)]);
        let header = json!({ "alg": "none", "kid": "k1", "typ": "JWT" }).to_string();
        for junk in ["junk", &b64([7_u8; 64])] {
            let token = format!(
                "{}.{}.{junk}",
                b64(&header),
                b64(claims_at(NOW).to_string())
            );
            assert_eq!(
                verify_now(&set, &token),
                Err(TokenError::AlgorithmNotAllowed)
            );
        }
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_not_allowed() {
        // Algorithm confusion: a verifier that let the header choose would run
        // HMAC with the (public!) key bytes as the secret and accept this.
        let set = keys(&[("k1", 1)]);
        let public = *set.verifiers[0].public_key();
        let header = json!({ "alg": "HS256", "kid": "k1", "typ": "JWT" }).to_string();
        let signing_input = format!("{}.{}", b64(header), b64(claims_at(NOW).to_string()));
        let mut mac = Hmac::<Sha256>::new_from_slice(public.as_ref()).unwrap();
        mac.update(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", b64(mac.finalize().into_bytes()));
        assert_eq!(
            verify_now(&set, &token),
            Err(TokenError::AlgorithmNotAllowed)
        );
    }

    #[test]
    fn other_spellings_of_the_algorithm_are_not_allowed() {
        let set = keys(&[("k1", 1)]);
        for header in [
            json!({ "alg": "eddsa", "kid": "k1" }),
            json!({ "alg": "Ed25519", "kid": "k1" }),
            json!({ "alg": "EdDSA ", "kid": "k1" }),
            json!({ "kid": "k1" }),
        ] {
            let token = sign_raw(&set, &header.to_string(), &claims_at(NOW).to_string());
            assert_eq!(
                verify_now(&set, &token),
                Err(TokenError::AlgorithmNotAllowed),
                "{header}"
            );
        }
    }

    #[test]
    fn an_unknown_or_missing_kid_is_an_unknown_key() {
        let set = keys(&[("k1", 1)]);
        for header in [
            json!({ "alg": "EdDSA", "kid": "k9" }),
            json!({ "alg": "EdDSA", "kid": "" }),
            json!({ "alg": "EdDSA" }),
        ] {
            let token = sign_raw(&set, &header.to_string(), &claims_at(NOW).to_string());
            assert_eq!(
                verify_now(&set, &token),
                Err(TokenError::UnknownKey),
                "{header}"
            );
        }
    }

    #[test]
    fn an_escaped_header_means_the_same_as_a_plain_one() {
        // `\u0044` is `D`: JSON escapes do not change the value.
        let set = keys(&[("k1", 1)]);
        let header = r#"{"alg":"E\u0064DSA","kid":"\u006b1"}"#;
        let token = sign_raw(&set, header, &claims_at(NOW).to_string());
        assert!(verify_now(&set, &token).is_ok());
    }

    #[test]
    fn flipped_signature_bits_are_a_bad_signature() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        let parts = segments(&token);
        let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        for i in [0, 31, 32, 63] {
            signature[i] ^= 0x01;
            let forged = format!("{}.{}.{}", parts[0], parts[1], b64(&signature));
            assert_eq!(verify_now(&set, &forged), Err(TokenError::BadSignature));
            signature[i] ^= 0x01;
        }
    }

    #[test]
    fn a_signature_of_the_wrong_length_is_a_bad_signature() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        let parts = segments(&token);
        for len in [1, 32, 63, 65, 128] {
            let forged = format!("{}.{}.{}", parts[0], parts[1], b64(vec![9_u8; len]));
            assert_eq!(verify_now(&set, &forged), Err(TokenError::BadSignature));
        }
    }

    #[test]
    fn altered_claims_under_the_original_signature_are_a_bad_signature() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        let parts = segments(&token);
        let mut claims = claims_at(NOW);
        claims["sub"] = json!("admin");
        let forged = format!("{}.{}.{}", parts[0], b64(claims.to_string()), parts[2]);
        assert_eq!(verify_now(&set, &forged), Err(TokenError::BadSignature));
    }

    #[test]
    fn a_truncated_token_is_malformed() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        let two_segments = token.rsplit_once('.').unwrap().0;
        assert_eq!(verify_now(&set, two_segments), Err(TokenError::Malformed));
        let one_segment = two_segments.split_once('.').unwrap().0;
        assert_eq!(verify_now(&set, one_segment), Err(TokenError::Malformed));
        assert_eq!(
            verify_now(&set, &token[..token.len() - 1]),
            Err(TokenError::Malformed),
            "85 characters are not base64 at all"
        );
        assert_eq!(
            verify_now(&set, &token[..token.len() - 2]),
            Err(TokenError::BadSignature),
            "84 characters are base64, but of 63 bytes: not a signature"
        );
    }

    #[test]
    fn an_extra_fourth_segment_is_malformed() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        assert_eq!(
            verify_now(&set, &format!("{token}.AAAA")),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            verify_now(&set, &format!("{token}.")),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn empty_segments_and_non_canonical_base64_are_malformed() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        let p = segments(&token);
        for bad in [
            format!(".{}.{}", p[1], p[2]),
            format!("{}..{}", p[0], p[2]),
            format!("{}={}", p[0], &token[p[0].len()..]),
            format!("{}.{}=.{}", p[0], p[1], p[2]),
            format!("{}.{}.{}==", p[0], p[1], p[2]),
            // Standard-alphabet characters are not base64url.
            format!("{}.{}+.{}", p[0], p[1], p[2]),
            // "AB" decodes to one byte but leaves non-zero unused bits.
            format!("{}.{}.AB", p[0], p[1]),
        ] {
            assert_eq!(verify_now(&set, &bad), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn a_header_that_is_not_a_json_object_is_malformed() {
        let set = keys(&[("k1", 1)]);
        for header in [
            "not json",
            "[]",
            r#"["EdDSA","k1"]"#,
            "\"EdDSA\"",
            r#"{"alg":"EdDSA","alg":"EdDSA","kid":"k1"}"#,
            r#"{"alg":5,"kid":"k1"}"#,
        ] {
            let token = sign_raw(&set, header, &claims_at(NOW).to_string());
            assert_eq!(
                verify_now(&set, &token),
                Err(TokenError::Malformed),
                "{header}"
            );
        }
    }

    #[test]
    fn validly_signed_claims_of_the_wrong_shape_are_malformed() {
        let set = keys(&[("k1", 1)]);
        let mut cases: Vec<String> = vec!["not json".into(), "[]".into(), "{}".into()];
        for (field, value) in [
            ("iat", json!(NOW as f64 + 0.5)),
            ("exp", json!("soon")),
            ("ent", json!(null)),
            ("sub", json!(42)),
            ("aud", json!([AUDIENCE])),
        ] {
            let mut claims = claims_at(NOW);
            claims[field] = value;
            cases.push(claims.to_string());
        }
        let mut missing_ent = claims_at(NOW);
        missing_ent.as_object_mut().unwrap().remove("ent");
        cases.push(missing_ent.to_string());
        // A duplicated `exp`: no two readers may disagree on which one counts.
        let plain = claims_at(NOW).to_string();
        cases.push(plain.replacen('{', &format!("{{\"exp\":{},", NOW + 10), 1));
        // The right values by position, as an array: serde would take it, we do not.
        let positional = json!([
            ISSUER,
            AUDIENCE,
            "access",
            "user-1",
            "session-1",
            NOW,
            NOW + ACCESS_TTL_SECS,
            ent(),
        ]);
        cases.push(positional.to_string());
        for claims in cases {
            let token = sign_raw(&set, &header_json("k1"), &claims);
            assert_eq!(
                verify_now(&set, &token),
                Err(TokenError::Malformed),
                "{claims}"
            );
        }
    }

    #[test]
    fn a_wrong_issuer_is_refused() {
        let set = keys(&[("k1", 1)]);
        let mut claims = claims_at(NOW);
        claims["iss"] = json!("someone-else");
        assert_eq!(
            verify_now(&set, &sign_claims(&set, &claims)),
            Err(TokenError::WrongIssuer)
        );
    }

    #[test]
    fn a_wrong_audience_is_refused() {
        let set = keys(&[("k1", 1)]);
        let mut claims = claims_at(NOW);
        claims["aud"] = json!("keenvpn-admin");
        assert_eq!(
            verify_now(&set, &sign_claims(&set, &claims)),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn a_refresh_typed_token_is_the_wrong_type() {
        let set = keys(&[("k1", 1)]);
        let mut claims = claims_at(NOW);
        claims["typ"] = json!("refresh");
        assert_eq!(
            verify_now(&set, &sign_claims(&set, &claims)),
            Err(TokenError::WrongType)
        );
    }

    #[test]
    fn an_expired_token_is_refused_once_the_leeway_has_passed() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        let exp = NOW + ACCESS_TTL_SECS;
        assert!(set.verify(&token, exp).is_ok(), "within leeway");
        assert!(
            set.verify(&token, exp + LEEWAY_SECS - 1).is_ok(),
            "within leeway"
        );
        assert_eq!(
            set.verify(&token, exp + LEEWAY_SECS),
            Err(TokenError::Expired)
        );
        assert_eq!(set.verify(&token, i64::MAX), Err(TokenError::Expired));
    }

    #[test]
    fn a_token_issued_in_the_future_is_not_yet_valid_beyond_the_leeway() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        assert!(
            set.verify(&token, NOW - LEEWAY_SECS).is_ok(),
            "within leeway"
        );
        assert_eq!(
            set.verify(&token, NOW - LEEWAY_SECS - 1),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(set.verify(&token, i64::MIN), Err(TokenError::NotYetValid));
    }

    #[test]
    fn a_lifetime_of_years_is_too_long() {
        let set = keys(&[("k1", 1)]);
        let mut claims = claims_at(NOW);
        claims["exp"] = json!(NOW + 5 * 365 * 24 * 3600);
        assert_eq!(
            verify_now(&set, &sign_claims(&set, &claims)),
            Err(TokenError::LifetimeTooLong)
        );
    }

    #[test]
    fn lifetimes_must_be_positive_and_at_most_the_ttl() {
        let set = keys(&[("k1", 1)]);
        for (iat, exp, expected) in [
            (NOW, NOW + ACCESS_TTL_SECS, Ok(())),
            (NOW, NOW + 1, Ok(())),
            (
                NOW,
                NOW + ACCESS_TTL_SECS + 1,
                Err(TokenError::LifetimeTooLong),
            ),
            (NOW, NOW, Err(TokenError::LifetimeTooLong)),
            (NOW, NOW - 1, Err(TokenError::LifetimeTooLong)),
            // Extremes must not overflow into a panic or a pass.
            (i64::MIN, i64::MAX, Err(TokenError::LifetimeTooLong)),
            (i64::MAX, i64::MIN, Err(TokenError::LifetimeTooLong)),
        ] {
            let mut claims = claims_at(NOW);
            claims["iat"] = json!(iat);
            claims["exp"] = json!(exp);
            let got = verify_now(&set, &sign_claims(&set, &claims)).map(|_| ());
            assert_eq!(got, expected, "iat {iat}, exp {exp}");
        }
    }

    #[test]
    fn the_first_failed_check_is_the_one_reported() {
        let set = keys(&[("k1", 1)]);
        // Wrong type, issuer, audience and expired all at once: type wins.
        let mut claims = claims_at(NOW - 10_000);
        claims["typ"] = json!("refresh");
        claims["iss"] = json!("x");
        claims["aud"] = json!("y");
        assert_eq!(
            verify_now(&set, &sign_claims(&set, &claims)),
            Err(TokenError::WrongType)
        );
        // Issuer before audience.
        let mut claims = claims_at(NOW);
        claims["iss"] = json!("x");
        claims["aud"] = json!("y");
        assert_eq!(
            verify_now(&set, &sign_claims(&set, &claims)),
            Err(TokenError::WrongIssuer)
        );
        // Lifetime before the clock: a long-lived token from the future.
        let mut claims = claims_at(NOW + 10_000);
        claims["exp"] = json!(NOW + 10_000_000);
        assert_eq!(
            verify_now(&set, &sign_claims(&set, &claims)),
            Err(TokenError::LifetimeTooLong)
        );
        // A forged signature over unparseable claims is a bad signature: the
        // claims of an unauthenticated token are never read.
        let forged = format!(
            "{}.{}.{}",
            b64(header_json("k1")),
            b64("junk"),
            b64([0_u8; 64])
        );
        assert_eq!(verify_now(&set, &forged), Err(TokenError::BadSignature));
        // An unknown key with a junk signature is an unknown key.
        let forged = format!(
            "{}.{}.{}",
            b64(header_json("k9")),
            b64("junk"),
            b64([0_u8; 64])
        );
        assert_eq!(verify_now(&set, &forged), Err(TokenError::UnknownKey));
        // Broken claims base64 is malformed even when the algorithm is also wrong.
        let forged = format!("{}.!!.{}", b64(r#"{"alg":"none"}"#), b64([0_u8; 64]));
        assert_eq!(verify_now(&set, &forged), Err(TokenError::Malformed));
    }

    #[test]
    fn an_oversized_token_is_too_large_even_with_a_valid_signature() {
        let set = keys(&[("k1", 1)]);
        assert_eq!(
            verify_now(&set, &"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::TooLarge)
        );
        // At the limit it is parsed (and found to be garbage).
        assert_eq!(
            verify_now(&set, &"a".repeat(MAX_TOKEN_LEN)),
            Err(TokenError::Malformed)
        );
        let (big, _) = set.issue(&"u".repeat(MAX_TOKEN_LEN), "session-1", &ent(), NOW, 0);
        assert!(big.len() > MAX_TOKEN_LEN);
        assert_eq!(verify_now(&set, &big), Err(TokenError::TooLarge));
    }

    #[test]
    fn a_token_exactly_at_the_size_limit_still_verifies() {
        let set = keys(&[("k1", 1)]);
        let (base, _) = set.issue("", "session-1", &ent(), NOW, 0);
        // Each 3 bytes of `sub` add 4 base64 characters; fill to within 3.
        let sub = "u".repeat((MAX_TOKEN_LEN - base.len()) / 4 * 3);
        let (token, _) = set.issue(&sub, "session-1", &ent(), NOW, 0);
        assert!(token.len() <= MAX_TOKEN_LEN && token.len() > MAX_TOKEN_LEN - 4);
        assert_eq!(verify_now(&set, &token).unwrap().sub, sub);
    }

    #[test]
    fn garbage_empty_and_refresh_shaped_strings_are_malformed() {
        let set = keys(&[("k1", 1)]);
        for garbage in [
            "",
            ".",
            "..",
            "...",
            "not a token",
            "!!!.@@@.###",
            "Bearer abc.def.ghi",
            "eyJhbGciOiJFZERTQSJ9",
            "a.b.c\n",
            "é.é.é",
            // An opaque refresh token: five parts.
            "v1.7f1d3c52-8a8e-4c1b-9a57-2c1d0e4f6a7b.9f86d081884c7d659a2feaa0c55ad015.3.c2VjcmV0",
        ] {
            assert_eq!(
                verify_now(&set, garbage),
                Err(TokenError::Malformed),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn every_error_has_a_distinct_stable_code_and_a_plain_sentence() {
        use TokenError::*;
        let all = [
            TooLarge,
            Malformed,
            AlgorithmNotAllowed,
            UnknownKey,
            BadSignature,
            WrongType,
            WrongIssuer,
            WrongAudience,
            LifetimeTooLong,
            NotYetValid,
            Expired,
        ];
        let codes: std::collections::BTreeSet<_> = all.iter().map(TokenError::code).collect();
        assert_eq!(codes.len(), all.len());
        for e in all {
            assert!(e.code().starts_with("token_"), "{e:?}");
            assert!(e.detail().ends_with('.') && e.detail().len() < 80, "{e:?}");
            assert_eq!(e.to_string(), e.detail());
        }
        assert_eq!(Expired.code(), "token_expired");
        assert_eq!(AlgorithmNotAllowed.code(), "token_algorithm_not_allowed");
    }

    // ---- Robustness ------------------------------------------------------

    const ALPHABET: &[char] = &[
        'A', 'Q', 'g', 'w', 'z', '0', '9', '-', '_', '.', '.', '=', '+', '/', ' ', '{', '"', 'é',
        '\0', 'e', 'y', 'J',
    ];

    #[test]
    fn the_base64url_check_agrees_with_the_decoder() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..5_000 {
            let len = rng.below(12);
            let s: String = (0..len)
                .map(|_| rng.pick(&['A', 'B', 'Q', 'g', 'w', '0', '-', '_', '=', '+', '.']))
                .collect();
            let decodes = !s.is_empty() && URL_SAFE_NO_PAD.decode(&s).is_ok();
            assert_eq!(is_b64url(&s), decodes, "{s:?}");
        }
    }

    #[test]
    fn verification_never_panics_on_arbitrary_input() {
        let set = keys(&[("k1", 1), ("k3", 3)]);
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);

        // Arbitrary strings, including three-segment ones of valid base64 around
        // random bytes, random JSON-ish text and truncated real JSON.
        for i in 0..3_000 {
            let s = match i % 3 {
                0 => (0..rng.below(200))
                    .map(|_| rng.pick(ALPHABET))
                    .collect::<String>(),
                1 => {
                    let mut segment = || {
                        let bytes: Vec<u8> =
                            (0..rng.below(120)).map(|_| rng.next() as u8).collect();
                        b64(bytes)
                    };
                    format!("{}.{}.{}", segment(), segment(), segment())
                }
                _ => {
                    let header = header_json(if rng.below(2) == 0 { "k1" } else { "k3" });
                    let claims = claims_at(NOW).to_string();
                    let cut = rng.below(claims.len() + 1);
                    sign_raw(&set, &header, &claims[..cut])
                }
            };
            let _ = set.verify(&s, rng.next() as i64);
        }

        // Mutations of a valid token: whatever changes, it must not verify.
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        for _ in 0..3_000 {
            let mut chars: Vec<char> = token.chars().collect();
            for _ in 0..=rng.below(3) {
                let at = rng.below(chars.len());
                match rng.below(4) {
                    0 => chars[at] = rng.pick(ALPHABET),
                    1 => {
                        chars.remove(at);
                    }
                    2 => chars.insert(at, rng.pick(ALPHABET)),
                    _ => chars.truncate(at),
                }
                if chars.is_empty() {
                    chars.push('.');
                }
            }
            let mutated: String = chars.into_iter().collect();
            let result = set.verify(&mutated, NOW);
            if mutated != token {
                assert!(result.is_err(), "mutation verified: {mutated}");
            }
        }
    }

    #[test]
    fn a_connect_ticket_is_signed_with_the_active_key_and_is_not_an_access_token() {
        let set = keys(&[("k1", 1)]);
        let t = Ticket {
            user_id: "u",
            device_id: "d",
            device_public_key: "pk",
            ipv4_address: "10.64.0.2",
            ipv6_address: "fd4b:6565:6e00::2",
            server_id: "eu-central-1",
            region_id: "eu-central",
        };
        let (ticket, ttl) = set.issue_ticket(&t, NOW);
        assert_eq!(ttl, TICKET_TTL_SECS);
        let parts: Vec<&str> = ticket.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["typ"], "connect");
        assert_eq!(claims["aud"], TICKET_AUDIENCE);
        assert_eq!(claims["srv"], "eu-central-1");
        assert_eq!(claims["dpk"], "pk");
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            TICKET_TTL_SECS
        );
        // A VPN server checks the signature with the published key.
        let pk = ed25519_compact::PublicKey::from_slice(
            &URL_SAFE_NO_PAD.decode(&set.jwks().keys[0].x).unwrap(),
        )
        .unwrap();
        let sig =
            ed25519_compact::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
                .unwrap();
        assert!(
            pk.verify(format!("{}.{}", parts[0], parts[1]), &sig)
                .is_ok()
        );
        // It can never pass as an access token.
        assert_eq!(set.verify(&ticket, NOW), Err(TokenError::Malformed));
    }

    /// Tokens of every kind of failure, and good ones, for comparing the
    /// one-step and two-step paths.
    fn assorted_tokens(set: &KeySet) -> Vec<String> {
        let good = set.issue("user-1", "session-1", &ent(), NOW, 7).0;
        let parts = segments(&good);
        let mut forged = parts[2].as_bytes().to_vec();
        forged[10] = if forged[10] == b'A' { b'B' } else { b'A' };
        let other = keys(&[("k1", 9)])
            .issue("user-1", "session-1", &ent(), NOW, 7)
            .0;
        let mut tokens = vec![
            good.clone(),
            format!(
                "{}.{}.{}",
                parts[0],
                parts[1],
                String::from_utf8(forged).unwrap()
            ),
            other,
            format!("{}.{}", parts[0], parts[1]),
            "a.b.c".into(),
            String::new(),
            sign_claims(set, &claims_at(NOW - 10 * ACCESS_TTL_SECS)),
            sign_claims(set, &json!({"typ": "refresh"})),
            sign_raw(set, &header_json("k2"), &claims_at(NOW).to_string()),
        ];
        tokens.push("x".repeat(MAX_TOKEN_LEN + 1));
        tokens
    }

    #[test]
    fn the_two_step_verification_agrees_with_verify() {
        let set = keys(&[("k1", 1), ("k2", 2)]);
        for token in assorted_tokens(&set) {
            let two_step = set.check(&token).and_then(|u| {
                let valid = set.verify_signature(&u);
                u.claims(valid, NOW)
            });
            assert_eq!(two_step, set.verify(&token, NOW), "{token}");
        }
    }

    #[test]
    fn claims_stay_out_of_reach_without_a_valid_signature() {
        let set = keys(&[("k1", 1)]);
        let (token, _) = set.issue("user-1", "session-1", &ent(), NOW, 0);
        let unverified = set.check(&token).expect("well formed");
        assert!(set.verify_signature(&unverified));
        assert_eq!(
            unverified.clone().claims(false, NOW),
            Err(TokenError::BadSignature)
        );
        assert!(unverified.claims(true, NOW).is_ok());
    }

    #[test]
    fn a_checked_token_exposes_exactly_what_its_signature_covers() {
        let set = keys(&[("k2", 2), ("k1", 1)]);
        let (token, _) = keys(&[("k1", 1)]).issue("u", "s", &ent(), NOW, 0);
        let unverified = set.check(&token).expect("well formed");
        let parts = segments(&token);
        assert_eq!(unverified.key_index(), 1, "k1 is second in the set");
        assert_eq!(
            unverified.signed_input(),
            format!("{}.{}", parts[0], parts[1]).as_bytes()
        );
        assert_eq!(
            unverified.signature().as_slice(),
            URL_SAFE_NO_PAD.decode(parts[2]).unwrap().as_slice()
        );
        let public = set.verifying_keys().nth(unverified.key_index()).unwrap();
        assert!(
            ed25519_compact::PublicKey::new(*public)
                .verify(
                    unverified.signed_input(),
                    &Signature::new(*unverified.signature())
                )
                .is_ok()
        );
    }

    #[test]
    fn verifying_keys_are_the_published_ones_in_order() {
        let set = keys(&[("k2", 2), ("k1", 1), ("k3", 3)]);
        let published: Vec<Vec<u8>> = set
            .jwks()
            .keys
            .iter()
            .map(|k| URL_SAFE_NO_PAD.decode(&k.x).unwrap())
            .collect();
        let listed: Vec<Vec<u8>> = set.verifying_keys().map(|k| k.to_vec()).collect();
        assert_eq!(listed, published);
    }

    #[test]
    fn the_pkcs8_signing_key_is_the_rfc_8410_encoding_of_the_seed() {
        let set = keys(&[("k2", 2), ("k1", 1)]);
        let der = set.signing_key_pkcs8();
        // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
        assert_eq!(hex::encode(&der[..16]), "302e020100300506032b657004220420");
        assert_eq!(der[16..], [2_u8; 32]);
    }

    #[test]
    fn every_key_is_exported_as_pkcs8_in_the_set_order() {
        let set = keys(&[("k2", 2), ("k1", 1), ("k3", 3)]);
        let exported: Vec<[u8; 48]> = set.pkcs8_keys().collect();
        assert_eq!(exported.len(), 3);
        assert_eq!(exported[0], set.signing_key_pkcs8());
        for (index, (der, byte)) in exported.iter().zip([2_u8, 1, 3]).enumerate() {
            assert_eq!(hex::encode(&der[..16]), "302e020100300506032b657004220420");
            assert_eq!(der[16..], [byte; 32]);
            // The public half a platform derives from it is the one we publish.
            let derived = KeyPair::from_seed(Seed::new([byte; 32])).pk;
            assert_eq!(set.verifying_keys().nth(index).unwrap(), &*derived);
        }
    }

    #[test]
    fn parsing_derives_no_key_pair_until_one_is_needed() {
        let set = keys(&[("k2", 2), ("k1", 1)]);
        assert!(set.verifiers.iter().all(|v| v.pair.get().is_none()));
        // Exporting for a platform and checking a token's shape need no pair.
        let _ = set.pkcs8_keys().count();
        let (token, _) = keys(&[("k1", 1)]).issue("u", "s", &ent(), NOW, 0);
        set.check(&token).expect("well formed");
        assert!(set.verifiers.iter().all(|v| v.pair.get().is_none()));
        // Verifying in wasm derives the key it verifies with, and only that one.
        assert!(set.verify(&token, NOW).is_ok());
        assert!(set.verifiers[0].pair.get().is_none());
        assert!(set.verifiers[1].pair.get().is_some());
    }

    #[test]
    fn a_signature_made_elsewhere_finishes_the_same_tokens() {
        let set = keys(&[("k1", 1)]);
        // Another Ed25519 implementation, given only the exported key.
        let seed: [u8; 32] = set.signing_key_pkcs8()[16..].try_into().unwrap();
        let elsewhere = KeyPair::from_seed(Seed::new(seed)).sk;

        let unsigned = set.access_token("user-1", "session-1", &ent(), NOW, 5);
        let signature = elsewhere.sign(unsigned.signing_input(), None);
        assert_eq!(
            unsigned.signed(&signature),
            set.issue("user-1", "session-1", &ent(), NOW, 5)
        );

        let ticket = Ticket {
            user_id: "u",
            device_id: "d",
            device_public_key: "pk",
            ipv4_address: "10.64.0.2",
            ipv6_address: "fd4b:6565:6e00::2",
            server_id: "s",
            region_id: "r",
        };
        let unsigned = set.ticket(&ticket, NOW);
        let signature = elsewhere.sign(unsigned.signing_input(), None);
        assert_eq!(unsigned.signed(&signature), set.issue_ticket(&ticket, NOW));
    }
}

/// Properties over generated tokens (shrinking to a minimal one).
/// Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use crate::domain::catalogue::Tier;
    use proptest::prelude::*;

    fn keys() -> KeySet {
        let entries = serde_json::json!([
            { "kid": "k1", "seed": URL_SAFE_NO_PAD.encode([1_u8; 32]) },
            { "kid": "k3", "seed": URL_SAFE_NO_PAD.encode([3_u8; 32]) },
        ]);
        KeySet::parse(&entries.to_string()).unwrap()
    }

    fn entitlement() -> impl Strategy<Value = Entitlement> {
        (
            ".{0,12}",
            any::<u32>(),
            prop::sample::subsequence(vec![Tier::Free, Tier::Premium], 0..=2),
            any::<Option<i64>>(),
        )
            .prop_map(|(plan, max_devices, region_tiers, until)| Entitlement {
                plan,
                max_devices,
                region_tiers,
                until,
            })
    }

    /// Times far from the i64 extremes: there, `exp` saturates and the
    /// token is refused as too long-lived, which a unit test pins.
    fn time() -> impl Strategy<Value = i64> {
        -(1_i64 << 50)..(1_i64 << 50)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever we issue verifies, with the same claims, from its `iat`
        /// (minus the leeway) until its `exp` (plus the leeway), and not a
        /// second outside that; it lives its jittered lifetime, or until its
        /// entitlement lapses if sooner; a token over the size limit is
        /// refused whole.
        #[test]
        fn issued_tokens_verify_exactly_within_their_lifetime(
            sub in ".{0,40}",
            sid in "[0-9a-f]{32}",
            ent in entitlement(),
            now in time(),
            jitter in any::<u32>(),
        ) {
            let set = keys();
            let (token, expires_in) = set.issue(&sub, &sid, &ent, now, jitter);
            // The jittered lifetime, or less if the entitlement lapses sooner.
            let lifetime = ACCESS_TTL_SECS - i64::from(jitter) % (MAX_JITTER_SECS + 1);
            let expected = ent
                .until
                .map_or(lifetime, |until| lifetime.min(until.saturating_sub(now).max(1)));
            prop_assert_eq!(expires_in, expected);
            if token.len() > MAX_TOKEN_LEN {
                prop_assert_eq!(set.verify(&token, now), Err(TokenError::TooLarge));
                return Ok(());
            }
            let exp = now + expires_in;
            let claims = set.verify(&token, now).unwrap();
            prop_assert_eq!(
                claims,
                AccessClaims { sub, sid, ent, iat: now, exp }
            );
            prop_assert!(set.verify(&token, now - LEEWAY_SECS).is_ok());
            prop_assert!(set.verify(&token, exp + LEEWAY_SECS - 1).is_ok());
            prop_assert_eq!(set.verify(&token, now - LEEWAY_SECS - 1), Err(TokenError::NotYetValid));
            prop_assert_eq!(set.verify(&token, exp + LEEWAY_SECS), Err(TokenError::Expired));
        }

        /// Any one-character change to a valid token makes it fail, with an
        /// error and without a panic.
        #[test]
        fn any_single_character_change_is_refused(
            at in any::<prop::sample::Index>(),
            replacement in prop_oneof![
                prop::char::range('A', 'Z'),
                prop::char::range('a', 'z'),
                prop::char::range('0', '9'),
                prop::sample::select(vec!['-', '_', '.', '=', '+', '/', ' ', '\0', 'é']),
            ],
            remove in any::<bool>(),
        ) {
            let set = keys();
            let (token, _) = set.issue("user-1", "session-1", &Entitlement {
                plan: "plus".into(),
                max_devices: 5,
                region_tiers: vec![Tier::Free, Tier::Premium],
                until: None,
            }, 1_700_000_000, 0);
            let mut chars: Vec<char> = token.chars().collect();
            let i = at.index(chars.len());
            if remove {
                chars.remove(i);
            } else {
                chars[i] = replacement;
            }
            let mutated: String = chars.into_iter().collect();
            prop_assume!(mutated != token);
            prop_assert!(set.verify(&mutated, 1_700_000_000).is_err());
        }

        /// Arbitrary text, and arbitrary text shaped like three segments,
        /// is refused without a panic (the fuzz target goes much further).
        #[test]
        fn arbitrary_strings_never_verify(
            s in prop_oneof![
                ".{0,300}",
                "[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,90}",
            ],
            now in any::<i64>(),
        ) {
            prop_assert!(keys().verify(&s, now).is_err());
        }

        /// The base64url shape check agrees with the decoder on every input.
        #[test]
        fn the_base64url_check_agrees_with_the_decoder(s in "[A-Za-z0-9_=+/.-]{0,16}") {
            let decodes = !s.is_empty() && URL_SAFE_NO_PAD.decode(&s).is_ok();
            prop_assert_eq!(is_b64url(&s), decodes);
        }
    }
}
