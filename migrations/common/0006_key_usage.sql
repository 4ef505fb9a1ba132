-- What a key may be used for: ENCRYPT_DECRYPT, ENCRYPT, DECRYPT or NONE (officers set it; it
-- applies to the gRPC API and the XKS proxy alike).
ALTER TABLE keys ADD COLUMN usage TEXT NOT NULL DEFAULT 'ENCRYPT_DECRYPT';
