-- Tunnel addresses come from one fleet-wide sequence: n maps to 10.64.0.0 + n
-- and fd4b:6565:6e00:: + n (see domain::device::tunnel_addresses). n = 1
-- (10.64.0.1) is left to the VPN servers' side of the tunnel. The IPv4 /10 holds
-- 4,194,301 device addresses; addresses of deleted devices are not reused.
CREATE SEQUENCE device_address_seq AS bigint MINVALUE 2 MAXVALUE 4194302 NO CYCLE;

-- Billing-provider events already processed: the primary key makes a replayed or
-- concurrently delivered event a no-op, in the same transaction as its effect.
CREATE TABLE webhook_events (
    id                text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    provider          text NOT NULL DEFAULT 'stripe',
    type              text NOT NULL CHECK (length(type) BETWEEN 1 AND 255),
    event_created_at  timestamptz NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_received_idx ON webhook_events (received_at);
