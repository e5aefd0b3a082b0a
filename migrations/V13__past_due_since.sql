-- When a subscription fell past due: the time of the provider's event that
-- set the status, kept while it stays past due, cleared when it leaves.
--
-- A past-due subscription keeps its plan for the grace (3 days) while the
-- provider retries the payment. That grace ran from the period end; but at a
-- renewal the provider moves the subscription into the new period before it
-- charges, so a failed renewal is past due with the new, unpaid period's end,
-- and kept its plan for that whole period plus the grace. The grace now runs
-- from here (`domain::entitlement`), and never past the old bound.
--
-- Kept by a trigger, so that every statement that sets the status (a
-- subscription event, an invoice) keeps it right.

-- Waits for a lock (behind a long transaction on subscriptions) end the
-- migration rather than hold sign-ins and billing events meanwhile. Adding a
-- column with no default rewrites nothing; the backfill changes the rows past
-- due only, but scans the table (no index on status) while the column's lock
-- holds every reader: a fraction of a second for a million subscriptions.
SET LOCAL lock_timeout = '10s';

ALTER TABLE subscriptions ADD COLUMN past_due_since timestamptz;

-- The rows past due now: since their status was set, as well as can be told.
-- Before the trigger, which would put its own value in place of this one.
-- Each row's version goes up, as with every change to a row (the user's
-- inputs then supersede older copies).
UPDATE subscriptions
SET past_due_since = coalesce(greatest(status_event_at, provider_event_at), updated_at),
    version = version + 1
WHERE status = 'past_due';

CREATE FUNCTION keep_past_due_since() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'past_due' THEN
        NEW.past_due_since := NULL;
    ELSIF TG_OP = 'UPDATE' AND OLD.status = 'past_due' AND OLD.past_due_since IS NOT NULL THEN
        NEW.past_due_since := OLD.past_due_since;
    ELSE
        -- greatest() skips NULLs: the newer of the two event times.
        NEW.past_due_since := coalesce(greatest(NEW.status_event_at, NEW.provider_event_at), now());
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER subscriptions_past_due_since BEFORE INSERT OR UPDATE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION keep_past_due_since();
