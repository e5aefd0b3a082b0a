-- Whether a server is full (placement gives it no new devices while another
-- server of its region has room). Worked out from the monitors' reported
-- load with two marks: a server becomes full at a load of 0.95 and has room
-- again only below 0.90 (edge::admin). With one mark, a server whose load
-- hovers around it would turn full and back at every report, and each turn
-- republishes the catalogue to KV and has every isolate parse it again.
ALTER TABLE servers ADD COLUMN is_full boolean NOT NULL DEFAULT false;
UPDATE servers SET is_full = load >= 0.95::real;
