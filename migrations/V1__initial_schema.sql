-- The source of truth for accounts, subscriptions, devices and the VPN fleet.
-- Sessions, refresh tokens and throttles are NOT here: they live in the user's
-- Durable Object (see DESIGN: where state lives).

CREATE TABLE plans (
    id            text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_-]{0,31}$'),
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    max_devices   integer NOT NULL CHECK (max_devices BETWEEN 1 AND 1000),
    -- Region tiers the plan may connect to, e.g. {free} or {free,premium}.
    region_tiers  text[] NOT NULL CHECK (cardinality(region_tiers) >= 1),
    price_cents   integer NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Normalised (trimmed, lower-cased) by the application before it gets here.
    email          text NOT NULL UNIQUE CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 254),
    -- A PHC string (argon2id); never a plain password.
    password_hash  text NOT NULL CHECK (password_hash LIKE '$%'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id                        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                   uuid NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    plan_id                   text NOT NULL REFERENCES plans (id),
    -- The billing provider's statuses (Stripe's names).
    status                    text NOT NULL CHECK (status IN
                                ('trialing', 'active', 'past_due', 'canceled', 'unpaid',
                                 'incomplete', 'incomplete_expired', 'paused')),
    current_period_end        timestamptz NOT NULL,
    cancel_at_period_end      boolean NOT NULL DEFAULT false,
    provider                  text NOT NULL DEFAULT 'stripe',
    provider_customer_id      text,
    provider_subscription_id  text UNIQUE,
    -- Creation time of the newest provider event applied: older events never
    -- overwrite newer state.
    provider_event_at         timestamptz,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_customer_idx ON subscriptions (provider, provider_customer_id);

CREATE TABLE regions (
    id                  text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9-]{1,31}$'),
    name                text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    country             char(2) NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    latitude            double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude           double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180),
    tier                text NOT NULL CHECK (tier IN ('free', 'premium')),
    health              text NOT NULL DEFAULT 'up' CHECK (health IN ('up', 'draining', 'down')),
    -- Reconnects per second the region can absorb; sizes its admission bucket.
    admission_rate      integer NOT NULL DEFAULT 200 CHECK (admission_rate >= 0),
    health_reported_at  timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE servers (
    id           text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9-]{1,63}$'),
    region_id    text NOT NULL REFERENCES regions (id),
    hostname     text NOT NULL CHECK (length(hostname) BETWEEN 1 AND 253),
    port         integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    -- The server's WireGuard public key: base64 of 32 bytes.
    public_key   text NOT NULL UNIQUE CHECK (public_key ~ '^[A-Za-z0-9+/]{43}=$'),
    -- Relative weight for choosing a server within a region.
    capacity     integer NOT NULL CHECK (capacity > 0),
    enabled      boolean NOT NULL DEFAULT true,
    load         real NOT NULL DEFAULT 0 CHECK (load BETWEEN 0 AND 1),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (hostname, port)
);
CREATE INDEX servers_region_idx ON servers (region_id);

CREATE TABLE devices (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    -- The device's WireGuard public key: base64 of 32 bytes, unique fleet-wide.
    public_key    text NOT NULL UNIQUE CHECK (public_key ~ '^[A-Za-z0-9+/]{43}=$'),
    -- Tunnel addresses, unique fleet-wide.
    ipv4_address  inet NOT NULL UNIQUE CHECK (family(ipv4_address) = 4),
    ipv6_address  inet NOT NULL UNIQUE CHECK (family(ipv6_address) = 6),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_user_idx ON devices (user_id, created_at);
