-- Break-glass access windows (README "Access rules and break-glass"): an officer asks that an
-- identity may use keys matching a pattern for a while, for a reason; a second officer's
-- approval (the approvals row with the same id) opens it. Each row is sealed under the HSM's
-- metadata integrity key (`integrity`); a row that fails its check opens nothing. Times are
-- milliseconds since the epoch, 0 for "not yet".
CREATE TABLE access_windows (
    id TEXT NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    identity TEXT NOT NULL,
    key_pattern TEXT NOT NULL,
    reason TEXT NOT NULL,
    reference TEXT NOT NULL,
    duration_ms BIGINT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('PENDING', 'OPEN', 'CLOSED')),
    approved_by TEXT NOT NULL,
    opened_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    closed_by TEXT NOT NULL,
    closed_at BIGINT NOT NULL,
    integrity TEXT NOT NULL
);
CREATE INDEX access_windows_open ON access_windows (tenant, identity, state);

-- What access rules decided, recorded with each call (audit body v4).
ALTER TABLE audit_records ADD COLUMN access_rule TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN access_window TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN justification TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN justification_reference TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN kms_via_service TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN aws_source_vpc TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN aws_source_vpce TEXT NOT NULL DEFAULT '';
