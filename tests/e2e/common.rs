//! Helpers shared by the end-to-end test modules: HTTP calls with a per-call
//! client address (so per-IP throttling of one test never affects another),
//! users, and direct database access for checking what was written.

use crate::harness::Ctx;
use crate::support::DB_NAME;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};

static N: AtomicUsize = AtomicUsize::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn unique_email() -> String {
    format!("{}@example.test", unique("user"))
}

/// A documentation-range address per caller, each in a /64 of its own (the
/// per-network login throttle counts an IPv6 /64 as one client).
pub fn fresh_ip() -> String {
    let n = N.fetch_add(1, Ordering::SeqCst);
    format!(
        "2001:db8:{:x}:{:x}::1",
        std::process::id() & 0xffff,
        n & 0xffff
    )
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

/// What the run exposed that must never reach a log, and the request ids it
/// saw (proof that the logs searched are the right ones): see `main.rs`.
#[derive(Default)]
pub struct Seen {
    /// Passwords of accounts that exist (a sign-up or login succeeded with them).
    pub passwords: std::collections::BTreeSet<String>,
    /// Every access and refresh token issued to the tests.
    pub tokens: std::collections::BTreeSet<String>,
    pub request_ids: Vec<String>,
}

pub static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(Seen {
    passwords: std::collections::BTreeSet::new(),
    tokens: std::collections::BTreeSet::new(),
    request_ids: Vec::new(),
});

fn remember(path: &str, sent: Option<&Value>, resp: &Resp) {
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = resp
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        seen.request_ids.push(id.to_owned());
    }
    if !(200..300).contains(&resp.status) {
        return;
    }
    if matches!(path, "/v1/auth/signup" | "/v1/auth/login")
        && let Some(p) = sent.and_then(|b| b["password"].as_str())
    {
        seen.passwords.insert(p.to_owned());
    }
    for field in ["access_token", "refresh_token"] {
        if let Some(t) = resp.body[field].as_str() {
            seen.tokens.insert(t.to_owned());
        }
    }
}

/// Records the secrets of a sign-up or sign-in made without [`send_to`] (a
/// raw client): its password and the tokens of its answer, which the logs
/// check then looks for too.
pub fn seen_pair(password: &str, pair: &Value) {
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    seen.passwords.insert(password.to_owned());
    for field in ["access_token", "refresh_token"] {
        if let Some(t) = pair[field].as_str() {
            seen.tokens.insert(t.to_owned());
        }
    }
}

/// Waits (10 s at most) for a line of the shared worker's log that holds
/// both the request id `id` and `text` (wrangler writes the worker's output
/// to its log a moment after the answer); `what` names it if it never comes.
pub async fn logged_with(ctx: &Ctx, id: &str, text: &str, what: &str) {
    crate::support::eventually(std::time::Duration::from_secs(10), what, || async {
        let logged = ctx.stack().wrangler.log();
        logged
            .lines()
            .any(|l| l.contains(id) && l.contains(text))
            .then_some(())
    })
    .await;
}

pub async fn send_with(
    ctx: &Ctx,
    method: &str,
    path: &str,
    body: Option<Value>,
    bearer: Option<&str>,
    extra: &[(&str, &str)],
) -> Resp {
    send_to(
        ctx,
        &ctx.stack().wrangler.base_url,
        method,
        path,
        body,
        bearer,
        extra,
    )
    .await
}

/// [`send_with`] to the worker at `base` (a stack of a test's own).
pub async fn send_to(
    ctx: &Ctx,
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    bearer: Option<&str>,
    extra: &[(&str, &str)],
) -> Resp {
    let sent = body.clone();
    let mut req = ctx
        .http
        .request(method.parse().unwrap(), format!("{base}{path}"));
    if !extra
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("cf-connecting-ip"))
    {
        req = req.header("cf-connecting-ip", fresh_ip());
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    let resp = Resp {
        status,
        headers,
        body,
    };
    remember(path, sent.as_ref(), &resp);
    resp
}

pub async fn send(
    ctx: &Ctx,
    method: &str,
    path: &str,
    body: Option<Value>,
    bearer: Option<&str>,
) -> Resp {
    send_with(ctx, method, path, body, bearer, &[]).await
}

pub fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

pub fn claims(access: &str) -> Value {
    let payload = access.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap()
}

/// A signed-up user: id, email, and the tokens of its first session.
pub struct User {
    pub id: String,
    pub email: String,
    pub access: String,
    pub refresh: String,
}

pub const PASSWORD: &str = "correct horse battery";

pub async fn new_user(ctx: &Ctx) -> User {
    new_user_at(ctx, &ctx.stack().wrangler.base_url).await
}

/// [`new_user`] on the worker at `base`.
pub async fn new_user_at(ctx: &Ctx, base: &str) -> User {
    let email = unique_email();
    let r = send_to(
        ctx,
        base,
        "POST",
        "/v1/auth/signup",
        Some(json!({"email": email, "password": PASSWORD})),
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let access = s(&r.body["access_token"]).to_owned();
    User {
        id: s(&claims(&access)["sub"]).to_owned(),
        email,
        access,
        refresh: s(&r.body["refresh_token"]).to_owned(),
    }
}

/// The region `id` in a `GET /v1/regions` answer.
pub fn region_in(list: &Value, id: &str) -> Value {
    list["regions"]
        .as_array()
        .and_then(|regions| regions.iter().find(|r| r["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("no region {id} in {list}"))
}

impl User {
    /// Signs in again, with the password every test user has.
    pub async fn login(&self, ctx: &Ctx) -> Resp {
        send(
            ctx,
            "POST",
            "/v1/auth/login",
            Some(json!({"email": self.email, "password": PASSWORD})),
            None,
        )
        .await
    }

    /// Refreshes and keeps the new pair; returns the new access token's claims.
    pub async fn refresh(&mut self, ctx: &Ctx) -> Value {
        self.refresh_at(ctx, &ctx.stack().wrangler.base_url).await
    }

    /// [`User::refresh`] on the worker at `base` (a stack of a test's own).
    pub async fn refresh_at(&mut self, ctx: &Ctx, base: &str) -> Value {
        let r = send_to(
            ctx,
            base,
            "POST",
            "/v1/auth/refresh",
            Some(json!({"refresh_token": self.refresh})),
            None,
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        self.access = s(&r.body["access_token"]).to_owned();
        self.refresh = s(&r.body["refresh_token"]).to_owned();
        claims(&self.access)
    }
}

pub async fn db(ctx: &Ctx) -> tokio_postgres::Client {
    keenvpn_edge::db::connect(&ctx.stack().pg.url(DB_NAME))
        .await
        .expect("database")
}

/// Reads a value from `.dev.vars` (the development secrets the worker runs with).
pub fn dev_var(name: &str) -> String {
    let vars =
        std::fs::read_to_string(crate::support::root().join(".dev.vars")).expect(".dev.vars");
    let line = vars
        .lines()
        .find(|l| l.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in .dev.vars"));
    line[name.len() + 1..]
        .trim()
        .trim_matches('\'')
        .trim_matches('"')
        .to_owned()
}

/// A random WireGuard public key (32 bytes, standard base64), canonical as
/// X25519 makes them: the last byte's top bit clear.
pub fn wg_key() -> String {
    let mut bytes = [0u8; 32];
    let seed = unique("k");
    let digest = <sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes());
    bytes.copy_from_slice(&digest);
    bytes[31] &= 0x7f;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
