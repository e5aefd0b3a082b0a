//! The account and token endpoints.
//!
//! - signup and login check credentials against PostgreSQL (argon2id) and open a
//!   session in the user's `UserSession` object, which issues the refresh token;
//! - refresh and logout never touch PostgreSQL: the user's object is the
//!   authority, so they keep working while the database is down;
//! - every access token is signed here with the active key (`secrets`), carrying
//!   the entitlement snapshot the reconnect hot path needs.

use super::durable::call;
use super::incoming::Incoming;
use super::log::{self, Level};
use super::login_throttle::{Admitted, AttemptReq, Scope, SucceededReq};
use super::user_session::{
    self, CloseReq, CreateReq, DeleteAccountReq, IssuedResp, Mirror, RefreshReq, RevokeReq, UndoReq,
};
use super::{Fail, bindings, fault, kv, random, secrets, store, time, webcrypto};
use crate::api::{Credentials, EntitlementView, Me, RefreshRequest, SessionSummary, TokenPair};
use crate::domain::account::{Email, Password};
use crate::domain::idempotency;
use crate::domain::password;
use crate::domain::problem::ProblemCode;
use crate::domain::throttle;
use crate::domain::token::{AccessClaims, KeySet};
use crate::http::body::{self, MAX_JSON_BODY};
use crate::http::{ApiError, Reply};
use serde_json::json;
use sha2::{Digest, Sha256};
use worker::Env;

/// The longest `Authorization` header value read; longer is refused unparsed.
const MAX_AUTHORIZATION_LEN: usize = crate::domain::token::MAX_TOKEN_LEN + 16;

/// Reads a body of at most `max` bytes (a declared larger length is refused
/// before reading, an undeclared one once it passes `max`); returns its
/// content type and bytes.
pub(super) async fn read_body(
    req: &mut Incoming,
    max: usize,
) -> Result<(Option<String>, Vec<u8>), Fail> {
    let header = |name: &str| req.header(name);
    body::check_declared_length(header("content-length").as_deref(), max)?;
    let content_type = header("content-type");
    let bytes = req.bytes(max).await.map_err(|e| {
        Fail::new(
            ApiError::new(ProblemCode::MalformedJson, "The body could not be read."),
            e.to_string(),
        )
    })?;
    let bytes = bytes.ok_or_else(|| Fail::from(body::too_large(max)))?;
    Ok((content_type, bytes))
}

/// Reads and parses a JSON body, enforcing the size limit before parsing.
pub(super) async fn json_body<T: serde::de::DeserializeOwned>(
    req: &mut Incoming,
) -> Result<T, Fail> {
    let (content_type, bytes) = read_body(req, MAX_JSON_BODY).await?;
    Ok(body::parse_json(
        content_type.as_deref(),
        &bytes,
        MAX_JSON_BODY,
    )?)
}

/// The request's `Idempotency-Key`, checked (422 if malformed), if it has one.
pub(super) fn idempotency_key(req: &Incoming) -> Result<Option<String>, Fail> {
    match req.header("idempotency-key") {
        Some(k) => Ok(Some(
            idempotency::parse_key(&k).map_err(|e| Fail::from(body::invalid(&[e])))?,
        )),
        None => Ok(None),
    }
}

/// `key` with the fingerprint of the request it came with, as the user's
/// object takes them. `canonical`: the parsed body, re-serialised, so that the
/// same request with its members in another order or spaced otherwise is the
/// same request.
pub(super) fn keyed(
    key: Option<String>,
    method: &str,
    path: &str,
    canonical: &impl serde::Serialize,
) -> Result<Option<(String, String)>, Fail> {
    let Some(key) = key else { return Ok(None) };
    let canonical = serde_json::to_vec(canonical).map_err(|e| Fail::internal(e.to_string()))?;
    Ok(Some((
        key,
        idempotency::fingerprint(method, path, &canonical),
    )))
}

/// The email and password of a sign-in, or of a sign-up (`new`: the
/// address is checked as one about to be made, `Email::parse_new`).
fn parse_credentials(b: &Credentials, new: bool) -> Result<(Email, Password), Fail> {
    let email = if new {
        Email::parse_new(&b.email)
    } else {
        Email::parse(&b.email)
    };
    match (email, Password::parse(&b.password)) {
        (Ok(e), Ok(p)) => Ok((e, p)),
        (e, p) => {
            let errors: Vec<_> = [e.err(), p.err()].into_iter().flatten().collect();
            Err(body::invalid(&errors).into())
        }
    }
}

/// The token pair answer, with the OAuth 2.0 field names.
async fn token_pair(
    keys: &KeySet,
    user_id: &str,
    issued: &IssuedResp,
    status: u16,
) -> Result<Reply, Fail> {
    let unsigned = keys.access_token(
        user_id,
        &issued.sid,
        &issued.entitlement,
        time::now_secs(),
        random::u32(),
    );
    let (access_token, expires_in) = webcrypto::sign(keys, unsigned).await?;
    let mut reply = Reply::json(
        status,
        &TokenPair {
            access_token,
            token_type: "Bearer",
            expires_in,
            refresh_token: issued.refresh_token.clone(),
        },
    );
    reply.headers.push(("pragma", "no-cache".into()));
    Ok(reply)
}

/// Whether this request can be answered with signed tokens: the check a
/// route makes before its first write, so that a refusal of the signing keys
/// (a 503) leaves no account, session or throttle count behind.
async fn signing_ready(req: &Incoming, env: &Env, keys: &KeySet) -> Result<(), Fail> {
    if fault::requested(env, req, fault::KEYS_REFUSED) {
        return Err(fault::unavailable(fault::KEYS_REFUSED));
    }
    webcrypto::ready(keys).await
}

/// Maps an object's refusal (`{code}`) to our problem, keeping its status.
pub(super) fn refusal(status: u16, body: &serde_json::Value) -> Fail {
    let code = body["code"]
        .as_str()
        .and_then(ProblemCode::from_code)
        .unwrap_or(ProblemCode::Internal);
    let mut err = ApiError::new(code, code.title());
    if let Some(secs) = body["retry_after"].as_u64() {
        err = err.with_retry_after(secs.min(u64::from(u32::MAX)) as u32);
    }
    if code == ProblemCode::Internal {
        return Fail::internal(format!("durable object answered {status}: {body}"));
    }
    err.into()
}

/// Of the account's and the client network's refusals of one sign-in, the
/// one to answer with: the one whose exact `Retry-After` is longer, since
/// both locks hold until the later one ends. The account's lock (from 30 s)
/// is often the shorter; answered with it, a client that waited as told was
/// refused again by the network's (from 60 s).
fn longer_refusal(account: Fail, network: Fail) -> Fail {
    let exact = |f: &Fail| f.api.retry_after.filter(|_| !f.api.default_retry_after);
    match (exact(&account), exact(&network)) {
        (Some(a), Some(n)) if n > a => network,
        (None, Some(_)) => network,
        _ => account,
    }
}

/// What makes two sign-ins (or sign-ups) under one `Idempotency-Key` the
/// same request: the route, the email and the label. Not the password: no
/// hash of it goes into a record (an unsalted one would be a fast hash of it),
/// and a retry proves it against the account's argon2 hash as the first
/// request did.
#[derive(serde::Serialize)]
struct SignInShape<'a> {
    email: &'a str,
    device_label: Option<&'a str>,
}

/// The request's `Idempotency-Key` with the fingerprint of the sign-in or
/// sign-up at `path` it came with.
fn keyed_sign_in(
    req: &Incoming,
    path: &str,
    email: &Email,
    b: &Credentials,
) -> Result<Option<(String, String)>, Fail> {
    let shape = SignInShape {
        email: email.as_str(),
        device_label: b.device_label.as_deref(),
    };
    keyed(idempotency_key(req)?, "POST", path, &shape)
}

/// What a sign-up or sign-in asks of the session it opens: its label, and
/// its `Idempotency-Key` with the request's fingerprint, if it has one.
/// `again_only`: open none, answer only with the session the key's first
/// request opened (see [`signup_again`]).
struct Opening {
    label: Option<String>,
    idempotency: Option<(String, String)>,
    again_only: bool,
    /// The session id to open it under (`CreateReq::sid`).
    sid: Option<String>,
}

impl Opening {
    fn new(label: Option<String>, idempotency: Option<(String, String)>) -> Opening {
        Opening {
            label,
            idempotency,
            again_only: false,
            sid: None,
        }
    }
}

/// Opens a session for `user_id` in the user's object, for the sign-up or
/// sign-in `req` (its id and fault header go with the call).
async fn open_session(
    env: &Env,
    req: &Incoming,
    user_id: &str,
    inputs: store::EntitlementInputs,
    opening: Opening,
) -> Result<IssuedResp, Fail> {
    let create = CreateReq {
        user_id: user_id.to_owned(),
        label: opening.label.unwrap_or_default(),
        inputs,
        idempotency: opening.idempotency,
        again_only: opening.again_only,
        sid: opening.sid,
        fault: req.header(fault::HEADER),
    };
    let (status, body) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        user_id,
        "/create",
        &create,
    )
    .await?;
    if status != 200 {
        return Err(refusal(status, &body));
    }
    serde_json::from_value(body).map_err(|e| Fail::internal(format!("create answer: {e}")))
}

fn email_taken() -> Fail {
    ApiError::new(
        ProblemCode::EmailTaken,
        "An account with this email already exists; sign in instead.",
    )
    .into()
}

pub async fn signup(mut req: Incoming, env: &Env, client_ip: &str) -> Result<Reply, Fail> {
    let b: Credentials = json_body(&mut req).await?;
    let (email, password) = parse_credentials(&b, true)?;
    let idempotency = keyed_sign_in(&req, "/v1/auth/signup", &email, &b)?;
    let keys = secrets::keys(env)?;
    secrets::pepper_or_fail(env)?;
    signing_ready(&req, env, keys).await?;
    // Counted per client network before the hash: an account costs one, and
    // `email_taken` tells whether an email has an account.
    let throttle = format!("signup:{}", throttle::client_network(client_ip));
    let counted = throttle_attempt(env, req.request_id(), &throttle, (Scope::SignUp, None)).await?;
    let phc = password::hash(password.expose(), random::bytes());
    let db = match store::connect(env).await {
        Ok(db) => db,
        Err(unavailable) => {
            // Nothing was asked of the database: the retry it invites is free.
            throttle_refund(env, req.request_id(), &throttle, counted).await;
            return Err(unavailable);
        }
    };
    let created = match store::create_user(&db, &email, &phc).await {
        Ok(created) => created,
        Err(failed) => {
            // The database did not take it (or could not say it did): given
            // back as well, or a database in trouble would lock a network out
            // of sign-up for its retries.
            throttle_refund(env, req.request_id(), &throttle, counted).await;
            return Err(failed);
        }
    };
    let Some(row) = created else {
        return match idempotency {
            Some(keyed) => {
                let credentials = (&email, &password);
                signup_again(env, &req, keys, &db, credentials, client_ip, keyed).await
            }
            None => Err(email_taken()),
        };
    };
    if fault::requested(env, &req, fault::SIGNUP_CUT) {
        return Err(fault::unavailable(fault::SIGNUP_CUT));
    }
    let answer = async {
        let opening = Opening::new(b.device_label, idempotency);
        let issued = open_session(env, &req, &row.user_id, row.inputs, opening).await?;
        token_pair(keys, &row.user_id, &issued, 201).await
    };
    match answer.await {
        Ok(reply) => {
            // The network it signed up from is the account's first known one
            // (`throttle::KnownNetworks`): its owner gets in from there while
            // others' guesses keep the account locked.
            let names = throttle_names(&email, client_ip);
            let first = Admitted {
                at: 0,
                locked_for: None,
            };
            throttle_succeeded(env, req.request_id(), (&names.0, &names.1), first).await;
            Ok(reply)
        }
        Err(fail) => {
            undo_signup(env, &req, &db, &row.user_id).await;
            Err(fail)
        }
    }
}

/// A sign-up under the `Idempotency-Key` of `keyed` whose email has an
/// account: the retry of one whose answer was lost, if the account's object
/// has the key's record. It is answered as the first was (201, the tokens of
/// the session it opened) while that session's first refresh token is still
/// the one to use. If the object has never been used, the first stopped
/// between storing the account and opening its session (the runtime
/// cancelled it when its client went away): the retry opens that session,
/// 201. Otherwise, or if the password is not the account's, it is
/// `email_taken`, exactly as without a key.
///
/// It checks the account's password, so it counts in both of a sign-in's
/// throttles, as a sign-in does (and a right guess takes measurably longer
/// to answer, through the user's object): with only the client network's
/// sign-up limit, guesses at one account's password could come from network
/// after network, and a network locked for sign-in could go on guessing at
/// account after account here.
async fn signup_again(
    env: &Env,
    req: &Incoming,
    keys: &KeySet,
    db: &tokio_postgres::Client,
    (email, password): (&Email, &Password),
    client_ip: &str,
    keyed: (String, String),
) -> Result<Reply, Fail> {
    let (account, network) = throttle_names(email, client_ip);
    let (account_at, network_at) =
        count_password_check(env, req.request_id(), (&account, &network)).await?;
    let found = store::find_for_login(db, email).await;
    if !matches!(found, Ok(Some(_))) {
        // No password was checked (the account went meanwhile, or the
        // database did not answer): the attempt is given back.
        futures::join!(
            throttle_refund(env, req.request_id(), &account, account_at),
            throttle_refund(env, req.request_id(), &network, network_at)
        );
    }
    let row = match found {
        Ok(Some(row)) => row,
        Ok(None) => return Err(email_taken()),
        Err(unavailable) => return Err(unavailable),
    };
    if password::verify_password(password, &row.password_hash).is_err() {
        return Err(locked_answer(account_at).unwrap_or_else(email_taken));
    }
    throttle_succeeded(env, req.request_id(), (&account, &network), account_at).await;
    let opening = Opening {
        again_only: true,
        ..Opening::new(None, Some(keyed))
    };
    match open_session(env, req, &row.user_id, row.inputs, opening).await {
        Ok(issued) => token_pair(keys, &row.user_id, &issued, 201).await,
        Err(f) if f.api.code == ProblemCode::EmailTaken => Err(email_taken()),
        Err(f) => Err(f),
    }
}

/// Undoes a sign-up that could not answer (no session or no tokens, no
/// account). It removes the account just made, so that the retry the 503
/// invites signs up instead of meeting `email_taken`. Then it closes the
/// user's object: a sign-in may have found the account meanwhile, and the
/// session it opened (or opens later) must not outlive the account. An
/// account that has a device or a subscription by then is kept, sessions
/// and all: someone is using it. Best effort: a step that fails is logged.
async fn undo_signup(env: &Env, req: &Incoming, db: &tokio_postgres::Client, user_id: &str) {
    if fault::requested(env, req, fault::UNDO_SLOW) {
        time::sleep(fault::KV_SLOW_MS).await;
    }
    // A keyed retry may have been answered 201 with the session this
    // request opened (before its own answer failed): that client holds the
    // account, which stays. If none was, the object hands out none until
    // the undo ends: the check and that hold are one step. The account is
    // removed only once the object has said both; should it not answer so
    // (it failed, or it is of the release before `/undo`, during a deploy,
    // and does not know the route), the account stays, and a keyed retry
    // opens its session.
    let undo = |keep| UndoReq {
        user_id: user_id.to_owned(),
        keep,
    };
    let route = if fault::requested(env, req, fault::UNDO_UNKNOWN) {
        "/no-such-route"
    } else {
        "/undo"
    };
    let asked = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        user_id,
        route,
        &undo(false),
    )
    .await;
    if fault::requested(env, req, fault::UNDO_HELD) {
        time::sleep(fault::KV_SLOW_MS).await;
    }
    let why_kept = match &asked {
        Ok((200, answer)) if answer["handed_out"] == false => None,
        Ok((200, _)) => Some("sign-up not undone: a retry was answered with its session"),
        _ => Some("sign-up not undone: the user's object could not hold it"),
    };
    if let Some(why) = why_kept {
        let fields = match &asked {
            Ok((status, _)) => json!({"user_id": user_id, "status": status}),
            Err(fail) => json!({"user_id": user_id, "error": fail.cause}),
        };
        return log::event(Level::Warn, Some(req.request_id()), why, fields);
    }
    match store::delete_new_user(db, user_id).await {
        Ok(true) => {}
        Ok(false) => {
            log::event(
                Level::Warn,
                Some(req.request_id()),
                "sign-up not undone: the account has a device or subscription",
                json!({"user_id": user_id}),
            );
            // The account stays: the object takes sign-ins again now rather
            // than when its hold ends.
            let ended = call(
                env,
                req.request_id(),
                bindings::USER_SESSIONS,
                user_id,
                "/undo",
                &undo(true),
            )
            .await;
            return log_unless_done(req, ended, "kept account's object still held", user_id);
        }
        Err(e) => {
            // Whether the removal committed is not known: the hold is left
            // to end by itself, after the database has ended the removal
            // (`sql::UNDO_STATEMENT_LIMIT_MS`).
            return log::event(
                Level::Error,
                Some(req.request_id()),
                "sign-up not undone",
                json!({"user_id": user_id, "error": e.cause}),
            );
        }
    }
    let close = CloseReq {
        user_id: user_id.to_owned(),
    };
    let closed = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        user_id,
        "/close",
        &close,
    )
    .await;
    log_unless_done(req, closed, "removed account's sessions not ended", user_id);
}

/// The throttle object names: a hash of the email (no address in object names
/// or logs) and the client's network (its IPv4 address or IPv6 /64).
fn throttle_names(email: &Email, client_ip: &str) -> (String, String) {
    (
        account_throttle(email),
        format!("ip:{}", throttle::client_network(client_ip)),
    )
}

/// Counts a password check in both throttles at once, before the password is
/// checked, so concurrent guesses cannot slip past either limit; the counts
/// (`at`s for a refund) in the order of [`throttle_names`]. An attempt one
/// throttle refused checks no password: the other's count is given back, or
/// a locked client network would lock every account it named (and a locked
/// account use up its callers' network budget).
async fn count_password_check(
    env: &Env,
    request_id: &str,
    (account, network): (&str, &str),
) -> Result<(Admitted, Admitted), Fail> {
    let known = network_digest(env, network);
    let (by_account, by_network) = futures::join!(
        throttle_attempt(env, request_id, account, (Scope::Account, known)),
        throttle_attempt(env, request_id, network, (Scope::ClientIp, None))
    );
    match (by_account, by_network) {
        (Ok(account_at), Ok(network_at)) => Ok((account_at, network_at)),
        (Ok(account_at), Err(refused)) => {
            throttle_refund(env, request_id, account, account_at).await;
            Err(refused)
        }
        (Err(refused), Ok(network_at)) => {
            throttle_refund(env, request_id, network, network_at).await;
            Err(refused)
        }
        (Err(account), Err(network)) => Err(longer_refusal(account, network)),
    }
}

/// The name of the account's throttle (its email's digest, so the object's
/// name does not carry the address).
fn account_throttle(email: &Email) -> String {
    format!(
        "{ACCOUNT_THROTTLE}{}",
        hex::encode(Sha256::digest(email.as_str().as_bytes()))
    )
}

/// How an account's throttle name begins.
const ACCOUNT_THROTTLE: &str = "account:";

/// The object that keeps the throttle `name`: an account's is named as the
/// throttle is, a client network's by [`throttle::network_object`], so that
/// no object is named by a client's address.
fn throttle_object(env: &Env, name: &str) -> Result<String, Fail> {
    if name.starts_with(ACCOUNT_THROTTLE) {
        return Ok(name.to_owned());
    }
    Ok(throttle::network_object(
        secrets::pepper_or_fail(env)?,
        name,
    ))
}

/// What a wrong password gets when the account's lock let it through only
/// because the client's network signed in to the account before
/// ([`throttle::KnownNetworks`]): the lock's own answer, as everyone else
/// gets it, so that the lock tells no one whether the account exists.
fn locked_answer(admitted: Admitted) -> Option<Fail> {
    let secs = admitted.locked_for?;
    let code = ProblemCode::TooManyAttempts;
    let lock = ApiError::new(code, code.title());
    Some(
        lock.with_retry_after(secs.min(u64::from(u32::MAX)) as u32)
            .into(),
    )
}

/// Counts a sign-in attempt in the throttle `name`; `Ok` names the admitted
/// attempt for [`throttle_refund`] and [`throttle_succeeded`].
async fn throttle_attempt(
    env: &Env,
    request_id: &str,
    name: &str,
    (scope, network): (Scope, Option<String>),
) -> Result<Admitted, Fail> {
    let (status, body) = call(
        env,
        request_id,
        bindings::LOGIN_THROTTLES,
        &throttle_object(env, name)?,
        "/attempt",
        &AttemptReq { scope, network },
    )
    .await?;
    if status != 200 {
        return Err(refusal(status, &body));
    }
    serde_json::from_value::<Admitted>(body)
        .map_err(|e| Fail::unavailable(format!("login throttle answer: {e}")))
}

/// Gives back an attempt `name` admitted at `at` that reached no password
/// check. Best effort: a refund that fails leaves the attempt counted, as it
/// was before refunds existed, and is logged.
async fn throttle_refund(env: &Env, request_id: &str, name: &str, admitted: Admitted) {
    let refunded = async {
        let object = throttle_object(env, name)?;
        let throttles = bindings::LOGIN_THROTTLES;
        call(env, request_id, throttles, &object, "/refund", &admitted).await
    };
    let error = match refunded.await {
        Ok((200, _)) => return,
        Ok((status, _)) => Some(format!("status {status}")),
        Err(e) => e.cause,
    };
    log::event(
        Level::Warn,
        Some(request_id),
        "login throttle refund failed",
        // The throttle's kind only: its name is the email's digest, which a
        // list of addresses reverses, or the client's network.
        json!({"throttle": name.split(':').next(), "error": error}),
    );
}

/// Clears the failures counted in the account throttle `name` after its
/// password was right. Best effort: failures that stay counted expire.
async fn throttle_succeeded(
    env: &Env,
    request_id: &str,
    (account, network): (&str, &str),
    admitted: Admitted,
) {
    let _ = call(
        env,
        request_id,
        bindings::LOGIN_THROTTLES,
        account,
        "/succeeded",
        &SucceededReq {
            locked_for: admitted.locked_for,
            network: network_digest(env, network),
        },
    )
    .await;
}

/// What the account's throttle object keeps of the client network `network`
/// (a network throttle's name) to know it again ([`throttle::KnownNetworks`]):
/// the first [`NETWORK_DIGEST_BYTES`] of an HMAC of it under the
/// refresh-token key. The object holds no address, nor a digest that the few
/// billion IPv4 addresses reverse; and even the key's holder, hashing every
/// address, finds some 256 IPv4 addresses (and countless /64s) behind each
/// value, not the one. A stranger's network that happens to share a
/// value is let through to the known networks' own throttle, under the same
/// limits. `None` without the key (sign-in then answers `not_configured`
/// anyway).
fn network_digest(env: &Env, network: &str) -> Option<String> {
    use hmac::{Hmac, KeyInit, Mac};
    let pepper = secrets::pepper(env).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(pepper).ok()?;
    mac.update(b"known-network\0");
    mac.update(network.as_bytes());
    Some(hex::encode(
        &mac.finalize().into_bytes()[..NETWORK_DIGEST_BYTES],
    ))
}

/// How much of a known network's HMAC the account keeps: 24 bits.
const NETWORK_DIGEST_BYTES: usize = 3;

/// Stores a hash of the password's NFKC form in place of one of the password
/// as typed (made before passwords were normalized), once that has signed
/// the user in: from then on the password matches however it is typed.
/// Best effort: the sign-in goes on if it fails, and the next one tries again.
/// It connects anew (it is rare), so a sign-in holds no connection while its
/// password is checked.
async fn upgrade_hash(env: &Env, req: &Incoming, row: &store::LoginRow, password: &Password) {
    let new = password::rehash(password.expose(), random::bytes(), &row.password_hash);
    let upgraded = match store::connect(env).await {
        Ok(db) => store::upgrade_password_hash(&db, &row.user_id, (&row.password_hash, &new)).await,
        Err(fail) => Err(fail),
    };
    let (level, outcome) = match &upgraded {
        Ok(true) => (Level::Info, "upgraded".to_owned()),
        Ok(false) => (Level::Info, "changed meanwhile".to_owned()),
        Err(fail) => (Level::Warn, fail.cause.clone().unwrap_or_default()),
    };
    log::event(
        level,
        Some(req.request_id()),
        "password hash of the typed form replaced",
        json!({ "outcome": outcome }),
    );
}

pub async fn login(mut req: Incoming, env: &Env, client_ip: &str) -> Result<Reply, Fail> {
    let b: Credentials = json_body(&mut req).await?;
    let (email, password) = parse_credentials(&b, false)?;
    let idempotency = keyed_sign_in(&req, "/v1/auth/login", &email, &b)?;
    let keys = secrets::keys(env)?;
    secrets::pepper_or_fail(env)?;
    signing_ready(&req, env, keys).await?;

    let (account_obj, ip_obj) = throttle_names(&email, client_ip);
    let (account_at, ip_at) =
        count_password_check(env, req.request_id(), (&account_obj, &ip_obj)).await?;

    let found = async {
        let db = store::connect(env).await?;
        store::find_for_login(&db, &email).await
    };
    let row = match found.await {
        Ok(row) => row,
        Err(unavailable) => {
            // No password was checked: an outage's retries must not lock the
            // user out once it is over.
            futures::join!(
                throttle_refund(env, req.request_id(), &account_obj, account_at),
                throttle_refund(env, req.request_id(), &ip_obj, ip_at)
            );
            return Err(unavailable);
        }
    };
    // An unknown email costs the argon2 verifications a wrong password does
    // (one, or two for a password that NFKC changes), so the answer and its
    // timing do not reveal whether the account exists.
    let stored_hash = row
        .as_ref()
        .map_or(password::DUMMY_HASH, |r| r.password_hash.as_str());
    let verified = password::verify_password(&password, stored_hash);
    let row = match (row, verified) {
        (Some(row), Ok(verified)) => {
            if verified == password::Verified::AsTyped {
                upgrade_hash(env, &req, &row, &password).await;
            }
            row
        }
        (row, result) => {
            if let (
                Some(_),
                Err(password::VerifyError::TooWeak | password::VerifyError::Unreadable),
            ) = (&row, &result)
            {
                log::event(
                    Level::Error,
                    Some(req.request_id()),
                    "stored password hash refused",
                    json!({"reason": format!("{result:?}")}),
                );
            }
            if let Some(locked) = locked_answer(account_at) {
                return Err(locked);
            }
            return Err(ApiError::new(
                ProblemCode::InvalidCredentials,
                "The email or password is incorrect.",
            )
            .into());
        }
    };
    // Success clears the account's failures; the client IP's count stays (one
    // address trying many accounts is the pattern that limit exists for).
    throttle_succeeded(env, req.request_id(), (&account_obj, &ip_obj), account_at).await;
    let armed = fault::armed(env, req.header(fault::HEADER));
    if armed.as_deref() == Some(fault::LOGIN_LATE) {
        time::sleep(fault::LOGIN_LATE_MS).await;
    }
    // The session's id is drawn here, so that a session the object stored
    // but whose answer was lost (a reset, a dropped connection) can be taken
    // back, with the session its opening evicted at the limit: the client
    // was told the sign-in failed.
    let sid = hex::encode(random::bytes::<16>());
    let opening = Opening {
        sid: Some(sid.clone()),
        ..Opening::new(b.device_label, idempotency)
    };
    let issued = match open_session(env, &req, &row.user_id, row.inputs, opening).await {
        Ok(issued) => issued,
        Err(fail) => {
            if fail.api.code.status() >= 500 {
                end_unanswered(env, &req, &row.user_id, &sid).await;
            }
            return Err(fail);
        }
    };
    let signed = if armed.as_deref() == Some(fault::TOKEN_UNSIGNED) {
        Err(fault::unavailable(fault::TOKEN_UNSIGNED))
    } else {
        token_pair(keys, &row.user_id, &issued, 200).await
    };
    // A session a retry found (the first request's, under the same key) is
    // left alone: that request may have answered with it.
    if signed.is_err() && !issued.reopened {
        end_unanswered(env, &req, &row.user_id, &issued.sid).await;
    }
    signed
}

/// Takes back a session the sign-in opened but could not answer with (its
/// tokens were not signed, or the object's answer was lost): no client holds
/// its refresh token, and left alone
/// it would be listed among the user's sessions until it went idle. At the
/// session limit, its opening ended the least recently used session, which
/// is given back, so that the failed sign-in changes nothing. Best effort: a
/// failure is logged, and the session then expires as any other.
async fn end_unanswered(env: &Env, req: &Incoming, user_id: &str, sid: &str) {
    let ended = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        user_id,
        "/withdraw",
        &RevokeReq {
            sid: sid.to_owned(),
        },
    )
    .await;
    log_unless_done(req, ended, "unanswered session not ended", user_id);
}

/// Logs a best-effort object call for `user_id` that did not answer 200.
fn log_unless_done(
    req: &Incoming,
    answer: Result<(u16, serde_json::Value), Fail>,
    message: &str,
    user_id: &str,
) {
    let error = match answer {
        Ok((200, _)) => return,
        Ok((status, body)) => format!("status {status}: {body}"),
        Err(fail) => fail.cause.unwrap_or_default(),
    };
    log::event(
        Level::Error,
        Some(req.request_id()),
        message,
        json!({"user_id": user_id, "error": error}),
    );
}

pub async fn refresh(mut req: Incoming, env: &Env) -> Result<Reply, Fail> {
    let b: RefreshRequest = json_body(&mut req).await?;
    let keys = secrets::keys(env)?;
    // The object needs the pepper too; without it, answer `not_configured`
    // here rather than relay the object's refusal as a retryable 503.
    secrets::pepper_or_fail(env)?;
    signing_ready(&req, env, keys).await?;
    let token = crate::domain::session::RefreshToken::parse(&b.refresh_token).map_err(|e| {
        Fail::from(ApiError::new(
            ProblemCode::from_code(e.code()).unwrap_or(ProblemCode::RefreshTokenMalformed),
            "The refresh token is not in a valid format.",
        ))
    })?;
    let user_id = token.user_id().to_owned();
    let (status, body) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        &user_id,
        "/refresh",
        &RefreshReq {
            refresh_token: b.refresh_token,
        },
    )
    .await?;
    if status != 200 {
        return Err(refusal(status, &body));
    }
    let issued: IssuedResp =
        serde_json::from_value(body).map_err(|e| Fail::internal(format!("refresh answer: {e}")))?;
    token_pair(keys, &user_id, &issued, 200).await
}

/// Verifies the bearer token and that its session has not been revoked.
///
/// Revocation is read from the KV mirror, so a logged-out session's access
/// tokens stop working once the revocation has propagated (about a minute),
/// not after the token's full lifetime.
pub async fn authenticate(req: &Incoming, env: &Env) -> Result<AccessClaims, Fail> {
    let claims = verify_bearer(req, env).await?;
    check_not_revoked(env, &claims).await?;
    Ok(claims)
}

/// The first half of [`authenticate`]: the bearer token's signature and claims,
/// pure CPU. A caller with other reads to make runs [`check_not_revoked`]
/// alongside them.
pub async fn verify_bearer(req: &Incoming, env: &Env) -> Result<AccessClaims, Fail> {
    let header = req.header("authorization");
    let Some(header) = header else {
        return Err(ApiError::new(
            ProblemCode::TokenMissing,
            "Send an access token as `Authorization: Bearer <token>`.",
        )
        .into());
    };
    let token = match header.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        // Another scheme (or none) carries no access token: missing, whose
        // challenge names no error (RFC 6750, section 3.1).
        _ => {
            return Err(ApiError::new(
                ProblemCode::TokenMissing,
                "Send an access token as `Authorization: Bearer <token>`; another scheme carries none.",
            )
            .into());
        }
    };
    // The scheme first: a large header of another scheme carries no token,
    // too large or not.
    if header.len() > MAX_AUTHORIZATION_LEN {
        return Err(
            ApiError::new(ProblemCode::TokenTooLarge, "The access token is too large.").into(),
        );
    }
    let keys = secrets::keys(env)?;
    webcrypto::verify(keys, token, time::now_secs())
        .await?
        .map_err(|e| {
            Fail::from(ApiError::new(
                ProblemCode::from_code(e.code()).unwrap_or(ProblemCode::TokenMalformed),
                e.detail(),
            ))
        })
}

/// The second half of [`authenticate`]: refuses a session that has been
/// signed out.
pub async fn check_not_revoked(env: &Env, claims: &AccessClaims) -> Result<(), Fail> {
    check_not_revoked_as(env, claims, kv::Reading::default()).await
}

/// [`check_not_revoked`], its KV read made as `how` says.
pub async fn check_not_revoked_as(
    env: &Env,
    claims: &AccessClaims,
    how: kv::Reading<'_>,
) -> Result<(), Fail> {
    let mirror = session_mirror(env, &claims.sub, how).await;
    not_revoked_in(mirror.as_ref(), claims)
}

/// The user's sessions as the KV mirror has them. A KV failure (or a read
/// past `kv::READ_TIMEOUT_MS`) reads as no mirror, so it does not lock every
/// user out: the token's signature and expiry still bound it to 15 minutes.
async fn session_mirror(env: &Env, user_id: &str, how: kv::Reading<'_>) -> Option<Mirror> {
    kv::read_json::<Mirror>(env, &user_session::mirror_key(user_id), how)
        .await
        .ok()
        .flatten()
}

fn not_revoked_in(mirror: Option<&Mirror>, claims: &AccessClaims) -> Result<(), Fail> {
    if mirror.is_some_and(|m| m.sessions.iter().any(|s| s.id == claims.sid && s.revoked)) {
        return Err(ApiError::new(
            ProblemCode::SessionRevoked,
            "This session has been signed out.",
        )
        .into());
    }
    Ok(())
}

/// Ends the token's session (or, `all`, every session of its user): 204.
///
/// Ending one session needs a valid token, not a live session: a retry of a
/// logout whose answer was lost finds its session ended already, and is 204
/// again rather than 401 `session_revoked` (as RFC 7009 answers the
/// revocation of a token that is no longer valid). Ending every session takes
/// a live one, so that the access token of a session that was revoked (by
/// reuse detection, say: a stolen family) cannot end the user's others. The
/// KV copy refuses such a token early; the object, which the copy may lag,
/// decides: it is sent the token's session and ends nothing unless that
/// session is active.
pub async fn logout(req: Incoming, env: &Env, all: bool) -> Result<Reply, Fail> {
    let claims = if all {
        authenticate(&req, env).await?
    } else {
        verify_bearer(&req, env).await?
    };
    let (status, body) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        &claims.sub,
        if all { "/revoke-all" } else { "/revoke" },
        &RevokeReq {
            sid: claims.sid.clone(),
        },
    )
    .await?;
    if status != 200 {
        return Err(refusal(status, &body));
    }
    Ok(Reply::no_content())
}

/// `DELETE /v1/me`: deletes the caller's account, at its owner's request.
///
/// The user's object does it (`UserSession::delete_account`): it checks the
/// session is live as it knows it (a signed-out session's token, which the
/// KV copy may not show as such yet, deletes nothing), marks the deletion
/// (no session is refreshed or opened meanwhile), has PostgreSQL delete the
/// account with its devices and subscriptions, unless a subscription may
/// still charge it (409 `subscription_active`: the billing provider would go
/// on charging a deleted account), then ends every session for good and
/// forgets the devices. Should it fail part-way, its alarm sees the deletion
/// through.
pub async fn delete_account(req: Incoming, env: &Env) -> Result<Reply, Fail> {
    let claims = authenticate(&req, env).await?;
    let r = DeleteAccountReq {
        user_id: claims.sub.clone(),
        sid: claims.sid.clone(),
        fault: req.header(fault::HEADER),
    };
    let (status, body) = call(
        env,
        req.request_id(),
        bindings::USER_SESSIONS,
        &claims.sub,
        "/delete-account",
        &r,
    )
    .await?;
    if status != 200 {
        return Err(refusal(status, &body));
    }
    log::event(
        Level::Info,
        Some(req.request_id()),
        "account deleted",
        json!({"user_id": claims.sub}),
    );
    Ok(Reply::no_content())
}

pub async fn me(req: Incoming, env: &Env) -> Result<Reply, Fail> {
    // One read of the session mirror serves the revocation check and the list.
    let claims = verify_bearer(&req, env).await?;
    let mirror = session_mirror(env, &claims.sub, kv::Reading::default()).await;
    not_revoked_in(mirror.as_ref(), &claims)?;
    let db = store::connect(env).await?;
    let account = store::account(&db, &claims.sub).await?;
    drop(db);
    let Some(account) = account else {
        // A valid token for a deleted account.
        return Err(ApiError::new(
            ProblemCode::SessionRevoked,
            "This account no longer exists.",
        )
        .into());
    };
    let ent = account.inputs.at(time::now_secs());
    let sessions: Vec<_> = mirror
        .map(|m| m.sessions)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.revoked)
        .map(|s| SessionSummary {
            current: s.id == claims.sid,
            id: s.id,
            label: s.label,
            created_at: s.created_at,
            last_refresh_at: s.last_refresh_at,
        })
        .collect();
    Ok(Reply::json(
        200,
        &Me {
            id: account.id,
            email: account.email,
            created_at: account.created_at,
            plan: ent.plan,
            entitlement: EntitlementView {
                max_devices: ent.max_devices,
                region_tiers: ent.region_tiers,
                until: ent.until,
            },
            sessions,
        },
    ))
}

pub async fn jwks(env: &Env) -> Result<Reply, Fail> {
    let keys = secrets::keys(env)?;
    let mut reply = Reply::json(200, &webcrypto::jwks(keys).await?);
    // Verifiers may cache the key set briefly; a rotation adds the new key
    // before it signs anything, so a cached copy is never missing a live key.
    reply
        .headers
        .push(("cache-control", "public, max-age=300".into()));
    Ok(reply)
}
