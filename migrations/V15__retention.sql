-- Retention: the cron expires connection events and processed billing events
-- past the operator's settings (domain::retention, edge::cron). Until now
-- nothing did, and both tables only grew.
--
-- Each function answers one row per thing it did or could not do yet, with a
-- log level, for the cron to log.

-- Drops each monthly partition of connection_events whose whole month is
-- past `keep` (its upper bound at or before now() - keep), and deletes at
-- most `default_rows` rows past `keep` from the default partition (events of
-- a month that had no partition of its own).
--
-- Dropping a partition takes an ACCESS EXCLUSIVE lock on connection_events,
-- which the queue consumer's inserts hold off. The drop waits at most 2 s
-- for them (and inserts wait behind it no longer than that); one that cannot
-- have the lock is tried again at the next run. Runs take turns with the
-- partition maker (the same advisory lock as V9's), so no partition is made
-- and dropped at once.
CREATE FUNCTION expire_connection_events(keep interval, default_rows integer)
RETURNS TABLE (level text, message text)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := now() - keep;
    part record;
    deleted bigint;
BEGIN
    IF keep < interval '1 day' THEN
        RAISE EXCEPTION 'retention of % is under a day', keep;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('ensure_connection_event_partitions'));
    PERFORM set_config('lock_timeout', '2s', true);
    FOR part IN
        SELECT c.relname::text AS name,
               substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz AS ends
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'connection_events'::regclass
         ORDER BY 2
    LOOP
        -- The default partition has no bounds, and a partition open to
        -- MAXVALUE no end: neither is dropped.
        CONTINUE WHEN part.ends IS NULL OR part.ends > cutoff;
        BEGIN
            EXECUTE format('DROP TABLE %I', part.name);
            level := 'info';
            message := format('%s dropped: its events are all older than the retention of %s', part.name, keep);
            RETURN NEXT;
        EXCEPTION WHEN lock_not_available THEN
            level := 'warn';
            message := format('%s is past the retention of %s but was not dropped (%s); the next run tries again',
                              part.name, keep, SQLERRM);
            RETURN NEXT;
        END;
    END LOOP;
    DELETE FROM connection_events_default
     WHERE ctid IN (SELECT ctid FROM connection_events_default WHERE occurred_at < cutoff LIMIT default_rows);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    IF deleted > 0 THEN
        level := 'info';
        message := format('%s events older than the retention of %s deleted from connection_events_default', deleted, keep);
        RETURN NEXT;
    END IF;
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
