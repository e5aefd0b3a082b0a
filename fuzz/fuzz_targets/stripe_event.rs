//! The webhook body (`POST /v1/webhooks/stripe`): any bytes, once signed,
//! verify (the signature covers the raw bytes, whatever they are) and then
//! parse to an event or a typed error, never a panic; what parses keeps the
//! documented bounds.

#![no_main]

use keenvpn_edge::domain::stripe::{
    self, Change, Event, MAX_ID_LEN, MAX_TIMESTAMP, RELEVANT_KINDS,
};
use keenvpn_edge_fuzz::{NOW, STRIPE_SECRETS};
use libfuzzer_sys::fuzz_target;

fn bounded_id(id: &str) {
    assert!(
        !id.is_empty() && id.len() <= MAX_ID_LEN,
        "id length {}",
        id.len()
    );
    assert!(id.bytes().all(|b| b.is_ascii_graphic()), "id {id:?}");
}

fn in_range(t: i64) {
    assert!((1..=MAX_TIMESTAMP).contains(&t), "timestamp {t}");
}

fuzz_target!(|body: &[u8]| {
    let header = stripe::sign(STRIPE_SECRETS[0], NOW, body);
    assert_eq!(
        stripe::verify(Some(&header), body, &STRIPE_SECRETS, NOW),
        Ok(())
    );

    let Ok(event) = stripe::parse_event(body) else {
        return;
    };
    bounded_id(event.id());
    bounded_id(event.kind());
    let Event::Relevant { envelope, change } = event else {
        return;
    };
    assert!(RELEVANT_KINDS.contains(&envelope.kind.as_str()));
    in_range(envelope.created);
    match change {
        Change::Subscription(state) => {
            bounded_id(&state.subscription_id);
            bounded_id(&state.customer_id);
            in_range(state.current_period_end);
            if let Some(plan) = &state.plan_id {
                bounded_id(plan);
            }
            if let Some(user) = &state.user_id {
                assert_eq!(user.len(), 36, "user id {user:?}");
            }
        }
        Change::Invoice {
            subscription_id,
            customer_id,
            ..
        } => {
            bounded_id(&subscription_id);
            bounded_id(&customer_id);
        }
    }
});
