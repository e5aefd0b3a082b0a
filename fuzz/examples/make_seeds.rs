//! Writes the committed seed corpora: small, meaningful inputs for each
//! target (valid tokens minted with the fixture key, Stripe headers of the
//! shapes Stripe sends, valid and invalid keys), as `corpus/<target>/seed-*`.
//!
//! `cargo run --example make_seeds` in `fuzz/`; the output is deterministic,
//! so a re-run changes nothing unless a fixture or an example event did.

use std::fs;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use keenvpn_edge::domain::catalogue::Tier;
use keenvpn_edge::domain::entitlement::{Entitlement, Status};
use keenvpn_edge::domain::stripe::{self, Example};
use keenvpn_edge::domain::token::ACCESS_TTL_SECS;
use keenvpn_edge_fuzz::{NOW, STRIPE_SECRETS, USER, keys, sessions, sign_raw};
use serde_json::json;

fn write(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("create the corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
}

fn with_mode(mode: u8, rest: impl AsRef<[u8]>) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(rest.as_ref());
    out
}

fn plus() -> Entitlement {
    Entitlement {
        plan: "plus".into(),
        max_devices: 5,
        region_tiers: vec![Tier::Free, Tier::Premium],
        until: Some(NOW + 30 * 24 * 3600),
    }
}

fn claims(iat: i64, exp: i64) -> serde_json::Value {
    json!({
        "iss": "keenvpn-edge", "aud": "keenvpn-app", "typ": "access",
        "sub": USER, "sid": "07070707070707070707070707070707",
        "iat": iat, "exp": exp, "ent": plus(),
    })
}

fn tokens() {
    let t = "token_verify";
    let (valid, _) = keys().issue(USER, "07070707070707070707070707070707", &plus(), NOW, 17);
    write(t, "valid", with_mode(0, &valid));
    let (old, _) = keys().issue(USER, "s", &plus(), NOW - 2 * ACCESS_TTL_SECS, 0);
    write(t, "expired", with_mode(0, &old));
    let (free, _) = keys().issue(
        USER,
        "s",
        &Entitlement {
            plan: "free".into(),
            max_devices: 1,
            region_tiers: vec![Tier::Free],
            until: None,
        },
        NOW,
        60,
    );
    write(t, "valid-free", with_mode(0, &free));
    let body = URL_SAFE_NO_PAD.encode(claims(NOW, NOW + 900).to_string());
    let none = format!(
        "{}.{body}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#)
    );
    write(t, "alg-none", with_mode(0, none));
    let hs = format!(
        "{}.{body}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k1"}"#),
        URL_SAFE_NO_PAD.encode([7u8; 32])
    );
    write(t, "alg-hs256", with_mode(0, hs));
    let other_kid = sign_raw(
        br#"{"alg":"EdDSA","kid":"k3"}"#,
        claims(NOW, NOW + 900).to_string().as_bytes(),
    );
    write(t, "signed-by-another-key", with_mode(0, other_kid));
    let unknown = sign_raw(br#"{"alg":"EdDSA","kid":"k9"}"#, b"{}");
    write(t, "unknown-kid", with_mode(0, unknown));
    write(
        t,
        "refresh-shaped",
        with_mode(
            0,
            format!(
                "v1.{USER}.07070707070707070707070707070707.0.{}",
                URL_SAFE_NO_PAD.encode([1u8; 32])
            ),
        ),
    );
    write(t, "garbage", with_mode(0, "Bearer abc.def.ghi"));

    // Mode 1: header and claims, signed by the fixture key.
    let header = r#"{"alg":"EdDSA","kid":"k1","typ":"JWT"}"#;
    let signed = |claims: &serde_json::Value| with_mode(1, format!("{header}\n{claims}"));
    write(t, "claims-valid", signed(&claims(NOW, NOW + 900)));
    let mut wrong_type = claims(NOW, NOW + 900);
    wrong_type["typ"] = json!("connect");
    write(t, "claims-wrong-type", signed(&wrong_type));
    write(t, "claims-too-long", signed(&claims(NOW, NOW + 10 * 900)));
    write(t, "claims-future", signed(&claims(NOW + 600, NOW + 1200)));
    write(
        t,
        "claims-escaped",
        with_mode(
            1,
            format!(
                "{header}\n{{\"iss\":\"keenvpn\\u002dedge\",\"aud\":\"keenvpn-app\",\"typ\":\"access\",\"sub\":\"u\",\"sid\":\"s\",\"iat\":{NOW},\"exp\":{},\"ent\":{{\"plan\":\"free\",\"max_devices\":1,\"region_tiers\":[\"free\"],\"until\":null}}}}",
                NOW + 900
            ),
        ),
    );
    write(
        t,
        "claims-array",
        with_mode(1, format!("{header}\n[\"keenvpn-edge\",\"keenvpn-app\"]")),
    );
    write(
        t,
        "header-duplicate-alg",
        with_mode(
            1,
            format!(
                "{{\"alg\":\"EdDSA\",\"alg\":\"none\",\"kid\":\"k1\"}}\n{}",
                claims(NOW, NOW + 900)
            ),
        ),
    );
}

fn example(kind: &str, status: Status) -> Vec<u8> {
    let ex = Example {
        event_id: "evt_1QfuzzEvent0001",
        created: NOW,
        subscription_id: "sub_1QfuzzSub0001",
        customer_id: "cus_Qfuzz0001",
        user_id: USER,
        plan_id: "plus",
        status,
        current_period_end: NOW + 30 * 24 * 3600,
        cancel_at_period_end: false,
    };
    stripe::example_event(kind, &ex).to_string().into_bytes()
}

fn stripe_events() -> Vec<(&'static str, Vec<u8>)> {
    let mut events = vec![
        (
            "subscription-created",
            example(stripe::SUBSCRIPTION_CREATED, Status::Active),
        ),
        (
            "subscription-updated",
            example(stripe::SUBSCRIPTION_UPDATED, Status::PastDue),
        ),
        (
            "subscription-deleted",
            example(stripe::SUBSCRIPTION_DELETED, Status::Canceled),
        ),
        (
            "invoice-paid",
            example(stripe::INVOICE_PAID, Status::Active),
        ),
        (
            "invoice-payment-failed",
            example(stripe::INVOICE_PAYMENT_FAILED, Status::PastDue),
        ),
        ("ignored-kind", example("customer.created", Status::Active)),
    ];
    // Older API versions: the period and the subscription at the top level,
    // ids expanded into objects.
    let legacy_subscription = json!({
        "id": "evt_legacy1", "type": "customer.subscription.updated", "created": NOW,
        "data": { "object": {
            "id": "sub_legacy", "object": "subscription", "status": "trialing",
            "customer": { "id": "cus_legacy", "object": "customer" },
            "current_period_end": NOW + 86_400, "cancel_at": NOW + 86_400,
            "metadata": { "user_id": USER, "plan_id": "family" }
        }}
    });
    let legacy_invoice = json!({
        "id": "evt_legacy2", "type": "invoice.paid", "created": NOW,
        "data": { "object": {
            "object": "invoice", "subscription": { "id": "sub_legacy" }, "customer": "cus_legacy"
        }}
    });
    events.push((
        "legacy-subscription",
        legacy_subscription.to_string().into_bytes(),
    ));
    events.push(("legacy-invoice", legacy_invoice.to_string().into_bytes()));
    events.push(("one-off-invoice", br#"{"id":"evt_3","type":"invoice.paid","created":1700000000,"data":{"object":{"object":"invoice","customer":"cus_1","subscription":null}}}"#.to_vec()));
    events
}

fn stripe_seeds() {
    for (name, body) in stripe_events() {
        write("stripe_event", name, &body);
    }
    let t = "stripe_signature";
    let body = example(stripe::SUBSCRIPTION_UPDATED, Status::Active);
    let with_body = |header: &str| {
        let mut out = header.as_bytes().to_vec();
        out.push(b'\n');
        out.extend_from_slice(&body);
        out
    };
    let valid = stripe::sign(STRIPE_SECRETS[0], NOW, &body);
    write(t, "valid", with_body(&valid));
    let previous = stripe::sign(STRIPE_SECRETS[1], NOW, &body);
    let v1 = previous
        .split_once(",v1=")
        .map(|(_, v)| v)
        .unwrap_or_default();
    // While a secret is rolled: two v1 values, plus Stripe's test-mode v0.
    write(
        t,
        "rotating",
        with_body(&format!("{valid},v1={v1},v0={}", "0".repeat(64))),
    );
    write(t, "spaced", with_body(&valid.replace(',', ", ")));
    write(
        t,
        "stale",
        with_body(&stripe::sign(STRIPE_SECRETS[0], NOW - 3_600, &body)),
    );
    write(t, "empty-key", with_body(&stripe::sign("", NOW, &body)));
    write(
        t,
        "no-v1",
        with_body(&format!("t={NOW},v0={}", "a".repeat(64))),
    );
    write(t, "two-timestamps", with_body(&format!("t={NOW},{valid}")));
    write(
        t,
        "signed-timestamp-plus",
        with_body(&valid.replacen("t=", "t=+", 1)),
    );
    write(
        t,
        "empty-body",
        stripe::sign(STRIPE_SECRETS[0], NOW, b"") + "\n",
    );
}

fn device_seeds() {
    let t = "wireguard_key";
    let key: Vec<u8> = (1u8..=32).map(|b| b.wrapping_mul(37)).collect();
    let canonical = STANDARD.encode(&key);
    write(t, "valid-key", &canonical);
    write(t, "valid-key-plus-slash", STANDARD.encode([0xfb_u8; 32]));
    write(t, "zero-key", STANDARD.encode([0u8; 32]));
    write(
        t,
        "url-safe-alphabet",
        STANDARD
            .encode([0xfb_u8; 32])
            .replace('+', "-")
            .replace('/', "_"),
    );
    write(t, "unpadded", canonical.trim_end_matches('='));
    let mut odd = canonical.clone().into_bytes();
    odd[42] = b'B'; // non-zero unused bits in the last character
    write(t, "trailing-bits", odd);
    write(t, "raw-32-bytes", &key);
    write(t, "device-name", "Pixel 8 Pro");
    write(t, "device-id", "7f1d3c52-8a8e-4c1b-9a57-2c1d0e4f6a7b");
}

fn idempotency_seeds() {
    let t = "idempotency_key";
    write(t, "uuid", "9b2e1c8a-3f4d-4e5a-8b6c-7d8e9f0a1b2c");
    write(t, "one-char", "a");
    write(t, "max-length", "k".repeat(255));
    write(t, "too-long", "k".repeat(256));
    write(t, "space", "retry 1");
    write(t, "non-ascii", "clé");
}

fn refresh_seeds() {
    let t = "refresh_token";
    let (_, issued) = sessions();
    let token = issued.refresh_token;
    write(t, "issued", &token);
    let (head, secret) = token.rsplit_once('.').unwrap();
    let (prefix, _) = head.rsplit_once('.').unwrap();
    write(t, "next-generation", format!("{prefix}.1.{secret}"));
    write(t, "leading-zero", format!("{prefix}.00.{secret}"));
    write(t, "padded-secret", format!("{token}="));
    write(
        t,
        "wrong-secret",
        format!("{head}.{}", URL_SAFE_NO_PAD.encode([5u8; 32])),
    );
    write(t, "max-generation", format!("{prefix}.4294967295.{secret}"));
    write(t, "access-token-shaped", "eyJhbGciOiJFZERTQSJ9.e30.c2ln");
}

fn json_seeds() {
    let t = "json_bodies";
    let (_, issued) = sessions();
    let key = STANDARD.encode((1u8..=32).collect::<Vec<u8>>());
    let bodies = [
        ("signup", json!({"email": "Demo@KeenVPN.test ", "password": "keenvpn-demo-2026", "device_label": "Pixel 8"}).to_string()),
        ("login-no-label", json!({"email": "demo@keenvpn.test", "password": "x"}).to_string()),
        ("refresh", json!({"refresh_token": issued.refresh_token}).to_string()),
        ("create-device", json!({"name": "Laptop", "public_key": key}).to_string()),
        ("rotate-key", json!({"public_key": key}).to_string()),
        ("connect", json!({"device_id": "7f1d3c52-8a8e-4c1b-9a57-2c1d0e4f6a7b", "region": "eu-central"}).to_string()),
        ("connect-null-region", r#"{"device_id":"7f1d3c52-8a8e-4c1b-9a57-2c1d0e4f6a7b","region":null}"#.into()),
        ("set-region", json!({"health": "draining", "admission_rate": 200}).to_string()),
        ("set-region-float-rate", r#"{"admission_rate":5.0}"#.into()),
        ("set-region-huge-rate", r#"{"admission_rate":1e300,"health":null}"#.into()),
        ("set-region-negative-zero", r#"{"admission_rate":-0.0}"#.into()),
        ("health-report", json!({"health": "down"}).to_string()),
        ("unknown-field", r#"{"health":"up","extra":true}"#.into()),
        ("duplicate-field", r#"{"public_key":"a","public_key":"b"}"#.into()),
        ("escapes", r#"{"name":"\u0000\ud83d\ude00\n","public_key":"\u0041"}"#.into()),
        ("lone-surrogate", r#"{"refresh_token":"\ud800"}"#.into()),
        ("deep-nesting", format!("{{\"health\":{}{}}}", "[".repeat(200), "]".repeat(200))),
        ("not-an-object", r#"["demo@keenvpn.test","password"]"#.into()),
        ("trailing-garbage", r#"{"health":"up"} x"#.into()),
    ];
    for (name, body) in bodies {
        write(t, name, body);
    }
}

fn main() {
    json_seeds();
    tokens();
    stripe_seeds();
    device_seeds();
    idempotency_seeds();
    refresh_seeds();
}
