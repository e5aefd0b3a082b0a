-- Whether a server is full (placement gives it no new devices while another
-- server of its region has room). Worked out from the monitors' reported
-- load with two marks: a server becomes full at a load of 0.95 and has room
-- again only below 0.90 (edge::admin). With one mark, a server whose load
-- hovers around it would turn full and back at every report, and each turn
-- republishes the catalogue to KV and has every isolate parse it again.
ALTER TABLE servers
    ADD COLUMN is_full boolean NOT NULL DEFAULT false,
    -- When a monitor last reported the server's load; NULL if never.
    ADD COLUMN load_reported_at timestamptz;

-- Whether `s` is full now: a fullness that no report has confirmed for 3
-- minutes (the window after which a silent monitor's region is marked down)
-- has lapsed, so that a monitor that stopped reporting a server's load, or
-- whose list of servers is out of date, cannot hold it out of placement for
-- good. The catalogue and the admin server list both read this.
CREATE FUNCTION currently_full(s servers) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT s.is_full AND s.load_reported_at > now() - interval '3 minutes'
$$;
