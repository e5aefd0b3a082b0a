//! A user's sessions and refresh-token families: the state machine of one
//! user's Durable Object.
//!
//! One session is one refresh-token *family*. Every refresh rotates the token to
//! the next *generation*, so a stolen token that is used after its owner has
//! already rotated past it betrays itself (reuse detection) and the family is
//! revoked.
//!
//! # Tokens are derived, never stored
//!
//! The secret of generation `g` of a family is
//!
//! ```text
//! HMAC-SHA-256(key = pepper,
//!              msg = "keenvpn-refresh-v1" || user_id || 0x00 || sid || 0x00
//!                    || family_nonce (32 random bytes) || g as u32 big-endian)
//! ```
//!
//! where the pepper is a Worker secret handed to every call. The state keeps
//! only the family's nonce and its current generation, so:
//! - a leak of Durable Object storage alone reveals no usable token (it lacks
//!   the pepper);
//! - the object can re-derive the current token at any time, which is how a
//!   retried refresh (the client never saw our answer) or two concurrent
//!   refreshes with the same token get the *same* successor instead of
//!   tripping reuse detection: see [`GRACE_SECS`];
//! - checking a presented token is one HMAC and a constant-time comparison
//!   (`hmac`'s `verify_slice`).
//!
//! # Wire format
//!
//! `v1.<user_id>.<sid>.<generation>.<secret>`: the user id routes the request
//! to the right Durable Object without any lookup, the sid names the family,
//! the generation says which HMAC to check and the secret is the 32 HMAC bytes
//! in base64url without padding. Parsing is strict (exact shapes, canonical
//! numbers and base64) so that one token has exactly one spelling.
//!
//! # Time and lifetimes
//!
//! Nothing here reads a clock: `now` (unix seconds) comes in as an argument.
//! A family ends when it is revoked or when it expires (idle for
//! [`IDLE_SECS`], or [`ABSOLUTE_SECS`] after creation, whichever is first).
//! Expiry is a pure function of the stored times, so it needs no timer: every
//! method treats an expired family as ended at its expiry instant, and
//! [`UserSessions::refresh`] records it as revoked with [`RevokeReason::Expired`].
//! Ended families stay in the state for a while (the mirror shows them as
//! revoked so edge caches drop their access tokens, and a replayed token gets a
//! precise error), then [`UserSessions::prune`] forgets them.

use crate::domain::idempotency::{Begin, Records, StoredResponse};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt;

/// A retried or concurrent refresh of the token that was just rotated gets the
/// same successor within this many seconds of the rotation; after it, using the
/// previous token is reuse.
pub const GRACE_SECS: i64 = 45;
/// A session not refreshed for this long has expired.
pub const IDLE_SECS: i64 = 30 * 24 * 3600;
/// A session expires this long after its creation, however much it is used.
pub const ABSOLUTE_SECS: i64 = 90 * 24 * 3600;
/// Creating one more active session than this revokes the least recently
/// refreshed one ([`RevokeReason::Evicted`]).
pub const MAX_ACTIVE_SESSIONS: usize = 20;
/// Ended sessions stay in the mirror (as `revoked: true`) this long after they
/// ended: an access token lives at most 900 s, plus a minute of leeway.
pub const MIRROR_REVOKED_SECS: i64 = 900 + 60;
/// Device labels are cut to this many characters.
pub const MAX_LABEL_CHARS: usize = 64;
/// Ended families are forgotten by [`UserSessions::prune`] this long after they
/// ended. Long enough to answer a replay with `revoked`/`reused` rather than
/// `invalid` for a while, short enough to keep the state small.
pub const FORGET_AFTER_SECS: i64 = 24 * 3600;
/// The label given to a session whose client sent none (or only junk).
pub const UNNAMED_LABEL: &str = "unnamed device";

/// Whatever happens within a day, [`UserSessions::prune`] keeps at most this
/// many ended families (the most recently ended), so that someone who holds the
/// password and logs in in a loop cannot grow the object's storage without
/// bound. Forgetting one early only turns a later `revoked`/`reused` answer
/// into `invalid`: the token is refused either way.
const MAX_ENDED_KEPT: usize = 5 * MAX_ACTIVE_SESSIONS;

/// The longest wire token accepted. Real ones are 118 to 127 bytes; the cap
/// rejects junk before any splitting.
const MAX_TOKEN_LEN: usize = 200;
/// Domain separation for the refresh-secret HMAC; bump with the wire version.
const DERIVATION_CONTEXT: &[u8] = b"keenvpn-refresh-v1";
const WIRE_VERSION: &str = "v1";
const SECRET_LEN: usize = 32;
/// base64url without padding of 32 bytes.
const SECRET_B64_LEN: usize = 43;

type HmacSha256 = Hmac<Sha256>;

/// Why a refresh was refused. Each maps to a stable machine-readable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshError {
    /// Not a token at all (wrong shape).
    Malformed,
    /// Well formed, but not one we issued (unknown family, wrong user, wrong
    /// secret, or a generation we have not reached).
    Invalid,
    /// The session was revoked (logout, eviction, earlier reuse).
    Revoked,
    /// The session expired (idle or absolute lifetime).
    Expired,
    /// A superseded token was presented: the family is now revoked.
    Reused,
}

impl RefreshError {
    pub fn code(&self) -> &'static str {
        match self {
            RefreshError::Malformed => "refresh_token_malformed",
            RefreshError::Invalid => "refresh_token_invalid",
            RefreshError::Revoked => "refresh_token_revoked",
            RefreshError::Expired => "refresh_token_expired",
            RefreshError::Reused => "refresh_token_reused",
        }
    }
}

impl fmt::Display for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for RefreshError {}

/// A refresh token as presented by a client, parsed but not yet verified.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken {
    user_id: String,
    sid: String,
    generation: u32,
    secret: [u8; SECRET_LEN],
}

impl RefreshToken {
    /// Parses the wire format strictly; anything else is
    /// [`RefreshError::Malformed`].
    pub fn parse(s: &str) -> Result<RefreshToken, RefreshError> {
        if s.is_empty() || s.len() > MAX_TOKEN_LEN {
            return Err(RefreshError::Malformed);
        }
        let mut parts = s.split('.');
        let (Some(version), Some(user_id), Some(sid), Some(generation), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(RefreshError::Malformed);
        };
        if version != WIRE_VERSION || !is_uuid(user_id) || !is_sid(sid) {
            return Err(RefreshError::Malformed);
        }
        let generation = parse_generation(generation).ok_or(RefreshError::Malformed)?;
        let secret = decode_secret(secret).ok_or(RefreshError::Malformed)?;
        Ok(RefreshToken {
            user_id: user_id.to_owned(),
            sid: sid.to_owned(),
            generation,
            secret,
        })
    }

    /// The user whose Durable Object must answer this token.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The session (family) the token claims to belong to.
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// The wire form, `v1.<user>.<session>.<generation>.<secret>`: the one
    /// spelling [`RefreshToken::parse`] accepts for this token, so
    /// `parse(t.to_wire()) == t` and `parse(s)?.to_wire() == s`.
    pub fn to_wire(&self) -> String {
        wire(&self.user_id, &self.sid, self.generation, &self.secret)
    }
}

fn wire(user_id: &str, sid: &str, generation: u32, secret: &[u8; SECRET_LEN]) -> String {
    format!(
        "{WIRE_VERSION}.{user_id}.{sid}.{generation}.{}",
        URL_SAFE_NO_PAD.encode(secret)
    )
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshToken")
            .field("user_id", &self.user_id)
            .field("sid", &self.sid)
            .field("generation", &self.generation)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    Logout,
    LogoutAll,
    Reuse,
    Expired,
    Evicted,
    /// The account was removed: a sign-up undone after a failure, which ends
    /// any session a sign-in opened for it meanwhile.
    AccountRemoved,
}

/// What [`UserSessions::reopen`] decides for a keyed sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reopen {
    /// The key's first request opened this session, still unused: answer
    /// with its first token again.
    Again(Issued),
    /// Nothing to answer with: open a session, then record it with
    /// [`UserSessions::opened`].
    Open,
    /// The key's first request is still running (answer 409).
    InFlight,
    /// The key was used for another request (answer 422).
    Mismatch,
}

/// A new or rotated refresh token, to hand to the client.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub sid: String,
    pub refresh_token: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("sid", &self.sid)
            .field("refresh_token", &"<redacted>")
            .finish()
    }
}

/// One session as mirrored to KV and listed by `GET /v1/me`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: String,
    pub label: String,
    pub created_at: i64,
    pub last_refresh_at: i64,
    pub revoked: bool,
}

/// The whole per-user state, stored as JSON in the user's Durable Object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSessions {
    /// Families by sid. A map keeps lookups simple and the JSON deterministic;
    /// it stays small (see [`MAX_ACTIVE_SESSIONS`] and [`UserSessions::prune`]).
    #[serde(default)]
    families: BTreeMap<String, Family>,
}

/// One refresh-token family (one session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Family {
    /// Kept per family (not once per object) so a token minted for another
    /// user can never verify here, even if routing went wrong.
    user_id: String,
    label: String,
    nonce: Nonce,
    /// The generation whose token is current.
    generation: u32,
    created_at: i64,
    last_refresh_at: i64,
    /// When `generation` became current (`created_at` for generation 0). Only
    /// read when a token of `generation - 1` comes back, which implies at
    /// least one rotation happened.
    rotated_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked: Option<Revocation>,
    /// The sessions this one's opening evicted, until its first refresh:
    /// what [`UserSessions::withdraw`] gives back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    evicted: Vec<String>,
    /// Whether [`UserSessions::reopen`] handed this session out again, to
    /// the retry of the sign-in that opened it: a client may hold it then,
    /// whatever became of the first request, so it is never withdrawn.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Revocation {
    at: i64,
    reason: RevokeReason,
}

/// The family's random nonce: with the pepper it yields every token of the
/// family, so it is treated as a secret. It serialises as base64url (compact
/// JSON) and never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
struct Nonce([u8; 32]);

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Nonce(<redacted>)")
    }
}

impl Serialize for Nonce {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Nonce, D::Error> {
        use serde::de::Error;
        let text = String::deserialize(deserializer)?;
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(D::Error::custom)?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(Nonce)
            .map_err(|_| D::Error::custom("a family nonce is 32 bytes"))
    }
}

impl Family {
    /// When the family expires if nothing revokes it first.
    fn expires_at(&self) -> i64 {
        self.created_at
            .saturating_add(ABSOLUTE_SECS)
            .min(self.last_refresh_at.saturating_add(IDLE_SECS))
    }

    /// How and when the family ended, if it has by `now`. An expiry not yet
    /// recorded counts as ending at the expiry instant, so every view of the
    /// state agrees whether or not a refresh has recorded it yet.
    fn ended(&self, now: i64) -> Option<Revocation> {
        self.revoked.or_else(|| {
            let at = self.expires_at();
            (now >= at).then_some(Revocation {
                at,
                reason: RevokeReason::Expired,
            })
        })
    }

    fn is_active(&self, now: i64) -> bool {
        self.ended(now).is_none()
    }

    fn mac(&self, sid: &str, generation: u32, pepper: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(pepper).expect("HMAC takes any key length");
        mac.update(DERIVATION_CONTEXT);
        mac.update(self.user_id.as_bytes());
        mac.update(&[0]);
        mac.update(sid.as_bytes());
        mac.update(&[0]);
        mac.update(&self.nonce.0);
        mac.update(&generation.to_be_bytes());
        mac
    }

    fn secret(&self, sid: &str, generation: u32, pepper: &[u8]) -> [u8; SECRET_LEN] {
        self.mac(sid, generation, pepper)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Constant-time check of a presented secret.
    fn verifies(&self, sid: &str, generation: u32, secret: &[u8], pepper: &[u8]) -> bool {
        self.mac(sid, generation, pepper)
            .verify_slice(secret)
            .is_ok()
    }

    fn issue(&self, sid: &str, pepper: &[u8]) -> Issued {
        let secret = self.secret(sid, self.generation, pepper);
        Issued {
            sid: sid.to_owned(),
            refresh_token: wire(&self.user_id, sid, self.generation, &secret),
        }
    }

    fn view(&self, sid: &str, revoked: bool) -> SessionView {
        SessionView {
            id: sid.to_owned(),
            label: self.label.clone(),
            created_at: self.created_at,
            last_refresh_at: self.last_refresh_at,
            revoked,
        }
    }
}

impl UserSessions {
    /// Starts a new session (generation 0) and returns its first token.
    ///
    /// `label` is cleaned: control and hidden characters removed, trimmed, cut to
    /// [`MAX_LABEL_CHARS`] characters; empty becomes [`UNNAMED_LABEL`]. If the
    /// user already has [`MAX_ACTIVE_SESSIONS`] active sessions, the least
    /// recently refreshed is revoked ([`RevokeReason::Evicted`]). Long-ended
    /// families are pruned on the way, since this is where the state grows.
    ///
    /// `user_id` must be a lowercase hyphenated UUID (it comes from our own
    /// database); `sid_random` and `nonce` must come from a CSPRNG.
    pub fn create(
        &mut self,
        user_id: &str,
        label: &str,
        now: i64,
        sid_random: [u8; 16],
        nonce: [u8; 32],
        pepper: &[u8],
    ) -> Issued {
        debug_assert!(is_uuid(user_id), "user ids are lowercase hyphenated UUIDs");
        self.prune(now);
        let evicted = self.evict_down_to(MAX_ACTIVE_SESSIONS - 1, now);

        let sid = hex::encode(sid_random);
        let family = Family {
            user_id: user_id.to_owned(),
            label: clean_label(label),
            nonce: Nonce(nonce),
            generation: 0,
            created_at: now,
            last_refresh_at: now,
            rotated_at: now,
            revoked: None,
            evicted,
            replayed: false,
        };
        let issued = family.issue(&sid, pepper);
        // 128 random bits: a collision with an existing sid is not a case to handle.
        self.families.insert(sid, family);
        issued
    }

    /// Exchanges a refresh token for its successor. See the module docs; in
    /// order:
    /// 1. unknown sid, or a user other than the family's: `Invalid`;
    /// 2. a secret that is not the HMAC of the token's generation: `Invalid`
    ///    (so a forged token can never revoke anything);
    /// 3. a revoked family: `Revoked` (`Expired` if it was revoked by expiry);
    /// 4. an expired family: recorded as revoked (`Expired`), `Expired`;
    /// 5. the current generation: rotate and return the next generation's token;
    /// 6. the previous generation within [`GRACE_SECS`] of the rotation: the
    ///    current token again (a retry or a concurrent request; no rotation);
    /// 7. any older generation, or the previous one after the grace: the family
    ///    (only this one) is revoked (`Reuse`), `Reused`;
    /// 8. a generation above the current one: `Invalid`.
    pub fn refresh(
        &mut self,
        token: &RefreshToken,
        now: i64,
        pepper: &[u8],
    ) -> Result<Issued, RefreshError> {
        let sid = token.sid.as_str();
        let family = self
            .families
            .get_mut(sid)
            .filter(|f| f.user_id == token.user_id)
            .ok_or(RefreshError::Invalid)?;
        if !family.verifies(sid, token.generation, &token.secret, pepper) {
            return Err(RefreshError::Invalid);
        }
        if let Some(revocation) = family.revoked {
            // An expiry another call already recorded reads the same as one
            // recorded now, so the client's answer does not depend on timing.
            return Err(match revocation.reason {
                RevokeReason::Expired => RefreshError::Expired,
                _ => RefreshError::Revoked,
            });
        }
        if let Some(expiry) = family.ended(now) {
            family.revoked = Some(expiry);
            return Err(RefreshError::Expired);
        }

        let current = family.generation;
        if token.generation == current {
            let Some(next) = current.checked_add(1) else {
                // 2^32 rotations cannot happen in 90 days at any sane rate;
                // refuse rather than wrap around to reissue old generations.
                family.revoked = Some(Revocation {
                    at: now,
                    reason: RevokeReason::Expired,
                });
                return Err(RefreshError::Expired);
            };
            family.generation = next;
            family.rotated_at = now;
            family.last_refresh_at = now;
            // The client had its first answer: there is nothing to withdraw.
            family.evicted = Vec::new();
            Ok(family.issue(sid, pepper))
        } else if token.generation.checked_add(1) == Some(current)
            && now.saturating_sub(family.rotated_at) <= GRACE_SECS
        {
            Ok(family.issue(sid, pepper))
        } else if token.generation < current {
            family.revoked = Some(Revocation {
                at: now,
                reason: RevokeReason::Reuse,
            });
            Err(RefreshError::Reused)
        } else {
            Err(RefreshError::Invalid)
        }
    }

    /// Revokes one session. Returns whether it was active (an unknown, already
    /// revoked or expired session is left as it is).
    ///
    /// Except a session evicted by a newer one: that eviction is undone if
    /// the newer session is withdrawn ([`UserSessions::withdraw`]), and an
    /// acknowledged logout must not be. So the logout's revocation replaces
    /// the eviction's, which no withdrawal matches.
    pub fn revoke(&mut self, sid: &str, now: i64, reason: RevokeReason) -> bool {
        match self.families.get_mut(sid) {
            Some(family) if family.is_active(now) => {
                family.revoked = Some(Revocation { at: now, reason });
                true
            }
            Some(family)
                if family
                    .revoked
                    .is_some_and(|r| r.reason == RevokeReason::Evicted) =>
            {
                family.revoked = Some(Revocation { at: now, reason });
                false
            }
            _ => false,
        }
    }

    /// Takes back the session `sid` that [`UserSessions::create`] opened for
    /// a sign-in that could not be answered (its tokens were not signed), as
    /// if the sign-in had not happened: the session is removed, and those its
    /// opening evicted are active again, as far as the limit allows. Nothing
    /// is done (`false`) unless the session is active and still at its first
    /// token: a refreshed one was answered, and one revoked since (a sign-out
    /// everywhere) must not bring back what it evicted. Nor is one handed out
    /// again to a retry ([`UserSessions::reopen`]): that answer may have
    /// reached the client.
    pub fn withdraw(&mut self, sid: &str, now: i64) -> bool {
        let Some(family) = self
            .families
            .get(sid)
            .filter(|f| f.is_active(now) && f.generation == 0 && !f.replayed)
        else {
            return false;
        };
        let eviction = Revocation {
            at: family.created_at,
            reason: RevokeReason::Evicted,
        };
        let evicted = self.families.remove(sid).map(|f| f.evicted);
        for victim in evicted.unwrap_or_default() {
            if self.is_full(now) {
                break;
            }
            if let Some(f) = self.families.get_mut(&victim)
                && f.revoked == Some(eviction)
            {
                f.revoked = None;
            }
        }
        true
    }

    /// Revokes every active session; returns how many there were.
    pub fn revoke_all(&mut self, now: i64, reason: RevokeReason) -> usize {
        let mut count = 0;
        for family in self.families.values_mut() {
            if family.is_active(now) {
                family.revoked = Some(Revocation { at: now, reason });
                count += 1;
            }
        }
        count
    }

    /// Whether the user has [`MAX_ACTIVE_SESSIONS`] active sessions, so that a
    /// new one ([`UserSessions::create`]) ends the least recently used.
    pub fn is_full(&self, now: i64) -> bool {
        self.families.values().filter(|f| f.is_active(now)).count() >= MAX_ACTIVE_SESSIONS
    }

    /// Marks `sid` as handed out to a retry (see [`UserSessions::reopen`]),
    /// for a session a retry opened itself.
    pub fn mark_handed_out(&mut self, sid: &str) {
        if let Some(f) = self.families.get_mut(sid) {
            f.replayed = true;
        }
    }

    /// Whether an active session was handed out again to a retry
    /// ([`UserSessions::reopen`]): a client may hold it.
    pub fn handed_out_again(&self, now: i64) -> bool {
        self.families
            .values()
            .any(|f| f.replayed && f.is_active(now))
    }

    /// Whether `sid` names a session, ended or not, that the state holds.
    pub fn knows(&self, sid: &str) -> bool {
        self.families.contains_key(sid)
    }

    /// Whether `sid` names a session that is neither revoked nor expired.
    pub fn is_active(&self, sid: &str, now: i64) -> bool {
        self.families.get(sid).is_some_and(|f| f.is_active(now))
    }

    /// What a sign-in (or sign-up) sent with the `Idempotency-Key` `key`
    /// gets, `records` holding the user's keys. A retry whose first answer
    /// was lost must not open a second session; it gets the first one's
    /// tokens again. So the key's record names the session it opened
    /// ([`UserSessions::opened`]), and a retry of the same request
    /// ([`fingerprint`](crate::domain::idempotency::fingerprint)) is answered
    /// with that session's first refresh token, while that token is still
    /// the one to use: the session is active and was never refreshed.
    ///
    /// Once it was refreshed, the client had the first answer, and handing
    /// out its first token again would only set off reuse detection when
    /// used; once it ended, there is nothing to answer with. Either way the
    /// record is spent: it is started afresh and the request opens a new
    /// session ([`Reopen::Open`]), as it would with a key never seen.
    ///
    /// A session handed out again is marked so ([`UserSessions::withdraw`]
    /// leaves it): the caller stores the state before it answers.
    pub fn reopen(
        &mut self,
        records: &mut Records,
        key: &str,
        fingerprint: &str,
        now: i64,
        pepper: &[u8],
    ) -> Reopen {
        match records.begin(key, fingerprint, now) {
            Begin::Replay(first) => {
                let sid = first.body.as_str();
                match self.families.get_mut(sid) {
                    Some(f) if f.is_active(now) && f.generation == 0 => {
                        f.replayed = true;
                        Reopen::Again(f.issue(sid, pepper))
                    }
                    _ => {
                        records.forget(key);
                        let begun = records.begin(key, fingerprint, now);
                        debug_assert_eq!(begun, Begin::Proceed);
                        Reopen::Open
                    }
                }
            }
            Begin::Proceed => Reopen::Open,
            Begin::InFlight => Reopen::InFlight,
            Begin::Mismatch => Reopen::Mismatch,
        }
    }

    /// Records that the request under `key` that [`UserSessions::reopen`]
    /// let through opened the session `sid`. (The record's response is the
    /// session id; the answer is made again from it, so its status is moot.)
    pub fn opened(records: &mut Records, key: &str, sid: &str, now: i64) {
        let first = StoredResponse {
            status: 200,
            body: sid.to_owned(),
        };
        records.complete(key, first, now);
    }

    /// What to mirror to KV (and list in `GET /v1/me`): the active sessions,
    /// plus those that ended within [`MIRROR_REVOKED_SECS`] (as `revoked: true`,
    /// so access tokens still in flight for them can be refused), newest first.
    pub fn mirror(&self, now: i64) -> Vec<SessionView> {
        let mut views: Vec<SessionView> = self
            .families
            .iter()
            .filter_map(|(sid, family)| match family.ended(now) {
                None => Some(family.view(sid, false)),
                Some(end) if now.saturating_sub(end.at) <= MIRROR_REVOKED_SECS => {
                    Some(family.view(sid, true))
                }
                Some(_) => None,
            })
            .collect();
        views.sort_unstable_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        views
    }

    /// Forgets families that ended more than [`FORGET_AFTER_SECS`] ago, and
    /// all but the 100 most recently ended ones (`MAX_ENDED_KEPT`), so the state
    /// stays bounded. Active families are never touched.
    pub fn prune(&mut self, now: i64) {
        self.families.retain(|_, family| match family.ended(now) {
            None => true,
            Some(end) => now.saturating_sub(end.at) <= FORGET_AFTER_SECS,
        });

        let mut ended: Vec<(i64, String)> = self
            .families
            .iter()
            .filter_map(|(sid, family)| family.ended(now).map(|end| (end.at, sid.clone())))
            .collect();
        if ended.len() > MAX_ENDED_KEPT {
            ended.sort_unstable();
            let excess = ended.len() - MAX_ENDED_KEPT;
            for (_, sid) in ended.into_iter().take(excess) {
                self.families.remove(&sid);
            }
        }
    }

    /// Evicts the least recently refreshed active sessions until at most
    /// `keep` are active; returns their sids.
    fn evict_down_to(&mut self, keep: usize, now: i64) -> Vec<String> {
        let mut evicted = Vec::new();
        loop {
            let active = self.families.values().filter(|f| f.is_active(now));
            if active.count() <= keep {
                return evicted;
            }
            // Ties (same second) go to the older session, then the sid, so the
            // choice is deterministic.
            let victim = self
                .families
                .iter_mut()
                .filter(|(_, f)| f.is_active(now))
                .min_by(|(a_sid, a), (b_sid, b)| {
                    (a.last_refresh_at, a.created_at, a_sid).cmp(&(
                        b.last_refresh_at,
                        b.created_at,
                        b_sid,
                    ))
                });
            match victim {
                Some((sid, family)) => {
                    family.revoked = Some(Revocation {
                        at: now,
                        reason: RevokeReason::Evicted,
                    });
                    evicted.push(sid.clone());
                }
                None => return evicted,
            }
        }
    }
}

/// Control and hidden characters (`crate::text::is_hidden`) removed,
/// trimmed, cut to [`MAX_LABEL_CHARS`] characters (not bytes, so a
/// multi-byte character is never split); nothing visible left → unnamed.
fn clean_label(label: &str) -> String {
    let visible: String = label
        .chars()
        .filter(|&c| !c.is_control() && !crate::text::is_hidden(c))
        .collect();
    let cut: String = visible.trim().chars().take(MAX_LABEL_CHARS).collect();
    match cut.trim_end() {
        cut if cut
            .chars()
            .all(|c| c.is_whitespace() || crate::text::is_joiner(c)) =>
        {
            UNNAMED_LABEL.to_owned()
        }
        cut => cut.to_owned(),
    }
}

/// A lowercase hyphenated UUID: 8-4-4-4-12 lowercase hex digits.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => is_lower_hex(b),
        })
}

/// A session id: 16 bytes as 32 lowercase hex digits.
fn is_sid(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(is_lower_hex)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// Decimal u32 in canonical form: digits only (no sign), no leading zeros.
fn parse_generation(s: &str) -> Option<u32> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

/// Exactly 43 base64url characters, no padding, decoding to 32 bytes. The
/// engine rejects non-zero trailing bits, so the encoding is canonical.
fn decode_secret(s: &str) -> Option<[u8; SECRET_LEN]> {
    if s.len() != SECRET_B64_LEN {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
    bytes.as_slice().try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4c";
    const OTHER_USER: &str = "1c7f4d3f-9a2b-4e3c-8d4f-6b8c0e2a3f5d";
    const PEPPER: &[u8] = b"test pepper, 32 bytes or more!!!";
    const T0: i64 = 1_000_000;

    fn create(sessions: &mut UserSessions, n: u8, now: i64) -> Issued {
        sessions.create(USER, "Pixel 8", now, [n; 16], [n; 32], PEPPER)
    }

    fn parse(issued: &Issued) -> RefreshToken {
        RefreshToken::parse(&issued.refresh_token).expect("issued tokens parse")
    }

    fn refresh(
        sessions: &mut UserSessions,
        issued: &Issued,
        now: i64,
    ) -> Result<Issued, RefreshError> {
        sessions.refresh(&parse(issued), now, PEPPER)
    }

    /// A valid token string with one part replaced.
    fn with_part(token: &str, index: usize, part: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[index] = part;
        parts.join(".")
    }

    #[test]
    fn a_created_session_refreshes_to_the_next_generation() {
        let mut s = UserSessions::default();
        let first = create(&mut s, 1, T0);
        assert_eq!(first.sid, "01".repeat(16));
        let token = parse(&first);
        assert_eq!((token.user_id(), token.sid()), (USER, first.sid.as_str()));
        assert_eq!(token.generation, 0);

        let second = refresh(&mut s, &first, T0 + 60).unwrap();
        assert_eq!(second.sid, first.sid);
        assert_ne!(second.refresh_token, first.refresh_token);
        assert_eq!(parse(&second).generation, 1);
        let third = refresh(&mut s, &second, T0 + 120).unwrap();
        assert_eq!(parse(&third).generation, 2);
        assert!(s.is_active(&first.sid, T0 + 120));
    }

    #[test]
    fn the_secret_is_the_documented_hmac_of_the_family_and_generation() {
        let mut s = UserSessions::default();
        let issued = create(&mut s, 7, T0);
        let mut mac = HmacSha256::new_from_slice(PEPPER).unwrap();
        mac.update(b"keenvpn-refresh-v1");
        mac.update(USER.as_bytes());
        mac.update(b"\0");
        mac.update(issued.sid.as_bytes());
        mac.update(b"\0");
        mac.update(&[7; 32]);
        mac.update(&0u32.to_be_bytes());
        let expected = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(
            issued.refresh_token,
            format!("v1.{USER}.{}.0.{expected}", issued.sid)
        );
    }

    #[test]
    fn parse_accepts_exactly_what_create_returns() {
        let mut s = UserSessions::default();
        let issued = create(&mut s, 0xab, T0);
        let token = parse(&issued);
        assert_eq!(token.user_id(), USER);
        assert_eq!(token.sid(), "ab".repeat(16));
        // And a large generation without leading zeros is fine.
        let big = with_part(&issued.refresh_token, 3, "4294967295");
        assert_eq!(RefreshToken::parse(&big).unwrap().generation, u32::MAX);
    }

    #[test]
    fn parse_rejects_every_other_shape_as_malformed() {
        let mut s = UserSessions::default();
        let good = create(&mut s, 0xab, T0).refresh_token;
        let secret = good.rsplit('.').next().unwrap().to_owned();
        let bad = [
            String::new(),
            with_part(&good, 0, "v2"),
            with_part(&good, 0, "V1"),
            with_part(&good, 1, "0b6f3c2e8f1a4d2b9c3e5a7b9d1f2e4c"),
            with_part(&good, 1, "0B6F3C2E-8F1A-4D2B-9C3E-5A7B9D1F2E4C"),
            with_part(&good, 1, "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4"),
            with_part(&good, 1, "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4g"),
            with_part(&good, 1, "0b6f3c2e-8f1a4-d2b-9c3e-5a7b9d1f2e4c"),
            with_part(&good, 2, &"AB".repeat(16)),
            with_part(&good, 2, &"ab".repeat(15)),
            with_part(&good, 2, &"ab".repeat(17)),
            with_part(&good, 3, "01"),
            with_part(&good, 3, "00"),
            with_part(&good, 3, "+1"),
            with_part(&good, 3, "-1"),
            with_part(&good, 3, ""),
            with_part(&good, 3, "4294967296"),
            with_part(&good, 4, &secret[..42]),
            with_part(&good, 4, &format!("{secret}A")),
            with_part(&good, 4, &format!("{secret}=")),
            with_part(
                &good,
                4,
                &secret.replace(|c: char| c.is_alphanumeric(), "+"),
            ),
            // 43 characters whose last one carries non-zero trailing bits.
            with_part(&good, 4, &format!("{}B", &"A".repeat(42))),
            format!("{good}.extra"),
            good.rsplit_once('.').unwrap().0.to_owned(),
            format!("{good}{}", "A".repeat(MAX_TOKEN_LEN)),
            format!(" {good}"),
        ];
        for token in bad {
            assert_eq!(
                RefreshToken::parse(&token),
                Err(RefreshError::Malformed),
                "{token:?}"
            );
        }
        assert!(RefreshToken::parse(&good).is_ok());
    }

    #[test]
    fn the_previous_token_works_only_within_grace_and_returns_the_identical_successor() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        let g1 = refresh(&mut s, &g0, T0 + 100).unwrap();
        // A retry (the client never saw g1) gets g1 again, up to the grace bound.
        assert_eq!(refresh(&mut s, &g0, T0 + 100).unwrap(), g1);
        assert_eq!(refresh(&mut s, &g0, T0 + 100 + GRACE_SECS).unwrap(), g1);
        // Still no rotation happened: g1 is current and rotates to g2.
        let g2 = refresh(&mut s, &g1, T0 + 200).unwrap();
        assert_eq!(parse(&g2).generation, 2);
        // Just past the grace for g1 → reuse.
        assert_eq!(
            refresh(&mut s, &g1, T0 + 200 + GRACE_SECS + 1),
            Err(RefreshError::Reused)
        );
    }

    #[test]
    fn two_refreshes_with_the_same_token_rotate_exactly_once() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        let a = refresh(&mut s, &g0, T0 + 10).unwrap();
        let b = refresh(&mut s, &g0, T0 + 10).unwrap();
        assert_eq!(a, b);
        assert_eq!(parse(&a).generation, 1);
        // Both requests got a token that is current.
        let next = refresh(&mut s, &b, T0 + 20).unwrap();
        assert_eq!(parse(&next).generation, 2);
    }

    #[test]
    fn reuse_after_grace_revokes_that_family_only() {
        let mut s = UserSessions::default();
        let victim = create(&mut s, 1, T0);
        let bystander = create(&mut s, 2, T0);
        let stolen = victim.clone();
        let newest = refresh(&mut s, &victim, T0 + 10).unwrap();

        let late = T0 + 10 + GRACE_SECS + 1;
        assert_eq!(refresh(&mut s, &stolen, late), Err(RefreshError::Reused));
        assert!(!s.is_active(&victim.sid, late));
        // The newest token of the family dies with it...
        assert_eq!(refresh(&mut s, &newest, late), Err(RefreshError::Revoked));
        // ...and so does a replay of the stolen one.
        assert_eq!(refresh(&mut s, &stolen, late), Err(RefreshError::Revoked));
        // The user's other session is untouched.
        assert!(s.is_active(&bystander.sid, late));
        assert!(refresh(&mut s, &bystander, late).is_ok());
    }

    #[test]
    fn a_token_two_generations_back_is_reuse_even_within_grace() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        let g1 = refresh(&mut s, &g0, T0 + 1).unwrap();
        let g2 = refresh(&mut s, &g1, T0 + 2).unwrap();
        assert_eq!(refresh(&mut s, &g0, T0 + 3), Err(RefreshError::Reused));
        assert_eq!(refresh(&mut s, &g2, T0 + 4), Err(RefreshError::Revoked));
    }

    #[test]
    fn a_forged_secret_is_invalid_and_revokes_nothing() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        let g1 = refresh(&mut s, &g0, T0 + 1).unwrap();
        let zeros = URL_SAFE_NO_PAD.encode([0u8; 32]);
        // Forgeries of the current, a past (reuse-looking) and a future generation.
        for generation in ["0", "1", "2"] {
            let forged = with_part(&with_part(&g1.refresh_token, 3, generation), 4, &zeros);
            let forged = RefreshToken::parse(&forged).unwrap();
            assert_eq!(
                s.refresh(&forged, T0 + 1000, PEPPER),
                Err(RefreshError::Invalid)
            );
        }
        assert!(s.is_active(&g0.sid, T0 + 1000));
        assert_eq!(
            parse(&refresh(&mut s, &g1, T0 + 1000).unwrap()).generation,
            2
        );
    }

    #[test]
    fn a_token_checked_with_another_pepper_is_invalid() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        assert_eq!(
            s.refresh(&parse(&g0), T0 + 1, b"another pepper"),
            Err(RefreshError::Invalid)
        );
        assert!(refresh(&mut s, &g0, T0 + 2).is_ok());
    }

    #[test]
    fn unknown_sessions_other_users_and_future_generations_are_invalid() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        let unknown = with_part(&g0.refresh_token, 2, &"cd".repeat(16));
        assert_eq!(
            s.refresh(&RefreshToken::parse(&unknown).unwrap(), T0, PEPPER),
            Err(RefreshError::Invalid)
        );
        // A genuine token of another user's family with the same sid.
        let mut theirs = UserSessions::default();
        let foreign = theirs.create(OTHER_USER, "x", T0, [1; 16], [1; 32], PEPPER);
        assert_eq!(foreign.sid, g0.sid);
        assert_eq!(refresh(&mut s, &foreign, T0), Err(RefreshError::Invalid));
        // A generation we never reached, even with its genuine secret.
        let mut ahead = s.clone();
        let g1 = refresh(&mut ahead, &g0, T0 + 1).unwrap();
        assert_eq!(refresh(&mut s, &g1, T0 + 1), Err(RefreshError::Invalid));
        assert!(s.is_active(&g0.sid, T0 + 1));
    }

    #[test]
    fn an_idle_session_expires_exactly_at_the_idle_bound() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        let g1 = refresh(&mut s, &g0, T0 + 100).unwrap();
        let bound = T0 + 100 + IDLE_SECS;
        assert!(s.is_active(&g1.sid, bound - 1));
        assert!(!s.is_active(&g1.sid, bound));
        let mut just_before = s.clone();
        assert!(refresh(&mut just_before, &g1, bound - 1).is_ok());
        assert_eq!(refresh(&mut s, &g1, bound), Err(RefreshError::Expired));
        // Recorded, and asked again it still says expired.
        assert_eq!(refresh(&mut s, &g1, bound + 1), Err(RefreshError::Expired));
        assert!(!s.revoke(&g1.sid, bound + 1, RevokeReason::Logout));
    }

    #[test]
    fn a_session_expires_exactly_at_the_absolute_bound_however_much_it_is_used() {
        let mut s = UserSessions::default();
        let mut token = create(&mut s, 1, T0);
        let bound = T0 + ABSOLUTE_SECS;
        let mut now = T0;
        while now < bound - 1 {
            now = (now + IDLE_SECS / 2).min(bound - 1);
            token = refresh(&mut s, &token, now).unwrap();
        }
        assert!(s.is_active(&token.sid, bound - 1));
        assert_eq!(refresh(&mut s, &token, bound), Err(RefreshError::Expired));
        assert!(!s.is_active(&token.sid, bound));
    }

    #[test]
    fn revoke_and_revoke_all_end_only_active_sessions() {
        let mut s = UserSessions::default();
        let a = create(&mut s, 1, T0);
        let b = create(&mut s, 2, T0);
        let c = create(&mut s, 3, T0);
        assert!(s.revoke(&a.sid, T0 + 1, RevokeReason::Logout));
        assert!(!s.revoke(&a.sid, T0 + 2, RevokeReason::Logout));
        assert!(!s.revoke(&"ff".repeat(16), T0 + 2, RevokeReason::Logout));
        assert!(!s.is_active(&a.sid, T0 + 2));
        assert_eq!(refresh(&mut s, &a, T0 + 2), Err(RefreshError::Revoked));

        assert_eq!(s.revoke_all(T0 + 3, RevokeReason::LogoutAll), 2);
        assert!(!s.is_active(&b.sid, T0 + 3) && !s.is_active(&c.sid, T0 + 3));
        assert_eq!(s.revoke_all(T0 + 4, RevokeReason::LogoutAll), 0);
        assert_eq!(refresh(&mut s, &c, T0 + 4), Err(RefreshError::Revoked));
        assert!(!s.is_active("nope", T0));
    }

    #[test]
    fn a_removed_accounts_sessions_refuse_refresh_as_revoked_and_stay_so_when_stored() {
        let mut s = UserSessions::default();
        let a = create(&mut s, 1, T0);
        assert_eq!(s.revoke_all(T0 + 1, RevokeReason::AccountRemoved), 1);
        let mut s: UserSessions =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(refresh(&mut s, &a, T0 + 2), Err(RefreshError::Revoked));
        assert!(s.mirror(T0 + 2)[0].revoked);
    }

    #[test]
    fn the_mirror_keeps_revoked_sessions_for_the_access_token_lifetime_then_drops_them() {
        let mut s = UserSessions::default();
        let old = create(&mut s, 1, T0);
        let new = create(&mut s, 2, T0 + 10);
        s.revoke(&old.sid, T0 + 100, RevokeReason::Logout);

        let ids = |views: &[SessionView]| -> Vec<(String, bool)> {
            views.iter().map(|v| (v.id.clone(), v.revoked)).collect()
        };
        let shown = s.mirror(T0 + 100 + MIRROR_REVOKED_SECS);
        assert_eq!(
            ids(&shown),
            vec![(new.sid.clone(), false), (old.sid.clone(), true)]
        );
        assert_eq!(
            shown[0],
            SessionView {
                id: new.sid.clone(),
                label: "Pixel 8".into(),
                created_at: T0 + 10,
                last_refresh_at: T0 + 10,
                revoked: false,
            }
        );
        assert_eq!(
            ids(&s.mirror(T0 + 101 + MIRROR_REVOKED_SECS)),
            vec![(new.sid.clone(), false)]
        );
    }

    #[test]
    fn an_unrecorded_expiry_shows_in_the_mirror_from_the_expiry_instant() {
        let mut s = UserSessions::default();
        let g0 = create(&mut s, 1, T0);
        let expiry = T0 + IDLE_SECS;
        assert!(!s.mirror(expiry - 1)[0].revoked);
        assert!(s.mirror(expiry)[0].revoked);
        assert!(s.mirror(expiry + MIRROR_REVOKED_SECS)[0].revoked);
        assert!(s.mirror(expiry + MIRROR_REVOKED_SECS + 1).is_empty());
        // Recording it later (by a refresh) does not bring it back.
        assert_eq!(
            refresh(&mut s, &g0, expiry + 5000),
            Err(RefreshError::Expired)
        );
        assert!(s.mirror(expiry + 5000).is_empty());
    }

    #[test]
    fn one_session_too_many_evicts_the_least_recently_refreshed() {
        let mut s = UserSessions::default();
        let issued: Vec<Issued> = (0..MAX_ACTIVE_SESSIONS as u8)
            .map(|n| create(&mut s, n, T0 + i64::from(n)))
            .collect();
        // Everyone but #3 refreshes later, so #3 becomes the least recently
        // refreshed although #0 is the oldest.
        for (n, session) in issued.iter().enumerate() {
            if n != 3 {
                refresh(&mut s, session, T0 + 1000 + n as i64).unwrap();
            }
        }
        let now = T0 + 2000;
        assert_eq!(s.mirror(now).len(), MAX_ACTIVE_SESSIONS);
        let extra = create(&mut s, 0xee, now);
        assert!(!s.is_active(&issued[3].sid, now));
        assert!(s.is_active(&extra.sid, now));
        let active = s.mirror(now).iter().filter(|v| !v.revoked).count();
        assert_eq!(active, MAX_ACTIVE_SESSIONS);
        assert_eq!(refresh(&mut s, &issued[3], now), Err(RefreshError::Revoked));
        assert!(
            issued
                .iter()
                .enumerate()
                .all(|(n, i)| n == 3 || s.is_active(&i.sid, now))
        );
    }

    /// A full user: `MAX_ACTIVE_SESSIONS` sessions, #0 the least recently
    /// refreshed, then one more session, which evicted #0.
    fn full_then_one_more(s: &mut UserSessions, now: i64) -> (Vec<Issued>, Issued) {
        let issued: Vec<Issued> = (0..MAX_ACTIVE_SESSIONS as u8)
            .map(|n| create(s, n, T0 + i64::from(n)))
            .collect();
        let extra = create(s, 0xee, now);
        assert!(!s.is_active(&issued[0].sid, now));
        (issued, extra)
    }

    #[test]
    fn an_evicted_session_logged_out_stays_ended_when_its_evictor_is_withdrawn() {
        let mut s = UserSessions::default();
        let now = T0 + 2000;
        let (issued, extra) = full_then_one_more(&mut s, now);
        // The evicted session's holder signs out (204: it was not active).
        assert!(!s.revoke(&issued[0].sid, now + 1, RevokeReason::Logout));
        assert!(s.withdraw(&extra.sid, now + 2));
        assert!(
            !s.is_active(&issued[0].sid, now + 2),
            "the logout was undone"
        );
        assert_eq!(
            refresh(&mut s, &issued[0], now + 2),
            Err(RefreshError::Revoked)
        );
        // The others it evicted, none here, and the rest are as they were.
        assert!(issued[1..].iter().all(|i| s.is_active(&i.sid, now + 2)));
    }

    #[test]
    fn a_withdrawn_session_is_gone_and_gives_back_what_it_evicted() {
        let mut s = UserSessions::default();
        let now = T0 + 2000;
        let (issued, extra) = full_then_one_more(&mut s, now);
        // Stored and loaded in between, as the object does.
        let mut s: UserSessions =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert!(s.withdraw(&extra.sid, now + 1));
        assert!(!s.is_active(&extra.sid, now + 1));
        assert_eq!(refresh(&mut s, &extra, now + 1), Err(RefreshError::Invalid));
        assert!(issued.iter().all(|i| s.is_active(&i.sid, now + 1)));
        assert_eq!(
            s.mirror(now + 1).len(),
            MAX_ACTIVE_SESSIONS,
            "none listed as ended"
        );
        assert!(refresh(&mut s, &issued[0], now + 2).is_ok());
        assert!(!s.withdraw(&extra.sid, now + 2), "once");
    }

    #[test]
    fn a_session_answered_or_ended_since_is_not_withdrawn() {
        let now = T0 + 2000;
        // Refreshed: its client had the answer.
        let mut s = UserSessions::default();
        let (issued, extra) = full_then_one_more(&mut s, now);
        refresh(&mut s, &extra, now + 1).unwrap();
        assert!(!s.withdraw(&extra.sid, now + 2));
        assert!(s.is_active(&extra.sid, now + 2));
        assert!(!s.is_active(&issued[0].sid, now + 2));
        // Signed out everywhere meanwhile: what it evicted stays ended.
        let mut s = UserSessions::default();
        let (issued, extra) = full_then_one_more(&mut s, now);
        s.revoke_all(now + 1, RevokeReason::LogoutAll);
        assert!(!s.withdraw(&extra.sid, now + 2));
        assert!(issued.iter().all(|i| !s.is_active(&i.sid, now + 2)));
    }

    #[test]
    fn a_withdrawal_gives_back_no_more_than_the_limit() {
        let now = T0 + 2000;
        let mut s = UserSessions::default();
        let (issued, extra) = full_then_one_more(&mut s, now);
        // Another sign-in meanwhile evicted #1 and stays; withdrawing the
        // first brings #0 back, not #1, and keeps the user at the limit.
        let later = create(&mut s, 0xef, now + 1);
        assert!(s.withdraw(&extra.sid, now + 2));
        assert!(s.is_active(&issued[0].sid, now + 2));
        assert!(!s.is_active(&issued[1].sid, now + 2));
        assert!(s.is_active(&later.sid, now + 2));
        assert!(s.is_full(now + 2));
        let active = s.mirror(now + 2).iter().filter(|v| !v.revoked).count();
        assert_eq!(active, MAX_ACTIVE_SESSIONS);
    }

    #[test]
    fn a_user_is_full_at_the_session_limit() {
        let mut s = UserSessions::default();
        for n in 0..MAX_ACTIVE_SESSIONS as u8 - 1 {
            create(&mut s, n, T0);
        }
        assert!(!s.is_full(T0));
        create(&mut s, 0xfe, T0);
        assert!(s.is_full(T0), "the next session evicts one");
    }

    #[test]
    fn prune_forgets_families_a_day_after_they_end_and_bounds_the_state() {
        let mut s = UserSessions::default();
        let kept = create(&mut s, 1, T0);
        let revoked = create(&mut s, 2, T0);
        s.revoke(&revoked.sid, T0 + 10, RevokeReason::Logout);

        s.prune(T0 + 10 + FORGET_AFTER_SECS);
        assert_eq!(s.families.len(), 2);
        s.prune(T0 + 11 + FORGET_AFTER_SECS);
        assert_eq!(s.families.len(), 1);
        assert!(s.is_active(&kept.sid, T0 + 11 + FORGET_AFTER_SECS));
        // A forgotten family's token is simply unknown.
        assert_eq!(
            refresh(&mut s, &revoked, T0 + 11 + FORGET_AFTER_SECS),
            Err(RefreshError::Invalid)
        );

        // Logging in in a loop within one day: the state stays bounded.
        let mut s = UserSessions::default();
        for n in 0..1000u32 {
            let mut sid = [0u8; 16];
            sid[..4].copy_from_slice(&n.to_be_bytes());
            s.create(USER, "loop", T0 + i64::from(n), sid, [9; 32], PEPPER);
        }
        assert!(s.families.len() <= MAX_ACTIVE_SESSIONS + MAX_ENDED_KEPT + 1);
        assert_eq!(
            s.mirror(T0 + 1000).iter().filter(|v| !v.revoked).count(),
            MAX_ACTIVE_SESSIONS
        );
        // And an expired family is forgotten a day after its expiry.
        let mut s = UserSessions::default();
        create(&mut s, 1, T0);
        s.prune(T0 + IDLE_SECS + FORGET_AFTER_SECS);
        assert_eq!(s.families.len(), 1);
        s.prune(T0 + IDLE_SECS + FORGET_AFTER_SECS + 1);
        assert!(s.families.is_empty());
    }

    #[test]
    fn labels_are_cleaned_and_cut() {
        assert_eq!(clean_label("  My\tPhone\u{7}\n "), "MyPhone");
        assert_eq!(clean_label(" \u{0} \r\n"), UNNAMED_LABEL);
        assert_eq!(clean_label(""), UNNAMED_LABEL);
        assert_eq!(clean_label("\u{202e}enohP\u{200b}"), "enohP");
        assert_eq!(clean_label(" \u{200d}\u{feff} "), UNNAMED_LABEL);
        assert_eq!(clean_label("\u{200d} \u{200c}"), UNNAMED_LABEL);
        let long = "é".repeat(MAX_LABEL_CHARS + 10);
        assert_eq!(clean_label(&long).chars().count(), MAX_LABEL_CHARS);
        let spaced = format!("{} tail", "a".repeat(MAX_LABEL_CHARS - 1));
        assert_eq!(clean_label(&spaced), "a".repeat(MAX_LABEL_CHARS - 1));
    }

    #[test]
    fn the_state_round_trips_through_json_with_base64url_nonces() {
        let mut s = UserSessions::default();
        let a = create(&mut s, 1, T0);
        let b = create(&mut s, 2, T0);
        let a1 = refresh(&mut s, &a, T0 + 5).unwrap();
        s.revoke(&b.sid, T0 + 6, RevokeReason::LogoutAll);

        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(&URL_SAFE_NO_PAD.encode([1u8; 32])), "{json}");
        assert!(json.contains("\"logout_all\""), "{json}");
        let mut back: UserSessions = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // The restored state re-derives the same tokens.
        assert_eq!(refresh(&mut back, &a, T0 + 7).unwrap(), a1);
        assert_eq!(
            serde_json::from_str::<UserSessions>("{}").unwrap(),
            UserSessions::default()
        );
        let short_nonce = json.replace(&URL_SAFE_NO_PAD.encode([1u8; 32]), "AAAA");
        assert!(serde_json::from_str::<UserSessions>(&short_nonce).is_err());
    }

    #[test]
    fn debug_output_shows_no_nonce_or_token_secrets() {
        let mut s = UserSessions::default();
        let issued = s.create(USER, "Pixel 8", T0, [1; 16], [0xab; 32], PEPPER);
        let secret = issued.refresh_token.rsplit('.').next().unwrap().to_owned();
        let debug = format!("{s:?} {:?} {issued:?} {:?}", s.clone(), parse(&issued));
        assert!(!debug.contains("171"), "{debug}");
        assert!(
            !debug.contains(&URL_SAFE_NO_PAD.encode([0xab; 32])),
            "{debug}"
        );
        assert!(!debug.contains(&secret), "{debug}");
        assert!(debug.contains("redacted"));
    }

    #[test]
    fn error_codes_are_stable() {
        let codes: Vec<&str> = [
            RefreshError::Malformed,
            RefreshError::Invalid,
            RefreshError::Revoked,
            RefreshError::Expired,
            RefreshError::Reused,
        ]
        .iter()
        .map(RefreshError::code)
        .collect();
        assert_eq!(
            codes,
            [
                "refresh_token_malformed",
                "refresh_token_invalid",
                "refresh_token_revoked",
                "refresh_token_expired",
                "refresh_token_reused",
            ]
        );
    }

    // --- sign-ins under an Idempotency-Key ---------------------------------

    /// A keyed sign-in as the user's object runs it: reopen, or open and
    /// record. Returns the answer, or the refusal.
    fn sign_in(
        s: &mut UserSessions,
        records: &mut Records,
        key: &str,
        fp: &str,
        n: u8,
        now: i64,
    ) -> Result<Issued, Reopen> {
        match s.reopen(records, key, fp, now, PEPPER) {
            Reopen::Again(issued) => Ok(issued),
            Reopen::Open => {
                let issued = create(s, n, now);
                UserSessions::opened(records, key, &issued.sid, now);
                Ok(issued)
            }
            refused => Err(refused),
        }
    }

    fn active_count(s: &UserSessions, now: i64) -> usize {
        s.mirror(now).iter().filter(|v| !v.revoked).count()
    }

    #[test]
    fn a_retried_keyed_sign_in_gets_the_first_session_and_token_again() {
        let (mut s, mut records) = (UserSessions::default(), Records::default());
        let first = sign_in(&mut s, &mut records, "k", "fp", 1, T0).unwrap();
        let again = sign_in(&mut s, &mut records, "k", "fp", 2, T0 + 30).unwrap();
        assert_eq!(again, first, "the same session and refresh token");
        assert_eq!(active_count(&s, T0 + 30), 1, "no second session");
        // The token answered twice is one token: it refreshes once.
        let next = refresh(&mut s, &again, T0 + 40).unwrap();
        assert_eq!(parse(&next).generation, 1);
        // Another key is another sign-in.
        let other = sign_in(&mut s, &mut records, "k2", "fp", 3, T0 + 50).unwrap();
        assert_ne!(other.sid, first.sid);
    }

    #[test]
    fn a_session_a_retry_opened_itself_is_marked_as_handed_out() {
        let mut s = UserSessions::default();
        let opened = create(&mut s, 1, T0);
        assert!(!s.handed_out_again(T0));
        s.mark_handed_out(&opened.sid);
        assert!(s.handed_out_again(T0));
        assert!(!s.withdraw(&opened.sid, T0 + 1));
        assert!(s.revoke(&opened.sid, T0 + 2, RevokeReason::Logout));
        assert!(!s.handed_out_again(T0 + 2), "only active sessions count");
    }

    #[test]
    fn a_session_handed_out_again_to_a_retry_is_not_withdrawn() {
        let (mut s, mut records) = (UserSessions::default(), Records::default());
        let first = sign_in(&mut s, &mut records, "k", "fp", 1, T0).unwrap();
        // The retry is answered with the session while the first request
        // is still signing; then the first fails and withdraws it.
        assert_eq!(
            sign_in(&mut s, &mut records, "k", "fp", 2, T0 + 1).unwrap(),
            first
        );
        // Stored and loaded in between, as the object does.
        let mut s: UserSessions =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert!(s.handed_out_again(T0 + 2));
        assert!(!s.withdraw(&first.sid, T0 + 2));
        assert!(s.is_active(&first.sid, T0 + 2));
        assert!(refresh(&mut s, &first, T0 + 3).is_ok());
        // A session no retry was given is withdrawn as before.
        let other = sign_in(&mut s, &mut records, "k2", "fp", 3, T0 + 4).unwrap();
        assert!(s.withdraw(&other.sid, T0 + 5));
    }

    #[test]
    fn a_keyed_sign_in_with_another_request_is_a_mismatch_and_changes_nothing() {
        let (mut s, mut records) = (UserSessions::default(), Records::default());
        sign_in(&mut s, &mut records, "k", "fp", 1, T0).unwrap();
        let (sessions, kept) = (s.clone(), records.clone());
        assert_eq!(
            sign_in(&mut s, &mut records, "k", "other fp", 2, T0 + 1),
            Err(Reopen::Mismatch)
        );
        assert_eq!((s, records), (sessions, kept));
    }

    #[test]
    fn a_key_whose_session_was_refreshed_or_ended_opens_a_new_session() {
        let (mut s, mut records) = (UserSessions::default(), Records::default());
        let first = sign_in(&mut s, &mut records, "k", "fp", 1, T0).unwrap();
        refresh(&mut s, &first, T0 + 10).unwrap();
        // Its first token is spent: answering with it would be reuse.
        let second = sign_in(&mut s, &mut records, "k", "fp", 2, T0 + 20).unwrap();
        assert_ne!(second.sid, first.sid);
        assert_eq!(parse(&second).generation, 0);
        // The record now names the new session.
        assert_eq!(
            sign_in(&mut s, &mut records, "k", "fp", 3, T0 + 21).unwrap(),
            second
        );
        // Once that session ends (a logout, or the undo of an unanswered
        // sign-in), the key opens another.
        assert!(s.revoke(&second.sid, T0 + 30, RevokeReason::Logout));
        let third = sign_in(&mut s, &mut records, "k", "fp", 4, T0 + 31).unwrap();
        assert!(third.sid != first.sid && third.sid != second.sid);
        assert_eq!(active_count(&s, T0 + 31), 2);
    }

    #[test]
    fn a_keyed_sign_in_is_replayed_for_a_day_at_most() {
        let (mut s, mut records) = (UserSessions::default(), Records::default());
        let first = sign_in(&mut s, &mut records, "k", "fp", 1, T0).unwrap();
        let day = crate::domain::idempotency::RETENTION_SECS;
        assert_eq!(
            sign_in(&mut s, &mut records, "k", "fp", 2, T0 + day - 1).unwrap(),
            first
        );
        let later = sign_in(&mut s, &mut records, "k", "fp", 3, T0 + day).unwrap();
        assert_ne!(later.sid, first.sid);
    }

    #[test]
    fn a_key_in_flight_for_the_same_request_is_refused_and_not_taken_over() {
        let (mut s, mut records) = (UserSessions::default(), Records::default());
        assert_eq!(records.begin("k", "fp", T0), Begin::Proceed);
        assert_eq!(
            sign_in(&mut s, &mut records, "k", "fp", 1, T0 + 1),
            Err(Reopen::InFlight)
        );
        assert_eq!(active_count(&s, T0 + 1), 0);
    }
}

/// Properties over generated refresh tokens (shrinking to a minimal one).
/// Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const PEPPER: &[u8] = b"test pepper, 32 bytes or more!!!";
    const USER: &str = "0b6f3c2e-8f1a-4d2b-9c3e-5a7b9d1f2e4c";
    const T0: i64 = 1_000_000;

    fn token() -> impl Strategy<Value = RefreshToken> {
        (
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "[0-9a-f]{32}",
            any::<u32>(),
            any::<[u8; SECRET_LEN]>(),
        )
            .prop_map(|(user_id, sid, generation, secret)| RefreshToken {
                user_id,
                sid,
                generation,
                secret,
            })
    }

    /// A valid wire token with one character replaced, inserted or removed.
    fn mutated_wire() -> impl Strategy<Value = String> {
        (
            token(),
            any::<prop::sample::Index>(),
            prop::sample::select(vec![
                '0', '9', 'a', 'f', 'g', 'A', '-', '_', '.', '=', '+', ' ',
            ]),
            0..3,
        )
            .prop_map(|(t, at, c, how)| {
                let mut chars: Vec<char> = t.to_wire().chars().collect();
                let i = at.index(chars.len());
                match how {
                    0 => chars[i] = c,
                    1 => chars.insert(i, c),
                    _ => {
                        chars.remove(i);
                    }
                }
                chars.into_iter().collect()
            })
    }

    /// Another spelling of a real token's parts: a generation with a
    /// leading zero or a sign, upper-case hex, a padded secret, the other
    /// base64 alphabet, non-zero unused bits at the end of the secret.
    fn respelled() -> impl Strategy<Value = (RefreshToken, String)> {
        (token(), 0..6).prop_map(|(t, how)| {
            let secret = URL_SAFE_NO_PAD.encode(t.secret);
            let (user, sid, generation) = (&t.user_id, &t.sid, t.generation);
            let wire = match how {
                0 => format!("v1.{user}.{sid}.0{generation}.{secret}"),
                1 => format!("v1.{user}.{sid}.+{generation}.{secret}"),
                2 => format!("v1.{}.{sid}.{generation}.{secret}", user.to_uppercase()),
                3 => format!("v1.{user}.{sid}.{generation}.{secret}="),
                4 => {
                    let standard = secret.replace('-', "+").replace('_', "/");
                    format!("v1.{user}.{sid}.{generation}.{standard}")
                }
                _ => {
                    // The last of 43 characters carries 4 bits and 2 unused
                    // ones; setting the lowest unused bit respells the bytes.
                    let last = secret.as_bytes()[42];
                    let alphabet =
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                    let value = alphabet.iter().position(|c| *c == last).unwrap();
                    let odd = alphabet[value | 1] as char;
                    format!("v1.{user}.{sid}.{generation}.{}{odd}", &secret[..42])
                }
            };
            (t, wire)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every other spelling of a token is refused, so a token has one.
        #[test]
        fn other_spellings_of_a_token_are_malformed((t, wire) in respelled()) {
            prop_assume!(wire != t.to_wire());
            prop_assert_eq!(RefreshToken::parse(&wire), Err(RefreshError::Malformed));
        }

        /// Formatting then parsing gives the same token back.
        #[test]
        fn format_then_parse_round_trips(t in token()) {
            let wire = t.to_wire();
            prop_assert!(wire.len() <= MAX_TOKEN_LEN);
            prop_assert_eq!(RefreshToken::parse(&wire), Ok(t));
        }

        /// One token, one spelling: whatever parses formats back to exactly
        /// the same text, including near-misses of real tokens.
        #[test]
        fn whatever_parses_formats_back_to_the_same_text(
            s in prop_oneof![mutated_wire(), ".{0,130}"],
        ) {
            if let Ok(t) = RefreshToken::parse(&s) {
                prop_assert_eq!(t.to_wire(), s);
            }
        }

        /// A token we did not issue never refreshes and never changes the
        /// state (so a forger cannot revoke anyone's session either): the
        /// real user and session with a guessed secret, or the real token
        /// with one character changed.
        #[test]
        fn a_forged_token_is_invalid_and_changes_nothing(
            generation in 0u32..3,
            secret in any::<[u8; SECRET_LEN]>(),
            at in any::<prop::sample::Index>(),
            c in prop::sample::select(vec!['0', 'f', 'g', 'A', 'Z', '-', '_', '.']),
            guess in any::<bool>(),
            later in 0i64..100,
        ) {
            let mut sessions = UserSessions::default();
            let issued = sessions.create(USER, "phone", T0, [7; 16], [9; 32], PEPPER);
            let forged = if guess {
                RefreshToken { user_id: USER.into(), sid: issued.sid.clone(), generation, secret }
                    .to_wire()
            } else {
                let mut chars: Vec<char> = issued.refresh_token.chars().collect();
                let i = at.index(chars.len());
                chars[i] = c;
                chars.into_iter().collect()
            };
            prop_assume!(forged != issued.refresh_token);
            let Ok(token) = RefreshToken::parse(&forged) else {
                return Ok(());
            };
            let before = sessions.clone();
            prop_assert_eq!(
                sessions.refresh(&token, T0 + later, PEPPER),
                Err(RefreshError::Invalid)
            );
            prop_assert_eq!(sessions, before);
        }
    }
}
