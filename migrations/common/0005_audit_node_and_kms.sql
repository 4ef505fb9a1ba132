-- The node that served each audited call (server.node_id), and for calls of the AWS KMS
-- external key store proxy the KMS request id, operation, principal and key ARN. Empty in
-- records written before records carried them; those keep the v1 body encoding (SECURITY.md
-- "Audit log").
ALTER TABLE audit_records ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN kms_request_id TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN kms_operation TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN aws_principal_arn TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_records ADD COLUMN kms_key_arn TEXT NOT NULL DEFAULT '';
