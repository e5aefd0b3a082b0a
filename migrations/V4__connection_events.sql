-- Connection events (who connected where, and whether they were admitted),
-- written in batches by the queue consumer; never by the connect path itself.
-- Partitioned by month so old months can be detached and dropped cheaply.
CREATE TABLE connection_events (
    event_id     uuid NOT NULL,              -- from the producer: a redelivered message is a no-op
    occurred_at  timestamptz NOT NULL,
    user_id      uuid NOT NULL,
    device_id    uuid NOT NULL,
    region_id    text NOT NULL,
    server_id    text,
    outcome      text NOT NULL CHECK (outcome IN ('admitted', 'throttled', 'closed')),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

-- Rows outside every monthly partition land here rather than failing the batch.
CREATE TABLE connection_events_default PARTITION OF connection_events DEFAULT;

-- Creates the partitions of this month and the next `ahead` months if missing.
-- The cron trigger calls it, so partitions always exist before they are needed.
CREATE FUNCTION ensure_connection_event_partitions(ahead integer DEFAULT 2) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first_month date := date_trunc('month', now())::date;
    month_start date;
    part text;
BEGIN
    FOR i IN 0..ahead LOOP
        month_start := (first_month + make_interval(months => i))::date;
        part := format('connection_events_%s', to_char(month_start, 'YYYY_MM'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF connection_events FOR VALUES FROM (%L) TO (%L)',
                           part, month_start, (month_start + interval '1 month')::date);
        END IF;
    END LOOP;
END
$$;

SELECT ensure_connection_event_partitions(2);
