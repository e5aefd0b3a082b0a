//! Entitlements: what a user may do right now, as a pure function of the free
//! plan, their subscriptions and `now`.
//!
//! The result travels in every access token (so the reconnect hot path needs no
//! database) and is recomputed at each refresh from the inputs the user's Durable
//! Object holds, so a subscription that lapses takes effect at the next refresh.
//!
//! A user may hold several subscriptions at once: the billing provider lets a
//! customer have more than one (Plus running to the end of its period after
//! Family was bought, or Family cancelled while Plus goes on). Each grants
//! what it grants on its own, and the user gets the best of them
//! ([`Entitlement::rank`]).

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
/// or past due while its payment is retried. Only these grant a paid plan, so
/// a user's entitlement inputs carry only subscriptions in them.
pub const PAID_FOR: [Status; 3] = [Status::Trialing, Status::Active, Status::PastDue];

/// The statuses a paid invoice makes `active` (again): `active` itself,
/// past due, and those lapsed for want of a payment (`unpaid`,
/// `incomplete`). A subscription that has ended (`canceled`,
/// `incomplete_expired`) or is `paused` is never revived by a payment. Nor
/// does a payment end a trial: a trial's first invoice is paid at $0 when
/// the trial starts, and Stripe's own subscription event says when the
/// trial becomes `active`.
pub const REVIVED_BY_PAYMENT: [Status; 4] = [
    Status::Active,
    Status::PastDue,
    Status::Unpaid,
    Status::Incomplete,
];

/// The statuses of a subscription that has ended for good: the provider
/// never moves one out of them (a new purchase is a new subscription).
pub const ENDED: [Status; 2] = [Status::Canceled, Status::IncompleteExpired];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub plan: Plan,
    pub status: Status,
    /// Unix seconds.
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
    /// While past due: when it fell past due (unix seconds; the provider's
    /// time of the event that set the status). Absent otherwise, and in
    /// copies stored before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub past_due_since: Option<i64>,
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

    /// How much it grants, to choose among several: more region tiers first,
    /// then more devices, then the later lapse; the plan id breaks a tie, so
    /// the choice does not depend on the order of the subscriptions.
    pub fn rank(&self) -> (usize, u32, Option<i64>, &str) {
        (
            self.region_tiers.len(),
            self.max_devices,
            self.until,
            &self.plan,
        )
    }
}

/// Until when one subscription grants its plan, if it does at all:
///
/// - trialing or active: the period end, plus [`GRACE_SECS`] unless it was
///   cancelled at period end (then it ends exactly there);
/// - past due: [`GRACE_SECS`] from when it fell past due, or from the period
///   end if that is earlier. A renewal whose payment fails is past due with
///   the new period's end (the provider moves the period first, then
///   charges): that unpaid period grants only the grace;
/// - cancelled, unpaid, incomplete, expired, paused: never.
fn paid_until(sub: &Subscription) -> Option<i64> {
    match sub.status {
        Status::Trialing | Status::Active if sub.cancel_at_period_end => {
            Some(sub.current_period_end)
        }
        Status::Trialing | Status::Active => {
            Some(sub.current_period_end.saturating_add(GRACE_SECS))
        }
        Status::PastDue => {
            let from = sub
                .past_due_since
                .map_or(sub.current_period_end, |t| t.min(sub.current_period_end));
            Some(from.saturating_add(GRACE_SECS))
        }
        Status::Canceled
        | Status::Unpaid
        | Status::Incomplete
        | Status::IncompleteExpired
        | Status::Paused => None,
    }
}

/// The entitlement at `now` given the free plan and the user's subscriptions:
/// the best ([`Entitlement::rank`]) paid plan that one of them still grants
/// (see [`paid_until`]), else the free plan.
pub fn entitlement(free: &Plan, subscriptions: &[Subscription], now: i64) -> Entitlement {
    subscriptions
        .iter()
        .filter_map(|sub| match paid_until(sub) {
            Some(until) if now < until => Some(Entitlement::of_plan(&sub.plan, Some(until))),
            _ => None,
        })
        .max_by(|a, b| a.rank().cmp(&b.rank()))
        .unwrap_or_else(|| Entitlement::of_plan(free, None))
}

/// What the entitlement is computed from, kept by the user's Durable Object:
/// the free plan and the user's subscriptions that are being paid for
/// ([`PAID_FOR`]; the others grant nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredInputs")]
pub struct EntitlementInputs {
    pub free: Plan,
    pub subscriptions: Vec<Subscription>,
    /// The sum of the versions of the user's subscription rows, each raised
    /// by every change to its row (0: none), so it grows with every change.
    /// Of two copies the object keeps the newer (see
    /// [`EntitlementInputs::supersedes`]).
    pub version: i64,
}

impl EntitlementInputs {
    /// Whether these inputs may replace `current`: they are at least as new.
    /// A sign-in reads the inputs before it checks the password, and a billing
    /// event can change and push them meanwhile; the sign-in's older copy,
    /// arriving last, must not undo that change.
    pub fn supersedes(&self, current: Option<&EntitlementInputs>) -> bool {
        current.is_none_or(|c| self.version >= c.version)
    }

    /// The entitlement these inputs give at `now`.
    pub fn at(&self, now: i64) -> Entitlement {
        entitlement(&self.free, &self.subscriptions, now)
    }
}

/// [`EntitlementInputs`] as stored: objects written before users could hold
/// several subscriptions keep one, or none, under `subscription`.
#[derive(Deserialize)]
struct StoredInputs {
    free: Plan,
    #[serde(default)]
    subscriptions: Vec<Subscription>,
    #[serde(default)]
    subscription: Option<Subscription>,
    #[serde(default)]
    version: i64,
}

impl From<StoredInputs> for EntitlementInputs {
    fn from(s: StoredInputs) -> EntitlementInputs {
        let mut subscriptions = s.subscriptions;
        subscriptions.extend(s.subscription);
        EntitlementInputs {
            free: s.free,
            subscriptions,
            version: s.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::slice::from_ref;

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
            past_due_since: None,
        }
    }

    #[test]
    fn no_subscription_is_the_free_plan_forever() {
        let e = entitlement(&free(), &[], 1_000);
        assert_eq!(e.plan, "free");
        assert_eq!(e.max_devices, 1);
        assert_eq!(e.until, None);
        assert!(e.allows_tier(Tier::Free) && !e.allows_tier(Tier::Premium));
    }

    #[test]
    fn active_is_paid_until_period_end_plus_grace() {
        let s = sub(Status::Active, 1_000, false);
        let e = entitlement(&free(), from_ref(&s), 999);
        assert_eq!(
            (e.plan.as_str(), e.max_devices, e.until),
            ("plus", 5, Some(1_000 + GRACE_SECS))
        );
        // A late renewal event does not cut the user off at the period end...
        assert_eq!(
            entitlement(&free(), from_ref(&s), 1_000 + GRACE_SECS - 1).plan,
            "plus"
        );
        // ...but the grace is bounded.
        assert_eq!(
            entitlement(&free(), from_ref(&s), 1_000 + GRACE_SECS).plan,
            "free"
        );
    }

    #[test]
    fn cancelled_at_period_end_ends_exactly_at_period_end() {
        let s = sub(Status::Active, 1_000, true);
        assert_eq!(entitlement(&free(), from_ref(&s), 999).plan, "plus");
        assert_eq!(entitlement(&free(), from_ref(&s), 999).until, Some(1_000));
        assert_eq!(entitlement(&free(), from_ref(&s), 1_000).plan, "free");
    }

    #[test]
    fn past_due_keeps_the_plan_through_the_grace_period() {
        let s = sub(Status::PastDue, 1_000, false);
        assert_eq!(
            entitlement(&free(), from_ref(&s), 1_000 + GRACE_SECS - 1).plan,
            "plus"
        );
        assert_eq!(
            entitlement(&free(), from_ref(&s), 1_000 + GRACE_SECS).plan,
            "free"
        );
    }

    #[test]
    fn a_failed_renewal_grants_the_grace_from_the_failure_not_the_new_period() {
        // Renewed into a period ending at 100_000, past due since 1_000.
        let s = Subscription {
            past_due_since: Some(1_000),
            ..sub(Status::PastDue, 100_000, false)
        };
        let at = |now| entitlement(&free(), from_ref(&s), now);
        assert_eq!(at(1_000 + GRACE_SECS - 1).plan, "plus");
        assert_eq!(at(1_000 + GRACE_SECS - 1).until, Some(1_000 + GRACE_SECS));
        assert_eq!(at(1_000 + GRACE_SECS).plan, "free");
        // Fallen past due after the period ended: the period end bounds it,
        // as it did before the time was kept.
        let late = Subscription {
            past_due_since: Some(5_000),
            ..sub(Status::PastDue, 2_000, false)
        };
        assert_eq!(
            entitlement(&free(), from_ref(&late), 0).until,
            Some(2_000 + GRACE_SECS)
        );
        // A copy stored without it reads as before.
        let stored: Subscription = serde_json::from_value(serde_json::json!({
            "plan": plus(), "status": "past_due",
            "current_period_end": 2_000, "cancel_at_period_end": false
        }))
        .expect("an older copy reads");
        assert_eq!(stored.past_due_since, None);
        // Only past due reads it.
        let active = Subscription {
            past_due_since: Some(1_000),
            ..sub(Status::Active, 100_000, false)
        };
        assert_eq!(
            entitlement(&free(), from_ref(&active), 0).until,
            Some(100_000 + GRACE_SECS)
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
            assert_eq!(
                entitlement(&free(), from_ref(&s), 1).plan,
                "free",
                "{status:?}"
            );
        }
    }

    #[test]
    fn entitlement_is_monotonic_in_subscription_end() {
        // A later period end never yields a shorter or smaller entitlement.
        for status in [Status::Active, Status::Trialing, Status::PastDue] {
            for now in [0, 500, 1_000, 1_000 + GRACE_SECS] {
                let early = entitlement(&free(), from_ref(&sub(status, 1_000, false)), now);
                let late = entitlement(&free(), from_ref(&sub(status, 2_000, false)), now);
                assert!(late.max_devices >= early.max_devices, "{status:?} {now}");
                assert!(late.until.unwrap_or(0) >= early.until.unwrap_or(0));
            }
        }
    }

    fn family_sub(status: Status, end: i64, cancel: bool) -> Subscription {
        Subscription {
            plan: Plan {
                id: "family".into(),
                max_devices: 10,
                region_tiers: vec![Tier::Free, Tier::Premium],
            },
            ..sub(status, end, cancel)
        }
    }

    #[test]
    fn the_best_of_several_subscriptions_is_granted_until_it_lapses() {
        // Family bought while Plus runs on; Family cancelled at its period end.
        let subs = [
            sub(Status::Active, 2_000, false),
            family_sub(Status::Active, 1_000, true),
        ];
        for order in [[0, 1], [1, 0]] {
            let subs = order.map(|i| subs[i].clone());
            let e = entitlement(&free(), &subs, 999);
            assert_eq!((e.plan.as_str(), e.until), ("family", Some(1_000)));
            // Family lapsed: Plus, still paid for, takes over, not free.
            let e = entitlement(&free(), &subs, 1_000);
            assert_eq!(
                (e.plan.as_str(), e.until),
                ("plus", Some(2_000 + GRACE_SECS))
            );
            let e = entitlement(&free(), &subs, 2_000 + GRACE_SECS);
            assert_eq!((e.plan.as_str(), e.until), ("free", None));
        }
    }

    #[test]
    fn a_subscription_that_grants_nothing_takes_nothing_from_another() {
        for status in [Status::Canceled, Status::Incomplete, Status::Unpaid] {
            let subs = [
                family_sub(status, 10_000, false),
                sub(Status::Active, 2_000, false),
            ];
            assert_eq!(entitlement(&free(), &subs, 1).plan, "plus", "{status:?}");
        }
        // Of two of the same plan, the one that lapses later.
        let subs = [
            sub(Status::Active, 3_000, true),
            sub(Status::PastDue, 2_000, false),
        ];
        assert_eq!(
            entitlement(&free(), &subs, 1).until,
            Some(2_000 + GRACE_SECS)
        );
    }

    #[test]
    fn inputs_stored_with_one_subscription_read_as_a_list_of_it() {
        let plus = serde_json::to_value(sub(Status::Active, 2_000, false)).unwrap();
        let free_plan = serde_json::to_value(free()).unwrap();
        let old = serde_json::json!({"free": free_plan, "subscription": plus, "version": 3});
        let inputs: EntitlementInputs = serde_json::from_value(old).unwrap();
        assert_eq!(inputs.subscriptions, [sub(Status::Active, 2_000, false)]);
        assert_eq!(inputs.version, 3);
        // None at all, and from before inputs had a version.
        let old = serde_json::json!({"free": free_plan, "subscription": null});
        let inputs: EntitlementInputs = serde_json::from_value(old).unwrap();
        assert_eq!((inputs.subscriptions.len(), inputs.version), (0, 0));
        assert_eq!(inputs.at(1).plan, "free");
        // Today's form reads back as written.
        let now = EntitlementInputs {
            free: free(),
            subscriptions: vec![
                sub(Status::Active, 2_000, false),
                family_sub(Status::Trialing, 900, false),
            ],
            version: 7,
        };
        let text = serde_json::to_string(&now).unwrap();
        assert!(!text.contains("\"subscription\""), "{text}");
        assert_eq!(
            serde_json::from_str::<EntitlementInputs>(&text).unwrap(),
            now
        );
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
        // A payment revives what is paid for or lapsed, never what ended,
        // and ends no trial.
        for paid in [
            Status::Active,
            Status::PastDue,
            Status::Unpaid,
            Status::Incomplete,
        ] {
            assert!(REVIVED_BY_PAYMENT.contains(&paid), "{paid:?}");
        }
        for ended in [
            Status::Canceled,
            Status::IncompleteExpired,
            Status::Paused,
            Status::Trialing,
        ] {
            assert!(!REVIVED_BY_PAYMENT.contains(&ended), "{ended:?}");
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

/// Properties over generated subscriptions (shrinking to a minimal one).
/// Native only: the property-test library is a host dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::slice::from_ref;

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

    /// A subscription of some plan, in any status, ending any time.
    fn subscription() -> impl Strategy<Value = Subscription> {
        (
            paid(),
            prop::sample::select(vec!["plus", "family", "paid"]),
            status(),
            any::<bool>(),
            time(),
            prop::option::of(time()),
        )
            .prop_map(
                |(mut plan, id, status, cancel_at_period_end, end, past_due_since)| {
                    plan.id = id.into();
                    Subscription {
                        plan,
                        status,
                        current_period_end: end,
                        cancel_at_period_end,
                        past_due_since,
                    }
                },
            )
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
            past_due_since in prop::option::of(time()),
            (end_a, end_b) in (time(), time()),
            now in time(),
        ) {
            let (early, late) = (end_a.min(end_b), end_a.max(end_b));
            let sub = |end| Subscription {
                plan: plan.clone(),
                status,
                current_period_end: end,
                cancel_at_period_end,
                past_due_since,
            };
            let e_early = entitlement(&free(), from_ref(&sub(early)), now);
            let e_late = entitlement(&free(), from_ref(&sub(late)), now);
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
            past_due_since in prop::option::of(time()),
            end in time(),
            (now_a, now_b) in (time(), time()),
        ) {
            let sub = Subscription { plan, status, current_period_end: end, cancel_at_period_end, past_due_since };
            let (before, after) = (now_a.min(now_b), now_a.max(now_b));
            let e_before = entitlement(&free(), from_ref(&sub), before);
            let e_after = entitlement(&free(), from_ref(&sub), after);
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
            past_due_since in prop::option::of(time()),
            end in time(),
            now in time(),
        ) {
            let sub = Subscription { plan, status, current_period_end: end, cancel_at_period_end, past_due_since };
            let e = entitlement(&free(), from_ref(&sub), now);
            if let Some(until) = e.until {
                prop_assert!(matches!(status, Status::Trialing | Status::Active | Status::PastDue));
                prop_assert!(until <= end.saturating_add(GRACE_SECS));
            }
        }

        /// The order in which the subscriptions come does not matter, and
        /// the user gets what one of them grants on its own (or free).
        #[test]
        fn several_subscriptions_give_what_the_best_one_gives(
            subs in prop::collection::vec(subscription(), 0..5),
            now in time(),
        ) {
            let e = entitlement(&free(), &subs, now);
            let mut reversed = subs.clone();
            reversed.reverse();
            prop_assert_eq!(&entitlement(&free(), &reversed, now), &e);
            let alone: Vec<Entitlement> =
                subs.iter().map(|s| entitlement(&free(), from_ref(s), now)).collect();
            prop_assert!(
                alone.contains(&e) || e == Entitlement::of_plan(&free(), None),
                "{:?} is none of {:?}", e, alone
            );
            for a in &alone {
                prop_assert!(e.rank() >= a.rank(), "{:?} ranks below {:?}", e, a);
            }
        }

        /// Another subscription never makes the entitlement rank lower.
        #[test]
        fn another_subscription_never_gives_less(
            subs in prop::collection::vec(subscription(), 0..4),
            extra in subscription(),
            now in time(),
        ) {
            let before = entitlement(&free(), &subs, now);
            let mut more = subs.clone();
            more.push(extra);
            let after = entitlement(&free(), &more, now);
            prop_assert!(after.rank() >= before.rank(), "{:?} < {:?}", after, before);
        }
    }
}
