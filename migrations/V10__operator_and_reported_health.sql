-- An operator's decision and a monitor's report are kept apart. Both used to
-- write `health`, so an operator's `draining` or `down` lasted only until the
-- monitor's next report (every few seconds) said `up`: a region drained for
-- maintenance was back in service at once.
--
-- `reported_health` is the monitors' (and the cron's, for a monitor gone
-- silent); `operator_health` is the operator's restriction, none when null.
-- `health`, which the catalogue reads, is now derived: the worse of the two,
-- so neither can put back in service a region the other holds out.
ALTER TABLE regions
    ADD COLUMN reported_health text NOT NULL DEFAULT 'up'
        CHECK (reported_health IN ('up', 'draining', 'down')),
    ADD COLUMN operator_health text
        CHECK (operator_health IN ('draining', 'down'));

-- Who set today's health is not recorded. A region a monitor has reported on
-- keeps it as its report (the next report settles it, as before); one never
-- reported on had it from an operator (or the seed), and keeps it as theirs.
UPDATE regions SET reported_health = health WHERE health_reported_at IS NOT NULL;
UPDATE regions SET operator_health = health WHERE health_reported_at IS NULL AND health <> 'up';

ALTER TABLE regions DROP COLUMN health;
ALTER TABLE regions ADD COLUMN health text NOT NULL GENERATED ALWAYS AS (
    CASE WHEN 'down' IN (reported_health, operator_health) THEN 'down'
         WHEN 'draining' IN (reported_health, operator_health) THEN 'draining'
         ELSE 'up'
    END) STORED;
