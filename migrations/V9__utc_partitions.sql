-- Connection-event partitions are bounded by months in UTC. V4's function took
-- its bounds in the session's time zone, so partitions created by sessions in
-- different zones (the migration tool's, the cron's through the pool) could
-- overlap, and creating one then failed. It also failed when two runs raced
-- to create the same month.
--
-- Now runs take turns (a transaction-scoped advisory lock, which works through
-- a transaction-mode pool), and a month that cannot be created (an existing
-- partition overlaps it, or the default partition already holds rows of it)
-- is skipped: its rows stay in the default partition, and the function
-- returns one line per skipped month for the cron to log.
DROP FUNCTION ensure_connection_event_partitions(integer);

CREATE FUNCTION ensure_connection_event_partitions(ahead integer DEFAULT 2) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    first_month timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    month_start timestamp;
    part text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('ensure_connection_event_partitions'));
    FOR i IN 0..ahead LOOP
        month_start := first_month + make_interval(months => i);
        part := format('connection_events_%s', to_char(month_start, 'YYYY_MM'));
        IF to_regclass(part) IS NULL THEN
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF connection_events FOR VALUES FROM (%L) TO (%L)',
                               part, month_start AT TIME ZONE 'UTC',
                               (month_start + interval '1 month') AT TIME ZONE 'UTC');
            EXCEPTION WHEN invalid_object_definition OR check_violation THEN
                RETURN NEXT format('%s not created: %s', part, SQLERRM);
            END;
        END IF;
    END LOOP;
END
$$;

SELECT ensure_connection_event_partitions(2);
