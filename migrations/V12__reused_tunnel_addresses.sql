-- Tunnel addresses of deleted devices go back to the pool, after a quarantine.
--
-- The sequence (V3) never gives a number back, so every device that was
-- registered and then deleted (a reinstall, a phone replaced, an account
-- closed) used up one of the fleet's 4,194,301 addresses for good; once the
-- sequence ran out, no one could register a device. Now a deleted device's
-- number is kept here, and a registration takes the longest-freed number
-- whose quarantine has passed before it draws a new one
-- (`sql::insert_device`).
--
-- The quarantine (24 hours, `sql::ADDRESS_QUARANTINE`) is for the VPN
-- servers: one that has yet to drop the deleted device's peer still routes
-- the address to the old key, so a new device given it at once could find its
-- tunnel's traffic sent elsewhere.
-- Waits for a lock (the trigger's, below, behind a long transaction on
-- devices) end the migration rather than hold every device write meanwhile.
SET LOCAL lock_timeout = '10s';

CREATE TABLE freed_tunnel_addresses (
    n        bigint PRIMARY KEY CHECK (n BETWEEN 2 AND 4194302),
    freed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX freed_tunnel_addresses_freed_at_idx ON freed_tunnel_addresses (freed_at, n);

-- The numbers that deleted devices used up before this migration: every
-- number the sequence has given out that no device holds, in quarantine from
-- now (their devices may have been deleted a moment ago). Before the trigger,
-- so that this scan (millions of numbers on a large fleet) only reads
-- devices, and registrations and deletes go on meanwhile. A number drawn by
-- a registration still in flight is freed too, and is then held by a device:
-- `sql::insert_device` passes over a freed number that a device holds. A
-- device deleted while this runs keeps its number used up.
INSERT INTO freed_tunnel_addresses (n)
SELECT g.n
FROM generate_series(2, (SELECT CASE WHEN is_called THEN last_value ELSE 1 END
                         FROM device_address_seq)) AS g(n)
WHERE NOT EXISTS (SELECT 1 FROM devices d
                  WHERE d.ipv4_address = '10.64.0.0'::inet + g.n);

-- Every delete frees its number, also a cascade from a deleted account.
-- The number is the IPv4 address's offset from the range's base, as
-- `sql::insert_device` adds it.
CREATE FUNCTION free_tunnel_address() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A row may be there already: the backfill below can free the number of
    -- a registration in flight, whose device then holds it. The quarantine
    -- starts again from this delete.
    INSERT INTO freed_tunnel_addresses (n) VALUES (OLD.ipv4_address - '10.64.0.0'::inet)
    ON CONFLICT (n) DO UPDATE SET freed_at = now();
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_free_tunnel_address AFTER DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION free_tunnel_address();
