-- Demo data for local development and tests. Idempotent: safe to apply again.
-- Never applied to production by the deploy steps.

INSERT INTO regions (id, name, country, latitude, longitude, tier, admission_rate) VALUES
    ('eu-central',   'Frankfurt',     'DE',  50.1109,    8.6821, 'free',    200),
    ('eu-west',      'London',        'GB',  51.5074,   -0.1278, 'premium', 200),
    ('us-east',      'Ashburn',       'US',  39.0438,  -77.4874, 'free',    200),
    ('us-west',      'San Jose',      'US',  37.3382, -121.8863, 'premium', 200),
    ('sa-east',      'Sao Paulo',     'BR', -23.5505,  -46.6333, 'premium', 100),
    ('ap-northeast', 'Tokyo',         'JP',  35.6762,  139.6503, 'premium', 200),
    ('ap-southeast', 'Singapore',     'SG',   1.3521,  103.8198, 'premium', 150),
    ('af-south',     'Johannesburg',  'ZA', -26.2041,   28.0473, 'premium', 100)
ON CONFLICT (id) DO NOTHING;

-- Three servers per region. Public keys are derived deterministically from the
-- server id (sha256 is 32 bytes, the size of a Curve25519 key, with the top bit
-- cleared, as X25519 keys have it), so the seed is reproducible; real servers
-- register their own keys.
INSERT INTO servers (id, region_id, hostname, port, public_key, capacity)
SELECT r.id || '-' || n,
       r.id,
       r.id || '-' || n || '.vpn.keenvpn.test',
       51820,
       encode(set_byte(sha256(convert_to(r.id || '-' || n, 'UTF8')), 31,
                       get_byte(sha256(convert_to(r.id || '-' || n, 'UTF8')), 31) & 127), 'base64'),
       CASE n WHEN 1 THEN 100 WHEN 2 THEN 100 ELSE 50 END
FROM regions r CROSS JOIN generate_series(1, 3) AS n
ON CONFLICT (id) DO NOTHING;

-- The demo account (`make dev` prints these credentials): a Plus subscriber.
-- Password: keenvpn-demo-2026 (argon2id, OWASP minimum cost).
INSERT INTO users (id, email, password_hash) VALUES
    ('00000000-0000-4000-8000-00000000d001', 'demo@keenvpn.test',
     '$argon2id$v=19$m=19456,t=2,p=1$saiuB2GWep4XioGTXq5TqQ$PRETOG8IguBL1X5DmL1gtwbgxS+88v8w94UWQT/7juQ')
ON CONFLICT (id) DO NOTHING;

INSERT INTO subscriptions (user_id, plan_id, status, current_period_end, provider_customer_id, provider_subscription_id)
VALUES ('00000000-0000-4000-8000-00000000d001', 'plus', 'active', '2099-01-01T00:00:00Z', 'cus_demo', 'sub_demo')
ON CONFLICT (provider_subscription_id) DO NOTHING;
