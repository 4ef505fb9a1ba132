-- Managed objects: the symmetric keys KMIP clients create or register and fetch (SECURITY.md
-- "KMIP"). Their material is here only wrapped under the tenant's HSM-resident KMIP key
-- (hex of a Tresor blob whose AAD binds the object's id); it is set to '' when the object is
-- destroyed and its grace period has passed. Times are milliseconds since the epoch, 0 for
-- "not set".
CREATE TABLE managed_objects (
    id TEXT NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    object_type TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    length_bits BIGINT NOT NULL,
    usage_mask BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('PRE_ACTIVE', 'ACTIVE', 'DEACTIVATED', 'COMPROMISED', 'DESTROYED', 'DESTROYED_COMPROMISED')),
    created_at BIGINT NOT NULL,
    activation_date BIGINT NOT NULL,
    deactivation_date BIGINT NOT NULL,
    compromise_date BIGINT NOT NULL,
    destroy_date BIGINT NOT NULL,
    revocation_reason TEXT NOT NULL,
    last_change BIGINT NOT NULL,
    -- Other attributes (Object Group, Contact Information, x-…) as JSON.
    attributes TEXT NOT NULL,
    material TEXT NOT NULL,
    purge_after BIGINT NOT NULL
);
CREATE INDEX managed_objects_by_name ON managed_objects (tenant, name);
