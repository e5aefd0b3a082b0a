-- A server's fullness (V16) lapses when no report confirms it for 3 minutes
-- (the window after which a silent monitor's region is marked down), so that
-- a monitor that stopped sending a server's load, or whose list of servers is
-- out of date, cannot hold it out of placement for good.
ALTER TABLE servers
    -- When a monitor last reported the server's load; NULL if never.
    ADD COLUMN load_reported_at timestamptz;

-- Whether `s` is full now. Never NULL: the catalogue's `full` is a boolean.
-- The catalogue and the admin server list both read this.
CREATE FUNCTION currently_full(s servers) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT s.is_full AND coalesce(s.load_reported_at > now() - interval '3 minutes', false)
$$;
