//! SQL text for PostgreSQL's simple query protocol.
//!
//! Behind Hyperdrive's transaction-mode pooling the extended protocol (prepared
//! or typed statements) has known failure modes, so the worker sends plain
//! query strings. Every value that comes from outside is quoted here, the way
//! libpq's `PQescapeLiteral` does: an `E'...'` literal with backslashes and
//! quotes doubled, which is correct whatever `standard_conforming_strings` says.
//! NUL cannot be represented in a PostgreSQL text value and is refused.

/// A NUL byte was found in a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NulInValue;

/// Quotes `value` as a string literal.
pub fn literal(value: &str) -> Result<String, NulInValue> {
    if value.contains('\0') {
        return Err(NulInValue);
    }
    let mut out = String::with_capacity(value.len() + 4);
    out.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    Ok(out)
}

/// A UUID literal, after checking the canonical lowercase hyphenated shape, so
/// it can be used without quoting concerns.
pub fn uuid(value: &str) -> Option<String> {
    let b = value.as_bytes();
    let shape_ok = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        });
    shape_ok.then(|| format!("'{value}'::uuid"))
}

/// A server's WireGuard endpoint from the `servers` row `s`, as
/// `domain::catalogue::Server::endpoint` writes it (an IPv6 address in
/// brackets).
pub const SERVER_ENDPOINT: &str = "CASE WHEN strpos(s.hostname, ':') > 0 \
     THEN '[' || s.hostname || ']' ELSE s.hostname END || ':' || s.port";

/// Removes the user `user` (a [`uuid`] literal) made by a sign-up that could
/// not open its session, unless a device or a subscription is attached to it
/// by then; the one row's text is `true` if it was removed.
///
/// The user's row is locked first, in a statement of its own: a registration
/// or subscription being committed holds a lock on that row, and in one
/// statement the `NOT EXISTS` checks would read a snapshot from before it
/// committed, and then delete the user (cascading to the device or
/// subscription just acknowledged) once the lock was released. The second
/// statement's snapshot is taken after the lock, so it sees them. Each
/// statement is bounded in the database ([`UNDO_STATEMENT_LIMIT_MS`]): the
/// undo holds the user's object while it runs, and a removal still running
/// in the database after the Worker gave up on it could commit after the
/// hold ended.
pub fn delete_new_user(user: &str) -> String {
    format!(
        "BEGIN;
         SET LOCAL statement_timeout = {UNDO_STATEMENT_LIMIT_MS};
         SELECT 1 FROM users WHERE id = {user} FOR UPDATE;
         WITH del AS (DELETE FROM users WHERE id = {user}
                        AND NOT EXISTS (SELECT 1 FROM devices WHERE user_id = {user})
                        AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE user_id = {user})
                      RETURNING id)
         SELECT (EXISTS (SELECT 1 FROM del))::text;
         COMMIT;"
    )
}

/// Deletes the account `user` (a [`uuid`] literal) at its owner's request,
/// with its devices (whose tunnel addresses go to quarantine, V12) and
/// subscriptions (`ON DELETE CASCADE`), unless one of its subscriptions may
/// still charge it: one past due, unpaid, incomplete or paused (an open
/// invoice can still be collected, set to end or not), or trialing or active
/// and not set to end with its period (deleting the account would not stop
/// the billing provider). The one row's text is the JSON
/// string `"deleted"`, `"billing"` (nothing deleted) or `"absent"` (no such
/// account: deleted already). The user's row is locked first, as in
/// [`delete_new_user`], so that a subscription being committed is seen.
pub fn delete_account(user: &str) -> String {
    format!(
        "BEGIN;
         SELECT 1 FROM users WHERE id = {user} FOR UPDATE;
         WITH billing AS (SELECT 1 FROM subscriptions
                          WHERE user_id = {user}
                            AND (status IN ('past_due', 'unpaid', 'incomplete', 'paused')
                                 OR (status IN ('trialing', 'active')
                                     AND NOT cancel_at_period_end))),
              del AS (DELETE FROM users WHERE id = {user}
                        AND NOT EXISTS (SELECT 1 FROM billing)
                      RETURNING id)
         SELECT to_json(CASE WHEN EXISTS (SELECT 1 FROM del) THEN 'deleted'
                             WHEN EXISTS (SELECT 1 FROM billing) THEN 'billing'
                             ELSE 'absent' END)::text;
         COMMIT;"
    )
}

/// How long a deleted device's tunnel address rests before another device is
/// given it (an SQL interval): long enough for every VPN server to have
/// dropped the deleted device's peer, which still routes the address to the
/// old key (migration V12).
pub const ADDRESS_QUARANTINE: &str = "24 hours";

/// The JSON of a `devices` row aliased `d`, as the API shows a device.
pub const DEVICE_JSON: &str =
    "json_build_object('id', d.id, 'name', d.name, 'public_key', d.public_key,
    'ipv4_address', host(d.ipv4_address), 'ipv6_address', host(d.ipv6_address),
    'created_at', extract(epoch FROM d.created_at)::bigint)";

/// How long each statement of [`delete_new_user`] may run in the database:
/// its two together under the Worker's own bound on the query (5 s), so
/// that a removal the Worker gave up on has ended in the database by then
/// too.
pub const UNDO_STATEMENT_LIMIT_MS: u32 = 2_000;

/// The advisory-lock class (the first key of PostgreSQL's two-key form)
/// under which registrations and key rotations are serialised per public
/// key ([`lock_device_key`]); the second key is the key's `hashtext`.
pub const DEVICE_KEY_LOCKS: i32 = 0x6b65_7931;

/// The statement that takes the transaction-scoped lock on the public key
/// `key` (a [`literal`]) that registrations and key rotations of it take.
pub fn lock_device_key(key: &str) -> String {
    format!("SELECT pg_advisory_xact_lock({DEVICE_KEY_LOCKS}, hashtext({key}));")
}

/// Registers the device `name` with the WireGuard key `key` for the user
/// `user` ([`literal`]s, and a [`uuid`]) unless they have `limit` devices,
/// in one transaction that locks the user's row; its one row is a JSON
/// object:
/// - `device`: the device added, or `null`;
/// - `existing`: the user's device with this key from before the statement
///   (an earlier attempt committed and its answer was lost), or `null`;
/// - `taken`: whether another user's device has the key;
/// - `gone`: whether the user's row is gone;
/// - `devices`: the user's devices after the statement, oldest first.
///
/// The tunnel address number is taken only for a device that is added: the
/// longest-freed number of a deleted device whose quarantine
/// ([`ADDRESS_QUARANTINE`]) has passed, else a new one from
/// `device_address_seq`. A sequence value is never given back, so one drawn
/// for a registration refused by the limit or the key would be lost to the
/// whole fleet, and a client retrying one could use up the range. Two
/// registrations at once take different freed numbers (`SKIP LOCKED`); a
/// registration that fails puts its freed number back with its rollback. A
/// freed number that a device holds (migration V12 may free one a
/// registration in flight had drawn) is passed over. The
/// addresses are the ranges' bases ([`tunnel_bases`]) plus that number, as
/// [`tunnel_addresses`] computes them. Two users adding one key at the same
/// moment are serialised on the key (a transaction-scoped advisory lock in
/// the [`DEVICE_KEY_LOCKS`] class, after the user's row): the second sees
/// the first's device and draws no number. A user whose row is gone (the
/// account deleted while one of its tokens still passes) adds nothing and
/// draws nothing, and comes back as `gone`.
///
/// [`tunnel_bases`]: crate::domain::device::tunnel_bases
/// [`tunnel_addresses`]: crate::domain::device::tunnel_addresses
pub fn insert_device(user: &str, name: &str, key: &str, limit: u32) -> String {
    let (v4, v6) = crate::domain::device::tunnel_bases();
    let lock = lock_device_key(key);
    format!(
        "BEGIN;
         SELECT 1 FROM users WHERE id = {user} FOR UPDATE;
         {lock}
         WITH ok AS (
             SELECT WHERE EXISTS (SELECT 1 FROM users WHERE id = {user})
               AND (SELECT count(*) FROM devices WHERE user_id = {user}) < {limit}
               AND NOT EXISTS (SELECT 1 FROM devices WHERE public_key = {key})),
         reused AS (
             DELETE FROM freed_tunnel_addresses WHERE n = (
                 SELECT f.n FROM freed_tunnel_addresses f
                 WHERE f.freed_at <= now() - interval '{ADDRESS_QUARANTINE}' AND EXISTS (SELECT FROM ok)
                   AND NOT EXISTS (SELECT 1 FROM devices WHERE ipv4_address = '{v4}'::inet + f.n)
                 ORDER BY f.freed_at, f.n LIMIT 1 FOR UPDATE OF f SKIP LOCKED)
             RETURNING n),
         drawn AS (
             SELECT n FROM reused
             UNION ALL
             SELECT nextval('device_address_seq') FROM ok WHERE NOT EXISTS (SELECT FROM reused)),
         ins AS (
             INSERT INTO devices (user_id, name, public_key, ipv4_address, ipv6_address)
             SELECT {user}, {name}, {key}, '{v4}'::inet + n, '{v6}'::inet + n FROM drawn
             RETURNING *)
         SELECT json_build_object(
             'device', (SELECT {DEVICE_JSON} FROM ins d),
             'existing', (SELECT {DEVICE_JSON} FROM devices d
                          WHERE d.user_id = {user} AND d.public_key = {key}),
             'taken', EXISTS (SELECT 1 FROM devices WHERE public_key = {key} AND user_id <> {user}),
             'gone', NOT EXISTS (SELECT 1 FROM users WHERE id = {user}),
             'devices', (SELECT coalesce(json_agg({DEVICE_JSON} ORDER BY d.created_at, d.id), '[]'::json)
                         FROM (SELECT * FROM devices WHERE user_id = {user}
                               UNION ALL SELECT * FROM ins) d))::text;
         COMMIT;"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        assert_eq!(literal("plain").unwrap(), "E'plain'");
        assert_eq!(literal("o'brien").unwrap(), "E'o''brien'");
        assert_eq!(literal(r"a\b").unwrap(), r"E'a\\b'");
        assert_eq!(
            literal(r"\'; DROP TABLE users; --").unwrap(),
            r"E'\\''; DROP TABLE users; --'"
        );
        assert_eq!(literal("").unwrap(), "E''");
        assert_eq!(literal("émoji 🙂").unwrap(), "E'émoji 🙂'");
    }

    #[test]
    fn nul_is_refused() {
        assert_eq!(literal("a\0b"), Err(NulInValue));
    }

    #[test]
    fn only_canonical_uuids_are_accepted() {
        assert_eq!(
            uuid("0b0e7a4e-2f3c-4d5e-8f90-123456789abc").unwrap(),
            "'0b0e7a4e-2f3c-4d5e-8f90-123456789abc'::uuid"
        );
        for bad in [
            "",
            "0B0E7A4E-2F3C-4D5E-8F90-123456789ABC",
            "0b0e7a4e2f3c4d5e8f90123456789abc",
            "0b0e7a4e-2f3c-4d5e-8f90-123456789ab'",
        ] {
            assert_eq!(uuid(bad), None, "{bad}");
        }
    }
}
