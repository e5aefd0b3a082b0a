-- Retention: the cron expires connection events and processed billing events
-- past the operator's settings (domain::retention, edge::cron). Until now
-- nothing did, and both tables only grew.
--
-- Each function answers one row per thing it did or could not do yet, with a
-- log level, for the cron to log.

-- Drops the oldest monthly partition of connection_events whose whole month
-- is past `keep` (its upper bound at or before now() - keep), one a run, and
-- first deletes at most `default_rows` rows past `keep` from the default
-- partition (events of a month that had no partition of its own; an index
-- on its time keeps that from scanning it every run).
--
-- Dropping a partition takes an ACCESS EXCLUSIVE lock on connection_events,
-- which the queue consumer's inserts hold off and which holds them off in
-- turn until the transaction ends. So the drop is the function's last step
-- (the cron's step commits right after it), it waits at most 2 s for the
-- inserts under way (and inserts wait behind it no longer than that), and
-- only one partition is dropped a run: a backlog of months past the
-- retention goes a month a minute. A drop that cannot have the lock, or
-- fails otherwise, is reported and tried again at the next run. Runs take
-- turns with the partition maker (the same advisory lock as V9's), so no
-- partition is made and dropped at once.
CREATE INDEX connection_events_default_occurred_at_idx ON connection_events_default (occurred_at);

CREATE FUNCTION expire_connection_events(keep interval, default_rows integer)
RETURNS TABLE (level text, message text)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := now() - keep;
    part record;
    part_name text;
    deleted bigint;
BEGIN
    IF keep < interval '1 day' THEN
        RAISE EXCEPTION 'retention of % is under a day', keep;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('ensure_connection_event_partitions'));
    DELETE FROM connection_events_default
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM connection_events_default
                              WHERE occurred_at < cutoff LIMIT default_rows));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    IF deleted > 0 THEN
        level := 'info';
        message := format('%s events older than the retention of %s deleted from connection_events_default', deleted, keep);
        RETURN NEXT;
    END IF;
    -- The default partition has no bounds, and a partition open to MAXVALUE
    -- no end: neither is dropped.
    SELECT c.oid::regclass AS name,
           substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz AS ends
      INTO part
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'connection_events'::regclass
       AND substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz <= cutoff
     ORDER BY 2
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Its name as text: once dropped, the oid names nothing.
    part_name := part.name::text;
    PERFORM set_config('lock_timeout', '2s', true);
    BEGIN
        EXECUTE format('DROP TABLE %s', part_name);
        level := 'info';
        message := format('%s dropped: its events are all older than the retention of %s', part_name, keep);
    EXCEPTION
        WHEN lock_not_available THEN
            level := 'warn';
            message := format('%s is past the retention of %s but was not dropped (%s); the next run tries again',
                              part_name, keep, SQLERRM);
        WHEN OTHERS THEN
            level := 'error';
            message := format('%s is past the retention of %s but could not be dropped: %s',
                              part_name, keep, SQLERRM);
    END;
    RETURN NEXT;
END
$$;

-- Deletes at most `max_rows` of the oldest records of processed billing
-- events received more than `keep` ago (through webhook_events_received_idx).
CREATE FUNCTION expire_webhook_events(keep interval, max_rows integer)
RETURNS TABLE (level text, message text)
LANGUAGE plpgsql AS $$
DECLARE
    deleted bigint;
BEGIN
    IF keep < interval '30 days' THEN
        RAISE EXCEPTION 'retention of % is under the 30 days in which Stripe can resend an event', keep;
    END IF;
    DELETE FROM webhook_events
     WHERE id IN (SELECT id FROM webhook_events WHERE received_at < now() - keep
                   ORDER BY received_at LIMIT max_rows);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    IF deleted > 0 THEN
        level := 'info';
        message := format('%s processed billing events older than the retention of %s deleted', deleted, keep);
        RETURN NEXT;
    END IF;
END
$$;
