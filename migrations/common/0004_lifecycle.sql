-- Key lifecycle: rotation periods, minimum decryption version, four-eyes approvals.

-- Rotate automatically every rotation_period_ms (NULL: never); next_rotation_at is when the
-- scheduler rotates next. Unwrap is refused for versions below min_decryption_version.
ALTER TABLE keys ADD COLUMN rotation_period_ms BIGINT;
ALTER TABLE keys ADD COLUMN next_rotation_at BIGINT;
ALTER TABLE keys ADD COLUMN min_decryption_version INTEGER NOT NULL DEFAULT 1;

-- A destruction request waits here for a second officer of the same tenant.
CREATE TABLE approvals (
    id TEXT NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_name TEXT NOT NULL,
    version INTEGER NOT NULL,
    operation TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('PENDING', 'APPROVED', 'REJECTED', 'EXPIRED')),
    decided_by TEXT NOT NULL DEFAULT '',
    decided_at BIGINT
);

CREATE INDEX approvals_tenant ON approvals (tenant, state);
