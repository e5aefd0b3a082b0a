-- Subscription events and invoice events are ordered apart. Invoice events
-- (invoice.paid, invoice.payment_failed) change only the status, so they must
-- not make an older subscription event that carries a newer period or plan
-- look stale: Stripe does not deliver in order, and retries failed deliveries.
--
-- provider_event_at (V1) is now the creation time of the newest subscription
-- event applied (plan, period end, cancellation, ids); only subscription
-- events advance it. status_event_at is that of the newest event of either
-- kind that set the status. Until now every applied event set the status, so
-- existing rows start from provider_event_at.
ALTER TABLE subscriptions ADD COLUMN status_event_at timestamptz;
UPDATE subscriptions SET status_event_at = provider_event_at;
