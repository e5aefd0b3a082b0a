//! How long PostgreSQL keeps the rows that only grow: the connection events
//! (who connected where, per device) and the record of processed billing
//! events. The cron expires what is older (`edge::cron`); this module reads
//! the operator's settings.
//!
//! Connection events are personal data about a VPN's users, and a VPN keeps
//! them no longer than it needs them; the default is 90 days, and an
//! operator may set fewer, down to one day. They are dropped a month at a
//! time, a partition whose whole month is past the retention, so an event is
//! kept for at most the retention plus a month.
//!
//! The billing-event record is what makes a redelivered Stripe event a
//! no-op. Stripe retries a delivery for up to three days, and an operator can
//! resend an event from the dashboard for 30 days; a record expired sooner
//! would let such a resend apply twice, so the retention cannot be set below
//! 30 days.

/// The variable that sets how many days connection events are kept.
pub const CONNECTION_EVENTS_VAR: &str = "CONNECTION_EVENTS_RETENTION_DAYS";
/// The variable that sets how many days processed billing events are kept.
pub const WEBHOOK_EVENTS_VAR: &str = "WEBHOOK_EVENTS_RETENTION_DAYS";

/// One retention setting: its variable, default and the days it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub var: &'static str,
    pub default_days: u32,
    pub min_days: u32,
    pub max_days: u32,
}

/// Connection events: 90 days unless set; one day to ten years.
pub const CONNECTION_EVENTS: Setting = Setting {
    var: CONNECTION_EVENTS_VAR,
    default_days: 90,
    min_days: 1,
    max_days: 3_650,
};

/// Processed billing events: 90 days unless set; never under Stripe's 30
/// days of resends.
pub const WEBHOOK_EVENTS: Setting = Setting {
    var: WEBHOOK_EVENTS_VAR,
    default_days: 90,
    min_days: 30,
    max_days: 3_650,
};

impl Setting {
    /// The days to keep, from the variable's value (`None` when unset: the
    /// default). A value that is not a whole number of days within the
    /// bounds is an error naming the variable, and nothing is expired: a
    /// mistyped setting must not delete more than the operator meant.
    pub fn days(&self, value: Option<&str>) -> Result<u32, String> {
        let Some(value) = value else {
            return Ok(self.default_days);
        };
        let value = value.trim();
        let days = value
            .parse::<u32>()
            .ok()
            .filter(|d| (self.min_days..=self.max_days).contains(d));
        days.ok_or_else(|| {
            format!(
                "{} must be a whole number of days from {} to {}, not {value:?}; nothing is expired until it is",
                self.var, self.min_days, self.max_days
            )
        })
    }
}

/// How many billing-event records one cron run deletes at most, so that a
/// first run over years of them, or a retention made shorter, is spread
/// over runs rather than one long delete.
pub const WEBHOOK_EVENTS_PER_RUN: u32 = 10_000;

/// How many rows of the default partition (events whose month had no
/// partition of its own) one cron run deletes at most.
pub const DEFAULT_PARTITION_ROWS_PER_RUN: u32 = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_variable_keeps_the_default() {
        assert_eq!(CONNECTION_EVENTS.days(None), Ok(90));
        assert_eq!(WEBHOOK_EVENTS.days(None), Ok(90));
    }

    #[test]
    fn a_whole_number_of_days_within_the_bounds_is_taken() {
        assert_eq!(CONNECTION_EVENTS.days(Some("1")), Ok(1));
        assert_eq!(CONNECTION_EVENTS.days(Some(" 30 ")), Ok(30));
        assert_eq!(CONNECTION_EVENTS.days(Some("3650")), Ok(3_650));
        assert_eq!(WEBHOOK_EVENTS.days(Some("30")), Ok(30));
    }

    #[test]
    fn anything_else_is_an_error_naming_the_variable() {
        for bad in ["", "0", "-1", "7.5", "90d", "3651", "99999999999"] {
            let err = CONNECTION_EVENTS.days(Some(bad)).unwrap_err();
            assert!(err.starts_with(CONNECTION_EVENTS_VAR), "{bad:?}: {err}");
        }
        // Under Stripe's 30 days of resends.
        let err = WEBHOOK_EVENTS.days(Some("29")).unwrap_err();
        assert!(err.starts_with(WEBHOOK_EVENTS_VAR), "{err}");
        assert!(err.contains("from 30 to 3650"), "{err}");
    }
}
