-- The audit log: one hash-chained record per RPC, checkpoints signed in the HSM, and the HSM
-- keys the log uses. Hashes and signatures are lower-case hex. See SECURITY.md "Audit log".

CREATE TABLE audit_records (
    seq BIGINT NOT NULL PRIMARY KEY,
    prev_hash TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    role TEXT NOT NULL,
    operation TEXT NOT NULL,
    key_name TEXT NOT NULL,
    key_version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    peer TEXT NOT NULL,
    aad_hmac TEXT NOT NULL,
    -- This record's hash, stored so the chain continues after a restart without rehashing.
    hash TEXT NOT NULL
);

CREATE INDEX audit_records_time ON audit_records (time_ms);

CREATE TABLE audit_checkpoints (
    seq BIGINT NOT NULL PRIMARY KEY,
    hash TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    signature TEXT NOT NULL
);

CREATE TABLE audit_keys (
    -- 'signing' (ECDSA P-256 pair) or 'hmac' (generic secret for AAD HMACs).
    purpose TEXT NOT NULL PRIMARY KEY,
    object_id TEXT NOT NULL,
    -- Uncompressed P-256 point, hex, for 'signing'; empty for 'hmac'.
    public_key TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
