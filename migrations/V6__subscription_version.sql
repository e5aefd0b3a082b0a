-- A user's entitlement inputs are copied into their UserSession object by two
-- writers that race: a sign-in (which reads them, then spends ~100 ms checking
-- the password) and a billing event (which reads them after its change). The
-- version, raised by every change to the row, lets the object keep the newer
-- copy of the two, whichever arrives last. A user without a row is version 0.
ALTER TABLE subscriptions ADD COLUMN version bigint NOT NULL DEFAULT 1 CHECK (version >= 1);
