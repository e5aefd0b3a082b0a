-- The plans the product sells. Reference data every environment needs, so it is a
-- migration, not a seed.
INSERT INTO plans (id, name, max_devices, region_tiers, price_cents) VALUES
    ('free',   'Free',   1,  '{free}',         0),
    ('plus',   'Plus',   5,  '{free,premium}', 999),
    ('family', 'Family', 10, '{free,premium}', 1499);
