//! After the whole run: the logs of every worker it started must contain none
//! of the secrets the run used: the passwords of the accounts it created, the
//! access and refresh tokens it was issued, and the development secrets the
//! worker ran with (signing-key seeds, refresh-token pepper, Stripe webhook
//! secrets, admin token) and the database password in its Hyperdrive
//! connection string. So that the search is not vacuous, the logs must also
//! carry the request ids of the requests the run made, and the same search
//! must find one of them.

use crate::common::{SEEN, dev_var};
use std::collections::HashSet;

/// Request ids the logs must show, as a share of the ids the run saw (lines
/// printed as a worker is being stopped can be cut off).
const MIN_IDS_LOGGED: f64 = 0.9;

/// The development secrets, named.
fn configured_secrets() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let keys: serde_json::Value =
        serde_json::from_str(&dev_var("JWT_SIGNING_KEYS")).expect("JWT_SIGNING_KEYS is JSON");
    for key in keys.as_array().expect("a key list") {
        let seed = key["seed"].as_str().expect("seed").to_owned();
        out.push((format!("signing key seed of kid {}", key["kid"]), seed));
    }
    out.push((
        "REFRESH_TOKEN_PEPPER".into(),
        dev_var("REFRESH_TOKEN_PEPPER"),
    ));
    for (i, s) in dev_var("STRIPE_WEBHOOK_SECRET").split(',').enumerate() {
        out.push((format!("STRIPE_WEBHOOK_SECRET #{i}"), s.trim().to_owned()));
    }
    out.push(("ADMIN_TOKEN".into(), dev_var("ADMIN_TOKEN")));
    out.push((
        "the database password".into(),
        crate::support::DB_PASSWORD.into(),
    ));
    // The Worker only ever sees it in a URL, percent-encoded, and its client
    // prepares it for the handshake.
    out.push((
        "the database password, percent-encoded".into(),
        crate::support::db_password_in_url(),
    ));
    out.push((
        "the database password, prepared (NFKC)".into(),
        crate::support::DB_PASSWORD_PREPARED.into(),
    ));
    out
}

/// The ids logged as `"request_id":"<id>"`.
fn logged_request_ids(logs: &str) -> HashSet<&str> {
    const FIELD: &str = "\"request_id\":\"";
    logs.match_indices(FIELD)
        .filter_map(|(at, _)| {
            let rest = &logs[at + FIELD.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .collect()
}

fn shown(secret: &str) -> String {
    let head: String = secret.chars().take(12).collect();
    format!("{head}… ({} chars)", secret.len())
}

/// Prints what it checked; false (naming each leak) when a secret is in a log.
pub fn no_secrets_in_logs() -> bool {
    let logs = crate::support::finished_logs().join("\n");
    let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.request_ids.is_empty() {
        eprintln!("log check: this run made no requests through the helpers; nothing to check");
        return true;
    }
    let logged = logged_request_ids(&logs);
    let found = seen
        .request_ids
        .iter()
        .filter(|id| logged.contains(id.as_str()))
        .count();
    let share = found as f64 / seen.request_ids.len() as f64;
    let mut ok = true;
    if share < MIN_IDS_LOGGED {
        eprintln!(
            "log check: only {found} of the run's {} request ids are in the worker logs ({} bytes): \
             these are not the run's logs, or request lines are missing",
            seen.request_ids.len(),
            logs.len()
        );
        ok = false;
    }

    let mut secrets = configured_secrets();
    secrets.extend(
        seen.passwords
            .iter()
            .map(|p| ("the password of a test account".to_owned(), p.clone())),
    );
    secrets.extend(seen.tokens.iter().map(|t| {
        let what = if t.starts_with("v1.") {
            "a refresh token"
        } else {
            "an access token"
        };
        (what.to_owned(), t.clone())
    }));
    for (what, value) in &secrets {
        assert!(value.len() >= 8, "{what} is too short to search for");
    }
    // The search proves itself on a string known to be in the logs: a
    // logged request id, as the last pattern.
    let canary = seen
        .request_ids
        .iter()
        .find(|id| logged.contains(id.as_str()))
        .cloned();
    let patterns = secrets
        .iter()
        .map(|(_, v)| v.as_str())
        .chain(canary.as_deref());
    let finder = aho_corasick::AhoCorasick::new(patterns).expect("secret patterns");
    let mut hits: Vec<usize> = finder
        .find_overlapping_iter(&logs)
        .map(|m| m.pattern().as_usize())
        .collect();
    hits.sort_unstable();
    hits.dedup();
    if canary.is_some() && hits.last() != Some(&secrets.len()) {
        eprintln!("log check: the search did not find a request id known to be logged");
        ok = false;
    }
    let leaked: Vec<usize> = hits.into_iter().filter(|i| *i < secrets.len()).collect();
    for i in &leaked {
        let (what, value) = &secrets[*i];
        eprintln!("log check: {what} is in the worker logs: {}", shown(value));
        ok = false;
    }
    eprintln!(
        "log check: {} secrets ({} passwords, {} tokens, {} configured) searched in {} bytes of worker logs; \
         {found} of {} request ids found; {} leaked",
        secrets.len(),
        seen.passwords.len(),
        seen.tokens.len(),
        secrets.len() - seen.passwords.len() - seen.tokens.len(),
        logs.len(),
        seen.request_ids.len(),
        leaked.len()
    );
    ok
}

/// How the logged cause of a 503 begins when the runtime refuses to import or
/// derive the signing keys (`edge::webcrypto`): every request that signs or
/// verifies then answers 503.
/// The tests that sign would fail too, but this names the cause, so the run
/// fails on it.
const WEBCRYPTO_REFUSED: &str = "WebCrypto refused the Ed25519 keys";

/// False when the runtime of a worker of the run refused the signing keys.
pub fn webcrypto_in_use() -> bool {
    let logs = crate::support::finished_logs().join("\n");
    let refused = logs.matches(WEBCRYPTO_REFUSED).count();
    if refused > 0 {
        eprintln!(
            "log check: WebCrypto refused the signing keys {refused} time(s) (\"{WEBCRYPTO_REFUSED}\")"
        );
    }
    refused == 0
}

/// What workerd logs when a request touched, or waited on, another request's
/// I/O (a promise, a stream, a socket): the I/O is refused, or the waiting
/// request is cancelled as hung. Caches shared by an isolate's requests must
/// share finished data only, so the run fails on either. (A worker made to
/// panic is exempt from the second: the requests its trapped instance was
/// serving never finish, and workerd reports them as hung.)
const OTHER_REQUESTS_IO: &str = "Cannot perform I/O on behalf of a different request";
const HUNG: &str = "detected that your Worker's code had hung";
const INJECTED_PANIC: &str = "injected panic";

/// False when a worker of the run reported a request using another's I/O.
pub fn no_cross_request_io() -> bool {
    let mut ok = true;
    for log in crate::support::finished_logs() {
        let mut patterns = vec![OTHER_REQUESTS_IO];
        if !log.contains(INJECTED_PANIC) {
            patterns.push(HUNG);
        }
        for pattern in patterns {
            let n = log.matches(pattern).count();
            if n > 0 {
                eprintln!("log check: a worker logged \"{pattern}\" {n} time(s):");
                let lines: Vec<&str> = log.lines().collect();
                for (i, _) in lines
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.contains(pattern))
                {
                    for context in &lines[i.saturating_sub(3)..(i + 3).min(lines.len())] {
                        eprintln!("    {context}");
                    }
                }
                ok = false;
            }
        }
    }
    ok
}
