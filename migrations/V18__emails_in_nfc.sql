-- Email addresses are kept in Unicode NFC from now on: the application
-- normalizes them (src/domain/account.rs), so that the spellings of one
-- accented address (one character, or a letter and a combining mark) are one
-- account, found by sign-in however the client spelled it.
--
-- An address stored before in another spelling is put in NFC, so its account
-- still signs in. Where several accounts hold spellings of one address, the
-- one already in NFC keeps it, else the oldest takes the NFC spelling; the
-- others stay as they are, with their sessions, but sign-in no longer finds
-- them (two accounts cannot hold one address). A spelling whose NFC form is
-- not lower case (which the table's check refuses) stays too.
WITH spelled AS (
    SELECT id, email, normalize(email, NFC) AS nfc,
           row_number() OVER (PARTITION BY normalize(email, NFC)
                              ORDER BY email IS NFC NORMALIZED DESC, created_at, id) AS rank
    FROM users
    WHERE normalize(email, NFC) IN
          (SELECT normalize(email, NFC) FROM users WHERE email IS NOT NFC NORMALIZED)
)
UPDATE users u SET email = s.nfc, updated_at = now()
FROM spelled s
WHERE u.id = s.id AND s.rank = 1 AND s.email <> s.nfc AND s.nfc = lower(s.nfc);

-- New and changed rows must be in NFC; NOT VALID leaves the rows above that
-- had to stay as they are.
ALTER TABLE users ADD CONSTRAINT users_email_nfc CHECK (email IS NFC NORMALIZED) NOT VALID;
