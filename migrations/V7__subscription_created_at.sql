-- A user has one subscription row, and Stripe may hold two subscriptions for
-- them for a while (Plus running to the end of its period after the user
-- bought Family). The row follows the newer of the two while that one is
-- being paid for; this records when the row's subscription was created, so
-- that the older one's later events (a cancellation scheduled on it, its
-- end) do not take the row back. Rows from before have none: any newer
-- subscription may take them over.
ALTER TABLE subscriptions ADD COLUMN provider_created_at timestamptz;
