-- A user may hold several subscriptions at once: the billing provider lets a
-- customer have more than one (Plus running to the end of its period after
-- Family was bought, or Family cancelled while Plus goes on). One row per
-- user could follow only one of them, so the end of one could take away a
-- plan the other still paid for. Each subscription now has a row of its own,
-- changed only by its own events, and the entitlement is the best that any of
-- them grants. A row that followed a replaced subscription keeps following
-- the newer one; the older one's next event gives it a row again.
ALTER TABLE subscriptions DROP CONSTRAINT subscriptions_user_id_key;
CREATE INDEX subscriptions_user_idx ON subscriptions (user_id);
