-- Burst records: one record for a run of identical refused calls from one source (after the
-- first, recorded on its own), with their count and time span (SECURITY.md "Audit log").
-- Zero in every other record; those keep their v1 or v2 body encoding.
ALTER TABLE audit_records ADD COLUMN repeated BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_records ADD COLUMN first_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_records ADD COLUMN last_ms BIGINT NOT NULL DEFAULT 0;
