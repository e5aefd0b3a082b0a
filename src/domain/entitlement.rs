//! Entitlements: what a user may do right now, as a pure function of their plan,
//! their subscription and `now`.
//!
//! The result travels in every access token (so the reconnect hot path needs no
//! database) and is recomputed at each refresh from the inputs the user's Durable
//! Object holds, so a subscription that lapses takes effect at the next refresh.

use super::catalogue::Tier;
use serde::{Deserialize, Serialize};

/// A paid subscription whose renewal failed keeps its plan this long past the
/// period end while the provider retries the payment; so does an active one
/// whose renewal event is late.
pub const GRACE_SECS: i64 = 3 * 24 * 3600;

/// The id of the plan everyone has without a paid subscription.
pub const FREE_PLAN: &str = "free";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub max_devices: u32,
    pub region_tiers: Vec<Tier>,
}

/// The billing provider's subscription statuses (Stripe's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Trialing,
    Active,
    PastDue,
    Canceled,
    Unpaid,
    Incomplete,
    IncompleteExpired,
    Paused,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub plan: Plan,
    pub status: Status,
    /// Unix seconds.
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
}

/// What the user may do. `until` is when a paid entitlement lapses (unix
/// seconds; `None` for the free plan, which does not lapse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlement {
    pub plan: String,
    pub max_devices: u32,
    pub region_tiers: Vec<Tier>,
    pub until: Option<i64>,
}

impl Entitlement {
    pub fn of_plan(plan: &Plan, until: Option<i64>) -> Entitlement {
        Entitlement {
            plan: plan.id.clone(),
            max_devices: plan.max_devices,
            region_tiers: plan.region_tiers.clone(),
            until,
        }
    }

    pub fn allows_tier(&self, tier: Tier) -> bool {
        self.region_tiers.contains(&tier)
    }
}

/// The entitlement at `now` given the free plan and the user's subscription, if any.
///
/// - trialing or active: the paid plan until the period end, plus [`GRACE_SECS`]
///   unless it was cancelled at period end (then it ends exactly there);
/// - past due: the paid plan until the period end plus [`GRACE_SECS`];
/// - cancelled, unpaid, incomplete, expired, paused: the free plan.
pub fn entitlement(free: &Plan, subscription: Option<&Subscription>, now: i64) -> Entitlement {
    let Some(sub) = subscription else {
        return Entitlement::of_plan(free, None);
    };
    let paid_until = match sub.status {
        Status::Trialing | Status::Active if sub.cancel_at_period_end => {
            Some(sub.current_period_end)
        }
        Status::Trialing | Status::Active | Status::PastDue => {
            Some(sub.current_period_end.saturating_add(GRACE_SECS))
        }
        Status::Canceled
        | Status::Unpaid
        | Status::Incomplete
        | Status::IncompleteExpired
        | Status::Paused => None,
    };
    match paid_until {
        Some(until) if now < until => Entitlement::of_plan(&sub.plan, Some(until)),
        _ => Entitlement::of_plan(free, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free() -> Plan {
        Plan {
            id: "free".into(),
            max_devices: 1,
            region_tiers: vec![Tier::Free],
        }
    }
    fn plus() -> Plan {
        Plan {
            id: "plus".into(),
            max_devices: 5,
            region_tiers: vec![Tier::Free, Tier::Premium],
        }
    }
    fn sub(status: Status, end: i64, cancel: bool) -> Subscription {
        Subscription {
            plan: plus(),
            status,
            current_period_end: end,
            cancel_at_period_end: cancel,
        }
    }

    #[test]
    fn no_subscription_is_the_free_plan_forever() {
        let e = entitlement(&free(), None, 1_000);
        assert_eq!(e.plan, "free");
        assert_eq!(e.max_devices, 1);
        assert_eq!(e.until, None);
        assert!(e.allows_tier(Tier::Free) && !e.allows_tier(Tier::Premium));
    }

    #[test]
    fn active_is_paid_until_period_end_plus_grace() {
        let s = sub(Status::Active, 1_000, false);
        let e = entitlement(&free(), Some(&s), 999);
        assert_eq!(
            (e.plan.as_str(), e.max_devices, e.until),
            ("plus", 5, Some(1_000 + GRACE_SECS))
        );
        // A late renewal event does not cut the user off at the period end...
        assert_eq!(
            entitlement(&free(), Some(&s), 1_000 + GRACE_SECS - 1).plan,
            "plus"
        );
        // ...but the grace is bounded.
        assert_eq!(
            entitlement(&free(), Some(&s), 1_000 + GRACE_SECS).plan,
            "free"
        );
    }

    #[test]
    fn cancelled_at_period_end_ends_exactly_at_period_end() {
        let s = sub(Status::Active, 1_000, true);
        assert_eq!(entitlement(&free(), Some(&s), 999).plan, "plus");
        assert_eq!(entitlement(&free(), Some(&s), 999).until, Some(1_000));
        assert_eq!(entitlement(&free(), Some(&s), 1_000).plan, "free");
    }

    #[test]
    fn past_due_keeps_the_plan_through_the_grace_period() {
        let s = sub(Status::PastDue, 1_000, false);
        assert_eq!(
            entitlement(&free(), Some(&s), 1_000 + GRACE_SECS - 1).plan,
            "plus"
        );
        assert_eq!(
            entitlement(&free(), Some(&s), 1_000 + GRACE_SECS).plan,
            "free"
        );
    }

    #[test]
    fn ended_or_unpaid_statuses_fall_back_to_free_even_inside_the_period() {
        for status in [
            Status::Canceled,
            Status::Unpaid,
            Status::Incomplete,
            Status::IncompleteExpired,
            Status::Paused,
        ] {
            let s = sub(status, 10_000, false);
            assert_eq!(entitlement(&free(), Some(&s), 1).plan, "free", "{status:?}");
        }
    }

    #[test]
    fn entitlement_is_monotonic_in_subscription_end() {
        // A later period end never yields a shorter or smaller entitlement.
        for status in [Status::Active, Status::Trialing, Status::PastDue] {
            for now in [0, 500, 1_000, 1_000 + GRACE_SECS] {
                let early = entitlement(&free(), Some(&sub(status, 1_000, false)), now);
                let late = entitlement(&free(), Some(&sub(status, 2_000, false)), now);
                assert!(late.max_devices >= early.max_devices, "{status:?} {now}");
                assert!(late.until.unwrap_or(0) >= early.until.unwrap_or(0));
            }
        }
    }

    #[test]
    fn statuses_parse_from_provider_spelling() {
        assert_eq!(Status::parse("past_due"), Some(Status::PastDue));
        assert_eq!(
            Status::parse("incomplete_expired"),
            Some(Status::IncompleteExpired)
        );
        assert_eq!(Status::parse("bogus"), None);
    }
}
