-- The cron's record of its own runs, one row: when it last ran, and from
-- when it may mark a silent region down.
--
-- A region whose monitor has not reported for 3 minutes is marked down. But
-- while PostgreSQL is down every report is refused (503), so after an outage
-- of a few minutes every monitored region looks silent, and the first cron
-- run after it marked them all down: a database outage, which connects
-- survive, became a connect outage. The cron needs the database too, so a
-- gap in its own runs is the sign of such an outage (or of the cron itself
-- stalling); after one, silence counts only from 3 minutes on.
CREATE TABLE cron_state (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_run_at timestamptz NOT NULL,
    marks_down_from timestamptz NOT NULL
);
