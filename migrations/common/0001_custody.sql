-- Custody metadata. Key material never lives here: only HSM object ids and labels.
-- Times are milliseconds since the Unix epoch (UTC). The SQL is kept to what SQLite and
-- PostgreSQL both accept.

CREATE TABLE installation (
    singleton INTEGER NOT NULL PRIMARY KEY CHECK (singleton = 1),
    -- Random id stamped into the CKA_LABEL of every HSM object this database owns, so that
    -- reconciliation never touches objects of another installation sharing the token.
    id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE tenants (
    name TEXT NOT NULL PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE keys (
    tenant TEXT NOT NULL REFERENCES tenants (name),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    -- The one primary version. Kept here rather than as a flag per version so that "exactly
    -- one primary" holds by construction; rotation moves it with a compare-and-set.
    primary_version INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE key_versions (
    -- Hex of the 16-byte version id: the blob's key-version id and the HSM object's CKA_ID.
    id TEXT NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_name TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('ENABLED', 'DISABLED', 'DESTROY_SCHEDULED', 'DESTROYED')),
    hsm_label TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    state_changed_at BIGINT NOT NULL,
    destroy_at BIGINT,
    destroyed_at BIGINT,
    -- Set when the HSM object was found missing; cleared if it reappears.
    lost_at BIGINT,
    -- Upper bound of blobs wrapped: reserved in blocks before use, so a crash can only
    -- over-count (safe for the 2^32 random-IV limit), never under-count.
    wraps_reserved BIGINT NOT NULL DEFAULT 0,
    UNIQUE (tenant, key_name, version),
    FOREIGN KEY (tenant, key_name) REFERENCES keys (tenant, name)
);
