-- When a region last changed in what its admission gates (the `RegionGate`
-- shards) are told: whether it admits anyone (its health, or a rate of 0),
-- or its rate. For five minutes after such a change the cron repeats the
-- word to the region's gates on each run, so that a gate that missed it (a
-- call that failed, a shard restarted since) has it within a minute, and a
-- closed gate stays closed until every copy of the catalogue says so.
-- Changes made in SQL directly count too.
-- `gates_rate_before` is the highest rate the region had in the 5 minutes
-- before that change: isolates whose catalogue predates it still ask that
-- rate's shards, which are told too.
ALTER TABLE regions ADD COLUMN gates_changed_at timestamptz,
                    ADD COLUMN gates_rate_before integer;

-- Whether a region with these health reports and rate admits anyone: as the
-- generated `health` column reads them (V10), and a rate above 0.
CREATE FUNCTION region_admits(reported text, operator text, rate integer) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$
    SELECT rate > 0
       AND NOT coalesce('down' IN (reported, operator) OR 'draining' IN (reported, operator), false)
$$;

-- The version of a word to a region's gates: the database's clock, in
-- microseconds. A gate takes a word only if it is newer than the last.
CREATE FUNCTION gate_word_version() RETURNS bigint
    LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
$$;

CREATE FUNCTION note_region_gates_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF region_admits(NEW.reported_health, NEW.operator_health, NEW.admission_rate)
           IS DISTINCT FROM region_admits(OLD.reported_health, OLD.operator_health, OLD.admission_rate)
       OR NEW.admission_rate IS DISTINCT FROM OLD.admission_rate THEN
        NEW.gates_rate_before := CASE
            WHEN OLD.gates_changed_at > clock_timestamp() - interval '5 minutes'
                THEN greatest(OLD.gates_rate_before, OLD.admission_rate)
            ELSE OLD.admission_rate END;
        NEW.gates_changed_at := clock_timestamp();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER region_gates_changed BEFORE UPDATE ON regions
    FOR EACH ROW EXECUTE FUNCTION note_region_gates_change();
