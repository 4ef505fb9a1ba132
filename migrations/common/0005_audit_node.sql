-- The node that served each audited call (server.node_id). Empty in records written before
-- records carried it; those keep the v1 body encoding (SECURITY.md "Audit log").
ALTER TABLE audit_records ADD COLUMN node TEXT NOT NULL DEFAULT '';
