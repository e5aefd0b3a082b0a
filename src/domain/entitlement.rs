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

    /// The provider's spelling, as [`Status::parse`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Canceled => "canceled",
            Status::Unpaid => "unpaid",
            Status::Incomplete => "incomplete",
            Status::IncompleteExpired => "incomplete_expired",
            Status::Paused => "paused",
        }
    }

    /// Whether a subscription in this status is being paid for (see
    /// [`PAID_FOR`]).
    pub fn is_paid_for(self) -> bool {
        PAID_FOR.contains(&self)
    }
}

/// The statuses of a subscription that is being paid for: trialing, active,
/// or past due while its payment is retried. Of a user's two subscriptions,
/// one in these takes the row from one that is not (`store::apply_billing_event`).
pub const PAID_FOR: [Status; 3] = [Status::Trialing, Status::Active, Status::PastDue];

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

    /// Every status there is.
    pub(super) const ALL_STATUSES: [Status; 8] = [
        Status::Trialing,
        Status::Active,
        Status::PastDue,
        Status::Canceled,
        Status::Unpaid,
        Status::Incomplete,
        Status::IncompleteExpired,
        Status::Paused,
    ];

    #[test]
    fn statuses_are_spelled_as_they_parse_and_three_are_paid_for() {
        let all = ALL_STATUSES;
        for status in all {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        let paid: Vec<Status> = all.into_iter().filter(|s| s.is_paid_for()).collect();
        assert_eq!(paid, PAID_FOR);
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

/// Properties over generated subscriptions (shrinking to a minimal one).
/// Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn free() -> Plan {
        Plan {
            id: FREE_PLAN.into(),
            max_devices: 1,
            region_tiers: vec![Tier::Free],
        }
    }

    /// A paid plan: at least what the free plan gives.
    fn paid() -> impl Strategy<Value = Plan> {
        (1u32..=20, any::<bool>()).prop_map(|(max_devices, premium)| Plan {
            id: "paid".into(),
            max_devices,
            region_tiers: if premium {
                vec![Tier::Free, Tier::Premium]
            } else {
                vec![Tier::Free]
            },
        })
    }

    fn status() -> impl Strategy<Value = Status> {
        prop::sample::select(super::tests::ALL_STATUSES.to_vec())
    }

    /// Times near each other (so the boundaries are hit) and at the extremes.
    fn time() -> impl Strategy<Value = i64> {
        prop_oneof![
            4 => -10i64..10 + 2 * GRACE_SECS,
            1 => any::<i64>(),
            1 => prop::sample::select(vec![i64::MIN, i64::MAX, i64::MAX - GRACE_SECS]),
        ]
    }

    /// `b` gives at least what `a` gives.
    fn at_least(b: &Entitlement, a: &Entitlement) -> Result<(), TestCaseError> {
        prop_assert!(b.max_devices >= a.max_devices, "{:?} < {:?}", b, a);
        prop_assert!(
            a.region_tiers.iter().all(|t| b.allows_tier(*t)),
            "{:?} < {:?}",
            b,
            a
        );
        // `None` is the free plan, which lapses never but grants least.
        if a.until.is_some() {
            prop_assert!(b.until >= a.until, "{:?} < {:?}", b, a);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// A later subscription end never yields less: not fewer devices,
        /// not fewer region tiers, not an earlier lapse.
        #[test]
        fn entitlement_is_monotonic_in_subscription_end(
            plan in paid(),
            status in status(),
            cancel_at_period_end in any::<bool>(),
            (end_a, end_b) in (time(), time()),
            now in time(),
        ) {
            let (early, late) = (end_a.min(end_b), end_a.max(end_b));
            let sub = |end| Subscription {
                plan: plan.clone(),
                status,
                current_period_end: end,
                cancel_at_period_end,
            };
            let e_early = entitlement(&free(), Some(&sub(early)), now);
            let e_late = entitlement(&free(), Some(&sub(late)), now);
            at_least(&e_late, &e_early)?;
        }

        /// Time only takes away: an entitlement at a later `now` never gives
        /// more than at an earlier one, and a paid one is never handed out
        /// already lapsed.
        #[test]
        fn entitlement_only_shrinks_as_time_passes(
            plan in paid(),
            status in status(),
            cancel_at_period_end in any::<bool>(),
            end in time(),
            (now_a, now_b) in (time(), time()),
        ) {
            let sub = Subscription { plan, status, current_period_end: end, cancel_at_period_end };
            let (before, after) = (now_a.min(now_b), now_a.max(now_b));
            let e_before = entitlement(&free(), Some(&sub), before);
            let e_after = entitlement(&free(), Some(&sub), after);
            at_least(&e_before, &e_after)?;
            for (now, e) in [(before, &e_before), (after, &e_after)] {
                match e.until {
                    Some(until) => {
                        prop_assert!(now < until);
                        prop_assert_eq!(&e.plan, "paid");
                    }
                    None => prop_assert_eq!(e, &Entitlement::of_plan(&free(), None)),
                }
            }
        }

        /// Only trialing, active and past-due subscriptions ever pay off,
        /// and never past the period end plus the grace.
        #[test]
        fn only_live_statuses_grant_the_paid_plan_and_never_past_the_grace(
            plan in paid(),
            status in status(),
            cancel_at_period_end in any::<bool>(),
            end in time(),
            now in time(),
        ) {
            let sub = Subscription { plan, status, current_period_end: end, cancel_at_period_end };
            let e = entitlement(&free(), Some(&sub), now);
            if let Some(until) = e.until {
                prop_assert!(matches!(status, Status::Trialing | Status::Active | Status::PastDue));
                prop_assert!(until <= end.saturating_add(GRACE_SECS));
            }
        }
    }
}
