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
-- server id (sha256 is 32 bytes, the size of a Curve25519 key), so the seed is
-- reproducible; real servers register their own keys.
INSERT INTO servers (id, region_id, hostname, port, public_key, capacity)
SELECT r.id || '-' || n,
       r.id,
       r.id || '-' || n || '.vpn.keenvpn.test',
       51820,
       encode(sha256(convert_to(r.id || '-' || n, 'UTF8')), 'base64'),
       CASE n WHEN 1 THEN 100 WHEN 2 THEN 100 ELSE 50 END
FROM regions r CROSS JOIN generate_series(1, 3) AS n
ON CONFLICT (id) DO NOTHING;
