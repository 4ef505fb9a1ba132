-- Metadata integrity (SECURITY.md "Metadata integrity"): hex HMAC-SHA256, under a key that
-- never leaves the HSM, over a key's whole state (its row and its versions' lifecycle fields)
-- and over each approval. Empty until the first start of a build that writes them, which
-- seals the rows it finds once (and only while the HSM holds no integrity key yet).
ALTER TABLE keys ADD COLUMN integrity TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN integrity TEXT NOT NULL DEFAULT '';
